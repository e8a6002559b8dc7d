-- coffre schema, version 2: each node's freshness in the node registry,
-- as its heartbeat reports it, for `coffre cluster status`. Additive: a
-- node of version 1 would leave the columns NULL (but a node refuses a
-- schema other than its own, docs/deployment.md "Upgrades").
--   feed_generation   the last change-feed generation the node applied
--   confirmed_at      when (by this database's clock) the node last sent
--                     a poll that succeeded: its caches' last confirmation
--   max_staleness_ms  its bound ([cluster] max_staleness_ms)
--   strict            whether it refuses data keys once past the bound
ALTER TABLE nodes
    ADD COLUMN feed_generation  bigint,
    ADD COLUMN confirmed_at     timestamptz,
    ADD COLUMN max_staleness_ms bigint,
    ADD COLUMN strict           boolean;
