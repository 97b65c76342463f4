//! The compact form a tensor takes after a value stage (`share`, `quantize`,
//! `binarize`): one small symbol per element plus the per-group parameters
//! that turn a symbol back into a value.
//!
//! Every value stage produces a [`Coded`]; the output formats store it and the
//! dense writer and `decompress` both go through [`Coded::decode_into`], which
//! is why a packed file restores to the dense output bit for bit.

use rayon::prelude::*;

/// A tensor seen as a matrix: `rows` = the first dimension (output
/// channels / neurons), `cols` = the product of the others (the input
/// dimension). Scalars and vectors are one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatrixShape {
    pub rows: usize,
    pub cols: usize,
}

impl MatrixShape {
    /// The matrix view of a tensor shape; `None` when the element count
    /// overflows `usize`.
    pub fn of(shape: &[usize]) -> Option<Self> {
        match shape.split_first() {
            None => Some(Self { rows: 1, cols: 1 }),
            Some((&rows, rest)) if !rest.is_empty() => {
                let cols = rest.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
                rows.checked_mul(cols)?;
                Some(Self { rows, cols })
            }
            Some((&n, _)) => Some(Self { rows: 1, cols: n }),
        }
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which elements share one set of parameters (scale, zero point, codebook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One set for the whole tensor.
    Tensor,
    /// One set per output channel (row).
    Channel,
    /// One set per run of `n` consecutive elements along the input dimension;
    /// `n` divides the number of columns.
    Group(usize),
}

impl Granularity {
    /// Number of consecutive row-major elements that share one parameter set.
    /// Callers have checked that a group size divides `shape.cols`.
    pub fn group_len(self, shape: MatrixShape) -> usize {
        let len = match self {
            Granularity::Tensor => shape.len(),
            Granularity::Channel => shape.cols,
            Granularity::Group(n) => n,
        };
        len.max(1)
    }
}

/// How symbols map back to values.
#[derive(Debug, Clone, PartialEq)]
pub enum Decode {
    /// Integer quantization: `value = ((symbol + qmin) - zero_point[g]) * scale[g]`
    /// with `qmin = -2^(bits-1)`, so `symbol + qmin` is the signed integer `q`.
    /// `zero_points` is empty for symmetric quantization (zero point 0).
    Affine {
        scales: Vec<f32>,
        zero_points: Vec<i32>,
    },
    /// A codebook per group (weight sharing, binary, ternary):
    /// `value = values[g * entries + symbol]`.
    Codebook { entries: usize, values: Vec<f32> },
    /// FP8 E4M3: `value = e4m3(symbol) * scale[g]`.
    Fp8 { scales: Vec<f32> },
}

/// A tensor as symbols plus decode parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Coded {
    /// One symbol per element, row-major, each `< 2^bits`.
    pub symbols: Vec<u8>,
    /// Bits a symbol needs when bit-packed (1..=8).
    pub bits: u8,
    /// Elements per parameter group (see [`Granularity::group_len`]).
    pub group_len: usize,
    pub decode: Decode,
}

/// Signed integer of an affine symbol: `symbol + qmin`, `qmin = -2^(bits-1)`.
pub fn affine_q(symbol: u8, bits: u8) -> i32 {
    i32::from(symbol) - (1i32 << (bits - 1))
}

/// The affine symbol of a signed integer `q` (inverse of [`affine_q`]).
pub fn affine_symbol(q: i32, bits: u8) -> u8 {
    (q + (1i32 << (bits - 1))) as u8
}

/// The one place an affine value is computed; `q - zero_point` is exact in f32.
#[inline]
pub fn affine_value(q: i32, zero_point: i32, scale: f32) -> f32 {
    (q - zero_point) as f32 * scale
}

/// FP8 E4M3 (the `float8_e4m3fn` of PyTorch: no infinities, max 448) to f32,
/// looked up in a table of the 256 codes ([`e4m3_to_f32_reference`]):
/// decoding calls it once per element.
#[inline]
pub fn e4m3_to_f32(code: u8) -> f32 {
    static TABLE: std::sync::LazyLock<[f32; 256]> =
        std::sync::LazyLock::new(|| std::array::from_fn(|c| e4m3_to_f32_reference(c as u8)));
    TABLE[usize::from(code)]
}

/// The conversion itself, by the `float8` crate.
pub fn e4m3_to_f32_reference(code: u8) -> f32 {
    float8::F8E4M3::from_bits(code).to_f32()
}

/// f32 to FP8 E4M3, rounding to nearest even and saturating at ±448.
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let clamped = if x.is_nan() {
        0.0
    } else {
        x.clamp(-448.0, 448.0)
    };
    float8::F8E4M3::from_f32(clamped).to_bits()
}

impl Coded {
    /// Number of parameter groups.
    pub fn groups(&self) -> usize {
        self.symbols.len().div_ceil(self.group_len.max(1))
    }

    /// The value of element `i` (plain reference path).
    pub fn value(&self, i: usize) -> f32 {
        let g = i / self.group_len;
        let s = self.symbols[i];
        match &self.decode {
            Decode::Affine {
                scales,
                zero_points,
            } => {
                let zp = zero_points.get(g).copied().unwrap_or(0);
                affine_value(affine_q(s, self.bits), zp, scales[g])
            }
            Decode::Codebook { entries, values } => values[g * entries + usize::from(s)],
            Decode::Fp8 { scales } => e4m3_to_f32(s) * scales[g],
        }
    }

    /// Decodes every element into `out` (same length as `symbols`), in parallel
    /// over chunks. Bit-identical to [`Coded::value`].
    pub fn decode_into(&self, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.symbols.len(),
            "decode_into: length mismatch"
        );
        const CHUNK: usize = 1 << 16;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(k, o)| self.decode_range(k * CHUNK, o));
    }

    /// Decodes elements `start..start + out.len()` into `out`, in AVX2
    /// registers when the CPU has them (conversions and one multiply per
    /// element: the same bits either way).
    pub fn decode_range(&self, start: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.decode_range_avx2(start, out) };
        }
        self.decode_range_portable(start, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn decode_range_avx2(&self, start: usize, out: &mut [f32]) {
        self.decode_range_portable(start, out)
    }

    #[inline(always)]
    fn decode_range_portable(&self, start: usize, out: &mut [f32]) {
        let gl = self.group_len.max(1);
        let bits = self.bits;
        let mut done = 0;
        while done < out.len() {
            let i = start + done;
            let g = i / gl;
            let n = (gl - i % gl).min(out.len() - done);
            let (o, s) = (&mut out[done..done + n], &self.symbols[i..i + n]);
            match &self.decode {
                Decode::Affine {
                    scales,
                    zero_points,
                } => {
                    let zp = zero_points.get(g).copied().unwrap_or(0);
                    for (o, &s) in o.iter_mut().zip(s) {
                        *o = affine_value(affine_q(s, bits), zp, scales[g]);
                    }
                }
                Decode::Codebook { entries, values } => {
                    decode_codebook(s, &values[g * entries..(g + 1) * entries], o);
                }
                Decode::Fp8 { scales } => {
                    for (o, &s) in o.iter_mut().zip(s) {
                        *o = e4m3_to_f32(s) * scales[g];
                    }
                }
            }
            done += n;
        }
    }

    /// All values, decoded.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.symbols.len()];
        self.decode_into(&mut out);
        out
    }

    /// The symbol that decodes to exactly zero in group `g`, if there is one.
    /// Sparse encoding leaves these positions out.
    pub fn zero_symbol(&self, g: usize) -> Option<u8> {
        match &self.decode {
            Decode::Affine { zero_points, .. } => {
                let zp = zero_points.get(g).copied().unwrap_or(0);
                let sym = zp + (1i32 << (self.bits - 1));
                (0..(1i32 << self.bits)).contains(&sym).then_some(sym as u8)
            }
            Decode::Codebook { entries, values } => values
                .get(g * entries..(g + 1) * entries)?
                .iter()
                .position(|&v| v == 0.0 && v.is_sign_positive())
                .map(|p| p as u8),
            Decode::Fp8 { .. } => Some(0),
        }
    }
}

/// `out[i] = book[symbols[i]]`; every symbol is below `book.len()`.
pub(crate) fn decode_codebook(symbols: &[u8], book: &[f32], out: &mut [f32]) {
    debug_assert!(symbols.iter().all(|&s| usize::from(s) < book.len()));
    #[cfg(target_arch = "x86_64")]
    if book.len() <= 32 {
        use crate::cpu::has;
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512 F, checked just above.
            return unsafe { decode_codebook_avx512(symbols, book, out) };
        }
        if has!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above; the tables are
            // enough for the book.
            return unsafe {
                match book.len().div_ceil(8) {
                    0 | 1 => decode_codebook_avx2::<1>(symbols, book, out),
                    2 => decode_codebook_avx2::<2>(symbols, book, out),
                    3 => decode_codebook_avx2::<3>(symbols, book, out),
                    _ => decode_codebook_avx2::<4>(symbols, book, out),
                }
            };
        }
    }
    decode_codebook_portable(symbols, book, out)
}

fn decode_codebook_portable(symbols: &[u8], book: &[f32], out: &mut [f32]) {
    for (o, &s) in out.iter_mut().zip(symbols) {
        *o = book[usize::from(s)];
    }
}

/// [`decode_codebook_portable`] for a book of at most 32 entries, held in two
/// registers: one two-register permute decodes 16 symbols. Every symbol is
/// below `book.len()` (sharing writes no other; the packed reader checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_codebook_avx512(symbols: &[u8], book: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut table = [0f32; 32];
    table[..book.len()].copy_from_slice(book);
    // SAFETY: `table` holds 32 f32.
    let (low, high) = unsafe {
        (
            _mm512_loadu_ps(table.as_ptr()),
            _mm512_loadu_ps(table.as_ptr().add(16)),
        )
    };
    let n = symbols.len().min(out.len());
    let whole = n / 16 * 16;
    for at in (0..whole).step_by(16) {
        // SAFETY: `at + 16 <= whole <= n`, within both slices.
        unsafe {
            let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(symbols.as_ptr().add(at).cast()));
            let v = _mm512_permutex2var_ps(low, idx, high);
            _mm512_storeu_ps(out.as_mut_ptr().add(at), v);
        }
    }
    decode_codebook_portable(&symbols[whole..n], book, &mut out[whole..n]);
}

/// [`decode_codebook_portable`] for a book of at most `8 * TABLES` entries
/// (`TABLES` at most 4) on AVX2: eight entries to a register, each
/// permuted by the low three bits of eight symbols at once, and blends by
/// bits 3 and 4 of the symbols pick among the registers. Every symbol is
/// below `book.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_codebook_avx2<const TABLES: usize>(symbols: &[u8], book: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert!(book.len() <= 8 * TABLES && TABLES <= 4);
    let mut table = [0f32; 32];
    table[..book.len()].copy_from_slice(book);
    // SAFETY: `table` holds 32 f32.
    let t: [__m256; 4] =
        std::array::from_fn(|k| unsafe { _mm256_loadu_ps(table.as_ptr().add(8 * k)) });
    let n = symbols.len().min(out.len());
    let whole = n / 8 * 8;
    for at in (0..whole).step_by(8) {
        // SAFETY: `at + 8 <= whole <= n`, within both slices.
        unsafe {
            let idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(symbols.as_ptr().add(at).cast()));
            // The blend takes its second operand where the sign bit is set:
            // bit 3 of the symbol shifted there, then bit 4.
            let bit3 = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
            let p0 = _mm256_permutevar8x32_ps(t[0], idx);
            let v = if TABLES == 1 {
                p0
            } else {
                let p1 = _mm256_permutevar8x32_ps(t[1], idx);
                let low = _mm256_blendv_ps(p0, p1, bit3);
                if TABLES == 2 {
                    low
                } else {
                    let p2 = _mm256_permutevar8x32_ps(t[2], idx);
                    let high = if TABLES == 3 {
                        p2
                    } else {
                        _mm256_blendv_ps(p2, _mm256_permutevar8x32_ps(t[3], idx), bit3)
                    };
                    let bit4 = _mm256_castsi256_ps(_mm256_slli_epi32::<27>(idx));
                    _mm256_blendv_ps(low, high, bit4)
                }
            };
            _mm256_storeu_ps(out.as_mut_ptr().add(at), v);
        }
    }
    decode_codebook_portable(&symbols[whole..n], book, &mut out[whole..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_shape_views_the_first_dimension_as_rows() {
        assert_eq!(
            MatrixShape::of(&[4, 3, 2, 2]),
            Some(MatrixShape { rows: 4, cols: 12 })
        );
        assert_eq!(
            MatrixShape::of(&[7]),
            Some(MatrixShape { rows: 1, cols: 7 })
        );
        assert_eq!(MatrixShape::of(&[]), Some(MatrixShape { rows: 1, cols: 1 }));
        assert_eq!(MatrixShape::of(&[usize::MAX, 2]), None);
    }

    #[test]
    fn affine_symbols_round_trip_the_signed_range() {
        for bits in 2..=8u8 {
            let lo = -(1i32 << (bits - 1));
            let hi = (1i32 << (bits - 1)) - 1;
            for q in lo..=hi {
                assert_eq!(affine_q(affine_symbol(q, bits), bits), q);
            }
        }
    }

    #[test]
    fn the_e4m3_table_holds_every_codes_bits() {
        for code in 0..=255u8 {
            assert_eq!(
                e4m3_to_f32(code).to_bits(),
                e4m3_to_f32_reference(code).to_bits(),
                "code {code:#04x}"
            );
        }
    }

    #[test]
    fn e4m3_round_trips_every_finite_code() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            assert_eq!(e4m3_to_f32(back), v, "code {code:#04x}");
        }
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1e9)), 448.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(-1e9)), -448.0);
    }

    #[test]
    fn decode_into_matches_value_for_every_scheme() {
        let affine = Coded {
            symbols: vec![0, 1, 2, 3, 4, 5, 6, 7],
            bits: 3,
            group_len: 4,
            decode: Decode::Affine {
                scales: vec![0.5, 2.0],
                zero_points: vec![1, -1],
            },
        };
        let book = Coded {
            symbols: vec![0, 1, 1, 0],
            bits: 1,
            group_len: 2,
            decode: Decode::Codebook {
                entries: 2,
                values: vec![-1.0, 1.0, -3.0, 3.0],
            },
        };
        for c in [affine, book] {
            let d = c.decode();
            for (i, v) in d.iter().enumerate() {
                assert_eq!(v.to_bits(), c.value(i).to_bits());
            }
            for start in 0..d.len() {
                for len in 0..=d.len() - start {
                    let mut out = vec![0.0; len];
                    c.decode_range(start, &mut out);
                    assert_eq!(out, d[start..start + len], "range {start}+{len}");
                }
            }
        }
    }

    /// Long groups, so the vector loops of `decode_range` run, and ranges
    /// that start and end inside groups: every value has the bits of
    /// [`Coded::value`], the element-by-element definition.
    #[test]
    fn decode_range_matches_value_on_long_groups() {
        let n = 3 * 301;
        let symbols =
            |entries: usize| -> Vec<u8> { (0..n).map(|i| (i * 89 % entries) as u8).collect() };
        let book = |entries: usize| Decode::Codebook {
            entries,
            values: (0..3 * entries)
                .map(|v| (v as f32 - 300.0) * 0.01)
                .collect(),
        };
        // Codebooks of up to 32 entries take the permute path.
        let schemes = [
            (
                256,
                Decode::Affine {
                    scales: vec![0.37, 1e-3, 7.5],
                    zero_points: vec![3, -20, 0],
                },
            ),
            (256, book(256)),
            (17, book(17)),
            (32, book(32)),
            (
                256,
                Decode::Fp8 {
                    scales: vec![0.5, 2.0, 1e-2],
                },
            ),
        ];
        for (entries, decode) in schemes {
            let c = Coded {
                symbols: symbols(entries),
                bits: 8,
                group_len: 301,
                decode,
            };
            for (start, len) in [(0, n), (5, 290), (299, 305), (600, 303)] {
                let mut out = vec![0.0; len];
                c.decode_range(start, &mut out);
                for (i, v) in out.iter().enumerate() {
                    let want = c.value(start + i);
                    assert_eq!(v.to_bits(), want.to_bits(), "element {}", start + i);
                }
            }
        }
    }

    proptest::proptest! {
        /// Each x86 codebook decoder the CPU has, against the portable one,
        /// for every book size up to 32 entries (NaNs and signed zeros
        /// included: the bits must be the book's).
        #[test]
        #[cfg(target_arch = "x86_64")]
        fn codebook_decoders_match_the_portable_one(
            book in proptest::collection::vec(proptest::num::f32::ANY, 1..=32),
            seeds in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
        ) {
            use crate::cpu::has;
            let symbols: Vec<u8> = seeds.iter().map(|&s| s % book.len() as u8).collect();
            let mut expected = vec![0f32; symbols.len()];
            decode_codebook_portable(&symbols, &book, &mut expected);
            let tables = book.len().div_ceil(8);
            type Decoder = unsafe fn(&[u8], &[f32], &mut [f32]);
            let kernels: [(bool, Decoder); 5] = [
                (has!("avx2") && tables <= 1, decode_codebook_avx2::<1>),
                (has!("avx2") && tables <= 2, decode_codebook_avx2::<2>),
                (has!("avx2") && tables <= 3, decode_codebook_avx2::<3>),
                (has!("avx2"), decode_codebook_avx2::<4>),
                (has!("avx512f"), decode_codebook_avx512),
            ];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (_, kernel) in kernels.into_iter().filter(|&(present, _)| present) {
                let mut out = vec![1.5f32; symbols.len()];
                // SAFETY: the CPU has the kernel's features, checked above,
                // and the book fits its tables.
                unsafe { kernel(&symbols, &book, &mut out) };
                proptest::prop_assert_eq!(bits(&out), bits(&expected));
            }
        }
    }

    #[test]
    fn the_zero_symbol_decodes_to_zero() {
        let c = Coded {
            symbols: vec![0; 4],
            bits: 4,
            group_len: 2,
            decode: Decode::Affine {
                scales: vec![0.1, 0.2],
                zero_points: vec![3, -2],
            },
        };
        for g in 0..2 {
            let s = c.zero_symbol(g).unwrap();
            let mut probe = c.clone();
            probe.symbols[g * 2] = s;
            assert_eq!(probe.value(g * 2), 0.0);
        }
    }
}
