"""The local server launchers install nothing: they start what is installed, and otherwise
say which Debian package is missing and the command that installs it."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device_sim import demo as demo_module
from device_sim import local_servers
from device_sim.cli import app as cli_app
from device_sim.local_servers import ServerError, missing_packages, require_installed
from tests.packages import install_missing

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("hub", "device_sim", "sensorhub_client", "schemas")


@pytest.fixture
def no_influxd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """InfluxDB's binary pointed at a path where nothing is installed."""
    absent = tmp_path / "usr/bin/influxd"
    monkeypatch.setattr(local_servers, "INFLUXD", absent)
    monkeypatch.setattr(demo_module, "INFLUXD", absent)
    monkeypatch.setitem(local_servers.PACKAGES, absent, "influxdb")
    return absent


def test_a_missing_server_names_its_package_and_the_command(no_influxd: Path) -> None:
    assert missing_packages(no_influxd) == ["influxdb"]
    with pytest.raises(ServerError) as raised:
        require_installed(no_influxd)
    message = str(raised.value)
    assert str(no_influxd) in message
    assert "Debian package influxdb" in message
    assert "`sudo apt-get install influxdb`" in message


def test_starting_a_missing_server_fails_before_starting_anything(
    no_influxd: Path, tmp_path: Path
) -> None:
    # The unit guard (tests/layers.py) would fail this test if a process were started.
    with pytest.raises(ServerError, match="install the Debian package influxdb"):
        local_servers.start_influxdb(tmp_path / "servers")
    assert not (tmp_path / "servers").exists()


def test_the_demo_says_what_is_missing_and_exits_2(
    no_influxd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert asyncio.run(demo_module.demo(devices=1, duration=1, rate=1, batch=1)) == 2
    err = capsys.readouterr().err
    assert f"{no_influxd} is missing" in err
    assert "`sudo apt-get install influxdb`" in err


def test_the_benchmark_says_what_is_missing_and_exits_2(no_influxd: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["bench", "--smoke", "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"{no_influxd} is missing" in result.output
    assert "`sudo apt-get install influxdb`" in result.output


def test_installed_binaries_need_no_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = tmp_path / "influxd"
    present.write_bytes(b"")
    monkeypatch.setitem(local_servers.PACKAGES, present, "influxdb")
    assert missing_packages(present) == []
    require_installed(present)


def test_nothing_is_installed_when_nothing_is_missing() -> None:
    # Would start apt-get (and trip the unit guard) if it tried to install anything.
    install_missing({"anything": "some-package"}, present=lambda tool: True)


def test_no_package_code_runs_apt_get() -> None:
    """No module that ships in the distribution has "apt-get" as a command argument; the
    messages that tell the operator to run it are text, not a command."""
    found = []
    for directory in PACKAGE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in {"apt-get", "apt", "dpkg"}:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
