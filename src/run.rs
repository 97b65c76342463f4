//! Running a pipeline over a checkpoint on disk: the one function behind
//! `modelpress compress` and the service's workers.
//!
//! Tensors are processed one at a time from the memory-mapped input (kernels
//! parallelize within a tensor), so memory stays bounded by a few copies of
//! the largest tensor whatever the model's size. A second thread writes each
//! finished tensor while the next one is computed (one tensor handed over
//! at a time). Output goes to a staging
//! directory inside the destination and is moved into place only when
//! everything is written; on error or cancellation nothing is left behind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::compress::calibrate::{output_error_with, FactorCache};
use crate::compress::metrics::{fidelity, fidelity_with, Fidelity};
use crate::compress::prune::GlobalThreshold;
use crate::compress::report::{Report, ReportBuilder, TensorReport};
use crate::compress::spec::{Pipeline, PruneKind, SpecError, Stage, TensorShape};
use crate::compress::structural::{self, Plan, PlannedTensor, StructuralError, TensorSource};
use crate::compress::tensor::{process_with_stats, Processed, TensorCut, TensorError, Values};
use crate::compress::{fused, rowwise};
use crate::format::checkpoint::{Checkpoint, FormatError};
use crate::format::compressed_tensors::{self as ct, CompressedTensorsSink};
use crate::format::dense::DenseSink;
use crate::format::dtype::{to_f32, Dtype};
use crate::format::header::TensorInfo;
use crate::format::packed::{
    packed_descriptions, source_metadata, unpack_tensor, PackedError, PackedSink, PackedTensor,
    Pieces,
};
use crate::format::sink::{OutputTensor, ProcessedTensor, ShardFiles, Sink, SinkError};
use crate::format::stats::{StatsFile, StatsFileError};
use crate::format::writer::{header_reserve, Durability, SafetensorsWriter, WriteError};

/// The layout of the compressed checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

    /// The sink writing this format's shards to `files`; `metadata` is the
    /// input's `__metadata__`.
    fn sink<'p>(
        self,
        files: ShardFiles,
        metadata: BTreeMap<String, String>,
        pipeline: &'p Pipeline,
        ct_layers: Option<ct::Layers>,
    ) -> Box<dyn Sink + Send + 'p> {
        match self {
            OutputFormat::Dense => Box::new(DenseSink::new(files, metadata)),
            OutputFormat::Packed => Box::new(PackedSink::new(files, metadata)),
            OutputFormat::CompressedTensors => Box::new(CompressedTensorsSink::new(
                files,
                metadata,
                pipeline,
                ct_layers.unwrap_or_default(),
            )),
        }
    }
}

/// A name that is not an output format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown output format `{0}`: use `dense`, `packed` or `compressed-tensors`")]
pub struct UnknownOutputFormat(pub String);

impl std::str::FromStr for OutputFormat {
    type Err = UnknownOutputFormat;

    /// Reads the name [`OutputFormat::name`] gives.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            OutputFormat::Dense,
            OutputFormat::Packed,
            OutputFormat::CompressedTensors,
        ]
        .into_iter()
        .find(|f| f.name() == s)
        .ok_or_else(|| UnknownOutputFormat(s.to_string()))
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
    /// The client-facing code of an error about the input or the request;
    /// `None` for a failure of this machine or a cancellation. The service's
    /// error codes and the command line's exit status both come from here.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            RunError::Input(_) => Some("invalid_safetensors"),
            RunError::Spec(_) | RunError::Structural(_) => Some("invalid_pipeline"),
            RunError::CompressedTensors(_) => Some("unsupported_by_format"),
            RunError::Packed(_) => Some("invalid_packed_input"),
            RunError::Config { .. } => Some("invalid_config"),
            // A statistics file that cannot be read is this machine's
            // failure; one that is not safetensors, or does not fit the
            // model, is the client's.
            RunError::Stats(StatsFileError::Io { .. }) => None,
            RunError::Stats(StatsFileError::Format(_)) => Some("invalid_safetensors"),
            RunError::Stats(_) => Some("invalid_statistics"),
            RunError::Tensor(_) => Some("invalid_input"),
            RunError::Write(_) | RunError::Io { .. } | RunError::Canceled => None,
        }
    }

    /// Whether the error is about the input or the request (as opposed to a
    /// failure of this machine).
    pub fn is_bad_input(&self) -> bool {
        self.code().is_some()
    }
}

impl From<SinkError> for RunError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::Write(e) => RunError::Write(e),
            SinkError::Unexpressible(reason) => RunError::CompressedTensors(reason),
            SinkError::ConfigNotObject => RunError::Config {
                path: PathBuf::new(),
                reason: e.to_string(),
            },
        }
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
    /// Whether the shard files are on the disk when `compress` returns.
    pub durability: Durability,
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
/// service does when a job is submitted. Channel pruning is planned by
/// shape only: which channels go needs the weights, how many does not.
pub fn check(input: &Path, pipeline: &Pipeline, format: OutputFormat) -> Result<(), RunError> {
    check_with_stats(input, pipeline, format, None)
}

/// [`check`] with calibration statistics: they are held to the model as
/// the pipeline will see it, and every stage that needs statistics must
/// find them.
pub fn check_with_stats(
    input: &Path,
    pipeline: &Pipeline,
    format: OutputFormat,
    stats: Option<&StatsFile>,
) -> Result<(), RunError> {
    let ckpt = Checkpoint::open(input)?;
    let outputs = structural::plan_shapes(&pipeline.structural(), &Source(&ckpt))?;
    // The compressed-tensors format narrows the pipeline to linear layers:
    // statistics are checked against what will run.
    let narrowed = check_plan(&ckpt, &outputs, pipeline, format, ckpt.config_json())?;
    let pipeline = narrowed.as_ref().map_or(pipeline, |(p, _)| p);
    check_stats(&ckpt, &outputs, pipeline, stats)
}

/// The tensors as the per-tensor stages will see them: after the
/// structural stages, with whether each is a floating-point weight.
fn planned_shapes<'a>(ckpt: &Checkpoint, outputs: &'a [PlannedTensor]) -> Vec<TensorShape<'a>> {
    outputs
        .iter()
        .map(|p| TensorShape {
            name: &p.name,
            shape: &p.shape,
            is_float: ckpt
                .get(&p.source)
                .is_some_and(|t| t.dtype.is_float_weight()),
        })
        .collect()
}

/// Holds the statistics to the model as the pipeline will see it (after
/// structural stages) and refuses stages that need statistics a tensor
/// does not have.
fn check_stats(
    ckpt: &Checkpoint,
    outputs: &[PlannedTensor],
    pipeline: &Pipeline,
    stats: Option<&StatsFile>,
) -> Result<(), RunError> {
    if let Some(s) = stats {
        s.check_against(
            outputs
                .iter()
                .map(|p| (p.name.as_str(), p.shape.as_slice())),
        )?;
    }
    let shapes = planned_shapes(ckpt, outputs);
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
    outputs: &[PlannedTensor],
    pipeline: &Pipeline,
    format: OutputFormat,
    config: Option<&serde_json::Value>,
) -> Result<Option<(Pipeline, ct::Layers)>, RunError> {
    let shapes = planned_shapes(ckpt, outputs);
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
    recycle_large_buffers();
    // Declared first, dropped last: after every buffer of the run, on every
    // way out (success, error, cancellation).
    let _trim = TrimOnDrop;
    let ckpt = Checkpoint::open(input)?;
    let config = match req.config {
        Some(path) => Some(read_config(path)?),
        None => ckpt.config_json().cloned(),
    };
    let src = Source(&ckpt);
    progress.phase("plan", 0);
    let plan = structural::plan(&req.pipeline.structural(), &src)?;
    let (pipeline, ct_layers) = match check_plan(
        &ckpt,
        &plan.outputs,
        req.pipeline,
        req.format,
        config.as_ref(),
    )? {
        Some((narrowed, layers)) => (narrowed, Some(layers)),
        None => (req.pipeline.clone(), None),
    };
    let pipeline = &pipeline;
    check_stats(&ckpt, &plan.outputs, pipeline, stats)?;
    let cuts = global_cuts(&ckpt, &plan, pipeline, stats, progress, cancel)?;

    let staging = Staging::new(out_dir)?;
    let files = ShardFiles::new(staging.dir.clone(), req.durability);
    let sink = req
        .format
        .sink(files, ckpt.metadata().clone(), pipeline, ct_layers);
    let mut tensors = TensorRunner {
        ckpt: &ckpt,
        plan: &plan,
        pipeline,
        cuts: &cuts,
        stats,
        wants_dense: sink.wants_dense(),
        buffer: Vec::new(),
        work: Vec::new(),
        factors: FactorCache::new(),
    };
    let total = plan.outputs.len();
    progress.phase("compress", total);
    // The tensors are computed here and written by a second thread, so a
    // finished tensor goes to disk while the next one is computed. The
    // channel holds none: a finished tensor waits until the writer has
    // written the one before, so at most two are held at once.
    let (sink, mut report) = std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Step<'_>>(0);
        let writer = OutputWriter {
            ckpt: &ckpt,
            pipeline,
            progress,
            total,
        };
        let writing = scope.spawn(move || {
            let mut sink = sink;
            let mut report = ReportBuilder::default();
            let written = writer.run(rx, &mut *sink, &mut report);
            (sink, report, written)
        });
        let computed = compute_all(&ckpt, &plan, &mut tensors, &tx, cancel);
        drop(tx);
        let (sink, report, written) = writing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A write error stops the computing side too: it comes first.
        written?;
        computed?;
        Ok::<_, RunError>((sink, report))
    })?;
    let finished = sink.finish(config).map_err(|e| match e {
        SinkError::ConfigNotObject => RunError::Config {
            path: req.config.map(Path::to_path_buf).unwrap_or_default(),
            reason: e.to_string(),
        },
        e => e.into(),
    })?;
    if ckpt.is_sharded() {
        staging.write_json(
            "model.safetensors.index.json",
            &serde_json::json!({
                "metadata": {"total_size": report.bytes_after()},
                "weight_map": finished.weight_map,
            }),
        )?;
    }
    if let Some(config) = &finished.config {
        staging.write_json("config.json", config)?;
    }
    let kept: HashSet<&str> = plan
        .outputs
        .iter()
        .flat_map(|p| [p.source.as_str(), p.name.as_str()])
        .collect();
    for t in ckpt.tensors() {
        if !kept.contains(t.name.as_str()) {
            report.removed(&t.name, (t.end - t.start) as u64, element_count(&t.shape));
        }
    }
    let report = report.finish(
        req.format.name(),
        pipeline.spec().clone(),
        stats.map(|s| s.sha256().to_string()),
        started.elapsed().as_secs_f64(),
    );
    staging.write_json("report.json", &report)?;
    check_canceled(cancel)?;
    staging.commit()?;
    Ok(report)
}

/// Every tensor allocates and frees buffers the size of the tensor (its
/// symbols, its dense values). glibc maps each such buffer fresh and unmaps
/// it when freed, so each tensor pays a page fault per 4 KiB of memory the
/// previous tensor just gave back. Served from the heap and not trimmed
/// while tensors are processed, the same pages are used again. Set once
/// per process; [`release_free_memory`] returns the memory after a run.
fn recycle_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes allocator parameters; glibc still
        // maps memory when the heap cannot grow.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        });
    }
}

/// Gives the heap's free memory back to the system: the buffers
/// [`recycle_large_buffers`] keeps are not held after the run.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls [`release_free_memory`] when dropped.
struct TrimOnDrop;

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        release_free_memory();
    }
}

/// One step of the output, in checkpoint order, from the computing thread
/// to the writing one.
enum Step<'a> {
    BeginShard {
        shard: String,
        tensors: Vec<OutputTensor<'a>>,
    },
    Tensor(Box<Done<'a>>),
    FinishShard,
}

/// A computed output tensor and what its report line needs.
struct Done<'a> {
    /// Its position among the output tensors.
    k: usize,
    planned: &'a PlannedTensor,
    info: &'a TensorInfo,
    stages: Vec<usize>,
    body: Body<'a>,
    written: Written,
}

enum Body<'a> {
    /// Stored as in the input: the mapped bytes.
    Untouched(&'a [u8]),
    Processed {
        processed: Processed,
        /// The dense values, when the sink wants them or the values are
        /// low-rank factors.
        dense: Option<Vec<f32>>,
    },
}

/// Computes every output tensor in order and hands it to the writer over
/// `tx`. Stops early, without an error of its own, when the writer has
/// stopped (its error is the one to report).
fn compute_all<'a>(
    ckpt: &'a Checkpoint,
    plan: &'a Plan,
    tensors: &mut TensorRunner<'a>,
    tx: &mpsc::SyncSender<Step<'a>>,
    cancel: &AtomicBool,
) -> Result<(), RunError> {
    let mut open_shard: Option<String> = None;
    for (k, planned) in plan.outputs.iter().enumerate() {
        check_canceled(cancel)?;
        let info = ckpt
            .get(&planned.source)
            .ok_or_else(|| StructuralError::MissingTensor(planned.source.clone()))?;
        if let Some(next) = plan.outputs.get(k + 1).and_then(|n| ckpt.get(&n.source)) {
            ckpt.advise_willneed(next);
        }
        let shard = output_shard(ckpt, info);
        if open_shard.as_ref() != Some(&shard) {
            if open_shard.is_some() && tx.send(Step::FinishShard).is_err() {
                return Ok(());
            }
            let tensors = shard_tensors(ckpt, plan, &shard);
            let begin = Step::BeginShard {
                shard: shard.clone(),
                tensors,
            };
            if tx.send(begin).is_err() {
                return Ok(());
            }
            open_shard = Some(shard);
        }
        let stages = tensors.pipeline.stages_for(
            &planned.name,
            &planned.shape,
            info.dtype.is_float_weight(),
        );
        let (body, written) = tensors.compute(planned, info, &stages)?;
        let done = Done {
            k,
            planned,
            info,
            stages,
            body,
            written,
        };
        if tx.send(Step::Tensor(Box::new(done))).is_err() {
            return Ok(());
        }
    }
    check_canceled(cancel)?;
    if open_shard.is_some() {
        let _ = tx.send(Step::FinishShard);
    }
    Ok(())
}

/// The writing side: hands each step to the sink and adds the tensor's
/// report line once its bytes are written.
struct OutputWriter<'a> {
    ckpt: &'a Checkpoint,
    pipeline: &'a Pipeline,
    progress: &'a dyn Progress,
    total: usize,
}

impl<'a> OutputWriter<'a> {
    /// Writes steps until the computing side is done or a write fails.
    fn run(
        &self,
        rx: mpsc::Receiver<Step<'a>>,
        sink: &mut dyn Sink,
        report: &mut ReportBuilder,
    ) -> Result<(), RunError> {
        for step in rx {
            match step {
                Step::BeginShard { shard, tensors } => sink.begin_shard(&shard, &tensors)?,
                Step::FinishShard => sink.finish_shard()?,
                Step::Tensor(done) => self.write(done, sink, report)?,
            }
        }
        Ok(())
    }

    fn write(
        &self,
        done: Box<Done<'a>>,
        sink: &mut dyn Sink,
        report: &mut ReportBuilder,
    ) -> Result<(), RunError> {
        let planned = done.planned;
        let out = OutputTensor {
            name: &planned.name,
            dtype: done.info.dtype,
            shape: &planned.shape,
        };
        let before = sink.data_bytes();
        match &done.body {
            Body::Untouched(bytes) => sink.write_untouched(out, bytes)?,
            Body::Processed { processed, dense } => {
                for (i, secs) in &processed.seconds {
                    report.stage_seconds(self.pipeline.stages()[*i].kind(), *secs);
                }
                sink.write_processed(&ProcessedTensor {
                    tensor: out,
                    processed,
                    dense: dense.as_deref(),
                    stages: &done.stages,
                })?;
            }
        }
        let after = sink.data_bytes() - before;
        // The values are no longer needed: free them before the report.
        drop(done.body);
        let line = tensor_report(
            self.ckpt,
            self.pipeline,
            planned,
            done.info,
            &done.stages,
            after,
            &done.written,
        );
        report.tensor(line, done.written.nonzero);
        self.progress
            .tensor_done(&planned.name, done.k + 1, self.total);
        Ok(())
    }
}

fn element_count(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

/// The output tensors of shard `shard`, for its header reservation.
fn shard_tensors<'p>(ckpt: &Checkpoint, plan: &'p Plan, shard: &str) -> Vec<OutputTensor<'p>> {
    plan.outputs
        .iter()
        .filter_map(|p| {
            let t = ckpt.get(&p.source)?;
            (output_shard(ckpt, t) == shard).then_some(OutputTensor {
                name: &p.name,
                dtype: t.dtype,
                shape: &p.shape,
            })
        })
        .collect()
}

/// Runs the per-tensor stages; keeps the buffers that are reused from
/// tensor to tensor.
struct TensorRunner<'a> {
    ckpt: &'a Checkpoint,
    plan: &'a Plan,
    pipeline: &'a Pipeline,
    cuts: &'a HashMap<String, TensorCut>,
    stats: Option<&'a StatsFile>,
    /// Whether the sink writes dense values.
    wants_dense: bool,
    /// The input tensor in f32, when it cannot be read in place.
    buffer: Vec<f32>,
    /// Its copy that pruning changes.
    work: Vec<f32>,
    /// The Hessian factor shared by consecutive tensors with one `xtx`.
    factors: FactorCache,
}

/// What computing one tensor measured.
struct Written {
    /// None when the tensor is stored untouched.
    fidelity: Option<Fidelity>,
    /// Error of the layer's output under the calibration statistics.
    output_error: Option<f64>,
    nonzero: u64,
}

/// The mapped bytes of an F32 tensor as its values, without a copy, when
/// the machine is little-endian and they are 4-byte aligned (the format
/// does not promise it).
fn f32_in_place(dtype: Dtype, bytes: &[u8]) -> Option<&[f32]> {
    if dtype != Dtype::F32 || cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32; `align_to` only puts
    // properly aligned whole elements in the middle slice.
    let (head, values, tail) = unsafe { bytes.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(values)
}

impl<'a> TensorRunner<'a> {
    /// Computes output tensor `planned` (from input tensor `info`).
    fn compute(
        &mut self,
        planned: &PlannedTensor,
        info: &'a TensorInfo,
        stages: &[usize],
    ) -> Result<(Body<'a>, Written), RunError> {
        let ckpt = self.ckpt;
        let pipeline = self.pipeline;
        let dtype = info.dtype;
        let is_float = dtype.is_float_weight();
        if !planned.changed && stages.is_empty() {
            let nonzero = if is_float {
                count_nonzero(ckpt, info)
            } else {
                element_count(&planned.shape)
            };
            let written = Written {
                fidelity: None,
                output_error: None,
                nonzero,
            };
            return Ok((Body::Untouched(ckpt.bytes(info)), written));
        }
        let owned: Vec<f32>;
        let exact: &[f32] = if planned.changed {
            owned = self.plan.materialize(&planned.name, &Source(ckpt))?;
            &owned
        } else if let Some(values) = f32_in_place(dtype, ckpt.bytes(info)) {
            values
        } else {
            // Untouched by structural stages: convert straight from the
            // mapped input into a buffer reused from tensor to tensor.
            let bytes = ckpt.bytes(info);
            self.buffer.resize(bytes.len() * 8 / dtype.bitsize(), 0.0);
            to_f32(dtype, bytes, &mut self.buffer);
            &self.buffer
        };
        let round = |v: &mut [f32]| round_to(dtype, v);
        let layer_stats = match self.stats {
            Some(s) if !stages.is_empty() => s.get(&planned.name)?,
            _ => None,
        };
        // Stages that work row by row are run and measured block by block
        // while each block is in the cache (compress::rowwise); pruning
        // then sharing runs in three passes (compress::fused).
        let blocked = match layer_stats {
            None if !self.wants_dense => rowwise::process_measured(
                &planned.name,
                exact,
                &planned.shape,
                pipeline,
                stages,
                &round,
            )
            .transpose()?
            .or_else(|| fused::process_measured(exact, &planned.shape, pipeline, stages, &round)),
            _ => None,
        };
        let (p, measured) = match blocked {
            Some((p, f)) => (p, Some(f)),
            None => {
                let p = process_with_stats(
                    &planned.name,
                    exact,
                    &planned.shape,
                    pipeline,
                    stages,
                    self.cuts.get(&planned.name).copied(),
                    &round,
                    &mut self.work,
                    layer_stats.as_ref(),
                    &self.factors,
                )?;
                (p, None)
            }
        };
        // The dense values are built only when they are written;
        // otherwise fidelity decodes chunk by chunk.
        let dense = match &p.values {
            Values::LowRank(_) => true,
            _ => self.wants_dense,
        }
        .then(|| {
            let mut d = p.values.reconstruct(&p.shape);
            round_to(dtype, &mut d);
            d
        });
        let f = match (measured, &dense, &p.values) {
            (Some(f), _, _) => f,
            (None, Some(d), _) => fidelity(exact, d),
            (None, None, Values::Raw(v)) => fidelity(exact, v),
            (None, None, Values::Coded(c)) => fidelity_with(exact, |start, out| {
                c.decode_range(start, out);
                round_to(dtype, out);
            }),
            (None, None, Values::LowRank(_)) => unreachable!("low-rank values are reconstructed"),
        };
        // Computed by the stage when it could (the same sums), else from
        // the stage's Hessian factor when it made one.
        let computed = p
            .output_error
            .map(|(num, den)| (den > 0.0).then(|| num.max(0.0) / den));
        let output_error = layer_stats
            .as_ref()
            .and_then(|ls| match (computed, &dense) {
                (Some(e), _) => e,
                (None, Some(d)) => output_error_with(exact, d, ls, &self.factors),
                (None, None) => {
                    let mut d = p.values.reconstruct(&p.shape);
                    round_to(dtype, &mut d);
                    output_error_with(exact, &d, ls, &self.factors)
                }
            });
        let elements = p.shape.iter().product::<usize>() as f64;
        let nonzero = (elements * (1.0 - f.sparsity)).round() as u64;
        let written = Written {
            fidelity: Some(f),
            output_error,
            nonzero,
        };
        let body = Body::Processed {
            processed: p,
            dense,
        };
        Ok((body, written))
    }
}

/// The report line of output tensor `planned` (from input tensor `info`),
/// stored in `after` bytes.
fn tensor_report(
    ckpt: &Checkpoint,
    pipeline: &Pipeline,
    planned: &PlannedTensor,
    info: &TensorInfo,
    stages: &[usize],
    after: u64,
    written: &Written,
) -> TensorReport {
    let elements = element_count(&planned.shape);
    // A tensor the structural stages created (a folded bias) has no input
    // of its own; one they rewrote counts the input tensor it came from.
    let original = ckpt.get(&planned.name);
    TensorReport {
        name: planned.name.clone(),
        dtype: info.dtype.name().to_string(),
        original_shape: original.map(|t| t.shape.clone()),
        shape: planned.shape.clone(),
        stages: stage_labels(pipeline, planned.changed, stages),
        bytes_before: if original.is_some() {
            (info.end - info.start) as u64
        } else {
            0
        },
        bytes_after: after,
        bits_per_weight: if elements > 0 {
            after as f64 * 8.0 / elements as f64
        } else {
            0.0
        },
        fidelity: written.fidelity,
        output_error: written.output_error,
    }
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

/// Elements converted at a time by [`count_nonzero`].
const COUNT_CHUNK: usize = 1 << 16;

fn count_nonzero(ckpt: &Checkpoint, info: &TensorInfo) -> u64 {
    let bytes = ckpt.bytes(info);
    let nonzero = |v: &[f32]| v.iter().filter(|&&x| x != 0.0).count() as u64;
    if let Some(values) = f32_in_place(info.dtype, bytes) {
        return nonzero(values);
    }
    // A small buffer converted chunk by chunk, not a copy of the tensor.
    let width = info.dtype.bitsize() / 8;
    let mut buf = vec![0f32; COUNT_CHUNK.min(bytes.len() / width.max(1))];
    bytes
        .chunks(COUNT_CHUNK * width)
        .map(|b| {
            let out = &mut buf[..b.len() / width];
            to_f32(info.dtype, b, out);
            nonzero(out)
        })
        .sum()
}

fn read_config(path: &Path) -> Result<serde_json::Value, RunError> {
    let text = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&text).map_err(|e| RunError::Config {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
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
            &FactorCache::new(),
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
        let source = source_metadata(meta)?;
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
