//! The compressed-tensors layout that vLLM and llm-compressor load.
//!
//! A quantized layer `L` (tensor `L.weight`) is stored as
//! - `pack-quantized` (integer weights, 2, 4 or 8 bits): `L.weight_packed` I32 — each row's values,
//!   offset to unsigned (`q + 2^(b-1)`), packed densely LSB-first into
//!   little-endian 32-bit words, the row padded to a whole word — plus
//!   `L.weight_shape` I64 `[rows, cols]`, `L.weight_scale`, and for
//!   asymmetric schemes `L.weight_zero_point` packed the same way along the
//!   rows;
//! - `float-quantized` (FP8 E4M3): `L.weight` F8_E4M3 and `L.weight_scale`.
//!
//! Integer weights are always `pack-quantized`, 8-bit ones included: the
//! modelpress pipelines quantize weights only, and compressed-tensors keeps
//! `int-quantized` for schemes that also quantize activations (its
//! dequantizer infers `pack-quantized` for weight-only integer schemes).
//! Widths that do not divide 32 are refused: compressed-tensors 0.20 packs
//! them across word boundaries while earlier readers and vLLM put `32 / bits`
//! values in each word, so such a file would not mean the same to all.
//!
//! Scales have compressed-tensors' shapes: `[1]` per tensor, `[rows, 1]` per
//! channel, `[rows, cols / group_size]` per group. Everything else passes
//! through, and `quantization_config` (for `config.json`) lists one config
//! group per quantize stage. Which layers are quantized by default and how
//! the config names them is [`super::ct_targets`]'s business.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::ct_targets::{self, Layout};
use super::dtype::Dtype;
use super::packed::{pieces_header_reserve, Piece};
use super::sink::{
    encode_f32, Finished, OutputTensor, ProcessedTensor, ShardFiles, Sink, SinkError,
};
use crate::compress::bitpack::pack_lsb;
use crate::compress::coded::{Decode, Granularity, MatrixShape};
use crate::compress::quantize::{IntQuant, ScaleSearch};
use crate::compress::spec::{Pipeline, Stage, TensorShape, ValueStage};
use crate::compress::tensor::{Processed, Values};

/// The pipeline this format runs (stages without `targets` narrowed to
/// linear layers, see [`ct_targets`]) and the collector of its layers;
/// refuses, before any work, a pipeline this layout cannot hold.
pub fn prepare(
    pipeline: &Pipeline,
    tensors: &[TensorShape<'_>],
    config: Option<&Value>,
) -> Result<(Pipeline, Layers), String> {
    let layout = Layout::new(tensors, config);
    let narrowed = ct_targets::narrow(pipeline, tensors, &layout)?;
    check_expressible(&narrowed, tensors)?;
    Ok((
        narrowed,
        Layers {
            layout,
            ..Layers::default()
        },
    ))
}

/// Refuses a pipeline this layout cannot hold.
fn check_expressible(pipeline: &Pipeline, tensors: &[TensorShape<'_>]) -> Result<(), String> {
    for (i, s) in pipeline.stages().iter().enumerate() {
        match s {
            Stage::LowRank(..) | Stage::Encode(..) => {
                return Err(format!(
                    "stage {i} ({}) has no compressed-tensors form; use the packed format",
                    s.kind()
                ))
            }
            Stage::Value(ValueStage::Share(_) | ValueStage::Binarize(_), _) => {
                return Err(format!(
                    "stage {i} ({}) has no compressed-tensors form; use the packed format",
                    s.kind()
                ))
            }
            Stage::Value(ValueStage::Int(q), _) if 32 % q.bits != 0 => {
                return Err(format!(
                    "stage {i} (quantize) uses {} bits; compressed-tensors readers agree on the packing of 2, 4 and 8 bits only",
                    q.bits
                ))
            }
            _ => {}
        }
    }
    let formats: std::collections::BTreeSet<&str> = pipeline
        .stages()
        .iter()
        .filter_map(|s| match s {
            Stage::Value(v, _) => Some(format_of(v)),
            _ => None,
        })
        .collect();
    if formats.len() > 1 {
        return Err(format!(
            "quantize stages map to several compressed-tensors formats ({}); use one kind of quantization per pipeline",
            formats.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    for t in tensors {
        for i in pipeline.stages_for(t.name, t.shape, t.is_float) {
            if let Stage::Value(..) = &pipeline.stages()[i] {
                if t.shape.len() != 2 || !t.name.ends_with(".weight") {
                    return Err(format!(
                        "stage {i} quantizes `{}` (shape {:?}), but compressed-tensors quantizes 2-D `<layer>.weight` tensors only; exclude it with `ignore`",
                        t.name, t.shape
                    ));
                }
            }
        }
    }
    Ok(())
}

fn format_of(v: &ValueStage) -> &'static str {
    match v {
        ValueStage::Int(_) => "pack-quantized",
        ValueStage::Fp8(_) => "float-quantized",
        ValueStage::Share(_) | ValueStage::Binarize(_) => "none",
    }
}

/// What the layers of the model became, gathered while writing, for
/// `quantization_config`.
#[derive(Default)]
pub struct Layers {
    layout: Layout,
    /// Quantize stage index → layer names.
    quantized: BTreeMap<usize, Vec<String>>,
    /// Layers with a 2-D float weight left unquantized.
    unquantized: Vec<String>,
    /// n:m sparsity seen on quantized layers.
    structured: Option<(usize, usize)>,
    sparse_layers: Vec<String>,
}

fn layer_of(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// Packs each row of symbols densely into whole little-endian 32-bit words.
fn pack_rows(symbols: &[u8], bits: u8, rows: usize, cols: usize) -> (Cow<'_, [u8]>, usize) {
    let words = (cols * usize::from(bits)).div_ceil(32);
    if (cols * usize::from(bits)).is_multiple_of(32) {
        // Rows fill whole words: the rows' streams are one stream, which
        // at 8 bits is the symbols themselves.
        let all = &symbols[..rows * cols];
        return match bits {
            8 => (Cow::Borrowed(all), words),
            _ => (Cow::Owned(pack_lsb(all, bits)), words),
        };
    }
    let mut out = Vec::with_capacity(rows * words * 4);
    for r in 0..rows {
        let mut row = pack_lsb(&symbols[r * cols..(r + 1) * cols], bits);
        row.resize(words * 4, 0);
        out.extend_from_slice(&row);
    }
    (Cow::Owned(out), words)
}

impl Layers {
    /// Records a tensor that passes through unchanged.
    pub fn unquantized(&mut self, name: &str, shape: &[usize], is_float: bool) {
        if is_float && shape.len() == 2 && name.ends_with(".weight") {
            self.unquantized.push(layer_of(name).to_string());
        }
    }

    /// The stored pieces of one processed tensor.
    pub fn pieces<'a>(
        &mut self,
        name: &str,
        dtype: Dtype,
        p: &'a Processed,
        pipeline: &Pipeline,
        stage_idx: &[usize],
    ) -> Result<Vec<Piece<'a>>, String> {
        let value_stage = stage_idx
            .iter()
            .copied()
            .find(|&i| matches!(pipeline.stages()[i], Stage::Value(..)));
        for &i in stage_idx {
            // Whatever picked the weights (magnitude, wanda, sparsegpt), an
            // n:m pattern is what the format records.
            if let Some((n, m)) = match &pipeline.stages()[i] {
                Stage::Prune(kind, _) => kind.n_m(),
                _ => None,
            } {
                self.structured = Some((n, m));
                self.sparse_layers.push(layer_of(name).to_string());
            }
        }
        let (Some(si), Values::Coded(c)) = (value_stage, &p.values) else {
            self.unquantized(name, &p.shape, dtype.is_float_weight());
            let Values::Raw(values) = &p.values else {
                return Err(format!(
                    "`{name}`: this stage has no compressed-tensors form"
                ));
            };
            let bytes = encode_f32(dtype, values);
            return Ok(vec![piece(name.to_string(), dtype, p.shape.clone(), bytes)]);
        };
        let m = MatrixShape::of(&p.shape).ok_or_else(|| format!("`{name}`: shape overflows"))?;
        let layer = layer_of(name);
        self.quantized
            .entry(si)
            .or_default()
            .push(layer.to_string());
        let Stage::Value(v, _) = &pipeline.stages()[si] else {
            unreachable!("value_stage selects a Stage::Value")
        };
        let granularity = match v {
            ValueStage::Int(q) => q.granularity,
            ValueStage::Fp8(g) => *g,
            _ => {
                return Err(format!(
                    "`{name}`: this stage has no compressed-tensors form"
                ))
            }
        };
        let scale_shape = match granularity {
            Granularity::Tensor => vec![1],
            Granularity::Channel => vec![m.rows, 1],
            Granularity::Group(g) => vec![m.rows, m.cols / g],
        };
        let mut out = Vec::new();
        match (&c.decode, v) {
            (
                Decode::Affine {
                    scales,
                    zero_points,
                },
                ValueStage::Int(q),
            ) => {
                out.push(piece(
                    format!("{layer}.weight_scale"),
                    Dtype::F32,
                    scale_shape.clone(),
                    le_bytes(scales, f32::to_le_bytes),
                ));
                let (packed, words) = pack_rows(&c.symbols, q.bits, m.rows, m.cols);
                out.insert(
                    0,
                    piece(
                        format!("{layer}.weight_packed"),
                        Dtype::I32,
                        vec![m.rows, words],
                        packed,
                    ),
                );
                out.insert(
                    1,
                    piece(
                        format!("{layer}.weight_shape"),
                        Dtype::I64,
                        vec![2],
                        le_bytes(&[m.rows as i64, m.cols as i64], i64::to_le_bytes),
                    ),
                );
                if !zero_points.is_empty() {
                    out.push(pack_zero_points(layer, zero_points, q, scale_shape)?);
                }
            }
            (Decode::Fp8 { scales }, ValueStage::Fp8(_)) => {
                out.push(piece(
                    name.to_string(),
                    Dtype::F8_E4M3,
                    p.shape.clone(),
                    &c.symbols[..],
                ));
                out.push(piece(
                    format!("{layer}.weight_scale"),
                    Dtype::F32,
                    scale_shape,
                    le_bytes(scales, f32::to_le_bytes),
                ));
            }
            _ => {
                return Err(format!(
                    "`{name}`: unexpected encoding for compressed-tensors"
                ))
            }
        }
        Ok(out)
    }

    /// The `quantization_config` block for `config.json`.
    pub fn quantization_config_for(&self, pipeline: &Pipeline) -> Value {
        let layer_lists: Vec<&[String]> = self.quantized.values().map(Vec::as_slice).collect();
        let naming = ct_targets::naming(&self.layout, &layer_lists, &self.unquantized);
        let mut groups = serde_json::Map::new();
        let mut format = "dense";
        for (n, ((si, _), targets)) in self.quantized.iter().zip(&naming.targets).enumerate() {
            let Stage::Value(v, _) = &pipeline.stages()[*si] else {
                continue;
            };
            format = format_of(v);
            let weights = match v {
                ValueStage::Int(q) => int_args(q),
                ValueStage::Fp8(g) => json!({
                    "num_bits": 8, "type": "float", "symmetric": true,
                    "strategy": strategy(*g), "group_size": null,
                    "dynamic": false, "actorder": null, "block_structure": null,
                    "observer": "minmax",
                }),
                _ => continue,
            };
            groups.insert(
                format!("group_{n}"),
                json!({
                    "targets": targets,
                    "weights": weights,
                    "input_activations": null,
                    "output_activations": null,
                    "format": format,
                }),
            );
        }
        let mut config = json!({
            "quant_method": "compressed-tensors",
            "format": format,
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": naming.ignore,
            "kv_cache_scheme": null,
            "global_compression_ratio": null,
        });
        if let Some((n, m)) = self.structured {
            config["sparsity_config"] = json!({
                "format": "dense",
                "sparsity_structure": format!("{n}:{m}"),
                "targets": self.sparse_layers.iter().map(|l| self.layout.pattern(l)).collect::<Vec<_>>(),
                "ignore": [],
                "global_sparsity": null,
            });
        }
        config
    }
}

fn strategy(g: Granularity) -> &'static str {
    match g {
        Granularity::Tensor => "tensor",
        Granularity::Channel => "channel",
        Granularity::Group(_) => "group",
    }
}

fn int_args(q: &IntQuant) -> Value {
    json!({
        "num_bits": q.bits,
        "type": "int",
        "symmetric": q.symmetric,
        "strategy": strategy(q.granularity),
        "group_size": match q.granularity { Granularity::Group(g) => Some(g), _ => None },
        "dynamic": false,
        "actorder": null,
        "block_structure": null,
        "observer": match q.scale_search { ScaleSearch::MinMax => "minmax", ScaleSearch::Mse => "mse" },
    })
}

/// Asymmetric zero points of pack-quantized layers are packed like the
/// weights, but along the rows (`packed_dim=0`); per-tensor ones stay I8.
fn pack_zero_points(
    layer: &str,
    zero_points: &[i32],
    q: &IntQuant,
    scale_shape: Vec<usize>,
) -> Result<Piece<'static>, String> {
    let name = format!("{layer}.weight_zero_point");
    if scale_shape.len() == 1 {
        let zp: Vec<u8> = zero_points.iter().map(|&z| z as i8 as u8).collect();
        return Ok(piece(name, Dtype::I8, scale_shape, zp));
    }
    let (rows, groups) = (scale_shape[0], scale_shape[1]);
    let offset = 1i32 << (q.bits - 1);
    // Column g of the zero-point matrix becomes one packed "row".
    let mut transposed = vec![0u8; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            transposed[g * rows + r] = (zero_points[r * groups + g] + offset) as u8;
        }
    }
    let (packed, words) = pack_rows(&transposed, q.bits, groups, rows);
    // Back to [words, groups], row-major.
    let mut out = vec![0u8; packed.len()];
    for g in 0..groups {
        for w in 0..words {
            let src = (g * words + w) * 4;
            let dst = (w * groups + g) * 4;
            out[dst..dst + 4].copy_from_slice(&packed[src..src + 4]);
        }
    }
    Ok(piece(name, Dtype::I32, vec![words, groups], out))
}

fn piece<'a>(
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: impl Into<Cow<'a, [u8]>>,
) -> Piece<'a> {
    Piece::new(name, dtype, shape, bytes)
}

/// The compressed-tensors output: quantized layers as compressed-tensors
/// pieces, everything else as in the input, and `quantization_config` in
/// `config.json`.
pub struct CompressedTensorsSink<'p> {
    files: ShardFiles,
    /// The input's `__metadata__`, kept in every shard.
    metadata: BTreeMap<String, String>,
    pipeline: &'p Pipeline,
    layers: Layers,
}

impl<'p> CompressedTensorsSink<'p> {
    pub fn new(
        files: ShardFiles,
        metadata: BTreeMap<String, String>,
        pipeline: &'p Pipeline,
        layers: Layers,
    ) -> Self {
        Self {
            files,
            metadata,
            pipeline,
            layers,
        }
    }
}

impl Sink for CompressedTensorsSink<'_> {
    fn begin_shard(&mut self, shard: &str, tensors: &[OutputTensor<'_>]) -> Result<(), SinkError> {
        let reserve = pieces_header_reserve(tensors, &self.metadata);
        Ok(self.files.begin(shard, reserve)?)
    }

    fn write_untouched(&mut self, t: OutputTensor<'_>, bytes: &[u8]) -> Result<(), SinkError> {
        self.layers
            .unquantized(t.name, t.shape, t.dtype.is_float_weight());
        Ok(self.files.append(t.name, t.dtype, t.shape, bytes)?)
    }

    fn write_processed(&mut self, t: &ProcessedTensor<'_>) -> Result<(), SinkError> {
        let pieces = self
            .layers
            .pieces(
                t.tensor.name,
                t.tensor.dtype,
                t.processed,
                self.pipeline,
                t.stages,
            )
            .map_err(SinkError::Unexpressible)?;
        for piece in pieces {
            self.files
                .append(&piece.name, piece.dtype, &piece.shape, &piece.bytes)?;
        }
        Ok(())
    }

    fn data_bytes(&self) -> u64 {
        self.files.data_bytes()
    }

    fn finish_shard(&mut self) -> Result<(), SinkError> {
        let mut meta = self.metadata.clone();
        meta.insert("format".into(), "pt".into());
        Ok(self.files.finish(&meta)?)
    }

    /// Adds `quantization_config` to `config` (an empty object when the
    /// input has none).
    fn finish(self: Box<Self>, config: Option<Value>) -> Result<Finished, SinkError> {
        let mut config = config.unwrap_or_else(|| json!({}));
        let qc = self.layers.quantization_config_for(self.pipeline);
        config
            .as_object_mut()
            .ok_or(SinkError::ConfigNotObject)?
            .insert("quantization_config".into(), qc);
        Ok(self.files.into_finished(Some(config)))
    }
}
