"""What hubs read and record in the PostgreSQL registry, each one SQL statement, named and
documented (the operator's changes are in `operator_queries`).

Each constant is an asyncpg statement (`$1`, `$2`... bound, never formatted in). One
statement each, so an operation is atomic without a transaction around it, costs one round
trip, and takes its row locks in one place:

* Ownership. Every device has one `connections` row. A handshake claims it with
  `CLAIM_CONNECTION`, which raises the epoch by one and returns it; every later action of
  that session (`TOUCH_CONNECTIONS`, `RECORD_CONFIG_ACKS`, `RELEASE_CONNECTION`) names the
  epoch and matches no row once another handshake took the device: a stale owner's late
  write loses. `STALE_SESSIONS` is the periodic safety net a hub runs over its own sessions
  (revoked, taken over, token rotated out, or behind on its config).
* Nodes. `REGISTER_NODE` at start, `HEARTBEAT` about every second; a node is live while its
  lease has not expired, and a device is online while a live node owns it
  (`DEVICE_PRESENCE`), so a dead hub's devices go offline with its lease, with no clean-up.
* Changes. Operator changes (`operator_queries`: a push, a revocation, a rotation) take the
  next number from the one-row `change_seq` (its row lock, held to commit, makes numbers
  visible in order), log one `changes` row per device, and ring the owning hubs' NOTIFY
  channels (`node_channel`) once per hub and statement with the payload `change:SEQ`. The doorbell
  only says "read the log": `CHANGES_SINCE` is the truth, read after every (re)connection of
  the hub's listener and after every doorbell. NOTIFY takes an instance-wide lock at commit,
  so nothing on the ingest path rings: only operator changes and takeovers
  (`takeover:EPOCH:DEVICE_ID` to the previous owner) do.
* Counters. `ADD_READINGS_STORED` adds each hub's deltas; no hub overwrites another's count.
"""

from __future__ import annotations

import hashlib

CHANNEL_PREFIX = "hub_node_"
CHANGE_PAYLOAD_PREFIX = "change:"
TAKEOVER_PAYLOAD_PREFIX = "takeover:"


def parse_takeover(payload: str) -> tuple[str, int] | None:
    """(device id, new epoch) of a `takeover:EPOCH:DEVICE_ID` payload; None for any other."""
    if not payload.startswith(TAKEOVER_PAYLOAD_PREFIX):
        return None
    epoch, sep, device_id = payload.removeprefix(TAKEOVER_PAYLOAD_PREFIX).partition(":")
    if not sep or not device_id or not epoch.isdigit():
        return None
    return device_id, int(epoch)


def node_channel(node_id: str) -> str:
    """The LISTEN/NOTIFY channel of a node; the same as SQL's `hub_node_channel(node_id)`.

    Node ids are free text and channel names identifiers of at most 63 bytes: the name is a
    hash of the id, which needs no quoting in `LISTEN` and cannot collide in practice.
    """
    digest = hashlib.sha256(node_id.encode("utf-8")).hexdigest()
    return CHANNEL_PREFIX + digest[:32]


# --- Nodes --------------------------------------------------------------------------------

REGISTER_NODE = """
WITH released AS (
    -- A node id registering again is a new process: the old one's sessions are gone.
    UPDATE connections SET owner_node = NULL, released_at = now() WHERE owner_node = $1
)
INSERT INTO nodes (node_id, incarnation, address, started_at, heartbeat_at, lease_expires_at,
                   live_connections)
VALUES ($1, gen_random_uuid(), $2, now(), now(), now() + make_interval(secs => $3::float8), 0)
ON CONFLICT (node_id) DO UPDATE SET
    incarnation = excluded.incarnation,
    address = excluded.address,
    started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at,
    lease_expires_at = excluded.lease_expires_at,
    live_connections = 0
RETURNING incarnation, started_at, lease_expires_at
"""
"""Register node $1 at address $2 with a lease of $3 s; returns its new incarnation.

Releases every connection the node id held before: a restarted hub holds none.
"""

HEARTBEAT = """
UPDATE nodes SET
    heartbeat_at = now(),
    lease_expires_at = now() + make_interval(secs => $3::float8),
    live_connections = $4
WHERE node_id = $1 AND incarnation = $2
RETURNING lease_expires_at
"""
"""Renew node $1 (incarnation $2) for $3 s, reporting $4 live connections.

No row: another process registered with this node id since; this one must stop serving.
"""

NODES = """
SELECT node_id, address, started_at, heartbeat_at, lease_expires_at, live_connections,
       lease_expires_at > now() AS live
FROM nodes
ORDER BY node_id
"""
"""Every node `hub nodes` shows, live or with its lease expired."""

DEVICE_HOLDERS = """
SELECT c.device_id, c.owner_node
FROM connections AS c JOIN nodes AS n ON n.node_id = c.owner_node
WHERE n.lease_expires_at > now()
ORDER BY c.device_id
"""
"""The node holding each device whose connection a live node holds (`hub devices`)."""

# --- Connection ownership -----------------------------------------------------------------

CLAIM_CONNECTION = """
WITH claimed AS (
    UPDATE connections AS c SET
        owner_node = $2,
        epoch = c.epoch + 1,
        remote_address = $3,
        connected_since = now(),
        last_seen = now(),
        released_at = NULL
    -- Locking the row first makes a competing claim wait and then see this one's result, so
    -- each claim returns the owner it really took the device from.
    FROM (SELECT device_id, owner_node, epoch FROM connections
          WHERE device_id = $1 FOR UPDATE) AS previous
    WHERE c.device_id = previous.device_id
      AND EXISTS (SELECT 1 FROM devices AS d WHERE d.device_id = $1 AND d.revoked_at IS NULL)
      AND EXISTS (SELECT 1 FROM nodes AS n WHERE n.node_id = $2 AND n.lease_expires_at > now())
    RETURNING c.device_id, c.epoch, previous.owner_node AS previous_owner,
              previous.epoch AS previous_epoch
),
rung AS (
    SELECT pg_notify(hub_node_channel(previous_owner), 'takeover:' || epoch || ':' || device_id)
    FROM claimed WHERE previous_owner IS NOT NULL AND previous_owner <> $2
)
SELECT epoch, previous_owner, previous_epoch, (SELECT count(*) FROM rung) AS notified
FROM claimed
"""
"""Node $2 takes device $1's connection from address $3; returns the new epoch.

Also returns the owner and epoch it took over (NULL owner: nobody held it) and rings the
previous owner's channel with `takeover:EPOCH:DEVICE_ID` (the new epoch: a session of the
device with an older one closes; a newer one, claimed there since, stays) when that is
another node. No row: the
device is unknown or revoked, or node $2's lease has expired (a frozen hub must not claim).
"""

RELEASE_CONNECTION = """
UPDATE connections SET owner_node = NULL, released_at = now(), last_seen = now()
WHERE device_id = $1 AND owner_node = $2 AND epoch = $3
RETURNING device_id
"""
"""Node $2 ends its session of epoch $3 with device $1; no row if it was taken over."""

RELEASE_CONNECTIONS = """
UPDATE connections AS c SET owner_node = NULL, released_at = now(), last_seen = now()
FROM unnest($2::text[], $3::bigint[]) AS s(device_id, epoch)
WHERE c.device_id = s.device_id AND c.epoch = s.epoch AND c.owner_node = $1
RETURNING c.device_id
"""
"""`RELEASE_CONNECTION` of many sessions of node $1 at once (device ids $2, epochs $3), as
the presence flush records the ends of sessions; returns those it released."""

TOUCH_CONNECTIONS = """
UPDATE connections AS c SET last_seen = now()
FROM unnest($2::text[], $3::bigint[]) AS s(device_id, epoch)
WHERE c.device_id = s.device_id AND c.epoch = s.epoch AND c.owner_node = $1
RETURNING c.device_id
"""
"""Presence flush of node $1: sessions (device ids $2, epochs $3) seen now.

Returns the devices it still owns; a session missing from the result was taken over.
"""

STALE_SESSIONS = """
SELECT device_id, epoch, reason, config_version
FROM (
    SELECT s.device_id, s.epoch, d.config_version,
           CASE WHEN d.device_id IS NULL OR d.revoked_at IS NOT NULL THEN 'revoked'
                WHEN c.owner_node IS DISTINCT FROM $1 OR c.epoch <> s.epoch THEN 'taken_over'
                WHEN d.token_hash <> s.token_hash AND NOT EXISTS (
                    SELECT 1 FROM retired_tokens AS r
                    WHERE r.token_hash = s.token_hash AND r.device_id = s.device_id
                      AND r.expires_at > now()
                ) THEN 'token_retired'
                WHEN d.config_version > s.config_version THEN 'config'
           END AS reason
    FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[])
         AS s(device_id, epoch, config_version, token_hash)
    LEFT JOIN devices AS d ON d.device_id = s.device_id
    LEFT JOIN connections AS c ON c.device_id = s.device_id
) AS checked
WHERE reason IS NOT NULL
ORDER BY device_id
"""
"""The safety net: which of node $1's sessions need acting on, and why.

Each session is given as its device ($2), epoch ($3), the config version it last sent ($4)
and the hash of the token it authenticated with ($5). `revoked`: close with 4001;
`taken_over`: close with 4000; `token_retired`: its token was rotated out and its grace is
over (or was ended by a rotation with no grace), close with 4001; `config`: send
`config_version`. The last covers a push that committed while its device moved: its doorbell
rang the old owner, which no longer holds the device, and the new owner had read the config
before the push. Run periodically, it bounds how long a lost doorbell can leave a revoked or
moved device connected or a device on an old config.
"""

DEVICE_PRESENCE = """
SELECT d.device_id,
       (c.owner_node IS NOT NULL AND n.lease_expires_at > now()) AS online,
       CASE WHEN n.lease_expires_at > now() THEN c.owner_node END AS hub,
       c.remote_address, c.connected_since, c.last_seen,
       coalesce(k.readings_stored, 0) AS readings_stored
FROM devices AS d
JOIN connections AS c ON c.device_id = d.device_id
LEFT JOIN nodes AS n ON n.node_id = c.owner_node
LEFT JOIN device_counters AS k ON k.device_id = d.device_id
ORDER BY d.device_id
"""
"""`hub devices`: each device online while a live node owns it, that node, and its counts."""

ADD_READINGS_STORED = """
INSERT INTO device_counters AS k (device_id, readings_stored)
SELECT s.device_id, sum(s.delta)::bigint
FROM unnest($1::text[], $2::bigint[]) AS s(device_id, delta)
JOIN devices AS d ON d.device_id = s.device_id
WHERE s.delta > 0
GROUP BY s.device_id
-- Rows in one order in every hub's flush: two flushes never wait on each other in a cycle.
ORDER BY s.device_id
ON CONFLICT (device_id) DO UPDATE SET readings_stored = k.readings_stored + excluded.readings_stored
"""
"""Add readings stored since the last flush: device ids $1, counts $2 (repeats are summed).

Deltas from every hub add up; unknown devices and non-positive deltas are skipped.
"""

# --- Credentials and configs --------------------------------------------------------------

CREDENTIAL = """
SELECT device_id, token_hash, NULL::timestamptz AS expires_at
FROM devices WHERE token_hash = $1 AND revoked_at IS NULL
UNION ALL
SELECT r.device_id, r.token_hash, r.expires_at
FROM retired_tokens AS r JOIN devices AS d ON d.device_id = r.device_id
WHERE r.token_hash = $1 AND r.expires_at > now() AND d.revoked_at IS NULL
LIMIT 1
"""
"""Whose token has hash $1 if it works now: current (expires_at NULL), or retired in its grace.

The caller compares the returned hash with `hmac.compare_digest` as the SQLite registry does.
"""

CONFIG_STATES = """
SELECT device_id, config, config_version, acked_version, ack_ok, ack_error, acked_at
FROM devices
WHERE device_id = ANY($1::text[])
ORDER BY device_id
"""
"""Desired config, version and last answer of devices $1 (unknown ids are left out)."""

RECORD_CONFIG_ACKS = """
UPDATE devices AS d SET
    acked_version = a.version,
    ack_ok = a.ok,
    ack_error = CASE WHEN a.ok THEN NULL ELSE coalesce(a.error, '') END,
    acked_at = now()
FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::boolean[], $6::text[])
     AS a(device_id, epoch, version, ok, error)
-- FOR SHARE, in one order: a claim of a device (FOR UPDATE) waits for this answer, or this
-- answer waits for the claim and then finds the epoch gone.
JOIN (SELECT device_id, epoch FROM connections
      WHERE device_id = ANY($2::text[]) AND owner_node = $1
      ORDER BY device_id FOR SHARE) AS c
  ON c.device_id = a.device_id AND c.epoch = a.epoch
WHERE d.device_id = a.device_id AND d.config_version = a.version
  AND (d.acked_version IS NULL OR d.acked_version < a.version)
RETURNING d.device_id
"""
"""Devices $2 answered versions $4 (ok $5, errors $6) on node $1's sessions of epochs $3,
one row per device (hub.registry.postgres.answers). The ids returned are the answers that
counted; none for a stale or repeated answer, or a session that no longer holds the device.
"""

# --- Change feed --------------------------------------------------------------------------

CHANGES_SINCE = """
SELECT s.value AS latest, o.seq, o.device_id, o.kind, o.config_version, o.epoch
FROM change_seq AS s
LEFT JOIN LATERAL (
    SELECT ch.seq, ch.device_id, ch.kind, ch.config_version, c.epoch
    FROM changes AS ch JOIN connections AS c ON c.device_id = ch.device_id
    WHERE c.owner_node = $1
      AND (ch.seq, ch.device_id) > ($2::bigint, $3::text)
      AND ch.seq <= s.value
    ORDER BY ch.seq, ch.device_id
    LIMIT $4
) AS o ON true
ORDER BY o.seq, o.device_id
"""
"""Changes to devices node $1 owns after position ($2 seq, $3 device id), at most $4 rows.

$3 NULL means after all of sequence $2 (row comparison stops at the first unequal pair, and a
NULL one matches nothing): start from (0, NULL). Every row carries `latest`, the newest
sequence committed in the same snapshot; with no change to report there is one row with
`latest` and NULLs. A full page: ask again from its last (seq, device_id). Otherwise the hub
is caught up to `latest` and asks from (`latest`, NULL) next time. The owner is the one
recorded when this reads: a claim committed after a change still gets that change to its
new owner (the claim's session reads its config and token after the claim).
"""


PRUNE_CHANGES = """
DELETE FROM changes WHERE created_at < now() - make_interval(secs => $1::float8)
"""
"""Forget changes older than $1 s; a hub behind that long checks every session instead."""


# --- Also used by the hub's ports (hub.registry.postgres.backend) --------------------------
# Presence rows of no claim (epoch 0: a session let in from memory during an outage, and
# tests) are recorded by device; claimed sessions use the epoch statements above.

CHANGE_SEQ = """
SELECT value FROM change_seq
"""
"""The newest change sequence number."""

DEVICES_AS_CHANGED = """
SELECT device_id, config_version, revoked_at IS NOT NULL AS revoked
FROM devices
WHERE device_id = ANY($1::text[])
ORDER BY device_id
"""
"""Devices $1 as the feed reports a change of them now: their config version, revoked or not.

For sessions this node serves without a claim, once its presence makes it their owner: a
change of theirs committed before that was left out of `CHANGES_SINCE`.
"""

CHANGED_BETWEEN = """
SELECT EXISTS (
    SELECT 1 FROM changes WHERE device_id = ANY($1::text[]) AND seq > $2 AND seq <= $3
)
"""
"""Whether any of devices $1 changed after sequence $2, up to $3."""

DEVICES_BY_ID = """
SELECT device_id, created_at, revoked_at, labels FROM devices
WHERE device_id = ANY($1::text[])
ORDER BY device_id
"""
"""The devices among ids $1 that are registered, revoked ones too."""

RECORD_DEVICE_CONFIG_ACK = """
UPDATE devices SET
    acked_version = $2,
    ack_ok = $3,
    ack_error = CASE WHEN $3 THEN NULL ELSE coalesce($4, '') END,
    acked_at = now()
WHERE device_id = $1 AND config_version = $2 AND (acked_version IS NULL OR acked_version < $2)
RETURNING device_id
"""
"""Device $1 answered version $2 (ok $3, error $4); no row for a stale or repeated answer.

`RECORD_CONFIG_ACKS` is the same answer from sessions that name their epochs.
"""

RECORD_PRESENCE = """
UPDATE connections AS c SET
    owner_node = CASE WHEN s.online THEN $1 END,
    remote_address = s.remote_address,
    connected_since = to_timestamp(s.connected_since),
    last_seen = to_timestamp(s.last_seen),
    released_at = CASE WHEN s.online THEN NULL ELSE now() END
FROM unnest($2::text[], $3::boolean[], $4::text[], $5::float8[], $6::float8[])
     AS s(device_id, online, remote_address, connected_since, last_seen)
WHERE c.device_id = s.device_id
  -- Going offline here must not release a device another node holds by now.
  AND (s.online OR c.owner_node IS NULL OR c.owner_node = $1)
"""
"""Presence flush of node $1: devices $2 online ($3) or not, from $4, since $5, seen $6 (Unix
seconds). Online makes node $1 the owner; offline releases only what node $1 owns.

Readings stored go with `ADD_READINGS_STORED`, as deltas, in the same transaction.
"""

RELEASE_NODE = """
UPDATE connections SET owner_node = NULL, released_at = now() WHERE owner_node = $1
"""
"""Node $1 holds no connection any more (a hub starting after one that died)."""
