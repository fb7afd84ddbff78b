-- paygate schema, version 5: the change log. Every change to a row a worker may hold in
-- its exact cache is recorded here, by triggers, in the same transaction as the change:
-- its kind and key, numbered in commit order. A worker that sees the database's data
-- version move reads the log from the last number it saw and evicts exactly those keys
-- (see src/cache.rs). Kept to the newest rows by the sweeper; a worker that finds a gap
-- before the first row it reads has fallen behind and drops its whole cache.
--
-- Nothing is logged for a new row (nothing absent is ever cached) nor for revocations
-- and capabilities the sweeper deletes because they expired (their expiry refuses them
-- already). Sessions it deletes are logged like any ended session: a delete trigger
-- cannot tell a sweep from a logout, and evicting an expired session costs nothing.
CREATE TABLE changes (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT    NOT NULL,
    key  TEXT    NOT NULL
) STRICT;

-- A user disabled (or renamed, or given another role): everything the worker knows that
-- depends on them.
CREATE TRIGGER changes_user AFTER UPDATE OF disabled, role, username ON users
BEGIN
    INSERT INTO changes (kind, key) VALUES ('user', old.id);
END;

-- A session ended (logout, or its user disabled).
CREATE TRIGGER changes_session AFTER DELETE ON sessions
BEGIN
    INSERT INTO changes (kind, key) VALUES ('session', hex(old.token_hash));
END;

-- A JWT revoked by logout.
CREATE TRIGGER changes_jwt AFTER INSERT ON revoked_tokens
BEGIN
    INSERT INTO changes (kind, key) VALUES ('jwt', new.jti);
END;

-- A grant given, changed or taken away: that grant, and what capabilities on the account
-- are worth.
CREATE TRIGGER changes_grant_added AFTER INSERT ON account_members
BEGIN
    INSERT INTO changes (kind, key) VALUES ('membership', new.user_id || ' ' || new.account_id);
END;
CREATE TRIGGER changes_grant_changed AFTER UPDATE ON account_members
BEGIN
    INSERT INTO changes (kind, key) VALUES ('membership', old.user_id || ' ' || old.account_id);
END;
CREATE TRIGGER changes_grant_removed AFTER DELETE ON account_members
BEGIN
    INSERT INTO changes (kind, key) VALUES ('membership', old.user_id || ' ' || old.account_id);
END;

-- A capability revoked (with its descendants, row by row).
CREATE TRIGGER changes_capability AFTER UPDATE OF revoked_at ON capabilities
BEGIN
    INSERT INTO changes (kind, key) VALUES ('capability', old.account_id);
END;

-- A payment cancelled.
CREATE TRIGGER changes_payment AFTER UPDATE OF status ON payments
BEGIN
    INSERT INTO changes (kind, key) VALUES ('payment', old.account_id || ' ' || old.id);
END;
