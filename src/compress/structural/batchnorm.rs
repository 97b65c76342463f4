//! Batch-norm folding: pairing norms with layers and folding them in.

use super::*;
use std::sync::Arc;

/// A batch norm's vectors as recipes (they may have been pruned already).
#[derive(Debug)]
pub(super) struct BatchNorm {
    pub(super) name: String,
    pub(super) gamma: Option<Recipe>,
    pub(super) beta: Option<Recipe>,
    pub(super) mean: Recipe,
    pub(super) var: Recipe,
}

impl BatchNorm {
    /// Per channel, `scale = gamma / sqrt(var + eps)` and
    /// `shift = beta - mean * scale`, so that `bn(x) = x * scale + shift`.
    pub(super) fn scale_shift(
        &self,
        src: &dyn TensorSource,
    ) -> Result<(Vec<f64>, Vec<f64>), StructuralError> {
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

impl Model {
    pub(super) fn is_batch_norm(&self, prefix: &str) -> bool {
        self.get(&format!("{prefix}.running_mean")).is_some()
    }

    /// Batch-norm prefixes, in checkpoint order.
    pub(super) fn batch_norms(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| e.name.strip_suffix(".running_mean"))
            .map(str::to_string)
            .collect()
    }

    /// The number of channels of batch norm `bn`, checking that its vectors
    /// agree.
    pub(super) fn batch_norm_channels(&self, bn: &str) -> Result<usize, StructuralError> {
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
    pub(super) fn layer_before(&self, bn: &str) -> Result<String, String> {
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
    pub(super) fn batch_norm_recipes(&self, bn: &str) -> Result<BatchNorm, StructuralError> {
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

    pub(super) fn fold_batch_norms(
        &mut self,
        stage: &FoldBatchNorm,
    ) -> Result<(), StructuralError> {
        let pairs = match &stage.pairs {
            Some(pairs) => pairs.clone(),
            None => self.infer_fold_pairs()?,
        };
        for (layer, bn) in &pairs {
            self.fold_one(layer, bn)?;
        }
        Ok(())
    }

    pub(super) fn infer_fold_pairs(&self) -> Result<Vec<(String, String)>, StructuralError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for bn in self.batch_norms() {
            let channels = self.batch_norm_channels(&bn)?;
            let unpaired = |reason: String| StructuralError::UnpairedBatchNorm {
                bn: bn.clone(),
                reason,
            };
            let outputs = |layer: &str| -> Result<usize, StructuralError> {
                let w = self.layer_weight(layer)?;
                Ok(self.entries[w].recipe.shape[0])
            };
            // The layer its name points to comes first: it holds when the
            // writer sorted tensors by name.
            let named = self
                .layer_named_like(&bn)
                .into_iter()
                .find(|layer| outputs(layer).is_ok_and(|out| out == channels));
            let layer = match named {
                Some(layer) => layer,
                None => {
                    let layer = self.layer_before(&bn).map_err(|reason| {
                        unpaired(format!(
                            "no layer is named like it ({}) and {reason}",
                            NAMING_RULES
                        ))
                    })?;
                    let out = outputs(&layer)?;
                    if out != channels {
                        return Err(unpaired(format!(
                            "it has {channels} channels but the layer before it, `{layer}`, has {out} outputs"
                        )));
                    }
                    layer
                }
            };
            if let Some((_, other)) = pairs.iter().find(|(l, _)| *l == layer) {
                return Err(unpaired(format!(
                    "layer `{layer}` is already paired with `{other}`"
                )));
            }
            pairs.push((layer, bn));
        }
        Ok(pairs)
    }

    /// Layers that batch norm `bn`'s name points to (see [`NAMING_RULES`]),
    /// among those the checkpoint has: a weight of at least two dimensions
    /// that is not itself a batch norm.
    pub(super) fn layer_named_like(&self, bn: &str) -> Vec<String> {
        let (parent, last) = match bn.rsplit_once('.') {
            Some((parent, last)) => (format!("{parent}."), last),
            None => (String::new(), bn),
        };
        let mut candidates = Vec::new();
        if let Ok(n) = last.parse::<usize>() {
            if let Some(previous) = n.checked_sub(1) {
                candidates.push(format!("{parent}{previous}"));
            }
        }
        for norm in ["bn", "norm"] {
            if let Some(suffix) = last.strip_prefix(norm) {
                for layer in ["conv", "fc", "linear"] {
                    candidates.push(format!("{parent}{layer}{suffix}"));
                }
            }
        }
        candidates.retain(|layer| {
            !self.is_batch_norm(layer)
                && self
                    .get(&format!("{layer}.weight"))
                    .is_some_and(|e| e.recipe.shape.len() >= 2)
        });
        candidates
    }

    pub(super) fn fold_one(&mut self, layer: &str, bn: &str) -> Result<(), StructuralError> {
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
}
