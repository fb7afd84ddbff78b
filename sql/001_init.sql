-- paygate schema, version 1: users, accounts with per-account grants, payments and
-- idempotency records. Times are Unix milliseconds (UTC). Ids shown to clients are UUIDs;
-- integer `seq` columns give insertion order for cursor pagination.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    username      TEXT    NOT NULL UNIQUE,
    -- Argon2id PHC string; the password itself is never stored.
    password_hash TEXT    NOT NULL,
    role          TEXT    CHECK (role IN ('admin', 'auditor')),
    disabled      INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at    INTEGER NOT NULL
) STRICT;

CREATE TABLE accounts (
    seq        INTEGER PRIMARY KEY,
    id         TEXT    NOT NULL UNIQUE,
    name       TEXT    NOT NULL,
    currency   TEXT    NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users (id),
    created_at INTEGER NOT NULL
) STRICT;

-- Who may do what on an account: a subset of 'rwda' per (user, account).
CREATE TABLE account_members (
    user_id    INTEGER NOT NULL REFERENCES users (id),
    account_id TEXT    NOT NULL REFERENCES accounts (id),
    perms      TEXT    NOT NULL CHECK (length(perms) BETWEEN 1 AND 4),
    granted_by INTEGER NOT NULL REFERENCES users (id),
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, account_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX account_members_by_account ON account_members (account_id);

CREATE TABLE payments (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    account_id   TEXT    NOT NULL REFERENCES accounts (id),
    payee        TEXT    NOT NULL,
    amount_minor INTEGER NOT NULL CHECK (amount_minor BETWEEN 1 AND 1000000000000),
    currency     TEXT    NOT NULL,
    reference    TEXT    NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('pending', 'cancelled')),
    created_by   INTEGER NOT NULL REFERENCES users (id),
    created_at   INTEGER NOT NULL,
    cancelled_at INTEGER
) STRICT;

CREATE INDEX payments_by_account ON payments (account_id, seq);

-- Idempotency-Key records, scoped to the user. While a request holds the key, `lease` is
-- set; once it has answered, `status` and `response_body` hold the answer to replay.
CREATE TABLE idempotency_keys (
    user_id          INTEGER NOT NULL REFERENCES users (id),
    key              TEXT    NOT NULL,
    request_hash     BLOB    NOT NULL,
    lease            TEXT,
    lease_expires_at INTEGER,
    status           INTEGER,
    response_body    TEXT,
    location         TEXT,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (user_id, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
