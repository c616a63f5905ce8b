"""Who a worker is (hub.workers.slots): its slot from the supervisor, node id, directories."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hub.errors import ConfigError, SpoolInUse
from hub.ingest.spool import Spool, move_segments
from hub.settings import Settings
from hub.workers.slots import (
    WORKER_VARIABLE,
    adopt_orphan_spools,
    adopt_passed_socket,
    node_id,
    orphan_spools,
    slot_variable,
    spool_directories,
    worker_settings,
    worker_slot,
)

pytestmark = pytest.mark.unit


def settings(tmp_path: Path, **values: object) -> Settings:
    """Settings on a temporary state directory."""
    return Settings(state_dir=tmp_path, **values)  # type: ignore[arg-type]


def test_a_hub_of_its_own_has_no_slot(tmp_path: Path) -> None:
    """Without the supervisor's variable the process is a hub of its own."""
    assert worker_slot({}, settings(tmp_path)) is None


def test_the_slot_the_supervisor_gives(tmp_path: Path) -> None:
    """K/N names the slot: its node id NODE_ID/K, its spool and dead letters under
    STATE_DIR/workers/K."""
    slot = worker_slot({WORKER_VARIABLE: slot_variable(2, 4)}, settings(tmp_path, node_id="n1"))
    assert slot is not None
    assert (slot.number, slot.count, slot.node_id, slot.name) == (2, 4, "n1/2", "worker 2/4")
    assert slot.spool_dir == tmp_path / "workers" / "2" / "spool"
    assert slot.dead_letter_path == tmp_path / "workers" / "2" / "dead-letters.jsonl"


@pytest.mark.parametrize("value", ["", "2", "0/2", "3/2", "a/b", "1/2/3"])
def test_a_malformed_slot_is_a_clear_error(tmp_path: Path, value: str) -> None:
    """Only the supervisor sets it; anything else says what it expected."""
    with pytest.raises(ConfigError, match=WORKER_VARIABLE):
        worker_slot({WORKER_VARIABLE: value}, settings(tmp_path))


def test_the_node_id_defaults_to_host_name_and_port(tmp_path: Path) -> None:
    """HOSTNAME:PORT unless the node_id setting names it."""
    assert node_id(settings(tmp_path, port=9000)) == f"{socket.gethostname()}:9000"
    assert node_id(settings(tmp_path, node_id="edge-3")) == "edge-3"


def test_a_node_id_may_not_hold_a_slash_or_space(tmp_path: Path) -> None:
    """The slash separates the worker number."""
    with pytest.raises(ValueError, match="node_id"):
        settings(tmp_path, node_id="a/b")


def test_a_workers_health_listener_is_its_own(tmp_path: Path) -> None:
    """Loopback, a free port: the supervisor's listener is the operator's."""
    mine = worker_settings(settings(tmp_path, health_host="192.0.2.1", health_port=9765))
    assert (mine.health_host, mine.health_port) == ("127.0.0.1", 0)


def test_every_spool_of_a_state_directory_is_found(tmp_path: Path) -> None:
    """The hub's own spool first, then each worker's, by number; other entries ignored."""
    assert spool_directories(tmp_path) == []
    for path in ("spool", "workers/10/spool", "workers/2/spool", "workers/3", "workers/x/spool"):
        (tmp_path / path).mkdir(parents=True)
    assert spool_directories(tmp_path) == [
        ("hub", tmp_path / "spool"),
        ("worker 2", tmp_path / "workers/2/spool"),
        ("worker 10", tmp_path / "workers/10/spool"),
    ]


def test_a_worker_takes_the_socket_its_supervisor_passed() -> None:
    """LISTEN_FDS from the supervisor, without LISTEN_PID: the worker names itself; a hub
    of its own, or one systemd named, is left as it is."""
    environ = {WORKER_VARIABLE: "1/2", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "devices"}
    adopt_passed_socket(environ, 4242)
    assert environ["LISTEN_PID"] == "4242"
    alone = {"LISTEN_FDS": "1"}
    adopt_passed_socket(alone, 4242)
    assert "LISTEN_PID" not in alone
    named = {WORKER_VARIABLE: "1/2", "LISTEN_FDS": "1", "LISTEN_PID": "7"}
    adopt_passed_socket(named, 4242)
    assert named["LISTEN_PID"] == "7"


def spooled(directory: Path, *bodies: bytes) -> None:
    """A spool at `directory` holding `bodies`, closed."""
    spool = Spool(directory, max_bytes=2**20, segment_bytes=40)
    for body in bodies:
        spool.append(body, 1)
    spool.close()


def replayed(directory: Path) -> list[bytes]:
    """The bodies a spool replays, in order."""
    spool = Spool(directory, max_bytes=2**20)
    bodies = []
    while (batch := spool.oldest()) is not None:
        bodies.append(batch.body)
        spool.written(batch)
    spool.close()
    return bodies


def test_the_spools_no_process_takes_are_orphans(tmp_path: Path) -> None:
    """With N workers: the single hub's spool and the slots past N; with one process: every
    slot's."""
    for path in ("spool", "workers/1/spool", "workers/2/spool", "workers/3/spool"):
        (tmp_path / path).mkdir(parents=True)
    assert orphan_spools(tmp_path, 2) == [tmp_path / "spool", tmp_path / "workers/3/spool"]
    assert orphan_spools(tmp_path, 1) == [tmp_path / f"workers/{k}/spool" for k in (1, 2, 3)]
    assert orphan_spools(tmp_path, 3) == [tmp_path / "spool"]


def test_orphan_segments_move_after_the_targets_own_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After `workers` was lowered, slot 3's batches replay in slot 1's spool, after what it
    held; a spool another process holds is left, with a warning."""
    spooled(tmp_path / "workers/1/spool", b"own 1", b"own 2")
    spooled(tmp_path / "workers/3/spool", b"orphan 1", b"orphan 2", b"orphan 3")
    held = Spool(tmp_path / "spool", max_bytes=2**20)  # as `hub spool replay` would hold it
    held.append(b"held 1", 1)
    try:
        adopt_orphan_spools(tmp_path, tmp_path / "workers/1/spool", workers=2)
    finally:
        held.close()
    assert replayed(tmp_path / "workers/1/spool") == [
        b"own 1", b"own 2", b"orphan 1", b"orphan 2", b"orphan 3"
    ]  # fmt: skip
    assert replayed(tmp_path / "workers/3/spool") == []
    assert replayed(tmp_path / "spool") == [b"held 1"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("moved 3 spool segments from" in m for m in messages), messages
    assert any("is in use by process" in m for m in messages), messages


def test_moving_needs_both_locks(tmp_path: Path) -> None:
    """A target spool in use refuses the move, and nothing moves."""
    spooled(tmp_path / "a", b"x 1")
    target = Spool(tmp_path / "b", max_bytes=2**20)
    try:
        with pytest.raises(SpoolInUse):
            move_segments(tmp_path / "a", tmp_path / "b")
    finally:
        target.close()
    assert replayed(tmp_path / "a") == [b"x 1"]
