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
#   RUNS=3 scripts/bench.sh       # best of 3 rounds per preset (default 3)
#   DURABLE=1 scripts/bench.sh    # also `cp` + `sync` against `compress --sync`
#   BASE_BIN=/path/modelpress scripts/bench.sh
#                                 # also time another build, in the same run
#
# Each preset runs in RUNS rounds of `cp`, the base build (if any) and this
# build back to back, so a change in the load of a shared machine falls on
# all of them alike; each is compared with the fastest `cp` of its rounds.
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

# Best (fastest) seconds, highest peak and compression ratio per key, over
# the rounds.
declare -A BEST PEAK RATIO

# Measures one run of a command that writes $2 (removed before the run)
# and folds it into key $1's best time and peak. Every run starts with no
# dirty pages (an untimed `sync` first): otherwise the run after `cp` would
# share the machine with the writeback of `cp`'s gigabyte.
take() {
  local key=$1 out=$2 ti pi
  shift 2
  rm -rf "$out"
  sync
  read -r ti pi < <(measure "$@")
  if [ -z "${BEST[$key]:-}" ] || (( $(echo "$ti < ${BEST[$key]}" | bc -l) )); then
    BEST[$key]=$ti
  fi
  [ "$pi" -gt "${PEAK[$key]:-0}" ] && PEAK[$key]=$pi
  return 0
}

cat "$IN" >/dev/null   # warm the page cache
COPY=$WORK/copy.safetensors
copy() { take "$1" "$COPY" cp --reflink=never "$IN" "$COPY"; rm -f "$COPY"; }
copy_sync() {
  take "$1" "$COPY" sh -c "cp --reflink=never '$IN' '$COPY' && sync '$COPY'"
  rm -f "$COPY"
}

printf 'input: %s (%.2f GiB), largest tensor %.0f MiB (f32), memory limit %.0f MiB\n' \
  "$IN" "$(echo "$SIZE / 1073741824" | bc -l)" "$(echo "$LARGEST / 1048576" | bc -l)" \
  "$(echo "$LIMIT / 1048576" | bc -l)"
echo "load before the runs:$(uptime | sed 's/.*load average//')"
echo "each preset: $RUNS rounds, each round cp, then the base build (if any), then this"
echo "build, back to back; every figure is the fastest of its rounds, and x cp is"
echo "against the fastest cp of the same preset's rounds"
printf '%-30s %9s %9s %14s %10s\n' run seconds 'x cp' 'peak anon MiB' ratio

MINMAX=$WORK/int4-g128-minmax.json
cat >"$MINMAX" <<'JSON'
{"stages":[{"stage":"quantize","bits":4,"symmetric":true,"granularity":"group","group_size":128,"ignore":["re:.*(embed|wte|wpe|lm_head).*"]}]}
JSON

# One compression of a preset by a binary, folded into key $1.
compress_run() {
  local key=$1 bin=$2 preset=$3 out=$WORK/out-$1 how
  shift 3
  how=(--preset "$preset")
  [ "$preset" = int4-g128-minmax ] && how=(--pipeline "$MINMAX")
  take "$key" "$out" "$bin" compress "$IN" -o "$out" "${how[@]}" "$@"
  RATIO[$key]=$(python3 -c "import json;print('%.2f' % json.load(open('$out/report.json'))['totals']['ratio'])")
  rm -rf "$out"
}

# The line of a floor's key: its seconds.
floor_row() {
  printf '%-30s %9.2f %9.2f %14s %10s\n' "$1" "${BEST[$2]}" 1.00 - -
}

# One line per key: seconds, x the floor's seconds, peak, compression ratio.
row() {
  local label=$1 key=$2 floor=$3
  printf '%-30s %9.2f %9.2f %14.0f %10s\n' "$label" "${BEST[$key]}" \
    "$(echo "${BEST[$key]} / ${BEST[$floor]}" | bc -l)" \
    "$(echo "${PEAK[$key]} / 1048576" | bc -l)" "${RATIO[$key]}x"
  [ "${PEAK[$key]}" -le "$LIMIT" ] || echo "  peak memory above the limit"
}

for preset in $PRESETS; do
  BEST=() PEAK=()
  for _ in $(seq "$RUNS"); do
    copy cp
    [ -n "$BASE_BIN" ] && compress_run base "$BASE_BIN" "$preset"
    compress_run new "$BIN" "$preset"
    if [ "$DURABLE" = 1 ]; then
      copy_sync cp-sync
      compress_run new-sync "$BIN" "$preset" --sync
    fi
  done
  floor_row cp cp
  [ -n "$BASE_BIN" ] && row "$preset (base)" base cp
  row "$preset" new cp
  if [ "$DURABLE" = 1 ]; then
    floor_row "cp + sync" cp-sync
    row "$preset --sync (x cp + sync)" new-sync cp-sync
  fi
done
echo "load after the runs:$(uptime | sed 's/.*load average//')"
