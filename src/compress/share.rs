//! k-means weight sharing (Han et al., "Deep Compression", section 3): the
//! nonzero weights of a tensor, or of each row, are clustered into `k`
//! values, and every weight is stored as the index of its cluster.
//!
//! Weights that are exactly zero were removed by pruning. They are not
//! clustered and never move: when the tensor has any exact zero, codebook
//! entry 0 of every group is 0.0 and the `k` centroids follow at 1..=k.
//!
//! In one dimension Lloyd's algorithm needs no per-element assignment: with
//! the values sorted, cluster `j` is the run of values between the midpoints
//! of centroid `j` and its neighbours, so an iteration is `k` binary searches
//! plus one sum per run. [`kmeans_1d_reference`] is the textbook loop over all
//! centroids per element, kept to check the fast path against.
//!
//! Sorting tens of millions of weights would cost more than everything else,
//! so large groups are clustered over a histogram instead ([`ValueHistogram`]):
//! bins that each span at most 2^-8 of their values' magnitude, with exact
//! count, mean and spread. A bin's squared distance to a centroid `c` is
//! `count * (mean - c)^2` plus its spread, so assigning whole bins to the
//! centroid nearest their mean and moving centroids to weighted means is
//! Lloyd's algorithm on the bins, and its objective, the exact one over the
//! weights, still never rises. Only the final assignment looks at each weight
//! again, and it is exact: nearest of the final centroids.
//!
//! Non-finite weights are not clustered either; they take the nearest end of
//! the codebook (NaN the first centroid), so a damaged tensor still encodes.

use rayon::prelude::*;

use crate::compress::coded::{Coded, Decode, MatrixShape};

/// How the `k` centroids are placed before the first Lloyd iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Evenly spaced between the smallest and largest nonzero weight; keeps
    /// centroids on the rare large weights, which Deep Compression found
    /// matters most for accuracy.
    Linear,
    /// Evenly spaced over the cumulative distribution (quantiles).
    Density,
    /// k-means++ seeding, from a fixed seed so results are reproducible.
    KmeansPlusPlus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareParams {
    /// Number of shared values, 2..=255 (one more entry is reserved for 0.0).
    pub clusters: usize,
    pub init: Init,
    /// Upper bound on Lloyd iterations; the loop stops earlier once no
    /// centroid moves.
    pub iterations: usize,
    /// One codebook per row instead of one for the whole tensor.
    pub per_channel: bool,
}

/// The result of one-dimensional k-means.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// `k` centroids, ascending. Repeated values appear only when the input
    /// has fewer than `k` distinct values.
    pub centroids: Vec<f32>,
    /// Within-cluster sum of squares after the initialization and after every
    /// iteration that moved a centroid (the iteration that moves nothing ends
    /// the loop and adds no entry).
    pub objective: Vec<f64>,
}

/// Below this many values the kernels run on the calling thread: the caller
/// is then usually already parallel over rows.
const PARALLEL_MIN: usize = 1 << 16;

/// Values per unit of work when a run of sorted values is summed. The split
/// depends only on positions, so sums (and thus centroids) are the same
/// whether or not the work runs in parallel.
const SUM_CHUNK: usize = 1 << 14;

/// Elements per unit of work in the final assignment and in the histogram.
const ASSIGN_CHUNK: usize = 1 << 16;

/// Groups at least this long are clustered over a [`ValueHistogram`]; below
/// it sorting a copy is cheaper than clearing the histogram.
const HISTOGRAM_MIN: usize = 1 << 18;

/// Leading bits of the order-preserving key that name a histogram bin: the
/// sign, the 8 exponent bits and the top 8 mantissa bits, so a bin spans at
/// most 2^-8 (0.4%) of its values' magnitude.
const BIN_BITS: u32 = 17;
const BINS: usize = 1 << BIN_BITS;
/// Mantissa bits that vary within a bin.
const BIN_LOW_BITS: u32 = 32 - BIN_BITS;
const BIN_LOW_MASK: u32 = (1 << BIN_LOW_BITS) - 1;

/// Bins per cluster below which a histogram is too coarse to place the
/// centroids well; such groups are sorted instead.
const MIN_BINS_PER_CLUSTER: usize = 16;

/// Seed of the k-means++ generator: fixed so a pipeline gives the same file
/// on every run.
const KMEANS_PP_SEED: u64 = 0x6d6f_6465_6c70_7265;

/// Clusters the nonzero weights of `data` (a `shape.rows` × `shape.cols`
/// matrix, row-major) and returns their codebook form.
///
/// Preconditions (checked by the pipeline spec): `p.clusters` in 2..=255,
/// `data.len() == shape.len()`.
pub fn share(data: &[f32], shape: MatrixShape, p: &ShareParams) -> Coded {
    assert!(
        (2..=255).contains(&p.clusters),
        "share: clusters must be 2..=255, got {}",
        p.clusters
    );
    assert_eq!(data.len(), shape.len(), "share: data does not match shape");
    let group_len = if p.per_channel {
        shape.cols
    } else {
        shape.len()
    }
    .max(1);
    let has_zero = if data.len() >= PARALLEL_MIN {
        data.par_iter().any(|&x| x == 0.0)
    } else {
        data.contains(&0.0)
    };
    let zero_entries = usize::from(has_zero);
    let entries = p.clusters + zero_entries;
    let groups = data.len().div_ceil(group_len);
    let mut symbols = vec![0u8; data.len()];
    let mut values = vec![0.0f32; groups * entries];
    symbols
        .par_chunks_mut(group_len)
        .zip(data.par_chunks(group_len))
        .zip(values.par_chunks_mut(entries))
        .for_each(|((symbols, data), book)| {
            share_group(data, symbols, book, p);
        });
    Coded {
        symbols,
        bits: bits_for_entries(entries),
        group_len,
        decode: Decode::Codebook { entries, values },
    }
}

/// Bits a symbol needs to address `entries` codebook entries (at least 1).
fn bits_for_entries(entries: usize) -> u8 {
    (usize::BITS - entries.saturating_sub(1).leading_zeros()).max(1) as u8
}

/// Clusters one group. `book` is the group's codebook: the zero entry (kept
/// at 0.0, the symbol of exact zeros) when it has `k + 1` entries, then the
/// `k` centroids.
fn share_group(data: &[f32], symbols: &mut [u8], book: &mut [f32], p: &ShareParams) {
    let k = p.clusters;
    let offset = book.len() - k;
    let book = &mut book[offset..];
    let offset = offset as u8;
    let km = cluster_group(data, k, p.init, p.iterations);
    book.copy_from_slice(&km.centroids);
    let mids = midpoints(&km.centroids);
    // Long groups look clusters up by bin; building the table costs about
    // as much as assigning a few hundred thousand values by search.
    let table = (data.len() >= HISTOGRAM_MIN).then(|| bin_clusters(&mids));
    let assign = |s: &mut [u8], d: &[f32]| match &table {
        Some(table) => assign_by_bin(d, s, &mids, table, offset),
        None => assign_by_search(d, s, &mids, offset),
    };
    if data.len() >= PARALLEL_MIN {
        symbols
            .par_chunks_mut(ASSIGN_CHUNK)
            .zip(data.par_chunks(ASSIGN_CHUNK))
            .for_each(|(s, d)| assign(s, d));
    } else {
        assign(symbols, data);
    }
}

/// Symbol `offset + nearest cluster` of each value, 0 for exact zeros.
fn assign_by_search(data: &[f32], symbols: &mut [u8], mids: &[f64], offset: u8) {
    for (s, &x) in symbols.iter_mut().zip(data) {
        let cluster = offset + nearest_cluster(mids, x) as u8;
        // A select, not a branch: pruned zeros are scattered at random, so a
        // branch on them would be mispredicted about as often as taken.
        *s = if x == 0.0 { 0 } else { cluster };
    }
}

/// Marks a bin of [`bin_clusters`] whose values do not all have the same
/// nearest centroid (or are not finite).
const MIXED_BIN: u8 = u8::MAX;

/// The nearest cluster of every value of each histogram bin, or
/// [`MIXED_BIN`] when a midpoint falls inside the bin. Cluster indices are
/// below 255, so the mark is free.
fn bin_clusters(mids: &[f64]) -> Vec<u8> {
    let mut table = vec![MIXED_BIN; BINS];
    // Bins ascend in value, so the clusters of their ends only grow.
    let (mut lowest, mut highest) = (0, 0);
    for (bin, t) in table.iter_mut().enumerate() {
        let first_key = (bin as u32) << BIN_LOW_BITS;
        let low = f32::from_bits(value_bits(first_key));
        let high = f32::from_bits(value_bits(first_key | BIN_LOW_MASK));
        if !low.is_finite() || !high.is_finite() {
            continue;
        }
        let (low, high) = (f64::from(low), f64::from(high));
        while lowest < mids.len() && mids[lowest] <= low {
            lowest += 1;
        }
        while highest < mids.len() && mids[highest] <= high {
            highest += 1;
        }
        if lowest == highest {
            *t = lowest as u8;
        }
    }
    table
}

/// [`assign_by_search`] with the cluster read from the value's bin; only
/// values in mixed bins (a few per midpoint) are searched.
fn assign_by_bin(data: &[f32], symbols: &mut [u8], mids: &[f64], table: &[u8], offset: u8) {
    for (s, &x) in symbols.iter_mut().zip(data) {
        let by_bin = table[(order_key(x.to_bits()) >> BIN_LOW_BITS) as usize];
        let cluster = if by_bin == MIXED_BIN {
            nearest_cluster(mids, x) as u8
        } else {
            by_bin
        };
        *s = if x == 0.0 { 0 } else { offset + cluster };
    }
}

/// k-means over the nonzero finite values of one group: over their
/// histogram when the group is large and the histogram fine enough for `k`,
/// else over a sorted copy. The choice depends only on the data, so results
/// do not depend on threading.
fn cluster_group(data: &[f32], k: usize, init: Init, iterations: usize) -> KMeans {
    if data.len() >= HISTOGRAM_MIN {
        let hist = ValueHistogram::of(data);
        if hist.resolves(k) {
            return kmeans_1d_binned(&hist, k, init, iterations);
        }
    }
    let sorted = sorted_clustered_values(data);
    kmeans_1d(&sorted, k, init, iterations)
}

/// The nonzero finite values of `data`, ascending. Sorted as integer keys
/// ([`order_key`] gives the order of `f32::total_cmp`), which compare
/// faster than floats.
fn sorted_clustered_values(data: &[f32]) -> Vec<f32> {
    let key = |&x: &f32| (x != 0.0 && x.is_finite()).then(|| order_key(x.to_bits()));
    let mut keys: Vec<u32> = if data.len() >= PARALLEL_MIN {
        let mut keys: Vec<u32> = data.par_iter().filter_map(key).collect();
        keys.par_sort_unstable();
        keys
    } else {
        let mut keys: Vec<u32> = data.iter().filter_map(key).collect();
        keys.sort_unstable();
        keys
    };
    keys.iter_mut().for_each(|k| *k = value_bits(*k));
    // Same size and alignment: reuse the allocation for the values.
    keys.into_iter().map(f32::from_bits).collect()
}

/// Decision boundaries between consecutive sorted centroids. In f64 the
/// midpoint of two f32 values is exact, so "left of the midpoint" is exactly
/// "nearer the left centroid".
fn midpoints(centroids: &[f32]) -> Vec<f64> {
    centroids
        .windows(2)
        .map(|w| (f64::from(w[0]) + f64::from(w[1])) * 0.5)
        .collect()
}

/// Index of the nearest centroid given the midpoints; a value exactly on a
/// midpoint goes to the upper centroid. NaN compares false and goes to 0.
#[inline]
fn nearest_cluster(mids: &[f64], x: f32) -> usize {
    let x = f64::from(x);
    mids.partition_point(|&m| m <= x)
}

/// One-dimensional k-means (Lloyd) over `sorted` values.
///
/// Preconditions: `sorted` is ascending (as by `f32::total_cmp`) and finite;
/// `k >= 1`. With at most `k` distinct values the centroids are those values
/// (the last repeated to fill `k`) and no iteration runs; with no values they
/// are all 0.0.
pub fn kmeans_1d(sorted: &[f32], k: usize, init: Init, iterations: usize) -> KMeans {
    assert!(k >= 1, "kmeans_1d: k must be at least 1");
    debug_assert!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "kmeans_1d: values are not sorted"
    );
    if sorted.is_empty() {
        return KMeans {
            centroids: vec![0.0; k],
            objective: vec![0.0],
        };
    }
    if let Some(mut distinct) = distinct_values_up_to(sorted, k) {
        let last = *distinct.last().expect("sorted is not empty");
        distinct.resize(k, last);
        return KMeans {
            centroids: distinct,
            objective: vec![0.0],
        };
    }
    lloyd_sorted(sorted, initial_centroids(sorted, k, init), iterations)
}

/// The `k` starting centroids of [`kmeans_1d`], ascending, and strictly
/// increasing when `sorted` has more than `k` distinct values.
///
/// Preconditions as for [`kmeans_1d`], and `sorted` is not empty.
pub fn initial_centroids(sorted: &[f32], k: usize, init: Init) -> Vec<f32> {
    assert!(
        k >= 1 && !sorted.is_empty(),
        "initial_centroids: empty input"
    );
    if let Some(mut distinct) = distinct_values_up_to(sorted, k) {
        let last = *distinct.last().expect("sorted is not empty");
        distinct.resize(k, last);
        return distinct;
    }
    let n = sorted.len();
    let (lo, hi) = (f64::from(sorted[0]), f64::from(sorted[n - 1]));
    let mut c: Vec<f32> = match init {
        Init::Linear if k == 1 => vec![((lo + hi) * 0.5) as f32],
        Init::Linear => (0..k)
            .map(|i| (lo + (hi - lo) * i as f64 / (k - 1) as f64) as f32)
            .collect(),
        Init::Density => (0..k)
            .map(|i| {
                let q = (i as f64 + 0.5) / k as f64;
                sorted[((q * n as f64) as usize).min(n - 1)]
            })
            .collect(),
        Init::KmeansPlusPlus => kmeans_plus_plus(sorted, k),
    };
    c.sort_unstable_by(f32::total_cmp);
    if c.windows(2).any(|w| w[0] >= w[1]) || c.iter().any(|x| !x.is_finite()) {
        make_strictly_increasing(sorted, &mut c);
    }
    c
}

/// The distinct values of `sorted` if there are at most `k` of them.
/// Jumps from value to value by binary search: O(k log n).
fn distinct_values_up_to(sorted: &[f32], k: usize) -> Option<Vec<f32>> {
    let mut distinct = Vec::with_capacity(k);
    let mut i = 0;
    while i < sorted.len() {
        if distinct.len() == k {
            return None;
        }
        let v = sorted[i];
        distinct.push(v);
        i += sorted[i..].partition_point(|&x| x <= v);
    }
    Some(distinct)
}

/// Smallest value of `sorted` greater than `x`.
fn next_value_above(sorted: &[f32], x: f32) -> Option<f32> {
    sorted.get(sorted.partition_point(|&v| v <= x)).copied()
}

/// Largest value of `sorted` less than `x`.
fn prev_value_below(sorted: &[f32], x: f32) -> Option<f32> {
    sorted
        .partition_point(|&v| v < x)
        .checked_sub(1)
        .map(|i| sorted[i])
}

/// Separates repeated starting centroids (a density init on a tensor where
/// many weights share one value, or a linear init over a tiny range), so no
/// two clusters compete for the same values.
///
/// With `D` the distinct values of `sorted` (more than `k` of them): the
/// forward pass raises each centroid to at least the next data value above
/// its predecessor, which keeps `c[i] >= D[i]`; the backward pass lowers each
/// to at most the data value just below its successor, which keeps
/// `c[i] >= D[i]` (so that value exists) and makes the sequence strictly
/// increasing.
fn make_strictly_increasing(sorted: &[f32], c: &mut [f32]) {
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    c[0] = c[0].clamp(lo, hi);
    for i in 1..c.len() {
        let floor = next_value_above(sorted, c[i - 1]).unwrap_or(f32::INFINITY);
        c[i] = c[i].max(floor);
    }
    let last = c.len() - 1;
    c[last] = c[last].min(hi);
    for i in (0..last).rev() {
        let ceiling = prev_value_below(sorted, c[i + 1])
            .expect("more distinct values than centroids leave room below");
        c[i] = c[i].min(ceiling);
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, and good enough to sample
/// seeds; a fixed seed keeps k-means++ reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        self.below_u64(n as u64) as usize
    }

    fn below_u64(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The stretch of sorted values between two neighbouring chosen centroids
/// (or before the first / after the last), with the squared distance of each
/// value to the nearer of the two, summed per `SUM_CHUNK` values.
struct Gap {
    start: usize,
    end: usize,
    /// Neighbouring centroids; an infinity stands for "none on this side"
    /// and gives an infinite (never the minimum) distance.
    left: f64,
    right: f64,
    chunk_weights: Vec<f64>,
    weight: f64,
}

impl Gap {
    fn new(sorted: &[f32], start: usize, end: usize, left: f64, right: f64) -> Gap {
        let values = &sorted[start..end];
        let sum = |chunk: &[f32]| distance2_sum(chunk, left, right);
        let chunk_weights: Vec<f64> = if values.len() >= PARALLEL_MIN {
            values.par_chunks(SUM_CHUNK).map(sum).collect()
        } else {
            values.chunks(SUM_CHUNK).map(sum).collect()
        };
        let weight = chunk_weights.iter().sum();
        Gap {
            start,
            end,
            left,
            right,
            chunk_weights,
            weight,
        }
    }

    #[inline]
    fn distance2(&self, x: f32) -> f64 {
        distance2(f64::from(x), self.left, self.right)
    }
}

#[inline]
fn distance2(x: f64, left: f64, right: f64) -> f64 {
    let (l, r) = (x - left, x - right);
    (l * l).min(r * r)
}

/// Sum of squared distances to the nearer of `left` and `right`, in four
/// independent lanes so the additions pipeline.
fn distance2_sum(values: &[f32], left: f64, right: f64) -> f64 {
    let mut lanes = [0.0f64; 4];
    let mut quads = values.chunks_exact(4);
    for q in &mut quads {
        for (lane, &x) in lanes.iter_mut().zip(q) {
            *lane += distance2(f64::from(x), left, right);
        }
    }
    let tail: f64 = quads
        .remainder()
        .iter()
        .map(|&x| distance2(f64::from(x), left, right))
        .sum();
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + tail
}

/// k-means++ seeding (Arthur and Vassilvitskii 2007) on sorted values: each
/// new centroid is drawn with probability proportional to its squared
/// distance to the nearest chosen one. In one dimension a new centroid only
/// changes the distances inside the gap it falls in, so each step rescans
/// that gap instead of all values.
///
/// Precondition: `sorted` has more than `k` distinct values. Returns `k`
/// distinct data values (fewer only if rounding leaves no positive weight;
/// the caller repairs that).
fn kmeans_plus_plus(sorted: &[f32], k: usize) -> Vec<f32> {
    let mut rng = SplitMix64(KMEANS_PP_SEED);
    let n = sorted.len();
    let first = sorted[rng.below(n)];
    let split = sorted.partition_point(|&v| v < first);
    let (inf, c) = (f64::INFINITY, f64::from(first));
    let mut gaps = vec![
        Gap::new(sorted, 0, split, -inf, c),
        Gap::new(sorted, split, n, c, inf),
    ];
    let mut chosen = vec![first];
    while chosen.len() < k {
        let total: f64 = gaps.iter().map(|g| g.weight).sum();
        if total <= 0.0 || !total.is_finite() {
            break;
        }
        let Some((g, i)) = sample_by_weight(sorted, &gaps, rng.unit() * total) else {
            break;
        };
        let x = sorted[i];
        let old = gaps.remove(g);
        let split = old.start + sorted[old.start..old.end].partition_point(|&v| v < x);
        let c = f64::from(x);
        gaps.insert(g, Gap::new(sorted, split, old.end, c, old.right));
        gaps.insert(g, Gap::new(sorted, old.start, split, old.left, c));
        chosen.push(x);
    }
    chosen.resize(k, f32::INFINITY);
    chosen
}

/// The gap and the index of the value where the running sum of squared
/// distances first exceeds `target`; falls back to the last value with
/// positive weight when rounding puts `target` past the end.
fn sample_by_weight(sorted: &[f32], gaps: &[Gap], mut target: f64) -> Option<(usize, usize)> {
    let last_positive = gaps.iter().rposition(|g| g.weight > 0.0)?;
    let g = gaps
        .iter()
        .position(|gap| {
            if gap.weight > target {
                true
            } else {
                target -= gap.weight;
                false
            }
        })
        .unwrap_or(last_positive);
    let gap = &gaps[g];
    let mut fallback = None;
    for (c, &w) in gap.chunk_weights.iter().enumerate() {
        if w <= target {
            target -= w;
            continue;
        }
        let start = gap.start + c * SUM_CHUNK;
        let end = (start + SUM_CHUNK).min(gap.end);
        for (i, &x) in sorted[start..end].iter().enumerate() {
            let d = gap.distance2(x);
            if d > 0.0 {
                fallback = Some(start + i);
            }
            if d > target {
                return Some((g, start + i));
            }
            target -= d;
        }
    }
    fallback
        .or_else(|| {
            (gap.start..gap.end)
                .rev()
                .find(|&i| gap.distance2(sorted[i]) > 0.0)
        })
        .map(|i| (g, i))
}

/// Count, sum and squared deviation from the current centroid of one
/// cluster's values.
#[derive(Debug, Clone, Copy, Default)]
struct RunStats {
    count: usize,
    sum: f64,
    sse: f64,
}

impl RunStats {
    /// Four independent lanes per sum so the additions pipeline (the
    /// order is fixed, so the result does not depend on threading).
    fn of(values: &[f32], centroid: f32) -> RunStats {
        let c = f64::from(centroid);
        let (mut sum, mut sse) = ([0.0f64; 4], [0.0f64; 4]);
        let mut quads = values.chunks_exact(4);
        for q in &mut quads {
            for lane in 0..4 {
                let x = f64::from(q[lane]);
                sum[lane] += x;
                sse[lane] += (x - c) * (x - c);
            }
        }
        let (mut tail_sum, mut tail_sse) = (0.0f64, 0.0f64);
        for &x in quads.remainder() {
            let x = f64::from(x);
            tail_sum += x;
            tail_sse += (x - c) * (x - c);
        }
        RunStats {
            count: values.len(),
            sum: (sum[0] + sum[1]) + (sum[2] + sum[3]) + tail_sum,
            sse: (sse[0] + sse[1]) + (sse[2] + sse[3]) + tail_sse,
        }
    }

    fn add(&mut self, other: RunStats) {
        self.count += other.count;
        self.sum += other.sum;
        self.sse += other.sse;
    }
}

/// Where each cluster's run of `sorted` starts, and where the last ends.
fn cluster_bounds(sorted: &[f32], centroids: &[f32]) -> Vec<usize> {
    let mids = midpoints(centroids);
    let mut bounds = Vec::with_capacity(centroids.len() + 1);
    bounds.push(0);
    bounds.extend(
        mids.iter()
            .map(|&m| sorted.partition_point(|&v| f64::from(v) < m)),
    );
    bounds.push(sorted.len());
    bounds
}

/// Statistics of each cluster under nearest-centroid assignment: cluster `j`
/// is the run of sorted values between midpoints `j-1` and `j`.
fn cluster_stats(sorted: &[f32], centroids: &[f32]) -> Vec<RunStats> {
    let bounds = cluster_bounds(sorted, centroids);
    let pieces: Vec<(usize, usize, usize)> = bounds
        .windows(2)
        .enumerate()
        .flat_map(|(j, w)| {
            (w[0]..w[1])
                .step_by(SUM_CHUNK)
                .map(move |s| (j, s, (s + SUM_CHUNK).min(w[1])))
        })
        .collect();
    let piece_stats =
        |&(j, s, e): &(usize, usize, usize)| RunStats::of(&sorted[s..e], centroids[j]);
    let partial: Vec<RunStats> = if sorted.len() >= PARALLEL_MIN {
        pieces.par_iter().map(piece_stats).collect()
    } else {
        pieces.iter().map(piece_stats).collect()
    };
    let mut stats = vec![RunStats::default(); centroids.len()];
    for (&(j, _, _), p) in pieces.iter().zip(partial) {
        stats[j].add(p);
    }
    stats
}

/// Prefix sums of sorted values and of their squares, each an unevaluated
/// pair `hi + lo` (Knuth's two-sum), so that a run's sum (a difference of
/// two prefixes) and its squared deviation `S2 - 2c S1 + n c^2` (which
/// cancels to a small part of its terms) keep full precision. A Lloyd
/// iteration then costs `k` binary searches instead of a pass over the
/// values.
struct PrefixSums {
    sums: Vec<TwoF64>,
    squares: Vec<TwoF64>,
}

/// `hi + lo`, with `lo` far below the last bit of `hi`.
#[derive(Debug, Clone, Copy, Default)]
struct TwoF64 {
    hi: f64,
    lo: f64,
}

/// `a + b` and its rounding error, exactly.
#[inline]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let b_part = s - a;
    (s, (a - (s - b_part)) + (b - b_part))
}

/// `a * b` and its rounding error, exactly.
#[inline]
fn two_product(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

impl TwoF64 {
    #[inline]
    fn plus(self, x: f64) -> TwoF64 {
        let (hi, e) = two_sum(self.hi, x);
        TwoF64 {
            hi,
            lo: self.lo + e,
        }
    }

    fn minus(self, other: TwoF64) -> TwoF64 {
        let (hi, e) = two_sum(self.hi, -other.hi);
        TwoF64 {
            hi,
            lo: e + (self.lo - other.lo),
        }
    }

    fn times(self, c: f64) -> TwoF64 {
        let (hi, e) = two_product(self.hi, c);
        TwoF64 {
            hi,
            lo: e + self.lo * c,
        }
    }

    fn value(self) -> f64 {
        self.hi + self.lo
    }
}

impl PrefixSums {
    fn new(sorted: &[f32]) -> PrefixSums {
        let mut sums = Vec::with_capacity(sorted.len() + 1);
        let mut squares = Vec::with_capacity(sorted.len() + 1);
        let (mut sum, mut square) = (TwoF64::default(), TwoF64::default());
        sums.push(sum);
        squares.push(square);
        for &x in sorted {
            let x = f64::from(x);
            sum = sum.plus(x);
            // Exact: an f32 times an f32 needs at most 48 bits.
            square = square.plus(x * x);
            sums.push(sum);
            squares.push(square);
        }
        PrefixSums { sums, squares }
    }

    /// Count, sum and squared deviation from `centroid` of `sorted[a..b]`.
    fn run(&self, a: usize, b: usize, centroid: f32) -> RunStats {
        let n = (b - a) as f64;
        let c = f64::from(centroid);
        let sum = self.sums[b].minus(self.sums[a]);
        let squares = self.squares[b].minus(self.squares[a]);
        let cross = sum.times(2.0 * c);
        // c * c is exact, as above.
        let (shift, shift_error) = two_product(n, c * c);
        let (h1, e1) = two_sum(squares.hi, -cross.hi);
        let (h2, e2) = two_sum(h1, shift);
        let sse = h2 + (e1 + e2 + (squares.lo - cross.lo) + shift_error);
        RunStats {
            count: b - a,
            sum: sum.value(),
            sse: sse.max(0.0),
        }
    }

    /// [`cluster_stats`] from the prefix sums.
    fn cluster_stats(&self, sorted: &[f32], centroids: &[f32]) -> Vec<RunStats> {
        let bounds = cluster_bounds(sorted, centroids);
        bounds
            .windows(2)
            .zip(centroids)
            .map(|(w, &c)| self.run(w[0], w[1], c))
            .collect()
    }
}

/// Lloyd iterations on sorted values from the given ascending centroids.
/// Groups of fewer than [`PARALLEL_MIN`] values use prefix sums (32 bytes a
/// value); longer ones, whose prefix sums would take too much memory, sum
/// each cluster's run in parallel every iteration.
fn lloyd_sorted(sorted: &[f32], centroids: Vec<f32>, iterations: usize) -> KMeans {
    if sorted.len() < PARALLEL_MIN {
        let prefix = PrefixSums::new(sorted);
        lloyd_sorted_with(centroids, iterations, |c| prefix.cluster_stats(sorted, c))
    } else {
        lloyd_sorted_with(centroids, iterations, |c| cluster_stats(sorted, c))
    }
}

fn lloyd_sorted_with(
    mut centroids: Vec<f32>,
    iterations: usize,
    cluster_stats: impl Fn(&[f32]) -> Vec<RunStats>,
) -> KMeans {
    let mut stats = cluster_stats(&centroids);
    let mut objective = Vec::with_capacity(iterations + 1);
    objective.push(stats.iter().map(|s| s.sse).sum());
    for _ in 0..iterations {
        let next = updated_centroids(&centroids, stats.iter().map(|s| (s.count as u64, s.sum)));
        if next == centroids {
            break;
        }
        centroids = next;
        stats = cluster_stats(&centroids);
        objective.push(stats.iter().map(|s| s.sse).sum());
    }
    KMeans {
        centroids,
        objective,
    }
}

/// Each centroid moves to the mean of its cluster; an empty cluster keeps its
/// centroid. Rounding the mean to f32 cannot raise the objective: the nearest
/// f32 to the mean is no farther from it than the old (f32) centroid.
fn updated_centroids(
    centroids: &[f32],
    count_and_sum: impl Iterator<Item = (u64, f64)>,
) -> Vec<f32> {
    centroids
        .iter()
        .zip(count_and_sum)
        .map(|(&c, (count, sum))| {
            if count == 0 {
                c
            } else {
                (sum / count as f64) as f32
            }
        })
        .collect()
}

/// Count, sum and sum of squares of the values in one histogram bin, kept
/// as integers: the values of a bin share sign and exponent, so each is
/// `(base + low) * 2^e` with `low` its last [`BIN_LOW_BITS`] mantissa bits.
/// Integer sums are exact and do not depend on the order they were added in,
/// so partial histograms from threads merge to the same result every time.
#[derive(Debug, Clone, Copy, Default)]
struct BinSums {
    count: u64,
    low: u64,
    low_squares: u64,
}

/// One slot per bin and a last one that collects the values not clustered.
type BinTable = [BinSums; BINS + 1];

/// Key of `x` whose unsigned order is the order of the values (negative
/// values reversed below the positive ones).
#[inline]
fn order_key(bits: u32) -> u32 {
    bits ^ (((bits as i32 >> 31) as u32) | 0x8000_0000)
}

/// The bits of the value whose [`order_key`] is `key`.
#[inline]
fn value_bits(key: u32) -> u32 {
    if key & 0x8000_0000 != 0 {
        key ^ 0x8000_0000
    } else {
        !key
    }
}

fn new_bin_table() -> Box<BinTable> {
    vec![BinSums::default(); BINS + 1]
        .into_boxed_slice()
        .try_into()
        .expect("the vector has BINS + 1 slots")
}

fn add_to_bins(mut table: Box<BinTable>, values: &[f32]) -> Box<BinTable> {
    for &x in values {
        let bits = x.to_bits();
        // Zeros go to the extra slot without a branch (they are scattered
        // at random). Infinities and NaNs have bins of their own, left out
        // when the table is read.
        let bin = if bits << 1 == 0 {
            BINS
        } else {
            (order_key(bits) >> BIN_LOW_BITS) as usize
        };
        let low = u64::from(bits & BIN_LOW_MASK);
        let slot = &mut table[bin];
        slot.count += 1;
        slot.low += low;
        slot.low_squares += low * low;
    }
    table
}

fn merge_bin_tables(mut a: Box<BinTable>, b: Box<BinTable>) -> Box<BinTable> {
    for (x, y) in a.iter_mut().zip(b.iter()) {
        x.count += y.count;
        x.low += y.low;
        x.low_squares += y.low_squares;
    }
    a
}

/// A non-empty histogram bin.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bin {
    count: u64,
    mean: f64,
    /// Sum of squared deviations of the bin's values from `mean`.
    spread: f64,
}

impl Bin {
    /// The bin of table slot `index`, or `None` for the bins of infinities
    /// and NaNs.
    fn from_sums(index: usize, sums: &BinSums) -> Option<Bin> {
        let leading = value_bits((index as u32) << BIN_LOW_BITS) & !BIN_LOW_MASK;
        let exponent = (leading >> 23) & 0xff;
        if exponent == 0xff {
            return None;
        }
        let hidden_bit = if exponent > 0 { 1u64 << 23 } else { 0 };
        let base = hidden_bit | u64::from(leading & 0x007f_ffff);
        // Subnormals (exponent 0) share the scale of exponent 1.
        let scale = 2f64.powi(exponent.max(1) as i32 - 150);
        let n = sums.count;
        let magnitude = (base as f64 + sums.low as f64 / n as f64) * scale;
        // n * sum(low^2) - sum(low)^2 = n * (squared deviations), exactly.
        let spread = u128::from(n) * u128::from(sums.low_squares)
            - u128::from(sums.low) * u128::from(sums.low);
        Some(Bin {
            count: n,
            mean: if leading >> 31 == 1 {
                -magnitude
            } else {
                magnitude
            },
            spread: spread as f64 / n as f64 * scale * scale,
        })
    }
}

/// The nonzero finite values of a group as narrow bins, ascending, each with
/// exact count, mean and spread (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueHistogram {
    bins: Vec<Bin>,
}

impl ValueHistogram {
    /// Zeros, infinities and NaNs are left out. Parallel for long inputs;
    /// the result does not depend on the split.
    pub fn of(values: &[f32]) -> ValueHistogram {
        let table = if values.len() >= PARALLEL_MIN {
            values
                .par_chunks(ASSIGN_CHUNK)
                .fold(new_bin_table, add_to_bins)
                .reduce_with(merge_bin_tables)
                .unwrap_or_else(new_bin_table)
        } else {
            add_to_bins(new_bin_table(), values)
        };
        let bins = table[..BINS]
            .iter()
            .enumerate()
            .filter(|(_, s)| s.count > 0)
            .filter_map(|(i, s)| Bin::from_sums(i, s))
            .collect();
        ValueHistogram { bins }
    }

    /// Non-empty bins.
    pub fn bins(&self) -> usize {
        self.bins.len()
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.bins.iter().map(|b| b.count).sum()
    }

    /// Whether [`kmeans_1d_binned`] can cluster these values into `k`: there
    /// are at most `k` distinct values, or enough bins to place `k`
    /// centroids finely.
    pub fn resolves(&self, k: usize) -> bool {
        self.distinct_values_up_to(k).is_some()
            || self.bins.len() >= k.saturating_mul(MIN_BINS_PER_CLUSTER)
    }

    /// The distinct values, if there are at most `k`: each bin then holds
    /// one value (no spread), which its mean gives exactly.
    fn distinct_values_up_to(&self, k: usize) -> Option<Vec<f32>> {
        (self.bins.len() <= k && self.bins.iter().all(|b| b.spread == 0.0))
            .then(|| self.bins.iter().map(|b| b.mean as f32).collect())
    }

    /// Index of the bin holding the `rank`-th smallest value (from 0).
    fn bin_of_rank(&self, cumulative: &[u64], rank: u64) -> usize {
        cumulative
            .partition_point(|&c| c <= rank)
            .min(self.bins.len() - 1)
    }
}

/// One-dimensional k-means over a histogram: [`kmeans_1d`] with bins in
/// place of values (see the module doc). `objective` is the exact
/// within-cluster sum of squares of the values under the bins' assignment.
///
/// Precondition: `hist.resolves(k)`, `k >= 1`.
pub fn kmeans_1d_binned(hist: &ValueHistogram, k: usize, init: Init, iterations: usize) -> KMeans {
    assert!(k >= 1, "kmeans_1d_binned: k must be at least 1");
    assert!(
        hist.resolves(k),
        "kmeans_1d_binned: {} bins are too few for {k} clusters",
        hist.bins.len()
    );
    if hist.bins.is_empty() {
        return KMeans {
            centroids: vec![0.0; k],
            objective: vec![0.0],
        };
    }
    if let Some(mut distinct) = hist.distinct_values_up_to(k) {
        let last = *distinct.last().expect("hist is not empty");
        distinct.resize(k, last);
        return KMeans {
            centroids: distinct,
            objective: vec![0.0],
        };
    }
    lloyd_binned(hist, initial_centroids_binned(hist, k, init), iterations)
}

/// The `k` starting centroids of [`kmeans_1d_binned`], ascending and
/// strictly increasing. Each init works as on sorted values, with every bin
/// standing for its count of values at its mean.
///
/// Precondition: `hist.resolves(k)`, `k >= 1`, `hist` not empty.
pub fn initial_centroids_binned(hist: &ValueHistogram, k: usize, init: Init) -> Vec<f32> {
    assert!(
        k >= 1 && !hist.bins.is_empty() && hist.resolves(k),
        "initial_centroids_binned: empty or too coarse histogram"
    );
    if let Some(mut distinct) = hist.distinct_values_up_to(k) {
        let last = *distinct.last().expect("hist is not empty");
        distinct.resize(k, last);
        return distinct;
    }
    let bins = &hist.bins;
    let (lo, hi) = (bins[0].mean, bins[bins.len() - 1].mean);
    let mut c: Vec<f32> = match init {
        Init::Linear if k == 1 => vec![((lo + hi) * 0.5) as f32],
        Init::Linear => (0..k)
            .map(|i| (lo + (hi - lo) * i as f64 / (k - 1) as f64) as f32)
            .collect(),
        Init::Density => {
            let cumulative = cumulative_counts(bins);
            let n = cumulative[cumulative.len() - 1];
            (0..k)
                .map(|i| {
                    let q = (i as f64 + 0.5) / k as f64;
                    let rank = ((q * n as f64) as u64).min(n - 1);
                    bins[hist.bin_of_rank(&cumulative, rank)].mean as f32
                })
                .collect()
        }
        Init::KmeansPlusPlus => kmeans_plus_plus_binned(hist, k),
    };
    c.sort_unstable_by(f32::total_cmp);
    if c.windows(2).any(|w| w[0] >= w[1]) || c.iter().any(|x| !x.is_finite()) {
        // Bins are disjoint intervals, so no three bin means round to one
        // f32: with `MIN_BINS_PER_CLUSTER * k` bins there are more than `k`
        // distinct means to separate the centroids with.
        let means: Vec<f32> = bins.iter().map(|b| b.mean as f32).collect();
        make_strictly_increasing(&means, &mut c);
    }
    c
}

fn cumulative_counts(bins: &[Bin]) -> Vec<u64> {
    bins.iter()
        .scan(0u64, |total, b| {
            *total += b.count;
            Some(*total)
        })
        .collect()
}

/// k-means++ seeding over bins: the first centroid is the mean of the bin
/// of a uniformly drawn value, each next one the mean of a bin drawn with
/// probability proportional to `count * distance^2` to the nearest chosen
/// centroid. Returns `k` values, padded with infinity if rounding leaves no
/// positive weight (the caller repairs that).
fn kmeans_plus_plus_binned(hist: &ValueHistogram, k: usize) -> Vec<f32> {
    let bins = &hist.bins;
    let mut rng = SplitMix64(KMEANS_PP_SEED);
    let cumulative = cumulative_counts(bins);
    let first = hist.bin_of_rank(&cumulative, rng.below_u64(cumulative[bins.len() - 1]));
    let weight = |b: &Bin, c: f64| b.count as f64 * (b.mean - c) * (b.mean - c);
    let c = f64::from(bins[first].mean as f32);
    let mut weights: Vec<f64> = bins.iter().map(|b| weight(b, c)).collect();
    weights[first] = 0.0;
    let mut chosen = vec![bins[first].mean as f32];
    while chosen.len() < k {
        let total: f64 = weights.iter().sum();
        if total <= 0.0 || !total.is_finite() {
            break;
        }
        let mut target = rng.unit() * total;
        let mut picked = None;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                picked = Some(i);
                if w > target {
                    break;
                }
            }
            target -= w;
        }
        let Some(i) = picked else { break };
        let x = bins[i].mean as f32;
        let c = f64::from(x);
        for (w, b) in weights.iter_mut().zip(bins) {
            *w = w.min(weight(b, c));
        }
        weights[i] = 0.0;
        chosen.push(x);
    }
    chosen.resize(k, f32::INFINITY);
    chosen
}

/// Count and sum of each cluster when every bin goes to the centroid nearest
/// its mean, and the bins' squared distances to their centroids.
fn binned_cluster_stats(bins: &[Bin], centroids: &[f32]) -> (Vec<(u64, f64)>, f64) {
    let mids = midpoints(centroids);
    let mut stats = vec![(0u64, 0.0f64); centroids.len()];
    let mut between = 0.0f64;
    let mut j = 0;
    for b in bins {
        // Bins ascend, so the cluster index only grows; a mean on a midpoint
        // goes up, as a value does.
        while j < mids.len() && b.mean >= mids[j] {
            j += 1;
        }
        let c = f64::from(centroids[j]);
        stats[j].0 += b.count;
        stats[j].1 += b.count as f64 * b.mean;
        between += b.count as f64 * (b.mean - c) * (b.mean - c);
    }
    (stats, between)
}

/// Lloyd iterations on the bins from the given ascending centroids.
fn lloyd_binned(hist: &ValueHistogram, mut centroids: Vec<f32>, iterations: usize) -> KMeans {
    // Each bin's spread is the same whatever its centroid.
    let spread: f64 = hist.bins.iter().map(|b| b.spread).sum();
    let (mut stats, between) = binned_cluster_stats(&hist.bins, &centroids);
    let mut objective = Vec::with_capacity(iterations + 1);
    objective.push(spread + between);
    for _ in 0..iterations {
        let next = updated_centroids(&centroids, stats.iter().copied());
        if next == centroids {
            break;
        }
        centroids = next;
        let (s, between) = binned_cluster_stats(&hist.bins, &centroids);
        stats = s;
        objective.push(spread + between);
    }
    KMeans {
        centroids,
        objective,
    }
}

/// Plain Lloyd: every iteration assigns each value to the nearest of all `k`
/// centroids (ties to the later, i.e. upper, centroid, as in the fast path).
/// Same stopping rule and objective as [`kmeans_1d`]; `centroids` are sorted
/// first.
pub fn kmeans_1d_reference(values: &[f32], mut centroids: Vec<f32>, iterations: usize) -> KMeans {
    centroids.sort_unstable_by(f32::total_cmp);
    let k = centroids.len();
    let assign = |centroids: &[f32]| {
        let mut counts = vec![0u64; k];
        let mut sums = vec![0.0f64; k];
        let mut sse = 0.0f64;
        for &x in values {
            let x64 = f64::from(x);
            let mut best = 0;
            let mut best_d = f64::INFINITY;
            for (j, &c) in centroids.iter().enumerate() {
                let d = (x64 - f64::from(c)).powi(2);
                if d <= best_d {
                    best = j;
                    best_d = d;
                }
            }
            counts[best] += 1;
            sums[best] += x64;
            sse += best_d;
        }
        (counts, sums, sse)
    };
    let (mut counts, mut sums, sse) = assign(&centroids);
    let mut objective = vec![sse];
    for _ in 0..iterations {
        let next = updated_centroids(&centroids, counts.iter().copied().zip(sums.iter().copied()));
        if next == centroids {
            break;
        }
        centroids = next;
        let (c, s, sse) = assign(&centroids);
        (counts, sums) = (c, s);
        objective.push(sse);
    }
    KMeans {
        centroids,
        objective,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// The first index where two centroid lists differ by more than `tol`
    /// relative to the data range.
    fn first_difference(a: &[f32], b: &[f32], tol: f64) -> Option<(usize, f32, f32)> {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .enumerate()
            .find(|(_, (x, y))| (f64::from(**x) - f64::from(**y)).abs() > tol)
            .map(|(i, (x, y))| (i, *x, *y))
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
                first_difference(&fast.centroids, &reference.centroids, 1e-4),
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
        assign_by_bin(&data, &mut by_bin, &mids, &table, 1);
        assign_by_search(&data, &mut by_search, &mids, 1);
        let first = by_bin.iter().zip(&by_search).position(|(a, b)| a != b);
        assert_eq!(first, None, "{:?}", first.map(|i| data[i]));
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
            assign_by_bin(&data, &mut by_bin, &mids, &table, 1);
            assign_by_search(&data, &mut by_search, &mids, 1);
            let first = by_bin.iter().zip(&by_search).position(|(a, b)| a != b);
            prop_assert_eq!(first, None);
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
            // (see the test over many layers).
            let reference = kmeans_1d_reference(&values, start, 1);
            let binned = kmeans_1d_binned(&hist, k, init, 1);
            let ours = per_value_objective(&values, &binned.centroids);
            let theirs = per_value_objective(&values, &reference.centroids);
            prop_assert!(ours <= theirs * 1.01 + 1e-12, "{} vs {}", ours, theirs);
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
                first_difference(&fast.centroids, &reference.centroids, 1e-6),
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
}
