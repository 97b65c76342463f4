//! Canonical Huffman coding of byte symbols, the last stage of Deep
//! Compression (codebook indices and sparse gaps are far from uniform).
//!
//! A code is stored as its 256 code lengths only (0 = symbol absent); the
//! codes themselves are canonical (as in DEFLATE, RFC 1951 section 3.2.2):
//! shorter codes first, and within one length in symbol order, counting up.
//! Lengths are at most [`MAX_CODE_LEN`] bits, so any code fits in what one
//! refill of the decoder's 64-bit buffer holds; [`Huffman::from_frequencies`]
//! finds the optimal code under that limit by package-merge.
//!
//! Bitstream: codes are written most significant bit first, packed from the
//! most significant bit of each byte; the last byte is padded with zero bits.
//! A stream of `n` symbols is exactly `ceil(sum of code lengths / 8)` bytes.

use rayon::prelude::*;
use thiserror::Error;

/// Longest code length. 24 bits hold any optimal code of fewer than ~75 000
/// symbols (depth grows like log base 1.618 of the count), so the limit only
/// bites on very skewed inputs of millions of symbols, where it costs a
/// fraction of a bit per rare symbol.
pub const MAX_CODE_LEN: u8 = 24;

/// Bits resolved by one lookup in the decoder's primary table; longer codes
/// (rare symbols by construction) take the slower canonical search.
const TABLE_BITS: u32 = 11;

/// Inputs at least this long are counted and encoded in parallel.
const PARALLEL_MIN: usize = 1 << 16;

/// Streams at least this long are encoded a pair of symbols at a time from
/// a table of pair codes (when every coded symbol is below
/// [`PAIR_SYMBOLS`]); building the table costs about as much as coding a
/// few hundred symbols.
const PAIR_MIN: usize = 1024;

/// Symbols whose pairs the pair table holds: 32 covers a codebook of up to
/// 31 clusters and its zero, in a table of 8 KiB.
const PAIR_SYMBOLS: usize = 32;

/// Symbols per unit of work of the parallel encoder.
const ENCODE_CHUNK: usize = 1 << 18;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HuffmanError {
    #[error("code length table has {found} entries; at most 256 are allowed")]
    TableTooLong { found: usize },
    #[error("symbol {symbol} has code length {length}; the maximum is {MAX_CODE_LEN}")]
    CodeTooLong { symbol: usize, length: u8 },
    #[error("code lengths are over-subscribed (Kraft sum above 1), so they are not a prefix code")]
    OverSubscribed,
    #[error("symbol {symbol} at position {position} has no code")]
    SymbolWithoutCode { symbol: u8, position: usize },
    #[error("a stream of {bytes} bytes cannot hold {count} symbols")]
    CountTooLarge { count: usize, bytes: usize },
    #[error("stream ends after {decoded} of {count} symbols")]
    Truncated { decoded: usize, count: usize },
    #[error("the bits of symbol {position} are not a code of this table")]
    InvalidCode { position: usize },
    #[error("{extra} bytes follow the last symbol")]
    TrailingBytes { extra: usize },
}

/// A canonical prefix code over byte symbols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Huffman {
    lengths: [u8; 256],
    /// Canonical code of each symbol, right-aligned in `lengths[s]` bits.
    codes: [u32; 256],
}

impl Huffman {
    /// The optimal code for `freqs` with lengths at most [`MAX_CODE_LEN`].
    /// Symbols with frequency 0 get no code; a single used symbol gets a
    /// 1-bit code, so every stream has a nonzero length per symbol.
    pub fn from_frequencies(freqs: &[u64; 256]) -> Huffman {
        Huffman::with_lengths(package_merge(freqs, MAX_CODE_LEN))
    }

    /// A code from stored lengths (`lengths[s]` for symbol `s`; missing
    /// trailing entries are 0). Rejects lengths above [`MAX_CODE_LEN`] and
    /// sets that are not a prefix code. An incomplete code (Kraft sum below 1)
    /// is accepted; its unused bit patterns fail to decode.
    pub fn from_lengths(lengths: &[u8]) -> Result<Huffman, HuffmanError> {
        if lengths.len() > 256 {
            return Err(HuffmanError::TableTooLong {
                found: lengths.len(),
            });
        }
        let mut table = [0u8; 256];
        let mut kraft = 0u64;
        for (symbol, &length) in lengths.iter().enumerate() {
            if length > MAX_CODE_LEN {
                return Err(HuffmanError::CodeTooLong { symbol, length });
            }
            if length > 0 {
                kraft += 1u64 << (MAX_CODE_LEN - length);
            }
            table[symbol] = length;
        }
        if kraft > 1u64 << MAX_CODE_LEN {
            return Err(HuffmanError::OverSubscribed);
        }
        Ok(Huffman::with_lengths(table))
    }

    /// Precondition: `lengths` satisfies the Kraft inequality.
    fn with_lengths(lengths: [u8; 256]) -> Huffman {
        let canon = Canonical::new(&lengths);
        let mut next = canon.first;
        let mut codes = [0u32; 256];
        for (code, &len) in codes.iter_mut().zip(&lengths) {
            if len > 0 {
                *code = next[usize::from(len)];
                next[usize::from(len)] += 1;
            }
        }
        Huffman { lengths, codes }
    }

    pub fn lengths(&self) -> &[u8; 256] {
        &self.lengths
    }

    /// Bits the symbols counted in `freqs` take with this code (symbols
    /// without a code count as 0 bits).
    pub fn encoded_bits(&self, freqs: &[u64; 256]) -> u64 {
        freqs.iter().zip(&self.lengths).fold(0u64, |acc, (&f, &l)| {
            acc.saturating_add(f.saturating_mul(u64::from(l)))
        })
    }

    /// Encodes `symbols` (see the module doc for the bit order). Long inputs
    /// are encoded in parallel; the stream is the same bit for bit.
    pub fn encode(&self, symbols: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        if symbols.len() < PARALLEL_MIN {
            return self.encode_sequential(symbols);
        }
        self.encode_in_chunks(symbols, ENCODE_CHUNK)
    }

    /// The one-thread encoder, which the parallel one must equal.
    pub fn encode_sequential(&self, symbols: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::with_capacity(symbols.len() / 2 + 8);
        self.encode_into(symbols, 0, &mut out)?;
        Ok(out)
    }

    /// Each chunk of `chunk` symbols is encoded on its own from a byte
    /// boundary; joining shifts each one to the bit where the stream before
    /// it ends, which costs a pass over the output bytes, not over symbols.
    fn encode_in_chunks(&self, symbols: &[u8], chunk: usize) -> Result<Vec<u8>, HuffmanError> {
        let encoded: Vec<Result<(Vec<u8>, u64), HuffmanError>> = symbols
            .par_chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let mut out = Vec::with_capacity(c.len() / 2 + 8);
                self.encode_into(c, i * chunk, &mut out)
                    .map(|bits| (out, bits))
            })
            .collect();
        // In order, so the error is the one at the first bad position (a
        // parallel collect into `Result` may stop at any).
        let pieces: Vec<(Vec<u8>, u64)> = encoded.into_iter().collect::<Result<_, _>>()?;
        let total: u64 = pieces.iter().map(|&(_, bits)| bits).sum();
        let mut out = Vec::with_capacity(total.div_ceil(8) as usize + 8);
        let mut bits = 0u64;
        for (piece, piece_bits) in &pieces {
            append_at_bit(&mut out, (bits % 8) as u32, piece);
            bits += piece_bits;
            out.truncate(bits.div_ceil(8) as usize);
        }
        Ok(out)
    }

    /// Appends the codes of `symbols` to `out`, the last byte padded with
    /// zero bits, and returns how many bits they take. `first_position` is
    /// the position of `symbols[0]` in the whole input, for the error.
    fn encode_into(
        &self,
        symbols: &[u8],
        first_position: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64, HuffmanError> {
        // Bits pending in the low `pending` bits of `acc`. After every two
        // codes the top eight bytes are stored whether or not they are all
        // full, and the position moves past the full ones: no branch on how
        // many bits a code took. Fewer than 8 bits stay pending, so two codes
        // of at most MAX_CODE_LEN bits still fit in 64 (and four when the
        // longest code of the table leaves room: see `quads`).
        const _: () = assert!(7 + 2 * MAX_CODE_LEN as u32 <= 64);
        let start = out.len();
        // Room for the longest code of this table on every symbol, plus the
        // last unconditional store.
        let longest = usize::from(self.lengths.iter().copied().max().unwrap_or(0));
        out.resize(start + (symbols.len() * longest).div_ceil(8) + 16, 0);
        let buf = &mut out[start..];
        let mut acc = 0u64;
        let mut pending = 0u32;
        let mut pos = 0usize;
        let code = |position: usize, symbol: u8| {
            let len = u32::from(self.lengths[usize::from(symbol)]);
            if len == 0 {
                return Err(HuffmanError::SymbolWithoutCode {
                    symbol,
                    position: first_position + position,
                });
            }
            Ok((len, u64::from(self.codes[usize::from(symbol)])))
        };
        let mut flush = |acc: u64, pending: &mut u32, pos: &mut usize| {
            if *pending > 0 {
                let word = acc << (64 - *pending);
                buf[*pos..*pos + 8].copy_from_slice(&word.to_be_bytes());
            }
            *pos += (*pending / 8) as usize;
            *pending %= 8;
        };
        // Symbols that pair codes settle, two pairs to a store when four
        // codes fit in what the accumulator has free.
        let mut done = 0;
        // The pair table covers the symbols below PAIR_SYMBOLS, and only
        // those have codes when it exists; one OR over the input (which
        // vectorizes) tells whether every symbol is in it, so the loops
        // below index without a test per pair. Otherwise the symbols go one
        // at a time, which reports the first without a code.
        let in_table = |s: &[u8]| s.iter().fold(0u8, |m, &x| m | x) < PAIR_SYMBOLS as u8;
        if symbols.len() >= PAIR_MIN && in_table(symbols) {
            if let Some(table) = self.pair_codes() {
                let quads = 4 * longest + 7 <= 64;
                let pair = |a: u8, b: u8| {
                    let e = table[(usize::from(a) * PAIR_SYMBOLS + usize::from(b))
                        & (PAIR_SYMBOLS * PAIR_SYMBOLS - 1)];
                    // 0: one of the two has no code.
                    (e != 0).then_some(((e & 0xff) as u32, e >> 8))
                };
                if quads {
                    for four in symbols.chunks_exact(4) {
                        let (Some((l0, c0)), Some((l1, c1))) =
                            (pair(four[0], four[1]), pair(four[2], four[3]))
                        else {
                            break;
                        };
                        // The two pairs joined first, off the accumulator's
                        // dependency chain: the same bits as shifting each
                        // in (both fit in 64 with the pending ones).
                        let (l, c) = (l0 + l1, (c0 << l1) | c1);
                        acc = (acc << l) | c;
                        pending += l;
                        flush(acc, &mut pending, &mut pos);
                        done += 4;
                    }
                }
                for two in symbols[done..].chunks_exact(2) {
                    let Some((l, c)) = pair(two[0], two[1]) else {
                        break;
                    };
                    acc = (acc << l) | c;
                    pending += l;
                    flush(acc, &mut pending, &mut pos);
                    done += 2;
                }
            }
        }
        // The rest (and any symbol without a code, reported at its
        // position) one code at a time.
        let mut pairs = symbols[done..].chunks_exact(2);
        for (i, pair) in (&mut pairs).enumerate() {
            let i = i + done / 2;
            let (l0, c0) = code(2 * i, pair[0])?;
            let (l1, c1) = code(2 * i + 1, pair[1])?;
            acc = (((acc << l0) | c0) << l1) | c1;
            pending += l0 + l1;
            flush(acc, &mut pending, &mut pos);
        }
        if let [last] = pairs.remainder() {
            let (l, c) = code(symbols.len() - 1, *last)?;
            acc = (acc << l) | c;
            pending += l;
            flush(acc, &mut pending, &mut pos);
        }
        let bits = pos as u64 * 8 + u64::from(pending);
        // The partial last byte was stored by the last flush.
        out.truncate(start + (bits as usize).div_ceil(8));
        Ok(bits)
    }

    /// The codes of every pair of symbols below [`PAIR_SYMBOLS`], the first
    /// one's code before the second's, as `code << 8 | length` at index
    /// `first * PAIR_SYMBOLS + second` (0 when either has no code); `None`
    /// when some symbol past those has a code, as the table would not
    /// cover its streams.
    fn pair_codes(&self) -> Option<Vec<u64>> {
        if self.lengths[PAIR_SYMBOLS..].iter().any(|&l| l > 0) {
            return None;
        }
        let mut table = vec![0u64; PAIR_SYMBOLS * PAIR_SYMBOLS];
        for (a, row) in table.chunks_exact_mut(PAIR_SYMBOLS).enumerate() {
            let la = u64::from(self.lengths[a]);
            for (b, e) in row.iter_mut().enumerate() {
                let lb = u64::from(self.lengths[b]);
                if la > 0 && lb > 0 {
                    let code = (u64::from(self.codes[a]) << lb) | u64::from(self.codes[b]);
                    *e = (code << 8) | (la + lb);
                }
            }
        }
        Some(table)
    }

    /// Decodes `count` symbols from `bytes`, which must end with the byte
    /// holding the last code bit.
    pub fn decode(&self, bytes: &[u8], count: usize) -> Result<Vec<u8>, HuffmanError> {
        // Every code is at least one bit: refuse before allocating for a
        // count read from a damaged file.
        if count > bytes.len().saturating_mul(8) {
            return Err(HuffmanError::CountTooLarge {
                count,
                bytes: bytes.len(),
            });
        }
        let table = self.primary_table();
        let canon = Canonical::new(&self.lengths);
        let lookup = |window: u64, position: usize| {
            let entry = table[(window >> (64 - TABLE_BITS)) as usize];
            if entry != 0 {
                Ok(((entry & 0xff) as u8, u32::from(entry >> 8)))
            } else {
                canon
                    .decode_slow(window >> (64 - u32::from(MAX_CODE_LEN)))
                    .ok_or(HuffmanError::InvalidCode { position })
            }
        };
        let max_len = u32::from(MAX_CODE_LEN);
        let mut reader = BitReader::new(bytes);
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            reader.refill();
            if reader.available >= max_len {
                // Any code fits in what is buffered: decode until it may not.
                while reader.available >= max_len && out.len() < count {
                    let (symbol, len) = lookup(reader.buf, out.len())?;
                    reader.consume(len);
                    out.push(symbol);
                }
            } else {
                // The end of the stream: the bits past it read as zeros, so
                // check the code really ends within the stream.
                let (symbol, len) = lookup(reader.buf, out.len())?;
                if len > reader.available {
                    return Err(HuffmanError::Truncated {
                        decoded: out.len(),
                        count,
                    });
                }
                reader.consume(len);
                out.push(symbol);
            }
        }
        let used = reader.consumed_bits.div_ceil(8);
        if used < bytes.len() {
            return Err(HuffmanError::TrailingBytes {
                extra: bytes.len() - used,
            });
        }
        Ok(out)
    }

    /// `2^TABLE_BITS` entries indexed by the next `TABLE_BITS` stream bits:
    /// `length << 8 | symbol` for codes of at most `TABLE_BITS` bits, 0 when
    /// the bits start a longer code (or none).
    fn primary_table(&self) -> Vec<u16> {
        let mut table = vec![0u16; 1 << TABLE_BITS];
        for (symbol, (&len, &code)) in self.lengths.iter().zip(&self.codes).enumerate() {
            let len = u32::from(len);
            if len == 0 || len > TABLE_BITS {
                continue;
            }
            let shift = TABLE_BITS - len;
            let start = (code as usize) << shift;
            let entry = (len as u16) << 8 | symbol as u16;
            table[start..start + (1 << shift)].fill(entry);
        }
        table
    }
}

/// Appends the bit stream `piece` (from the top bit of its first byte) to
/// `out`, whose last byte holds `used` (< 8) stream bits at the top and zero
/// bits below. The padding bits of `piece` become trailing zero bits, which
/// the caller drops by truncating to the bytes the stream needs.
fn append_at_bit(out: &mut Vec<u8>, used: u32, piece: &[u8]) {
    let Some(last) = out.last_mut().filter(|_| used > 0) else {
        out.extend_from_slice(piece);
        return;
    };
    debug_assert!(used < 8);
    let Some(&first) = piece.first() else { return };
    *last |= first >> used;
    // Each new byte is the rest of piece byte j and the top of byte j + 1;
    // eight at a time while a whole word and the byte after it are there.
    let carry = 8 - used;
    let mut j = 0;
    while j + 9 <= piece.len() {
        let word = u64::from_be_bytes(piece[j..j + 8].try_into().expect("8 bytes"));
        let joined = (word << carry) | u64::from(piece[j + 8] >> used);
        out.extend_from_slice(&joined.to_be_bytes());
        j += 8;
    }
    for k in j..piece.len() {
        let next = piece.get(k + 1).map_or(0, |&b| b >> used);
        out.push((piece[k] << carry) | next);
    }
}

/// Per-length layout of a canonical code.
struct Canonical {
    /// First code of each length (right-aligned).
    first: [u32; MAX_CODE_LEN as usize + 1],
    /// Codes per length.
    count: [u32; MAX_CODE_LEN as usize + 1],
    /// Index in `symbols` of the first symbol of each length.
    offset: [u32; MAX_CODE_LEN as usize + 1],
    /// Symbols ordered by (length, symbol), i.e. by code.
    symbols: Vec<u8>,
}

impl Canonical {
    fn new(lengths: &[u8; 256]) -> Canonical {
        const N: usize = MAX_CODE_LEN as usize + 1;
        let mut count = [0u32; N];
        for &l in lengths.iter().filter(|&&l| l > 0) {
            count[usize::from(l)] += 1;
        }
        let (mut first, mut offset) = ([0u32; N], [0u32; N]);
        for l in 1..N {
            first[l] = (first[l - 1] + count[l - 1]) << 1;
            offset[l] = offset[l - 1] + count[l - 1];
        }
        let mut symbols: Vec<u8> = (0..=255u8)
            .filter(|&s| lengths[usize::from(s)] > 0)
            .collect();
        symbols.sort_by_key(|&s| lengths[usize::from(s)]);
        Canonical {
            first,
            count,
            offset,
            symbols,
        }
    }

    /// Symbol and length of the code at the top of `window` (the next
    /// `MAX_CODE_LEN` stream bits). Left-aligned to `MAX_CODE_LEN` bits, the
    /// codes of each length fill one interval, and the intervals follow each
    /// other in order of length, so the first length whose interval ends
    /// above `window` holds the code.
    fn decode_slow(&self, window: u64) -> Option<(u8, u32)> {
        let max = u32::from(MAX_CODE_LEN);
        for len in 1..=max {
            let l = len as usize;
            let end = u64::from(self.first[l] + self.count[l]) << (max - len);
            if window < end {
                let code = (window >> (max - len)) as u32;
                let index = self.offset[l] + code.checked_sub(self.first[l])?;
                return self.symbols.get(index as usize).map(|&s| (s, len));
            }
        }
        None
    }
}

/// MSB-first reader holding up to 64 stream bits, left-aligned in `buf`.
struct BitReader<'a> {
    bytes: &'a [u8],
    /// Next byte not yet in `buf`.
    pos: usize,
    buf: u64,
    /// Valid bits at the top of `buf`.
    available: u32,
    consumed_bits: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> BitReader<'a> {
        BitReader {
            bytes,
            pos: 0,
            buf: 0,
            available: 0,
            consumed_bits: 0,
        }
    }

    /// Tops up to at least 56 valid bits while input remains.
    #[inline]
    fn refill(&mut self) {
        if self.available >= 56 {
            return;
        }
        if let Some(word) = self.bytes.get(self.pos..self.pos + 8) {
            // Whole bytes that fit below the valid bits; the bits of the
            // partly fitting byte below them are the same stream bits the
            // next refill ORs in again, so they do no harm.
            let word = u64::from_be_bytes(word.try_into().expect("8 bytes"));
            self.buf |= word >> self.available;
            let take = (63 - self.available) / 8;
            self.pos += take as usize;
            self.available += take * 8;
        } else {
            while self.available <= 56 && self.pos < self.bytes.len() {
                self.buf |= u64::from(self.bytes[self.pos]) << (56 - self.available);
                self.pos += 1;
                self.available += 8;
            }
        }
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.available -= n;
        self.consumed_bits += n as usize;
    }
}

/// Optimal code lengths of at most `max_len` bits (Larmore and Hirschberg's
/// package-merge, 1990).
///
/// Each symbol is a coin of its frequency at every depth 1..=max_len. Going
/// from the deepest level up, adjacent items of the previous level's sorted
/// list are paired into packages and merged with the coins; taking the
/// `2n - 2` cheapest items of the last list, a symbol's code length is the
/// number of levels at which its coin is taken. What is taken is a prefix at
/// every level, and the leaves in a prefix are the lightest ones, so
/// counting leaves per level is enough.
fn package_merge(freqs: &[u64; 256], max_len: u8) -> [u8; 256] {
    let mut leaves: Vec<(u64, u8)> = (0..=255u8)
        .map(|s| (freqs[usize::from(s)], s))
        .filter(|&(f, _)| f > 0)
        .collect();
    leaves.sort_unstable();
    let mut lengths = [0u8; 256];
    let n = leaves.len();
    if n <= 1 {
        if let Some(&(_, s)) = leaves.first() {
            lengths[usize::from(s)] = 1;
        }
        return lengths;
    }
    debug_assert!(n <= 1 << max_len);
    let leaf_weights: Vec<u128> = leaves.iter().map(|&(f, _)| u128::from(f)).collect();
    let mut is_leaf_per_level: Vec<Vec<bool>> = vec![vec![true; n]];
    let mut current = leaf_weights.clone();
    for _ in 1..max_len {
        let packages: Vec<u128> = current.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        let mut merged = Vec::with_capacity(n + packages.len());
        let mut is_leaf = Vec::with_capacity(n + packages.len());
        let (mut i, mut j) = (0, 0);
        while i < n || j < packages.len() {
            if j == packages.len() || (i < n && leaf_weights[i] <= packages[j]) {
                merged.push(leaf_weights[i]);
                is_leaf.push(true);
                i += 1;
            } else {
                merged.push(packages[j]);
                is_leaf.push(false);
                j += 1;
            }
        }
        current = merged;
        is_leaf_per_level.push(is_leaf);
    }
    let mut take = 2 * n - 2;
    for is_leaf in is_leaf_per_level.iter().rev() {
        let taken = &is_leaf[..take.min(is_leaf.len())];
        let leaves_taken = taken.iter().filter(|&&b| b).count();
        for &(_, s) in &leaves[..leaves_taken] {
            lengths[usize::from(s)] += 1;
        }
        take = 2 * (taken.len() - leaves_taken);
    }
    lengths
}

/// How often each byte value occurs.
pub fn frequencies(symbols: &[u8]) -> [u64; 256] {
    fn count(chunk: &[u8]) -> [u64; 256] {
        // Four tables, so runs of one symbol (the zero symbol of a pruned
        // tensor) do not wait on the previous increment of the same counter.
        let mut tables = [[0u64; 256]; 4];
        let mut quads = chunk.chunks_exact(4);
        for q in &mut quads {
            for (table, &s) in tables.iter_mut().zip(q) {
                table[usize::from(s)] += 1;
            }
        }
        for &s in quads.remainder() {
            tables[0][usize::from(s)] += 1;
        }
        let mut f = tables[0];
        for table in &tables[1..] {
            for (x, y) in f.iter_mut().zip(table) {
                *x += y;
            }
        }
        f
    }
    if symbols.len() < PARALLEL_MIN {
        return count(symbols);
    }
    symbols.par_chunks(PARALLEL_MIN).map(count).reduce(
        || [0u64; 256],
        |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
            a
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::first_mismatch;
    use proptest::prelude::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    /// Plain Huffman (no length limit) by merging the two lightest trees.
    fn huffman_lengths_reference(freqs: &[u64; 256]) -> Vec<u32> {
        let mut lengths = vec![0u32; 256];
        let mut heap: BinaryHeap<Reverse<(u128, Vec<usize>)>> = freqs
            .iter()
            .enumerate()
            .filter(|(_, &f)| f > 0)
            .map(|(s, &f)| Reverse((u128::from(f), vec![s])))
            .collect();
        if heap.len() == 1 {
            let Reverse((_, s)) = heap.pop().unwrap();
            lengths[s[0]] = 1;
        }
        while heap.len() > 1 {
            let Reverse((wa, a)) = heap.pop().unwrap();
            let Reverse((wb, b)) = heap.pop().unwrap();
            for &s in a.iter().chain(&b) {
                lengths[s] += 1;
            }
            heap.push(Reverse((wa + wb, [a, b].concat())));
        }
        lengths
    }

    /// Bit-by-bit encoder.
    fn encode_reference(code: &Huffman, symbols: &[u8]) -> Vec<u8> {
        let mut bits = Vec::new();
        for &s in symbols {
            let (len, c) = (code.lengths[usize::from(s)], code.codes[usize::from(s)]);
            for i in (0..len).rev() {
                bits.push((c >> i) & 1 == 1);
            }
        }
        bits.chunks(8)
            .map(|b| {
                b.iter()
                    .enumerate()
                    .fold(0u8, |acc, (i, &bit)| acc | (u8::from(bit) << (7 - i)))
            })
            .collect()
    }

    /// Bit-by-bit decoder: extends the code one bit at a time and looks the
    /// (length, code) pair up among all symbols.
    fn decode_reference(code: &Huffman, bytes: &[u8], count: usize) -> Option<Vec<u8>> {
        let mut bit_index = 0usize;
        let mut out = Vec::new();
        while out.len() < count {
            let (mut c, mut len) = (0u32, 0u8);
            loop {
                let byte = *bytes.get(bit_index / 8)?;
                c = (c << 1) | u32::from((byte >> (7 - bit_index % 8)) & 1);
                len += 1;
                bit_index += 1;
                if let Some(s) = (0..256).find(|&s| code.lengths[s] == len && code.codes[s] == c) {
                    out.push(s as u8);
                    break;
                }
                if len >= MAX_CODE_LEN {
                    return None;
                }
            }
        }
        Some(out)
    }

    fn kraft_sum(lengths: &[u8; 256]) -> f64 {
        lengths
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 0.5f64.powi(i32::from(l)))
            .sum()
    }

    #[test]
    fn a_hand_worked_code_is_canonical() {
        // Frequencies 5, 2, 1, 1: Huffman lengths 1, 2, 3, 3.
        let mut f = [0u64; 256];
        f[b'a' as usize] = 5;
        f[b'b' as usize] = 2;
        f[b'c' as usize] = 1;
        f[b'd' as usize] = 1;
        let code = Huffman::from_frequencies(&f);
        assert_eq!(
            [b'a', b'b', b'c', b'd'].map(|s| code.lengths()[s as usize]),
            [1, 2, 3, 3]
        );
        // Canonical: a = 0, b = 10, c = 110, d = 111.
        assert_eq!(
            [b'a', b'b', b'c', b'd'].map(|s| code.codes[s as usize]),
            [0b0, 0b10, 0b110, 0b111]
        );
        // "abcd" = 0 10 110 111 -> 0101 1011 1(000 0000)
        assert_eq!(
            code.encode(b"abcd").unwrap(),
            vec![0b0101_1011, 0b1000_0000]
        );
        assert_eq!(
            code.decode(&[0b0101_1011, 0b1000_0000], 4).unwrap(),
            b"abcd"
        );
        assert_eq!(code.encoded_bits(&f), 5 + 4 + 3 + 3);
    }

    #[test]
    fn a_single_symbol_gets_a_one_bit_code() {
        let code = Huffman::from_frequencies(&frequencies(&[7; 20]));
        assert_eq!(code.lengths()[7], 1);
        let stream = code.encode(&[7; 20]).unwrap();
        assert_eq!(stream, vec![0, 0, 0]);
        assert_eq!(code.decode(&stream, 20).unwrap(), vec![7; 20]);
        // The other 1-bit pattern is not a code.
        assert_eq!(
            code.decode(&[0x80], 1),
            Err(HuffmanError::InvalidCode { position: 0 })
        );
    }

    /// Frequencies 1, 1, 2, 3, 5, ... for the first `n` symbols.
    fn fibonacci_frequencies(n: usize) -> [u64; 256] {
        let mut f = [0u64; 256];
        let (mut a, mut b) = (1u64, 1u64);
        for x in f.iter_mut().take(n) {
            *x = a;
            (a, b) = (b, a + b);
        }
        f
    }

    #[test]
    fn long_pair_codes_take_one_pair_per_store() {
        // 30 symbols with Fibonacci weights: codes up to 24 bits, too long
        // for four to a store, so pairs are stored one at a time.
        let code = Huffman::from_frequencies(&fibonacci_frequencies(30));
        assert!(code.lengths().iter().any(|&l| l > 14));
        assert!(code.pair_codes().is_some());
        let symbols: Vec<u8> = (0..PAIR_MIN * 3)
            .map(|i| ((i * 7) % 30) as u8 / (1 + (i % 3) as u8))
            .collect();
        let stream = code.encode_sequential(&symbols).unwrap();
        assert_eq!(stream, encode_reference(&code, &symbols));
    }

    #[test]
    fn the_length_limit_holds_on_fibonacci_frequencies() {
        // Fibonacci weights make the unlimited Huffman tree a chain.
        let f = fibonacci_frequencies(60);
        let unlimited = huffman_lengths_reference(&f);
        assert!(unlimited.iter().any(|&l| l > u32::from(MAX_CODE_LEN)));
        let code = Huffman::from_frequencies(&f);
        assert!(code.lengths().iter().all(|&l| l <= MAX_CODE_LEN));
        assert!(kraft_sum(code.lengths()) <= 1.0);
        let symbols: Vec<u8> = (0..60).chain(0..60).collect();
        let stream = code.encode(&symbols).unwrap();
        assert_eq!(code.decode(&stream, symbols.len()).unwrap(), symbols);
        assert_eq!(
            decode_reference(&code, &stream, symbols.len()).unwrap(),
            symbols
        );
    }

    #[test]
    fn package_merge_matches_brute_force_on_a_tight_limit() {
        // Unlimited, 8,4,2,1,1 gets lengths 1,2,3,4,4. Within 3 bits the
        // complete codes for 5 symbols are 1,3,3,3,3 (cost 32) and 2,2,2,3,3
        // (cost 34).
        let mut f = [0u64; 256];
        f[..5].copy_from_slice(&[8, 4, 2, 1, 1]);
        let l = package_merge(&f, 3);
        assert_eq!(&l[..5], &[1, 3, 3, 3, 3]);
        f[..5].copy_from_slice(&[3, 3, 3, 2, 2]);
        let l = package_merge(&f, 3);
        assert_eq!(&l[..5], &[2, 2, 2, 3, 3]);
    }

    #[test]
    fn invalid_length_tables_are_rejected() {
        assert_eq!(
            Huffman::from_lengths(&[1, 1, 1]),
            Err(HuffmanError::OverSubscribed)
        );
        assert_eq!(
            Huffman::from_lengths(&[1, 25]),
            Err(HuffmanError::CodeTooLong {
                symbol: 1,
                length: 25
            })
        );
        assert_eq!(
            Huffman::from_lengths(&[1; 257]),
            Err(HuffmanError::TableTooLong { found: 257 })
        );
        let code = Huffman::from_lengths(&[1, 2, 2]).unwrap();
        assert_eq!(code.lengths()[..4], [1, 2, 2, 0]);
    }

    #[test]
    fn bad_streams_give_errors() {
        let code = Huffman::from_lengths(&[1, 2, 2]).unwrap();
        assert_eq!(
            code.encode(&[0, 3]),
            Err(HuffmanError::SymbolWithoutCode {
                symbol: 3,
                position: 1
            })
        );
        let stream = code.encode(&[1; 8]).unwrap(); // 16 bits
        assert_eq!(
            code.decode(&stream[..1], 9),
            Err(HuffmanError::CountTooLarge { count: 9, bytes: 1 })
        );
        assert_eq!(
            code.decode(&stream[..1], 5),
            Err(HuffmanError::Truncated {
                decoded: 4,
                count: 5
            })
        );
        assert_eq!(
            code.decode(&stream, 4),
            Err(HuffmanError::TrailingBytes { extra: 1 })
        );
        assert_eq!(code.decode(&[], 0), Ok(vec![]));
    }

    #[test]
    fn long_codes_decode_through_the_slow_path() {
        // Lengths 1..=20 plus a second 20: a complete code with codes longer
        // than the primary table.
        let mut lengths: Vec<u8> = (1..=20).collect();
        lengths.push(20);
        let code = Huffman::from_lengths(&lengths).unwrap();
        assert_eq!(kraft_sum(code.lengths()), 1.0);
        let symbols: Vec<u8> = (0..21).rev().chain(0..21).collect();
        let stream = code.encode(&symbols).unwrap();
        assert_eq!(stream, encode_reference(&code, &symbols));
        assert_eq!(code.decode(&stream, symbols.len()).unwrap(), symbols);
    }

    #[test]
    fn frequencies_of_a_large_input_are_counted_in_parallel() {
        let symbols: Vec<u8> = (0..PARALLEL_MIN * 3 + 5).map(|i| (i % 7) as u8).collect();
        let f = frequencies(&symbols);
        for (s, &c) in f.iter().enumerate() {
            let expected = symbols.iter().filter(|&&x| usize::from(x) == s).count() as u64;
            assert_eq!(c, expected, "symbol {s}");
        }
    }

    #[test]
    fn a_long_input_is_encoded_in_parallel_to_the_same_stream() {
        // Skewed, so chunk boundaries fall at all bit offsets.
        let symbols: Vec<u8> = (0..ENCODE_CHUNK * 3 + 12_345)
            .map(|i| ((i * 2_654_435_761) >> 7).trailing_zeros() as u8)
            .collect();
        let code = Huffman::from_frequencies(&frequencies(&symbols));
        let parallel = code.encode(&symbols).unwrap();
        let sequential = code.encode_sequential(&symbols).unwrap();
        assert_eq!(first_mismatch(&parallel, &sequential, u8::eq), None);
        // Long enough to pass through the encoder's block many times.
        let bit_by_bit = encode_reference(&code, &symbols);
        assert_eq!(first_mismatch(&sequential, &bit_by_bit, u8::eq), None);
        assert_eq!(code.decode(&parallel, symbols.len()).unwrap(), symbols);
    }

    #[test]
    fn a_symbol_without_code_is_reported_at_its_position_in_any_chunk() {
        let code = Huffman::from_lengths(&[1, 2, 2]).unwrap();
        let mut symbols = vec![1u8; 100];
        symbols[70] = 9;
        symbols[90] = 8;
        for chunk in [1, 7, 64, 100] {
            assert_eq!(
                code.encode_in_chunks(&symbols, chunk),
                Err(HuffmanError::SymbolWithoutCode {
                    symbol: 9,
                    position: 70
                }),
                "chunks of {chunk}"
            );
        }
    }

    fn skewed_symbols() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2000),
            // Geometric-like: small symbols much more likely.
            prop::collection::vec(
                (0u32..1 << 16).prop_map(|x| (x.leading_zeros() - 16) as u8 * 9),
                0..2000
            ),
            (any::<u8>(), 1usize..500).prop_map(|(s, n)| vec![s; n]),
            prop::collection::vec(0u8..3, 0..2000),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn decoding_an_encoding_gives_the_input(symbols in skewed_symbols()) {
            let f = frequencies(&symbols);
            let code = Huffman::from_frequencies(&f);
            prop_assert!(kraft_sum(code.lengths()) <= 1.0);
            prop_assert!(code.lengths().iter().all(|&l| l <= MAX_CODE_LEN));
            let stream = code.encode(&symbols).unwrap();
            prop_assert_eq!(stream.len() as u64, code.encoded_bits(&f).div_ceil(8));
            prop_assert_eq!(first_mismatch(&stream, &encode_reference(&code, &symbols), u8::eq), None);
            let decoded = code.decode(&stream, symbols.len()).unwrap();
            prop_assert_eq!(first_mismatch(&decoded, &symbols, u8::eq), None);
            let reference = decode_reference(&code, &stream, symbols.len()).unwrap();
            prop_assert_eq!(first_mismatch(&reference, &symbols, u8::eq), None);
            let stored = Huffman::from_lengths(code.lengths()).unwrap();
            prop_assert_eq!(stored, code);
        }

        #[test]
        fn encoding_in_chunks_gives_the_sequential_stream(
            symbols in skewed_symbols(),
            chunk in 1usize..40,
        ) {
            let f = frequencies(&symbols);
            let code = Huffman::from_frequencies(&f);
            let chunked = code.encode_in_chunks(&symbols, chunk).unwrap();
            let sequential = code.encode_sequential(&symbols).unwrap();
            prop_assert_eq!(first_mismatch(&chunked, &sequential, u8::eq), None);
            prop_assert_eq!(chunked.len(), sequential.len());
        }

        #[test]
        fn pair_codes_give_the_bit_by_bit_stream(
            symbols in prop::collection::vec(
                prop_oneof![
                    (1u32..1 << 16).prop_map(|x| (x.leading_zeros() - 16) as u8 * 2),
                    0u8..32,
                ],
                PAIR_MIN..PAIR_MIN + 3000,
            ),
            bad in prop::option::of((0usize..PAIR_MIN + 3000, prop_oneof![Just(33u8), Just(31u8), any::<u8>()])),
        ) {
            let code = Huffman::from_frequencies(&frequencies(&symbols));
            prop_assert!(code.pair_codes().is_some());
            let mut symbols = symbols;
            if let Some((at, symbol)) = bad {
                let at = at % symbols.len();
                symbols[at] = symbol;
                let first_bad = symbols
                    .iter()
                    .position(|&s| code.lengths[usize::from(s)] == 0);
                if let Some(position) = first_bad {
                    prop_assert_eq!(
                        code.encode_sequential(&symbols),
                        Err(HuffmanError::SymbolWithoutCode {
                            symbol: symbols[position],
                            position
                        })
                    );
                    return Ok(());
                }
            }
            let stream = code.encode_sequential(&symbols).unwrap();
            prop_assert_eq!(first_mismatch(&stream, &encode_reference(&code, &symbols), u8::eq), None);
            prop_assert_eq!(stream.len(), encode_reference(&code, &symbols).len());
        }

        #[test]
        fn counting_in_four_tables_counts_every_symbol(symbols in skewed_symbols()) {
            let mut expected = [0u64; 256];
            for &s in &symbols {
                expected[usize::from(s)] += 1;
            }
            prop_assert_eq!(frequencies(&symbols), expected);
        }

        #[test]
        fn the_code_is_optimal_when_the_limit_is_not_hit(symbols in skewed_symbols()) {
            let f = frequencies(&symbols);
            let reference = huffman_lengths_reference(&f);
            prop_assume!(reference.iter().all(|&l| l <= u32::from(MAX_CODE_LEN)));
            let best: u64 = f.iter().zip(&reference).map(|(&f, &l)| f * u64::from(l)).sum();
            prop_assert_eq!(Huffman::from_frequencies(&f).encoded_bits(&f), best);
        }

        #[test]
        fn decoding_random_bytes_never_panics(
            lengths in prop::collection::vec(0u8..=MAX_CODE_LEN, 0..256),
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            count in 0usize..600,
        ) {
            let Ok(code) = Huffman::from_lengths(&lengths) else { return Ok(()) };
            let fast = code.decode(&bytes, count);
            let reference = decode_reference(&code, &bytes, count);
            if let Ok(symbols) = &fast {
                prop_assert_eq!(Some(symbols), reference.as_ref());
            }
        }

        #[test]
        fn random_length_tables_decode_what_they_encode(
            freqs in prop::collection::vec(0u64..1000, 1..256),
            symbols in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            // Codes from a frequency table, then symbols restricted to those with a code.
            let mut f = [0u64; 256];
            f[..freqs.len()].copy_from_slice(&freqs);
            let code = Huffman::from_frequencies(&f);
            let used: Vec<u8> = (0..=255u8)
                .filter(|&s| code.lengths()[usize::from(s)] > 0)
                .collect();
            prop_assume!(!used.is_empty());
            let symbols: Vec<u8> = symbols
                .iter()
                .map(|&s| used[usize::from(s) % used.len()])
                .collect();
            let stream = code.encode(&symbols).unwrap();
            prop_assert_eq!(code.decode(&stream, symbols.len()).unwrap(), symbols);
        }
    }
}
