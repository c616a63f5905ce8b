"""A real MicroPython to run the client's pure modules on: the WebAssembly port (npm
package `@micropython/micropython-webassembly-pyscript`), run by Node.js.

No unix port of MicroPython is packaged for Debian or PyPI; this one is MicroPython's own
interpreter and standard modules, without `socket`. It is installed with npm on first use
into ~/.cache/sensor-hub (Node.js and npm with apt-get if missing), like the suite's
InfluxDB.
"""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

from tests.packages import install_missing

PACKAGE = "@micropython/micropython-webassembly-pyscript"
VERSION = "1.27.0"
CACHE = Path.home() / ".cache" / "sensor-hub" / f"micropython-wasm-{VERSION}"
ENTRY = CACHE / "node_modules" / PACKAGE / "micropython.mjs"
RUNNER = Path(__file__).parent / "micropython" / "run.mjs"
LIBRARY = Path(__file__).parent.parent / "clients" / "micropython"
INSTALL_TIMEOUT_S = 300


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT_S
    )


def ensure_micropython() -> Path:
    """The port's entry module, installed if missing; raise with the reason if it cannot be."""
    if ENTRY.exists():
        return ENTRY
    install_missing({"node": "nodejs", "npm": "npm"})
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE.parent / f"{CACHE.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another of the suite's runners may be installing
        if ENTRY.exists():
            return ENTRY
        result = _run(
            ["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund",
             f"{PACKAGE}@{VERSION}"]
        )  # fmt: skip
    if result.returncode != 0 or not ENTRY.exists():
        raise RuntimeError(f"could not install {PACKAGE}@{VERSION}:\n{result.stderr[-2000:]}")
    return ENTRY


def run_on_micropython(program: Path, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `program` on MicroPython with the client library at /lib/sensorhub."""
    entry = ensure_micropython()
    return subprocess.run(
        ["node", str(RUNNER), str(entry), str(LIBRARY), str(program)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
