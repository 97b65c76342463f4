//! Importance-weighted k-means weight sharing: the codebook minimizes
//! `Σ imp_j (w_ij − c(w_ij))²` (the diagonal form of the output error)
//! instead of the plain squared error. The layout is `share`'s: exact zeros
//! are not clustered and keep codebook entry 0 (`0.0`) when the tensor has
//! any; each weight takes its nearest centroid (the weight of an element
//! does not change which centroid is nearest).
//!
//! Weighted Lloyd in one dimension: with the (value, weight) pairs sorted by
//! value, a cluster is the run between two midpoints, and its centroid the
//! weighted mean of the run, read from prefix sums. Starting centroids:
//! `linear` as `share`; `density` and `kmeans++` at the quantiles of the
//! importance-weighted distribution.

use rayon::prelude::*;

use crate::compress::coded::{Coded, Decode, MatrixShape};
use crate::compress::share::{initial_centroids, Init, ShareParams};

fn midpoints(c: &[f32]) -> Vec<f64> {
    c.windows(2)
        .map(|w| (f64::from(w[0]) + f64::from(w[1])) * 0.5)
        .collect()
}

#[inline]
fn nearest(mids: &[f64], x: f32) -> usize {
    let x = f64::from(x);
    mids.partition_point(|&m| m <= x)
}

/// The (value, weight) pairs of the nonzero finite weights of a group
/// starting at flat index `start`, sorted by value.
fn pairs(data: &[f32], start: usize, imp: &[f32]) -> Vec<(f32, f32)> {
    let cols = imp.len();
    let mut p: Vec<(f32, f32)> = data
        .iter()
        .enumerate()
        .filter(|(_, x)| **x != 0.0 && x.is_finite())
        .map(|(i, &x)| (x, imp[(start + i) % cols]))
        .collect();
    p.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    p
}

/// Starting centroids: `share`'s linear init (evenly spaced over the
/// range); for `density` and `kmeans++`, the quantiles of the
/// importance-weighted distribution, so the clusters start where the
/// weighted error is (`share`'s own init where those repeat a value).
fn initial(p: &[(f32, f32)], values: &[f32], k: usize, init: Init) -> Vec<f32> {
    let total: f64 = p.iter().map(|x| f64::from(x.1)).sum();
    if init == Init::Linear || total.is_nan() || total <= 0.0 {
        return initial_centroids(values, k, init);
    }
    let mut c = Vec::with_capacity(k);
    let mut acc = 0.0;
    let mut next = 0;
    for &(x, w) in p {
        acc += f64::from(w);
        while next < k && acc >= (next as f64 + 0.5) / k as f64 * total {
            c.push(x);
            next += 1;
        }
    }
    while c.len() < k {
        c.push(p[p.len() - 1].0);
    }
    if c.windows(2).any(|w| w[0] >= w[1]) {
        return initial_centroids(values, k, init);
    }
    c
}

/// Weighted Lloyd from [`initial`]; returns `k` ascending centroids.
fn cluster(p: &[(f32, f32)], k: usize, params: &ShareParams) -> Vec<f32> {
    if p.is_empty() {
        return vec![0.0; k];
    }
    let values: Vec<f32> = p.iter().map(|x| x.0).collect();
    let mut c = initial(p, &values, k, params.init);
    // Prefix sums of weight and weight · value.
    let mut sw = Vec::with_capacity(p.len() + 1);
    let mut swx = Vec::with_capacity(p.len() + 1);
    let (mut a, mut b) = (0.0f64, 0.0f64);
    sw.push(0.0);
    swx.push(0.0);
    for &(x, w) in p {
        a += f64::from(w);
        b += f64::from(w) * f64::from(x);
        sw.push(a);
        swx.push(b);
    }
    for _ in 0..params.iterations {
        let mids = midpoints(&c);
        let mut next = c.clone();
        let mut lo = 0;
        for (j, n) in next.iter_mut().enumerate() {
            let hi = match mids.get(j) {
                Some(&m) => values.partition_point(|&v| f64::from(v) < m),
                None => values.len(),
            };
            let w = sw[hi] - sw[lo];
            if w > 0.0 {
                *n = ((swx[hi] - swx[lo]) / w) as f32;
            }
            lo = hi;
        }
        // Keep ascending order (a zero-weight run keeps a centroid that a
        // neighbour may have passed).
        next.sort_unstable_by(f32::total_cmp);
        if next == c {
            break;
        }
        c = next;
    }
    c
}

fn coded(
    data: &[f32],
    p: &ShareParams,
    books: Vec<Vec<f32>>,
    group_len: usize,
    zero_entry: bool,
) -> Coded {
    let offset = usize::from(zero_entry);
    let entries = p.clusters + offset;
    let mut values = Vec::with_capacity(books.len() * entries);
    for b in &books {
        if zero_entry {
            values.push(0.0);
        }
        values.extend_from_slice(b);
    }
    let mut symbols = vec![0u8; data.len()];
    symbols
        .par_chunks_mut(group_len)
        .zip(data.par_chunks(group_len))
        .zip(books.par_iter())
        .for_each(|((s, d), b)| {
            let mids = midpoints(b);
            for (s, &x) in s.iter_mut().zip(d) {
                *s = if x == 0.0 {
                    0
                } else {
                    (offset + nearest(&mids, x)) as u8
                };
            }
        });
    Coded {
        symbols,
        bits: (usize::BITS - entries.saturating_sub(1).leading_zeros()).max(1) as u8,
        group_len,
        decode: Decode::Codebook { entries, values },
    }
}

fn group_len(shape: MatrixShape, p: &ShareParams) -> usize {
    if p.per_channel {
        shape.cols
    } else {
        shape.len()
    }
    .max(1)
}

/// `share` with the k-means objective weighted by `importance` (one per
/// input column). Preconditions as `share`, and
/// `importance.len() == shape.cols`.
pub fn share_weighted(
    data: &[f32],
    shape: MatrixShape,
    p: &ShareParams,
    importance: &[f32],
) -> Coded {
    assert_eq!(
        data.len(),
        shape.len(),
        "share_weighted: data does not match shape"
    );
    assert_eq!(
        importance.len(),
        shape.cols,
        "share_weighted: one importance per column"
    );
    let gl = group_len(shape, p);
    let zero_entry = data.par_iter().any(|&x| x == 0.0);
    if shape.is_empty() {
        return coded(data, p, Vec::new(), gl, zero_entry);
    }
    let books: Vec<Vec<f32>> = data
        .par_chunks(gl)
        .enumerate()
        .map(|(g, d)| cluster(&pairs(d, g * gl, importance), p.clusters, p))
        .collect();
    coded(data, p, books, gl, zero_entry)
}

/// [`share_weighted`] with textbook Lloyd iterations: every element compared
/// with every centroid, weighted means by plain sums.
pub fn share_weighted_reference(
    data: &[f32],
    shape: MatrixShape,
    p: &ShareParams,
    importance: &[f32],
) -> Coded {
    let gl = group_len(shape, p);
    let zero_entry = data.contains(&0.0);
    let cols = importance.len();
    let mut books = Vec::new();
    for (g, d) in data.chunks(gl).enumerate() {
        let members: Vec<(f32, f32)> = d
            .iter()
            .enumerate()
            .filter(|(_, x)| **x != 0.0 && x.is_finite())
            .map(|(i, &x)| (x, importance[(g * gl + i) % cols]))
            .collect();
        if members.is_empty() {
            books.push(vec![0.0; p.clusters]);
            continue;
        }
        let mut sorted_members = members.clone();
        sorted_members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let sorted: Vec<f32> = sorted_members.iter().map(|m| m.0).collect();
        let mut c = initial(&sorted_members, &sorted, p.clusters, p.init);
        for _ in 0..p.iterations {
            let mut sums = vec![(0.0f64, 0.0f64); c.len()];
            for &(x, w) in &members {
                // Nearest centroid; on a tie the upper one (as the midpoint
                // rule).
                let mut best = 0;
                for j in 1..c.len() {
                    let (dj, db) = (
                        (f64::from(x) - f64::from(c[j])).abs(),
                        (f64::from(x) - f64::from(c[best])).abs(),
                    );
                    if dj <= db {
                        best = j;
                    }
                }
                sums[best].0 += f64::from(w);
                sums[best].1 += f64::from(w) * f64::from(x);
            }
            let mut next: Vec<f32> = c
                .iter()
                .zip(&sums)
                .map(|(&c, &(w, s))| if w > 0.0 { (s / w) as f32 } else { c })
                .collect();
            next.sort_unstable_by(f32::total_cmp);
            if next == c {
                break;
            }
            c = next;
        }
        books.push(c);
    }
    coded(data, p, books, gl, zero_entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn weighted_sse(data: &[f32], c: &Coded, imp: &[f32]) -> f64 {
        let d = c.decode();
        data.iter()
            .zip(&d)
            .enumerate()
            .map(|(i, (&a, &b))| {
                let e = f64::from(a) - f64::from(b);
                f64::from(imp[i % imp.len()]) * e * e
            })
            .sum()
    }

    #[test]
    fn important_columns_get_their_own_centroids() {
        // Two clusters for values at 0.1, 0.2 (important) and 1.0, 1.1
        // (unimportant): the weighted codebook spends a centroid on each of
        // the important values.
        let shape = MatrixShape { rows: 1, cols: 8 };
        let data = [0.1, 0.2, 1.0, 1.1, 0.1, 0.2, 1.0, 1.1];
        let imp = [100.0, 100.0, 0.01, 0.01, 100.0, 100.0, 0.01, 0.01];
        let p = ShareParams {
            clusters: 2,
            init: Init::KmeansPlusPlus,
            iterations: 50,
            per_channel: false,
        };
        let c = share_weighted(&data, shape, &p, &imp);
        let d = c.decode();
        assert!(
            (d[0] - 0.1).abs() < 1e-3 && (d[1] - 0.2).abs() < 1e-3,
            "{d:?}"
        );
        let plain = crate::compress::share::share(&data, shape, &p);
        assert!(weighted_sse(&data, &c, &imp) < weighted_sse(&data, &plain, &imp));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn weighted_k_means_matches_its_reference(
            (rows, cols, data, imp) in (1..4usize, 1..9usize).prop_flat_map(|(rows, cols)| (
                Just(rows), Just(cols),
                prop::collection::vec(prop_oneof![Just(0.0f32), -1.0f32..1.0, (-4i32..4).prop_map(|x| x as f32 * 0.25)], rows * cols),
                prop::collection::vec(0.0f32..4.0, cols),
            )),
            k in 2..6usize, per_channel in any::<bool>(),
        ) {
            let shape = MatrixShape { rows, cols };
            let p = ShareParams { clusters: k, init: Init::Density, iterations: 30, per_channel };
            let fast = share_weighted(&data, shape, &p, &imp);
            let reference = share_weighted_reference(&data, shape, &p, &imp);
            let (Decode::Codebook { values: a, .. }, Decode::Codebook { values: b, .. }) = (&fast.decode, &reference.decode) else { unreachable!() };
            for (x, y) in a.iter().zip(b) {
                prop_assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{:?} vs {:?}", a, b);
            }
            let d = fast.decode();
            for (x, y) in data.iter().zip(&d) {
                if *x == 0.0 { prop_assert_eq!(*y, 0.0); }
            }
        }
    }
}
