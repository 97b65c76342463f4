//! The MSE scale search and the fixed-order sums it is built on.

use rayon::prelude::*;

use super::*;
use crate::compress::coded::affine_value;

/// Σ w·d and Σ d² over a group for `d = q - z`: enough to get the squared
/// error of any scale applied to these symbols, and the best such scale.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fit {
    pub(super) wd: f64,
    pub(super) dd: f64,
}

/// `Σ (w - s·d)²` expanded; exact up to rounding of the sums.
#[inline(always)]
pub(super) fn model_error(sum_sq: f64, fit: Fit, scale: f32) -> f64 {
    let s = f64::from(scale);
    sum_sq - 2.0 * s * fit.wd + s * s * fit.dd
}

/// The passes over one group that the scale search needs. The reference and
/// the optimized kernels implement them with the same arithmetic in the same
/// order.
pub(super) trait GroupPasses {
    /// Σ w².
    fn sum_sq(&self) -> f64;
    fn fit(&self, round_scale: f32, zero: i32) -> Fit;
    /// Σ (w - w')² with the values `c` decodes to.
    fn sq_error(&self, c: Choice) -> f64;
}

/// The MSE scale search: shrunken min-max scales with, when asymmetric,
/// three placements of the zero point (min-max's, low end anchored, high
/// end anchored), each also with its least-squares scale. The candidates are
/// ranked by the expanded error; the winner replaces min-max only if its
/// directly computed error is strictly smaller.
#[inline(always)]
pub(super) fn search_choice(p: &impl GroupPasses, span: Span, bits: u8, symmetric: bool) -> Choice {
    let minmax = minmax_choice(span, bits, symmetric);
    if span.is_zero() {
        return minmax;
    }
    let r = IntRange::of(bits);
    let sum_sq = p.sum_sq();
    // All fits first, then the ranking over arrays: the fits do not depend
    // on each other or on the ranking, so they overlap, and the ranking's
    // loops have no branches to mispredict.
    let mut c = Candidates::default();
    for step in 0..=SHRINK_STEPS {
        let s = candidate_scale(minmax.scale, step);
        if s < f32::MIN_POSITIVE {
            continue;
        }
        let step_zeros = if symmetric {
            [Some(0), None, None]
        } else {
            let a = minmax.zero;
            let b = zero_for_low(span.lo, s, r);
            let c = zero_for_high(span.hi, s, r);
            [
                Some(a),
                (b != a).then_some(b),
                (c != a && c != b).then_some(c),
            ]
        };
        for zero in step_zeros.into_iter().flatten() {
            c.push(s, zero, p.fit(s, zero));
        }
    }
    let best = c.best(sum_sq, bits).unwrap_or(minmax);
    if best != minmax && p.sq_error(best) >= p.sq_error(minmax) {
        minmax
    } else {
        best
    }
}

/// The candidates of one search with their fits, as arrays.
#[derive(Debug, Clone, Copy)]
pub(super) struct Candidates {
    scales: [f32; MAX_CANDIDATES],
    zeros: [i32; MAX_CANDIDATES],
    wd: [f64; MAX_CANDIDATES],
    dd: [f64; MAX_CANDIDATES],
    count: usize,
}

impl Default for Candidates {
    fn default() -> Self {
        Self {
            scales: [0.0; MAX_CANDIDATES],
            zeros: [0; MAX_CANDIDATES],
            wd: [0.0; MAX_CANDIDATES],
            dd: [0.0; MAX_CANDIDATES],
            count: 0,
        }
    }
}

impl Candidates {
    /// Adds a candidate; at most [`MAX_CANDIDATES`].
    #[inline(always)]
    pub(super) fn push(&mut self, scale: f32, zero: i32, fit: Fit) {
        let i = self.count;
        (self.scales[i], self.zeros[i]) = (scale, zero);
        (self.wd[i], self.dd[i]) = (fit.wd, fit.dd);
        self.count += 1;
    }

    fn plain(&self, i: usize) -> Choice {
        Choice {
            round_scale: self.scales[i],
            scale: self.scales[i],
            zero: self.zeros[i],
        }
    }

    /// Of each candidate's plain scale and then its least-squares one (if
    /// it has one: some nonzero `d` and a positive scale), in that order,
    /// the first with the strictly smallest finite error by
    /// [`model_error`]; `None` if no error is finite.
    ///
    /// Branch-free passes over whole arrays, which vectorize: every error
    /// (unused slots and missing least-squares scales infinite), their
    /// minimum in [`LANES`] independent lanes (`min` passes over NaN, which
    /// is never smaller, so the grouping does not change it), then the
    /// first equal to it.
    #[inline(always)]
    pub(super) fn best(&self, sum_sq: f64, bits: u8) -> Option<Choice> {
        let n = self.count;
        let mut plain_err = [f64::INFINITY; MAX_CANDIDATES];
        let mut ls_err = [f64::INFINITY; MAX_CANDIDATES];
        let mut ls_scale = [0.0f32; MAX_CANDIDATES];
        for i in 0..MAX_CANDIDATES {
            let fit = Fit {
                wd: self.wd[i],
                dd: self.dd[i],
            };
            let used = i < n;
            let plain = model_error(sum_sq, fit, self.scales[i]);
            plain_err[i] = if used { plain } else { f64::INFINITY };
            let ls = (fit.wd / fit.dd) as f32;
            let has_ls = used & (fit.dd > 0.0) & (ls > 0.0);
            ls_scale[i] = bounded_scale(ls, bits);
            let err = model_error(sum_sq, fit, ls_scale[i]);
            ls_err[i] = if has_ls { err } else { f64::INFINITY };
        }
        let mut lanes = [f64::INFINITY; LANES];
        for (p, l) in plain_err
            .chunks_exact(LANES)
            .zip(ls_err.chunks_exact(LANES))
        {
            for j in 0..LANES {
                lanes[j] = lanes[j].min(p[j]).min(l[j]);
            }
        }
        let smallest = lanes.iter().fold(f64::INFINITY, |m, &e| m.min(e));
        if smallest == f64::INFINITY {
            return None;
        }
        (0..n).find_map(|i| {
            if plain_err[i] == smallest {
                Some(self.plain(i))
            } else {
                (ls_err[i] == smallest).then(|| Choice {
                    scale: ls_scale[i],
                    ..self.plain(i)
                })
            }
        })
    }

    /// [`Candidates::best`] as a plain sequential scan.
    #[cfg(test)]
    pub(super) fn best_reference(&self, sum_sq: f64, bits: u8) -> Option<Choice> {
        let mut best = None;
        let mut best_err = f64::INFINITY;
        for i in 0..self.count {
            let (plain, fit) = (
                self.plain(i),
                Fit {
                    wd: self.wd[i],
                    dd: self.dd[i],
                },
            );
            let err = model_error(sum_sq, fit, plain.scale);
            if err < best_err {
                (best, best_err) = (Some(plain), err);
            }
            if fit.dd > 0.0 {
                let ls = (fit.wd / fit.dd) as f32;
                if ls > 0.0 {
                    let ls = bounded_scale(ls, bits);
                    let err = model_error(sum_sq, fit, ls);
                    if err < best_err {
                        (best, best_err) = (Some(Choice { scale: ls, ..plain }), err);
                    }
                }
            }
        }
        best
    }
}

/// Whether every partial sum of a fit's `Σ w·d` over `n` values of `span`,
/// rounded with scale `s` and zero point `zero`, is an exact f64.
///
/// `d = q - z` is nonzero only where `w / s` rounds away from 0, so where
/// `|w| > s / 2`. Such a `w` is a multiple of `2^(E - 23)`, `2^E` the
/// largest power of two at most `s / 2` (of `2^-149` below the normal
/// range), and so is its product with the integer `d` and every partial
/// sum. All are at most `n · a · dmax` in magnitude (`a` the largest `|w|`,
/// `dmax` the largest `|q - z|`): below `2^53` such steps, each is an f64.
pub(super) fn fit_is_exact(n: usize, span: Span, s: f32, zero: i32, r: IntRange) -> bool {
    let a = f64::from(span.hi.max(-span.lo));
    let dmax = f64::from((r.qmax - zero).max(zero - r.qmin));
    // The bound computed with rounding errors of a few ulps: 2^52 leaves a
    // factor of two for them. An infinite product fails the test.
    // Scaling by a power of two is exact: a product, not a division.
    let steps = n as f64 * a * dmax * power_of_two(-step_exponent(s));
    steps <= power_of_two(52)
}

/// `2^e` for `e` in the normal f64 range.
pub(super) fn power_of_two(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// The exponent of the step `Q` that every `|w| > s / 2` is a multiple
/// of: `2^(E - 23)` for the largest `2^E <= s / 2`, or the subnormal step.
#[inline(always)]
pub(super) fn step_exponent(s: f32) -> i32 {
    let half = f64::from(s) / 2.0;
    if half < f64::from(f32::MIN_POSITIVE) {
        -149
    } else {
        // The unbiased exponent of a normal f64: floor(log2(half)).
        ((half.to_bits() >> 52) & 0x7ff) as i32 - 1023 - 23
    }
}

/// The range of `d = q - z`: `[qmin - z, qmax - z]`, which contains 0.
#[inline(always)]
pub(super) fn d_range(zero: i32, r: IntRange) -> (f32, f32) {
    ((r.qmin - zero) as f32, (r.qmax - zero) as f32)
}

/// Two reciprocals of a scale `s` that bracket its quotients: for every
/// f32 `w`, the exact products `w · lo` and `w · hi` lie on either side of
/// `fl(w / s)`, the correctly rounded quotient the reference rounds. Where
/// the two products round to the same integer, so does `fl(w / s)`
/// (rounding is monotone): `d` without a division. Where they round apart
/// (`w / s` within about 2^-21 of it of a half-integer, rare), the caller
/// divides.
///
/// `r = 1 / s` in f64 is within 2^-53 of the real reciprocal; `lo` and `hi`
/// are `r · (1 ∓ 2^-22)` rounded to f32 (a further 2^-24), so
/// `w · lo <= (w / s)(1 - 2^-24) <= fl(w / s)` for `w >= 0` and the
/// mirror image for `hi` (and for `w < 0`, the other way round). A
/// subnormal quotient `fl(w / s)` lies within 2^-149 of `w / s`, and both
/// products are below 2^-125 there: all three round to 0. `s` and both
/// reciprocals stay normal: `s` between 2^-100 and 2^100, else `None`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bracket {
    pub(super) lo: f32,
    pub(super) hi: f32,
}

impl Bracket {
    #[inline(always)]
    pub(super) fn of(s: f32) -> Option<Self> {
        let s = f64::from(s);
        if !(power_of_two(-100) <= s && s <= power_of_two(100)) {
            return None;
        }
        let r = 1.0 / s;
        let e = power_of_two(-22);
        Some(Self {
            lo: (r * (1.0 - e)) as f32,
            hi: (r * (1.0 + e)) as f32,
        })
    }

    /// `w · lo` and `w · hi` rounded to integers, ties to even, as
    /// `ROUND_MAGIC` plus that integer: one fused multiply-add each, with
    /// no rounding of the product. Exact for products below 2^22 in
    /// magnitude; beyond, both lie beyond `ROUND_MAGIC ± 2^22` on the
    /// product's side, which a clamp to integer bounds within ±2^22 maps
    /// to the bound, as it does `fl(w / s)`'s integer.
    #[cfg(test)]
    pub(super) fn magic(self, w: f32) -> (f32, f32) {
        (
            w.mul_add(self.lo, ROUND_MAGIC),
            w.mul_add(self.hi, ROUND_MAGIC),
        )
    }
}

/// Room for the candidates of one search, each shrink step with up to
/// three zero points, rounded up to whole [`LANES`].
const MAX_CANDIDATES: usize = (3 * (SHRINK_STEPS as usize + 1)).next_multiple_of(LANES);

/// The search's scale at shrink `step`; falls as `step` grows.
#[inline(always)]
pub(super) fn candidate_scale(minmax_scale: f32, step: u16) -> f32 {
    minmax_scale * (1.0 - f32::from(step) * SHRINK_STEP)
}

/// The smallest scale [`search_choice`] tries on a group of `span`.
#[inline(always)]
pub(super) fn smallest_candidate(span: Span, p: &IntQuant) -> f32 {
    candidate_scale(minmax_choice(span, p.bits, p.symmetric).scale, SHRINK_STEPS)
}

#[inline(always)]
pub(super) fn fold_lanes(l: [f64; LANES]) -> f64 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

#[inline(always)]
pub(super) fn add_blocks<const N: usize>(blocks: impl IntoIterator<Item = [f64; N]>) -> [f64; N] {
    blocks.into_iter().fold([0.0; N], |mut acc, b| {
        add_block(&mut acc, b);
        acc
    })
}

/// One block's sums added to the running ones, in the canonical order.
#[inline(always)]
fn add_block<const N: usize>(acc: &mut [f64; N], b: [f64; N]) {
    for (a, v) in acc.iter_mut().zip(b) {
        *a += v;
    }
}

/// `N` sums of `term(w)` in the canonical order, element `i` of a block into
/// lane `i % LANES`, written to keep the lanes independent.
#[inline(always)]
pub(super) fn block_sums_fast<const N: usize>(
    block: &[f32],
    term: impl Fn(f32) -> [f64; N],
) -> [f64; N] {
    let mut lanes = [[0.0f64; LANES]; N];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        for (j, &w) in c.iter().enumerate() {
            let t = term(w);
            for k in 0..N {
                lanes[k][j] += t[k];
            }
        }
    }
    for (j, &w) in chunks.remainder().iter().enumerate() {
        let t = term(w);
        for k in 0..N {
            lanes[k][j] += t[k];
        }
    }
    lanes.map(fold_lanes)
}

/// The per-block sums of a pass over a group. A trait with an inlined
/// method rather than a closure: the sequential path then runs the kernel
/// inside the caller, at the caller's vector width (a closure is compiled
/// apart, for the baseline CPU).
pub(super) trait BlockSums<const N: usize>: Sync {
    fn block(&self, b: &[f32]) -> [f64; N];
}

/// `N` sums of a term of each element, in the canonical order.
struct TermSums<F>(F);

impl<const N: usize, F: Fn(f32) -> [f64; N] + Sync> BlockSums<N> for TermSums<F> {
    #[inline(always)]
    fn block(&self, b: &[f32]) -> [f64; N] {
        block_sums_fast(b, &self.0)
    }
}

/// The [`GroupPasses::fit`] sums.
struct FitSums {
    span: Span,
    k: FastQuant,
}

impl BlockSums<2> for FitSums {
    #[inline(always)]
    fn block(&self, b: &[f32]) -> [f64; 2] {
        if self.span.all_finite {
            fit_block::<false>(b, self.span, self.k)
        } else {
            fit_block::<true>(b, self.span, self.k)
        }
    }
}

/// Canonical sums over a whole group from per-block sums, blocks in
/// parallel when the group is large.
#[inline(always)]
pub(super) fn group_blocks_fast<const N: usize>(w: &[f32], sums: &impl BlockSums<N>) -> [f64; N] {
    if w.len() > PAR_GROUP {
        let parts: Vec<[f64; N]> = w.par_chunks(BLOCK).map(|b| sums.block(b)).collect();
        add_blocks(parts)
    } else {
        // A loop, not `add_blocks` over a mapped iterator: its closure
        // would hold the kernel, compiled for the baseline CPU.
        let mut acc = [0.0; N];
        for b in w.chunks(BLOCK) {
            add_block(&mut acc, sums.block(b));
        }
        acc
    }
}

#[inline(always)]
pub(super) fn group_sums_fast<const N: usize>(
    w: &[f32],
    term: impl Fn(f32) -> [f64; N] + Sync,
) -> [f64; N] {
    group_blocks_fast(w, &TermSums(term))
}

// Σ d² of a block is an exact i32 sum.
const _: () = assert!(BLOCK * 255 * 255 < i32::MAX as usize);
const _: () = assert!(BLOCK.is_multiple_of(FIT_STEP) && FIT_STEP.is_multiple_of(LANES));

/// The integer value of an integer-valued f32 `x` with `|x| < 2^22`, read
/// from the mantissa of `x + 1.5 * 2^23` (a saturating `as i32` conversion
/// does not vectorize).
#[inline(always)]
pub(super) fn small_int(x: f32) -> i32 {
    (x + ROUND_MAGIC).to_bits() as i32 - ROUND_MAGIC.to_bits() as i32
}

/// Elements per step of [`fit_block`]: small stack buffers, cheap to
/// initialise even for short groups; a multiple of [`LANES`].
pub(super) const FIT_STEP: usize = 64;

/// The [`GroupPasses::fit`] sums of one block: the hot loop of the search.
/// Each step goes through small buffers as plain loops that vectorize: the
/// rounding, Σ d² (an exact integer sum, equal to the reference's exact f64
/// lanes), the f64 products, then the lane sums.
#[inline(always)]
pub(super) fn fit_block<const SANITIZE: bool>(block: &[f32], span: Span, k: FastQuant) -> [f64; 2] {
    let mut wd = [0.0f64; LANES];
    let mut dd = 0i32;
    for step in block.chunks(FIT_STEP) {
        let n = step.len();
        let mut seen = [0.0f32; FIT_STEP];
        let w = if SANITIZE {
            for (o, &x) in seen.iter_mut().zip(step) {
                *o = span.seen(x);
            }
            &seen[..n]
        } else {
            step
        };
        let mut dbuf = [0.0f32; FIT_STEP];
        let d = &mut dbuf[..n];
        for (d, &x) in d.iter_mut().zip(w) {
            *d = k.q(x) - k.zero;
        }
        dd += d.iter().map(|&d| small_int(d) * small_int(d)).sum::<i32>();
        let mut pbuf = [0.0f64; FIT_STEP];
        let p = &mut pbuf[..n];
        for ((p, &w), &d) in p.iter_mut().zip(w).zip(d.iter()) {
            *p = f64::from(w) * f64::from(d);
        }
        let mut chunks = p.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                wd[j] += c[j];
            }
        }
        for (j, &v) in chunks.remainder().iter().enumerate() {
            wd[j] += v;
        }
    }
    [fold_lanes(wd), f64::from(dd)]
}

/// Lanes of [`fit_exact`]: independent sums, as many as the widest
/// registers hold.
const EXACT_LANES: usize = 16;

/// [`GroupPasses::fit`] of finite values in any order, where
/// [`fit_is_exact`] holds: every product and partial sum is then an exact
/// f64 (and `Σ d²` a sum of small integers), so the sums have the canonical
/// order's bits however they are split. A plain loop over independent
/// lanes, without the canonical order's buffers and blocks, that the
/// compiler vectorizes at any register width.
#[inline(always)]
pub(super) fn fit_exact(w: &[f32], k: FastQuant) -> Fit {
    let mut wd = [0.0f64; EXACT_LANES];
    let mut dd = [0.0f64; EXACT_LANES];
    let mut add = |c: &[f32; EXACT_LANES]| {
        for j in 0..EXACT_LANES {
            let d = k.q(c[j]) - k.zero;
            wd[j] += f64::from(c[j]) * f64::from(d);
            dd[j] += f64::from(d) * f64::from(d);
        }
    };
    let mut chunks = w.chunks_exact(EXACT_LANES);
    for c in &mut chunks {
        add(c.try_into().expect("a chunk of EXACT_LANES"));
    }
    // The tail padded with zeros, whose `d` is 0 (the zero point is a
    // value of the range): they add exact zeros.
    let mut tail = [0.0f32; EXACT_LANES];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    add(&tail);
    Fit {
        wd: wd.iter().sum(),
        dd: dd.iter().sum(),
    }
}

/// Canonical sums, plainly.
pub(super) fn group_sums_reference<const N: usize>(
    w: &[f32],
    term: impl Fn(f32) -> [f64; N],
) -> [f64; N] {
    let mut total = [0.0; N];
    for block in w.chunks(BLOCK) {
        let mut lanes = [[0.0f64; LANES]; N];
        for (i, &x) in block.iter().enumerate() {
            let t = term(x);
            for k in 0..N {
                lanes[k][i % LANES] += t[k];
            }
        }
        for k in 0..N {
            total[k] += fold_lanes(lanes[k]);
        }
    }
    total
}

#[inline(always)]
pub(super) fn sq(x: f32) -> f64 {
    f64::from(x) * f64::from(x)
}

pub(super) struct FastPasses<'a> {
    pub(super) w: &'a [f32],
    pub(super) span: Span,
    pub(super) r: IntRange,
}

impl GroupPasses for FastPasses<'_> {
    #[inline(always)]
    fn sum_sq(&self) -> f64 {
        let span = self.span;
        group_sums_fast(self.w, |w| [sq(span.seen(w))])[0]
    }

    #[inline(always)]
    fn fit(&self, round_scale: f32, zero: i32) -> Fit {
        let (span, k) = (self.span, FastQuant::new(round_scale, zero, self.r));
        let (w, r) = (self.w, self.r);
        if span.all_finite
            && w.len() <= PAR_GROUP
            && fit_is_exact(w.len(), span, round_scale, zero, r)
        {
            return fit_exact(w, k);
        }
        let [wd, dd] = group_blocks_fast(w, &FitSums { span, k });
        Fit { wd, dd }
    }

    #[inline(always)]
    fn sq_error(&self, c: Choice) -> f64 {
        let (span, k) = (self.span, FastQuant::new(c.round_scale, c.zero, self.r));
        group_sums_fast(self.w, |w| {
            let w = span.seen(w);
            [sq_diff(w, affine_value(k.q(w) as i32, c.zero, c.scale))]
        })[0]
    }
}

#[inline(always)]
pub(super) fn sq_diff(a: f32, b: f32) -> f64 {
    let d = f64::from(a) - f64::from(b);
    d * d
}

pub(super) struct ReferencePasses<'a> {
    pub(super) w: &'a [f32],
    pub(super) span: Span,
    pub(super) r: IntRange,
}

impl GroupPasses for ReferencePasses<'_> {
    fn sum_sq(&self) -> f64 {
        group_sums_reference(self.w, |w| [sq(self.span.seen(w))])[0]
    }

    fn fit(&self, round_scale: f32, zero: i32) -> Fit {
        let [wd, dd] = group_sums_reference(self.w, |w| {
            let w = self.span.seen(w);
            let d = f64::from(quantize_value(w, round_scale, zero, self.r) - zero);
            [f64::from(w) * d, d * d]
        });
        Fit { wd, dd }
    }

    fn sq_error(&self, c: Choice) -> f64 {
        group_sums_reference(self.w, |w| {
            let w = self.span.seen(w);
            let q = quantize_value(w, c.round_scale, c.zero, self.r);
            [sq_diff(w, affine_value(q, c.zero, c.scale))]
        })[0]
    }
}
