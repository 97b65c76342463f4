#!/usr/bin/env bash
# The API as clients take it, run by .ci/run after `cargo test` built the
# binary: the OpenAPI document is valid, the committed Python client is what
# the generator makes of it, the installed client works against a real
# server, and schemathesis finds no server error and no schema violation.
# Needs python3 and the package index; installs small pinned packages into
# a virtualenv of its own (no torch).
set -euo pipefail
cd "$(dirname "$0")/../.."

started=$SECONDS
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work" clients/python/.regen
}
trap cleanup EXIT

bin=$(realpath -m "${CARGO_TARGET_DIR:-target}/debug/modelpress")
cargo build --quiet --bin modelpress

python3 -m venv "$work/venv"
py="$work/venv/bin"
"$py/pip" install --quiet --disable-pip-version-check \
  openapi-spec-validator==0.9.0 openapi-python-client==0.29.1 ruff==0.17.6 \
  pytest==9.2.0 schemathesis==4.32.5

echo "== openapi-spec-validator"
"$py/openapi-spec-validator" openapi/openapi.json

echo "== the committed client is the generated one"
# The generator formats with the pinned ruff it finds on PATH, which reads
# clients/python/pyproject.toml: generate beside the committed package.
regen=clients/python/.regen
rm -rf "$regen"
(cd clients/python && RUFF_NO_CACHE=true PATH="$py:$PATH" "$py/openapi-python-client" generate \
  --path ../../openapi/openapi.json --config openapi-python-client.yaml \
  --meta none --output-path .regen/modelpress_api >"$work/generate.log" 2>&1) ||
  { cat "$work/generate.log"; exit 1; }
if ! diff -r -x __pycache__ -x .ruff_cache "$regen/modelpress_api" clients/python/modelpress_api; then
  echo "clients/python/modelpress_api differs from what openapi/openapi.json generates: regenerate it (clients/python/README.md)"
  exit 1
fi

echo "== the installed client against a real server"
"$py/pip" install --quiet --disable-pip-version-check ./clients/python
# From another directory, so the installed package is what is imported.
(cd "$work" && MODELPRESS_BIN="$bin" "$py/pytest" -q -p no:cacheprovider "$OLDPWD/clients/python/tests")

echo "== schemathesis over the whole API"
"$bin" serve --addr 127.0.0.1:0 --workers 1 --data-dir "$work/data" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 1 300); do
  addr=$(grep -o 'listening on http://[0-9.:]*' "$work/server.log" | head -1 | cut -d' ' -f3 || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/server.log"; exit 1; }
(cd clients/python && "$py/schemathesis" --config-file schemathesis.toml run ../../openapi/openapi.json \
  --url "$addr" --checks all --max-time "${SCHEMATHESIS_SECONDS:-150}" --seed 1 \
  --report junit --report-dir "$work/schemathesis") || {
  echo "schemathesis failed; server log:"; tail -50 "$work/server.log"; exit 1; }
if grep -q ' ERROR \|panicked' "$work/server.log"; then
  echo "the server logged errors:"; grep ' ERROR \|panicked' "$work/server.log" | head -20; exit 1
fi

echo "== clients: passed in $((SECONDS - started)) s"
