-- The audit log's checkpoints, kept outside the log files: for each writer instance, how
-- many records it has made durable and the chain value of the last one. A log that holds
-- fewer records, or a different chain value at that position, lost its tail.
CREATE TABLE checkpoints (
    instance   TEXT    PRIMARY KEY,
    records    INTEGER NOT NULL,
    head       BLOB    NOT NULL CHECK (length(head) = 32),
    updated_at INTEGER NOT NULL
) STRICT;
