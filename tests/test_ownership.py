"""The hub's side of one live connection per device (hub.gateway.ownership), as pure code:
which session the table keeps, which one a takeover closes, and what the safety net does
for each reason. Sessions and the registry are small fakes recording what was asked; the
real ones are in tests/test_postgres_takeover.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import pytest
from websockets.asyncio.server import ServerConnection

from hub.gateway.ownership import ClaimedConfigs, ClaimStore, Ownership, SessionTable
from hub.gateway.session import DeviceSession
from hub.registry.records import (
    Claim,
    ConfigState,
    HeldSession,
    StaleReason,
    StaleSession,
)
from schemas.codes import CloseCode

pytestmark = pytest.mark.unit

WAIT_S = 5.0


class FakeConnection:
    """Records the close it was asked for."""

    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class FakeSession:
    """What the table and the net use of a `DeviceSession`, recording what they ask."""

    def __init__(self, device_id: str, config_sent: int = 0) -> None:
        self.device_id = device_id
        self.token_hash = "h-" + device_id
        self.config_sent = config_sent
        self.connection = FakeConnection()
        self.asked: list[str] = []

    async def revoke(self, reason: str = "token revoked") -> None:
        self.asked.append(f"revoke: {reason}")

    async def push_config(self) -> None:
        self.asked.append("push_config")


class FakeStore:
    """A registry answering the safety net with `stale`, and a config version of 7."""

    def __init__(self, stale: list[StaleSession] | None = None) -> None:
        self.stale = stale or []
        self.checked: list[list[HeldSession]] = []
        self.released: list[tuple[str, int]] = []
        self.listener: Callable[[str, int], None] | None = None
        self.missed: Callable[[], None] | None = None

    async def config_state(self, device_id: str) -> ConfigState:
        return ConfigState(device_id, {"x": 1}, 7, 7, True, None, 1.0)

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        return True

    async def claim(self, device_id: str, remote_address: str) -> Claim | None:
        return Claim(1)

    async def record_claimed_config_ack(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        return True

    async def release(self, device_id: str, epoch: int) -> None:
        self.released.append((device_id, epoch))

    def watch_takeovers(
        self, listener: Callable[[str, int], None], missed: Callable[[], None]
    ) -> None:
        self.listener = listener
        self.missed = missed

    async def stale_sessions(self, sessions: Sequence[HeldSession]) -> list[StaleSession]:
        self.checked.append(list(sessions))
        return self.stale


class Disconnects:
    """The presence tracker's `disconnected`, recorded."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def disconnected(self, device_id: str, reason: str) -> None:
        self.seen.append((device_id, reason))


class Spawned:
    """The hub's `spawn`: keeps the coroutines' tasks so a test can wait for them."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def __call__(self, work: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.ensure_future(work))

    async def settle(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), WAIT_S)


def session(device_id: str, config_sent: int = 0) -> FakeSession:
    return FakeSession(device_id, config_sent)


def real(fake: FakeSession) -> DeviceSession:
    return cast(DeviceSession, fake)


def configs(epoch: int) -> ClaimedConfigs:
    return ClaimedConfigs(cast(ClaimStore, FakeStore()), epoch)


def test_a_newer_claim_replaces_the_held_session() -> None:
    """The session of the newer epoch is held; the one it replaced is returned to close."""
    table = SessionTable()
    old, new = session("d"), session("d")
    assert table.take(real(old), configs(1)) is None
    assert table.take(real(new), configs(2)) is real(old)
    assert table["d"] is real(new) and list(table) == ["d"]


def test_an_older_claim_whose_upgrade_finished_late_is_the_one_closed() -> None:
    """A session of an older epoch arriving after a newer one is returned itself."""
    table = SessionTable()
    newer, older = session("d"), session("d")
    table.take(real(newer), configs(5))
    assert table.take(real(older), configs(4)) is real(older)
    assert table["d"] is real(newer)


def test_without_claims_the_later_session_wins() -> None:
    """Epoch 0 (SQLite): each new session replaces the held one, as always."""
    table = SessionTable()
    first, second = session("d"), session("d")
    table.take(real(first), configs(0))
    assert table.take(real(second), configs(0)) is real(first)
    assert table.claimed() == []  # nothing for the safety net to ask


def test_a_takeover_closes_only_an_older_session() -> None:
    """A takeover with epoch 3 forgets a session of epoch 2, not one of 3 or 4."""
    table = SessionTable()
    held = session("d")
    table.take(real(held), configs(3))
    assert table.taken_over("d", 3) is None
    assert table.taken_over("other", 9) is None
    assert table.taken_over("d", 4) is real(held)
    assert "d" not in table


def test_a_replaced_session_ending_does_not_drop_its_successor() -> None:
    """Only the held session's end forgets its device."""
    table = SessionTable()
    old, new = session("d"), session("d")
    table.take(real(old), configs(1))
    table.take(real(new), configs(2))
    assert not table.drop(real(old))
    assert table.drop(real(new)) and len(table) == 0


async def test_the_safety_net_is_given_the_newest_config_version_each_session_knows() -> None:
    """A session's version is the larger of what it sent and what it found answered."""
    table = SessionTable()
    found = configs(2)
    await found.config_state("a")  # the store says version 7, answered already
    table.take(real(session("a", config_sent=0)), found)
    table.take(real(session("b", config_sent=3)), configs(1))
    assert table.claimed() == [HeldSession("a", 2, 7, "h-a"), HeldSession("b", 1, 3, "h-b")]


async def test_a_takeover_heard_closes_the_old_session_with_4000_and_says_so() -> None:
    """The doorbell's takeover closes the held session of an older epoch with 4000 and
    tells presence; one of the same epoch stays."""
    store, presence, spawn = FakeStore(), Disconnects(), Spawned()
    ownership = Ownership(cast(ClaimStore, store), presence, spawn)
    held = session("d")
    assert ownership.hold(real(held), ownership.configs(1))
    assert store.listener is not None
    store.listener("d", 1)
    assert held.connection.closed is None
    store.listener("d", 2)
    await spawn.settle()
    assert held.connection.closed == (CloseCode.REPLACED, "replaced by a newer connection")
    assert presence.seen == [("d", "4000 taken over by another hub")]
    assert ownership.release(real(held)) is False  # its end changes nothing more


async def test_the_safety_net_acts_on_every_reason() -> None:
    """Taken over: 4000; revoked and token retired: revoke (4001) with the reason;
    config: a push; a session replaced meanwhile (another epoch): nothing."""
    stale = [
        StaleSession("moved", 1, StaleReason.TAKEN_OVER, 0),
        StaleSession("revoked", 1, StaleReason.REVOKED, 0),
        StaleSession("rotated", 1, StaleReason.TOKEN_RETIRED, 0),
        StaleSession("behind", 1, StaleReason.CONFIG, 4),
        StaleSession("gone", 9, StaleReason.REVOKED, 0),
    ]
    store, presence, spawn = FakeStore(stale), Disconnects(), Spawned()
    ownership = Ownership(cast(ClaimStore, store), presence, spawn, safety_net_s=0.01)
    sessions = {name: session(name) for name in ("moved", "revoked", "rotated", "behind", "gone")}
    for fake in sessions.values():
        ownership.hold(real(fake), ownership.configs(1))
    net = asyncio.create_task(ownership.run())
    try:
        async with asyncio.timeout(WAIT_S):
            while not store.checked:
                await asyncio.sleep(0.01)
    finally:
        net.cancel()
    await spawn.settle()
    assert sessions["moved"].connection.closed == (
        CloseCode.REPLACED,
        "replaced by a newer connection",
    )
    assert "moved" not in ownership.sessions
    assert sessions["revoked"].asked == ["revoke: token revoked"]
    assert sessions["rotated"].asked == ["revoke: token rotated out"]
    assert sessions["behind"].asked == ["push_config"]
    assert sessions["gone"].asked == [] and sessions["gone"].connection.closed is None


async def test_the_safety_net_checks_at_once_when_takeovers_may_have_been_missed() -> None:
    """The listener reconnected (`missed`): the net checks now, not a period later."""
    store, spawn = FakeStore(), Spawned()
    ownership = Ownership(cast(ClaimStore, store), Disconnects(), spawn, safety_net_s=3600)
    ownership.hold(real(session("d")), ownership.configs(1))
    net = asyncio.create_task(ownership.run())
    try:
        await asyncio.sleep(0.05)
        assert store.checked == []  # an hour to go
        assert store.missed is not None
        store.missed()
        async with asyncio.timeout(WAIT_S):
            while not store.checked:
                await asyncio.sleep(0.01)
        assert store.checked == [[HeldSession("d", 1, 0, "h-d")]]
    finally:
        net.cancel()


class LosableConnection:
    """What a claim watches of a connection: when it is lost."""

    def __init__(self) -> None:
        self.connection_lost_waiter: asyncio.Future[None] = (
            asyncio.get_running_loop().create_future()
        )

    def lose(self) -> None:
        self.connection_lost_waiter.set_result(None)


async def test_a_claim_whose_connection_is_lost_before_its_session_is_released() -> None:
    """Claimed, then lost before the upgrade became a session: released at once, by its
    epoch; a connection whose session started is left to the session's end."""
    store, spawn = FakeStore(), Spawned()
    ownership = Ownership(cast(ClaimStore, store), Disconnects(), spawn)
    lost, served = LosableConnection(), LosableConnection()
    assert await ownership.claim(cast(ServerConnection, lost), "a", "192.0.2.1:1") == Claim(1)
    await ownership.claim(cast(ServerConnection, served), "b", "192.0.2.1:2")
    ownership.started(cast(ServerConnection, served))
    lost.lose()
    served.lose()
    await asyncio.sleep(0)  # the futures' callbacks run at the next turn of the loop
    await spawn.settle()
    assert store.released == [("a", 1)]


async def test_a_ring_that_beats_its_session_into_the_table_closes_it_as_it_starts() -> None:
    """Claimed here (epoch 1), then claimed elsewhere (2) and rung while the upgrade was still
    being answered: the session is closed with 4000 as it starts, and counted as lost; a
    ring for a newer claim made here (none unstarted older) is remembered for nobody."""
    store, spawn = FakeStore(), Spawned()
    lost: list[str] = []
    ownership = Ownership(
        cast(ClaimStore, store), Disconnects(), spawn, lost=lambda: lost.append("lost")
    )
    early = LosableConnection()
    assert await ownership.claim(cast(ServerConnection, early), "d", "192.0.2.1:1") == Claim(1)
    assert store.listener is not None
    store.listener("d", 2)  # before the session exists
    store.listener("other", 5)  # nothing of it here
    ownership.started(cast(ServerConnection, early))
    late = session("d")
    assert ownership.hold(real(late), ownership.configs(1)) is False
    await spawn.settle()
    assert late.connection.closed == (CloseCode.REPLACED, "replaced by a newer connection")
    assert lost == ["lost"] and "d" not in ownership.sessions
    again = session("d")  # the device's next connection, claimed anew, is held
    assert ownership.hold(real(again), ownership.configs(3))
    assert ownership._overtaken == {}
