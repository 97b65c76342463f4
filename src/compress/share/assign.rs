//! Assigning each value to its nearest centroid: for few clusters, a count
//! of the boundaries at or below it (vector compares); else a table over
//! histogram bins that settles most values without a search, or binary
//! search.

use super::*;

/// Symbol `offset + nearest cluster` of each value, 0 for those whose
/// magnitude key is below `zero_below` (see [`assign_by_bin`]).
pub(super) fn assign_by_search(
    data: &[f32],
    symbols: &mut [u8],
    mids: &[f64],
    offset: u8,
    zero_below: u32,
) {
    for (s, &x) in symbols.iter_mut().zip(data) {
        let cluster = offset + nearest_cluster(mids, x) as u8;
        // A select, not a branch: pruned zeros are scattered at random, so a
        // branch on them would be mispredicted about as often as taken.
        let zero = x.to_bits() & 0x7fff_ffff < zero_below;
        *s = if zero { 0 } else { cluster };
    }
}

/// Marks a bin of [`bin_clusters`] whose values do not all have the same
/// nearest centroid (or are not finite).
pub(super) const MIXED_BIN: u8 = u8::MAX;

/// The nearest cluster of every value of each histogram bin, or
/// [`MIXED_BIN`] when a midpoint falls inside the bin, indexed by the top
/// [`BIN_BITS`] bits of the value itself (not of its order key, which names
/// the same bin), so a lookup needs no key. Cluster indices are below 255,
/// so the mark is free.
pub(super) fn bin_clusters(mids: &[f64]) -> Vec<u8> {
    let by_key = bin_clusters_by_key(mids);
    (0..BINS as u32)
        .map(|raw| by_key[(order_key(raw << BIN_LOW_BITS) >> BIN_LOW_BITS) as usize])
        .collect()
}

/// [`bin_clusters`] indexed by bin, in ascending order of value.
pub(super) fn bin_clusters_by_key(mids: &[f64]) -> Vec<u8> {
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
/// values in mixed bins (a few per midpoint) are searched. Values whose
/// magnitude key (`|x|` as bits) is below `zero_below` get symbol 0: with
/// 1, exactly the zeros; with a pruning threshold's key, also the values
/// that pruning zeroes, as if it had run first.
pub(super) fn assign_by_bin(
    data: &[f32],
    symbols: &mut [u8],
    mids: &[f64],
    table: &[u8],
    offset: u8,
    zero_below: u32,
) {
    for (s, &x) in symbols.iter_mut().zip(data) {
        let by_bin = table[(x.to_bits() >> BIN_LOW_BITS) as usize];
        let cluster = if by_bin == MIXED_BIN {
            nearest_cluster(mids, x) as u8
        } else {
            by_bin
        };
        let zero = x.to_bits() & 0x7fff_ffff < zero_below;
        *s = if zero { 0 } else { offset + cluster };
    }
}

/// How the values of one group find their cluster.
pub(super) enum Assign {
    /// Few clusters: compare with every boundary.
    Compare(Vec<f32>),
    /// Many clusters, long group: a table by histogram bin.
    Table { mids: Vec<f64>, table: Vec<u8> },
    /// Many clusters, short group: binary search.
    Search(Vec<f64>),
}

impl Assign {
    /// The fastest way for these centroids (ascending) and a group of
    /// `len` values. Building a table costs about as much as assigning a
    /// few hundred thousand values by search.
    pub(super) fn new(centroids: &[f32], len: usize) -> Self {
        let mids = midpoints(centroids);
        if centroids.len() <= MAX_COMPARED_CLUSTERS {
            Assign::Compare(f32_thresholds(&mids))
        } else if len >= HISTOGRAM_MIN {
            let table = bin_clusters(&mids);
            Assign::Table { mids, table }
        } else {
            Assign::Search(mids)
        }
    }

    /// Symbol `offset + nearest cluster` of each value of `data`, 0 for
    /// the zeros and for those whose magnitude key is below `zero_below`
    /// (see [`assign_by_bin`]).
    pub(super) fn run(&self, data: &[f32], symbols: &mut [u8], offset: u8, zero_below: u32) {
        let zero_below = zero_below.max(1);
        match self {
            Assign::Compare(t) => assign_by_thresholds(data, symbols, t, offset, zero_below),
            Assign::Table { mids, table } => {
                assign_by_bin(data, symbols, mids, table, offset, zero_below)
            }
            Assign::Search(mids) => assign_by_search(data, symbols, mids, offset, zero_below),
        }
    }
}

/// Most clusters for which [`assign_by_thresholds`] is used; past this,
/// comparing with every boundary costs more than a table lookup.
pub(super) const MAX_COMPARED_CLUSTERS: usize = 32;

/// The smallest f32 at or above each midpoint: for an f32 `x`,
/// `x >= thresholds[j]` exactly when `f64::from(x) >= mids[j]`, so the
/// count of thresholds at or below `x` is [`nearest_cluster`].
pub(super) fn f32_thresholds(mids: &[f64]) -> Vec<f32> {
    mids.iter()
        .map(|&m| {
            // The midpoint of two f32 values lies within the f32 range, so
            // the nearest f32 is finite and its neighbour above is the
            // smallest at or above `m` when it is below.
            let f = m as f32;
            if f64::from(f) < m {
                f.next_up()
            } else {
                f
            }
        })
        .collect()
}

/// [`assign_by_bin`] by counting, for each value, the thresholds
/// ([`f32_thresholds`]) at or below it: a few vector compares per value
/// and no table, for few clusters. NaN passes none, so it takes cluster 0,
/// as in [`nearest_cluster`].
pub(super) fn assign_by_thresholds(
    data: &[f32],
    symbols: &mut [u8],
    thresholds: &[f32],
    offset: u8,
    zero_below: u32,
) {
    assert!(
        thresholds.len() < MAX_COMPARED_CLUSTERS,
        "assign_by_thresholds: {} thresholds",
        thresholds.len()
    );
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            // SAFETY: the CPU has these features, checked just above.
            return unsafe {
                assign_by_thresholds_avx512(data, symbols, thresholds, offset, zero_below)
            };
        }
        if has!("avx2") {
            // SAFETY: as above.
            return unsafe {
                assign_by_thresholds_avx2(data, symbols, thresholds, offset, zero_below)
            };
        }
    }
    assign_by_thresholds_portable(data, symbols, thresholds, offset, zero_below)
}

/// [`assign_by_thresholds_portable`] in AVX-512 registers, four vectors of
/// 16 values at a time so the counts do not wait on each other; the same
/// comparisons, so the same symbols.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn assign_by_thresholds_avx512(
    data: &[f32],
    symbols: &mut [u8],
    thresholds: &[f32],
    offset: u8,
    zero_below: u32,
) {
    use std::arch::x86_64::*;
    const STEP: usize = 4 * LANES;
    let whole = data.len().min(symbols.len()) / STEP * STEP;
    let one = _mm512_set1_epi32(1);
    let start = _mm512_set1_epi32(i32::from(offset));
    // Unsigned compares: keys and the limit are below 2^32.
    let limit = _mm512_set1_epi32(zero_below as i32);
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    for at in (0..whole).step_by(STEP) {
        // SAFETY: `at + STEP <= whole`, within both slices.
        let x: [__m512; 4] =
            std::array::from_fn(|v| unsafe { _mm512_loadu_ps(data.as_ptr().add(at + v * LANES)) });
        let mut count = [start; 4];
        for &t in thresholds {
            let t = _mm512_set1_ps(t);
            for v in 0..4 {
                // Ordered: NaN is at or past no threshold.
                let past = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x[v], t);
                count[v] = _mm512_mask_add_epi32(count[v], past, count[v], one);
            }
        }
        for v in 0..4 {
            let key = _mm512_and_si512(_mm512_castps_si512(x[v]), magnitude);
            let zero = _mm512_cmplt_epu32_mask(key, limit);
            let symbol = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(!zero, count[v]));
            // SAFETY: as above; 16 bytes at `at + v * LANES`.
            unsafe {
                _mm_storeu_si128(
                    symbols.as_mut_ptr().add(at + v * LANES).cast::<__m128i>(),
                    symbol,
                )
            };
        }
    }
    assign_by_thresholds_portable(
        &data[whole..],
        &mut symbols[whole..],
        thresholds,
        offset,
        zero_below,
    )
}

/// [`assign_by_thresholds_portable`] in AVX2 registers, four vectors of
/// eight values at a time so the counts do not wait on each other; the same
/// comparisons, so the same symbols.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn assign_by_thresholds_avx2(
    data: &[f32],
    symbols: &mut [u8],
    thresholds: &[f32],
    offset: u8,
    zero_below: u32,
) {
    use std::arch::x86_64::*;
    const STEP: usize = 32;
    let whole = data.len().min(symbols.len()) / STEP * STEP;
    let start = _mm256_set1_epi32(i32::from(offset));
    // Keys are below 2^31, so signed compares order them; a limit of 2^31
    // or more zeroes every value.
    let limit = _mm256_set1_epi32(zero_below.min(1 << 31).wrapping_sub(1) as i32);
    let magnitude = _mm256_set1_epi32(0x7fff_ffff);
    for at in (0..whole).step_by(STEP) {
        // SAFETY: `at + STEP <= whole`, within both slices.
        let x: [__m256; 4] =
            std::array::from_fn(|v| unsafe { _mm256_loadu_ps(data.as_ptr().add(at + v * 8)) });
        let mut count = [start; 4];
        for &t in thresholds {
            let t = _mm256_set1_ps(t);
            for v in 0..4 {
                // Ordered: NaN is at or past no threshold. A passed
                // threshold's lane is all ones, -1: subtracting it counts.
                let past = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x[v], t));
                count[v] = _mm256_sub_epi32(count[v], past);
            }
        }
        let symbol: [__m256i; 4] = std::array::from_fn(|v| {
            let key = _mm256_and_si256(_mm256_castps_si256(x[v]), magnitude);
            // `key < zero_below` as `key <= zero_below - 1`: not greater.
            let keep = _mm256_cmpgt_epi32(key, limit);
            _mm256_and_si256(count[v], keep)
        });
        // Counts are at most 255: the saturating packs keep them. The packs
        // work within 128-bit halves; the permutation puts the 32 bytes back
        // in element order.
        let words01 = _mm256_packs_epi32(symbol[0], symbol[1]);
        let words23 = _mm256_packs_epi32(symbol[2], symbol[3]);
        let bytes = _mm256_packus_epi16(words01, words23);
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: as above; 32 bytes at `at`.
        unsafe { _mm256_storeu_si256(symbols.as_mut_ptr().add(at).cast::<__m256i>(), bytes) };
    }
    assign_by_thresholds_portable(
        &data[whole..],
        &mut symbols[whole..],
        thresholds,
        offset,
        zero_below,
    )
}

/// Values per step of [`assign_by_thresholds`]: one vector register of
/// f32 with AVX-512, two with AVX2.
const LANES: usize = 16;

#[inline(always)]
pub(super) fn assign_by_thresholds_portable(
    data: &[f32],
    symbols: &mut [u8],
    thresholds: &[f32],
    offset: u8,
    zero_below: u32,
) {
    let step = |x: &[f32], s: &mut [u8]| {
        let mut count = [0u32; LANES];
        for &t in thresholds {
            for (c, &x) in count.iter_mut().zip(x) {
                *c += u32::from(x >= t);
            }
        }
        for ((s, &c), &x) in s.iter_mut().zip(&count).zip(x) {
            let zero = x.to_bits() & 0x7fff_ffff < zero_below;
            // At most 32 thresholds and 255 clusters: no overflow.
            *s = if zero { 0 } else { offset + c as u8 };
        }
    };
    let mut values = data.chunks_exact(LANES);
    let mut out = symbols.chunks_exact_mut(LANES);
    for (x, s) in (&mut values).zip(&mut out) {
        step(x, s);
    }
    step(values.remainder(), out.into_remainder());
}

/// Decision boundaries between consecutive sorted centroids. In f64 the
/// midpoint of two f32 values is exact, so "left of the midpoint" is exactly
/// "nearer the left centroid".
pub(super) fn midpoints(centroids: &[f32]) -> Vec<f64> {
    centroids
        .windows(2)
        .map(|w| (f64::from(w[0]) + f64::from(w[1])) * 0.5)
        .collect()
}

/// Index of the nearest centroid given the midpoints; a value exactly on a
/// midpoint goes to the upper centroid. NaN compares false and goes to 0.
#[inline]
pub(super) fn nearest_cluster(mids: &[f64], x: f32) -> usize {
    let x = f64::from(x);
    mids.partition_point(|&m| m <= x)
}
