//! Wanda pruning (Sun et al., 2023): the score of a weight is
//! `|W_ij| · sqrt(imp_j)` with `imp_j = in_sum2_j / counts`, compared within
//! each output row (the per-output comparison the paper found best for
//! LLMs). Unstructured: each row loses `round(sparsity · cols)` weights;
//! `n:m`: each window of `m` along a row keeps its `n` best.
//!
//! Scores are products in f64 of an f32 magnitude and one factor per
//! column, so for a uniform importance their order is exactly the order of
//! `|W_ij|` (two f32 values differ by at least 2^-24 relatively, far above
//! the f64 rounding): Wanda then is per-row magnitude pruning, with its tie
//! rules (unstructured: the lower column is pruned first; `n:m`: the lower
//! column is kept).

use rayon::prelude::*;

use super::{CalibError, SweepPrune};
use crate::compress::coded::MatrixShape;

fn scores(row: &[f32], factor: &[f64]) -> Vec<(f64, usize)> {
    row.iter()
        .zip(factor)
        .enumerate()
        .map(|(j, (&w, &f))| (f64::from(w).abs() * f, j))
        .collect()
}

/// Unstructured order: lower score first, ties to the lower column (as
/// magnitude pruning).
fn by_score(a: &(f64, usize), b: &(f64, usize)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// `n:m` order: lower score first, ties to the higher column (as `n:m`
/// magnitude pruning, which keeps the lower index of a tie).
pub(crate) fn by_score_nm(a: &(f64, usize), b: &(f64, usize)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(b.1.cmp(&a.1))
}

fn check(
    data: &[f32],
    shape: MatrixShape,
    importance: &[f32],
    prune: SweepPrune,
) -> Result<(), CalibError> {
    if data.len() != shape.len() || importance.len() != shape.cols {
        return Err(CalibError::Shape);
    }
    if let SweepPrune::NM { n, m } = prune {
        if m == 0 || n >= m || !shape.cols.is_multiple_of(m) {
            return Err(CalibError::Shape);
        }
    }
    if let Some(index) = data.iter().position(|w| !w.is_finite()) {
        return Err(CalibError::NonFinite {
            index,
            value: data[index],
        });
    }
    Ok(())
}

/// Prunes `data` (`shape`, row-major) in place by Wanda scores;
/// `importance` has one value per input column.
pub fn wanda(
    data: &mut [f32],
    shape: MatrixShape,
    importance: &[f32],
    prune: SweepPrune,
) -> Result<(), CalibError> {
    check(data, shape, importance, prune)?;
    if shape.is_empty() {
        return Ok(());
    }
    let factor: Vec<f64> = importance.iter().map(|&i| f64::from(i).sqrt()).collect();
    data.par_chunks_mut(shape.cols).for_each(|row| match prune {
        SweepPrune::None => {}
        SweepPrune::Sparsity(s) => {
            let k = ((s * row.len() as f64).round() as usize).min(row.len());
            if k == 0 {
                return;
            }
            let mut keys = scores(row, &factor);
            keys.select_nth_unstable_by(k - 1, by_score);
            for &(_, j) in &keys[..k] {
                row[j] = 0.0;
            }
        }
        SweepPrune::NM { n, m } => {
            for (w, f) in row.chunks_mut(m).zip(factor.chunks(m)) {
                let mut keys = scores(w, f);
                keys.select_nth_unstable_by(m - n - 1, by_score_nm);
                for &(_, j) in &keys[..m - n] {
                    w[j] = 0.0;
                }
            }
        }
    });
    Ok(())
}

/// [`wanda`] with a full stable sort of each row or window.
pub fn wanda_reference(
    data: &mut [f32],
    shape: MatrixShape,
    importance: &[f32],
    prune: SweepPrune,
) -> Result<(), CalibError> {
    check(data, shape, importance, prune)?;
    if shape.is_empty() {
        return Ok(());
    }
    let factor: Vec<f64> = importance.iter().map(|&i| f64::from(i).sqrt()).collect();
    for row in data.chunks_mut(shape.cols) {
        let windows: Vec<(usize, usize)> = match prune {
            SweepPrune::None => Vec::new(),
            SweepPrune::Sparsity(s) => {
                vec![(0, ((s * row.len() as f64).round() as usize).min(row.len()))]
            }
            SweepPrune::NM { n, m } => (0..row.len()).step_by(m).map(|s| (s, m - n)).collect(),
        };
        let len = match prune {
            SweepPrune::NM { m, .. } => m,
            _ => row.len(),
        };
        for (start, k) in windows {
            let mut keys = scores(&row[start..start + len], &factor[start..start + len]);
            if matches!(prune, SweepPrune::NM { .. }) {
                keys.sort_by(by_score_nm);
            } else {
                keys.sort_by(by_score);
            }
            for &(_, j) in &keys[..k] {
                row[start + j] = 0.0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::prune::{prune_magnitude_reference, prune_n_m_reference};
    use proptest::prelude::*;

    fn case() -> impl Strategy<Value = (Vec<f32>, MatrixShape, Vec<f32>)> {
        (1..6usize, 1..5usize).prop_flat_map(|(rows, k)| {
            let cols = 4 * k;
            (
                prop::collection::vec(
                    prop_oneof![
                        Just(0.0f32),
                        -1.0f32..1.0,
                        (-3i32..3).prop_map(|x| x as f32)
                    ],
                    rows * cols,
                ),
                Just(MatrixShape { rows, cols }),
                prop::collection::vec(0.0f32..5.0, cols),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn wanda_matches_its_reference((w, shape, imp) in case(), s in 0.0f64..1.0) {
            for prune in [SweepPrune::Sparsity(s), SweepPrune::NM { n: 2, m: 4 }, SweepPrune::NM { n: 1, m: 4 }] {
                let (mut a, mut b) = (w.clone(), w.clone());
                wanda(&mut a, shape, &imp, prune).unwrap();
                wanda_reference(&mut b, shape, &imp, prune).unwrap();
                prop_assert_eq!(&a, &b);
                if let SweepPrune::NM { n, m } = prune {
                    for win in a.chunks(m) {
                        prop_assert!(win.iter().filter(|&&x| x != 0.0).count() <= n);
                    }
                }
            }
        }

        #[test]
        fn wanda_with_uniform_importance_is_per_row_magnitude_pruning(
            (w, shape, _) in case(), s in 0.0f64..1.0, c in 0.01f32..100.0,
        ) {
            let imp = vec![c; shape.cols];
            let mut a = w.clone();
            wanda(&mut a, shape, &imp, SweepPrune::Sparsity(s)).unwrap();
            let mut b = w.clone();
            for row in b.chunks_mut(shape.cols) {
                prune_magnitude_reference(row, s);
            }
            prop_assert_eq!(&a, &b);
            let mut a = w.clone();
            wanda(&mut a, shape, &imp, SweepPrune::NM { n: 2, m: 4 }).unwrap();
            let mut b = w.clone();
            prune_n_m_reference(&mut b, shape, 2, 4);
            prop_assert_eq!(&a, &b);
        }
    }

    #[test]
    fn a_large_input_column_protects_small_weights() {
        // Column 0 carries inputs 100 times larger: its small weights count
        // more than the larger weights of column 1.
        let shape = MatrixShape { rows: 2, cols: 2 };
        let mut w = vec![0.1, 0.5, -0.2, 0.9];
        wanda(&mut w, shape, &[10_000.0, 1.0], SweepPrune::Sparsity(0.5)).unwrap();
        assert_eq!(w, [0.1, 0.0, -0.2, 0.0]);
    }
}
