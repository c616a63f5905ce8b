"""The suite's token leak watch fails a run in which a hub log record holds a token, also
when the tests run in parallel runners (pytest-xdist), where a runner's own exit status
does not decide the run's: each runner hands what it found to the controller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent
RUN_TIMEOUT_S = 120.0


@pytest.mark.parametrize("runners", [[], ["-n", "2"]], ids=["one-process", "two-runners"])
def test_a_leaked_token_fails_the_run(runners: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *runners,
         "tests/leak_probe"],
        cwd=ROOT,
        env={**os.environ, "SENSOR_HUB_LEAK_PROBE": "1"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "1 passed" in output, output[-3000:]
    assert result.returncode == 1, output[-3000:]
    assert "1 log lines hold a device token" in output, output[-3000:]
    assert "hubt_" + "A" * 43 not in output  # the report masks it
