//! Integer and FP8 quantization (the `quantize` stage).
//!
//! Integer quantization follows compressed-tensors: per group a scale `s` and
//! an integer zero point `z`, `q = clamp(round(w / s) + z, qmin, qmax)` with
//! round-half-to-even, and `w' = (q - z) * s`, where
//! `[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`.
//! The zero point is an integer inside that range, so a pruned zero always
//! comes back as exactly `0.0`.
//!
//! Non-finite inputs never reach a scale: NaN counts as `0.0` and `±inf` as the
//! largest / smallest finite value of its group.
//!
//! Every sum (squared errors, least-squares fits) is taken in one fixed order,
//! eight interleaved lanes inside blocks of 4096 elements, blocks added in
//! sequence, so the parallel kernels and the plain reference agree bit for
//! bit however the work is split. The AVX-512 and AVX2 passes of the MSE
//! search (`wide`, `narrow`), its search across 16 (AVX-512) or 8 (AVX2)
//! groups at once (`batch`) and its portable fits keep those bits too: they take the fits'
//! sums in any order only where those sums are provably exact, and the rest
//! in the fixed order.

use crate::compress::coded::Granularity;

#[cfg(target_arch = "x86_64")]
mod batch;
mod fp8;
pub(crate) mod grid;
mod int;
#[cfg(target_arch = "x86_64")]
mod narrow;
mod search;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod wide;

pub use fp8::{quantize_fp8, quantize_fp8_reference};
pub use grid::quantize_int_weighted;
use int::*;
pub use int::{quantize_int, quantize_int_reference};
use search::*;

/// How the scale (and zero point) of a group is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleSearch {
    /// The group's range maps onto the integer range.
    MinMax,
    /// The best of shrunken min-max grids by squared error, each also with its
    /// least-squares scale (llama.cpp's `make_qx_quants` idea); never worse
    /// than `MinMax`, which is one of the candidates.
    Mse,
}

/// Integer quantization parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntQuant {
    /// 2..=8.
    pub bits: u8,
    pub symmetric: bool,
    pub granularity: Granularity,
    pub scale_search: ScaleSearch,
}

/// Elements per summation block; also the unit of parallel work inside one
/// large group.
const BLOCK: usize = 4096;
/// Interleaved accumulators per block: independent dependency chains.
const LANES: usize = 8;
/// Groups longer than this are themselves split across threads.
const PAR_GROUP: usize = 8 * BLOCK;
/// The search tries the min-max scale times `1 - k * SHRINK_STEP` for
/// `k = 0..=SHRINK_STEPS`, down to half of it.
const SHRINK_STEPS: u16 = 20;
const SHRINK_STEP: f32 = 0.025;
/// Largest finite FP8 E4M3 value.
const FP8_MAX: f32 = 448.0;
/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude below 2^22 to
/// the nearest integer, ties to even, without a libm call; the sum's low
/// mantissa bits are then that integer.
const ROUND_MAGIC: f32 = 12_582_912.0;
