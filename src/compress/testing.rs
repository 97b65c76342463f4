//! Comparisons shared by the kernel tests.

use super::coded::{Coded, Decode};

/// Describes the first place two codings differ, if any.
pub fn first_difference(a: &Coded, b: &Coded) -> Option<String> {
    if a.bits != b.bits || a.group_len != b.group_len {
        return Some(format!(
            "bits/group_len {}/{} vs {}/{}",
            a.bits, a.group_len, b.bits, b.group_len
        ));
    }
    if let Some(i) =
        (0..a.symbols.len().max(b.symbols.len())).find(|&i| a.symbols.get(i) != b.symbols.get(i))
    {
        return Some(format!(
            "symbol {i}: {:?} vs {:?}",
            a.symbols.get(i),
            b.symbols.get(i)
        ));
    }
    let params = |c: &Coded| -> (Vec<u32>, Vec<i32>) {
        match &c.decode {
            Decode::Affine {
                scales,
                zero_points,
            } => (
                scales.iter().map(|s| s.to_bits()).collect(),
                zero_points.clone(),
            ),
            Decode::Fp8 { scales } => (scales.iter().map(|s| s.to_bits()).collect(), vec![]),
            Decode::Codebook { values, .. } => {
                (values.iter().map(|s| s.to_bits()).collect(), vec![])
            }
        }
    };
    let (sa, za) = params(a);
    let (sb, zb) = params(b);
    if let Some(g) = (0..sa.len().max(sb.len())).find(|&g| sa.get(g) != sb.get(g)) {
        return Some(format!(
            "scale of group {g}: {:?} vs {:?}",
            sa.get(g).map(|&b| f32::from_bits(b)),
            sb.get(g).map(|&b| f32::from_bits(b))
        ));
    }
    if let Some(g) = (0..za.len().max(zb.len())).find(|&g| za.get(g) != zb.get(g)) {
        return Some(format!(
            "zero point of group {g}: {:?} vs {:?}",
            za.get(g),
            zb.get(g)
        ));
    }
    None
}

/// The first index where `a` and `b` differ under `same`; a length
/// mismatch differs at the shorter length.
pub fn first_mismatch<T>(a: &[T], b: &[T], same: impl Fn(&T, &T) -> bool) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| !same(x, y))
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Panics at the first element whose bits differ.
pub fn assert_same_bits(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "first difference at index {i}: got {} want {}",
            got[i], want[i]
        );
    }
}
