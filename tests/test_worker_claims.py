"""What the supervisor does about a dead worker's device claims (hub.workers.claims), and the
release itself on SQLite and PostgreSQL settings (hub.registry.backends.release_host_claims).
Pure asyncio with a recording release, and a temporary SQLite file: unit tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hub.registry import sqlite_claims
from hub.registry.backends import release_host_claims
from hub.registry.sqlite import Registry
from hub.workers.claims import MAX_NODE_ID_CHARS, SlotClaims

pytestmark = pytest.mark.unit

WAIT_S = 5.0


class Releases:
    """A release that records what it was asked, and can be held until let go."""

    def __init__(self) -> None:
        self.asked: list[list[str] | None] = []
        self.go = threading.Event()
        self.go.set()

    def __call__(self, node_ids: Sequence[str] | None) -> None:
        self.go.wait(WAIT_S)
        self.asked.append(None if node_ids is None else list(node_ids))


async def test_a_reaped_worker_has_the_node_id_it_told_released() -> None:
    """READY=1 named the worker's node id; reaping it releases exactly that id, once."""
    releases = Releases()
    claims = SlotClaims(releases)
    claims.learned(2, "edge-1/2")
    claims.reaped(2)
    await asyncio.wait_for(claims.settled(2), WAIT_S)
    await claims.close()
    assert releases.asked == [["edge-1/2"]]


async def test_a_slot_whose_worker_never_told_its_id_releases_nothing() -> None:
    """No node id known (died before READY=1, or a hostile length): nothing to release; its
    next process releases its own id as it opens the registry."""
    releases = Releases()
    claims = SlotClaims(releases)
    claims.learned(1, "x" * (MAX_NODE_ID_CHARS + 1))
    claims.learned(1, "")
    claims.reaped(1)
    await claims.settled(1)
    await claims.close()
    assert releases.asked == []


async def test_the_next_process_of_a_slot_waits_for_the_release() -> None:
    """A release still under way holds the slot's respawn (`settled`) until it is done, so it
    can never free what the new process claims; other slots do not wait."""
    releases = Releases()
    releases.go.clear()
    claims = SlotClaims(releases)
    claims.learned(1, "edge-1/1")
    claims.reaped(1)
    waiting = asyncio.ensure_future(claims.settled(1))
    await claims.settled(2)  # another slot: nothing to wait for
    await asyncio.sleep(0.05)
    assert not waiting.done()
    releases.go.set()
    await asyncio.wait_for(waiting, WAIT_S)
    assert releases.asked == [["edge-1/1"]]
    await claims.close()


async def test_a_failed_release_is_logged_and_does_not_stop_the_slot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A release that raises (the registry unreadable) is a warning; the slot's respawn
    goes ahead."""

    def failing(node_ids: Sequence[str] | None) -> None:
        raise OSError("disk gone")

    claims = SlotClaims(failing)
    claims.learned(1, "edge-1/1")
    claims.reaped(1)
    await asyncio.wait_for(claims.settled(1), WAIT_S)
    await claims.close()
    assert "releasing the devices of worker 1 (edge-1/1) failed: disk gone" in caplog.text


def test_on_sqlite_the_named_workers_claims_end_and_at_start_all(tmp_path: Path) -> None:
    """On SQLite a reaped worker's claims end, its sibling's stay; with no ids (the
    supervisor's start) every claim ends. With a PostgreSQL URL nothing is written here."""
    path = tmp_path / "state" / "registry.sqlite3"
    registry = Registry(path)
    try:
        registry.add_many(["a", "b"])
        registry.write_connections(lambda db: sqlite_claims.claim(db, "a", "edge-1/1", "x:1", 1))
        registry.write_connections(lambda db: sqlite_claims.claim(db, "b", "edge-1/2", "x:1", 1))
        release_host_claims("postgresql://hub@db.invalid/hub", path, None)
        assert len(registry.read_connections(sqlite_claims.holders)) == 2
        release_host_claims("", path, ["edge-1/1"])
        assert registry.read_connections(sqlite_claims.holders) == {"b": "edge-1/2"}
        release_host_claims("", path, None)
        assert registry.read_connections(sqlite_claims.holders) == {}
    finally:
        registry.close()


def test_with_postgresql_the_supervisor_leaves_sqlite_alone(tmp_path: Path) -> None:
    """A PostgreSQL `registry_url`: no SQLite file is made or opened in the state directory
    (the supervisor used to mark a stray SQLite registry offline)."""
    state = tmp_path / "state"
    state.mkdir()
    release_host_claims("postgresql://hub@db.invalid/hub", state / "registry.sqlite3", None)
    release_host_claims("postgresql://hub@db.invalid/hub", state / "registry.sqlite3", ["n/1"])
    assert list(state.iterdir()) == []
