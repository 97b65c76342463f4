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
//! Without explicit pairs or groups, both stages infer them from checkpoint
//! order: a batch norm belongs to the layer whose weight (or weight and bias)
//! comes right before its first tensor, and channel groups chain consecutive
//! layer weights. Writers that sort tensors by name (torch's safetensors
//! writer does) keep `features.0` next to `features.1` but put `bn1` before
//! `conv1`; such a model gets an error naming the batch norm, not a guess,
//! and needs explicit pairs and groups.

use std::sync::Arc;

use rayon::prelude::*;

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

/// One output tensor of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// The input tensor whose dtype (and shard) it takes.
    pub source: String,
    pub shape: Vec<usize>,
    /// `false`: the input tensor, copied through untouched.
    pub changed: bool,
}

/// What the structural stages make of a checkpoint.
#[derive(Debug, Clone)]
pub struct Plan {
    /// In checkpoint order; removed tensors are absent and a tensor created
    /// by folding (a bias) comes right after its layer's weight.
    pub outputs: Vec<PlannedTensor>,
    recipes: Vec<Recipe>,
}

impl Plan {
    /// The values of output tensor `name` (row-major, its planned shape),
    /// reading the input tensors it comes from.
    pub fn materialize(
        &self,
        name: &str,
        src: &dyn TensorSource,
    ) -> Result<Vec<f32>, StructuralError> {
        let i = self
            .outputs
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| StructuralError::MissingTensor(name.to_string()))?;
        self.recipes[i].eval(src)
    }
}

/// Plans `stages`, in order, over the checkpoint `src`.
pub fn plan(stages: &[StructuralStage], src: &dyn TensorSource) -> Result<Plan, StructuralError> {
    let mut model = Model::read(src)?;
    for stage in stages {
        match stage {
            StructuralStage::Fold(fold) => model.fold_batch_norms(fold)?,
            StructuralStage::Channel(prune) => model.prune_channels(prune, src)?,
        }
    }
    let (outputs, recipes) = model
        .entries
        .into_iter()
        .map(|e| {
            let planned = PlannedTensor {
                name: e.name,
                source: e.source,
                shape: e.recipe.shape.clone(),
                changed: e.changed,
            };
            (planned, e.recipe)
        })
        .unzip();
    Ok(Plan { outputs, recipes })
}

/// How an output tensor is computed from input tensors.
#[derive(Debug, Clone)]
struct Recipe {
    shape: Vec<usize>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Load(String),
    /// Keep these indices of dim 0.
    Rows {
        of: Box<Recipe>,
        keep: Arc<[usize]>,
    },
    /// Dim 1 is made of blocks of `block` consecutive entries, one block per
    /// producer channel; keep these blocks.
    Cols {
        of: Box<Recipe>,
        keep: Arc<[usize]>,
        block: usize,
    },
    /// `W[o, ..] * gamma[o] / sqrt(var[o] + eps)`.
    FoldWeight {
        of: Box<Recipe>,
        bn: Arc<BatchNorm>,
    },
    /// `beta + (b - mean) * gamma / sqrt(var + eps)`, `b = 0` when the layer
    /// had no bias.
    FoldBias {
        of: Option<Box<Recipe>>,
        bn: Arc<BatchNorm>,
    },
}

/// A batch norm's vectors as recipes (they may have been pruned already).
#[derive(Debug)]
struct BatchNorm {
    name: String,
    gamma: Option<Recipe>,
    beta: Option<Recipe>,
    mean: Recipe,
    var: Recipe,
}

fn element_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Recipe {
    fn load(name: &str, shape: Vec<usize>) -> Self {
        Recipe {
            shape,
            op: Op::Load(name.to_string()),
        }
    }

    fn eval(&self, src: &dyn TensorSource) -> Result<Vec<f32>, StructuralError> {
        match &self.op {
            Op::Load(name) => {
                let values = src.load_f32(name)?;
                let expected = element_count(&self.shape);
                if values.len() != expected {
                    return Err(StructuralError::Length {
                        tensor: name.clone(),
                        shape: self.shape.clone(),
                        len: values.len(),
                        expected,
                    });
                }
                Ok(values)
            }
            Op::Rows { of, keep } => {
                let values = of.eval(src)?;
                let inner = element_count(&of.shape[1..]);
                let mut out = Vec::with_capacity(keep.len() * inner);
                for &r in keep.iter() {
                    out.extend_from_slice(&values[r * inner..(r + 1) * inner]);
                }
                Ok(out)
            }
            Op::Cols { of, keep, block } => {
                let values = of.eval(src)?;
                let row_len = element_count(&of.shape[1..]);
                let segment = block * element_count(&of.shape[2..]);
                let mut out = Vec::with_capacity(element_count(&self.shape));
                if row_len > 0 {
                    for row in values.chunks_exact(row_len) {
                        for &c in keep.iter() {
                            out.extend_from_slice(&row[c * segment..(c + 1) * segment]);
                        }
                    }
                }
                Ok(out)
            }
            Op::FoldWeight { of, bn } => {
                let (scale, _) = bn.scale_shift(src)?;
                let mut values = of.eval(src)?;
                let inner = element_count(&of.shape[1..]);
                if inner > 0 {
                    values
                        .par_chunks_mut(inner)
                        .zip(scale.par_iter())
                        .for_each(|(row, &s)| {
                            row.iter_mut().for_each(|w| *w = (f64::from(*w) * s) as f32);
                        });
                }
                Ok(values)
            }
            Op::FoldBias { of, bn } => {
                let (scale, shift) = bn.scale_shift(src)?;
                let bias = match of {
                    Some(of) => of.eval(src)?,
                    None => vec![0.0; scale.len()],
                };
                Ok(bias
                    .iter()
                    .zip(scale.iter().zip(&shift))
                    .map(|(&b, (&s, &t))| (f64::from(b) * s + t) as f32)
                    .collect())
            }
        }
    }
}

impl BatchNorm {
    /// Per channel, `scale = gamma / sqrt(var + eps)` and
    /// `shift = beta - mean * scale`, so that `bn(x) = x * scale + shift`.
    fn scale_shift(&self, src: &dyn TensorSource) -> Result<(Vec<f64>, Vec<f64>), StructuralError> {
        let mean = self.mean.eval(src)?;
        let var = self.var.eval(src)?;
        let channels = mean.len();
        let gamma = match &self.gamma {
            Some(r) => r.eval(src)?,
            None => vec![1.0; channels],
        };
        let beta = match &self.beta {
            Some(r) => r.eval(src)?,
            None => vec![0.0; channels],
        };
        let mut scale = Vec::with_capacity(channels);
        let mut shift = Vec::with_capacity(channels);
        for c in 0..channels {
            let v = f64::from(var[c]) + BATCH_NORM_EPS;
            if !(v > 0.0 && v.is_finite()) {
                return Err(StructuralError::BatchNorm {
                    bn: self.name.clone(),
                    reason: format!(
                        "running_var is {} at channel {c}; a variance must be finite and not negative",
                        var[c]
                    ),
                });
            }
            let s = f64::from(gamma[c]) / v.sqrt();
            scale.push(s);
            shift.push(f64::from(beta[c]) - f64::from(mean[c]) * s);
        }
        Ok((scale, shift))
    }
}

/// An output tensor while planning.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    source: String,
    recipe: Recipe,
    changed: bool,
}

/// The model as the stages planned so far have left it.
struct Model {
    entries: Vec<Entry>,
    /// Input tensors that are not floating point (copied through only).
    not_float: std::collections::HashSet<String>,
}

impl Model {
    fn read(src: &dyn TensorSource) -> Result<Self, StructuralError> {
        let mut entries = Vec::new();
        let mut not_float = std::collections::HashSet::new();
        for name in src.names() {
            let shape = src
                .shape(&name)
                .ok_or_else(|| StructuralError::MissingTensor(name.clone()))?;
            // Every later shape is a part of an input shape, so checking the
            // input shapes once makes all later element counts safe.
            if shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .is_none()
            {
                return Err(StructuralError::Shape {
                    tensor: name,
                    shape,
                    reason: "its element count overflows".into(),
                });
            }
            if !src.is_float(&name) {
                not_float.insert(name.clone());
            }
            entries.push(Entry {
                source: name.clone(),
                recipe: Recipe::load(&name, shape),
                name,
                changed: false,
            });
        }
        Ok(Model { entries, not_float })
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }

    fn get(&self, name: &str) -> Option<&Entry> {
        self.position(name).map(|i| &self.entries[i])
    }

    fn shape_error(&self, i: usize, reason: String) -> StructuralError {
        StructuralError::Shape {
            tensor: self.entries[i].name.clone(),
            shape: self.entries[i].recipe.shape.clone(),
            reason,
        }
    }

    /// Replaces the recipe of entry `i`, which must be floating point.
    fn rewrite(
        &mut self,
        i: usize,
        op: impl FnOnce(Box<Recipe>) -> Recipe,
    ) -> Result<(), StructuralError> {
        let e = &mut self.entries[i];
        if self.not_float.contains(&e.source) {
            return Err(StructuralError::NotFloat(e.name.clone()));
        }
        let old = std::mem::replace(&mut e.recipe, Recipe::load("", Vec::new()));
        e.recipe = op(Box::new(old));
        e.changed = true;
        Ok(())
    }

    /// The index of `<layer>.weight`, checked to be a layer weight.
    fn layer_weight(&self, layer: &str) -> Result<usize, StructuralError> {
        let name = format!("{layer}.weight");
        let i = self.position(&name).ok_or_else(|| StructuralError::Layer {
            layer: layer.to_string(),
            reason: format!("there is no tensor `{name}`"),
        })?;
        if self.entries[i].recipe.shape.len() < 2 {
            return Err(self.shape_error(
                i,
                "a layer weight needs at least 2 dimensions (output channels first)".into(),
            ));
        }
        Ok(i)
    }

    fn is_batch_norm(&self, prefix: &str) -> bool {
        self.get(&format!("{prefix}.running_mean")).is_some()
    }

    /// Batch-norm prefixes, in checkpoint order.
    fn batch_norms(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| e.name.strip_suffix(".running_mean"))
            .map(str::to_string)
            .collect()
    }

    /// The number of channels of batch norm `bn`, checking that its vectors
    /// agree.
    fn batch_norm_channels(&self, bn: &str) -> Result<usize, StructuralError> {
        let bad = |reason: String| StructuralError::BatchNorm {
            bn: bn.to_string(),
            reason,
        };
        let mean = self
            .get(&format!("{bn}.running_mean"))
            .ok_or_else(|| bad("there is no running_mean".into()))?;
        if mean.recipe.shape.len() != 1 {
            return Err(bad(format!(
                "running_mean has shape {:?}, not one dimension",
                mean.recipe.shape
            )));
        }
        let channels = mean.recipe.shape[0];
        if self.get(&format!("{bn}.running_var")).is_none() {
            return Err(bad("there is no running_var".into()));
        }
        for part in BN_VECTORS {
            if let Some(e) = self.get(&format!("{bn}.{part}")) {
                if e.recipe.shape != [channels] {
                    return Err(bad(format!(
                        "{part} has shape {:?}, running_mean has {channels} channels",
                        e.recipe.shape
                    )));
                }
            }
        }
        Ok(channels)
    }

    /// The layer right before batch norm `bn` in checkpoint order: the tensor
    /// before its first tensor is `<p>.weight`, or `<p>.bias` preceded by
    /// `<p>.weight`.
    fn layer_before(&self, bn: &str) -> Result<String, String> {
        let first = self
            .entries
            .iter()
            .position(|e| {
                e.name
                    .strip_prefix(bn)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|part| BN_PARTS.contains(&part))
            })
            .ok_or_else(|| "it has no tensors".to_string())?;
        let Some(prev) = first.checked_sub(1).map(|j| &self.entries[j]) else {
            return Err("no tensor comes before it".into());
        };
        let is_layer_weight = |e: &Entry, layer: &str| {
            e.name.strip_suffix(".weight") == Some(layer) && e.recipe.shape.len() >= 2
        };
        if let Some(layer) = prev.name.strip_suffix(".weight") {
            if is_layer_weight(prev, layer) {
                return Ok(layer.to_string());
            }
        }
        if let Some(layer) = prev.name.strip_suffix(".bias") {
            if first >= 2 && is_layer_weight(&self.entries[first - 2], layer) {
                return Ok(layer.to_string());
            }
        }
        Err(format!(
            "the tensor before it, `{}`, is not a layer's weight or bias",
            prev.name
        ))
    }

    /// The batch norm's vectors as they stand now.
    fn batch_norm_recipes(&self, bn: &str) -> Result<BatchNorm, StructuralError> {
        let recipe = |part: &str| -> Result<Option<Recipe>, StructuralError> {
            match self.position(&format!("{bn}.{part}")) {
                None => Ok(None),
                Some(i) if self.not_float.contains(&self.entries[i].source) => {
                    Err(StructuralError::NotFloat(self.entries[i].name.clone()))
                }
                Some(i) => Ok(Some(self.entries[i].recipe.clone())),
            }
        };
        let required = |part: &str| {
            recipe(part)?.ok_or_else(|| StructuralError::MissingTensor(format!("{bn}.{part}")))
        };
        Ok(BatchNorm {
            name: bn.to_string(),
            gamma: recipe("weight")?,
            beta: recipe("bias")?,
            mean: required("running_mean")?,
            var: required("running_var")?,
        })
    }

    fn fold_batch_norms(&mut self, stage: &FoldBatchNorm) -> Result<(), StructuralError> {
        let pairs = match &stage.pairs {
            Some(pairs) => pairs.clone(),
            None => self.infer_fold_pairs()?,
        };
        for (layer, bn) in &pairs {
            self.fold_one(layer, bn)?;
        }
        Ok(())
    }

    fn infer_fold_pairs(&self) -> Result<Vec<(String, String)>, StructuralError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for bn in self.batch_norms() {
            let channels = self.batch_norm_channels(&bn)?;
            let unpaired = |reason: String| StructuralError::UnpairedBatchNorm {
                bn: bn.clone(),
                reason,
            };
            let layer = self.layer_before(&bn).map_err(unpaired)?;
            let w = self.layer_weight(&layer)?;
            let out = self.entries[w].recipe.shape[0];
            if out != channels {
                return Err(unpaired(format!(
                    "it has {channels} channels but the layer before it, `{layer}`, has {out} outputs"
                )));
            }
            if let Some((_, other)) = pairs.iter().find(|(l, _)| *l == layer) {
                return Err(unpaired(format!(
                    "layer `{layer}` is already paired with `{other}`"
                )));
            }
            pairs.push((layer, bn));
        }
        Ok(pairs)
    }

    fn fold_one(&mut self, layer: &str, bn: &str) -> Result<(), StructuralError> {
        let channels = self.batch_norm_channels(bn)?;
        let w = self.layer_weight(layer)?;
        let out = self.entries[w].recipe.shape[0];
        if out != channels {
            return Err(self.shape_error(
                w,
                format!("it has {out} output channels but batch norm `{bn}` has {channels}"),
            ));
        }
        let norm = Arc::new(self.batch_norm_recipes(bn)?);
        let bias_name = format!("{layer}.bias");
        let bias = self.position(&bias_name);
        if let Some(b) = bias {
            if self.entries[b].recipe.shape != [channels] {
                return Err(self.shape_error(
                    b,
                    format!("a bias for {channels} channels needs shape [{channels}]"),
                ));
            }
        }
        let n = Arc::clone(&norm);
        self.rewrite(w, |of| Recipe {
            shape: of.shape.clone(),
            op: Op::FoldWeight { of, bn: n },
        })?;
        match bias {
            Some(b) => self.rewrite(b, |of| Recipe {
                shape: of.shape.clone(),
                op: Op::FoldBias {
                    of: Some(of),
                    bn: norm,
                },
            })?,
            None => {
                let source = self.entries[w].source.clone();
                self.entries.insert(
                    w + 1,
                    Entry {
                        name: bias_name,
                        source,
                        recipe: Recipe {
                            shape: vec![channels],
                            op: Op::FoldBias { of: None, bn: norm },
                        },
                        changed: true,
                    },
                );
            }
        }
        self.entries.retain(|e| {
            !e.name
                .strip_prefix(bn)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|part| BN_PARTS.contains(&part))
        });
        Ok(())
    }

    fn prune_channels(
        &mut self,
        stage: &ChannelPrune,
        src: &dyn TensorSource,
    ) -> Result<(), StructuralError> {
        let groups = match &stage.groups {
            Some(groups) => groups.clone(),
            None => self.infer_channel_groups()?,
        };
        for (i, g) in groups.iter().enumerate() {
            if groups[..i].iter().any(|h| h.producer == g.producer) {
                return Err(StructuralError::Layer {
                    layer: g.producer.clone(),
                    reason: "it is the producer of two channel groups".into(),
                });
            }
        }
        for g in &groups {
            self.prune_group(g, stage, src)?;
        }
        Ok(())
    }

    /// Layer weights in checkpoint order; each feeds the next, the last one
    /// (the classifier) is only a consumer.
    ///
    /// Shapes alone cannot show a branch (a residual sum, attention), so the
    /// inference also refuses a model holding anything besides layers,
    /// their biases and batch norms that follow their layer: a layer norm
    /// or a batch norm away from its layer means the model may not be a
    /// plain chain, and guessing would silently break it.
    fn infer_channel_groups(&self) -> Result<Vec<ChannelGroup>, StructuralError> {
        let norms = self.batch_norms();
        for bn in &norms {
            if let Err(reason) = self.layer_before(bn) {
                return Err(StructuralError::UnpairedBatchNorm {
                    bn: bn.clone(),
                    reason,
                });
            }
        }
        for e in &self.entries {
            let is_layer_part = |suffix: &str| {
                e.name.strip_suffix(suffix).is_some_and(|layer| {
                    self.get(&format!("{layer}.weight"))
                        .is_some_and(|w| w.recipe.shape.len() >= 2)
                })
            };
            let is_norm_part = norms.iter().any(|bn| {
                e.name
                    .strip_prefix(bn.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|part| BN_PARTS.contains(&part))
            });
            if !(is_layer_part(".weight") || is_layer_part(".bias") || is_norm_part) {
                return Err(StructuralError::NotChained {
                    tensor: e.name.clone(),
                    reason: "it is neither a layer's weight or bias nor a batch norm's".into(),
                });
            }
        }
        let layers: Vec<(&str, &[usize])> = self
            .entries
            .iter()
            .filter(|e| e.recipe.shape.len() >= 2 && !self.not_float.contains(&e.source))
            .filter_map(|e| Some((e.name.strip_suffix(".weight")?, e.recipe.shape.as_slice())))
            .collect();
        if layers.len() < 2 {
            return Err(StructuralError::NotChained {
                tensor: layers.first().map_or("", |l| l.0).to_string(),
                reason: format!(
                    "channel pruning needs at least two layers, found {}",
                    layers.len()
                ),
            });
        }
        let mut groups = Vec::with_capacity(layers.len() - 1);
        for pair in layers.windows(2) {
            let ((producer, p_shape), (consumer, c_shape)) = (pair[0], pair[1]);
            let (out, input) = (p_shape[0], c_shape[1]);
            let flatten = p_shape.len() > 2 && c_shape.len() == 2 && out > 0 && input % out == 0;
            if input != out && !flatten {
                return Err(StructuralError::NotChained {
                    tensor: format!("{consumer}.weight"),
                    reason: format!(
                        "its input dimension {input} does not match the {out} outputs of `{producer}.weight`"
                    ),
                });
            }
            groups.push(ChannelGroup {
                producer: producer.to_string(),
                consumers: vec![consumer.to_string()],
            });
        }
        Ok(groups)
    }

    fn prune_group(
        &mut self,
        group: &ChannelGroup,
        stage: &ChannelPrune,
        src: &dyn TensorSource,
    ) -> Result<(), StructuralError> {
        let producer = group.producer.as_str();
        let w = self.layer_weight(producer)?;
        if self.not_float.contains(&self.entries[w].source) {
            return Err(StructuralError::NotFloat(self.entries[w].name.clone()));
        }
        let out = self.entries[w].recipe.shape[0];

        // Everything that indexes the producer's channels, checked before
        // anything is rewritten.
        let mut rows = vec![w];
        if let Some(b) = self.position(&format!("{producer}.bias")) {
            if self.entries[b].recipe.shape != [out] {
                return Err(self.shape_error(
                    b,
                    format!("the bias of a layer with {out} outputs needs shape [{out}]"),
                ));
            }
            rows.push(b);
        }
        let mut norms: Vec<String> = group
            .consumers
            .iter()
            .filter(|c| self.is_batch_norm(c))
            .cloned()
            .collect();
        for bn in self.batch_norms() {
            if !norms.contains(&bn) && self.layer_before(&bn).as_deref() == Ok(producer) {
                norms.push(bn);
            }
        }
        for bn in &norms {
            let channels = self.batch_norm_channels(bn)?;
            if channels != out {
                return Err(StructuralError::BatchNorm {
                    bn: bn.clone(),
                    reason: format!(
                        "it has {channels} channels but `{producer}` has {out} outputs"
                    ),
                });
            }
            rows.extend(
                BN_VECTORS
                    .iter()
                    .filter_map(|p| self.position(&format!("{bn}.{p}"))),
            );
        }
        let mut cols = Vec::new();
        for consumer in group.consumers.iter().filter(|c| !self.is_batch_norm(c)) {
            let c = self.layer_weight(consumer)?;
            let shape = &self.entries[c].recipe.shape;
            let input = shape[1];
            let block = input.checked_div(out).unwrap_or(0);
            let flatten = shape.len() == 2;
            if block == 0 || !input.is_multiple_of(out) || (block > 1 && !flatten) {
                return Err(self.shape_error(
                    c,
                    format!(
                        "its input dimension {input} does not read the {out} outputs of `{producer}` (equal, or a multiple for a flattened linear layer)"
                    ),
                ));
            }
            cols.push((c, block));
        }

        let dropped = ((stage.sparsity * out as f64).round() as usize).min(out.saturating_sub(1));
        if dropped == 0 {
            return Ok(());
        }
        let strength = channel_norms(&self.entries[w].recipe.eval(src)?, out, stage.norm);
        let keep: Arc<[usize]> = channels_kept(&strength, dropped).into();

        let kept = keep.len();
        for i in rows {
            let k = Arc::clone(&keep);
            self.rewrite(i, |of| {
                let mut shape = of.shape.clone();
                shape[0] = kept;
                Recipe {
                    shape,
                    op: Op::Rows { of, keep: k },
                }
            })?;
        }
        for (c, block) in cols {
            let k = Arc::clone(&keep);
            self.rewrite(c, |of| {
                let mut shape = of.shape.clone();
                shape[1] = kept * block;
                Recipe {
                    shape,
                    op: Op::Cols { of, keep: k, block },
                }
            })?;
        }
        Ok(())
    }
}

/// L1 or L2 norm of each of the `out` rows (squared L2: same order, no
/// square root). A NaN norm ranks as the strongest, so its channel is kept.
fn channel_norms(weights: &[f32], out: usize, norm: Norm) -> Vec<f64> {
    let row_len = weights.len() / out.max(1);
    if row_len == 0 {
        return vec![0.0; out];
    }
    weights
        .par_chunks(row_len)
        .map(|row| {
            let n: f64 = match norm {
                Norm::L1 => row.iter().map(|&w| f64::from(w).abs()).sum(),
                Norm::L2 => row.iter().map(|&w| f64::from(w).powi(2)).sum(),
            };
            if n.is_nan() {
                f64::INFINITY
            } else {
                n
            }
        })
        .collect()
}

/// The channels left after dropping the `dropped` weakest (ties: the lower
/// index goes first), in ascending order.
fn channels_kept(strength: &[f64], dropped: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..strength.len()).collect();
    order.sort_by(|&a, &b| strength[a].total_cmp(&strength[b]).then(a.cmp(&b)));
    let mut keep = order.split_off(dropped);
    keep.sort_unstable();
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory checkpoint.
    #[derive(Debug, Default, Clone)]
    struct Mem {
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
        ints: Vec<String>,
    }

    impl Mem {
        fn add(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> &mut Self {
            assert_eq!(values.len(), element_count(shape), "{name}");
            self.tensors.push((name.into(), shape.to_vec(), values));
            self
        }

        fn add_int(&mut self, name: &str) -> &mut Self {
            self.ints.push(name.into());
            self.add(name, &[], vec![7.0])
        }

        fn find(&self, name: &str) -> Option<&(String, Vec<usize>, Vec<f32>)> {
            self.tensors.iter().find(|t| t.0 == name)
        }

        fn values(&self, name: &str) -> Option<&[f32]> {
            self.find(name).map(|t| t.2.as_slice())
        }

        fn dims(&self, name: &str) -> &[usize] {
            &self.find(name).unwrap_or_else(|| panic!("no `{name}`")).1
        }

        /// The checkpoint a plan writes.
        fn after(&self, plan: &Plan) -> Mem {
            let mut out = Mem::default();
            for t in &plan.outputs {
                let values = plan.materialize(&t.name, self).unwrap();
                out.add(&t.name, &t.shape, values);
            }
            out.ints = self.ints.clone();
            out
        }

        /// The same tensors with name prefixes replaced.
        fn renamed(&self, map: &[(&str, &str)]) -> Mem {
            let rename = |name: &str| {
                map.iter()
                    .find_map(|(from, to)| {
                        Some(format!("{to}.{}", name.strip_prefix(&format!("{from}."))?))
                    })
                    .unwrap_or_else(|| name.to_string())
            };
            Mem {
                tensors: self
                    .tensors
                    .iter()
                    .map(|(n, s, v)| (rename(n), s.clone(), v.clone()))
                    .collect(),
                ints: self.ints.iter().map(|n| rename(n)).collect(),
            }
        }
    }

    impl TensorSource for Mem {
        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            self.find(name).map(|t| t.1.clone())
        }
        fn names(&self) -> Vec<String> {
            self.tensors.iter().map(|t| t.0.clone()).collect()
        }
        fn is_float(&self, name: &str) -> bool {
            !self.ints.iter().any(|n| n == name)
        }
        fn load_f32(&self, name: &str) -> Result<Vec<f32>, StructuralError> {
            self.values(name)
                .map(<[f32]>::to_vec)
                .ok_or_else(|| StructuralError::MissingTensor(name.into()))
        }
    }

    /// Deterministic values in [-0.5, 0.5).
    fn det(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729 + 13) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    fn zero_row(v: &mut [f32], rows: usize, row: usize) {
        let len = v.len() / rows;
        v[row * len..(row + 1) * len].fill(0.0);
    }

    // A small reference forward pass.

    fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, out: usize) -> Vec<f32> {
        let inputs = x.len();
        assert_eq!(w.len(), out * inputs);
        (0..out)
            .map(|o| {
                let dot: f32 = (0..inputs).map(|i| w[o * inputs + i] * x[i]).sum();
                dot + b.map_or(0.0, |b| b[o])
            })
            .collect()
    }

    /// Valid (unpadded), stride 1; `x` is channels × h × w.
    fn conv2d(
        x: &[f32],
        hw: (usize, usize),
        w: &[f32],
        shape: &[usize],
        b: Option<&[f32]>,
    ) -> (Vec<f32>, (usize, usize)) {
        let (o, c, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
        let (h, wd) = hw;
        assert_eq!(x.len(), c * h * wd);
        let (oh, ow) = (h - kh + 1, wd - kw + 1);
        let mut out = vec![0f32; o * oh * ow];
        for oc in 0..o {
            for y in 0..oh {
                for xx in 0..ow {
                    let mut s = b.map_or(0.0, |b| b[oc]);
                    for ic in 0..c {
                        for dy in 0..kh {
                            for dx in 0..kw {
                                s += w[((oc * c + ic) * kh + dy) * kw + dx]
                                    * x[(ic * h + y + dy) * wd + xx + dx];
                            }
                        }
                    }
                    out[(oc * oh + y) * ow + xx] = s;
                }
            }
        }
        (out, (oh, ow))
    }

    fn batch_norm_eval(x: &mut [f32], m: &Mem, bn: &str) {
        let mean = m.values(&format!("{bn}.running_mean")).unwrap();
        let var = m.values(&format!("{bn}.running_var")).unwrap();
        let gamma = m.values(&format!("{bn}.weight")).unwrap();
        let beta = m.values(&format!("{bn}.bias")).unwrap();
        let spatial = x.len() / mean.len();
        for (c, plane) in x.chunks_mut(spatial).enumerate() {
            for v in plane {
                *v = (*v - mean[c]) / (var[c] + 1e-5).sqrt() * gamma[c] + beta[c];
            }
        }
    }

    fn relu(mut x: Vec<f32>) -> Vec<f32> {
        x.iter_mut().for_each(|v| *v = v.max(0.0));
        x
    }

    fn dense(m: &Mem, layer: &str, x: &[f32]) -> Vec<f32> {
        let w = format!("{layer}.weight");
        linear(
            x,
            m.values(&w).unwrap(),
            m.values(&format!("{layer}.bias")),
            m.dims(&w)[0],
        )
    }

    /// fc1 → relu → fc2 → relu → fc3; every layer's output.
    fn mlp_forward(m: &Mem, x: &[f32]) -> Vec<Vec<f32>> {
        let h1 = relu(dense(m, "fc1", x));
        let h2 = relu(dense(m, "fc2", &h1));
        let out = dense(m, "fc3", &h2);
        vec![h1, h2, out]
    }

    /// conv1 → bn1 (when present) → relu → conv2 → relu → flatten → fc1 →
    /// relu → fc2, on a 2 × 6 × 6 input; every stage's output.
    fn convnet_forward(m: &Mem, x: &[f32]) -> Vec<Vec<f32>> {
        let conv = |layer: &str, x: &[f32], hw| {
            let w = format!("{layer}.weight");
            conv2d(
                x,
                hw,
                m.values(&w).unwrap(),
                m.dims(&w),
                m.values(&format!("{layer}.bias")),
            )
        };
        let (mut a1, hw) = conv("conv1", x, (6, 6));
        if m.find("bn1.running_mean").is_some() {
            batch_norm_eval(&mut a1, m, "bn1");
        }
        let a1 = relu(a1);
        let (a2, _) = conv("conv2", &a1, hw);
        let a2 = relu(a2);
        let a3 = relu(dense(m, "fc1", &a2));
        let out = dense(m, "fc2", &a3);
        vec![a1, a2, a3, out]
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        if let Some(i) =
            (0..got.len()).find(|&i| (got[i] - want[i]).abs() > tol * (1.0 + want[i].abs()))
        {
            panic!(
                "{what}: first difference at index {i}: got {} want {} (tolerance {tol})",
                got[i], want[i]
            );
        }
    }

    /// Entries `keep` of each block of `block` values, per channel.
    fn channels(x: &[f32], count: usize, keep: &[usize]) -> Vec<f32> {
        let block = x.len() / count;
        keep.iter()
            .flat_map(|&c| x[c * block..(c + 1) * block].to_vec())
            .collect()
    }

    /// An MLP 6 → 8 → 4 → 3 whose hidden neurons 2 and 5 (fc1) and 3 (fc2)
    /// are dead: zero weights and zero bias.
    fn mlp() -> Mem {
        let mut w1 = det(48, 1);
        let mut b1 = det(8, 2);
        for r in [2, 5] {
            zero_row(&mut w1, 8, r);
            b1[r] = 0.0;
        }
        let mut w2 = det(32, 3);
        let mut b2 = det(4, 4);
        zero_row(&mut w2, 4, 3);
        b2[3] = 0.0;
        let mut m = Mem::default();
        m.add("fc1.weight", &[8, 6], w1)
            .add("fc1.bias", &[8], b1)
            .add("fc2.weight", &[4, 8], w2)
            .add("fc2.bias", &[4], b2)
            .add("fc3.weight", &[3, 4], det(12, 5))
            .add("fc3.bias", &[3], det(3, 6));
        m
    }

    /// conv1 [4,2,3,3] (no bias) → bn1 → conv2 [4,4,3,3] → fc1 [4, 4·2·2] →
    /// fc2 [2,4], in PyTorch state-dict order. Dead: conv1 channel 1 (zero
    /// weights, the norm shifts it below zero), conv2 channel 2 (zero
    /// weights, negative bias), fc1 neuron 0.
    fn convnet() -> Mem {
        let mut w1 = det(72, 7);
        zero_row(&mut w1, 4, 1);
        let gamma: Vec<f32> = det(4, 8).iter().map(|v| 0.75 + v).collect();
        let mut beta = det(4, 9);
        beta[1] = -0.5;
        let mut mean: Vec<f32> = det(4, 10).iter().map(|v| v * 0.2).collect();
        mean[1] = 0.0;
        let var: Vec<f32> = det(4, 11).iter().map(|v| 0.6 + v).collect();
        let mut w2 = det(144, 12);
        zero_row(&mut w2, 4, 2);
        let mut b2 = det(4, 13);
        b2[2] = -0.1;
        let mut w3 = det(64, 14);
        zero_row(&mut w3, 4, 0);
        let mut b3 = det(4, 15);
        b3[0] = 0.0;
        let mut m = Mem::default();
        m.add("conv1.weight", &[4, 2, 3, 3], w1)
            .add("bn1.weight", &[4], gamma)
            .add("bn1.bias", &[4], beta)
            .add("bn1.running_mean", &[4], mean)
            .add("bn1.running_var", &[4], var)
            .add_int("bn1.num_batches_tracked")
            .add("conv2.weight", &[4, 4, 3, 3], w2)
            .add("conv2.bias", &[4], b2)
            .add("fc1.weight", &[4, 16], w3)
            .add("fc1.bias", &[4], b3)
            .add("fc2.weight", &[2, 4], det(8, 16))
            .add("fc2.bias", &[2], det(2, 17));
        m
    }

    fn prune_stage(sparsity: f64) -> StructuralStage {
        StructuralStage::Channel(ChannelPrune {
            sparsity,
            norm: Norm::L1,
            groups: None,
        })
    }

    fn fold_stage() -> StructuralStage {
        StructuralStage::Fold(FoldBatchNorm { pairs: None })
    }

    fn group(producer: &str, consumers: &[&str]) -> ChannelGroup {
        ChannelGroup {
            producer: producer.into(),
            consumers: consumers.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn shapes(plan: &Plan) -> Vec<(&str, Vec<usize>, bool)> {
        plan.outputs
            .iter()
            .map(|t| (t.name.as_str(), t.shape.clone(), t.changed))
            .collect()
    }

    const MLP_INPUT: [f32; 6] = [0.3, -1.2, 0.8, 2.0, -0.4, 1.1];

    fn image() -> Vec<f32> {
        det(72, 99).iter().map(|v| v * 4.0).collect()
    }

    #[test]
    fn pruning_dead_mlp_neurons_keeps_the_output_and_the_kept_activations() {
        let m = mlp();
        let plan = plan(&[prune_stage(0.25)], &m).unwrap();
        assert_eq!(
            shapes(&plan),
            vec![
                ("fc1.weight", vec![6, 6], true),
                ("fc1.bias", vec![6], true),
                ("fc2.weight", vec![3, 6], true),
                ("fc2.bias", vec![3], true),
                ("fc3.weight", vec![3, 3], true),
                ("fc3.bias", vec![3], false),
            ]
        );
        let before = mlp_forward(&m, &MLP_INPUT);
        let after = mlp_forward(&m.after(&plan), &MLP_INPUT);
        assert!(
            before.iter().all(|a| a.iter().any(|&v| v != 0.0)),
            "the test network is alive"
        );
        assert_eq!(
            after[0],
            channels(&before[0], 8, &[0, 1, 3, 4, 6, 7]),
            "fc1 activations"
        );
        assert_close(
            &after[1],
            &channels(&before[1], 4, &[0, 1, 2]),
            1e-6,
            "fc2 activations",
        );
        assert_close(&after[2], &before[2], 1e-6, "output");
    }

    #[test]
    fn pruning_dead_channels_of_a_convnet_keeps_the_output_through_norm_and_flatten() {
        let m = convnet();
        let plan = plan(&[prune_stage(0.25)], &m).unwrap();
        assert_eq!(
            shapes(&plan),
            vec![
                ("conv1.weight", vec![3, 2, 3, 3], true),
                ("bn1.weight", vec![3], true),
                ("bn1.bias", vec![3], true),
                ("bn1.running_mean", vec![3], true),
                ("bn1.running_var", vec![3], true),
                ("bn1.num_batches_tracked", vec![], false),
                ("conv2.weight", vec![3, 3, 3, 3], true),
                ("conv2.bias", vec![3], true),
                ("fc1.weight", vec![3, 12], true),
                ("fc1.bias", vec![3], true),
                ("fc2.weight", vec![2, 3], true),
                ("fc2.bias", vec![2], false),
            ]
        );
        let x = image();
        let before = convnet_forward(&m, &x);
        let after = convnet_forward(&m.after(&plan), &x);
        assert!(
            before.iter().all(|a| a.iter().any(|&v| v != 0.0)),
            "the test network is alive"
        );
        assert_eq!(
            after[0],
            channels(&before[0], 4, &[0, 2, 3]),
            "conv1 activations"
        );
        assert_close(
            &after[1],
            &channels(&before[1], 4, &[0, 1, 3]),
            1e-6,
            "conv2 activations",
        );
        assert_close(
            &after[2],
            &channels(&before[2], 4, &[1, 2, 3]),
            1e-6,
            "fc1 activations",
        );
        assert_close(&after[3], &before[3], 1e-6, "output");
    }

    #[test]
    fn folding_batch_norm_keeps_the_output_and_creates_the_bias_after_the_weight() {
        let m = convnet();
        let plan = plan(&[fold_stage()], &m).unwrap();
        assert_eq!(
            shapes(&plan),
            vec![
                ("conv1.weight", vec![4, 2, 3, 3], true),
                ("conv1.bias", vec![4], true),
                ("conv2.weight", vec![4, 4, 3, 3], false),
                ("conv2.bias", vec![4], false),
                ("fc1.weight", vec![4, 16], false),
                ("fc1.bias", vec![4], false),
                ("fc2.weight", vec![2, 4], false),
                ("fc2.bias", vec![2], false),
            ]
        );
        assert_eq!(plan.outputs[1].source, "conv1.weight");
        let x = image();
        let before = convnet_forward(&m, &x);
        let after = convnet_forward(&m.after(&plan), &x);
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            assert_close(a, b, 1e-4, &format!("stage {i}"));
        }
    }

    #[test]
    fn folding_and_channel_pruning_compose_in_either_order() {
        let m = convnet();
        let x = image();
        let before = convnet_forward(&m, &x);
        for stages in [
            [fold_stage(), prune_stage(0.25)],
            [prune_stage(0.25), fold_stage()],
        ] {
            let plan = plan(&stages, &m).unwrap();
            let names: Vec<&str> = plan.outputs.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names[..3], ["conv1.weight", "conv1.bias", "conv2.weight"]);
            assert_eq!(plan.outputs[0].shape, [3, 2, 3, 3]);
            assert_eq!(plan.outputs[1].shape, [3]);
            let after = convnet_forward(&m.after(&plan), &x);
            assert_close(
                &after[0],
                &channels(&before[0], 4, &[0, 2, 3]),
                1e-4,
                "conv1 activations",
            );
            assert_close(&after[3], &before[3], 1e-4, "output");
        }
    }

    #[test]
    fn pairs_are_inferred_from_sequential_names_with_the_bias_before_the_weight() {
        // Alphabetical order, as torch's safetensors writer lays tensors out.
        let mut m = convnet();
        m.add("conv1.bias", &[4], det(4, 20));
        let map = [
            ("conv1", "features.0"),
            ("bn1", "features.1"),
            ("conv2", "features.3"),
        ];
        let mut src = m.renamed(&map);
        src.tensors.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(src.tensors[4].0, "features.0.bias");
        let fold = Model::read(&src).unwrap().infer_fold_pairs().unwrap();
        assert_eq!(
            fold,
            vec![("features.0".to_string(), "features.1".to_string())]
        );

        let plan = plan(&[fold_stage()], &src).unwrap();
        assert!(plan
            .outputs
            .iter()
            .all(|t| !t.name.starts_with("features.1.")));
        let back: Vec<(&str, &str)> = map.iter().map(|&(a, b)| (b, a)).collect();
        let x = image();
        let after = convnet_forward(&src.after(&plan).renamed(&back), &x);
        assert_close(&after[3], &convnet_forward(&m, &x)[3], 1e-4, "output");
    }

    #[test]
    fn groups_are_inferred_for_a_chain_and_the_classifier_is_not_pruned() {
        let m = convnet();
        let groups = Model::read(&m).unwrap().infer_channel_groups().unwrap();
        assert_eq!(
            groups,
            vec![
                group("conv1", &["conv2"]),
                group("conv2", &["fc1"]),
                group("fc1", &["fc2"])
            ]
        );
    }

    #[test]
    fn explicit_groups_override_inference_and_may_name_the_norm() {
        // With the norm ahead of its layer nothing can be inferred, but an
        // explicit group and pair still work.
        let mut m = convnet();
        let bn: Vec<_> = m.tensors.drain(1..6).collect();
        m.tensors.splice(0..0, bn);
        let stages = [
            StructuralStage::Channel(ChannelPrune {
                sparsity: 0.25,
                norm: Norm::L1,
                groups: Some(vec![group("conv1", &["bn1", "conv2"])]),
            }),
            StructuralStage::Fold(FoldBatchNorm {
                pairs: Some(vec![("conv1".into(), "bn1".into())]),
            }),
        ];
        let plan = plan(&stages, &m).unwrap();
        assert_eq!(
            shapes(&plan)[..4],
            [
                ("conv1.weight", vec![3, 2, 3, 3], true),
                ("conv1.bias", vec![3], true),
                ("conv2.weight", vec![4, 3, 3, 3], true),
                ("conv2.bias", vec![4], false),
            ]
        );
        assert_eq!(shapes(&plan)[4], ("fc1.weight", vec![4, 16], false));
        let x = image();
        let after = convnet_forward(&m.after(&plan), &x);
        assert_close(&after[3], &convnet_forward(&m, &x)[3], 1e-4, "output");
    }

    #[test]
    fn the_weakest_channels_go_by_the_chosen_norm_and_ties_drop_the_lower_index() {
        // Row 0 = [3, 4]: L1 7, L2 5. Row 1 = [5, 0.5]: L1 5.5, L2 ≈ 5.02.
        let mut m = Mem::default();
        m.add("a.weight", &[2, 2], vec![3.0, 4.0, 5.0, 0.5]).add(
            "b.weight",
            &[1, 2],
            vec![1.0, 2.0],
        );
        for (norm, kept_row) in [(Norm::L1, [3.0, 4.0]), (Norm::L2, [5.0, 0.5])] {
            let stage = StructuralStage::Channel(ChannelPrune {
                sparsity: 0.5,
                norm,
                groups: None,
            });
            let plan = plan(&[stage], &m).unwrap();
            assert_eq!(
                plan.materialize("a.weight", &m).unwrap(),
                kept_row,
                "{norm:?}"
            );
        }
        assert_eq!(channels_kept(&[1.0, 1.0, 2.0, 1.0], 2), vec![2, 3]);
        assert_eq!(channels_kept(&[1.0, f64::INFINITY, 0.0], 2), vec![1]);
    }

    #[test]
    fn at_least_one_channel_is_kept() {
        let m = mlp();
        let plan = plan(&[prune_stage(1.0)], &m).unwrap();
        assert_eq!(plan.outputs[0].shape, [1, 6]);
        assert_eq!(plan.outputs[2].shape, [1, 1]);
        assert_eq!(plan.outputs[4].shape, [3, 1]);
    }

    #[test]
    fn a_batch_norm_with_no_layer_before_it_is_named() {
        let mut m = convnet();
        m.tensors.swap(0, 5);
        let e = plan(&[fold_stage()], &m).unwrap_err();
        assert!(
            matches!(&e, StructuralError::UnpairedBatchNorm { bn, .. } if bn == "bn1"),
            "{e}"
        );
        assert!(e.to_string().contains("`bn1`"), "{e}");
    }

    #[test]
    fn a_batch_norm_whose_channels_differ_from_the_layer_before_it_is_named() {
        let mut m = Mem::default();
        m.add("conv.weight", &[4, 1, 1, 1], det(4, 1))
            .add("norm.running_mean", &[3], vec![0.0; 3])
            .add("norm.running_var", &[3], vec![1.0; 3]);
        let e = plan(&[fold_stage()], &m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "batch norm `norm` could not be paired with a layer: it has 3 channels but the layer before it, `conv`, has 4 outputs; give the pairs explicitly"
        );
    }

    #[test]
    fn layers_that_do_not_chain_are_reported_by_tensor() {
        let mut m = mlp();
        m.tensors[2] = ("fc2.weight".into(), vec![4, 7], det(28, 3));
        let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
        assert!(
            matches!(&e, StructuralError::NotChained { tensor, .. } if tensor == "fc2.weight"),
            "{e}"
        );
    }

    #[test]
    fn a_model_that_is_not_a_plain_chain_needs_explicit_groups() {
        let mut m = mlp();
        m.add("norm.weight", &[4], vec![1.0; 4]);
        let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
        assert!(
            matches!(&e, StructuralError::NotChained { tensor, .. } if tensor == "norm.weight"),
            "{e}"
        );

        let mut m = convnet();
        m.tensors.swap(0, 5);
        let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
        assert!(
            matches!(&e, StructuralError::UnpairedBatchNorm { bn, .. } if bn == "bn1"),
            "{e}"
        );
    }

    #[test]
    fn explicit_groups_that_do_not_fit_the_model_are_errors() {
        let m = mlp();
        let with = |g: ChannelGroup| {
            let stage = StructuralStage::Channel(ChannelPrune {
                sparsity: 0.5,
                norm: Norm::L2,
                groups: Some(vec![g]),
            });
            plan(&[stage], &m).unwrap_err().to_string()
        };
        assert_eq!(
            with(group("fc9", &["fc2"])),
            "layer `fc9`: there is no tensor `fc9.weight`"
        );
        assert!(with(group("fc1", &["fc3"])).starts_with("tensor `fc3.weight` has shape [3, 4]: its input dimension 4 does not read the 8 outputs of `fc1`"));
        let pair = StructuralStage::Fold(FoldBatchNorm {
            pairs: Some(vec![("fc1".into(), "bn".into())]),
        });
        assert_eq!(
            plan(&[pair], &m).unwrap_err().to_string(),
            "batch norm `bn`: there is no running_mean"
        );
    }

    #[test]
    fn a_negative_running_variance_is_an_error_when_materializing() {
        let mut m = convnet();
        m.tensors[4].2[2] = -1.0;
        let plan = plan(&[fold_stage()], &m).unwrap();
        let e = plan.materialize("conv1.weight", &m).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("batch norm `bn1`: running_var is -1 at channel 2"),
            "{e}"
        );
    }

    #[test]
    fn a_tensor_shorter_than_its_shape_is_an_error() {
        let mut m = mlp();
        m.tensors[0].2.pop();
        let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tensor `fc1.weight` holds 47 values but its shape [8, 6] needs 48"
        );
    }

    #[test]
    fn an_integer_tensor_is_not_rewritten() {
        let mut m = mlp();
        m.ints.push("fc2.weight".into());
        let stage = StructuralStage::Channel(ChannelPrune {
            sparsity: 0.5,
            norm: Norm::L1,
            groups: Some(vec![group("fc1", &["fc2"])]),
        });
        let e = plan(&[stage], &m).unwrap_err();
        assert!(
            matches!(&e, StructuralError::NotFloat(t) if t == "fc2.weight"),
            "{e}"
        );
    }

    #[test]
    fn no_stages_copy_everything_through() {
        let m = convnet();
        let plan = plan(&[], &m).unwrap();
        assert_eq!(plan.outputs.len(), m.tensors.len());
        assert!(plan
            .outputs
            .iter()
            .all(|t| !t.changed && t.source == t.name));
        assert!(matches!(
            plan.materialize("nope", &m),
            Err(StructuralError::MissingTensor(_))
        ));
    }
}
