//! The MSE scale search's passes over one group in AVX2 registers, with the
//! canonical sums' bits: what [`super::wide`] does for AVX-512, for the
//! many CPUs without it.
//!
//! **Fits in any order** where [`fit_is_exact`] holds: eight elements per
//! step, their products with `d` and `d²` added in f64 by fused
//! multiply-adds into four registers (exact products, exact sums, so the
//! order does not matter). Groups where the bound fails take the canonical
//! kernel.
//!
//! **Integer fits for short groups**, as [`super::wide`] has them: with
//! `W = w / Q` below 2^30 split into two 15-bit halves, `Σ W·d` and `Σ d²`
//! come from 16-bit multiply-adds with 32-bit sums ([`Packed`]), 16
//! elements per instruction, with `d` rounded by the conversion to integers
//! and clamped in 16-bit lanes.
//!
//! **`d` without a division**, as in [`super::wide`]: two fused
//! multiply-adds with reciprocals that bracket the quotient ([`Bracket`]),
//! and the division only for the rare group where they round apart.
//!
//! **Σ w² and Σ (w - w')² in the canonical order**: element `i` of a block
//! goes to lane `i % 8`, which is lane `i % 4` of the first register for
//! the first four of each eight and of the second for the rest; the lanes
//! fold as [`fold_lanes`] does.
//!
//! Groups with a NaN or an infinity, or longer than [`PAR_GROUP`] (split
//! across threads), take [`FastPasses`] whole.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::*;

/// The passes of [`GroupPasses`] in AVX2 registers, for a group of finite
/// values of at most [`PAR_GROUP`] elements.
pub(super) struct NarrowPasses<'a> {
    w: &'a [f32],
    span: Span,
    r: IntRange,
    packed: Option<Packed<'a>>,
}

impl<'a> NarrowPasses<'a> {
    /// The AVX2 passes when they apply to the group, else `None`; with the
    /// integer fits ready in `scratch` for every scale from
    /// `smallest_scale` up when the group allows them.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline(always)]
    pub(super) unsafe fn new(
        w: &'a [f32],
        span: Span,
        r: IntRange,
        smallest_scale: f32,
        scratch: &'a mut PackedScratch,
    ) -> Option<Self> {
        if !span.all_finite || w.len() > PAR_GROUP {
            return None;
        }
        // SAFETY: as required of the caller.
        let packed = unsafe { Packed::new(w, span, smallest_scale, scratch) };
        Some(Self { w, span, r, packed })
    }
}

/// Groups of at most this many elements can take the integer fits.
const PACKED_MAX: usize = 512;

/// Room for a [`Packed`] group's two halves, left uninitialized: only what
/// a group fills is read, so no group pays for clearing or moving all of it.
pub(super) struct PackedScratch([MaybeUninit<i16>; 2 * PACKED_MAX]);

impl PackedScratch {
    #[inline(always)]
    pub(super) fn new() -> Self {
        Self([const { MaybeUninit::uninit() }; 2 * PACKED_MAX])
    }
}

/// A short group's values as integers `W = w / 2^exponent`, each split into
/// `W = 2^15 · high + low` with `low` in `[0, 2^15)`, in 16-bit lanes in
/// the order `vpackssdw` leaves two registers in, as [`packed_fit_with`] packs
/// `d`: ready for `vpmaddwd` against it. Both halves run to the group's
/// length rounded up to 16, zeros past its end.
struct Packed<'a> {
    high: &'a [i16],
    low: &'a [i16],
    /// `Q = 2^exponent`.
    exponent: i32,
    /// `W` is exact for every `w` that can round to a nonzero `d` at this
    /// scale or any larger one, and `w / s` is below 2^14 for all of them.
    smallest_scale: f32,
}

impl<'a> Packed<'a> {
    /// # Safety
    /// The CPU has AVX2.
    #[inline(always)]
    unsafe fn new(
        w: &[f32],
        span: Span,
        smallest_scale: f32,
        scratch: &'a mut PackedScratch,
    ) -> Option<Self> {
        // A NaN scale fails the comparison too.
        if w.len() > PACKED_MAX
            || smallest_scale
                .partial_cmp(&f32::MIN_POSITIVE)
                .is_none_or(|o| o.is_lt())
        {
            return None;
        }
        let exponent = step_exponent(smallest_scale);
        let a = f64::from(span.hi.max(-span.lo));
        // `W` fits the split; `w / s` converts to i32 and packs to i16
        // without saturating.
        if a * power_of_two(-exponent) >= power_of_two(30)
            || a / f64::from(smallest_scale) >= power_of_two(14)
        {
            return None;
        }
        let (high, low) = scratch.0.split_at_mut(PACKED_MAX);
        // SAFETY: as required of the caller.
        unsafe { fill(w, exponent, high, low) };
        let len = w.len().next_multiple_of(16);
        // SAFETY: `fill` wrote the first `len` elements of both halves.
        let (high, low) = unsafe {
            (
                std::slice::from_raw_parts(high.as_ptr().cast::<i16>(), len),
                std::slice::from_raw_parts(low.as_ptr().cast::<i16>(), len),
            )
        };
        Some(Self {
            high,
            low,
            exponent,
            smallest_scale,
        })
    }
}

/// Writes the halves of [`Packed`] for `w` to the first
/// `w.len().next_multiple_of(16)` elements of `high` and `low`.
#[inline]
#[target_feature(enable = "avx2")]
fn fill(w: &[f32], exponent: i32, high: &mut [MaybeUninit<i16>], low: &mut [MaybeUninit<i16>]) {
    let k = [_mm256_set1_pd(power_of_two(-exponent)); 2];
    each::<16>(w, |at, c| {
        let (ha, la) = split_w(load8(c, 0), k);
        let (hb, lb) = split_w(load8(c, 8), k);
        let (h, l) = (&mut high[at..at + 16], &mut low[at..at + 16]);
        // SAFETY: `h` and `l` hold 16 i16 each.
        unsafe {
            _mm256_storeu_si256(h.as_mut_ptr().cast(), _mm256_packs_epi32(ha, hb));
            _mm256_storeu_si256(l.as_mut_ptr().cast(), _mm256_packs_epi32(la, lb));
        }
    });
}

/// `W = w · k` of eight values, `k` the powers of two `2^-exponent` of the
/// low four lanes and of the high four, truncated and split into
/// `2^15 · high + low` with `low` in `[0, 2^15)`: `(high, low)`. Exact for
/// the values that matter (a power-of-two scaling in f64, below 2^30);
/// smaller ones truncate, but their `d` is 0 at every scale the step
/// serves.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn split_w(x: __m256, k: [__m256d; 2]) -> (__m256i, __m256i) {
    let [x0, x1] = halves_f64(x);
    let v = _mm256_set_m128i(
        _mm256_cvttpd_epi32(_mm256_mul_pd(x1, k[1])),
        _mm256_cvttpd_epi32(_mm256_mul_pd(x0, k[0])),
    );
    (
        _mm256_srai_epi32::<15>(v),
        _mm256_and_si256(v, _mm256_set1_epi32(0x7fff)),
    )
}

impl GroupPasses for NarrowPasses<'_> {
    #[inline(always)]
    fn sum_sq(&self) -> f64 {
        // SAFETY: `new` requires the CPU features.
        unsafe { sum_sq_avx2(self.w) }
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
                    let (lo, hi) = (lo as i16, hi as i16);
                    // SAFETY (both): `new` requires the CPU features.
                    bracket
                        .and_then(|b| unsafe { fit_packed_bracketed(self.w, p, b, lo, hi) })
                        .unwrap_or_else(|| unsafe { fit_packed(self.w, p, round_scale, lo, hi) })
                }
                // SAFETY (both): as above.
                _ => bracket
                    .and_then(|b| unsafe { fit_avx2_bracketed(self.w, b, lo, hi) })
                    .unwrap_or_else(|| unsafe { fit_avx2(self.w, round_scale, lo, hi) }),
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
        unsafe { sq_error_avx2(self.w, c.round_scale, lo, hi, c.scale) }
    }
}

/// `d = q - z` of eight values as integer-valued f32:
/// `round(clamp(w / s, qmin - z, qmax - z))`, ties to even: [`FastQuant::q`]
/// minus `z` (clamping to integer bounds commutes with rounding, and bounds
/// within ±512 leave its ±512 clamp idle).
#[inline]
#[target_feature(enable = "avx2")]
fn d_of(w: __m256, s: __m256, lo: __m256, hi: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(w, s), lo), hi);
    _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x)
}

/// The low and high four lanes of `v` as f64.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn halves_f64(v: __m256) -> [__m256d; 2] {
    [
        _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
    ]
}

/// `f(at, chunk)` for the chunks of `N` values of `w` from the start, the
/// last padded with zeros: whole chunks straight from `w`, without a test
/// per load.
#[inline(always)]
fn each<const N: usize>(w: &[f32], mut f: impl FnMut(usize, &[f32; N])) {
    let mut chunks = w.chunks_exact(N);
    let mut at = 0;
    for c in &mut chunks {
        f(at, c.try_into().expect("a chunk of N"));
        at += N;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut tail = [0.0f32; N];
        tail[..rest.len()].copy_from_slice(rest);
        f(at, &tail);
    }
}

/// The eight values from `c[at]` on.
#[inline]
#[target_feature(enable = "avx")]
fn load8<const N: usize>(c: &[f32; N], at: usize) -> __m256 {
    assert!(at + 8 <= N);
    // SAFETY: `c` holds eight f32 from `at` on.
    unsafe { _mm256_loadu_ps(c.as_ptr().add(at)) }
}

/// Sum of four f64 lanes; the order does not matter to the exact sums this
/// serves.
#[inline]
#[target_feature(enable = "avx2")]
fn add_lanes(v: __m256d) -> f64 {
    let mut l = [0.0f64; 4];
    // SAFETY: `l` holds four f64.
    unsafe { _mm256_storeu_pd(l.as_mut_ptr(), v) };
    (l[0] + l[1]) + (l[2] + l[3])
}

/// [`GroupPasses::fit`] in any order, for groups where [`fit_is_exact`]
/// holds, with the division.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fit_avx2(w: &[f32], s: f32, lo: f32, hi: f32) -> Fit {
    let (s, lo, hi) = (_mm256_set1_ps(s), _mm256_set1_ps(lo), _mm256_set1_ps(hi));
    fit_with(w, |x| d_of(x, s, lo, hi))
}

/// [`fit_avx2`] without the division: `d` from the [`Bracket`] of `s`,
/// clamped as `ROUND_MAGIC + d` (the bounds are integers within ±2^8) and
/// then taken out exactly. `None` if some value's two products round apart.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fit_avx2_bracketed(w: &[f32], b: Bracket, lo: f32, hi: f32) -> Option<Fit> {
    let (rlo, rhi) = (_mm256_set1_ps(b.lo), _mm256_set1_ps(b.hi));
    let magic = _mm256_set1_ps(ROUND_MAGIC);
    let (lo, hi) = (
        _mm256_set1_ps(ROUND_MAGIC + lo),
        _mm256_set1_ps(ROUND_MAGIC + hi),
    );
    let mut miss = _mm256_setzero_ps();
    let fit = fit_with(w, |x| {
        let y = bracketed(x, rlo, rhi, &mut miss);
        _mm256_sub_ps(_mm256_min_ps(_mm256_max_ps(y, lo), hi), magic)
    });
    all_agree(miss).then_some(fit)
}

/// The fit in f64 in any order, with `d(x)` the integer-valued `d` of
/// eight values. Padding lanes load 0, whose `d` must be 0
/// (`lo <= 0 <= hi`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fit_with(w: &[f32], mut d: impl FnMut(__m256) -> __m256) -> Fit {
    let zero = _mm256_setzero_pd();
    let (mut wd0, mut wd1, mut dd0, mut dd1) = (zero, zero, zero, zero);
    each::<8>(w, |_, c| {
        let x = load8(c, 0);
        let [d0, d1] = halves_f64(d(x));
        let [x0, x1] = halves_f64(x);
        wd0 = _mm256_fmadd_pd(x0, d0, wd0);
        wd1 = _mm256_fmadd_pd(x1, d1, wd1);
        dd0 = _mm256_fmadd_pd(d0, d0, dd0);
        dd1 = _mm256_fmadd_pd(d1, d1, dd1);
    });
    Fit {
        wd: add_lanes(_mm256_add_pd(wd0, wd1)),
        dd: add_lanes(_mm256_add_pd(dd0, dd1)),
    }
}

/// [`GroupPasses::fit`] exactly, in integers, for groups where
/// [`fit_is_exact`] holds and `p` serves `s`, with the division: `w / s`
/// rounded to even by the conversion (below 2^14, see [`Packed`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fit_packed(w: &[f32], p: &Packed, s: f32, lo: i16, hi: i16) -> Fit {
    let s = _mm256_set1_ps(s);
    packed_fit_with(w, p, lo, hi, |x| _mm256_cvtps_epi32(_mm256_div_ps(x, s)))
}

/// The [`Bracket`] products of eight values rounded as `Bracket::magic` rounds
/// them: `ROUND_MAGIC + d` before the clamp, from `w · lo`; the bits where
/// it differs from `w · hi`'s are ORed into `miss`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn bracketed(w: __m256, lo: __m256, hi: __m256, miss: &mut __m256) -> __m256 {
    let magic = _mm256_set1_ps(ROUND_MAGIC);
    let (a, b) = (_mm256_fmadd_ps(w, lo, magic), _mm256_fmadd_ps(w, hi, magic));
    *miss = _mm256_or_ps(*miss, _mm256_xor_ps(a, b));
    a
}

/// Whether no bit of `miss` is set.
#[inline]
#[target_feature(enable = "avx2")]
fn all_agree(miss: __m256) -> bool {
    let m = _mm256_castps_si256(miss);
    _mm256_testz_si256(m, m) == 1
}

/// [`fit_packed`] without the division: `d` from the [`Bracket`] of `s`,
/// its integer read from the bits of `ROUND_MAGIC + d`. `None` if some
/// value's two products round apart.
///
/// `|w / s| < 2^14` for every scale `p` serves, so `ROUND_MAGIC + d` has
/// `ROUND_MAGIC`'s exponent and its bits minus `ROUND_MAGIC`'s are `d`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fit_packed_bracketed(w: &[f32], p: &Packed, b: Bracket, lo: i16, hi: i16) -> Option<Fit> {
    let (rlo, rhi) = (_mm256_set1_ps(b.lo), _mm256_set1_ps(b.hi));
    let magic = _mm256_set1_epi32(ROUND_MAGIC.to_bits() as i32);
    let mut miss = _mm256_setzero_ps();
    let fit = packed_fit_with(w, p, lo, hi, |x| {
        let y = bracketed(x, rlo, rhi, &mut miss);
        _mm256_sub_epi32(_mm256_castps_si256(y), magic)
    });
    all_agree(miss).then_some(fit)
}

/// `Σ W·d` from the two halves of `W`, and `Σ d²`, all in 32-bit lanes,
/// with `q(x)` the rounded `w / s` of eight values as i32 (below 2^14) and
/// `d` that clamped to `[lo, hi]` in 16-bit lanes: [`d_of`]'s, as clamping
/// to integer bounds commutes with rounding.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn packed_fit_with(
    w: &[f32],
    p: &Packed,
    lo: i16,
    hi: i16,
    mut q: impl FnMut(__m256) -> __m256i,
) -> Fit {
    let (lo, hi) = (_mm256_set1_epi16(lo), _mm256_set1_epi16(hi));
    let zero = _mm256_setzero_si256();
    let (mut high, mut low, mut dd) = (zero, zero, zero);
    each::<16>(w, |at, c| {
        let d = _mm256_packs_epi32(q(load8(c, 0)), q(load8(c, 8)));
        let d = _mm256_min_epi16(_mm256_max_epi16(d, lo), hi);
        let (h, l) = (&p.high[at..at + 16], &p.low[at..at + 16]);
        // SAFETY: `h` and `l` hold 16 i16 each.
        let (h, l) = unsafe {
            (
                _mm256_loadu_si256(h.as_ptr().cast()),
                _mm256_loadu_si256(l.as_ptr().cast()),
            )
        };
        high = _mm256_add_epi32(high, _mm256_madd_epi16(d, h));
        low = _mm256_add_epi32(low, _mm256_madd_epi16(d, l));
        dd = _mm256_add_epi32(dd, _mm256_madd_epi16(d, d));
    });
    let [high, low, dd] = add_i32_lanes(high, low, dd);
    let wd = (i64::from(high) << 15) + i64::from(low);
    Fit {
        // Below 2^53 (`fit_is_exact`), times a power of two: exact.
        wd: wd as f64 * power_of_two(p.exponent),
        dd: f64::from(dd),
    }
}

/// The sums of the eight i32 lanes of `a`, `b` and `c`, which no partial
/// sum overflows (each is at most the sum of the magnitudes).
#[inline]
#[target_feature(enable = "avx2")]
fn add_i32_lanes(a: __m256i, b: __m256i, c: __m256i) -> [i32; 3] {
    let ab = _mm256_hadd_epi32(a, b);
    let c = _mm256_hadd_epi32(c, _mm256_setzero_si256());
    // Each 128-bit half becomes [a, b, c, 0] summed over its four lanes.
    let abc = _mm256_hadd_epi32(ab, c);
    let v = _mm_add_epi32(
        _mm256_castsi256_si128(abc),
        _mm256_extracti128_si256::<1>(abc),
    );
    [
        _mm_cvtsi128_si32(v),
        _mm_extract_epi32::<1>(v),
        _mm_extract_epi32::<2>(v),
    ]
}

/// Eight lanes (the first register's four, then the second's) folded in
/// the canonical order.
#[inline]
#[target_feature(enable = "avx2")]
fn fold(a: __m256d, b: __m256d) -> f64 {
    let mut l = [0.0f64; LANES];
    // SAFETY: `l` holds eight f64.
    unsafe {
        _mm256_storeu_pd(l.as_mut_ptr(), a);
        _mm256_storeu_pd(l.as_mut_ptr().add(4), b);
    }
    fold_lanes(l)
}

/// Σ w² in the canonical order. `w²` of an f32 is exact in f64, so the
/// fused multiply-add rounds as the reference's product and sum do;
/// padding lanes add `+0`, which leaves every lane's bits as they are.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum_sq_avx2(w: &[f32]) -> f64 {
    let mut total = 0.0;
    for block in w.chunks(BLOCK) {
        let (mut a, mut b) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        each::<8>(block, |_, c| {
            let [x0, x1] = halves_f64(load8(c, 0));
            a = _mm256_fmadd_pd(x0, x0, a);
            b = _mm256_fmadd_pd(x1, x1, b);
        });
        total += fold(a, b);
    }
    total
}

/// Σ (w - w')² in the canonical order, `w' = d · scale` in f32 as
/// [`affine_value`] gives it; a separate product and sum, as the
/// reference's. Padding lanes have `w = w' = 0`.
#[inline]
#[target_feature(enable = "avx2")]
fn sq_error_avx2(w: &[f32], round_scale: f32, lo: f32, hi: f32, scale: f32) -> f64 {
    let (rs, lo, hi) = (
        _mm256_set1_ps(round_scale),
        _mm256_set1_ps(lo),
        _mm256_set1_ps(hi),
    );
    let scale = _mm256_set1_ps(scale);
    let mut total = 0.0;
    for block in w.chunks(BLOCK) {
        let (mut a, mut b) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        each::<8>(block, |_, c| {
            let x = load8(c, 0);
            let v = _mm256_mul_ps(d_of(x, rs, lo, hi), scale);
            let [x0, x1] = halves_f64(x);
            let [v0, v1] = halves_f64(v);
            let (t0, t1) = (_mm256_sub_pd(x0, v0), _mm256_sub_pd(x1, v1));
            a = _mm256_add_pd(a, _mm256_mul_pd(t0, t0));
            b = _mm256_add_pd(b, _mm256_mul_pd(t1, t1));
        });
        total += fold(a, b);
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

    fn has_avx2() -> bool {
        crate::cpu::has!("avx2") && crate::cpu::has!("fma")
    }

    /// [`check_passes`] with the AVX2 passes, and whether the integer fits
    /// were ready.
    fn check_group(w: &[f32], bits: u8, symmetric: bool) -> (usize, bool) {
        let r = IntRange::of(bits);
        let span = w.iter().fold(Span::ZERO, |s, &x| s.with(x));
        let smallest = candidate_scale(minmax_choice(span, bits, symmetric).scale, SHRINK_STEPS);
        let mut scratch = PackedScratch::new();
        // SAFETY: checked by the callers.
        let Some(narrow) = (unsafe { NarrowPasses::new(w, span, r, smallest, &mut scratch) })
        else {
            return (0, false);
        };
        let exact = check_passes(w, bits, symmetric, &narrow);
        (exact, narrow.packed.is_some())
    }

    #[test]
    fn narrow_passes_match_the_reference_on_long_and_ragged_groups() {
        if !has_avx2() {
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
        let mut scratch = PackedScratch::new();
        // SAFETY: checked by the callers.
        let packed =
            unsafe { Packed::new(w, span, smallest, &mut scratch) }.expect("a short group");
        let (lo, hi) = d_range(0, IntRange::of(4));
        let b = Bracket::of(s).expect("a scale in range");
        // SAFETY: as above.
        unsafe {
            [
                (
                    fit_packed_bracketed(w, &packed, b, lo as i16, hi as i16),
                    fit_packed(w, &packed, s, lo as i16, hi as i16),
                ),
                (fit_avx2_bracketed(w, b, lo, hi), fit_avx2(w, s, lo, hi)),
            ]
        }
    }

    #[test]
    fn bracketed_fits_need_no_division_but_at_ties() {
        if has_avx2() {
            check_bracketed_fits(kernel_fits, |w| {
                check_group(w, 4, true);
            });
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The AVX2 passes have the reference's bits.
        #[test]
        fn narrow_passes_match_the_reference(
            w in prop::collection::vec(pass_value(), 1..300),
            bits in 2..=8u8,
            symmetric in any::<bool>(),
        ) {
            if has_avx2() {
                check_group(&w, bits, symmetric);
            }
        }
    }
}
