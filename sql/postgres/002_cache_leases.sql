-- Cache leases: each serving process (a worker of a node) that keeps an exact cache of
-- shared state renews a row here every 200 ms, recording the change-log position it has
-- applied (`seen`). A process trusts its cache without asking the database only while its
-- last renewal is under 900 ms old; a transaction that logged a change answers only after
-- every process with a recent row has applied it, or 1 s has passed (by then any lease
-- granted before the change has lapsed). See `src/store/postgres/leases.rs`.
CREATE TABLE cache_leases (
    holder     uuid        PRIMARY KEY,
    node       text        NOT NULL,
    seen       bigint      NOT NULL,
    renewed_at timestamptz NOT NULL
);
