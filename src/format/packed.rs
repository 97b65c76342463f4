//! The packed format: a safetensors container whose tensors are the compact
//! pieces of each compressed tensor (symbols, scales, codebooks, sparse
//! positions, Huffman tables), described by versioned JSON in
//! `__metadata__["modelpress.tensors"]`.
//!
//! Pieces of tensor `N` are named `N:<piece>`:
//!
//! | kind | pieces |
//! |---|---|
//! | `raw` | `N` itself (dtype of the tensor), or with `sparse`: `N:positions` + `N:values` (the nonzero values) |
//! | `low_rank` | `N:a` (rows × rank), `N:b` (rank × cols), in the tensor's dtype; the tensor is `a · b` |
//! | `affine` | `N:symbols`, `N:scales` F32 (one per group), `N:zero_points` I32 when asymmetric |
//! | `codebook` | `N:symbols`, `N:codebook` F32 (groups × entries) |
//! | `fp8` | `N:symbols` (E4M3 bytes), `N:scales` F32 |
//!
//! `N:symbols` holds one symbol per element (or per nonzero element when
//! `sparse` is set), bit-packed LSB-first in `bits` bits, or Huffman coded
//! with the code lengths in `N:symbols_table` (256 × U8). `N:positions` is a
//! bitmask (LSB-first, 1 = nonzero) or relative gaps (see
//! [`crate::compress::sparse`]) bit-packed in `bits` bits or Huffman coded
//! with `N:positions_table`. A position that is not stored holds the group's
//! zero symbol (the symbol that decodes to exactly 0.0).

use std::borrow::Cow;
use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dtype::{from_f32_vec, to_f32, Dtype};
use super::sink::{
    encode_f32, Finished, OutputTensor, ProcessedTensor, ShardFiles, Sink, SinkError,
};
use super::writer::{header_bound, header_reserve};
use crate::compress::bitpack::{pack_lsb, unpack_lsb};
use crate::compress::coded::{Coded, Decode, MatrixShape};
use crate::compress::huffman::{frequencies, Huffman};
use crate::compress::lowrank::{product, LowRank};
use crate::compress::sparse::{
    bitmask, decode_positions, encode_positions_of_mask, positions_bytes, Positions,
};
use crate::compress::spec::Entropy;
use crate::compress::tensor::{Processed, Values};

pub const FORMAT_NAME: &str = "modelpress.packed";
pub const FORMAT_VERSION: u32 = 1;
/// `__metadata__` key of the format name.
pub const META_FORMAT: &str = "modelpress.format";
/// `__metadata__` key of the version.
pub const META_VERSION: &str = "modelpress.format_version";
/// `__metadata__` key of the JSON description of every tensor.
pub const META_TENSORS: &str = "modelpress.tensors";
/// `__metadata__` key of the input's own `__metadata__` (JSON).
pub const META_SOURCE: &str = "modelpress.source_metadata";

/// How one tensor is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: PackedValues,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PackedValues {
    Raw {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseDesc>,
    },
    LowRank {
        rank: usize,
    },
    Affine {
        bits: u8,
        group_len: usize,
        symmetric: bool,
        symbols: SymbolsDesc,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseDesc>,
    },
    Codebook {
        bits: u8,
        group_len: usize,
        entries: usize,
        symbols: SymbolsDesc,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseDesc>,
    },
    Fp8 {
        group_len: usize,
        symbols: SymbolsDesc,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseDesc>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coding {
    Bitpacked,
    Huffman,
}

/// The stored symbol stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SymbolsDesc {
    pub count: usize,
    pub coding: Coding,
}

/// Where the nonzero elements are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "layout", rename_all = "snake_case")]
pub enum SparseDesc {
    Bitmask {
        nonzeros: usize,
    },
    Relative {
        nonzeros: usize,
        bits: u8,
        gaps: usize,
        coding: Coding,
    },
}

impl SparseDesc {
    fn nonzeros(&self) -> usize {
        match self {
            SparseDesc::Bitmask { nonzeros } | SparseDesc::Relative { nonzeros, .. } => *nonzeros,
        }
    }
}

/// One stored piece; its bytes are borrowed from the processed tensor when
/// they are stored as they are (8-bit symbols, F32 values).
pub struct Piece<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> Piece<'a> {
    pub fn new(
        name: String,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: impl Into<Cow<'a, [u8]>>,
    ) -> Self {
        Self {
            name,
            dtype,
            shape,
            bytes: bytes.into(),
        }
    }

    fn bytes1d(name: String, bytes: impl Into<Cow<'a, [u8]>>) -> Self {
        let bytes = bytes.into();
        let n = bytes.len();
        Self::new(name, Dtype::U8, vec![n], bytes)
    }
}

/// `symbols` bit-packed in `bits` bits: themselves at 8 bits.
fn packed_stream(symbols: Cow<'_, [u8]>, bits: u8) -> Cow<'_, [u8]> {
    if bits == 8 {
        symbols
    } else {
        Cow::Owned(pack_lsb(&symbols, bits))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackedError {
    #[error("not a packed modelpress file (no `{META_FORMAT}` = `{FORMAT_NAME}` in its metadata)")]
    NotPacked,
    #[error(
        "packed format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version(String),
    #[error("the packed description is invalid: {0}")]
    Description(String),
    #[error("tensor `{tensor}`: piece `{piece}` is missing")]
    MissingPiece { tensor: String, piece: String },
    #[error("tensor `{tensor}`: piece `{piece}` is malformed: {reason}")]
    BadPiece {
        tensor: String,
        piece: String,
        reason: String,
    },
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// How a symbol stream will be stored: Huffman coded when that is smaller
/// than bit-packing, decided once from the stream's frequencies.
struct StreamPlan {
    code: Option<Huffman>,
    bytes: usize,
}

fn plan_stream(symbols: &[u8], bits: u8, entropy: Option<Entropy>) -> StreamPlan {
    let freqs =
        (entropy == Some(Entropy::Huffman) && !symbols.is_empty()).then(|| frequencies(symbols));
    plan_counted_stream(symbols.len(), freqs, bits)
}

/// [`plan_stream`] of `len` symbols whose frequencies are known; `freqs` is
/// `None` when the stream is not entropy coded.
fn plan_counted_stream(len: usize, freqs: Option<[u64; 256]>, bits: u8) -> StreamPlan {
    let packed = (len * usize::from(bits)).div_ceil(8);
    if let Some(freqs) = freqs.filter(|_| len > 0) {
        let code = Huffman::from_frequencies(&freqs);
        let huff = code.encoded_bits(&freqs).div_ceil(8) as usize + 256;
        if huff < packed {
            return StreamPlan {
                code: Some(code),
                bytes: huff,
            };
        }
    }
    StreamPlan {
        code: None,
        bytes: packed,
    }
}

/// Stores a stream as piece `{prefix}:{piece}` (and `{prefix}:{piece}_table`
/// for the Huffman code lengths).
fn store_stream<'a>(
    symbols: Cow<'a, [u8]>,
    bits: u8,
    plan: StreamPlan,
    prefix: &str,
    piece: &str,
    pieces: &mut Vec<Piece<'a>>,
) -> Coding {
    if let Some(code) = plan.code {
        if let Ok(stream) = code.encode(&symbols) {
            pieces.push(Piece::bytes1d(format!("{prefix}:{piece}"), stream));
            pieces.push(Piece::bytes1d(
                format!("{prefix}:{piece}_table"),
                code.lengths().to_vec(),
            ));
            return Coding::Huffman;
        }
    }
    pieces.push(Piece::bytes1d(
        format!("{prefix}:{piece}"),
        packed_stream(symbols, bits),
    ));
    Coding::Bitpacked
}

fn store_symbols<'a>(
    symbols: Cow<'a, [u8]>,
    bits: u8,
    plan: StreamPlan,
    prefix: &str,
    pieces: &mut Vec<Piece<'a>>,
) -> SymbolsDesc {
    SymbolsDesc {
        count: symbols.len(),
        coding: store_stream(symbols, bits, plan, prefix, "symbols", pieces),
    }
}

/// Sparse positions, encoded once, with the plan for their gap stream.
struct PositionsPlan {
    positions: Positions,
    gaps: Option<StreamPlan>,
    nonzeros: usize,
}

impl PositionsPlan {
    /// `mask` is the bitmask of the nonzero elements, `nonzeros` the number
    /// of bits set.
    fn new(mask: Vec<u8>, nonzeros: usize, entropy: Option<Entropy>) -> Self {
        let positions = encode_positions_of_mask(mask);
        let gaps = match &positions {
            Positions::Relative { bits, gaps } => Some(plan_stream(gaps, *bits, entropy)),
            Positions::Bitmask { .. } => None,
        };
        Self {
            positions,
            gaps,
            nonzeros,
        }
    }

    fn bytes(&self) -> usize {
        match &self.gaps {
            Some(plan) => plan.bytes,
            None => positions_bytes(&self.positions),
        }
    }

    fn store(self, prefix: &str, pieces: &mut Vec<Piece<'_>>) -> SparseDesc {
        let nonzeros = self.nonzeros;
        match (self.positions, self.gaps) {
            (Positions::Relative { bits, gaps }, Some(plan)) => {
                let count = gaps.len();
                let coding = store_stream(gaps.into(), bits, plan, prefix, "positions", pieces);
                SparseDesc::Relative {
                    nonzeros,
                    bits,
                    gaps: count,
                    coding,
                }
            }
            (Positions::Relative { bits, gaps }, None) => {
                let count = gaps.len();
                pieces.push(Piece::bytes1d(
                    format!("{prefix}:positions"),
                    packed_stream(gaps.into(), bits),
                ));
                SparseDesc::Relative {
                    nonzeros,
                    bits,
                    gaps: count,
                    coding: Coding::Bitpacked,
                }
            }
            (Positions::Bitmask { bytes }, _) => {
                pieces.push(Piece::bytes1d(format!("{prefix}:positions"), bytes));
                SparseDesc::Bitmask { nonzeros }
            }
        }
    }
}

/// Positions of the nonzero values of a raw tensor, when storing only those
/// values and their positions is smaller than the dense tensor.
fn raw_sparse_plan(dtype: Dtype, v: &[f32], entropy: Option<Entropy>) -> Option<PositionsPlan> {
    let zeros = v.iter().filter(|&&x| x == 0.0).count();
    if zeros == 0 {
        return None;
    }
    let nonzero: Vec<bool> = v.iter().map(|&x| x != 0.0).collect();
    let plan = PositionsPlan::new(bitmask(&nonzero), v.len() - zeros, entropy);
    (plan.bytes() < zeros * dtype.bitsize() / 8).then_some(plan)
}

/// Splits a processed tensor into pieces.
pub fn pack_tensor<'a>(
    name: &str,
    dtype: Dtype,
    p: &'a Processed,
) -> (PackedTensor, Vec<Piece<'a>>) {
    let mut pieces: Vec<Piece<'a>> = Vec::new();
    let sparse_raw = match (&p.values, p.encode) {
        (Values::Raw(v), Some(entropy)) => raw_sparse_plan(dtype, v, Some(entropy)),
        _ => None,
    };
    let values = match (&p.values, sparse_raw) {
        (Values::Raw(v), None) => {
            let bytes = encode_f32(dtype, v);
            let desc = PackedTensor {
                name: name.to_string(),
                dtype,
                shape: p.shape.clone(),
                values: PackedValues::Raw { sparse: None },
            };
            return (
                desc,
                vec![Piece::new(name.to_string(), dtype, p.shape.clone(), bytes)],
            );
        }
        (Values::Raw(v), Some(plan)) => {
            let sparse = plan.store(name, &mut pieces);
            let kept: Vec<f32> = v.iter().copied().filter(|&x| x != 0.0).collect();
            let n = kept.len();
            pieces.push(Piece::new(
                format!("{name}:values"),
                dtype,
                vec![n],
                from_f32_vec(dtype, &kept),
            ));
            PackedValues::Raw {
                sparse: Some(sparse),
            }
        }
        (Values::LowRank(lr), _) => {
            let m = MatrixShape::of(&p.shape).unwrap_or(MatrixShape { rows: 0, cols: 0 });
            pieces.push(Piece::new(
                format!("{name}:a"),
                dtype,
                vec![m.rows, lr.rank],
                from_f32_vec(dtype, &lr.a),
            ));
            pieces.push(Piece::new(
                format!("{name}:b"),
                dtype,
                vec![lr.rank, m.cols],
                from_f32_vec(dtype, &lr.b),
            ));
            PackedValues::LowRank { rank: lr.rank }
        }
        (Values::Coded(c), _) => pack_coded(name, c, p.encode, &mut pieces),
    };
    let desc = PackedTensor {
        name: name.to_string(),
        dtype,
        shape: p.shape.clone(),
        values,
    };
    (desc, pieces)
}

fn pack_coded<'a>(
    name: &str,
    c: &'a Coded,
    encode: Option<Entropy>,
    pieces: &mut Vec<Piece<'a>>,
) -> PackedValues {
    // Sparse storage drops elements that hold their group's zero symbol,
    // when that is smaller than storing every symbol.
    let mut sparse = None;
    if encode.is_some() {
        let (mask, kept, zeros) = split_zeros(c);
        if kept.len() < c.symbols.len() {
            // The frequencies of all symbols are those of the kept ones plus
            // the zeros dropped.
            let kept_freqs = (encode == Some(Entropy::Huffman)).then(|| frequencies(&kept));
            let all_freqs = kept_freqs.map(|mut f| {
                f.iter_mut().zip(&zeros).for_each(|(f, z)| *f += z);
                f
            });
            let dense = plan_counted_stream(c.symbols.len(), all_freqs, c.bits);
            let positions = PositionsPlan::new(mask, kept.len(), encode);
            let sparse_symbols = plan_counted_stream(kept.len(), kept_freqs, c.bits);
            if sparse_symbols.bytes + positions.bytes() >= dense.bytes {
                let symbols = store_symbols(c.symbols[..].into(), c.bits, dense, name, pieces);
                return finish_coded(name, c, symbols, None, pieces);
            }
            let desc = positions.store(name, pieces);
            sparse = Some((desc, kept, sparse_symbols));
        }
    }
    let (symbols, sparse) = match sparse {
        Some((desc, kept, plan)) => (
            store_symbols(kept.into(), c.bits, plan, name, pieces),
            Some(desc),
        ),
        None => {
            let plan = plan_stream(&c.symbols, c.bits, encode);
            let symbols = store_symbols(c.symbols[..].into(), c.bits, plan, name, pieces);
            (symbols, None)
        }
    };
    finish_coded(name, c, symbols, sparse, pieces)
}

/// Bit `k` set when `eight[k] != zero`, for eight symbols at once: a byte
/// of `x = symbols ^ zero` is nonzero exactly when adding 0x7f to its low
/// seven bits or its own top bit sets its top bit (no carry crosses bytes),
/// and one multiply gathers the eight top bits into the top byte.
#[inline]
fn nonzero_bits(eight: &[u8; 8], zero: u8) -> u8 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = u64::from_le_bytes(*eight) ^ (u64::from(zero) * 0x0101_0101_0101_0101);
    let tops = (((x & LOW7) + LOW7) | x) & !LOW7;
    ((tops >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

/// Plain version of [`nonzero_bits`].
#[cfg(test)]
fn nonzero_bits_reference(eight: &[u8; 8], zero: u8) -> u8 {
    eight
        .iter()
        .enumerate()
        .fold(0u8, |b, (k, &s)| b | (u8::from(s != zero) << k))
}

/// Elements per parallel task of [`split_zeros`].
const SPLIT_CHUNK: usize = 1 << 16;

/// The nonzero bitmask of a coded tensor (an element is zero when it holds
/// its group's zero symbol; layout of [`crate::compress::sparse`]) and the
/// symbols of the nonzero elements, in order, and how many elements of each
/// symbol were dropped.
fn split_zeros(c: &Coded) -> (Vec<u8>, Vec<u8>, [u64; 256]) {
    let gl = c.group_len.max(1);
    let zero_of: Vec<Option<u8>> = (0..c.groups()).map(|g| c.zero_symbol(g)).collect();
    let mut mask = vec![0u8; c.symbols.len().div_ceil(8)];
    let chunks: Vec<(usize, [u64; 256])> = mask
        .par_chunks_mut(SPLIT_CHUNK / 8)
        .zip(c.symbols.par_chunks(SPLIT_CHUNK))
        .enumerate()
        .map(|(i, (mask, sym))| {
            let start = i * SPLIT_CHUNK;
            let mut dropped = [0u64; 256];
            let mut kept = 0;
            let mut pos = 0;
            while pos < sym.len() {
                let g = (start + pos) / gl;
                let end = ((g + 1) * gl - start).min(sym.len());
                // No zero symbol: every element is nonzero (a select, so
                // the loop has no branch).
                let (zero, all) = match zero_of[g] {
                    Some(zero) => (zero, 0),
                    None => (0, 1),
                };
                let mut nonzero = 0;
                let mut at = pos;
                // Single elements up to a byte boundary, then whole bytes.
                while at < end && at % 8 != 0 {
                    let bit = u8::from(sym[at] != zero) | all;
                    mask[at / 8] |= bit << (at % 8);
                    nonzero += usize::from(bit);
                    at += 1;
                }
                let whole = (end - at) / 8 * 8;
                nonzero += mask_bytes(&sym[at..at + whole], &mut mask[at / 8..], zero, all);
                at += whole;
                while at < end {
                    let bit = u8::from(sym[at] != zero) | all;
                    mask[at / 8] |= bit << (at % 8);
                    nonzero += usize::from(bit);
                    at += 1;
                }
                dropped[usize::from(zero)] += (end - pos - nonzero) as u64;
                kept += nonzero;
                pos = end;
            }
            (kept, dropped)
        })
        .collect();
    let mut zeros = [0u64; 256];
    for (_, dropped) in &chunks {
        zeros.iter_mut().zip(dropped).for_each(|(z, d)| *z += d);
    }
    let mut kept = vec![0u8; chunks.iter().map(|&(n, _)| n).sum()];
    let mut outs = Vec::with_capacity(chunks.len());
    let mut rest = kept.as_mut_slice();
    for &(n, _) in &chunks {
        let (out, tail) = rest.split_at_mut(n);
        outs.push(out);
        rest = tail;
    }
    outs.into_par_iter()
        .zip(c.symbols.par_chunks(SPLIT_CHUNK))
        .zip(mask.par_chunks(SPLIT_CHUNK / 8))
        .for_each(|((out, sym), mask)| gather_kept(sym, mask, out));
    (mask, kept, zeros)
}

/// The mask bytes of whole bytes of symbols (`sym.len()` a multiple of 8):
/// bit `k` of byte `i` set when `sym[8i + k] != zero`, or always when
/// `all` is 1; returns how many bits are set.
fn mask_bytes(sym: &[u8], mask: &mut [u8], zero: u8, all: u8) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::has;
        if has!("avx512bw") {
            // SAFETY: the CPU has AVX-512 BW, checked just above.
            return unsafe { mask_bytes_avx512(sym, mask, zero, all) };
        }
        if has!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { mask_bytes_avx2(sym, mask, zero, all) };
        }
    }
    mask_bytes_portable(sym, mask, zero, all)
}

fn mask_bytes_portable(sym: &[u8], mask: &mut [u8], zero: u8, all: u8) -> usize {
    let mut nonzero = 0;
    for (byte, eight) in mask.iter_mut().zip(sym.chunks_exact(8)) {
        let eight: &[u8; 8] = eight.try_into().expect("chunks of 8");
        let bits = nonzero_bits(eight, zero) | 0u8.wrapping_sub(all);
        *byte = bits;
        nonzero += bits.count_ones() as usize;
    }
    nonzero
}

/// [`mask_bytes_portable`] 64 symbols at a time: one byte compare gives
/// the eight mask bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn mask_bytes_avx512(sym: &[u8], mask: &mut [u8], zero: u8, all: u8) -> usize {
    use std::arch::x86_64::*;
    let whole = sym.len() / 64 * 64;
    let zeros = _mm512_set1_epi8(zero as i8);
    let always = 0u64.wrapping_sub(u64::from(all));
    let mut nonzero = 0;
    for (bytes, at) in mask.chunks_exact_mut(8).zip((0..whole).step_by(64)) {
        // SAFETY: `at + 64 <= whole <= sym.len()`.
        let v = unsafe { _mm512_loadu_si512(sym.as_ptr().add(at).cast()) };
        let bits = _mm512_cmpneq_epi8_mask(v, zeros) | always;
        bytes.copy_from_slice(&bits.to_le_bytes());
        nonzero += bits.count_ones() as usize;
    }
    nonzero + mask_bytes_portable(&sym[whole..], &mut mask[whole / 8..], zero, all)
}

/// [`mask_bytes_portable`] 32 symbols at a time: one byte compare and its
/// sign bits give four mask bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mask_bytes_avx2(sym: &[u8], mask: &mut [u8], zero: u8, all: u8) -> usize {
    use std::arch::x86_64::*;
    let whole = sym.len() / 32 * 32;
    let zeros = _mm256_set1_epi8(zero as i8);
    let always = 0u32.wrapping_sub(u32::from(all));
    let mut nonzero = 0;
    for (bytes, at) in mask.chunks_exact_mut(4).zip((0..whole).step_by(32)) {
        // SAFETY: `at + 32 <= whole <= sym.len()`.
        let v = unsafe { _mm256_loadu_si256(sym.as_ptr().add(at).cast()) };
        let equal = _mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zeros)) as u32;
        let bits = !equal | always;
        bytes.copy_from_slice(&bits.to_le_bytes());
        nonzero += bits.count_ones() as usize;
    }
    nonzero + mask_bytes_portable(&sym[whole..], &mut mask[whole / 8..], zero, all)
}

/// Copies the symbols whose mask bit is set, in order, to `out` (exactly
/// as long as there are such symbols).
fn gather_kept(sym: &[u8], mask: &[u8], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::has;
        if has!("avx512vbmi2") {
            // SAFETY: the CPU has AVX-512 VBMI2, checked just above.
            return unsafe { gather_kept_avx512(sym, mask, out) };
        }
        if has!("ssse3") && has!("popcnt") {
            // SAFETY: the CPU has SSSE3 and POPCNT, checked just above.
            return unsafe { gather_kept_ssse3(sym, mask, out) };
        }
    }
    gather_kept_portable(sym, mask, out)
}

/// [`gather_kept_portable`] 8 symbols at a time: the kept ones packed to
/// the front of a register by a shuffle from [`LEFT_PACK`] and stored as 8
/// bytes while 8 bytes of `out` are left (the bytes past the kept ones are
/// overwritten by the next store); the rest plainly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3,popcnt")]
unsafe fn gather_kept_ssse3(sym: &[u8], mask: &[u8], out: &mut [u8]) {
    use crate::compress::sparse::LEFT_PACK;
    use std::arch::x86_64::*;
    let mut j = 0;
    let mut at = 0;
    while at + 8 <= sym.len() && j + 8 <= out.len() {
        let bits = mask[at / 8];
        // SAFETY: `at + 8 <= sym.len()` and `j + 8 <= out.len()`; a table
        // entry holds 8 bytes.
        unsafe {
            let order = _mm_loadl_epi64(LEFT_PACK[usize::from(bits)].as_ptr().cast());
            let v = _mm_loadl_epi64(sym.as_ptr().add(at).cast());
            _mm_storel_epi64(out.as_mut_ptr().add(j).cast(), _mm_shuffle_epi8(v, order));
        }
        j += bits.count_ones() as usize;
        at += 8;
    }
    gather_kept_portable(&sym[at..], &mask[at / 8..], &mut out[j..]);
}

fn gather_kept_portable(sym: &[u8], mask: &[u8], out: &mut [u8]) {
    // Every symbol is written at the next free slot, which moves on only
    // past a nonzero one: no branch on the scattered zeros.
    let mut j = 0;
    for (eight, &bits) in sym.chunks(8).zip(mask) {
        for (k, &s) in eight.iter().enumerate() {
            if let Some(slot) = out.get_mut(j) {
                *slot = s;
            }
            j += usize::from((bits >> k) & 1);
        }
    }
}

/// [`gather_kept_portable`] 64 symbols at a time: the kept ones packed in
/// a register and stored whole while 64 bytes of `out` are left (the bytes
/// past the kept ones are overwritten by the next store); the rest plainly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
unsafe fn gather_kept_avx512(sym: &[u8], mask: &[u8], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let mut j = 0;
    let mut at = 0;
    while at + 64 <= sym.len() && j + 64 <= out.len() {
        let bits = u64::from_le_bytes(mask[at / 8..at / 8 + 8].try_into().expect("8 bytes"));
        // SAFETY: `at + 64 <= sym.len()` and `j + 64 <= out.len()`.
        unsafe {
            let v = _mm512_loadu_si512(sym.as_ptr().add(at).cast());
            let kept = _mm512_maskz_compress_epi8(bits, v);
            _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), kept);
        }
        j += bits.count_ones() as usize;
        at += 64;
    }
    gather_kept_portable(&sym[at..], &mask[at / 8..], &mut out[j..]);
}

/// Adds the decode parameters of a coded tensor and describes it.
fn finish_coded(
    name: &str,
    c: &Coded,
    symbols: SymbolsDesc,
    sparse: Option<SparseDesc>,
    pieces: &mut Vec<Piece<'_>>,
) -> PackedValues {
    let gl = c.group_len.max(1);
    match &c.decode {
        Decode::Affine {
            scales,
            zero_points,
        } => {
            let groups = scales.len();
            pieces.push(Piece::new(
                format!("{name}:scales"),
                Dtype::F32,
                vec![groups],
                f32_bytes(scales),
            ));
            if !zero_points.is_empty() {
                pieces.push(Piece::new(
                    format!("{name}:zero_points"),
                    Dtype::I32,
                    vec![groups],
                    i32_bytes(zero_points),
                ));
            }
            PackedValues::Affine {
                bits: c.bits,
                group_len: gl,
                symmetric: zero_points.is_empty(),
                symbols,
                sparse,
            }
        }
        Decode::Codebook { entries, values } => {
            pieces.push(Piece::new(
                format!("{name}:codebook"),
                Dtype::F32,
                vec![values.len() / entries.max(&1), *entries],
                f32_bytes(values),
            ));
            PackedValues::Codebook {
                bits: c.bits,
                group_len: gl,
                entries: *entries,
                symbols,
                sparse,
            }
        }
        Decode::Fp8 { scales } => {
            pieces.push(Piece::new(
                format!("{name}:scales"),
                Dtype::F32,
                vec![scales.len()],
                f32_bytes(scales),
            ));
            PackedValues::Fp8 {
                group_len: gl,
                symbols,
                sparse,
            }
        }
    }
}

/// Access to the pieces of a packed file.
pub trait Pieces {
    /// dtype, shape and bytes of a piece.
    fn piece(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])>;
}

fn piece<'p>(
    src: &'p dyn Pieces,
    tensor: &str,
    suffix: &str,
) -> Result<(Dtype, Vec<usize>, &'p [u8]), PackedError> {
    let name = if suffix.is_empty() {
        tensor.to_string()
    } else {
        format!("{tensor}:{suffix}")
    };
    src.piece(&name).ok_or(PackedError::MissingPiece {
        tensor: tensor.to_string(),
        piece: name,
    })
}

fn bad(tensor: &str, piece: &str, reason: impl Into<String>) -> PackedError {
    PackedError::BadPiece {
        tensor: tensor.to_string(),
        piece: format!("{tensor}:{piece}"),
        reason: reason.into(),
    }
}

fn f32_piece(src: &dyn Pieces, t: &str, suffix: &str, len: usize) -> Result<Vec<f32>, PackedError> {
    let (dtype, _, bytes) = piece(src, t, suffix)?;
    if dtype != Dtype::F32 || bytes.len() != len * 4 {
        return Err(bad(t, suffix, format!("expected {len} F32 values")));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn read_symbols(
    src: &dyn Pieces,
    t: &str,
    which: &str,
    bits: u8,
    count: usize,
    coding: Coding,
) -> Result<Vec<u8>, PackedError> {
    let (_, _, bytes) = piece(src, t, which)?;
    match coding {
        Coding::Bitpacked => {
            unpack_lsb(bytes, bits, count).map_err(|e| bad(t, which, e.to_string()))
        }
        Coding::Huffman => {
            let table = format!("{which}_table");
            let (_, _, lengths) = piece(src, t, &table)?;
            let code = Huffman::from_lengths(lengths).map_err(|e| bad(t, &table, e.to_string()))?;
            let out = code
                .decode(bytes, count)
                .map_err(|e| bad(t, which, e.to_string()))?;
            if out.iter().any(|&s| bits < 8 && s >= 1 << bits) {
                return Err(bad(
                    t,
                    which,
                    format!("a symbol does not fit in {bits} bits"),
                ));
            }
            Ok(out)
        }
    }
}

fn read_positions(
    src: &dyn Pieces,
    t: &str,
    sparse: &SparseDesc,
    len: usize,
) -> Result<Vec<bool>, PackedError> {
    let positions = match sparse {
        SparseDesc::Bitmask { .. } => {
            let (_, _, bytes) = piece(src, t, "positions")?;
            Positions::Bitmask {
                bytes: bytes.to_vec(),
            }
        }
        SparseDesc::Relative {
            bits, gaps, coding, ..
        } => {
            if !(1..=8).contains(bits) {
                return Err(bad(
                    t,
                    "positions",
                    format!("gap width {bits} is not 1..=8"),
                ));
            }
            Positions::Relative {
                bits: *bits,
                gaps: read_symbols(src, t, "positions", *bits, *gaps, *coding)?,
            }
        }
    };
    let mask = decode_positions(&positions, len).map_err(|e| bad(t, "positions", e.to_string()))?;
    let n = mask.iter().filter(|&&b| b).count();
    if n != sparse.nonzeros() {
        return Err(bad(
            t,
            "positions",
            format!("{n} nonzeros where {} are described", sparse.nonzeros()),
        ));
    }
    Ok(mask)
}

/// Restores one tensor to its dense bytes (in its dtype), exactly as the
/// dense output of the same job holds it.
pub fn unpack_tensor(desc: &PackedTensor, src: &dyn Pieces) -> Result<Vec<u8>, PackedError> {
    let t = desc.name.as_str();
    let m = MatrixShape::of(&desc.shape)
        .ok_or_else(|| PackedError::Description(format!("tensor `{t}`: shape overflows")))?;
    let n = m.len();
    let check_groups = |group_len: usize| -> Result<usize, PackedError> {
        if group_len == 0 || (n > 0 && n % group_len != 0) {
            return Err(PackedError::Description(format!(
                "tensor `{t}`: group length {group_len} does not divide {n} elements"
            )));
        }
        Ok(n / group_len)
    };
    let values: Vec<f32> = match &desc.values {
        PackedValues::Raw { sparse: None } => {
            let (dtype, shape, bytes) = piece(src, t, "")?;
            if dtype != desc.dtype || shape != desc.shape {
                return Err(bad(t, "", "dtype or shape differs from the description"));
            }
            return Ok(bytes.to_vec());
        }
        PackedValues::Raw {
            sparse: Some(sparse),
        } => {
            if !desc.dtype.is_float_weight() {
                return Err(PackedError::Description(format!(
                    "tensor `{t}`: sparse values need a float dtype"
                )));
            }
            let mask = read_positions(src, t, sparse, n)?;
            let (dtype, _, bytes) = piece(src, t, "values")?;
            let nz = sparse.nonzeros();
            if dtype != desc.dtype || bytes.len() != nz * dtype.bitsize() / 8 {
                return Err(bad(
                    t,
                    "values",
                    format!("expected {nz} values of {}", desc.dtype.name()),
                ));
            }
            let mut kept = vec![0f32; nz];
            to_f32(dtype, bytes, &mut kept);
            let mut it = kept.into_iter();
            mask.iter()
                .map(|&nzp| if nzp { it.next().unwrap_or(0.0) } else { 0.0 })
                .collect()
        }
        PackedValues::LowRank { rank } => {
            let load = |suffix: &str, rows: usize, cols: usize| -> Result<Vec<f32>, PackedError> {
                let (dtype, shape, bytes) = piece(src, t, suffix)?;
                if dtype != desc.dtype || shape != [rows, cols] {
                    return Err(bad(
                        t,
                        suffix,
                        format!("expected {rows}x{cols} {}", desc.dtype.name()),
                    ));
                }
                let mut v = vec![0f32; rows * cols];
                to_f32(dtype, bytes, &mut v);
                Ok(v)
            };
            if *rank == 0 || *rank > m.rows.max(m.cols) {
                return Err(PackedError::Description(format!(
                    "tensor `{t}`: rank {rank} is out of range"
                )));
            }
            let lr = LowRank {
                rank: *rank,
                a: load("a", m.rows, *rank)?,
                b: load("b", *rank, m.cols)?,
            };
            product(&lr, m)
        }
        PackedValues::Affine {
            bits,
            group_len,
            symmetric,
            symbols,
            sparse,
        } => {
            let groups = check_groups(*group_len)?;
            let scales = f32_piece(src, t, "scales", groups)?;
            let zero_points = if *symmetric {
                Vec::new()
            } else {
                let (dtype, _, bytes) = piece(src, t, "zero_points")?;
                if dtype != Dtype::I32 || bytes.len() != groups * 4 {
                    return Err(bad(
                        t,
                        "zero_points",
                        format!("expected {groups} I32 values"),
                    ));
                }
                bytes
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            let decode = Decode::Affine {
                scales,
                zero_points,
            };
            decode_coded(
                t,
                src,
                *bits,
                *group_len,
                decode,
                symbols,
                sparse.as_ref(),
                n,
            )?
        }
        PackedValues::Codebook {
            bits,
            group_len,
            entries,
            symbols,
            sparse,
        } => {
            let groups = check_groups(*group_len)?;
            if *entries == 0 || *entries > 256 {
                return Err(PackedError::Description(format!(
                    "tensor `{t}`: {entries} codebook entries"
                )));
            }
            let values = f32_piece(src, t, "codebook", groups * entries)?;
            let decode = Decode::Codebook {
                entries: *entries,
                values,
            };
            decode_coded(
                t,
                src,
                *bits,
                *group_len,
                decode,
                symbols,
                sparse.as_ref(),
                n,
            )?
        }
        PackedValues::Fp8 {
            group_len,
            symbols,
            sparse,
        } => {
            let groups = check_groups(*group_len)?;
            let decode = Decode::Fp8 {
                scales: f32_piece(src, t, "scales", groups)?,
            };
            decode_coded(t, src, 8, *group_len, decode, symbols, sparse.as_ref(), n)?
        }
    };
    if !desc.dtype.is_float_weight() {
        return Err(PackedError::Description(format!(
            "tensor `{t}`: dtype {} cannot hold decoded values",
            desc.dtype.name()
        )));
    }
    Ok(from_f32_vec(desc.dtype, &values))
}

#[allow(clippy::too_many_arguments)]
fn decode_coded(
    t: &str,
    src: &dyn Pieces,
    bits: u8,
    group_len: usize,
    decode: Decode,
    symbols: &SymbolsDesc,
    sparse: Option<&SparseDesc>,
    n: usize,
) -> Result<Vec<f32>, PackedError> {
    if !(1..=8).contains(&bits) {
        return Err(PackedError::Description(format!(
            "tensor `{t}`: {bits} bits per symbol"
        )));
    }
    let stored = read_symbols(src, t, "symbols", bits, symbols.count, symbols.coding)?;
    let mut coded = Coded {
        symbols: Vec::new(),
        bits,
        group_len,
        decode,
    };
    if let Decode::Codebook { entries, .. } = &coded.decode {
        if stored.iter().any(|&s| usize::from(s) >= *entries) {
            return Err(bad(t, "symbols", "a symbol is past the codebook"));
        }
    }
    coded.symbols = match sparse {
        None => {
            if stored.len() != n {
                return Err(bad(
                    t,
                    "symbols",
                    format!("{} symbols for {n} elements", stored.len()),
                ));
            }
            stored
        }
        Some(sp) => {
            let mask = read_positions(src, t, sp, n)?;
            if stored.len() != sp.nonzeros() {
                return Err(bad(
                    t,
                    "symbols",
                    "symbol count differs from the nonzero count",
                ));
            }
            let zeros: Vec<Option<u8>> = (0..n.div_ceil(group_len))
                .map(|g| coded.zero_symbol(g))
                .collect();
            let mut it = stored.into_iter();
            let mut out = Vec::with_capacity(n);
            for (i, &nz) in mask.iter().enumerate() {
                out.push(if nz {
                    it.next().unwrap_or(0)
                } else {
                    zeros[i / group_len]
                        .ok_or_else(|| bad(t, "positions", "group has no zero symbol"))?
                });
            }
            out
        }
    };
    Ok(coded.decode())
}

/// The `__metadata__` of a packed shard holding `descs`; the input's own
/// metadata `source` is kept as a JSON string to restore.
pub fn shard_metadata(
    source: &BTreeMap<String, String>,
    descs: &[PackedTensor],
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (META_FORMAT.into(), FORMAT_NAME.into()),
        (META_VERSION.into(), FORMAT_VERSION.to_string()),
        (
            META_TENSORS.into(),
            serde_json::to_string(descs).expect("descriptions serialize"),
        ),
        (
            META_SOURCE.into(),
            serde_json::to_string(source).expect("a string map serializes"),
        ),
    ])
}

/// The tensor descriptions of a packed shard.
pub fn packed_descriptions(
    meta: &BTreeMap<String, String>,
) -> Result<Vec<PackedTensor>, PackedError> {
    if meta.get(META_FORMAT).map(String::as_str) != Some(FORMAT_NAME) {
        return Err(PackedError::NotPacked);
    }
    let version = meta.get(META_VERSION).cloned().unwrap_or_default();
    if version != FORMAT_VERSION.to_string() {
        return Err(PackedError::Version(version));
    }
    let text = meta
        .get(META_TENSORS)
        .ok_or_else(|| PackedError::Description(format!("`{META_TENSORS}` is missing")))?;
    serde_json::from_str(text).map_err(|e| PackedError::Description(e.to_string()))
}

/// The input metadata a packed shard keeps for restoring.
pub fn source_metadata(
    meta: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, PackedError> {
    Ok(meta
        .get(META_SOURCE)
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| PackedError::Description(format!("source metadata: {e}")))?
        .unwrap_or_default())
}

/// The packed output: each tensor as its compact pieces, described in the
/// shard's metadata.
pub struct PackedSink {
    files: ShardFiles,
    source: BTreeMap<String, String>,
    /// Descriptions of the open shard's tensors.
    descs: Vec<PackedTensor>,
}

impl PackedSink {
    /// `source` is the input's `__metadata__`.
    pub fn new(files: ShardFiles, source: BTreeMap<String, String>) -> Self {
        Self {
            files,
            source,
            descs: Vec::new(),
        }
    }
}

/// Header room for pieces, which have longer names than their tensors, and
/// for descriptions and metadata JSON-escaped inside metadata strings.
pub(crate) fn pieces_header_reserve(
    tensors: &[OutputTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> u64 {
    tensors
        .iter()
        .map(|t| header_bound(t.name, t.shape.len()) * 4 + 512)
        .sum::<u64>()
        + header_reserve([], metadata) * 2
}

impl Sink for PackedSink {
    fn begin_shard(&mut self, shard: &str, tensors: &[OutputTensor<'_>]) -> Result<(), SinkError> {
        let reserve = pieces_header_reserve(tensors, &self.source);
        Ok(self.files.begin(shard, reserve)?)
    }

    fn write_untouched(&mut self, t: OutputTensor<'_>, bytes: &[u8]) -> Result<(), SinkError> {
        self.descs.push(PackedTensor {
            name: t.name.to_string(),
            dtype: t.dtype,
            shape: t.shape.to_vec(),
            values: PackedValues::Raw { sparse: None },
        });
        Ok(self.files.append(t.name, t.dtype, t.shape, bytes)?)
    }

    fn write_processed(&mut self, t: &ProcessedTensor<'_>) -> Result<(), SinkError> {
        let (desc, pieces) = pack_tensor(t.tensor.name, t.tensor.dtype, t.processed);
        for piece in pieces {
            self.files
                .append(&piece.name, piece.dtype, &piece.shape, &piece.bytes)?;
        }
        self.descs.push(desc);
        Ok(())
    }

    fn data_bytes(&self) -> u64 {
        self.files.data_bytes()
    }

    fn finish_shard(&mut self) -> Result<(), SinkError> {
        let meta = shard_metadata(&self.source, &self.descs);
        self.descs.clear();
        Ok(self.files.finish(&meta)?)
    }

    fn finish(self: Box<Self>, config: Option<Value>) -> Result<Finished, SinkError> {
        Ok(self.files.into_finished(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::sparse::bitmask;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// [`split_zeros`] element by element.
    fn split_zeros_reference(c: &Coded) -> (Vec<u8>, Vec<u8>, [u64; 256]) {
        let mut nonzero = Vec::new();
        let mut kept = Vec::new();
        let mut zeros = [0u64; 256];
        for (i, &s) in c.symbols.iter().enumerate() {
            let zero = c.zero_symbol(i / c.group_len);
            nonzero.push(Some(s) != zero);
            if Some(s) == zero {
                zeros[usize::from(s)] += 1;
            } else {
                kept.push(s);
            }
        }
        (bitmask(&nonzero), kept, zeros)
    }

    impl Pieces for HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
        fn piece(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
            self.get(name)
                .map(|(d, s, b)| (*d, s.clone(), b.as_slice()))
        }
    }

    /// A codebook tensor of `groups` groups of `group_len` elements; the
    /// groups flagged in `with_zero` have a 0.0 entry (entry 1).
    fn codebook(symbols: Vec<u8>, group_len: usize, with_zero: &[bool]) -> Coded {
        let values = with_zero
            .iter()
            .enumerate()
            .flat_map(|(g, &z)| {
                let g = g as f32;
                [0.5 + g, if z { 0.0 } else { -1.0 - g }, 2.0 + g, -3.0]
            })
            .collect();
        Coded {
            symbols,
            bits: 2,
            group_len,
            decode: Decode::Codebook { entries: 4, values },
        }
    }

    fn coded_tensors() -> impl Strategy<Value = Coded> {
        (prop_oneof![1usize..40, 60usize..300], 1usize..12).prop_flat_map(|(group_len, groups)| {
            (
                prop::collection::vec(prop_oneof![3 => Just(1u8), 1 => 0u8..4], group_len * groups),
                prop::collection::vec(any::<bool>(), groups),
            )
                .prop_map(move |(symbols, with_zero)| codebook(symbols, group_len, &with_zero))
        })
    }

    #[test]
    fn nonzero_bits_of_every_byte_against_every_zero() {
        for zero in 0..=255u8 {
            for s in 0..=255u8 {
                let mut eight = [zero; 8];
                eight[usize::from(s % 8)] = s;
                eight[usize::from(s / 32)] = s.wrapping_add(zero);
                assert_eq!(
                    nonzero_bits(&eight, zero),
                    nonzero_bits_reference(&eight, zero),
                    "{eight:?} {zero}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn nonzero_bits_match_the_reference(
            eight in prop::array::uniform8(prop_oneof![Just(0u8), Just(0x80u8), Just(0xffu8), any::<u8>()]),
            zero in prop_oneof![Just(0u8), Just(0x80u8), Just(0xffu8), any::<u8>()],
        ) {
            prop_assert_eq!(nonzero_bits(&eight, zero), nonzero_bits_reference(&eight, zero));
        }

        #[test]
        fn split_zeros_matches_the_reference(c in coded_tensors()) {
            prop_assert_eq!(split_zeros(&c), split_zeros_reference(&c));
        }

        /// Each x86 kernel the CPU has, against the portable one: the mask
        /// bytes and their count, then the kept symbols of that mask.
        #[test]
        #[cfg(target_arch = "x86_64")]
        fn mask_and_gather_kernels_match_the_portable_ones(
            sym in prop::collection::vec(prop_oneof![Just(0u8), Just(3u8), any::<u8>()], 0..300),
            zero in prop_oneof![Just(0u8), Just(3u8)],
            all in 0u8..2,
        ) {
            use crate::cpu::has;
            let whole = sym.len() / 8 * 8;
            let mut expected = vec![0u8; whole / 8];
            let count = mask_bytes_portable(&sym[..whole], &mut expected, zero, all);
            let mut kept = vec![0u8; count];
            gather_kept_portable(&sym[..whole], &expected, &mut kept);
            type Mask = unsafe fn(&[u8], &mut [u8], u8, u8) -> usize;
            type Gather = unsafe fn(&[u8], &[u8], &mut [u8]);
            let masks: [(bool, Mask); 2] = [
                (has!("avx2"), mask_bytes_avx2),
                (has!("avx512bw"), mask_bytes_avx512),
            ];
            let gathers: [(bool, Gather); 2] = [
                (has!("ssse3") && has!("popcnt"), gather_kept_ssse3),
                (has!("avx512vbmi2"), gather_kept_avx512),
            ];
            for (_, kernel) in masks.into_iter().filter(|&(present, _)| present) {
                let mut mask = vec![0u8; whole / 8];
                // SAFETY: the CPU has the kernel's features, checked above.
                let n = unsafe { kernel(&sym[..whole], &mut mask, zero, all) };
                prop_assert_eq!(n, count);
                prop_assert_eq!(&mask, &expected);
            }
            for (_, kernel) in gathers.into_iter().filter(|&(present, _)| present) {
                let mut out = vec![0xeeu8; count];
                // SAFETY: as above.
                unsafe { kernel(&sym[..whole], &expected, &mut out) };
                prop_assert_eq!(&out, &kept);
            }
        }

        #[test]
        fn packed_codebook_tensors_unpack_to_their_values(
            c in coded_tensors(),
            huffman in any::<bool>(),
        ) {
            let n = c.symbols.len();
            let expected = c.decode();
            let p = Processed {
                shape: vec![n / c.group_len, c.group_len],
                values: Values::Coded(c),
                encode: Some(if huffman { Entropy::Huffman } else { Entropy::None }),
                applied: Vec::new(),
                seconds: Vec::new(),
                output_error: None,
            };
            let (desc, pieces) = pack_tensor("t", Dtype::F32, &p);
            let stored: HashMap<_, _> = pieces
                .into_iter()
                .map(|piece| (piece.name, (piece.dtype, piece.shape, piece.bytes.into_owned())))
                .collect();
            let bytes = unpack_tensor(&desc, &stored).unwrap();
            let mut values = vec![0.0f32; n];
            to_f32(Dtype::F32, &bytes, &mut values);
            prop_assert_eq!(
                values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn split_zeros_over_many_parallel_chunks_matches_the_reference() {
        // Groups that straddle chunk and byte boundaries.
        let group_len = SPLIT_CHUNK / 3 + 5;
        let groups = 7;
        let symbols = (0..group_len * groups)
            .map(|i| ((i * 7919) % 5 % 4) as u8)
            .collect();
        let c = codebook(
            symbols,
            group_len,
            &[true, false, true, true, false, true, true],
        );
        assert_eq!(split_zeros(&c), split_zeros_reference(&c));
    }
}
