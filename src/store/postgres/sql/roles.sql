-- Least-privilege roles for coffre on PostgreSQL. NOT applied by coffre:
-- a DBA runs it once, as a superuser, before the first
-- `coffre store migrate`:
--
--     psql -v ON_ERROR_STOP=1 -U postgres -f roles.sql
--
-- Two roles:
--
-- * coffre_owner owns the database and every table. `coffre store migrate`
--   connects as it (DDL). Nothing else should.
-- * coffre_app is what `coffre serve` connects as: SELECT, INSERT and
--   UPDATE on the tables, nothing more. No DDL (it has no CREATE on the
--   schema or the database, and owns nothing), no TEMP tables, no DELETE
--   or TRUNCATE anywhere: coffre never deletes a row (a destroyed key
--   keeps its tombstone, approvals and audit rows are history), so the
--   audit_* tables are append-only for it. A later migration that needs
--   DELETE on a table grants it there, by name.
--
-- The privileges come from default privileges of coffre_owner, so tables
-- that later migrations create are covered without running this again.
-- Set the roles' authentication yourself (client certificates with
-- `hostssl ... cert` in pg_hba.conf, or SCRAM passwords): this file sets
-- none. Tested by tests/postgres_roles.rs, which runs it statement by
-- statement (the `\connect` line splits it in two).

CREATE ROLE coffre_owner LOGIN;
CREATE ROLE coffre_app LOGIN;
-- What coffre sets on every session too, for anyone who logs in as it.
ALTER ROLE coffre_app SET synchronous_commit = on;
ALTER ROLE coffre_app SET idle_in_transaction_session_timeout = '30s';
CREATE DATABASE coffre OWNER coffre_owner;
REVOKE ALL ON DATABASE coffre FROM PUBLIC;
GRANT CONNECT ON DATABASE coffre TO coffre_app;

\connect coffre

-- PostgreSQL 15 already refuses CREATE on public to PUBLIC; older ones not.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO coffre_app;
ALTER DEFAULT PRIVILEGES FOR ROLE coffre_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE ON TABLES TO coffre_app;
ALTER DEFAULT PRIVILEGES FOR ROLE coffre_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO coffre_app;

-- The timeline fence (docs/postgres.md, "Failover"): on every new
-- connection coffre reads where the server stands in the replication
-- history. These functions are executable by PUBLIC by default; granted
-- by name so that a hardening that revoked them from PUBLIC keeps coffre
-- working (a refusal would stop the node: it cannot tell an old primary).
GRANT EXECUTE ON FUNCTION pg_control_system(), pg_control_checkpoint(),
    pg_current_wal_lsn(), pg_walfile_name(pg_lsn), pg_is_in_recovery()
    TO coffre_app;
