//! Fidelity of a compressed tensor against the tensor that entered the value
//! stages.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Error measures of `approx` against `exact`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    pub mse: f64,
    pub max_abs_error: f64,
    /// 10·log10(Σx² / Σ(x−y)²); `null` in JSON when the error is zero
    /// (infinite SNR) or the signal is zero.
    pub snr_db: Option<f64>,
    /// Cosine similarity; `null` when either side is all zeros.
    pub cosine: Option<f64>,
    /// Fraction of exact zeros in `approx`.
    pub sparsity: f64,
}

/// The sums a [`Fidelity`] is made of, for measuring a tensor in parts:
/// [`sums_with`] of each part, [`Sums::merge`] in order, then [`Sums::finish`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Sums {
    err2: f64,
    max_abs: f64,
    x2: f64,
    y2: f64,
    xy: f64,
    zeros: u64,
}

impl Sums {
    fn add(mut self, x: f32, y: f32) -> Self {
        let (x, y) = (f64::from(x), f64::from(y));
        let d = x - y;
        self.err2 += d * d;
        self.max_abs = self.max_abs.max(d.abs());
        self.x2 += x * x;
        self.y2 += y * y;
        self.xy += x * y;
        self.zeros += u64::from(y == 0.0);
        self
    }

    /// Parts merged in the order given, whatever thread computed each: the
    /// same bits on every run (a parallel reduction merges in an order that
    /// depends on how the work was split).
    pub fn merge_in_order(parts: impl IntoIterator<Item = Self>) -> Self {
        parts.into_iter().fold(Self::default(), Self::merge)
    }

    pub fn merge(self, o: Self) -> Self {
        Self {
            err2: self.err2 + o.err2,
            max_abs: self.max_abs.max(o.max_abs),
            x2: self.x2 + o.x2,
            y2: self.y2 + o.y2,
            xy: self.xy + o.xy,
            zeros: self.zeros + o.zeros,
        }
    }
}

/// The sums of one chunk ([`chunk_sums_portable`]), in AVX2 registers when
/// the CPU has them: the same eight lanes and the same IEEE operations in
/// the same order (no fused multiply-add), so the same bits.
fn chunk_sums(a: &[f32], b: &[f32]) -> Sums {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { chunk_sums_avx2(a, b) };
    }
    chunk_sums_portable(a, b)
}

/// [`chunk_sums_portable`] written with AVX2 intrinsics: the compiler's own
/// vectorization of the eight-lane loop shuffles more than it computes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn chunk_sums_avx2(a: &[f32], b: &[f32]) -> Sums {
    use std::arch::x86_64::*;
    const L: usize = 8;
    let n = a.len().min(b.len()) / L * L;
    let (mut e2, mut x2, mut y2, mut xy, mut mx) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let mut zeros = _mm256_setzero_si256();
    let sign = _mm256_set1_ps(-0.0);
    let zero = _mm256_setzero_ps();
    for i in (0..n).step_by(L) {
        // SAFETY: i + L <= n <= both lengths.
        let (x, y) = unsafe {
            (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            )
        };
        let d = _mm256_sub_ps(x, y);
        e2 = _mm256_add_ps(e2, _mm256_mul_ps(d, d));
        x2 = _mm256_add_ps(x2, _mm256_mul_ps(x, x));
        y2 = _mm256_add_ps(y2, _mm256_mul_ps(y, y));
        xy = _mm256_add_ps(xy, _mm256_mul_ps(x, y));
        // `f32::max` ignores a NaN; `max_ps` returns its second operand
        // when either is NaN, and the running maximum never is.
        mx = _mm256_max_ps(_mm256_andnot_ps(sign, d), mx);
        // All ones (-1) where y == 0.
        let is_zero = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(y, zero));
        zeros = _mm256_sub_epi32(zeros, is_zero);
    }
    let lanes = |v: __m256| {
        let mut out = [0f32; L];
        // SAFETY: `out` holds eight f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    };
    let mut z = [0u32; L];
    // SAFETY: `z` holds eight u32.
    unsafe { _mm256_storeu_si256(z.as_mut_ptr().cast(), zeros) };
    let wide = |v: [f32; L]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    let sums = Sums {
        err2: wide(lanes(e2)),
        max_abs: lanes(mx).iter().fold(0f64, |m, &v| m.max(f64::from(v))),
        x2: wide(lanes(x2)),
        y2: wide(lanes(y2)),
        xy: wide(lanes(xy)),
        zeros: z.iter().map(|&c| u64::from(c)).sum(),
    };
    a[n..]
        .iter()
        .zip(&b[n..])
        .fold(sums, |s, (&x, &y)| s.add(x, y))
}

/// Sums over one chunk in eight f32 lanes (vectorized), widened to f64 at
/// the end. Chunks are short (a few thousand elements), so the f32 partial
/// sums lose no more than about 1e-5 relative.
#[inline(always)]
fn chunk_sums_portable(a: &[f32], b: &[f32]) -> Sums {
    const L: usize = 8;
    let (ca, ra) = a.as_chunks::<L>();
    let (cb, rb) = b.as_chunks::<L>();
    let (mut e2, mut x2, mut y2, mut xy, mut mx) =
        ([0f32; L], [0f32; L], [0f32; L], [0f32; L], [0f32; L]);
    let mut zeros = [0u32; L];
    for (xa, ya) in ca.iter().zip(cb) {
        for l in 0..L {
            let (x, y) = (xa[l], ya[l]);
            let d = x - y;
            e2[l] += d * d;
            x2[l] += x * x;
            y2[l] += y * y;
            xy[l] += x * y;
            mx[l] = mx[l].max(d.abs());
            zeros[l] += u32::from(y == 0.0);
        }
    }
    let wide = |v: [f32; L]| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    let lanes = Sums {
        err2: wide(e2),
        max_abs: mx.iter().fold(0f64, |m, &v| m.max(f64::from(v))),
        x2: wide(x2),
        y2: wide(y2),
        xy: wide(xy),
        zeros: zeros.iter().map(|&z| u64::from(z)).sum(),
    };
    ra.iter().zip(rb).fold(lanes, |s, (&x, &y)| s.add(x, y))
}

/// Elements per chunk of the parallel sums; a tensor measured in parts
/// gets the same sums per chunk when its parts are whole chunks.
pub const CHUNK: usize = 4096;

fn finish(s: Sums, n: usize) -> Fidelity {
    let n = n.max(1) as f64;
    let finite = |v: f64| v.is_finite().then_some(v);
    Fidelity {
        mse: s.err2 / n,
        max_abs_error: s.max_abs,
        snr_db: if s.err2 > 0.0 && s.x2 > 0.0 {
            finite(10.0 * (s.x2 / s.err2).log10())
        } else {
            None
        },
        cosine: if s.x2 > 0.0 && s.y2 > 0.0 {
            finite(s.xy / (s.x2.sqrt() * s.y2.sqrt()))
        } else {
            None
        },
        sparsity: s.zeros as f64 / n,
    }
}

/// Plain sequential version, for tests.
pub fn fidelity_reference(exact: &[f32], approx: &[f32]) -> Fidelity {
    let s = exact
        .iter()
        .zip(approx)
        .fold(Sums::default(), |s, (&x, &y)| s.add(x, y));
    finish(s, exact.len())
}

/// Fidelity in parallel over chunks.
pub fn fidelity(exact: &[f32], approx: &[f32]) -> Fidelity {
    assert_eq!(exact.len(), approx.len(), "fidelity: length mismatch");
    let s = exact
        .par_chunks(CHUNK)
        .zip(approx.par_chunks(CHUNK))
        .map(|(a, b)| chunk_sums(a, b))
        .collect::<Vec<_>>();
    finish(Sums::merge_in_order(s), exact.len())
}

/// Fidelity against values produced chunk by chunk: `approx(start, out)`
/// fills `out` with elements `start..start + out.len()`. Nothing the size of
/// the tensor is allocated.
pub fn fidelity_with(exact: &[f32], approx: impl Fn(usize, &mut [f32]) + Sync) -> Fidelity {
    finish(sums_with(exact, approx), exact.len())
}

/// The sums of [`fidelity_with`], in parallel over chunks of [`CHUNK`]
/// elements from the start of `exact`, merged in chunk order: the bits of
/// [`sums_sequential`], whatever the threads (a parallel reduction would
/// merge in an order that depends on how the work was split, and the
/// report's figures would change in their last digits from run to run).
pub fn sums_with(exact: &[f32], approx: impl Fn(usize, &mut [f32]) + Sync) -> Sums {
    // One buffer per unit of rayon work, not one cleared per chunk: the
    // chunks are the same, so are the sums.
    let chunks: Vec<Sums> = exact
        .par_chunks(CHUNK)
        .enumerate()
        .map_init(
            || vec![0f32; CHUNK],
            |buf, (k, a)| {
                let b = &mut buf[..a.len()];
                approx(k * CHUNK, b);
                chunk_sums(a, b)
            },
        )
        .collect();
    Sums::merge_in_order(chunks)
}

/// The sums of [`sums_with`] on the calling thread, chunk after chunk from
/// the start of `exact`: for a part of a tensor measured while it is still
/// in the cache, inside work that is already parallel.
pub fn sums_sequential(exact: &[f32], mut approx: impl FnMut(usize, &mut [f32])) -> Sums {
    let mut buf = [0f32; CHUNK];
    exact
        .chunks(CHUNK)
        .enumerate()
        .fold(Sums::default(), |s, (k, a)| {
            let b = &mut buf[..a.len()];
            approx(k * CHUNK, b);
            s.merge(chunk_sums(a, b))
        })
}

impl Sums {
    /// The fidelity of `n` elements measured by these sums.
    pub fn finish(self, n: usize) -> Fidelity {
        finish(self, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_worked_example() {
        let f = fidelity_reference(&[1.0, 2.0, 0.0, -2.0], &[1.0, 1.0, 0.0, -2.0]);
        assert_eq!(f.mse, 0.25);
        assert_eq!(f.max_abs_error, 1.0);
        assert!((f.snr_db.unwrap() - 10.0 * 9f64.log10()).abs() < 1e-12);
        assert!((f.cosine.unwrap() - 7.0 / (3.0 * 6f64.sqrt())).abs() < 1e-12);
        assert_eq!(f.sparsity, 0.25);
    }

    fn assert_same_bits(a: &Sums, b: &Sums, case: &str) {
        for (u, v) in [
            (a.err2, b.err2),
            (a.max_abs, b.max_abs),
            (a.x2, b.x2),
            (a.y2, b.y2),
            (a.xy, b.xy),
        ] {
            assert_eq!(u.to_bits(), v.to_bits(), "{case}");
        }
        assert_eq!(a.zeros, b.zeros, "{case}");
    }

    #[test]
    fn parallel_sums_have_the_sequential_bits_on_any_number_of_threads() {
        // Chunks whose sums differ by many orders of magnitude, so that
        // the order of merging them shows in the last bits.
        let mut z = 0x2545_f491_4f6c_dd1du64;
        let x: Vec<f32> = (0..200 * CHUNK + 123)
            .map(|i| {
                z ^= z << 13;
                z ^= z >> 7;
                z ^= z << 17;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * 2f32.powi(((i / CHUNK) * 37 % 40) as i32 - 20)
            })
            .collect();
        let approx = |start: usize, out: &mut [f32]| {
            for (k, o) in out.iter_mut().enumerate() {
                *o = (x[start + k] * 8.0).round() / 8.0;
            }
        };
        let want = sums_sequential(&x, approx);
        let y: Vec<f32> = x.iter().map(|&v| (v * 8.0).round() / 8.0).collect();
        let whole = fidelity(&x, &y);
        for threads in [1, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for _ in 0..3 {
                let got = pool.install(|| sums_with(&x, approx));
                assert_same_bits(&got, &want, &format!("{threads} threads"));
                let f = pool.install(|| fidelity(&x, &y));
                assert_eq!(format!("{f:?}"), format!("{whole:?}"), "{threads} threads");
            }
        }
    }

    #[test]
    fn identical_tensors_have_no_error_and_no_finite_snr() {
        let x = [0.5f32, -1.0, 3.0];
        let f = fidelity(&x, &x);
        assert_eq!(f.mse, 0.0);
        assert_eq!(f.snr_db, None);
        assert!((f.cosine.unwrap() - 1.0).abs() < 1e-12);
    }

    /// The build for the CPU's vector registers gives the portable build's
    /// bits, NaN, infinities, zeros and a ragged tail included.
    #[test]
    fn chunk_sums_for_this_cpu_match_the_portable_build_bit_for_bit() {
        let mut x: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 1e-3)
            .collect();
        let mut y: Vec<f32> = x.iter().map(|v| (v * 16.0).round() / 16.0).collect();
        x[5] = f32::NAN;
        y[17] = f32::INFINITY;
        x[40] = -0.0;
        y[41] = f32::NAN;
        for len in [0, 1, 7, 8, 9, 4096, 4099] {
            let (a, b) = (
                chunk_sums(&x[..len], &y[..len]),
                chunk_sums_portable(&x[..len], &y[..len]),
            );
            assert_same_bits(&a, &b, &format!("length {len}"));
        }
    }

    #[test]
    fn parallel_matches_reference() {
        let x: Vec<f32> = (0..200_000)
            .map(|i| ((i * 37 % 1001) as f32) - 500.0)
            .collect();
        let y: Vec<f32> = x.iter().map(|v| (v / 7.0).round() * 7.0).collect();
        let (a, b) = (fidelity(&x, &y), fidelity_reference(&x, &y));
        let c = fidelity_with(&x, |start, out| {
            out.copy_from_slice(&y[start..start + out.len()])
        });
        assert!((c.mse - b.mse).abs() <= 1e-5 * b.mse);
        assert_eq!(c.sparsity, b.sparsity);
        assert!((a.mse - b.mse).abs() <= 1e-5 * b.mse);
        assert_eq!(a.max_abs_error, b.max_abs_error);
        assert_eq!(a.sparsity, b.sparsity);
    }
}
