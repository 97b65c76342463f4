-- The schema of migrations/sqlite/ as it stands after its last migration,
-- in PostgreSQL's types: BIGINT for every integer the code reads as i64
-- (Unix-millisecond timestamps, sizes, counts), DOUBLE PRECISION for
-- REAL, BOOLEAN for flags. Ids and names compare byte by byte (COLLATE "C"),
-- as SQLite's do, so that listings and cursors order the same whatever
-- the database's locale. A change of schema is made in both folders.

CREATE TABLE models (
    id              TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    name            TEXT,
    version         TEXT,
    labels          TEXT NOT NULL DEFAULT '{}',
    total_bytes     BIGINT NOT NULL,
    tensor_count    BIGINT NOT NULL,
    parameter_count BIGINT NOT NULL,
    -- [{name, dtype, shape, bytes, file}], in file order.
    tensors         TEXT NOT NULL,
    created_at      BIGINT NOT NULL
);

CREATE TABLE model_files (
    model_id TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    name     TEXT COLLATE "C" NOT NULL,
    sha256   TEXT NOT NULL,
    bytes    BIGINT NOT NULL,
    PRIMARY KEY (model_id, name)
);
CREATE INDEX model_files_by_sha256 ON model_files (sha256);

-- The queue: see migrations/sqlite/20261129000000_initial.sql. Claims take
-- the row with FOR UPDATE SKIP LOCKED, so concurrent claimers never wait
-- on each other nor take the same job.
CREATE TABLE jobs (
    id               TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    -- Kept after the model is deleted: it names the input of a finished job.
    model_id         TEXT COLLATE "C" NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    priority         BIGINT NOT NULL DEFAULT 0,
    preset           TEXT,
    pipeline         TEXT NOT NULL,
    output_format    TEXT NOT NULL,
    webhook_url      TEXT,
    labels           TEXT NOT NULL DEFAULT '{}',
    idempotency_key  TEXT UNIQUE,
    request_hash     TEXT,
    attempts         BIGINT NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    progress_stage   TEXT,
    tensors_done     BIGINT NOT NULL DEFAULT 0,
    tensors_total    BIGINT NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    bytes_before     BIGINT,
    bytes_after      BIGINT,
    ratio            DOUBLE PRECISION,
    parameters_kept  DOUBLE PRECISION,
    duration_seconds DOUBLE PRECISION,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    updated_at       BIGINT NOT NULL,
    -- The id of the HTTP request that created the job.
    request_id       TEXT,
    -- The statistics it runs with; kept after they are deleted.
    statistics_id    TEXT
);
CREATE INDEX jobs_queue ON jobs (status, priority DESC, id);
CREATE INDEX jobs_by_model ON jobs (model_id, id);
CREATE INDEX jobs_by_lease ON jobs (status, lease_expires_at);
CREATE INDEX jobs_by_statistics ON jobs (statistics_id, status);

CREATE TABLE job_artifacts (
    job_id   TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    bytes    BIGINT NOT NULL,
    position BIGINT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE INDEX job_artifacts_by_sha256 ON job_artifacts (sha256);

-- One row the readiness check rewrites, to find out whether the database
-- takes a write.
CREATE TABLE write_probe (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    written_at BIGINT NOT NULL
);
INSERT INTO write_probe (id, written_at) VALUES (1, 0);

CREATE TABLE statistics (
    id         TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    model_id   TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    sha256     TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    tensors    TEXT NOT NULL,
    has_xtx    BOOLEAN NOT NULL,
    tokens     DOUBLE PRECISION NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX statistics_by_model ON statistics (model_id, id);
CREATE INDEX statistics_by_sha256 ON statistics (sha256);
