//! Times the calibrated kernels on one synthetic layer; used by
//! `scripts/bench-calibrated.sh`, which times the numpy reference on the
//! same data in the same run.
//!
//! ```text
//! bench_calibrated gen ROWS COLS DIR   # DIR/w_ROWSxCOLS.f32, DIR/xtx_COLS.f32
//! bench_calibrated run gptq|sparsegpt ROWS COLS DIR
//! ```
//!
//! `gen` writes f32 weights (Laplace, 1% outliers) and `xtx = XᵀX` of 8192
//! correlated rows (each column a mix of its neighbour and a common factor,
//! scales spread over e³). `run` reads them and prints one JSON line: the
//! seconds of the sweep (the kernel the numpy reference implements), the
//! seconds of the whole stage as the engine runs it on a tensor
//! (`stage_seconds`: the factor of the Hessian, the sweep, for gptq the
//! per-row choice between GPTQ and round to nearest, the decoded values and
//! the report's output error), the same for a second tensor with the same
//! statistics (`stage_shared_seconds`: the factor is reused), the CPU
//! seconds of each (all threads: on a busy machine they show the work
//! where wall time shows the load), and the relative output error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use faer::{Accum, Mat, Par};
use modelpress::compress::calibrate::{
    output_error_with, sweep_plain, FactorCache, LayerStats, SweepGrid, SweepParams, SweepPrune,
};
use modelpress::compress::coded::{Granularity, MatrixShape};
use modelpress::compress::quantize::{IntQuant, ScaleSearch};
use modelpress::compress::spec::Pipeline;
use modelpress::compress::tensor::{process_with_stats, Values};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("write");
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).expect("read");
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn paths(dir: &Path, rows: usize, cols: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("w_{rows}x{cols}.f32")),
        dir.join(format!("xtx_{cols}.f32")),
    )
}

fn generate(rows: usize, cols: usize, dir: &Path) {
    let (wp, hp) = paths(dir, rows, cols);
    let mut rng = Rng(0x5EED ^ (rows * 31 + cols) as u64);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            let u = rng.uniform() - 0.5;
            let x = (-u.signum() * (1.0 - 2.0 * u.abs()).ln()) as f32 * 0.02;
            if rng.uniform() < 0.01 {
                x * 6.0
            } else {
                x
            }
        })
        .collect();
    write_f32(&wp, &w);
    if !hp.exists() {
        let n = 8192;
        let scales: Vec<f32> = (0..cols)
            .map(|_| (3.0 * rng.uniform()).exp() as f32)
            .collect();
        let x = Mat::<f32>::from_fn(n, cols, |_, _| 0.0);
        let mut x = x;
        for i in 0..n {
            let common = rng.normal();
            let mut prev = 0.0;
            for j in 0..cols {
                let z = rng.normal();
                x[(i, j)] = scales[j] * (z + 0.8 * prev + 0.5 * common);
                prev = z;
            }
        }
        let mut h = Mat::<f32>::zeros(cols, cols);
        faer::linalg::matmul::matmul(
            h.as_mut(),
            Accum::Replace,
            x.transpose(),
            x.as_ref(),
            1.0f32,
            Par::rayon(0),
        );
        // Exactly symmetric: the lower half mirrored.
        let mut out = vec![0.0f32; cols * cols];
        for i in 0..cols {
            for j in 0..=i {
                out[i * cols + j] = h[(i, j)];
                out[j * cols + i] = h[(i, j)];
            }
        }
        write_f32(&hp, &out);
    }
}

/// CPU seconds (user + system, all threads) this process has used, from
/// `/proc/self/stat` (clock ticks of 1/100 s); 0 where there is none.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime and stime the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn run(method: &str, rows: usize, cols: usize, dir: &Path) {
    let (wp, hp) = paths(dir, rows, cols);
    let w = read_f32(&wp);
    let xtx = read_f32(&hp);
    let shape = MatrixShape { rows, cols };
    let stats = LayerStats::new(
        cols,
        (0..cols).map(|j| xtx[j * cols + j]).collect(),
        8192.0,
        Some(xtx),
    )
    .expect("valid statistics")
    .with_key("layer.weight");
    let xtx = stats.xtx().expect("xtx");
    let importance = stats.importance();
    let quant = IntQuant {
        bits: 4,
        symmetric: true,
        granularity: Granularity::Group(128),
        scale_search: ScaleSearch::MinMax,
    };
    let (prune, grid, stage) = match method {
        "gptq" => (
            SweepPrune::None,
            SweepGrid::Int {
                quant,
                importance: &importance,
            },
            r#"{"stage":"quantize","method":"gptq","bits":4,"symmetric":true,"granularity":"group","group_size":128}"#,
        ),
        "sparsegpt" => (
            SweepPrune::Sparsity(0.5),
            SweepGrid::Keep,
            r#"{"stage":"prune","method":"sparsegpt","sparsity":0.5}"#,
        ),
        other => panic!("unknown method {other}"),
    };
    let params = SweepParams::default();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    sweep_plain(&w, shape, xtx, prune, grid, &params).expect("sweep");
    let sweep_seconds = started.elapsed().as_secs_f64();
    let sweep_cpu = cpu_seconds() - cpu;

    // The whole stage as `modelpress compress --stats` runs it on one
    // tensor: the stage (factor, sweep, for gptq the per-row choice against
    // round to nearest), the decoded values, and the report's output error.
    // Twice: the second tensor shares the first one's statistics (as k_proj
    // shares q_proj's), so its factor is reused.
    let pipeline = Pipeline::from_json(&format!(r#"{{"stages":[{stage}]}}"#)).expect("pipeline");
    let shape_v = [rows, cols];
    let stages = pipeline.stages_for("layer.weight", &shape_v, true);
    let factors = FactorCache::new();
    let mut work = Vec::new();
    let (mut stage_seconds, mut stage_cpu) = (Vec::new(), Vec::new());
    let mut err = None;
    for _ in 0..2 {
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let p = process_with_stats(
            "layer.weight",
            &w,
            &shape_v,
            &pipeline,
            &stages,
            None,
            &|_| {},
            &mut work,
            Some(&stats),
            &factors,
        )
        .expect("stage");
        let dense = p.values.reconstruct(&p.shape);
        err = match p.output_error {
            Some((num, den)) => Some(num / den),
            None => output_error_with(&w, &dense, &stats, &factors),
        };
        stage_seconds.push(started.elapsed().as_secs_f64());
        stage_cpu.push(cpu_seconds() - cpu);
        if let Values::Raw(v) = p.values {
            work = v;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "rust",
            "method": method,
            "rows": rows,
            "cols": cols,
            "seconds": sweep_seconds,
            "stage_seconds": stage_seconds[0],
            "stage_shared_seconds": stage_seconds[1],
            "cpu_seconds": sweep_cpu,
            "stage_cpu_seconds": stage_cpu[0],
            "stage_shared_cpu_seconds": stage_cpu[1],
            "output_error": err,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usize_arg = |i: usize| -> usize { args[i].parse().expect("a number") };
    match args.get(1).map(String::as_str) {
        Some("gen") => generate(usize_arg(2), usize_arg(3), Path::new(&args[4])),
        Some("run") => run(&args[2], usize_arg(3), usize_arg(4), Path::new(&args[5])),
        _ => {
            eprintln!(
                "usage: bench_calibrated gen ROWS COLS DIR | run gptq|sparsegpt ROWS COLS DIR"
            );
            std::process::exit(2);
        }
    }
}
