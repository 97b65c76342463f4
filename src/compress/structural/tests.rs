use super::channels::channels_kept;
use super::*;

/// An in-memory checkpoint.
#[derive(Debug, Default, Clone)]
struct Mem {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    ints: Vec<String>,
}

impl Mem {
    fn add(&mut self, name: &str, shape: &[usize], values: Vec<f32>) -> &mut Self {
        assert_eq!(values.len(), element_count(shape), "{name}");
        self.tensors.push((name.into(), shape.to_vec(), values));
        self
    }

    fn add_int(&mut self, name: &str) -> &mut Self {
        self.ints.push(name.into());
        self.add(name, &[], vec![7.0])
    }

    fn find(&self, name: &str) -> Option<&(String, Vec<usize>, Vec<f32>)> {
        self.tensors.iter().find(|t| t.0 == name)
    }

    fn values(&self, name: &str) -> Option<&[f32]> {
        self.find(name).map(|t| t.2.as_slice())
    }

    fn dims(&self, name: &str) -> &[usize] {
        &self.find(name).unwrap_or_else(|| panic!("no `{name}`")).1
    }

    /// The checkpoint a plan writes.
    fn after(&self, plan: &Plan) -> Mem {
        let mut out = Mem::default();
        for t in &plan.outputs {
            let values = plan.materialize(&t.name, self).unwrap();
            out.add(&t.name, &t.shape, values);
        }
        out.ints = self.ints.clone();
        out
    }

    /// The same tensors with name prefixes replaced.
    fn renamed(&self, map: &[(&str, &str)]) -> Mem {
        let rename = |name: &str| {
            map.iter()
                .find_map(|(from, to)| {
                    Some(format!("{to}.{}", name.strip_prefix(&format!("{from}."))?))
                })
                .unwrap_or_else(|| name.to_string())
        };
        Mem {
            tensors: self
                .tensors
                .iter()
                .map(|(n, s, v)| (rename(n), s.clone(), v.clone()))
                .collect(),
            ints: self.ints.iter().map(|n| rename(n)).collect(),
        }
    }
}

impl TensorSource for Mem {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.find(name).map(|t| t.1.clone())
    }
    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.0.clone()).collect()
    }
    fn is_float(&self, name: &str) -> bool {
        !self.ints.iter().any(|n| n == name)
    }
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, StructuralError> {
        self.values(name)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| StructuralError::MissingTensor(name.into()))
    }
}

/// Deterministic values in [-0.5, 0.5).
fn det(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

fn zero_row(v: &mut [f32], rows: usize, row: usize) {
    let len = v.len() / rows;
    v[row * len..(row + 1) * len].fill(0.0);
}

// A small reference forward pass.

fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, out: usize) -> Vec<f32> {
    let inputs = x.len();
    assert_eq!(w.len(), out * inputs);
    (0..out)
        .map(|o| {
            let dot: f32 = (0..inputs).map(|i| w[o * inputs + i] * x[i]).sum();
            dot + b.map_or(0.0, |b| b[o])
        })
        .collect()
}

/// Valid (unpadded), stride 1; `x` is channels × h × w.
fn conv2d(
    x: &[f32],
    hw: (usize, usize),
    w: &[f32],
    shape: &[usize],
    b: Option<&[f32]>,
) -> (Vec<f32>, (usize, usize)) {
    let (o, c, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
    let (h, wd) = hw;
    assert_eq!(x.len(), c * h * wd);
    let (oh, ow) = (h - kh + 1, wd - kw + 1);
    let mut out = vec![0f32; o * oh * ow];
    for oc in 0..o {
        for y in 0..oh {
            for xx in 0..ow {
                let mut s = b.map_or(0.0, |b| b[oc]);
                for ic in 0..c {
                    for dy in 0..kh {
                        for dx in 0..kw {
                            s += w[((oc * c + ic) * kh + dy) * kw + dx]
                                * x[(ic * h + y + dy) * wd + xx + dx];
                        }
                    }
                }
                out[(oc * oh + y) * ow + xx] = s;
            }
        }
    }
    (out, (oh, ow))
}

fn batch_norm_eval(x: &mut [f32], m: &Mem, bn: &str) {
    let mean = m.values(&format!("{bn}.running_mean")).unwrap();
    let var = m.values(&format!("{bn}.running_var")).unwrap();
    let gamma = m.values(&format!("{bn}.weight")).unwrap();
    let beta = m.values(&format!("{bn}.bias")).unwrap();
    let spatial = x.len() / mean.len();
    for (c, plane) in x.chunks_mut(spatial).enumerate() {
        for v in plane {
            *v = (*v - mean[c]) / (var[c] + 1e-5).sqrt() * gamma[c] + beta[c];
        }
    }
}

fn relu(mut x: Vec<f32>) -> Vec<f32> {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
    x
}

fn dense(m: &Mem, layer: &str, x: &[f32]) -> Vec<f32> {
    let w = format!("{layer}.weight");
    linear(
        x,
        m.values(&w).unwrap(),
        m.values(&format!("{layer}.bias")),
        m.dims(&w)[0],
    )
}

/// fc1 → relu → fc2 → relu → fc3; every layer's output.
fn mlp_forward(m: &Mem, x: &[f32]) -> Vec<Vec<f32>> {
    let h1 = relu(dense(m, "fc1", x));
    let h2 = relu(dense(m, "fc2", &h1));
    let out = dense(m, "fc3", &h2);
    vec![h1, h2, out]
}

/// conv1 → bn1 (when present) → relu → conv2 → relu → flatten → fc1 →
/// relu → fc2, on a 2 × 6 × 6 input; every stage's output.
fn convnet_forward(m: &Mem, x: &[f32]) -> Vec<Vec<f32>> {
    let conv = |layer: &str, x: &[f32], hw| {
        let w = format!("{layer}.weight");
        conv2d(
            x,
            hw,
            m.values(&w).unwrap(),
            m.dims(&w),
            m.values(&format!("{layer}.bias")),
        )
    };
    let (mut a1, hw) = conv("conv1", x, (6, 6));
    if m.find("bn1.running_mean").is_some() {
        batch_norm_eval(&mut a1, m, "bn1");
    }
    let a1 = relu(a1);
    let (a2, _) = conv("conv2", &a1, hw);
    let a2 = relu(a2);
    let a3 = relu(dense(m, "fc1", &a2));
    let out = dense(m, "fc2", &a3);
    vec![a1, a2, a3, out]
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) =
        (0..got.len()).find(|&i| (got[i] - want[i]).abs() > tol * (1.0 + want[i].abs()))
    {
        panic!(
            "{what}: first difference at index {i}: got {} want {} (tolerance {tol})",
            got[i], want[i]
        );
    }
}

/// Entries `keep` of each block of `block` values, per channel.
fn channels(x: &[f32], count: usize, keep: &[usize]) -> Vec<f32> {
    let block = x.len() / count;
    keep.iter()
        .flat_map(|&c| x[c * block..(c + 1) * block].to_vec())
        .collect()
}

/// An MLP 6 → 8 → 4 → 3 whose hidden neurons 2 and 5 (fc1) and 3 (fc2)
/// are dead: zero weights and zero bias.
fn mlp() -> Mem {
    let mut w1 = det(48, 1);
    let mut b1 = det(8, 2);
    for r in [2, 5] {
        zero_row(&mut w1, 8, r);
        b1[r] = 0.0;
    }
    let mut w2 = det(32, 3);
    let mut b2 = det(4, 4);
    zero_row(&mut w2, 4, 3);
    b2[3] = 0.0;
    let mut m = Mem::default();
    m.add("fc1.weight", &[8, 6], w1)
        .add("fc1.bias", &[8], b1)
        .add("fc2.weight", &[4, 8], w2)
        .add("fc2.bias", &[4], b2)
        .add("fc3.weight", &[3, 4], det(12, 5))
        .add("fc3.bias", &[3], det(3, 6));
    m
}

/// conv1 [4,2,3,3] (no bias) → bn1 → conv2 [4,4,3,3] → fc1 [4, 4·2·2] →
/// fc2 [2,4], in PyTorch state-dict order. Dead: conv1 channel 1 (zero
/// weights, the norm shifts it below zero), conv2 channel 2 (zero
/// weights, negative bias), fc1 neuron 0.
fn convnet() -> Mem {
    let mut w1 = det(72, 7);
    zero_row(&mut w1, 4, 1);
    let gamma: Vec<f32> = det(4, 8).iter().map(|v| 0.75 + v).collect();
    let mut beta = det(4, 9);
    beta[1] = -0.5;
    let mut mean: Vec<f32> = det(4, 10).iter().map(|v| v * 0.2).collect();
    mean[1] = 0.0;
    let var: Vec<f32> = det(4, 11).iter().map(|v| 0.6 + v).collect();
    let mut w2 = det(144, 12);
    zero_row(&mut w2, 4, 2);
    let mut b2 = det(4, 13);
    b2[2] = -0.1;
    let mut w3 = det(64, 14);
    zero_row(&mut w3, 4, 0);
    let mut b3 = det(4, 15);
    b3[0] = 0.0;
    let mut m = Mem::default();
    m.add("conv1.weight", &[4, 2, 3, 3], w1)
        .add("bn1.weight", &[4], gamma)
        .add("bn1.bias", &[4], beta)
        .add("bn1.running_mean", &[4], mean)
        .add("bn1.running_var", &[4], var)
        .add_int("bn1.num_batches_tracked")
        .add("conv2.weight", &[4, 4, 3, 3], w2)
        .add("conv2.bias", &[4], b2)
        .add("fc1.weight", &[4, 16], w3)
        .add("fc1.bias", &[4], b3)
        .add("fc2.weight", &[2, 4], det(8, 16))
        .add("fc2.bias", &[2], det(2, 17));
    m
}

fn prune_stage(sparsity: f64) -> StructuralStage {
    StructuralStage::Channel(ChannelPrune {
        sparsity,
        norm: Norm::L1,
        groups: None,
    })
}

fn fold_stage() -> StructuralStage {
    StructuralStage::Fold(FoldBatchNorm { pairs: None })
}

fn group(producer: &str, consumers: &[&str]) -> ChannelGroup {
    ChannelGroup {
        producer: producer.into(),
        consumers: consumers.iter().map(|c| c.to_string()).collect(),
    }
}

fn shapes(plan: &Plan) -> Vec<(&str, Vec<usize>, bool)> {
    plan.outputs
        .iter()
        .map(|t| (t.name.as_str(), t.shape.clone(), t.changed))
        .collect()
}

const MLP_INPUT: [f32; 6] = [0.3, -1.2, 0.8, 2.0, -0.4, 1.1];

fn image() -> Vec<f32> {
    det(72, 99).iter().map(|v| v * 4.0).collect()
}

#[test]
fn pruning_dead_mlp_neurons_keeps_the_output_and_the_kept_activations() {
    let m = mlp();
    let plan = plan(&[prune_stage(0.25)], &m).unwrap();
    assert_eq!(
        shapes(&plan),
        vec![
            ("fc1.weight", vec![6, 6], true),
            ("fc1.bias", vec![6], true),
            ("fc2.weight", vec![3, 6], true),
            ("fc2.bias", vec![3], true),
            ("fc3.weight", vec![3, 3], true),
            ("fc3.bias", vec![3], false),
        ]
    );
    let before = mlp_forward(&m, &MLP_INPUT);
    let after = mlp_forward(&m.after(&plan), &MLP_INPUT);
    assert!(
        before.iter().all(|a| a.iter().any(|&v| v != 0.0)),
        "the test network is alive"
    );
    assert_eq!(
        after[0],
        channels(&before[0], 8, &[0, 1, 3, 4, 6, 7]),
        "fc1 activations"
    );
    assert_close(
        &after[1],
        &channels(&before[1], 4, &[0, 1, 2]),
        1e-6,
        "fc2 activations",
    );
    assert_close(&after[2], &before[2], 1e-6, "output");
}

#[test]
fn pruning_dead_channels_of_a_convnet_keeps_the_output_through_norm_and_flatten() {
    let m = convnet();
    let plan = plan(&[prune_stage(0.25)], &m).unwrap();
    assert_eq!(
        shapes(&plan),
        vec![
            ("conv1.weight", vec![3, 2, 3, 3], true),
            ("bn1.weight", vec![3], true),
            ("bn1.bias", vec![3], true),
            ("bn1.running_mean", vec![3], true),
            ("bn1.running_var", vec![3], true),
            ("bn1.num_batches_tracked", vec![], false),
            ("conv2.weight", vec![3, 3, 3, 3], true),
            ("conv2.bias", vec![3], true),
            ("fc1.weight", vec![3, 12], true),
            ("fc1.bias", vec![3], true),
            ("fc2.weight", vec![2, 3], true),
            ("fc2.bias", vec![2], false),
        ]
    );
    let x = image();
    let before = convnet_forward(&m, &x);
    let after = convnet_forward(&m.after(&plan), &x);
    assert!(
        before.iter().all(|a| a.iter().any(|&v| v != 0.0)),
        "the test network is alive"
    );
    assert_eq!(
        after[0],
        channels(&before[0], 4, &[0, 2, 3]),
        "conv1 activations"
    );
    assert_close(
        &after[1],
        &channels(&before[1], 4, &[0, 1, 3]),
        1e-6,
        "conv2 activations",
    );
    assert_close(
        &after[2],
        &channels(&before[2], 4, &[1, 2, 3]),
        1e-6,
        "fc1 activations",
    );
    assert_close(&after[3], &before[3], 1e-6, "output");
}

#[test]
fn folding_batch_norm_keeps_the_output_and_creates_the_bias_after_the_weight() {
    let m = convnet();
    let plan = plan(&[fold_stage()], &m).unwrap();
    assert_eq!(
        shapes(&plan),
        vec![
            ("conv1.weight", vec![4, 2, 3, 3], true),
            ("conv1.bias", vec![4], true),
            ("conv2.weight", vec![4, 4, 3, 3], false),
            ("conv2.bias", vec![4], false),
            ("fc1.weight", vec![4, 16], false),
            ("fc1.bias", vec![4], false),
            ("fc2.weight", vec![2, 4], false),
            ("fc2.bias", vec![2], false),
        ]
    );
    assert_eq!(plan.outputs[1].source, "conv1.weight");
    let x = image();
    let before = convnet_forward(&m, &x);
    let after = convnet_forward(&m.after(&plan), &x);
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        assert_close(a, b, 1e-4, &format!("stage {i}"));
    }
}

#[test]
fn folding_and_channel_pruning_compose_in_either_order() {
    let m = convnet();
    let x = image();
    let before = convnet_forward(&m, &x);
    for stages in [
        [fold_stage(), prune_stage(0.25)],
        [prune_stage(0.25), fold_stage()],
    ] {
        let plan = plan(&stages, &m).unwrap();
        let names: Vec<&str> = plan.outputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names[..3], ["conv1.weight", "conv1.bias", "conv2.weight"]);
        assert_eq!(plan.outputs[0].shape, [3, 2, 3, 3]);
        assert_eq!(plan.outputs[1].shape, [3]);
        let after = convnet_forward(&m.after(&plan), &x);
        assert_close(
            &after[0],
            &channels(&before[0], 4, &[0, 2, 3]),
            1e-4,
            "conv1 activations",
        );
        assert_close(&after[3], &before[3], 1e-4, "output");
    }
}

#[test]
fn pairs_are_inferred_from_sequential_names_with_the_bias_before_the_weight() {
    // Alphabetical order, as torch's safetensors writer lays tensors out.
    let mut m = convnet();
    m.add("conv1.bias", &[4], det(4, 20));
    let map = [
        ("conv1", "features.0"),
        ("bn1", "features.1"),
        ("conv2", "features.3"),
    ];
    let mut src = m.renamed(&map);
    src.tensors.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(src.tensors[4].0, "features.0.bias");
    let fold = Model::read(&src).unwrap().infer_fold_pairs().unwrap();
    assert_eq!(
        fold,
        vec![("features.0".to_string(), "features.1".to_string())]
    );

    let plan = plan(&[fold_stage()], &src).unwrap();
    assert!(plan
        .outputs
        .iter()
        .all(|t| !t.name.starts_with("features.1.")));
    let back: Vec<(&str, &str)> = map.iter().map(|&(a, b)| (b, a)).collect();
    let x = image();
    let after = convnet_forward(&src.after(&plan).renamed(&back), &x);
    assert_close(&after[3], &convnet_forward(&m, &x)[3], 1e-4, "output");
}

#[test]
fn groups_are_inferred_for_a_chain_and_the_classifier_is_not_pruned() {
    let m = convnet();
    let groups = Model::read(&m).unwrap().infer_channel_groups().unwrap();
    assert_eq!(
        groups,
        vec![
            group("conv1", &["conv2"]),
            group("conv2", &["fc1"]),
            group("fc1", &["fc2"])
        ]
    );
}

#[test]
fn explicit_groups_override_inference_and_may_name_the_norm() {
    // With the norm ahead of its layer no channel group can be
    // inferred, but an explicit group and pair still work.
    let mut m = convnet();
    let bn: Vec<_> = m.tensors.drain(1..6).collect();
    m.tensors.splice(0..0, bn);
    let stages = [
        StructuralStage::Channel(ChannelPrune {
            sparsity: 0.25,
            norm: Norm::L1,
            groups: Some(vec![group("conv1", &["bn1", "conv2"])]),
        }),
        StructuralStage::Fold(FoldBatchNorm {
            pairs: Some(vec![("conv1".into(), "bn1".into())]),
        }),
    ];
    let plan = plan(&stages, &m).unwrap();
    assert_eq!(
        shapes(&plan)[..4],
        [
            ("conv1.weight", vec![3, 2, 3, 3], true),
            ("conv1.bias", vec![3], true),
            ("conv2.weight", vec![4, 3, 3, 3], true),
            ("conv2.bias", vec![4], false),
        ]
    );
    assert_eq!(shapes(&plan)[4], ("fc1.weight", vec![4, 16], false));
    let x = image();
    let after = convnet_forward(&m.after(&plan), &x);
    assert_close(&after[3], &convnet_forward(&m, &x)[3], 1e-4, "output");
}

#[test]
fn the_weakest_channels_go_by_the_chosen_norm_and_ties_drop_the_lower_index() {
    // Row 0 = [3, 4]: L1 7, L2 5. Row 1 = [5, 0.5]: L1 5.5, L2 ≈ 5.02.
    let mut m = Mem::default();
    m.add("a.weight", &[2, 2], vec![3.0, 4.0, 5.0, 0.5])
        .add("b.weight", &[1, 2], vec![1.0, 2.0]);
    for (norm, kept_row) in [(Norm::L1, [3.0, 4.0]), (Norm::L2, [5.0, 0.5])] {
        let stage = StructuralStage::Channel(ChannelPrune {
            sparsity: 0.5,
            norm,
            groups: None,
        });
        let plan = plan(&[stage], &m).unwrap();
        assert_eq!(
            plan.materialize("a.weight", &m).unwrap(),
            kept_row,
            "{norm:?}"
        );
    }
    assert_eq!(channels_kept(&[1.0, 1.0, 2.0, 1.0], 2), vec![2, 3]);
    assert_eq!(channels_kept(&[1.0, f64::INFINITY, 0.0], 2), vec![1]);
}

#[test]
fn at_least_one_channel_is_kept() {
    let m = mlp();
    let plan = plan(&[prune_stage(1.0)], &m).unwrap();
    assert_eq!(plan.outputs[0].shape, [1, 6]);
    assert_eq!(plan.outputs[2].shape, [1, 1]);
    assert_eq!(plan.outputs[4].shape, [3, 1]);
}

#[test]
fn a_batch_norm_with_no_layer_before_it_is_named() {
    let mut m = convnet();
    m.tensors.swap(0, 5);
    // A name that points to no layer.
    let m = m.renamed(&[("bn1", "scale")]);
    let e = plan(&[fold_stage()], &m).unwrap_err();
    assert!(
        matches!(&e, StructuralError::UnpairedBatchNorm { bn, .. } if bn == "scale"),
        "{e}"
    );
    assert!(e.to_string().contains("`scale`"), "{e}");
    assert!(e.to_string().contains("no tensor comes before it"), "{e}");
}

#[test]
fn pairs_follow_names_when_the_writer_sorted_the_tensors() {
    // ResNet naming, sorted by name: `bn1` comes before `conv1`, and
    // `layer1.0.bn1` right after the classifier, whose outputs differ.
    let mut m = Mem::default();
    let norm = |m: &mut Mem, bn: &str, seed: usize| {
        m.add(&format!("{bn}.weight"), &[4], det(4, seed))
            .add(&format!("{bn}.bias"), &[4], det(4, seed + 1))
            .add(&format!("{bn}.running_mean"), &[4], det(4, seed + 2))
            .add(&format!("{bn}.running_var"), &[4], vec![0.5; 4])
            .add_int(&format!("{bn}.num_batches_tracked"));
    };
    norm(&mut m, "bn1", 1);
    norm(&mut m, "layer1.0.bn1", 10);
    norm(&mut m, "layer1.0.downsample.1", 20);
    m.add("conv1.weight", &[4, 2, 3, 3], det(72, 30))
        .add("fc.weight", &[2, 4], det(8, 31))
        .add("fc.bias", &[2], det(2, 32))
        .add("layer1.0.conv1.weight", &[4, 4, 3, 3], det(144, 33))
        .add("layer1.0.downsample.0.weight", &[4, 4, 1, 1], det(16, 34));
    m.tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let pairs = Model::read(&m).unwrap().infer_fold_pairs().unwrap();
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(l, b)| (l.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("conv1", "bn1"),
            ("layer1.0.conv1", "layer1.0.bn1"),
            ("layer1.0.downsample.0", "layer1.0.downsample.1"),
        ]
    );
    let plan = plan(&[fold_stage()], &m).unwrap();
    assert!(plan
        .outputs
        .iter()
        .all(|t| !t.name.contains("bn1.") && !t.name.starts_with("layer1.0.downsample.1.")));
    assert!(plan
        .outputs
        .iter()
        .any(|t| t.name == "layer1.0.downsample.0.bias"));
}

#[test]
fn a_batch_norm_whose_channels_differ_from_the_layer_before_it_is_named() {
    let mut m = Mem::default();
    m.add("conv.weight", &[4, 1, 1, 1], det(4, 1))
        .add("norm.running_mean", &[3], vec![0.0; 3])
        .add("norm.running_var", &[3], vec![1.0; 3]);
    let e = plan(&[fold_stage()], &m).unwrap_err();
    assert_eq!(
        e.to_string(),
        "batch norm `norm` could not be paired with a layer: it has 3 channels but the layer before it, `conv`, has 4 outputs; give the pairs explicitly"
    );
}

#[test]
fn layers_that_do_not_chain_are_reported_by_tensor() {
    let mut m = mlp();
    m.tensors[2] = ("fc2.weight".into(), vec![4, 7], det(28, 3));
    let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
    assert!(
        matches!(&e, StructuralError::NotChained { tensor, .. } if tensor == "fc2.weight"),
        "{e}"
    );
}

#[test]
fn a_model_that_is_not_a_plain_chain_needs_explicit_groups() {
    let mut m = mlp();
    m.add("norm.weight", &[4], vec![1.0; 4]);
    let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
    assert!(
        matches!(&e, StructuralError::NotChained { tensor, .. } if tensor == "norm.weight"),
        "{e}"
    );

    let mut m = convnet();
    m.tensors.swap(0, 5);
    let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
    assert!(
        matches!(&e, StructuralError::UnpairedBatchNorm { bn, .. } if bn == "bn1"),
        "{e}"
    );
}

#[test]
fn explicit_groups_that_do_not_fit_the_model_are_errors() {
    let m = mlp();
    let with = |g: ChannelGroup| {
        let stage = StructuralStage::Channel(ChannelPrune {
            sparsity: 0.5,
            norm: Norm::L2,
            groups: Some(vec![g]),
        });
        plan(&[stage], &m).unwrap_err().to_string()
    };
    assert_eq!(
        with(group("fc9", &["fc2"])),
        "layer `fc9`: there is no tensor `fc9.weight`"
    );
    assert!(with(group("fc1", &["fc3"])).starts_with("tensor `fc3.weight` has shape [3, 4]: its input dimension 4 does not read the 8 outputs of `fc1`"));
    let pair = StructuralStage::Fold(FoldBatchNorm {
        pairs: Some(vec![("fc1".into(), "bn".into())]),
    });
    assert_eq!(
        plan(&[pair], &m).unwrap_err().to_string(),
        "batch norm `bn`: there is no running_mean"
    );
}

#[test]
fn a_negative_running_variance_is_an_error_when_materializing() {
    let mut m = convnet();
    m.tensors[4].2[2] = -1.0;
    let plan = plan(&[fold_stage()], &m).unwrap();
    let e = plan.materialize("conv1.weight", &m).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("batch norm `bn1`: running_var is -1 at channel 2"),
        "{e}"
    );
}

#[test]
fn a_tensor_shorter_than_its_shape_is_an_error() {
    let mut m = mlp();
    m.tensors[0].2.pop();
    let e = plan(&[prune_stage(0.25)], &m).unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor `fc1.weight` holds 47 values but its shape [8, 6] needs 48"
    );
}

#[test]
fn an_integer_tensor_is_not_rewritten() {
    let mut m = mlp();
    m.ints.push("fc2.weight".into());
    let stage = StructuralStage::Channel(ChannelPrune {
        sparsity: 0.5,
        norm: Norm::L1,
        groups: Some(vec![group("fc1", &["fc2"])]),
    });
    let e = plan(&[stage], &m).unwrap_err();
    assert!(
        matches!(&e, StructuralError::NotFloat(t) if t == "fc2.weight"),
        "{e}"
    );
}

#[test]
fn no_stages_copy_everything_through() {
    let m = convnet();
    let plan = plan(&[], &m).unwrap();
    assert_eq!(plan.outputs.len(), m.tensors.len());
    assert!(plan
        .outputs
        .iter()
        .all(|t| !t.changed && t.source == t.name));
    assert!(matches!(
        plan.materialize("nope", &m),
        Err(StructuralError::MissingTensor(_))
    ));
}

/// A checkpoint that answers shapes but refuses to load any tensor.
struct ShapesOnly(Mem);

impl TensorSource for ShapesOnly {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.shape(name)
    }
    fn names(&self) -> Vec<String> {
        self.0.names()
    }
    fn is_float(&self, name: &str) -> bool {
        self.0.is_float(name)
    }
    fn load_f32(&self, name: &str) -> Result<Vec<f32>, StructuralError> {
        panic!("planning shapes loaded `{name}`")
    }
}

#[test]
fn planning_shapes_reads_no_tensor_and_gives_the_outputs_of_the_full_plan() {
    for (m, stages) in [
        (mlp(), vec![prune_stage(0.25)]),
        (convnet(), vec![fold_stage(), prune_stage(0.5)]),
        (convnet(), vec![prune_stage(0.5), fold_stage()]),
    ] {
        let full = plan(&stages, &m).unwrap();
        let shapes = plan_shapes(&stages, &ShapesOnly(m)).unwrap();
        assert_eq!(shapes, full.outputs);
    }
}
