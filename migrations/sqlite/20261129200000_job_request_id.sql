-- The id of the HTTP request that created a job, so the worker's log lines
-- of the job can be found from the request's.
ALTER TABLE jobs ADD COLUMN request_id TEXT;
