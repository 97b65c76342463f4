//! Relative output error of a compressed weight.

use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::LayerStats;

/// Rows of each matrix per product with `H`: bounds the scratch.
const ROWS: usize = 256;

/// `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` with `ΔW = approx - exact`, using `xtx` when
/// the statistics have it and `diag H = in_sum2` otherwise. `None` when the
/// denominator is 0 (all weights or all inputs zero).
///
/// Preconditions: `exact` and `approx` are `rows × stats.cols()` row-major.
pub fn output_error(exact: &[f32], approx: &[f32], stats: &LayerStats) -> Option<f64> {
    let cols = stats.cols();
    assert_eq!(exact.len(), approx.len(), "output_error: lengths differ");
    if cols == 0 || exact.is_empty() {
        return None;
    }
    let (num, den) = match stats.xtx() {
        Some(xtx) => {
            let rows = exact.len() / cols;
            let q = quadratic_rows(2, rows, cols, xtx, |i, r, out| {
                let (e, a) = (&exact[r * cols..][..cols], &approx[r * cols..][..cols]);
                if i == 0 {
                    for ((o, &e), &a) in out.iter_mut().zip(e).zip(a) {
                        *o = a - e;
                    }
                } else {
                    out.copy_from_slice(e);
                }
            });
            (q[0].iter().sum(), q[1].iter().sum())
        }
        None => diagonal(exact, approx, stats),
    };
    relative(num, den)
}

/// `num / den`, or `None` when `den` is not positive.
pub(crate) fn relative(num: f64, den: f64) -> Option<f64> {
    (den > 0.0).then(|| num.max(0.0) / den)
}

/// For `k` matrices of `rows × cols`, the quadratic form `m_r H m_rᵀ` of
/// every row `r` of every matrix, in f64 from f32 products with `H`
/// (faer). `fill(i, r, out)` writes row `r` of matrix `i`, so no matrix is
/// ever held whole: `ROWS` rows of each at a time.
pub(crate) fn quadratic_rows(
    k: usize,
    rows: usize,
    cols: usize,
    xtx: &[f32],
    fill: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<Vec<f64>> {
    let mut out: Vec<Vec<f64>> = vec![Vec::with_capacity(rows); k];
    if cols == 0 {
        return out;
    }
    let h = MatRef::from_row_major_slice(xtx, cols, cols);
    let mut r0 = 0;
    while r0 < rows {
        let n = ROWS.min(rows - r0);
        let mut stacked = vec![0.0f32; k * n * cols];
        stacked
            .par_chunks_mut(cols)
            .enumerate()
            .for_each(|(t, row)| fill(t / n, r0 + t % n, row));
        let lhs = MatRef::from_row_major_slice(&stacked, k * n, cols);
        let mut prod = Mat::<f32>::zeros(k * n, cols);
        faer::linalg::matmul::matmul(prod.as_mut(), Accum::Replace, lhs, h, 1.0f32, Par::rayon(0));
        let dots: Vec<f64> = (0..k * n)
            .into_par_iter()
            .map(|r| {
                (0..cols)
                    .map(|j| f64::from(prod[(r, j)]) * f64::from(stacked[r * cols + j]))
                    .sum()
            })
            .collect();
        for (o, d) in out.iter_mut().zip(dots.chunks(n)) {
            o.extend_from_slice(d);
        }
        r0 += n;
    }
    out
}

fn diagonal(exact: &[f32], approx: &[f32], stats: &LayerStats) -> (f64, f64) {
    let cols = stats.cols();
    let h = stats.in_sum2();
    exact
        .par_chunks(cols)
        .zip(approx.par_chunks(cols))
        .map(|(e, a)| {
            let mut num = 0.0;
            let mut den = 0.0;
            for ((&e, &a), &h) in e.iter().zip(a).zip(h) {
                let (e, a, h) = (f64::from(e), f64::from(a), f64::from(h));
                num += h * (a - e) * (a - e);
                den += h * e * e;
            }
            (num, den)
        })
        .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1))
}

/// [`output_error`] with plain f64 loops.
pub fn output_error_reference(exact: &[f32], approx: &[f32], stats: &LayerStats) -> Option<f64> {
    let cols = stats.cols();
    if cols == 0 || exact.is_empty() {
        return None;
    }
    let rows = exact.len() / cols;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for r in 0..rows {
        let e = &exact[r * cols..(r + 1) * cols];
        let a = &approx[r * cols..(r + 1) * cols];
        for i in 0..cols {
            for j in 0..cols {
                let h = match stats.xtx() {
                    Some(x) => f64::from(x[i * cols + j]),
                    None if i == j => f64::from(stats.in_sum2()[i]),
                    None => 0.0,
                };
                let di = f64::from(a[i]) - f64::from(e[i]);
                let dj = f64::from(a[j]) - f64::from(e[j]);
                num += di * h * dj;
                den += f64::from(e[i]) * h * f64::from(e[j]);
            }
        }
    }
    relative(num, den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calibrate::testing::{random_xtx, Rng};

    #[test]
    fn the_full_and_diagonal_forms_match_the_plain_sums() {
        for (rows, cols) in [(1, 1), (3, 7), (300, 9)] {
            let mut rng = Rng(rows as u64 * 31 + cols as u64);
            let xtx = random_xtx(&mut rng, cols, 2 * cols + 3);
            let in_sum2: Vec<f32> = (0..cols).map(|j| xtx[j * cols + j]).collect();
            let exact: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let approx: Vec<f32> = exact.iter().map(|&x| x + 0.1 * rng.normal()).collect();
            let full = LayerStats::new(cols, in_sum2.clone(), 5.0, Some(xtx)).unwrap();
            let diag = LayerStats::new(cols, in_sum2, 5.0, None).unwrap();
            for s in [&full, &diag] {
                let (f, r) = (
                    output_error(&exact, &approx, s).unwrap(),
                    output_error_reference(&exact, &approx, s).unwrap(),
                );
                assert!((f - r).abs() <= 1e-4 * r, "{rows}x{cols}: {f} vs {r}");
            }
            assert_eq!(output_error(&exact, &exact, &full), Some(0.0));
        }
    }
}
