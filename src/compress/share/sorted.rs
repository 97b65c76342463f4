//! Exact 1-D k-means over sorted values (Lloyd's iterations on prefix sums),
//! and the plain reference it is tested against.

use super::*;

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

/// Count, sum and squared deviation from the current centroid of one
/// cluster's values.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RunStats {
    pub(super) count: usize,
    pub(super) sum: f64,
    pub(super) sse: f64,
}

impl RunStats {
    /// Four independent lanes per sum so the additions pipeline (the
    /// order is fixed, so the result does not depend on threading).
    pub(super) fn of(values: &[f32], centroid: f32) -> RunStats {
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

    pub(super) fn add(&mut self, other: RunStats) {
        self.count += other.count;
        self.sum += other.sum;
        self.sse += other.sse;
    }
}

/// Where each cluster's run of `sorted` starts, and where the last ends.
pub(super) fn cluster_bounds(sorted: &[f32], centroids: &[f32]) -> Vec<usize> {
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
pub(super) fn cluster_stats(sorted: &[f32], centroids: &[f32]) -> Vec<RunStats> {
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
pub(super) struct PrefixSums {
    pub(super) sums: Vec<TwoF64>,
    pub(super) squares: Vec<TwoF64>,
}

/// `hi + lo`, with `lo` far below the last bit of `hi`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TwoF64 {
    pub(super) hi: f64,
    pub(super) lo: f64,
}

/// `a + b` and its rounding error, exactly.
#[inline]
pub(super) fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let b_part = s - a;
    (s, (a - (s - b_part)) + (b - b_part))
}

/// `a * b` and its rounding error, exactly.
#[inline]
pub(super) fn two_product(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

impl TwoF64 {
    #[inline]
    pub(super) fn plus(self, x: f64) -> TwoF64 {
        let (hi, e) = two_sum(self.hi, x);
        TwoF64 {
            hi,
            lo: self.lo + e,
        }
    }

    pub(super) fn minus(self, other: TwoF64) -> TwoF64 {
        let (hi, e) = two_sum(self.hi, -other.hi);
        TwoF64 {
            hi,
            lo: e + (self.lo - other.lo),
        }
    }

    pub(super) fn times(self, c: f64) -> TwoF64 {
        let (hi, e) = two_product(self.hi, c);
        TwoF64 {
            hi,
            lo: e + self.lo * c,
        }
    }

    pub(super) fn value(self) -> f64 {
        self.hi + self.lo
    }
}

impl PrefixSums {
    pub(super) fn new(sorted: &[f32]) -> PrefixSums {
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
    pub(super) fn run(&self, a: usize, b: usize, centroid: f32) -> RunStats {
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
    pub(super) fn cluster_stats(&self, sorted: &[f32], centroids: &[f32]) -> Vec<RunStats> {
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
pub(super) fn lloyd_sorted(sorted: &[f32], centroids: Vec<f32>, iterations: usize) -> KMeans {
    if sorted.len() < PARALLEL_MIN {
        let prefix = PrefixSums::new(sorted);
        lloyd_sorted_with(centroids, iterations, |c| prefix.cluster_stats(sorted, c))
    } else {
        lloyd_sorted_with(centroids, iterations, |c| cluster_stats(sorted, c))
    }
}

pub(super) fn lloyd_sorted_with(
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
pub(super) fn updated_centroids(
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
