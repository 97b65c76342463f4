//! The batch search ([`super`]) for 16 groups in AVX-512 registers.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::super::wide::{bracketed, halves_f64, split_w};
use super::super::*;
use super::{batch_serves, canonical, each_half, finish, fold, symmetric_choices, Lane, BATCH_MAX};

/// Groups per batch: the f32 lanes of a register.
pub(super) const GROUPS: usize = 16;

/// What the passes need of the lanes, as registers. Lanes not served
/// compute with scale 1 and `Q = 1`, and are never read.
struct LaneVectors {
    /// The lanes the batch serves so far.
    served: u16,
    /// `-exponent` of each lane's `Q`.
    minus_exponents: __m512,
    /// `Q` of each lane.
    q: [__m512d; 2],
    /// The min-max scale of each lane.
    minmax: __m512,
}

impl LaneVectors {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn of(lanes: &[Lane; GROUPS]) -> Self {
        let mut served: u16 = 0;
        let (mut exponents, mut q, mut minmax) =
            ([0.0f32; GROUPS], [1.0f64; GROUPS], [1.0f32; GROUPS]);
        for (g, lane) in lanes.iter().enumerate() {
            if let Some(e) = lane.exponent {
                served |= 1 << g;
                exponents[g] = -e as f32;
                q[g] = power_of_two(e);
                minmax[g] = lane.minmax.scale;
            }
        }
        // SAFETY: each array holds 16 values.
        unsafe {
            LaneVectors {
                served,
                minus_exponents: _mm512_loadu_ps(exponents.as_ptr()),
                q: [
                    _mm512_loadu_pd(q.as_ptr()),
                    _mm512_loadu_pd(q.as_ptr().add(8)),
                ],
                minmax: _mm512_loadu_ps(minmax.as_ptr()),
            }
        }
    }
}

/// [`candidate_scale`] of each lane's min-max scale at `step`: the same
/// f32 product.
#[inline]
#[target_feature(enable = "avx512f")]
fn candidate_scales(minmax: __m512, step: u16) -> __m512 {
    _mm512_mul_ps(minmax, _mm512_set1_ps(candidate_scale(1.0, step)))
}

/// The first `count` (at most 16) lanes.
#[inline(always)]
fn first_lanes(count: usize) -> __mmask16 {
    (((1u32 << count) - 1) & 0xffff) as __mmask16
}

/// The 16 groups' values, lane `g` of row `i` value `i` of group `g`, and
/// the halves of their `W` in pairs of rows, ready for `vpmaddwd`.
struct Rows {
    n: usize,
    values: [MaybeUninit<__m512>; BATCH_MAX],
    high: [MaybeUninit<__m512i>; BATCH_MAX / 2],
    low: [MaybeUninit<__m512i>; BATCH_MAX / 2],
}

/// Value `i` of `a`'s lanes in the low 16 bits of each 32-bit lane and of
/// `b`'s in the high 16 bits (each the low 16 bits of its lane).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn pair16(a: __m512i, b: __m512i) -> __m512i {
    _mm512_mask_blend_epi16(0xaaaa_aaaa, a, _mm512_slli_epi32::<16>(b))
}

/// Two registers of eight f64 as one of sixteen f32, each rounded.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn narrow_f32(v: [__m512d; 2]) -> __m512 {
    _mm512_insertf32x8::<1>(
        _mm512_castps256_ps512(_mm512_cvtpd_ps(v[0])),
        _mm512_cvtpd_ps(v[1]),
    )
}

/// Sixteen registers transposed: lane `j` of register `i` of the result is
/// lane `i` of register `j` of `r` (64 shuffles).
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    // Pairs of registers interleaved by 32 bits, then by 64 bits: each
    // 128-bit lane of `b[4k + j]` holds element `4·lane + j` of registers
    // `4k .. 4k + 4`.
    let a: [__m512; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    let b: [__m512; 16] = std::array::from_fn(|i| {
        let base = i & !3;
        let (x, y) = (a[base + (i & 2) / 2], a[base + 2 + (i & 2) / 2]);
        if i % 2 == 0 {
            ps(_mm512_unpacklo_pd(pd(x), pd(y)))
        } else {
            ps(_mm512_unpackhi_pd(pd(x), pd(y)))
        }
    });
    // Then whole 128-bit lanes: the even lanes of two registers four apart
    // and the odd ones, twice.
    let c: [__m512; 16] = std::array::from_fn(|i| {
        let base = (i / 8) * 8 + i % 4;
        let (x, y) = (b[base], b[base + 4]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(x, y)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(x, y)
        }
    });
    std::array::from_fn(|i| {
        let (x, y) = (c[i % 8], c[i % 8 + 8]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(x, y)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(x, y)
        }
    })
}

/// Two 8-lane masks as one of 16 lanes.
#[inline(always)]
fn mask16(m: [__mmask8; 2]) -> __mmask16 {
    u16::from(m[0]) | (u16::from(m[1]) << 8)
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

    /// The rows of the 16 groups of `n` values in `w`, and each group's
    /// [`Span`], lane by lane as [`Span::with`] takes it (strict
    /// comparisons, a flag for an all-ones exponent).
    ///
    /// # Safety
    /// `w` holds 16 groups of `n` values, `n` even and at most
    /// [`BATCH_MAX`]; the CPU has AVX-512 F and BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn gather(&mut self, w: &[f32], n: usize) -> [Span; GROUPS] {
        debug_assert!(w.len() == GROUPS * n && n.is_multiple_of(2) && n <= BATCH_MAX);
        self.n = n;
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut special = _mm512_setzero_si512();
        let exponent = _mm512_set1_epi32(0x7f80_0000);
        let mut at = 0;
        while at < n {
            let count = (n - at).min(16);
            let mask = first_lanes(count);
            // SAFETY: the mask reads values `at .. at + count` of group
            // `g`, inside `w` (`at + count <= n`, `g < 16`).
            let block = std::array::from_fn(|g| unsafe {
                _mm512_maskz_loadu_ps(mask, w.as_ptr().add(g * n + at))
            });
            let block = transpose16(block);
            for (row, &x) in self.values[at..at + count].iter_mut().zip(&block) {
                row.write(x);
                lo = _mm512_min_ps(x, lo);
                hi = _mm512_max_ps(x, hi);
                // An all-ones exponent carries into bit 31.
                let e = _mm512_and_si512(_mm512_castps_si512(x), exponent);
                special =
                    _mm512_or_si512(special, _mm512_add_epi32(e, _mm512_set1_epi32(0x0080_0000)));
            }
            at += count;
        }
        let (mut l, mut h) = ([0.0f32; GROUPS], [0.0f32; GROUPS]);
        // SAFETY: each array holds 16 f32.
        unsafe {
            _mm512_storeu_ps(l.as_mut_ptr(), lo);
            _mm512_storeu_ps(h.as_mut_ptr(), hi);
        }
        let finite = !_mm512_movepi32_mask(special);
        std::array::from_fn(|g| Span {
            lo: l[g],
            hi: h[g],
            all_finite: finite & (1 << g) != 0,
        })
    }

    /// The halves of `W = w · 2^-exponent` ([`split_w`]), in pairs of rows.
    ///
    /// # Safety
    /// After [`Rows::gather`]; the CPU has AVX-512 F and BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn split(&mut self, exponents: __m512) {
        let split = |x: &MaybeUninit<__m512>| {
            // SAFETY: `gather` wrote the first `n` rows.
            split_w(unsafe { x.assume_init() }, exponents)
        };
        for j in 0..self.n / 2 {
            let ((ha, la), (hb, lb)) = (split(&self.values[2 * j]), split(&self.values[2 * j + 1]));
            self.high[j].write(pair16(ha, hb));
            self.low[j].write(pair16(la, lb));
        }
    }

    /// Σ w² of each lane in the canonical order: value `i` into
    /// accumulator `i % 8`, the accumulators folded as [`fold_lanes`]
    /// does (one block: groups are shorter than [`BLOCK`]). `w²` is exact
    /// in f64, so the fused multiply-add rounds as the separate product and
    /// sum do.
    ///
    /// # Safety
    /// After [`Rows::gather`]; the CPU has AVX-512 F and DQ.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn sum_sq(&self) -> [__m512d; 2] {
        // SAFETY: as required of the caller.
        unsafe {
            self.canonical(|a, x| {
                let x = halves_f64(x);
                each_half(|h| _mm512_fmadd_pd(x[h], x[h], a[h]))
            })
        }
    }

    /// Sums of each lane in the canonical order: `add(acc, row)` adds row
    /// `i`'s term to accumulator `i % 8`; the accumulators are then folded
    /// as [`fold_lanes`] does (one block: groups are shorter than
    /// [`BLOCK`]). Eight rows per step, so the accumulators stay in
    /// registers.
    ///
    /// # Safety
    /// After [`Rows::gather`]; the CPU has AVX-512 F.
    #[inline(always)]
    unsafe fn canonical(
        &self,
        add: impl FnMut([__m512d; 2], __m512) -> [__m512d; 2],
    ) -> [__m512d; 2] {
        // SAFETY: as required of the caller.
        let acc = unsafe { canonical(&self.values[..self.n], [_mm512_setzero_pd(); 2], add) };
        // SAFETY: as required of the caller.
        unsafe { fold_rows(acc) }
    }
}

impl Rows {
    /// `d = clamp(round(w / s))` of a row as `ROUND_MAGIC + d`, from the
    /// lower product of the [`Bracket`] of `s` (`rlo`): where the two
    /// products of every value agree, as they do at every candidate scale
    /// of a served lane, that is the quotient's rounding.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn magic_d(x: __m512, rlo: __m512, r: IntRange) -> __m512 {
        let magic = _mm512_set1_ps(ROUND_MAGIC);
        let (lo, hi) = (
            _mm512_set1_ps(ROUND_MAGIC + r.qmin as f32),
            _mm512_set1_ps(ROUND_MAGIC + r.qmax as f32),
        );
        _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(x, rlo, magic), lo), hi)
    }

    /// Σ (w - w')² of each lane in the canonical order, `w' = d · scale`
    /// in f32 with `d` rounded at `round_scale`, as `sq_error_avx512` in
    /// `wide` takes it for one group (a product, then a sum: no fused
    /// multiply-add, the square of a difference rounds).
    ///
    /// # Safety
    /// After [`Rows::gather`]; every `round_scale` is a candidate scale of
    /// its lane; the CPU has AVX-512 F and DQ.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn sq_errors(&self, round_scale: __m512, scale: __m512, r: IntRange) -> [__m512d; 2] {
        let (rlo, _) = brackets(round_scale);
        let magic = _mm512_set1_ps(ROUND_MAGIC);
        // SAFETY: as required of the caller.
        unsafe {
            self.canonical(|a, x| {
                let d = _mm512_sub_ps(Self::magic_d(x, rlo, r), magic);
                let (x, v) = (halves_f64(x), halves_f64(_mm512_mul_ps(d, scale)));
                each_half(|h| {
                    let t = _mm512_sub_pd(x[h], v[h]);
                    _mm512_add_pd(a[h], _mm512_mul_pd(t, t))
                })
            })
        }
    }

    /// The symbols `q - qmin` of the lanes in `lanes`, rounded at
    /// `round_scale`, into their groups in `out`: sixteen rows at a time
    /// transposed back, sixteen bytes per group.
    ///
    /// # Safety
    /// As [`Rows::sq_errors`]; `out` holds 16 groups of `n`; the CPU has
    /// AVX-512 F, BW and DQ.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    unsafe fn write_symbols(&self, out: &mut [u8], round_scale: __m512, lanes: u16, r: IntRange) {
        let n = self.n;
        debug_assert!(out.len() == GROUPS * n);
        let (rlo, _) = brackets(round_scale);
        // `ROUND_MAGIC + d` minus the bits of `ROUND_MAGIC + qmin` is
        // `d - qmin`, the symbol (`d` within 2^14, see `fit_lanes_with`).
        let base = _mm512_set1_epi32((ROUND_MAGIC + r.qmin as f32).to_bits() as i32);
        let mut at = 0;
        while at < n {
            let count = (n - at).min(16);
            let block: [__m512; 16] = std::array::from_fn(|j| {
                if j < count {
                    // SAFETY: `gather` wrote the first `n` rows.
                    let x = unsafe { self.values[at + j].assume_init() };
                    let y = _mm512_castps_si512(Self::magic_d(x, rlo, r));
                    _mm512_castsi512_ps(_mm512_sub_epi32(y, base))
                } else {
                    _mm512_setzero_ps()
                }
            });
            let mask = first_lanes(count);
            for (g, v) in transpose16(block).into_iter().enumerate() {
                if lanes & (1 << g) != 0 {
                    // SAFETY: the mask writes bytes `at .. at + count` of
                    // group `g`, inside `out`.
                    unsafe {
                        _mm512_mask_cvtepi32_storeu_epi8(
                            out.as_mut_ptr().add(g * n + at).cast(),
                            mask,
                            _mm512_castps_si512(v),
                        )
                    };
                }
            }
            at += count;
        }
    }
}

/// Eight accumulators of each lane folded as [`fold_lanes`] does.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold_rows(acc: [[__m512d; 2]; LANES]) -> [__m512d; 2] {
    fold(acc, |a, b| each_half(|h| _mm512_add_pd(a[h], b[h])))
}

/// One candidate's sums for every lane, as f64, and the lanes where some
/// value's two products rounded apart.
struct LaneFit {
    wd: [__m512d; 2],
    dd: [__m512d; 2],
    miss: __mmask16,
}

/// The [`Bracket`] of each lane's scale, computed as [`Bracket::of`] does.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn brackets(s: __m512) -> (__m512, __m512) {
    let s = halves_f64(s);
    let r = each_half(|h| _mm512_div_pd(_mm512_set1_pd(1.0), s[h]));
    let e = power_of_two(-22);
    let times = |f: f64| narrow_f32(each_half(|h| _mm512_mul_pd(r[h], _mm512_set1_pd(f))));
    (times(1.0 - e), times(1.0 + e))
}

/// One candidate's fits for every lane: `s` its scales, `q` each lane's
/// `Q` as f64.
///
/// `dot(acc, a, b)` adds the `vpmaddwd` products of `a` and `b` to `acc`.
///
/// # Safety
/// After [`Rows::split`]; the CPU has AVX-512 F, BW and DQ.
#[inline(always)]
unsafe fn fit_lanes_with(
    rows: &Rows,
    s: __m512,
    q: [__m512d; 2],
    r: IntRange,
    dot: impl Fn(__m512i, __m512i, __m512i) -> __m512i,
) -> LaneFit {
    let (rlo, rhi) = brackets(s);
    let (dlo, dhi) = (
        _mm512_set1_epi16(r.qmin as i16),
        _mm512_set1_epi16(r.qmax as i16),
    );
    let mut miss = _mm512_setzero_si512();
    let (mut high, mut low, mut dd) = (
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
    );
    let mut rounded = |x: __m512| _mm512_castps_si512(bracketed(x, rlo, rhi, &mut miss));
    for j in 0..rows.n / 2 {
        // SAFETY: rows `2j`, `2j + 1` and pair `j` were written by
        // `gather` and `split`.
        let (a, b, h, l) = unsafe {
            (
                rows.values[2 * j].assume_init(),
                rows.values[2 * j + 1].assume_init(),
                rows.high[j].assume_init(),
                rows.low[j].assume_init(),
            )
        };
        // `ROUND_MAGIC + d` has `ROUND_MAGIC`'s exponent (`|d| < 2^14`)
        // and low 16 bits all zero: its low 16 bits are `d`.
        let d = pair16(rounded(a), rounded(b));
        let d = _mm512_min_epi16(_mm512_max_epi16(d, dlo), dhi);
        high = dot(high, d, h);
        low = dot(low, d, l);
        dd = dot(dd, d, d);
    }
    let f64_half = |v: __m512i, h: usize| {
        _mm512_cvtepi32_pd(if h == 0 {
            _mm512_castsi512_si256(v)
        } else {
            _mm512_extracti64x4_epi64::<1>(v)
        })
    };
    let shift = _mm512_set1_pd(power_of_two(15));
    LaneFit {
        // `2^15 · high + low` is the exact integer `Σ W·d` (below 2^53),
        // times the power of two `Q`: exact.
        wd: each_half(|h| {
            let w = _mm512_fmadd_pd(f64_half(high, h), shift, f64_half(low, h));
            _mm512_mul_pd(w, q[h])
        }),
        dd: each_half(|h| f64_half(dd, h)),
        miss: _mm512_test_epi32_mask(miss, miss),
    }
}

/// [`fit_lanes_with`] with a multiply-add and an add.
///
/// # Safety
/// As [`fit_lanes_with`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
unsafe fn fit_lanes(rows: &Rows, s: __m512, q: [__m512d; 2], r: IntRange) -> LaneFit {
    // SAFETY: as required of the caller.
    unsafe {
        fit_lanes_with(rows, s, q, r, |acc, a, b| {
            _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
        })
    }
}

/// [`fit_lanes_with`] with one `vpdpwssd` (the same sum, one instruction
/// instead of two).
///
/// # Safety
/// As [`fit_lanes_with`], and the CPU has AVX-512 VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
unsafe fn fit_lanes_vnni(rows: &Rows, s: __m512, q: [__m512d; 2], r: IntRange) -> LaneFit {
    // SAFETY: as required of the caller.
    unsafe { fit_lanes_with(rows, s, q, r, |acc, a, b| _mm512_dpwssd_epi32(acc, a, b)) }
}

/// Each lane's best candidate so far, as [`Candidates::best`] ranks them:
/// a candidate's plain scale and then its least-squares one, replacing the
/// best only when strictly smaller (the sequential scan it is proved equal
/// to, `Candidates::best_reference`).
struct Ranking {
    err: [__m512d; 2],
    round_scale: __m512,
    scale: __m512,
    /// Lanes with a finite error.
    found: __mmask16,
}

impl Ranking {
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn new() -> Self {
        Ranking {
            err: [_mm512_set1_pd(f64::INFINITY); 2],
            round_scale: _mm512_setzero_ps(),
            scale: _mm512_setzero_ps(),
            found: 0,
        }
    }

    /// Offers a candidate of scales `s` with its fits.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn offer(&mut self, sum_sq: [__m512d; 2], f: &LaneFit, s: __m512, bits: u8) {
        // `model_error`: sum_sq - 2·s·wd + s·s·dd, in that order.
        let error = |s: [__m512d; 2]| {
            each_half(|h| {
                let two_s = _mm512_mul_pd(_mm512_set1_pd(2.0), s[h]);
                let t = _mm512_sub_pd(sum_sq[h], _mm512_mul_pd(two_s, f.wd[h]));
                _mm512_add_pd(t, _mm512_mul_pd(_mm512_mul_pd(s[h], s[h]), f.dd[h]))
            })
        };
        let mut take =
            |err: [__m512d; 2], round_scale: __m512, scale: __m512, allowed: __mmask16| {
                let m = allowed
                    & mask16([
                        _mm512_cmp_pd_mask::<_CMP_LT_OQ>(err[0], self.err[0]),
                        _mm512_cmp_pd_mask::<_CMP_LT_OQ>(err[1], self.err[1]),
                    ]);
                self.err = [
                    _mm512_mask_blend_pd(m as __mmask8, self.err[0], err[0]),
                    _mm512_mask_blend_pd((m >> 8) as __mmask8, self.err[1], err[1]),
                ];
                self.round_scale = _mm512_mask_blend_ps(m, self.round_scale, round_scale);
                self.scale = _mm512_mask_blend_ps(m, self.scale, scale);
                self.found |= m;
            };
        take(error(halves_f64(s)), s, s, !0);
        // The least-squares scale `wd / dd` as f32, where `dd > 0` and it
        // is positive, kept in `bounded_scale`'s range.
        let ls = narrow_f32(each_half(|h| _mm512_div_pd(f.wd[h], f.dd[h])));
        let has = mask16([
            _mm512_cmp_pd_mask::<_CMP_GT_OQ>(f.dd[0], _mm512_setzero_pd()),
            _mm512_cmp_pd_mask::<_CMP_GT_OQ>(f.dd[1], _mm512_setzero_pd()),
        ]) & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(ls, _mm512_setzero_ps());
        let ls = _mm512_min_ps(
            _mm512_max_ps(ls, _mm512_set1_ps(f32::MIN_POSITIVE)),
            _mm512_set1_ps(f32::MAX / f32::from(1u16 << bits)),
        );
        take(error(halves_f64(ls)), s, ls, has);
    }
}

/// The choices and symbols of 16 neighbouring groups of `n` values: `w`
/// and `out` hold 16·n, `choices` 16. The same choices and symbols as
/// `quantize_group` gives each group alone.
///
/// # Safety
/// [`batch_serves`] holds for `n` and `p`; the CPU has AVX-512 F, BW, DQ
/// and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
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
    finish(w, out, choices, u32::from(served), &chosen, |w, out| {
        // SAFETY: as above.
        unsafe { quantize_group_avx512(w, out, p, r) }
    });
}

/// The search of the 16 groups lane by lane: which lanes it served to the
/// end, their choices, and their symbols written to `out` (the other
/// groups' symbols are left alone).
///
/// # Safety
/// `w` and `out` hold 16 groups of `n` values and [`batch_serves`] holds
/// for `n` and `p`; the CPU has AVX-512 F, BW, DQ and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn quantize_lanes(
    w: &[f32],
    out: &mut [u8],
    n: usize,
    p: &IntQuant,
    r: IntRange,
) -> (u16, [Choice; GROUPS]) {
    let mut rows = Rows::uninit();
    // SAFETY: `w` holds 16 groups of `n`, `n` as `batch_serves` needs; the
    // CPU features are required of the caller.
    let spans = unsafe { rows.gather(w, n) };
    let lanes = spans.map(|span| Lane::of(n, span, p, r));
    let chosen = lanes.map(|l| l.minmax);
    let v = LaneVectors::of(&lanes);
    let mut served = v.served;
    if served == 0 {
        return (served, chosen);
    }
    // SAFETY: as above.
    let (round_scale, scale) = unsafe {
        rows.split(v.minus_exponents);
        let minmax = v.minmax;
        let sum_sq = rows.sum_sq();
        let mut ranking = Ranking::new();
        let vnni = crate::cpu::has!("avx512vnni");
        for step in 0..=SHRINK_STEPS {
            let s = candidate_scales(minmax, step);
            let fit = if vnni {
                fit_lanes_vnni(&rows, s, v.q, r)
            } else {
                fit_lanes(&rows, s, v.q, r)
            };
            served &= !fit.miss;
            ranking.offer(sum_sq, &fit, s, p.bits);
        }
        // As in `search_choice`: no finite error leaves min-max; a best that differs
        // from min-max is kept only if its direct error is strictly
        // smaller. Every round scale here is a candidate's, whose
        // bracket agreed at every value of a served lane.
        let best_round = _mm512_mask_blend_ps(ranking.found, minmax, ranking.round_scale);
        let best_scale = _mm512_mask_blend_ps(ranking.found, minmax, ranking.scale);
        let differs = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(best_round, minmax)
            | _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(best_scale, minmax);
        let (e_best, e_minmax) = (
            rows.sq_errors(best_round, best_scale, r),
            rows.sq_errors(minmax, minmax, r),
        );
        let not_smaller = mask16([
            _mm512_cmp_pd_mask::<_CMP_GE_OQ>(e_best[0], e_minmax[0]),
            _mm512_cmp_pd_mask::<_CMP_GE_OQ>(e_best[1], e_minmax[1]),
        ]);
        let keep_minmax = differs & not_smaller;
        let round_scale = _mm512_mask_blend_ps(keep_minmax, best_round, minmax);
        let scale = _mm512_mask_blend_ps(keep_minmax, best_scale, minmax);
        rows.write_symbols(out, round_scale, served, r);
        (round_scale, scale)
    };
    let (mut rs, mut sc) = ([0.0f32; GROUPS], [0.0f32; GROUPS]);
    // SAFETY: each array holds 16 f32.
    unsafe {
        _mm512_storeu_ps(rs.as_mut_ptr(), round_scale);
        _mm512_storeu_ps(sc.as_mut_ptr(), scale);
    }
    (served, symmetric_choices(rs, sc))
}

/// How many of the 16 groups in `w` the batch fits itself.
///
/// # Safety
/// As [`quantize_batch`].
#[cfg(test)]
pub(super) unsafe fn served_lanes(w: &[f32], p: &IntQuant) -> u32 {
    let mut out = vec![0u8; w.len()];
    // SAFETY: as required of the caller; `out` holds 16 groups of `n`.
    unsafe { quantize_lanes(w, &mut out, w.len() / GROUPS, p, IntRange::of(p.bits)) }
        .0
        .count_ones()
}

#[cfg(test)]
mod tests {
    use super::super::super::tests::heavy_tailed;
    use super::super::tests::search;
    use super::*;

    #[test]
    fn sixteen_registers_transpose() {
        if !has_avx512() {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: the CPU has AVX-512 F; each load reads 16 of the 256.
        let t = unsafe {
            transpose16(std::array::from_fn(|i| {
                _mm512_loadu_ps(m.as_ptr().add(16 * i))
            }))
        };
        for (i, r) in t.iter().enumerate() {
            let mut lanes = [0.0f32; 16];
            // SAFETY: as above.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *r) };
            let expected: Vec<f32> = (0..16).map(|j| (16 * j + i) as f32).collect();
            assert_eq!(lanes.to_vec(), expected, "row {i}");
        }
    }

    /// `vpdpwssd` and `vpmaddwd` + `vpaddd` give every lane the same fits.
    #[test]
    fn fits_are_the_same_with_and_without_vnni() {
        if !has_avx512() || !crate::cpu::has!("avx512vnni") {
            return;
        }
        let (n, bits) = (128, 4);
        let r = IntRange::of(bits);
        let w = heavy_tailed(GROUPS * n, 5);
        let mut rows = Rows::uninit();
        let bits_of = |v: [__m512d; 2]| {
            let mut l = [0.0f64; GROUPS];
            // SAFETY: `l` holds 16 f64; the CPU has AVX-512 F.
            unsafe {
                _mm512_storeu_pd(l.as_mut_ptr(), v[0]);
                _mm512_storeu_pd(l.as_mut_ptr().add(8), v[1]);
            }
            l.map(f64::to_bits)
        };
        // SAFETY: the CPU has the features (checked above); `w` holds 16
        // groups of `n`.
        unsafe {
            let spans = rows.gather(&w, n);
            let lanes = spans.map(|span| Lane::of(n, span, &search(bits, n), r));
            let v = LaneVectors::of(&lanes);
            assert_eq!(v.served, u16::MAX);
            rows.split(v.minus_exponents);
            for step in 0..=SHRINK_STEPS {
                let s = candidate_scales(v.minmax, step);
                let (a, b) = (
                    fit_lanes(&rows, s, v.q, r),
                    fit_lanes_vnni(&rows, s, v.q, r),
                );
                assert_eq!(bits_of(a.wd), bits_of(b.wd), "step {step}");
                assert_eq!(bits_of(a.dd), bits_of(b.dd), "step {step}");
                assert_eq!((a.miss, b.miss), (0, 0), "step {step}");
                assert!(bits_of(a.dd).iter().all(|&d| f64::from_bits(d) > 0.0));
            }
        }
    }
}
