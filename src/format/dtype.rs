//! Element types of safetensors tensors and conversion of their bytes to and
//! from `f32`, the type every kernel works in.
//!
//! Tensor data in a memory-mapped file starts wherever the header ends, so
//! the conversions read and write little-endian bytes one element at a time
//! (`from_le_bytes` over `chunks_exact`) and never cast a byte pointer to a
//! wider type.

use std::fmt;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A safetensors element type, spelled as in safetensors headers.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E4M3,
    F8_E5M2,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    pub const ALL: [Dtype; 15] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Bits per element.
    pub fn bitsize(self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E4M3 | Dtype::F8_E5M2 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// The dtype with this header name (case-sensitive, as safetensors is).
    pub fn parse(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }

    /// Whether the pipeline converts tensors of this dtype; all others pass
    /// through untouched.
    pub fn is_float_weight(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements per parallel task: large enough that scheduling costs nothing
/// next to the conversion, small enough to balance 4096x11008 tensors.
const CHUNK: usize = 1 << 16;

/// Elements converted through a stack buffer at a time, so that `half` can
/// use its vectorized slice conversions on data that is not 2-aligned.
const STAGE: usize = 1024;

/// Decodes little-endian elements of `dtype` into `out`.
///
/// Exact for every dtype but F64 (rounded to nearest even) and I32/U32/I64/U64
/// beyond 2^24 (rounded, as `as f32` does). BOOL gives 0 or 1.
///
/// # Panics
/// If `bytes.len()` is not `out.len()` elements of `dtype` (the reader has
/// already checked every tensor's length against its shape).
pub fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    let width = dtype.bitsize() / 8;
    assert_eq!(
        bytes.len(),
        out.len() * width,
        "to_f32: {} bytes for {} {dtype} elements",
        bytes.len(),
        out.len()
    );
    if out.len() <= CHUNK {
        decode_run(dtype, bytes, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * width))
            .for_each(|(o, b)| decode_run(dtype, b, o));
    }
}

/// Encodes `values` as little-endian elements of `dtype` into `out`.
///
/// Floats round to nearest even (F8 saturates at the largest finite value);
/// integers round half to even and saturate, NaN becomes 0; BOOL is
/// `value != 0`.
///
/// # Panics
/// If `out.len()` is not `values.len()` elements of `dtype`.
pub fn from_f32(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    let width = dtype.bitsize() / 8;
    assert_eq!(
        out.len(),
        values.len() * width,
        "from_f32: {} bytes for {} {dtype} elements",
        out.len(),
        values.len()
    );
    if values.len() <= CHUNK {
        encode_run(dtype, values, out);
    } else {
        out.par_chunks_mut(CHUNK * width)
            .zip(values.par_chunks(CHUNK))
            .for_each(|(o, v)| encode_run(dtype, v, o));
    }
}

/// `values` encoded as little-endian elements of `dtype` (see [`from_f32`]).
pub fn from_f32_vec(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * dtype.bitsize() / 8];
    from_f32(dtype, values, &mut out);
    out
}

/// Reads one little-endian element of `N` bytes.
#[inline(always)]
fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    // Callers pass `chunks_exact(N)` items, so this never fails and the
    // compiler drops the check.
    b.try_into().unwrap_or([0; N])
}

fn decode_run(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    macro_rules! each {
        ($n:literal, |$b:ident| $e:expr) => {
            for (o, $b) in out.iter_mut().zip(bytes.chunks_exact($n)) {
                *o = $e;
            }
        };
    }
    match dtype {
        Dtype::F32 => each!(4, |b| f32::from_le_bytes(le(b))),
        Dtype::F64 => each!(8, |b| f64::from_le_bytes(le(b)) as f32),
        Dtype::BF16 => each!(2, |b| f32::from_bits(
            u32::from(u16::from_le_bytes(le(b))) << 16
        )),
        Dtype::F16 => {
            let mut stage = [f16::ZERO; STAGE];
            for (o, b) in out.chunks_mut(STAGE).zip(bytes.chunks(STAGE * 2)) {
                let stage = &mut stage[..o.len()];
                for (s, b) in stage.iter_mut().zip(b.chunks_exact(2)) {
                    *s = f16::from_bits(u16::from_le_bytes(le(b)));
                }
                stage.convert_to_f32_slice(o);
            }
        }
        Dtype::F8_E4M3 => each!(1, |b| float8::F8E4M3::from_bits(b[0]).to_f32()),
        Dtype::F8_E5M2 => each!(1, |b| float8::F8E5M2::from_bits(b[0]).to_f32()),
        Dtype::BOOL => each!(1, |b| f32::from(u8::from(b[0] != 0))),
        Dtype::U8 => each!(1, |b| f32::from(b[0])),
        Dtype::I8 => each!(1, |b| f32::from(b[0] as i8)),
        Dtype::I16 => each!(2, |b| f32::from(i16::from_le_bytes(le(b)))),
        Dtype::U16 => each!(2, |b| f32::from(u16::from_le_bytes(le(b)))),
        Dtype::I32 => each!(4, |b| i32::from_le_bytes(le(b)) as f32),
        Dtype::U32 => each!(4, |b| u32::from_le_bytes(le(b)) as f32),
        Dtype::I64 => each!(8, |b| i64::from_le_bytes(le(b)) as f32),
        Dtype::U64 => each!(8, |b| u64::from_le_bytes(le(b)) as f32),
    }
}

fn encode_run(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    macro_rules! each {
        ($n:literal, |$v:ident| $e:expr) => {
            for (o, &$v) in out.chunks_exact_mut($n).zip(values) {
                o.copy_from_slice(&$e);
            }
        };
    }
    // `as` from float to integer saturates and maps NaN to 0.
    let int = |v: f32| v.round_ties_even();
    match dtype {
        Dtype::F32 => each!(4, |v| v.to_le_bytes()),
        Dtype::F64 => each!(8, |v| f64::from(v).to_le_bytes()),
        Dtype::BF16 => each!(2, |v| bf16::from_f32(v).to_le_bytes()),
        Dtype::F16 => {
            let mut stage = [f16::ZERO; STAGE];
            for (o, v) in out.chunks_mut(STAGE * 2).zip(values.chunks(STAGE)) {
                let stage = &mut stage[..v.len()];
                stage.convert_from_f32_slice(v);
                for (o, s) in o.chunks_exact_mut(2).zip(stage.iter()) {
                    o.copy_from_slice(&s.to_le_bytes());
                }
            }
        }
        Dtype::F8_E4M3 => each!(1, |v| [float8::F8E4M3::from_f32(v).to_bits()]),
        Dtype::F8_E5M2 => each!(1, |v| [float8::F8E5M2::from_f32(v).to_bits()]),
        Dtype::BOOL => each!(1, |v| [u8::from(v != 0.0 && !v.is_nan())]),
        Dtype::U8 => each!(1, |v| [int(v) as u8]),
        Dtype::I8 => each!(1, |v| (int(v) as i8).to_le_bytes()),
        Dtype::I16 => each!(2, |v| (int(v) as i16).to_le_bytes()),
        Dtype::U16 => each!(2, |v| (int(v) as u16).to_le_bytes()),
        Dtype::I32 => each!(4, |v| (int(v) as i32).to_le_bytes()),
        Dtype::U32 => each!(4, |v| (int(v) as u32).to_le_bytes()),
        Dtype::I64 => each!(8, |v| (int(v) as i64).to_le_bytes()),
        Dtype::U64 => each!(8, |v| (int(v) as u64).to_le_bytes()),
    }
}

/// Element-at-a-time [`to_f32`], written for clarity; the tests hold the
/// fast path to it.
pub fn to_f32_reference(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    let width = dtype.bitsize() / 8;
    assert_eq!(bytes.len(), out.len() * width);
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(width)) {
        let mut w = [0u8; 8];
        w[..width].copy_from_slice(b);
        let bits = u64::from_le_bytes(w);
        *o = match dtype {
            Dtype::F32 => f32::from_bits(bits as u32),
            Dtype::F64 => f64::from_bits(bits) as f32,
            Dtype::BF16 => bf16::from_bits(bits as u16).to_f32(),
            Dtype::F16 => f16::from_bits(bits as u16).to_f32(),
            Dtype::F8_E4M3 => float8::F8E4M3::from_bits(bits as u8).to_f32(),
            Dtype::F8_E5M2 => float8::F8E5M2::from_bits(bits as u8).to_f32(),
            Dtype::BOOL => {
                if bits != 0 {
                    1.0
                } else {
                    0.0
                }
            }
            Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => bits as f32,
            Dtype::I8 => bits as u8 as i8 as f32,
            Dtype::I16 => bits as u16 as i16 as f32,
            Dtype::I32 => bits as u32 as i32 as f32,
            Dtype::I64 => bits as i64 as f32,
        };
    }
}

/// Element-at-a-time [`from_f32`], written for clarity; the tests hold the
/// fast path to it.
pub fn from_f32_reference(dtype: Dtype, values: &[f32], out: &mut [u8]) {
    let width = dtype.bitsize() / 8;
    assert_eq!(out.len(), values.len() * width);
    for (o, &v) in out.chunks_exact_mut(width).zip(values) {
        let r = v.round_ties_even();
        let bits: u64 = match dtype {
            Dtype::F32 => u64::from(v.to_bits()),
            Dtype::F64 => f64::from(v).to_bits(),
            Dtype::BF16 => u64::from(bf16::from_f32(v).to_bits()),
            Dtype::F16 => u64::from(f16::from_f32(v).to_bits()),
            Dtype::F8_E4M3 => u64::from(float8::F8E4M3::from_f32(v).to_bits()),
            Dtype::F8_E5M2 => u64::from(float8::F8E5M2::from_f32(v).to_bits()),
            Dtype::BOOL => u64::from(v != 0.0 && !v.is_nan()),
            Dtype::U8 => u64::from(r as u8),
            Dtype::U16 => u64::from(r as u16),
            Dtype::U32 => u64::from(r as u32),
            Dtype::U64 => r as u64,
            Dtype::I8 => r as i8 as u8 as u64,
            Dtype::I16 => r as i16 as u16 as u64,
            Dtype::I32 => r as i32 as u32 as u64,
            Dtype::I64 => r as i64 as u64,
        };
        o.copy_from_slice(&bits.to_le_bytes()[..width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::first_mismatch;
    use proptest::prelude::*;

    fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0; bytes.len() / (dtype.bitsize() / 8)];
        to_f32(dtype, bytes, &mut out);
        out
    }

    fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0; values.len() * dtype.bitsize() / 8];
        from_f32(dtype, values, &mut out);
        out
    }

    /// The same bits, or both NaN (of any payload).
    fn same_value(x: &f32, y: &f32) -> bool {
        x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
    }

    /// Deterministic bytes covering many bit patterns, NaNs and infinities
    /// included.
    fn pattern(len: usize) -> Vec<u8> {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn names_parse_back_to_the_same_dtype_and_serde_uses_the_header_spelling() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::parse(d.name()), Some(d));
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.name())
            );
            assert_eq!(
                serde_json::from_str::<Dtype>(&format!("\"{}\"", d.name())).unwrap(),
                d
            );
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(Dtype::parse("f32"), None);
        assert_eq!(Dtype::parse("F4"), None);
    }

    #[test]
    fn bit_sizes_match_safetensors() {
        assert_eq!(Dtype::BOOL.bitsize(), 8);
        assert_eq!(Dtype::F8_E5M2.bitsize(), 8);
        assert_eq!(Dtype::BF16.bitsize(), 16);
        assert_eq!(Dtype::U32.bitsize(), 32);
        assert_eq!(Dtype::I64.bitsize(), 64);
        let floats: Vec<_> = Dtype::ALL
            .into_iter()
            .filter(|d| d.is_float_weight())
            .collect();
        assert_eq!(floats, [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64]);
    }

    #[test]
    fn f32_bytes_decode_exactly_even_when_unaligned() {
        let values = [
            1.5f32,
            -0.0,
            f32::MAX,
            f32::MIN_POSITIVE / 4.0,
            f32::INFINITY,
        ];
        let mut bytes = vec![0xAA];
        for v in values {
            bytes.extend(v.to_le_bytes());
        }
        let got = decode(Dtype::F32, &bytes[1..]);
        assert_eq!(first_mismatch(&got, &values, same_value), None);
        assert_eq!(encode(Dtype::F32, &values), bytes[1..]);
    }

    #[test]
    fn f16_decodes_by_hand_examples() {
        // 0x3C00 = 1.0, 0xC000 = -2.0, 0x7BFF = 65504 (max), 0x0001 = 2^-24.
        let bytes = [0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B, 0x01, 0x00];
        assert_eq!(
            decode(Dtype::F16, &bytes),
            [1.0, -2.0, 65504.0, 2f32.powi(-24)]
        );
        assert_eq!(
            encode(Dtype::F16, &[1.0, -2.0, 65504.0, 2f32.powi(-24)]),
            bytes
        );
    }

    #[test]
    fn f16_rounds_to_nearest_even_and_overflows_to_infinity() {
        // Between 1 and 1 + 2^-10 the halfway point rounds to the even 1.0;
        // between 1 + 2^-10 and 1 + 2^-9 it rounds up to the even 1 + 2^-9.
        let ulp = 2f32.powi(-10);
        let got = decode(
            Dtype::F16,
            &encode(Dtype::F16, &[1.0 + ulp / 2.0, 1.0 + 1.5 * ulp, 70000.0]),
        );
        assert_eq!(got, [1.0, 1.0 + 2.0 * ulp, f32::INFINITY]);
    }

    #[test]
    fn bf16_keeps_the_high_half_and_rounds_to_nearest_even() {
        // 1.0 is 0x3F80_0000; bf16 keeps 0x3F80.
        assert_eq!(encode(Dtype::BF16, &[1.0]), [0x80, 0x3F]);
        assert_eq!(decode(Dtype::BF16, &[0x80, 0x3F, 0x40, 0xC0]), [1.0, -3.0]);
        // Ties: 0x3F80_8000 is halfway between 0x3F80 and 0x3F81 -> even 0x3F80;
        // 0x3F81_8000 is halfway between 0x3F81 and 0x3F82 -> even 0x3F82.
        let ties = [
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x3F80_8001),
        ];
        assert_eq!(
            encode(Dtype::BF16, &ties),
            [0x80, 0x3F, 0x82, 0x3F, 0x81, 0x3F]
        );
        // NaN stays NaN rather than turning into infinity.
        assert!(decode(Dtype::BF16, &encode(Dtype::BF16, &[f32::NAN]))[0].is_nan());
    }

    #[test]
    fn f64_widens_exactly_and_narrows_to_nearest() {
        let mut bytes = Vec::new();
        for v in [0.1f64, 1e300, -2.5, 1.0 + f64::EPSILON] {
            bytes.extend(v.to_le_bytes());
        }
        assert_eq!(
            decode(Dtype::F64, &bytes),
            [0.1f32, f32::INFINITY, -2.5, 1.0]
        );
        let back = encode(Dtype::F64, &[0.1f32]);
        assert_eq!(
            f64::from_le_bytes(back.try_into().unwrap()),
            f64::from(0.1f32)
        );
    }

    #[test]
    fn integers_round_half_to_even_and_saturate() {
        assert_eq!(
            encode(Dtype::I8, &[2.5, -2.5, 3.5, 300.0, -300.0, f32::NAN]),
            [2, 254, 4, 127, 128, 0]
        );
        assert_eq!(encode(Dtype::U8, &[-1.0, 255.4, 256.0]), [0, 255, 255]);
        assert_eq!(
            decode(Dtype::I16, &[0xFF, 0xFF, 0x00, 0x80]),
            [-1.0, -32768.0]
        );
        assert_eq!(decode(Dtype::BOOL, &[0, 1, 7]), [0.0, 1.0, 1.0]);
        assert_eq!(
            encode(Dtype::BOOL, &[0.0, -0.0, 0.5, f32::NAN]),
            [0, 0, 1, 0]
        );
    }

    #[test]
    fn fp8_matches_the_float8_crate() {
        // E4M3: 0x38 = 1.0, 0x7E = 448 (largest finite); E5M2: 0x3C = 1.0.
        assert_eq!(decode(Dtype::F8_E4M3, &[0x38, 0x7E]), [1.0, 448.0]);
        assert_eq!(decode(Dtype::F8_E5M2, &[0x3C]), [1.0]);
        assert_eq!(encode(Dtype::F8_E4M3, &[1.0, 1000.0]), [0x38, 0x7E]);
    }

    #[test]
    fn large_inputs_take_the_parallel_path_and_agree_with_the_reference() {
        let n = CHUNK * 2 + 77;
        for dtype in Dtype::ALL {
            let width = dtype.bitsize() / 8;
            // One extra leading byte makes every element unaligned.
            let raw = pattern(n * width + 1);
            let bytes = &raw[1..];
            let mut fast = vec![0.0; n];
            let mut slow = vec![0.0; n];
            to_f32(dtype, bytes, &mut fast);
            to_f32_reference(dtype, bytes, &mut slow);
            assert_eq!(
                first_mismatch(&fast, &slow, same_value),
                None,
                "to_f32 {dtype}"
            );

            let values: Vec<f32> = pattern(n * 4)
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(le(b)))
                .collect();
            let mut fast = vec![0u8; n * width + 1];
            let mut slow = vec![0u8; n * width];
            from_f32(dtype, &values, &mut fast[1..]);
            from_f32_reference(dtype, &values, &mut slow);
            let diff = fast[1..]
                .iter()
                .zip(&slow)
                .position(|(a, b)| a != b)
                .map(|i| i / width);
            // NaN payloads may differ between slice and scalar f16 paths.
            let diff = diff.filter(|&i| !values[i].is_nan());
            assert_eq!(diff, None, "from_f32 {dtype}: first differing element");
        }
    }

    #[test]
    #[should_panic(expected = "to_f32")]
    fn a_length_mismatch_is_a_programming_error() {
        to_f32(Dtype::F32, &[0; 6], &mut [0.0; 2]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn float_weights_round_trip_through_their_own_values(
            bits in proptest::collection::vec(any::<u32>(), 0..300),
            which in 0usize..4,
        ) {
            let dtype = [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64][which];
            let values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            // Converting once lands on a representable value; converting that
            // again must reproduce the same bytes.
            let once = encode(dtype, &values);
            let decoded = decode(dtype, &once);
            let twice = encode(dtype, &decoded);
            let first = once.iter().zip(&twice).position(|(a, b)| a != b);
            let first = first.filter(|&i| !decoded[i / (dtype.bitsize() / 8)].is_nan());
            prop_assert_eq!(first, None);
        }
    }
}
