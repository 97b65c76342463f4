#!/usr/bin/env bash
# Replicas on one PostgreSQL database and one S3-compatible bucket against a
# single service on its embedded defaults (SQLite, blobs in the data
# directory), measured from a second process on loopback in the same run:
#   - claim latency: a job submitted to an idle service, from its
#     `created_at` to its `started_at` (20 jobs, one at a time);
#   - 1000 tiny jobs end to end: submitted by 8 concurrent clients spread
#     over the replicas, until the last one succeeded;
#   - status polling of a finished job under wrk (one replica each, so the
#     two stores are compared, not the number of processes);
#   - the upload of a ~1 GiB checkpoint to a replica on the bucket against
#     `cp` + `sync` of the same warm file (the service syncs what it stores)
#     and against a plain signed PUT of the file into the same bucket.
# On a 2-core machine this shows correctness and overhead, not speed-up.
#
#   scripts/bench-scale.sh
#   REPLICAS=3 JOBS=1000 WORK=/path scripts/bench-scale.sh
#   SKIP_JOBS=1 scripts/bench-scale.sh        # the upload alone
#
# Needs a PostgreSQL server (MODELPRESS_BENCH_POSTGRES_URL, default
# postgres://postgres@127.0.0.1:5432/postgres; a database is made for the
# run and dropped), curl, jq, wrk and python3. The S3 server is the
# `s3_server` example (s3s over a temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-$(mktemp -d)}
REPLICAS=${REPLICAS:-3}
JOBS=${JOBS:-1000}
SKIP_JOBS=${SKIP_JOBS:-}
ADMIN=${MODELPRESS_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$WORK"

cargo build --release --quiet --bin modelpress --example synth_checkpoint --example s3_server
BIN=$TARGET/release/modelpress
BIG=$WORK/synth-1g.safetensors
[ -f "$BIG" ] || "$TARGET/release/examples/synth_checkpoint" "$BIG" 1 >/dev/null
TINY=$WORK/tiny.safetensors
"$TARGET/release/examples/synth_checkpoint" "$TINY" 0.0001 16 64 >/dev/null

DB=mp_bench_$$
DB_URL=${ADMIN%/*}/$DB
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT

rm -f "$WORK/s3.txt"
"$TARGET/release/examples/s3_server" >"$WORK/s3.txt" 2>/dev/null &
PIDS+=($!)
until [ -s "$WORK/s3.txt" ]; do sleep 0.05; done
read -r _ S3_ENDPOINT _ BUCKET _ ACCESS _ SECRET <"$WORK/s3.txt"

# Starts a service; sets ADDR to its URL. $1: name, then serve's extra flags.
start() {
  local name=$1; shift
  rm -rf "$WORK/$name"
  "$BIN" serve --addr 127.0.0.1:0 --data-dir "$WORK/$name" "$@" >/dev/null 2>"$WORK/$name.log" &
  PIDS+=($!)
  local addr=
  for _ in $(seq 1 600); do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$WORK/$name.log" | head -1 | cut -d' ' -f3 || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { cat "$WORK/$name.log" >&2; exit 1; }
  ADDR=$addr
}
stop_all() {
  for p in "${PIDS[@]:1}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:1}"; do wait "$p" 2>/dev/null || true; done
  PIDS=("${PIDS[0]}")
}

upload() { curl -sS --fail-with-body -H 'Content-Type: application/octet-stream' --data-binary @"$2" "$1/v1/models?name=bench" | jq -r .id; }
submit() {
  curl -sS --fail-with-body -H 'Content-Type: application/json' \
    -d "{\"model_id\": \"$2\", \"preset\": \"int8\", \"output\": {\"format\": \"packed\"}}" \
    "$1/v1/jobs" | jq -r .id
}
wait_done() {
  until curl -sS "$1/v1/jobs/$2" | jq -e '.status == "succeeded"' >/dev/null; do sleep 0.01; done
}
# Seconds from created_at to started_at of the jobs whose ids are on stdin.
claim_stats() {
  local url=$1
  while read -r id; do curl -sS "$url/v1/jobs/$id"; echo; done | python3 -c '
import json, sys, datetime, statistics
p = lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))
d = sorted((p(j["started_at"]) - p(j["created_at"])).total_seconds() * 1000 for j in map(json.loads, filter(str.strip, sys.stdin)))
print(f"median {statistics.median(d):.0f} ms, max {d[-1]:.0f} ms over {len(d)} jobs")'
}

# Runs the three job measurements against the URLs given.
measure_jobs() {
  local label=$1; shift
  local urls=("$@") n=${#urls[@]}
  local model
  model=$(upload "${urls[0]}" "$TINY")
  sleep 1   # every worker idle
  local ids=()
  for i in $(seq 0 19); do
    local id
    id=$(submit "${urls[$((i % n))]}" "$model")
    wait_done "${urls[$(((i + 1) % n))]}" "$id"
    ids+=("$id")
  done
  printf '%-28s claim latency: %s\n' "$label" "$(printf '%s\n' "${ids[@]}" | claim_stats "${urls[0]}")"

  local start end
  start=$(date +%s.%N)
  seq 0 $((JOBS - 1)) | xargs -P 8 -I{} sh -c '
    urls="$1"; i=$2; model=$3
    set -- $urls; n=$#; shift $((i % n)); url=$1
    curl -sS --fail-with-body -o /dev/null -H "Content-Type: application/json" \
      -d "{\"model_id\": \"$model\", \"preset\": \"int8\", \"output\": {\"format\": \"packed\"}}" "$url/v1/jobs"
  ' _ "${urls[*]}" {} "$model"
  until [ "$(curl -sS "${urls[0]}/metrics" | awk '/^modelpress_jobs\{scope="database",status="succeeded"\}/ {print $2}')" = "$((JOBS + 20))" ]; do
    sleep 0.05
  done
  end=$(date +%s.%N)
  printf '%-28s %d tiny jobs end to end: %.1f s (%.0f jobs/s)\n' "$label" "$JOBS" \
    "$(echo "$end - $start" | bc -l)" "$(echo "$JOBS / ($end - $start)" | bc -l)"

  local job=${ids[0]}
  wrk -t2 -c32 -d10s --latency "${urls[0]}/v1/jobs/$job" >"$WORK/wrk-$label.txt"
  printf '%-28s status polls (wrk -t2 -c32 -d10s, one replica): %s req/s, p50 %s, p99 %s\n' "$label" \
    "$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-$label.txt")" \
    "$(awk '$1 == "50%" {print $2}' "$WORK/wrk-$label.txt")" \
    "$(awk '$1 == "99%" {print $2}' "$WORK/wrk-$label.txt")"
}

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- one service on SQLite and the data directory ----------------------------
if [ -z "$SKIP_JOBS" ]; then
  start single --workers "$REPLICAS"
  measure_jobs "sqlite, 1 process" "$ADDR"
  stop_all
fi

# --- replicas on PostgreSQL and the bucket -----------------------------------
psql -q "$ADMIN" -c "CREATE DATABASE $DB" >/dev/null
S3_FLAGS=(--database-url "$DB_URL" --blob-store "s3://$BUCKET/bench" --s3-endpoint "$S3_ENDPOINT"
  --s3-access-key-id "$ACCESS" --s3-secret-access-key "$SECRET")
URLS=()
for r in $(seq 1 "$REPLICAS"); do
  start "replica$r" --workers 1 "${S3_FLAGS[@]}"
  URLS+=("$ADDR")
done
[ -n "$SKIP_JOBS" ] || measure_jobs "postgres+s3, $REPLICAS replicas" "${URLS[@]}"

# --- a large upload to the bucket ----------------------------------------------
SIZE=$(stat -c %s "$BIG")
cat "$BIG" >/dev/null
best_cp=
for _ in 1 2 3; do
  rm -f "$WORK/copy.safetensors"
  s=$(date +%s.%N)
  cp --reflink=never "$BIG" "$WORK/copy.safetensors" && sync "$WORK/copy.safetensors"
  t=$(echo "$(date +%s.%N) - $s" | bc -l)
  if [ -z "$best_cp" ] || (( $(echo "$t < $best_cp" | bc -l) )); then best_cp=$t; fi
done
rm -f "$WORK/copy.safetensors"
# The same file put straight into the bucket by curl (one signed PUT): what
# the S3 server itself costs.
s=$(date +%s.%N)
curl -sS --fail-with-body -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ACCESS:$SECRET" \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
  -T "$BIG" "$S3_ENDPOINT/$BUCKET/baseline/put"
t_put=$(echo "$(date +%s.%N) - $s" | bc -l)
s=$(date +%s.%N)
upload "${URLS[0]}" "$BIG" >/dev/null
t=$(echo "$(date +%s.%N) - $s" | bc -l)
printf 'upload of %d MiB: cp + sync %.2f s; curl PUT into the bucket %.2f s (%.2f x cp); to a replica on the bucket %.2f s (%.2f x cp, %.2f x the PUT)\n' \
  $((SIZE >> 20)) "$best_cp" "$t_put" "$(echo "$t_put / $best_cp" | bc -l)" "$t" \
  "$(echo "$t / $best_cp" | bc -l)" "$(echo "$t / $t_put" | bc -l)"
stop_all
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
