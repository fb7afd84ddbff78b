-- The TOTP sealing keys each serving process holds (its data directory's totp.key), as
-- lowercase hex ids separated by spaces, the key it seals with first. Renewed with the
-- process's cache lease. `paygate keys rotate-totp` on a shared database reads it: it
-- stages a new key only when every running process seals with the same key, and re-seals
-- the database under the staged key only once every running process holds it.
ALTER TABLE cache_leases ADD COLUMN sealing_keys text NOT NULL DEFAULT '';
