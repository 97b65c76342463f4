//! Calibrated compression end to end through the command line: a small MLP
//! and its activation statistics are made here, compressed with and without
//! them, and judged by the network's outputs on fresh inputs.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;

const D_IN: usize = 128;
const HIDDEN: usize = 256;
const D_OUT: usize = 32;

/// Inputs as transformer activations look: columns correlated with their
/// neighbour and a common factor, scales spread over e², and a few outlier
/// features twenty times larger.
fn inputs(n: usize, rng: &mut Rng) -> Vec<f32> {
    let mut scale_rng = Rng::new(77);
    let scales: Vec<f32> = (0..D_IN)
        .map(|j| {
            let s = (2.0 * scale_rng.uniform()).exp() as f32;
            if j % 16 == 3 {
                20.0 * s
            } else {
                s
            }
        })
        .collect();
    let mut x = vec![0.0f32; n * D_IN];
    for row in x.chunks_mut(D_IN) {
        let common = rng.gaussian();
        let mut prev = 0.0;
        for (j, v) in row.iter_mut().enumerate() {
            let z = rng.gaussian();
            *v = scales[j] * (z + 0.8 * prev + 0.6 * common);
            prev = z;
        }
    }
    x
}

struct Mlp {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// `y = W x + b` for every row of `x` (`n × cols`).
fn linear(x: &[f32], w: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    let rows = b.len();
    x.chunks(cols)
        .flat_map(|xr| {
            (0..rows).map(move |r| {
                let wr = &w[r * cols..(r + 1) * cols];
                b[r] + wr.iter().zip(xr).map(|(a, b)| a * b).sum::<f32>()
            })
        })
        .collect()
}

impl Mlp {
    fn hidden(&self, x: &[f32]) -> Vec<f32> {
        linear(x, &self.w1, &self.b1, D_IN)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect()
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        linear(&self.hidden(x), &self.w2, &self.b2, HIDDEN)
    }

    fn tensors(&self) -> Vec<T> {
        let t = |name: &str, shape: &[usize], v: &[f32]| T {
            name: name.into(),
            dtype: StDtype::F32,
            shape: shape.to_vec(),
            values: v.to_vec(),
        };
        vec![
            t("fc1.weight", &[HIDDEN, D_IN], &self.w1),
            t("fc1.bias", &[HIDDEN], &self.b1),
            t("fc2.weight", &[D_OUT, HIDDEN], &self.w2),
            t("fc2.bias", &[D_OUT], &self.b2),
        ]
    }

    fn load(path: &Path) -> Self {
        let t = read(path);
        let get = |n: &str| f32s(&t[n].2);
        Self {
            w1: get("fc1.weight"),
            b1: get("fc1.bias"),
            w2: get("fc2.weight"),
            b2: get("fc2.bias"),
        }
    }
}

fn model(rng: &mut Rng) -> Mlp {
    let g = |n: usize, std: f32, rng: &mut Rng| -> Vec<f32> {
        (0..n).map(|_| rng.gaussian() * std).collect()
    };
    Mlp {
        w1: g(HIDDEN * D_IN, 0.1, rng),
        b1: g(HIDDEN, 0.1, rng),
        w2: g(D_OUT * HIDDEN, 0.1, rng),
        b2: g(D_OUT, 0.1, rng),
    }
}

/// `in_sum2`, `counts` and `xtx` of inputs `x` (`n × d`), summed in f64.
fn stats_of(x: &[f32], d: usize) -> (Vec<f32>, f32, Vec<f32>) {
    let mut xtx = vec![0.0f64; d * d];
    for row in x.chunks(d) {
        for i in 0..d {
            for j in 0..d {
                xtx[i * d + j] += f64::from(row[i]) * f64::from(row[j]);
            }
        }
    }
    let in_sum2 = (0..d).map(|j| xtx[j * d + j] as f32).collect();
    let n = (x.len() / d) as f32;
    (in_sum2, n, xtx.into_iter().map(|v| v as f32).collect())
}

/// A safetensors file of F32 tensors with `__metadata__`.
fn write_with_metadata(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: &[(&str, &str)],
) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.2.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.0.clone(),
                TensorView::new(StDtype::F32, t.1.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize_to_file(views, Some(meta), path).unwrap();
}

type Arrays = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The statistics of both layers from calibration inputs `x`.
fn statistics(m: &Mlp, x: &[f32], full: bool) -> Arrays {
    let mut out = Vec::new();
    for (name, input, d) in [
        ("fc1.weight", x.to_vec(), D_IN),
        ("fc2.weight", m.hidden(x), HIDDEN),
    ] {
        let (in_sum2, n, xtx) = stats_of(&input, d);
        out.push((format!("{name}.in_sum2"), vec![d], in_sum2));
        out.push((format!("{name}.counts"), vec![1], vec![n]));
        if full {
            out.push((format!("{name}.xtx"), vec![d, d], xtx));
        }
    }
    out
}

struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    stats: PathBuf,
    mlp: Mlp,
    eval: Vec<f32>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(2024);
    let mlp = model(&mut rng);
    let calib = inputs(4096, &mut rng);
    let eval = inputs(1024, &mut rng);
    let model = dir.path().join("model.safetensors");
    write(&model, &mlp.tensors());
    let stats = dir.path().join("stats.safetensors");
    write_with_metadata(
        &stats,
        &statistics(&mlp, &calib, true),
        &[("modelpress.stats", "1")],
    );
    Setup {
        dir,
        model,
        stats,
        mlp,
        eval,
    }
}

impl Setup {
    /// Compresses with `pipeline` (JSON) to dense, with or without the
    /// statistics; returns the network's relative output error on the
    /// evaluation inputs and the report.
    fn run(&self, tag: &str, pipeline: &str, stats: bool) -> (f64, serde_json::Value) {
        let pfile = self.dir.path().join(format!("{tag}.json"));
        std::fs::write(&pfile, pipeline).unwrap();
        let out = self.dir.path().join(tag);
        let mut args = vec![
            "compress",
            s(&self.model),
            "-o",
            s(&out),
            "--pipeline",
            s(&pfile),
            "--format",
            "dense",
        ];
        if stats {
            args.extend(["--stats", s(&self.stats)]);
        }
        let o = run(&args);
        assert!(o.status.success(), "{tag}: {}", text(&o));
        let got = Mlp::load(&out.join("model.safetensors"));
        let (y, y2) = (self.mlp.forward(&self.eval), got.forward(&self.eval));
        let num: f64 = y
            .iter()
            .zip(&y2)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let den: f64 = y.iter().map(|a| f64::from(*a).powi(2)).sum();
        let report =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        (num / den, report)
    }
}

fn tensor_output_error(report: &serde_json::Value, name: &str) -> f64 {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["output_error"].as_f64())
        .unwrap_or_else(|| panic!("no output_error for {name}: {report}"))
}

#[test]
fn calibrated_pruning_keeps_the_outputs_much_closer_than_magnitude_pruning() {
    let st = setup();
    let (magnitude, _) = st.run(
        "magnitude",
        r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.5}]}"#,
        false,
    );
    let (wanda, wr) = st.run(
        "wanda",
        r#"{"stages":[{"stage":"prune","method":"wanda","sparsity":0.5}]}"#,
        true,
    );
    let (sparsegpt, sr) = st.run(
        "sparsegpt",
        r#"{"stages":[{"stage":"prune","method":"sparsegpt","sparsity":0.5}]}"#,
        true,
    );
    eprintln!(
        "relative output error at 50%: magnitude {magnitude:.4}, wanda {wanda:.4}, sparsegpt {sparsegpt:.4}"
    );
    assert!(
        wanda < 0.5 * magnitude,
        "wanda {wanda:.4} vs magnitude {magnitude:.4}"
    );
    assert!(
        sparsegpt < 0.5 * magnitude,
        "sparsegpt {sparsegpt:.4} vs magnitude {magnitude:.4}"
    );
    // Both reach the sparsity asked for.
    for r in [&wr, &sr] {
        for t in r["tensors"].as_array().unwrap() {
            if t["name"].as_str().unwrap().ends_with("weight") {
                assert!((t["sparsity"].as_f64().unwrap() - 0.5).abs() < 0.01, "{t}");
            }
        }
    }
    assert!(tensor_output_error(&sr, "fc1.weight") < tensor_output_error(&wr, "fc1.weight"));
    assert!(sr["statistics_sha256"].as_str().unwrap().len() == 64);
    assert!(sr["totals"]["worst_output_error_tensor"].is_string());
}

#[test]
fn gptq_int4_keeps_the_outputs_closer_than_round_to_nearest() {
    let st = setup();
    let q = |method: &str| {
        format!(
            r#"{{"stages":[{{"stage":"quantize","bits":4,"granularity":"channel","method":"{method}"}}]}}"#
        )
    };
    let (rtn, rr) = st.run("rtn", &q("rtn"), true);
    let (gptq, gr) = st.run("gptq", &q("gptq"), true);
    eprintln!("relative output error at int4: rtn {rtn:.5}, gptq {gptq:.5}");
    assert!(gptq < 0.8 * rtn, "gptq {gptq:.5} vs rtn {rtn:.5}");
    for name in ["fc1.weight", "fc2.weight"] {
        assert!(
            tensor_output_error(&gr, name) < tensor_output_error(&rr, name),
            "{name}"
        );
    }
    let fc1 = gr["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "fc1.weight")
        .unwrap();
    assert_eq!(fc1["stages"][0], "quantize:int4:gptq");
}

#[test]
fn importance_weighted_scales_are_closer_than_plain_mse_scales() {
    let st = setup();
    let p = r#"{"stages":[{"stage":"quantize","bits":3,"granularity":"channel","scale_search":"mse"}]}"#;
    let (plain, _) = st.run("plain", p, false);
    let (weighted, _) = st.run("weighted", p, true);
    eprintln!(
        "relative output error at int3 mse: plain {plain:.5}, importance-weighted {weighted:.5}"
    );
    assert!(
        weighted < plain,
        "weighted {weighted:.5} vs plain {plain:.5}"
    );
}

#[test]
fn calibrated_presets_run_and_packed_restores_to_dense_bit_for_bit() {
    let st = setup();
    for preset in [
        "int4-g128-gptq",
        "sparse-2of4-int8-gptq",
        "deep-compression-calibrated",
    ] {
        let dense = st.dir.path().join(format!("{preset}-dense"));
        let packed = st.dir.path().join(format!("{preset}-packed"));
        let restored = st.dir.path().join(format!("{preset}-restored"));
        for (out, format) in [(&dense, "dense"), (&packed, "packed")] {
            let o = run(&[
                "compress",
                s(&st.model),
                "-o",
                s(out),
                "--preset",
                preset,
                "--format",
                format,
                "--stats",
                s(&st.stats),
            ]);
            assert!(o.status.success(), "{preset} {format}: {}", text(&o));
        }
        let o = run(&["decompress", s(&packed), "-o", s(&restored)]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            std::fs::read(dense.join("model.safetensors")).unwrap(),
            std::fs::read(restored.join("model.safetensors")).unwrap(),
            "{preset}"
        );
    }
    // 2:4 along the input dimension after the joint sweep.
    let w = f32s(
        &read(
            &st.dir
                .path()
                .join("sparse-2of4-int8-gptq-dense/model.safetensors"),
        )["fc1.weight"]
            .2,
    );
    for win in w.chunks(4) {
        assert!(win.iter().filter(|&&x| x != 0.0).count() <= 2, "{win:?}");
    }
    // The compressed-tensors config records the 2:4 structure the joint
    // sweep left, as it does for magnitude n:m pruning.
    let ct = st.dir.path().join("sparse-2of4-int8-gptq-ct");
    let o = run(&[
        "compress",
        s(&st.model),
        "-o",
        s(&ct),
        "--preset",
        "sparse-2of4-int8-gptq",
        "--format",
        "compressed-tensors",
        "--stats",
        s(&st.stats),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ct.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"]["sparsity_config"]["sparsity_structure"], "2:4",
        "{config}"
    );
}

/// Runs `compress` with a statistics file and expects exit 2, a message
/// containing `needle`, and no output.
fn refused(st: &Setup, tag: &str, stats: &Path, preset: &str, needle: &str) {
    let out = st.dir.path().join(tag);
    let o = run(&[
        "compress",
        s(&st.model),
        "-o",
        s(&out),
        "--preset",
        preset,
        "--stats",
        s(stats),
    ]);
    assert_eq!(o.status.code(), Some(2), "{tag}: {}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(needle), "{tag}: expected `{needle}` in: {err}");
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{tag}: left behind {left:?}");
}

#[test]
fn bad_statistics_files_are_refused_naming_the_tensor_and_nothing_is_left_behind() {
    let st = setup();
    let mut rng = Rng::new(5);
    let good = statistics(&st.mlp, &inputs(256, &mut rng), true);
    let v1 = [("modelpress.stats", "1")];
    let case = |tag: &str, arrays: &Arrays, meta: &[(&str, &str)], preset: &str, needle: &str| {
        let path = st.dir.path().join(format!("{tag}.safetensors"));
        write_with_metadata(&path, arrays, meta);
        refused(&st, tag, &path, preset, needle);
    };
    case("no-metadata", &good, &[], "int8", "modelpress.stats");
    let mut a = good.clone();
    a.push(("fc1.weight.mean".into(), vec![D_IN], vec![0.0; D_IN]));
    case("unknown", &a, &v1, "int8", "`fc1.weight.mean`");
    let mut a = good.clone();
    a[0] = (
        "fc1.weight.in_sum2".into(),
        vec![D_IN - 1],
        vec![1.0; D_IN - 1],
    );
    a.retain(|t| t.0 != "fc1.weight.xtx");
    case(
        "columns",
        &a,
        &v1,
        "int8",
        "`fc1.weight` have 127 input columns",
    );
    let mut a = good.clone();
    a[0].2[5] = f32::NAN;
    case("nan", &a, &v1, "int8", "`fc1.weight`: in_sum2[5] is NaN");
    let mut a = good.clone();
    a[1].2[0] = 0.0;
    case("counts", &a, &v1, "int8", "`fc1.weight`: counts");
    let mut a = good.clone();
    a[2].2[1] += 1000.0;
    case(
        "asymmetric",
        &a,
        &v1,
        "int8",
        "`fc1.weight`: xtx is not symmetric",
    );
    let a: Arrays = good
        .iter()
        .map(|(n, sh, v)| (n.replace("fc2", "fc3"), sh.clone(), v.clone()))
        .collect();
    case(
        "not-in-model",
        &a,
        &v1,
        "int8",
        "`fc3.weight`, which is not a tensor",
    );
    let a: Arrays = good
        .iter()
        .filter(|t| !t.0.ends_with("xtx"))
        .cloned()
        .collect();
    case(
        "no-xtx",
        &a,
        &v1,
        "int4-g128-gptq",
        "`xtx` for `fc1.weight`",
    );
    let a: Arrays = good
        .iter()
        .filter(|t| !t.0.starts_with("fc2"))
        .cloned()
        .collect();
    case(
        "missing-weight",
        &a,
        &v1,
        "int4-g128-gptq",
        "`xtx` for `fc2.weight`",
    );
    let path = st.dir.path().join("garbage.safetensors");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    refused(&st, "garbage", &path, "int8", "statistics");

    // Calibrated stages without statistics.
    let out = st.dir.path().join("no-stats");
    let o = run(&[
        "compress",
        s(&st.model),
        "-o",
        s(&out),
        "--preset",
        "int4-g128-gptq",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`xtx` for `fc1.weight`"),
        "{}",
        text(&o)
    );
    assert!(!out.join("model.safetensors").exists());
}

/// Values of a tensor read from a safetensors file, in f32.
fn values_f32(t: &(StDtype, Vec<usize>, Vec<u8>)) -> Vec<f32> {
    match t.0 {
        StDtype::F32 => f32s(&t.2),
        StDtype::BF16 => {
            t.2.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        }
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// `tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)` in f64.
fn direct_output_error(exact: &[f32], approx: &[f32], xtx: &[f32], d: usize) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (e, a) in exact.chunks(d).zip(approx.chunks(d)) {
        for i in 0..d {
            let (di, ei) = (f64::from(a[i] - e[i]), f64::from(e[i]));
            for j in 0..d {
                let h = f64::from(xtx[i * d + j]);
                num += di * h * f64::from(a[j] - e[j]);
                den += ei * h * f64::from(e[j]);
            }
        }
    }
    num / den
}

/// However a stage came by it (gptq and compensated sharing on the way,
/// from the per-row choice against round to nearest; sparsegpt from the
/// Hessian's factor), the report's `output_error` is that of the weights
/// as written, also when they are rounded to bf16.
#[test]
fn the_reported_output_error_is_that_of_the_written_weights() {
    let st = setup();
    let stats = read(&st.stats);
    let bf16 = st.dir.path().join("bf16.safetensors");
    let tensors: Vec<T> = st
        .mlp
        .tensors()
        .into_iter()
        .map(|mut t| {
            t.dtype = StDtype::BF16;
            t
        })
        .collect();
    write(&bf16, &tensors);
    let pipelines = [
        r#"{"stages":[{"stage":"quantize","bits":4,"granularity":"group","group_size":32,"method":"gptq"}]}"#,
        r#"{"stages":[{"stage":"quantize","bits":8,"granularity":"channel","method":"gptq","act_order":true}]}"#,
        r#"{"stages":[{"stage":"prune","method":"sparsegpt","sparsity":0.5}]}"#,
        r#"{"stages":[{"stage":"share","clusters":16,"compensate":true,"damp":0.05,"block_size":32}]}"#,
    ];
    for (m, model) in [&st.model, &bf16].into_iter().enumerate() {
        let input = read(model);
        for (k, pipeline) in pipelines.iter().enumerate() {
            let tag = format!("reported-{m}-{k}");
            let pfile = st.dir.path().join(format!("{tag}.json"));
            std::fs::write(&pfile, pipeline).unwrap();
            let out = st.dir.path().join(&tag);
            let o = run(&[
                "compress",
                s(model),
                "-o",
                s(&out),
                "--pipeline",
                s(&pfile),
                "--format",
                "dense",
                "--stats",
                s(&st.stats),
            ]);
            assert!(o.status.success(), "{tag}: {}", text(&o));
            let written = read(&out.join("model.safetensors"));
            let report: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
            for (name, d) in [("fc1.weight", D_IN), ("fc2.weight", HIDDEN)] {
                let xtx = f32s(&stats[&format!("{name}.xtx")].2);
                let want = direct_output_error(
                    &values_f32(&input[name]),
                    &values_f32(&written[name]),
                    &xtx,
                    d,
                );
                let got = tensor_output_error(&report, name);
                assert!(
                    (got - want).abs() <= 1e-3 * want,
                    "{tag} {name}: reported {got} vs {want}"
                );
            }
        }
    }
}
