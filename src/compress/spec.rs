//! The pipeline: what a user writes (serde JSON), and the checked form the
//! engine runs.
//!
//! A [`PipelineSpec`] is parsed from JSON exactly as written; [`Pipeline::parse`]
//! checks every parameter and the order of the stages and is the only way to
//! get a [`Pipeline`]. [`Pipeline::check_against`] then checks the pipeline
//! against a model's tensors, and [`Pipeline::stages_for`] says which
//! stages touch a tensor.

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::binarize::Levels;
use super::calibrate::{SweepParams, SweepPrune};
use super::coded::{Granularity, MatrixShape};
use super::lowrank::RankChoice;
use super::quantize::{IntQuant, ScaleSearch};
use super::share::{Init, ShareParams};
use super::structural::{ChannelGroup, ChannelPrune, FoldBatchNorm, Norm, StructuralStage};

/// A pipeline as written: `{"stages": [ {"stage": "prune", ...}, ... ]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub stages: Vec<StageSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum StageSpec {
    Prune(PruneSpec),
    FoldBatchnorm(FoldSpec),
    LowRank(LowRankSpec),
    Share(ShareSpec),
    Quantize(QuantizeSpec),
    Binarize(BinarizeSpec),
    Encode(EncodeSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum PruneSpec {
    Magnitude {
        sparsity: f64,
        #[serde(default)]
        scope: PruneScope,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ignore: Vec<String>,
    },
    #[serde(rename = "n:m")]
    NM {
        n: usize,
        m: usize,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ignore: Vec<String>,
    },
    Channel {
        sparsity: f64,
        #[serde(default)]
        norm: NormSpec,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        groups: Option<Vec<GroupSpec>>,
    },
    /// Wanda: `|W_ij| · sqrt(in_sum2_j / counts)` within each row; needs
    /// `in_sum2`. `sparsity`, or `n` and `m`.
    Wanda {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparsity: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        m: Option<usize>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ignore: Vec<String>,
    },
    /// SparseGPT: the mask by `w²/[H⁻¹]_jj²` per block, the other weights
    /// updated; needs `xtx`. `sparsity`, or `n` and `m`.
    Sparsegpt {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparsity: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        m: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        damp: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        block_size: Option<usize>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ignore: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    #[default]
    Tensor,
    Global,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormSpec {
    #[default]
    L1,
    L2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub producer: String,
    pub consumers: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldSpec {
    /// `[layer, batchnorm]` prefixes; inferred from names when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pairs: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LowRankSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    pub clusters: usize,
    #[serde(default)]
    pub init: InitSpec,
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    #[serde(default)]
    pub per_channel: bool,
    /// Run the GPTQ sweep with the codebook as the grid (needs `xtx`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub compensate: bool,
    /// With `compensate`: dampening relative to the mean diagonal of `xtx`
    /// (0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damp: Option<f64>,
    /// With `compensate`: columns per block (128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

fn default_iterations() -> usize {
    20
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitSpec {
    #[default]
    Linear,
    Density,
    #[serde(rename = "kmeans++")]
    KmeansPlusPlus,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    #[default]
    Int,
    Fp8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GranularitySpec {
    Tensor,
    #[default]
    Channel,
    Group,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleSearchSpec {
    #[default]
    Minmax,
    Mse,
}

/// How integer weights are chosen on their grid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantMethod {
    /// Round to nearest (with statistics, the MSE scale search weighs each
    /// column by its mean squared input).
    #[default]
    Rtn,
    /// GPTQ: column by column with error feedback through `xtx`.
    Gptq,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSpec {
    #[serde(default, rename = "type")]
    pub kind: QuantType,
    #[serde(default, skip_serializing_if = "is_default")]
    pub method: QuantMethod,
    /// GPTQ dampening, relative to the mean diagonal of `xtx` (0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damp: Option<f64>,
    /// GPTQ columns per block (128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// GPTQ: columns by decreasing `xtx_jj`; groups stay contiguous.
    #[serde(default, skip_serializing_if = "is_false")]
    pub act_order: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    #[serde(default = "yes")]
    pub symmetric: bool,
    #[serde(default)]
    pub granularity: GranularitySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
    #[serde(default)]
    pub scale_search: ScaleSearchSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinarizeSpec {
    #[serde(default = "two")]
    pub levels: u8,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

fn two() -> u8 {
    2
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entropy {
    #[default]
    Huffman,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeSpec {
    #[serde(default)]
    pub entropy: Entropy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
}

/// Why a pipeline was refused: the stage (0-based index and kind) and a
/// sentence a person can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("stage {index} ({kind}): {reason}")]
pub struct SpecError {
    pub index: usize,
    pub kind: &'static str,
    pub reason: String,
}

/// A compiled tensor selection.
#[derive(Debug, Clone)]
pub struct Selector {
    targets: Vec<Pattern>,
    ignore: Vec<Pattern>,
}

#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Regex(Regex),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, String> {
        match s.strip_prefix("re:") {
            Some(re) => Regex::new(&format!("^(?:{re})$"))
                .map(Pattern::Regex)
                .map_err(|e| format!("invalid regex `{re}`: {e}")),
            None => Ok(Pattern::Exact(s.to_string())),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Exact(s) => s == name,
            Pattern::Regex(re) => re.is_match(name),
        }
    }
}

impl Selector {
    fn parse(targets: &[String], ignore: &[String]) -> Result<Self, String> {
        let parse_all = |v: &[String]| -> Result<Vec<Pattern>, String> {
            v.iter().map(|s| Pattern::parse(s)).collect()
        };
        Ok(Self {
            targets: parse_all(targets)?,
            ignore: parse_all(ignore)?,
        })
    }

    /// Whether the stage touches a tensor. Without `targets`, a stage touches
    /// floating-point tensors of rank >= 2.
    pub fn selects(&self, name: &str, shape: &[usize], is_float: bool) -> bool {
        if !is_float || self.ignore.iter().any(|p| p.matches(name)) {
            return false;
        }
        if self.targets.is_empty() {
            shape.len() >= 2
        } else {
            self.targets.iter().any(|p| p.matches(name))
        }
    }

    fn explicit_targets(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().filter_map(|p| match p {
            Pattern::Exact(s) => Some(s.as_str()),
            Pattern::Regex(_) => None,
        })
    }
}

/// How a selected tensor's values are represented after the value stage.
#[derive(Debug, Clone)]
pub enum ValueStage {
    Share(ShareParams),
    Int(IntQuant),
    Fp8(Granularity),
    Binarize(Levels),
}

/// Per-tensor pruning.
#[derive(Debug, Clone, Copy)]
pub enum PruneKind {
    Magnitude {
        sparsity: f64,
        global: bool,
    },
    NM {
        n: usize,
        m: usize,
    },
    /// Wanda scores (needs `in_sum2`).
    Wanda(SweepPrune),
    /// SparseGPT (needs `xtx`).
    SparseGpt(SweepPrune, SweepParams),
}

impl PruneKind {
    /// The `n:m` pattern the stage leaves, whatever picks the weights.
    pub fn n_m(&self) -> Option<(usize, usize)> {
        match *self {
            PruneKind::NM { n, m }
            | PruneKind::Wanda(SweepPrune::NM { n, m })
            | PruneKind::SparseGpt(SweepPrune::NM { n, m }, _) => Some((n, m)),
            _ => None,
        }
    }
}

/// How a value stage uses calibration statistics beyond weighting its
/// error (which every stage does when statistics are given).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibration {
    None,
    /// `quantize` with `method: gptq`.
    Gptq(SweepParams),
    /// `share` with `compensate: true`.
    Compensate(SweepParams),
}

/// Statistics a stage cannot run without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsNeed {
    InSum2,
    Xtx,
}

impl StatsNeed {
    pub fn name(self) -> &'static str {
        match self {
            StatsNeed::InSum2 => "in_sum2",
            StatsNeed::Xtx => "xtx",
        }
    }
}

/// Which weights have which statistics (implemented by the statistics
/// file reader).
pub trait StatsCatalog {
    fn has_in_sum2(&self, weight: &str) -> bool;
    fn has_xtx(&self, weight: &str) -> bool;
}

/// A checked stage.
#[derive(Debug, Clone)]
pub enum Stage {
    Structural(StructuralStage),
    Prune(PruneKind, Selector),
    LowRank(RankChoice, Selector),
    Value(ValueStage, Selector),
    Encode(Entropy, Selector),
}

impl Stage {
    /// Order in which stages may touch one tensor.
    fn phase(&self) -> u8 {
        match self {
            Stage::Structural(_) => 0,
            Stage::Prune(..) => 1,
            Stage::LowRank(..) => 2,
            Stage::Value(..) => 3,
            Stage::Encode(..) => 4,
        }
    }

    pub fn selector(&self) -> Option<&Selector> {
        match self {
            Stage::Structural(_) => None,
            Stage::Prune(_, s)
            | Stage::LowRank(_, s)
            | Stage::Value(_, s)
            | Stage::Encode(_, s) => Some(s),
        }
    }

    /// The name used in reports and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Structural(StructuralStage::Fold(_)) => "fold_batchnorm",
            Stage::Structural(StructuralStage::Channel(_)) => "prune",
            Stage::Prune(..) => "prune",
            Stage::LowRank(..) => "low_rank",
            Stage::Value(ValueStage::Share(_), _) => "share",
            Stage::Value(ValueStage::Int(_) | ValueStage::Fp8(_), _) => "quantize",
            Stage::Value(ValueStage::Binarize(_), _) => "binarize",
            Stage::Encode(..) => "encode",
        }
    }

    /// A short label for reports, e.g. `prune:magnitude`, `quantize:int4`.
    pub fn label(&self) -> String {
        match self {
            Stage::Structural(StructuralStage::Fold(_)) => "fold_batchnorm".into(),
            Stage::Structural(StructuralStage::Channel(_)) => "prune:channel".into(),
            Stage::Prune(PruneKind::Magnitude { .. }, _) => "prune:magnitude".into(),
            Stage::Prune(PruneKind::NM { n, m }, _) => format!("prune:{n}:{m}"),
            Stage::Prune(PruneKind::Wanda(p), _) => format!("prune:wanda{}", pattern_label(p)),
            Stage::Prune(PruneKind::SparseGpt(p, _), _) => {
                format!("prune:sparsegpt{}", pattern_label(p))
            }
            Stage::LowRank(..) => "low_rank".into(),
            Stage::Value(ValueStage::Share(p), _) => format!("share:{}", p.clusters),
            Stage::Value(ValueStage::Int(q), _) => format!("quantize:int{}", q.bits),
            Stage::Value(ValueStage::Fp8(_), _) => "quantize:fp8".into(),
            Stage::Value(ValueStage::Binarize(Levels::Binary), _) => "binarize:binary".into(),
            Stage::Value(ValueStage::Binarize(Levels::Ternary), _) => "binarize:ternary".into(),
            Stage::Encode(Entropy::Huffman, _) => "encode:huffman".into(),
            Stage::Encode(Entropy::None, _) => "encode".into(),
        }
    }
}

fn pattern_label(p: &SweepPrune) -> String {
    match p {
        SweepPrune::NM { n, m } => format!(":{n}:{m}"),
        _ => String::new(),
    }
}

/// A pipeline whose parameters and stage order have been checked.
#[derive(Debug, Clone)]
pub struct Pipeline {
    stages: Vec<Stage>,
    calibration: Vec<Calibration>,
    spec: PipelineSpec,
}

/// A tensor as the checker sees it.
pub struct TensorShape<'a> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub is_float: bool,
}

fn err(index: usize, kind: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        index,
        kind,
        reason: reason.into(),
    }
}

fn fraction(index: usize, kind: &'static str, what: &str, v: f64) -> Result<f64, SpecError> {
    if v.is_finite() && (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(err(
            index,
            kind,
            format!("{what} must be at least 0 and below 1, got {v}"),
        ))
    }
}

impl Pipeline {
    /// Checks parameters and stage order. Errors name the stage.
    pub fn parse(spec: PipelineSpec) -> Result<Self, SpecError> {
        if spec.stages.is_empty() {
            return Err(err(0, "pipeline", "a pipeline needs at least one stage"));
        }
        if spec.stages.len() > 64 {
            return Err(err(64, "pipeline", "a pipeline has at most 64 stages"));
        }
        let mut stages = Vec::with_capacity(spec.stages.len());
        let mut calibration = Vec::with_capacity(spec.stages.len());
        for (i, s) in spec.stages.iter().enumerate() {
            let (stage, calib) = parse_stage(i, s)?;
            stages.push(stage);
            calibration.push(calib);
        }
        // Structural stages rewrite the model before any per-tensor stage.
        let mut seen_per_tensor = None;
        for (i, s) in stages.iter().enumerate() {
            match s {
                Stage::Structural(_) => {
                    if let Some(j) = seen_per_tensor {
                        return Err(err(
                            i,
                            s.kind(),
                            format!(
                                "structural stages change shapes and must come before per-tensor stages, but stage {j} comes first"
                            ),
                        ));
                    }
                }
                _ => {
                    seen_per_tensor.get_or_insert(i);
                }
            }
        }
        let global = stages
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                matches!(
                    s,
                    Stage::Prune(PruneKind::Magnitude { global: true, .. }, _)
                )
            })
            .count();
        if global > 1 {
            let i = stages
                .iter()
                .rposition(|s| {
                    matches!(
                        s,
                        Stage::Prune(PruneKind::Magnitude { global: true, .. }, _)
                    )
                })
                .unwrap_or(0);
            return Err(err(
                i,
                "prune",
                "only one global magnitude prune per pipeline",
            ));
        }
        Ok(Self {
            stages,
            calibration,
            spec,
        })
    }

    /// Parses JSON text into a checked pipeline.
    pub fn from_json(text: &str) -> Result<Self, PipelineError> {
        let spec: PipelineSpec = serde_json::from_str(text).map_err(PipelineError::Json)?;
        Ok(Self::parse(spec)?)
    }

    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// How stage `i` uses calibration statistics.
    pub fn calibration(&self, i: usize) -> Calibration {
        self.calibration
            .get(i)
            .copied()
            .unwrap_or(Calibration::None)
    }

    /// The label of stage `i` in reports, with its calibrated method.
    pub fn label(&self, i: usize) -> String {
        let base = self.stages[i].label();
        match self.calibration(i) {
            Calibration::None => base,
            Calibration::Gptq(_) => format!("{base}:gptq"),
            Calibration::Compensate(_) => format!("{base}:compensate"),
        }
    }

    /// The statistics stage `i` cannot run without.
    pub fn needs(&self, i: usize) -> Option<StatsNeed> {
        match (&self.stages[i], self.calibration(i)) {
            (Stage::Prune(PruneKind::Wanda(_), _), _) => Some(StatsNeed::InSum2),
            (Stage::Prune(PruneKind::SparseGpt(..), _), _) => Some(StatsNeed::Xtx),
            (_, Calibration::Gptq(_) | Calibration::Compensate(_)) => Some(StatsNeed::Xtx),
            _ => None,
        }
    }

    /// Whether any stage needs statistics.
    pub fn needs_statistics(&self) -> bool {
        (0..self.stages.len()).any(|i| self.needs(i).is_some())
    }

    /// Refuses a stage that needs statistics a tensor it touches does not
    /// have (`stats` is `None` when the job has no statistics), naming the
    /// stage, the statistics and the tensor.
    pub fn check_statistics(
        &self,
        tensors: &[TensorShape<'_>],
        stats: Option<&dyn StatsCatalog>,
    ) -> Result<(), SpecError> {
        for t in tensors {
            for i in self.stages_for(t.name, t.shape, t.is_float) {
                let Some(need) = self.needs(i) else { continue };
                let has = stats.is_some_and(|s| match need {
                    StatsNeed::InSum2 => s.has_in_sum2(t.name),
                    StatsNeed::Xtx => s.has_xtx(t.name),
                });
                if !has {
                    let label = self.label(i);
                    let what = if stats.is_some() {
                        "the statistics have none"
                    } else {
                        "no statistics were given"
                    };
                    return Err(err(
                        i,
                        self.stages[i].kind(),
                        format!(
                            "{label} needs statistics `{}` for `{}`; {what}",
                            need.name(),
                            t.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn spec(&self) -> &PipelineSpec {
        &self.spec
    }

    pub fn structural(&self) -> Vec<StructuralStage> {
        self.stages
            .iter()
            .filter_map(|s| match s {
                Stage::Structural(st) => Some(st.clone()),
                _ => None,
            })
            .collect()
    }

    /// Indices of the per-tensor stages that touch a tensor, in order.
    pub fn stages_for(&self, name: &str, shape: &[usize], is_float: bool) -> Vec<usize> {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.selector()
                    .is_some_and(|sel| sel.selects(name, shape, is_float))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Checks the pipeline against a model's tensors (after structural
    /// stages): stage order per tensor, divisibility, explicit targets that
    /// do not exist.
    pub fn check_against(&self, tensors: &[TensorShape<'_>]) -> Result<(), SpecError> {
        for (i, stage) in self.stages.iter().enumerate() {
            let Some(sel) = stage.selector() else {
                continue;
            };
            for t in sel.explicit_targets() {
                match tensors.iter().find(|x| x.name == t) {
                    None => {
                        return Err(err(
                            i,
                            stage.kind(),
                            format!("target `{t}` is not a tensor of the model"),
                        ))
                    }
                    Some(x) if !x.is_float => {
                        return Err(err(
                            i,
                            stage.kind(),
                            format!("target `{t}` is not a floating-point tensor"),
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        for t in tensors {
            let idx = self.stages_for(t.name, t.shape, t.is_float);
            let nm_sweep = idx.iter().any(|&i| {
                matches!(
                    self.stages[i],
                    Stage::Prune(PruneKind::SparseGpt(SweepPrune::NM { .. }, _), _)
                )
            });
            if let Some(&i) = idx
                .iter()
                .find(|&&i| matches!(self.calibration(i), Calibration::Gptq(g) if g.act_order))
            {
                if nm_sweep {
                    return Err(err(
                        i,
                        "quantize",
                        format!("`{}` is pruned n:m by sparsegpt in the same sweep, whose windows need the original column order; drop act_order", t.name),
                    ));
                }
            }
            let mut last: Option<(usize, u8)> = None;
            let mut low_rank: Option<usize> = None;
            for &i in &idx {
                let s = &self.stages[i];
                let phase = s.phase();
                if let Some((j, p)) = last {
                    if phase < p || (phase == p && phase >= 2) {
                        return Err(err(
                            i,
                            s.kind(),
                            format!(
                                "on tensor `{}` it comes after stage {j} ({}); the order is prune, low_rank, then one of share/quantize/binarize, then encode",
                                t.name,
                                self.stages[j].kind()
                            ),
                        ));
                    }
                }
                last = Some((i, phase));
                let shape = MatrixShape::of(t.shape).unwrap_or(MatrixShape { rows: 0, cols: 0 });
                match s {
                    Stage::Prune(kind, _)
                        if kind
                            .n_m()
                            .is_some_and(|(_, m)| !shape.cols.is_multiple_of(m)) =>
                    {
                        let m = kind.n_m().map_or(1, |(_, m)| m);
                        return Err(err(
                            i,
                            s.kind(),
                            format!(
                                "m = {m} does not divide the {} input columns of `{}`",
                                shape.cols, t.name
                            ),
                        ));
                    }
                    Stage::LowRank(..) => {
                        if t.shape.len() != 2 {
                            return Err(err(
                                i,
                                s.kind(),
                                format!("`{}` has rank {}; low_rank factors 2-D matrices (use targets/ignore)", t.name, t.shape.len()),
                            ));
                        }
                        low_rank = Some(i);
                    }
                    Stage::Value(v, _) => {
                        if let Some(j) = low_rank {
                            return Err(err(
                                i,
                                s.kind(),
                                format!("`{}` is already factored by stage {j} (low_rank); quantizing factors is not supported", t.name),
                            ));
                        }
                        if let ValueStage::Int(IntQuant {
                            granularity: Granularity::Group(g),
                            ..
                        }) = v
                        {
                            if !shape.cols.is_multiple_of(*g) {
                                return Err(err(
                                    i,
                                    s.kind(),
                                    format!(
                                        "group_size {g} does not divide the {} input columns of `{}`",
                                        shape.cols, t.name
                                    ),
                                ));
                            }
                        }
                    }
                    Stage::Encode(..) => {
                        if let Some(j) = low_rank {
                            return Err(err(
                                i,
                                s.kind(),
                                format!("`{}` is factored by stage {j} (low_rank), which encode does not store", t.name),
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A pipeline that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("the pipeline is not valid JSON of the expected form: {0}")]
    Json(serde_json::Error),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

fn parse_stage(i: usize, s: &StageSpec) -> Result<(Stage, Calibration), SpecError> {
    let calibration = match s {
        StageSpec::Quantize(q) => quantize_calibration(i, q)?,
        StageSpec::Share(sh) if sh.compensate => {
            Calibration::Compensate(sweep_params(i, "share", sh.damp, sh.block_size, false)?)
        }
        StageSpec::Share(sh) if sh.damp.is_some() || sh.block_size.is_some() => {
            return Err(err(i, "share", "damp and block_size go with compensate"));
        }
        _ => Calibration::None,
    };
    Ok((parse_stage_kind(i, s)?, calibration))
}

fn sweep_params(
    i: usize,
    kind: &'static str,
    damp: Option<f64>,
    block_size: Option<usize>,
    act_order: bool,
) -> Result<SweepParams, SpecError> {
    let d = SweepParams::default();
    let damp = damp.unwrap_or(d.damp);
    if !(damp.is_finite() && (0.0..=10.0).contains(&damp)) {
        return Err(err(
            i,
            kind,
            format!("damp must be between 0 and 10 (a fraction of the mean diagonal of xtx), got {damp}"),
        ));
    }
    let block_size = block_size.unwrap_or(d.block_size);
    if !(1..=65_536).contains(&block_size) {
        return Err(err(
            i,
            kind,
            format!("block_size must be 1..=65536, got {block_size}"),
        ));
    }
    Ok(SweepParams {
        damp,
        block_size,
        act_order,
    })
}

fn quantize_calibration(i: usize, q: &QuantizeSpec) -> Result<Calibration, SpecError> {
    match q.method {
        QuantMethod::Rtn => {
            if q.damp.is_some() || q.block_size.is_some() || q.act_order {
                return Err(err(
                    i,
                    "quantize",
                    "damp, block_size and act_order go with method gptq",
                ));
            }
            Ok(Calibration::None)
        }
        QuantMethod::Gptq => {
            if q.kind == QuantType::Fp8 {
                return Err(err(
                    i,
                    "quantize",
                    "method gptq quantizes to integer grids, not fp8",
                ));
            }
            Ok(Calibration::Gptq(sweep_params(
                i,
                "quantize",
                q.damp,
                q.block_size,
                q.act_order,
            )?))
        }
    }
}

/// `sparsity`, or `n` and `m`, of a calibrated prune.
fn prune_pattern(
    i: usize,
    sparsity: Option<f64>,
    n: Option<usize>,
    m: Option<usize>,
) -> Result<SweepPrune, SpecError> {
    match (sparsity, n, m) {
        (Some(s), None, None) => Ok(SweepPrune::Sparsity(fraction(i, "prune", "sparsity", s)?)),
        (None, Some(n), Some(m)) => {
            if !(1..=64).contains(&m) || n == 0 || n >= m {
                return Err(err(
                    i,
                    "prune",
                    format!("n:m needs 0 < n < m <= 64, got {n}:{m}"),
                ));
            }
            Ok(SweepPrune::NM { n, m })
        }
        _ => Err(err(i, "prune", "give sparsity, or n and m (not both)")),
    }
}

fn parse_stage_kind(i: usize, s: &StageSpec) -> Result<Stage, SpecError> {
    let sel = |kind: &'static str, targets: &[String], ignore: &[String]| {
        Selector::parse(targets, ignore).map_err(|e| err(i, kind, e))
    };
    Ok(match s {
        StageSpec::Prune(PruneSpec::Magnitude {
            sparsity,
            scope,
            targets,
            ignore,
        }) => Stage::Prune(
            PruneKind::Magnitude {
                sparsity: fraction(i, "prune", "sparsity", *sparsity)?,
                global: *scope == PruneScope::Global,
            },
            sel("prune", targets, ignore)?,
        ),
        StageSpec::Prune(PruneSpec::NM {
            n,
            m,
            targets,
            ignore,
        }) => {
            if !(1..=64).contains(m) || *n == 0 || n >= m {
                return Err(err(
                    i,
                    "prune",
                    format!("n:m needs 0 < n < m <= 64, got {n}:{m}"),
                ));
            }
            Stage::Prune(
                PruneKind::NM { n: *n, m: *m },
                sel("prune", targets, ignore)?,
            )
        }
        StageSpec::Prune(PruneSpec::Wanda {
            sparsity,
            n,
            m,
            targets,
            ignore,
        }) => Stage::Prune(
            PruneKind::Wanda(prune_pattern(i, *sparsity, *n, *m)?),
            sel("prune", targets, ignore)?,
        ),
        StageSpec::Prune(PruneSpec::Sparsegpt {
            sparsity,
            n,
            m,
            damp,
            block_size,
            targets,
            ignore,
        }) => Stage::Prune(
            PruneKind::SparseGpt(
                prune_pattern(i, *sparsity, *n, *m)?,
                sweep_params(i, "prune", *damp, *block_size, false)?,
            ),
            sel("prune", targets, ignore)?,
        ),
        StageSpec::Prune(PruneSpec::Channel {
            sparsity,
            norm,
            groups,
        }) => Stage::Structural(StructuralStage::Channel(ChannelPrune {
            sparsity: fraction(i, "prune", "sparsity", *sparsity)?,
            norm: match norm {
                NormSpec::L1 => Norm::L1,
                NormSpec::L2 => Norm::L2,
            },
            groups: groups.as_ref().map(|gs| {
                gs.iter()
                    .map(|g| ChannelGroup {
                        producer: g.producer.clone(),
                        consumers: g.consumers.clone(),
                    })
                    .collect()
            }),
        })),
        StageSpec::FoldBatchnorm(f) => Stage::Structural(StructuralStage::Fold(FoldBatchNorm {
            pairs: f.pairs.clone(),
        })),
        StageSpec::LowRank(l) => {
            let choice = match (l.rank_ratio, l.energy) {
                (Some(r), None) if r.is_finite() && r > 0.0 && r <= 1.0 => RankChoice::Ratio(r),
                (None, Some(e)) if e.is_finite() && e > 0.0 && e <= 1.0 => RankChoice::Energy(e),
                (Some(_), Some(_)) => {
                    return Err(err(i, "low_rank", "give rank_ratio or energy, not both"))
                }
                (None, None) => return Err(err(i, "low_rank", "needs rank_ratio or energy")),
                _ => {
                    return Err(err(
                        i,
                        "low_rank",
                        "rank_ratio and energy must be above 0 and at most 1",
                    ))
                }
            };
            Stage::LowRank(choice, sel("low_rank", &l.targets, &l.ignore)?)
        }
        StageSpec::Share(s) => {
            if !(2..=255).contains(&s.clusters) {
                return Err(err(
                    i,
                    "share",
                    format!("clusters must be 2..=255, got {}", s.clusters),
                ));
            }
            if !(1..=1000).contains(&s.iterations) {
                return Err(err(
                    i,
                    "share",
                    format!("iterations must be 1..=1000, got {}", s.iterations),
                ));
            }
            Stage::Value(
                ValueStage::Share(ShareParams {
                    clusters: s.clusters,
                    init: match s.init {
                        InitSpec::Linear => Init::Linear,
                        InitSpec::Density => Init::Density,
                        InitSpec::KmeansPlusPlus => Init::KmeansPlusPlus,
                    },
                    iterations: s.iterations,
                    per_channel: s.per_channel,
                }),
                sel("share", &s.targets, &s.ignore)?,
            )
        }
        StageSpec::Quantize(q) => {
            let granularity = match (q.granularity, q.group_size) {
                (GranularitySpec::Tensor, None) => Granularity::Tensor,
                (GranularitySpec::Channel, None) => Granularity::Channel,
                (GranularitySpec::Group, Some(g)) if (1..=1 << 20).contains(&g) => {
                    Granularity::Group(g)
                }
                (GranularitySpec::Group, Some(g)) => {
                    return Err(err(
                        i,
                        "quantize",
                        format!("group_size {g} is out of range"),
                    ))
                }
                (GranularitySpec::Group, None) => {
                    return Err(err(i, "quantize", "granularity group needs group_size"))
                }
                (_, Some(_)) => {
                    return Err(err(i, "quantize", "group_size goes with granularity group"))
                }
            };
            match q.kind {
                QuantType::Int => {
                    let bits = q
                        .bits
                        .ok_or_else(|| err(i, "quantize", "integer quantization needs bits"))?;
                    if !(2..=8).contains(&bits) {
                        return Err(err(
                            i,
                            "quantize",
                            format!("bits must be 2..=8, got {bits}"),
                        ));
                    }
                    Stage::Value(
                        ValueStage::Int(IntQuant {
                            bits,
                            symmetric: q.symmetric,
                            granularity,
                            scale_search: match q.scale_search {
                                ScaleSearchSpec::Minmax => ScaleSearch::MinMax,
                                ScaleSearchSpec::Mse => ScaleSearch::Mse,
                            },
                        }),
                        sel("quantize", &q.targets, &q.ignore)?,
                    )
                }
                QuantType::Fp8 => {
                    if q.bits.is_some_and(|b| b != 8) {
                        return Err(err(i, "quantize", "fp8 has 8 bits"));
                    }
                    if matches!(granularity, Granularity::Group(_)) {
                        return Err(err(
                            i,
                            "quantize",
                            "fp8 scales are per tensor or per channel",
                        ));
                    }
                    Stage::Value(
                        ValueStage::Fp8(granularity),
                        sel("quantize", &q.targets, &q.ignore)?,
                    )
                }
            }
        }
        StageSpec::Binarize(b) => {
            let levels = match b.levels {
                2 => Levels::Binary,
                3 => Levels::Ternary,
                l => {
                    return Err(err(
                        i,
                        "binarize",
                        format!("levels must be 2 (binary) or 3 (ternary), got {l}"),
                    ))
                }
            };
            Stage::Value(
                ValueStage::Binarize(levels),
                sel("binarize", &b.targets, &b.ignore)?,
            )
        }
        StageSpec::Encode(e) => Stage::Encode(e.entropy, sel("encode", &e.targets, &e.ignore)?),
    })
}

/// A named pipeline.
pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    json: &'static str,
}

impl Preset {
    pub fn spec(&self) -> PipelineSpec {
        serde_json::from_str(self.json).expect("presets are valid pipelines")
    }

    pub fn pipeline(&self) -> Pipeline {
        Pipeline::parse(self.spec()).expect("presets are valid pipelines")
    }
}

/// What every preset leaves alone: embedding tables (token, position and
/// type embeddings: `embed_tokens`, `word_embeddings`, `wte`, `wpe`, ...)
/// and the output head (`lm_head`). Pruning or coarse quantization of a
/// lookup table damages every token that reads it, the statistics of a
/// model's linear inputs say nothing about them, and compressed-tensors
/// loaders expect them unquantized (as llm-compressor leaves them).
pub const PRESET_IGNORE: &str = "re:.*(embed|wte|wpe|lm_head).*";

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "deep-compression",
        description: "Magnitude pruning (40% per tensor), k-means sharing with 16 clusters (k-means++ init), then sparse positions and Huffman coding; no retraining or data needed. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[
            {"stage":"prune","method":"magnitude","sparsity":0.4,"scope":"tensor","ignore":["re:.*(embed|wte|wpe|lm_head).*"]},
            {"stage":"share","clusters":16,"init":"kmeans++","iterations":20,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]},
            {"stage":"encode","entropy":"huffman","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "int8",
        description: "8-bit symmetric integer quantization with one scale per output channel (min-max: at 8 bits the step is already fine). Embeddings and lm_head are left alone.",
        json: r#"{"stages":[{"stage":"quantize","bits":8,"symmetric":true,"granularity":"channel","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "int4-g128",
        description: "4-bit symmetric integer quantization with one scale per group of 128 input weights, each scale chosen by squared-error search. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[{"stage":"quantize","bits":4,"symmetric":true,"granularity":"group","group_size":128,"scale_search":"mse","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "sparse-2of4-int8",
        description: "2:4 structured sparsity along the input dimension, then 8-bit per-channel symmetric quantization with squared-error scale search. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[
            {"stage":"prune","method":"n:m","n":2,"m":4,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]},
            {"stage":"quantize","bits":8,"symmetric":true,"granularity":"channel","scale_search":"mse","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "fp8",
        description: "FP8 E4M3 with one scale per output channel. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[{"stage":"quantize","type":"fp8","granularity":"channel","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "binary",
        description: "1-bit weights: sign times the mean magnitude of each output channel (XNOR-Net). Embeddings and lm_head are left alone.",
        json: r#"{"stages":[{"stage":"binarize","levels":2,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "ternary",
        description: "Ternary weights {-a, 0, +a} per output channel with threshold 0.7 mean|w| (TWN). Embeddings and lm_head are left alone.",
        json: r#"{"stages":[{"stage":"binarize","levels":3,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]},{"stage":"encode","entropy":"huffman","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "int4-g128-gptq",
        description: "GPTQ 4-bit symmetric, groups of 128 (squared-error scale search, activation order with static groups, damp 0.01, blocks of 128); needs statistics with xtx. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[{"stage":"quantize","method":"gptq","bits":4,"symmetric":true,"granularity":"group","group_size":128,"scale_search":"mse","act_order":true,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "sparse-2of4-int8-gptq",
        description: "SparseGPT 2:4 and GPTQ 8-bit per-channel in one sweep, so the quantization error is compensated with the pruning error; needs statistics with xtx. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[
            {"stage":"prune","method":"sparsegpt","n":2,"m":4,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]},
            {"stage":"quantize","method":"gptq","bits":8,"symmetric":true,"granularity":"channel","scale_search":"mse","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
    Preset {
        name: "deep-compression-calibrated",
        description: "SparseGPT 50%, then 16-cluster sharing with importance-weighted k-means and GPTQ-style error compensation onto the codebook, then sparse positions and Huffman coding; needs statistics with xtx. Embeddings and lm_head are left alone.",
        json: r#"{"stages":[
            {"stage":"prune","method":"sparsegpt","sparsity":0.5,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]},
            {"stage":"share","clusters":16,"init":"kmeans++","iterations":20,"compensate":true,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]},
            {"stage":"encode","entropy":"huffman","ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}"#,
    },
];

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::from_json(json)
    }

    fn t<'a>(name: &'a str, shape: &'a [usize]) -> TensorShape<'a> {
        TensorShape {
            name,
            shape,
            is_float: true,
        }
    }

    #[test]
    fn every_preset_parses_and_skips_embeddings_and_the_head() {
        for p in PRESETS {
            let pl = p.pipeline();
            assert!(!pl.stages().is_empty(), "{}", p.name);
            assert!(p.json.contains(PRESET_IGNORE), "{}", p.name);
            for name in [
                "model.embed_tokens.weight",
                "bert.embeddings.word_embeddings.weight",
                "transformer.wte.weight",
                "lm_head.weight",
            ] {
                assert!(
                    pl.stages_for(name, &[8, 8], true).is_empty(),
                    "{}: {name}",
                    p.name
                );
            }
            assert!(!pl
                .stages_for("model.layers.0.mlp.up_proj.weight", &[8, 8], true)
                .is_empty());
        }
    }

    #[test]
    fn calibrated_stages_parse_and_name_what_they_need() {
        let p = parse(r#"{"stages":[
            {"stage":"prune","method":"sparsegpt","n":2,"m":4},
            {"stage":"quantize","method":"gptq","bits":4,"granularity":"group","group_size":4,"damp":0.05,"block_size":64}]}"#).unwrap();
        assert_eq!(p.label(0), "prune:sparsegpt:2:4");
        assert_eq!(p.label(1), "quantize:int4:gptq");
        assert_eq!(p.needs(0), Some(StatsNeed::Xtx));
        assert_eq!(
            p.calibration(1),
            Calibration::Gptq(SweepParams {
                damp: 0.05,
                block_size: 64,
                act_order: false
            })
        );
        let e = p.check_statistics(&[t("w", &[4, 8])], None).unwrap_err();
        assert_eq!(e.index, 0);
        assert!(e.reason.contains("`xtx` for `w`"), "{e}");
        struct OnlyInSum2;
        impl StatsCatalog for OnlyInSum2 {
            fn has_in_sum2(&self, _: &str) -> bool {
                true
            }
            fn has_xtx(&self, _: &str) -> bool {
                false
            }
        }
        let w = parse(r#"{"stages":[{"stage":"prune","method":"wanda","sparsity":0.5}]}"#).unwrap();
        w.check_statistics(&[t("w", &[4, 8])], Some(&OnlyInSum2))
            .unwrap();
        let e = w.check_statistics(&[t("w", &[4, 8])], None).unwrap_err();
        assert!(e.reason.contains("`in_sum2` for `w`"), "{e}");
        let e = p
            .check_statistics(&[t("w", &[4, 8])], Some(&OnlyInSum2))
            .unwrap_err();
        assert!(e.reason.contains("the statistics have none"), "{e}");
        for bad in [
            r#"{"stages":[{"stage":"quantize","bits":4,"damp":0.1}]}"#,
            r#"{"stages":[{"stage":"quantize","type":"fp8","method":"gptq"}]}"#,
            r#"{"stages":[{"stage":"prune","method":"wanda","sparsity":0.5,"n":2,"m":4}]}"#,
            r#"{"stages":[{"stage":"prune","method":"sparsegpt"}]}"#,
            r#"{"stages":[{"stage":"quantize","method":"gptq","bits":4,"block_size":0}]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compensated_sharing_takes_damp_and_block_size() {
        let p = parse(
            r#"{"stages":[{"stage":"share","clusters":16,"compensate":true,"damp":0.05,"block_size":64}]}"#,
        )
        .unwrap();
        assert_eq!(
            p.calibration(0),
            Calibration::Compensate(SweepParams {
                damp: 0.05,
                block_size: 64,
                act_order: false
            })
        );
        let d = parse(r#"{"stages":[{"stage":"share","clusters":16,"compensate":true}]}"#).unwrap();
        assert_eq!(
            d.calibration(0),
            Calibration::Compensate(SweepParams::default())
        );
        for (bad, needle) in [
            (
                r#"{"stages":[{"stage":"share","clusters":16,"damp":0.05}]}"#,
                "go with compensate",
            ),
            (
                r#"{"stages":[{"stage":"share","clusters":16,"block_size":8}]}"#,
                "go with compensate",
            ),
            (
                r#"{"stages":[{"stage":"share","clusters":16,"compensate":true,"damp":-1}]}"#,
                "damp must be",
            ),
            (
                r#"{"stages":[{"stage":"share","clusters":16,"compensate":true,"damp":11}]}"#,
                "damp must be",
            ),
            (
                r#"{"stages":[{"stage":"share","clusters":16,"compensate":true,"block_size":0}]}"#,
                "block_size must be",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn an_unknown_field_is_rejected() {
        let e = parse(r#"{"stages":[{"stage":"quantize","bitz":4}]}"#).unwrap_err();
        assert!(e.to_string().contains("bitz"), "{e}");
    }

    #[test]
    fn out_of_range_parameters_name_the_stage() {
        let e = parse(r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.5},{"stage":"quantize","bits":9}]}"#)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "stage 1 (quantize): bits must be 2..=8, got 9"
        );
        let e = parse(r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":1.5}]}"#)
            .unwrap_err();
        assert!(
            e.to_string().starts_with("stage 0 (prune): sparsity"),
            "{e}"
        );
    }

    #[test]
    fn share_and_quantize_on_the_same_tensor_are_refused() {
        let p =
            parse(r#"{"stages":[{"stage":"share","clusters":16},{"stage":"quantize","bits":4}]}"#)
                .unwrap();
        let e = p.check_against(&[t("w", &[4, 4])]).unwrap_err();
        assert_eq!(e.index, 1);
        assert!(e.reason.contains("`w`"), "{e}");
    }

    #[test]
    fn share_and_quantize_on_different_tensors_are_fine() {
        let p = parse(r#"{"stages":[{"stage":"share","clusters":16,"targets":["a"]},{"stage":"quantize","bits":4,"ignore":["a"]}]}"#)
            .unwrap();
        p.check_against(&[t("a", &[4, 4]), t("b", &[4, 4])])
            .unwrap();
    }

    #[test]
    fn encode_before_its_value_stage_is_refused() {
        let p = parse(r#"{"stages":[{"stage":"encode"},{"stage":"share","clusters":4}]}"#).unwrap();
        let e = p.check_against(&[t("w", &[4, 4])]).unwrap_err();
        assert_eq!((e.index, e.kind), (1, "share"));
    }

    #[test]
    fn a_group_size_that_does_not_divide_is_refused() {
        let p = preset("int4-g128").unwrap().pipeline();
        let e = p.check_against(&[t("w", &[8, 300])]).unwrap_err();
        assert!(e.reason.contains("group_size 128"), "{e}");
        p.check_against(&[t("w", &[8, 256]), t("norm", &[300])])
            .unwrap();
    }

    #[test]
    fn a_structural_stage_after_a_per_tensor_stage_is_refused() {
        let e = parse(r#"{"stages":[{"stage":"quantize","bits":8},{"stage":"fold_batchnorm"}]}"#)
            .unwrap_err();
        assert!(e.to_string().starts_with("stage 1 (fold_batchnorm)"), "{e}");
    }

    #[test]
    fn a_missing_explicit_target_is_refused() {
        let p = parse(r#"{"stages":[{"stage":"quantize","bits":8,"targets":["nope"]}]}"#).unwrap();
        let e = p.check_against(&[t("w", &[4, 4])]).unwrap_err();
        assert!(e.reason.contains("`nope`"), "{e}");
    }

    #[test]
    fn default_selection_skips_vectors_and_integers_and_regexes_match_whole_names() {
        let p =
            parse(r#"{"stages":[{"stage":"quantize","bits":8,"ignore":["re:.*head"]}]}"#).unwrap();
        assert_eq!(p.stages_for("w", &[4, 4], true), vec![0]);
        assert!(p.stages_for("norm", &[4], true).is_empty());
        assert!(p.stages_for("ids", &[4, 4], false).is_empty());
        assert!(p.stages_for("lm_head", &[4, 4], true).is_empty());
        assert_eq!(p.stages_for("lm_head.weight", &[4, 4], true), vec![0]);
    }
}
