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
//! **Σ w² and Σ (w - w')² in the canonical order**: element `i` of a block
//! goes to lane `i % 8`, which is lane `i % 4` of the first register for
//! the first four of each eight and of the second for the rest; the lanes
//! fold as [`fold_lanes`] does.
//!
//! Groups with a NaN or an infinity, or longer than [`PAR_GROUP`] (split
//! across threads), take [`FastPasses`] whole.

use std::arch::x86_64::*;

use super::*;

/// The passes of [`GroupPasses`] in AVX2 registers, for a group of finite
/// values of at most [`PAR_GROUP`] elements.
pub(super) struct NarrowPasses<'a> {
    w: &'a [f32],
    span: Span,
    r: IntRange,
}

impl<'a> NarrowPasses<'a> {
    /// The AVX2 passes when they apply to the group, else `None`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline(always)]
    pub(super) unsafe fn new(w: &'a [f32], span: Span, r: IntRange) -> Option<Self> {
        (span.all_finite && w.len() <= PAR_GROUP).then_some(Self { w, span, r })
    }
}

impl GroupPasses for NarrowPasses<'_> {
    #[inline(always)]
    fn sum_sq(&self) -> f64 {
        // SAFETY: `new` requires the CPU features.
        unsafe { sum_sq_avx2(self.w) }
    }

    #[inline(always)]
    fn fit(&self, round_scale: f32, zero: i32) -> Fit {
        if fit_is_exact(self.w.len(), self.span, round_scale, zero, self.r) {
            let (lo, hi) = d_range(zero, self.r);
            // SAFETY: `new` requires the CPU features.
            unsafe { fit_avx2(self.w, round_scale, lo, hi) }
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
fn halves_f64(v: __m256) -> (__m256d, __m256d) {
    (
        _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
    )
}

/// The eight values at `at`, zeros past the end of `w`.
#[inline]
#[target_feature(enable = "avx2")]
fn load8(w: &[f32], at: usize) -> __m256 {
    match w.get(at..at + 8) {
        // SAFETY: the slice holds eight f32.
        Some(s) => unsafe { _mm256_loadu_ps(s.as_ptr()) },
        None => {
            let mut tail = [0.0f32; 8];
            let rest = w.get(at..).unwrap_or_default();
            tail[..rest.len()].copy_from_slice(rest);
            // SAFETY: `tail` holds eight f32.
            unsafe { _mm256_loadu_ps(tail.as_ptr()) }
        }
    }
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
/// holds. Padding lanes load 0, whose `d` is 0 (`lo <= 0 <= hi`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn fit_avx2(w: &[f32], s: f32, lo: f32, hi: f32) -> Fit {
    let (s, lo, hi) = (_mm256_set1_ps(s), _mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let zero = _mm256_setzero_pd();
    let (mut wd0, mut wd1, mut dd0, mut dd1) = (zero, zero, zero, zero);
    let mut at = 0;
    while at < w.len() {
        let x = load8(w, at);
        let (d0, d1) = halves_f64(d_of(x, s, lo, hi));
        let (x0, x1) = halves_f64(x);
        wd0 = _mm256_fmadd_pd(x0, d0, wd0);
        wd1 = _mm256_fmadd_pd(x1, d1, wd1);
        dd0 = _mm256_fmadd_pd(d0, d0, dd0);
        dd1 = _mm256_fmadd_pd(d1, d1, dd1);
        at += 8;
    }
    Fit {
        wd: add_lanes(_mm256_add_pd(wd0, wd1)),
        dd: add_lanes(_mm256_add_pd(dd0, dd1)),
    }
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
        let mut at = 0;
        while at < block.len() {
            let (x0, x1) = halves_f64(load8(block, at));
            a = _mm256_fmadd_pd(x0, x0, a);
            b = _mm256_fmadd_pd(x1, x1, b);
            at += 8;
        }
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
        let mut at = 0;
        while at < block.len() {
            let x = load8(block, at);
            let v = _mm256_mul_ps(d_of(x, rs, lo, hi), scale);
            let (x0, x1) = halves_f64(x);
            let (v0, v1) = halves_f64(v);
            let (t0, t1) = (_mm256_sub_pd(x0, v0), _mm256_sub_pd(x1, v1));
            a = _mm256_add_pd(a, _mm256_mul_pd(t0, t0));
            b = _mm256_add_pd(b, _mm256_mul_pd(t1, t1));
            at += 8;
        }
        total += fold(a, b);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Every candidate the search can try on `w`, against the reference
    /// passes: the fits where the bound holds, the other sums always.
    /// Returns how many fits took the fast path.
    fn check_group(w: &[f32], bits: u8, symmetric: bool) -> usize {
        let r = IntRange::of(bits);
        let span = w.iter().fold(Span::ZERO, |s, &x| s.with(x));
        let reference = ReferencePasses { w, span, r };
        // SAFETY: checked by the callers.
        let Some(narrow) = (unsafe { NarrowPasses::new(w, span, r) }) else {
            return 0;
        };
        assert_eq!(narrow.sum_sq().to_bits(), reference.sum_sq().to_bits());
        let minmax = minmax_choice(span, bits, symmetric);
        let mut exact = 0;
        for step in 0..=SHRINK_STEPS {
            let s = candidate_scale(minmax.scale, step);
            if s < f32::MIN_POSITIVE {
                continue;
            }
            let zeros = [
                minmax.zero,
                zero_for_low(span.lo, s, r),
                zero_for_high(span.hi, s, r),
            ];
            for zero in zeros.map(|z| if symmetric { 0 } else { z }) {
                if fit_is_exact(w.len(), span, s, zero, r) {
                    exact += 1;
                    let (a, b) = (narrow.fit(s, zero), reference.fit(s, zero));
                    assert_eq!(a.wd.to_bits(), b.wd.to_bits(), "s {s} z {zero}");
                    assert_eq!(a.dd.to_bits(), b.dd.to_bits(), "s {s} z {zero}");
                }
                let c = Choice {
                    round_scale: s,
                    scale: s * 1.01,
                    zero,
                };
                assert_eq!(
                    narrow.sq_error(c).to_bits(),
                    reference.sq_error(c).to_bits()
                );
            }
        }
        exact
    }

    #[test]
    fn narrow_passes_match_the_reference_on_long_and_ragged_groups() {
        if !has_avx2() {
            return;
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for n in [1, 7, 8, 9, 127, 128, 129, 4095, 4096, 4097, 3 * 4096 + 5] {
            // Magnitudes over twelve octaves, a few exact half steps.
            let w: Vec<f32> = (0..n)
                .map(|i| {
                    let u = (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if i % 11 == 0 {
                        0.25 * (i % 7) as f32
                    } else {
                        u * 2.0f32.powi((next() % 12) as i32 - 6)
                    }
                })
                .collect();
            for (bits, symmetric) in [(4, true), (4, false), (8, true), (8, false), (2, false)] {
                let exact = check_group(&w, bits, symmetric);
                if bits == 4 && symmetric {
                    assert_eq!(exact, 3 * (usize::from(SHRINK_STEPS) + 1), "n {n}");
                }
            }
        }
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            2 => Just(0.0f32),
            1 => Just(-0.0f32),
            2 => (-16i32..16).prop_map(|k| k as f32 * 0.25),
            4 => -1.0f32..1.0,
            1 => -1e4f32..1e4,
            1 => -1e-30f32..1e-30,
            1 => (-1i32..=1, 1u32..64).prop_map(|(s, m)| s as f32 * f32::from_bits(m)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Where the bound holds the any-order fit has the reference's
        /// bits; the rounding sums always do.
        #[test]
        fn narrow_passes_match_the_reference(
            w in prop::collection::vec(value(), 1..300),
            bits in 2..=8u8,
            symmetric in any::<bool>(),
        ) {
            if has_avx2() {
                check_group(&w, bits, symmetric);
            }
        }
    }
}
