-- paygate schema, version 4: every capability knows the root of its derivation tree and its
-- depth in it, so derivation can be bounded (depth, and how many unexpired capabilities one
-- root may have) and checked in the transaction that inserts the child.
ALTER TABLE capabilities ADD COLUMN root_id TEXT;
ALTER TABLE capabilities ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;

WITH RECURSIVE tree(id, root, depth) AS (
    SELECT id, id, 0 FROM capabilities WHERE parent_id IS NULL
    UNION ALL
    SELECT c.id, tree.root, tree.depth + 1
      FROM capabilities c JOIN tree ON c.parent_id = tree.id)
UPDATE capabilities
   SET root_id = (SELECT root FROM tree WHERE tree.id = capabilities.id),
       depth = (SELECT depth FROM tree WHERE tree.id = capabilities.id);

-- Children derived while their ancestor was being revoked (before derive and revoke were
-- serialised) are revoked with it.
WITH RECURSIVE revoked(id, at) AS (
    SELECT id, revoked_at FROM capabilities WHERE revoked_at IS NOT NULL
    UNION ALL
    SELECT c.id, revoked.at FROM capabilities c JOIN revoked ON c.parent_id = revoked.id
     WHERE c.revoked_at IS NULL)
UPDATE capabilities
   SET revoked_at = (SELECT min(at) FROM revoked WHERE revoked.id = capabilities.id)
 WHERE revoked_at IS NULL AND id IN (SELECT id FROM revoked);

CREATE INDEX capabilities_by_root ON capabilities (root_id, expires_at);

-- The account's capabilities in rowid order: its list pages newest first along this index.
CREATE INDEX capabilities_by_account_rowid ON capabilities (account_id);
