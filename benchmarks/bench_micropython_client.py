"""What the MicroPython client costs: RAM per buffered reading, encode and mask time.

    .venv/bin/python -m benchmarks.bench_micropython_client     (from the repository root)

Runs benchmarks/micropython/client_costs.py on MicroPython 1.27 (the WebAssembly port under
Node.js, installed on first use like the test suite's, see tests/micropython_port.py) and on
this CPython, and prints both. RAM figures come from MicroPython's `gc.mem_alloc()` (a
board's heap counts the same objects; its CPU is far slower than this machine's, so times are
relative: compare the chunked and byte-wise masking on the same interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.micropython_port import LIBRARY, run_on_micropython

PROGRAM = Path(__file__).parent / "micropython" / "client_costs.py"


def main() -> None:
    """Run the program on both interpreters and print their figures side by side."""
    micro = run_on_micropython(PROGRAM, timeout_s=300)
    if micro.returncode != 0:
        raise SystemExit(f"MicroPython run failed:\n{micro.stderr}")
    env = {**os.environ, "PYTHONPATH": str(LIBRARY)}
    cpython = subprocess.run(
        [sys.executable, str(PROGRAM)], capture_output=True, text=True, check=True, env=env
    )
    theirs = dict(line.split(": ") for line in cpython.stdout.splitlines())
    print(f"{'figure':32} {'MicroPython 1.27 (wasm)':>24} {'CPython':>10}")
    for line in micro.stdout.splitlines():
        name, value = line.split(": ")
        print(f"{name:32} {value:>24} {theirs.get(name, '-'):>10}")


if __name__ == "__main__":
    main()
