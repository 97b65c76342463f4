//! Pipelines whose stages on a tensor run as fewer passes than one per
//! stage: magnitude pruning then sharing over the whole tensor
//! ([`prune_and_share`]), measured on the way. The result is the one
//! [`process_with_stats`](super::tensor::process_with_stats) gives, bit for
//! bit; the caller takes that path when [`process_measured`] returns None.

use super::coded::MatrixShape;
use super::metrics::Fidelity;
use super::share::{prune_and_share, ShareParams};
use super::spec::{Calibration, Entropy, Pipeline, PruneKind, Stage, ValueStage};
use super::tensor::{Processed, Values};

/// The stages this module fuses: pruning to `sparsity` within the tensor,
/// sharing of the whole tensor without statistics, optionally `encode`.
struct PruneShare {
    prune: (usize, f64),
    share: (usize, ShareParams),
    encode: Option<(usize, Entropy)>,
}

impl PruneShare {
    fn of(pipeline: &Pipeline, stage_indices: &[usize]) -> Option<Self> {
        let stage = |k: usize| stage_indices.get(k).map(|&i| (i, &pipeline.stages()[i]));
        let prune = match stage(0)? {
            (i, Stage::Prune(PruneKind::Magnitude { sparsity, global }, _)) if !global => {
                (i, *sparsity)
            }
            _ => return None,
        };
        let share = match stage(1)? {
            (i, Stage::Value(ValueStage::Share(p), _))
                if !p.per_channel && matches!(pipeline.calibration(i), Calibration::None) =>
            {
                (i, *p)
            }
            _ => return None,
        };
        let encode = match stage(2) {
            None => None,
            Some((i, Stage::Encode(e, _))) if stage_indices.len() == 3 => Some((i, *e)),
            Some(_) => return None,
        };
        Some(Self {
            prune,
            share,
            encode,
        })
    }
}

/// The tensor after stages `stage_indices` of `pipeline`, and the fidelity
/// of its values rounded by `round_to_storage` against `values`, when the
/// stages are ones this module fuses and the tensor is large enough to
/// gain from it; None otherwise.
pub fn process_measured(
    values: &[f32],
    shape: &[usize],
    pipeline: &Pipeline,
    stage_indices: &[usize],
    round_to_storage: &(dyn Fn(&mut [f32]) + Sync),
) -> Option<(Processed, Fidelity)> {
    let stages = PruneShare::of(pipeline, stage_indices)?;
    let matrix = MatrixShape::of(shape)?;
    if matrix.len() != values.len() {
        return None;
    }
    let (prune_i, sparsity) = stages.prune;
    let (share_i, params) = stages.share;
    let done = prune_and_share(values, sparsity, &params, round_to_storage)?;
    let mut applied = vec![pipeline.label(prune_i), pipeline.label(share_i)];
    let mut seconds = vec![(prune_i, done.prune_seconds), (share_i, done.share_seconds)];
    if let Some((i, _)) = stages.encode {
        applied.push(pipeline.label(i));
        seconds.push((i, 0.0));
    }
    let processed = Processed {
        shape: shape.to_vec(),
        values: Values::Coded(done.coded),
        encode: stages.encode.map(|(_, e)| e),
        applied,
        seconds,
        output_error: None,
    };
    Some((processed, done.sums.finish(values.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::metrics::fidelity_with;
    use crate::compress::tensor::process;
    use crate::compress::testing::first_difference;
    use proptest::prelude::*;

    fn pipeline(sparsity: f64, clusters: usize, init: &str, encode: bool) -> Pipeline {
        let encode = if encode {
            r#",{"stage":"encode","entropy":"huffman"}"#
        } else {
            ""
        };
        Pipeline::from_json(&format!(
            r#"{{"stages":[{{"stage":"prune","method":"magnitude","sparsity":{sparsity}}},
                {{"stage":"share","clusters":{clusters},"init":"{init}","iterations":20}}{encode}]}}"#
        ))
        .unwrap()
    }

    fn bf16(v: &mut [f32]) {
        for x in v {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }

    /// A weight-like value for index `i`: spread over many magnitudes, with
    /// a few large ones.
    fn weight(i: usize) -> f32 {
        let x = (i as f32 * 0.618_034).fract() - 0.5;
        let x = x * x * x * 8.0;
        if i.is_multiple_of(997) {
            x * 40.0
        } else {
            x
        }
    }

    /// Fuses the stages on `w` (when it does) and checks the result against
    /// stage by stage: the same coding bit for bit, labels, and fidelity.
    /// Returns whether the stages were fused.
    fn check(
        w: &[f32],
        shape: [usize; 2],
        p: &Pipeline,
        round: &(dyn Fn(&mut [f32]) + Sync),
    ) -> bool {
        let stages = p.stages_for("w", &shape, true);
        let Some((fused, fid)) = process_measured(w, &shape, p, &stages, round) else {
            return false;
        };
        let staged = process("w", w, &shape, p, &stages, None, round, &mut Vec::new()).unwrap();
        let (Values::Coded(a), Values::Coded(b)) = (&fused.values, &staged.values) else {
            panic!("coded values expected")
        };
        assert_eq!(first_difference(a, b), None);
        assert!(a == b);
        assert_eq!(fused.shape, staged.shape);
        assert_eq!(fused.applied, staged.applied);
        assert_eq!(fused.encode, staged.encode);
        let want = fidelity_with(w, |start, out| {
            b.decode_range(start, out);
            round(out);
        });
        assert_eq!(fid.sparsity, want.sparsity);
        assert_eq!(fid.max_abs_error.to_bits(), want.max_abs_error.to_bits());
        let close = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) if y.is_finite() => (x - y).abs() <= 1e-12 * y.abs().max(1e-300),
            (Some(x), Some(y)) => x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            (x, y) => x == y,
        };
        assert!(close(Some(fid.mse), Some(want.mse)), "{fid:?} vs {want:?}");
        assert!(close(fid.cosine, want.cosine), "{fid:?} vs {want:?}");
        assert!(close(fid.snr_db, want.snr_db), "{fid:?} vs {want:?}");
        true
    }

    #[test]
    fn pruning_then_sharing_in_three_passes_is_stage_by_stage_bit_for_bit() {
        let shape = [512, 600];
        let n = shape[0] * shape[1];
        let plain: Vec<f32> = (0..n).map(weight).collect();
        let mut rounded = plain.clone();
        bf16(&mut rounded);
        // Few distinct magnitudes, each held by hundreds of weights of both
        // signs: the threshold always splits equal magnitudes by position.
        let repeated: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1001) as f32 - 500.0) * 0.01)
            .collect();
        let mut damaged = plain.clone();
        for (i, x) in damaged.iter_mut().enumerate().step_by(4099) {
            *x = match i % 5 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                3 => 0.0,
                _ => f32::from_bits(3),
            };
        }
        let none: &(dyn Fn(&mut [f32]) + Sync) = &|_: &mut [f32]| {};
        let to_bf16: &(dyn Fn(&mut [f32]) + Sync) = &bf16;
        for (data, round) in [
            (&plain, none),
            (&rounded, to_bf16),
            (&repeated, none),
            (&damaged, none),
        ] {
            for sparsity in [0.0, 0.4, 0.5, 0.9, 0.999] {
                for (clusters, init, encode) in [
                    (16, "kmeans++", true),
                    (5, "linear", false),
                    (255, "density", true),
                ] {
                    let p = pipeline(sparsity, clusters, init, encode);
                    let fused = check(data, shape, &p, round);
                    // These keep bins enough to cluster on; the others may
                    // not, and then go stage by stage.
                    if sparsity <= 0.5 && clusters <= 16 {
                        assert!(fused, "sparsity {sparsity}, {clusters} clusters");
                    }
                }
            }
        }
    }

    #[test]
    fn other_stages_and_small_tensors_go_stage_by_stage() {
        let shape = [512, 600];
        let w: Vec<f32> = (0..512 * 600).map(weight).collect();
        let none: &(dyn Fn(&mut [f32]) + Sync) = &|_: &mut [f32]| {};
        for json in [
            r#"{"stages":[{"stage":"share","clusters":4}]}"#,
            r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.5},{"stage":"quantize","bits":8}]}"#,
            r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.5,"scope":"global"},{"stage":"share","clusters":4}]}"#,
            r#"{"stages":[{"stage":"prune","method":"magnitude","sparsity":0.5},{"stage":"share","clusters":4,"per_channel":true}]}"#,
            r#"{"stages":[{"stage":"prune","method":"n:m","n":2,"m":4},{"stage":"share","clusters":4}]}"#,
        ] {
            let p = Pipeline::from_json(json).unwrap();
            let stages = p.stages_for("w", &shape, true);
            assert!(
                process_measured(&w, &shape, &p, &stages, none).is_none(),
                "{json}"
            );
        }
        let p = pipeline(0.5, 16, "linear", true);
        let small = [64, 600];
        let stages = p.stages_for("w", &small, true);
        assert!(process_measured(&w[..64 * 600], &small, &p, &stages, none).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn fused_matches_stage_by_stage_on_random_weights(
            seed in any::<u64>(),
            sparsity in 0.0f64..0.99,
            clusters in 2usize..40,
            levels in prop_oneof![Just(0u32), 2u32..300],
            bf16_storage in any::<bool>(),
        ) {
            let shape = [256, 1030];
            let mut state = seed | 1;
            let w: Vec<f32> = (0..shape[0] * shape[1])
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if levels == 0 {
                        u * u * u
                    } else {
                        // Few distinct values: many ties at the threshold.
                        (u * levels as f32).round() / levels as f32
                    }
                })
                .collect();
            let none: &(dyn Fn(&mut [f32]) + Sync) = &|_: &mut [f32]| {};
            let to_bf16: &(dyn Fn(&mut [f32]) + Sync) = &bf16;
            let round = if bf16_storage { to_bf16 } else { none };
            check(&w, shape, &pipeline(sparsity, clusters, "kmeans++", true), round);
        }
    }
}
