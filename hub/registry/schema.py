"""The registry's SQLite tables, as the migrations that build them.

Each entry upgrades the database by one version (`PRAGMA user_version`); `Registry` runs
the ones a file has not had yet when it opens it. Append, never edit: files in the field
were built by the entries as they are.
"""

MIGRATIONS = [
    """
    CREATE TABLE devices (
        device_id       TEXT PRIMARY KEY,
        token_hash      TEXT NOT NULL UNIQUE,
        created_at      REAL NOT NULL,
        revoked_at      REAL,
        labels          TEXT NOT NULL DEFAULT '{}',
        config          TEXT NOT NULL DEFAULT '{}',
        config_version  INTEGER NOT NULL DEFAULT 0,
        acked_version   INTEGER,
        ack_ok          INTEGER,
        ack_error       TEXT,
        acked_at        REAL,
        changed_seq     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX devices_changed ON devices (changed_seq);
    CREATE TABLE presence (
        device_id       TEXT PRIMARY KEY REFERENCES devices (device_id),
        online          INTEGER NOT NULL,
        remote_address  TEXT,
        connected_since REAL,
        last_seen       REAL,
        readings_stored INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE change_seq (value INTEGER NOT NULL);
    INSERT INTO change_seq VALUES (0);
    """,
    """
    CREATE TABLE retired_tokens (
        token_hash      TEXT PRIMARY KEY,
        device_id       TEXT NOT NULL REFERENCES devices (device_id),
        expires_at      REAL NOT NULL
    );
    CREATE INDEX retired_tokens_device ON retired_tokens (device_id);
    """,
]

CONNECTIONS_MIGRATIONS = [
    """
    CREATE TABLE connections (
        device_id       TEXT PRIMARY KEY,
        owner_node      TEXT,
        epoch           INTEGER NOT NULL DEFAULT 0,
        remote_address  TEXT,
        connected_since REAL,
        last_seen       REAL
    );
    CREATE INDEX connections_owner ON connections (owner_node) WHERE owner_node IS NOT NULL;
    """,
]
"""`connections.sqlite3` (hub.registry.sqlite_claims): the node holding each device's
connection and an epoch that only grows; written by hub processes only."""
