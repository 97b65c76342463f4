#!/usr/bin/env bash
# End-to-end speed and memory of `modelpress compress` on a synthetic
# transformer-shaped f32 checkpoint, each figure as a ratio to `cp` of the
# same file measured in the same run (both read a warm page cache and fsync
# their output).
#
#   scripts/bench.sh            # ~1 GiB checkpoint
#   GIB=4 scripts/bench.sh      # larger
#   WORK=/path scripts/bench.sh # keep the generated files there
#   RUNS=3 scripts/bench.sh     # best of 3 runs per preset (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

GIB=${GIB:-1}
WORK=${WORK:-$(mktemp -d)}
PRESETS=${PRESETS:-"int8 int4-g128 deep-compression"}
RUNS=${RUNS:-2}
mkdir -p "$WORK"

cargo build --release --quiet --bin modelpress --example synth_checkpoint
BIN=target/release/modelpress
IN=$WORK/synth-${GIB}g.safetensors
[ -f "$IN" ] || target/release/examples/synth_checkpoint "$IN" "$GIB" >/dev/null
SIZE=$(stat -c %s "$IN")
# The largest tensor, for the memory bound: 64 MiB + 4 x its f32 size.
LARGEST=$($BIN inspect "$IN" --json | python3 -c '
import json,sys
d=json.load(sys.stdin)
print(max(t["bytes"] // {"F32":4,"F16":2,"BF16":2,"F64":8}.get(t["dtype"],1) * 4 for t in d["tensors"]))')
LIMIT=$(( 64 * 1024 * 1024 + 4 * LARGEST ))

now() { date +%s.%N; }

# Runs a command, polling its anonymous resident memory; prints "seconds peak_bytes".
measure() {
  local start end pid peak=0 anon
  start=$(now)
  "$@" >/dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    anon=$(awk '/RssAnon/ {print $2 * 1024}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$anon" ] && [ "$anon" -gt "$peak" ] && peak=$anon
    sleep 0.02
  done
  wait "$pid"
  end=$(now)
  echo "$(echo "$end - $start" | bc -l) $peak"
}

cat "$IN" >/dev/null   # warm the page cache
best_cp=
for _ in 1 2 3; do
  rm -f "$WORK/copy.safetensors"
  read -r t _ < <(measure sh -c "cp '$IN' '$WORK/copy.safetensors' && sync '$WORK/copy.safetensors'")
  if [ -z "$best_cp" ] || (( $(echo "$t < $best_cp" | bc -l) )); then best_cp=$t; fi
done
rm -f "$WORK/copy.safetensors"

printf 'input: %s (%.2f GiB), largest tensor %.0f MiB (f32), memory limit %.0f MiB\n' \
  "$IN" "$(echo "$SIZE / 1073741824" | bc -l)" "$(echo "$LARGEST / 1048576" | bc -l)" \
  "$(echo "$LIMIT / 1048576" | bc -l)"
printf '%-18s %9s %9s %14s %10s\n' run seconds 'x cp' 'peak anon MiB' ratio
printf '%-18s %9.2f %9.2f %14s %10s\n' cp "$best_cp" 1.00 - -
for preset in $PRESETS; do
  out=$WORK/out-$preset
  # The fastest run (the machine may be shared), the highest memory peak.
  t= peak=0
  for _ in $(seq "$RUNS"); do
    rm -rf "$out"
    read -r ti pi < <(measure "$BIN" compress "$IN" -o "$out" --preset "$preset")
    if [ -z "$t" ] || (( $(echo "$ti < $t" | bc -l) )); then t=$ti; fi
    [ "$pi" -gt "$peak" ] && peak=$pi
  done
  ratio=$(python3 -c "import json;print('%.2f' % json.load(open('$out/report.json'))['totals']['ratio'])")
  printf '%-18s %9.2f %9.2f %14.0f %10s\n' "$preset" "$t" "$(echo "$t / $best_cp" | bc -l)" \
    "$(echo "$peak / 1048576" | bc -l)" "${ratio}x"
  [ "$peak" -le "$LIMIT" ] || echo "  peak memory above the limit"
  rm -rf "$out"
done
