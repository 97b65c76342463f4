//! Which vector extensions of the CPU the kernels may use.
//!
//! Every kernel with an optimized form picks it at run time from what the
//! CPU has, through [`has!`]. The environment variable `MODELPRESS_SIMD`
//! sets a ceiling below that, to time or test the narrower forms on a wide
//! machine, or to rule a form out:
//!
//! | value | kernels allowed |
//! |---|---|
//! | `avx512` (or unset) | everything the CPU has |
//! | `avx2` | up to AVX2 and FMA: no AVX-512 |
//! | `sse4` | up to SSE4.2 and POPCNT: no AVX |
//! | `portable` | none: the plain Rust loops, as compiled for baseline x86-64 |
//!
//! The outputs are the same bytes at every level: each optimized kernel is
//! tested against its portable form. The command line and the service
//! refuse a value they do not know ([`check_env`]); the library, which has
//! no one to tell, treats one as unset.

use std::sync::OnceLock;

/// `is_x86_feature_detected!` under the ceiling: whether the CPU has the
/// extension and the kernels may use it.
macro_rules! has {
    ($feature:tt) => {
        $crate::cpu::allows($feature) && std::arch::is_x86_feature_detected!($feature)
    };
}
pub(crate) use has;

/// The environment variable that lowers the ceiling.
pub const ENV: &str = "MODELPRESS_SIMD";

/// A ceiling on the extensions the kernels use, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Sse4,
    Avx2,
    Avx512,
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" => Ok(Self::Portable),
            "sse4" => Ok(Self::Sse4),
            "avx2" => Ok(Self::Avx2),
            "avx512" | "" => Ok(Self::Avx512),
            other => Err(format!(
                "{ENV}={other:?} is not a level: use portable, sse4, avx2 or avx512"
            )),
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Portable => "portable",
            Self::Sse4 => "sse4",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        })
    }
}

/// The widest level whose main extensions the CPU has and the ceiling
/// allows: what the kernels run at here (some kernels of a level also
/// need a further extension of it, and fall back a level without it).
pub fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            return Level::Avx512;
        }
        if has_avx2() {
            return Level::Avx2;
        }
        if has!("sse4.2") && has!("popcnt") {
            return Level::Sse4;
        }
    }
    Level::Portable
}

/// Whether the kernels may use the AVX-512 subsets the wide kernels are
/// compiled for (F, BW, DQ, VL): the CPU has them and the ceiling allows.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl")
}

/// Whether the kernels may use what the AVX2 kernels are compiled for
/// (AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    has!("avx2") && has!("fma")
}

/// The ceiling `MODELPRESS_SIMD` sets, or why its value is not one.
pub fn check_env() -> Result<Level, String> {
    match std::env::var(ENV) {
        Ok(v) => v.parse(),
        Err(std::env::VarError::NotPresent) => Ok(Level::Avx512),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ENV} is not valid UTF-8")),
    }
}

/// The ceiling, read once.
pub fn ceiling() -> Level {
    static CEILING: OnceLock<Level> = OnceLock::new();
    *CEILING.get_or_init(|| check_env().unwrap_or(Level::Avx512))
}

/// The lowest level that has an extension, by its
/// `is_x86_feature_detected!` name.
pub fn level_of(feature: &str) -> Level {
    if feature.starts_with("avx512") {
        Level::Avx512
    } else if matches!(
        feature,
        "avx" | "avx2" | "fma" | "f16c" | "bmi1" | "bmi2" | "lzcnt" | "movbe"
    ) {
        Level::Avx2
    } else {
        Level::Sse4
    }
}

/// Whether the ceiling lets the kernels use `feature`.
#[inline]
pub fn allows(feature: &str) -> bool {
    level_of(feature) <= ceiling()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!("AVX2".parse::<Level>(), Ok(Level::Avx2));
        assert_eq!("".parse::<Level>(), Ok(Level::Avx512));
        assert_eq!("portable".parse::<Level>(), Ok(Level::Portable));
        let err = "avx3".parse::<Level>().unwrap_err();
        assert!(err.contains("\"avx3\"") && err.contains(ENV), "{err}");
        assert!(Level::Portable < Level::Sse4 && Level::Avx2 < Level::Avx512);
        for level in [Level::Portable, Level::Sse4, Level::Avx2, Level::Avx512] {
            assert_eq!(level.to_string().parse::<Level>(), Ok(level));
        }
    }

    #[test]
    fn the_level_in_use_is_under_the_ceiling() {
        assert!(level() <= ceiling());
    }

    #[test]
    fn extensions_have_their_levels() {
        assert_eq!(level_of("avx512vbmi2"), Level::Avx512);
        assert_eq!(level_of("avx512f"), Level::Avx512);
        assert_eq!(level_of("fma"), Level::Avx2);
        assert_eq!(level_of("avx2"), Level::Avx2);
        assert_eq!(level_of("ssse3"), Level::Sse4);
        assert_eq!(level_of("popcnt"), Level::Sse4);
    }
}
