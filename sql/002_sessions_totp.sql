-- paygate schema, version 2: login sessions, revoked JWTs and TOTP second factors.

-- Opaque session tokens. Only the SHA-256 of a token is stored: the database never holds a
-- usable token. `amr` lists how the user proved themselves at login ("pwd" or "pwd otp").
CREATE TABLE sessions (
    token_hash BLOB    PRIMARY KEY CHECK (length(token_hash) = 32),
    user_id    INTEGER NOT NULL REFERENCES users (id),
    amr        TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX sessions_by_expiry ON sessions (expires_at);
CREATE INDEX sessions_by_user ON sessions (user_id);

-- JWTs ended by logout before their expiry, kept until they would have expired anyway
-- (`expires_at`, Unix seconds, including the verifier's clock leeway).
CREATE TABLE revoked_tokens (
    jti        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE INDEX revoked_tokens_by_expiry ON revoked_tokens (expires_at);

-- TOTP (RFC 6238): the active secret, a secret awaiting confirmation, and the last time
-- step a code was accepted for (each code works once).
ALTER TABLE users ADD COLUMN totp_secret BLOB;
ALTER TABLE users ADD COLUMN totp_pending BLOB;
ALTER TABLE users ADD COLUMN totp_last_step INTEGER;
