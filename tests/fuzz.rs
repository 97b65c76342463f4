//! The fuzz targets (`tests/fuzz/targets.rs`) on the stable toolchain: every
//! input of the seed corpus and every crash found (`fuzz/regressions/`),
//! and bounded seeded byte mutations of the corpus. Coverage-guided fuzzing
//! of the same targets runs from `scripts/fuzz.sh`.

#[path = "fuzz/targets.rs"]
mod targets;

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::sample::Index;

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_seed_corpus() {
    for (name, _) in targets::TARGETS {
        assert!(
            !inputs("corpus", name).is_empty(),
            "fuzz/corpus/{name}/ has no seed"
        );
    }
}

#[test]
fn every_seed_and_every_crash_found_is_handled() {
    for (name, target) in targets::TARGETS {
        for kind in ["corpus", "regressions"] {
            for (path, bytes) in inputs(kind, name) {
                let outcome = std::panic::catch_unwind(|| target(&bytes));
                assert!(outcome.is_ok(), "{name} fails on {}", path.display());
            }
        }
    }
}

/// One change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    Set(Index, u8),
    FlipBit(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
    /// A run of a byte that JSON and lengths care about.
    Splice(Index, u8, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let special = prop::sample::select(vec![
        b'0', b'9', b'"', b'{', b'}', b'[', b']', b',', b':', b'-', 0x00, 0xff, 0x7f, b'e',
    ]);
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), special, 1u8..9).prop_map(|(i, b, n)| Mutation::Splice(i, b, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        bytes.push(0);
    }
    match m {
        Mutation::Set(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Mutation::FlipBit(i, bit) => {
            let i = i.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::Insert(i, b) => {
            let i = i.index(bytes.len() + 1);
            bytes.insert(i, *b);
        }
        Mutation::Remove(i) => {
            let i = i.index(bytes.len());
            bytes.remove(i);
        }
        Mutation::Truncate(i) => {
            let i = i.index(bytes.len());
            bytes.truncate(i);
        }
        Mutation::Splice(i, b, n) => {
            let i = i.index(bytes.len());
            for k in 0..*n as usize {
                if let Some(x) = bytes.get_mut(i + k) {
                    *x = *b;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn mutated_seeds_are_handled(
        target in 0..targets::TARGETS.len(),
        seed in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let (name, run) = targets::TARGETS[target];
        let seeds = inputs("corpus", name);
        prop_assume!(!seeds.is_empty());
        let mut bytes = seeds[seed.index(seeds.len())].1.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        run(&bytes);
    }
}
