//! The squared-error scale search on one core, against min-max scales on
//! the same matrix in the same run: 256×4096 f32 (roughly Gaussian) in
//! groups of 128, 4-bit, best of 30 runs each.
//!
//!   RAYON_NUM_THREADS=1 cargo run --release --example bench_scale_search
//!   RAYON_NUM_THREADS=1 cargo run --release --example bench_scale_search -- asym

use std::time::Instant;

use modelpress::compress::coded::{Granularity, MatrixShape};
use modelpress::compress::quantize::{quantize_int, IntQuant, ScaleSearch};

fn main() {
    let (rows, cols) = (256, 4096);
    let mut state = 0x1234_5678_9abc_def0u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            // A sum of four uniforms: near-Gaussian, as trained weights are.
            let mut g = 0.0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                g += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            g * 0.02
        })
        .collect();
    let shape = MatrixShape { rows, cols };
    let symmetric = std::env::args().nth(1).as_deref() != Some("asym");
    let groups = (rows * cols / 128) as f64;
    let ns_per_group = |scale_search| {
        let q = IntQuant {
            bits: 4,
            symmetric,
            granularity: Granularity::Group(128),
            scale_search,
        };
        let mut best = f64::MAX;
        for _ in 0..30 {
            let t = Instant::now();
            std::hint::black_box(quantize_int(&w, shape, &q));
            best = best.min(t.elapsed().as_secs_f64());
        }
        best * 1e9 / groups
    };
    let minmax = ns_per_group(ScaleSearch::MinMax);
    let mse = ns_per_group(ScaleSearch::Mse);
    println!(
        "{} 4-bit, groups of 128, {groups} groups: min-max {minmax:.1} ns/group, \
         squared-error search {mse:.1} ns/group ({:.2}x min-max)",
        if symmetric { "symmetric" } else { "asymmetric" },
        mse / minmax
    );
}
