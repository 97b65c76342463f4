//! The compressed-tensors output as transformers loads it: linear layers
//! quantized, embeddings and `lm_head` left as they are, targets that match
//! with or without the base-model prefix.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use safetensors::Dtype as StDtype;
use serde_json::{json, Value};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny BERT as `BertForMaskedLM` saves it (`prefix` = `bert.`) or as
/// `BertModel` does (`prefix` = ``), with its config.json.
fn bert(dir: &Path, prefix: &str) -> PathBuf {
    let mut rng = Rng::new(3);
    let mut tensors = vec![
        gaussian(
            "embeddings.word_embeddings.weight",
            &[100, 128],
            0.02,
            &mut rng,
        ),
        gaussian(
            "embeddings.position_embeddings.weight",
            &[64, 128],
            0.02,
            &mut rng,
        ),
        gaussian(
            "embeddings.token_type_embeddings.weight",
            &[2, 128],
            0.02,
            &mut rng,
        ),
        gaussian("embeddings.LayerNorm.weight", &[128], 1.0, &mut rng),
    ];
    for l in 0..2 {
        for (name, shape) in [
            ("attention.self.query", [128, 128]),
            ("attention.self.key", [128, 128]),
            ("attention.self.value", [128, 128]),
            ("attention.output.dense", [128, 128]),
            ("intermediate.dense", [256, 128]),
            ("output.dense", [128, 256]),
        ] {
            let layer = format!("encoder.layer.{l}.{name}");
            tensors.push(gaussian(&format!("{layer}.weight"), &shape, 0.02, &mut rng));
            tensors.push(gaussian(
                &format!("{layer}.bias"),
                &[shape[0]],
                0.01,
                &mut rng,
            ));
        }
    }
    for t in &mut tensors {
        t.name = format!("{prefix}{}", t.name);
    }
    let model = dir.join(format!("bert-{}", prefix.trim_end_matches('.')));
    std::fs::create_dir_all(&model).unwrap();
    write(&model.join("model.safetensors"), &tensors);
    let config = json!({
        "model_type": "bert", "vocab_size": 100, "hidden_size": 128,
        "max_position_embeddings": 64, "type_vocab_size": 2,
        "num_hidden_layers": 2, "intermediate_size": 256,
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

/// A tiny LLaMA as `LlamaForCausalLM` saves it: `model.` prefix, `lm_head`.
fn llama(dir: &Path) -> PathBuf {
    let mut rng = Rng::new(4);
    let mut tensors = vec![gaussian(
        "model.embed_tokens.weight",
        &[100, 128],
        0.02,
        &mut rng,
    )];
    for (name, shape) in [
        ("self_attn.q_proj", [128, 128]),
        ("self_attn.k_proj", [64, 128]),
        ("mlp.up_proj", [256, 128]),
        ("mlp.down_proj", [128, 256]),
    ] {
        tensors.push(gaussian(
            &format!("model.layers.0.{name}.weight"),
            &shape,
            0.02,
            &mut rng,
        ));
    }
    tensors.push(gaussian("model.norm.weight", &[128], 1.0, &mut rng));
    tensors.push(gaussian("lm_head.weight", &[100, 128], 0.02, &mut rng));
    let model = dir.join("llama");
    std::fs::create_dir_all(&model).unwrap();
    write(&model.join("model.safetensors"), &tensors);
    let config = json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 128,
        // As large as the hidden size: shape alone would not tell.
        "max_position_embeddings": 128, "tie_word_embeddings": false,
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

fn compress(input: &Path, out: &Path, how: &[&str]) -> std::process::Output {
    let mut args = vec![
        "compress",
        s(input),
        "-o",
        s(out),
        "--format",
        "compressed-tensors",
    ];
    args.extend_from_slice(how);
    run(&args)
}

fn quantization_config(out: &Path) -> Value {
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    config["quantization_config"].clone()
}

#[test]
fn by_default_only_linear_layers_are_quantized() {
    let dir = tempfile::tempdir().unwrap();
    for (input, ignore) in [
        (bert(dir.path(), "bert."), json!([])),
        (bert(dir.path(), ""), json!([])),
        (llama(dir.path()), json!(["lm_head"])),
    ] {
        for preset in ["int8", "int4-g128", "fp8"] {
            let out = dir.path().join(format!(
                "{}-{preset}",
                input.file_name().unwrap().to_str().unwrap()
            ));
            let o = compress(&input, &out, &["--preset", preset]);
            assert!(o.status.success(), "{}", text(&o));
            let t = read(&out.join("model.safetensors"));
            let original = read(&input.join("model.safetensors"));
            for (name, (dtype, _, bytes)) in &original {
                let layer = name.strip_suffix(".weight").unwrap_or(name);
                let kept = name.contains("embed")
                    || name.starts_with("lm_head")
                    || !name.ends_with(".weight")
                    || name.contains("norm")
                    || name.contains("LayerNorm");
                if kept {
                    assert_eq!(t[name].0, *dtype, "{preset}: {name} keeps its dtype");
                    assert_eq!(&t[name].2, bytes, "{preset}: {name} keeps its values");
                    assert!(!t.contains_key(&format!("{layer}.weight_scale")), "{name}");
                } else {
                    assert!(
                        t.contains_key(&format!("{layer}.weight_scale")),
                        "{preset}: {name} is quantized"
                    );
                }
            }
            let qc = quantization_config(&out);
            // Each family of layers by a pattern without the prefix, so a
            // class with other linear layers (a pooler, a head) loads it.
            let targets = qc["config_groups"]["group_0"]["targets"]
                .as_array()
                .unwrap();
            let family = if input.ends_with("llama") {
                r"re:(.*\.)?layers\.\d+\.mlp\.down_proj$"
            } else {
                r"re:(.*\.)?encoder\.layer\.\d+\.output\.dense$"
            };
            assert!(targets.contains(&json!(family)), "{preset}: {targets:?}");
            assert!(
                !targets
                    .iter()
                    .any(|t| t.as_str().unwrap().contains(r"bert\.")
                        || t.as_str().unwrap().contains(r"model\.")),
                "{targets:?}"
            );
            assert_eq!(qc["ignore"], ignore, "{preset}");
        }
    }
    // Embedding tables are never in the quantized pieces.
    let t = read(&dir.path().join("llama-int8").join("model.safetensors"));
    assert_eq!(t["model.embed_tokens.weight"].0, StDtype::F32);
    assert_eq!(t["lm_head.weight"].0, StDtype::F32);
}

#[test]
fn layers_are_named_by_suffix_anchored_patterns_without_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.json");
    std::fs::write(
        &pipeline,
        r#"{"stages": [{"stage": "quantize", "bits": 8, "targets": ["re:.*layer\\.0\\.attention\\.self\\.query\\.weight"]}]}"#,
    )
    .unwrap();
    let mut seen = Vec::new();
    for prefix in ["bert.", ""] {
        let input = bert(dir.path(), prefix);
        let out = dir.path().join(format!("out-{prefix}"));
        let o = compress(&input, &out, &["--pipeline", s(&pipeline)]);
        assert!(o.status.success(), "{}", text(&o));
        let qc = quantization_config(&out);
        let targets = qc["config_groups"]["group_0"]["targets"].clone();
        assert_eq!(
            targets,
            json!([r"re:(.*\.)?encoder\.layer\.0\.attention\.self\.query$"])
        );
        let ignore = qc["ignore"].as_array().unwrap();
        assert!(
            ignore.contains(&json!(r"re:(.*\.)?encoder\.layer\.\d+\.output\.dense$")),
            "{ignore:?}"
        );
        assert!(
            ignore.contains(&json!(
                r"re:(.*\.)?encoder\.layer\.1\.attention\.self\.query$"
            )),
            "{ignore:?}"
        );
        // Embeddings are not linear layers: transformers needs no word on them.
        assert!(
            !ignore
                .iter()
                .any(|p| p.as_str().unwrap().contains("embeddings")),
            "{ignore:?}"
        );
        seen.push(qc);
    }
    // The same config whatever the prefix.
    assert_eq!(seen[0], seen[1]);
}

#[test]
fn lm_head_is_quantized_when_a_stage_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = llama(dir.path());
    let pipeline = dir.path().join("p.json");
    std::fs::write(
        &pipeline,
        r#"{"stages": [{"stage": "quantize", "bits": 8, "targets": ["re:.*_proj\\.weight", "lm_head.weight"]}]}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = compress(&input, &out, &["--pipeline", s(&pipeline)]);
    assert!(o.status.success(), "{}", text(&o));
    let t = read(&out.join("model.safetensors"));
    assert!(t.contains_key("lm_head.weight_packed"));
    let qc = quantization_config(&out);
    let targets = qc["config_groups"]["group_0"]["targets"]
        .as_array()
        .unwrap()
        .clone();
    assert!(targets.contains(&json!("lm_head")), "{targets:?}");
    assert_eq!(qc["ignore"], json!([]));
}

#[test]
fn a_pipeline_targeting_an_embedding_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = bert(dir.path(), "bert.");
    let pipeline = dir.path().join("p.json");
    std::fs::write(
        &pipeline,
        r#"{"stages": [{"stage": "quantize", "bits": 4, "granularity": "group", "group_size": 32, "targets": ["re:.*\\.weight"], "ignore": ["re:.*LayerNorm.*"]}]}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let o = compress(&input, &out, &["--pipeline", s(&pipeline)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("stage 0 (quantize) targets `bert.embeddings.")
            && err.contains("embedding table"),
        "{}",
        text(&o)
    );
    assert!(!err.contains("panicked"), "{}", text(&o));
    assert!(!out.join("model.safetensors").exists());
    assert!(!out.join("config.json").exists());

    // A table found by its shape in config.json: the reason says which field.
    let odd = dir.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let mut rng = Rng::new(5);
    write(
        &odd.join("model.safetensors"),
        &[
            gaussian("tables.tok.weight", &[100, 32], 0.02, &mut rng),
            gaussian("blocks.0.proj.weight", &[32, 32], 0.02, &mut rng),
        ],
    );
    std::fs::write(
        odd.join("config.json"),
        r#"{"vocab_size": 100, "hidden_size": 32}"#,
    )
    .unwrap();
    std::fs::write(
        &pipeline,
        r#"{"stages": [{"stage": "quantize", "bits": 8, "targets": ["tables.tok.weight"]}]}"#,
    )
    .unwrap();
    let o = compress(&odd, &out, &["--pipeline", s(&pipeline)]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("`vocab_size`"),
        "{}",
        text(&o)
    );
}
