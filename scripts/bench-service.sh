#!/usr/bin/env bash
# Speed and memory of `modelpress serve`, measured from a second process on
# loopback: status polling under load (wrk), and the upload of a large
# checkpoint with the server's peak memory during it, next to `cp` of the
# same file in the same run (both fsync what they write).
#
#   scripts/bench-service.sh                       # generates a ~1 GiB checkpoint
#   scripts/bench-service.sh PATH.safetensors      # uploads this file instead
#   WORK=/path PORT=8091 scripts/bench-service.sh  # where files go, which port
#
# Needs curl, jq and wrk (Debian: apt-get install -y wrk).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-$(mktemp -d)}
PORT=${PORT:-8091}
URL=http://127.0.0.1:$PORT
mkdir -p "$WORK"

cargo build --release --quiet --bin modelpress --example synth_checkpoint
BIN=target/release/modelpress
IN=${1:-$WORK/synth-1g.safetensors}
[ -f "$IN" ] || target/release/examples/synth_checkpoint "$IN" 1 >/dev/null
SMALL=$WORK/small.safetensors
target/release/examples/synth_checkpoint "$SMALL" 0.01 256 1024 >/dev/null

SERVER=
stop_server() {
  if [ -n "$SERVER" ]; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=
  fi
}
trap stop_server EXIT

# Starts the service on a fresh data directory and waits until it answers.
start_server() {
  rm -rf "$WORK/data"
  "$BIN" serve --addr "127.0.0.1:$PORT" --data-dir "$WORK/data" 2>"$WORK/serve-$1.log" &
  SERVER=$!
  until curl -sf "$URL/healthz" >/dev/null; do
    kill -0 "$SERVER" || { cat "$WORK/serve-$1.log"; exit 1; }
    sleep 0.05
  done
}

kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$SERVER/status"; }
now() { date +%s.%N; }

SIZE=$(stat -c %s "$IN")
cat "$IN" >/dev/null   # warm the page cache for cp and curl alike
echo "input: $IN ($SIZE bytes)"

# --- Upload -----------------------------------------------------------------
best_cp=
for _ in 1 2 3; do
  rm -f "$WORK/copy.safetensors"
  start=$(now)
  cp "$IN" "$WORK/copy.safetensors" && sync "$WORK/copy.safetensors"
  t=$(echo "$(now) - $start" | bc -l)
  if [ -z "$best_cp" ] || (( $(echo "$t < $best_cp" | bc -l) )); then best_cp=$t; fi
done
rm -f "$WORK/copy.safetensors"

start_server upload
hwm_before=$(kib VmHWM)
peak_anon=0
(
  while kill -0 "$SERVER" 2>/dev/null; do
    kib RssAnon
    sleep 0.02
  done
) >"$WORK/rss-anon.txt" &
POLLER=$!
# curl reads the whole file into its own memory before it sends it: the
# wall time includes that, curl's time_total is the transfer alone.
start=$(now)
t_transfer=$(curl -sS --fail-with-body -o "$WORK/upload.json" -w '%{time_total}' \
  -H 'Content-Type: application/octet-stream' --data-binary @"$IN" \
  "$URL/v1/models?name=bench&version=1")
t_upload=$(echo "$(now) - $start" | bc -l)
hwm_after=$(kib VmHWM)
kill "$POLLER" 2>/dev/null || true
wait "$POLLER" 2>/dev/null || true
peak_anon=$(sort -n "$WORK/rss-anon.txt" | tail -1)
jq -e '.id' "$WORK/upload.json" >/dev/null
stop_server

printf '%-34s %8.2f s  %8.0f MiB/s\n' "cp + sync" "$best_cp" \
  "$(echo "$SIZE / 1048576 / $best_cp" | bc -l)"
for row in "upload, curl's transfer time:$t_transfer" "upload, curl's wall time:$t_upload"; do
  t=${row##*:}
  printf '%-34s %8.2f s  %8.0f MiB/s  (%.2f x cp)\n' "${row%:*}" "$t" \
    "$(echo "$SIZE / 1048576 / $t" | bc -l)" "$(echo "$t / $best_cp" | bc -l)"
done
printf 'server VmHWM: %d MiB before the upload, %d MiB after; peak RssAnon during it: %d MiB\n' \
  $((hwm_before / 1024)) $((hwm_after / 1024)) $((peak_anon / 1024))

# --- Status polling -----------------------------------------------------------
start_server poll
MODEL=$(curl -sS --data-binary @"$SMALL" -H 'Content-Type: application/octet-stream' \
  "$URL/v1/models?name=small" | jq -r .id)
JOB=$(curl -sS -H 'Content-Type: application/json' \
  -d "{\"model_id\": \"$MODEL\", \"preset\": \"int8\", \"output\": {\"format\": \"packed\"}}" \
  "$URL/v1/jobs" | jq -r .id)
until curl -sS "$URL/v1/jobs/$JOB" | jq -e '.status == "succeeded"' >/dev/null; do sleep 0.1; done
echo "wrk -t2 -c32 -d15s --latency $URL/v1/jobs/$JOB"
wrk -t2 -c32 -d15s --latency "$URL/v1/jobs/$JOB"
stop_server
