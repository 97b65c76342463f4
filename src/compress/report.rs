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

/// Gathers a [`Report`] while the tensors are written.
#[derive(Debug, Default)]
pub struct ReportBuilder {
    tensors: Vec<TensorReport>,
    nonzero_after: u64,
    seconds_per_stage: BTreeMap<String, f64>,
    removed: Vec<Removed>,
}

/// An input tensor the pipeline removed.
#[derive(Debug)]
struct Removed {
    name: String,
    bytes: u64,
    parameters: u64,
}

impl ReportBuilder {
    /// Adds one output tensor with its count of nonzero values.
    pub fn tensor(&mut self, report: TensorReport, nonzero: u64) {
        self.tensors.push(report);
        self.nonzero_after += nonzero;
    }

    /// Adds time spent in a stage of kind `kind`.
    pub fn stage_seconds(&mut self, kind: &str, seconds: f64) {
        *self.seconds_per_stage.entry(kind.to_string()).or_default() += seconds;
    }

    /// Records an input tensor that has no output.
    pub fn removed(&mut self, name: &str, bytes: u64, parameters: u64) {
        self.removed.push(Removed {
            name: name.to_string(),
            bytes,
            parameters,
        });
    }

    /// Bytes of tensor data in the output so far.
    pub fn bytes_after(&self) -> u64 {
        self.tensors.iter().map(|r| r.bytes_after).sum()
    }

    pub fn finish(
        self,
        format: &str,
        pipeline: PipelineSpec,
        statistics_sha256: Option<String>,
        seconds_total: f64,
    ) -> Report {
        let mut totals = Totals::from_tensors(&self.tensors, self.nonzero_after);
        for r in self.removed {
            totals.bytes_before += r.bytes;
            totals.parameters_before += r.parameters;
            totals.removed_tensors.push(r.name);
        }
        if totals.bytes_after > 0 {
            totals.ratio = totals.bytes_before as f64 / totals.bytes_after as f64;
        }
        if totals.parameters_before > 0 {
            totals.parameters_kept = self.nonzero_after as f64 / totals.parameters_before as f64;
        }
        totals.seconds_per_stage = self.seconds_per_stage;
        totals.seconds_total = seconds_total;
        Report {
            report_version: REPORT_VERSION,
            format: format.to_string(),
            pipeline,
            statistics_sha256,
            tensors: self.tensors,
            totals,
        }
    }
}
