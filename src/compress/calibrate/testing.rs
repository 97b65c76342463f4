//! Test data for the calibrated kernels.

/// xorshift64*: deterministic data without a rand dependency.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
}

/// `XᵀX` (row-major `d × d`, exactly symmetric) of `n` rows whose columns
/// are correlated (each a mix of its neighbours) and of very different
/// scales, as transformer activations are.
pub(crate) fn random_xtx(rng: &mut Rng, d: usize, n: usize) -> Vec<f32> {
    let scales: Vec<f64> = (0..d).map(|_| (3.0 * rng.uniform()).exp()).collect();
    let mut h = vec![0.0f64; d * d];
    let mut x = vec![0.0f64; d];
    for _ in 0..n {
        let z: Vec<f64> = (0..d).map(|_| f64::from(rng.normal())).collect();
        let common = f64::from(rng.normal());
        for j in 0..d {
            let prev = if j > 0 { z[j - 1] } else { 0.0 };
            x[j] = scales[j] * (z[j] + 0.8 * prev + 0.5 * common);
        }
        for i in 0..d {
            for j in 0..=i {
                h[i * d + j] += x[i] * x[j];
            }
        }
    }
    let mut out = vec![0.0f32; d * d];
    for i in 0..d {
        for j in 0..=i {
            out[i * d + j] = h[i * d + j] as f32;
            out[j * d + i] = h[i * d + j] as f32;
        }
    }
    out
}
