//! Checkpoints for tests, written with the reference `safetensors` crate.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;

/// Deterministic pseudo-random numbers (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn gaussian(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-12);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A tensor to write: name, dtype, shape, f32 values (converted to dtype).
pub struct T {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

pub fn gaussian(name: &str, shape: &[usize], std: f32, rng: &mut Rng) -> T {
    let n = shape.iter().product();
    T {
        name: name.into(),
        dtype: StDtype::F32,
        shape: shape.to_vec(),
        values: (0..n).map(|_| rng.gaussian() * std).collect(),
    }
}

fn bytes_of(t: &T) -> Vec<u8> {
    match t.dtype {
        StDtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StDtype::F16 => t
            .values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        StDtype::BF16 => t
            .values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        StDtype::I64 => t
            .values
            .iter()
            .flat_map(|v| (*v as i64).to_le_bytes())
            .collect(),
        other => panic!("test writer does not handle {other:?}"),
    }
}

pub fn write(path: &Path, tensors: &[T]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(bytes_of).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A small MLP: fc1 (256x128) -> fc2 (128x256) -> head (10x128), with biases
/// and a norm vector.
pub fn mlp(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    vec![
        gaussian("fc1.weight", &[256, 128], 0.05, &mut rng),
        gaussian("fc1.bias", &[256], 0.01, &mut rng),
        gaussian("norm.weight", &[256], 1.0, &mut rng),
        gaussian("fc2.weight", &[128, 256], 0.05, &mut rng),
        gaussian("fc2.bias", &[128], 0.01, &mut rng),
        gaussian("head.weight", &[16, 128], 0.05, &mut rng),
    ]
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelpress"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Tensors of a safetensors file: name -> (dtype, shape, bytes).
pub fn read(path: &Path) -> HashMap<String, (StDtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect()
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
