"""`hub token add --count`: many devices in one transaction, their tokens in a private CSV."""

from __future__ import annotations

import csv
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hub.registry.sqlite import Registry

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 60.0


def hub(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m hub ARGS` to completion and capture its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return subprocess.run(
        [sys.executable, "-m", "hub", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def rows(text: str) -> list[list[str]]:
    """The CSV rows of `text`."""
    return list(csv.reader(io.StringIO(text)))


def authenticate(state: Path, token: str) -> str | None:
    """The device a token belongs to in `state`'s registry."""
    registry = Registry(state / "registry.sqlite3")
    try:
        return registry.authenticate(token)
    finally:
        registry.close()


def test_count_writes_a_private_csv_of_working_tokens(tmp_path: Path) -> None:
    """--count N --out FILE: a 0600 CSV of N device ids and tokens that authenticate."""
    state, out = tmp_path / "state", tmp_path / "tokens.csv"
    result = hub("token", "add", "--count", "250", "--prefix", "sim-", "--out", out,
                 "--state-dir", state)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    header, *devices = rows(out.read_text())
    assert header == ["device_id", "token"]
    assert [d for d, _ in devices] == [f"sim-{n:05d}" for n in range(1, 251)]
    assert all(authenticate(state, token) == device for device, token in devices)


def test_count_with_out_prints_no_token(tmp_path: Path) -> None:
    """With --out, stdout stays empty and stderr has the summary, never a token."""
    out = tmp_path / "tokens.csv"
    result = hub("token", "add", "--count", "3", "--out", out, "--state-dir", tmp_path / "s")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "registered 3 devices" in result.stderr
    assert "hubt_" not in result.stderr


def test_count_without_out_prints_the_csv_on_stdout(tmp_path: Path) -> None:
    """Without --out the CSV goes to stdout, the only place left for the tokens."""
    state = tmp_path / "state"
    result = hub("token", "add", "--count", "2", "--prefix", "x-", "--state-dir", state)
    assert result.returncode == 0, result.stderr
    header, *devices = rows(result.stdout)
    assert header == ["device_id", "token"]
    assert [authenticate(state, token) for _, token in devices] == ["x-00001", "x-00002"]


def test_count_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    """An existing --out file is kept as it is, and no device is registered."""
    state, out = tmp_path / "state", tmp_path / "tokens.csv"
    out.write_text("earlier tokens\n")
    result = hub("token", "add", "--count", "2", "--out", out, "--state-dir", state)
    assert result.returncode == 2
    assert out.read_text() == "earlier tokens\n"
    assert hub("token", "list", "--state-dir", state).stdout == ""


def test_count_registers_nothing_when_one_id_exists(tmp_path: Path) -> None:
    """One transaction: a clash with an existing id registers none and leaves no file."""
    state, out = tmp_path / "state", tmp_path / "tokens.csv"
    assert hub("token", "add", "sim-00002", "--state-dir", state).returncode == 0
    result = hub("token", "add", "--count", "3", "--out", out, "--state-dir", state)
    assert result.returncode == 2
    assert "sim-00002" in result.stderr
    assert not out.exists()
    listed = hub("token", "list", "--state-dir", state).stdout
    assert "sim-00001" not in listed and "sim-00003" not in listed


def test_count_and_a_device_id_together_are_refused(tmp_path: Path) -> None:
    """DEVICE_ID and --count exclude each other."""
    result = hub("token", "add", "one", "--count", "2", "--state-dir", tmp_path / "state")
    assert result.returncode == 2
    assert "not both" in result.stderr
