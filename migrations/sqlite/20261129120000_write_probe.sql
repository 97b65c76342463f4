-- One row the readiness check rewrites, to find out whether the database
-- takes a write (a full disk lets reads through).
CREATE TABLE write_probe (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    written_at INTEGER NOT NULL
);
INSERT INTO write_probe (id, written_at) VALUES (1, 0);
