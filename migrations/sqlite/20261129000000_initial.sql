-- Models, the job queue and the artifacts jobs produced. Timestamps are Unix
-- milliseconds (UTC); JSON documents are stored as text.

CREATE TABLE models (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT,
    version         TEXT,
    labels          TEXT NOT NULL DEFAULT '{}',
    total_bytes     INTEGER NOT NULL,
    tensor_count    INTEGER NOT NULL,
    parameter_count INTEGER NOT NULL,
    -- [{name, dtype, shape, bytes, file}], in file order.
    tensors         TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);

-- The files a model is made of (one safetensors file, or shards with their
-- index, and config.json), each a blob.
CREATE TABLE model_files (
    model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    bytes    INTEGER NOT NULL,
    PRIMARY KEY (model_id, name)
);
CREATE INDEX model_files_by_sha256 ON model_files (sha256);

-- The queue. A job is claimed by setting status = 'running' together with a
-- lease (owner and expiry) in one statement; the owner renews the lease while
-- the job runs, and a job whose lease expired is queued again or, past the
-- retry limit, failed.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL,
    -- Kept after the model is deleted: it names the input of a finished job.
    model_id         TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    preset           TEXT,
    pipeline         TEXT NOT NULL,
    output_format    TEXT NOT NULL,
    webhook_url      TEXT,
    labels           TEXT NOT NULL DEFAULT '{}',
    idempotency_key  TEXT UNIQUE,
    request_hash     TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress_stage   TEXT,
    tensors_done     INTEGER NOT NULL DEFAULT 0,
    tensors_total    INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    bytes_before     INTEGER,
    bytes_after      INTEGER,
    ratio            REAL,
    parameters_kept  REAL,
    duration_seconds REAL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX jobs_queue ON jobs (status, priority DESC, id);
CREATE INDEX jobs_by_model ON jobs (model_id, id);
CREATE INDEX jobs_by_lease ON jobs (status, lease_expires_at);

CREATE TABLE job_artifacts (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    bytes    INTEGER NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE INDEX job_artifacts_by_sha256 ON job_artifacts (sha256);
