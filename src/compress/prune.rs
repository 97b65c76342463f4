//! Magnitude pruning: per tensor, n:m, and global (one threshold over many
//! tensors, found in two streaming passes).
//!
//! Every magnitude comparison uses the bit pattern of `|w|`
//! (`w.to_bits() & 0x7fff_ffff`): non-negative floats order like their bit
//! patterns, `-0.0` equals `0.0`, and NaN (any payload) ranks above infinity.
//! So a NaN counts as the largest magnitude: it is pruned only when the
//! sparsity asks for more elements than there are non-NaN ones, and n:m
//! pruning always keeps it. Using one total order everywhere is what makes
//! the histogram passes, the selection path and the reference agree exactly.

use rayon::prelude::*;

use crate::compress::coded::MatrixShape;

/// Below this many elements one selection on packed keys beats three
/// parallel passes with 2^16-bin histograms.
const SELECT_MAX: usize = 1 << 15;
/// Elements per parallel task.
const CHUNK: usize = 1 << 16;
/// Bins of the magnitude histograms: one per value of the top 16 bits of
/// the key (first pass) or of its low 16 bits (second pass).
pub(crate) const BINS: usize = 1 << 16;

/// The order of magnitudes: `|w|` as bits (see the module docs).
#[inline]
pub(crate) fn magnitude_key(w: f32) -> u32 {
    w.to_bits() & 0x7fff_ffff
}

/// `round(sparsity * n)`, clamped to `n`.
pub(crate) fn prune_count(sparsity: f64, n: u64) -> u64 {
    debug_assert!(
        (0.0..=1.0).contains(&sparsity),
        "sparsity {sparsity} is outside 0..=1"
    );
    // A NaN sparsity casts to 0: nothing is pruned.
    ((sparsity * n as f64).round() as u64).min(n)
}

/// Zeroes the `round(sparsity * n)` elements of smallest magnitude, ties
/// going to the lower index first, and returns how many were zeroed
/// (elements that were already zero count: they are the smallest).
pub fn prune_magnitude(data: &mut [f32], sparsity: f64) -> usize {
    let k = prune_count(sparsity, data.len() as u64) as usize;
    if k == 0 {
        return 0;
    }
    if data.len() <= SELECT_MAX {
        prune_by_selection(data, k)
    } else {
        prune_by_histogram(data, sparsity)
    }
}

/// Selection on `(|w| bits, index)` packed into one `u64`, so the key order
/// is exactly "smaller magnitude first, then lower index".
fn prune_by_selection(data: &mut [f32], k: usize) -> usize {
    debug_assert!(k >= 1 && k <= data.len() && data.len() <= u32::MAX as usize);
    let mut keys: Vec<u64> = data
        .iter()
        .enumerate()
        .map(|(i, &w)| (u64::from(magnitude_key(w)) << 32) | i as u64)
        .collect();
    keys.select_nth_unstable(k - 1);
    for &key in &keys[..k] {
        data[(key & 0xffff_ffff) as usize] = 0.0;
    }
    k
}

/// The global threshold over a single tensor: parallel, and no memory
/// beyond a few histograms.
fn prune_by_histogram(data: &mut [f32], sparsity: f64) -> usize {
    let mut g = GlobalThreshold::new(sparsity);
    g.pass1(data);
    g.finish_pass1();
    g.pass2(data);
    let cut = g.finish();
    if cut.ties[0] as u64 == cut.equal[0] {
        // Every element equal to the threshold goes (with continuous
        // weights, the usual case: one element holds that magnitude), so
        // no pass needs to find which of them come first.
        return zero_below_key(data, magnitude_key(cut.threshold) + 1);
    }
    prune_below(data, cut.threshold, cut.ties[0])
}

/// Zeroes every element with magnitude key below `limit`; returns how many.
fn zero_below_key(data: &mut [f32], limit: u32) -> usize {
    // A select, not a branch: which weights fall below the threshold is as
    // good as random.
    let below = |chunk: &mut [f32]| {
        let mut zeroed = 0;
        for w in chunk.iter_mut() {
            let prune = magnitude_key(*w) < limit;
            *w = if prune { 0.0 } else { *w };
            zeroed += usize::from(prune);
        }
        zeroed
    };
    data.par_chunks_mut(CHUNK).map(below).sum()
}

/// Plain reference for [`prune_magnitude`]: a full stable sort by magnitude.
pub fn prune_magnitude_reference(data: &mut [f32], sparsity: f64) -> usize {
    let k = prune_count(sparsity, data.len() as u64) as usize;
    let mut order: Vec<usize> = (0..data.len()).collect();
    // `abs` clears the sign bit and `total_cmp` orders positive floats
    // (NaN above infinity) like their bit patterns; the stable sort keeps
    // equal magnitudes in index order.
    order.sort_by(|&a, &b| data[a].abs().total_cmp(&data[b].abs()));
    for &i in &order[..k] {
        data[i] = 0.0;
    }
    k
}

/// Zeroes every element with `|w| < threshold` and the first `ties_to_prune`
/// elements (in index order) with `|w| == threshold`; returns how many were
/// zeroed. Magnitudes compare as bit patterns (see the module docs), so a NaN
/// threshold from [`GlobalThreshold`] selects NaNs the same way.
pub fn prune_below(data: &mut [f32], threshold: f32, ties_to_prune: usize) -> usize {
    let t = magnitude_key(threshold);
    if ties_to_prune == 0 {
        return zero_below_key(data, t);
    }
    // Ties go to the lowest indices, so each chunk needs to know how many
    // ties the chunks before it hold.
    let ties_per_chunk: Vec<usize> = data
        .par_chunks(CHUNK)
        .map(|chunk| chunk.iter().filter(|w| magnitude_key(**w) == t).count())
        .collect();
    let mut remaining = ties_to_prune;
    let quotas: Vec<usize> = ties_per_chunk
        .iter()
        .map(|&ties| {
            let q = ties.min(remaining);
            remaining -= q;
            q
        })
        .collect();
    data.par_chunks_mut(CHUNK)
        .zip(quotas.par_iter())
        .map(|(chunk, &quota)| {
            if quota == 0 {
                return zero_below_key(chunk, t);
            }
            let mut left = quota;
            let mut zeroed = 0;
            for w in chunk.iter_mut() {
                let key = magnitude_key(*w);
                if key < t || (key == t && left > 0) {
                    if key == t {
                        left -= 1;
                    }
                    *w = 0.0;
                    zeroed += 1;
                }
            }
            zeroed
        })
        .sum()
}

/// In every run of `m` consecutive elements along the input dimension, keeps
/// the `n` of largest magnitude (ties: the lower index is kept) and zeroes
/// the rest.
///
/// Preconditions (checked when the pipeline is validated): `m > 0`,
/// `m` divides `shape.cols`, `data.len() == shape.len()`.
pub fn prune_n_m(data: &mut [f32], shape: MatrixShape, n: usize, m: usize) {
    check_n_m(data, shape, m);
    if n >= m {
        return;
    }
    // `m` divides the columns, so runs over the flat buffer never cross a row.
    let runs_per_task = (CHUNK / m).max(1);
    data.par_chunks_mut(m * runs_per_task).for_each(|chunk| {
        let mut order: Vec<u64> = Vec::with_capacity(m);
        for run in chunk.chunks_exact_mut(m) {
            order.clear();
            // Larger magnitude first, then lower index (stored inverted).
            order.extend(run.iter().enumerate().map(|(i, &w)| {
                (u64::from(magnitude_key(w)) << 32) | u64::from(u32::MAX - i as u32)
            }));
            order.select_nth_unstable_by(n, |a, b| b.cmp(a));
            for &key in &order[n..] {
                run[(u32::MAX - (key & 0xffff_ffff) as u32) as usize] = 0.0;
            }
        }
    });
}

/// Plain reference for [`prune_n_m`]: an element is pruned when at least `n`
/// elements of its run beat it.
pub fn prune_n_m_reference(data: &mut [f32], shape: MatrixShape, n: usize, m: usize) {
    check_n_m(data, shape, m);
    for run in data.chunks_exact_mut(m) {
        let keys: Vec<u32> = run.iter().map(|&w| magnitude_key(w)).collect();
        for (j, w) in run.iter_mut().enumerate() {
            let beaten_by = (0..m)
                .filter(|&i| keys[i] > keys[j] || (keys[i] == keys[j] && i < j))
                .count();
            if beaten_by >= n {
                *w = 0.0;
            }
        }
    }
}

fn check_n_m(data: &[f32], shape: MatrixShape, m: usize) {
    assert!(
        m > 0 && shape.cols.is_multiple_of(m),
        "n:m pruning needs m ({m}) to divide the columns ({})",
        shape.cols
    );
    assert!(m <= u32::MAX as usize, "m ({m}) is too large");
    assert_eq!(data.len(), shape.len(), "data length does not match shape");
}

/// The result of a [`GlobalThreshold`]: prune `|w| < threshold` everywhere,
/// plus `ties[i]` elements with `|w| == threshold` in tensor `i` (the first
/// ones in index order), via [`prune_below`].
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalCut {
    pub threshold: f32,
    /// One entry per tensor, in the order the tensors were streamed.
    pub ties: Vec<usize>,
    /// Elements pruned over all tensors: `round(sparsity * total)`.
    pub pruned: u64,
    /// Per tensor, in streaming order: its elements whose magnitude equals
    /// the threshold's (its entry of `ties` is at most this).
    pub equal: Vec<u64>,
}

/// Global magnitude pruning: one threshold across many tensors, computed
/// with bounded memory while the tensors are streamed one at a time.
///
/// Pruning the tensors with the result is exactly the same as concatenating
/// them in streaming order and calling [`prune_magnitude`] on the whole:
/// `round(sparsity * total)` elements go, smallest magnitude first, ties in
/// tensor order and then index order.
///
/// Use:
/// 1. [`pass1`](Self::pass1) on every tensor, then
///    [`finish_pass1`](Self::finish_pass1): a 2^16-bin histogram of the top
///    16 bits of `|w|` finds the bin that holds the threshold;
/// 2. [`pass2`](Self::pass2) on the same tensors with the same values, in
///    the same order: a histogram of the low 16 bits of the values inside
///    that bin pins the threshold down to one exact value;
/// 3. [`finish`](Self::finish) gives the threshold and each tensor's share
///    of the ties.
///
/// Memory: two 2^16-entry histograms, plus per tensor one entry for each
/// distinct low-16-bit pattern it holds inside the selected bin (at most
/// 2^16, and usually far fewer).
#[derive(Debug, Clone)]
pub struct GlobalThreshold {
    sparsity: f64,
    total: u64,
    tensors_pass1: usize,
    high: Vec<u64>,
    target: Option<Target>,
    pass1_done: bool,
    low: Vec<u64>,
    scratch: Vec<u64>,
    /// Per tensor: sorted `(low bits, count)` of its elements in the bin.
    in_bin: Vec<Vec<(u16, u64)>>,
}

/// The bin that holds the threshold, and how many of its elements to prune.
#[derive(Debug, Clone, Copy)]
struct Target {
    high: u32,
    need: u64,
}

impl GlobalThreshold {
    /// `sparsity` is the fraction of all streamed elements to prune (0..=1).
    pub fn new(sparsity: f64) -> Self {
        Self {
            sparsity,
            total: 0,
            tensors_pass1: 0,
            high: vec![0; BINS],
            target: None,
            pass1_done: false,
            low: Vec::new(),
            scratch: Vec::new(),
            in_bin: Vec::new(),
        }
    }

    /// Adds one tensor's values to the first pass.
    pub fn pass1(&mut self, values: &[f32]) {
        assert!(!self.pass1_done, "pass1 after finish_pass1");
        self.total += values.len() as u64;
        self.tensors_pass1 += 1;
        add_histogram(&mut self.high, values, |key| Some((key >> 16) as usize));
    }

    /// Ends the first pass: picks the bin that holds the threshold.
    pub fn finish_pass1(&mut self) {
        assert!(!self.pass1_done, "finish_pass1 called twice");
        self.pass1_done = true;
        let k = prune_count(self.sparsity, self.total);
        let high = std::mem::take(&mut self.high);
        if k == 0 {
            return;
        }
        self.target = bin_of_rank(&high, k).map(|(high, need)| Target { high, need });
        self.low = vec![0; BINS];
        self.scratch = vec![0; BINS];
    }

    /// Adds one tensor's values to the second pass; tensors must come in the
    /// order, and with the values, they had in the first pass.
    pub fn pass2(&mut self, values: &[f32]) {
        assert!(self.pass1_done, "pass2 before finish_pass1");
        let Some(target) = self.target else {
            self.in_bin.push(Vec::new());
            return;
        };
        add_histogram(&mut self.scratch, values, |key| {
            (key >> 16 == target.high).then_some((key & 0xffff) as usize)
        });
        let mut mine = Vec::new();
        for (low, count) in self.scratch.iter_mut().enumerate() {
            if *count > 0 {
                mine.push((low as u16, *count));
                self.low[low] += *count;
                *count = 0;
            }
        }
        self.in_bin.push(mine);
    }

    /// The threshold and each tensor's share of the ties.
    pub fn finish(self) -> GlobalCut {
        assert_eq!(
            self.in_bin.len(),
            self.tensors_pass1,
            "pass2 must see the tensors pass1 saw"
        );
        let Some(target) = self.target else {
            return GlobalCut {
                threshold: 0.0,
                ties: vec![0; self.tensors_pass1],
                pruned: 0,
                equal: vec![0; self.tensors_pass1],
            };
        };
        let (low, mut remaining) = bin_of_rank(&self.low, target.need)
            .expect("the second pass saw the elements the first pass counted in the bin");
        let equal: Vec<u64> = self
            .in_bin
            .iter()
            .map(|mine| {
                mine.binary_search_by_key(&(low as u16), |&(l, _)| l)
                    .map_or(0, |i| mine[i].1)
            })
            .collect();
        let ties = equal
            .iter()
            .map(|&equal| {
                let q = equal.min(remaining);
                remaining -= q;
                q as usize
            })
            .collect();
        GlobalCut {
            threshold: f32::from_bits((target.high << 16) | low),
            ties,
            pruned: prune_count(self.sparsity, self.total),
            equal,
        }
    }
}

/// The bin of a histogram that holds the `k`-th smallest element (from 1),
/// and how many of that bin's elements are among the `k` smallest; None
/// when `k` is 0 or the histogram holds fewer than `k`.
pub(crate) fn bin_of_rank(hist: &[u64], k: u64) -> Option<(u32, u64)> {
    if k == 0 {
        return None;
    }
    let mut below = 0u64;
    for (bin, &count) in hist.iter().enumerate() {
        if below + count >= k {
            return Some((bin as u32, k - below));
        }
        below += count;
    }
    None
}

/// Adds the counts of `bin(key)` over `values` to `hist`; parallel for large
/// inputs (one histogram per rayon split, merged at the end).
pub(crate) fn add_histogram(
    hist: &mut [u64],
    values: &[f32],
    bin: impl Fn(u32) -> Option<usize> + Sync,
) {
    if values.len() <= CHUNK {
        for &w in values {
            if let Some(b) = bin(magnitude_key(w)) {
                hist[b] += 1;
            }
        }
        return;
    }
    // Each unit of rayon work clears and merges a 512 KiB histogram: at
    // least half a million values each keeps that small beside the counting.
    let merged = values
        .par_chunks(CHUNK)
        .with_min_len(8)
        .fold(
            || vec![0u64; BINS],
            |mut h, chunk| {
                for &w in chunk {
                    if let Some(b) = bin(magnitude_key(w)) {
                        h[b] += 1;
                    }
                }
                h
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        });
    if let Some(merged) = merged {
        hist.iter_mut().zip(&merged).for_each(|(x, y)| *x += y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::assert_same_bits;
    use proptest::prelude::*;

    fn global_cut(tensors: &[Vec<f32>], sparsity: f64) -> GlobalCut {
        let mut g = GlobalThreshold::new(sparsity);
        tensors.iter().for_each(|t| g.pass1(t));
        g.finish_pass1();
        tensors.iter().for_each(|t| g.pass2(t));
        g.finish()
    }

    #[test]
    fn the_smallest_magnitudes_go_first_and_ties_take_the_lower_index() {
        let mut v = [3.0, -1.0, 2.0, 0.0, -5.0, 1.0];
        assert_eq!(prune_magnitude(&mut v, 0.5), 3);
        assert_eq!(v, [3.0, 0.0, 2.0, 0.0, -5.0, 0.0]);

        let mut v = [1.0, -1.0, 1.0, 1.0];
        assert_eq!(prune_magnitude(&mut v, 0.5), 2);
        assert_eq!(v, [0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn the_count_is_rounded_to_nearest() {
        let mut v = [1.0f32; 10];
        assert_eq!(prune_magnitude(&mut v, 0.26), 3);
        assert_eq!(prune_magnitude(&mut [1.0f32; 10], 0.0), 0);
        assert_eq!(prune_magnitude(&mut [1.0f32; 10], 1.0), 10);
        assert_eq!(prune_magnitude(&mut [], 0.5), 0);
    }

    #[test]
    fn nan_counts_as_the_largest_magnitude() {
        let mut v = [f32::NAN, 1.0, -2.0, f32::INFINITY];
        assert_eq!(prune_magnitude(&mut v, 0.75), 3);
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], &[0.0, 0.0, 0.0]);

        let mut v = [f32::NAN, 1.0, 2.0, 3.0];
        prune_n_m(&mut v, MatrixShape { rows: 1, cols: 4 }, 2, 4);
        assert!(v[0].is_nan());
        assert_eq!(&v[1..], &[0.0, 0.0, 3.0]);
    }

    #[test]
    fn two_of_four_keeps_the_two_largest_and_the_lower_index_on_ties() {
        let mut v = [1.0, -4.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0];
        prune_n_m(&mut v, MatrixShape { rows: 2, cols: 4 }, 2, 4);
        assert_eq!(v, [0.0, -4.0, 3.0, 0.0, 5.0, 5.0, 0.0, 0.0]);
    }

    #[test]
    fn prune_below_takes_ties_from_the_lowest_indices() {
        let mut v = [0.5, 2.0, -0.5, 1.0, 0.5, 3.0];
        assert_eq!(prune_below(&mut v, 0.5, 2), 2);
        assert_eq!(v, [0.0, 2.0, 0.0, 1.0, 0.5, 3.0]);
        let mut v = [0.1, 2.0, 1.0];
        assert_eq!(prune_below(&mut v, 1.0, 0), 1);
        assert_eq!(v, [0.0, 2.0, 1.0]);
    }

    #[test]
    fn ties_that_cross_parallel_chunks_go_to_the_lowest_indices() {
        let n = 3 * CHUNK + 17;
        let mut v = vec![1.0f32; n];
        let want_pruned = CHUNK + 5;
        assert_eq!(prune_below(&mut v, 1.0, want_pruned), want_pruned);
        assert!(v[..want_pruned].iter().all(|&w| w == 0.0));
        assert!(v[want_pruned..].iter().all(|&w| w == 1.0));
    }

    #[test]
    fn a_global_cut_splits_ties_in_tensor_order() {
        // Six elements of magnitude 1 across two tensors, four to prune
        // (round(0.5 * 8)): one zero, then three ties.
        let tensors = vec![vec![1.0, 0.0, -1.0], vec![2.0, 1.0, 1.0, 1.0, 3.0]];
        let cut = global_cut(&tensors, 0.5);
        assert_eq!(cut.threshold, 1.0);
        assert_eq!(cut.ties, vec![2, 1]);
        assert_eq!(cut.pruned, 4);
    }

    #[test]
    fn a_global_cut_of_nothing_prunes_nothing() {
        let tensors = vec![vec![0.0, 1.0], vec![2.0]];
        let cut = global_cut(&tensors, 0.0);
        assert_eq!(cut.ties, vec![0, 0]);
        let mut t = tensors[0].clone();
        assert_eq!(prune_below(&mut t, cut.threshold, 0), 0);
    }

    #[test]
    fn the_histogram_path_resolves_values_that_share_their_top_bits() {
        // Consecutive floats just above 1.0 share the top 16 bits, so only the
        // second pass tells them apart.
        let mut v: Vec<f32> = (0..5000u32)
            .map(|i| f32::from_bits(1.0f32.to_bits() + (i * 7919) % 5000))
            .collect();
        let mut want = v.clone();
        prune_magnitude_reference(&mut want, 0.37);
        assert_eq!(prune_by_histogram(&mut v, 0.37), 1850);
        assert_same_bits(&v, &want);
    }

    #[test]
    fn a_large_tensor_takes_the_parallel_path_and_matches_the_reference() {
        let n = SELECT_MAX * 3 + 11;
        let mut v: Vec<f32> = (0..n)
            .map(|i| ((i * 2654435761) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let mut want = v.clone();
        let k = prune_magnitude_reference(&mut want, 0.61);
        assert_eq!(prune_magnitude(&mut v, 0.61), k);
        assert_same_bits(&v, &want);
    }

    #[test]
    fn a_large_tensor_of_distinct_magnitudes_prunes_all_its_ties_like_the_reference() {
        let n = SELECT_MAX * 3 + 5;
        for sparsity in [0.0, 0.4, 0.5, 0.999, 1.0] {
            let mut v: Vec<f32> = (0..n)
                .map(|i| ((i * 2654435761) % n) as f32 * if i % 3 == 0 { -1e-3 } else { 1e-3 })
                .collect();
            let mut want = v.clone();
            let k = prune_magnitude_reference(&mut want, sparsity);
            assert_eq!(prune_magnitude(&mut v, sparsity), k);
            assert_same_bits(&v, &want);
        }
    }

    #[test]
    fn zeroing_below_a_key_matches_pruning_every_tie() {
        let v: Vec<f32> = (0..SELECT_MAX * 2 + 3)
            .map(|i| ((i * 7919) % 300) as f32 - 150.0)
            .collect();
        for threshold in [0.0f32, 1.0, 42.0, 150.0, f32::INFINITY, f32::NAN] {
            let t = magnitude_key(threshold);
            let equal = v.iter().filter(|w| magnitude_key(**w) == t).count();
            let (mut a, mut b) = (v.clone(), v.clone());
            let zeroed = zero_below_key(&mut a, t + 1);
            assert_eq!(zeroed, prune_below(&mut b, threshold, equal));
            assert_same_bits(&a, &b);
        }
    }

    fn weight() -> impl Strategy<Value = f32> {
        prop_oneof![
            // Few distinct values: many ties, including ±0.
            4 => (-3i8..=3).prop_map(|q| f32::from(q) * 0.25),
            4 => -10.0f32..10.0,
            1 => Just(f32::NAN),
            1 => Just(f32::NEG_INFINITY),
            1 => (0u32..64).prop_map(|i| f32::from_bits(0x3f80_0000 + i)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn magnitude_pruning_prunes_the_exact_count_like_the_reference(
            v in prop::collection::vec(weight(), 0..300),
            sparsity in 0.0f64..=1.0,
        ) {
            let k = (sparsity * v.len() as f64).round() as usize;
            let mut want = v.clone();
            prop_assert_eq!(prune_magnitude_reference(&mut want, sparsity), k);
            let mut got = v.clone();
            prop_assert_eq!(prune_magnitude(&mut got, sparsity), k);
            assert_same_bits(&got, &want);
            if k > 0 {
                let mut hist = v.clone();
                prop_assert_eq!(prune_by_histogram(&mut hist, sparsity), k);
                assert_same_bits(&hist, &want);
            }
        }

        #[test]
        fn n_m_pruning_keeps_at_most_n_of_the_largest_in_every_run(
            (rows, runs, m) in (1usize..5, 1usize..5, 1usize..9),
            n_frac in 0.0f64..=1.0,
            seed in prop::collection::vec(weight(), 64 * 9),
        ) {
            let n = (n_frac * m as f64) as usize;
            let shape = MatrixShape { rows, cols: runs * m };
            let v: Vec<f32> = seed[..shape.len()].to_vec();
            let mut got = v.clone();
            prune_n_m(&mut got, shape, n, m);
            let mut want = v.clone();
            prune_n_m_reference(&mut want, shape, n, m);
            assert_same_bits(&got, &want);
            for (run, orig) in got.chunks(m).zip(v.chunks(m)) {
                let kept: Vec<usize> = (0..m).filter(|&i| run[i] != 0.0).collect();
                prop_assert!(kept.len() <= n);
                let min_kept = kept.iter().map(|&i| magnitude_key(orig[i])).min();
                for i in (0..m).filter(|&i| run[i] == 0.0 && orig[i] != 0.0) {
                    prop_assert!(min_kept.is_none_or(|k| magnitude_key(orig[i]) <= k));
                }
            }
        }

        #[test]
        fn a_global_cut_equals_pruning_the_concatenation(
            tensors in prop::collection::vec(prop::collection::vec(weight(), 0..80), 1..6),
            sparsity in 0.0f64..=1.0,
        ) {
            let mut whole: Vec<f32> = tensors.concat();
            let k = prune_magnitude_reference(&mut whole, sparsity);
            let cut = global_cut(&tensors, sparsity);
            prop_assert_eq!(cut.pruned, k as u64);
            prop_assert_eq!(cut.ties.len(), tensors.len());
            let t = magnitude_key(cut.threshold);
            for ((tensor, &equal), &ties) in tensors.iter().zip(&cut.equal).zip(&cut.ties) {
                let count = tensor.iter().filter(|w| magnitude_key(**w) == t).count() as u64;
                prop_assert_eq!(equal, if k > 0 { count } else { 0 });
                prop_assert!(ties as u64 <= equal);
            }
            let mut pruned = 0;
            let mut got = Vec::new();
            for (t, &ties) in tensors.iter().zip(&cut.ties) {
                let mut t = t.clone();
                pruned += prune_below(&mut t, cut.threshold, ties);
                got.extend(t);
            }
            prop_assert_eq!(pruned, k);
            assert_same_bits(&got, &whole);
        }
    }
}
