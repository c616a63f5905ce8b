-- The device registry as hub/registry.py keeps it in SQLite: devices and their token hashes,
-- rotated-out tokens in their grace period, revocation, labels, desired configs with versions
-- and the device's last answer. Times are the database's clock (timestamptz), so hubs on
-- several machines never compare their own clocks.

-- Device ids and label names follow hub/registry.py's DEVICE_ID_PATTERN and LABEL_PATTERN;
-- the checks here are the last line, the hub refuses bad input with a clear error first.
CREATE TABLE devices (
    device_id       text PRIMARY KEY
                    CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    -- SHA-256 of the token, hex: a token is never stored.
    token_hash      text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    labels          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    -- The hub refuses a config whose `config` frame would not fit the protocol's 64 KiB
    -- (hub/protocol.py's config_frame_problem). Its JSON text can be several times larger
    -- (escapes, floats), so this bound is far above that and only stops a caller that
    -- skipped the check.
    config          jsonb NOT NULL DEFAULT '{}'
                    CHECK (jsonb_typeof(config) = 'object' AND octet_length(config::text) <= 1048576),
    -- Versions only grow: each push adds one.
    config_version  bigint NOT NULL DEFAULT 0 CHECK (config_version >= 0),
    acked_version   bigint CHECK (acked_version >= 0),
    ack_ok          boolean,
    ack_error       text,
    acked_at        timestamptz,
    CHECK (acked_version <= config_version)
);

-- `--label k=v` pushes select by containment (labels @> '{"k": "v"}').
CREATE INDEX devices_labels ON devices USING gin (labels jsonb_path_ops);

-- A rotated-out token keeps working until expires_at (the rotation's grace period).
CREATE TABLE retired_tokens (
    token_hash      text PRIMARY KEY CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    device_id       text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    expires_at      timestamptz NOT NULL
);
CREATE INDEX retired_tokens_device ON retired_tokens (device_id);
CREATE INDEX retired_tokens_expiry ON retired_tokens (expires_at);
