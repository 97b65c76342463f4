//! Structural and model-level stages through the command line.
mod common;

use common::*;
use safetensors::Dtype as StDtype;

fn compress_with(input: &std::path::Path, out: &std::path::Path, pipeline: &str, format: &str) {
    let file = out.with_extension("json");
    std::fs::write(&file, pipeline).unwrap();
    let o = run(&[
        "compress",
        s(input),
        "-o",
        s(out),
        "--pipeline",
        s(&file),
        "--format",
        format,
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

fn chain(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    vec![
        gaussian("fc1.weight", &[64, 32], 0.1, &mut rng),
        gaussian("fc1.bias", &[64], 0.1, &mut rng),
        gaussian("fc2.weight", &[48, 64], 0.1, &mut rng),
        gaussian("fc2.bias", &[48], 0.1, &mut rng),
        gaussian("fc3.weight", &[10, 48], 0.1, &mut rng),
        gaussian("fc3.bias", &[10], 0.1, &mut rng),
    ]
}

fn restored_equals_dense(dir: &std::path::Path, input: &std::path::Path, pipeline: &str) {
    let dense = dir.join("eq-dense");
    let packed = dir.join("eq-packed");
    let restored = dir.join("eq-restored");
    compress_with(input, &dense, pipeline, "dense");
    compress_with(input, &packed, pipeline, "packed");
    let o = run(&["decompress", s(&packed), "-o", s(&restored)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read(dense.join("model.safetensors")).unwrap()
            == std::fs::read(restored.join("model.safetensors")).unwrap(),
        "restored differs from dense for {pipeline}"
    );
    for d in [dense, packed, restored] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn channel_pruning_physically_shrinks_a_chain_and_keeps_whole_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write(&input, &chain(1));
    let out = dir.path().join("out");
    let pipeline =
        r#"{"stages":[{"stage":"prune","method":"channel","sparsity":0.5,"norm":"l2"}]}"#;
    compress_with(&input, &out, pipeline, "dense");
    let got = read(&out.join("model.safetensors"));
    assert_eq!(got["fc1.weight"].1, vec![32, 32]);
    assert_eq!(got["fc1.bias"].1, vec![32]);
    assert_eq!(got["fc2.weight"].1, vec![24, 32]);
    assert_eq!(got["fc2.bias"].1, vec![24]);
    assert_eq!(got["fc3.weight"].1, vec![10, 24]);
    // Every kept fc1 row is an original row, untouched.
    let orig = read(&input);
    let o = f32s(&orig["fc1.weight"].2);
    let g = f32s(&got["fc1.weight"].2);
    for r in g.chunks(32) {
        assert!(
            o.chunks(32).any(|x| x == r),
            "a kept row is not an original row"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let fc2 = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "fc2.weight")
        .unwrap();
    assert_eq!(fc2["original_shape"], serde_json::json!([48, 64]));
    assert_eq!(fc2["shape"], serde_json::json!([24, 32]));
    restored_equals_dense(dir.path(), &input, pipeline);
}

#[test]
fn folding_batch_norm_removes_it_and_creates_the_bias() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let mut rng = Rng::new(5);
    let mut var = gaussian("b_bn.running_var", &[8], 0.3, &mut rng);
    var.values.iter_mut().for_each(|v| *v = v.abs() + 0.5);
    let tensors = vec![
        gaussian("a_conv.weight", &[8, 3, 3, 3], 0.2, &mut rng),
        gaussian("b_bn.weight", &[8], 1.0, &mut rng),
        gaussian("b_bn.bias", &[8], 0.1, &mut rng),
        gaussian("b_bn.running_mean", &[8], 0.1, &mut rng),
        var,
        T {
            name: "b_bn.num_batches_tracked".into(),
            dtype: StDtype::I64,
            shape: vec![],
            values: vec![100.0],
        },
        gaussian("c_fc.weight", &[4, 8 * 6 * 6], 0.1, &mut rng),
    ];
    write(&input, &tensors);
    let out = dir.path().join("out");
    let pipeline = r#"{"stages":[{"stage":"fold_batchnorm","pairs":[["a_conv","b_bn"]]}]}"#;
    compress_with(&input, &out, pipeline, "dense");
    let got = read(&out.join("model.safetensors"));
    assert!(
        got.keys().all(|k| !k.starts_with("b_bn")),
        "{:?}",
        got.keys()
    );
    assert_eq!(got["a_conv.bias"].1, vec![8]);
    // Channel 0: scale = gamma / sqrt(var + eps), bias = beta - mean * scale.
    let (w, g, b, m, v) = (
        f32s(&read(&input)["a_conv.weight"].2),
        tensors[1].values[0],
        tensors[2].values[0],
        tensors[3].values[0],
        tensors[4].values[0],
    );
    let scale = g / (v + 1e-5).sqrt();
    let folded = f32s(&got["a_conv.weight"].2);
    assert!((folded[0] - w[0] * scale).abs() <= 1e-6 * (1.0 + w[0].abs()));
    let bias = f32s(&got["a_conv.bias"].2);
    assert!((bias[0] - (b - m * scale)).abs() <= 1e-5);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        report["totals"]["removed_tensors"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    restored_equals_dense(dir.path(), &input, pipeline);
}

#[test]
fn global_magnitude_pruning_reaches_the_sparsity_across_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let mut tensors = chain(2);
    // Different scales per tensor: one global threshold prunes them unevenly.
    tensors[2].values.iter_mut().for_each(|v| *v *= 10.0);
    write(&input, &tensors);
    let out = dir.path().join("out");
    let pipeline =
        r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.6,"scope":"global"}]}"#;
    compress_with(&input, &out, pipeline, "dense");
    let got = read(&out.join("model.safetensors"));
    let mut total = 0usize;
    let mut zeros = 0usize;
    let mut per = Vec::new();
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let v = f32s(&got[name].2);
        let z = v.iter().filter(|&&x| x == 0.0).count();
        per.push(z as f64 / v.len() as f64);
        total += v.len();
        zeros += z;
    }
    assert_eq!(zeros, (0.6 * total as f64).round() as usize);
    assert!(
        per[1] < 0.5 && per[0] > 0.9,
        "one threshold prunes the large-scale tensor least: {per:?}"
    );
    restored_equals_dense(dir.path(), &input, pipeline);
}

#[test]
fn n_m_pruning_holds_in_the_output_and_low_rank_stores_factors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write(&input, &chain(3));
    let out = dir.path().join("nm");
    let pipeline = r#"{"stages":[{"stage":"prune","method":"n:m","n":2,"m":4},{"stage":"quantize","bits":8}]}"#;
    compress_with(&input, &out, pipeline, "dense");
    let got = read(&out.join("model.safetensors"));
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        for run in f32s(&got[name].2).chunks(4) {
            assert!(
                run.iter().filter(|&&x| x != 0.0).count() <= 2,
                "{name}: {run:?}"
            );
        }
    }
    restored_equals_dense(dir.path(), &input, pipeline);

    let out = dir.path().join("lr");
    let pipeline =
        r#"{"stages":[{"stage":"low_rank","rank_ratio":0.25,"targets":["fc2.weight"]}]}"#;
    compress_with(&input, &out, pipeline, "packed");
    let got = read(&out.join("model.safetensors"));
    assert_eq!(got["fc2.weight:a"].1, vec![48, 12]);
    assert_eq!(got["fc2.weight:b"].1, vec![12, 64]);
    assert!(!got.contains_key("fc2.weight"));
    restored_equals_dense(dir.path(), &input, pipeline);
}

#[test]
fn a_structural_error_names_the_tensor_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write(&input, &chain(4));
    let out = dir.path().join("out");
    let file = dir.path().join("p.json");
    std::fs::write(
        &file,
        r#"{"stages":[{"stage":"fold_batchnorm","pairs":[["fc1","bn9"]]}]}"#,
    )
    .unwrap();
    let o = run(&["compress", s(&input), "-o", s(&out), "--pipeline", s(&file)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bn9"),
        "{}",
        text(&o)
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
