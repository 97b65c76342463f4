//! Which layers a compressed-tensors output quantizes, and how its
//! `quantization_config` names them, so that transformers and vLLM load the
//! output as it is.
//!
//! compressed-tensors replaces the modules its `targets` match when a model
//! is loaded, and only `Linear` modules survive that: a quantized embedding
//! loses its `weight` and the model does not load. So, for this format:
//!
//! - A stage without `targets` touches the weights of linear layers only.
//!   Embedding tables, output heads (`lm_head`), norms, biases and anything
//!   that is not a 2-D `<layer>.weight` keep their dtype, as llm-compressor
//!   does. A stage may still name an output head in its `targets`.
//! - A quantize stage whose `targets` select an embedding table is refused
//!   before any work.
//! - `config_groups.*.targets` names the quantized layers by regexes
//!   anchored on the end of their names, without the base-model prefix
//!   (`re:(.*\.)?encoder\.layer\.0\.attention\.self\.query$`), so the output
//!   of `BertForMaskedLM` (`bert.encoder...`) loads into `BertModel`
//!   (`encoder...`) and the other way round. Layers that differ only in
//!   their block number share one pattern when all of them are quantized
//!   (`re:(.*\.)?layers\.\d+\.mlp\.up_proj$`). `["Linear"]` is not used,
//!   even when every linear layer is quantized: compressed-tensors then
//!   quantizes every linear layer of the class the output is loaded into,
//!   including those the checkpoint does not have (`BertModel`'s pooler
//!   for a `BertForMaskedLM` checkpoint, the head of `BertForMaskedLM` for
//!   a `BertModel` one), and transformers fails to initialise them
//!   (int8: `Linear has no attribute weight`; fp8: no random init for
//!   `Float8_e4m3fn`). `ignore` names the layers left unquantized the same
//!   way (`lm_head` as itself).
//!
//! An embedding table is recognised by its name (`word_embeddings`,
//! `embed_tokens`, `wte`, ...) or, with a `config.json`, by its shape: a 2-D
//! weight outside the numbered blocks whose rows are `vocab_size`,
//! `max_position_embeddings` or `type_vocab_size` and whose columns are the
//! hidden size. An output head tied to the input embedding
//! (`tie_word_embeddings: true`) counts as the embedding.

use std::collections::HashMap;

use serde_json::Value;

use crate::compress::spec::{Pipeline, PruneSpec, Stage, StageSpec, TensorShape};

/// Why a layer is an embedding table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingEvidence {
    /// Its name says so (`word_embeddings`, `embed_tokens`, `wte`, ...).
    Name,
    /// Its shape is `[N, hidden]` with `N` the named `config.json` field.
    Shape { rows: usize, field: &'static str },
    /// An output head that `tie_word_embeddings` ties to the input embedding.
    Tied,
}

/// What a 2-D `<layer>.weight` is, for this format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A linear layer: quantized unless a stage says otherwise.
    Linear,
    /// The output head (`lm_head`): left as it is unless targeted.
    Head,
    /// An embedding table: never quantized.
    Embedding(EmbeddingEvidence),
}

/// The layers of one model and what they are.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Layer name (the tensor name without `.weight`) → role, for every
    /// floating-point 2-D `.weight` tensor.
    roles: HashMap<String, Role>,
    /// The base-model prefix (`bert.`, `model.`), dropped from patterns.
    prefix: Option<String>,
}

fn layer_of(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
}

fn last_component(layer: &str) -> &str {
    layer.rsplit('.').next().unwrap_or(layer)
}

fn embedding_by_name(layer: &str) -> bool {
    let last = last_component(layer);
    last.contains("embedding")
        || matches!(
            last,
            "embed_tokens" | "embed_positions" | "embed_in" | "wte" | "wpe" | "shared"
        )
}

fn head_by_name(layer: &str) -> bool {
    matches!(last_component(layer), "lm_head" | "embed_out")
}

/// A layer inside a repeated block (`layers.3.mlp`, `h.0.attn`).
fn in_numbered_block(layer: &str) -> bool {
    layer
        .split('.')
        .any(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()))
}

fn config_usize(config: &Value, key: &str) -> Option<usize> {
    config
        .get(key)?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
}

/// Escapes a layer name for a Python `re` pattern.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if !(c.is_ascii_alphanumeric() || c == '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Layout {
    /// Classifies the layers of a model (after structural stages).
    pub fn new(tensors: &[TensorShape<'_>], config: Option<&Value>) -> Self {
        let field_rows: Vec<(&'static str, usize)> = config
            .map(|c| {
                ["vocab_size", "max_position_embeddings", "type_vocab_size"]
                    .into_iter()
                    .filter_map(|k| config_usize(c, k).map(|v| (k, v)))
                    .collect()
            })
            .unwrap_or_default();
        let widths: Vec<usize> = config
            .map(|c| {
                ["hidden_size", "d_model", "n_embd", "dim", "embedding_size"]
                    .into_iter()
                    .filter_map(|k| config_usize(c, k))
                    .collect()
            })
            .unwrap_or_default();
        let tied = config
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            == Some(true);

        let mut roles = HashMap::new();
        let mut first_embedding = None;
        let mut first_block = None;
        for t in tensors {
            let Some(layer) = layer_of(t.name) else {
                continue;
            };
            if first_block.is_none() && in_numbered_block(layer) {
                first_block = Some(layer);
            }
            if !t.is_float || t.shape.len() != 2 {
                continue;
            }
            let by_shape = || {
                if in_numbered_block(layer) || !(widths.is_empty() || widths.contains(&t.shape[1]))
                {
                    return None;
                }
                field_rows
                    .iter()
                    .find(|(_, rows)| *rows == t.shape[0])
                    .map(|&(field, rows)| EmbeddingEvidence::Shape { rows, field })
            };
            let role = if embedding_by_name(layer) {
                Role::Embedding(EmbeddingEvidence::Name)
            } else if head_by_name(layer) {
                if tied {
                    Role::Embedding(EmbeddingEvidence::Tied)
                } else {
                    Role::Head
                }
            } else if let Some(evidence) = by_shape() {
                Role::Embedding(evidence)
            } else {
                Role::Linear
            };
            if first_embedding.is_none() && matches!(role, Role::Embedding(_)) {
                first_embedding = Some(layer);
            }
            roles.insert(layer.to_string(), role);
        }
        Self {
            roles,
            prefix: base_prefix(first_embedding, first_block),
        }
    }

    /// The role of a tensor's layer, if it is a float 2-D `.weight`.
    pub fn role_of(&self, tensor: &str) -> Option<&Role> {
        self.roles.get(layer_of(tensor)?)
    }

    fn role_of_layer(&self, layer: &str) -> Option<&Role> {
        self.roles.get(layer)
    }

    /// How `quantization_config` names a layer: `lm_head` as itself,
    /// anything else as a regex anchored on the end of the name, without
    /// the base-model prefix.
    pub fn pattern(&self, layer: &str) -> String {
        if layer == "lm_head" {
            return layer.to_string();
        }
        format!("re:(.*\\.)?{}$", escape(self.tail(layer)))
    }

    fn tail<'a>(&self, layer: &'a str) -> &'a str {
        self.prefix
            .as_deref()
            .and_then(|p| layer.strip_prefix(p))
            .unwrap_or(layer)
    }

    /// The pattern of a layer with its block numbers left open
    /// (`re:(.*\.)?layers\.\d+\.mlp\.up_proj$`).
    fn family(&self, layer: &str) -> String {
        let parts: Vec<String> = self
            .tail(layer)
            .split('.')
            .map(|c| {
                if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) {
                    "\\d+".to_string()
                } else {
                    escape(c)
                }
            })
            .collect();
        format!("re:(.*\\.)?{}$", parts.join("\\."))
    }

    /// Patterns naming exactly `layers` among the model's 2-D weights: one
    /// per family of layers that differ only in block numbers when the
    /// whole family is in `layers`, else one per layer. In order of first
    /// appearance.
    pub fn patterns(&self, layers: &[String]) -> Vec<String> {
        let mut in_model: HashMap<String, usize> = HashMap::new();
        for l in self.roles.keys() {
            *in_model.entry(self.family(l)).or_default() += 1;
        }
        let mut in_set: HashMap<String, usize> = HashMap::new();
        for l in layers {
            *in_set.entry(self.family(l)).or_default() += 1;
        }
        let mut out: Vec<String> = Vec::new();
        for l in layers {
            let family = self.family(l);
            let p = if l != "lm_head" && in_model.get(&family) == in_set.get(&family) {
                family
            } else {
                self.pattern(l)
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }
}

/// The components the token embedding and the first numbered block share at
/// the start of their names (`bert.`, `model.`, `transformer.`).
fn base_prefix(embedding: Option<&str>, block: Option<&str>) -> Option<String> {
    let (e, b) = (embedding?, block?);
    let ec: Vec<&str> = e.split('.').collect();
    let bc: Vec<&str> = b.split('.').collect();
    // Never the whole name of either.
    let limit = ec.len().min(bc.len()) - 1;
    let shared = ec
        .iter()
        .zip(&bc)
        .take(limit)
        .take_while(|(x, y)| x == y)
        .count();
    (shared > 0).then(|| format!("{}.", ec[..shared].join(".")))
}

/// The `targets` and `ignore` of a per-tensor stage as written.
fn selection_mut(stage: &mut StageSpec) -> Option<(&[String], &mut Vec<String>)> {
    match stage {
        StageSpec::Prune(PruneSpec::Magnitude {
            targets, ignore, ..
        })
        | StageSpec::Prune(PruneSpec::NM {
            targets, ignore, ..
        })
        | StageSpec::Prune(PruneSpec::Wanda {
            targets, ignore, ..
        })
        | StageSpec::Prune(PruneSpec::Sparsegpt {
            targets, ignore, ..
        }) => Some((targets, ignore)),
        StageSpec::Prune(PruneSpec::Channel { .. }) | StageSpec::FoldBatchnorm(_) => None,
        StageSpec::LowRank(s) => Some((&s.targets, &mut s.ignore)),
        StageSpec::Share(s) => Some((&s.targets, &mut s.ignore)),
        StageSpec::Quantize(s) => Some((&s.targets, &mut s.ignore)),
        StageSpec::Binarize(s) => Some((&s.targets, &mut s.ignore)),
        StageSpec::Encode(s) => Some((&s.targets, &mut s.ignore)),
    }
}

/// The pipeline as this format runs it: stages without `targets` ignore
/// every tensor that is not a linear layer's weight. Refuses a quantize
/// stage whose `targets` select an embedding table, naming the stage, the
/// tensor and why it counts as an embedding.
pub fn narrow(
    pipeline: &Pipeline,
    tensors: &[TensorShape<'_>],
    layout: &Layout,
) -> Result<Pipeline, String> {
    let mut spec = pipeline.spec().clone();
    for (i, (stage, checked)) in spec.stages.iter_mut().zip(pipeline.stages()).enumerate() {
        let (Some((targets, ignore)), Some(selector)) = (selection_mut(stage), checked.selector())
        else {
            continue;
        };
        let selected = tensors
            .iter()
            .filter(|t| selector.selects(t.name, t.shape, t.is_float));
        if targets.is_empty() {
            let extra: Vec<String> = selected
                .filter(|t| layout.role_of(t.name) != Some(&Role::Linear))
                .map(|t| t.name.to_string())
                .collect();
            ignore.extend(extra);
            continue;
        }
        if !matches!(checked, Stage::Value(..)) {
            continue;
        }
        for t in selected {
            if let Some(Role::Embedding(evidence)) = layout.role_of(t.name) {
                let why = match evidence {
                    EmbeddingEvidence::Name => "an embedding table by its name".to_string(),
                    EmbeddingEvidence::Shape { rows, field } => {
                        format!("an embedding table: its {rows} rows are `{field}` in config.json")
                    }
                    EmbeddingEvidence::Tied => {
                        "tied to the input embedding (`tie_word_embeddings` in config.json)"
                            .to_string()
                    }
                };
                return Err(format!(
                    "stage {i} ({}) targets `{}`, {why}; compressed-tensors quantizes linear layers only and transformers cannot load a quantized embedding, so leave it out of `targets`",
                    checked.kind(),
                    t.name
                ));
            }
        }
    }
    Pipeline::parse(spec).map_err(|e| e.to_string())
}

/// How `config_groups` and `ignore` name layers.
pub struct Naming {
    /// `targets` of each config group, in group order.
    pub targets: Vec<Vec<String>>,
    pub ignore: Vec<String>,
}

/// Names the quantized layers (one list per config group) and the layers
/// left unquantized, for `quantization_config`.
pub fn naming(layout: &Layout, groups: &[&[String]], unquantized: &[String]) -> Naming {
    let might_be_linear = |layer: &str| {
        !matches!(
            layout.role_of_layer(layer),
            Some(Role::Embedding(EmbeddingEvidence::Name))
        )
    };
    let targets = groups
        .iter()
        .map(|layers| layout.patterns(layers))
        .collect();
    let ignore: Vec<String> = unquantized
        .iter()
        .filter(|l| might_be_linear(l))
        .cloned()
        .collect();
    Naming {
        targets,
        ignore: layout.patterns(&ignore),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shapes(list: &[(&'static str, Vec<usize>)]) -> Vec<(String, Vec<usize>)> {
        list.iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect()
    }

    fn view(list: &[(String, Vec<usize>)]) -> Vec<TensorShape<'_>> {
        list.iter()
            .map(|(n, s)| TensorShape {
                name: n,
                shape: s,
                is_float: true,
            })
            .collect()
    }

    /// A tiny BERT as `BertForMaskedLM` saves it (`bert.` prefix).
    fn bert(prefix: &str) -> Vec<(String, Vec<usize>)> {
        let mut v = shapes(&[
            ("embeddings.word_embeddings.weight", vec![100, 32]),
            ("embeddings.position_embeddings.weight", vec![64, 32]),
            ("embeddings.token_type_embeddings.weight", vec![2, 32]),
            ("embeddings.LayerNorm.weight", vec![32]),
            ("encoder.layer.0.attention.self.query.weight", vec![32, 32]),
            ("encoder.layer.0.attention.self.query.bias", vec![32]),
            ("encoder.layer.0.intermediate.dense.weight", vec![64, 32]),
            ("encoder.layer.0.output.dense.weight", vec![32, 64]),
        ]);
        for (n, _) in &mut v {
            *n = format!("{prefix}{n}");
        }
        v
    }

    fn bert_config() -> Value {
        json!({"vocab_size": 100, "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_size": 32})
    }

    fn llama() -> Vec<(String, Vec<usize>)> {
        shapes(&[
            ("model.embed_tokens.weight", vec![100, 32]),
            ("model.layers.0.self_attn.q_proj.weight", vec![32, 32]),
            ("model.layers.0.mlp.up_proj.weight", vec![64, 32]),
            ("model.norm.weight", vec![32]),
            ("lm_head.weight", vec![100, 32]),
        ])
    }

    #[test]
    fn embeddings_are_recognised_by_name_and_by_shape_and_linears_are_not() {
        let t = bert("bert.");
        let layout = Layout::new(&view(&t), Some(&bert_config()));
        assert_eq!(
            layout.role_of("bert.embeddings.word_embeddings.weight"),
            Some(&Role::Embedding(EmbeddingEvidence::Name))
        );
        assert_eq!(
            layout.role_of("bert.encoder.layer.0.attention.self.query.weight"),
            Some(&Role::Linear)
        );
        assert_eq!(layout.role_of("bert.embeddings.LayerNorm.weight"), None);

        // An embedding under a name no rule knows, found by its shape.
        let odd = shapes(&[
            ("tables.tok.weight", vec![100, 32]),
            ("tables.pos.weight", vec![64, 32]),
            ("blocks.0.proj.weight", vec![64, 32]),
        ]);
        let layout = Layout::new(&view(&odd), Some(&bert_config()));
        assert_eq!(
            layout.role_of("tables.tok.weight"),
            Some(&Role::Embedding(EmbeddingEvidence::Shape {
                rows: 100,
                field: "vocab_size"
            }))
        );
        assert!(matches!(
            layout.role_of("tables.pos.weight"),
            Some(Role::Embedding(_))
        ));
        // Same rows as max_position_embeddings, but inside a numbered block.
        assert_eq!(layout.role_of("blocks.0.proj.weight"), Some(&Role::Linear));
        // Without config.json only names count.
        let layout = Layout::new(&view(&odd), None);
        assert_eq!(layout.role_of("tables.tok.weight"), Some(&Role::Linear));
    }

    #[test]
    fn lm_head_is_a_head_unless_tied_to_the_embedding() {
        let t = llama();
        let layout = Layout::new(&view(&t), Some(&json!({"vocab_size": 100})));
        assert_eq!(layout.role_of("lm_head.weight"), Some(&Role::Head));
        let layout = Layout::new(
            &view(&t),
            Some(&json!({"vocab_size": 100, "tie_word_embeddings": true})),
        );
        assert_eq!(
            layout.role_of("lm_head.weight"),
            Some(&Role::Embedding(EmbeddingEvidence::Tied))
        );
    }

    #[test]
    fn patterns_drop_the_base_model_prefix_and_anchor_on_the_end() {
        let with = bert("bert.");
        let without = bert("");
        let a = Layout::new(&view(&with), None);
        let b = Layout::new(&view(&without), None);
        let want = r"re:(.*\.)?encoder\.layer\.0\.attention\.self\.query$";
        assert_eq!(a.pattern("bert.encoder.layer.0.attention.self.query"), want);
        assert_eq!(b.pattern("encoder.layer.0.attention.self.query"), want);
        // Python's `re` reads the same pattern as the regex crate here.
        let re = regex::Regex::new(&want["re:".len()..]).unwrap();
        assert!(re.is_match("bert.encoder.layer.0.attention.self.query"));
        assert!(re.is_match("encoder.layer.0.attention.self.query"));
        assert!(!re.is_match("encoder.layer.10.attention.self.query"));

        let t = llama();
        let l = Layout::new(&view(&t), None);
        assert_eq!(
            l.pattern("model.layers.0.mlp.up_proj"),
            r"re:(.*\.)?layers\.0\.mlp\.up_proj$"
        );
        assert_eq!(l.pattern("lm_head"), "lm_head");
    }

    fn pipeline(json: &str) -> Pipeline {
        Pipeline::from_json(json).unwrap()
    }

    #[test]
    fn a_stage_without_targets_touches_linear_weights_only() {
        let t = llama();
        let v = view(&t);
        let layout = Layout::new(&v, Some(&json!({"vocab_size": 100})));
        let p = pipeline(r#"{"stages": [{"stage": "quantize", "bits": 8}]}"#);
        let n = narrow(&p, &v, &layout).unwrap();
        let touched: Vec<&str> = v
            .iter()
            .filter(|t| !n.stages_for(t.name, t.shape, true).is_empty())
            .map(|t| t.name)
            .collect();
        assert_eq!(
            touched,
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.mlp.up_proj.weight"
            ]
        );
    }

    #[test]
    fn an_explicit_head_target_is_kept_and_an_embedding_target_is_refused() {
        let t = llama();
        let v = view(&t);
        let layout = Layout::new(&v, Some(&json!({"vocab_size": 100})));
        let p = pipeline(
            r#"{"stages": [{"stage": "quantize", "bits": 8, "targets": ["re:.*proj\\.weight", "lm_head.weight"]}]}"#,
        );
        let n = narrow(&p, &v, &layout).unwrap();
        assert_eq!(n.stages_for("lm_head.weight", &[100, 32], true), [0]);

        let p = pipeline(
            r#"{"stages": [{"stage": "quantize", "bits": 8, "targets": ["re:.*\\.weight"]}]}"#,
        );
        let e = narrow(&p, &v, &layout).unwrap_err();
        assert!(
            e.contains("stage 0 (quantize) targets `model.embed_tokens.weight`, an embedding"),
            "{e}"
        );

        let tied = Layout::new(
            &v,
            Some(&json!({"vocab_size": 100, "tie_word_embeddings": true})),
        );
        let p = pipeline(
            r#"{"stages": [{"stage": "quantize", "bits": 8, "targets": ["lm_head.weight"]}]}"#,
        );
        let e = narrow(&p, &v, &tied).unwrap_err();
        assert!(e.contains("tie_word_embeddings"), "{e}");

        // Pruning an embedding leaves it dense: allowed.
        let p = pipeline(
            r#"{"stages": [{"stage": "prune", "method": "magnitude", "sparsity": 0.5, "targets": ["model.embed_tokens.weight"]}]}"#,
        );
        assert!(narrow(&p, &v, &layout).is_ok());
    }

    #[test]
    fn quantized_layers_are_named_by_families_when_whole_else_one_by_one() {
        let mut t = shapes(&[("model.embed_tokens.weight", vec![100, 32])]);
        for b in 0..2 {
            for l in ["self_attn.q_proj", "mlp.up_proj"] {
                t.push((format!("model.layers.{b}.{l}.weight"), vec![32, 32]));
            }
        }
        t.push(("lm_head.weight".to_string(), vec![100, 32]));
        let layout = Layout::new(&view(&t), Some(&json!({"vocab_size": 100})));
        let layers =
            |names: &[&str]| -> Vec<String> { names.iter().map(|n| n.to_string()).collect() };
        let all = layers(&[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.up_proj",
        ]);
        let n = naming(
            &layout,
            &[&all],
            &layers(&["model.embed_tokens", "lm_head"]),
        );
        assert_eq!(
            n.targets,
            [[
                r"re:(.*\.)?layers\.\d+\.self_attn\.q_proj$",
                r"re:(.*\.)?layers\.\d+\.mlp\.up_proj$"
            ]]
        );
        assert_eq!(n.ignore, ["lm_head"]);

        let some = layers(&[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.up_proj",
        ]);
        let rest = layers(&[
            "model.embed_tokens",
            "model.layers.1.self_attn.q_proj",
            "lm_head",
        ]);
        let n = naming(&layout, &[&some], &rest);
        assert_eq!(
            n.targets,
            [[
                r"re:(.*\.)?layers\.0\.self_attn\.q_proj$",
                r"re:(.*\.)?layers\.\d+\.mlp\.up_proj$"
            ]]
        );
        assert_eq!(
            n.ignore,
            [r"re:(.*\.)?layers\.1\.self_attn\.q_proj$", "lm_head"]
        );
        // The patterns match the layers with or without the prefix, and no
        // other block's layer.
        let re = regex::Regex::new(&n.targets[0][0]["re:".len()..]).unwrap();
        assert!(re.is_match("model.layers.0.self_attn.q_proj"));
        assert!(re.is_match("layers.0.self_attn.q_proj"));
        assert!(!re.is_match("model.layers.10.self_attn.q_proj"));
        let re = regex::Regex::new(&n.targets[0][1]["re:".len()..]).unwrap();
        assert!(re.is_match("layers.7.mlp.up_proj"));
        assert!(!re.is_match("layers.7.mlp.up_proj.lora"));
    }
}
