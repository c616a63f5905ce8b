"""The registry's named PostgreSQL statements: operator changes, credentials, the change feed."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from device_sim.servers.postgres import PostgresDatabase
from hub.registry.postgres import operator_queries as oq
from hub.registry.postgres import queries as q
from hub.registry.postgres.migrations import migrate
from hub.registry.sqlite import hash_token

pytestmark = pytest.mark.integration

LEASE_S = 30.0
WAIT_S = 20.0
PUSHERS = 6


@pytest.fixture
async def db(pg: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """A migrated registry with devices d1..d4 and two live hubs: a holds d1, d2; b holds d3."""
    await migrate(pg)
    devices = ["d1", "d2", "d3", "d4"]
    hashes = [hash_token(f"token-{d}") for d in devices]
    await pg.execute(oq.ADD_DEVICES, devices, hashes, '{"site": "north"}')
    for node in ("hub-a", "hub-b"):
        await pg.fetchrow(q.REGISTER_NODE, node, f"{node}:8765", LEASE_S)
    for device, node in (("d1", "hub-a"), ("d2", "hub-a"), ("d3", "hub-b")):
        assert await pg.fetchrow(q.CLAIM_CONNECTION, device, node, "192.0.2.1:1") is not None
    yield pg


async def changes_since(
    conn: asyncpg.Connection, node: str, seq: int, device: str | None = None, limit: int = 1000
) -> tuple[int, list[tuple[Any, ...]]]:
    """(latest, [(seq, device, kind, config_version, epoch)...]) for `node` after a position."""
    rows = await conn.fetch(q.CHANGES_SINCE, node, seq, device, limit)
    latest = rows[0]["latest"]
    assert all(row["latest"] == latest for row in rows)
    found = [
        (r["seq"], r["device_id"], r["kind"], r["config_version"], r["epoch"])
        for r in rows
        if r["seq"] is not None
    ]
    return latest, found


async def test_a_push_merges_or_replaces_and_versions_only_grow(db: asyncpg.Connection) -> None:
    """`updates` merge into the config, `replace` swaps it whole; each push adds one version."""
    first = await db.fetch(oq.PUSH_CONFIG, ["d1", "d4"], '{"interval_s": 5, "unit": "C"}', None)
    assert [(r["device_id"], r["config_version"]) for r in first] == [("d1", 1), ("d4", 1)]
    assert len({r["seq"] for r in first}) == 1
    await db.fetch(oq.PUSH_CONFIG, ["d1"], '{"interval_s": 9}', None)
    merged = await db.fetchval("SELECT config FROM devices WHERE device_id = 'd1'")
    assert merged == '{"unit": "C", "interval_s": 9}'
    replaced = await db.fetch(oq.PUSH_CONFIG, ["d1"], '{"x": 1}', '{"unit": "K"}')
    assert replaced[0]["config_version"] == 3
    assert await db.fetchval("SELECT config FROM devices WHERE device_id = 'd1'") == (
        '{"x": 1, "unit": "K"}'
    )
    unknown = await db.fetch(oq.PUSH_CONFIG, ["ghost"], '{"x": 1}', None)
    assert unknown == []


async def test_a_config_over_the_size_limit_is_refused_by_the_schema(
    db: asyncpg.Connection,
) -> None:
    """The schema's backstop stops a config above 1 MiB of JSON even if a caller forgot to."""
    big = '{"blob": "' + "x" * 1_100_000 + '"}'
    with pytest.raises(asyncpg.CheckViolationError):
        await db.fetch(oq.PUSH_CONFIG, ["d1"], big, None)
    assert await db.fetchval("SELECT config_version FROM devices WHERE device_id = 'd1'") == 0


async def test_each_hub_reads_only_changes_to_devices_it_holds(db: asyncpg.Connection) -> None:
    """CHANGES_SINCE gives a hub its own devices' changes, in order, up to `latest`."""
    start, nothing = await changes_since(db, "hub-a", 0)
    assert nothing == []
    pushed = await db.fetch(oq.PUSH_CONFIG, ["d1", "d3", "d4"], '{"interval_s": 5}', None)
    seq = pushed[0]["seq"]
    revoked = await db.fetchrow(oq.REVOKE_DEVICE, "d2")
    latest, for_a = await changes_since(db, "hub-a", start)
    assert latest == revoked["seq"] > seq > start
    epochs = dict(await db.fetch("SELECT device_id, epoch FROM connections"))
    assert for_a == [
        (seq, "d1", "config", 1, epochs["d1"]),
        (revoked["seq"], "d2", "revoke", None, epochs["d2"]),
    ]
    _, for_b = await changes_since(db, "hub-b", start)
    assert for_b == [(seq, "d3", "config", 1, epochs["d3"])]
    caught_up, none_left = await changes_since(db, "hub-a", latest)
    assert (caught_up, none_left) == (latest, [])


async def test_paging_by_sequence_and_device_misses_nothing(db: asyncpg.Connection) -> None:
    """A push to many devices shares one sequence; pages of one row walk it completely."""
    await db.fetch(oq.PUSH_CONFIG, ["d1", "d2"], '{"a": 1}', None)
    await db.fetch(oq.PUSH_CONFIG, ["d2"], '{"a": 2}', None)
    seen: list[tuple[Any, ...]] = []
    position: tuple[int, str | None] = (0, None)
    while True:
        latest, page = await changes_since(db, "hub-a", *position, limit=1)
        if not page:
            break
        seen.extend(page)
        position = (page[-1][0], page[-1][1])
    assert [(s[1], s[3]) for s in seen] == [("d1", 1), ("d2", 1), ("d2", 2)]
    assert seen[0][0] == seen[1][0] < seen[2][0] == latest


async def test_pushes_ring_each_owning_hub_once(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """One doorbell `change:SEQ` per owning hub and push, none for offline devices."""
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await postgres_db.connect()
    try:
        for node in ("hub-a", "hub-b"):
            await listener.add_listener(
                q.node_channel(node), lambda _c, _p, ch, payload: heard.put_nowait((ch, payload))
            )
        rows = await db.fetch(oq.PUSH_CONFIG, ["d1", "d2", "d3", "d4"], '{"a": 1}', None)
        assert rows[0]["notified_nodes"] == 2
        got = {await asyncio.wait_for(heard.get(), WAIT_S) for _ in range(2)}
        payload = q.CHANGE_PAYLOAD_PREFIX + str(rows[0]["seq"])
        assert got == {(q.node_channel("hub-a"), payload), (q.node_channel("hub-b"), payload)}
        offline = await db.fetch(oq.PUSH_CONFIG, ["d4"], '{"a": 2}', None)
        assert offline[0]["notified_nodes"] == 0
        await listener.execute("SELECT 1")  # a queued notification would arrive with this
        assert heard.empty()
    finally:
        await listener.close()


async def test_a_revocation_rings_the_owner_and_the_safety_net_finds_it(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """Revoking rings the owning hub; STALE_SESSIONS names it `revoked` even without the bell."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await postgres_db.connect()
    try:
        await listener.add_listener(
            q.node_channel("hub-b"), lambda _c, _p, _ch, payload: heard.put_nowait(payload)
        )
        row = await db.fetchrow(oq.REVOKE_DEVICE, "d3")
        assert row["notified_nodes"] == 1
        assert await asyncio.wait_for(heard.get(), WAIT_S) == q.CHANGE_PAYLOAD_PREFIX + str(
            row["seq"]
        )
    finally:
        await listener.close()
    assert await db.fetchrow(oq.REVOKE_DEVICE, "d3") is None  # already revoked
    assert await db.fetchrow(oq.REVOKE_DEVICE, "ghost") is None
    epoch = await db.fetchval("SELECT epoch FROM connections WHERE device_id = 'd3'")
    tokens = [hash_token("token-d3"), hash_token("token-ghost")]
    stale = await db.fetch(q.STALE_SESSIONS, "hub-b", ["d3", "ghost"], [epoch, 1], [0, 0], tokens)
    assert [(r["device_id"], r["reason"]) for r in stale] == [
        ("d3", "revoked"),
        ("ghost", "revoked"),
    ]


async def test_the_safety_net_finds_a_push_whose_doorbell_rang_the_old_owner(
    db: asyncpg.Connection,
) -> None:
    """A session behind on its config is listed `config` with the version to send."""
    epochs = dict(await db.fetch("SELECT device_id, epoch FROM connections"))
    tokens = [hash_token("token-d1"), hash_token("token-d2")]
    sessions = (["d1", "d2"], [epochs["d1"], epochs["d2"]], [0, 0], tokens)
    assert await db.fetch(q.STALE_SESSIONS, "hub-a", *sessions) == []
    await db.fetch(oq.PUSH_CONFIG, ["d2"], '{"a": 1}', None)
    behind = await db.fetch(q.STALE_SESSIONS, "hub-a", *sessions)
    assert [(r["device_id"], r["reason"], r["config_version"]) for r in behind] == [
        ("d2", "config", 1)
    ]
    assert await db.fetch(q.STALE_SESSIONS, "hub-a", ["d2"], [epochs["d2"]], [1], tokens[1:]) == []


async def test_concurrent_pushes_get_distinct_sequences_in_commit_order(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """Racing pushes to the same devices each get their own sequence; versions follow them."""
    conns = [await postgres_db.connect() for _ in range(PUSHERS)]
    try:
        results = await asyncio.gather(
            *(
                c.fetch(oq.PUSH_CONFIG, ["d2", "d1"], f'{{"n": {i}}}', None)
                for i, c in enumerate(conns)
            )
        )
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    seqs = sorted(rows[0]["seq"] for rows in results)
    assert len(set(seqs)) == PUSHERS
    versions = sorted((rows[0]["seq"], rows[0]["config_version"]) for rows in results)
    assert [v for _, v in versions] == list(range(1, PUSHERS + 1))
    _, changes = await changes_since(db, "hub-a", 0)
    assert len(changes) == 2 * PUSHERS


async def test_a_rotated_token_works_through_its_grace_and_not_after(
    db: asyncpg.Connection,
) -> None:
    """After rotation the new hash works, the old one until its expiry; revoking ends both."""
    old, new, newer, newest = (
        hash_token(t) for t in ("token-d1", "rotated-1", "rotated-2", "rotated-3")
    )
    assert await db.fetchrow(oq.ROTATE_TOKEN, "d1", new, 3600.0) is not None
    current = await db.fetchrow(q.CREDENTIAL, new)
    assert current["device_id"] == "d1" and current["expires_at"] is None
    assert hmac.compare_digest(current["token_hash"], new)
    retired = await db.fetchrow(q.CREDENTIAL, old)
    assert retired["device_id"] == "d1" and retired["expires_at"] is not None
    # A second rotation with a grace: each retired token keeps its own expiry.
    assert await db.fetchrow(oq.ROTATE_TOKEN, "d1", newer, 60.0) is not None
    expiries = {r: (await db.fetchrow(q.CREDENTIAL, r))["expires_at"] for r in (old, new)}
    assert expiries[old] == retired["expires_at"] > expiries[new]
    await db.execute(
        "UPDATE retired_tokens SET expires_at = now() - interval '1 s' WHERE token_hash = $1",
        new,
    )
    assert await db.fetchrow(q.CREDENTIAL, new) is None
    assert await db.fetchrow(q.CREDENTIAL, old) is not None
    # No grace: every retired token of the device stops working at once.
    assert await db.fetchrow(oq.ROTATE_TOKEN, "d1", newest, 0.0) is not None
    assert await db.fetchrow(q.CREDENTIAL, old) is None
    assert await db.fetchrow(q.CREDENTIAL, newer) is None
    assert await db.fetchval("SELECT count(*) FROM retired_tokens") == 0
    _, log = await changes_since(db, "hub-a", 0)
    assert [(c[1], c[2]) for c in log] == [("d1", "rotate")] * 3
    await db.fetchrow(oq.REVOKE_DEVICE, "d1")
    assert await db.fetchrow(q.CREDENTIAL, newest) is None
    assert await db.fetchrow(oq.ROTATE_TOKEN, "d1", new, 10.0) is None  # revoked: refused


async def test_a_session_on_a_token_past_its_grace_is_found_and_its_hub_rung(
    postgres_db: PostgresDatabase, db: asyncpg.Connection
) -> None:
    """A rotation rings the owner; the safety net lists sessions whose token no longer works."""
    epoch = await db.fetchval("SELECT epoch FROM connections WHERE device_id = 'd1'")
    old, new = hash_token("token-d1"), hash_token("rotated-1")

    async def check(token_hash: str) -> list[str]:
        rows = await db.fetch(q.STALE_SESSIONS, "hub-a", ["d1"], [epoch], [0], [token_hash])
        return [row["reason"] for row in rows]

    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await postgres_db.connect()
    try:
        await listener.add_listener(
            q.node_channel("hub-a"), lambda _c, _p, _ch, payload: heard.put_nowait(payload)
        )
        graced = await db.fetchrow(oq.ROTATE_TOKEN, "d1", new, 3600.0)
        assert graced["notified_nodes"] == 1
        assert await asyncio.wait_for(heard.get(), WAIT_S) == q.CHANGE_PAYLOAD_PREFIX + str(
            graced["seq"]
        )
    finally:
        await listener.close()
    assert await check(old) == []  # in its grace
    assert await check(new) == []
    await db.fetchrow(oq.ROTATE_TOKEN, "d1", hash_token("rotated-2"), 0.0)
    assert await check(old) == ["token_retired"]
    assert await check(new) == ["token_retired"]


async def test_a_duplicate_device_is_a_unique_violation(db: asyncpg.Connection) -> None:
    """Registering an existing id fails whole; the schema refuses malformed ids and hashes."""
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(oq.ADD_DEVICES, ["d5", "d1"], [hash_token("x"), hash_token("y")], "{}")
    assert await db.fetchval("SELECT count(*) FROM devices WHERE device_id = 'd5'") == 0
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(oq.ADD_DEVICES, ["bad id"], [hash_token("z")], "{}")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(oq.ADD_DEVICES, ["d6"], ["not-a-hash"], "{}")


async def test_pruning_forgets_only_old_changes(db: asyncpg.Connection) -> None:
    """PRUNE_CHANGES deletes changes older than its bound and keeps the recent ones."""
    await db.fetch(oq.PUSH_CONFIG, ["d1"], '{"a": 1}', None)
    await db.execute("UPDATE changes SET created_at = now() - interval '2 hours'")
    await db.fetch(oq.PUSH_CONFIG, ["d2"], '{"a": 1}', None)
    assert await db.execute(q.PRUNE_CHANGES, 3600.0) == "DELETE 1"
    _, left = await changes_since(db, "hub-a", 0)
    assert [c[1] for c in left] == ["d2"]


async def test_labels_are_set_removed_and_select_active_devices(db: asyncpg.Connection) -> None:
    """SET_LABELS merges and removes; SELECT_BY_LABELS finds active devices with all labels."""
    labels = await db.fetchval(oq.SET_LABELS, "d1", '{"room": "lab", "floor": "2"}', ["site"])
    assert labels == '{"room": "lab", "floor": "2"}'
    await db.fetchval(oq.SET_LABELS, "d2", '{"room": "lab"}', [])
    assert await db.fetchval(oq.SET_LABELS, "ghost", "{}", []) is None
    await db.fetchrow(oq.REVOKE_DEVICE, "d3")

    async def selected(wanted: str) -> list[str]:
        return [row["device_id"] for row in await db.fetch(oq.SELECT_BY_LABELS, wanted)]

    assert await selected('{"room": "lab"}') == ["d1", "d2"]
    assert await selected('{"room": "lab", "floor": "2"}') == ["d1"]
    assert await selected('{"site": "north"}') == ["d2", "d4"]  # d1 lost it, d3 is revoked
    assert await selected("{}") == ["d1", "d2", "d4"]


async def test_config_states_report_the_desired_version_and_the_last_answer(
    db: asyncpg.Connection,
) -> None:
    """CONFIG_STATES gives config, version and answer per device, unknown ids left out."""
    await db.fetch(oq.PUSH_CONFIG, ["d1", "d2"], '{"a": 1}', None)
    epoch = await db.fetchval("SELECT epoch FROM connections WHERE device_id = 'd1'")
    recorded = await db.fetch(q.RECORD_CONFIG_ACKS, "hub-a", ["d1"], [epoch], [1], [False], [None])
    assert [row["device_id"] for row in recorded] == ["d1"]
    rows = await db.fetch(q.CONFIG_STATES, ["d2", "ghost", "d1"])
    states = [
        (
            r["device_id"],
            r["config"],
            r["config_version"],
            r["acked_version"],
            r["ack_ok"],
            r["ack_error"],
        )
        for r in rows
    ]
    assert states == [
        ("d1", '{"a": 1}', 1, 1, False, ""),
        ("d2", '{"a": 1}', 1, None, None, None),
    ]
    assert rows[0]["acked_at"] is not None
