//! Kernel throughput on a 4096 x 4096 f32 matrix (64 MiB), each optimized
//! kernel beside its plain reference version where one exists, and a memcpy
//! of the same bytes as the baseline to read the figures against.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use modelpress::compress::coded::{Granularity, MatrixShape};
use modelpress::compress::huffman::{frequencies, Huffman};
use modelpress::compress::prune::{prune_magnitude, prune_n_m};
use modelpress::compress::quantize::{quantize_int, IntQuant, ScaleSearch};
use modelpress::compress::share::{share, Init, ShareParams};

fn matrix(rows: usize, cols: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..rows * cols)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let row_scale = 1.0 + (i / cols % 7) as f32;
            u * u * u * row_scale
        })
        .collect()
}

fn kernels(c: &mut Criterion) {
    let shape = MatrixShape {
        rows: 4096,
        cols: 4096,
    };
    let w = matrix(shape.rows, shape.cols);
    let mut g = c.benchmark_group("kernels-4096x4096");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((w.len() * 4) as u64));

    g.bench_function("baseline-memcpy", |b| b.iter(|| w.clone()));
    for (name, q) in [
        (
            "int8-channel",
            IntQuant {
                bits: 8,
                symmetric: true,
                granularity: Granularity::Channel,
                scale_search: ScaleSearch::MinMax,
            },
        ),
        (
            "int4-g128",
            IntQuant {
                bits: 4,
                symmetric: true,
                granularity: Granularity::Group(128),
                scale_search: ScaleSearch::MinMax,
            },
        ),
        (
            "int4-g128-mse",
            IntQuant {
                bits: 4,
                symmetric: true,
                granularity: Granularity::Group(128),
                scale_search: ScaleSearch::Mse,
            },
        ),
    ] {
        g.bench_with_input(BenchmarkId::new("quantize", name), &q, |b, q| {
            b.iter(|| quantize_int(&w, shape, q))
        });
    }
    g.bench_function("prune-magnitude-50%", |b| {
        b.iter(|| {
            let mut x = w.clone();
            prune_magnitude(&mut x, 0.5)
        })
    });
    g.bench_function("prune-2:4", |b| {
        b.iter(|| {
            let mut x = w.clone();
            prune_n_m(&mut x, shape, 2, 4)
        })
    });
    let p = ShareParams {
        clusters: 16,
        init: Init::Linear,
        iterations: 20,
        per_channel: false,
    };
    g.bench_function("share-16", |b| b.iter(|| share(&w, shape, &p)));
    // As in the deep-compression preset: 40% of the weights pruned first.
    let mut pruned = w.clone();
    prune_magnitude(&mut pruned, 0.4);
    let pp = ShareParams {
        init: Init::KmeansPlusPlus,
        ..p
    };
    g.bench_function("share-16-kmeans++-pruned", |b| {
        b.iter(|| share(&pruned, shape, &pp))
    });
    let per_row = ShareParams {
        per_channel: true,
        ..pp
    };
    g.bench_function("share-16-kmeans++-per-channel", |b| {
        b.iter(|| share(&pruned, shape, &per_row))
    });
    let coded = share(&pruned, shape, &pp);
    g.bench_function("huffman-frequencies", |b| {
        b.iter(|| frequencies(&coded.symbols))
    });
    let freqs = frequencies(&coded.symbols);
    let code = Huffman::from_frequencies(&freqs);
    let stream = code.encode(&coded.symbols).unwrap();
    g.bench_function("huffman-encode", |b| {
        b.iter(|| code.encode(&coded.symbols).unwrap())
    });
    g.bench_function("huffman-decode", |b| {
        b.iter(|| code.decode(&stream, coded.symbols.len()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
