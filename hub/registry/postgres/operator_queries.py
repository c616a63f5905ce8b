"""The operator's statements on PostgreSQL: what `hub token`, `config` and `device` change.

Each constant is an asyncpg statement (`$1`, `$2`... bound, never formatted in), one
statement per operation or per chunk of devices, run by hub.registry.postgres.operator. The
changes a hub must act on (`PUSH_CONFIG`, `REVOKE_DEVICE`, `ROTATE_TOKEN`) take the next
number from the one-row `change_seq` (its row lock, held to commit, makes numbers visible in
order), log one `changes` row per device and ring the owning nodes' channels
(`queries.node_channel`) with `change:SEQ`, once per node and statement. What the hubs read
and record is in `queries`.
"""

ADD_DEVICES = """
INSERT INTO devices (device_id, token_hash, labels)
SELECT device_id, token_hash, $3::jsonb
FROM unnest($1::text[], $2::text[]) AS s(device_id, token_hash)
RETURNING device_id
"""
"""Register devices $1 with token hashes $2 and labels $3; an existing id is a unique violation.

The trigger `devices_connection_row` gives each one its `connections` row.
"""

SET_LABELS = """
UPDATE devices SET labels = (labels || $2::jsonb) - $3::text[]
WHERE device_id = $1
RETURNING labels
"""
"""Set labels $2 (an object) and remove the names $3 on device $1; returns its labels after.

No row: the device is unknown.
"""

SELECT_BY_LABELS = """
SELECT device_id FROM devices
WHERE revoked_at IS NULL AND labels @> $1::jsonb
ORDER BY device_id
"""
"""Active devices carrying every label of $1 (`--label k=v`; '{}' selects them all).

Containment uses the GIN index `devices_labels`.
"""

PUSH_CONFIG = """
WITH seq AS (
    UPDATE change_seq SET value = value + 1 RETURNING value
),
locked AS (
    -- In id order, so two pushes to overlapping sets never deadlock.
    SELECT device_id FROM devices WHERE device_id = ANY($1::text[])
    ORDER BY device_id FOR UPDATE
),
pushed AS (
    UPDATE devices AS d SET
        config = coalesce($3::jsonb, d.config) || $2::jsonb,
        config_version = d.config_version + 1
    FROM locked WHERE d.device_id = locked.device_id
    RETURNING d.device_id, d.config_version
),
logged AS (
    INSERT INTO changes (seq, device_id, kind, config_version)
    SELECT seq.value, pushed.device_id, 'config', pushed.config_version FROM seq, pushed
    RETURNING seq, device_id
),
rung AS (
    SELECT pg_notify(hub_node_channel(c.owner_node), 'change:' || max(logged.seq))
    FROM logged JOIN connections AS c ON c.device_id = logged.device_id
    WHERE c.owner_node IS NOT NULL
    GROUP BY c.owner_node
)
SELECT pushed.device_id, pushed.config_version, seq.value AS seq,
       (SELECT count(*) FROM rung) AS notified_nodes
FROM pushed, seq
ORDER BY pushed.device_id
"""
"""New config version for devices $1: their config (or $3 when given) with $2 merged in.

Returns each device's new version and the change's sequence; one doorbell per owning node.
An id missing from the result is unknown: run it in a transaction and roll back then.
"""

REVOKE_DEVICE = """
WITH seq AS (
    UPDATE change_seq SET value = value + 1 RETURNING value
),
revoked AS (
    UPDATE devices SET revoked_at = now()
    WHERE device_id = $1 AND revoked_at IS NULL
    RETURNING device_id
),
logged AS (
    INSERT INTO changes (seq, device_id, kind)
    SELECT seq.value, revoked.device_id, 'revoke' FROM seq, revoked
    RETURNING seq, device_id
),
rung AS (
    SELECT pg_notify(hub_node_channel(c.owner_node), 'change:' || logged.seq)
    FROM logged JOIN connections AS c ON c.device_id = logged.device_id
    WHERE c.owner_node IS NOT NULL
)
SELECT logged.seq, (SELECT count(*) FROM rung) AS notified_nodes FROM logged
"""
"""Revoke device $1 and ring its owner; no row if it is unknown or already revoked."""

ROTATE_TOKEN = """
WITH current AS (
    SELECT device_id, token_hash FROM devices
    WHERE device_id = $1 AND revoked_at IS NULL FOR UPDATE
),
seq AS (
    UPDATE change_seq SET value = value + 1 RETURNING value
),
ended AS (
    -- Expired grace periods go; a rotation with no grace ends the device's others too.
    DELETE FROM retired_tokens
    WHERE expires_at <= now() OR (device_id = $1 AND $3::float8 = 0)
),
retired AS (
    INSERT INTO retired_tokens (token_hash, device_id, expires_at)
    SELECT token_hash, device_id, now() + make_interval(secs => $3::float8)
    FROM current WHERE $3::float8 > 0
),
rotated AS (
    UPDATE devices AS d SET token_hash = $2
    FROM current WHERE d.device_id = current.device_id
    RETURNING d.device_id
),
logged AS (
    INSERT INTO changes (seq, device_id, kind)
    SELECT seq.value, rotated.device_id, 'rotate' FROM seq, rotated
    RETURNING seq, device_id
),
rung AS (
    SELECT pg_notify(hub_node_channel(c.owner_node), 'change:' || logged.seq)
    FROM logged JOIN connections AS c ON c.device_id = logged.device_id
    WHERE c.owner_node IS NOT NULL
)
SELECT logged.seq, (SELECT count(*) FROM rung) AS notified_nodes FROM logged
"""  # noqa: S105 (a statement, not a password)
"""Give device $1 the token hash $2; the old one keeps working for $3 s.

$3 = 0 ends every grace period of the device at once, as the SQLite registry does: the hub
holding it then closes a session that used a retired token with 4001 (`STALE_SESSIONS`
says `token_retired`), so the owner is rung. No row: the device is unknown or revoked.
"""

DEVICES = """
SELECT device_id, created_at, revoked_at, labels FROM devices ORDER BY device_id
"""
"""Every registered device (`hub token list`, `hub devices`)."""

LOCK_CHANGE_SEQ = """
SELECT value FROM change_seq FOR UPDATE
"""
"""Taken first by a push that reads configs before changing them, so that it and another
push queue on the change sequence rather than hold each other's devices."""

CONFIGS_FOR_UPDATE = """
SELECT device_id, config FROM devices
WHERE device_id = ANY($1::text[])
ORDER BY device_id
FOR UPDATE
"""
"""The configs of devices $1, locked (in id order) until the push that merges into them."""
