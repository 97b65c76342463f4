#![allow(dead_code)]

//! The fuzz targets: what each does with arbitrary bytes, and the
//! invariants it checks. Shared by the libFuzzer binaries under `fuzz/`
//! (coverage-guided, `scripts/fuzz.sh`) and by `tests/fuzz.rs` (the seed
//! corpus, found crashes and seeded byte mutations, on every `cargo test`).
//!
//! Each target must return normally for every input: an error is a fine
//! answer to garbage, a panic, an abort or a hang is a bug.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use modelpress::compress::spec::{Pipeline, PipelineSpec};
use modelpress::format::checkpoint::{Checkpoint, CONFIG_FILE, INDEX_FILE};
use modelpress::format::header::parse_header;
use modelpress::format::stats::StatsFile;
use modelpress::run;

/// A fuzz target: it must return for every input.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/<name>.rs` and the corpus
/// directories `fuzz/corpus/<name>/` call them.
pub const TARGETS: [(&str, Target); 6] = [
    ("safetensors_header", safetensors_header),
    ("checkpoint", checkpoint),
    ("packed_decompress", packed_decompress),
    ("pipeline_spec", pipeline_spec),
    ("index_config", index_config),
    ("statistics", statistics),
];

/// The header parser on its own: whatever it accepts lies inside the file.
pub fn safetensors_header(data: &[u8]) {
    if let Ok(header) = parse_header(data, data.len() as u64) {
        let mut last_end = header.data_start;
        for t in &header.tensors {
            assert!(t.start >= last_end, "tensors overlap or are out of order");
            assert!(
                t.start <= t.end && t.end <= data.len(),
                "tensor outside the file"
            );
            last_end = t.end;
        }
    }
}

/// A whole file opened as a checkpoint, every float tensor read.
pub fn checkpoint(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, data).expect("the input is written");
    read_all(&path);
}

fn read_all(path: &Path) {
    if let Ok(ckpt) = Checkpoint::open(path) {
        for t in ckpt.tensors() {
            assert_eq!(ckpt.bytes(t).len(), t.end - t.start);
            if t.dtype.is_float_weight() {
                let values = ckpt.to_f32(t);
                let count: usize = t.shape.iter().product();
                assert_eq!(values.len(), count, "tensor {}", t.name);
            }
        }
    }
}

/// A file restored from the packed format.
pub fn packed_decompress(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let input = dir.path().join("model.safetensors");
    std::fs::write(&input, data).expect("the input is written");
    let out = dir.path().join("out");
    let cancel = AtomicBool::new(false);
    if run::decompress(&input, &out, &run::Silent, &cancel).is_ok() {
        // What it restored is itself a readable checkpoint.
        read_all(&out.join("model.safetensors"));
    }
}

/// JSON read as a pipeline and checked; an accepted pipeline writes out as
/// a spec that is accepted again, unchanged.
pub fn pipeline_spec(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<PipelineSpec>(data) else {
        return;
    };
    let Ok(pipeline) = Pipeline::parse(spec) else {
        return;
    };
    let written = serde_json::to_string(pipeline.spec()).expect("a spec serializes");
    let again: PipelineSpec = serde_json::from_str(&written).expect("a written spec reads back");
    let reparsed = Pipeline::parse(again).expect("a written spec is accepted again");
    assert_eq!(reparsed.spec(), pipeline.spec());
}

/// Two small shards and an index and a config: the first byte picks which
/// file the rest of the input replaces.
pub fn index_config(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let d = dir.path();
    let write = |name: &str, bytes: &[u8]| std::fs::write(d.join(name), bytes).expect("written");
    write("model-00001-of-00002.safetensors", &shard("a.weight"));
    write("model-00002-of-00002.safetensors", &shard("b.weight"));
    let index = br#"{"metadata":{"total_size":32},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.weight":"model-00002-of-00002.safetensors"}}"#;
    let config = br#"{"model_type":"mlp","hidden_size":2}"#;
    if which % 2 == 0 {
        write(INDEX_FILE, rest);
        write(CONFIG_FILE, config);
    } else {
        write(INDEX_FILE, index);
        write(CONFIG_FILE, rest);
    }
    read_all(d);
}

/// A safetensors file holding one 2x2 F32 tensor `name`.
fn shard(name: &str) -> Vec<u8> {
    let header = format!(r#"{{"{name}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}}}"#);
    let mut json = header.into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    for v in [1.0f32, -2.0, 0.5, 4.0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A calibration statistics file, every weight's arrays read and checked.
pub fn statistics(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("stats.safetensors");
    std::fs::write(&path, data).expect("the input is written");
    if let Ok(stats) = StatsFile::open(&path) {
        let weights: Vec<String> = stats.weights().map(str::to_string).collect();
        for w in weights {
            let _ = stats.get(&w);
        }
    }
}
