"""`device-sim chaos` end to end: the real command, its real servers, its report.

The run is short (45 s of faults, 1.5 s holds, 1 s pauses) with a fixed seed; every kind of
fault happens in the plan's first round whatever the seed, and the run never ends before that
round did. The report must show nothing acked lost, every check held, and every process the
run started gone afterwards, also when the run is interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from device_sim.chaos.plan import FaultKind
from tests.packages import ensure_haproxy, ensure_postgres

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 900.0
"""Far above a run's ~2 minutes on a loaded box: only a hang reaches it."""
STOP_S = 120.0
TEST_TIMEOUT_S = RUN_TIMEOUT_S + STOP_S + 60
"""Over the suite's 120 s per test: a run that finds readings missing waits up to its 120 s
`converge_s` for them before it reports, and must get to say so (and be stopped by
`finish`), not be cut off by pytest-timeout with its processes left running."""


def start_chaos(out: Path, *args: str) -> subprocess.Popen[str]:
    """`device-sim chaos` as a real process, its output to `out/chaos.log`."""
    ensure_postgres()
    ensure_haproxy()
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "chaos.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "device_sim", "chaos", "--out", str(out / "run"), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float) -> int:
    """Wait for the run; past `timeout_s`, SIGTERM it (it cleans up), then SIGKILL."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise AssertionError(f"device-sim chaos still running after {timeout_s} s") from None


def still_running(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The processes of the report that are still alive (not even zombies count as gone)."""
    alive = []
    for process in report["processes"]:
        try:
            state = Path(f"/proc/{process['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(process)
    return alive


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_short_chaos_run_loses_nothing_acked_and_does_every_kind_of_fault(
    tmp_path: Path,
) -> None:
    """45 s of faults with seed 12: every kind at least once, lost = 0, every check ok,
    exit status 0, every process stopped."""
    process = start_chaos(
        tmp_path,
        "--duration", "45", "--devices", "24", "--seed", "12", "--hold", "1.5", "--pause", "1",
    )  # fmt: skip
    status = finish(process, RUN_TIMEOUT_S)
    output = (tmp_path / "chaos.log").read_text()
    report = json.loads((tmp_path / "run" / "chaos.json").read_text())
    print(output[-6000:])
    failed = {name: c for name, c in report.get("checks", {}).items() if not c["ok"]}
    assert status == 0, f"exit {status}; failed checks {failed}; error {report.get('error')}"
    assert report["ok"] and not failed
    assert report["lost"]["lost"] == 0 and report["acked"] > 0
    assert set(report["faults_by_kind"]) == {str(kind) for kind in FaultKind}
    assert all(count >= 1 for count in report["faults_by_kind"].values()), report["faults_by_kind"]
    assert report["reconnect_after_kills"]["devices_cut"] > 0, "no kill cut a device: no test"
    assert report["pushes"]["pushes"] >= 1
    assert report["pushes"]["all_applied"] == report["pushes"]["pushes"]
    assert "seed 12" in output and "--seed 12" in report["command"]
    assert "connected 24/24" in output, "no progress line with the whole fleet connected"
    kinds = {p["name"] for p in report["processes"]}
    assert {"postgres", "influxdb", "haproxy", "hub-1", "hub-4", "hub-4 worker"} <= kinds
    assert still_running(report) == []


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_ctrl_c_stops_every_process_it_started(tmp_path: Path) -> None:
    """SIGINT once faults began: the run ends with a status other than 0, its partial report
    names the processes it started, and none of them is left running."""
    process = start_chaos(tmp_path, "--duration", "600", "--devices", "6", "--seed", "3",
                          "--hold", "1", "--pause", "1")  # fmt: skip
    log = tmp_path / "chaos.log"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while "fault 2:" not in log.read_text():
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no fault began"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGINT)
    status = finish(process, STOP_S)
    report = json.loads((tmp_path / "run" / "chaos.json").read_text())
    assert status != 0
    assert report["ok"] is False
    assert report["error"].startswith(("CancelledError", "KeyboardInterrupt")), report["error"]
    assert len(report["processes"]) >= 7, report["processes"]
    assert still_running(report) == []
