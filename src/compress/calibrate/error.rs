//! Relative output error of a compressed weight.

use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use super::cache::FactorCache;
use super::hessian::InverseFactor;
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

/// [`output_error`], from the factor `factors` holds for these statistics
/// when it holds one (half the arithmetic; the factor the stage made).
pub fn output_error_with(
    exact: &[f32],
    approx: &[f32],
    stats: &LayerStats,
    factors: &FactorCache,
) -> Option<f64> {
    match factors.any(stats.key()).filter(|u| u.dim() == stats.cols()) {
        Some(u) if stats.xtx().is_some() && !exact.is_empty() => {
            let (num, den) = output_error_factored(exact, approx, &u);
            relative(num, den)
        }
        _ => output_error(exact, approx, stats),
    }
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

/// [`quadratic_rows`] from the factor of the dampened Hessian instead of
/// `xtx`; see [`quadratic_forms_factored`].
pub(crate) fn quadratic_rows_factored(
    k: usize,
    rows: usize,
    cols: usize,
    u: &InverseFactor,
    fill: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<Vec<f64>> {
    if cols == 0 || rows == 0 {
        return vec![Vec::new(); k];
    }
    let q = quadratic_forms_factored(k * rows, cols, u, |t, out| fill(t / rows, t % rows, out));
    q.chunks(rows.max(1)).map(<[f64]>::to_vec).collect()
}

/// Right-hand sides per triangular solve: bounds the scratch
/// (`RHS · cols` f32), and each solve reads the whole factor once. For an
/// 11008-column factor, 1536 right-hand sides run at 93 GFLOP per CPU
/// second where 768 ran at 79.
const RHS: usize = 6 * ROWS;

/// For `n` vectors `m` of length `cols`, the quadratic form `m H mᵀ`, from
/// the factor of the dampened Hessian: with `(H + λI + diag(dead))⁻¹ =
/// L₂L₂ᵀ` in processing order, `m (H + λI + diag(dead)) mᵀ = ‖L₂⁻¹ mᵀ‖²`,
/// one triangular solve (half the arithmetic of a product with `H`, and in
/// place). `H`'s rows and columns of dead columns are zero, so those
/// entries of `m` are dropped, and `m H mᵀ` is the result less `λ‖m‖²`
/// over the live columns. `fill(t, out)` writes vector `t`; `RHS` vectors
/// are held at a time, solved together.
pub(crate) fn quadratic_forms_factored(
    n: usize,
    cols: usize,
    u: &InverseFactor,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::with_capacity(n);
    if cols == 0 {
        out.resize(n, 0.0);
        return out;
    }
    assert_eq!(u.dim(), cols, "quadratic_forms_factored: dimensions differ");
    let mut t0 = 0;
    while t0 < n {
        let k = RHS.min(n - t0);
        let mut stacked = vec![0.0f32; k * cols];
        // Each vector in processing order, dead columns zeroed, and λ‖m‖².
        let shifts: Vec<f64> = stacked
            .par_chunks_mut(cols)
            .enumerate()
            .map_init(
                || vec![0.0f32; cols],
                |scratch, (t, row)| {
                    fill(t0 + t, scratch);
                    let mut sq = 0.0f64;
                    for (j, o) in row.iter_mut().enumerate() {
                        let c = u.column(j);
                        let x = if u.dead[c] { 0.0 } else { scratch[c] };
                        *o = x;
                        sq += f64::from(x) * f64::from(x);
                    }
                    u.lambda * sq
                },
            )
            .collect();
        // Row-major k × cols is column-major cols × k: the right-hand
        // sides of L₂ Z = Mᵀ.
        let rhs = faer::MatMut::from_column_major_slice_mut(&mut stacked, cols, k);
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(u.l2(), rhs, Par::rayon(0));
        let dots: Vec<f64> = stacked
            .par_chunks(cols)
            .zip(shifts.par_iter())
            .map(|(z, &shift)| z.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() - shift)
            .collect();
        out.extend_from_slice(&dots);
        t0 += k;
    }
    out
}

/// [`output_error`] with `xtx` given as its factor (see
/// [`quadratic_rows_factored`]): `(tr(ΔW H ΔWᵀ), tr(W H Wᵀ))`.
pub(crate) fn output_error_factored(
    exact: &[f32],
    approx: &[f32],
    u: &InverseFactor,
) -> (f64, f64) {
    let cols = u.dim();
    assert_eq!(exact.len(), approx.len(), "output_error: lengths differ");
    if cols == 0 || exact.is_empty() {
        return (0.0, 0.0);
    }
    let rows = exact.len() / cols;
    let q = quadratic_rows_factored(2, rows, cols, u, |i, r, out| {
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
    use crate::compress::calibrate::hessian::inverse_factor;
    use crate::compress::calibrate::testing::{random_xtx, Rng};
    use proptest::prelude::*;

    /// `m H mᵀ` in f64, straight from `xtx`.
    fn direct(m: &[f32], xtx: &[f32]) -> f64 {
        let d = m.len();
        let mut q = 0.0f64;
        for i in 0..d {
            for j in 0..d {
                q += f64::from(m[i]) * f64::from(xtx[i * d + j]) * f64::from(m[j]);
            }
        }
        q
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The per-row forms from the factor of the dampened Hessian (a
        /// triangular solve, less the dampening) equal `m H mᵀ` computed
        /// directly, for random positive semi-definite `xtx` (rank-deficient
        /// when `tokens < d`), dead columns, both orders and dampenings.
        /// Tolerance: 1e-3 of `m (H + λI) mᵀ` (f32 solve, then the
        /// dampening subtracted).
        #[test]
        fn rows_from_the_factor_match_the_direct_formula(
            d in 1usize..40,
            rows in 1usize..12,
            tokens_per_col in prop_oneof![Just(0.3f64), Just(1.0), Just(3.0)],
            dead in proptest::option::of(0usize..40),
            damp in prop_oneof![Just(0.01f64), Just(0.1), Just(1.0)],
            order in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut rng = Rng(seed | 1);
            let tokens = ((d as f64 * tokens_per_col) as usize).max(1);
            let mut xtx = random_xtx(&mut rng, d, tokens);
            if let Some(k) = dead.filter(|&k| k < d) {
                for t in 0..d {
                    xtx[k * d + t] = 0.0;
                    xtx[t * d + k] = 0.0;
                }
            }
            let u = inverse_factor(&xtx, d, damp, order).unwrap();
            let m: Vec<f32> = (0..rows * d).map(|_| rng.normal()).collect();
            let q = quadratic_rows_factored(1, rows, d, &u, |_, r, out| {
                out.copy_from_slice(&m[r * d..(r + 1) * d]);
            });
            for r in 0..rows {
                let row = &m[r * d..(r + 1) * d];
                let exact = direct(row, &xtx);
                let live: f64 = (0..d)
                    .filter(|&c| !u.dead[c])
                    .map(|c| f64::from(row[c]).powi(2))
                    .sum();
                let scale = exact + u.lambda * live;
                prop_assert!(
                    (q[0][r] - exact).abs() <= 1e-3 * scale + 1e-9,
                    "row {}: factored {} vs direct {} (scale {})", r, q[0][r], exact, scale
                );
            }
        }
    }

    #[test]
    fn the_error_from_the_factor_matches_the_plain_sums() {
        let (rows, cols) = (300, 33);
        let mut rng = Rng(7);
        let xtx = random_xtx(&mut rng, cols, 2 * cols);
        let in_sum2: Vec<f32> = (0..cols).map(|j| xtx[j * cols + j]).collect();
        let exact: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
        let approx: Vec<f32> = exact.iter().map(|&x| x + 0.1 * rng.normal()).collect();
        let stats = LayerStats::new(cols, in_sum2, 5.0, Some(xtx.clone()))
            .unwrap()
            .with_key("w");
        let r = output_error_reference(&exact, &approx, &stats).unwrap();
        let factors = FactorCache::new();
        // Nothing held: the products with xtx.
        let plain = output_error_with(&exact, &approx, &stats, &factors).unwrap();
        assert!((plain - r).abs() <= 1e-4 * r, "{plain} vs {r}");
        factors.factor(Some("w"), &xtx, cols, 0.01, false).unwrap();
        let (num, den) = output_error_factored(&exact, &approx, &factors.any(Some("w")).unwrap());
        let f = output_error_with(&exact, &approx, &stats, &factors).unwrap();
        assert_eq!(f, num / den);
        assert!((f - r).abs() <= 1e-3 * r, "{f} vs {r}");
    }

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
