"""The takeover doorbell between the hub processes of one host: a UNIX datagram socket each.

On SQLite the processes sharing the registry file (the workers of `hub serve --workers N`)
are on one host, so a claim rings the previous owner directly instead of through a database:
each process binds `STATE_DIR/doorbells/<name>.sock`, named from its node id, and a claim of
a device another node held sends that node's socket a line `EPOCH DEVICE_ID`. The listener
closes its session of the device if it holds an older epoch. As on PostgreSQL the
doorbell is only a hint: the registry's claim is the truth, and a datagram that is lost (the
owner dead, its socket's queue full) is made up for by the safety net (`stale_sessions`).

* **Names.** Node ids are operator-set text: the file name is a hash of the id (no path
  characters, fixed length). Paths are reached through an `O_PATH` descriptor of the
  directory (`/proc/self/fd/N/NAME`), so a long state directory never exceeds the 108 bytes
  of a socket address.
* **Who may ring.** The directory is 0700 and the socket 0600, both the hub user's; the
  listener also reads each datagram's sender credentials (`SO_PASSCRED`) and drops any not
  from its own user.
* **Stale files.** A process killed without closing leaves its socket file: a ring to it is
  refused by the kernel (nobody bound) and ignored. The next process of that node id (the
  slot's restarted worker) replaces the file; a second process with the same node id would
  be a misconfiguration the spool lock refuses first. Closing removes the file only while it
  is still this process's (its inode), never a successor's.
* **Batches.** The rings of one turn of the event loop to one node go in one datagram (as
  many lines as fit): Linux queues only `net.unix.max_dgram_qlen` (10) datagrams per socket,
  so a storm of takeovers sent one datagram each lost most of them
  (`python benchmarks/bench_claims.py`).
* **Bounds.** A datagram is at most `MAX_DATAGRAM` bytes, a line at most `MAX_LINE` (a
  20-digit epoch and a 128-character device id fit in 150); a truncated datagram is dropped
  whole, a malformed line alone. Sending never blocks: a full queue drops the datagram.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Self

from hub.registry.records import DEVICE_ID_PATTERN

log = logging.getLogger("hub.registry")

DOORBELL_DIR = "doorbells"
MAX_DATAGRAM = 4096
MAX_LINE = 160
_UCRED = struct.Struct("iII")  # pid, uid, gid
_MAX_EPOCH_DIGITS = 20


def socket_name(node_id: str) -> str:
    """The file name of a node's doorbell: a hash of its id, safe whatever the id holds."""
    return hashlib.sha256(node_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".sock"


def takeover_line(device_id: str, epoch: int) -> bytes:
    """What a claim of `epoch` tells the device's previous owner (one line of a datagram)."""
    return f"{epoch} {device_id}\n".encode("ascii")


def takeover_datagrams(lines: list[bytes]) -> list[bytes]:
    """`lines` packed into as few datagrams of at most `MAX_DATAGRAM` bytes as they fit."""
    datagrams: list[bytes] = []
    current = b""
    for line in lines:
        if current and len(current) + len(line) > MAX_DATAGRAM:
            datagrams.append(current)
            current = b""
        current += line
    if current:
        datagrams.append(current)
    return datagrams


def parse_takeovers(datagram: bytes) -> list[tuple[str, int]]:
    """(device id, epoch) of each well-formed `EPOCH DEVICE_ID` line; others are left out."""
    if len(datagram) > MAX_DATAGRAM:
        return []
    found = [parse_takeover(line) for line in datagram.split(b"\n")]
    return [takeover for takeover in found if takeover is not None]


def parse_takeover(line: bytes) -> tuple[str, int] | None:
    """(device id, epoch) of one well-formed `EPOCH DEVICE_ID` line; None for any other."""
    if len(line) > MAX_LINE:
        return None
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    epoch, sep, device_id = text.partition(" ")
    if not sep or not epoch.isdigit() or len(epoch) > _MAX_EPOCH_DIGITS:
        return None
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        return None
    return device_id, int(epoch)


class HostDoorbell:
    """This node's doorbell socket, and the ringing of other nodes'. Open with `open`."""

    def __init__(self, directory_fd: int, listener: socket.socket, name: str) -> None:
        """Use `open`."""
        self._directory_fd = directory_fd
        self._listener = listener
        self._name = name
        self._inode = os.stat(name, dir_fd=directory_fd).st_ino
        self._sender = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_takeover: Callable[[str, int], None] | None = None
        self._outbox: dict[str, list[bytes]] = {}

    @classmethod
    def open(cls, state_dir: Path, node_id: str) -> Self:
        """Bind node `node_id`'s doorbell in `state_dir/doorbells` (made 0700), replacing a
        file a dead process of the same node id left."""
        directory = state_dir / DOORBELL_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        directory_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if stat.S_IMODE(os.stat(directory).st_mode) != 0o700:
                directory.chmod(0o700)
            name = socket_name(node_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=directory_fd)
            listener = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                listener.bind(_address(directory_fd, name))
                os.chmod(name, 0o600, dir_fd=directory_fd)
                return cls(directory_fd, listener, name)
            except BaseException:
                listener.close()
                raise
        except BaseException:
            os.close(directory_fd)
            raise

    def listen(self, on_takeover: Callable[[str, int], None]) -> None:
        """Call `on_takeover(device_id, epoch)` on the running loop for each ring heard."""
        self._on_takeover = on_takeover
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._listener.fileno(), self.read_pending)

    def ring(self, node_id: str, device_id: str, epoch: int) -> None:
        """Tell node `node_id` that a claim of `epoch` took `device_id`: sent with the other
        rings of this turn of the running loop (`send_pending`), never blocking."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self.send_pending)
        self._outbox.setdefault(node_id, []).append(takeover_line(device_id, epoch))

    def send_pending(self) -> int:
        """Send the rings asked for since the last time; how many could not be sent (no
        such socket, nobody bound, its queue full: the safety net covers them)."""
        outbox, self._outbox = self._outbox, {}
        lost = 0
        for node_id, lines in outbox.items():
            address = _address(self._directory_fd, socket_name(node_id))
            for datagram in takeover_datagrams(lines):
                try:
                    self._sender.sendto(datagram, address)
                except OSError as exc:
                    lost += datagram.count(b"\n")
                    log.debug("node %r not rung: %s", node_id, exc)
        return lost

    def read_pending(self) -> None:
        """Handle every datagram waiting (the loop calls this when the socket is readable)."""
        while True:
            try:
                data, ancillary, flags, _ = self._listener.recvmsg(
                    MAX_DATAGRAM + 1, socket.CMSG_SPACE(_UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("reading the takeover doorbell failed: %s", exc)
                return
            if flags & socket.MSG_TRUNC or _sender_uid(ancillary) != os.getuid():
                continue
            for takeover in parse_takeovers(data):
                if self._on_takeover is not None:
                    self._on_takeover(*takeover)

    def close(self) -> None:
        """Send what is pending, stop listening, close both sockets, and remove the file if
        it is still ours."""
        self.send_pending()
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._sender.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self._name, dir_fd=self._directory_fd).st_ino == self._inode:
                os.unlink(self._name, dir_fd=self._directory_fd)
        os.close(self._directory_fd)


def _address(directory_fd: int, name: str) -> str:
    """A socket address for `name` in the directory open at `directory_fd`, short whatever
    the directory's path."""
    return f"/proc/self/fd/{directory_fd}/{name}"


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            _, uid, _ = _UCRED.unpack(data[: _UCRED.size])
            return int(uid)
    return None
