#!/usr/bin/env bash
# Speed and memory of the calibrated kernels (GPTQ 4-bit g128, SparseGPT
# 50%) on synthetic f32 layers, against the plain numpy reference
# (scripts/calibrated_reference.py) on the same data in the same run.
# `xtx` is XᵀX of 8192 correlated random rows. The default layers are the
# three shapes of a LLaMA-7B block: 4096x4096 (q, k, v, o), 11008x4096
# (gate, up) and 4096x11008 (down, whose xtx is 11008x11008).
#
#   scripts/bench-calibrated.sh
#   SHAPES="4096x4096" scripts/bench-calibrated.sh
#   PYTHON=/path/to/venv/bin/python scripts/bench-calibrated.sh   # needs numpy
#   BEFORE=/path/to/older/bench_calibrated scripts/bench-calibrated.sh
#
# Prints per layer and method: seconds of the sweep (the numpy reference's
# algorithm), seconds of the whole stage as the engine runs it on a tensor
# (the Hessian's factor, the sweep, for gptq the per-row choice between
# GPTQ and round to nearest, and the report's output error), the same for a
# second tensor sharing the statistics (the factor reused, as for k and v
# after q), the numpy seconds, the ratio numpy / sweep, both output errors,
# and the peak anonymous memory of the Rust run against the bound
# 64 MiB + 4 x the tensor + 3 x xtx (f32). With BEFORE (an older build of
# this example, which prints the stage and its output error apart), its
# whole-stage seconds in the same run. The load average is printed before
# and after.
set -euo pipefail
cd "$(dirname "$0")/.."

SHAPES=${SHAPES:-"4096x4096 11008x4096 4096x11008"}
BEFORE=${BEFORE:-}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$WORK"

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

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-12s %-10s %8s %8s %8s %8s %8s %7s %11s %11s %11s %8s %8s\n' \
  layer method sweep_s stage_s shared_s before_s numpy_s ratio rust_err before_err numpy_err peak_MiB bound_MiB
for shape in $SHAPES; do
  rows=${shape%x*}
  cols=${shape#*x}
  "$BIN" gen "$rows" "$cols" "$WORK"
  bound=$(( (64 * 1024 * 1024 + 4 * rows * cols * 4 + 3 * cols * cols * 4) / 1048576 ))
  for method in gptq sparsegpt; do
    mapfile -t rust < <(measure "$BIN" run "$method" "$rows" "$cols" "$WORK")
    before='{}'
    if [ -n "$BEFORE" ]; then
      before=$("$BEFORE" run "$method" "$rows" "$cols" "$WORK")
    fi
    np=$("$PYTHON" scripts/calibrated_reference.py "$method" "$rows" "$cols" \
      "$WORK/w_${rows}x${cols}.f32" "$WORK/xtx_${cols}.f32")
    python3 - "$shape" "$method" "${rust[0]}" "$np" "${rust[1]}" "$bound" "$before" <<'PY'
import json, sys
shape, method, rust, np_, peak, bound, before = sys.argv[1:]
r, n, b = json.loads(rust), json.loads(np_), json.loads(before)
# An older build timed the stage and the report's output error apart.
b_s = b["stage_seconds"] + b.get("output_error_seconds", 0.0) if b else float("nan")
b_e = b["output_error"] if b else float("nan")
print(f"{shape:<12} {method:<10} {r['seconds']:8.2f} {r['stage_seconds']:8.2f} "
      f"{r['stage_shared_seconds']:8.2f} {b_s:8.2f} {n['seconds']:8.2f} "
      f"{n['seconds'] / r['seconds']:6.2f}x {r['output_error']:11.4e} {b_e:11.4e} {n['output_error']:11.4e} "
      f"{int(peak) / 1048576:8.0f} {bound:>8}")
PY
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
