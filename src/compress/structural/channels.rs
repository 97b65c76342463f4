//! Channel pruning: channel groups, ranking by norm, and the rewrite of
//! producers, norms and consumers.

use std::sync::Arc;

use super::*;

impl Model {
    pub(super) fn prune_channels(
        &mut self,
        stage: &ChannelPrune,
        rank_from: Option<&dyn TensorSource>,
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
            self.prune_group(g, stage, rank_from)?;
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
    pub(super) fn infer_channel_groups(&self) -> Result<Vec<ChannelGroup>, StructuralError> {
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

    pub(super) fn prune_group(
        &mut self,
        group: &ChannelGroup,
        stage: &ChannelPrune,
        rank_from: Option<&dyn TensorSource>,
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
        let keep: Arc<[usize]> = match rank_from {
            Some(src) => {
                let strength = channel_norms(&self.entries[w].recipe.eval(src)?, out, stage.norm);
                channels_kept(&strength, dropped).into()
            }
            None => (dropped..out).collect(),
        };

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
pub(super) fn channel_norms(weights: &[f32], out: usize, norm: Norm) -> Vec<f64> {
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
pub(super) fn channels_kept(strength: &[f64], dropped: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..strength.len()).collect();
    order.sort_by(|&a, &b| strength[a].total_cmp(&strength[b]).then(a.cmp(&b)));
    let mut keep = order.split_off(dropped);
    keep.sort_unstable();
    keep
}
