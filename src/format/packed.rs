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

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::dtype::{from_f32, to_f32, Dtype};
use crate::compress::bitpack::{pack_lsb, unpack_lsb};
use crate::compress::coded::{Coded, Decode, MatrixShape};
use crate::compress::huffman::{frequencies, Huffman};
use crate::compress::lowrank::{product, LowRank};
use crate::compress::sparse::{decode_positions, encode_positions, positions_bytes, Positions};
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

/// One stored piece.
pub struct Piece<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> Piece<'a> {
    fn new(name: String, dtype: Dtype, shape: Vec<usize>, bytes: impl Into<Cow<'a, [u8]>>) -> Self {
        Self {
            name,
            dtype,
            shape,
            bytes: bytes.into(),
        }
    }

    fn bytes1d(name: String, bytes: Vec<u8>) -> Self {
        let n = bytes.len();
        Self::new(name, Dtype::U8, vec![n], bytes)
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
    let packed = (symbols.len() * usize::from(bits)).div_ceil(8);
    if entropy == Some(Entropy::Huffman) && !symbols.is_empty() {
        let freqs = frequencies(symbols);
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
fn store_stream(
    symbols: &[u8],
    bits: u8,
    plan: StreamPlan,
    prefix: &str,
    piece: &str,
    pieces: &mut Vec<Piece<'static>>,
) -> Coding {
    if let Some(code) = plan.code {
        if let Ok(stream) = code.encode(symbols) {
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
        pack_lsb(symbols, bits),
    ));
    Coding::Bitpacked
}

fn store_symbols(
    symbols: &[u8],
    bits: u8,
    plan: StreamPlan,
    prefix: &str,
    pieces: &mut Vec<Piece<'static>>,
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
    fn new(nonzero: &[bool], entropy: Option<Entropy>) -> Self {
        let positions = encode_positions(nonzero);
        let gaps = match &positions {
            Positions::Relative { bits, gaps } => Some(plan_stream(gaps, *bits, entropy)),
            Positions::Bitmask { .. } => None,
        };
        Self {
            positions,
            gaps,
            nonzeros: nonzero.iter().filter(|&&b| b).count(),
        }
    }

    fn bytes(&self) -> usize {
        match &self.gaps {
            Some(plan) => plan.bytes,
            None => positions_bytes(&self.positions),
        }
    }

    fn store(self, prefix: &str, pieces: &mut Vec<Piece<'static>>) -> SparseDesc {
        let nonzeros = self.nonzeros;
        match (self.positions, self.gaps) {
            (Positions::Relative { bits, gaps }, Some(plan)) => {
                let coding = store_stream(&gaps, bits, plan, prefix, "positions", pieces);
                SparseDesc::Relative {
                    nonzeros,
                    bits,
                    gaps: gaps.len(),
                    coding,
                }
            }
            (Positions::Relative { bits, gaps }, None) => {
                pieces.push(Piece::bytes1d(
                    format!("{prefix}:positions"),
                    pack_lsb(&gaps, bits),
                ));
                SparseDesc::Relative {
                    nonzeros,
                    bits,
                    gaps: gaps.len(),
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
    let plan = PositionsPlan::new(&nonzero, entropy);
    (plan.bytes() < zeros * dtype.bitsize() / 8).then_some(plan)
}

/// Splits a processed tensor into pieces. `original` is the tensor's bytes
/// in the input, used when it passes through untouched.
pub fn pack_tensor<'a>(
    name: &str,
    dtype: Dtype,
    p: &Processed,
    original: Option<&'a [u8]>,
) -> (PackedTensor, Vec<Piece<'a>>) {
    let mut pieces: Vec<Piece<'static>> = Vec::new();
    let sparse_raw = match (&p.values, p.encode) {
        (Values::Raw(v), Some(entropy)) => raw_sparse_plan(dtype, v, Some(entropy)),
        _ => None,
    };
    let values = match (&p.values, sparse_raw) {
        (Values::Raw(v), None) => {
            let bytes: Cow<'a, [u8]> = match original {
                Some(b) if p.applied.is_empty() => Cow::Borrowed(b),
                _ => Cow::Owned(dtype_bytes(dtype, v)),
            };
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
                dtype_bytes(dtype, &kept),
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
                dtype_bytes(dtype, &lr.a),
            ));
            pieces.push(Piece::new(
                format!("{name}:b"),
                dtype,
                vec![lr.rank, m.cols],
                dtype_bytes(dtype, &lr.b),
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
    (desc, pieces.into_iter().map(|p| p.into_static()).collect())
}

impl Piece<'_> {
    fn into_static<'b>(self) -> Piece<'b> {
        Piece {
            name: self.name,
            dtype: self.dtype,
            shape: self.shape,
            bytes: Cow::Owned(self.bytes.into_owned()),
        }
    }
}

fn dtype_bytes(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * dtype.bitsize() / 8];
    from_f32(dtype, v, &mut out);
    out
}

fn pack_coded(
    name: &str,
    c: &Coded,
    encode: Option<Entropy>,
    pieces: &mut Vec<Piece<'static>>,
) -> PackedValues {
    let gl = c.group_len.max(1);
    // Sparse storage drops elements that hold their group's zero symbol,
    // when that is smaller than storing every symbol.
    let mut sparse = None;
    if encode.is_some() {
        let zero_of: Vec<Option<u8>> = (0..c.groups()).map(|g| c.zero_symbol(g)).collect();
        let mut nonzero = vec![false; c.symbols.len()];
        nonzero
            .par_chunks_mut(gl)
            .zip(c.symbols.par_chunks(gl))
            .zip(&zero_of)
            .for_each(|((nz, sym), &zero)| {
                for (nz, &s) in nz.iter_mut().zip(sym) {
                    *nz = Some(s) != zero;
                }
            });
        let kept: Vec<u8> = c
            .symbols
            .iter()
            .zip(&nonzero)
            .filter_map(|(&s, &nz)| nz.then_some(s))
            .collect();
        if kept.len() < c.symbols.len() {
            let dense = plan_stream(&c.symbols, c.bits, encode);
            let positions = PositionsPlan::new(&nonzero, encode);
            let sparse_symbols = plan_stream(&kept, c.bits, encode);
            if sparse_symbols.bytes + positions.bytes() >= dense.bytes {
                let symbols = store_symbols(&c.symbols, c.bits, dense, name, pieces);
                return finish_coded(name, c, symbols, None, pieces);
            }
            let desc = positions.store(name, pieces);
            sparse = Some((desc, kept, sparse_symbols));
        }
    }
    let (symbols, sparse) = match sparse {
        Some((desc, kept, plan)) => (store_symbols(&kept, c.bits, plan, name, pieces), Some(desc)),
        None => {
            let plan = plan_stream(&c.symbols, c.bits, encode);
            (store_symbols(&c.symbols, c.bits, plan, name, pieces), None)
        }
    };
    finish_coded(name, c, symbols, sparse, pieces)
}

/// Adds the decode parameters of a coded tensor and describes it.
fn finish_coded(
    name: &str,
    c: &Coded,
    symbols: SymbolsDesc,
    sparse: Option<SparseDesc>,
    pieces: &mut Vec<Piece<'static>>,
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
    Ok(dtype_bytes(desc.dtype, &values))
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
