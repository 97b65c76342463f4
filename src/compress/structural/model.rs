//! The model while planning: output tensors in checkpoint order and their
//! recipes so far.

use super::*;

/// An output tensor while planning.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) name: String,
    pub(super) source: String,
    pub(super) recipe: Recipe,
    pub(super) changed: bool,
}

/// The model as the stages planned so far have left it.
pub(super) struct Model {
    pub(super) entries: Vec<Entry>,
    /// Input tensors that are not floating point (copied through only).
    pub(super) not_float: std::collections::HashSet<String>,
}

impl Model {
    pub(super) fn read(src: &dyn TensorSource) -> Result<Self, StructuralError> {
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

    pub(super) fn position(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.name == name)
    }

    pub(super) fn get(&self, name: &str) -> Option<&Entry> {
        self.position(name).map(|i| &self.entries[i])
    }

    pub(super) fn shape_error(&self, i: usize, reason: String) -> StructuralError {
        StructuralError::Shape {
            tensor: self.entries[i].name.clone(),
            shape: self.entries[i].recipe.shape.clone(),
            reason,
        }
    }

    /// Replaces the recipe of entry `i`, which must be floating point.
    pub(super) fn rewrite(
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
    pub(super) fn layer_weight(&self, layer: &str) -> Result<usize, StructuralError> {
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
}
