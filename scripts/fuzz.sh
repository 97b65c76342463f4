#!/usr/bin/env bash
# Coverage-guided fuzzing of every target under fuzz/ (cargo-fuzz with
# libFuzzer on the nightly toolchain, AddressSanitizer, debug assertions),
# each for a bounded time, starting from the seed corpus in fuzz/corpus/.
#
#   scripts/fuzz.sh            # 45 s per target
#   scripts/fuzz.sh 600        # 10 minutes per target
#   TARGETS="checkpoint statistics" scripts/fuzz.sh 120
#
# The seed corpus is read, never written: what the fuzzer adds goes to a
# temporary directory (KEEP=DIR keeps it there). A crash stops the run with
# the failing input under fuzz/artifacts/<target>/; copy it into
# fuzz/regressions/<target>/ and `cargo test --test fuzz` replays it on the
# stable toolchain from then on.
#
# Needs the nightly toolchain (rustup); installs cargo-fuzz when absent.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-45}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  echo "fuzz.sh: the $toolchain toolchain is not installed (rustup toolchain install $toolchain)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi

targets=${TARGETS:-$(cargo "+$toolchain" fuzz list)}
work=${KEEP:-$(mktemp -d)}
mkdir -p "$work"

# Debug assertions and overflow checks on; 16 codegen units build several
# times faster than cargo-fuzz's default of 1 for slightly slower runs.
build_opts=(--debug-assertions --codegen-units 16)
cargo "+$toolchain" fuzz build "${build_opts[@]}"

for t in $targets; do
  mkdir -p "$work/$t"
  echo "== $t: ${seconds}s"
  # -timeout: one input may take at most 10 s; -rss_limit_mb: the reader
  # must not allocate what the file does not hold.
  log="$work/$t.log"
  status=0
  cargo "+$toolchain" fuzz run "${build_opts[@]}" "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz.sh: $t failed (exit $status); the input is under fuzz/artifacts/$t/" >&2
    exit "$status"
  fi
done
[ -n "${KEEP:-}" ] || rm -rf "$work"
echo "fuzz.sh: every target ran ${seconds}s without a failure"
