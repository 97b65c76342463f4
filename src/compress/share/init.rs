//! Initial centroids over sorted values: linear, density-based, k-means++.

use super::*;

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
pub(super) fn distinct_values_up_to(sorted: &[f32], k: usize) -> Option<Vec<f32>> {
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
pub(super) fn next_value_above(sorted: &[f32], x: f32) -> Option<f32> {
    sorted.get(sorted.partition_point(|&v| v <= x)).copied()
}

/// Largest value of `sorted` less than `x`.
pub(super) fn prev_value_below(sorted: &[f32], x: f32) -> Option<f32> {
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
pub(super) fn make_strictly_increasing(sorted: &[f32], c: &mut [f32]) {
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
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift.
    pub(super) fn below(&mut self, n: usize) -> usize {
        self.below_u64(n as u64) as usize
    }

    pub(super) fn below_u64(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The stretch of sorted values between two neighbouring chosen centroids
/// (or before the first / after the last), with the squared distance of each
/// value to the nearer of the two, summed per `SUM_CHUNK` values.
pub(super) struct Gap {
    pub(super) start: usize,
    pub(super) end: usize,
    /// Neighbouring centroids; an infinity stands for "none on this side"
    /// and gives an infinite (never the minimum) distance.
    pub(super) left: f64,
    pub(super) right: f64,
    pub(super) chunk_weights: Vec<f64>,
    pub(super) weight: f64,
}

impl Gap {
    pub(super) fn new(sorted: &[f32], start: usize, end: usize, left: f64, right: f64) -> Gap {
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
    pub(super) fn distance2(&self, x: f32) -> f64 {
        distance2(f64::from(x), self.left, self.right)
    }
}

#[inline]
pub(super) fn distance2(x: f64, left: f64, right: f64) -> f64 {
    let (l, r) = (x - left, x - right);
    (l * l).min(r * r)
}

/// Sum of squared distances to the nearer of `left` and `right`, in four
/// independent lanes so the additions pipeline.
pub(super) fn distance2_sum(values: &[f32], left: f64, right: f64) -> f64 {
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
pub(super) fn kmeans_plus_plus(sorted: &[f32], k: usize) -> Vec<f32> {
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
pub(super) fn sample_by_weight(
    sorted: &[f32],
    gaps: &[Gap],
    mut target: f64,
) -> Option<(usize, usize)> {
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
