//! Calibration statistics files: a safetensors file holding, for a weight
//! `W` of the model (its exact name; a conv weight `[O, C, kh, kw]` counts
//! as `[O, C·kh·kw]`):
//!
//! - `W.in_sum2` F32 `[d_in]`: Σ over calibration tokens of `x_j²`;
//! - `W.counts` F32 `[1]`: the number of tokens summed;
//! - optionally `W.xtx` F32 `[d_in, d_in]`: Σ `x xᵀ`.
//!
//! `__metadata__` has `modelpress.stats` = `"1"` and optionally
//! `modelpress.stats.aliases`, a JSON object `{"k.weight": "q.weight"}` for
//! weights that read the same input, so each matrix is stored once.
//!
//! The file is opened as any checkpoint (every header distrusted, see
//! [`super::checkpoint`]); then every tensor must be one of the three arrays of
//! some weight, with the right dtype and shape; then [`StatsFile::check_against`]
//! holds the file to a model before any work: every weight exists, is a
//! matrix with `d_in` input columns, and its arrays pass
//! [`LayerStats::new`] (finite, `counts > 0`, `xtx` symmetric). Every failure
//! names the tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::checkpoint::{Checkpoint, FormatError};
use super::dtype::Dtype;
use super::header::TensorInfo;
use crate::compress::calibrate::{LayerStats, StatsError};
use crate::compress::coded::MatrixShape;
use crate::compress::spec::StatsCatalog;

/// `__metadata__` key that marks a statistics file, and its one version.
pub const META_STATS: &str = "modelpress.stats";
pub const STATS_VERSION: &str = "1";
/// `__metadata__` key of the aliases.
pub const META_ALIASES: &str = "modelpress.stats.aliases";

/// Why a statistics file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StatsFileError {
    #[error("statistics: {0}")]
    Format(#[from] FormatError),
    #[error("statistics {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("statistics {} is not a file", .0.display())]
    NotAFile(PathBuf),
    #[error(
        "statistics: `__metadata__` must have `{META_STATS}` = \"{STATS_VERSION}\", found {found}"
    )]
    Version { found: String },
    #[error("statistics: `{META_ALIASES}` is not a JSON object of weight names: {0}")]
    Aliases(String),
    #[error(
        "statistics: tensor `{0}` is not `<weight>.in_sum2`, `<weight>.counts` or `<weight>.xtx`"
    )]
    UnknownTensor(String),
    #[error("statistics: tensor `{tensor}` is {dtype}; statistics are F32")]
    Dtype { tensor: String, dtype: String },
    #[error("statistics: tensor `{tensor}` has shape {shape:?}, expected {expected}")]
    Shape {
        tensor: String,
        shape: Vec<usize>,
        expected: String,
    },
    #[error("statistics of `{weight}` lack `{weight}.{array}`")]
    Missing { weight: String, array: &'static str },
    #[error("statistics: alias `{alias}` points to `{target}`, which has no statistics")]
    AliasTarget { alias: String, target: String },
    #[error("statistics: `{0}` has its own statistics and is also an alias")]
    AliasShadows(String),
    #[error("statistics name `{0}`, which is not a tensor of the model")]
    NotInModel(String),
    #[error("statistics name `{weight}`, whose shape {shape:?} is not a matrix")]
    NotMatrix { weight: String, shape: Vec<usize> },
    #[error("statistics of `{weight}` have {got} input columns, but the tensor has {expected}")]
    Columns {
        weight: String,
        got: usize,
        expected: usize,
    },
    #[error("statistics of `{weight}`: {source}")]
    Values {
        weight: String,
        #[source]
        source: StatsError,
    },
}

/// The arrays of one weight in the file.
#[derive(Debug, Clone)]
struct Entry {
    in_sum2: TensorInfo,
    counts: TensorInfo,
    xtx: Option<TensorInfo>,
}

/// An opened, structurally checked statistics file.
pub struct StatsFile {
    file: Checkpoint,
    entries: BTreeMap<String, Entry>,
    aliases: BTreeMap<String, String>,
    sha256: String,
    /// The values were checked when the file was stored (see
    /// [`StatsFile::trust_values`]).
    values_checked: bool,
}

impl std::fmt::Debug for StatsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsFile")
            .field("weights", &self.entries.len())
            .field("aliases", &self.aliases.len())
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

const ARRAYS: [&str; 3] = ["in_sum2", "counts", "xtx"];

fn sha256_of(path: &Path) -> Result<String, StatsFileError> {
    let io = |source| StatsFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

impl StatsFile {
    /// Opens and checks the file's structure (not yet its values, nor the
    /// model: see [`Self::check_against`]), and hashes it.
    pub fn open(path: &Path) -> Result<Self, StatsFileError> {
        let mut file = Self::open_unhashed(path)?;
        file.sha256 = sha256_of(path)?;
        Ok(file)
    }

    /// [`Self::open`] for a file whose sha256 the caller already has (it
    /// hashed the bytes as they arrived, or the file is stored under its
    /// hash): a statistics file of a large model holds gigabytes, and each
    /// pass over them counts.
    pub fn open_hashed(path: &Path, sha256: &str) -> Result<Self, StatsFileError> {
        let mut file = Self::open_unhashed(path)?;
        file.sha256 = sha256.to_string();
        Ok(file)
    }

    /// The values were checked when this (immutable) file was stored:
    /// [`Self::check_against`] then checks names and shapes only. Each
    /// weight's values are still checked when a stage reads them
    /// ([`Self::get`]).
    pub fn trust_values(&mut self) {
        self.values_checked = true;
    }

    fn open_unhashed(path: &Path) -> Result<Self, StatsFileError> {
        if !path.is_file() {
            return Err(StatsFileError::NotAFile(path.to_path_buf()));
        }
        let file = Checkpoint::open(path)?;
        let meta = file.metadata();
        match meta.get(META_STATS) {
            Some(v) if v == STATS_VERSION => {}
            other => {
                return Err(StatsFileError::Version {
                    found: other.map_or("nothing".to_string(), |v| format!("\"{v}\"")),
                })
            }
        }
        let aliases: BTreeMap<String, String> = match meta.get(META_ALIASES) {
            None => BTreeMap::new(),
            Some(text) => {
                serde_json::from_str(text).map_err(|e| StatsFileError::Aliases(e.to_string()))?
            }
        };
        let mut parts: BTreeMap<String, [Option<TensorInfo>; 3]> = BTreeMap::new();
        for t in file.tensors() {
            let (weight, k) = ARRAYS
                .iter()
                .enumerate()
                .find_map(|(k, a)| {
                    t.name
                        .strip_suffix(a)
                        .and_then(|w| w.strip_suffix('.'))
                        .filter(|w| !w.is_empty())
                        .map(|w| (w, k))
                })
                .ok_or_else(|| StatsFileError::UnknownTensor(t.name.clone()))?;
            if t.dtype != Dtype::F32 {
                return Err(StatsFileError::Dtype {
                    tensor: t.name.clone(),
                    dtype: t.dtype.name().to_string(),
                });
            }
            parts.entry(weight.to_string()).or_default()[k] = Some(t.clone());
        }
        let mut entries = BTreeMap::new();
        for (weight, [in_sum2, counts, xtx]) in parts {
            let missing = |array| StatsFileError::Missing {
                weight: weight.clone(),
                array,
            };
            let in_sum2 = in_sum2.ok_or_else(|| missing("in_sum2"))?;
            let counts = counts.ok_or_else(|| missing("counts"))?;
            let shape_err = |t: &TensorInfo, expected: String| StatsFileError::Shape {
                tensor: t.name.clone(),
                shape: t.shape.clone(),
                expected,
            };
            let [d] = in_sum2.shape[..] else {
                return Err(shape_err(&in_sum2, "[d_in]".into()));
            };
            if counts.shape != [1] {
                return Err(shape_err(&counts, "[1]".into()));
            }
            if let Some(x) = &xtx {
                if x.shape != [d, d] {
                    return Err(shape_err(x, format!("[{d}, {d}]")));
                }
            }
            entries.insert(
                weight,
                Entry {
                    in_sum2,
                    counts,
                    xtx,
                },
            );
        }
        for (alias, target) in &aliases {
            if entries.contains_key(alias) {
                return Err(StatsFileError::AliasShadows(alias.clone()));
            }
            if !entries.contains_key(target) {
                return Err(StatsFileError::AliasTarget {
                    alias: alias.clone(),
                    target: target.clone(),
                });
            }
        }
        Ok(Self {
            sha256: String::new(),
            file,
            entries,
            aliases,
            values_checked: false,
        })
    }

    /// The sha256 of the file's bytes, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Weights with statistics, aliases included.
    pub fn weights(&self) -> impl Iterator<Item = &str> {
        self.entries
            .keys()
            .chain(self.aliases.keys())
            .map(String::as_str)
    }

    /// The largest `counts` of any weight (the number of calibration
    /// tokens, when all were collected in one run).
    pub fn tokens(&self) -> f64 {
        self.entries
            .values()
            .map(|e| f64::from(self.file.to_f32(&e.counts)[0]))
            .fold(0.0, f64::max)
    }

    fn entry(&self, weight: &str) -> Option<(&str, &Entry)> {
        let key = self.aliases.get(weight).map_or(weight, String::as_str);
        self.entries
            .get_key_value(key)
            .map(|(k, e)| (k.as_str(), e))
    }

    /// The checked statistics of `weight` (directly or through an alias).
    pub fn get(&self, weight: &str) -> Result<Option<LayerStats>, StatsFileError> {
        let Some((key, e)) = self.entry(weight) else {
            return Ok(None);
        };
        let in_sum2 = self.file.to_f32(&e.in_sum2);
        let counts = f64::from(self.file.to_f32(&e.counts)[0]);
        let xtx = e.xtx.as_ref().map(|t| self.file.to_f32(t));
        LayerStats::new(in_sum2.len(), in_sum2, counts, xtx)
            .map(|s| Some(s.with_key(key)))
            .map_err(|source| StatsFileError::Values {
                weight: weight.to_string(),
                source,
            })
    }

    /// Holds the file to a model's tensors (name and shape): every weight it
    /// names is a matrix of the model with `d_in` input columns, and every
    /// weight's values are valid. Reads every value once (unless
    /// [`Self::trust_values`] said they were checked); keeps none.
    pub fn check_against<'a>(
        &self,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<(), StatsFileError> {
        let shapes: BTreeMap<&str, &[usize]> = tensors.into_iter().collect();
        for weight in self.weights() {
            let shape = *shapes
                .get(weight)
                .ok_or_else(|| StatsFileError::NotInModel(weight.to_string()))?;
            let not_matrix = || StatsFileError::NotMatrix {
                weight: weight.to_string(),
                shape: shape.to_vec(),
            };
            if shape.len() < 2 {
                return Err(not_matrix());
            }
            let cols = MatrixShape::of(shape).ok_or_else(not_matrix)?.cols;
            let (_, e) = self.entry(weight).expect("weights come from entries");
            let got = e.in_sum2.shape[0];
            if got != cols {
                return Err(StatsFileError::Columns {
                    weight: weight.to_string(),
                    got,
                    expected: cols,
                });
            }
        }
        if self.values_checked {
            return Ok(());
        }
        // Values once per stored matrix (aliases share them).
        for weight in self.entries.keys() {
            self.get(weight)?;
        }
        Ok(())
    }
}

impl StatsCatalog for StatsFile {
    fn has_in_sum2(&self, weight: &str) -> bool {
        self.entry(weight).is_some()
    }

    fn has_xtx(&self, weight: &str) -> bool {
        self.entry(weight).is_some_and(|(_, e)| e.xtx.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Writes a safetensors file of F32 tensors.
    fn write_stats(
        path: &Path,
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
        metadata: &[(&str, &str)],
    ) {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, v)| {
                (
                    n.to_string(),
                    s.clone(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .unwrap(),
                )
            })
            .collect();
        let meta: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        safetensors::serialize_to_file(views, Some(meta), path).unwrap();
    }

    fn open_with(
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
        metadata: &[(&str, &str)],
    ) -> Result<StatsFile, StatsFileError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.safetensors");
        write_stats(&path, tensors, metadata);
        StatsFile::open(&path)
    }

    const V1: &[(&str, &str)] = &[(META_STATS, STATS_VERSION)];

    fn good() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
        vec![
            ("a.weight.in_sum2", vec![2], vec![1.0, 2.0]),
            ("a.weight.counts", vec![1], vec![4.0]),
            ("a.weight.xtx", vec![2, 2], vec![1.0, 0.5, 0.5, 2.0]),
        ]
    }

    fn model<'a>() -> Vec<(&'a str, &'a [usize])> {
        vec![
            ("a.weight", &[3, 2][..]),
            ("b.weight", &[3, 2][..]),
            ("conv.weight", &[4, 1, 1, 2][..]),
            ("bias", &[3][..]),
        ]
    }

    #[test]
    fn a_good_file_opens_and_checks_with_aliases() {
        let f = open_with(
            &good(),
            &[
                (META_STATS, "1"),
                (
                    META_ALIASES,
                    r#"{"b.weight": "a.weight", "conv.weight": "a.weight"}"#,
                ),
            ],
        )
        .unwrap();
        f.check_against(model()).unwrap();
        assert!(f.has_xtx("b.weight") && f.has_in_sum2("conv.weight"));
        assert!(!f.has_in_sum2("bias"));
        assert_eq!(f.get("b.weight").unwrap().unwrap().in_sum2(), [1.0, 2.0]);
        assert_eq!(f.tokens(), 4.0);
        assert_eq!(f.sha256().len(), 64);
    }

    #[test]
    fn a_stored_file_is_not_hashed_again_and_trusted_values_are_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats.safetensors");
        let mut t = good();
        t[0].2 = vec![f32::NAN, 2.0];
        write_stats(&path, &t, V1);
        let full = StatsFile::open(&path).unwrap();
        assert!(full.check_against(model()).is_err(), "values are checked");
        let mut stored = StatsFile::open_hashed(&path, "known").unwrap();
        assert_eq!(stored.sha256(), "known");
        stored.trust_values();
        stored.check_against(model()).unwrap();
        assert!(
            stored.get("a.weight").is_err(),
            "a stage reading them still refuses them"
        );
        // Names and shapes are still held to the model.
        let small: Vec<(&str, &[usize])> = vec![("a.weight", &[3, 5][..])];
        assert!(stored.check_against(small).is_err());
    }

    #[test]
    fn every_bad_file_is_refused_naming_the_tensor() {
        let msg = |r: Result<StatsFile, StatsFileError>| -> String {
            match r.and_then(|f| f.check_against(model()).map(|_| f)) {
                Ok(_) => panic!("accepted"),
                Err(e) => e.to_string(),
            }
        };
        assert!(msg(open_with(&good(), &[])).contains("modelpress.stats"));
        let mut t = good();
        t.push(("a.weight.mean", vec![2], vec![0.0, 0.0]));
        assert!(msg(open_with(&t, V1)).contains("`a.weight.mean`"));
        let mut t = good();
        t.remove(1);
        assert!(msg(open_with(&t, V1)).contains("`a.weight.counts`"));
        let mut t = good();
        t[2].1 = vec![4, 1];
        t[2].2 = vec![1.0; 4];
        assert!(msg(open_with(&t, V1)).contains("`a.weight.xtx`"));
        let mut t = good();
        t[1].2 = vec![0.0];
        assert!(msg(open_with(&t, V1)).contains("`a.weight`: counts"));
        let mut t = good();
        t[2].2 = vec![1.0, 0.5, -0.5, 2.0];
        assert!(msg(open_with(&t, V1)).contains("not symmetric"));
        let mut t = good();
        t[0].2 = vec![1.0, f32::NAN];
        assert!(msg(open_with(&t, V1)).contains("in_sum2[1]"));
        let renamed: Vec<(String, Vec<usize>, Vec<f32>)> = good()
            .into_iter()
            .map(|(n, s, v)| (n.replace("a.weight", "missing.weight"), s, v))
            .collect();
        let renamed: Vec<(&str, Vec<usize>, Vec<f32>)> = renamed
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        assert!(msg(open_with(&renamed, V1)).contains("`missing.weight`, which is not a tensor"));
        let bias: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
            ("bias.in_sum2".into(), vec![3], vec![1.0; 3]),
            ("bias.counts".into(), vec![1], vec![1.0]),
        ];
        let bias: Vec<(&str, Vec<usize>, Vec<f32>)> = bias
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        assert!(msg(open_with(&bias, V1)).contains("`bias`"));
        let mut t = good();
        t[0].2 = vec![1.0, 2.0, 3.0];
        t[0].1 = vec![3];
        t.remove(2);
        assert!(msg(open_with(&t, V1)).contains("3 input columns, but the tensor has 2"));
        assert!(msg(open_with(
            &good(),
            &[(META_STATS, "1"), (META_ALIASES, r#"{"b.weight": "nope"}"#)]
        ))
        .contains("`nope`"));
        assert!(msg(open_with(
            &good(),
            &[(META_STATS, "1"), (META_ALIASES, "[1]")]
        ))
        .contains("aliases"));
    }
}
