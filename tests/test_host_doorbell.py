"""The takeover doorbell between the hub processes of one host (hub.registry.host_doorbell):
the datagram's form and bounds as pure code, then real UNIX datagram sockets in a temporary
state directory (no network: unit tests)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from hub.registry.host_doorbell import (
    DOORBELL_DIR,
    MAX_DATAGRAM,
    MAX_LINE,
    HostDoorbell,
    parse_takeover,
    parse_takeovers,
    socket_name,
    takeover_datagrams,
    takeover_line,
)

pytestmark = pytest.mark.unit

WAIT_S = 5.0


def test_takeovers_read_back_as_they_were_sent_in_as_few_datagrams_as_fit() -> None:
    """Device ids and epochs survive the round trip, the longest id and a 20-digit epoch
    within a line's bound; many rings go in few datagrams, none past the bound, in order."""
    longest = "d" + "x" * 127
    sent = [("sensor-1", 1), (longest, 10**19), ("a:b.c-d_e", 42)]
    sent += [(f"{longest[:120]}-{n:04}", n) for n in range(200)]
    lines = [takeover_line(device_id, epoch) for device_id, epoch in sent]
    assert max(len(line) for line in lines) <= MAX_LINE + 1
    datagrams = takeover_datagrams(lines)
    assert all(len(d) <= MAX_DATAGRAM for d in datagrams)
    assert len(datagrams) == -(-sum(len(line) for line in lines) // MAX_DATAGRAM)
    assert [t for d in datagrams for t in parse_takeovers(d)] == sent


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"7",
        b"7 ",
        b" sensor-1",
        b"-1 sensor-1",
        b"x7 sensor-1",
        b"7 sensor 1",
        b"7 ../etc",
        b"7 " + b"x" * 129,
        b"1" * 21 + b" sensor-1",
        b"7 sensor-\xff",
        b"7 " + b"a" * MAX_LINE,
    ],
)
def test_malformed_lines_are_refused(line: bytes) -> None:
    """Anything but digits, one space and a valid device id, within the bound, is None; in
    a datagram, only the good lines count, and a datagram past its bound counts for none."""
    assert parse_takeover(line) is None
    assert parse_takeovers(line + b"\n" + takeover_line("ok-1", 5)) == [("ok-1", 5)]
    assert parse_takeovers(takeover_line("ok-1", 5) + b"x" * MAX_DATAGRAM) == []


@pytest.mark.parametrize("node_id", ["edge-1/2", "../../etc/passwd", "a" * 5000, "köln:8765/1"])
def test_socket_names_are_safe_whatever_the_node_id(node_id: str) -> None:
    """A hash: fixed length, hex, no path character; distinct ids, distinct names."""
    name = socket_name(node_id)
    assert len(name) == 32 + len(".sock") and name.removesuffix(".sock").isalnum()
    assert socket_name(node_id + "x") != name


def state_dir(tmp_path: Path) -> Path:
    """A state directory whose path is longer than a socket address may be (108 bytes)."""
    directory = tmp_path / ("long-" * 30) / "state"
    directory.mkdir(parents=True, mode=0o700)
    return directory


async def next_ring(heard: asyncio.Queue[tuple[str, int]]) -> tuple[str, int]:
    """The next ring heard, or fail after WAIT_S."""
    return await asyncio.wait_for(heard.get(), WAIT_S)


def listening(doorbell: HostDoorbell) -> asyncio.Queue[tuple[str, int]]:
    """What `doorbell` hears from now on."""
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    doorbell.listen(lambda device_id, epoch: heard.put_nowait((device_id, epoch)))
    return heard


async def test_a_ring_reaches_the_node_it_names_in_a_private_directory(tmp_path: Path) -> None:
    """Node 1 rings node 2: node 2 hears device and epoch; the directory is 0700 and the
    socket 0600, though the state directory's path is too long for a socket address."""
    directory = state_dir(tmp_path)
    assert len(str(directory / DOORBELL_DIR / socket_name("n/2"))) > 108
    first = HostDoorbell.open(directory, "n/1")
    second = HostDoorbell.open(directory, "n/2")
    try:
        heard = listening(second)
        first.ring("n/2", "sensor-1", 7)
        first.ring("n/2", "sensor-2", 8)
        assert await next_ring(heard) == ("sensor-1", 7)  # sent as the loop turns
        assert await next_ring(heard) == ("sensor-2", 8)
        doorbells = directory / DOORBELL_DIR
        assert stat.S_IMODE(doorbells.stat().st_mode) == 0o700
        assert stat.S_IMODE((doorbells / socket_name("n/2")).stat().st_mode) == 0o600
    finally:
        first.close()
        second.close()
    assert list((directory / DOORBELL_DIR).iterdir()) == []


async def test_ringing_a_node_that_is_not_there_fails_quietly(tmp_path: Path) -> None:
    """No socket file, or a file a killed process left (nobody bound): False, at once."""
    directory = state_dir(tmp_path)
    ringer = HostDoorbell.open(directory, "n/1")
    killed = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = os.open(directory / DOORBELL_DIR, os.O_PATH)
    try:
        killed.bind(f"/proc/self/fd/{fd}/{socket_name('n/3')}")
        killed.close()  # its file stays, as a SIGKILL leaves it
        assert (directory / DOORBELL_DIR / socket_name("n/3")).exists()
        ringer.ring("n/2", "sensor-1", 1)
        ringer.ring("n/3", "sensor-1", 1)
        ringer.ring("n/3", "sensor-2", 1)
        assert ringer.send_pending() == 3
    finally:
        os.close(fd)
        ringer.close()


async def test_a_new_process_of_a_node_replaces_its_file_and_the_old_close_keeps_it(
    tmp_path: Path,
) -> None:
    """A node id opened again (its slot's next process) takes over the name: rings reach
    the new one, and the old one closing late does not remove the new one's file."""
    directory = state_dir(tmp_path)
    ringer = HostDoorbell.open(directory, "n/1")
    old = HostDoorbell.open(directory, "n/2")
    new = HostDoorbell.open(directory, "n/2")
    try:
        heard_old, heard_new = listening(old), listening(new)
        old.close()
        ringer.ring("n/2", "sensor-1", 3)
        assert ringer.send_pending() == 0
        assert await next_ring(heard_new) == ("sensor-1", 3)
        assert heard_old.empty()
    finally:
        new.close()
        ringer.close()


async def test_oversized_and_malformed_datagrams_are_dropped_and_the_next_is_heard(
    tmp_path: Path,
) -> None:
    """Garbage and a datagram past the bound change nothing; a good ring after them is
    heard."""
    directory = state_dir(tmp_path)
    doorbell = HostDoorbell.open(directory, "n/2")
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = os.open(directory / DOORBELL_DIR, os.O_PATH)
    try:
        heard = listening(doorbell)
        address = f"/proc/self/fd/{fd}/{socket_name('n/2')}"
        for junk in (b"\x00" * 64, b"9 " + b"a" * (4 * MAX_DATAGRAM), b"hello world"):
            sender.sendto(junk, address)
        sender.sendto(takeover_line("sensor-9", 12), address)
        assert await next_ring(heard) == ("sensor-9", 12)
        assert heard.empty()
    finally:
        os.close(fd)
        sender.close()
        doorbell.close()


async def test_a_storm_of_rings_to_one_node_is_heard_whole(tmp_path: Path) -> None:
    """2000 rings to one node in one turn of the loop (a storm of takeovers) all arrive:
    they go in batches, not one datagram each past the kernel's queue of 10."""
    directory = state_dir(tmp_path)
    ringer = HostDoorbell.open(directory, "n/1")
    ringing = HostDoorbell.open(directory, "n/2")
    try:
        heard = listening(ringing)
        for n in range(2000):
            ringer.ring("n/2", f"d{n:05}", n + 1)
        assert ringer.send_pending() == 0
        got = [await next_ring(heard) for _ in range(2000)]
        assert got == [(f"d{n:05}", n + 1) for n in range(2000)]
    finally:
        ringer.close()
        ringing.close()
