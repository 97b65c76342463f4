//! 1-D k-means over a value histogram, for groups too large to sort.

use super::*;

/// Count, sum and sum of squares of the values in one histogram bin, kept
/// as integers: the values of a bin share sign and exponent, so each is
/// `(base + low) * 2^e` with `low` its last [`BIN_LOW_BITS`] mantissa bits.
/// Integer sums are exact and do not depend on the order they were added in,
/// so partial histograms from threads merge to the same result every time.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BinSums {
    pub(super) count: u64,
    pub(super) low: u64,
    pub(super) low_squares: u64,
}

/// One slot per bin and a last one that collects the values not clustered.
pub(super) type BinTable = [BinSums; BINS + 1];

/// Key of `x` whose unsigned order is the order of the values (negative
/// values reversed below the positive ones).
#[inline]
pub(super) fn order_key(bits: u32) -> u32 {
    bits ^ (((bits as i32 >> 31) as u32) | 0x8000_0000)
}

/// The bits of the value whose [`order_key`] is `key`.
#[inline]
pub(super) fn value_bits(key: u32) -> u32 {
    if key & 0x8000_0000 != 0 {
        key ^ 0x8000_0000
    } else {
        !key
    }
}

pub(super) fn new_bin_table() -> Box<BinTable> {
    vec![BinSums::default(); BINS + 1]
        .into_boxed_slice()
        .try_into()
        .expect("the vector has BINS + 1 slots")
}

/// Fewest chunks of `ASSIGN_CHUNK` values counted into one table by
/// [`ValueHistogram::of`].
pub(super) const HISTOGRAM_CHUNKS_PER_TABLE: usize = 16;

/// Values [`add_to_bins`] gathers before adding them to the table.
pub(super) const NONZERO_BATCH: usize = 1024;

/// Adds `values` to the table: zeros are only counted (in the last slot),
/// and the other values are first gathered ([`select_nonzero`]), so the table
/// sees no run of updates to one slot that would wait on each other's
/// stores (pruning leaves many zeros, scattered at random).
pub(super) fn add_to_bins(mut table: Box<BinTable>, values: &[f32]) -> Box<BinTable> {
    const _: () = assert!(NONZERO_BATCH.is_power_of_two());
    let mut batch = [0u32; NONZERO_BATCH];
    for chunk in values.chunks(NONZERO_BATCH) {
        let n = select_nonzero(chunk, &mut batch);
        table[BINS].count += (chunk.len() - n) as u64;
        add_nonzero(&mut table, &batch[..n]);
    }
    table
}

/// Adds values given as bits, none of them ±0, to their bins. Infinities
/// and NaNs have bins of their own, left out when the table is read.
#[inline(always)]
pub(super) fn add_nonzero(table: &mut BinTable, bits: &[u32]) {
    for &bits in bits {
        add_to_bin(table, bits, 1);
    }
}

/// Adds `count` copies of the nonzero value with these bits to its bin.
#[inline(always)]
pub(super) fn add_to_bin(table: &mut BinTable, bits: u32, count: u64) {
    let slot = &mut table[(order_key(bits) >> BIN_LOW_BITS) as usize];
    let low = u64::from(bits & BIN_LOW_MASK);
    slot.count += count;
    slot.low += count * low;
    slot.low_squares += count * (low * low);
}

/// Plain version of [`add_to_bins`]: one slot update per value, zeros in
/// the slot after the bins.
#[cfg(test)]
pub(super) fn add_to_bins_reference(mut table: Box<BinTable>, values: &[f32]) -> Box<BinTable> {
    for &x in values {
        let bits = x.to_bits();
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

/// The table of `values` ([`add_to_bins`]); parallel for long inputs, and
/// the same whatever the split.
pub(super) fn bin_table_of(values: &[f32]) -> Box<BinTable> {
    if values.len() >= PARALLEL_MIN {
        // Each unit of rayon work clears and merges a table of a few MiB:
        // at least a million values each keeps that small beside the
        // counting.
        values
            .par_chunks(ASSIGN_CHUNK)
            .with_min_len(HISTOGRAM_CHUNKS_PER_TABLE)
            .fold(new_bin_table, add_to_bins)
            .reduce_with(merge_bin_tables)
            .unwrap_or_else(new_bin_table)
    } else {
        add_to_bins(new_bin_table(), values)
    }
}

pub(super) fn merge_bin_tables(mut a: Box<BinTable>, b: Box<BinTable>) -> Box<BinTable> {
    for (x, y) in a.iter_mut().zip(b.iter()) {
        x.count += y.count;
        x.low += y.low;
        x.low_squares += y.low_squares;
    }
    a
}

/// A non-empty histogram bin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Bin {
    pub(super) count: u64,
    pub(super) mean: f64,
    /// Sum of squared deviations of the bin's values from `mean`.
    pub(super) spread: f64,
}

impl Bin {
    /// The bin of table slot `index`, or `None` for the bins of infinities
    /// and NaNs.
    pub(super) fn from_sums(index: usize, sums: &BinSums) -> Option<Bin> {
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
    pub(super) bins: Vec<Bin>,
}

impl ValueHistogram {
    /// Zeros, infinities and NaNs are left out. Parallel for long inputs;
    /// the result does not depend on the split.
    pub fn of(values: &[f32]) -> ValueHistogram {
        Self::of_table(&bin_table_of(values))
    }

    /// The histogram of the values counted in `table`.
    pub(super) fn of_table(table: &BinTable) -> ValueHistogram {
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
    pub(super) fn distinct_values_up_to(&self, k: usize) -> Option<Vec<f32>> {
        (self.bins.len() <= k && self.bins.iter().all(|b| b.spread == 0.0))
            .then(|| self.bins.iter().map(|b| b.mean as f32).collect())
    }

    /// Index of the bin holding the `rank`-th smallest value (from 0).
    pub(super) fn bin_of_rank(&self, cumulative: &[u64], rank: u64) -> usize {
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

pub(super) fn cumulative_counts(bins: &[Bin]) -> Vec<u64> {
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
pub(super) fn kmeans_plus_plus_binned(hist: &ValueHistogram, k: usize) -> Vec<f32> {
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
pub(super) fn binned_cluster_stats(bins: &[Bin], centroids: &[f32]) -> (Vec<(u64, f64)>, f64) {
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
pub(super) fn lloyd_binned(
    hist: &ValueHistogram,
    mut centroids: Vec<f32>,
    iterations: usize,
) -> KMeans {
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
