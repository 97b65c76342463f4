use super::*;
use crate::format::dtype::Dtype;
use crate::format::header::tests::{file, st_dtype, TWO};
use std::collections::HashMap as StdHashMap;

// ---- files on disk ----

type Spec<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

fn write_safetensors(path: &Path, tensors: &[Spec], metadata: &[(&str, &str)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, d, shape, bytes)| {
            (
                name.to_string(),
                safetensors::tensor::TensorView::new(st_dtype(*d), shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    let meta: StdHashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn bytes_of<const N: usize, T: Copy>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

#[test]
fn a_file_written_by_safetensors_opens_with_the_right_bytes_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let w32 = [1.0f32, -2.5, 3.25, 0.0, 1e-3, 7.0];
    let w16 = [half::f16::from_f32(0.5), half::f16::from_f32(-1.0)];
    let wb16 = [
        half::bf16::from_f32(3.0),
        half::bf16::from_f32(-0.125),
        half::bf16::from_f32(2.0),
    ];
    let w64 = [0.1f64, -4.0];
    let tensors: Vec<Spec> = vec![
        (
            "layer.weight",
            Dtype::F32,
            vec![2, 3],
            bytes_of(&w32, f32::to_le_bytes),
        ),
        (
            "layer.f16",
            Dtype::F16,
            vec![2],
            bytes_of(&w16, half::f16::to_le_bytes),
        ),
        (
            "layer.bf16",
            Dtype::BF16,
            vec![3, 1],
            bytes_of(&wb16, half::bf16::to_le_bytes),
        ),
        (
            "layer.f64",
            Dtype::F64,
            vec![2],
            bytes_of(&w64, f64::to_le_bytes),
        ),
        ("steps", Dtype::I64, vec![1], 42i64.to_le_bytes().to_vec()),
        ("mask", Dtype::BOOL, vec![3], vec![1, 0, 1]),
        ("empty", Dtype::F32, vec![0, 5], vec![]),
    ];
    write_safetensors(&path, &tensors, &[("format", "pt")]);

    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.shard_names(), ["weights.safetensors"]);
    assert!(!ckpt.is_sharded());
    assert!(ckpt.config_json().is_none());
    assert_eq!(
        ckpt.metadata().get("format").map(String::as_str),
        Some("pt")
    );
    assert_eq!(ckpt.shard_metadata(0), ckpt.metadata());
    assert_eq!(ckpt.tensors().len(), tensors.len());
    for (name, d, shape, bytes) in &tensors {
        let t = ckpt.get(name).unwrap();
        assert_eq!((t.dtype, &t.shape, t.shard), (*d, shape, 0), "{name}");
        assert_eq!(ckpt.bytes(t), bytes.as_slice(), "{name}");
    }
    let starts: Vec<_> = ckpt.tensors().iter().map(|t| t.start).collect();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1]),
        "not in data order: {starts:?}"
    );
    let total: usize = tensors.iter().map(|t| t.3.len()).sum();
    assert_eq!(ckpt.total_bytes(), total as u64);

    assert_eq!(ckpt.to_f32(ckpt.get("layer.weight").unwrap()), w32);
    assert_eq!(ckpt.to_f32(ckpt.get("layer.f16").unwrap()), [0.5, -1.0]);
    assert_eq!(
        ckpt.to_f32(ckpt.get("layer.bf16").unwrap()),
        [3.0, -0.125, 2.0]
    );
    assert_eq!(ckpt.to_f32(ckpt.get("layer.f64").unwrap()), [0.1f32, -4.0]);
    assert!(ckpt.to_f32(ckpt.get("empty").unwrap()).is_empty());
    assert!(ckpt.get("missing").is_none());
    for t in ckpt.tensors() {
        ckpt.advise_willneed(t);
    }
}

#[test]
fn a_directory_with_one_file_and_a_config_opens_that_file() {
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &[("w", Dtype::U8, vec![2], vec![7, 8])],
        &[],
    );
    fs::write(dir.path().join("config.json"), r#"{"model_type":"toy"}"#).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.shard_names(), ["model.safetensors"]);
    assert!(!ckpt.is_sharded());
    assert_eq!(ckpt.config_json().unwrap()["model_type"], "toy");
    assert_eq!(ckpt.bytes(&ckpt.tensors()[0]), [7, 8]);
}

#[test]
fn an_invalid_config_json_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &[("w", Dtype::U8, vec![1], vec![1])],
        &[],
    );
    fs::write(dir.path().join("config.json"), "{model_type").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::Config { .. }), "{e:?}");
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn a_path_that_does_not_exist_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.safetensors");
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(e, FormatError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("nowhere.safetensors"), "{e}");
}

#[test]
fn a_directory_without_safetensors_files_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config.json"), "{}").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::NoSafetensors { .. }), "{e:?}");
}

#[test]
fn several_files_without_an_index_are_rejected_as_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.safetensors", "b.safetensors"] {
        write_safetensors(
            &dir.path().join(name),
            &[(name, Dtype::U8, vec![1], vec![1])],
            &[],
        );
    }
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, FormatError::AmbiguousDirectory { .. }), "{e:?}");
    assert!(
        e.to_string().contains("a.safetensors, b.safetensors"),
        "{e}"
    );
}

#[test]
fn a_malformed_file_reports_its_path_and_the_header_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    fs::write(&path, file(TWO, 13)).unwrap();
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(
        matches!(
            e,
            FormatError::Header {
                source: HeaderError::TrailingBytes { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("bad.safetensors"), "{e}");
    fs::write(&path, b"").unwrap();
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(
        matches!(
            e,
            FormatError::Header {
                source: HeaderError::TooShort { file_len: 0 },
                ..
            }
        ),
        "{e:?}"
    );
}

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// Two shards: `a`, `b` in the first; `c` in the second.
fn sharded_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(
        &dir.path().join(SHARD1),
        &[
            (
                "a",
                Dtype::F32,
                vec![2],
                bytes_of(&[1.0f32, 2.0], f32::to_le_bytes),
            ),
            (
                "b",
                Dtype::BF16,
                vec![1],
                half::bf16::from_f32(-3.0).to_le_bytes().to_vec(),
            ),
        ],
        &[("format", "pt"), ("shard", "1")],
    );
    write_safetensors(
        &dir.path().join(SHARD2),
        &[(
            "c",
            Dtype::F16,
            vec![2],
            bytes_of(
                &[half::f16::ONE, half::f16::NEG_ONE],
                half::f16::to_le_bytes,
            ),
        )],
        &[("shard", "2"), ("extra", "x")],
    );
    write_index(dir.path(), &[("c", SHARD2), ("a", SHARD1), ("b", SHARD1)]);
    fs::write(dir.path().join("config.json"), r#"{"hidden_size":2}"#).unwrap();
    dir
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let entries: Vec<String> = map
        .iter()
        .map(|(t, s)| format!("\"{t}\":\"{s}\""))
        .collect();
    let json = format!(
        r#"{{"metadata":{{"total_size":14}},"weight_map":{{{}}}}}"#,
        entries.join(",")
    );
    fs::write(dir.join(INDEX_FILE), json).unwrap();
}

#[test]
fn a_sharded_checkpoint_opens_in_shard_then_offset_order() {
    let dir = sharded_dir();
    // An unrelated file beside the shards is not part of the checkpoint.
    write_safetensors(
        &dir.path().join("consolidated.safetensors"),
        &[("z", Dtype::U8, vec![1], vec![0])],
        &[],
    );
    for path in [dir.path().to_path_buf(), dir.path().join(INDEX_FILE)] {
        let ckpt = Checkpoint::open(&path).unwrap();
        assert!(ckpt.is_sharded());
        assert_eq!(ckpt.shard_names(), [SHARD1, SHARD2]);
        let order: Vec<_> = ckpt
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.shard))
            .collect();
        assert_eq!(order, [("a", 0), ("b", 0), ("c", 1)]);
        assert_eq!(ckpt.to_f32(ckpt.get("a").unwrap()), [1.0, 2.0]);
        assert_eq!(ckpt.to_f32(ckpt.get("b").unwrap()), [-3.0]);
        assert_eq!(ckpt.to_f32(ckpt.get("c").unwrap()), [1.0, -1.0]);
        assert_eq!(ckpt.total_bytes(), 8 + 2 + 4);
        assert_eq!(ckpt.config_json().unwrap()["hidden_size"], 2);
        // Merged metadata keeps the first shard's value on conflict.
        let merged: Vec<_> = ckpt
            .metadata()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(merged, [("extra", "x"), ("format", "pt"), ("shard", "1")]);
        assert_eq!(ckpt.shard_metadata(1)["shard"], "2");
        assert!(ckpt.get("z").is_none());
    }
}

fn open_err(dir: &Path) -> FormatError {
    Checkpoint::open(dir).unwrap_err()
}

#[test]
fn an_index_that_is_not_valid_json_is_rejected() {
    let dir = sharded_dir();
    fs::write(dir.path().join(INDEX_FILE), "{\"weight_map\":").unwrap();
    assert!(matches!(open_err(dir.path()), FormatError::Index { .. }));
    fs::write(dir.path().join(INDEX_FILE), "{\"metadata\":{}}").unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(e, FormatError::Index { .. }) && e.to_string().contains("weight_map"),
        "{e}"
    );
    fs::write(dir.path().join(INDEX_FILE), r#"{"weight_map":{"a":1}}"#).unwrap();
    assert!(matches!(open_err(dir.path()), FormatError::Index { .. }));
}

#[test]
fn an_index_listing_a_tensor_twice_is_rejected() {
    let dir = sharded_dir();
    write_index(
        dir.path(),
        &[("a", SHARD1), ("b", SHARD1), ("c", SHARD2), ("a", SHARD2)],
    );
    let e = open_err(dir.path());
    assert!(
        matches!(e, FormatError::Index { .. }) && e.to_string().contains("`a`"),
        "{e}"
    );
}

#[test]
fn an_index_naming_a_path_outside_its_directory_is_rejected() {
    let dir = sharded_dir();
    write_index(
        dir.path(),
        &[
            ("a", "../model-00001-of-00002.safetensors"),
            ("b", SHARD1),
            ("c", SHARD2),
        ],
    );
    assert!(matches!(open_err(dir.path()), FormatError::Index { .. }));
}

#[test]
fn an_index_naming_a_missing_shard_is_rejected() {
    let dir = sharded_dir();
    fs::remove_file(dir.path().join(SHARD2)).unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(&e, FormatError::MissingShard { shard, .. } if shard == SHARD2),
        "{e:?}"
    );
}

#[test]
fn an_indexed_tensor_absent_from_its_shard_is_rejected() {
    let dir = sharded_dir();
    write_index(
        dir.path(),
        &[("a", SHARD1), ("b", SHARD1), ("c", SHARD2), ("d", SHARD2)],
    );
    let e = open_err(dir.path());
    assert!(
        matches!(&e, FormatError::NotInShard { tensor, shard } if tensor == "d" && shard == SHARD2),
        "{e:?}"
    );
}

#[test]
fn a_shard_tensor_that_the_index_maps_elsewhere_is_rejected() {
    let dir = sharded_dir();
    write_index(dir.path(), &[("a", SHARD1), ("b", SHARD2), ("c", SHARD2)]);
    let e = open_err(dir.path());
    assert!(
        matches!(&e, FormatError::MappedElsewhere { tensor, shard, indexed } if tensor == "b" && shard == SHARD1 && indexed == SHARD2),
        "{e:?}"
    );
}

#[test]
fn a_shard_tensor_missing_from_the_index_is_rejected() {
    let dir = sharded_dir();
    write_index(dir.path(), &[("a", SHARD1), ("c", SHARD2)]);
    let e = open_err(dir.path());
    assert!(
        matches!(&e, FormatError::Unindexed { tensor, .. } if tensor == "b"),
        "{e:?}"
    );
}

#[test]
fn a_tensor_in_two_shards_is_rejected() {
    let dir = sharded_dir();
    write_safetensors(
        &dir.path().join(SHARD2),
        &[
            ("c", Dtype::U8, vec![1], vec![1]),
            ("a", Dtype::U8, vec![1], vec![1]),
        ],
        &[],
    );
    let e = open_err(dir.path());
    assert!(
        matches!(&e, FormatError::DuplicateAcrossShards { tensor, first, second } if tensor == "a" && first == SHARD1 && second == SHARD2),
        "{e:?}"
    );
}

#[test]
fn a_malformed_shard_names_its_file() {
    let dir = sharded_dir();
    fs::write(
        dir.path().join(SHARD2),
        file(
            r#"{"c":{"dtype":"F16","shape":[2],"data_offsets":[0,3]}}"#,
            3,
        ),
    )
    .unwrap();
    let e = open_err(dir.path());
    assert!(
        matches!(
            e,
            FormatError::Header {
                source: HeaderError::SizeMismatch { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains(SHARD2), "{e}");
}
