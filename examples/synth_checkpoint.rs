//! Writes a synthetic transformer-shaped f32 checkpoint for benchmarks:
//! attention and MLP matrices (hidden × hidden, intermediate × hidden,
//! hidden × intermediate) whose rows have their own scale and a few
//! outliers, plus 1-D norm vectors. One tensor is in memory at a time.
//!
//! `cargo run --release --example synth_checkpoint -- OUT.safetensors [GiB] [hidden] [intermediate]`

use std::collections::BTreeMap;
use std::path::PathBuf;

use modelpress::format::dtype::Dtype;
use modelpress::format::writer::SafetensorsWriter;
use rayon::prelude::*;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(x: u64) -> f32 {
    ((x >> 40) as f32 + 0.5) / (1u64 << 24) as f32
}

/// A matrix with per-row scale variation and rare large outliers.
fn matrix(seed: u64, rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows * cols * 4];
    out.par_chunks_mut(cols * 4)
        .enumerate()
        .for_each(|(r, row)| {
            let mut s = splitmix(seed ^ (r as u64).wrapping_mul(0x1000_0001));
            // Row scales spread over about a factor of 8.
            let row_scale = 0.02 * (2.0f32).powf(3.0 * unit(s) - 1.5);
            for c in 0..cols {
                s = splitmix(s);
                let (u1, u2) = (unit(s), unit(s.rotate_left(24)));
                let g = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                let outlier = if (s >> 52) & 0x3ff == 0 { 12.0 } else { 1.0 };
                let v = g * row_scale * outlier;
                row[c * 4..c * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
        });
    out
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(args.get(1).ok_or_else(|| {
        anyhow::anyhow!("usage: synth_checkpoint OUT.safetensors [GiB] [hidden] [intermediate]")
    })?);
    let gib: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let hidden: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(4096);
    let inter: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(11008);
    let budget = (gib * (1u64 << 30) as f64) as u64;

    let mut plan: Vec<(String, Vec<usize>)> = Vec::new();
    let mut bytes = 0u64;
    'layers: for layer in 0.. {
        let p = format!("model.layers.{layer}");
        let parts: [(String, Vec<usize>); 9] = [
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.self_attn.q_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
        ];
        for (name, shape) in parts {
            let size = shape.iter().product::<usize>() as u64 * 4;
            if bytes + size > budget && shape.len() == 2 {
                break 'layers;
            }
            bytes += size;
            plan.push((name, shape));
        }
    }
    plan.push(("model.norm.weight".into(), vec![hidden]));

    let mut w = SafetensorsWriter::create(&out, plan.len() as u64 * 200 + 1024)?;
    for (i, (name, shape)) in plan.iter().enumerate() {
        let data = if shape.len() == 1 {
            (0..shape[0])
                .flat_map(|j| (1.0 + 0.1 * unit(splitmix(j as u64))).to_le_bytes())
                .collect()
        } else {
            matrix(i as u64 + 1, shape[0], shape[1])
        };
        w.append(name, Dtype::F32, shape, &data)?;
    }
    let size = w.finish(&BTreeMap::new())?;
    println!("{} tensors, {size} bytes", plan.len());
    Ok(())
}
