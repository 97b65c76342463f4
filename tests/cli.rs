mod common;

use common::*;
use safetensors::Dtype as StDtype;

const PRESETS: &[&str] = &[
    "deep-compression",
    "int8",
    "int4-g128",
    "sparse-2of4-int8",
    "fp8",
    "binary",
    "ternary",
];

/// Presets that need calibration statistics (tests/calibration.rs runs them).
const CALIBRATED_PRESETS: &[&str] = &[
    "int4-g128-gptq",
    "sparse-2of4-int8-gptq",
    "deep-compression-calibrated",
];

fn model(dir: &std::path::Path) -> std::path::PathBuf {
    let input = dir.join("in.safetensors");
    write(&input, &mlp(7));
    input
}

fn compress(input: &str, out: &str, preset: &str, format: &str) {
    let o = run(&[
        "compress", input, "-o", out, "--preset", preset, "--format", format,
    ]);
    assert!(o.status.success(), "{preset} {format}: {}", text(&o));
}

#[test]
fn every_preset_compresses_and_packed_restores_to_dense_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    for preset in PRESETS {
        let dense = dir.path().join(format!("{preset}-dense"));
        let packed = dir.path().join(format!("{preset}-packed"));
        let restored = dir.path().join(format!("{preset}-restored"));
        compress(s(&input), s(&dense), preset, "dense");
        compress(s(&input), s(&packed), preset, "packed");
        let o = run(&[
            "decompress",
            s(&packed.join("model.safetensors")),
            "-o",
            s(&restored),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let a = std::fs::read(dense.join("model.safetensors")).unwrap();
        let b = std::fs::read(restored.join("model.safetensors")).unwrap();
        assert!(
            a == b,
            "{preset}: restored file differs from the dense output"
        );
        // Any safetensors reader opens both outputs.
        let d = read(&dense.join("model.safetensors"));
        assert_eq!(d["fc1.weight"].1, vec![256, 128]);
        read(&packed.join("model.safetensors"));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(packed.join("report.json")).unwrap()).unwrap();
        assert!(
            report["totals"]["ratio"].as_f64().unwrap() > 1.0,
            "{preset}"
        );
        // No staging directory is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&packed)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{preset}: {leftovers:?}");
    }
}

#[test]
fn deep_compression_is_at_least_eight_times_smaller_than_f32() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    let out = dir.path().join("out");
    compress(s(&input), s(&out), "deep-compression", "packed");
    let in_bytes = std::fs::metadata(&input).unwrap().len();
    let out_bytes = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let ratio = in_bytes as f64 / out_bytes as f64;
    assert!(ratio >= 8.0, "ratio {ratio:.2}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let fc1 = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "fc1.weight")
        .unwrap();
    assert!(
        (fc1["sparsity"].as_f64().unwrap() - 0.4).abs() < 0.01,
        "{fc1}"
    );
    assert!(fc1["snr_db"].as_f64().unwrap() > 11.0, "{fc1}");
}

#[test]
fn int8_dense_values_are_on_the_per_channel_grid() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    let out = dir.path().join("out");
    compress(s(&input), s(&out), "int8", "dense");
    let orig = read(&input);
    let got = read(&out.join("model.safetensors"));
    let (_, shape, bytes) = &got["fc1.weight"];
    let w = f32s(bytes);
    let x = f32s(&orig["fc1.weight"].2);
    let cols = shape[1];
    for r in 0..shape[0] {
        let row = &x[r * cols..(r + 1) * cols];
        let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        for (c, (&a, &b)) in row.iter().zip(&w[r * cols..(r + 1) * cols]).enumerate() {
            assert!(
                (a - b).abs() <= scale / 2.0 * 1.001,
                "row {r} col {c}: {a} vs {b}"
            );
            let q = b / scale;
            assert!(
                (q - q.round()).abs() < 1e-3,
                "row {r} col {c}: {b} is off the grid"
            );
        }
    }
    // 1-D tensors pass through untouched.
    assert_eq!(got["fc1.bias"].2, orig["fc1.bias"].2);
}

#[test]
fn compressed_tensors_output_has_the_expected_layout() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    for (preset, fmt) in [
        ("int8", "pack-quantized"),
        ("int4-g128", "pack-quantized"),
        ("fp8", "float-quantized"),
    ] {
        let out = dir.path().join(format!("{preset}-ct"));
        compress(s(&input), s(&out), preset, "compressed-tensors");
        let t = read(&out.join("model.safetensors"));
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        let qc = &config["quantization_config"];
        assert_eq!(qc["quant_method"], "compressed-tensors");
        assert_eq!(qc["format"], fmt);
        assert_eq!(qc["quantization_status"], "compressed");
        match preset {
            "int8" => {
                assert_eq!(t["fc1.weight_packed"].0, StDtype::I32);
                assert_eq!(t["fc1.weight_packed"].1, vec![256, 32]);
                assert_eq!(t["fc1.weight_scale"].1, vec![256, 1]);
                assert!(!t.contains_key("fc1.weight"));
            }
            "int4-g128" => {
                assert_eq!(t["fc1.weight_packed"].0, StDtype::I32);
                assert_eq!(t["fc1.weight_packed"].1, vec![256, 16]);
                assert_eq!(t["fc1.weight_shape"].0, StDtype::I64);
                assert_eq!(t["fc1.weight_scale"].1, vec![256, 1]);
                assert_eq!(t["fc2.weight_scale"].1, vec![128, 2]);
                assert_eq!(qc["config_groups"]["group_0"]["weights"]["group_size"], 128);
            }
            _ => {
                assert_eq!(t["fc1.weight"].0, StDtype::F8_E4M3);
            }
        }
        assert_eq!(t["fc1.bias"].0, StDtype::F32);
    }
}

#[test]
fn compressed_tensors_refuses_what_it_cannot_express() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    let out = dir.path().join("out");
    let o = run(&[
        "compress",
        s(&input),
        "-o",
        s(&out),
        "--preset",
        "deep-compression",
        "--format",
        "compressed-tensors",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("share"),
        "{}",
        text(&o)
    );
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn bad_inputs_exit_with_code_2_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    let out = dir.path().join("out");
    let o = run(&["compress", s(&input), "-o", s(&out), "--preset", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown preset `nope`"));

    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, [200, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
    let o = run(&["compress", s(&bad), "-o", s(&out), "--preset", "int8"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    let pipeline = dir.path().join("p.json");
    std::fs::write(
        &pipeline,
        r#"{"stages":[{"stage":"quantize","bits":4,"granularity":"group","group_size":100}]}"#,
    )
    .unwrap();
    let o = run(&[
        "compress",
        s(&input),
        "-o",
        s(&out),
        "--pipeline",
        s(&pipeline),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stage 0 (quantize)"),
        "{}",
        text(&o)
    );
    assert!(!out.join("model.safetensors").exists());

    let o = run(&["compress", s(&input), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn a_sharded_checkpoint_keeps_its_shard_names_and_gets_a_new_index() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ckpt");
    std::fs::create_dir(&input).unwrap();
    let mut tensors = mlp(3);
    let second: Vec<T> = tensors.split_off(3);
    write(&input.join("model-00001-of-00002.safetensors"), &tensors);
    write(&input.join("model-00002-of-00002.safetensors"), &second);
    let mut map = serde_json::Map::new();
    for t in &tensors {
        map.insert(t.name.clone(), "model-00001-of-00002.safetensors".into());
    }
    for t in &second {
        map.insert(t.name.clone(), "model-00002-of-00002.safetensors".into());
    }
    std::fs::write(
        input.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    std::fs::write(input.join("config.json"), r#"{"model_type":"toy"}"#).unwrap();
    for format in ["dense", "packed", "compressed-tensors"] {
        let out = dir.path().join(format!("out-{format}"));
        compress(s(&input), s(&out), "int8", format);
        for shard in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            read(&out.join(shard));
        }
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], "toy");
        if format == "dense" {
            assert_eq!(
                index["weight_map"]["fc2.weight"],
                "model-00002-of-00002.safetensors"
            );
        }
    }
    let restored = dir.path().join("restored");
    let o = run(&[
        "decompress",
        s(&dir.path().join("out-packed")),
        "-o",
        s(&restored),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        assert_eq!(
            std::fs::read(restored.join(shard)).unwrap(),
            std::fs::read(dir.path().join("out-dense").join(shard)).unwrap()
        );
    }
}

#[test]
fn bf16_weights_keep_their_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let mut tensors = mlp(11);
    for t in &mut tensors {
        t.dtype = StDtype::BF16;
    }
    write(&input, &tensors);
    for preset in ["int4-g128", "deep-compression"] {
        let dense = dir.path().join(format!("{preset}-dense"));
        let packed = dir.path().join(format!("{preset}-packed"));
        let restored = dir.path().join(format!("{preset}-restored"));
        compress(s(&input), s(&dense), preset, "dense");
        compress(s(&input), s(&packed), preset, "packed");
        let o = run(&["decompress", s(&packed), "-o", s(&restored)]);
        assert!(o.status.success(), "{}", text(&o));
        let d = read(&dense.join("model.safetensors"));
        assert_eq!(d["fc1.weight"].0, StDtype::BF16);
        assert_eq!(
            std::fs::read(dense.join("model.safetensors")).unwrap(),
            std::fs::read(restored.join("model.safetensors")).unwrap()
        );
    }
}

#[test]
fn inspect_and_presets_answer_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let input = model(dir.path());
    let out = dir.path().join("out");
    compress(s(&input), s(&out), "int4-g128", "packed");
    let o = run(&["inspect", s(&out.join("model.safetensors")), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let packed = v["packed"].as_array().unwrap();
    let fc1 = packed.iter().find(|t| t["name"] == "fc1.weight").unwrap();
    assert_eq!(fc1["values"]["kind"], "affine");
    assert_eq!(fc1["values"]["bits"], 4);

    let o = run(&["presets", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, [PRESETS, CALIBRATED_PRESETS].concat());
}

#[test]
fn serve_refuses_blob_store_settings_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (args, says) in [
        (
            vec!["--blob-store", "ftp://x/y"],
            "neither file://DIR nor s3://",
        ),
        (
            vec!["--blob-store", "s3://Not_A_Bucket/p"],
            "is not a bucket name",
        ),
        (
            vec!["--blob-store", "s3://models/a/../b"],
            "not a usable key prefix",
        ),
        (
            vec!["--blob-store", "s3://models", "--s3-endpoint", "ftp://h"],
            "not an http:// or https:// URL",
        ),
        (vec!["--blob-cache-bytes", "much"], "--blob-cache-bytes"),
    ] {
        let mut all = vec!["serve", "--data-dir", s(&data), "--addr", "127.0.0.1:0"];
        all.extend(args.iter().copied());
        let o = run(&all);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(says),
            "{args:?}: {}",
            text(&o)
        );
        assert!(!data.exists(), "{args:?}: nothing is created");
    }
}
