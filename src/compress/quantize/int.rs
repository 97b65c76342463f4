//! Integer quantization: ranges, spans, min-max parameters and the kernels.

use rayon::prelude::*;

use super::*;
use crate::compress::coded::{affine_symbol, Coded, Decode, MatrixShape};

#[derive(Debug, Clone, Copy)]
pub(super) struct IntRange {
    pub(super) qmin: i32,
    pub(super) qmax: i32,
}

impl IntRange {
    pub(super) fn of(bits: u8) -> Self {
        Self {
            qmin: -(1 << (bits - 1)),
            qmax: (1 << (bits - 1)) - 1,
        }
    }
}

/// The finite extremes of a group, widened to include 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Span {
    pub(super) lo: f32,
    pub(super) hi: f32,
    /// No NaN or infinity seen: [`Span::seen`] is the identity.
    pub(super) all_finite: bool,
}

impl Span {
    pub(super) const ZERO: Span = Span {
        lo: 0.0,
        hi: 0.0,
        all_finite: true,
    };

    /// Strict comparisons, so that the bounds never become -0.0 and every
    /// evaluation order gives the same bits.
    #[inline(always)]
    pub(super) fn with(self, w: f32) -> Self {
        if w.is_finite() {
            Span {
                lo: if w < self.lo { w } else { self.lo },
                hi: if w > self.hi { w } else { self.hi },
                ..self
            }
        } else {
            Span {
                all_finite: false,
                ..self
            }
        }
    }

    pub(super) fn merge(self, o: Span) -> Self {
        Span {
            lo: if o.lo < self.lo { o.lo } else { self.lo },
            hi: if o.hi > self.hi { o.hi } else { self.hi },
            all_finite: self.all_finite && o.all_finite,
        }
    }

    /// The value quantization works with for `w` (identity for finite `w`).
    #[inline(always)]
    pub(super) fn seen(self, w: f32) -> f32 {
        if w.is_nan() {
            0.0
        } else {
            clamp_fast(w, self.lo, self.hi)
        }
    }

    pub(super) fn is_zero(self) -> bool {
        self.lo == 0.0 && self.hi == 0.0
    }
}

/// The parameters of one group: symbols come from rounding with
/// `round_scale` and decode with `scale`; they differ when the search refits
/// the scale by least squares for fixed symbols.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Choice {
    pub(super) round_scale: f32,
    pub(super) scale: f32,
    pub(super) zero: i32,
}

/// `q = clamp(round(w / s) + z)`, the plain way.
#[inline]
pub(super) fn quantize_value(w: f32, round_scale: f32, zero: i32, r: IntRange) -> i32 {
    let q = (w / round_scale).round_ties_even() + zero as f32;
    q.clamp(r.qmin as f32, r.qmax as f32) as i32
}

/// `x.clamp(lo, hi)` for `lo <= hi` without `clamp`'s argument check;
/// compiles to one `max` and one `min`.
#[inline(always)]
pub(super) fn clamp_fast(x: f32, lo: f32, hi: f32) -> f32 {
    let x = if x < lo { lo } else { x };
    if x > hi {
        hi
    } else {
        x
    }
}

/// [`quantize_value`] in f32 and without the rounding libcall, for the hot
/// loops.
#[derive(Debug, Clone, Copy)]
pub(super) struct FastQuant {
    pub(super) round_scale: f32,
    pub(super) zero: f32,
    pub(super) qmin: f32,
    pub(super) qmax: f32,
}

impl FastQuant {
    pub(super) fn new(round_scale: f32, zero: i32, r: IntRange) -> Self {
        Self {
            round_scale,
            zero: zero as f32,
            qmin: r.qmin as f32,
            qmax: r.qmax as f32,
        }
    }

    /// `q` as an integer-valued f32. Clamping `w / s` to ±512 first keeps the
    /// magic-number rounding exact and cannot change `q`: past ±512,
    /// `round(w / s) + z` lies beyond `[qmin, qmax]` either way (|z| <= 128).
    #[inline(always)]
    pub(super) fn q(self, w: f32) -> f32 {
        let x = clamp_fast(w / self.round_scale, -512.0, 512.0);
        let rounded = (x + ROUND_MAGIC) - ROUND_MAGIC;
        clamp_fast(rounded + self.zero, self.qmin, self.qmax)
    }
}

/// The zero point that puts `lo` on `qmin` (compressed-tensors' formula).
#[inline(always)]
pub(super) fn zero_for_low(lo: f32, scale: f32, r: IntRange) -> i32 {
    (r.qmin as f32 - (lo / scale).round_ties_even()).clamp(r.qmin as f32, r.qmax as f32) as i32
}

/// The zero point that puts `hi` on `qmax`.
#[inline(always)]
pub(super) fn zero_for_high(hi: f32, scale: f32, r: IntRange) -> i32 {
    (r.qmax as f32 - (hi / scale).round_ties_even()).clamp(r.qmin as f32, r.qmax as f32) as i32
}

/// Keeps a scale where `w / s` and `(q - z) * s` stay finite: at least the
/// smallest normal f32, at most `f32::MAX / 2^bits` (`|q - z| < 2^bits`).
#[inline(always)]
pub(super) fn bounded_scale(s: f32, bits: u8) -> f32 {
    s.clamp(f32::MIN_POSITIVE, f32::MAX / f32::from(1u16 << bits))
}

/// Min-max parameters: symmetric maps `absmax` to `2^(b-1) - 1`; asymmetric
/// maps `[lo, hi]` (which contains 0) onto `2^b - 1` steps.
#[inline(always)]
pub(super) fn minmax_choice(span: Span, bits: u8, symmetric: bool) -> Choice {
    let r = IntRange::of(bits);
    if symmetric {
        let absmax = span.hi.max(-span.lo);
        let scale = if absmax > 0.0 {
            bounded_scale(absmax / r.qmax as f32, bits)
        } else {
            1.0
        };
        Choice {
            round_scale: scale,
            scale,
            zero: 0,
        }
    } else {
        // In f64 because `hi - lo` can overflow f32.
        let width = f64::from(span.hi) - f64::from(span.lo);
        let scale = if width > 0.0 {
            bounded_scale((width / f64::from(r.qmax - r.qmin)) as f32, bits)
        } else {
            1.0
        };
        Choice {
            round_scale: scale,
            scale,
            zero: zero_for_low(span.lo, scale, r),
        }
    }
}

/// [`Span`] of a block. Minimum and maximum are exact, so any number of
/// lanes gives the same bounds: 32 lanes with no test per value, plus an
/// integer flag that an infinity or NaN sets (its all-ones exponent carries
/// into bit 31). Blocks that have one take [`block_span_checked`].
#[inline(always)]
pub(super) fn block_span_fast(b: &[f32]) -> Span {
    const WIDE: usize = 32;
    let mut lo = [0.0f32; WIDE];
    let mut hi = [0.0f32; WIDE];
    let mut special = [0u32; WIDE];
    let mut chunks = b.chunks_exact(WIDE);
    for c in &mut chunks {
        for j in 0..WIDE {
            let x = c[j];
            lo[j] = if x < lo[j] { x } else { lo[j] };
            hi[j] = if x > hi[j] { x } else { hi[j] };
            special[j] |= (x.to_bits() & 0x7f80_0000) + 0x0080_0000;
        }
    }
    if special.iter().fold(0, |a, &s| a | s) & 0x8000_0000 != 0 {
        return block_span_checked(b);
    }
    // Lanes folded in halves (vector operations, not 64 scalar steps: a
    // group of 128 has only four rows of lanes).
    let mut width = WIDE;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            let (l, h) = (lo[j + width], hi[j + width]);
            lo[j] = if l < lo[j] { l } else { lo[j] };
            hi[j] = if h > hi[j] { h } else { hi[j] };
        }
    }
    chunks.remainder().iter().fold(
        Span {
            lo: lo[0],
            hi: hi[0],
            all_finite: true,
        },
        |s, &x| s.with(x),
    )
}

/// [`Span`] of a block in [`LANES`] independent lanes, non-finite values
/// replaced by 0 (which every span contains) and flagged.
#[inline(always)]
pub(super) fn block_span_checked(b: &[f32]) -> Span {
    let mut lo = [0.0f32; LANES];
    let mut hi = [0.0f32; LANES];
    let mut finite = [true; LANES];
    let mut chunks = b.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let ok = c[j].is_finite();
            let x = if ok { c[j] } else { 0.0 };
            lo[j] = if x < lo[j] { x } else { lo[j] };
            hi[j] = if x > hi[j] { x } else { hi[j] };
            finite[j] &= ok;
        }
    }
    let mut span = chunks
        .remainder()
        .iter()
        .fold(Span::ZERO, |s, &x| s.with(x));
    for j in 0..LANES {
        span = span.merge(Span {
            lo: lo[j],
            hi: hi[j],
            all_finite: finite[j],
        });
    }
    span
}

#[inline(always)]
pub(super) fn span_fast(w: &[f32]) -> Span {
    if w.len() > PAR_GROUP {
        w.par_chunks(BLOCK)
            .map(block_span_fast)
            .reduce(|| Span::ZERO, Span::merge)
    } else {
        block_span_fast(w)
    }
}

pub(super) fn check_int_params(data: &[f32], shape: MatrixShape, bits: u8) {
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
    assert!(
        (2..=8).contains(&bits),
        "integer quantization takes 2..=8 bits"
    );
}

pub(super) fn int_coded(
    symbols: Vec<u8>,
    choices: &[Choice],
    group_len: usize,
    p: &IntQuant,
) -> Coded {
    Coded {
        symbols,
        bits: p.bits,
        group_len,
        decode: Decode::Affine {
            scales: choices.iter().map(|c| c.scale).collect(),
            zero_points: if p.symmetric {
                Vec::new()
            } else {
                choices.iter().map(|c| c.zero).collect()
            },
        },
    }
}

/// Integer quantization of a `shape` matrix, in parallel over groups (and
/// over blocks of a group when groups are large).
///
/// Preconditions: `data.len() == shape.len()`, `p.bits` in `2..=8`, and a
/// group size divides `shape.cols` (checked when the pipeline is built).
pub fn quantize_int(data: &[f32], shape: MatrixShape, p: &IntQuant) -> Coded {
    check_int_params(data, shape, p.bits);
    let group_len = p.granularity.group_len(shape);
    let r = IntRange::of(p.bits);
    let mut symbols = vec![0u8; data.len()];
    let mut choices = vec![
        Choice {
            round_scale: 1.0,
            scale: 1.0,
            zero: 0
        };
        data.len().div_ceil(group_len)
    ];
    #[cfg(target_arch = "x86_64")]
    if super::batch::quantize_batches(data, &mut symbols, &mut choices, group_len, p, r) {
        return int_coded(symbols, &choices, group_len, p);
    }
    symbols
        .par_chunks_mut(group_len)
        .zip(data.par_chunks(group_len))
        .zip(choices.par_iter_mut())
        .for_each(|((out, w), choice)| *choice = quantize_group(w, out, p, r));
    int_coded(symbols, &choices, group_len, p)
}

/// Consecutive groups one by one, in sequence.
pub(super) fn quantize_groups(
    w: &[f32],
    out: &mut [u8],
    choices: &mut [Choice],
    p: &IntQuant,
    r: IntRange,
) {
    let n = w.len() / choices.len().max(1);
    for ((out, w), c) in out.chunks_mut(n).zip(w.chunks(n)).zip(choices) {
        *c = quantize_group(w, out, p, r);
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use crate::cpu::{has_avx2, has_avx512};

/// One group's parameters and symbols, compiled for the widest vector
/// registers the CPU has. Wider registers make the same IEEE operations in
/// the same order (Rust never fuses a multiply and an add on its own), so
/// the bits do not depend on the CPU.
pub(super) fn quantize_group(w: &[f32], out: &mut [u8], p: &IntQuant, r: IntRange) -> Choice {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU has these features, checked just above.
            return unsafe { quantize_group_avx512(w, out, p, r) };
        }
        if has_avx2() {
            // SAFETY: as above.
            return unsafe { quantize_group_avx2(w, out, p, r) };
        }
    }
    quantize_group_portable(w, out, p, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(super) unsafe fn quantize_group_avx512(
    w: &[f32],
    out: &mut [u8],
    p: &IntQuant,
    r: IntRange,
) -> Choice {
    let span = span_fast(w);
    let choice = match p.scale_search {
        ScaleSearch::MinMax => minmax_choice(span, p.bits, p.symmetric),
        // SAFETY: this function runs only on CPUs with these features.
        ScaleSearch::Mse => {
            match unsafe { super::wide::WidePasses::new(w, span, r, smallest_candidate(span, p)) } {
                Some(wide) => search_choice(&wide, span, p.bits, p.symmetric),
                None => search_choice(&FastPasses { w, span, r }, span, p.bits, p.symmetric),
            }
        }
    };
    write_symbols_fast(w, out, span, choice, r);
    choice
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_group_avx2(
    w: &[f32],
    out: &mut [u8],
    p: &IntQuant,
    r: IntRange,
) -> Choice {
    let span = span_fast(w);
    let choice = match p.scale_search {
        ScaleSearch::MinMax => minmax_choice(span, p.bits, p.symmetric),
        ScaleSearch::Mse => {
            let mut scratch = super::narrow::PackedScratch::new();
            let smallest = smallest_candidate(span, p);
            // SAFETY: this function runs only on CPUs with these features.
            match unsafe { super::narrow::NarrowPasses::new(w, span, r, smallest, &mut scratch) } {
                Some(narrow) => search_choice(&narrow, span, p.bits, p.symmetric),
                None => search_choice(&FastPasses { w, span, r }, span, p.bits, p.symmetric),
            }
        }
    };
    write_symbols_fast(w, out, span, choice, r);
    choice
}

#[inline(always)]
pub(super) fn quantize_group_portable(
    w: &[f32],
    out: &mut [u8],
    p: &IntQuant,
    r: IntRange,
) -> Choice {
    let span = span_fast(w);
    let choice = match p.scale_search {
        ScaleSearch::MinMax => minmax_choice(span, p.bits, p.symmetric),
        ScaleSearch::Mse => search_choice(&FastPasses { w, span, r }, span, p.bits, p.symmetric),
    };
    write_symbols_fast(w, out, span, choice, r);
    choice
}

#[inline(always)]
pub(super) fn write_symbols_fast(w: &[f32], out: &mut [u8], span: Span, c: Choice, r: IntRange) {
    let k = FastQuant::new(c.round_scale, c.zero, r);
    if w.len() > PAR_GROUP {
        out.par_chunks_mut(BLOCK)
            .zip(w.par_chunks(BLOCK))
            .for_each(|(o, w)| write_block(o, w, span, k));
    } else {
        write_block(out, w, span, k);
    }
}

/// The symbols `q - qmin` (in 0..=255) of a block.
#[inline(always)]
fn write_block(out: &mut [u8], w: &[f32], span: Span, k: FastQuant) {
    let symbol = |q: f32| small_int(q - k.qmin) as u8;
    if span.all_finite {
        for (o, &w) in out.iter_mut().zip(w) {
            *o = symbol(k.q(w));
        }
    } else {
        for (o, &w) in out.iter_mut().zip(w) {
            *o = symbol(k.q(span.seen(w)));
        }
    }
}

/// [`quantize_int`] with plain sequential loops; the same result bit for bit.
pub fn quantize_int_reference(data: &[f32], shape: MatrixShape, p: &IntQuant) -> Coded {
    check_int_params(data, shape, p.bits);
    let group_len = p.granularity.group_len(shape);
    let r = IntRange::of(p.bits);
    let mut symbols = Vec::with_capacity(data.len());
    let mut choices = Vec::new();
    for w in data.chunks(group_len) {
        let mut span = Span::ZERO;
        for &x in w {
            span = span.with(x);
        }
        let choice = match p.scale_search {
            ScaleSearch::MinMax => minmax_choice(span, p.bits, p.symmetric),
            ScaleSearch::Mse => {
                search_choice(&ReferencePasses { w, span, r }, span, p.bits, p.symmetric)
            }
        };
        for &x in w {
            let q = quantize_value(span.seen(x), choice.round_scale, choice.zero, r);
            symbols.push(affine_symbol(q, p.bits));
        }
        choices.push(choice);
    }
    int_coded(symbols, &choices, group_len, p)
}
