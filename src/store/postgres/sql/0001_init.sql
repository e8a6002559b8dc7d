-- coffre schema, version 1 (design/several-nodes.md §3.2).
--
-- Applied by `coffre store migrate` (src/store/postgres/migrate.rs) in one
-- transaction, under the migrator's advisory lock. Never edit this file
-- once released: the migrator refuses a database whose applied files'
-- checksums differ from this binary's. Changes go into a new file.
--
-- Records are the same JSON bytes as the sled store keeps, so one
-- (de)serialisation, one MAC and one copy tool serve both backends; only
-- the fields a query selects or orders by get columns of their own.
-- `record_mac` is the HMAC-SHA256 tag of src/store/integrity.rs over the
-- table's name, the row's id and `record` (the sled store keeps the same
-- tag in front of the JSON instead); empty in a store not sealed yet (see
-- store_meta `sealed`). Every read checks it, and that the id inside the
-- record is the row's.

-- One row: the cluster's identity, and the generation counter that every
-- key-visible change bumps under `SELECT ... FOR UPDATE`, which orders the
-- change feed by commit.
CREATE TABLE coffre_cluster (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cluster_id     uuid    NOT NULL,
    key_generation bigint  NOT NULL DEFAULT 0 CHECK (key_generation >= 0)
);
INSERT INTO coffre_cluster (cluster_id) VALUES (gen_random_uuid());

-- Key records. uuid order is byte order, which list_keys pages by; the "C"
-- collation with starts_with() gives Rust's byte-wise alias prefix match.
-- A destroyed key's tombstone keeps its alias, so an alias is never reused.
CREATE TABLE keys (
    id          uuid   PRIMARY KEY,
    alias       text   COLLATE "C" UNIQUE,
    state       text   NOT NULL
                CHECK (state IN ('ENABLED', 'DISABLED', 'PENDING_DELETION', 'DESTROYED')),
    next_due_ms bigint,
    generation  bigint NOT NULL,
    record      bytea  NOT NULL,
    record_mac  bytea  NOT NULL
);
CREATE INDEX keys_due        ON keys (next_due_ms, id) WHERE next_due_ms IS NOT NULL;
CREATE INDEX keys_generation ON keys (generation);
CREATE INDEX keys_state      ON keys (state, id);

-- CMK versions: HSM-wrapped material only. in_hsm: a version held by the
-- HSM itself (protection level HSM, an `hsm_object`), wrapped by no root
-- key (its hsm_root_key_id is 0). Root-key ids are u32 in coffre, stored
-- bit for bit in the signed integer (only ever compared for equality).
CREATE TABLE key_versions (
    key_id          uuid    NOT NULL REFERENCES keys (id),
    version         integer NOT NULL CHECK (version >= 1),
    hsm_root_key_id integer NOT NULL,
    in_hsm          boolean NOT NULL DEFAULT false,
    destroyed       boolean NOT NULL DEFAULT false,
    record          bytea   NOT NULL,
    record_mac      bytea   NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE INDEX key_versions_live_by_root
    ON key_versions (hsm_root_key_id, key_id, version) WHERE NOT destroyed AND NOT in_hsm;

-- The root-key fence: a version or secret is stored under a root key only
-- while its row is ACTIVE (inserts take it FOR SHARE); a rotation marks
-- the old one RETIRED once nothing live is left under it.
CREATE TABLE root_keys (
    id    integer     PRIMARY KEY,
    state text        NOT NULL CHECK (state IN ('ACTIVE', 'RETIRED')),
    since timestamptz NOT NULL DEFAULT now()
);

-- Service secrets (the audit keys, the store's MAC key): JSON
-- WrappedSecret, as sled keeps them. Not MAC'd: the HSM's wrap, bound to
-- the name, authenticates them.
CREATE TABLE service_secrets (
    name            text    PRIMARY KEY,
    hsm_root_key_id integer NOT NULL,
    record          bytea   NOT NULL
);

-- Quorum approvals. key_id has no foreign key: a RotateRootKey approval
-- names no key. executor and executor_incarnation are set while EXECUTING.
CREATE TABLE approvals (
    id                   uuid   PRIMARY KEY,
    status               text   NOT NULL,
    key_id               uuid,
    expires_at_ms        bigint NOT NULL,
    executor             text,
    executor_incarnation uuid,
    record               bytea  NOT NULL,
    record_mac           bytea  NOT NULL
);
CREATE INDEX approvals_open ON approvals (status, expires_at_ms);

-- Singletons (scheduler, root rotation, maintenance, digest signer):
-- judged by the database's clock. token grows with every new holder.
CREATE TABLE leases (
    name               text        PRIMARY KEY,
    holder             text        NOT NULL,
    holder_incarnation uuid        NOT NULL,
    token              bigint      NOT NULL,
    expires_at         timestamptz NOT NULL
);

-- The node registry and heartbeat. max_schema: the newest schema a node's
-- binary knows, for expand/contract upgrades.
CREATE TABLE nodes (
    node_id        text        PRIMARY KEY,
    incarnation    uuid        NOT NULL,
    started_at     timestamptz NOT NULL,
    last_seen      timestamptz NOT NULL,
    binary_version text        NOT NULL,
    max_schema     integer     NOT NULL
);

-- Audit: each node's signed checkpoints (format v3, src/audit/checkpoint.rs:
-- the signature covers the node and the log; the key fingerprint is the
-- audit key's), and the cluster digest chain that lists every node's head
-- (src/audit/digest.rs; `line` is the digest exactly as signed and exported).
-- Append-only (roles.sql grants no DELETE). A node's log id changes only
-- when its log is replaced, so its seq restarts under a new log id.
CREATE TABLE audit_checkpoints (
    node_id   text   NOT NULL,
    log_id    text   NOT NULL,
    seq       bigint NOT NULL,
    head_hash text   NOT NULL,
    time_ms   bigint NOT NULL,
    signature text   NOT NULL,
    PRIMARY KEY (node_id, log_id, seq)
);
CREATE INDEX audit_checkpoints_latest ON audit_checkpoints (node_id, time_ms DESC, seq DESC);
CREATE TABLE audit_digests (
    n              bigint PRIMARY KEY CHECK (n >= 1),
    time_ms        bigint NOT NULL,
    prev_hash      text   NOT NULL,
    key_generation bigint NOT NULL,
    line           text   NOT NULL
);

-- What the sled store keeps in its `meta` tree besides secrets: the
-- integrity marker (`sealed`: every key, version and approval row carries
-- its MAC; set by the first start's migration), and the like.
CREATE TABLE store_meta (
    name  text  PRIMARY KEY,
    value bytea NOT NULL
);

-- The migrator's own record (it creates nothing else itself): one row per
-- applied file, with the SHA-256 of its text.
CREATE TABLE schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
