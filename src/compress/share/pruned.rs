//! Magnitude pruning followed by sharing over the whole tensor, in three
//! passes over the input instead of stage by stage.
//!
//! Stage by stage, a large tensor is copied, read twice to find the pruning
//! threshold, written to zero the pruned weights, read to build the k-means
//! histogram, read to assign clusters, and read again for its fidelity.
//! Here:
//! 1. the first pass of the threshold search (a histogram of the top 16 bits
//!    of `|w|`) names the bin that holds the threshold;
//! 2. one pass counts the weights above that bin into the k-means histogram
//!    and the weights inside it by their exact bits; the threshold is then
//!    known, and the survivors of its bin are added to the histogram from
//!    those counts (its sums are integers, so the order does not matter);
//! 3. one pass assigns each weight its symbol (0 for the pruned and the
//!    zero ones) and measures the fidelity while the block is in the cache.
//!
//! The pruned copy of the tensor is never written. The symbols, codebook and
//! histogram are the ones [`prune_magnitude`] then [`share`] give, bit for
//! bit. When the survivors are too few distinct values to cluster over a
//! histogram, [`prune_and_share`] says so and the caller goes stage by
//! stage.
//!
//! [`prune_magnitude`]: crate::compress::prune::prune_magnitude

use rayon::prelude::*;

use super::*;
use crate::compress::coded::decode_codebook;
use crate::compress::metrics::{self, Sums};
use crate::compress::prune::{self, add_histogram, bin_of_rank, magnitude_key, prune_count};

/// The result of [`prune_and_share`].
#[derive(Debug)]
pub struct PrunedShare {
    pub coded: Coded,
    /// The fidelity sums of the decoded values, rounded to storage, against
    /// the input.
    pub sums: Sums,
    /// Seconds spent finding the threshold and building the histogram.
    pub prune_seconds: f64,
    /// Seconds spent clustering and assigning.
    pub share_seconds: f64,
}

/// What the second pass gathers: the k-means table of the weights above the
/// threshold's bin, and, per chunk of [`ASSIGN_CHUNK`] weights, the sign
/// and low 16 bits of each weight inside that bin, in index order (a few
/// per thousand weights): enough to place the threshold, to know which
/// weights of its exact magnitude go (the first ones), and to add the
/// survivors of the bin to the table.
struct Gathered {
    table: Box<BinTable>,
    in_bin: Vec<(usize, Vec<u32>)>,
}

impl Gathered {
    fn new() -> Self {
        Self {
            table: new_bin_table(),
            in_bin: Vec::new(),
        }
    }

    fn merge(mut self, mut o: Self) -> Self {
        self.table = merge_bin_tables(self.table, o.table);
        self.in_bin.append(&mut o.in_bin);
        self
    }

    /// Adds chunk `index` (`values`): its weights whose magnitude lies above
    /// bin `high` (top 16 bits of the magnitude key) to the table, and those
    /// inside the bin to the records.
    fn add(mut self, index: usize, values: &[f32], high: u32) -> Self {
        let mut above = [0u32; NONZERO_BATCH];
        let mut inside = [0u32; NONZERO_BATCH];
        let mut in_bin = Vec::new();
        for chunk in values.chunks(NONZERO_BATCH) {
            let (n, m) = select_around(chunk, high, &mut above, &mut inside);
            add_nonzero(&mut self.table, &above[..n]);
            in_bin.extend(
                inside[..m]
                    .iter()
                    .map(|&bits| ((bits >> 31) << 16) | (bits & 0xffff)),
            );
        }
        if !in_bin.is_empty() {
            self.in_bin.push((index, in_bin));
        }
        self
    }
}

/// Where the pruning of one tensor cuts.
struct Cut {
    /// Weights with a magnitude key below this go (and the zeros).
    below: u32,
    /// The threshold's key.
    key: u32,
    /// Per chunk of [`ASSIGN_CHUNK`] weights, sorted: how many of its first
    /// weights whose key is `key` go too, when only some of those go (ties
    /// at the threshold go in index order).
    ties: Vec<(usize, usize)>,
}

impl Cut {
    /// Places the threshold of `need` more weights among those of bin
    /// `high`, and adds the bin's survivors to `table`.
    fn place(
        high: u32,
        need: u64,
        mut in_bin: Vec<(usize, Vec<u32>)>,
        table: &mut BinTable,
    ) -> Self {
        in_bin.sort_unstable_by_key(|&(chunk, _)| chunk);
        // Counts by sign and low 16 bits.
        let mut counts = vec![0u64; 2 * prune::BINS];
        for &r in in_bin.iter().flat_map(|(_, r)| r) {
            counts[r as usize] += 1;
        }
        let (positive, negative) = counts.split_at_mut(prune::BINS);
        let low: Vec<u64> = positive
            .iter()
            .zip(negative.iter())
            .map(|(a, b)| a + b)
            .collect();
        let (cut, mut remaining) = bin_of_rank(&low, need)
            .expect("the second pass saw the weights the first pass counted in the bin");
        let key = (high << 16) | cut;
        let mut ties = Vec::new();
        if remaining == low[cut as usize] {
            // Every weight of the threshold's magnitude goes.
            positive[cut as usize] = 0;
            negative[cut as usize] = 0;
        } else {
            for (chunk, records) in &in_bin {
                let mut quota = 0;
                for &r in records {
                    if remaining > 0 && r & 0xffff == cut {
                        counts_of(r, positive, negative)[cut as usize] -= 1;
                        remaining -= 1;
                        quota += 1;
                    }
                }
                if quota > 0 {
                    ties.push((*chunk, quota));
                }
            }
        }
        for (sign, counts) in [(0u32, &*positive), (1, &*negative)] {
            for (l, &count) in counts.iter().enumerate().skip(cut as usize) {
                let magnitude = (high << 16) | l as u32;
                if count > 0 && magnitude != 0 {
                    add_to_bin(table, (sign << 31) | magnitude, count);
                }
            }
        }
        Cut {
            below: if ties.is_empty() { key + 1 } else { key },
            key,
            ties,
        }
    }
}

/// The counts of the sign of record `r`.
fn counts_of<'a>(r: u32, positive: &'a mut [u64], negative: &'a mut [u64]) -> &'a mut [u64] {
    if r >> 16 == 0 {
        positive
    } else {
        negative
    }
}

/// [`prune_magnitude`](crate::compress::prune::prune_magnitude) with
/// `sparsity`, then [`share`] with `p` over the whole tensor (`p.per_channel`
/// false), in three passes; plus the fidelity sums of the result (decoded
/// and rounded by `round_to_storage`) against `data`.
///
/// None when the tensor is too small to take the histogram paths, or when
/// the survivors are too few distinct bins to cluster on; the stages then
/// run one after the other.
pub fn prune_and_share(
    data: &[f32],
    sparsity: f64,
    p: &ShareParams,
    round_to_storage: &(dyn Fn(&mut [f32]) + Sync),
) -> Option<PrunedShare> {
    if p.per_channel || data.len() < HISTOGRAM_MIN || !(2..=255).contains(&p.clusters) {
        return None;
    }
    let started = std::time::Instant::now();
    let n = data.len() as u64;
    let k = prune_count(sparsity, n);
    let mut high = vec![0u64; prune::BINS];
    add_histogram(&mut high, data, |key| Some((key >> 16) as usize));
    let (table, cut) = match bin_of_rank(&high, k) {
        None => {
            // Nothing is pruned: the histogram of every nonzero weight.
            let table = bin_table_of(data);
            let cut = Cut {
                below: 1,
                key: 0,
                ties: Vec::new(),
            };
            (table, cut)
        }
        Some((high, need)) => {
            let Gathered { mut table, in_bin } = data
                .par_chunks(ASSIGN_CHUNK)
                .enumerate()
                .with_min_len(HISTOGRAM_CHUNKS_PER_TABLE)
                .fold(Gathered::new, |g, (i, chunk)| g.add(i, chunk, high))
                .reduce_with(Gathered::merge)
                .unwrap_or_else(Gathered::new);
            let cut = Cut::place(high, need, in_bin, &mut table);
            (table, cut)
        }
    };
    let hist = ValueHistogram::of_table(&table);
    if !hist.resolves(p.clusters) {
        return None;
    }
    // Pruning left a zero, or the input had one.
    let has_zero = k > 0 || table[BINS].count > 0;
    drop(table);
    let prune_seconds = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let km = kmeans_1d_binned(&hist, p.clusters, p.init, p.iterations);
    let offset = usize::from(has_zero);
    let entries = p.clusters + offset;
    let mut book = vec![0.0f32; entries];
    book[offset..].copy_from_slice(&km.centroids);
    let assign = Assign::new(&km.centroids, data.len());
    let mut symbols = vec![0u8; data.len()];
    let sums: Vec<Sums> = symbols
        .par_chunks_mut(ASSIGN_CHUNK)
        .zip(data.par_chunks(ASSIGN_CHUNK))
        .enumerate()
        .map(|(i, (s, d))| {
            assign.run(d, s, offset as u8, cut.below);
            if let Ok(t) = cut.ties.binary_search_by_key(&i, |&(chunk, _)| chunk) {
                let mut quota = cut.ties[t].1;
                for (s, &x) in s.iter_mut().zip(d) {
                    if quota == 0 {
                        break;
                    }
                    if magnitude_key(x) == cut.key {
                        *s = 0;
                        quota -= 1;
                    }
                }
            }
            metrics::sums_sequential(d, |start, out| {
                decode_codebook(&s[start..start + out.len()], &book, out);
                round_to_storage(out);
            })
        })
        .collect();
    let sums = Sums::merge_in_order(sums);
    let coded = Coded {
        symbols,
        bits: bits_for_entries(entries),
        group_len: data.len(),
        decode: Decode::Codebook {
            entries,
            values: book,
        },
    };
    Some(PrunedShare {
        coded,
        sums,
        prune_seconds,
        share_seconds: started.elapsed().as_secs_f64(),
    })
}
