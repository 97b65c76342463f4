-- Calibration statistics uploaded for a model: one safetensors file each,
-- stored as a blob, checked against the model when it was uploaded.
-- Deleting the model deletes them.
CREATE TABLE statistics (
    id         TEXT PRIMARY KEY NOT NULL,
    model_id   TEXT NOT NULL REFERENCES models (id) ON DELETE CASCADE,
    sha256     TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    -- The weights it has statistics for (aliases included), as a JSON
    -- array of names.
    tensors    TEXT NOT NULL,
    -- Whether every one of them has `xtx`.
    has_xtx    BOOLEAN NOT NULL,
    -- The largest `counts` of any weight: the calibration tokens.
    tokens     DOUBLE PRECISION NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX statistics_by_model ON statistics (model_id, id);
CREATE INDEX statistics_by_sha256 ON statistics (sha256);

-- The statistics a job runs with. Like `model_id`, kept after they are
-- deleted: it names an input of a finished job.
ALTER TABLE jobs ADD COLUMN statistics_id TEXT;
CREATE INDEX jobs_by_statistics ON jobs (statistics_id, status);
