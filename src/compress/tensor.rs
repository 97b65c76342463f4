//! Running the per-tensor stages of a pipeline on one tensor.

use std::borrow::Cow;
use std::time::Instant;

use super::binarize::binarize;
use super::coded::{Coded, MatrixShape};
use super::lowrank::{low_rank, product, LowRank};
use super::prune::{prune_below, prune_magnitude, prune_n_m};
use super::quantize::{quantize_fp8, quantize_int};
use super::share::share;
use super::spec::{Entropy, Pipeline, PruneKind, Stage, ValueStage};

/// A tensor's values after its stages.
#[derive(Debug, Clone)]
pub enum Values {
    /// Plain values (untouched, or only pruned).
    Raw(Vec<f32>),
    /// Two factors whose product is the tensor.
    LowRank(LowRank),
    /// Symbols and decode parameters.
    Coded(Coded),
}

/// The share of a global magnitude cut that falls on one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorCut {
    pub threshold: f32,
    pub ties: usize,
}

/// One tensor after its stages.
#[derive(Debug, Clone)]
pub struct Processed {
    pub shape: Vec<usize>,
    pub values: Values,
    /// Set when an `encode` stage touched the tensor.
    pub encode: Option<Entropy>,
    /// Labels of the stages applied, in order.
    pub applied: Vec<String>,
    /// Seconds spent per stage (index into the pipeline).
    pub seconds: Vec<(usize, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor `{tensor}`: low_rank failed: {reason}")]
    LowRank { tensor: String, reason: String },
    #[error("tensor `{tensor}` has a shape whose element count overflows")]
    Shape { tensor: String },
}

/// Runs the stages `stage_indices` of `pipeline` on `values` (row-major,
/// `shape`); `values` is copied only if a pruning stage changes it. `round_to_storage` rounds values to the dtype they will be
/// stored in (low-rank factors are rounded before their product is formed,
/// so the dense output and a restored packed file agree bit for bit).
pub fn process(
    name: &str,
    values: &[f32],
    shape: &[usize],
    pipeline: &Pipeline,
    stage_indices: &[usize],
    cut: Option<TensorCut>,
    round_to_storage: &dyn Fn(&mut [f32]),
) -> Result<Processed, TensorError> {
    let matrix = MatrixShape::of(shape).ok_or_else(|| TensorError::Shape {
        tensor: name.to_string(),
    })?;
    let mut out = Processed {
        shape: shape.to_vec(),
        values: Values::Raw(Vec::new()),
        encode: None,
        applied: Vec::new(),
        seconds: Vec::new(),
    };
    let mut current = Values::Raw(Vec::new());
    let mut values: Cow<'_, [f32]> = Cow::Borrowed(values);
    for &i in stage_indices {
        let stage = &pipeline.stages()[i];
        let started = Instant::now();
        match stage {
            Stage::Structural(_) => continue,
            Stage::Prune(PruneKind::Magnitude { sparsity, global }, _) => match (global, cut) {
                (true, Some(c)) => {
                    prune_below(values.to_mut(), c.threshold, c.ties);
                }
                _ => {
                    prune_magnitude(values.to_mut(), *sparsity);
                }
            },
            Stage::Prune(PruneKind::NM { n, m }, _) => prune_n_m(values.to_mut(), matrix, *n, *m),
            Stage::LowRank(choice, _) => {
                let mut lr =
                    low_rank(&values, matrix, *choice).map_err(|e| TensorError::LowRank {
                        tensor: name.to_string(),
                        reason: e.to_string(),
                    })?;
                round_to_storage(&mut lr.a);
                round_to_storage(&mut lr.b);
                current = Values::LowRank(lr);
            }
            Stage::Value(v, _) => {
                let coded = match v {
                    ValueStage::Share(p) => share(&values, matrix, p),
                    ValueStage::Int(q) => quantize_int(&values, matrix, q),
                    ValueStage::Fp8(g) => quantize_fp8(&values, matrix, *g),
                    ValueStage::Binarize(l) => binarize(&values, matrix, *l),
                };
                current = Values::Coded(coded);
            }
            Stage::Encode(entropy, _) => out.encode = Some(*entropy),
        }
        out.applied.push(stage.label());
        out.seconds.push((i, started.elapsed().as_secs_f64()));
    }
    out.values = match current {
        Values::Raw(_) => Values::Raw(values.into_owned()),
        other => other,
    };
    Ok(out)
}

impl Values {
    /// The dense values (f32, before rounding to the storage dtype).
    pub fn reconstruct(&self, shape: &[usize]) -> Vec<f32> {
        match self {
            Values::Raw(v) => v.clone(),
            Values::LowRank(lr) => product(
                lr,
                MatrixShape::of(shape).unwrap_or(MatrixShape { rows: 0, cols: 0 }),
            ),
            Values::Coded(c) => c.decode(),
        }
    }
}
