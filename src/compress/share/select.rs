//! Gathering the values the k-means histogram takes, before they are
//! added to it: the nonzero values of a batch ([`add_to_bins`]), or, after
//! a magnitude cut, those above the threshold's bin and those inside it
//! (`pruned`). The values are kept in index order, as their bits.
//!
//! The plain form stores every value and advances the end of the list by
//! whether it was taken: no branch on data that is as good as random, but
//! one store and a dependency on the last count per value. Where the CPU
//! has AVX2, eight values at a time are compared and the taken ones
//! packed to the front of the register by a permutation from a table, then
//! stored at once ([`left_pack`]).

use super::*;
use crate::compress::prune::magnitude_key;

/// The bits of the values of `chunk` (at most [`NONZERO_BATCH`]) that are
/// not ±0, in order, into the front of `out`; how many.
#[inline(always)]
pub(super) fn select_nonzero(chunk: &[f32], out: &mut [u32; NONZERO_BATCH]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::select_nonzero(chunk, out) };
    }
    select_nonzero_reference(chunk, out)
}

/// [`select_nonzero`], one value at a time.
#[inline(always)]
pub(super) fn select_nonzero_reference(chunk: &[f32], out: &mut [u32; NONZERO_BATCH]) -> usize {
    debug_assert!(chunk.len() <= NONZERO_BATCH);
    let mut n = 0;
    for &x in chunk {
        let bits = x.to_bits();
        // `n` is at most the index in `chunk`, so the mask changes
        // nothing; it only spares the bounds check.
        out[n & (NONZERO_BATCH - 1)] = bits;
        n += usize::from(bits << 1 != 0);
    }
    n
}

/// The bits of the values of `chunk` (at most [`NONZERO_BATCH`]) whose
/// magnitude's bin (the top 16 bits of its key) lies above `high` into the
/// front of `above`, and of those inside bin `high` into the front of
/// `inside`, each in order; how many of each.
#[inline(always)]
pub(super) fn select_around(
    chunk: &[f32],
    high: u32,
    above: &mut [u32; NONZERO_BATCH],
    inside: &mut [u32; NONZERO_BATCH],
) -> (usize, usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { avx2::select_around(chunk, high, above, inside) };
    }
    select_around_reference(chunk, high, above, inside)
}

/// [`select_around`], one value at a time.
#[inline(always)]
pub(super) fn select_around_reference(
    chunk: &[f32],
    high: u32,
    above: &mut [u32; NONZERO_BATCH],
    inside: &mut [u32; NONZERO_BATCH],
) -> (usize, usize) {
    debug_assert!(chunk.len() <= NONZERO_BATCH);
    // Both gathered without a branch: which weights survive is as good as
    // random. `n` and `m` are at most the index in `chunk`, so the masks
    // change nothing; they only spare bounds checks.
    let (mut n, mut m) = (0, 0);
    for &x in chunk {
        let bits = x.to_bits();
        let bin = magnitude_key(x) >> 16;
        above[n & (NONZERO_BATCH - 1)] = bits;
        n += usize::from(bin > high);
        inside[m & (NONZERO_BATCH - 1)] = bits;
        m += usize::from(bin == high);
    }
    (n, m)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::compress::sparse::LEFT_PACK;

    /// The lanes of `v` set in `mask` (the low eight bits) stored in order
    /// at `out[n..]`; the new end of the list. Writes all eight lanes, so
    /// `out` must hold `n + 8`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn left_pack(out: &mut [u32], n: usize, v: __m256i, mask: u32) -> usize {
        let indices = &LEFT_PACK[(mask & 0xff) as usize];
        // SAFETY: `indices` holds eight bytes.
        let indices = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(indices.as_ptr().cast()) });
        let packed = _mm256_permutevar8x32_epi32(v, indices);
        let slot = &mut out[n..n + 8];
        // SAFETY: `slot` holds eight u32.
        unsafe { _mm256_storeu_si256(slot.as_mut_ptr().cast(), packed) };
        n + (mask & 0xff).count_ones() as usize
    }

    /// The lanes of an integer vector mask as bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bits(m: __m256i) -> u32 {
        _mm256_movemask_ps(_mm256_castsi256_ps(m)) as u32
    }

    /// The eight values of `c` as bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load8(c: &[f32]) -> __m256i {
        let c: &[f32; 8] = c.try_into().expect("a chunk of eight");
        // SAFETY: `c` holds eight f32.
        unsafe { _mm256_loadu_si256(c.as_ptr().cast()) }
    }

    /// [`super::select_nonzero`] eight values at a time. Before each
    /// step the list is at most as long as the values read so far, so its
    /// eight-lane store stays inside the chunk's length.
    #[target_feature(enable = "avx2")]
    pub(super) fn select_nonzero(chunk: &[f32], out: &mut [u32; NONZERO_BATCH]) -> usize {
        let mut n = 0;
        let mut eights = chunk.chunks_exact(8);
        for c in &mut eights {
            let bits = load8(c);
            let zero = _mm256_cmpeq_epi32(_mm256_slli_epi32::<1>(bits), _mm256_setzero_si256());
            n = left_pack(out, n, bits, !self::bits(zero));
        }
        for &x in eights.remainder() {
            out[n] = x.to_bits();
            n += usize::from(x.to_bits() << 1 != 0);
        }
        n
    }

    /// [`super::select_around`] eight values at a time; the values inside
    /// the bin, a few per thousand, only where a step has one.
    #[target_feature(enable = "avx2")]
    pub(super) fn select_around(
        chunk: &[f32],
        high: u32,
        above: &mut [u32; NONZERO_BATCH],
        inside: &mut [u32; NONZERO_BATCH],
    ) -> (usize, usize) {
        let h = _mm256_set1_epi32(high as i32);
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        let (mut n, mut m) = (0, 0);
        let mut eights = chunk.chunks_exact(8);
        for c in &mut eights {
            let bits = load8(c);
            // Bins are below 2^15: the signed comparison orders them.
            let bin = _mm256_srli_epi32::<16>(_mm256_and_si256(bits, magnitude));
            n = left_pack(above, n, bits, self::bits(_mm256_cmpgt_epi32(bin, h)));
            let at = self::bits(_mm256_cmpeq_epi32(bin, h));
            if at != 0 {
                m = left_pack(inside, m, bits, at);
            }
        }
        for &x in eights.remainder() {
            let bin = magnitude_key(x) >> 16;
            above[n] = x.to_bits();
            n += usize::from(bin > high);
            inside[m] = x.to_bits();
            m += usize::from(bin == high);
        }
        (n, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values of every kind: zeros of both signs, values in a few bins
    /// (so that some share the bin `high` picks), infinities, NaN.
    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            2 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NAN),
            4 => (0u32..4, any::<u16>(), any::<bool>()).prop_map(|(bin, low, negative)| {
                let bits = ((0x3c00 + bin) << 16) | u32::from(low);
                f32::from_bits(bits | (u32::from(negative) << 31))
            }),
            4 => any::<f32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The kernels take the reference's values in the reference's
        /// order, whatever the CPU.
        #[test]
        fn selections_match_the_reference(
            chunk in prop::collection::vec(value(), 0..=NONZERO_BATCH),
            high in prop_oneof![0x3c00u32..0x3c04, Just(0), Just(0x7f80), Just(0x7fff)],
        ) {
            let (mut a, mut b) = ([0u32; NONZERO_BATCH], [0u32; NONZERO_BATCH]);
            let n = select_nonzero(&chunk, &mut a);
            let m = select_nonzero_reference(&chunk, &mut b);
            prop_assert_eq!(&a[..n], &b[..m]);
            let (mut c, mut d) = ([0u32; NONZERO_BATCH], [0u32; NONZERO_BATCH]);
            let (n, m) = select_around(&chunk, high, &mut a, &mut c);
            let (n2, m2) = select_around_reference(&chunk, high, &mut b, &mut d);
            prop_assert_eq!(&a[..n], &b[..n2]);
            prop_assert_eq!(&c[..m], &d[..m2]);
        }
    }

    #[test]
    fn selections_of_a_full_batch_keep_the_order() {
        // Every eighth value zero, every other value in bin 0x3c01.
        let chunk: Vec<f32> = (0..NONZERO_BATCH as u32)
            .map(|i| {
                if i % 8 == 3 {
                    0.0
                } else {
                    f32::from_bits(((0x3c00 + (i % 2)) << 16) | i)
                }
            })
            .collect();
        let mut out = [0u32; NONZERO_BATCH];
        let n = select_nonzero(&chunk, &mut out);
        let expected: Vec<u32> = (0..NONZERO_BATCH as u32)
            .filter(|i| i % 8 != 3)
            .map(|i| ((0x3c00 + (i % 2)) << 16) | i)
            .collect();
        assert_eq!(&out[..n], &expected[..]);
        let (mut above, mut inside) = ([0u32; NONZERO_BATCH], [0u32; NONZERO_BATCH]);
        let (n, m) = select_around(&chunk, 0x3c00, &mut above, &mut inside);
        let odd: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|b| b >> 16 == 0x3c01)
            .collect();
        let even: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|b| b >> 16 == 0x3c00)
            .collect();
        assert_eq!((&above[..n], &inside[..m]), (&odd[..], &even[..]));
    }
}
