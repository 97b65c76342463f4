//! One factor of the dampened Hessian kept from tensor to tensor.
//!
//! Weights that share their input (q/k/v, gate/up) share one `xtx` in the
//! statistics file (its aliases), and so one factor: the Cholesky and the
//! triangular inverse, `O(d³)`, run once for all of them when they come one
//! after the other. The cache holds one factor (`d × d` f32) and drops it as
//! soon as a tensor with other statistics (or none) comes, so it never holds
//! more than the tensor being compressed needs: the run's memory bound
//! (3 × the largest `xtx`) covers `xtx`, the factor and the factorization's
//! second matrix.
//!
//! Tensors are compressed in checkpoint order. Where that order puts
//! another tensor between two that share statistics (safetensors files sort
//! names, so a layer's `k_proj, o_proj, q_proj, v_proj` come in that order),
//! the factor is computed again after it: of q/k/v, k's is computed, o's
//! replaces it, q's is computed again and v reuses it.

use std::sync::{Arc, Mutex};

use super::hessian::{inverse_factor, InverseFactor};
use super::CalibError;

/// See the module documentation. Shared by reference; the lock is held
/// only to look up or replace the entry, never while factoring.
#[derive(Debug, Default)]
pub struct FactorCache {
    slot: Mutex<Option<Entry>>,
}

#[derive(Debug)]
struct Entry {
    key: String,
    damp: u64,
    act_order: bool,
    factor: Arc<InverseFactor>,
}

impl FactorCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Entry>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the factor unless it was made from the statistics `key` (the
    /// statistics' own name, after aliases).
    pub fn keep_only(&self, key: Option<&str>) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|e| Some(e.key.as_str()) != key) {
            *slot = None;
        }
    }

    /// The factor of statistics `key` with any dampening and order, if
    /// held.
    pub(crate) fn any(&self, key: Option<&str>) -> Option<Arc<InverseFactor>> {
        let slot = self.slot();
        slot.as_ref()
            .filter(|e| Some(e.key.as_str()) == key)
            .map(|e| Arc::clone(&e.factor))
    }

    /// Whether a factor is held (for tests).
    pub fn is_empty(&self) -> bool {
        self.slot().is_none()
    }

    /// The factor of `xtx` (statistics `key`, or `None` for statistics
    /// that no other tensor can share) with `damp` and `act_order`: the
    /// held one when it matches, else computed after dropping the held
    /// one, and kept when `key` is known.
    pub(crate) fn factor(
        &self,
        key: Option<&str>,
        xtx: &[f32],
        d: usize,
        damp: f64,
        act_order: bool,
    ) -> Result<Arc<InverseFactor>, CalibError> {
        {
            let mut slot = self.slot();
            if let Some(e) = slot.as_ref() {
                if Some(e.key.as_str()) == key
                    && e.damp == damp.to_bits()
                    && e.act_order == act_order
                    && e.factor.dim() == d
                {
                    return Ok(Arc::clone(&e.factor));
                }
            }
            *slot = None;
        }
        let factor = Arc::new(inverse_factor(xtx, d, damp, act_order)?);
        if let Some(key) = key {
            *self.slot() = Some(Entry {
                key: key.to_string(),
                damp: damp.to_bits(),
                act_order,
                factor: Arc::clone(&factor),
            });
        }
        Ok(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calibrate::testing::{random_xtx, Rng};

    #[test]
    fn one_factor_is_kept_for_the_same_statistics_and_dropped_for_others() {
        let d = 12;
        let xtx = random_xtx(&mut Rng(5), d, 40);
        let cache = FactorCache::new();
        let a = cache.factor(Some("q"), &xtx, d, 0.01, false).unwrap();
        let b = cache.factor(Some("q"), &xtx, d, 0.01, false).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(cache.any(Some("q")).is_some_and(|f| Arc::ptr_eq(&f, &a)));
        assert!(cache.any(Some("o")).is_none());
        // Other parameters: computed again, and replace the held one.
        let c = cache.factor(Some("q"), &xtx, d, 0.1, false).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        let e = cache.factor(Some("q"), &xtx, d, 0.1, true).unwrap();
        assert!(e.act_order() && !Arc::ptr_eq(&c, &e));
        // The same statistics keep it; others, or none, drop it.
        cache.keep_only(Some("q"));
        assert!(!cache.is_empty());
        cache.keep_only(Some("o"));
        assert!(cache.is_empty());
        cache.factor(Some("q"), &xtx, d, 0.01, false).unwrap();
        cache.keep_only(None);
        assert!(cache.is_empty());
        // Statistics without a name are never kept.
        cache.factor(None, &xtx, d, 0.01, false).unwrap();
        assert!(cache.is_empty());
    }
}
