//! From `xtx` to the factor the GPTQ / SparseGPT sweep runs on: the upper
//! Cholesky factor `U` of the inverse of the dampened Hessian,
//! `(H + λI)⁻¹ = UᵀU`, with `H = XᵀX` (the reference's `2/n XᵀX` differs by
//! a constant, which the relative dampening and every decision ignore).
//!
//! As the reference (IST-DASLab `gptq.py`): dead columns (`H_jj = 0`, inputs
//! that are always zero) get `H_jj = 1` and their weights are set to zero;
//! `λ = damp · mean(diag H)`; with `act_order`, columns are processed by
//! decreasing `H_jj`.
//!
//! In f32 with faer, in two `d × d` matrices besides the caller's `xtx`:
//! `H` in reversed order, factored in place, and its triangular inverse.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Mat, Par};
use rayon::prelude::*;

use super::CalibError;

/// The factor of the inverse of the dampened Hessian in processing order:
/// what the sweep runs on and what output errors are measured with. Tensors
/// whose statistics share one `xtx` can share it ([`super::FactorCache`]).
#[derive(Debug)]
pub struct InverseFactor {
    /// Lower-triangular `L₂` with `H⁻¹ = L₂L₂ᵀ`; the sweep's `U = L₂ᵀ`, so
    /// row `j` of `U` is column `j` of `L₂`, contiguous in column-major
    /// storage.
    l2: Mat<f32>,
    /// `perm[j]` is the original column processed `j`-th (`act_order`).
    pub(crate) perm: Option<Vec<usize>>,
    /// Original columns whose `H_jj` was 0.
    pub(crate) dead: Vec<bool>,
    /// The dampening added to the diagonal: the factored matrix is
    /// `H + λI + diag(dead)` (a dead column's diagonal becomes `1 + λ`).
    pub(crate) lambda: f64,
}

impl InverseFactor {
    pub(crate) fn dim(&self) -> usize {
        self.l2.nrows()
    }

    /// Whether the columns are processed by decreasing `H_jj`.
    pub(crate) fn act_order(&self) -> bool {
        self.perm.is_some()
    }

    /// `L₂` (lower triangular, `L₂L₂ᵀ = (H + λI)⁻¹` in processing order).
    pub(crate) fn l2(&self) -> faer::MatRef<'_, f32> {
        self.l2.as_ref()
    }

    /// `U[j][j..]` (row `j` of the upper factor from its diagonal on).
    #[inline]
    pub(crate) fn u_row(&self, j: usize) -> &[f32] {
        &self.l2.col_as_slice(j)[j..]
    }

    /// `U[i1..i2][i2..]` as a matrix view (`i2 - i1` rows).
    pub(crate) fn u_block(&self, i1: usize, i2: usize) -> faer::MatRef<'_, f32> {
        let d = self.dim();
        self.l2
            .as_ref()
            .submatrix(i2, i1, d - i2, i2 - i1)
            .transpose()
    }

    /// The original column processed at position `j`.
    #[inline]
    pub(crate) fn column(&self, j: usize) -> usize {
        self.perm.as_ref().map_or(j, |p| p[j])
    }
}

/// The processing order: by decreasing diagonal (stable, so equal
/// diagonals keep their order), or `None` for the natural order.
fn act_order(diag: &[f64]) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..diag.len()).collect();
    perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    perm
}

/// Dead columns, the processing order, and `λ`.
pub(crate) struct Prepared {
    pub(crate) dead: Vec<bool>,
    pub(crate) perm: Option<Vec<usize>>,
    pub(crate) lambda: f64,
}

pub(crate) fn prepare(xtx: &[f32], d: usize, damp: f64, order: bool) -> Prepared {
    let mut diag: Vec<f64> = (0..d).map(|j| f64::from(xtx[j * d + j])).collect();
    let dead: Vec<bool> = diag.iter().map(|&x| x == 0.0).collect();
    for (x, &dead) in diag.iter_mut().zip(&dead) {
        if dead {
            *x = 1.0;
        }
    }
    let mean = if d > 0 {
        diag.iter().sum::<f64>() / d as f64
    } else {
        0.0
    };
    Prepared {
        perm: order.then(|| act_order(&diag)),
        dead,
        lambda: damp * mean,
    }
}

/// The factor for `xtx` (row-major `d × d`, symmetric).
///
/// With `J` the order-reversing permutation and `J H J = L Lᵀ`:
/// `H⁻¹ = J L⁻ᵀ L⁻¹ J`, so `U = J L⁻¹ J` is upper triangular with a
/// positive diagonal and `UᵀU = H⁻¹`: the (unique) factor the reference
/// gets from Cholesky of H, its inverse, and Cholesky again, for one
/// Cholesky and one triangular inverse.
pub fn inverse_factor(
    xtx: &[f32],
    d: usize,
    damp: f64,
    order: bool,
) -> Result<InverseFactor, CalibError> {
    let Prepared { dead, perm, lambda } = prepare(xtx, d, damp, order);
    let par = Par::rayon(0);
    // Processing position `i` reads original column `src(i)`; the matrix is
    // built in reversed processing order.
    let src = |i: usize| perm.as_ref().map_or(i, |p| p[i]);
    let rev = |i: usize| src(d - 1 - i);
    // Column-major, by tiles of columns in parallel (a serial fill was
    // over a tenth of the factor's time for d = 11008); each tile reads
    // `FILL` consecutive entries of a row of `xtx` at a time.
    const FILL: usize = 64;
    let mut l = Mat::<f32>::zeros(d, d);
    l.as_mut()
        .par_col_chunks_mut(FILL)
        .enumerate()
        .for_each(|(t, mut block)| {
            let j0 = t * FILL;
            for i in 0..d {
                let a = rev(i);
                for jj in 0..block.ncols() {
                    let b = rev(j0 + jj);
                    block[(i, jj)] = if a == b {
                        let x = if dead[a] {
                            1.0
                        } else {
                            f64::from(xtx[a * d + a])
                        };
                        (x + lambda) as f32
                    } else {
                        xtx[a * d + b]
                    };
                }
            }
        });
    let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f32>(d, par, Default::default()));
    cholesky_in_place(
        l.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut mem),
        Default::default(),
    )
    .map_err(|_| CalibError::NotPositiveDefinite { damp })?;
    let mut l2 = Mat::<f32>::zeros(d, d);
    invert_lower_triangular(l2.as_mut(), l.as_ref(), par);
    drop(l);
    // l2[k][j] = U[j][k] = L⁻¹[d-1-j][d-1-k] for k >= j: the inverse
    // mirrored across its anti-diagonal, an involution done in place by
    // swapping pairs (`L⁻¹` is lower triangular, and so is the result).
    // In tiles, so both sides of a swap stay in cache.
    const TILE: usize = 64;
    for jb in (0..d).step_by(TILE) {
        for kb in (jb..d).step_by(TILE) {
            for j in jb..(jb + TILE).min(d) {
                for k in kb.max(j)..(kb + TILE).min(d) {
                    // (k, j) and (d-1-j, d-1-k): each pair swapped once.
                    let (a, b) = (d - 1 - j, d - 1 - k);
                    if (k, j) < (a, b) {
                        let t = l2[(k, j)];
                        l2[(k, j)] = l2[(a, b)];
                        l2[(a, b)] = t;
                    }
                }
            }
        }
    }
    Ok(InverseFactor {
        l2,
        perm,
        dead,
        lambda,
    })
}

/// [`inverse_factor`] the plain way, in f64: textbook Cholesky, the inverse
/// by forward and back substitution of unit vectors, Cholesky again.
/// Returns `U` row-major (`d × d`).
#[cfg(test)]
pub(crate) fn inverse_factor_reference(
    xtx: &[f32],
    d: usize,
    damp: f64,
    order: bool,
) -> Result<(Vec<f64>, Prepared), CalibError> {
    let prep = prepare(xtx, d, damp, order);
    let src = |i: usize| prep.perm.as_ref().map_or(i, |p| p[i]);
    let mut h = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            let (a, b) = (src(i), src(j));
            h[i * d + j] = if a == b {
                let x = if prep.dead[a] {
                    1.0
                } else {
                    f64::from(xtx[a * d + a])
                };
                x + prep.lambda
            } else {
                f64::from(xtx[a * d + b])
            };
        }
    }
    let not_pd = CalibError::NotPositiveDefinite { damp };
    let l = cholesky_reference(&h, d).ok_or(not_pd.clone())?;
    // H⁻¹ column by column: L y = e_k, then Lᵀ x = y.
    let mut inv = vec![0.0f64; d * d];
    for k in 0..d {
        let mut y = vec![0.0f64; d];
        for i in 0..d {
            let mut s = if i == k { 1.0 } else { 0.0 };
            for t in 0..i {
                s -= l[i * d + t] * y[t];
            }
            y[i] = s / l[i * d + i];
        }
        for i in (0..d).rev() {
            let mut s = y[i];
            for t in i + 1..d {
                s -= l[t * d + i] * inv[t * d + k];
            }
            inv[i * d + k] = s / l[i * d + i];
        }
    }
    let l2 = cholesky_reference(&inv, d).ok_or(not_pd)?;
    let mut u = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            u[i * d + j] = l2[j * d + i];
        }
    }
    Ok((u, prep))
}

/// Lower `L` with `a = LLᵀ` (row-major), or `None` when a pivot is not
/// positive.
#[cfg(test)]
pub(crate) fn cholesky_reference(a: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    Some(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calibrate::testing::{random_xtx, Rng};

    #[test]
    fn the_factor_matches_the_plain_f64_computation() {
        for (d, order) in [(1, false), (5, true), (17, false), (40, true)] {
            let mut rng = Rng(d as u64 + 3);
            let mut xtx = random_xtx(&mut rng, d, 3 * d);
            if d > 3 {
                // A dead column.
                for k in 0..d {
                    xtx[2 * d + k] = 0.0;
                    xtx[k * d + 2] = 0.0;
                }
            }
            let fast = inverse_factor(&xtx, d, 0.01, order).unwrap();
            let (u, prep) = inverse_factor_reference(&xtx, d, 0.01, order).unwrap();
            assert_eq!(fast.perm, prep.perm);
            assert_eq!(fast.dead, prep.dead);
            for i in 0..d {
                let row = fast.u_row(i);
                let scale = u[i * d + i].abs();
                for j in 0..d {
                    let f = if j >= i { f64::from(row[j - i]) } else { 0.0 };
                    let r = u[i * d + j];
                    assert!(
                        (f - r).abs() <= 1e-3 * scale,
                        "d {d}: U[{i}][{j}] = {f} vs {r} (diag {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn an_indefinite_matrix_is_an_error() {
        let xtx = [1.0f32, 2.0, 2.0, 1.0];
        assert!(matches!(
            inverse_factor(&xtx, 2, 0.0, false),
            Err(CalibError::NotPositiveDefinite { .. })
        ));
        assert!(inverse_factor_reference(&xtx, 2, 0.0, false).is_err());
    }
}
