//! Running the per-tensor stages of a pipeline on one tensor.

use std::time::Instant;

use super::binarize::binarize;
use super::calibrate::{self, CalibError, FactorCache, LayerStats, SweepGrid, SweepPrune};
use super::coded::{Coded, MatrixShape};
use super::lowrank::{low_rank, product, LowRank};
use super::prune::{prune_below, prune_magnitude, prune_n_m};
use super::quantize::{quantize_fp8, quantize_int, quantize_int_weighted};
use super::share::share;
use super::spec::{Calibration, Entropy, Pipeline, PruneKind, Stage, StatsNeed, ValueStage};

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
    /// `(tr(ΔW H ΔWᵀ), tr(W H Wᵀ))` of the final values rounded to storage
    /// against the input values, when a calibrated stage computed it on the
    /// way (gptq and compensated sharing, to choose between the sweep and
    /// round-to-nearest row by row).
    pub output_error: Option<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor `{tensor}`: low_rank failed: {reason}")]
    LowRank { tensor: String, reason: String },
    #[error("tensor `{tensor}` has a shape whose element count overflows")]
    Shape { tensor: String },
    #[error("tensor `{tensor}`: {stage} needs statistics `{}`, which it did not get", need.name())]
    MissingStats {
        tensor: String,
        stage: String,
        need: StatsNeed,
    },
    #[error("tensor `{tensor}`: {stage}: {source}")]
    Calibration {
        tensor: String,
        stage: String,
        #[source]
        source: CalibError,
    },
}

/// Runs the stages `stage_indices` of `pipeline` on `values` (row-major,
/// `shape`). `values` is copied into `work` only if a pruning stage changes
/// it; `work` is a buffer the caller keeps from tensor to tensor, so the copy
/// does not map fresh memory each time. `round_to_storage` rounds values to
/// the dtype they will be stored in (low-rank factors are rounded before
/// their product is formed, so the dense output and a restored packed file
/// agree bit for bit).
#[allow(clippy::too_many_arguments)]
pub fn process(
    name: &str,
    values: &[f32],
    shape: &[usize],
    pipeline: &Pipeline,
    stage_indices: &[usize],
    cut: Option<TensorCut>,
    round_to_storage: &(dyn Fn(&mut [f32]) + Sync),
    work: &mut Vec<f32>,
) -> Result<Processed, TensorError> {
    process_with_stats(
        name,
        values,
        shape,
        pipeline,
        stage_indices,
        cut,
        round_to_storage,
        work,
        None,
        &FactorCache::new(),
    )
}

/// [`process`] with the tensor's activation statistics, which calibrated
/// stages need and the others use to weigh their error:
/// - `prune` wanda / sparsegpt; a sparsegpt stage followed by a gptq
///   `quantize` on the tensor runs both in one sweep (with the sparsegpt
///   stage's `damp` and `block_size` and the quantize stage's `act_order`),
///   so the quantization error is compensated too;
/// - `quantize`: gptq; rtn's MSE scale search weighted by `in_sum2 / counts`;
/// - `share`: the importance-weighted k-means, and `compensate`.
///
/// `factors` keeps the factor of the dampened Hessian from tensor to tensor
/// for weights whose statistics share one `xtx` ([`FactorCache`]); it is
/// dropped here when this tensor's statistics are others.
#[allow(clippy::too_many_arguments)]
pub fn process_with_stats(
    name: &str,
    values: &[f32],
    shape: &[usize],
    pipeline: &Pipeline,
    stage_indices: &[usize],
    cut: Option<TensorCut>,
    round_to_storage: &(dyn Fn(&mut [f32]) + Sync),
    work: &mut Vec<f32>,
    stats: Option<&LayerStats>,
    factors: &FactorCache,
) -> Result<Processed, TensorError> {
    factors.keep_only(stats.and_then(LayerStats::key));
    let matrix = MatrixShape::of(shape).ok_or_else(|| TensorError::Shape {
        tensor: name.to_string(),
    })?;
    let mut out = Processed {
        shape: shape.to_vec(),
        values: Values::Raw(Vec::new()),
        encode: None,
        applied: Vec::new(),
        seconds: Vec::new(),
        output_error: None,
    };
    let mut current = Values::Raw(Vec::new());
    let writes = stage_indices
        .iter()
        .any(|&i| matches!(pipeline.stages()[i], Stage::Prune(..)));
    let importance = stats.map(LayerStats::importance);
    let need = |i: usize, need: StatsNeed| -> Result<&LayerStats, TensorError> {
        stats
            .filter(|s| need == StatsNeed::InSum2 || s.xtx().is_some())
            .ok_or_else(|| TensorError::MissingStats {
                tensor: name.to_string(),
                stage: pipeline.label(i),
                need,
            })
    };
    let calib_err = |i: usize| {
        move |source| TensorError::Calibration {
            tensor: name.to_string(),
            stage: pipeline.label(i),
            source,
        }
    };
    // The factor of the dampened Hessian for a sweep, shared with the
    // tensors before and after that have the same statistics.
    let factor = |i: usize, s: &LayerStats, p: &calibrate::SweepParams| {
        let xtx = s.xtx().unwrap_or_default();
        if s.cols() != matrix.cols {
            return Err(calib_err(i)(CalibError::Shape));
        }
        factors
            .factor(s.key(), xtx, matrix.cols, p.damp, p.act_order)
            .map_err(calib_err(i))
    };
    // A gptq stage already run jointly with a sparsegpt stage.
    let mut joint_done: Option<usize> = None;
    if writes {
        work.clear();
        work.extend_from_slice(values);
    }
    for &i in stage_indices {
        let stage = &pipeline.stages()[i];
        let started = Instant::now();
        let values: &[f32] = if writes { work } else { values };
        if !matches!(stage, Stage::Structural(_) | Stage::Encode(..)) {
            // Measured before this stage changed the values.
            out.output_error = None;
        }
        match stage {
            Stage::Structural(_) => continue,
            Stage::Prune(PruneKind::Magnitude { sparsity, global }, _) => match (global, cut) {
                (true, Some(c)) => {
                    prune_below(work, c.threshold, c.ties);
                }
                _ => {
                    prune_magnitude(work, *sparsity);
                }
            },
            Stage::Prune(PruneKind::NM { n, m }, _) => prune_n_m(work, matrix, *n, *m),
            Stage::Prune(PruneKind::Wanda(pattern), _) => {
                let s = need(i, StatsNeed::InSum2)?;
                calibrate::wanda(work, matrix, &s.importance(), *pattern).map_err(calib_err(i))?;
            }
            Stage::Prune(PruneKind::SparseGpt(pattern, params), _) => {
                let s = need(i, StatsNeed::Xtx)?;
                let imp = importance.as_deref().unwrap_or_default();
                // The gptq stage this sweep also quantizes for, if any.
                let gptq = stage_indices.iter().copied().find_map(|j| {
                    match (&pipeline.stages()[j], pipeline.calibration(j)) {
                        (Stage::Value(ValueStage::Int(q), _), Calibration::Gptq(g)) if j > i => {
                            Some((j, *q, g))
                        }
                        _ => None,
                    }
                });
                let later_prune = stage_indices
                    .iter()
                    .any(|&j| j > i && matches!(pipeline.stages()[j], Stage::Prune(..)));
                match gptq {
                    Some((j, quant, g)) if !later_prune => {
                        let p = calibrate::SweepParams {
                            act_order: g.act_order,
                            ..*params
                        };
                        let grid = SweepGrid::Int {
                            quant,
                            importance: imp,
                        };
                        let u = factor(i, s, &p)?;
                        let out = calibrate::sweep_factored(
                            work,
                            matrix,
                            &u,
                            *pattern,
                            grid,
                            &p,
                            round_to_storage,
                        )
                        .map_err(calib_err(i))?;
                        work.copy_from_slice(&out.values);
                        if let Some(c) = out.coded {
                            current = Values::Coded(c);
                        }
                        joint_done = Some(j);
                    }
                    _ => {
                        let u = factor(i, s, params)?;
                        let out = calibrate::sweep_factored(
                            work,
                            matrix,
                            &u,
                            *pattern,
                            SweepGrid::Keep,
                            params,
                            round_to_storage,
                        )
                        .map_err(calib_err(i))?;
                        work.copy_from_slice(&out.values);
                    }
                }
            }
            Stage::LowRank(choice, _) => {
                let mut lr =
                    low_rank(values, matrix, *choice).map_err(|e| TensorError::LowRank {
                        tensor: name.to_string(),
                        reason: e.to_string(),
                    })?;
                round_to_storage(&mut lr.a);
                round_to_storage(&mut lr.b);
                current = Values::LowRank(lr);
            }
            Stage::Value(..) if joint_done == Some(i) => {}
            Stage::Value(v, _) => {
                let coded = match (v, pipeline.calibration(i), importance.as_deref()) {
                    (ValueStage::Int(q), Calibration::Gptq(g), _) => {
                        let s = need(i, StatsNeed::Xtx)?;
                        let grid = SweepGrid::Int {
                            quant: *q,
                            importance: importance.as_deref().unwrap_or_default(),
                        };
                        let u = factor(i, s, &g)?;
                        let swept = calibrate::sweep_factored(
                            values,
                            matrix,
                            &u,
                            SweepPrune::None,
                            grid,
                            &g,
                            round_to_storage,
                        )
                        .map_err(calib_err(i))?;
                        if !writes {
                            out.output_error = swept.error;
                        }
                        swept.coded.expect("an integer sweep is coded")
                    }
                    (ValueStage::Share(p), Calibration::Compensate(g), _) => {
                        let s = need(i, StatsNeed::Xtx)?;
                        let imp = importance.as_deref().unwrap_or_default();
                        let book = calibrate::share_weighted(values, matrix, p, imp);
                        let super::coded::Decode::Codebook {
                            entries,
                            values: centroids,
                        } = &book.decode
                        else {
                            unreachable!("sharing gives a codebook")
                        };
                        let zero_entry = values.contains(&0.0);
                        let grid = SweepGrid::Codebook {
                            group_len: book.group_len,
                            entries: *entries,
                            zero_entry,
                            values: centroids,
                        };
                        let u = factor(i, s, &g)?;
                        let swept = calibrate::sweep_factored(
                            values,
                            matrix,
                            &u,
                            SweepPrune::None,
                            grid,
                            &g,
                            round_to_storage,
                        )
                        .map_err(calib_err(i))?;
                        if !writes {
                            out.output_error = swept.error;
                        }
                        swept.coded.expect("a codebook sweep is coded")
                    }
                    (ValueStage::Share(p), _, Some(imp)) => {
                        calibrate::share_weighted(values, matrix, p, imp)
                    }
                    (ValueStage::Share(p), _, None) => share(values, matrix, p),
                    (ValueStage::Int(q), _, Some(imp)) => {
                        quantize_int_weighted(values, matrix, q, imp)
                    }
                    (ValueStage::Int(q), _, None) => quantize_int(values, matrix, q),
                    (ValueStage::Fp8(g), _, _) => quantize_fp8(values, matrix, *g),
                    (ValueStage::Binarize(l), _, _) => binarize(values, matrix, *l),
                };
                current = Values::Coded(coded);
            }
            Stage::Encode(entropy, _) => out.encode = Some(*entropy),
        }
        out.applied.push(pipeline.label(i));
        out.seconds.push((i, started.elapsed().as_secs_f64()));
    }
    out.values = match current {
        Values::Raw(_) if writes => Values::Raw(std::mem::take(work)),
        Values::Raw(_) => Values::Raw(values.to_vec()),
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
