//! Tensors whose stages work row by row, processed and measured in blocks
//! of rows that stay in the CPU's cache.
//!
//! Quantizing a large tensor and then measuring its fidelity reads the
//! tensor from memory twice; the second read (the fidelity's) cost about as
//! much as the quantization itself. When every stage on the tensor decides
//! each row (or group within a row) from that row alone, the tensor is cut
//! into blocks of whole rows of about [`BLOCK_ELEMENTS`] elements, each block
//! is quantized and immediately measured, and the blocks' symbols and
//! parameters are joined: the same symbols and parameters, bit for bit, as
//! the whole tensor at once ([`process_with_stats`]).
//!
//! Blocks are whole multiples of the fidelity's chunk ([`metrics::CHUNK`]),
//! so each chunk's sums are the ones the whole-tensor measurement takes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use super::calibrate::FactorCache;
use super::coded::{Decode, Granularity, MatrixShape};
use super::metrics::{self, Fidelity, Sums};
use super::spec::{Calibration, Pipeline, Stage, ValueStage};
use super::tensor::{process_with_stats, Processed, TensorError, Values};

/// The size of a block, in elements: 1 MiB of f32, well inside a core's L2.
pub const BLOCK_ELEMENTS: usize = 1 << 18;

/// Rows per block for a matrix with `cols` columns: a multiple of the rows
/// that make whole fidelity chunks, about [`BLOCK_ELEMENTS`] elements. None
/// when even the smallest such block is far larger (odd column counts).
fn block_rows(cols: usize) -> Option<usize> {
    if cols == 0 {
        return None;
    }
    let unit = metrics::CHUNK / gcd(cols, metrics::CHUNK);
    let unit_elements = unit.checked_mul(cols)?;
    (unit_elements <= 4 * BLOCK_ELEMENTS).then(|| unit * (BLOCK_ELEMENTS / unit_elements).max(1))
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The granularity of the one value stage when every stage of
/// `stage_indices` decides each row from that row alone and keeps no state
/// across tensors: integer quantization or fp8, per channel or per group,
/// without calibration, optionally followed by `encode`.
fn works_row_by_row(pipeline: &Pipeline, stage_indices: &[usize]) -> Option<Granularity> {
    let mut value = None;
    for &i in stage_indices {
        let g = match &pipeline.stages()[i] {
            Stage::Value(ValueStage::Int(q), _)
                if matches!(pipeline.calibration(i), Calibration::None) =>
            {
                q.granularity
            }
            Stage::Value(ValueStage::Fp8(g), _) => *g,
            Stage::Encode(..) => continue,
            _ => return None,
        };
        if g == Granularity::Tensor || value.replace(g).is_some() {
            return None;
        }
    }
    value
}

/// [`process_with_stats`] without statistics, plus the fidelity of the
/// values rounded by `round_to_storage` against `values`, done block by
/// block of rows; None when the stages do not work row by row or the tensor
/// is too small to gain from it (the caller then takes the whole-tensor path).
pub fn process_measured(
    name: &str,
    values: &[f32],
    shape: &[usize],
    pipeline: &Pipeline,
    stage_indices: &[usize],
    round_to_storage: &(dyn Fn(&mut [f32]) + Sync),
) -> Option<Result<(Processed, Fidelity), TensorError>> {
    let matrix = MatrixShape::of(shape)?;
    if values.len() != matrix.len() || values.len() < 2 * BLOCK_ELEMENTS {
        return None;
    }
    let granularity = works_row_by_row(pipeline, stage_indices)?;
    let rows = block_rows(matrix.cols)?;
    let group_len = granularity.group_len(matrix).max(1);
    let started = Instant::now();
    let factors = FactorCache::default();
    let block_len = rows * matrix.cols;
    let groups = values.len() / group_len;
    // Each block's symbols and parameters go straight into their place in
    // the tensor's (blocks are whole rows, so whole groups), while they are
    // still in the cache; nothing the size of the tensor is held twice.
    let mut symbols: Vec<u8> = Vec::with_capacity(values.len());
    let mut scales: Vec<f32> = Vec::with_capacity(groups);
    let mut zeros: Vec<i32> = Vec::with_capacity(groups);
    let with_zero_points = AtomicBool::new(false);
    let parts: Result<Vec<(Processed, Sums)>, TensorError> = values
        .par_chunks(block_len)
        .zip(symbols.spare_capacity_mut()[..values.len()].par_chunks_mut(block_len))
        .zip(scales.spare_capacity_mut()[..groups].par_chunks_mut(block_len / group_len))
        .zip(zeros.spare_capacity_mut()[..groups].par_chunks_mut(block_len / group_len))
        .map(|(((block, symbol_place), scale_place), zero_place)| {
            let block_shape = [block.len() / matrix.cols, matrix.cols];
            let mut p = process_with_stats(
                name,
                block,
                &block_shape,
                pipeline,
                stage_indices,
                None,
                round_to_storage,
                &mut Vec::new(),
                None,
                &factors,
            )?;
            let Values::Coded(c) = &mut p.values else {
                unreachable!("a value stage codes the tensor")
            };
            let sums = metrics::sums_with(block, |start, out| {
                c.decode_range(start, out);
                round_to_storage(out);
            });
            symbol_place.write_copy_of_slice(&c.symbols);
            c.symbols = Vec::new();
            match &mut c.decode {
                Decode::Affine {
                    scales,
                    zero_points,
                } => {
                    scale_place.write_copy_of_slice(scales);
                    if !zero_points.is_empty() {
                        zero_place.write_copy_of_slice(zero_points);
                        with_zero_points.store(true, Ordering::Relaxed);
                    }
                    *scales = Vec::new();
                    *zero_points = Vec::new();
                }
                Decode::Fp8 { scales } => {
                    scale_place.write_copy_of_slice(scales);
                    *scales = Vec::new();
                }
                Decode::Codebook { .. } => unreachable!("no row-by-row stage shares"),
            }
            Ok((p, sums))
        })
        .collect();
    let parts = match parts {
        Ok(parts) => parts,
        Err(e) => return Some(Err(e)),
    };
    let sums = parts
        .iter()
        .fold(Sums::default(), |acc, (_, s)| acc.merge(*s));
    let mut whole = parts.into_iter().next()?.0;
    let Values::Coded(mut coded) = std::mem::replace(&mut whole.values, Values::Raw(Vec::new()))
    else {
        unreachable!("a value stage codes the tensor")
    };
    // SAFETY: the blocks cover every element and every group, and each
    // wrote its whole place (`write_copy_of_slice` panics on a length
    // mismatch, before these lines): symbols one per element, scales one
    // per group, zero points one per group when the stage has them.
    unsafe {
        symbols.set_len(values.len());
        scales.set_len(groups);
    }
    coded.symbols = symbols;
    coded.decode = match coded.decode {
        Decode::Affine { .. } => {
            if with_zero_points.load(Ordering::Relaxed) {
                // SAFETY: as above; the stage is asymmetric, so every block
                // wrote a zero point per group.
                unsafe { zeros.set_len(groups) };
            }
            Decode::Affine {
                scales,
                zero_points: zeros,
            }
        }
        Decode::Fp8 { .. } => Decode::Fp8 { scales },
        Decode::Codebook { .. } => unreachable!("no row-by-row stage shares"),
    };
    whole.values = Values::Coded(coded);
    whole.shape = shape.to_vec();
    // The blocks ran side by side: the stage took the whole wall time.
    let seconds = started.elapsed().as_secs_f64();
    for (i, s) in &mut whole.seconds {
        if matches!(pipeline.stages()[*i], Stage::Value(..)) {
            *s = seconds;
        }
    }
    Some(Ok((whole, sums.finish(values.len()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::metrics::fidelity_with;
    use crate::compress::tensor::process;

    fn parse(json: &str) -> Result<Pipeline, crate::compress::spec::PipelineError> {
        Pipeline::from_json(json)
    }

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let x = (i as f32 * 0.618_034).fract() - 0.5;
                // A few large values, so scales differ from row to row.
                if i % 997 == 0 {
                    x * 40.0
                } else {
                    x
                }
            })
            .collect()
    }

    fn bf16(v: &mut [f32]) {
        for x in v {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }

    /// Every row-by-row pipeline gives, block by block, the whole tensor's
    /// symbols and parameters bit for bit and its fidelity, for column
    /// counts that make blocks of one chunk unit and of many.
    #[test]
    fn blocks_give_the_whole_tensors_values_and_fidelity() {
        let pipelines = [
            r#"{"stages":[{"stage":"quantize","bits":8,"symmetric":true,"granularity":"channel"}]}"#,
            r#"{"stages":[{"stage":"quantize","bits":4,"symmetric":true,"granularity":"group","group_size":128,"scale_search":"mse"}]}"#,
            r#"{"stages":[{"stage":"quantize","bits":3,"symmetric":false,"granularity":"group","group_size":64},{"stage":"encode","entropy":"huffman"}]}"#,
            r#"{"stages":[{"stage":"quantize","type":"fp8","granularity":"channel"}]}"#,
        ];
        for json in pipelines {
            let pipeline = parse(json).unwrap();
            for (rows, cols) in [(200, 4096), (700, 1088), (64, 11008)] {
                let shape = [rows, cols];
                let w = weights(rows, cols);
                let stages = pipeline.stages_for("w", &shape, true);
                let round: &(dyn Fn(&mut [f32]) + Sync) = &bf16;
                let (blocked, fid) = process_measured("w", &w, &shape, &pipeline, &stages, round)
                    .expect("the pipeline works row by row")
                    .unwrap();
                let whole = process(
                    "w",
                    &w,
                    &shape,
                    &pipeline,
                    &stages,
                    None,
                    round,
                    &mut Vec::new(),
                )
                .unwrap();
                let (Values::Coded(a), Values::Coded(b)) = (&blocked.values, &whole.values) else {
                    panic!("coded values expected")
                };
                assert!(
                    a == b,
                    "{json} on {rows}x{cols}: blocks differ from the whole"
                );
                assert_eq!(blocked.shape, whole.shape);
                assert_eq!(blocked.applied, whole.applied);
                assert_eq!(blocked.encode, whole.encode);
                let want = fidelity_with(&w, |start, out| {
                    b.decode_range(start, out);
                    bf16(out);
                });
                assert_eq!(fid.sparsity, want.sparsity);
                assert_eq!(fid.max_abs_error, want.max_abs_error);
                for (x, y) in [
                    (fid.mse, want.mse),
                    (fid.cosine.unwrap(), want.cosine.unwrap()),
                ] {
                    assert!((x - y).abs() <= 1e-12 * y.abs(), "{json}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn other_stages_and_small_tensors_take_the_whole_tensor_path() {
        let shape = [512, 4096];
        let w = weights(512, 4096);
        let round: &(dyn Fn(&mut [f32]) + Sync) = &|_: &mut [f32]| {};
        for json in [
            r#"{"stages":[{"stage":"quantize","bits":8,"granularity":"tensor"}]}"#,
            r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.5},{"stage":"quantize","bits":8}]}"#,
            r#"{"stages":[{"stage":"share","clusters":4}]}"#,
            r#"{"stages":[{"stage":"binarize","levels":2}]}"#,
        ] {
            let p = parse(json).unwrap();
            let stages = p.stages_for("w", &shape, true);
            assert!(
                process_measured("w", &w, &shape, &p, &stages, round).is_none(),
                "{json}"
            );
        }
        let p = parse(r#"{"stages":[{"stage":"quantize","bits":8}]}"#).unwrap();
        let small = [64, 4096];
        let stages = p.stages_for("w", &small, true);
        assert!(process_measured("w", &w[..64 * 4096], &small, &p, &stages, round).is_none());
    }

    #[test]
    fn block_rows_make_whole_chunks() {
        for cols in [1, 7, 128, 1088, 4096, 4097, 11008, 1 << 20] {
            match block_rows(cols) {
                Some(r) => {
                    assert_eq!(r * cols % metrics::CHUNK, 0, "{cols}");
                    assert!(r * cols <= 4 * BLOCK_ELEMENTS, "{cols}");
                }
                None => assert_eq!(cols, 4097),
            }
        }
    }
}
