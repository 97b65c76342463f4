//! Calibration-aware compression: the activation statistics of a weight's
//! inputs turn weight-space objectives into output-space ones.
//!
//! For a weight `W` (`rows × cols`, a conv weight flattened to
//! `[O, C·kh·kw]`) and its inputs `X` (tokens × cols), the output error of
//! a change `ΔW` is `‖ΔW Xᵀ‖² = tr(ΔW H ΔWᵀ)` with `H = XᵀX`. The
//! statistics ([`LayerStats`]) are `in_sum2 = diag H`, `counts` (tokens)
//! and optionally `xtx = H`. The engine receives them as plain arrays; it
//! never runs the model.
//!
//! Methods, each beside a plain reference implementation:
//! - [`sweep`]: GPTQ (integer grid), SparseGPT (mask, optionally with the
//!   grid in the same sweep) and error-compensated sharing (the codebook as
//!   the grid); needs `xtx`.
//! - [`wanda`]: prune by `|W_ij| · sqrt(in_sum2_j / counts)` within each row.
//! - [`crate::compress::quantize::quantize_int_weighted`]: round to nearest
//!   with the MSE scale search weighted by `in_sum2 / counts`.
//! - [`share_weighted`]: k-means minimizing the importance-weighted squared
//!   error.
//! - [`output_error`]: `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`, or its diagonal form
//!   with `in_sum2` only.

mod cache;
mod error;
mod hessian;
mod kmeans;
mod stats;
mod sweep;
#[cfg(test)]
pub(crate) mod testing;
mod wanda;

pub use cache::FactorCache;
pub use error::{output_error, output_error_reference, output_error_with};
pub use hessian::{inverse_factor, InverseFactor};
pub use kmeans::{share_weighted, share_weighted_reference};
pub use stats::{LayerStats, StatsError, XTX_SYMMETRY_TOLERANCE};
pub use sweep::{
    sweep, sweep_factored, sweep_plain, sweep_reference, RoundToStorage, SweepGrid, SweepParams,
    SweepPrune, Swept,
};
pub use wanda::{wanda, wanda_reference};

/// Why a calibrated method could not run on a tensor; the caller adds the
/// tensor's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibError {
    #[error("the Hessian dampened by damp = {damp} is not positive definite; raise damp")]
    NotPositiveDefinite { damp: f64 },
    #[error("element {index} is {value}; calibrated methods need finite weights")]
    NonFinite { index: usize, value: f32 },
    #[error(
        "n:m pruning keeps its windows in the original column order and cannot run with act_order"
    )]
    NmWithActOrder,
    #[error("the weights, statistics and parameters do not fit together")]
    Shape,
}
