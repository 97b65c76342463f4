//! Assigning each value to its nearest centroid: binary search, or a table
//! over histogram bins that settles most values without one.

use super::*;

/// Symbol `offset + nearest cluster` of each value, 0 for exact zeros.
pub(super) fn assign_by_search(data: &[f32], symbols: &mut [u8], mids: &[f64], offset: u8) {
    for (s, &x) in symbols.iter_mut().zip(data) {
        let cluster = offset + nearest_cluster(mids, x) as u8;
        // A select, not a branch: pruned zeros are scattered at random, so a
        // branch on them would be mispredicted about as often as taken.
        *s = if x == 0.0 { 0 } else { cluster };
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
