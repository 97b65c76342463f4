//! Low-rank factorization: a matrix W (rows × cols) becomes A (rows × r)
//! times B (r × cols) by truncated SVD.
//!
//! The SVD runs in f32. The factors are stored in the tensor's dtype (f32 at
//! most), so f64 would buy precision that storage throws away, while an f64
//! copy of the matrix plus f64 U and V would take about twice the memory and
//! time (over 1 GB for a 4096 × 11008 projection).
//!
//! [`product`] is the one way the dense tensor is formed from its factors:
//! the dense writer and `decompress` both call it, so they agree bit for bit.

use std::ops::Range;

use faer::Mat;
use rayon::prelude::*;

use crate::compress::coded::MatrixShape;

/// How many singular values to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankChoice {
    /// `rank = ceil(ratio * min(rows, cols))`, at least 1.
    Ratio(f64),
    /// The smallest `r` whose top-`r` squared singular values reach
    /// `energy` times their total (the share of the Frobenius norm kept).
    Energy(f64),
}

/// Two factors whose product approximates the matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    /// rows × rank, row-major: U scaled by the singular values.
    pub a: Vec<f32>,
    /// rank × cols, row-major: Vᵀ.
    pub b: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowRankError {
    #[error("a {rows}x{cols} matrix has nothing to factor")]
    Empty { rows: usize, cols: usize },
    #[error("{len} values do not fill a {rows}x{cols} matrix")]
    Length {
        len: usize,
        rows: usize,
        cols: usize,
    },
    #[error("element {index} is {value}; a low-rank factorization needs finite values")]
    NonFinite { index: usize, value: f32 },
    #[error("the singular value decomposition did not converge")]
    NoConvergence,
}

/// Factors `data` (row-major, `shape`) by truncated SVD at the rank `choice`
/// selects.
pub fn low_rank(
    data: &[f32],
    shape: MatrixShape,
    choice: RankChoice,
) -> Result<LowRank, LowRankError> {
    let MatrixShape { rows, cols } = shape;
    if data.len() != shape.len() {
        return Err(LowRankError::Length {
            len: data.len(),
            rows,
            cols,
        });
    }
    if shape.is_empty() {
        return Err(LowRankError::Empty { rows, cols });
    }
    // The SVD iterations do not terminate cleanly on NaN or infinity.
    if let Some(index) = data.iter().position(|w| !w.is_finite()) {
        return Err(LowRankError::NonFinite {
            index,
            value: data[index],
        });
    }
    let matrix = Mat::<f32>::from_fn(rows, cols, |i, j| data[i * cols + j]);
    let svd = matrix.thin_svd().map_err(|_| LowRankError::NoConvergence)?;
    drop(matrix);
    let sigma_col = svd.S().column_vector();
    let sigma: Vec<f32> = (0..rows.min(cols)).map(|i| sigma_col[i]).collect();
    let rank = choose_rank(&sigma, choice);
    let (u, v) = (svd.U(), svd.V());
    let mut a = vec![0f32; rows * rank];
    a.par_chunks_mut(rank).enumerate().for_each(|(i, row)| {
        for (k, x) in row.iter_mut().enumerate() {
            *x = u[(i, k)] * sigma[k];
        }
    });
    let mut b = vec![0f32; rank * cols];
    b.par_chunks_mut(cols).enumerate().for_each(|(k, row)| {
        for (j, x) in row.iter_mut().enumerate() {
            *x = v[(j, k)];
        }
    });
    Ok(LowRank { rank, a, b })
}

/// The rank `choice` selects given singular values in non-increasing order
/// (at least 1, at most `sigma.len()`; `sigma` is not empty).
pub fn choose_rank(sigma: &[f32], choice: RankChoice) -> usize {
    let full = sigma.len();
    let rank = match choice {
        // The slack keeps a product such as 0.1 * 30 = 3.0000000000000004
        // from rounding up to 4.
        RankChoice::Ratio(ratio) => (ratio * full as f64 - 1e-9).ceil().max(0.0) as usize,
        RankChoice::Energy(energy) => {
            let squares: Vec<f64> = sigma.iter().map(|&s| f64::from(s).powi(2)).collect();
            let total: f64 = squares.iter().sum();
            let target = energy * total;
            let mut kept = 0.0;
            // The running sum ends at exactly `total`, so `energy <= 1`
            // always finds a rank.
            squares
                .iter()
                .position(|&sq| {
                    kept += sq;
                    kept >= target
                })
                .map_or(full, |i| i + 1)
        }
    };
    rank.clamp(1, full.max(1))
}

/// Rows of the output per parallel task, and the column and rank tiles
/// that keep a block of B in cache while it is reused across those rows.
const ROWS_PER_TASK: usize = 32;
const COL_TILE: usize = 512;
const RANK_TILE: usize = 128;
/// The register tile: `MR` rows × `NR` columns of the output are summed in
/// locals over a whole rank tile before going back to memory.
const MR: usize = 4;
const NR: usize = 8;

/// `A · B` (rows × cols, row-major). Every element is summed over the rank
/// in ascending order starting from 0.0, with a separate multiply and add
/// (never a fused one), whatever the tiling, thread count or CPU, so the same
/// factors always give the same bits.
///
/// Preconditions: `a` is `rows × rank` and `b` is `rank × cols`.
pub fn product(lr: &LowRank, shape: MatrixShape) -> Vec<f32> {
    let MatrixShape { rows, cols } = shape;
    let r = lr.rank;
    assert_eq!(lr.a.len(), rows * r, "factor A is not {rows}x{r}");
    assert_eq!(lr.b.len(), r * cols, "factor B is not {r}x{cols}");
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(cols * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, block)| {
            let tile = Tile {
                a: &lr.a[task * ROWS_PER_TASK * r..],
                b: &lr.b,
                rank: r,
                cols,
            };
            tile.product_rows(block);
        });
    out
}

/// One task's rows of A (starting at its first row) and all of B.
struct Tile<'a> {
    a: &'a [f32],
    b: &'a [f32],
    rank: usize,
    cols: usize,
}

impl Tile<'_> {
    /// Wider registers make the same IEEE multiplies and adds in the same
    /// order (no fused multiply-add), so the bits do not depend on the CPU.
    fn product_rows(&self, block: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has!("avx") {
            // SAFETY: the CPU supports AVX, checked just above.
            unsafe { self.product_rows_avx(block) };
            return;
        }
        self.product_rows_portable(block);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    unsafe fn product_rows_avx(&self, block: &mut [f32]) {
        self.product_rows_portable(block);
    }

    /// `block` (whole rows of the output) `= A[rows of block, ..] · B`.
    #[inline(always)]
    fn product_rows_portable(&self, block: &mut [f32]) {
        let (r, cols) = (self.rank, self.cols);
        let block_rows = block.len() / cols;
        let mut a_packed: Vec<[f32; MR]> = Vec::with_capacity(RANK_TILE);
        for j0 in (0..cols).step_by(COL_TILE) {
            let j1 = (j0 + COL_TILE).min(cols);
            for k0 in (0..r).step_by(RANK_TILE) {
                let ks = k0..(k0 + RANK_TILE).min(r);
                let mut i = 0;
                while i + MR <= block_rows {
                    a_packed.clear();
                    a_packed.extend(
                        ks.clone()
                            .map(|k| std::array::from_fn(|m| self.a[(i + m) * r + k])),
                    );
                    let mut j = j0;
                    while j + NR <= j1 {
                        self.accumulate_registers(block, i, j, ks.clone(), &a_packed);
                        j += NR;
                    }
                    self.accumulate(block, i..i + MR, j..j1, ks.clone());
                    i += MR;
                }
                self.accumulate(block, i..block_rows, j0..j1, ks);
            }
        }
    }

    /// `out[i..i+MR, j..j+NR] += A[.., ks] · B[ks, ..]`, summed in registers;
    /// `a_packed[kk]` holds `A[i..i+MR, ks.start + kk]`.
    #[inline(always)]
    fn accumulate_registers(
        &self,
        out: &mut [f32],
        i: usize,
        j: usize,
        ks: Range<usize>,
        a_packed: &[[f32; MR]],
    ) {
        let mut acc = [[0f32; NR]; MR];
        for (m, acc_row) in acc.iter_mut().enumerate() {
            acc_row.copy_from_slice(&out[(i + m) * self.cols + j..][..NR]);
        }
        let b_rows = self.b[ks.start * self.cols + j..].chunks(self.cols);
        for (a, b_row) in a_packed.iter().zip(b_rows) {
            let b: &[f32; NR] = b_row[..NR].try_into().expect("a slice of NR elements");
            for (acc_row, &a) in acc.iter_mut().zip(a) {
                for (o, &b) in acc_row.iter_mut().zip(b) {
                    *o += a * b;
                }
            }
        }
        for (m, acc_row) in acc.iter().enumerate() {
            out[(i + m) * self.cols + j..][..NR].copy_from_slice(acc_row);
        }
    }

    /// The same sum, element by element, for the edges of a tile.
    #[inline(always)]
    fn accumulate(&self, out: &mut [f32], is: Range<usize>, js: Range<usize>, ks: Range<usize>) {
        for i in is {
            for j in js.clone() {
                let mut sum = out[i * self.cols + j];
                for k in ks.clone() {
                    sum += self.a[i * self.rank + k] * self.b[k * self.cols + j];
                }
                out[i * self.cols + j] = sum;
            }
        }
    }
}

/// Plain reference for [`product`]: the triple loop.
pub fn product_reference(lr: &LowRank, shape: MatrixShape) -> Vec<f32> {
    let MatrixShape { rows, cols } = shape;
    let r = lr.rank;
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut sum = 0f32;
            for k in 0..r {
                sum += lr.a[i * r + k] * lr.b[k * cols + j];
            }
            out[i * cols + j] = sum;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::assert_same_bits;
    use proptest::prelude::*;

    fn shape(rows: usize, cols: usize) -> MatrixShape {
        MatrixShape { rows, cols }
    }

    fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// 3·u1·v1ᵀ + 1·u2·v2ᵀ with non-orthogonal u, v: rank exactly 2.
    fn rank_two(rows: usize, cols: usize) -> Vec<f32> {
        let u1 = |i: usize| (i as f32 * 0.7).sin() + 0.5;
        let v1 = |j: usize| (j as f32 * 0.3).cos();
        let u2 = |i: usize| (i as f32 * 1.9).cos();
        let v2 = |j: usize| j as f32 / cols as f32 - 0.4;
        (0..rows * cols)
            .map(|x| {
                let (i, j) = (x / cols, x % cols);
                3.0 * u1(i) * v1(j) + u2(i) * v2(j)
            })
            .collect()
    }

    #[test]
    fn a_rank_two_matrix_is_recovered_at_rank_two() {
        let (rows, cols) = (9, 7);
        let w = rank_two(rows, cols);
        for choice in [RankChoice::Ratio(2.0 / 7.0), RankChoice::Energy(0.999_999)] {
            let lr = low_rank(&w, shape(rows, cols), choice).unwrap();
            assert_eq!(lr.rank, 2, "{choice:?}");
            let back = product(&lr, shape(rows, cols));
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(max_abs_diff(&back, &w) < 1e-5 * scale, "{choice:?}");
        }
    }

    #[test]
    fn a_wide_matrix_factors_like_a_tall_one() {
        let w = rank_two(4, 11);
        let lr = low_rank(&w, shape(4, 11), RankChoice::Ratio(0.5)).unwrap();
        assert_eq!((lr.rank, lr.a.len(), lr.b.len()), (2, 8, 22));
        assert!(max_abs_diff(&product(&lr, shape(4, 11)), &w) < 1e-4);
    }

    #[test]
    fn energy_selects_the_rank_from_known_singular_values() {
        // Singular values 4, 3, 2, 1 (a scaled signed permutation):
        // squares 16, 9, 4, 1 of total 30.
        let (rows, cols) = (4, 6);
        let mut w = vec![0f32; rows * cols];
        for (i, (j, s)) in [(2, 3.0), (5, -1.0), (0, 4.0), (3, -2.0)]
            .into_iter()
            .enumerate()
        {
            w[i * cols + j] = s;
        }
        for (energy, want) in [(0.5, 1), (0.8, 2), (0.9, 3), (0.97, 4), (1.0, 4)] {
            let lr = low_rank(&w, shape(rows, cols), RankChoice::Energy(energy)).unwrap();
            assert_eq!(lr.rank, want, "energy {energy}");
        }
        let lr = low_rank(&w, shape(rows, cols), RankChoice::Energy(0.9)).unwrap();
        let back = product(&lr, shape(rows, cols));
        // Dropping σ = 1 (the −1 at row 1, column 5) leaves the rest exact.
        let mut want = w.clone();
        want[cols + 5] = 0.0;
        assert!(max_abs_diff(&back, &want) < 1e-5);
    }

    #[test]
    fn ratio_rounds_up_and_keeps_at_least_one() {
        let sigma = vec![1.0f32; 30];
        assert_eq!(choose_rank(&sigma, RankChoice::Ratio(0.1)), 3);
        assert_eq!(choose_rank(&sigma, RankChoice::Ratio(0.11)), 4);
        assert_eq!(choose_rank(&sigma, RankChoice::Ratio(0.001)), 1);
        assert_eq!(choose_rank(&sigma, RankChoice::Ratio(1.0)), 30);
        assert_eq!(choose_rank(&[0.0, 0.0], RankChoice::Energy(0.5)), 1);
    }

    #[test]
    fn non_finite_input_is_an_error() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = vec![1.0f32; 6];
            w[4] = bad;
            let e = low_rank(&w, shape(2, 3), RankChoice::Ratio(0.5)).unwrap_err();
            assert!(matches!(e, LowRankError::NonFinite { index: 4, .. }), "{e}");
        }
    }

    #[test]
    fn an_empty_or_short_matrix_is_an_error() {
        let e = low_rank(&[], shape(0, 3), RankChoice::Ratio(0.5)).unwrap_err();
        assert_eq!(e, LowRankError::Empty { rows: 0, cols: 3 });
        let e = low_rank(&[1.0; 5], shape(2, 3), RankChoice::Ratio(0.5)).unwrap_err();
        assert_eq!(e.to_string(), "5 values do not fill a 2x3 matrix");
    }

    fn factors(rows: usize, cols: usize, rank: usize, seed: u32) -> LowRank {
        let value = |i: usize| {
            ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5
        };
        LowRank {
            rank,
            a: (0..rows * rank).map(value).collect(),
            b: (0..rank * cols).map(|i| value(i + 7_919)).collect(),
        }
    }

    #[test]
    fn the_tiled_product_matches_the_triple_loop_across_tile_edges() {
        let (rows, cols, rank) = (ROWS_PER_TASK + MR + 1, COL_TILE + NR + 3, RANK_TILE + 9);
        let lr = factors(rows, cols, rank, 12_345);
        let got = product(&lr, shape(rows, cols));
        assert_same_bits(&got, &product_reference(&lr, shape(rows, cols)));
        assert_same_bits(&got, &product(&lr, shape(rows, cols)));
        assert_same_bits(&got, &product_portable(&lr, shape(rows, cols)));
    }

    /// [`product`] without the CPU-specific path.
    fn product_portable(lr: &LowRank, shape: MatrixShape) -> Vec<f32> {
        let mut out = vec![0f32; shape.len()];
        for (task, block) in out.chunks_mut(shape.cols * ROWS_PER_TASK).enumerate() {
            let tile = Tile {
                a: &lr.a[task * ROWS_PER_TASK * lr.rank..],
                b: &lr.b,
                rank: lr.rank,
                cols: shape.cols,
            };
            tile.product_rows_portable(block);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_product_is_bit_identical_to_the_triple_loop(
            rows in 0usize..40, cols in 0usize..40, rank in 0usize..10, seed in any::<u32>(),
        ) {
            let lr = factors(rows, cols, rank, seed);
            let want = product_reference(&lr, shape(rows, cols));
            assert_same_bits(&product(&lr, shape(rows, cols)), &want);
            if rows > 0 && cols > 0 {
                assert_same_bits(&product_portable(&lr, shape(rows, cols)), &want);
            }
        }
    }
}
