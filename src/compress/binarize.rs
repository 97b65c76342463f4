//! Binary and ternary weights with one scale per output channel (the
//! `binarize` stage).
//!
//! - Binary (XNOR-Net, Rastegari et al. 2016): `w' = α·sign(w)`, `α = mean|w|`
//!   over the row, the least-squares scale for fixed signs.
//! - Ternary (TWN, Li et al. 2016): `Δ = 0.7·mean|w|`; `w' = 0` where
//!   `|w| <= Δ`, else `±α` with `α` the mean of `|w|` over `|w| > Δ`.
//!
//! Non-finite inputs never reach a scale: NaN counts as `0.0`; `±inf` keep
//! their sign, count as 0 in `mean|w|` and are left out of the ternary `α`.

use rayon::prelude::*;

use crate::compress::coded::{Coded, Decode, MatrixShape};

/// Number of levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Levels {
    /// `{-α, +α}`: symbols 0, 1; one bit.
    Binary,
    /// `{-α, 0, +α}`: symbols 0, 1, 2; two bits.
    Ternary,
}

/// TWN's threshold factor: `Δ ≈ 0.7·E|w|` is the optimum for roughly
/// uniform or Gaussian weights.
const TERNARY_THRESHOLD: f64 = 0.7;

impl Levels {
    fn entries(self) -> usize {
        match self {
            Levels::Binary => 2,
            Levels::Ternary => 3,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Levels::Binary => 1,
            Levels::Ternary => 2,
        }
    }
}

/// `|w|` as it counts towards a mean: non-finite values count as 0.
#[inline]
fn magnitude(w: f32) -> f64 {
    if w.is_finite() {
        f64::from(w.abs())
    } else {
        0.0
    }
}

/// Codebook of one row; `α = 0` gives all `+0.0`, so a zero row decodes to
/// positive zeros.
fn codebook(levels: Levels, alpha: f32, out: &mut [f32]) {
    let neg = if alpha > 0.0 { -alpha } else { 0.0 };
    match levels {
        Levels::Binary => out.copy_from_slice(&[neg, alpha]),
        Levels::Ternary => out.copy_from_slice(&[neg, 0.0, alpha]),
    }
}

/// The largest f32 not above `x >= 0`: for any f32 `a`,
/// `f64::from(a) > x` exactly when `a > f32_below(x)`.
fn f32_below(x: f64) -> f32 {
    let d = x as f32;
    if f64::from(d) > x {
        f32::from_bits(d.to_bits() - 1)
    } else {
        d
    }
}

fn mean(sum: f64, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

fn coded(symbols: Vec<u8>, values: Vec<f32>, levels: Levels, group_len: usize) -> Coded {
    Coded {
        symbols,
        bits: levels.bits(),
        group_len,
        decode: Decode::Codebook {
            entries: levels.entries(),
            values,
        },
    }
}

/// Binarizes each row (output channel) of a `shape` matrix, rows in parallel.
///
/// Precondition: `data.len() == shape.len()`.
pub fn binarize(data: &[f32], shape: MatrixShape, levels: Levels) -> Coded {
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
    let cols = shape.cols.max(1);
    let entries = levels.entries();
    let mut symbols = vec![0u8; data.len()];
    let mut values = vec![0.0f32; data.len().div_ceil(cols) * entries];
    symbols
        .par_chunks_mut(cols)
        .zip(data.par_chunks(cols))
        .zip(values.par_chunks_mut(entries))
        .for_each(|((out, w), book)| {
            let mean_abs = mean(w.iter().map(|&x| magnitude(x)).sum(), w.len());
            let alpha = match levels {
                Levels::Binary => {
                    for (o, &x) in out.iter_mut().zip(w) {
                        // NaN counts as zero, a non-negative.
                        *o = u8::from(x >= 0.0 || x.is_nan());
                    }
                    mean_abs as f32
                }
                Levels::Ternary => {
                    let delta = TERNARY_THRESHOLD * mean_abs;
                    let delta32 = f32_below(delta);
                    let (mut sum, mut count) = (0.0f64, 0usize);
                    // Branch-free loops: signs and the threshold test are coin
                    // flips. The symbol loop vectorizes; the sum keeps the
                    // reference's order.
                    for (o, &x) in out.iter_mut().zip(w) {
                        let big = x.abs() > delta32;
                        *o = 1 + u8::from(big) - 2 * u8::from(big & (x < 0.0));
                    }
                    for &x in w {
                        let counted = (x.abs() > delta32) & x.is_finite();
                        sum += if counted { f64::from(x.abs()) } else { 0.0 };
                        count += usize::from(counted);
                    }
                    mean(sum, count) as f32
                }
            };
            codebook(levels, alpha, book);
        });
    coded(symbols, values, levels, cols)
}

/// [`binarize`] with plain sequential loops; the same result bit for bit.
pub fn binarize_reference(data: &[f32], shape: MatrixShape, levels: Levels) -> Coded {
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
    let cols = shape.cols.max(1);
    let mut symbols = Vec::with_capacity(data.len());
    let mut values = Vec::new();
    for w in data.chunks(cols) {
        let mut sum_abs = 0.0f64;
        for &x in w {
            sum_abs += magnitude(x);
        }
        let mean_abs = mean(sum_abs, w.len());
        let alpha = match levels {
            Levels::Binary => {
                for &x in w {
                    symbols.push(if x < 0.0 { 0 } else { 1 });
                }
                mean_abs as f32
            }
            Levels::Ternary => {
                let delta = TERNARY_THRESHOLD * mean_abs;
                let (mut sum, mut count) = (0.0f64, 0usize);
                for &x in w {
                    if f64::from(x.abs()) > delta && x.is_finite() {
                        sum += f64::from(x.abs());
                        count += 1;
                    }
                }
                for &x in w {
                    let symbol = if x.is_nan() || f64::from(x.abs()) <= delta {
                        1
                    } else if x < 0.0 {
                        0
                    } else {
                        2
                    };
                    symbols.push(symbol);
                }
                mean(sum, count) as f32
            }
        };
        let mut book = vec![0.0; levels.entries()];
        codebook(levels, alpha, &mut book);
        values.extend(book);
    }
    coded(symbols, values, levels, cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::first_difference;
    use proptest::prelude::*;

    fn book(c: &Coded) -> (usize, &[f32]) {
        match &c.decode {
            Decode::Codebook { entries, values } => (*entries, values),
            other => panic!("expected a codebook, got {other:?}"),
        }
    }

    fn shape(rows: usize, cols: usize) -> MatrixShape {
        MatrixShape { rows, cols }
    }

    #[test]
    fn binary_rows_use_the_mean_magnitude() {
        let w = [1.0, -3.0, 0.0, 2.0, -0.5, -0.5, -0.5, -0.5];
        let c = binarize(&w, shape(2, 4), Levels::Binary);
        assert_eq!((c.bits, c.group_len), (1, 4));
        assert_eq!(book(&c), (2, &[-1.5, 1.5, -0.5, 0.5][..]));
        assert_eq!(c.symbols, [1, 0, 1, 1, 0, 0, 0, 0]);
        assert_eq!(c.decode(), [1.5, -1.5, 1.5, 1.5, -0.5, -0.5, -0.5, -0.5]);
    }

    #[test]
    fn ternary_zeroes_what_is_below_the_threshold() {
        // mean|w| = 1, Δ = 0.7: 0.5 and -0.7 fall to zero; α = mean(1.3, 1.5) = 1.4.
        let w = [0.5, -1.5, -0.7, 1.3];
        let c = binarize(&w, shape(1, 4), Levels::Ternary);
        assert_eq!((c.bits, c.group_len), (2, 4));
        assert_eq!(book(&c), (3, &[-1.4, 0.0, 1.4][..]));
        assert_eq!(c.symbols, [1, 0, 1, 2]);
        assert_eq!(c.decode(), [0.0, -1.4, 0.0, 1.4]);
    }

    #[test]
    fn a_zero_row_decodes_to_positive_zeros() {
        for levels in [Levels::Binary, Levels::Ternary] {
            let c = binarize(&[0.0; 3], shape(1, 3), levels);
            assert!(c.decode().iter().all(|v| v.to_bits() == 0), "{levels:?}");
            assert!(c.zero_symbol(0).is_some());
        }
    }

    #[test]
    fn non_finite_values_keep_the_scales_finite() {
        let w = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0, -2.0, 0.0];
        for levels in [Levels::Binary, Levels::Ternary] {
            let c = binarize(&w, shape(1, 6), levels);
            assert_eq!(
                first_difference(&c, &binarize_reference(&w, shape(1, 6), levels)),
                None
            );
            let d = c.decode();
            assert!(d.iter().all(|v| v.is_finite()), "{levels:?}: {d:?}");
            assert!(
                d[1] > 0.0 && d[2] < 0.0,
                "{levels:?}: infinities keep their sign"
            );
        }
        // NaN counts as zero: ternary puts it on the zero level.
        assert_eq!(binarize(&w, shape(1, 6), Levels::Ternary).decode()[0], 0.0);
    }

    #[test]
    fn empty_tensors_have_no_codebooks() {
        let c = binarize(&[], shape(4, 0), Levels::Ternary);
        assert!(c.symbols.is_empty());
        assert!(book(&c).1.is_empty());
        assert_eq!(c, binarize_reference(&[], shape(4, 0), Levels::Ternary));
    }

    fn case() -> impl Strategy<Value = (Vec<f32>, MatrixShape, Levels)> {
        (1..6usize, 1..40usize).prop_flat_map(|(rows, cols)| {
            let weight = prop_oneof![1 => Just(0.0f32), 4 => -2.0f32..2.0, 1 => -50.0f32..50.0];
            (
                prop::collection::vec(weight, rows * cols),
                Just(shape(rows, cols)),
                prop_oneof![Just(Levels::Binary), Just(Levels::Ternary)],
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_f32_threshold_decides_like_the_f64_one(x in 0.0f64..1e3, a in 0.0f32..1e3) {
            let below = f32_below(x);
            prop_assert!(f64::from(below) <= x);
            prop_assert_eq!(f64::from(a) > x, a > below);
            prop_assert_eq!(f64::from(below) > x, below > below);
        }

        #[test]
        fn every_value_comes_from_its_rows_codebook((w, shape, levels) in case()) {
            let c = binarize(&w, shape, levels);
            let (entries, values) = book(&c);
            prop_assert_eq!(values.len(), shape.rows * entries);
            let d = c.decode();
            for (i, (&x, &y)) in w.iter().zip(&d).enumerate() {
                let r = i / shape.cols;
                let alpha = values[r * entries + entries - 1];
                prop_assert!(alpha >= 0.0);
                prop_assert!(usize::from(c.symbols[i]) < entries);
                prop_assert!(values[r * entries..(r + 1) * entries].contains(&y));
                match levels {
                    Levels::Binary => prop_assert_eq!(y, if x < 0.0 { -alpha } else { alpha }),
                    Levels::Ternary => {
                        let row = &w[r * shape.cols..(r + 1) * shape.cols];
                        let delta = 0.7 * row.iter().map(|v| f64::from(v.abs())).sum::<f64>()
                            / shape.cols as f64;
                        if f64::from(x.abs()) <= delta {
                            prop_assert_eq!(y, 0.0, "at {}: {} is within delta {}", i, x, delta);
                        } else {
                            prop_assert_eq!(y, alpha.copysign(x), "at {}: {} is beyond delta {}", i, x, delta);
                        }
                    }
                }
            }
        }

        #[test]
        fn the_reference_matches_bit_for_bit((w, shape, levels) in case()) {
            let fast = binarize(&w, shape, levels);
            let reference = binarize_reference(&w, shape, levels);
            prop_assert_eq!(first_difference(&fast, &reference), None);
        }
    }
}
