#!/usr/bin/env bash
# End-to-end speed and memory of `modelpress compress` on a synthetic
# transformer-shaped f32 checkpoint, each figure as a ratio to
# `cp --reflink=never` of the same file measured in the same run. Both read a
# warm page cache and neither waits for the disk: `cp` leaves its copy in the
# page cache and so does `compress` without `--sync`.
#
#   scripts/bench.sh              # ~1 GiB checkpoint
#   GIB=4 scripts/bench.sh        # larger
#   WORK=/path scripts/bench.sh   # keep the generated files there
#   RUNS=3 scripts/bench.sh       # best of 3 runs per preset (default 3)
#   DURABLE=1 scripts/bench.sh    # also `cp` + `sync` against `compress --sync`
#   BASE_BIN=/path/modelpress scripts/bench.sh
#                                 # also time another build, in the same run
set -euo pipefail
cd "$(dirname "$0")/.."

GIB=${GIB:-1}
WORK=${WORK:-$(mktemp -d)}
# `int4-g128-minmax` is the int4-g128 preset without its squared-error scale
# search (one min-max scale per group), run from a pipeline file.
PRESETS=${PRESETS:-"int8 int4-g128 int4-g128-minmax deep-compression"}
RUNS=${RUNS:-3}
DURABLE=${DURABLE:-0}
BASE_BIN=${BASE_BIN:-}
mkdir -p "$WORK"

TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin modelpress --example synth_checkpoint
BIN=$TARGET/release/modelpress
IN=$WORK/synth-${GIB}g.safetensors
[ -f "$IN" ] || "$TARGET/release/examples/synth_checkpoint" "$IN" "$GIB" >/dev/null
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

# The fastest of RUNS runs of a command that writes $1 (removed before each
# run); prints "seconds peak_bytes" (the highest peak).
best() {
  local out=$1 t= peak=0 ti pi
  shift
  for _ in $(seq "$RUNS"); do
    rm -rf "$out"
    read -r ti pi < <(measure "$@")
    if [ -z "$t" ] || (( $(echo "$ti < $t" | bc -l) )); then t=$ti; fi
    [ "$pi" -gt "$peak" ] && peak=$pi
  done
  echo "$t $peak"
}

cat "$IN" >/dev/null   # warm the page cache
COPY=$WORK/copy.safetensors
read -r cp_t _ < <(best "$COPY" cp --reflink=never "$IN" "$COPY")
if [ "$DURABLE" = 1 ]; then
  read -r cp_sync_t _ < <(best "$COPY" sh -c "cp --reflink=never '$IN' '$COPY' && sync '$COPY'")
fi
rm -f "$COPY"

printf 'input: %s (%.2f GiB), largest tensor %.0f MiB (f32), memory limit %.0f MiB\n' \
  "$IN" "$(echo "$SIZE / 1073741824" | bc -l)" "$(echo "$LARGEST / 1048576" | bc -l)" \
  "$(echo "$LIMIT / 1048576" | bc -l)"
echo "load before the runs:$(uptime | sed 's/.*load average//')"
printf '%-30s %9s %9s %14s %10s\n' run seconds 'x cp' 'peak anon MiB' ratio
printf '%-30s %9.2f %9.2f %14s %10s\n' "cp" "$cp_t" 1.00 - -
[ "$DURABLE" = 1 ] && printf '%-30s %9.2f %9.2f %14s %10s\n' "cp + sync" "$cp_sync_t" 1.00 - -

MINMAX=$WORK/int4-g128-minmax.json
cat >"$MINMAX" <<'JSON'
{"stages":[{"stage":"quantize","bits":4,"symmetric":true,"granularity":"group","group_size":128,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}
JSON

# One line per (binary, preset, durability): seconds, x the matching cp.
row() {
  local label=$1 bin=$2 preset=$3 floor=$4 out=$WORK/out-$preset t peak ratio how
  shift 4
  how=(--preset "$preset")
  [ "$preset" = int4-g128-minmax ] && how=(--pipeline "$MINMAX")
  read -r t peak < <(best "$out" "$bin" compress "$IN" -o "$out" "${how[@]}" "$@")
  ratio=$(python3 -c "import json;print('%.2f' % json.load(open('$out/report.json'))['totals']['ratio'])")
  printf '%-30s %9.2f %9.2f %14.0f %10s\n' "$label" "$t" "$(echo "$t / $floor" | bc -l)" \
    "$(echo "$peak / 1048576" | bc -l)" "${ratio}x"
  [ "$peak" -le "$LIMIT" ] || echo "  peak memory above the limit"
  rm -rf "$out"
}

for preset in $PRESETS; do
  if [ -n "$BASE_BIN" ]; then
    row "$preset (base)" "$BASE_BIN" "$preset" "$cp_t"
  fi
  row "$preset" "$BIN" "$preset" "$cp_t"
  if [ "$DURABLE" = 1 ]; then
    row "$preset --sync (x cp + sync)" "$BIN" "$preset" "$cp_sync_t" --sync
  fi
done
echo "load after the runs:$(uptime | sed 's/.*load average//')"
