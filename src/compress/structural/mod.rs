//! Structural stages: batch-norm folding and channel pruning.
//!
//! They change shapes across several tensors at once (a pruned channel is a
//! row of one layer, an entry of a norm and a column block of the next
//! layer), so they are planned over the whole model before the per-tensor
//! pass. [`plan`] reads shapes and only the tensors it must (the producers
//! whose channel norms it ranks), one at a time; it records for every output
//! tensor a recipe over the input tensors. [`Plan::materialize`] then builds
//! one output tensor at a time from its recipe, so the model is never held in
//! memory.
//!
//! Tensors are named PyTorch state-dict style: a layer `<p>` has
//! `<p>.weight` (rank >= 2, output channels first) and maybe `<p>.bias`; a
//! batch norm `<bn>` has `<bn>.running_mean`, `<bn>.running_var`, usually
//! `<bn>.weight` (gamma), `<bn>.bias` (beta) and `<bn>.num_batches_tracked`,
//! and uses eps = [`BATCH_NORM_EPS`].
//!
//! Without explicit pairs or groups, both stages infer them. A batch norm
//! belongs to the layer its name points to (`layer1.0.bn2` to
//! `layer1.0.conv2`, `features.4` to `features.3`, see [`NAMING_RULES`]) when
//! that layer exists with as many outputs as the norm has channels, otherwise
//! to the layer whose weight (or weight and bias) comes right before its
//! first tensor in the checkpoint. Names come first because writers that sort
//! tensors by name (torch's safetensors writer does) put `bn1` before `conv1`
//! and `features.10` before `features.2`. Channel groups chain consecutive
//! layer weights in checkpoint order. A batch norm neither rule pairs gets an
//! error naming it, not a guess, and needs explicit pairs.

use rayon::prelude::*;

mod batchnorm;
mod channels;
mod model;
mod plan;
#[cfg(test)]
mod tests;

use batchnorm::*;
use model::*;
use plan::*;
pub use plan::{plan, plan_shapes, Plan, PlannedTensor};

/// How a batch norm's name points to its layer, for inferred pairs.
const NAMING_RULES: &str = "`<p>.bnK` or `<p>.normK` after `<p>.convK`, `<p>.fcK` or `<p>.linearK`; `<p>.N` after `<p>.N-1`";

/// PyTorch's default `eps` for `BatchNorm*d`.
pub const BATCH_NORM_EPS: f64 = 1e-5;

const BN_VECTORS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];
const BN_PARTS: [&str; 5] = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
];

/// Read access to the input checkpoint.
pub trait TensorSource {
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Every tensor name, in checkpoint order.
    fn names(&self) -> Vec<String>;
    fn is_float(&self, name: &str) -> bool;
    /// The tensor's values, row-major, converted to f32.
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, StructuralError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    L1,
    L2,
}

/// Removes the weakest output channels of layers, and everything that reads
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelPrune {
    /// Fraction of each producer's output channels to remove (at least one
    /// channel is always kept).
    pub sparsity: f64,
    pub norm: Norm,
    /// Inferred for a plain chain of layers when absent.
    pub groups: Option<Vec<ChannelGroup>>,
}

/// A layer whose output channels are pruned, and the layers (or batch
/// norms) that read those channels.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGroup {
    /// Layer prefix, e.g. `fc1` or `features.0`.
    pub producer: String,
    /// Layer prefixes whose input dimension (dim 1) reads the producer's
    /// outputs; a batch-norm prefix here has its vectors pruned instead.
    pub consumers: Vec<String>,
}

/// Folds batch norms into the layer before them.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldBatchNorm {
    /// `(layer prefix, batch-norm prefix)`; when absent every batch norm in
    /// the model is paired from checkpoint order, or the plan fails.
    pub pairs: Option<Vec<(String, String)>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StructuralStage {
    Fold(FoldBatchNorm),
    Channel(ChannelPrune),
}

#[derive(Debug, thiserror::Error)]
pub enum StructuralError {
    #[error("tensor `{0}` not found")]
    MissingTensor(String),
    #[error("tensor `{0}` is not floating point, so it cannot be rewritten")]
    NotFloat(String),
    #[error("tensor `{tensor}` has shape {shape:?}: {reason}")]
    Shape {
        tensor: String,
        shape: Vec<usize>,
        reason: String,
    },
    #[error("tensor `{tensor}` holds {len} values but its shape {shape:?} needs {expected}")]
    Length {
        tensor: String,
        shape: Vec<usize>,
        len: usize,
        expected: usize,
    },
    #[error(
        "batch norm `{bn}` could not be paired with a layer: {reason}; give the pairs explicitly"
    )]
    UnpairedBatchNorm { bn: String, reason: String },
    #[error("batch norm `{bn}`: {reason}")]
    BatchNorm { bn: String, reason: String },
    #[error("layer `{layer}`: {reason}")]
    Layer { layer: String, reason: String },
    #[error("the layers do not form a chain at `{tensor}`: {reason}; give the channel groups explicitly")]
    NotChained { tensor: String, reason: String },
}
