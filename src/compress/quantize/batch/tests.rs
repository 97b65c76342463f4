use super::super::tests::{heavy_tailed, pass_value};
use super::*;
use crate::compress::coded::{Granularity, MatrixShape};
use crate::compress::testing::first_difference;
use proptest::prelude::*;

pub(super) fn search(bits: u8, n: usize) -> IntQuant {
    IntQuant {
        bits,
        symmetric: true,
        granularity: Granularity::Group(n),
        scale_search: ScaleSearch::Mse,
    }
}

impl Isa {
    /// Every kind of batch this CPU can compute.
    fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .filter(|isa| match isa {
                Isa::Avx512 => has_avx512(),
                Isa::Avx2 => has_avx2(),
            })
            .collect()
    }

    /// How many of the groups of one batch in `w` the batch fits itself.
    fn served(self, w: &[f32], bits: u8) -> u32 {
        let n = w.len() / self.groups();
        let p = search(bits, n);
        assert!(batch_serves(n, &p));
        // SAFETY: `available` checked the CPU; `w` holds one batch.
        unsafe {
            match self {
                Isa::Avx512 => avx512::served_lanes(w, &p),
                Isa::Avx2 => avx2::served_lanes(w, &p),
            }
        }
    }
}

/// Groups of `n` in `w` quantized in batches of `isa` (a ragged rest one
/// group at a time), against the plain reference, bit for bit.
fn check_against_reference(isa: Isa, w: &[f32], n: usize, bits: u8) {
    let p = search(bits, n);
    let r = IntRange::of(bits);
    let groups = isa.groups();
    let mut symbols = vec![0u8; w.len()];
    let unset = Choice {
        round_scale: 0.0,
        scale: 0.0,
        zero: 0,
    };
    let mut choices = vec![unset; w.len() / n];
    for ((out, w), c) in symbols
        .chunks_mut(groups * n)
        .zip(w.chunks(groups * n))
        .zip(choices.chunks_mut(groups))
    {
        if c.len() == groups {
            // SAFETY: `available` checked the CPU; `batch_serves` holds
            // (the callers' `n` are even, at most `BATCH_MAX`).
            unsafe { isa.quantize_batch(w, out, c, &p, r) };
        } else {
            quantize_groups(w, out, c, &p, r);
        }
    }
    let fast = int_coded(symbols, &choices, n, &p);
    let shape = MatrixShape {
        rows: 1,
        cols: w.len(),
    };
    let reference = quantize_int_reference(w, shape, &p);
    assert_eq!(
        first_difference(&fast, &reference),
        None,
        "{isa:?}, n {n}, bits {bits}"
    );
}

#[test]
fn ordinary_groups_are_fitted_in_the_batch_with_the_references_bits() {
    for isa in Isa::available() {
        let groups = isa.groups();
        for n in [2, 32, 128, 256] {
            let w = heavy_tailed(groups * n, n as u64);
            assert_eq!(isa.served(&w, 4), groups as u32, "{isa:?}, n {n}");
            for bits in 2..=8 {
                check_against_reference(isa, &w, n, bits);
            }
            // Whole batches and a ragged rest of groups.
            let w = heavy_tailed(3 * groups * n + 5 * n, 3);
            check_against_reference(isa, &w, n, 4);
        }
    }
}

#[test]
fn groups_the_batch_cannot_fit_take_the_one_group_path() {
    for isa in Isa::available() {
        let n = 128;
        let mut w = heavy_tailed(isa.groups() * n, 11);
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
        assert_eq!(isa.served(&w, 4), isa.groups() as u32 - 5, "{isa:?}");
        check_against_reference(isa, &w, n, 4);
    }
}

/// The dispatch takes the widest batch the CPU has and gives the
/// reference's bits, batches and ragged rest alike.
#[test]
fn quantize_int_takes_the_batches_with_the_references_bits() {
    let (n, bits) = (64, 3);
    let w = heavy_tailed(40 * n, 21);
    let p = search(bits, n);
    let shape = MatrixShape {
        rows: 8,
        cols: w.len() / 8,
    };
    let fast = quantize_int(&w, shape, &p);
    assert_eq!(
        first_difference(&fast, &quantize_int_reference(&w, shape, &p)),
        None
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any values, group lengths and widths: the batches' choices and
    /// symbols are the reference's.
    #[test]
    fn batches_match_the_reference(
        n in prop::sample::select(vec![2usize, 4, 6, 16, 30, 64, 128, 256]),
        groups in 16..48usize,
        bits in 2..=8u8,
        seed in any::<u64>(),
        odd in prop::collection::vec((any::<prop::sample::Index>(), pass_value()), 0..8),
    ) {
        let mut w = heavy_tailed(groups * n, seed);
        let len = w.len();
        for (i, v) in odd {
            w[i.index(len)] = v;
        }
        for isa in Isa::available() {
            check_against_reference(isa, &w, n, bits);
        }
    }
}
