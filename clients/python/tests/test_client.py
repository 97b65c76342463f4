"""The installed client against a real `modelpress serve` on a free port.

    MODELPRESS_BIN=target/debug/modelpress pytest clients/python/tests
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from modelpress_api.api.jobs import create_job, download_artifact, get_job, list_jobs
from modelpress_api.api.models import delete_model, list_models, upload_model
from modelpress_api.api.service import presets
from modelpress_api.models import CreateJob, ErrorBody
from modelpress_api.types import File
from modelpress_client import Modelpress, ModelpressError


def safetensors_bytes(tensors: dict[str, tuple[list[int], int]]) -> bytes:
    """A safetensors file of f32 tensors: name -> (shape, seed)."""
    header, data = {}, b""
    for name, (shape, seed) in tensors.items():
        n = 1
        for d in shape:
            n *= d
        values = [((i * 2654435761 + seed * 97) % 1000 - 500) / 5000.0 for i in range(n)]
        blob = struct.pack(f"<{n}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def layers(n: int, seed: int = 1) -> dict[str, tuple[list[int], int]]:
    return {f"layers.{i}.weight": ([32, 32], seed + i) for i in range(n)}


class Server:
    """`modelpress serve` in a child process, on a port it picks."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None):
        self.dir = tempfile.TemporaryDirectory()
        self.proc = subprocess.Popen(
            [os.environ.get("MODELPRESS_BIN", "modelpress"), "serve", "--addr", "127.0.0.1:0",
             "--workers", "1", "--data-dir", str(Path(self.dir.name) / "data"), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "warn,modelpress=info", **(env or {})},
        )
        self.url = None
        deadline = time.monotonic() + 60
        for line in self.proc.stderr:
            m = re.search(r"listening on (http://[0-9.:]+)", line)
            if m:
                self.url = m.group(1)
                break
            assert time.monotonic() < deadline, "the server did not start"
        assert self.url, "the server did not log its address"
        # Keep draining the log so the server never blocks on it.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


@pytest.fixture(scope="module")
def server():
    # Slow enough per tensor that a job can be canceled while it runs.
    s = Server(env={"MODELPRESS_TENSOR_DELAY_MS": "20"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mp(server):
    return Modelpress(server.url)


def test_raw_upload_compress_wait_and_download_with_checked_sha256(mp, tmp_path):
    path = tmp_path / "demo.safetensors"
    path.write_bytes(safetensors_bytes(layers(3)))
    model = mp.upload_model(path, name="demo", version="1", labels={"team": "ml"})
    assert model.name == "demo"
    assert [f.name for f in model.files] == ["model.safetensors"]
    assert model.files[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    job = mp.compress(model.id, preset="int8", format="dense", wait=True, timeout=60)
    assert str(job.status) == "succeeded", job
    written = mp.download(job.id, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert "model.safetensors" in names and "report.json" in names
    by_name = {a.name: a for a in job.artifacts}
    for p in written:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == by_name[p.name].sha256
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["bytes_after"] > 0


def test_multipart_upload_of_shards_index_and_config(mp, tmp_path):
    ckpt = tmp_path / "sharded"
    ckpt.mkdir()
    first, second = layers(2, 1), {"head.weight": ([16, 32], 9)}
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes(first))
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes(second))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 32}))
    model = mp.upload_model(ckpt, name="sharded")
    assert sorted(f.name for f in model.files) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    job = mp.compress(model.id, pipeline={"stages": [{"stage": "quantize", "bits": 8}]}, format="packed", timeout=60)
    assert str(job.status) == "succeeded", job
    assert {"model-00001-of-00002.safetensors", "model.safetensors.index.json"} <= {a.name for a in job.artifacts}


def test_a_running_job_is_canceled(mp, tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(safetensors_bytes(layers(200)))
    model = mp.upload_model(path)
    job = mp.compress(model.id, preset="int8", wait=False)
    canceled = mp.cancel(job.id)
    assert str(canceled.status) in {"queued", "running", "canceled"}
    final = mp.wait(job.id, timeout=60, poll_seconds=0.1)
    assert str(final.status) == "canceled", final
    with pytest.raises(ModelpressError) as e:
        mp.cancel(job.id)
    assert e.value.status == 409


def statistics_bytes(weights: dict[str, int], seed: int = 3, rows: int = 64) -> bytes:
    """A statistics file for `weights` (name -> d_in): in_sum2, counts and
    xtx of `rows` pseudo-random inputs."""
    header, data = {}, b""

    def add(name: str, shape: list[int], values: list[float]):
        nonlocal data
        blob = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob

    for w, d in weights.items():
        xs = [[((r * 7919 + j * 104729 + seed) % 997) / 997.0 - 0.5 for j in range(d)] for r in range(rows)]
        xtx = [sum(x[i] * x[j] for x in xs) for i in range(d) for j in range(d)]
        add(f"{w}.in_sum2", [d], [xtx[j * d + j] for j in range(d)])
        add(f"{w}.counts", [1], [float(rows)])
        add(f"{w}.xtx", [d, d], xtx)
    header["__metadata__"] = {"modelpress.stats": "1"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def test_statistics_upload_and_a_calibrated_job(mp, tmp_path):
    path = tmp_path / "calib.safetensors"
    path.write_bytes(safetensors_bytes(layers(2, 11)))
    model = mp.upload_model(path)
    stats_path = tmp_path / "stats.safetensors"
    stats_path.write_bytes(statistics_bytes({"layers.0.weight": 32, "layers.1.weight": 32}))
    stats = mp.upload_statistics(model.id, stats_path)
    assert stats.sha256 == hashlib.sha256(stats_path.read_bytes()).hexdigest()
    assert stats.tensors == ["layers.0.weight", "layers.1.weight"] and stats.has_xtx
    assert stats.tokens == 64

    pipeline = {"stages": [{"stage": "quantize", "method": "gptq", "bits": 4, "granularity": "channel"}]}
    with pytest.raises(ModelpressError) as e:
        mp.compress(model.id, pipeline=pipeline, wait=False)
    assert (e.value.status, e.value.code) == (422, "invalid_pipeline") and "xtx" in e.value.message

    job = mp.compress(model.id, pipeline=pipeline, statistics=stats.id, format="dense", timeout=60)
    assert str(job.status) == "succeeded", job
    assert job.statistics == stats.id
    mp.download(job.id, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["statistics_sha256"] == stats.sha256

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(statistics_bytes({"layers.9.weight": 32}))
    with pytest.raises(ModelpressError) as e:
        mp.upload_statistics(model.id, bad)
    assert (e.value.status, e.value.code) == (422, "invalid_statistics") and "layers.9.weight" in e.value.message


def test_refusals_come_back_as_the_error_shape(mp, server, tmp_path):
    client = mp.client
    missing = "01900000-0000-7000-8000-000000000000"
    resp = get_job.sync_detailed(missing, client=client)
    assert resp.status_code == 404 and isinstance(resp.parsed, ErrorBody)
    assert resp.parsed.error.code == "not_found"

    resp = create_job.sync_detailed(client=client, body=CreateJob(model_id="nope", preset="int8"))
    assert resp.status_code == 422 and isinstance(resp.parsed, ErrorBody)

    resp = list_models.sync_detailed(client=client, limit=0)
    assert resp.status_code == 400 and resp.parsed.error.code == "invalid_query"
    resp = list_jobs.sync_detailed(client=client, cursor="zzz")
    assert resp.status_code == 400 and resp.parsed.error.code == "invalid_query"

    with (tmp_path / "junk").open("wb") as f:
        f.write(b"not a checkpoint")
    with (tmp_path / "junk").open("rb") as f:
        resp = upload_model.sync_detailed(client=client, body=File(payload=f), name="junk")
    assert resp.status_code == 400 and resp.parsed.error.code == "invalid_safetensors"

    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors_bytes(layers(100, 5)))
    model = mp.upload_model(path)
    job = mp.compress(model.id, preset="int8", wait=False)
    resp = delete_model.sync_detailed(model.id, client=client)
    assert resp.status_code == 409 and resp.parsed.error.code
    resp = download_artifact.sync_detailed(job.id, "model.safetensors", client=client)
    assert resp.status_code in (404, 409)
    mp.cancel(job.id)
    mp.wait(job.id, timeout=60)

    # A JSON body sent as something else.
    http = client.get_httpx_client()
    resp = http.post("/v1/jobs", content=b"{}", headers={"content-type": "text/plain"})
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


def test_api_keys_guard_every_v1_route():
    s = Server("--api-key", "k-7e5")
    try:
        anonymous = Modelpress(s.url)
        with pytest.raises(ModelpressError) as e:
            anonymous.job("01900000-0000-7000-8000-000000000000")
        assert (e.value.status, e.value.code) == (401, "missing_api_key")
        wrong = Modelpress(s.url, api_key="nope")
        resp = presets.sync_detailed(client=wrong.client)
        assert resp.status_code == 401 and resp.parsed.error.code == "invalid_api_key"
        right = Modelpress(s.url, api_key="k-7e5")
        resp = presets.sync_detailed(client=right.client)
        assert resp.status_code == 200 and any(p.name == "int8" for p in resp.parsed.items)
    finally:
        s.stop()
