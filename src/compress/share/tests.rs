use super::*;
use crate::compress::testing::first_mismatch;
use proptest::prelude::*;

fn params(clusters: usize, init: Init, per_channel: bool) -> ShareParams {
    ShareParams {
        clusters,
        init,
        iterations: 30,
        per_channel,
    }
}

fn sorted(values: &[f32]) -> Vec<f32> {
    let mut v = values.to_vec();
    v.sort_unstable_by(f32::total_cmp);
    v
}

/// Centroids that agree within `tol` (relative to the data range).
fn within(tol: f64) -> impl Fn(&f32, &f32) -> bool {
    move |x, y| (f64::from(*x) - f64::from(*y)).abs() <= tol
}

fn assert_never_rises(objective: &[f64]) -> Result<(), TestCaseError> {
    for (i, w) in objective.windows(2).enumerate() {
        // Summation order alone can move the last bits of the total.
        let slack = 1e-12 * w[0].abs() + 1e-30;
        prop_assert!(
            w[1] <= w[0] + slack,
            "objective rose at iteration {}: {} -> {}",
            i + 1,
            w[0],
            w[1]
        );
    }
    Ok(())
}

#[test]
fn two_well_separated_groups_converge_to_their_means() {
    let v = [1.0, 2.0, 3.0, 10.0, 11.0, 12.0];
    let km = kmeans_1d(&v, 2, Init::Linear, 10);
    assert_eq!(km.centroids, vec![2.0, 11.0]);
    // From [1, 12]: (0+1+4)+(4+1+0) = 10; then (1+0+1)+(1+0+1) = 4.
    assert_eq!(km.objective, vec![10.0, 4.0]);
    assert_eq!(kmeans_1d_reference(&v, vec![12.0, 1.0], 10), km);
}

#[test]
fn inits_follow_deep_compression() {
    let v: Vec<f32> = (0..10).map(|i| (i * i) as f32).collect();
    assert_eq!(
        initial_centroids(&v, 4, Init::Linear),
        vec![0.0, 27.0, 54.0, 81.0]
    );
    // Quantiles at 1/8, 3/8, 5/8, 7/8 of 10 values: indices 1, 3, 6, 8.
    assert_eq!(
        initial_centroids(&v, 4, Init::Density),
        vec![1.0, 9.0, 36.0, 64.0]
    );
    let pp = initial_centroids(&v, 4, Init::KmeansPlusPlus);
    assert_eq!(pp, initial_centroids(&v, 4, Init::KmeansPlusPlus));
    assert!(pp.windows(2).all(|w| w[0] < w[1]));
    assert!(pp.iter().all(|c| v.contains(c)), "{pp:?}");
}

#[test]
fn a_density_init_on_a_repeated_value_separates_the_centroids() {
    let mut v = vec![0.5f32; 100];
    v.extend([0.1, 0.2, 0.9, 1.0]);
    let v = sorted(&v);
    let c = initial_centroids(&v, 4, Init::Density);
    assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}");
    assert!(c.iter().all(|x| v.contains(x)), "{c:?}");
}

#[test]
fn fewer_distinct_values_than_clusters_gives_those_values() {
    let v = [-1.0, -1.0, 2.0, 2.0, 2.0];
    for init in [Init::Linear, Init::Density, Init::KmeansPlusPlus] {
        let km = kmeans_1d(&v, 4, init, 10);
        assert_eq!(km.centroids, vec![-1.0, 2.0, 2.0, 2.0]);
        assert_eq!(km.objective, vec![0.0]);
    }
    let c = share(
        &[0.0, 3.0, 3.0, 0.0],
        MatrixShape { rows: 1, cols: 4 },
        &params(8, Init::KmeansPlusPlus, false),
    );
    assert_eq!(c.decode(), vec![0.0, 3.0, 3.0, 0.0]);
}

#[test]
fn empty_clusters_keep_their_centroid() {
    // The middle linear centroid (5.5) has no values nearer than the ends.
    let v = [0.0, 0.5, 10.5, 11.0];
    let km = kmeans_1d(&v, 3, Init::Linear, 10);
    assert_eq!(km.centroids, vec![0.25, 5.5, 10.75]);
}

#[test]
fn pruned_zeros_keep_entry_zero_and_decode_to_exactly_zero() {
    let data = [0.0, 1.0, 1.5, 0.0, -3.0, -3.5, 0.0, 5.0];
    let c = share(
        &data,
        MatrixShape { rows: 2, cols: 4 },
        &params(3, Init::Linear, false),
    );
    let Decode::Codebook { entries, values } = &c.decode else {
        panic!("share gives a codebook");
    };
    assert_eq!((*entries, c.bits, c.group_len), (4, 2, 8));
    assert_eq!(values, &vec![0.0, -3.25, 1.25, 5.0]);
    assert_eq!(c.symbols, vec![0, 2, 2, 0, 1, 1, 0, 3]);
    assert_eq!(c.zero_symbol(0), Some(0));
}

#[test]
fn without_zeros_there_is_no_zero_entry() {
    let c = share(
        &[1.0, 2.0, 3.0, 4.0],
        MatrixShape { rows: 1, cols: 4 },
        &params(2, Init::Linear, false),
    );
    assert_eq!(c.bits, 1);
    assert_eq!(
        c.decode,
        Decode::Codebook {
            entries: 2,
            values: vec![1.5, 3.5]
        }
    );
}

#[test]
fn per_channel_gives_each_row_its_own_codebook() {
    let data = [1.0, 1.0, 2.0, 2.0, 100.0, 100.0, 0.0, 200.0];
    let c = share(
        &data,
        MatrixShape { rows: 2, cols: 4 },
        &params(2, Init::Density, true),
    );
    assert_eq!(c.group_len, 4);
    // Row 0 has no zero but shares the tensor's layout: entry 0 unused.
    assert_eq!(
        c.decode,
        Decode::Codebook {
            entries: 3,
            values: vec![0.0, 1.0, 2.0, 0.0, 100.0, 200.0]
        }
    );
    assert_eq!(c.decode(), data.to_vec());
}

#[test]
fn all_zero_and_empty_tensors_are_handled() {
    let c = share(
        &[0.0; 6],
        MatrixShape { rows: 2, cols: 3 },
        &params(4, Init::KmeansPlusPlus, true),
    );
    assert_eq!(c.decode(), vec![0.0; 6]);
    let c = share(
        &[],
        MatrixShape { rows: 0, cols: 3 },
        &params(4, Init::Linear, false),
    );
    assert!(c.symbols.is_empty());
}

#[test]
fn non_finite_weights_take_the_ends_of_the_codebook() {
    let data = [f32::NEG_INFINITY, 1.0, 2.0, 3.0, f32::INFINITY, f32::NAN];
    let c = share(
        &data,
        MatrixShape { rows: 1, cols: 6 },
        &params(3, Init::Linear, false),
    );
    assert_eq!(c.symbols, vec![0, 0, 1, 2, 2, 0]);
}

#[test]
fn a_large_tensor_uses_the_parallel_path_and_matches_the_reference() {
    let data: Vec<f32> = (0..(PARALLEL_MIN * 3))
        .map(|i| {
            if i % 5 == 0 {
                0.0
            } else {
                ((i * 7919) % 1000) as f32 / 64.0 - 7.0
            }
        })
        .collect();
    let nonzero: Vec<f32> = data.iter().copied().filter(|&x| x != 0.0).collect();
    let s = sorted(&nonzero);
    for init in [Init::Linear, Init::Density, Init::KmeansPlusPlus] {
        let start = initial_centroids(&s, 16, init);
        let fast = kmeans_1d(&s, 16, init, 15);
        let reference = kmeans_1d_reference(&nonzero, start, 15);
        assert_eq!(
            first_mismatch(&fast.centroids, &reference.centroids, within(1e-4)),
            None,
            "{init:?}"
        );
    }
}

/// Straightforward histogram: sort, group by the leading key bits, and
/// sum in f64.
fn histogram_reference(values: &[f32]) -> Vec<(u64, f64, f64)> {
    let v = sorted(
        &values
            .iter()
            .copied()
            .filter(|x| *x != 0.0 && x.is_finite())
            .collect::<Vec<_>>(),
    );
    v.chunk_by(|a, b| {
        order_key(a.to_bits()) >> BIN_LOW_BITS == order_key(b.to_bits()) >> BIN_LOW_BITS
    })
    .map(|bin| {
        let n = bin.len() as f64;
        let mean = bin.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let spread = bin.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum();
        (bin.len() as u64, mean, spread)
    })
    .collect()
}

/// Squared distance of every finite nonzero value to its nearest centroid.
fn per_value_objective(values: &[f32], centroids: &[f32]) -> f64 {
    values
        .iter()
        .filter(|x| **x != 0.0 && x.is_finite())
        .map(|&x| {
            let c = centroids[nearest_cluster(&midpoints(centroids), x)];
            (f64::from(x) - f64::from(c)).powi(2)
        })
        .sum()
}

/// Weights shaped like a layer's: a few clusters of different widths
/// and a long tail, from a fixed generator.
fn layer_like(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| {
            let g: f64 = (0..4).map(|_| rng.unit()).sum::<f64>() - 2.0;
            let (center, width) =
                [(0.0, 0.02), (0.05, 0.01), (-0.08, 0.03), (0.0, 0.3)][rng.below(4)];
            (center + width * g) as f32
        })
        .collect()
}

#[test]
fn looking_clusters_up_by_bin_matches_searching_at_every_boundary() {
    let centroids = [-3.0f32, -0.001, 0.0, 1e-40, 0.5, 0.500_1, 7.0];
    let mids = midpoints(&centroids);
    let mut data = vec![
        0.0,
        -0.0,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN,
    ];
    for &m in &mids {
        let m = m as f32;
        for x in [m, m.next_up(), m.next_down(), -m] {
            data.push(x);
            // The ends of the bin around it.
            let key = order_key(x.to_bits()) & !BIN_LOW_MASK;
            data.push(f32::from_bits(value_bits(key)));
            data.push(f32::from_bits(value_bits(key | BIN_LOW_MASK)));
        }
    }
    let table = bin_clusters(&mids);
    let (mut by_bin, mut by_search) = (vec![0u8; data.len()], vec![0u8; data.len()]);
    assign_by_bin(&data, &mut by_bin, &mids, &table, 1, 1);
    assign_by_search(&data, &mut by_search, &mids, 1, 1);
    let first = by_bin.iter().zip(&by_search).position(|(a, b)| a != b);
    assert_eq!(first, None, "{:?}", first.map(|i| data[i]));
    // Every value at every offset in a vector step, and a ragged tail.
    for shift in 0..70 {
        let data = &data[shift.min(data.len())..];
        let mut by_compare = vec![0u8; data.len()];
        assign_by_thresholds(data, &mut by_compare, &f32_thresholds(&mids), 1, 1);
        let want = &by_search[by_search.len() - data.len()..];
        let first = by_compare.iter().zip(want).position(|(a, b)| a != b);
        assert_eq!(first, None, "{:?}", first.map(|i| data[i]));
    }
    // The AVX2 kernel also where a wider one is taken, with limits on the
    // magnitude keys from none to all.
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has!("avx2") {
        let key = data[data.len() / 2].to_bits() & 0x7fff_ffff;
        for zero_below in [0, 1, key, key + 1, 1 << 31, u32::MAX] {
            let mut want = vec![0u8; data.len()];
            let thresholds = f32_thresholds(&mids);
            assign_by_thresholds_portable(&data, &mut want, &thresholds, 3, zero_below);
            if zero_below > 0 {
                assert_eq!(want, assigned_plainly(&data, &mids, 3, zero_below));
            }
            let mut got = vec![0u8; data.len()];
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { assign_by_thresholds_avx2(&data, &mut got, &thresholds, 3, zero_below) };
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(
                first,
                None,
                "zero_below {zero_below}: {:?}",
                first.map(|i| data[i])
            );
        }
    }
}

/// [`assign_by_search`] (0 for zeros), then symbol 0 for values whose
/// magnitude key is below `zero_below`, element by element.
fn assigned_plainly(data: &[f32], mids: &[f64], offset: u8, zero_below: u32) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    assign_by_search(data, &mut out, mids, offset, 1);
    for (s, &x) in out.iter_mut().zip(data) {
        if x.to_bits() & 0x7fff_ffff < zero_below {
            *s = 0;
        }
    }
    out
}

#[test]
fn the_cluster_table_names_each_bin_by_the_bits_of_its_values() {
    let mids = midpoints(&[-2.0, -0.03, 0.0, 1e-6, 0.5, 7.0]);
    let (by_raw, by_key) = (bin_clusters(&mids), bin_clusters_by_key(&mids));
    for x in
        layer_like(5, 10_000)
            .into_iter()
            .chain([0.0, -0.0, f32::NAN, f32::INFINITY, -1e-40, 3e38])
    {
        let bits = x.to_bits();
        assert_eq!(
            by_raw[(bits >> BIN_LOW_BITS) as usize],
            by_key[(order_key(bits) >> BIN_LOW_BITS) as usize],
            "{x}"
        );
    }
}

#[test]
fn a_histogram_keeps_exact_counts_means_and_spreads() {
    let eps = f32::EPSILON; // 2^-23, one step of the last mantissa bit at 1.0
    let values = [
        1.0,
        0.0,
        1.0 + 8.0 * eps,
        -2.0,
        1.5,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        1.0,
    ];
    let hist = ValueHistogram::of(&values);
    assert_eq!(hist.count(), 5);
    // 1.0, 1.0 and 1 + 2^-20 share a bin (they differ in the last 14
    // mantissa bits only): mean 1 + 2^-20 / 3.
    let third = 2f64.powi(-20) / 3.0;
    let spread = 2.0 * third * third + (2.0 * third) * (2.0 * third);
    assert_eq!(
        hist.bins,
        vec![
            Bin {
                count: 1,
                mean: -2.0,
                spread: 0.0
            },
            Bin {
                count: 3,
                mean: 1.0 + third,
                spread
            },
            Bin {
                count: 1,
                mean: 1.5,
                spread: 0.0
            },
        ]
    );
    // Three bins, one of them with two distinct values: too coarse for
    // three clusters; without it the values themselves are the answer.
    assert!(!hist.resolves(3));
    let exact = ValueHistogram::of(&[1.0, -2.0, 1.5, 1.5]);
    assert!(exact.resolves(3) && !exact.resolves(2));
    assert_eq!(
        kmeans_1d_binned(&exact, 4, Init::Linear, 5).centroids,
        vec![-2.0, 1.0, 1.5, 1.5]
    );
}

#[test]
fn subnormal_and_extreme_values_have_their_own_bins() {
    let values = [
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
    ];
    let hist = ValueHistogram::of(&values);
    let means: Vec<f64> = hist.bins.iter().map(|b| b.mean).collect();
    let mut expected: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
    expected.sort_by(f64::total_cmp);
    assert_eq!(means, expected);
}

#[test]
fn a_long_input_gives_the_same_histogram_on_any_number_of_threads() {
    let values = layer_like(7, PARALLEL_MIN * 5 + 3);
    let sequential = add_to_bins(new_bin_table(), &values);
    let bins: Vec<Bin> = sequential[..BINS]
        .iter()
        .enumerate()
        .filter(|(_, s)| s.count > 0)
        .filter_map(|(i, s)| Bin::from_sums(i, s))
        .collect();
    let parallel = ValueHistogram::of(&values);
    let first = parallel.bins.iter().zip(&bins).position(|(a, b)| a != b);
    assert_eq!(first, None);
    assert_eq!(parallel.bins.len(), bins.len());
}

/// Two tables agree exactly, slot by slot.
fn assert_same_table(a: &BinTable, b: &BinTable) {
    let key = |s: &BinSums| (s.count, s.low, s.low_squares);
    let first = (0..a.len()).find(|&i| key(&a[i]) != key(&b[i]));
    assert_eq!(first, None, "tables differ");
}

#[test]
fn adding_to_bins_matches_the_reference_on_pruned_and_special_values() {
    let mut values = layer_like(3, 100_003);
    for (i, v) in values.iter_mut().enumerate() {
        match i % 11 {
            0 | 3 | 4 | 7 => *v = 0.0,
            5 => *v = -0.0,
            _ => {}
        }
    }
    values.extend([
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE / 4.0,
    ]);
    values.extend(std::iter::repeat_n(0.0, 1000));
    let fast = add_to_bins(new_bin_table(), &values);
    let reference = add_to_bins_reference(new_bin_table(), &values);
    assert_same_table(&fast, &reference);
}

#[test]
fn a_large_tensor_is_clustered_over_its_histogram_nearly_as_well_as_by_plain_lloyd() {
    let mut data = layer_like(11, HISTOGRAM_MIN + 1000);
    for (i, x) in data.iter_mut().enumerate() {
        if i % 3 == 0 {
            *x = 0.0;
        }
    }
    data[5] = f32::NAN;
    data[7] = f32::NEG_INFINITY;
    let nonzero: Vec<f32> = data
        .iter()
        .copied()
        .filter(|x| *x != 0.0 && x.is_finite())
        .collect();
    let hist = ValueHistogram::of(&data);
    assert!(hist.resolves(16));
    let shape = MatrixShape {
        rows: 1,
        cols: data.len(),
    };
    for init in [Init::Linear, Init::Density, Init::KmeansPlusPlus] {
        let start = initial_centroids_binned(&hist, 16, init);
        let reference = kmeans_1d_reference(&nonzero, start, 12);
        let c = share(
            &data,
            shape,
            &ShareParams {
                clusters: 16,
                init,
                iterations: 12,
                per_channel: false,
            },
        );
        let Decode::Codebook { entries, values } = &c.decode else {
            panic!("share gives a codebook")
        };
        assert_eq!(*entries, 17);
        assert_eq!(values[0], 0.0);
        let binned = per_value_objective(&nonzero, &values[1..]);
        let best = *reference.objective.last().unwrap();
        assert!(
            binned <= best * 1.01 + 1e-12,
            "{init:?}: histogram {binned} vs reference {best}"
        );
        let moved = data
            .iter()
            .zip(&c.symbols)
            .position(|(&x, &s)| (x == 0.0) != (s == 0));
        assert_eq!(moved, None, "{init:?}");
        assert!(c.symbols.iter().all(|&s| usize::from(s) < *entries));
    }
}

#[test]
fn a_large_tensor_with_few_distinct_values_gets_exactly_those_values() {
    let levels = [-0.75f32, -0.125, 0.25, 0.5, 3.0];
    let data: Vec<f32> = (0..HISTOGRAM_MIN)
        .map(|i| if i % 4 == 0 { 0.0 } else { levels[i % 5] })
        .collect();
    let c = share(
        &data,
        MatrixShape {
            rows: 2,
            cols: HISTOGRAM_MIN / 2,
        },
        &params(8, Init::KmeansPlusPlus, false),
    );
    let decoded = c.decode();
    assert_eq!(data.iter().zip(&decoded).position(|(x, d)| x != d), None);
}

#[test]
fn a_large_tensor_in_too_few_bins_is_sorted_instead() {
    // Distinct values, all within one bin.
    let data: Vec<f32> = (0..HISTOGRAM_MIN as u32)
        .map(|i| f32::from_bits(1.0f32.to_bits() + i % 3000))
        .collect();
    assert!(!ValueHistogram::of(&data).resolves(4));
    let km = cluster_group(&data, 4, Init::Density, 10);
    assert_eq!(km, kmeans_1d(&sorted(&data), 4, Init::Density, 10));
}

#[test]
fn over_many_layers_bins_cluster_as_well_as_values_on_average() {
    // With many clusters Lloyd's path is sensitive: moving one boundary
    // value can lead either path to a different local optimum, so one
    // layer may come out a little better or worse either way. Over many
    // layers neither may be better.
    for k in [9, 16] {
        for init in [Init::Linear, Init::Density, Init::KmeansPlusPlus] {
            let (mut log_ratio_sum, mut worst, mut layers) = (0.0f64, 0.0f64, 0);
            for seed in 0..40u64 {
                let values = layer_like(seed, 1000 + (seed as usize * 7919) % 2000);
                let hist = ValueHistogram::of(&values);
                assert!(hist.resolves(k), "seed {seed}");
                let start = initial_centroids_binned(&hist, k, init);
                let reference = kmeans_1d_reference(&values, start, 20);
                let binned = kmeans_1d_binned(&hist, k, init, 20);
                let ratio = per_value_objective(&values, &binned.centroids)
                    / reference.objective.last().unwrap();
                log_ratio_sum += ratio.ln();
                worst = worst.max(ratio);
                layers += 1;
            }
            let mean_ratio = (log_ratio_sum / f64::from(layers)).exp();
            assert!(
                mean_ratio <= 1.002 && worst <= 1.1,
                "k = {k}, {init:?}: mean ratio {mean_ratio}, worst {worst}"
            );
        }
    }
}

fn grid_values() -> impl Strategy<Value = Vec<f32>> {
    // Multiples of 1/256: sums are exact in f64, so both paths agree.
    prop::collection::vec(-2000i32..2000, 1..300)
        .prop_map(|v| v.into_iter().map(|x| x as f32 / 256.0).collect())
}

fn any_init() -> impl Strategy<Value = Init> {
    prop_oneof![
        Just(Init::Linear),
        Just(Init::Density),
        Just(Init::KmeansPlusPlus)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_objective_never_rises(
        values in prop::collection::vec(-10.0f32..10.0, 1..400),
        k in 1usize..20,
        init in any_init(),
    ) {
        let s = sorted(&values);
        let fast = kmeans_1d(&s, k, init, 25);
        assert_never_rises(&fast.objective)?;
        prop_assert!(fast.centroids.windows(2).all(|w| w[0] <= w[1]));
        prop_assert!(fast.centroids.iter().all(|c| c.is_finite()));
        let start = initial_centroids(&s, k, init);
        let reference = kmeans_1d_reference(&values, start, 25);
        assert_never_rises(&reference.objective)?;
    }

    #[test]
    fn looking_clusters_up_by_bin_matches_searching(
        mut centroids in prop::collection::vec(
            prop_oneof![-10.0f32..10.0, any::<f32>().prop_filter("finite", |x| x.is_finite())],
            1..40,
        ),
        values in prop::collection::vec(prop_oneof![any::<f32>(), -10.0f32..10.0], 0..400),
    ) {
        centroids.sort_unstable_by(f32::total_cmp);
        let mids = midpoints(&centroids);
        let data = values;
        let table = bin_clusters(&mids);
        let (mut by_bin, mut by_search) = (vec![0u8; data.len()], vec![0u8; data.len()]);
        assign_by_bin(&data, &mut by_bin, &mids, &table, 1, 1);
        assign_by_search(&data, &mut by_search, &mids, 1, 1);
        let first = by_bin.iter().zip(&by_search).position(|(a, b)| a != b);
        prop_assert_eq!(first, None);
    }

    #[test]
    fn every_way_of_assigning_matches_searching_with_pruned_values_zeroed(
        mut centroids in prop::collection::vec(
            prop_oneof![-10.0f32..10.0, any::<f32>().prop_filter("finite", |x| x.is_finite())],
            1..60,
        ),
        values in prop::collection::vec(
            prop_oneof![any::<f32>(), -10.0f32..10.0, Just(0.0f32), Just(-0.0f32)],
            0..700,
        ),
        zero_below in prop_oneof![Just(0u32), Just(1u32), 0u32..0x4000_0000, any::<u32>()],
        offset in 0u8..2,
        len in prop_oneof![Just(10usize), Just(HISTOGRAM_MIN)],
    ) {
        centroids.sort_unstable_by(f32::total_cmp);
        let want = assigned_plainly(&values, &midpoints(&centroids), offset, zero_below);
        let mut got = vec![0u8; values.len()];
        Assign::new(&centroids, len).run(&values, &mut got, offset, zero_below);
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        prop_assert_eq!(first, None, "{:?}", first.map(|i| values[i]));
    }

    #[test]
    fn adding_to_bins_matches_the_reference(
        values in prop::collection::vec(
            prop_oneof![Just(0.0f32), Just(-0.0f32), any::<f32>(), -1.0f32..1.0],
            0..3000,
        ),
    ) {
        let fast = add_to_bins(new_bin_table(), &values);
        let reference = add_to_bins_reference(new_bin_table(), &values);
        assert_same_table(&fast, &reference);
    }

    #[test]
    fn the_histogram_matches_sorting_and_grouping(
        values in prop::collection::vec(
            prop_oneof![
                -10.0f32..10.0,
                any::<f32>(),
                (0u32..1 << 24).prop_map(f32::from_bits),
                Just(0.0f32),
            ],
            0..400,
        ),
    ) {
        let hist = ValueHistogram::of(&values);
        let reference = histogram_reference(&values);
        prop_assert_eq!(hist.bins.len(), reference.len());
        for (i, (b, &(count, mean, spread))) in hist.bins.iter().zip(&reference).enumerate() {
            prop_assert_eq!(b.count, count, "count of bin {}", i);
            prop_assert!(
                (b.mean - mean).abs() <= 1e-12 * mean.abs(),
                "mean of bin {}: {} vs {}", i, b.mean, mean
            );
            prop_assert!(
                (b.spread - spread).abs() <= 1e-9 * spread + 1e-12 * mean * mean,
                "spread of bin {}: {} vs {}", i, b.spread, spread
            );
        }
        prop_assert!(hist.bins.windows(2).all(|w| w[0].mean < w[1].mean));
    }

    #[test]
    fn the_binned_objective_is_exact_and_never_rises(
        seed in any::<u64>(),
        n in 200usize..3000,
        k in 1usize..10,
        init in any_init(),
    ) {
        let values = layer_like(seed, n);
        let hist = ValueHistogram::of(&values);
        prop_assume!(hist.resolves(k));
        let start = initial_centroids_binned(&hist, k, init);
        prop_assert!(start.windows(2).all(|w| w[0] < w[1]), "{:?}", start);
        let km = kmeans_1d_binned(&hist, k, init, 25);
        assert_never_rises(&km.objective)?;
        prop_assert!(km.centroids.windows(2).all(|w| w[0] <= w[1]));
        prop_assert!(km.centroids.iter().all(|c| c.is_finite()));
        // The first entry, from values each placed by its bin's mean.
        let mids = midpoints(&start);
        let direct: f64 = values
            .iter()
            .map(|&x| {
                let key = order_key(x.to_bits()) >> BIN_LOW_BITS;
                let bin = hist.bins.iter().find(|b| {
                    order_key((b.mean as f32).to_bits()) >> BIN_LOW_BITS == key
                });
                let mean = bin.map_or(f64::from(x), |b| b.mean);
                let j = mids.partition_point(|&m| m <= mean);
                (f64::from(x) - f64::from(start[j])).powi(2)
            })
            .sum();
        prop_assert!(
            (km.objective[0] - direct).abs() <= 1e-9 * direct,
            "{} vs {}", km.objective[0], direct
        );
    }

    #[test]
    fn clustering_bins_is_nearly_as_good_as_clustering_values(
        seed in any::<u64>(),
        n in 500usize..4000,
        k in 1usize..12,
        init in any_init(),
    ) {
        let values = layer_like(seed, n);
        let hist = ValueHistogram::of(&values);
        prop_assume!(hist.resolves(k));
        let start = initial_centroids_binned(&hist, k, init);
        // One step from the same start differs only by the few bins
        // that straddle a boundary. Over many steps the paths may part
        // (see the test over many layers). A value moved across a
        // boundary shifts the centroid of a small cluster visibly: linear
        // starts put centroids in the sparse tails, and there one step
        // came out up to 1.23 % worse over 99,000 cases (3,000 layers,
        // every k and start; 0.98 % for density starts, 0.65 % for
        // k-means++) and 1.35 % in the case kept in proptest-regressions,
        // so the bound is 3 %.
        let reference = kmeans_1d_reference(&values, start, 1);
        let binned = kmeans_1d_binned(&hist, k, init, 1);
        let ours = per_value_objective(&values, &binned.centroids);
        let theirs = per_value_objective(&values, &reference.centroids);
        prop_assert!(ours <= theirs * 1.03 + 1e-12, "{} vs {}", ours, theirs);
        // The final assignment, value by value, can only do better than
        // the bins' assignment the objective was measured under.
        let binned = kmeans_1d_binned(&hist, k, init, 20);
        let last = *binned.objective.last().unwrap();
        let ours = per_value_objective(&values, &binned.centroids);
        prop_assert!(ours <= last * (1.0 + 1e-12), "{} vs {}", ours, last);
    }

    #[test]
    fn prefix_sums_give_each_run_what_summing_it_gives(
        values in prop::collection::vec(
            prop_oneof![-10.0f32..10.0, 1000.0f32..1000.1, -1e-3f32..1e-3],
            1..500,
        ),
        k in 1usize..12,
    ) {
        let s = sorted(&values);
        let start = initial_centroids(&s, k, Init::Density);
        let prefix = PrefixSums::new(&s).cluster_stats(&s, &start);
        let summed = cluster_stats(&s, &start);
        for (j, (p, r)) in prefix.iter().zip(&summed).enumerate() {
            prop_assert_eq!(p.count, r.count, "count of cluster {}", j);
            prop_assert!(
                (p.sum - r.sum).abs() <= 1e-12 * r.sum.abs().max(1e-30) + 1e-9 * f64::EPSILON,
                "sum of cluster {}: {} vs {}", j, p.sum, r.sum
            );
            // Summing in f64 loses up to count * eps of the terms' size;
            // the prefix pairs lose far less.
            let scale = s.iter().map(|&x| f64::from(x).powi(2)).fold(0.0, f64::max);
            let tol = 1e-9 * r.sse + 4.0 * r.count as f64 * f64::EPSILON * scale * f64::EPSILON.sqrt();
            prop_assert!(
                (p.sse - r.sse).abs() <= tol,
                "squared deviation of cluster {}: {} vs {}", j, p.sse, r.sse
            );
        }
    }

    #[test]
    fn the_fast_path_matches_the_reference_from_the_same_start(
        values in grid_values(),
        k in 1usize..24,
        init in any_init(),
    ) {
        let s = sorted(&values);
        let start = initial_centroids(&s, k, init);
        let reference = kmeans_1d_reference(&values, start.clone(), 20);
        let fast = lloyd_sorted(&s, start, 20);
        prop_assert_eq!(
            first_mismatch(&fast.centroids, &reference.centroids, within(1e-6)),
            None
        );
        prop_assert_eq!(fast.objective.len(), reference.objective.len());
        for (i, (a, b)) in fast.objective.iter().zip(&reference.objective).enumerate() {
            prop_assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                "objective {} differs: {} vs {}", i, a, b
            );
        }
    }

    #[test]
    fn symbols_index_the_codebook_and_zeros_stay_zero(
        rows in 1usize..5,
        cols in 1usize..40,
        seed in prop::collection::vec((-4.0f32..4.0, 0u8..3), 200),
        clusters in 2usize..40,
        init in any_init(),
        per_channel in any::<bool>(),
    ) {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (v, z) = seed[i % seed.len()];
                if z == 0 { 0.0 } else { v }
            })
            .collect();
        let shape = MatrixShape { rows, cols };
        let c = share(&data, shape, &params(clusters, init, per_channel));
        let Decode::Codebook { entries, values } = &c.decode else {
            panic!("share gives a codebook")
        };
        prop_assert_eq!(c.bits, bits_for_entries(*entries));
        prop_assert!(*entries <= 1 << c.bits);
        prop_assert_eq!(values.len(), c.groups() * entries);
        let decoded = c.decode();
        for (i, (&x, &s)) in data.iter().zip(&c.symbols).enumerate() {
            prop_assert!(usize::from(s) < *entries, "symbol {} at {}", s, i);
            let book_value = values[(i / c.group_len) * entries + usize::from(s)];
            prop_assert_eq!(decoded[i], book_value);
            if x == 0.0 {
                prop_assert_eq!(decoded[i].to_bits(), 0.0f32.to_bits(), "zero moved at {}", i);
            } else {
                let has_zero_entry = data.contains(&0.0);
                prop_assert!(s != 0 || !has_zero_entry, "nonzero took the zero entry at {}", i);
            }
        }
    }
}
