#!/usr/bin/env bash
# Speed and memory of the calibrated kernels (GPTQ 4-bit g128, SparseGPT
# 50%) on synthetic f32 layers, against the plain numpy reference
# (scripts/calibrated_reference.py) on the same data in the same run.
# `xtx` is XᵀX of 8192 correlated random rows.
#
#   scripts/bench-calibrated.sh                    # 4096x4096 and 11008x4096
#   SHAPES="4096x4096" scripts/bench-calibrated.sh
#   PYTHON=/path/to/venv/bin/python scripts/bench-calibrated.sh   # needs numpy
#
# Prints per layer and method: seconds of the sweep (the numpy reference's
# algorithm), seconds of the whole stage as the engine runs it (the sweep,
# then the per-row choice between GPTQ and round-to-nearest, which computes
# the output error), the numpy seconds, their ratio, both output errors,
# and the peak anonymous memory of the Rust run against the bound
# 64 MiB + 4 x the tensor + 3 x xtx (f32).
set -euo pipefail
cd "$(dirname "$0")/.."

SHAPES=${SHAPES:-"4096x4096 11008x4096"}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release --quiet --example bench_calibrated
BIN=$TARGET/release/examples/bench_calibrated

# Runs a command, polling its anonymous resident memory; prints its stdout,
# then "peak_bytes" on the last line.
measure() {
  local pid peak=0 anon out
  out=$(mktemp)
  "$@" >"$out" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    anon=$(awk '/RssAnon/ {print $2 * 1024}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$anon" ] && [ "$anon" -gt "$peak" ] && peak=$anon
    sleep 0.05
  done
  wait "$pid"
  cat "$out"
  rm -f "$out"
  echo "$peak"
}

printf '%-12s %-10s %9s %9s %9s %7s %12s %12s %9s %9s\n' \
  layer method rust_s stage_s numpy_s ratio rust_err numpy_err peak_MiB bound_MiB
for shape in $SHAPES; do
  rows=${shape%x*}
  cols=${shape#*x}
  "$BIN" gen "$rows" "$cols" "$WORK"
  bound=$(( (64 * 1024 * 1024 + 4 * rows * cols * 4 + 3 * cols * cols * 4) / 1048576 ))
  for method in gptq sparsegpt; do
    mapfile -t rust < <(measure "$BIN" run "$method" "$rows" "$cols" "$WORK")
    np=$("$PYTHON" scripts/calibrated_reference.py "$method" "$rows" "$cols" \
      "$WORK/w_${rows}x${cols}.f32" "$WORK/xtx_${cols}.f32")
    python3 - "$shape" "$method" "${rust[0]}" "$np" "${rust[1]}" "$bound" <<'PY'
import json, sys
shape, method, rust, np_, peak, bound = sys.argv[1:]
r, n = json.loads(rust), json.loads(np_)
print(f"{shape:<12} {method:<10} {r['seconds']:9.2f} {r['stage_seconds']:9.2f} {n['seconds']:9.2f} "
      f"{n['seconds'] / r['seconds']:6.2f}x {r['output_error']:12.4e} {n['output_error']:12.4e} "
      f"{int(peak) / 1048576:9.0f} {bound:>9}")
PY
  done
done
