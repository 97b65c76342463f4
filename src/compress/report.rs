//! What a compression job cost in fidelity and saved in bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metrics::Fidelity;
use super::spec::PipelineSpec;

pub const REPORT_VERSION: u32 = 1;

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: String,
    /// Shape in the input; absent for a tensor the pipeline created.
    pub original_shape: Option<Vec<usize>>,
    pub shape: Vec<usize>,
    /// Stages applied, in order (`prune:magnitude`, `quantize:int4`, ...).
    pub stages: Vec<String>,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub bits_per_weight: f64,
    /// Fidelity of the stored values against the values that entered the
    /// per-tensor stages; absent for tensors stored unchanged.
    #[serde(flatten)]
    pub fidelity: Option<Fidelity>,
    /// `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` with the job's statistics (`H = xtx`, or
    /// its diagonal `in_sum2` when that is all there is); absent without
    /// statistics for the tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_error: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub tensors: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// `bytes_before / bytes_after`.
    pub ratio: f64,
    pub parameters_before: u64,
    pub parameters_after: u64,
    pub nonzero_parameters_after: u64,
    /// `nonzero_parameters_after / parameters_before`.
    pub parameters_kept: f64,
    /// Lowest SNR of any compressed tensor, with its name.
    pub worst_snr_db: Option<f64>,
    pub worst_snr_tensor: Option<String>,
    /// Highest relative output error of any tensor, with its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_output_error: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_output_error_tensor: Option<String>,
    /// Tensors of the input that the pipeline removed (folded batch norms).
    pub removed_tensors: Vec<String>,
    /// Seconds spent in each kind of stage, summed over tensors.
    pub seconds_per_stage: BTreeMap<String, f64>,
    pub seconds_total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub report_version: u32,
    pub format: String,
    pub pipeline: PipelineSpec,
    /// sha256 of the calibration statistics the job used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statistics_sha256: Option<String>,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
}

impl Totals {
    /// Sums the per-tensor lines.
    pub fn from_tensors(tensors: &[TensorReport], nonzero_after: u64) -> Self {
        let bytes_before = tensors.iter().map(|t| t.bytes_before).sum();
        let bytes_after = tensors.iter().map(|t| t.bytes_after).sum();
        let count = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
        let parameters_before = tensors
            .iter()
            .filter_map(|t| t.original_shape.as_deref().map(count))
            .sum();
        let parameters_after = tensors.iter().map(|t| count(&t.shape)).sum();
        let worst = tensors
            .iter()
            .filter_map(|t| Some((t.fidelity?.snr_db?, &t.name)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        let worst_output = tensors
            .iter()
            .filter_map(|t| Some((t.output_error?, &t.name)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        Self {
            tensors: tensors.len(),
            bytes_before,
            bytes_after,
            ratio: if bytes_after > 0 {
                bytes_before as f64 / bytes_after as f64
            } else {
                0.0
            },
            parameters_before,
            parameters_after,
            nonzero_parameters_after: nonzero_after,
            parameters_kept: if parameters_before > 0 {
                nonzero_after as f64 / parameters_before as f64
            } else {
                0.0
            },
            worst_snr_db: worst.map(|w| w.0),
            worst_snr_tensor: worst.map(|w| w.1.clone()),
            worst_output_error: worst_output.map(|w| w.0),
            worst_output_error_tensor: worst_output.map(|w| w.1.clone()),
            removed_tensors: Vec::new(),
            seconds_per_stage: BTreeMap::new(),
            seconds_total: 0.0,
        }
    }
}
