"""The MicroPython client's files run on a real MicroPython (1.27, WebAssembly port).

The port has no `socket`, so what needs one (ws.py's `open` and the `select.poll` wait of
`service`) runs on CPython only, in tests/test_micropython_client.py. Everything else runs
here on MicroPython and must print exactly what CPython prints: the codec, framing, buffer,
policy and clock, the handshake text and its answer, the WebSocket shell's frame handling
(pong, fragments, close echo) over an in-memory socket, and the client's handling of acks
and configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from tests.micropython_port import LIBRARY, run_on_micropython

pytestmark = pytest.mark.e2e

PROGRAM = Path(__file__).parent / "micropython" / "pure_modules.py"


def run_on_cpython(program: Path) -> subprocess.CompletedProcess[str]:
    """Run `program` on this CPython with the client library importable."""
    env = {**os.environ, "PYTHONPATH": str(LIBRARY)}
    return subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, check=False, env=env,
        timeout=60,
    )  # fmt: skip


def test_pure_modules_behave_the_same_on_micropython() -> None:
    """Every encoding, frame, parsed frame and decision is byte-identical on both."""
    micro = run_on_micropython(PROGRAM)
    assert micro.returncode == 0, micro.stderr
    cpython = run_on_cpython(PROGRAM)
    assert cpython.returncode == 0, cpython.stderr
    lines = micro.stdout.splitlines()
    assert lines[-1] == "done"
    assert len(lines) > 60
    assert lines == cpython.stdout.splitlines()


def test_micropython_encodings_are_canonical_msgpack() -> None:
    """What MicroPython encoded, the msgpack package decodes and encodes to the same bytes."""
    micro = run_on_micropython(PROGRAM)
    assert micro.returncode == 0, micro.stderr
    checked = 0
    for line in micro.stdout.splitlines():
        label, _, data = line.partition(": ")
        if label.startswith(("encode", "timestamp", "message", "client message")):
            packed = bytes.fromhex(data)
            value = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            assert msgpack.packb(value, use_bin_type=True) == packed, label
            checked += 1
    assert checked > 45
