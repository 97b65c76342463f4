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

mod assign;
mod histogram;
mod init;
mod pruned;
mod select;
mod sorted;
#[cfg(test)]
mod tests;

use assign::*;
use histogram::*;
pub use histogram::{initial_centroids_binned, kmeans_1d_binned, ValueHistogram};
pub use init::initial_centroids;
use init::*;
pub use pruned::{prune_and_share, PrunedShare};
use select::*;
use sorted::*;
pub use sorted::{kmeans_1d, kmeans_1d_reference};

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
    let assign = Assign::new(&km.centroids, data.len());
    let assign = |s: &mut [u8], d: &[f32]| assign.run(d, s, offset, 1);
    if data.len() >= PARALLEL_MIN {
        symbols
            .par_chunks_mut(ASSIGN_CHUNK)
            .zip(data.par_chunks(ASSIGN_CHUNK))
            .for_each(|(s, d)| assign(s, d));
    } else {
        assign(symbols, data);
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
