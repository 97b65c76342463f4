//! The activation statistics of one weight, validated once.

/// Relative tolerance of the symmetry check on `xtx`:
/// `|xtx_ij - xtx_ji| <= XTX_SYMMETRY_TOLERANCE * sqrt(xtx_ii * xtx_jj)`.
/// A Gram matrix has `|xtx_ij| <= sqrt(xtx_ii * xtx_jj)`, so this allows
/// the rounding of sums accumulated in f32 in different orders and nothing
/// that changes the matrix's meaning.
pub const XTX_SYMMETRY_TOLERANCE: f64 = 1e-3;

/// Why statistics were refused. Each names the array at fault; the caller
/// adds the weight's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error("in_sum2 has {got} values but the weight has {cols} input columns")]
    InSum2Length { got: usize, cols: usize },
    #[error("xtx has {got} values but the weight needs {cols}x{cols}")]
    XtxLength { got: usize, cols: usize },
    #[error("counts is {0}; it must be a finite number above 0")]
    Counts(f64),
    #[error("{array}[{index}] is {value}; statistics must be finite and not negative")]
    Value {
        array: &'static str,
        index: usize,
        value: f32,
    },
    #[error(
        "xtx is not symmetric: xtx[{i}][{j}] = {a} but xtx[{j}][{i}] = {b} (tolerance {XTX_SYMMETRY_TOLERANCE} of sqrt(xtx[i][i] xtx[j][j]))"
    )]
    Asymmetric { i: usize, j: usize, a: f32, b: f32 },
}

/// `in_sum2` (Σ x_j² per input column), `counts` (tokens summed) and
/// optionally `xtx` (Σ x xᵀ, row-major `cols × cols`) of one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    in_sum2: Vec<f32>,
    counts: f64,
    xtx: Option<Vec<f32>>,
    /// The name the statistics are stored under (after aliases): weights
    /// with the same key share `xtx`.
    key: Option<String>,
}

impl LayerStats {
    /// Checks the arrays of a weight with `cols` input columns: lengths,
    /// `counts > 0`, every value finite and `in_sum2` and the diagonal of
    /// `xtx` not negative, `xtx` symmetric within
    /// [`XTX_SYMMETRY_TOLERANCE`].
    pub fn new(
        cols: usize,
        in_sum2: Vec<f32>,
        counts: f64,
        xtx: Option<Vec<f32>>,
    ) -> Result<Self, StatsError> {
        if in_sum2.len() != cols {
            return Err(StatsError::InSum2Length {
                got: in_sum2.len(),
                cols,
            });
        }
        if !(counts.is_finite() && counts > 0.0) {
            return Err(StatsError::Counts(counts));
        }
        if let Some((index, &value)) = in_sum2
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(StatsError::Value {
                array: "in_sum2",
                index,
                value,
            });
        }
        if let Some(x) = &xtx {
            check_xtx(x, cols)?;
        }
        Ok(Self {
            in_sum2,
            counts,
            xtx,
            key: None,
        })
    }

    /// The same statistics, known to be stored under `key`: weights whose
    /// statistics have the same key share their `xtx` (and its factor).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The name the statistics are stored under, when known.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Number of input columns.
    pub fn cols(&self) -> usize {
        self.in_sum2.len()
    }

    pub fn in_sum2(&self) -> &[f32] {
        &self.in_sum2
    }

    pub fn counts(&self) -> f64 {
        self.counts
    }

    /// Σ x xᵀ, row-major, when the statistics have it.
    pub fn xtx(&self) -> Option<&[f32]> {
        self.xtx.as_deref()
    }

    /// `imp_j = in_sum2_j / counts`: the mean squared input of column `j`.
    pub fn importance(&self) -> Vec<f32> {
        self.in_sum2
            .iter()
            .map(|&s| (f64::from(s) / self.counts) as f32)
            .collect()
    }
}

fn check_xtx(x: &[f32], cols: usize) -> Result<(), StatsError> {
    if Some(x.len()) != cols.checked_mul(cols) {
        return Err(StatsError::XtxLength { got: x.len(), cols });
    }
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(StatsError::Value {
            array: "xtx",
            index,
            value,
        });
    }
    for j in 0..cols {
        let value = x[j * cols + j];
        if value < 0.0 {
            return Err(StatsError::Value {
                array: "xtx",
                index: j * cols + j,
                value,
            });
        }
    }
    for i in 0..cols {
        let dii = f64::from(x[i * cols + i]);
        for j in 0..i {
            let (a, b) = (x[i * cols + j], x[j * cols + i]);
            let bound = XTX_SYMMETRY_TOLERANCE * (dii * f64::from(x[j * cols + j])).sqrt();
            if (f64::from(a) - f64::from(b)).abs() > bound {
                return Err(StatsError::Asymmetric { i, j, a, b });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_array_is_refused_with_its_reason() {
        let ok = || vec![1.0f32, 2.0];
        let xtx = || Some(vec![1.0, 0.5, 0.5, 2.0]);
        assert!(LayerStats::new(2, ok(), 10.0, xtx()).is_ok());
        assert_eq!(
            LayerStats::new(3, ok(), 10.0, None).unwrap_err(),
            StatsError::InSum2Length { got: 2, cols: 3 }
        );
        assert_eq!(
            LayerStats::new(2, ok(), 0.0, None).unwrap_err(),
            StatsError::Counts(0.0)
        );
        assert!(matches!(
            LayerStats::new(2, vec![1.0, f32::NAN], 1.0, None).unwrap_err(),
            StatsError::Value {
                array: "in_sum2",
                index: 1,
                ..
            }
        ));
        assert!(matches!(
            LayerStats::new(2, vec![1.0, -1.0], 1.0, None).unwrap_err(),
            StatsError::Value { index: 1, .. }
        ));
        assert_eq!(
            LayerStats::new(2, ok(), 1.0, Some(vec![1.0; 3])).unwrap_err(),
            StatsError::XtxLength { got: 3, cols: 2 }
        );
        assert!(matches!(
            LayerStats::new(2, ok(), 1.0, Some(vec![1.0, 0.5, 0.4, 2.0])).unwrap_err(),
            StatsError::Asymmetric { i: 1, j: 0, .. }
        ));
        // Within the tolerance: 1e-4 against sqrt(1 * 2) * 1e-3.
        assert!(LayerStats::new(2, ok(), 1.0, Some(vec![1.0, 0.5, 0.5001, 2.0])).is_ok());
        assert!(matches!(
            LayerStats::new(2, ok(), 1.0, Some(vec![1.0, 0.0, 0.0, f32::INFINITY])).unwrap_err(),
            StatsError::Value {
                array: "xtx",
                index: 3,
                ..
            }
        ));
    }

    #[test]
    fn importance_is_the_mean_square() {
        let s = LayerStats::new(2, vec![4.0, 10.0], 2.0, None).unwrap();
        assert_eq!(s.importance(), [2.0, 5.0]);
    }
}
