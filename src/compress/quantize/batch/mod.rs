//! The symmetric MSE search for neighbouring groups at once, one group per
//! vector lane: 16 groups in AVX-512 registers ([`avx512`]), 8 in AVX2
//! registers ([`avx2`]) on CPUs without AVX-512.
//!
//! The one-group passes ([`WidePasses`](super::wide::WidePasses),
//! [`NarrowPasses`](super::narrow::NarrowPasses)) fit one candidate scale
//! of one group per call: a few instructions per value, but every call also
//! pays a fixed cost (two reciprocals, three horizontal sums, the
//! conversion to f64, and the latency of a short chain) that over the 21
//! candidates of a group of 128 costs more than the values do. Here the
//! groups of a batch are transposed so that lane `g` of every register
//! belongs to group `g`: one pass over the values fits one candidate of all
//! of them, the sums never leave their lane, and the reciprocals are taken
//! once per batch.
//!
//! Each lane computes what the one-group integer fit computes, with the
//! same exact arithmetic (see [`wide`](super::wide)): `d` from the two
//! products with a [`Bracket`] of the scale, read from the bits of
//! `ROUND_MAGIC + d`; `Σ W·d` over the two 15-bit halves of `W = w / Q` and
//! `Σ d²` in 32-bit lanes (`vpmaddwd` over two values of a group, the
//! values `i` and `i + 1` in the two 16-bit halves of the group's lane).
//! Every sum is exact, so each group gets the fits it gets alone. The rest
//! of [`search_choice`] runs lane by lane with its own order of operations:
//! `Σ w²` and the final squared errors in the canonical order (value `i`
//! into accumulator `i % 8`), the ranking as the sequential scan with
//! masks, the comparison of the winner with min-max. The symbols are
//! transposed back, a register of values of a group at a time.
//!
//! A group the batch does not serve (NaN or infinity, all zeros, a scale
//! out of the brackets' range or the bounds [`fit_is_exact`] and the
//! integer fits need, see [`Lane::exponent`]) and a group where some
//! value's two products round apart at some candidate take the one-group
//! path whole.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::wide::packed_exponent;
use super::*;

mod avx2;
mod avx512;
#[cfg(test)]
mod tests;

/// The longest group a batch takes: its values (32 KiB at most, as f32 and
/// as halves of `W`) stay in the first-level cache.
const BATCH_MAX: usize = 256;

/// Whether the batches serve groups of `n` values quantized with `p`.
fn batch_serves(n: usize, p: &IntQuant) -> bool {
    p.symmetric
        && p.scale_search == ScaleSearch::Mse
        && (2..=BATCH_MAX).contains(&n)
        && n.is_multiple_of(2)
}

/// [`quantize_int`]'s symbols and choices for groups of `n` values of
/// `data`, in batches of neighbouring groups, where `p` and the CPU allow
/// it; `false`, with nothing written, where they do not.
pub(super) fn quantize_batches(
    data: &[f32],
    symbols: &mut [u8],
    choices: &mut [Choice],
    n: usize,
    p: &IntQuant,
    r: IntRange,
) -> bool {
    let Some(isa) = Isa::of_cpu() else {
        return false;
    };
    if !batch_serves(n, p) {
        return false;
    }
    let groups = isa.groups();
    symbols
        .par_chunks_mut(groups * n)
        .zip(data.par_chunks(groups * n))
        .zip(choices.par_chunks_mut(groups))
        .for_each(|((out, w), choices)| {
            if choices.len() == groups {
                // SAFETY: `of_cpu` checked the CPU; `batch_serves` holds
                // and the chunk holds `groups` groups of `n`.
                unsafe { isa.quantize_batch(w, out, choices, p, r) };
            } else {
                quantize_groups(w, out, choices, p, r);
            }
        });
    true
}

/// The vector registers a batch is computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// The widest the CPU has.
    fn of_cpu() -> Option<Self> {
        if has_avx512() {
            Some(Isa::Avx512)
        } else if has_avx2() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    /// Groups per batch: the f32 lanes of a register.
    fn groups(self) -> usize {
        match self {
            Isa::Avx512 => avx512::GROUPS,
            Isa::Avx2 => avx2::GROUPS,
        }
    }

    /// The choices and symbols of [`Isa::groups`] neighbouring groups of
    /// `n` values: `w` and `out` hold `groups · n`, `choices` `groups`.
    /// The same choices and symbols as `quantize_group` gives each group
    /// alone.
    ///
    /// # Safety
    /// [`batch_serves`] holds for `n` and `p`; the CPU has what
    /// [`Isa::of_cpu`] checks for `self`.
    unsafe fn quantize_batch(
        self,
        w: &[f32],
        out: &mut [u8],
        choices: &mut [Choice],
        p: &IntQuant,
        r: IntRange,
    ) {
        // SAFETY: as required of the caller.
        unsafe {
            match self {
                Isa::Avx512 => avx512::quantize_batch(w, out, choices, p, r),
                Isa::Avx2 => avx2::quantize_batch(w, out, choices, p, r),
            }
        }
    }
}

/// Each group's choice: the batch's where it served the group's lane (its
/// symbols are written), else `alone`'s, which writes the symbols too.
fn finish<const G: usize>(
    w: &[f32],
    out: &mut [u8],
    choices: &mut [Choice],
    served: u32,
    chosen: &[Choice; G],
    mut alone: impl FnMut(&[f32], &mut [u8]) -> Choice,
) {
    let n = w.len() / G;
    for (g, ((choice, out), w)) in choices
        .iter_mut()
        .zip(out.chunks_mut(n))
        .zip(w.chunks(n))
        .enumerate()
    {
        *choice = if served & (1 << g) != 0 {
            chosen[g]
        } else {
            alone(w, out)
        };
    }
}

/// The symmetric choices of a batch's lanes: lane `g` rounds with
/// `round_scale[g]` and decodes with `scale[g]`.
fn symmetric_choices<const G: usize>(round_scale: [f32; G], scale: [f32; G]) -> [Choice; G] {
    std::array::from_fn(|g| Choice {
        round_scale: round_scale[g],
        scale: scale[g],
        zero: 0,
    })
}

/// `f` of each half of a batch's lanes (as f64, two registers).
#[inline(always)]
fn each_half<T>(f: impl Fn(usize) -> T) -> [T; 2] {
    [f(0), f(1)]
}

/// What the batch knows of one of its groups.
#[derive(Clone, Copy)]
struct Lane {
    minmax: Choice,
    /// `Q = 2^exponent`, the step of `W`; `None`: the one-group path.
    exponent: Option<i32>,
}

impl Lane {
    fn of(n: usize, span: Span, p: &IntQuant, r: IntRange) -> Self {
        let minmax = minmax_choice(span, p.bits, true);
        let exponent = Self::exponent(n, span, minmax.scale, r);
        Lane { minmax, exponent }
    }

    /// The exponent of `Q` when every candidate's fit is exact in the
    /// lane's integers, else `None`.
    ///
    /// Candidate scales fall with the step, and every bound below is
    /// monotone in the scale, so checking the largest and the smallest
    /// candidate checks them all: the brackets exist, every partial sum
    /// is exact ([`fit_is_exact`]: `Q` falls with the scale), the integer
    /// fits take the group ([`packed_exponent`]), and the 32-bit sums hold
    /// (below `n · 2^15 · dmax`).
    fn exponent(n: usize, span: Span, scale: f32, r: IntRange) -> Option<i32> {
        let smallest = candidate_scale(scale, SHRINK_STEPS);
        let dmax = r.qmax.max(-r.qmin) as usize;
        if !span.all_finite
            || span.is_zero()
            || Bracket::of(scale).is_none()
            || Bracket::of(smallest).is_none()
            || !fit_is_exact(n, span, smallest, 0, r)
            || n * dmax >= 1 << 16
        {
            return None;
        }
        packed_exponent(span, smallest)
    }
}

/// The terms of `rows` summed in the canonical order, as the accumulators
/// of each lane: `add(acc, row)` adds row `i`'s term to accumulator
/// `i % 8`, eight rows per step, so the accumulators stay in registers.
/// [`fold`] then folds them as [`fold_lanes`] does (one block: groups are
/// shorter than [`BLOCK`]).
///
/// # Safety
/// Every row of `rows` is initialized.
#[inline(always)]
unsafe fn canonical<R: Copy, A: Copy>(
    rows: &[MaybeUninit<R>],
    zero: A,
    mut add: impl FnMut(A, R) -> A,
) -> [A; LANES] {
    let mut acc = [zero; LANES];
    let mut chunks = rows.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, row) in acc.iter_mut().zip(c) {
            // SAFETY: as required of the caller.
            *a = add(*a, unsafe { row.assume_init() });
        }
    }
    for (a, row) in acc.iter_mut().zip(chunks.remainder()) {
        // SAFETY: as above.
        *a = add(*a, unsafe { row.assume_init() });
    }
    acc
}

/// Eight accumulators folded as [`fold_lanes`] folds eight lanes.
#[inline(always)]
fn fold<A: Copy>(acc: [A; LANES], add: impl Fn(A, A) -> A) -> A {
    add(
        add(add(acc[0], acc[1]), add(acc[2], acc[3])),
        add(add(acc[4], acc[5]), add(acc[6], acc[7])),
    )
}
