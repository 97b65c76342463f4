//! Bit-packing of small symbols.
//!
//! Two layouts:
//! - [`pack_lsb`]: a flat stream, symbol `i` at bit `i * bits`, least
//!   significant bit first (the `packed` format).
//! - [`pack_int32_rows`]: compressed-tensors' `pack_to_int32` (the
//!   `pack-quantized` format read by vLLM): signed integers offset to unsigned,
//!   `32 / bits` of them per little-endian `i32`, each row padded to whole words.
//!
//! The flat stream is packed eight symbols at a time (they always fill whole
//! bytes) with word-wide bit tricks, so large inputs split into independent
//! chunks for rayon. For the widths `pack_int32_rows` accepts, a row of it is
//! the same as the row's flat stream padded to whole words.

use rayon::prelude::*;
use thiserror::Error;

/// Symbols per parallel chunk; a multiple of 8 so every chunk starts on a
/// byte boundary of the packed stream.
const PAR_CHUNK: usize = 1 << 16;

/// Why packed data cannot be unpacked or packed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitpackError {
    #[error("{count} symbols of {bits} bits need {needed} bytes but only {got} are present")]
    TooShort {
        count: usize,
        bits: u8,
        needed: usize,
        got: usize,
    },
    #[error("a {rows}x{cols} matrix does not fit in memory")]
    TooLarge { rows: usize, cols: usize },
    #[error("bit width {bits} is not supported: symbols take 1 to 8 bits")]
    InvalidWidth { bits: u8 },
    #[error(
        "bit width {bits} cannot be packed into int32 words: \
         only 1, 2, 4 and 8 bits give the same layout in every compressed-tensors version"
    )]
    UnsupportedInt32Width { bits: u8 },
    #[error("a {rows}x{cols} matrix needs {expected} values but {got} were given")]
    LengthMismatch {
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    #[error("value {value} at index {index} is outside the {bits}-bit signed range")]
    OutOfRange { index: usize, value: i32, bits: u8 },
}

/// Bytes needed for `count` symbols of `bits` bits, computed per octet of
/// symbols so that it cannot overflow whatever `count` a file claims.
fn packed_len(count: usize, bits: u8) -> usize {
    let b = usize::from(bits);
    count / 8 * b + (count % 8 * b).div_ceil(8)
}

/// Packs `symbols` (each `< 2^bits`; higher bits are ignored) LSB first into
/// `ceil(n * bits / 8)` bytes. `bits` is in `1..=8`.
pub fn pack_lsb(symbols: &[u8], bits: u8) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "pack_lsb: bits must be 1..=8");
    let mut out = vec![0u8; packed_len(symbols.len(), bits)];
    let out_chunk = PAR_CHUNK / 8 * usize::from(bits);
    if symbols.len() > PAR_CHUNK {
        out.par_chunks_mut(out_chunk)
            .zip(symbols.par_chunks(PAR_CHUNK))
            .for_each(|(o, s)| pack_chunk(s, bits, o));
    } else {
        pack_chunk(symbols, bits, &mut out);
    }
    out
}

/// Packs a run of symbols that starts on a byte boundary into `out`
/// (exactly `ceil(len * bits / 8)` bytes).
fn pack_chunk(symbols: &[u8], bits: u8, out: &mut [u8]) {
    let b = usize::from(bits);
    if bits == 8 {
        out.copy_from_slice(symbols);
        return;
    }
    let full = symbols.len() / 8;
    let (body, tail_out) = out.split_at_mut(full * b);
    for (s, o) in symbols.chunks_exact(8).zip(body.chunks_exact_mut(b)) {
        let x = u64::from_le_bytes(s.try_into().expect("chunks of 8"));
        o.copy_from_slice(&pack_octet(x, bits).to_le_bytes()[..b]);
    }
    let tail = &symbols[full * 8..];
    if !tail.is_empty() {
        let mut buf = [0u8; 8];
        buf[..tail.len()].copy_from_slice(tail);
        let packed = pack_octet(u64::from_le_bytes(buf), bits).to_le_bytes();
        let n = tail_out.len();
        tail_out.copy_from_slice(&packed[..n]);
    }
}

/// Eight one-byte symbols (little-endian in `x`) to `bits * 8` packed bits.
#[inline]
fn pack_octet(x: u64, bits: u8) -> u64 {
    match bits {
        1 => {
            // Every product bit 8i + 7j + 7 is distinct, so no carries: byte i's
            // low bit lands at bit 56 + i.
            ((x & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080)) >> 56
        }
        2 => {
            let x = x & 0x0303_0303_0303_0303;
            let x = (x | x >> 6) & 0x000F_000F_000F_000F;
            let x = (x | x >> 12) & 0x0000_00FF_0000_00FF;
            (x | x >> 24) & 0xFFFF
        }
        4 => {
            let x = x & 0x0F0F_0F0F_0F0F_0F0F;
            let x = (x | x >> 4) & 0x00FF_00FF_00FF_00FF;
            let x = (x | x >> 8) & 0x0000_FFFF_0000_FFFF;
            (x | x >> 16) & 0xFFFF_FFFF
        }
        _ => {
            let mask = (1u64 << bits) - 1;
            let mut acc = 0u64;
            for i in 0..8 {
                acc |= ((x >> (8 * i)) & mask) << (i * u32::from(bits));
            }
            acc
        }
    }
}

/// Inverse of [`pack_octet`]: `bits * 8` packed bits to eight one-byte symbols.
#[inline]
fn unpack_octet(x: u64, bits: u8) -> u64 {
    match bits {
        1 => {
            // Copy the byte into every lane, keep bit i in lane i, then turn
            // each non-zero lane into 1 (adding 0x7F never carries across lanes).
            let x = ((x & 0xFF).wrapping_mul(0x0101_0101_0101_0101)) & 0x8040_2010_0804_0201;
            ((x + 0x7F7F_7F7F_7F7F_7F7F) >> 7) & 0x0101_0101_0101_0101
        }
        2 => {
            let x = x & 0xFFFF;
            let x = (x | x << 24) & 0x0000_00FF_0000_00FF;
            let x = (x | x << 12) & 0x000F_000F_000F_000F;
            (x | x << 6) & 0x0303_0303_0303_0303
        }
        4 => {
            let x = x & 0xFFFF_FFFF;
            let x = (x | x << 16) & 0x0000_FFFF_0000_FFFF;
            let x = (x | x << 8) & 0x00FF_00FF_00FF_00FF;
            (x | x << 4) & 0x0F0F_0F0F_0F0F_0F0F
        }
        _ => {
            let mask = (1u64 << bits) - 1;
            let mut acc = 0u64;
            for i in 0..8 {
                acc |= ((x >> (i * u32::from(bits))) & mask) << (8 * i);
            }
            acc
        }
    }
}

/// Unpacks `count` symbols of `bits` bits written by [`pack_lsb`]. Bytes past
/// the last symbol are ignored.
pub fn unpack_lsb(bytes: &[u8], bits: u8, count: usize) -> Result<Vec<u8>, BitpackError> {
    if !(1..=8).contains(&bits) {
        return Err(BitpackError::InvalidWidth { bits });
    }
    let needed = packed_len(count, bits);
    if bytes.len() < needed {
        return Err(BitpackError::TooShort {
            count,
            bits,
            needed,
            got: bytes.len(),
        });
    }
    let bytes = &bytes[..needed];
    let mut out = vec![0u8; count];
    let in_chunk = PAR_CHUNK / 8 * usize::from(bits);
    if count > PAR_CHUNK {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(bytes.par_chunks(in_chunk))
            .for_each(|(o, b)| unpack_chunk(b, bits, o));
    } else {
        unpack_chunk(bytes, bits, &mut out);
    }
    Ok(out)
}

/// Unpacks `out.len()` symbols from `bytes`, which start on a symbol boundary
/// and hold exactly `ceil(out.len() * bits / 8)` bytes.
fn unpack_chunk(bytes: &[u8], bits: u8, out: &mut [u8]) {
    let b = usize::from(bits);
    if bits == 8 {
        out.copy_from_slice(bytes);
        return;
    }
    let full = out.len() / 8;
    let (body, tail) = out.split_at_mut(full * 8);
    for (s, o) in bytes.chunks_exact(b).zip(body.chunks_exact_mut(8)) {
        let mut buf = [0u8; 8];
        buf[..b].copy_from_slice(s);
        o.copy_from_slice(&unpack_octet(u64::from_le_bytes(buf), bits).to_le_bytes());
    }
    if !tail.is_empty() {
        let rest = &bytes[full * b..];
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        let x = unpack_octet(u64::from_le_bytes(buf), bits).to_le_bytes();
        let n = tail.len();
        tail.copy_from_slice(&x[..n]);
    }
}

/// Plain bit-by-bit [`pack_lsb`].
pub fn pack_lsb_reference(symbols: &[u8], bits: u8) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(symbols.len(), bits)];
    for (i, &s) in symbols.iter().enumerate() {
        for j in 0..usize::from(bits) {
            if s >> j & 1 == 1 {
                let bit = i * usize::from(bits) + j;
                out[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    out
}

/// Plain bit-by-bit [`unpack_lsb`] (no length checks).
pub fn unpack_lsb_reference(bytes: &[u8], bits: u8, count: usize) -> Vec<u8> {
    (0..count)
        .map(|i| {
            (0..usize::from(bits)).fold(0u8, |s, j| {
                let bit = i * usize::from(bits) + j;
                s | ((bytes[bit / 8] >> (bit % 8)) & 1) << j
            })
        })
        .collect()
}

/// Values per int32 word, for the widths whose layout every
/// compressed-tensors version agrees on. Older versions pad each word
/// (`32 // bits` values); newer ones pack densely across words. The two only
/// coincide when `bits` divides 32, and vLLM reads 4 and 8 bits.
fn int32_pack_factor(bits: u8) -> Result<usize, BitpackError> {
    match bits {
        1 | 2 | 4 | 8 => Ok(32 / usize::from(bits)),
        _ => Err(BitpackError::UnsupportedInt32Width { bits }),
    }
}

fn checked_matrix_len(len: usize, rows: usize, cols: usize) -> Result<(), BitpackError> {
    match rows.checked_mul(cols) {
        Some(expected) if expected == len => Ok(()),
        expected => Err(BitpackError::LengthMismatch {
            rows,
            cols,
            expected: expected.unwrap_or(usize::MAX),
            got: len,
        }),
    }
}

/// compressed-tensors' `pack_to_int32` along the last dimension: each row of
/// the `rows x cols` signed integers `q` (in `[-2^(bits-1), 2^(bits-1) - 1]`)
/// is offset by `2^(bits-1)` and packed `32 / bits` per word, least
/// significant bits first, the row's last word padded with zeros. The result
/// is `rows x ceil(cols / (32 / bits))`. `bits` must be 1, 2, 4 or 8.
pub fn pack_int32_rows(
    q: &[i32],
    bits: u8,
    rows: usize,
    cols: usize,
) -> Result<Vec<i32>, BitpackError> {
    let per_word = int32_pack_factor(bits)?;
    checked_matrix_len(q.len(), rows, cols)?;
    let offset = 1i32 << (bits - 1);
    if let Some(index) = q.iter().position(|&v| !(-offset..offset).contains(&v)) {
        return Err(BitpackError::OutOfRange {
            index,
            value: q[index],
            bits,
        });
    }
    let words = cols.div_ceil(per_word);
    let mut out = vec![0i32; rows * words];
    if words == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(words)
        .zip(q.par_chunks(cols))
        .for_each(|(o, row)| {
            for (word, vals) in o.iter_mut().zip(row.chunks(per_word)) {
                let mut acc = 0u32;
                for (i, &v) in vals.iter().enumerate() {
                    acc |= ((v + offset) as u32) << (i * usize::from(bits));
                }
                *word = acc as i32;
            }
        });
    Ok(out)
}

/// Inverse of [`pack_int32_rows`]: `packed` holds `rows` rows of
/// `ceil(cols / (32 / bits))` words; padding bits are ignored.
pub fn unpack_int32_rows(
    packed: &[i32],
    bits: u8,
    rows: usize,
    cols: usize,
) -> Result<Vec<i32>, BitpackError> {
    let per_word = int32_pack_factor(bits)?;
    let words = cols.div_ceil(per_word);
    checked_matrix_len(packed.len(), rows, words)?;
    // `rows * words` fits, and `cols <= words * per_word`, but `rows * cols`
    // may still overflow when `cols` is not a multiple of `per_word`.
    let len = rows
        .checked_mul(cols)
        .ok_or(BitpackError::TooLarge { rows, cols })?;
    let mut out = vec![0i32; len];
    if cols == 0 {
        return Ok(out);
    }
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    out.par_chunks_mut(cols)
        .zip(packed.par_chunks(words))
        .for_each(|(o, row)| {
            for (vals, &word) in o.chunks_mut(per_word).zip(row) {
                for (i, v) in vals.iter_mut().enumerate() {
                    *v = ((word as u32 >> (i * usize::from(bits))) & mask) as i32 - offset;
                }
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::testing::first_mismatch;
    use proptest::prelude::*;

    #[test]
    fn symbols_are_packed_least_significant_bit_first() {
        assert_eq!(
            pack_lsb(&[1, 0, 1, 1, 0, 0, 0, 1, 1], 1),
            [0b1000_1101, 0b1]
        );
        assert_eq!(pack_lsb(&[1, 2, 3, 0, 3], 2), [0b0011_1001, 0b11]);
        assert_eq!(pack_lsb(&[0x3, 0xA, 0xF], 4), [0xA3, 0x0F]);
        // 3 bits: 5 | 2 << 3 | 7 << 6 = 0b1_1101_0101 over two bytes.
        assert_eq!(pack_lsb(&[5, 2, 7], 3), [0b1101_0101, 0b1]);
        assert_eq!(pack_lsb(&[200, 7], 8), [200, 7]);
        assert_eq!(pack_lsb(&[], 5), Vec::<u8>::new());
    }

    #[test]
    fn the_packed_length_is_the_bit_count_rounded_up_to_bytes() {
        for bits in 1..=8u8 {
            for n in 0..40usize {
                let packed = pack_lsb(&vec![1; n], bits);
                assert_eq!(
                    packed.len(),
                    (n * usize::from(bits)).div_ceil(8),
                    "bits {bits} n {n}"
                );
            }
        }
    }

    #[test]
    fn bits_above_the_width_do_not_leak_into_neighbours() {
        assert_eq!(pack_lsb(&[0xFF, 0], 4), [0x0F]);
        assert_eq!(pack_lsb(&[0xFF, 0, 0], 3), pack_lsb(&[7, 0, 0], 3));
    }

    #[test]
    fn a_truncated_stream_is_rejected() {
        let packed = pack_lsb(&[1, 2, 3, 4, 5], 3);
        assert_eq!(
            unpack_lsb(&packed[..1], 3, 5),
            Err(BitpackError::TooShort {
                count: 5,
                bits: 3,
                needed: 2,
                got: 1
            })
        );
        assert!(unpack_lsb(&packed, 0, 5).is_err());
        assert!(unpack_lsb(&packed, 9, 5).is_err());
        assert!(matches!(
            unpack_lsb(&packed, 8, usize::MAX),
            Err(BitpackError::TooShort { .. })
        ));
    }

    #[test]
    fn a_large_stream_round_trips_across_parallel_chunks() {
        let n = 3 * PAR_CHUNK + 13;
        for bits in 1..=8u8 {
            let mask = ((1u16 << bits) - 1) as u8;
            let symbols: Vec<u8> = (0..n)
                .map(|i| ((i * 2_654_435_761) >> 7) as u8 & mask)
                .collect();
            let packed = pack_lsb(&symbols, bits);
            let reference = pack_lsb_reference(&symbols, bits);
            assert_eq!(
                first_mismatch(&packed, &reference, PartialEq::eq),
                None,
                "bits {bits}"
            );
            let back = unpack_lsb(&packed, bits, n).unwrap();
            assert_eq!(
                first_mismatch(&back, &symbols, PartialEq::eq),
                None,
                "bits {bits}"
            );
        }
    }

    #[test]
    fn int32_packing_matches_compressed_tensors_by_hand() {
        // Values checked against compressed_tensors' pack_to_int32 (0.20).
        assert_eq!(pack_int32_rows(&[1, 2], 8, 1, 2).unwrap(), [33409]);
        assert_eq!(
            pack_int32_rows(&[-8, -1, 0, 7, 1, 2, 3, 4], 4, 1, 8).unwrap(),
            [-878_053_264]
        );
        // 9 | 7 << 4 | 11 << 8, the rest of the word padding.
        assert_eq!(pack_int32_rows(&[1, -1, 3], 4, 1, 3).unwrap(), [2937]);
        assert_eq!(
            pack_int32_rows(&[-2, -1, 0, 1, 1, 0], 2, 1, 6).unwrap(),
            [3044]
        );
        assert_eq!(pack_int32_rows(&[0, -1, -1, 0, -1], 1, 1, 5).unwrap(), [9]);
    }

    #[test]
    fn each_row_is_padded_to_whole_words() {
        let q: Vec<i32> = (0..18).map(|i| i % 16 - 8).collect();
        let packed = pack_int32_rows(&q, 4, 2, 9).unwrap();
        assert_eq!(packed.len(), 4);
        // Row 1 starts a fresh word: its first value is q[9] = 1 -> 9.
        assert_eq!(packed[2] & 0xF, 9);
        assert_eq!(packed[1], 8, "q[8] = 0 alone in the padded word");
        assert_eq!(unpack_int32_rows(&packed, 4, 2, 9).unwrap(), q);
    }

    #[test]
    fn int32_packing_rejects_what_it_cannot_express() {
        assert_eq!(
            pack_int32_rows(&[0, 1, 2], 3, 1, 3),
            Err(BitpackError::UnsupportedInt32Width { bits: 3 })
        );
        assert_eq!(
            pack_int32_rows(&[0, 8], 4, 1, 2),
            Err(BitpackError::OutOfRange {
                index: 1,
                value: 8,
                bits: 4
            })
        );
        assert!(matches!(
            pack_int32_rows(&[0, 1, 2], 4, 2, 2),
            Err(BitpackError::LengthMismatch { .. })
        ));
        assert!(matches!(
            unpack_int32_rows(&[0, 1, 2], 4, 2, 9),
            Err(BitpackError::LengthMismatch {
                expected: 4,
                got: 3,
                ..
            })
        ));
        assert!(matches!(
            unpack_int32_rows(&[0; 4], 8, usize::MAX, 2),
            Err(BitpackError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn empty_matrices_pack_to_nothing() {
        assert_eq!(pack_int32_rows(&[], 4, 3, 0).unwrap(), Vec::<i32>::new());
        assert_eq!(unpack_int32_rows(&[], 4, 3, 0).unwrap(), Vec::<i32>::new());
        assert_eq!(pack_int32_rows(&[], 4, 0, 5).unwrap(), Vec::<i32>::new());
    }

    fn symbols_and_width() -> impl Strategy<Value = (Vec<u8>, u8)> {
        (1..=8u8).prop_flat_map(|bits| {
            let max = ((1u16 << bits) - 1) as u8;
            (prop::collection::vec(0..=max, 0..200), Just(bits))
        })
    }

    fn int_matrix() -> impl Strategy<Value = (Vec<i32>, u8, usize, usize)> {
        (
            prop::sample::select(vec![1u8, 2, 4, 8]),
            0..5usize,
            0..40usize,
        )
            .prop_flat_map(|(bits, rows, cols)| {
                let half = 1i32 << (bits - 1);
                (
                    prop::collection::vec(-half..half, rows * cols),
                    Just(bits),
                    Just(rows),
                    Just(cols),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn packing_matches_the_bitwise_reference((symbols, bits) in symbols_and_width()) {
            let fast = pack_lsb(&symbols, bits);
            let reference = pack_lsb_reference(&symbols, bits);
            prop_assert_eq!(first_mismatch(&fast, &reference, PartialEq::eq), None);
            let back = unpack_lsb(&fast, bits, symbols.len()).unwrap();
            prop_assert_eq!(first_mismatch(&back, &symbols, PartialEq::eq), None);
            let back_ref = unpack_lsb_reference(&fast, bits, symbols.len());
            prop_assert_eq!(first_mismatch(&back_ref, &symbols, PartialEq::eq), None);
        }

        #[test]
        fn int32_rows_round_trip((q, bits, rows, cols) in int_matrix()) {
            let packed = pack_int32_rows(&q, bits, rows, cols).unwrap();
            prop_assert_eq!(packed.len(), rows * cols.div_ceil(32 / usize::from(bits)));
            let back = unpack_int32_rows(&packed, bits, rows, cols).unwrap();
            prop_assert_eq!(first_mismatch(&back, &q, PartialEq::eq), None);
        }

        #[test]
        fn int32_rows_agree_with_the_flat_stream_padded_per_row((q, bits, rows, cols) in int_matrix()) {
            // For widths dividing 32 a word is four LSB-first bytes.
            let packed = pack_int32_rows(&q, bits, rows, cols).unwrap();
            let words = cols.div_ceil(32 / usize::from(bits));
            for r in 0..rows {
                let symbols: Vec<u8> = q[r * cols..(r + 1) * cols]
                    .iter()
                    .map(|&v| (v + (1 << (bits - 1))) as u8)
                    .collect();
                let mut bytes = pack_lsb(&symbols, bits);
                bytes.resize(words * 4, 0);
                let expected: Vec<i32> = bytes
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                prop_assert_eq!(&packed[r * words..(r + 1) * words], &expected[..]);
            }
        }
    }
}
