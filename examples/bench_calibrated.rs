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
//! seconds of the whole stage as the engine runs it (plus keeping the better
//! of GPTQ and round-to-nearest per row, which computes the output error),
//! and the relative output error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use faer::{Accum, Mat, Par};
use modelpress::compress::calibrate::{
    output_error, sweep, sweep_plain, LayerStats, SweepGrid, SweepParams, SweepPrune,
};
use modelpress::compress::coded::{Granularity, MatrixShape};
use modelpress::compress::quantize::{IntQuant, ScaleSearch};

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

fn run(method: &str, rows: usize, cols: usize, dir: &Path) {
    let (wp, hp) = paths(dir, rows, cols);
    let w = read_f32(&wp);
    let xtx = read_f32(&hp);
    let shape = MatrixShape { rows, cols };
    let importance: Vec<f32> = (0..cols).map(|j| xtx[j * cols + j] / 8192.0).collect();
    let quant = IntQuant {
        bits: 4,
        symmetric: true,
        granularity: Granularity::Group(128),
        scale_search: ScaleSearch::MinMax,
    };
    let (prune, grid) = match method {
        "gptq" => (
            SweepPrune::None,
            SweepGrid::Int {
                quant,
                importance: &importance,
            },
        ),
        "sparsegpt" => (SweepPrune::Sparsity(0.5), SweepGrid::Keep),
        other => panic!("unknown method {other}"),
    };
    let params = SweepParams::default();
    let started = Instant::now();
    sweep_plain(&w, shape, &xtx, prune, grid, &params).expect("sweep");
    let sweep_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let out = sweep(&w, shape, &xtx, prune, grid, &params).expect("sweep");
    let stage_seconds = started.elapsed().as_secs_f64();
    let stats = LayerStats::new(
        cols,
        (0..cols).map(|j| xtx[j * cols + j]).collect(),
        8192.0,
        Some(xtx.clone()),
    )
    .expect("valid statistics");
    let started = Instant::now();
    let err = output_error(&w, &out.values, &stats);
    let error_seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "impl": "rust",
            "method": method,
            "rows": rows,
            "cols": cols,
            "seconds": sweep_seconds,
            "stage_seconds": stage_seconds,
            "output_error_seconds": error_seconds,
            "output_error": err,
            "rows_rounded": out.rows_rounded,
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
