-- paygate schema, version 3: capability tokens. A capability grants its bearer a set of
-- permissions on one payment until it expires, whoever the bearer is. Only the SHA-256 of
-- the token is stored. A derived capability names its parent; revoking one revokes every
-- capability derived from it.
CREATE TABLE capabilities (
    id          TEXT    PRIMARY KEY,
    token_hash  BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    account_id  TEXT    NOT NULL REFERENCES accounts (id),
    payment_id  TEXT    NOT NULL REFERENCES payments (id),
    perms       TEXT    NOT NULL CHECK (length(perms) BETWEEN 1 AND 4),
    minted_by   INTEGER NOT NULL REFERENCES users (id),
    parent_id   TEXT    REFERENCES capabilities (id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;

CREATE INDEX capabilities_by_account ON capabilities (account_id, expires_at);
CREATE INDEX capabilities_by_parent ON capabilities (parent_id);
CREATE INDEX capabilities_by_expiry ON capabilities (expires_at);
