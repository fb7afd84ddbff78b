-- ratelimit.db, version 1: one row per token bucket that is not full.
-- A bucket is stored as the instant it will be full again (nanoseconds since the Unix
-- epoch); a row whose full_at has passed is a full bucket, exactly like a missing row, so
-- the sweeper may delete it without changing any decision.

CREATE TABLE buckets (
    rule    TEXT    NOT NULL,
    key     TEXT    NOT NULL,
    full_at INTEGER NOT NULL,
    PRIMARY KEY (rule, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX buckets_by_full_at ON buckets (full_at);

-- Tokens a process has taken from a bucket and may still spend from memory. While a lease
-- is live, its tokens are held back from the bucket's capacity for everybody else, so
-- tokens in buckets plus tokens in leases never exceed the burst.
CREATE TABLE leases (
    rule       TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    holder     TEXT    NOT NULL,
    tokens     INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (rule, key, holder)
) STRICT, WITHOUT ROWID;

CREATE INDEX leases_by_expiry ON leases (expires_at);
