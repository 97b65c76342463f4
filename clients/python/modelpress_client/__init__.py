"""A thin layer over the generated `modelpress_api` client for the common
path: upload a checkpoint, compress it, download the result.

    from modelpress_client import Modelpress

    mp = Modelpress("http://127.0.0.1:8080")
    model = mp.upload_model("model.safetensors")
    job = mp.compress(model.id, preset="int8")
    mp.download(job.id, "out/")

    # Calibrated presets need the model's activation statistics:
    stats = mp.upload_statistics(model.id, "stats.safetensors")
    job = mp.compress(model.id, preset="int4-g128-gptq", statistics=stats.id)

Every call raises `ModelpressError` (with the status and the API's error
`code` and `message`) when the server refuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from modelpress_api import AuthenticatedClient, Client
from modelpress_api.api.jobs import cancel_job, create_job, get_job
from modelpress_api.api.models import upload_model
from modelpress_api.api.statistics import upload_statistics
from modelpress_api.models import CreateJob, ErrorBody, JobView, ModelView, StatisticsView
from modelpress_api.models.create_job_pipeline_type_0 import CreateJobPipelineType0
from modelpress_api.models.output_request import OutputRequest
from modelpress_api.models.upload_model_files_body import UploadModelFilesBody
from modelpress_api.types import UNSET, File, Response

__all__ = ["Modelpress", "ModelpressError", "FINAL_STATUSES"]

FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})

# What a sharded checkpoint directory is uploaded with, besides its shards.
_SIDE_FILES = ("model.safetensors.index.json", "config.json")


class ModelpressError(Exception):
    """The server refused a request: its status and the API's error body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _check(resp: Response[Any], ok: tuple[int, ...]) -> Any:
    if resp.status_code in ok and not isinstance(resp.parsed, ErrorBody):
        return resp.parsed
    try:
        error = json.loads(resp.content)["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "unexpected_response", resp.content[:200].decode(errors="replace")
    raise ModelpressError(int(resp.status_code), code, message)


class Modelpress:
    """A modelpress server. `api_key` is needed when the server has keys."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0):
        import httpx

        settings = dict(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            raise_on_unexpected_status=False,
        )
        # Without a key no Authorization header is sent: the plain client
        # has the same interface as the authenticated one.
        self.client: AuthenticatedClient | Client = (
            AuthenticatedClient(token=api_key, **settings) if api_key else Client(**settings)
        )

    def upload_model(
        self,
        path: str | Path,
        name: str | None = None,
        version: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> ModelView:
        """Uploads a `.safetensors` file (streamed as the raw body) or a
        directory holding a sharded checkpoint (its `*.safetensors` shards,
        `model.safetensors.index.json` and `config.json`, as multipart)."""
        path = Path(path)
        name = name or path.stem
        if path.is_file():
            with path.open("rb") as f:
                resp = upload_model.sync_detailed(
                    client=self.client,
                    body=File(payload=f, file_name=path.name, mime_type="application/octet-stream"),
                    name=name,
                    version=UNSET if version is None else version,
                    labels=json.dumps(labels) if labels else UNSET,
                )
            return _check(resp, (201,))
        parts = sorted(path.glob("*.safetensors")) + [
            path / n for n in _SIDE_FILES if (path / n).is_file()
        ]
        if not parts:
            raise FileNotFoundError(f"{path} holds no .safetensors file")
        with ExitStack() as stack:
            files = [
                File(payload=stack.enter_context(p.open("rb")), file_name=p.name, mime_type="application/octet-stream")
                for p in parts
            ]
            body = UploadModelFilesBody(file=files, name=name)
            if version is not None:
                body.version = version
            if labels:
                body.labels = json.dumps(labels)
            resp = upload_model.sync_detailed(client=self.client, body=body)
        return _check(resp, (201,))

    def upload_statistics(self, model_id: str, path: str | Path) -> StatisticsView:
        """Uploads a calibration statistics file (safetensors, as
        `scripts/collect_stats.py` writes it) for a model, streamed as the raw
        body. The server checks it against the model before it stores it;
        pass the returned `id` to `compress(..., statistics=...)`."""
        path = Path(path)
        with path.open("rb") as f:
            resp = upload_statistics.sync_detailed(
                model_id,
                client=self.client,
                body=File(payload=f, file_name=path.name, mime_type="application/octet-stream"),
            )
        return _check(resp, (201,))

    def compress(
        self,
        model_id: str,
        preset: str | None = None,
        pipeline: dict[str, Any] | None = None,
        format: str = "packed",
        wait: bool = True,
        timeout: float | None = None,
        poll_seconds: float = 0.5,
        idempotency_key: str | None = None,
        statistics: str | None = None,
    ) -> JobView:
        """Submits a job (a preset or a pipeline), with the model's
        calibration statistics `statistics` (an id from `upload_statistics`)
        if given; with `wait`, polls until it is finished and returns it
        (whatever its final status)."""
        if (preset is None) == (pipeline is None):
            raise ValueError("give one of preset or pipeline")
        request = CreateJob(model_id=model_id, output=OutputRequest.from_dict({"format": format}))
        if statistics is not None:
            request.statistics = statistics
        if preset is not None:
            request.preset = preset
        else:
            request.pipeline = CreateJobPipelineType0.from_dict(pipeline)
        resp = create_job.sync_detailed(
            client=self.client,
            body=request,
            idempotency_key=UNSET if idempotency_key is None else idempotency_key,
        )
        job = _check(resp, (202,))
        return self.wait(job.id, timeout, poll_seconds) if wait else job

    def job(self, job_id: str) -> JobView:
        return _check(get_job.sync_detailed(job_id, client=self.client), (200,))

    def wait(self, job_id: str, timeout: float | None = None, poll_seconds: float = 0.5) -> JobView:
        """Polls a job until it reaches a final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if str(job.status) in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout} s")
            time.sleep(poll_seconds)

    def cancel(self, job_id: str) -> JobView:
        return _check(cancel_job.sync_detailed(job_id, client=self.client), (200, 202))

    def download(self, job_id: str, dest: str | Path) -> list[Path]:
        """Downloads every artifact of a succeeded job into the directory
        `dest`, streaming each to disk and checking its sha256 against the
        job's. Returns the paths written."""
        job = self.job(job_id)
        if str(job.status) != "succeeded":
            raise ModelpressError(409, "job_not_succeeded", f"job {job_id} is {job.status}")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        http = self.client.get_httpx_client()
        written = []
        for artifact in job.artifacts:
            target = dest / Path(artifact.name).name
            partial = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            with http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{artifact.name}") as resp:
                if resp.status_code != 200:
                    resp.read()
                    _check(
                        Response(status_code=resp.status_code, content=resp.content, headers=resp.headers, parsed=None),
                        (200,),
                    )
                with partial.open("wb") as out:
                    for chunk in resp.iter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
            if digest.hexdigest() != artifact.sha256:
                partial.unlink()
                raise ModelpressError(
                    200, "checksum_mismatch", f"{artifact.name}: sha256 {digest.hexdigest()}, expected {artifact.sha256}"
                )
            partial.replace(target)
            written.append(target)
        return written
