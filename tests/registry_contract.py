"""What every registry backend must do behind the hub's ports (hub.registry.ports).

`RegistryContract` holds the tests; tests/test_registry_contract.py runs them once per
backend through its `backend` fixture (today SQLite; PostgreSQL joins by adding a param
there). A backend under test is its `HubRegistry` (the ports, as the hub uses them) plus its
`OperatorRegistry`: the commands the CLI runs, on a connection of their own, to arrange the
state the ports must then report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from hub.errors import UnknownDevice
from hub.registry.operator import OperatorRegistry
from hub.registry.ports import HubRegistry
from hub.registry.records import HeldSession, Presence, StaleReason, hash_token

WAIT_S = 5.0
"""Bound for what should happen at once: a hang fails the test, a loaded machine does not."""
POLL_S = 0.01


@dataclass
class Backend:
    """A backend under test: the hub's ports, an operator, how to open the ports again (a
    restarted hub), and how to open those of another hub sharing the registry, as node
    `node_id` (a peer: its doorbell listening; closed by the test)."""

    ports: HubRegistry
    operator: OperatorRegistry
    reopen: Callable[[], Awaitable[HubRegistry]]
    open_peer: Callable[[str], Awaitable[HubRegistry]]


async def eventually(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until `probe()` is true; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {WAIT_S} s")
        await asyncio.sleep(POLL_S)


def _presence(device_id: str, online: bool, stored: int, seen: float = 100.0) -> Presence:
    return Presence(device_id, online, "10.0.0.1:4000", 50.0, seen, stored)


def _session(device_id: str, online: bool, stored: int, epoch: int) -> Presence:
    """A presence row of the session of claim `epoch`, as a hub's flush sends it."""
    now = time.time()
    return Presence(device_id, online, "10.0.0.1:4000", now, now, stored, epoch)


@asynccontextmanager
async def _peers(backend: Backend, *node_ids: str) -> AsyncIterator[list[HubRegistry]]:
    """Hubs sharing the backend's registry as these nodes, closed at the end."""
    opened: list[HubRegistry] = []
    try:
        for node_id in node_ids:
            opened.append(await backend.open_peer(node_id))
        yield opened
    finally:
        for peer in opened:
            await peer.close()


def _takeovers(hub: HubRegistry) -> asyncio.Queue[tuple[str, int]]:
    """What `hub` hears of takeovers of its devices, from now on."""
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    hub.watch_takeovers(lambda device_id, epoch: heard.put_nowait((device_id, epoch)), lambda: None)
    return heard


class RegistryContract:
    """Every port method's behaviour; each test gets a fresh, empty backend."""

    # --- Credentials ---------------------------------------------------------------------

    async def test_a_current_token_names_its_device(self, backend: Backend) -> None:
        """A device's token hash gives its credential, with no expiry; another gives None."""
        token_a, token_b = await backend.operator.add_many(["a", "b"])
        found = await backend.ports.credential(hash_token(token_a))
        assert found is not None
        assert (found.device_id, found.token_hash, found.expires_at) == (
            "a",
            hash_token(token_a),
            None,
        )
        other = await backend.ports.credential(hash_token(token_b))
        assert other is not None and other.device_id == "b"
        assert await backend.ports.credential(hash_token(token_a + "x")) is None
        assert await backend.ports.credential("") is None

    async def test_a_revoked_device_no_longer_authenticates(self, backend: Backend) -> None:
        """Revocation ends the token at once; the device stays known, inactive."""
        (token,) = await backend.operator.add_many(["a"])
        await backend.operator.revoke("a")
        assert await backend.ports.credential(hash_token(token)) is None
        device = await backend.ports.device("a")
        assert device is not None and not device.active

    async def test_devices_by_id(self, backend: Backend) -> None:
        """`device` finds registered devices with their labels, and None for others."""
        await backend.operator.add_many(["a"], {"site": "north"})
        device = await backend.ports.device("a")
        assert device is not None
        assert (device.device_id, device.active, device.labels) == ("a", True, {"site": "north"})
        assert await backend.ports.device("ghost") is None

    async def test_a_rotated_out_token_works_during_its_grace(self, backend: Backend) -> None:
        """After a rotation both tokens work; the old one says until when."""
        (old,) = await backend.operator.add_many(["a"])
        before = time.time()
        new = await backend.operator.rotate("a", grace_s=60)
        current = await backend.ports.credential(hash_token(new))
        retired = await backend.ports.credential(hash_token(old))
        assert current is not None and (current.device_id, current.expires_at) == ("a", None)
        assert retired is not None and retired.device_id == "a"
        assert retired.expires_at is not None
        assert before + 60 <= retired.expires_at <= time.time() + 60

    async def test_a_rotated_out_token_fails_once_its_grace_ends(self, backend: Backend) -> None:
        """When the grace period is over, the old token fails like an unknown one."""
        (old,) = await backend.operator.add_many(["a"])
        new = await backend.operator.rotate("a", grace_s=0.2)

        async def old_fails() -> bool:
            return await backend.ports.credential(hash_token(old)) is None

        await eventually(old_fails, "the old token stops working")
        assert await backend.ports.credential(hash_token(new)) is not None

    async def test_rotation_without_grace_ends_the_old_token_at_once(
        self, backend: Backend
    ) -> None:
        """`grace 0` ends every grace period of the device, earlier rotations' too."""
        (first,) = await backend.operator.add_many(["a"])
        second = await backend.operator.rotate("a", grace_s=60)
        third = await backend.operator.rotate("a", grace_s=0)
        assert await backend.ports.credential(hash_token(first)) is None
        assert await backend.ports.credential(hash_token(second)) is None
        assert await backend.ports.credential(hash_token(third)) is not None

    async def test_revocation_ends_tokens_in_their_grace_too(self, backend: Backend) -> None:
        """A revoked device's rotated-out token fails, grace or not."""
        (old,) = await backend.operator.add_many(["a"])
        new = await backend.operator.rotate("a", grace_s=60)
        await backend.operator.revoke("a")
        assert await backend.ports.credential(hash_token(old)) is None
        assert await backend.ports.credential(hash_token(new)) is None

    # --- Configs ----------------------------------------------------------------------------

    async def test_a_new_device_has_nothing_pending(self, backend: Backend) -> None:
        """Version 0, an empty config, no answer."""
        await backend.operator.add_many(["a"])
        state = await backend.ports.config_state("a")
        assert (state.version, state.config, state.acked_version, state.pending) == (
            0,
            {},
            None,
            False,
        )

    async def test_config_state_of_an_unknown_device_raises(self, backend: Backend) -> None:
        """An unknown id is an error, not an empty state."""
        with pytest.raises(UnknownDevice):
            await backend.ports.config_state("ghost")

    async def test_config_versions_only_grow(self, backend: Backend) -> None:
        """Each change is a higher version, answered or not, and after a restart too."""
        await backend.operator.add_many(["a"])
        seen = []
        for value in range(3):
            await backend.operator.set_config(["a"], updates={"x": value})
            state = await backend.ports.config_state("a")
            seen.append(state.version)
            assert state.pending and state.config == {"x": value}
        assert await backend.ports.record_config_ack("a", seen[-1], True, None)
        reopened = await backend.reopen()
        try:
            await backend.operator.set_config(["a"], replace={"y": 1})
            state = await reopened.config_state("a")
        finally:
            await reopened.close()
        seen.append(state.version)
        assert seen == sorted(set(seen)) and seen[0] >= 1
        assert state.config == {"y": 1} and state.pending

    async def test_config_states_of_many_devices_in_one_call(self, backend: Backend) -> None:
        """Each known device once, as `config_state` has it; unknown and repeated ids do not
        count, and no id at all is no state at all."""
        ids = [f"d{n:03}" for n in range(600)]  # more than one SQL statement's worth of ids
        await backend.operator.add_many(ids)
        versions = await backend.operator.set_config(ids[::2], updates={"x": 1})
        assert await backend.ports.record_config_ack(ids[0], versions[ids[0]], False, "no")
        asked = [*reversed(ids), "ghost", ids[5], ids[0]]
        states = await backend.ports.config_states(asked)
        assert sorted(s.device_id for s in states) == ids
        singles = [await backend.ports.config_state(i) for i in (ids[0], ids[1], ids[2])]
        by_id = {s.device_id: s for s in states}
        assert [by_id[s.device_id] for s in singles] == singles
        assert (by_id[ids[0]].ack_ok, by_id[ids[0]].ack_error) == (False, "no")
        assert by_id[ids[2]].pending and by_id[ids[2]].config == {"x": 1}
        assert not by_id[ids[1]].pending and by_id[ids[1]].version == 0
        assert await backend.ports.config_states([]) == []
        assert await backend.ports.config_states(["ghost"]) == []

    async def test_an_answer_to_the_latest_version_is_stored(self, backend: Backend) -> None:
        """ok and refused answers are stored with their error; nothing is pending after."""
        await backend.operator.add_many(["a", "b"])
        versions = await backend.operator.set_config(["a", "b"], updates={"x": 1})
        assert await backend.ports.record_config_ack("a", versions["a"], True, None)
        assert await backend.ports.record_config_ack("b", versions["b"], False, "too fast")
        a = await backend.ports.config_state("a")
        b = await backend.ports.config_state("b")
        assert (a.acked_version, a.ack_ok, a.ack_error, a.pending) == (
            versions["a"],
            True,
            None,
            False,
        )
        assert (b.acked_version, b.ack_ok, b.ack_error, b.pending) == (
            versions["b"],
            False,
            "too fast",
            False,
        )
        assert a.acked_at is not None and a.acked_at <= time.time()

    async def test_stale_repeated_and_impossible_answers_are_ignored(
        self, backend: Backend
    ) -> None:
        """Only the first answer to the latest version counts; others change nothing."""
        await backend.operator.add_many(["a"])
        first = (await backend.operator.set_config(["a"], updates={"x": 1}))["a"]
        latest = (await backend.operator.set_config(["a"], updates={"x": 2}))["a"]
        for version in (first, latest + 1, -1, 2**63, 2**70):
            assert not await backend.ports.record_config_ack("a", version, True, None)
        assert (await backend.ports.config_state("a")).acked_version is None
        assert await backend.ports.record_config_ack("a", latest, True, None)
        assert not await backend.ports.record_config_ack("a", latest, False, "again")
        state = await backend.ports.config_state("a")
        assert (state.acked_version, state.ack_ok) == (latest, True)
        assert not await backend.ports.record_config_ack("ghost", 1, True, None)

    # --- Presence -------------------------------------------------------------------------

    async def test_presence_is_stored_and_replaced(self, backend: Backend) -> None:
        """What was recorded last per device is what `presence` returns."""
        await backend.operator.add_many(["a", "b"])
        assert await backend.ports.presence() == {}
        await backend.ports.record_presence([_presence("a", True, 3), _presence("b", True, 1)])
        await backend.ports.record_presence([_presence("a", False, 7, seen=200.0)])
        assert await backend.ports.presence() == {
            "a": _presence("a", False, 7, seen=200.0),
            "b": _presence("b", True, 1),
        }
        await backend.ports.record_presence([])

    async def test_presence_of_an_unknown_device_is_left_out(self, backend: Backend) -> None:
        """A flush naming a device not registered (deleted meanwhile) records the others and
        fails nothing."""
        await backend.operator.add_many(["a"])
        await backend.ports.record_presence([_presence("ghost", True, 2), _presence("a", True, 1)])
        assert set(await backend.ports.presence()) == {"a"}

    async def test_mark_all_offline_keeps_the_counts(self, backend: Backend) -> None:
        """A new hub run starts with nobody online, and every count as it was."""
        await backend.operator.add_many(["a", "b"])
        await backend.ports.record_presence([_presence("a", True, 3), _presence("b", False, 1)])
        await backend.ports.mark_all_offline()
        stored = await backend.ports.presence()
        assert {d: (p.online, p.readings_stored) for d, p in stored.items()} == {
            "a": (False, 3),
            "b": (False, 1),
        }

    async def test_readings_stored_add_up_across_hubs(self, backend: Backend) -> None:
        """Each hub flushes its own totals (from the count it read at its start); the
        registry adds what each stored since its last flush, overwriting nobody, and a
        restarted hub continues from the sum."""
        await backend.operator.add_many(["d"])
        async with _peers(backend, "hub-a", "hub-b") as (first, second):
            assert await first.presence() == {} and await second.presence() == {}
            await first.record_presence([_presence("d", True, 5)])
            await second.record_presence([_presence("d", True, 3)])
            await first.record_presence([_presence("d", False, 7)])
            assert (await backend.operator.presence())["d"].readings_stored == 10
            await second.record_presence([_presence("d", False, 3)])  # nothing new
            assert (await backend.operator.presence())["d"].readings_stored == 10
        async with _peers(backend, "hub-a") as (restarted,):
            base = (await restarted.presence())["d"].readings_stored
            assert base == 10
            await restarted.record_presence([_presence("d", True, base + 1)])
            assert (await backend.operator.presence())["d"].readings_stored == 11

    async def test_overlapping_flushes_count_each_reading_once(self, backend: Backend) -> None:
        """Two flushes of one hub under way at once (the periodic one and the last one, at a
        stop): each reading is added once, whichever commits first."""
        await backend.operator.add_many(["d"])
        async with _peers(backend, "hub-a") as (hub,):
            await asyncio.gather(
                hub.record_presence([_presence("d", True, 4)]),
                hub.record_presence([_presence("d", True, 9)]),
            )
            assert (await backend.operator.presence())["d"].readings_stored == 9

    # --- Ownership across hubs ------------------------------------------------------------

    async def test_each_claim_takes_the_device_with_a_higher_epoch(self, backend: Backend) -> None:
        """A claim names the hub it took the device from; epochs only grow, across a
        release too; the holder is what `holders` shows."""
        await backend.operator.add_many(["d"])
        async with _peers(backend, "hub-a", "hub-b") as (hub_a, hub_b):
            first = await hub_a.claim("d", "192.0.2.1:1000")
            second = await hub_b.claim("d", "192.0.2.2:2000")
            assert first is not None and second is not None
            assert (first.previous_owner, second.previous_owner) == (None, "hub-a")
            assert await backend.operator.holders() == {"d": "hub-b"}
            await hub_b.release("d", second.epoch)
            assert await backend.operator.holders() == {}
            third = await hub_a.claim("d", "192.0.2.1:1001")
            again = await hub_a.claim("d", "192.0.2.1:1002")  # the same hub, once more
            assert third is not None and again is not None
            # Taken from nobody, then from itself: neither is a takeover from another node.
            assert third.previous_owner is None and again.previous_owner is None
            assert 0 < first.epoch < second.epoch < third.epoch < again.epoch
            assert await backend.operator.holders() == {"d": "hub-a"}
            assert (await backend.operator.presence())["d"].online

    async def test_unknown_and_revoked_devices_cannot_be_claimed(self, backend: Backend) -> None:
        """No claim for a device that is not registered, or revoked."""
        await backend.operator.add_many(["d"])
        await backend.operator.revoke("d")
        async with _peers(backend, "hub-a") as (hub,):
            assert await hub.claim("d", "192.0.2.1:1000") is None
            assert await hub.claim("ghost", "192.0.2.1:1000") is None
            assert await backend.operator.holders() == {}

    async def test_the_previous_owner_hears_the_takeover_with_the_new_epoch(
        self, backend: Backend
    ) -> None:
        """Only the hub a claim took the device from hears of it, with the claim's epoch;
        a hub claiming a device it holds already rings nobody."""
        await backend.operator.add_many(["d"])
        async with _peers(backend, "hub-a", "hub-b") as (hub_a, hub_b):
            heard_a, heard_b = _takeovers(hub_a), _takeovers(hub_b)
            assert await hub_a.claim("d", "192.0.2.1:1000") is not None
            taken = await hub_b.claim("d", "192.0.2.2:2000")
            assert taken is not None
            assert await asyncio.wait_for(heard_a.get(), WAIT_S) == ("d", taken.epoch)
            assert await hub_b.claim("d", "192.0.2.2:2001") is not None  # its own: no ring
            back = await hub_a.claim("d", "192.0.2.1:1001")
            assert back is not None
            # b hears a's claim; had b's own claim rung, that would come first.
            assert await asyncio.wait_for(heard_b.get(), WAIT_S) == ("d", back.epoch)
            assert heard_a.empty() and heard_b.empty()

    async def test_a_stale_owners_late_writes_lose_to_the_newer_claim(
        self, backend: Backend
    ) -> None:
        """Hub A's session is taken over by hub B's claim: A's config answer is not stored,
        its presence flush and release change nothing, and its safety net says it was taken
        over; B's answer counts, and the net finds nothing wrong with B's session."""
        (token,) = await backend.operator.add_many(["d"])
        version = (await backend.operator.set_config(["d"], updates={"x": 1}))["d"]
        async with _peers(backend, "hub-a", "hub-b") as (hub_a, hub_b):
            first = await hub_a.claim("d", "192.0.2.1:1000")
            second = await hub_b.claim("d", "192.0.2.2:2000")
            assert first is not None and second is not None

            assert not await hub_a.record_claimed_config_ack("d", first.epoch, version, True, None)
            assert (await hub_a.config_state("d")).acked_version is None
            await hub_a.record_presence([_session("d", True, 0, first.epoch)])
            await hub_a.record_presence([_session("d", False, 0, first.epoch)])
            await hub_a.release("d", first.epoch)
            assert (await backend.operator.presence())["d"].online
            assert await backend.operator.holders() == {"d": "hub-b"}
            held_a = HeldSession("d", first.epoch, version, hash_token(token))
            stale = await hub_a.stale_sessions([held_a])
            assert [(s.device_id, s.epoch, s.reason) for s in stale] == [
                ("d", first.epoch, StaleReason.TAKEN_OVER)
            ]

            assert await hub_b.record_claimed_config_ack("d", second.epoch, version, True, None)
            assert (await hub_b.config_state("d")).acked_version == version
            held_b = HeldSession("d", second.epoch, version, hash_token(token))
            assert await hub_b.stale_sessions([held_b]) == []
            await hub_b.record_presence([_session("d", False, 0, second.epoch)])
            assert not (await backend.operator.presence())["d"].online  # B's release counted
            assert await backend.operator.holders() == {}

    async def test_a_hub_opened_again_holds_nothing_it_held_before(self, backend: Backend) -> None:
        """A process opening the registry as a node id is a new one: the claims that node id
        held (its last process died) are released; other hubs' are not."""
        await backend.operator.add_many(["a", "b"])
        async with _peers(backend, "hub-a", "hub-b") as (hub_a, hub_b):
            assert await hub_a.claim("a", "192.0.2.1:1000") is not None
            assert await hub_b.claim("b", "192.0.2.2:2000") is not None
        async with _peers(backend, "hub-a"):
            assert await backend.operator.holders() == {"b": "hub-b"}
            seen = await backend.operator.presence()
            assert (seen["a"].online, seen["b"].online) == (False, True)

    # --- Change feed ------------------------------------------------------------------------

    async def test_changes_since_names_exactly_the_changed_devices(self, backend: Backend) -> None:
        """Config changes and revocations after a sequence, with what the hub acts on (of
        devices it holds: a hub sharing its registry reads only its own devices' changes)."""
        await backend.operator.add_many(["a", "b", "c"])
        for device_id in ("a", "b", "c"):
            assert await backend.ports.claim(device_id, "192.0.2.1:1") is not None
        start = await backend.ports.change_seq()
        await backend.operator.set_config(["a"], updates={"x": 1})
        await backend.operator.revoke("b")
        latest, changes = await backend.ports.changes_since(start)
        assert latest > start and latest == await backend.ports.change_seq()
        by_device = {c.device_id: (c.config_version, c.revoked) for c in changes}
        assert by_device == {"a": (1, False), "b": (0, True)}
        assert await backend.ports.changes_since(latest) == (latest, [])

    async def test_a_rotation_is_a_change(self, backend: Backend) -> None:
        """A rotated token is a change of its device (sessions re-check their tokens)."""
        await backend.operator.add_many(["a", "b"])
        for device_id in ("a", "b"):
            assert await backend.ports.claim(device_id, "192.0.2.1:1") is not None
        start = await backend.ports.change_seq()
        await backend.operator.rotate("a", grace_s=0)
        _, changes = await backend.ports.changes_since(start)
        assert [c.device_id for c in changes] == ["a"]

    async def test_wait_for_change_times_out_when_nothing_changes(self, backend: Backend) -> None:
        """No operator change, no signal; the hub's own writes are not operator changes."""
        await backend.operator.add_many(["a"])
        await backend.operator.set_config(["a"], updates={"x": 1})
        ports = await backend.reopen()  # opened after those changes: nothing new to it
        try:
            await ports.record_presence([_presence("a", True, 1)])
            assert await ports.record_config_ack("a", 1, True, None)
            started = time.monotonic()
            assert not await ports.wait_for_change(0.3)
            assert time.monotonic() - started >= 0.3
        finally:
            await ports.close()

    async def test_wait_for_change_wakes_on_an_operator_change(self, backend: Backend) -> None:
        """A change committed while the hub waits ends the wait, well before its timeout;
        the signal is then taken."""
        await backend.operator.add_many(["a"])
        ports = await backend.reopen()
        try:
            await ports.record_presence([_presence("a", True, 0)])  # this hub holds it
            waiting = asyncio.create_task(ports.wait_for_change(WAIT_S * 4))
            await asyncio.sleep(0)  # the wait has begun
            started = time.monotonic()
            await backend.operator.set_config(["a"], updates={"x": 1})
            assert await asyncio.wait_for(waiting, WAIT_S)
            print(f"wait_for_change woke {(time.monotonic() - started) * 1000:.1f} ms after")
            assert not await ports.wait_for_change(0.1)
        finally:
            await ports.close()

    async def test_a_change_before_the_wait_is_not_lost(self, backend: Backend) -> None:
        """A change committed while nobody waits is signalled to the next wait."""
        await backend.operator.add_many(["a"])
        ports = await backend.reopen()
        try:
            await ports.record_presence([_presence("a", True, 0)])  # this hub holds it
            await backend.operator.revoke("a")
            assert await ports.wait_for_change(WAIT_S)
        finally:
            await ports.close()
