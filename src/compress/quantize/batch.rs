//! The symmetric MSE search for 16 neighbouring groups at once, one group
//! per AVX-512 lane.
//!
//! [`WidePasses`] fits one candidate scale of one group per call: a few
//! instructions per value, but every call also pays a fixed cost (two
//! reciprocals, three horizontal sums, the conversion to f64, and the
//! latency of a short chain) that over the 21 candidates of a group of 128
//! costs more than the values do. Here lane `g` of every register belongs
//! to group `g` of a batch of [`GROUPS`]: one pass over the values fits
//! one candidate of all 16 groups, the sums never leave their lane, and the
//! reciprocals are taken once for 16 groups.
//!
//! Each lane computes what [`WidePasses`]'s integer fit computes, with the
//! same exact arithmetic (see [`wide`](super::wide)): `d` from the two
//! products with a [`Bracket`] of the scale, read from the bits of
//! `ROUND_MAGIC + d`; `Σ W·d` over the two 15-bit halves of `W = w / Q` and
//! `Σ d²` in 32-bit lanes (`vpmaddwd` over two values of a group, the
//! values `i` and `i + 1` in the two 16-bit halves of the group's lane).
//! Every sum is exact, so each group gets the same fits, and through
//! [`pick`] the same choice, as [`search_choice`] on it alone.
//!
//! A group the batch does not serve (NaN or infinity, all zeros, a scale
//! out of the brackets' range or the bounds [`fit_is_exact`] and
//! [`Packed`](super::wide) need) and a group where some value's two
//! products round apart at some candidate take the one-group path whole.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::wide::WidePasses;
use super::*;

/// Groups per batch: the f32 lanes of a register.
pub(super) const GROUPS: usize = 16;

/// The longest group a batch takes: its values (32 KiB at most, as f32 and
/// as halves of `W`) stay in the first-level cache.
pub(super) const BATCH_MAX: usize = 256;

/// Candidates of the symmetric search: one per shrink step.
const STEPS: usize = SHRINK_STEPS as usize + 1;

/// Whether [`quantize_batch`] serves groups of `n` values quantized with `p`.
pub(super) fn batch_serves(n: usize, p: &IntQuant) -> bool {
    p.symmetric
        && p.scale_search == ScaleSearch::Mse
        && (2..=BATCH_MAX).contains(&n)
        && n.is_multiple_of(2)
}

/// What the batch knows of one of its groups.
#[derive(Clone, Copy)]
struct Lane {
    span: Span,
    minmax: Choice,
    /// `Q = 2^exponent`, the step of `W`; `None`: the one-group path.
    exponent: Option<i32>,
}

impl Lane {
    fn of(w: &[f32], p: &IntQuant, r: IntRange) -> Self {
        let span = span_fast(w);
        let minmax = minmax_choice(span, p.bits, true);
        let exponent = Self::exponent(w.len(), span, minmax.scale, r);
        Lane {
            span,
            minmax,
            exponent,
        }
    }

    /// The exponent of `Q` when every candidate's fit is exact in the
    /// lane's integers, else `None`.
    ///
    /// Candidate scales fall with the step, and every bound below is
    /// monotone in the scale, so checking the largest and the smallest
    /// candidate checks them all: the brackets exist, every partial sum
    /// is exact ([`fit_is_exact`]: `Q` falls with the scale), `W` of
    /// every value that can round to a nonzero `d` is an integer below
    /// 2^30 and `w / s` is below 2^14 (as [`Packed`](super::wide) needs),
    /// and the 32-bit sums hold (below `n · 2^15 · dmax`).
    fn exponent(n: usize, span: Span, scale: f32, r: IntRange) -> Option<i32> {
        let smallest = candidate_scale(scale, SHRINK_STEPS);
        let dmax = r.qmax.max(-r.qmin) as usize;
        if !span.all_finite
            || span.is_zero()
            || Bracket::of(scale).is_none()
            || Bracket::of(smallest).is_none()
            || !fit_is_exact(n, span, smallest, 0, r)
            || n * dmax >= 1 << 16
        {
            return None;
        }
        let exponent = step_exponent(smallest);
        let a = f64::from(span.hi.max(-span.lo));
        (a / power_of_two(exponent) < power_of_two(30)
            && a / f64::from(smallest) < power_of_two(14))
        .then_some(exponent)
    }
}

/// The 16 groups' values, lane `g` of row `i` value `i` of group `g`, and
/// the halves of their `W` in pairs of rows, ready for `vpmaddwd`.
struct Rows {
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

impl Rows {
    /// # Safety
    /// `w` holds 16 groups of `n` values, `n` even and at most
    /// [`BATCH_MAX`]; the CPU has AVX-512 F and BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn fill(&mut self, w: &[f32], n: usize, exponents: __m512) {
        debug_assert!(w.len() == GROUPS * n && n.is_multiple_of(2) && n <= BATCH_MAX);
        let step = n as i32;
        let index = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(step),
        );
        // `W = w · 2^-exponent` truncated: exact for the values that can get
        // a nonzero `d` (see `Packed::fill` in `wide`).
        let split = |x: __m512| {
            let v = _mm512_cvttps_epi32(_mm512_scalef_ps(x, exponents));
            (
                _mm512_srai_epi32::<15>(v),
                _mm512_and_si512(v, _mm512_set1_epi32(0x7fff)),
            )
        };
        for j in 0..n / 2 {
            // SAFETY: lane `g` reads `w[g·n + 2j]` and `w[g·n + 2j + 1]`,
            // inside `w` (`2j + 1 < n`, `g < 16`).
            let (a, b) = unsafe {
                (
                    _mm512_i32gather_ps::<4>(index, w.as_ptr().add(2 * j).cast()),
                    _mm512_i32gather_ps::<4>(index, w.as_ptr().add(2 * j + 1).cast()),
                )
            };
            self.values[2 * j].write(a);
            self.values[2 * j + 1].write(b);
            let ((ha, la), (hb, lb)) = (split(a), split(b));
            self.high[j].write(pair16(ha, hb));
            self.low[j].write(pair16(la, lb));
        }
    }
}

/// The fits of one candidate for the 16 lanes: the integer sums and the
/// lanes where some value's two products rounded apart.
#[derive(Clone, Copy)]
struct LaneFits {
    high: [i32; GROUPS],
    low: [i32; GROUPS],
    dd: [i32; GROUPS],
    miss: u16,
}

/// The [`Bracket`] of each lane's scale, computed as [`Bracket::of`] does.
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
fn brackets(s: __m512) -> (__m512, __m512) {
    let (s0, s1) = (
        _mm512_cvtps_pd(_mm512_castps512_ps256(s)),
        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(s)),
    );
    let one = _mm512_set1_pd(1.0);
    let (r0, r1) = (_mm512_div_pd(one, s0), _mm512_div_pd(one, s1));
    let e = power_of_two(-22);
    let narrow = |f: f64| {
        let f = _mm512_set1_pd(f);
        let (a, b) = (
            _mm512_cvtpd_ps(_mm512_mul_pd(r0, f)),
            _mm512_cvtpd_ps(_mm512_mul_pd(r1, f)),
        );
        _mm512_insertf32x8::<1>(_mm512_castps256_ps512(a), b)
    };
    (narrow(1.0 - e), narrow(1.0 + e))
}

/// One candidate's fits for every lane, `s` its scales.
///
/// # Safety
/// `rows` holds `n` rows filled by [`Rows::fill`]; the CPU has AVX-512 F,
/// BW and DQ.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
unsafe fn fit_lanes(rows: &Rows, n: usize, s: __m512, r: IntRange) -> LaneFits {
    let (rlo, rhi) = brackets(s);
    let magic = _mm512_set1_ps(ROUND_MAGIC);
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
    let mut rounded = |x: __m512| {
        let (a, b) = (
            _mm512_fmadd_ps(x, rlo, magic),
            _mm512_fmadd_ps(x, rhi, magic),
        );
        // `miss | (a ^ b)`.
        miss =
            _mm512_ternarylogic_epi32::<0xf6>(miss, _mm512_castps_si512(a), _mm512_castps_si512(b));
        _mm512_castps_si512(a)
    };
    for j in 0..n / 2 {
        // SAFETY: rows `2j`, `2j + 1` and pair `j` were written by `fill`.
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
        high = _mm512_add_epi32(high, _mm512_madd_epi16(d, h));
        low = _mm512_add_epi32(low, _mm512_madd_epi16(d, l));
        dd = _mm512_add_epi32(dd, _mm512_madd_epi16(d, d));
    }
    let mut f = LaneFits {
        high: [0; GROUPS],
        low: [0; GROUPS],
        dd: [0; GROUPS],
        miss: _mm512_test_epi32_mask(miss, miss),
    };
    // SAFETY: each array holds 16 i32.
    unsafe {
        _mm512_storeu_si512(f.high.as_mut_ptr().cast(), high);
        _mm512_storeu_si512(f.low.as_mut_ptr().cast(), low);
        _mm512_storeu_si512(f.dd.as_mut_ptr().cast(), dd);
    }
    f
}

/// The fits of a batch: each lane's group, which lanes the batch served
/// to the end, and every candidate's scales and sums.
struct BatchFits {
    lanes: [Lane; GROUPS],
    /// Bit `g`: group `g` has all its fits here.
    served: u16,
    fits: [LaneFits; STEPS],
    scales: [[f32; GROUPS]; STEPS],
}

impl BatchFits {
    /// # Safety
    /// `w` holds 16 groups of `n` values and [`batch_serves`] holds for `n`
    /// and `p`; the CPU has AVX-512 F, BW, DQ and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    unsafe fn of(w: &[f32], n: usize, p: &IntQuant, r: IntRange) -> Self {
        let lanes: [Lane; GROUPS] = std::array::from_fn(|g| Lane::of(&w[g * n..][..n], p, r));
        let mut served: u16 = 0;
        // Lanes not served compute with scale 1 and are never read.
        let (mut exponents, mut minmax) = ([0.0f32; GROUPS], [1.0f32; GROUPS]);
        for (g, lane) in lanes.iter().enumerate() {
            if let Some(e) = lane.exponent {
                served |= 1 << g;
                exponents[g] = -e as f32;
                minmax[g] = lane.minmax.scale;
            }
        }
        let mut b = BatchFits {
            lanes,
            served,
            fits: [LaneFits {
                high: [0; GROUPS],
                low: [0; GROUPS],
                dd: [0; GROUPS],
                miss: 0,
            }; STEPS],
            scales: [[0.0; GROUPS]; STEPS],
        };
        if served == 0 {
            return b;
        }
        let mut rows = Rows {
            values: [const { MaybeUninit::uninit() }; BATCH_MAX],
            high: [const { MaybeUninit::uninit() }; BATCH_MAX / 2],
            low: [const { MaybeUninit::uninit() }; BATCH_MAX / 2],
        };
        // SAFETY: `w` holds 16 groups of `n`, `n` as `batch_serves` needs;
        // the CPU features are required of the caller.
        unsafe { rows.fill(w, n, _mm512_loadu_ps(exponents.as_ptr())) };
        for (step, (fit, s)) in b.fits.iter_mut().zip(&mut b.scales).enumerate() {
            *s = minmax.map(|m| candidate_scale(m, step as u16));
            // SAFETY: as above; `rows` holds `n` rows.
            *fit = unsafe { fit_lanes(&rows, n, _mm512_loadu_ps(s.as_ptr()), r) };
            b.served &= !fit.miss;
        }
        b
    }

    /// Group `g`'s candidates in [`search_choice`]'s order, if served.
    fn candidates(&self, g: usize) -> Option<Candidates> {
        let exponent = self.lanes[g].exponent?;
        if self.served & (1 << g) == 0 {
            return None;
        }
        let mut c = Candidates::default();
        for (f, s) in self.fits.iter().zip(&self.scales) {
            let wd = (i64::from(f.high[g]) << 15) + i64::from(f.low[g]);
            c.push(
                s[g],
                0,
                Fit {
                    // Below 2^53, times a power of two: exact.
                    wd: wd as f64 * power_of_two(exponent),
                    dd: f64::from(f.dd[g]),
                },
            );
        }
        Some(c)
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
    let b = unsafe { BatchFits::of(w, n, p, r) };
    for (g, (choice, out)) in choices.iter_mut().zip(out.chunks_mut(n)).enumerate() {
        let w = &w[g * n..][..n];
        let lane = b.lanes[g];
        *choice = match b.candidates(g) {
            Some(c) => {
                // SAFETY: the CPU features are required of the caller.
                let passes = unsafe { WidePasses::unpacked(w, lane.span, r) };
                let choice = pick(&passes, &c, lane.minmax, p.bits);
                write_symbols_fast(w, out, lane.span, choice, r);
                choice
            }
            // SAFETY: as above.
            None => unsafe { quantize_group_avx512(w, out, p, r) },
        };
    }
}

/// How many of the 16 groups in `w` the batch fits itself.
///
/// # Safety
/// As [`quantize_batch`].
#[cfg(test)]
pub(super) unsafe fn served_lanes(w: &[f32], p: &IntQuant) -> u32 {
    // SAFETY: as required of the caller.
    unsafe { BatchFits::of(w, w.len() / GROUPS, p, IntRange::of(p.bits)) }
        .served
        .count_ones()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{heavy_tailed, pass_value};
    use super::*;
    use crate::compress::coded::{Granularity, MatrixShape};
    use crate::compress::testing::first_difference;
    use proptest::prelude::*;

    fn search(bits: u8, n: usize) -> IntQuant {
        IntQuant {
            bits,
            symmetric: true,
            granularity: Granularity::Group(n),
            scale_search: ScaleSearch::Mse,
        }
    }

    /// `quantize_int` (batches of 16 groups where the CPU has AVX-512)
    /// against the plain reference, bit for bit.
    fn check_against_reference(w: &[f32], n: usize, bits: u8) {
        let shape = MatrixShape {
            rows: 1,
            cols: w.len(),
        };
        let p = search(bits, n);
        let fast = quantize_int(w, shape, &p);
        let reference = quantize_int_reference(w, shape, &p);
        assert_eq!(
            first_difference(&fast, &reference),
            None,
            "n {n}, bits {bits}"
        );
    }

    /// Lanes the batch serves itself, for 16 groups of `n` at `bits`.
    fn served(w: &[f32], bits: u8) -> u32 {
        let n = w.len() / GROUPS;
        assert!(batch_serves(n, &search(bits, n)));
        // SAFETY: the callers check the CPU.
        unsafe { served_lanes(w, &search(bits, n)) }
    }

    #[test]
    fn ordinary_groups_are_fitted_in_the_batch_with_the_references_bits() {
        if !has_avx512() {
            return;
        }
        for n in [2, 32, 128, 256] {
            let w = heavy_tailed(GROUPS * n, n as u64);
            assert_eq!(served(&w, 4), GROUPS as u32, "n {n}");
            for bits in 2..=8 {
                check_against_reference(&w, n, bits);
            }
            // Whole batches and a ragged rest of groups.
            let w = heavy_tailed(3 * GROUPS * n + 5 * n, 3);
            check_against_reference(&w, n, 4);
        }
    }

    #[test]
    fn groups_the_batch_cannot_fit_take_the_one_group_path() {
        if !has_avx512() {
            return;
        }
        let n = 128;
        let mut w = heavy_tailed(GROUPS * n, 11);
        // A NaN, an infinity, all zeros, a subnormal group (no bracket).
        w[3] = f32::NAN;
        w[n + 5] = f32::NEG_INFINITY;
        w[2 * n..3 * n].fill(0.0);
        for (i, x) in w[3 * n..4 * n].iter_mut().enumerate() {
            *x = f32::from_bits(i as u32 + 1);
        }
        // Exact ties at the first candidate scale, 0.875 / 7 = 1/8: values
        // on odd multiples of 1/16 whose two products round apart.
        for (i, x) in w[4 * n..5 * n].iter_mut().enumerate() {
            *x = if i == 0 {
                0.875
            } else {
                ((i % 14) as f32 - 6.5) / 8.0
            };
        }
        assert_eq!(served(&w, 4), GROUPS as u32 - 5);
        check_against_reference(&w, n, 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any values, group lengths and widths: the batch's choices and
        /// symbols are the reference's.
        #[test]
        fn batches_match_the_reference(
            n in prop::sample::select(vec![2usize, 4, 6, 16, 30, 64, 128, 256]),
            groups in GROUPS..3 * GROUPS,
            bits in 2..=8u8,
            seed in any::<u64>(),
            odd in prop::collection::vec((any::<prop::sample::Index>(), pass_value()), 0..8),
        ) {
            if has_avx512() {
                let mut w = heavy_tailed(groups * n, seed);
                let len = w.len();
                for (i, v) in odd {
                    w[i.index(len)] = v;
                }
                check_against_reference(&w, n, bits);
            }
        }
    }
}
