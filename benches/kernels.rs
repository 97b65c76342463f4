//! Kernel throughput on a 4096 x 4096 f32 matrix (64 MiB), with a memcpy of
//! the same bytes as the baseline to read the figures against. Each kernel
//! that has a plain reference version (quantize, fp8, pruning, bit packing,
//! dtype conversion) is measured beside it as `<name>/reference`; `share`
//! and Huffman coding have no whole-kernel reference (their tests compare
//! the parts: the 1-D k-means, the bit-by-bit coder).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use modelpress::compress::bitpack::{pack_lsb, pack_lsb_reference};
use modelpress::compress::coded::{Granularity, MatrixShape};
use modelpress::compress::huffman::{frequencies, Huffman};
use modelpress::compress::prune::{
    prune_magnitude, prune_magnitude_reference, prune_n_m, prune_n_m_reference,
};
use modelpress::compress::quantize::{
    quantize_fp8, quantize_fp8_reference, quantize_int, quantize_int_reference, IntQuant,
    ScaleSearch,
};
use modelpress::compress::share::{share, Init, ShareParams};
use modelpress::format::dtype::{from_f32, from_f32_reference, Dtype};

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
        g.bench_with_input(BenchmarkId::new(name, "optimized"), &q, |b, q| {
            b.iter(|| quantize_int(&w, shape, q))
        });
        g.bench_with_input(BenchmarkId::new(name, "reference"), &q, |b, q| {
            b.iter(|| quantize_int_reference(&w, shape, q))
        });
    }
    g.bench_function("fp8-channel/optimized", |b| {
        b.iter(|| quantize_fp8(&w, shape, Granularity::Channel))
    });
    g.bench_function("fp8-channel/reference", |b| {
        b.iter(|| quantize_fp8_reference(&w, shape, Granularity::Channel))
    });
    // The pruning kernels work in place: each iteration prunes a fresh copy,
    // so both figures include one memcpy.
    for (name, prune) in [
        (
            "prune-magnitude-50%/optimized",
            (|x: &mut [f32], _| {
                prune_magnitude(x, 0.5);
            }) as fn(&mut [f32], MatrixShape),
        ),
        ("prune-magnitude-50%/reference", |x, _| {
            prune_magnitude_reference(x, 0.5);
        }),
        ("prune-2:4/optimized", |x, shape| prune_n_m(x, shape, 2, 4)),
        ("prune-2:4/reference", |x, shape| {
            prune_n_m_reference(x, shape, 2, 4)
        }),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut x = w.clone();
                prune(&mut x, shape);
                x
            })
        });
    }
    let mut f16 = vec![0u8; w.len() * 2];
    g.bench_function("to-f16/optimized", |b| {
        b.iter(|| from_f32(Dtype::F16, &w, &mut f16))
    });
    g.bench_function("to-f16/reference", |b| {
        b.iter(|| from_f32_reference(Dtype::F16, &w, &mut f16))
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
    g.bench_function("pack-4-bit/optimized", |b| {
        b.iter(|| pack_lsb(&coded.symbols, 4))
    });
    g.bench_function("pack-4-bit/reference", |b| {
        b.iter(|| pack_lsb_reference(&coded.symbols, 4))
    });
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
