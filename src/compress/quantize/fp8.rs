//! FP8 E4M3 quantization.

use rayon::prelude::*;

use super::*;
use crate::compress::coded::{f32_to_e4m3, Coded, Decode, Granularity, MatrixShape};

/// FP8 E4M3 scale of a group: its finite absmax maps to 448. The cap keeps
/// `448 * s` finite (values near `f32::MAX` then saturate a little early).
pub(super) fn fp8_scale(absmax: f32) -> f32 {
    if absmax > 0.0 {
        (absmax / FP8_MAX).clamp(f32::MIN_POSITIVE, f32::MAX / 512.0)
    } else {
        1.0
    }
}

/// The smallest normal E4M3 magnitude, 2^-6.
pub(super) const E4M3_MIN_NORMAL: f32 = 0.015_625;

/// [`f32_to_e4m3`] without branches on the value (bit for bit the same; a
/// test compares them): the f32 mantissa is rounded to three bits in place
/// (normal range) or the value to a multiple of 2^-9 (subnormal range).
#[inline(always)]
pub(super) fn e4m3_fast(x: f32) -> u8 {
    let x = if x.is_nan() { 0.0 } else { x };
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs().min(FP8_MAX);
    let bits = a.to_bits();
    // Round half to even at bit 20, then rebias the exponent (127 -> 7).
    let normal = ((bits + 0x7_FFFF + ((bits >> 20) & 1)) >> 20).wrapping_sub(120 << 3) as u8;
    // Multiples of 2^-9: the low mantissa bits of `a * 2^9 + 2^23`.
    let subnormal = ((a * 512.0 + 8_388_608.0).to_bits() - 0x4B00_0000) as u8;
    (if a >= E4M3_MIN_NORMAL {
        normal
    } else {
        subnormal
    }) | sign
}

/// FP8 E4M3 quantization with one scale per tensor or per output channel:
/// `symbol = e4m3(w / s)`, `s = absmax / 448`. NaN becomes 0 and `±inf`
/// saturates to `±448 s`.
///
/// Preconditions: `data.len() == shape.len()`; `granularity` is `Tensor` or
/// `Channel` (groups also work but no format stores them).
pub fn quantize_fp8(data: &[f32], shape: MatrixShape, granularity: Granularity) -> Coded {
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
    let group_len = granularity.group_len(shape);
    let mut symbols = vec![0u8; data.len()];
    let mut scales = vec![1.0f32; data.len().div_ceil(group_len)];
    symbols
        .par_chunks_mut(group_len)
        .zip(data.par_chunks(group_len))
        .zip(scales.par_iter_mut())
        .for_each(|((out, w), scale)| {
            let span = span_fast(w);
            let s = fp8_scale(span.hi.max(-span.lo));
            *scale = s;
            let write = |(o, w): (&mut [u8], &[f32])| {
                for (o, &w) in o.iter_mut().zip(w) {
                    *o = e4m3_fast(w / s);
                }
            };
            if w.len() > PAR_GROUP {
                out.par_chunks_mut(BLOCK)
                    .zip(w.par_chunks(BLOCK))
                    .for_each(write);
            } else {
                write((out, w));
            }
        });
    Coded {
        symbols,
        bits: 8,
        group_len,
        decode: Decode::Fp8 { scales },
    }
}

/// [`quantize_fp8`] with plain sequential loops.
pub fn quantize_fp8_reference(data: &[f32], shape: MatrixShape, granularity: Granularity) -> Coded {
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
    let group_len = granularity.group_len(shape);
    let mut symbols = Vec::with_capacity(data.len());
    let mut scales = Vec::new();
    for w in data.chunks(group_len) {
        let mut absmax = 0.0f32;
        for &x in w {
            if x.is_finite() {
                absmax = absmax.max(x.abs());
            }
        }
        let s = fp8_scale(absmax);
        for &x in w {
            symbols.push(f32_to_e4m3(x / s));
        }
        scales.push(s);
    }
    Coded {
        symbols,
        bits: 8,
        group_len,
        decode: Decode::Fp8 { scales },
    }
}
