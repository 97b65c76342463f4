//! The MSE scale search's passes over one group in AVX-512 registers, with
//! the canonical sums' bits.
//!
//! **Fits in any order.** A fit's `Σ w·d` is exact when [`fit_is_exact`]
//! holds, and an exact sum has one value whatever the order of its
//! additions; `Σ d²` is a sum of small integers, always exact. The fit
//! kernel then takes 16 elements per step into two f64 registers per sum,
//! with fused multiply-adds (exact products, exact sums), and still gives
//! the canonical order's bits. Groups where the bound fails take the
//! canonical kernel.
//!
//! **Integer fits for short groups.** Where every `w` that can get a
//! nonzero `d` is a multiple of one step `Q` (those above half the smallest
//! candidate scale are, see [`fit_is_exact`]), `Σ w·d = Q · Σ W·d` with
//! integers `W = w / Q` below 2^30. Split into two 15-bit halves, `W` and
//! `d` go through 16-bit multiply-adds with 32-bit sums ([`Packed`]): 32
//! elements per instruction and no conversion to f64.
//!
//! **`d` without a division.** The fits take `d` from two fused
//! multiply-adds with reciprocals that bracket the quotient ([`Bracket`]);
//! the rare group where the two round apart at some value is fitted again
//! with the division. A division of 16 lanes costs more than the rest of
//! a step.
//!
//! **Σ w² and Σ (w - w')² in the canonical order.** These sums round, so
//! element `i` of a block goes to lane `i % 8` of one register of eight f64
//! lanes, added in element order, and the lanes fold as [`fold_lanes`]
//! does. `w²` of an f32 is exact in f64, so a fused multiply-add rounds as
//! the reference's separate product and sum do.
//!
//! Groups with a NaN or an infinity, or longer than [`PAR_GROUP`] (split
//! across threads), take [`FastPasses`] whole.

use std::arch::x86_64::*;

use super::*;

/// The passes of [`GroupPasses`] in AVX-512 registers, for a group of
/// finite values of at most [`PAR_GROUP`] elements.
pub(super) struct WidePasses<'a> {
    w: &'a [f32],
    span: Span,
    r: IntRange,
    packed: Option<Packed>,
}

impl<'a> WidePasses<'a> {
    /// The wide passes when they apply to the group, else `None`; with the
    /// integer fits ready for every scale from `smallest_scale` up when the
    /// group allows them.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, DQ and VL.
    #[inline(always)]
    pub(super) unsafe fn new(
        w: &'a [f32],
        span: Span,
        r: IntRange,
        smallest_scale: f32,
    ) -> Option<Self> {
        if !span.all_finite || w.len() > PAR_GROUP {
            return None;
        }
        // SAFETY: as required of the caller.
        let packed = unsafe { Packed::new(w, span, smallest_scale) };
        Some(Self { w, span, r, packed })
    }
}

/// Groups of at most this many elements can take the integer fits.
const PACKED_MAX: usize = 512;

/// A short group's values as integers `W = w / 2^exponent`, each split into
/// `W = 2^15 · high + low` with `low` in `[0, 2^15)`, in 16-bit lanes in
/// the order `vpackssdw` leaves two registers in, as [`packed_fit_with`] packs
/// `d`: ready for `vpmaddwd` against it.
struct Packed {
    high: [i16; PACKED_MAX],
    low: [i16; PACKED_MAX],
    /// `Q = 2^exponent`.
    exponent: i32,
    /// `W` is exact for every `w` that can round to a nonzero `d` at this
    /// scale or any larger one, and `w / s` is below 2^14 for all of them.
    smallest_scale: f32,
}

impl Packed {
    /// # Safety
    /// The CPU has AVX-512 F and BW.
    #[inline(always)]
    unsafe fn new(w: &[f32], span: Span, smallest_scale: f32) -> Option<Self> {
        if w.len() > PACKED_MAX {
            return None;
        }
        let exponent = packed_exponent(span, smallest_scale)?;
        let mut p = Packed {
            high: [0; PACKED_MAX],
            low: [0; PACKED_MAX],
            exponent,
            smallest_scale,
        };
        // SAFETY: as required of the caller.
        unsafe { p.fill(w) };
        Some(p)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn fill(&mut self, w: &[f32]) {
        let scale = _mm512_set1_ps(-self.exponent as f32);
        let mut at = 0;
        while at < w.len() {
            let (ha, la) = split_w(load16(w, at), scale);
            let (hb, lb) = split_w(load16(w, at + 16), scale);
            // SAFETY: `at + 32 <= PACKED_MAX`: `w.len() <= PACKED_MAX`, a
            // multiple of 32.
            unsafe {
                let h = self.high.as_mut_ptr().add(at).cast();
                _mm512_storeu_si512(h, _mm512_packs_epi32(ha, hb));
                let l = self.low.as_mut_ptr().add(at).cast();
                _mm512_storeu_si512(l, _mm512_packs_epi32(la, lb));
            }
            at += 32;
        }
    }
}

/// The exponent of the step `Q` of `W = w / Q` for every scale from
/// `smallest_scale` up, where the integer fits can take a group of `span`:
/// `W` of every value that can round to a nonzero `d` (those above half
/// the smallest scale, see [`fit_is_exact`]) is an integer below 2^30, and
/// `w / s` stays below 2^14, as the bracketed integer fits need. `None`
/// where they cannot (a NaN scale fails the comparison too).
#[inline(always)]
pub(super) fn packed_exponent(span: Span, smallest_scale: f32) -> Option<i32> {
    if smallest_scale
        .partial_cmp(&f32::MIN_POSITIVE)
        .is_none_or(|o| o.is_lt())
    {
        return None;
    }
    let exponent = step_exponent(smallest_scale);
    let a = f64::from(span.hi.max(-span.lo));
    (a / power_of_two(exponent) < power_of_two(30)
        && a / f64::from(smallest_scale) < power_of_two(14))
    .then_some(exponent)
}

/// `W = w · 2^minus_exponent` of 16 values, truncated, split into
/// `2^15 · high + low` with `low` in `[0, 2^15)`: `(high, low)`. Exact for
/// the values that matter (a power-of-two scaling, below 2^30); smaller
/// ones truncate, but their `d` is 0 at every scale the step serves.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn split_w(x: __m512, minus_exponent: __m512) -> (__m512i, __m512i) {
    let v = _mm512_cvttps_epi32(_mm512_scalef_ps(x, minus_exponent));
    (
        _mm512_srai_epi32::<15>(v),
        _mm512_and_si512(v, _mm512_set1_epi32(0x7fff)),
    )
}

impl GroupPasses for WidePasses<'_> {
    #[inline(always)]
    fn sum_sq(&self) -> f64 {
        // SAFETY: `new` requires the CPU features.
        unsafe { sum_sq_avx512(self.w) }
    }

    #[inline(always)]
    fn fit(&self, round_scale: f32, zero: i32) -> Fit {
        let n = self.w.len();
        if fit_is_exact(n, self.span, round_scale, zero, self.r) {
            let (lo, hi) = d_range(zero, self.r);
            let dmax = hi.max(-lo) as usize;
            let bracket = Bracket::of(round_scale);
            match &self.packed {
                // The 32-bit sums hold: each is below n · 2^15 · dmax.
                Some(p) if round_scale >= p.smallest_scale && n * dmax < 1 << 16 => {
                    // SAFETY (both): `new` requires the CPU features.
                    bracket
                        .and_then(|b| unsafe { fit_packed_bracketed(self.w, p, b, lo, hi) })
                        .unwrap_or_else(|| unsafe { fit_packed(self.w, p, round_scale, lo, hi) })
                }
                // SAFETY (both): as above.
                _ => bracket
                    .and_then(|b| unsafe { fit_avx512_bracketed(self.w, b, lo, hi) })
                    .unwrap_or_else(|| unsafe { fit_avx512(self.w, round_scale, lo, hi) }),
            }
        } else {
            FastPasses {
                w: self.w,
                span: self.span,
                r: self.r,
            }
            .fit(round_scale, zero)
        }
    }

    #[inline(always)]
    fn sq_error(&self, c: Choice) -> f64 {
        let (lo, hi) = d_range(c.zero, self.r);
        // SAFETY: `new` requires the CPU features.
        unsafe { sq_error_avx512(self.w, c.round_scale, lo, hi, c.scale) }
    }
}

/// `d = q - z` of 16 values as integer-valued f32:
/// `round(clamp(w / s, qmin - z, qmax - z))`, ties to even. That is
/// [`FastQuant::q`] minus `z`: clamping to integer bounds commutes with
/// rounding, and bounds within ±512 make its ±512 clamp idle.
#[inline]
#[target_feature(enable = "avx512f")]
fn d_of(w: __m512, s: __m512, lo: __m512, hi: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(w, s), lo), hi);
    _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
}

/// The low and high eight lanes of `v` as f64.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
pub(super) fn halves_f64(v: __m512) -> [__m512d; 2] {
    [
        _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(v)),
    ]
}

/// The first `n` (at most 16) values at `at`, zeros after them (all zeros
/// past the end).
#[inline]
#[target_feature(enable = "avx512f")]
fn load16(w: &[f32], at: usize) -> __m512 {
    let n = w.len().saturating_sub(at).min(16);
    let mask = (((1u32 << n) - 1) & 0xffff) as __mmask16;
    // SAFETY: the mask reads only the `n` elements from `at` on, which are
    // in `w`.
    unsafe { _mm512_maskz_loadu_ps(mask, w.as_ptr().add(at)) }
}

/// `f(at, a, b)` for each chunk of 32 values of `w` from the start, as two
/// registers: whole chunks without masks, the last padded with zeros.
#[inline(always)]
fn each32(w: &[f32], mut f: impl FnMut(usize, __m512, __m512)) {
    let whole = w.len() - w.len() % 32;
    let mut at = 0;
    while at < whole {
        // SAFETY: `at + 32 <= whole <= w.len()`; the CPU has AVX-512 F,
        // which the callers require.
        let (a, b) = unsafe {
            (
                _mm512_loadu_ps(w.as_ptr().add(at)),
                _mm512_loadu_ps(w.as_ptr().add(at + 16)),
            )
        };
        f(at, a, b);
        at += 32;
    }
    if at < w.len() {
        // SAFETY: as above.
        f(at, unsafe { load16(w, at) }, unsafe { load16(w, at + 16) });
    }
}

/// [`GroupPasses::fit`] in any order, for groups where [`fit_is_exact`]
/// holds, with the division.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn fit_avx512(w: &[f32], s: f32, lo: f32, hi: f32) -> Fit {
    let (s, lo, hi) = (_mm512_set1_ps(s), _mm512_set1_ps(lo), _mm512_set1_ps(hi));
    fit_with(w, |x| d_of(x, s, lo, hi))
}

/// [`fit_avx512`] without the division: `d` from the [`Bracket`] of `s`,
/// clamped as `ROUND_MAGIC + d` (the bounds are integers within ±2^8) and
/// then taken out exactly. `None` if some value's two products round apart.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn fit_avx512_bracketed(w: &[f32], b: Bracket, lo: f32, hi: f32) -> Option<Fit> {
    let (rlo, rhi) = (_mm512_set1_ps(b.lo), _mm512_set1_ps(b.hi));
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let (lo, hi) = (
        _mm512_set1_ps(ROUND_MAGIC + lo),
        _mm512_set1_ps(ROUND_MAGIC + hi),
    );
    let mut miss = _mm512_setzero_si512();
    let fit = fit_with(w, |x| {
        let y = bracketed(x, rlo, rhi, &mut miss);
        _mm512_sub_ps(_mm512_min_ps(_mm512_max_ps(y, lo), hi), magic)
    });
    all_agree(miss).then_some(fit)
}

/// The fit in f64 in any order, with `d(x)` the integer-valued `d` of 16
/// values. Padding lanes load 0, whose `d` must be 0 (`lo <= 0 <= hi`).
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn fit_with(w: &[f32], mut d: impl FnMut(__m512) -> __m512) -> Fit {
    let (mut wd0, mut wd1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    let (mut dd0, mut dd1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    let mut at = 0;
    while at < w.len() {
        let x = load16(w, at);
        let [d0, d1] = halves_f64(d(x));
        let [x0, x1] = halves_f64(x);
        wd0 = _mm512_fmadd_pd(x0, d0, wd0);
        wd1 = _mm512_fmadd_pd(x1, d1, wd1);
        dd0 = _mm512_fmadd_pd(d0, d0, dd0);
        dd1 = _mm512_fmadd_pd(d1, d1, dd1);
        at += 16;
    }
    Fit {
        wd: _mm512_reduce_add_pd(_mm512_add_pd(wd0, wd1)),
        dd: _mm512_reduce_add_pd(_mm512_add_pd(dd0, dd1)),
    }
}

/// [`GroupPasses::fit`] exactly, in integers, for groups where
/// [`fit_is_exact`] holds and `p` serves `s`, with the division: `w / s`
/// rounded to even by the conversion (below 2^14, see [`Packed`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn fit_packed(w: &[f32], p: &Packed, s: f32, lo: f32, hi: f32) -> Fit {
    let s = _mm512_set1_ps(s);
    packed_fit_with(w, p, lo, hi, |x| _mm512_cvtps_epi32(_mm512_div_ps(x, s)))
}

/// The [`Bracket`] products of 16 values rounded as `Bracket::magic` rounds
/// them: `ROUND_MAGIC + d` before the clamp, from `w · lo`; the bits where
/// it differs from `w · hi`'s are ORed into `miss` (one ternary-logic instruction).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn bracketed(w: __m512, lo: __m512, hi: __m512, miss: &mut __m512i) -> __m512 {
    let magic = _mm512_set1_ps(ROUND_MAGIC);
    let (a, b) = (_mm512_fmadd_ps(w, lo, magic), _mm512_fmadd_ps(w, hi, magic));
    // `miss | (a ^ b)`.
    *miss =
        _mm512_ternarylogic_epi32::<0xf6>(*miss, _mm512_castps_si512(a), _mm512_castps_si512(b));
    a
}

/// Whether no lane of `miss` is set.
#[inline]
#[target_feature(enable = "avx512f")]
fn all_agree(miss: __m512i) -> bool {
    _mm512_test_epi32_mask(miss, miss) == 0
}

/// [`fit_packed`] without the division: `d` from the [`Bracket`] of `s`,
/// its integer read from the bits of `ROUND_MAGIC + d`. `None` if some
/// value's two products round apart.
///
/// `|w / s| < 2^14` for every scale `p` serves, so `ROUND_MAGIC + d` has
/// `ROUND_MAGIC`'s exponent and its bits minus `ROUND_MAGIC`'s are `d`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn fit_packed_bracketed(w: &[f32], p: &Packed, b: Bracket, lo: f32, hi: f32) -> Option<Fit> {
    let (rlo, rhi) = (_mm512_set1_ps(b.lo), _mm512_set1_ps(b.hi));
    let magic = _mm512_set1_epi32(ROUND_MAGIC.to_bits() as i32);
    let mut miss = _mm512_setzero_si512();
    let fit = packed_fit_with(w, p, lo, hi, |x| {
        let y = bracketed(x, rlo, rhi, &mut miss);
        _mm512_sub_epi32(_mm512_castps_si512(y), magic)
    });
    all_agree(miss).then_some(fit)
}

/// `Σ W·d` from the two halves of `W`, and `Σ d²`, all in 32-bit lanes,
/// with `q(x)` the rounded `w / s` of 16 values as i32 (below 2^14) and
/// `d` that clamped to `[lo, hi]` in 16-bit lanes (clamping to integer
/// bounds commutes with rounding).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn packed_fit_with(
    w: &[f32],
    p: &Packed,
    lo: f32,
    hi: f32,
    mut q: impl FnMut(__m512) -> __m512i,
) -> Fit {
    let (lo, hi) = (_mm512_set1_epi16(lo as i16), _mm512_set1_epi16(hi as i16));
    let (mut high, mut low, mut dd) = (
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
        _mm512_setzero_si512(),
    );
    each32(w, |at, a, b| {
        let d = _mm512_packs_epi32(q(a), q(b));
        let d = _mm512_min_epi16(_mm512_max_epi16(d, lo), hi);
        // SAFETY: `at + 32 <= PACKED_MAX`, as in `Packed::fill`.
        let (h, l) = unsafe {
            (
                _mm512_loadu_si512(p.high.as_ptr().add(at).cast()),
                _mm512_loadu_si512(p.low.as_ptr().add(at).cast()),
            )
        };
        high = _mm512_add_epi32(high, _mm512_madd_epi16(d, h));
        low = _mm512_add_epi32(low, _mm512_madd_epi16(d, l));
        dd = _mm512_add_epi32(dd, _mm512_madd_epi16(d, d));
    });
    let wd =
        (i64::from(_mm512_reduce_add_epi32(high)) << 15) + i64::from(_mm512_reduce_add_epi32(low));
    Fit {
        // Below 2^53 (`fit_is_exact`), times a power of two: exact.
        wd: wd as f64 * power_of_two(p.exponent),
        dd: f64::from(_mm512_reduce_add_epi32(dd)),
    }
}

/// Eight lanes folded in the canonical order.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(acc: __m512d) -> f64 {
    let mut l = [0.0f64; LANES];
    // SAFETY: `l` holds eight f64.
    unsafe { _mm512_storeu_pd(l.as_mut_ptr(), acc) };
    fold_lanes(l)
}

/// Σ w² in the canonical order. Padding lanes add `+0`, which leaves every
/// lane's bits as they are (no lane is ever `-0`).
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn sum_sq_avx512(w: &[f32]) -> f64 {
    let mut total = 0.0;
    for block in w.chunks(BLOCK) {
        let mut acc = _mm512_setzero_pd();
        let mut at = 0;
        while at < block.len() {
            let [x0, x1] = halves_f64(load16(block, at));
            acc = _mm512_fmadd_pd(x0, x0, acc);
            acc = _mm512_fmadd_pd(x1, x1, acc);
            at += 16;
        }
        total += fold(acc);
    }
    total
}

/// Σ (w - w')² in the canonical order, `w' = d · scale` in f32 as
/// [`affine_value`] gives it. Padding lanes have `w = w' = 0`.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn sq_error_avx512(w: &[f32], round_scale: f32, lo: f32, hi: f32, scale: f32) -> f64 {
    let (rs, lo, hi) = (
        _mm512_set1_ps(round_scale),
        _mm512_set1_ps(lo),
        _mm512_set1_ps(hi),
    );
    let scale = _mm512_set1_ps(scale);
    let mut total = 0.0;
    for block in w.chunks(BLOCK) {
        let mut acc = _mm512_setzero_pd();
        let mut at = 0;
        while at < block.len() {
            let x = load16(block, at);
            let v = _mm512_mul_ps(d_of(x, rs, lo, hi), scale);
            let [x0, x1] = halves_f64(x);
            let [v0, v1] = halves_f64(v);
            let (t0, t1) = (_mm512_sub_pd(x0, v0), _mm512_sub_pd(x1, v1));
            acc = _mm512_add_pd(acc, _mm512_mul_pd(t0, t0));
            acc = _mm512_add_pd(acc, _mm512_mul_pd(t1, t1));
            at += 16;
        }
        total += fold(acc);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        check_bracketed_fits, check_passes, pass_value, ragged_groups, KernelFits, INT4_FITS,
        PASS_CASES,
    };
    use super::*;
    use proptest::prelude::*;

    /// [`check_passes`] with the AVX-512 passes, and whether the integer
    /// fits were ready.
    fn check_group(w: &[f32], bits: u8, symmetric: bool) -> (usize, bool) {
        let r = IntRange::of(bits);
        let span = w.iter().fold(Span::ZERO, |s, &x| s.with(x));
        let smallest = candidate_scale(minmax_choice(span, bits, symmetric).scale, SHRINK_STEPS);
        // SAFETY: checked by the callers.
        let Some(wide) = (unsafe { WidePasses::new(w, span, r, smallest) }) else {
            return (0, false);
        };
        let exact = check_passes(w, bits, symmetric, &wide);
        (exact, wide.packed.is_some())
    }

    #[test]
    fn the_bound_holds_for_every_int4_group_of_128() {
        let r = IntRange::of(4);
        // The widest ratio of magnitudes: a power-of-two extreme, the
        // smallest candidate scale.
        for absmax in [1.0f32, 3.0e-39, 1.0e38, 7.0 * f32::MIN_POSITIVE] {
            let span = Span {
                lo: -absmax,
                hi: absmax,
                all_finite: true,
            };
            let m = minmax_choice(span, 4, true);
            let s = candidate_scale(m.scale, SHRINK_STEPS);
            assert!(fit_is_exact(128, span, s, 0, r), "absmax {absmax}");
            let m = minmax_choice(span, 4, false);
            for zero in [r.qmin, m.zero, r.qmax] {
                assert!(fit_is_exact(128, span, s, zero, r), "absmax {absmax}");
            }
        }
    }

    #[test]
    fn the_bound_fails_where_the_sum_could_round() {
        let r = IntRange::of(8);
        let span = Span {
            lo: -1.0,
            hi: 1.0,
            all_finite: true,
        };
        // 2^-30 steps: products reach 2^37 steps, the sum far more.
        assert!(!fit_is_exact(1 << 20, span, 2.0f32.powi(-6), 0, r));
        assert!(!fit_is_exact(16, span, 2.0f32.powi(-30), 0, r));
        assert!(fit_is_exact(4096, span, 1.0 / 127.0 / 2.0, 0, r));
    }

    #[test]
    fn wide_passes_match_the_reference_on_long_and_ragged_groups() {
        if !has_avx512() {
            return;
        }
        for w in ragged_groups() {
            for (bits, symmetric) in PASS_CASES {
                let (exact, packed) = check_group(&w, bits, symmetric);
                if bits == 4 && symmetric {
                    // Every fit takes a fast path, the integer one for
                    // short groups.
                    let n = w.len();
                    assert_eq!(exact, INT4_FITS, "n {n}");
                    assert_eq!(packed, n <= PACKED_MAX, "n {n}");
                }
            }
        }
    }

    /// The integer and the f64 fit of the int4 candidate of scale `s` on
    /// `w`, each bracketed and with the division.
    fn kernel_fits(w: &[f32], s: f32) -> KernelFits {
        let span = w.iter().fold(Span::ZERO, |s, &x| s.with(x));
        let smallest = candidate_scale(minmax_choice(span, 4, true).scale, SHRINK_STEPS);
        // SAFETY: checked by the callers.
        let packed = unsafe { Packed::new(w, span, smallest) }.expect("a short group");
        let (lo, hi) = d_range(0, IntRange::of(4));
        let b = Bracket::of(s).expect("a scale in range");
        // SAFETY: as above.
        unsafe {
            [
                (
                    fit_packed_bracketed(w, &packed, b, lo, hi),
                    fit_packed(w, &packed, s, lo, hi),
                ),
                (fit_avx512_bracketed(w, b, lo, hi), fit_avx512(w, s, lo, hi)),
            ]
        }
    }

    #[test]
    fn bracketed_fits_need_no_division_but_at_ties() {
        if has_avx512() {
            check_bracketed_fits(kernel_fits, |w| {
                check_group(w, 4, true);
            });
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The AVX-512 passes have the reference's bits.
        #[test]
        fn wide_passes_match_the_reference(
            w in prop::collection::vec(pass_value(), 1..300),
            bits in 2..=8u8,
            symmetric in any::<bool>(),
        ) {
            if has_avx512() {
                check_group(&w, bits, symmetric);
            }
        }
    }
}
