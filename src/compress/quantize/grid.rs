//! One group's integer grid, chosen and applied on its own: what the
//! calibrated kernels need when they quantize column by column (GPTQ refits
//! a group's grid when the sweep reaches it) or weigh each weight's error by
//! the importance of its input column.
//!
//! The grid of a group is the one [`super::quantize_int`] would choose
//! (same min-max parameters, same MSE candidates); with an importance per
//! element, the MSE search ranks candidates by `Σ imp_i (w_i - q_i)²`
//! instead of the plain squared error (llama.cpp's importance-matrix
//! weighting).

use rayon::prelude::*;

use super::{
    int_coded, minmax_choice, quantize_value, search_choice, Choice, Fit, GroupPasses, IntQuant,
    IntRange, ScaleSearch, Span,
};
use crate::compress::coded::{affine_symbol, affine_value, Coded, MatrixShape};

/// The scale and zero point of one group.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupGrid {
    choice: Choice,
    range: IntRange,
    bits: u8,
}

/// Importance of element `i` of a group: `imp[(offset + i) % imp.len()]`,
/// so one importance per input column serves a group that spans rows.
struct Weighted<'a> {
    w: &'a [f32],
    imp: &'a [f32],
    offset: usize,
    span: Span,
    r: IntRange,
}

impl Weighted<'_> {
    /// `Σ f(w_i, imp_i)` in element order, in f64.
    fn sum<const N: usize>(&self, f: impl Fn(f32, f64) -> [f64; N]) -> [f64; N] {
        let mut total = [0.0f64; N];
        let n = self.imp.len();
        let mut c = self.offset % n;
        for &x in self.w {
            let t = f(self.span.seen(x), f64::from(self.imp[c]));
            for k in 0..N {
                total[k] += t[k];
            }
            c += 1;
            if c == n {
                c = 0;
            }
        }
        total
    }
}

impl GroupPasses for Weighted<'_> {
    fn sum_sq(&self) -> f64 {
        self.sum(|w, imp| [imp * f64::from(w) * f64::from(w)])[0]
    }

    fn fit(&self, round_scale: f32, zero: i32) -> Fit {
        let [wd, dd] = self.sum(|w, imp| {
            let d = f64::from(quantize_value(w, round_scale, zero, self.r) - zero);
            [imp * f64::from(w) * d, imp * d * d]
        });
        Fit { wd, dd }
    }

    fn sq_error(&self, c: Choice) -> f64 {
        self.sum(|w, imp| {
            let q = quantize_value(w, c.round_scale, c.zero, self.r);
            let d = f64::from(w) - f64::from(affine_value(q, c.zero, c.scale));
            [imp * d * d]
        })[0]
    }
}

impl GroupGrid {
    /// The grid of the group `w`. With `importance` (`(imp, offset)`: the
    /// importance of element `i` is `imp[(offset + i) % imp.len()]`), the
    /// MSE search weighs each element's squared error by it.
    pub(crate) fn choose(
        w: &[f32],
        importance: Option<(&[f32], usize)>,
        bits: u8,
        symmetric: bool,
        search: ScaleSearch,
    ) -> Self {
        let r = IntRange::of(bits);
        let span = w.iter().fold(Span::ZERO, |s, &x| s.with(x));
        let choice = match (search, importance) {
            (ScaleSearch::MinMax, _) => minmax_choice(span, bits, symmetric),
            (ScaleSearch::Mse, Some((imp, offset))) if !imp.is_empty() => search_choice(
                &Weighted {
                    w,
                    imp,
                    offset,
                    span,
                    r,
                },
                span,
                bits,
                symmetric,
            ),
            (ScaleSearch::Mse, _) => {
                let ones = [1.0f32];
                search_choice(
                    &Weighted {
                        w,
                        imp: &ones,
                        offset: 0,
                        span,
                        r,
                    },
                    span,
                    bits,
                    symmetric,
                )
            }
        };
        Self {
            choice,
            range: r,
            bits,
        }
    }

    /// The symbol and the value `w` is stored as.
    #[inline]
    pub(crate) fn quantize(&self, w: f32) -> (u8, f32) {
        let q = quantize_value(w, self.choice.round_scale, self.choice.zero, self.range);
        (
            affine_symbol(q, self.bits),
            affine_value(q, self.choice.zero, self.choice.scale),
        )
    }

    /// The symbol that decodes to exactly `0.0` (the zero point).
    pub(crate) fn zero_symbol(&self) -> u8 {
        affine_symbol(self.choice.zero, self.bits)
    }
}

/// The [`Coded`] form of `symbols` with one grid per parameter group, in
/// row-major group order.
pub(crate) fn coded_from_grids(
    symbols: Vec<u8>,
    grids: &[GroupGrid],
    group_len: usize,
    p: &IntQuant,
) -> Coded {
    let choices: Vec<Choice> = grids.iter().map(|g| g.choice).collect();
    int_coded(symbols, &choices, group_len, p)
}

/// Round-to-nearest integer quantization whose MSE scale search minimizes
/// `Σ_j imp_j (w_j - q_j)²` with `imp_j = col_importance[j]` for column `j`.
/// With `ScaleSearch::MinMax` the importance plays no part and this is
/// [`super::quantize_int`].
///
/// Preconditions: as [`super::quantize_int`], and
/// `col_importance.len() == shape.cols`.
pub fn quantize_int_weighted(
    data: &[f32],
    shape: MatrixShape,
    p: &IntQuant,
    col_importance: &[f32],
) -> Coded {
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
    assert_eq!(
        col_importance.len(),
        shape.cols,
        "one importance per input column"
    );
    if p.scale_search == ScaleSearch::MinMax {
        return super::quantize_int(data, shape, p);
    }
    let group_len = p.granularity.group_len(shape);
    let mut symbols = vec![0u8; data.len()];
    let groups = data.len().div_ceil(group_len);
    let mut grids = vec![GroupGrid::choose(&[], None, p.bits, p.symmetric, p.scale_search); groups];
    symbols
        .par_chunks_mut(group_len)
        .zip(data.par_chunks(group_len))
        .zip(grids.par_iter_mut())
        .enumerate()
        .for_each(|(g, ((out, w), grid))| {
            let offset = if shape.cols == 0 {
                0
            } else {
                (g * group_len) % shape.cols
            };
            *grid = GroupGrid::choose(
                w,
                Some((col_importance, offset)),
                p.bits,
                p.symmetric,
                p.scale_search,
            );
            for (o, &x) in out.iter_mut().zip(w) {
                *o = grid.quantize(x).0;
            }
        });
    coded_from_grids(symbols, &grids, group_len, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::coded::Granularity;
    use proptest::prelude::*;

    fn weighted_error(w: &[f32], c: &Coded, shape: MatrixShape, imp: &[f32]) -> f64 {
        let d = c.decode();
        w.iter()
            .zip(&d)
            .enumerate()
            .map(|(i, (&a, &b))| {
                let e = f64::from(a) - f64::from(b);
                f64::from(imp[i % shape.cols]) * e * e
            })
            .sum()
    }

    #[test]
    fn min_max_grids_match_the_plain_quantizer() {
        let shape = MatrixShape { rows: 3, cols: 8 };
        let w: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        for granularity in [
            Granularity::Tensor,
            Granularity::Channel,
            Granularity::Group(4),
        ] {
            let p = IntQuant {
                bits: 4,
                symmetric: false,
                granularity,
                scale_search: ScaleSearch::MinMax,
            };
            let imp = vec![1.0; 8];
            assert_eq!(
                quantize_int_weighted(&w, shape, &p, &imp),
                super::super::quantize_int_reference(&w, shape, &p)
            );
        }
    }

    #[test]
    fn importance_moves_the_grid_toward_the_important_column() {
        // One important weight that min-max rounding hits badly: the
        // weighted search fits it at the expense of the others.
        let shape = MatrixShape { rows: 1, cols: 8 };
        let w = [1.0, 0.9, 0.13, 0.37, -0.52, 0.61, -0.2, 0.05];
        let mut imp = vec![1e-3f32; 8];
        imp[3] = 1.0;
        let p = IntQuant {
            bits: 3,
            symmetric: true,
            granularity: Granularity::Channel,
            scale_search: ScaleSearch::Mse,
        };
        let weighted = quantize_int_weighted(&w, shape, &p, &imp);
        let plain = super::super::quantize_int_reference(&w, shape, &p);
        let (a, b) = (
            weighted_error(&w, &weighted, shape, &imp),
            weighted_error(&w, &plain, shape, &imp),
        );
        assert!(a < 0.5 * b, "weighted {a:e} vs plain {b:e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_weighted_search_is_never_worse_than_min_max_on_its_objective(
            (rows, cols, w, imp, bits, symmetric, g) in (1..4usize, 1..5usize).prop_flat_map(|(rows, k)| {
                let cols = 4 * k;
                (
                    Just(rows),
                    Just(cols),
                    prop::collection::vec(-2.0f32..2.0, rows * cols),
                    prop::collection::vec(0.0f32..10.0, cols),
                    2..=8u8,
                    any::<bool>(),
                    prop_oneof![Just(Granularity::Tensor), Just(Granularity::Channel), Just(Granularity::Group(4))],
                )
            })
        ) {
            let shape = MatrixShape { rows, cols };
            let p = IntQuant { bits, symmetric, granularity: g, scale_search: ScaleSearch::Mse };
            let mse = quantize_int_weighted(&w, shape, &p, &imp);
            let minmax = quantize_int_weighted(&w, shape, &IntQuant { scale_search: ScaleSearch::MinMax, ..p }, &imp);
            let group_len = g.group_len(shape);
            let (dm, dx) = (mse.decode(), minmax.decode());
            for start in (0..w.len()).step_by(group_len) {
                let err = |d: &[f32]| -> f64 {
                    (start..start + group_len).map(|i| {
                        let e = f64::from(w[i]) - f64::from(d[i]);
                        f64::from(imp[i % cols]) * e * e
                    }).sum()
                };
                let (a, b) = (err(&dm), err(&dx));
                prop_assert!(a <= b * (1.0 + 1e-9) + 1e-12, "group at {}: {} > {}", start, a, b);
            }
        }
    }
}
