-- Checkpoints carry an HMAC under the audit key, over the instance name, the record count
-- and the chain value, so that whoever can cut the log files cannot also move the
-- checkpoint back to match (rows without one, written before this version, are refused
-- until an operator seals the chain with `paygate audit seal`).
ALTER TABLE checkpoints ADD COLUMN mac BLOB CHECK (mac IS NULL OR length(mac) = 32);
