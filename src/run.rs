//! Running a pipeline over a checkpoint on disk: the one function behind
//! `modelpress compress` and the service's workers.
//!
//! Tensors are processed one at a time from the memory-mapped input (kernels
//! parallelize within a tensor), so memory stays bounded by a few copies of
//! the largest tensor whatever the model's size. Output goes to a staging
//! directory inside the destination and is moved into place only when
//! everything is written; on error or cancellation nothing is left behind.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::compress::calibrate::output_error;
use crate::compress::metrics::{fidelity, fidelity_with};
use crate::compress::prune::GlobalThreshold;
use crate::compress::report::{Report, TensorReport, Totals, REPORT_VERSION};
use crate::compress::spec::{Pipeline, PruneKind, SpecError, Stage, TensorShape};
use crate::compress::structural::{self, Plan, StructuralError, TensorSource};
use crate::compress::tensor::{process_with_stats, TensorCut, TensorError, Values};
use crate::format::checkpoint::{Checkpoint, FormatError};
use crate::format::compressed_tensors as ct;
use crate::format::dtype::{from_f32, to_f32, Dtype};
use crate::format::header::TensorInfo;
use crate::format::packed::{self, pack_tensor, unpack_tensor, PackedError, PackedTensor, Pieces};
use crate::format::stats::{StatsFile, StatsFileError};
use crate::format::writer::{header_bound, header_reserve, SafetensorsWriter, WriteError};

/// The layout of the compressed checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    /// Same tensor names and dtypes, decompressed values.
    Dense,
    /// The compact form, restorable with `decompress`.
    #[default]
    Packed,
    /// The layout vLLM and llm-compressor load.
    CompressedTensors,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Dense => "dense",
            OutputFormat::Packed => "packed",
            OutputFormat::CompressedTensors => "compressed-tensors",
        }
    }
}

/// Receives progress; called from the thread running the job.
pub trait Progress: Sync {
    /// A new phase begins (`plan`, `threshold`, `compress`, `decompress`).
    fn phase(&self, _name: &str, _total: usize) {}
    /// One more tensor of the current phase is done.
    fn tensor_done(&self, _name: &str, _done: usize, _total: usize) {}
}

/// Progress that goes nowhere.
pub struct Silent;
impl Progress for Silent {}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The input is not a valid checkpoint.
    #[error(transparent)]
    Input(#[from] FormatError),
    /// The pipeline does not fit the model.
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Structural(#[from] StructuralError),
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// The calibration statistics do not fit the model.
    #[error(transparent)]
    Stats(#[from] StatsFileError),
    /// The packed input cannot be restored.
    #[error(transparent)]
    Packed(#[from] PackedError),
    #[error("the output format compressed-tensors cannot express this pipeline: {0}")]
    CompressedTensors(String),
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("canceled")]
    Canceled,
}

impl RunError {
    /// Whether the error is about the input or the request (as opposed to a
    /// failure of this machine).
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            RunError::Write(_) | RunError::Io { .. } | RunError::Canceled
        )
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to run.
pub struct CompressRequest<'a> {
    pub pipeline: &'a Pipeline,
    pub format: OutputFormat,
    /// A `config.json` to use instead of the one beside the input.
    pub config: Option<&'a Path>,
}

struct Source<'a>(&'a Checkpoint);

impl TensorSource for Source<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).map(|t| t.shape.clone())
    }
    fn names(&self) -> Vec<String> {
        self.0.tensors().iter().map(|t| t.name.clone()).collect()
    }
    fn is_float(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|t| t.dtype.is_float_weight())
    }
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, StructuralError> {
        let t = self
            .0
            .get(name)
            .ok_or_else(|| StructuralError::MissingTensor(name.to_string()))?;
        Ok(self.0.to_f32(t))
    }
}

/// A staging directory inside the destination, removed unless committed.
struct Staging {
    dir: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staging {
    fn new(dest: &Path) -> Result<Self, RunError> {
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = dest.join(format!(
            ".modelpress-staging-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir(&dir).map_err(io_err(&dir))?;
        Ok(Self {
            dir,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), RunError> {
        let path = self.path(name);
        let text = serde_json::to_vec_pretty(value).expect("serializing to memory cannot fail");
        fs::write(&path, text).map_err(io_err(&path))
    }

    /// Moves every staged file into the destination.
    fn commit(mut self) -> Result<(), RunError> {
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        for e in entries {
            let e = e.map_err(io_err(&self.dir))?;
            let to = self.dest.join(e.file_name());
            fs::rename(e.path(), &to).map_err(io_err(&to))?;
        }
        let _ = fs::remove_dir(&self.dir);
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Rounds values to what `dtype` can hold (f32 is unchanged).
fn round_to(dtype: Dtype, v: &mut [f32]) {
    match dtype {
        Dtype::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        Dtype::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        _ => {}
    }
}

fn dtype_bytes(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * dtype.bitsize() / 8];
    from_f32(dtype, v, &mut out);
    out
}

fn check_canceled(cancel: &AtomicBool) -> Result<(), RunError> {
    if cancel.load(Ordering::Relaxed) {
        Err(RunError::Canceled)
    } else {
        Ok(())
    }
}

/// The name of the output shard a tensor goes to.
fn output_shard(ckpt: &Checkpoint, info: &TensorInfo) -> String {
    if ckpt.is_sharded() {
        ckpt.shard_names()[info.shard].clone()
    } else {
        "model.safetensors".to_string()
    }
}

/// Checks a pipeline against a checkpoint without running it: what the
/// service does when a job is submitted.
pub fn check(input: &Path, pipeline: &Pipeline, format: OutputFormat) -> Result<(), RunError> {
    let ckpt = Checkpoint::open(input)?;
    let src = Source(&ckpt);
    let plan = structural::plan(&pipeline.structural(), &src)?;
    // The compressed-tensors format narrows the pipeline to linear layers:
    // statistics are checked against what will run.
    let narrowed = check_plan(&ckpt, &plan, pipeline, format, ckpt.config_json())?;
    let pipeline = narrowed.as_ref().map_or(pipeline, |(p, _)| p);
    check_stats(&ckpt, &plan, pipeline, None)
}

/// Holds the statistics to the model as the pipeline will see it (after
/// structural stages) and refuses stages that need statistics a tensor
/// does not have.
fn check_stats(
    ckpt: &Checkpoint,
    plan: &Plan,
    pipeline: &Pipeline,
    stats: Option<&StatsFile>,
) -> Result<(), RunError> {
    if let Some(s) = stats {
        s.check_against(
            plan.outputs
                .iter()
                .map(|p| (p.name.as_str(), p.shape.as_slice())),
        )?;
    }
    let shapes: Vec<TensorShape<'_>> = plan
        .outputs
        .iter()
        .map(|p| TensorShape {
            name: &p.name,
            shape: &p.shape,
            is_float: ckpt
                .get(&p.source)
                .is_some_and(|t| t.dtype.is_float_weight()),
        })
        .collect();
    pipeline.check_statistics(
        &shapes,
        stats.map(|s| s as &dyn crate::compress::spec::StatsCatalog),
    )?;
    Ok(())
}

/// For the compressed-tensors format, also the pipeline that format runs
/// and the collector of its layers.
fn check_plan(
    ckpt: &Checkpoint,
    plan: &Plan,
    pipeline: &Pipeline,
    format: OutputFormat,
    config: Option<&serde_json::Value>,
) -> Result<Option<(Pipeline, ct::Layers)>, RunError> {
    let shapes: Vec<TensorShape<'_>> = plan
        .outputs
        .iter()
        .map(|p| TensorShape {
            name: &p.name,
            shape: &p.shape,
            is_float: ckpt
                .get(&p.source)
                .is_some_and(|t| t.dtype.is_float_weight()),
        })
        .collect();
    pipeline.check_against(&shapes)?;
    if format == OutputFormat::CompressedTensors {
        return ct::prepare(pipeline, &shapes, config)
            .map(Some)
            .map_err(RunError::CompressedTensors);
    }
    Ok(None)
}

/// Compresses the checkpoint at `input` into `out_dir`.
pub fn compress(
    input: &Path,
    out_dir: &Path,
    req: &CompressRequest<'_>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Report, RunError> {
    compress_with_stats(input, out_dir, req, None, progress, cancel)
}

/// [`compress`] with calibration statistics: checked against the model
/// before any work, passed tensor by tensor to the stages, and the
/// report gets each tensor's output error and the statistics' sha256.
pub fn compress_with_stats(
    input: &Path,
    out_dir: &Path,
    req: &CompressRequest<'_>,
    stats: Option<&StatsFile>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Report, RunError> {
    let started = Instant::now();
    let ckpt = Checkpoint::open(input)?;
    let config = match req.config {
        Some(path) => Some(read_config(path)?),
        None => ckpt.config_json().cloned(),
    };
    let src = Source(&ckpt);
    progress.phase("plan", 0);
    let plan = structural::plan(&req.pipeline.structural(), &src)?;
    let (pipeline, mut ct_layers) =
        check_plan(&ckpt, &plan, req.pipeline, req.format, config.as_ref())?
            .unwrap_or_else(|| (req.pipeline.clone(), ct::Layers::default()));
    let pipeline = &pipeline;
    check_stats(&ckpt, &plan, pipeline, stats)?;
    let cuts = global_cuts(&ckpt, &plan, pipeline, stats, progress, cancel)?;

    let staging = Staging::new(out_dir)?;
    let mut reports = Vec::with_capacity(plan.outputs.len());
    let mut nonzero_after = 0u64;
    let mut seconds_per_stage: BTreeMap<String, f64> = BTreeMap::new();
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut shards: Vec<(String, SafetensorsWriter, Vec<PackedTensor>)> = Vec::new();
    let total = plan.outputs.len();
    // Buffers kept from tensor to tensor: the input in f32, and its copy
    // that pruning changes.
    let mut buffer: Vec<f32> = Vec::new();
    let mut work: Vec<f32> = Vec::new();
    progress.phase("compress", total);

    for (k, planned) in plan.outputs.iter().enumerate() {
        check_canceled(cancel)?;
        let info = ckpt
            .get(&planned.source)
            .ok_or_else(|| StructuralError::MissingTensor(planned.source.clone()))?;
        if let Some(next) = plan.outputs.get(k + 1).and_then(|n| ckpt.get(&n.source)) {
            ckpt.advise_willneed(next);
        }
        let shard = output_shard(&ckpt, info);
        if shards.last().is_none_or(|s| s.0 != shard) {
            if let Some((name, w, descs)) = shards.pop() {
                finish_shard(&ckpt, req.format, name, w, descs)?;
            }
            let in_shard = plan.outputs.iter().filter(|p| {
                ckpt.get(&p.source)
                    .is_some_and(|t| output_shard(&ckpt, t) == shard)
            });
            let reserve = match req.format {
                OutputFormat::Dense => header_reserve(
                    in_shard.map(|p| (p.name.as_str(), p.shape.len())),
                    ckpt.metadata(),
                ),
                // Pieces have longer names, and the packed description is
                // JSON escaped inside a metadata string.
                _ => {
                    in_shard
                        .map(|p| header_bound(&p.name, p.shape.len()) * 4 + 512)
                        .sum::<u64>()
                        + header_reserve([], ckpt.metadata()) * 2
                }
            };
            let writer = SafetensorsWriter::create(&staging.path(&shard), reserve)?;
            shards.push((shard.clone(), writer, Vec::new()));
        }
        let (_, writer, descs) = shards.last_mut().expect("a shard is open");
        let dtype = info.dtype;
        let is_float = dtype.is_float_weight();
        let stage_idx = pipeline.stages_for(&planned.name, &planned.shape, is_float);
        let before = writer.data_bytes();
        let original_bytes = if planned.changed {
            // A tensor the structural stages rewrote: its "before" is the
            // input tensor it came from.
            info.end - info.start
        } else {
            ckpt.bytes(info).len()
        } as u64;

        let owned: Vec<f32>;
        let processed = if !planned.changed && stage_idx.is_empty() {
            None
        } else {
            // Untouched by structural stages: convert straight from the
            // mapped input into a buffer reused from tensor to tensor.
            let exact: &[f32] = if planned.changed {
                owned = plan.materialize(&planned.name, &src)?;
                &owned
            } else {
                let bytes = ckpt.bytes(info);
                buffer.resize(bytes.len() * 8 / dtype.bitsize(), 0.0);
                to_f32(dtype, bytes, &mut buffer);
                &buffer
            };
            let cut = cuts.get(&planned.name).copied();
            let round = |v: &mut [f32]| round_to(dtype, v);
            let layer_stats = match stats {
                Some(s) if !stage_idx.is_empty() => s.get(&planned.name)?,
                _ => None,
            };
            let p = process_with_stats(
                &planned.name,
                exact,
                &planned.shape,
                pipeline,
                &stage_idx,
                cut,
                &round,
                &mut work,
                layer_stats.as_ref(),
            )?;
            Some((p, exact, layer_stats))
        };

        let mut fid = None;
        let mut out_err = None;
        match processed {
            None => {
                let bytes = ckpt.bytes(info);
                match req.format {
                    OutputFormat::Packed => {
                        descs.push(PackedTensor {
                            name: planned.name.clone(),
                            dtype,
                            shape: planned.shape.clone(),
                            values: packed::PackedValues::Raw { sparse: None },
                        });
                    }
                    OutputFormat::CompressedTensors => {
                        ct_layers.unquantized(&planned.name, &planned.shape, is_float)
                    }
                    OutputFormat::Dense => {}
                }
                writer.append(&planned.name, dtype, &planned.shape, bytes)?;
                weight_map.insert(planned.name.clone(), shard.clone());
                if is_float {
                    nonzero_after += count_nonzero(&ckpt, info);
                } else {
                    nonzero_after += planned.shape.iter().product::<usize>() as u64;
                }
            }
            Some((p, exact, layer_stats)) => {
                // The dense values are built only when they are written;
                // otherwise fidelity decodes chunk by chunk.
                let dense = match (&p.values, req.format) {
                    (Values::LowRank(_), _) | (_, OutputFormat::Dense) => {
                        let mut d = p.values.reconstruct(&p.shape);
                        round_to(dtype, &mut d);
                        Some(d)
                    }
                    _ => None,
                };
                let f = match (&dense, &p.values) {
                    (Some(d), _) => fidelity(exact, d),
                    (None, Values::Raw(v)) => fidelity(exact, v),
                    (None, Values::Coded(c)) => fidelity_with(exact, |start, out| {
                        c.decode_range(start, out);
                        round_to(dtype, out);
                    }),
                    (None, Values::LowRank(_)) => unreachable!("low-rank values are reconstructed"),
                };
                if let Some(ls) = &layer_stats {
                    out_err = match &dense {
                        Some(d) => output_error(exact, d, ls),
                        None => {
                            let mut d = p.values.reconstruct(&p.shape);
                            round_to(dtype, &mut d);
                            output_error(exact, &d, ls)
                        }
                    };
                }
                let elements = p.shape.iter().product::<usize>() as f64;
                nonzero_after += (elements * (1.0 - f.sparsity)).round() as u64;
                fid = Some(f);
                for (i, secs) in &p.seconds {
                    *seconds_per_stage
                        .entry(pipeline.stages()[*i].kind().to_string())
                        .or_default() += secs;
                }
                match req.format {
                    OutputFormat::Dense => {
                        let dense = dense.as_deref().unwrap_or_default();
                        writer.append(
                            &planned.name,
                            dtype,
                            &p.shape,
                            &dtype_bytes(dtype, dense),
                        )?;
                        weight_map.insert(planned.name.clone(), shard.clone());
                    }
                    OutputFormat::Packed => {
                        let (desc, pieces) = pack_tensor(&planned.name, dtype, &p, None);
                        for piece in pieces {
                            writer.append(&piece.name, piece.dtype, &piece.shape, &piece.bytes)?;
                            weight_map.insert(piece.name, shard.clone());
                        }
                        descs.push(desc);
                    }
                    OutputFormat::CompressedTensors => {
                        let pieces = ct_layers
                            .pieces(&planned.name, dtype, &p, pipeline, &stage_idx)
                            .map_err(RunError::CompressedTensors)?;
                        for piece in pieces {
                            writer.append(&piece.name, piece.dtype, &piece.shape, &piece.bytes)?;
                            weight_map.insert(piece.name, shard.clone());
                        }
                    }
                }
            }
        }
        let after = writer.data_bytes() - before;
        let elements: u64 = planned.shape.iter().map(|&d| d as u64).product();
        let original_shape = ckpt.get(&planned.name).map(|t| t.shape.clone());
        reports.push(TensorReport {
            name: planned.name.clone(),
            dtype: dtype.name().to_string(),
            original_shape,
            shape: planned.shape.clone(),
            stages: stage_labels(pipeline, planned.changed, &stage_idx),
            bytes_before: if ckpt.get(&planned.name).is_some() {
                original_bytes
            } else {
                0
            },
            bytes_after: after,
            bits_per_weight: if elements > 0 {
                after as f64 * 8.0 / elements as f64
            } else {
                0.0
            },
            fidelity: fid,
            output_error: out_err,
        });
        progress.tensor_done(&planned.name, k + 1, total);
    }
    check_canceled(cancel)?;
    let sharded = shards.len() > 1 || ckpt.is_sharded();
    for (name, w, descs) in shards {
        finish_shard(&ckpt, req.format, name, w, descs)?;
    }
    if sharded {
        let total_size: u64 = reports.iter().map(|r| r.bytes_after).sum();
        staging.write_json(
            "model.safetensors.index.json",
            &serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
        )?;
    }
    match (req.format, config) {
        (OutputFormat::CompressedTensors, config) => {
            let mut config = config.unwrap_or_else(|| serde_json::json!({}));
            let qc = ct_layers.quantization_config_for(pipeline);
            match config.as_object_mut() {
                Some(obj) => {
                    obj.insert("quantization_config".into(), qc);
                }
                None => {
                    return Err(RunError::Config {
                        path: req.config.map(Path::to_path_buf).unwrap_or_default(),
                        reason: "config.json is not a JSON object".into(),
                    })
                }
            }
            staging.write_json("config.json", &config)?;
        }
        (_, Some(config)) => staging.write_json("config.json", &config)?,
        (_, None) => {}
    }

    let planned: std::collections::HashSet<&str> =
        plan.outputs.iter().map(|p| p.source.as_str()).collect();
    let removed: Vec<&TensorInfo> = ckpt
        .tensors()
        .iter()
        .filter(|t| {
            !planned.contains(t.name.as_str()) && plan.outputs.iter().all(|p| p.name != t.name)
        })
        .collect();
    let mut totals = Totals::from_tensors(&reports, nonzero_after);
    for t in &removed {
        totals.bytes_before += (t.end - t.start) as u64;
        totals.parameters_before += t.shape.iter().map(|&d| d as u64).product::<u64>();
        totals.removed_tensors.push(t.name.clone());
    }
    if totals.bytes_after > 0 {
        totals.ratio = totals.bytes_before as f64 / totals.bytes_after as f64;
    }
    if totals.parameters_before > 0 {
        totals.parameters_kept = nonzero_after as f64 / totals.parameters_before as f64;
    }
    totals.seconds_per_stage = seconds_per_stage;
    totals.seconds_total = started.elapsed().as_secs_f64();
    let report = Report {
        report_version: REPORT_VERSION,
        format: req.format.name().to_string(),
        pipeline: pipeline.spec().clone(),
        statistics_sha256: stats.map(|s| s.sha256().to_string()),
        tensors: reports,
        totals,
    };
    staging.write_json("report.json", &report)?;
    check_canceled(cancel)?;
    staging.commit()?;
    Ok(report)
}

fn stage_labels(pipeline: &Pipeline, changed: bool, idx: &[usize]) -> Vec<String> {
    let mut labels: Vec<String> = if changed {
        pipeline
            .stages()
            .iter()
            .filter(|s| matches!(s, Stage::Structural(_)))
            .map(Stage::label)
            .collect()
    } else {
        Vec::new()
    };
    labels.extend(idx.iter().map(|&i| pipeline.label(i)));
    labels
}

fn count_nonzero(ckpt: &Checkpoint, info: &TensorInfo) -> u64 {
    ckpt.to_f32(info).iter().filter(|&&x| x != 0.0).count() as u64
}

fn read_config(path: &Path) -> Result<serde_json::Value, RunError> {
    let text = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| RunError::Config {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

fn finish_shard(
    ckpt: &Checkpoint,
    format: OutputFormat,
    _name: String,
    writer: SafetensorsWriter,
    descs: Vec<PackedTensor>,
) -> Result<u64, RunError> {
    let mut meta = ckpt.metadata().clone();
    if format == OutputFormat::Packed {
        let source = serde_json::to_string(&meta).expect("a string map serializes");
        meta = BTreeMap::new();
        meta.insert(packed::META_FORMAT.into(), packed::FORMAT_NAME.into());
        meta.insert(
            packed::META_VERSION.into(),
            packed::FORMAT_VERSION.to_string(),
        );
        meta.insert(
            packed::META_TENSORS.into(),
            serde_json::to_string(&descs).expect("descriptions serialize"),
        );
        meta.insert(packed::META_SOURCE.into(), source);
    } else if format == OutputFormat::CompressedTensors {
        meta.insert("format".into(), "pt".into());
    }
    Ok(writer.finish(&meta)?)
}

/// Global magnitude pruning needs one threshold over all the tensors it
/// targets: two streaming passes compute it exactly, one tensor at a time.
fn global_cuts(
    ckpt: &Checkpoint,
    plan: &Plan,
    pipeline: &Pipeline,
    stats: Option<&StatsFile>,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<HashMap<String, TensorCut>, RunError> {
    let Some((gi, sparsity)) = pipeline
        .stages()
        .iter()
        .enumerate()
        .find_map(|(i, s)| match s {
            Stage::Prune(
                PruneKind::Magnitude {
                    sparsity,
                    global: true,
                },
                _,
            ) => Some((i, *sparsity)),
            _ => None,
        })
    else {
        return Ok(HashMap::new());
    };
    let src = Source(ckpt);
    let targets: Vec<(&str, &[usize])> = plan
        .outputs
        .iter()
        .filter(|p| {
            let is_float = ckpt
                .get(&p.source)
                .is_some_and(|t| t.dtype.is_float_weight());
            pipeline
                .stages_for(&p.name, &p.shape, is_float)
                .contains(&gi)
        })
        .map(|p| (p.name.as_str(), p.shape.as_slice()))
        .collect();
    // Stages before the global prune on the same tensor (other prunes) run
    // first, so the threshold sees the values it will cut.
    let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>, RunError> {
        let values = plan.materialize(name, &src)?;
        let is_float = true;
        let before: Vec<usize> = pipeline
            .stages_for(name, shape, is_float)
            .into_iter()
            .filter(|&i| i < gi)
            .collect();
        if before.is_empty() {
            return Ok(values);
        }
        let mut work = Vec::new();
        let layer_stats = match stats {
            Some(s) => s.get(name)?,
            None => None,
        };
        let p = process_with_stats(
            name,
            &values,
            shape,
            pipeline,
            &before,
            None,
            &|_| {},
            &mut work,
            layer_stats.as_ref(),
        )?;
        Ok(match p.values {
            Values::Raw(v) => v,
            other => other.reconstruct(shape),
        })
    };
    let mut g = GlobalThreshold::new(sparsity);
    progress.phase("threshold", targets.len() * 2);
    for (i, (name, shape)) in targets.iter().enumerate() {
        check_canceled(cancel)?;
        g.pass1(&load(name, shape)?);
        progress.tensor_done(name, i + 1, targets.len() * 2);
    }
    g.finish_pass1();
    for (i, (name, shape)) in targets.iter().enumerate() {
        check_canceled(cancel)?;
        g.pass2(&load(name, shape)?);
        progress.tensor_done(name, targets.len() + i + 1, targets.len() * 2);
    }
    let cut = g.finish();
    Ok(targets
        .iter()
        .zip(cut.ties)
        .map(|((name, _), ties)| {
            (
                name.to_string(),
                TensorCut {
                    threshold: cut.threshold,
                    ties,
                },
            )
        })
        .collect())
}

/// A summary of a `decompress` run.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub tensors: usize,
    pub bytes: u64,
}

struct ShardPieces<'a> {
    ckpt: &'a Checkpoint,
}

impl Pieces for ShardPieces<'_> {
    fn piece(&self, name: &str) -> Option<(Dtype, Vec<usize>, &[u8])> {
        let t = self.ckpt.get(name)?;
        Some((t.dtype, t.shape.clone(), self.ckpt.bytes(t)))
    }
}

/// Restores a packed checkpoint to the dense one the same job would have
/// written, byte for byte.
pub fn decompress(
    input: &Path,
    out_dir: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Restored, RunError> {
    let ckpt = Checkpoint::open(input)?;
    let mut per_shard: Vec<(String, Vec<PackedTensor>, BTreeMap<String, String>)> = Vec::new();
    let shard_names = ckpt.shard_names().to_vec();
    for (i, shard) in shard_names.iter().enumerate() {
        let meta = ckpt.shard_metadata(i);
        let descs = packed_descriptions(meta)?;
        let source: BTreeMap<String, String> = meta
            .get(packed::META_SOURCE)
            .map(|s| serde_json::from_str(s))
            .transpose()
            .map_err(|e| PackedError::Description(format!("source metadata: {e}")))?
            .unwrap_or_default();
        let out_name = if ckpt.is_sharded() {
            shard.clone()
        } else {
            "model.safetensors".to_string()
        };
        per_shard.push((out_name, descs, source));
    }
    let total: usize = per_shard.iter().map(|s| s.1.len()).sum();
    progress.phase("decompress", total);
    let staging = Staging::new(out_dir)?;
    let pieces = ShardPieces { ckpt: &ckpt };
    let mut weight_map = BTreeMap::new();
    let mut done = 0;
    let mut bytes = 0u64;
    for (shard, descs, source) in &per_shard {
        let reserve = header_reserve(
            descs.iter().map(|d| (d.name.as_str(), d.shape.len())),
            source,
        );
        let mut w = SafetensorsWriter::create(&staging.path(shard), reserve)?;
        for d in descs {
            check_canceled(cancel)?;
            let data = unpack_tensor(d, &pieces)?;
            w.append(&d.name, d.dtype, &d.shape, &data)?;
            weight_map.insert(d.name.clone(), shard.clone());
            done += 1;
            progress.tensor_done(&d.name, done, total);
        }
        bytes += w.data_bytes();
        w.finish(source)?;
    }
    if ckpt.is_sharded() {
        staging.write_json(
            "model.safetensors.index.json",
            &serde_json::json!({"metadata": {"total_size": bytes}, "weight_map": weight_map}),
        )?;
    }
    if let Some(config) = ckpt.config_json() {
        staging.write_json("config.json", config)?;
    }
    check_canceled(cancel)?;
    staging.commit()?;
    Ok(Restored {
        tensors: total,
        bytes,
    })
}

/// The tensor descriptions of a packed shard.
pub fn packed_descriptions(
    meta: &BTreeMap<String, String>,
) -> Result<Vec<PackedTensor>, PackedError> {
    if meta.get(packed::META_FORMAT).map(String::as_str) != Some(packed::FORMAT_NAME) {
        return Err(PackedError::NotPacked);
    }
    let version = meta.get(packed::META_VERSION).cloned().unwrap_or_default();
    if version != packed::FORMAT_VERSION.to_string() {
        return Err(PackedError::Version(version));
    }
    let text = meta.get(packed::META_TENSORS).ok_or_else(|| {
        PackedError::Description(format!("`{}` is missing", packed::META_TENSORS))
    })?;
    serde_json::from_str(text).map_err(|e| PackedError::Description(e.to_string()))
}
