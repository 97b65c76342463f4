use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use modelpress::compress::report::Report;
use modelpress::compress::spec::{preset, Pipeline, PipelineError, PRESETS};
use modelpress::config::{LogFormat, ServeConfig};
use modelpress::format::checkpoint::Checkpoint;
use modelpress::format::packed::packed_descriptions;
use modelpress::format::stats::StatsFile;
use modelpress::format::writer::Durability;
use modelpress::run::{self, CompressRequest, OutputFormat, Progress, RunError};

/// Compress trained neural-network checkpoints (safetensors).
#[derive(Parser)]
#[command(name = "modelpress", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compress a checkpoint (a .safetensors file or a sharded directory).
    Compress {
        input: PathBuf,
        /// Output directory.
        #[arg(short, long)]
        output: PathBuf,
        /// A named pipeline (see `modelpress presets`).
        #[arg(
            long,
            conflicts_with = "pipeline",
            required_unless_present = "pipeline"
        )]
        preset: Option<String>,
        /// A pipeline JSON file: {"stages": [...]}.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = FormatArg::Packed)]
        format: FormatArg,
        /// config.json to use instead of the one beside the input.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Wait until the output is on the disk (fsync) before returning;
        /// without it the output is left to the page cache, as `cp` does.
        #[arg(long)]
        sync: bool,
        /// Activation statistics of the model (safetensors, made by
        /// scripts/collect_stats.py): needed by gptq, sparsegpt, wanda and
        /// share compensate; they also weigh the other stages' errors.
        #[arg(long)]
        stats: Option<PathBuf>,
    },
    /// Restore a packed checkpoint to its dense form.
    Decompress {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List a checkpoint's tensors (and, for a packed file, their encodings).
    Inspect {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the named pipelines with their stages.
    Presets {
        #[arg(long)]
        json: bool,
    },
    /// Run the HTTP service.
    Serve(Box<ServeConfig>),
    /// Print the OpenAPI document of the HTTP service.
    Openapi,
}

/// Bad usage or bad input: exit code 2.
#[derive(Debug)]
struct BadInput(String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// `--format`: [`OutputFormat`] as a command-line value.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// Same tensor names and dtypes, decompressed values.
    Dense,
    /// The compact form, restorable with `decompress`.
    Packed,
    /// The layout vLLM and llm-compressor load.
    CompressedTensors,
}

impl From<FormatArg> for OutputFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Dense => OutputFormat::Dense,
            FormatArg::Packed => OutputFormat::Packed,
            FormatArg::CompressedTensors => OutputFormat::CompressedTensors,
        }
    }
}

fn classify(e: RunError) -> anyhow::Error {
    if e.is_bad_input() {
        BadInput(e.to_string()).into()
    } else {
        e.into()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        end_quietly_on_closed_pipe();
    }
    let outcome = std::panic::catch_unwind(|| run_command(cli));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
        Err(_) => {
            eprintln!("error: internal failure (see the message above)");
            ExitCode::from(1)
        }
    }
}

/// A closed pipe (`modelpress inspect X | head`) ends the command quietly,
/// as it ends other Unix tools: Rust ignores SIGPIPE, which turns the next
/// print into a panic. The server keeps ignoring it: a client that goes
/// away is an error to handle, not a reason to stop.
fn end_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: sets the disposition of one signal to its default, before any
    // other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn load_pipeline(preset_name: Option<&str>, file: Option<&Path>) -> anyhow::Result<Pipeline> {
    match (preset_name, file) {
        (Some(name), _) => preset(name).map(|p| p.pipeline()).ok_or_else(|| {
            let names: Vec<_> = PRESETS.iter().map(|p| p.name).collect();
            BadInput(format!(
                "unknown preset `{name}`; known presets: {}",
                names.join(", ")
            ))
            .into()
        }),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
            Pipeline::from_json(&text).map_err(|e| match e {
                PipelineError::Json(_) | PipelineError::Spec(_) => {
                    BadInput(format!("{}: {e}", path.display())).into()
                }
            })
        }
        (None, None) => Err(BadInput("give --preset NAME or --pipeline FILE".into()).into()),
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    modelpress::cpu::check_env().map_err(BadInput)?;
    let cancel = AtomicBool::new(false);
    match cli.command {
        Command::Serve(config) => serve(*config)?,
        Command::Openapi => {
            println!("{}", modelpress::api::openapi().to_pretty_json()?);
        }
        Command::Compress {
            input,
            output,
            preset,
            pipeline,
            format,
            config,
            sync,
            stats,
        } => {
            let pipeline = load_pipeline(preset.as_deref(), pipeline.as_deref())?;
            let stats = stats
                .as_deref()
                .map(StatsFile::open)
                .transpose()
                .map_err(|e| classify(RunError::Stats(e)))?;
            let req = CompressRequest {
                pipeline: &pipeline,
                format: format.into(),
                config: config.as_deref(),
                durability: if sync {
                    Durability::Synced
                } else {
                    Durability::Cached
                },
            };
            let bars = Bars::new();
            let report =
                run::compress_with_stats(&input, &output, &req, stats.as_ref(), &bars, &cancel)
                    .map_err(classify)?;
            bars.finish();
            print_summary(&report, &output);
        }
        Command::Decompress { input, output } => {
            let bars = Bars::new();
            let restored = run::decompress(&input, &output, &bars, &cancel).map_err(classify)?;
            bars.finish();
            println!(
                "restored {} tensors ({} bytes) into {}",
                restored.tensors,
                restored.bytes,
                output.display()
            );
        }
        Command::Inspect { path, json } => inspect(&path, json)?,
        Command::Presets { json } => {
            if json {
                let list: Vec<_> = PRESETS
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "name": p.name,
                            "description": p.description,
                            "pipeline": p.spec(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for p in PRESETS {
                    println!("{}\n  {}", p.name, p.description);
                    for s in &p.spec().stages {
                        println!("  - {}", serde_json::to_string(s)?);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(config: ServeConfig) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let app = modelpress::startup::Application::build(&config).await?;
        tracing::info!(
            "listening on http://{} (data directory {}, {} workers, {} kernels)",
            app.local_addr(),
            config.data_dir.display(),
            config.worker_count(),
            modelpress::cpu::level()
        );
        app.run_until_stopped(shutdown_signal()).await
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn print_summary(report: &Report, out: &Path) {
    let t = &report.totals;
    println!("{:<22} {}", "output", out.display());
    println!("{:<22} {}", "format", report.format);
    println!("{:<22} {}", "tensors", t.tensors);
    println!("{:<22} {}", "bytes before", human(t.bytes_before));
    println!("{:<22} {}", "bytes after", human(t.bytes_after));
    println!("{:<22} {:.2}x", "ratio", t.ratio);
    println!("{:<22} {:.4}", "parameters kept", t.parameters_kept);
    match (&t.worst_snr_tensor, t.worst_snr_db) {
        (Some(name), Some(db)) => println!("{:<22} {db:.2} dB ({name})", "worst-tensor SNR"),
        _ => println!("{:<22} lossless", "worst-tensor SNR"),
    }
    if let (Some(name), Some(e)) = (&t.worst_output_error_tensor, t.worst_output_error) {
        println!("{:<22} {e:.3e} ({name})", "worst output error");
    }
    println!("{:<22} {:.2} s", "time", t.seconds_total);
}

fn inspect(path: &Path, json: bool) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(path).map_err(|e| BadInput(e.to_string()))?;
    let mut packed = Vec::new();
    for i in 0..ckpt.shard_names().len() {
        if let Ok(d) = packed_descriptions(ckpt.shard_metadata(i)) {
            packed.extend(d);
        }
    }
    if json {
        let tensors: Vec<_> = ckpt
            .tensors()
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "bytes": t.end - t.start,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "path": path,
            "shards": ckpt.shard_names(),
            "total_bytes": ckpt.total_bytes(),
            "tensors": tensors,
            "packed": if packed.is_empty() { None } else { Some(&packed) },
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "{} shard(s), {} tensors, {}",
        ckpt.shard_names().len(),
        ckpt.tensors().len(),
        human(ckpt.total_bytes())
    );
    for t in ckpt.tensors() {
        println!(
            "{:<48} {:<8} {:<20} {}",
            t.name,
            t.dtype.name(),
            format!("{:?}", t.shape),
            human((t.end - t.start) as u64)
        );
    }
    if !packed.is_empty() {
        println!("\npacked encodings:");
        for d in &packed {
            println!(
                "{:<48} {:<8} {:<20} {}",
                d.name,
                d.dtype.name(),
                format!("{:?}", d.shape),
                serde_json::to_string(&d.values).context("describing an encoding")?
            );
        }
    }
    Ok(())
}

/// Progress bars on a terminal, nothing otherwise.
struct Bars {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl Bars {
    fn new() -> Self {
        Self {
            bar: Mutex::new(None),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    fn finish(&self) {
        if let Ok(mut b) = self.bar.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}

impl Progress for Bars {
    fn phase(&self, name: &str, total: usize) {
        if !self.enabled {
            return;
        }
        if let Ok(mut b) = self.bar.lock() {
            if let Some(old) = b.take() {
                old.finish_and_clear();
            }
            let bar = ProgressBar::new(total as u64);
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            *b = Some(bar);
        }
    }

    fn tensor_done(&self, name: &str, done: usize, _total: usize) {
        if let Ok(b) = self.bar.lock() {
            if let Some(b) = b.as_ref() {
                b.set_position(done as u64);
                b.set_message(name.to_string());
            }
        }
    }
}
