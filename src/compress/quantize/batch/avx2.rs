//! The batch search ([`super`]) for 8 groups in AVX2 registers, for CPUs
//! without AVX-512.
//!
//! What AVX-512 has and AVX2 lacks, and what stands in for it:
//! - mask registers: the lanes a step concerns are a bitmask (`u32`, read
//!   with `vmovmskps`/`vmovmskpd`), turned back into a vector mask
//!   ([`lane_mask`]) where a blend needs one;
//! - `vscalefps`: `W = w · 2^-exponent` as an f64 product
//!   ([`split_w`]);
//! - masked loads and byte stores: `vmaskmovps` for the last rows of a
//!   group and a packed store of whole rows ([`store_symbols`]);
//! - 16 lanes: an 8×8 transpose ([`transpose8`]).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::super::narrow::{bracketed, halves_f64, split_w};
use super::super::*;
use super::{batch_serves, canonical, each_half, finish, fold, symmetric_choices, Lane, BATCH_MAX};

/// Groups per batch: the f32 lanes of a register.
pub(super) const GROUPS: usize = 8;

/// Eight f64: the low four lanes of a register of f32, and the high four.
type Halves = [__m256d; 2];

/// Eight f64 as f32, each rounded.
#[inline]
#[target_feature(enable = "avx2")]
fn narrow_f32(v: Halves) -> __m256 {
    _mm256_set_m128(_mm256_cvtpd_ps(v[1]), _mm256_cvtpd_ps(v[0]))
}

/// The lanes set in `bits` (the low eight) as a vector mask.
#[inline]
#[target_feature(enable = "avx2")]
fn lane_mask(bits: u32) -> __m256 {
    let bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let set = _mm256_and_si256(_mm256_set1_epi32(bits as i32), bit);
    _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, bit))
}

/// [`lane_mask`] for the two halves of eight f64.
#[inline]
#[target_feature(enable = "avx2")]
fn lane_mask_pd(bits: u32) -> Halves {
    let bit = _mm256_setr_epi64x(1, 2, 4, 8);
    let half = |b: u32| {
        let set = _mm256_and_si256(_mm256_set1_epi64x(i64::from(b & 0xf)), bit);
        _mm256_castsi256_pd(_mm256_cmpeq_epi64(set, bit))
    };
    [half(bits), half(bits >> 4)]
}

/// The lanes of a vector mask of f32 as bits.
#[inline]
#[target_feature(enable = "avx")]
fn bits_ps(m: __m256) -> u32 {
    _mm256_movemask_ps(m) as u32
}

/// The lanes of a vector mask of eight f64 as bits.
#[inline]
#[target_feature(enable = "avx")]
fn bits_pd(m: Halves) -> u32 {
    _mm256_movemask_pd(m[0]) as u32 | (_mm256_movemask_pd(m[1]) as u32) << 4
}

/// `a < b` of each f64 lane, ordered, as bits.
#[inline]
#[target_feature(enable = "avx")]
fn less_pd(a: Halves, b: Halves) -> u32 {
    bits_pd(each_half(|h| _mm256_cmp_pd::<_CMP_LT_OQ>(a[h], b[h])))
}

/// The first `count` (at most 8) lanes as an integer vector mask.
#[inline]
#[target_feature(enable = "avx2")]
fn first_lanes(count: usize) -> __m256i {
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), index)
}

/// Eight registers transposed: lane `j` of register `i` of the result is
/// lane `i` of register `j` of `r` (24 shuffles).
#[inline]
#[target_feature(enable = "avx")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs interleaved by 32 bits: each 128-bit lane of `a[2k]` holds
    // elements 0 and 1 (of that lane) of registers `2k` and `2k + 1`, of
    // `a[2k + 1]` elements 2 and 3.
    let a: [__m256; 8] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(x, y)
        } else {
            _mm256_unpackhi_ps(x, y)
        }
    });
    // Then by 64 bits: each 128-bit lane of `b[4k + j]` holds element `j`
    // of registers `4k .. 4k + 4`.
    let b: [__m256; 8] = std::array::from_fn(|i| {
        let base = i & !3;
        let (x, y) = (a[base + (i & 3) / 2], a[base + 2 + (i & 3) / 2]);
        if i % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(x, y)
        } else {
            _mm256_shuffle_ps::<0xee>(x, y)
        }
    });
    // Then the 128-bit lanes of registers four apart.
    std::array::from_fn(|i| {
        let (x, y) = (b[i % 4], b[i % 4 + 4]);
        if i < 4 {
            _mm256_permute2f128_ps::<0x20>(x, y)
        } else {
            _mm256_permute2f128_ps::<0x31>(x, y)
        }
    })
}

/// What the passes need of the lanes, as registers. Lanes not served
/// compute with scale 1 and `Q = 1`, and are never read.
struct LaneVectors {
    /// The lanes the batch serves so far.
    served: u32,
    /// `2^-exponent` of each lane's `Q`.
    inverse_q: Halves,
    /// `Q` of each lane.
    q: Halves,
    /// The min-max scale of each lane.
    minmax: __m256,
}

impl LaneVectors {
    #[inline]
    #[target_feature(enable = "avx")]
    fn of(lanes: &[Lane; GROUPS]) -> Self {
        let mut served = 0;
        let (mut inverse_q, mut q, mut minmax) =
            ([1.0f64; GROUPS], [1.0f64; GROUPS], [1.0f32; GROUPS]);
        for (g, lane) in lanes.iter().enumerate() {
            if let Some(e) = lane.exponent {
                served |= 1 << g;
                inverse_q[g] = power_of_two(-e);
                q[g] = power_of_two(e);
                minmax[g] = lane.minmax.scale;
            }
        }
        let load = |v: &[f64; GROUPS]| {
            // SAFETY: each array holds 8 f64.
            unsafe {
                [
                    _mm256_loadu_pd(v.as_ptr()),
                    _mm256_loadu_pd(v.as_ptr().add(4)),
                ]
            }
        };
        LaneVectors {
            served,
            inverse_q: load(&inverse_q),
            q: load(&q),
            // SAFETY: the array holds 8 f32.
            minmax: unsafe { _mm256_loadu_ps(minmax.as_ptr()) },
        }
    }
}

/// [`candidate_scale`] of each lane's min-max scale at `step`: the same
/// f32 product.
#[inline]
#[target_feature(enable = "avx")]
fn candidate_scales(minmax: __m256, step: u16) -> __m256 {
    _mm256_mul_ps(minmax, _mm256_set1_ps(candidate_scale(1.0, step)))
}

/// Value `i` of `a`'s lanes in the low 16 bits of each 32-bit lane and of
/// `b`'s in the high 16 bits (each the low 16 bits of its lane).
#[inline]
#[target_feature(enable = "avx2")]
fn pair16(a: __m256i, b: __m256i) -> __m256i {
    _mm256_blend_epi16::<0xaa>(a, _mm256_slli_epi32::<16>(b))
}

/// The 8 groups' values, lane `g` of row `i` value `i` of group `g`, and
/// the halves of their `W` in pairs of rows, ready for `vpmaddwd`.
struct Rows {
    n: usize,
    values: [MaybeUninit<__m256>; BATCH_MAX],
    high: [MaybeUninit<__m256i>; BATCH_MAX / 2],
    low: [MaybeUninit<__m256i>; BATCH_MAX / 2],
}

impl Rows {
    /// No rows yet: [`Rows::gather`] writes them.
    fn uninit() -> Self {
        Rows {
            n: 0,
            values: [const { MaybeUninit::uninit() }; BATCH_MAX],
            high: [const { MaybeUninit::uninit() }; BATCH_MAX / 2],
            low: [const { MaybeUninit::uninit() }; BATCH_MAX / 2],
        }
    }

    /// Row `i`.
    ///
    /// # Safety
    /// [`Rows::gather`] wrote it: `i < n`.
    #[inline(always)]
    unsafe fn row(&self, i: usize) -> __m256 {
        // SAFETY: as required of the caller.
        unsafe { self.values[i].assume_init() }
    }

    /// The rows of the 8 groups of `n` values in `w`, and each group's
    /// [`Span`], lane by lane as [`Span::with`] takes it (strict
    /// comparisons, a flag for an all-ones exponent).
    ///
    /// # Safety
    /// `w` holds 8 groups of `n` values, `n` even and at most
    /// [`BATCH_MAX`]; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn gather(&mut self, w: &[f32], n: usize) -> [Span; GROUPS] {
        debug_assert!(w.len() == GROUPS * n && n.is_multiple_of(2) && n <= BATCH_MAX);
        self.n = n;
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut special = _mm256_setzero_si256();
        let exponent = _mm256_set1_epi32(0x7f80_0000);
        let mut at = 0;
        while at < n {
            let count = (n - at).min(GROUPS);
            let mask = first_lanes(count);
            // SAFETY: values `at .. at + count` of group `g` are inside
            // `w` (`at + count <= n`, `g < 8`); the masked load reads only
            // those.
            let block = std::array::from_fn(|g| unsafe {
                let p = w.as_ptr().add(g * n + at);
                if count == GROUPS {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, mask)
                }
            });
            for (row, &x) in self.values[at..at + count]
                .iter_mut()
                .zip(&transpose8(block))
            {
                row.write(x);
                lo = _mm256_min_ps(x, lo);
                hi = _mm256_max_ps(x, hi);
                // An all-ones exponent carries into bit 31.
                let e = _mm256_and_si256(_mm256_castps_si256(x), exponent);
                special =
                    _mm256_or_si256(special, _mm256_add_epi32(e, _mm256_set1_epi32(0x0080_0000)));
            }
            at += count;
        }
        let (mut l, mut h) = ([0.0f32; GROUPS], [0.0f32; GROUPS]);
        // SAFETY: each array holds 8 f32.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let special = bits_ps(_mm256_castsi256_ps(special));
        std::array::from_fn(|g| Span {
            lo: l[g],
            hi: h[g],
            all_finite: special & (1 << g) == 0,
        })
    }

    /// The halves of `W = w · inverse_q` ([`split_w`]), in pairs of rows.
    ///
    /// # Safety
    /// After [`Rows::gather`]; the CPU has AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn split(&mut self, inverse_q: Halves) {
        for j in 0..self.n / 2 {
            // SAFETY: `gather` wrote the first `n` rows.
            let (a, b) = unsafe { (self.row(2 * j), self.row(2 * j + 1)) };
            let ((ha, la), (hb, lb)) = (split_w(a, inverse_q), split_w(b, inverse_q));
            self.high[j].write(pair16(ha, hb));
            self.low[j].write(pair16(la, lb));
        }
    }

    /// Σ w² of each lane in the canonical order (see [`Rows::canonical`]).
    /// `w²` is exact in f64, so the fused multiply-add rounds as the
    /// separate product and sum do.
    ///
    /// # Safety
    /// After [`Rows::gather`]; the CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_sq(&self) -> Halves {
        // SAFETY: as required of the caller.
        unsafe {
            self.canonical(|a, x| {
                let x = halves_f64(x);
                each_half(|h| _mm256_fmadd_pd(x[h], x[h], a[h]))
            })
        }
    }

    /// Sums of each lane in the canonical order: `add(acc, row)` adds row
    /// `i`'s term to accumulator `i % 8`; the accumulators are then folded
    /// as [`fold_lanes`] does (one block: groups are shorter than
    /// [`BLOCK`]).
    ///
    /// # Safety
    /// After [`Rows::gather`]; the CPU has AVX.
    #[inline(always)]
    unsafe fn canonical(&self, add: impl FnMut(Halves, __m256) -> Halves) -> Halves {
        // SAFETY: as required of the caller.
        let acc = unsafe { canonical(&self.values[..self.n], [_mm256_setzero_pd(); 2], add) };
        // SAFETY: as required of the caller.
        unsafe { fold_rows(acc) }
    }

    /// `d = clamp(round(w / s))` of a row as `ROUND_MAGIC + d`, from the
    /// lower product of the [`Bracket`] of `s` (`rlo`): where the two
    /// products of every value agree, as they do at every candidate scale
    /// of a served lane, that is the quotient's rounding.
    #[inline]
    #[target_feature(enable = "avx,fma")]
    fn magic_d(x: __m256, rlo: __m256, r: IntRange) -> __m256 {
        let magic = _mm256_set1_ps(ROUND_MAGIC);
        let (lo, hi) = (
            _mm256_set1_ps(ROUND_MAGIC + r.qmin as f32),
            _mm256_set1_ps(ROUND_MAGIC + r.qmax as f32),
        );
        _mm256_min_ps(_mm256_max_ps(_mm256_fmadd_ps(x, rlo, magic), lo), hi)
    }

    /// Σ (w - w')² of each lane in the canonical order, `w' = d · scale`
    /// in f32 with `d` rounded at `round_scale`, as `sq_error_avx2` in
    /// `narrow` takes it for one group (a product, then a sum: no fused
    /// multiply-add, the square of a difference rounds): for two pairs
    /// `(round_scale, scale)` in one pass.
    ///
    /// # Safety
    /// After [`Rows::gather`]; every `round_scale` is a candidate scale of
    /// its lane; the CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sq_errors(&self, scales: [(__m256, __m256); 2], r: IntRange) -> [Halves; 2] {
        let rlo = scales.map(|(round_scale, _)| brackets(round_scale).0);
        let magic = _mm256_set1_ps(ROUND_MAGIC);
        let zero = [[_mm256_setzero_pd(); 2]; 2];
        // SAFETY: as required of the caller.
        let acc = unsafe {
            canonical(&self.values[..self.n], zero, |a: [Halves; 2], x| {
                let wide = halves_f64(x);
                std::array::from_fn(|k| {
                    let d = _mm256_sub_ps(Self::magic_d(x, rlo[k], r), magic);
                    let v = halves_f64(_mm256_mul_ps(d, scales[k].1));
                    each_half(|h| {
                        let t = _mm256_sub_pd(wide[h], v[h]);
                        _mm256_add_pd(a[k][h], _mm256_mul_pd(t, t))
                    })
                })
            })
        };
        std::array::from_fn(|k| fold_rows(acc.map(|a| a[k])))
    }

    /// The symbols `q - qmin` of the lanes in `lanes`, rounded at
    /// `round_scale`, into their groups in `out`: eight rows at a time
    /// transposed back, eight bytes per group.
    ///
    /// # Safety
    /// As [`Rows::sq_errors`]; `out` holds 8 groups of `n`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn write_symbols(&self, out: &mut [u8], round_scale: __m256, lanes: u32, r: IntRange) {
        let n = self.n;
        debug_assert!(out.len() == GROUPS * n);
        let (rlo, _) = brackets(round_scale);
        // `ROUND_MAGIC + d` minus the bits of `ROUND_MAGIC + qmin` is
        // `d - qmin`, the symbol (`d` within 2^14, see `fit_lanes`).
        let base = _mm256_set1_epi32((ROUND_MAGIC + r.qmin as f32).to_bits() as i32);
        let mut at = 0;
        while at < n {
            let count = (n - at).min(GROUPS);
            let block: [__m256; GROUPS] = std::array::from_fn(|j| {
                if j < count {
                    // SAFETY: `gather` wrote the first `n` rows.
                    let x = unsafe { self.row(at + j) };
                    let y = _mm256_castps_si256(Self::magic_d(x, rlo, r));
                    _mm256_castsi256_ps(_mm256_sub_epi32(y, base))
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (g, v) in transpose8(block).into_iter().enumerate() {
                if lanes & (1 << g) != 0 {
                    store_symbols(&mut out[g * n + at..][..count], v);
                }
            }
            at += count;
        }
    }
}

/// The first `out.len()` (at most 8) lanes of `v`, integers in `0..=255`,
/// as bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn store_symbols(out: &mut [u8], v: __m256) {
    let v = _mm256_castps_si256(v);
    let words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let bytes = _mm_packus_epi16(words, words);
    if out.len() == GROUPS {
        // SAFETY: `out` holds 8 bytes.
        unsafe { _mm_storel_epi64(out.as_mut_ptr().cast(), bytes) };
    } else {
        let mut all = [0u8; 16];
        // SAFETY: `all` holds 16 bytes.
        unsafe { _mm_storeu_si128(all.as_mut_ptr().cast(), bytes) };
        out.copy_from_slice(&all[..out.len()]);
    }
}

/// Eight accumulators of each lane folded as [`fold_lanes`] does.
#[inline]
#[target_feature(enable = "avx")]
fn fold_rows(acc: [Halves; LANES]) -> Halves {
    fold(acc, |a, b| each_half(|h| _mm256_add_pd(a[h], b[h])))
}

/// One candidate's sums for every lane, as f64, and the lanes where some
/// value's two products rounded apart.
struct LaneFit {
    wd: Halves,
    dd: Halves,
    miss: u32,
}

/// The [`Bracket`] of each lane's scale, computed as [`Bracket::of`] does.
#[inline]
#[target_feature(enable = "avx2")]
fn brackets(s: __m256) -> (__m256, __m256) {
    let s = halves_f64(s);
    let r = each_half(|h| _mm256_div_pd(_mm256_set1_pd(1.0), s[h]));
    let e = power_of_two(-22);
    let times = |f: f64| narrow_f32(each_half(|h| _mm256_mul_pd(r[h], _mm256_set1_pd(f))));
    (times(1.0 - e), times(1.0 + e))
}

/// The low and high four i32 of `v` as f64.
#[inline]
#[target_feature(enable = "avx2")]
fn i32_halves(v: __m256i) -> Halves {
    [
        _mm256_cvtepi32_pd(_mm256_castsi256_si128(v)),
        _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(v)),
    ]
}

/// One candidate's fits for every lane: `s` its scales, `q` each lane's
/// `Q` as f64.
///
/// # Safety
/// After [`Rows::split`]; the CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fit_lanes(rows: &Rows, s: __m256, q: Halves, r: IntRange) -> LaneFit {
    let (rlo, rhi) = brackets(s);
    let (dlo, dhi) = (
        _mm256_set1_epi16(r.qmin as i16),
        _mm256_set1_epi16(r.qmax as i16),
    );
    let mut miss = _mm256_setzero_ps();
    let (mut high, mut low, mut dd) = (
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
    );
    let mut rounded = |x: __m256| _mm256_castps_si256(bracketed(x, rlo, rhi, &mut miss));
    for j in 0..rows.n / 2 {
        // SAFETY: rows `2j`, `2j + 1` and pair `j` were written by
        // `gather` and `split`.
        let (a, b, h, l) = unsafe {
            (
                rows.row(2 * j),
                rows.row(2 * j + 1),
                rows.high[j].assume_init(),
                rows.low[j].assume_init(),
            )
        };
        // `ROUND_MAGIC + d` has `ROUND_MAGIC`'s exponent (`|d| < 2^14`)
        // and low 16 bits all zero: its low 16 bits are `d`.
        let d = pair16(rounded(a), rounded(b));
        let d = _mm256_min_epi16(_mm256_max_epi16(d, dlo), dhi);
        high = _mm256_add_epi32(high, _mm256_madd_epi16(d, h));
        low = _mm256_add_epi32(low, _mm256_madd_epi16(d, l));
        dd = _mm256_add_epi32(dd, _mm256_madd_epi16(d, d));
    }
    let (high, low) = (i32_halves(high), i32_halves(low));
    let shift = _mm256_set1_pd(power_of_two(15));
    let agree = _mm256_cmpeq_epi32(_mm256_castps_si256(miss), _mm256_setzero_si256());
    LaneFit {
        // `2^15 · high + low` is the exact integer `Σ W·d` (below 2^53),
        // times the power of two `Q`: exact.
        wd: each_half(|h| _mm256_mul_pd(_mm256_fmadd_pd(high[h], shift, low[h]), q[h])),
        dd: i32_halves(dd),
        miss: !bits_ps(_mm256_castsi256_ps(agree)) & 0xff,
    }
}

/// Each lane's best candidate so far, as [`Candidates::best`] ranks them:
/// a candidate's plain scale and then its least-squares one, replacing the
/// best only when strictly smaller (the sequential scan it is proved equal
/// to, `Candidates::best_reference`).
struct Ranking {
    err: Halves,
    round_scale: __m256,
    scale: __m256,
    /// Lanes with a finite error.
    found: u32,
}

impl Ranking {
    #[inline]
    #[target_feature(enable = "avx")]
    fn new() -> Self {
        Ranking {
            err: [_mm256_set1_pd(f64::INFINITY); 2],
            round_scale: _mm256_setzero_ps(),
            scale: _mm256_setzero_ps(),
            found: 0,
        }
    }

    /// Offers a candidate of scales `s` with its fits.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn offer(&mut self, sum_sq: Halves, f: &LaneFit, s: __m256, bits: u8) {
        // `model_error`: sum_sq - 2·s·wd + s·s·dd, in that order.
        let error = |s: Halves| {
            each_half(|h| {
                let two_s = _mm256_mul_pd(_mm256_set1_pd(2.0), s[h]);
                let t = _mm256_sub_pd(sum_sq[h], _mm256_mul_pd(two_s, f.wd[h]));
                _mm256_add_pd(t, _mm256_mul_pd(_mm256_mul_pd(s[h], s[h]), f.dd[h]))
            })
        };
        let mut take = |err: Halves, round_scale: __m256, scale: __m256, allowed: u32| {
            let m = allowed & less_pd(err, self.err);
            let mp = lane_mask_pd(m);
            self.err = each_half(|h| _mm256_blendv_pd(self.err[h], err[h], mp[h]));
            let ms = lane_mask(m);
            self.round_scale = _mm256_blendv_ps(self.round_scale, round_scale, ms);
            self.scale = _mm256_blendv_ps(self.scale, scale, ms);
            self.found |= m;
        };
        take(error(halves_f64(s)), s, s, 0xff);
        // The least-squares scale `wd / dd` as f32, where `dd > 0` and it
        // is positive, kept in `bounded_scale`'s range.
        let ls = narrow_f32(each_half(|h| _mm256_div_pd(f.wd[h], f.dd[h])));
        let zero = _mm256_setzero_pd();
        let has = less_pd([zero; 2], f.dd)
            & bits_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(ls, _mm256_setzero_ps()));
        let ls = _mm256_min_ps(
            _mm256_max_ps(ls, _mm256_set1_ps(f32::MIN_POSITIVE)),
            _mm256_set1_ps(f32::MAX / f32::from(1u16 << bits)),
        );
        take(error(halves_f64(ls)), s, ls, has);
    }
}

/// The choices and symbols of 8 neighbouring groups of `n` values: `w`
/// and `out` hold 8·n, `choices` 8. The same choices and symbols as
/// `quantize_group` gives each group alone.
///
/// # Safety
/// [`batch_serves`] holds for `n` and `p`; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_batch(
    w: &[f32],
    out: &mut [u8],
    choices: &mut [Choice],
    p: &IntQuant,
    r: IntRange,
) {
    let n = w.len() / GROUPS;
    debug_assert!(batch_serves(n, p) && w.len() == GROUPS * n && out.len() == w.len());
    // SAFETY: as required of the caller.
    let (served, chosen) = unsafe { quantize_lanes(w, out, n, p, r) };
    finish(w, out, choices, served, &chosen, |w, out| {
        // SAFETY: as above.
        unsafe { quantize_group_avx2(w, out, p, r) }
    });
}

/// The search of the 8 groups lane by lane: which lanes it served to the
/// end, their choices, and their symbols written to `out` (the other
/// groups' symbols are left alone).
///
/// # Safety
/// `w` and `out` hold 8 groups of `n` values and [`batch_serves`] holds
/// for `n` and `p`; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_lanes(
    w: &[f32],
    out: &mut [u8],
    n: usize,
    p: &IntQuant,
    r: IntRange,
) -> (u32, [Choice; GROUPS]) {
    let mut rows = Rows::uninit();
    // SAFETY: `w` holds 8 groups of `n`, `n` as `batch_serves` needs; the
    // CPU features are required of the caller.
    let spans = unsafe { rows.gather(w, n) };
    let lanes = spans.map(|span| Lane::of(n, span, p, r));
    let chosen = lanes.map(|l| l.minmax);
    let v = LaneVectors::of(&lanes);
    let mut served = v.served;
    if served == 0 {
        return (served, chosen);
    }
    let minmax = v.minmax;
    // SAFETY: as above.
    let (round_scale, scale) = unsafe {
        rows.split(v.inverse_q);
        let sum_sq = rows.sum_sq();
        let mut ranking = Ranking::new();
        for step in 0..=SHRINK_STEPS {
            let s = candidate_scales(minmax, step);
            let fit = fit_lanes(&rows, s, v.q, r);
            served &= !fit.miss;
            ranking.offer(sum_sq, &fit, s, p.bits);
        }
        // As in `search_choice`: no finite error leaves min-max; a best
        // that differs from min-max is kept only if its direct error is
        // strictly smaller. Every round scale here is a candidate's, whose
        // bracket agreed at every value of a served lane.
        let found = lane_mask(ranking.found);
        let best_round = _mm256_blendv_ps(minmax, ranking.round_scale, found);
        let best_scale = _mm256_blendv_ps(minmax, ranking.scale, found);
        let differs = bits_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(best_round, minmax))
            | bits_ps(_mm256_cmp_ps::<_CMP_NEQ_UQ>(best_scale, minmax));
        let [e_best, e_minmax] = rows.sq_errors([(best_round, best_scale), (minmax, minmax)], r);
        let not_smaller = bits_pd(each_half(|h| {
            _mm256_cmp_pd::<_CMP_GE_OQ>(e_best[h], e_minmax[h])
        }));
        let keep_minmax = lane_mask(differs & not_smaller);
        let round_scale = _mm256_blendv_ps(best_round, minmax, keep_minmax);
        let scale = _mm256_blendv_ps(best_scale, minmax, keep_minmax);
        rows.write_symbols(out, round_scale, served, r);
        (round_scale, scale)
    };
    let (mut rs, mut sc) = ([0.0f32; GROUPS], [0.0f32; GROUPS]);
    // SAFETY: each array holds 8 f32.
    unsafe {
        _mm256_storeu_ps(rs.as_mut_ptr(), round_scale);
        _mm256_storeu_ps(sc.as_mut_ptr(), scale);
    }
    (served, symmetric_choices(rs, sc))
}

/// How many of the 8 groups in `w` the batch fits itself.
///
/// # Safety
/// As [`quantize_batch`].
#[cfg(test)]
pub(super) unsafe fn served_lanes(w: &[f32], p: &IntQuant) -> u32 {
    let mut out = vec![0u8; w.len()];
    // SAFETY: as required of the caller; `out` holds 8 groups of `n`.
    unsafe { quantize_lanes(w, &mut out, w.len() / GROUPS, p, IntRange::of(p.bits)) }
        .0
        .count_ones()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_registers_transpose() {
        if !has_avx2() {
            return;
        }
        let m: Vec<f32> = (0..64).map(|i| i as f32).collect();
        // SAFETY: the CPU has AVX2; each load reads 8 of the 64.
        let t = unsafe {
            transpose8(std::array::from_fn(|i| {
                _mm256_loadu_ps(m.as_ptr().add(8 * i))
            }))
        };
        for (i, r) in t.iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *r) };
            let expected: Vec<f32> = (0..8).map(|j| (8 * j + i) as f32).collect();
            assert_eq!(lanes.to_vec(), expected, "row {i}");
        }
    }

    #[test]
    fn lane_masks_round_trip() {
        if !has_avx2() {
            return;
        }
        for bits in 0..256u32 {
            // SAFETY: the CPU has AVX2.
            let (ps, pd) = unsafe { (bits_ps(lane_mask(bits)), bits_pd(lane_mask_pd(bits))) };
            assert_eq!((ps, pd), (bits, bits), "{bits:#b}");
        }
        for count in 0..=8 {
            // SAFETY: as above.
            let m = unsafe { bits_ps(_mm256_castsi256_ps(first_lanes(count))) };
            assert_eq!(m, (1 << count) - 1, "{count}");
        }
    }
}
