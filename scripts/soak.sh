#!/usr/bin/env bash
# Soak test of `modelpress serve` on loopback (not part of CI): mixed load —
# uploads (raw and sharded multipart), jobs, polls, cancels, deletes,
# downloads — for DURATION seconds, with one SIGKILL and restart of the
# server half-way. At the end: every job finished, `PRAGMA integrity_check`,
# every blob referenced (and every referenced blob present), nothing left in
# tmp/, and the server's memory and open file descriptors against their
# level at the start (taken idle after a warm-up under the same load, so
# the database pool has grown to its working size; the end is taken idle
# too, in the restarted server, which has run under the same load). It
# passes when the fds are back within 2 and the memory within 16 MiB or a
# quarter of the start level, whichever is larger.
#
#   scripts/soak.sh [DURATION_SECONDS]        (default 600)
#
# BIN picks the binary (default: target/release/modelpress, built if absent);
# WORKERS, CLIENTS set the server's workers and the load's concurrency;
# WARMUP (default 30) the seconds of load before the start level is taken.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=${1:-600}
target_dir=${CARGO_TARGET_DIR:-target}
bin=${BIN:-$target_dir/release/modelpress}
if [[ ! -x "$bin" ]]; then
  cargo build --release
fi
workers=${WORKERS:-2}
clients=${CLIENTS:-6}
warmup=${WARMUP:-30}
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log="$data/server.log"

start_server() {
  "$bin" serve --addr "127.0.0.1:$port" --data-dir "$data/data" --workers "$workers" \
    --retry-limit 5 --shutdown-grace-seconds 10 >>"$log" 2>&1 &
  server=$!
  for _ in $(seq 1 200); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the server did not start; log: $log" >&2
  exit 1
}

start_server
echo "server pid $server on port $port, data in $data"
python3 - "$port" "$duration" "$clients" "$data" "$bin" "$workers" "$warmup" <<'PY'
import hashlib, json, os, random, signal, sqlite3, struct, subprocess, sys, threading, time
import urllib.request, urllib.error
from collections import Counter

port, duration, clients, data, binary, workers, warmup = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], float(sys.argv[7])
base = f"http://127.0.0.1:{port}"
lock = threading.Lock()
statuses = Counter()
ops = Counter()
errors = Counter()
models, jobs = [], []
stop = threading.Event()
paused = threading.Event()
pid_file = os.path.join(data, "pid")

def server_pid():
    out = subprocess.run(["pgrep", "-f", f"serve --addr 127.0.0.1:{port} "], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None

def rss_and_fds(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))

def request(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    except Exception as e:  # the server is down (the restart) or the connection broke
        with lock:
            errors[type(e).__name__] += 1
        return None, b""
    with lock:
        statuses[status] += 1
        if status >= 500:
            errors[f"{status} {method} {path.split('?')[0]}: {payload[:200]!r}"] += 1
    return status, payload

def safetensors(tensors, rng):
    header, blob = {}, b""
    for name, shape in tensors:
        n = 1
        for d in shape: n *= d
        data = struct.pack(f"<{n}f", *(rng.gauss(0, 0.05) for _ in range(n)))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    js = json.dumps(header).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js + blob

def multipart(parts):
    boundary = "soak%016x" % random.getrandbits(64)
    out = b""
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f"multipart/form-data; boundary={boundary}"}

def upload(rng):
    layers = rng.randint(2, 12)
    side = rng.choice([32, 64, 128, 256])
    tensors = [(f"l{i}.weight", [side, side]) for i in range(layers)] + [("l0.bias", [side])]
    if rng.random() < 0.7:
        body = safetensors(tensors, rng)
        s, p = request("POST", f"/v1/models?name=soak&version={rng.randint(1,9)}", body, {"Content-Type": "application/octet-stream"})
    else:
        half = len(tensors) // 2
        s1, s2 = safetensors(tensors[:half], rng), safetensors(tensors[half:], rng)
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        wm = {t[0]: names[0] for t in tensors[:half]} | {t[0]: names[1] for t in tensors[half:]}
        body, headers = multipart([("file", names[0], s1), ("file", names[1], s2),
            ("file", "model.safetensors.index.json", json.dumps({"weight_map": wm}).encode()),
            ("file", "config.json", b'{"model_type":"mlp"}'), ("name", None, b"sharded"),
            ("labels", None, b'{"soak":"yes"}')])
        s, p = request("POST", "/v1/models", body, headers)
    if s == 201:
        with lock: models.append(json.loads(p)["id"])

def submit(rng):
    with lock:
        if not models: return
        model = rng.choice(models)
    body = json.dumps({"model_id": model, "preset": rng.choice(["int8", "int4-g128", "deep-compression", "ternary", "fp8"]),
                       "output": {"format": rng.choice(["packed", "dense"])}, "priority": rng.randint(-5, 5)}).encode()
    s, p = request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
    if s == 202:
        with lock: jobs.append(json.loads(p)["id"])

def pick_job(rng):
    with lock:
        return rng.choice(jobs) if jobs else None

def poll(rng):
    j = pick_job(rng)
    if j: request("GET", f"/v1/jobs/{j}")
    else: request("GET", "/v1/jobs?limit=20")

def cancel(rng):
    j = pick_job(rng)
    if j: request("POST", f"/v1/jobs/{j}/cancel")

def delete_job(rng):
    j = pick_job(rng)
    if j:
        s, _ = request("DELETE", f"/v1/jobs/{j}")
        if s in (204, 404):
            with lock:
                if j in jobs: jobs.remove(j)

def delete_model(rng):
    with lock:
        if len(models) < 4: return
        m = rng.choice(models)
    s, _ = request("DELETE", f"/v1/models/{m}")
    if s in (204, 404):
        with lock:
            if m in models: models.remove(m)

def download(rng):
    j = pick_job(rng)
    if not j: return
    s, p = request("GET", f"/v1/jobs/{j}")
    if s != 200: return
    job = json.loads(p)
    if job["status"] != "succeeded" or not job["artifacts"]: return
    a = rng.choice(job["artifacts"])
    s, body = request("GET", a["url"])
    if s == 200 and hashlib.sha256(body).hexdigest() != a["sha256"]:
        with lock: errors["artifact bytes do not match their sha256"] += 1

actions = [(upload, 3), (submit, 4), (poll, 10), (cancel, 1), (delete_job, 1), (delete_model, 1), (download, 3)]
weighted = [a for a, w in actions for _ in range(w)]

def client(seed):
    rng = random.Random(seed)
    while not stop.is_set():
        if paused.is_set():
            time.sleep(0.1)
            continue
        action = rng.choice(weighted)
        action(rng)
        with lock: ops[action.__name__] += 1

def wait_idle(limit):
    """Until no job is queued or running (or `limit` seconds passed)."""
    deadline = time.time() + limit
    while time.time() < deadline:
        s, p = request("GET", "/v1/jobs?status=queued&limit=1")
        s2, p2 = request("GET", "/v1/jobs?status=running&limit=1")
        if s == 200 and s2 == 200 and not json.loads(p)["items"] and not json.loads(p2)["items"]:
            return True
        time.sleep(1)
    return False

# Start level: after a warm-up under the full concurrent load (the database
# pool grows to its working size, every kind of request has run), with the
# load paused and every job finished — the same state the end is measured in.
threads = [threading.Thread(target=client, args=(i + 1,)) for i in range(clients)]
for t in threads: t.start()
time.sleep(warmup)
paused.set()
wait_idle(300)
time.sleep(3)
pid = server_pid()
start = rss_and_fds(pid)
print(f"start (after {warmup:.0f}s warm-up, idle): pid {pid}, RSS {start[0]/1024:.1f} MiB, {start[1]} fds", flush=True)
paused.clear()
t0 = time.time()
restarted = None
samples = []  # (seconds, RSS MiB, fds) every 30 s: a leak grows, a pool or an allocator levels off
while time.time() - t0 < duration:
    time.sleep(1)
    if int(time.time() - t0) % 30 == 0 and (not samples or time.time() - t0 - samples[-1][0] > 5):
        p = server_pid()
        if p:
            try:
                r, n = rss_and_fds(p)
                samples.append((time.time() - t0, r / 1024, n))
            except OSError:
                pass
    if restarted is None and time.time() - t0 > duration / 2:
        pid = server_pid()
        os.kill(pid, signal.SIGKILL)
        print(f"{time.time()-t0:.0f}s: SIGKILL to {pid}", flush=True)
        time.sleep(0.5)
        subprocess.Popen([binary, "serve", "--addr", f"127.0.0.1:{port}", "--data-dir", f"{data}/data",
                          "--workers", workers, "--retry-limit", "5", "--shutdown-grace-seconds", "10"],
                         stdout=open(f"{data}/server.log", "a"), stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/readyz", timeout=2); break
            except Exception: time.sleep(0.1)
        restarted = time.time() - t0
        time.sleep(2)
        pid = server_pid()
        restart_level = rss_and_fds(pid)
        print(f"{restarted:.0f}s: restarted as {pid}, RSS {restart_level[0]/1024:.1f} MiB, {restart_level[1]} fds", flush=True)
stop.set()
for t in threads: t.join()
print(f"load stopped after {time.time()-t0:.0f}s", flush=True)

# Every job finishes.
if not wait_idle(600):
    print("jobs still unfinished after 10 minutes", flush=True)
time.sleep(3)
pid = server_pid()
end = rss_and_fds(pid)
print(f"end (idle, all jobs finished): RSS {end[0]/1024:.1f} MiB, {end[1]} fds", flush=True)
os.kill(pid, signal.SIGTERM)
for _ in range(300):
    if server_pid() is None: break
    time.sleep(0.1)

db = sqlite3.connect(f"{data}/data/modelpress.db")
integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
by_status = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
failed_codes = dict(db.execute("SELECT error_code, COUNT(*) FROM jobs WHERE status = 'failed' GROUP BY error_code").fetchall())
referenced = {r[0] for r in db.execute("SELECT sha256 FROM model_files UNION SELECT sha256 FROM job_artifacts")}
stored = set()
for d in os.listdir(f"{data}/data/blobs"):
    stored |= set(os.listdir(f"{data}/data/blobs/{d}"))
tmp_left = os.listdir(f"{data}/data/tmp")
unfinished = by_status.get("queued", 0) + by_status.get("running", 0)

print("operations:", dict(ops))
print("responses by status:", dict(sorted(statuses.items())))
print("client-side errors:", dict(errors) or "none")
print("jobs by status:", by_status, "failures by code:", failed_codes)
print(f"integrity_check: {integrity}; blobs stored {len(stored)}, referenced {len(referenced)}, "
      f"unreferenced {len(stored - referenced)}, missing {len(referenced - stored)}; tmp/ entries {len(tmp_left)}")
print("under load (s, RSS MiB, fds):", ", ".join(f"{t:.0f}s {r:.1f} {n}" for t, r, n in samples))
print(f"memory: start {start[0]/1024:.1f} MiB -> end {end[0]/1024:.1f} MiB; fds: start {start[1]} -> end {end[1]}")
five_xx = sum(n for s, n in statuses.items() if s >= 500)
ok = (integrity == "ok" and not (stored - referenced) and not (referenced - stored) and not tmp_left
      and unfinished == 0 and five_xx == 0 and end[1] <= start[1] + 2
      and end[0] <= start[0] + max(16 * 1024, start[0] // 4)
      and "artifact bytes do not match their sha256" not in errors)
print("SOAK", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
