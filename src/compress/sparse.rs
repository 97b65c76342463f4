//! Where the nonzero elements of a pruned tensor are, stored as the smaller
//! of two forms. The packed file format depends on both layouts exactly as
//! written here.
//!
//! **Bitmask**: one bit per element, element `i` in bit `i % 8` (LSB-first)
//! of byte `i / 8`; 1 = nonzero. `ceil(len / 8)` bytes; the padding bits of
//! the last byte are 0.
//!
//! **Relative index** (Deep Compression, section 4): a sequence of gap
//! symbols of width `b` bits, `b` in 1..=8, with escape `E = 2^b - 1`. A
//! cursor starts at element 0 and each symbol `g` moves it:
//!
//! - `g` in `0..E` (that is, at most `2^b - 2`): skip `g` zero elements; the
//!   element then at the cursor is nonzero; the cursor moves past it
//!   (`cursor += g + 1`).
//! - `g == E`: skip `E` zero elements, no nonzero (`cursor += E`). This plays
//!   the part of Deep Compression's filler zero, without storing a value.
//!
//! Zeros after the last nonzero take no symbols (the element count is known),
//! so the sequence never ends with an escape, and a mask with no nonzero has
//! no symbols at all. A run of `z` zeros before a nonzero takes
//! `z / E + 1` symbols.
//!
//! Example, `b = 2` (`E = 3`), the 10 elements `0100000001`: skip 1 and mark
//! element 1 (`1`); 7 zeros follow, so skip 3 (`3`), skip 3 (`3`), skip 1 and
//! mark element 9 (`1`): symbols `[1, 3, 3, 1]`, 8 bits.
//!
//! [`encode_positions`] picks the `b` with the fewest total bits (the
//! smallest `b` on a tie) and returns the symbols one per byte, for the
//! caller to bit-pack or entropy-code; the bitmask is used unless the
//! bit-packed relative index takes fewer bytes.

use rayon::prelude::*;
use thiserror::Error;

/// Masks at least this long are scanned in parallel.
const PARALLEL_MIN: usize = 1 << 16;

/// Escape symbol of each width 1..=8.
const ESCAPES: [u64; 8] = [1, 3, 7, 15, 31, 63, 127, 255];

/// For each byte of a [bitmask](self), the indices of its set bits in
/// order, then zeros: the permutation that packs the selected ones of eight
/// lanes to the front (the lanes past them take lane 0, for the caller to
/// overwrite).
#[cfg(target_arch = "x86_64")]
pub(crate) static LEFT_PACK: [[u8; 8]; 256] = {
    let mut table = [[0u8; 8]; 256];
    let mut mask = 0;
    while mask < 256 {
        let (mut lane, mut k) = (0, 0);
        while lane < 8 {
            if mask & (1 << lane) != 0 {
                table[mask][k] = lane as u8;
                k += 1;
            }
            lane += 1;
        }
        mask += 1;
    }
    table
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    /// One bit per element, LSB-first, 1 = nonzero.
    Bitmask { bytes: Vec<u8> },
    /// Gap symbols of `bits` bits each, unpacked (one per byte).
    Relative { bits: u8, gaps: Vec<u8> },
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SparseError {
    #[error("bitmask has {found} bytes; {expected} are needed for {len} elements")]
    BitmaskLength {
        found: usize,
        expected: usize,
        len: usize,
    },
    #[error("bitmask sets bits past the last of {len} elements")]
    BitmaskPadding { len: usize },
    #[error("relative index width {bits} is not in 1..=8")]
    InvalidWidth { bits: u8 },
    #[error("gap symbol {symbol} at index {index} does not fit in {bits} bits")]
    SymbolTooWide { index: usize, symbol: u8, bits: u8 },
    #[error("gap symbol at index {index} runs past the end of the {len} elements")]
    PastEnd { index: usize, len: usize },
    #[error("relative index ends with an escape symbol")]
    TrailingEscape,
}

/// The smaller encoding of which elements are nonzero (see the module doc).
pub fn encode_positions(nonzero: &[bool]) -> Positions {
    encode_positions_of_mask(bitmask(nonzero))
}

/// [`encode_positions`] of a mask already in bitmask form (padding bits 0).
pub fn encode_positions_of_mask(bytes: Vec<u8>) -> Positions {
    if bitmask_is_smallest(&bytes) {
        return Positions::Bitmask { bytes };
    }
    encode_by_counting(bytes)
}

/// Whether no relative index can be smaller than the bitmask, from two
/// bounds that cost a count of set bits instead of a walk over the
/// nonzeros: at width 1 there is one gap symbol per element up to the last
/// nonzero, and at any other width at least one symbol of 2 or more bits
/// per nonzero. Masks with at least half their elements nonzero always end
/// here.
fn bitmask_is_smallest(bytes: &[u8]) -> bool {
    let len = bytes.len() as u64;
    // Elements up to and including the last nonzero.
    let through_last = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| {
        i as u64 * 8 + 8 - u64::from(bytes[i].leading_zeros())
    });
    if through_last.div_ceil(8) < len {
        return false;
    }
    let ones = |c: &[u8]| -> u64 {
        let words = c.chunks_exact(8);
        let tail: u64 = words
            .remainder()
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum();
        words
            .map(|w| u64::from(u64::from_le_bytes(w.try_into().expect("8 bytes")).count_ones()))
            .sum::<u64>()
            + tail
    };
    let nonzeros: u64 = if bytes.len() >= PARALLEL_MIN {
        bytes.par_chunks(PARALLEL_MIN).map(ones).sum()
    } else {
        ones(bytes)
    };
    (2 * nonzeros).div_ceil(8) >= len
}

/// [`encode_positions_of_mask`] by counting the gap symbols of every width.
fn encode_by_counting(bytes: Vec<u8>) -> Positions {
    // The relative index is found from the bitmask: walking set bits word by
    // word costs per nonzero, not per element, and has no unpredictable
    // branch on random masks.
    let counts = relative_symbol_counts(&bytes);
    let (best, best_bits) = (1..=8u8)
        .map(|b| (b, counts[usize::from(b) - 1] * u64::from(b)))
        .min_by_key(|&(b, bits)| (bits, b))
        .expect("eight widths");
    if best_bits.div_ceil(8) < bytes.len() as u64 {
        let count = counts[usize::from(best) - 1] as usize;
        Positions::Relative {
            bits: best,
            gaps: relative_gaps(&bytes, best, count),
        }
    } else {
        Positions::Bitmask { bytes }
    }
}

/// Bytes the positions take when the gap symbols are bit-packed.
pub fn positions_bytes(p: &Positions) -> usize {
    match p {
        Positions::Bitmask { bytes } => bytes.len(),
        Positions::Relative { bits, gaps } => (gaps.len() * usize::from(*bits)).div_ceil(8),
    }
}

/// The nonzero mask of `len` elements. Every way the input can disagree with
/// the layout in the module doc is an error.
pub fn decode_positions(p: &Positions, len: usize) -> Result<Vec<bool>, SparseError> {
    match p {
        Positions::Bitmask { bytes } => decode_bitmask(bytes, len),
        Positions::Relative { bits, gaps } => decode_relative(*bits, gaps, len),
    }
}

/// The bitmask form of `nonzero` (see the module doc).
pub fn bitmask(nonzero: &[bool]) -> Vec<u8> {
    let pack = |chunk: &[bool]| {
        chunk
            .iter()
            .enumerate()
            .fold(0u8, |byte, (i, &nz)| byte | (u8::from(nz) << i))
    };
    if nonzero.len() >= PARALLEL_MIN {
        nonzero.par_chunks(8).map(pack).collect()
    } else {
        nonzero.chunks(8).map(pack).collect()
    }
}

fn decode_bitmask(bytes: &[u8], len: usize) -> Result<Vec<bool>, SparseError> {
    let expected = len.div_ceil(8);
    if bytes.len() != expected {
        return Err(SparseError::BitmaskLength {
            found: bytes.len(),
            expected,
            len,
        });
    }
    if !len.is_multiple_of(8) && bytes[expected - 1] >> (len % 8) != 0 {
        return Err(SparseError::BitmaskPadding { len });
    }
    let mut out = vec![false; len];
    let unpack = |(chunk, &byte): (&mut [bool], &u8)| {
        for (i, nz) in chunk.iter_mut().enumerate() {
            *nz = (byte >> i) & 1 == 1;
        }
    };
    if len >= PARALLEL_MIN {
        out.par_chunks_mut(8).zip(bytes).for_each(unpack);
    } else {
        out.chunks_mut(8).zip(bytes).for_each(unpack);
    }
    Ok(out)
}

fn decode_relative(bits: u8, gaps: &[u8], len: usize) -> Result<Vec<bool>, SparseError> {
    if !(1..=8).contains(&bits) {
        return Err(SparseError::InvalidWidth { bits });
    }
    let escape = ESCAPES[usize::from(bits) - 1] as usize;
    let mut out = vec![false; len];
    let mut cursor = 0usize;
    for (index, &symbol) in gaps.iter().enumerate() {
        let g = usize::from(symbol);
        if g > escape {
            return Err(SparseError::SymbolTooWide {
                index,
                symbol,
                bits,
            });
        }
        // An escape must leave room for the nonzero that follows it.
        cursor += g;
        if cursor >= len {
            return Err(SparseError::PastEnd { index, len });
        }
        if g < escape {
            out[cursor] = true;
            cursor += 1;
        }
    }
    if gaps.last().is_some_and(|&g| usize::from(g) == escape) {
        return Err(SparseError::TrailingEscape);
    }
    Ok(out)
}

/// The mask as little-endian 64-bit words (the last one zero-padded):
/// element `64 * w + i` is bit `i` of word `w`.
fn words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks(8).map(|chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(word)
    })
}

/// Calls `visit(index)` for every set bit, in order.
#[inline]
fn for_each_set_bit(bytes: &[u8], mut visit: impl FnMut(u64)) {
    for (w, mut word) in words(bytes).enumerate() {
        let base = w as u64 * 64;
        while word != 0 {
            visit(base + u64::from(word.trailing_zeros()));
            word &= word - 1;
        }
    }
}

/// Zero runs of a stretch of the mask, summarized so that neighbouring
/// stretches combine: the runs before the first and after the last nonzero
/// are kept open because their length depends on the neighbours.
#[derive(Debug, Clone, Copy, Default)]
struct RunSummary {
    any_nonzero: bool,
    /// Zeros before the first nonzero (all elements when there is none).
    leading: u64,
    /// Zeros after the last nonzero.
    trailing: u64,
    /// Symbols of every nonzero but the first, per width 1..=8.
    symbols: [u64; 8],
}

fn add_run(symbols: &mut [u64; 8], zeros: u64) {
    for (s, &e) in symbols.iter_mut().zip(&ESCAPES) {
        *s += zeros / e + 1;
    }
}

impl RunSummary {
    /// Summary of a stretch given as bitmask bytes (padding bits count as
    /// zeros; they only ever end up in the trailing run).
    fn of(bytes: &[u8]) -> RunSummary {
        // Most runs are short: count them by length and turn the counts into
        // symbols once, instead of eight divisions per nonzero. Consecutive
        // runs count in different tables: most have the same few lengths,
        // and one table would make each count wait for the one before.
        const TABLES: usize = 4;
        let mut tables = [[0u64; 256]; TABLES];
        let mut summary = RunSummary::default();
        let mut next = 0u64;
        let mut seen = 0usize;
        for_each_set_bit(bytes, |i| {
            let run = i - next;
            if !summary.any_nonzero {
                summary.any_nonzero = true;
                summary.leading = run;
            } else if let Some(count) = tables[seen % TABLES].get_mut(run as usize) {
                *count += 1;
            } else {
                add_run(&mut summary.symbols, run);
            }
            seen += 1;
            next = i + 1;
        });
        let mut short_runs = [0u64; 256];
        for table in &tables {
            short_runs.iter_mut().zip(table).for_each(|(s, t)| *s += t);
        }
        for (zeros, &count) in short_runs.iter().enumerate() {
            if count > 0 {
                for (s, &e) in summary.symbols.iter_mut().zip(&ESCAPES) {
                    *s += count * (zeros as u64 / e + 1);
                }
            }
        }
        let len = bytes.len() as u64 * 8;
        if summary.any_nonzero {
            summary.trailing = len - next;
        } else {
            summary.leading = len;
        }
        summary
    }

    /// The summary of `self` followed by `next`.
    fn then(self, next: RunSummary) -> RunSummary {
        match (self.any_nonzero, next.any_nonzero) {
            (false, _) => RunSummary {
                leading: self.leading + next.leading,
                ..next
            },
            (true, false) => RunSummary {
                trailing: self.trailing + next.leading,
                ..self
            },
            (true, true) => {
                let mut symbols = self.symbols;
                for (s, n) in symbols.iter_mut().zip(next.symbols) {
                    *s += n;
                }
                add_run(&mut symbols, self.trailing + next.leading);
                RunSummary {
                    any_nonzero: true,
                    leading: self.leading,
                    trailing: next.trailing,
                    symbols,
                }
            }
        }
    }
}

/// Relative-index symbol count for each width 1..=8, from the bitmask, in
/// parallel over stretches for large masks.
fn relative_symbol_counts(bytes: &[u8]) -> [u64; 8] {
    // A multiple of 8 bytes, so stretches split at word boundaries.
    const STRETCH_BYTES: usize = PARALLEL_MIN / 8;
    let summary = if bytes.len() >= STRETCH_BYTES {
        bytes
            .par_chunks(STRETCH_BYTES)
            .map(RunSummary::of)
            .reduce(RunSummary::default, RunSummary::then)
    } else {
        RunSummary::of(bytes)
    };
    let mut symbols = summary.symbols;
    if summary.any_nonzero {
        add_run(&mut symbols, summary.leading);
    }
    symbols
}

/// The gap symbols of width `bits` from the bitmask; `count` is their number.
fn relative_gaps(bytes: &[u8], bits: u8, count: usize) -> Vec<u8> {
    let escape = ESCAPES[usize::from(bits) - 1];
    let mut gaps = Vec::with_capacity(count);
    let mut next = 0u64;
    for_each_set_bit(bytes, |i| {
        let mut run = i - next;
        while run >= escape {
            gaps.push(escape as u8);
            run -= escape;
        }
        gaps.push(run as u8);
        next = i + 1;
    });
    debug_assert_eq!(gaps.len(), count);
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mask(s: &str) -> Vec<bool> {
        s.bytes().map(|c| c == b'1').collect()
    }

    /// Straight from the definition: walk the nonzero indices, emit escapes
    /// while the gap is at least `E`, then the gap.
    fn relative_gaps_reference(nonzero: &[bool], bits: u8) -> Vec<u8> {
        let escape = (1usize << bits) - 1;
        let mut out = Vec::new();
        let mut next = 0;
        for i in (0..nonzero.len()).filter(|&i| nonzero[i]) {
            let mut gap = i - next;
            while gap >= escape {
                out.push(escape as u8);
                gap -= escape;
            }
            out.push(gap as u8);
            next = i + 1;
        }
        out
    }

    #[test]
    fn the_module_doc_example_encodes_as_written() {
        let m = mask("0100000001");
        assert_eq!(relative_gaps_reference(&m, 2), vec![1, 3, 3, 1]);
        // Widths 2 and 4 both take 8 bits; the smaller width wins the tie.
        let p = encode_positions(&m);
        assert_eq!(
            p,
            Positions::Relative {
                bits: 2,
                gaps: vec![1, 3, 3, 1]
            }
        );
        assert_eq!(positions_bytes(&p), 1);
        assert_eq!(decode_positions(&p, 10).unwrap(), m);
    }

    #[test]
    fn one_bit_gaps_spell_out_every_zero() {
        let m = mask("0010100");
        assert_eq!(relative_gaps_reference(&m, 1), vec![1, 1, 0, 1, 0]);
        let p = Positions::Relative {
            bits: 1,
            gaps: vec![1, 1, 0, 1, 0],
        };
        assert_eq!(decode_positions(&p, 7).unwrap(), m);
    }

    #[test]
    fn a_dense_mask_is_a_bitmask_lsb_first() {
        let m = mask("1000000001");
        let m: Vec<bool> = m.iter().chain(&mask("1101")).copied().collect();
        let p = encode_positions(&m);
        assert_eq!(
            p,
            Positions::Bitmask {
                bytes: vec![0b0000_0001, 0b0010_1110]
            }
        );
        assert_eq!(decode_positions(&p, m.len()).unwrap(), m);
    }

    #[test]
    fn an_all_zero_mask_needs_no_symbols() {
        let p = encode_positions(&[false; 100]);
        assert_eq!(positions_bytes(&p), 0);
        assert_eq!(decode_positions(&p, 100).unwrap(), vec![false; 100]);
        assert_eq!(encode_positions(&[]), Positions::Bitmask { bytes: vec![] });
    }

    #[test]
    fn corrupted_positions_are_errors() {
        let rel = |bits, gaps: &[u8]| Positions::Relative {
            bits,
            gaps: gaps.to_vec(),
        };
        assert_eq!(
            decode_positions(&rel(0, &[]), 4),
            Err(SparseError::InvalidWidth { bits: 0 })
        );
        assert_eq!(
            decode_positions(&rel(9, &[]), 4),
            Err(SparseError::InvalidWidth { bits: 9 })
        );
        assert_eq!(
            decode_positions(&rel(2, &[0, 4]), 10),
            Err(SparseError::SymbolTooWide {
                index: 1,
                symbol: 4,
                bits: 2
            })
        );
        assert_eq!(
            decode_positions(&rel(2, &[2, 2]), 5),
            Err(SparseError::PastEnd { index: 1, len: 5 })
        );
        assert_eq!(
            decode_positions(&rel(2, &[3]), 3),
            Err(SparseError::PastEnd { index: 0, len: 3 })
        );
        assert_eq!(
            decode_positions(&rel(2, &[0, 3]), 10),
            Err(SparseError::TrailingEscape)
        );
        assert_eq!(
            decode_positions(&Positions::Bitmask { bytes: vec![0] }, 9),
            Err(SparseError::BitmaskLength {
                found: 1,
                expected: 2,
                len: 9
            })
        );
        assert_eq!(
            decode_positions(&Positions::Bitmask { bytes: vec![0x10] }, 4),
            Err(SparseError::BitmaskPadding { len: 4 })
        );
    }

    #[test]
    fn a_large_mask_is_counted_in_parallel_like_the_reference() {
        let m: Vec<bool> = (0..PARALLEL_MIN * 3 + 17)
            .map(|i| {
                (i * 2_654_435_761usize) % 1000 < 3
                    || (PARALLEL_MIN - 40..PARALLEL_MIN + 600).contains(&i)
            })
            .collect();
        let counts = relative_symbol_counts(&bitmask(&m));
        for bits in 1..=8u8 {
            let reference = relative_gaps_reference(&m, bits).len() as u64;
            assert_eq!(counts[usize::from(bits) - 1], reference, "width {bits}");
        }
        let p = encode_positions(&m);
        assert!(matches!(p, Positions::Relative { .. }));
        assert_eq!(decode_positions(&p, m.len()).unwrap(), m);
    }

    fn masks() -> impl Strategy<Value = Vec<bool>> {
        (
            prop::sample::select(vec![0u32, 1, 10, 100, 400, 500, 600, 900, 1000]),
            prop::collection::vec(0u32..1000, 0..3000),
            0usize..40,
        )
            .prop_map(|(density, r, trailing_zeros)| {
                let mut m: Vec<bool> = r.into_iter().map(|x| x < density).collect();
                m.extend(std::iter::repeat_n(false, trailing_zeros));
                m
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn positions_round_trip(m in masks()) {
            let p = encode_positions(&m);
            let back = decode_positions(&p, m.len()).unwrap();
            prop_assert_eq!(back.iter().zip(&m).position(|(a, b)| a != b), None);
            prop_assert_eq!(back.len(), m.len());
        }

        #[test]
        fn the_bounds_choose_as_counting_does(m in masks()) {
            let bytes = bitmask(&m);
            prop_assert_eq!(
                encode_positions_of_mask(bytes.clone()),
                encode_by_counting(bytes)
            );
        }

        #[test]
        fn the_chosen_encoding_is_the_smallest(m in masks()) {
            let p = encode_positions(&m);
            let chosen = positions_bytes(&p);
            prop_assert!(chosen <= m.len().div_ceil(8));
            for bits in 1..=8u8 {
                let gaps = relative_gaps_reference(&m, bits);
                prop_assert!(
                    chosen <= (gaps.len() * usize::from(bits)).div_ceil(8),
                    "width {} is smaller", bits
                );
            }
            if let Positions::Relative { bits, gaps } = &p {
                prop_assert_eq!(gaps, &relative_gaps_reference(&m, *bits));
            }
        }

        #[test]
        fn decoding_arbitrary_gaps_never_panics(
            bits in 0u8..10,
            gaps in prop::collection::vec(any::<u8>(), 0..50),
            len in 0usize..300,
        ) {
            let p = Positions::Relative { bits, gaps: gaps.clone() };
            if let Ok(m) = decode_positions(&p, len) {
                prop_assert_eq!(relative_gaps_reference(&m, bits), gaps);
            }
        }
    }
}
