//! The plan: per output tensor a recipe over input tensors, evaluated one
//! tensor at a time.

use super::*;
use std::sync::Arc;

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
    pub(super) recipes: Vec<Recipe>,
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
    let model = planned_model(stages, src, Some(src))?;
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

/// The output tensors [`plan`] gives, without reading any tensor: channel
/// pruning ranks channels by their weights to choose which go, but the
/// shapes depend only on how many go. For checking a pipeline against a
/// checkpoint before running it.
pub fn plan_shapes(
    stages: &[StructuralStage],
    src: &dyn TensorSource,
) -> Result<Vec<PlannedTensor>, StructuralError> {
    let model = planned_model(stages, src, None)?;
    Ok(model
        .entries
        .into_iter()
        .map(|e| PlannedTensor {
            name: e.name,
            source: e.source,
            shape: e.recipe.shape,
            changed: e.changed,
        })
        .collect())
}

/// Runs the stages over the model read from `src`; channel pruning ranks
/// channels with the weights of `rank_from`, or keeps the last ones without
/// reading anything when it is `None`.
fn planned_model(
    stages: &[StructuralStage],
    src: &dyn TensorSource,
    rank_from: Option<&dyn TensorSource>,
) -> Result<Model, StructuralError> {
    let mut model = Model::read(src)?;
    for stage in stages {
        match stage {
            StructuralStage::Fold(fold) => model.fold_batch_norms(fold)?,
            StructuralStage::Channel(prune) => model.prune_channels(prune, rank_from)?,
        }
    }
    Ok(model)
}

/// How an output tensor is computed from input tensors.
#[derive(Debug, Clone)]
pub(super) struct Recipe {
    pub(super) shape: Vec<usize>,
    pub(super) op: Op,
}

#[derive(Debug, Clone)]
pub(super) enum Op {
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

pub(super) fn element_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Recipe {
    pub(super) fn load(name: &str, shape: Vec<usize>) -> Self {
        Recipe {
            shape,
            op: Op::Load(name.to_string()),
        }
    }

    pub(super) fn eval(&self, src: &dyn TensorSource) -> Result<Vec<f32>, StructuralError> {
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
