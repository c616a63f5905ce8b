-- What many hubs sharing one registry need (issue 12): the hubs themselves with their leases,
-- which hub holds each device's one live connection, readings-stored counters that add up
-- across hubs, and a change log that a hub reads by sequence to act on pushes, revocations
-- and rotations for the devices it holds.

-- One row per hub process (each worker is a node of its own). A node is live while
-- lease_expires_at is in the future; it renews the lease with every heartbeat. The
-- incarnation changes each time a node registers, so a second process started with the same
-- node id takes the row over and the first one's heartbeats stop matching.
CREATE TABLE nodes (
    node_id           text PRIMARY KEY CHECK (length(node_id) BETWEEN 1 AND 200),
    incarnation       uuid NOT NULL,
    address           text NOT NULL CHECK (length(address) <= 300),
    started_at        timestamptz NOT NULL,
    heartbeat_at      timestamptz NOT NULL,
    lease_expires_at  timestamptz NOT NULL,
    live_connections  integer NOT NULL DEFAULT 0 CHECK (live_connections >= 0)
);

-- Every device has exactly one row (made by the trigger below), so taking a connection over
-- is an UPDATE of an existing row: the row lock orders competing handshakes, and each one
-- learns which hub it took the device from. The epoch only grows, across releases too: an
-- action of a hub that no longer holds the epoch it was given matches no row.
CREATE TABLE connections (
    device_id        text PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    owner_node       text REFERENCES nodes (node_id) ON DELETE SET NULL,
    epoch            bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    remote_address   text CHECK (length(remote_address) <= 300),
    connected_since  timestamptz,
    last_seen        timestamptz,
    released_at      timestamptz
);
CREATE INDEX connections_owner ON connections (owner_node) WHERE owner_node IS NOT NULL;

CREATE FUNCTION hub_add_connection_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO connections (device_id) VALUES (NEW.device_id);
    RETURN NEW;
END
$$;
CREATE TRIGGER devices_connection_row AFTER INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION hub_add_connection_row();

-- Hubs add what they stored since their last flush; nobody overwrites another hub's count.
-- Apart from devices, so the frequent flushes never lock or bloat the rows operators change.
CREATE TABLE device_counters (
    device_id        text PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    readings_stored  bigint NOT NULL DEFAULT 0 CHECK (readings_stored >= 0)
);

-- The change sequence: one row, bumped by every operator change. Its row lock is held until
-- the change commits, so sequence numbers become visible in order and a hub that read up to
-- N never later finds a change numbered below N committed behind its back.
CREATE TABLE change_seq (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    value      bigint NOT NULL CHECK (value >= 0)
);
INSERT INTO change_seq (value) VALUES (0);

-- One row per device per change; a push to many devices shares one sequence number.
CREATE TABLE changes (
    seq             bigint NOT NULL,
    device_id       text NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    kind            text NOT NULL CHECK (kind IN ('config', 'revoke', 'rotate')),
    config_version  bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seq, device_id)
);
CREATE INDEX changes_device ON changes (device_id);
CREATE INDEX changes_created ON changes (created_at);

-- The NOTIFY channel of a node: a doorbell telling it to read the change log. Node ids are
-- free text and channel names are identifiers of at most 63 bytes, so the channel is named
-- after a hash of the id; hub/postgres/queries.py's node_channel() computes the same name.
CREATE FUNCTION hub_node_channel(node_id text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN 'hub_node_' || left(encode(sha256(convert_to(node_id, 'UTF8')), 'hex'), 32);
