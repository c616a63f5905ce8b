"""The `hub` command as real subprocesses, and where its settings come from."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer
from hub.errors import ConfigError
from hub.registry.sqlite import TOKEN_PREFIX, Registry
from hub.settings import load_settings
from tests.support import HubProcess, points

RUN_TIMEOUT_S = 30.0


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment without HUB_ variables, whose default state dir is a fresh temp dir.

    The test process's own environment is cleaned the same way, for `load_settings`.
    """
    for name in list(os.environ):
        if name.startswith("HUB_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    return dict(os.environ)


def hub(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m hub ARGS` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def registry_of(state_dir: Path) -> Registry:
    """The registry the hub keeps in `state_dir`."""
    return Registry(state_dir / "registry.sqlite3")


def authenticate(state_dir: Path, token: str) -> str | None:
    """The device a token authenticates as in `state_dir`'s registry."""
    registry = registry_of(state_dir)
    try:
        return registry.authenticate(token)
    finally:
        registry.close()


def add_device(state_dir: Path, device_id: str) -> str:
    """Register a device directly and return its token."""
    registry = registry_of(state_dir)
    try:
        return registry.add(device_id)
    finally:
        registry.close()


HEAVY_FOR_THE_CLI = ("influxdb_client", "aiohttp", "numpy", "websockets", "uvloop")
"""What only `hub serve` and `hub spool replay` need: imported inside them, not by every
`hub` command (the InfluxDB client alone is ~0.4 s of start-up, paid on every `hub config
set`)."""


@pytest.mark.integration
def test_the_command_starts_without_what_only_serving_needs(env: dict[str, str]) -> None:
    probe = (
        "import sys, hub.cli.app; "
        f"print(' '.join(m for m in {HEAVY_FOR_THE_CLI!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=True,
    )
    assert result.stdout.split() == []


# --- hub token --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_token_add_prints_only_the_token(env: dict[str, str], tmp_path: Path) -> None:
    """`token add` prints one line on stdout, the token, which authenticates as the device."""
    state = tmp_path / "state"
    result = hub(env, "token", "add", "sensor-1", "--state-dir", state)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    token = result.stdout.rstrip("\n")
    assert token.startswith(TOKEN_PREFIX)
    assert authenticate(state, token) == "sensor-1"


@pytest.mark.e2e
def test_token_list_shows_devices_never_tokens(env: dict[str, str], tmp_path: Path) -> None:
    """`token list` names each device as active and shows no token, on stdout or stderr."""
    state = tmp_path / "state"
    tokens = [add_device(state, "sensor-1"), add_device(state, "sensor-2")]
    result = hub(env, "token", "list", "--state-dir", state)
    assert result.returncode == 0, result.stderr
    listed = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [row[:2] for row in listed] == [["sensor-1", "active"], ["sensor-2", "active"]]
    output = result.stdout + result.stderr
    assert TOKEN_PREFIX not in output
    assert not any(token[len(TOKEN_PREFIX) :] in output for token in tokens)


@pytest.mark.e2e
def test_token_revoke_disables_the_token(env: dict[str, str], tmp_path: Path) -> None:
    """After `token revoke` the token no longer authenticates and the device lists as revoked."""
    state = tmp_path / "state"
    token = add_device(state, "sensor-1")
    revoked = hub(env, "token", "revoke", "sensor-1", "--state-dir", state)
    assert revoked.returncode == 0, revoked.stderr
    assert authenticate(state, token) is None
    listed = hub(env, "token", "list", "--state-dir", state)
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [
        ["sensor-1", "revoked"]
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("device_id", ["-starts-with-dash", "has space", "x" * 129, "ünï"])
def test_token_add_refuses_an_invalid_device_id(
    env: dict[str, str], tmp_path: Path, device_id: str
) -> None:
    """An invalid device id exits non-zero, says why on stderr and prints nothing on stdout."""
    result = hub(env, "token", "add", "--state-dir", tmp_path / "state", "--", device_id)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "invalid device id" in result.stderr


@pytest.mark.e2e
def test_token_add_refuses_a_duplicate_device_id(env: dict[str, str], tmp_path: Path) -> None:
    """Adding an existing device exits non-zero and says it exists; its token keeps working."""
    state = tmp_path / "state"
    token = add_device(state, "sensor-1")
    result = hub(env, "token", "add", "sensor-1", "--state-dir", state)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "already exists" in result.stderr
    assert authenticate(state, token) == "sensor-1"


@pytest.mark.e2e
def test_token_revoke_of_an_unknown_device_fails(env: dict[str, str], tmp_path: Path) -> None:
    """Revoking a device that is not registered exits non-zero and names it on stderr."""
    result = hub(env, "token", "revoke", "ghost", "--state-dir", tmp_path / "state")
    assert result.returncode != 0
    assert "no device 'ghost'" in result.stderr


# --- Settings precedence ----------------------------------------------------------------------


@pytest.mark.unit
def test_settings_precedence_flag_over_env_over_config_file(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each setting comes from the flag, else HUB_ env var, else config file, else default."""
    config = tmp_path / "hub.toml"
    config.write_text(
        'state_dir = "/from/config"\nbatch_size = 10\nflush_interval_s = 0.5\nlog_level = "ERROR"\n'
    )
    monkeypatch.setenv("HUB_BATCH_SIZE", "20")
    monkeypatch.setenv("HUB_LOG_LEVEL", "WARNING")
    settings = load_settings(config, log_level="DEBUG", port=None)
    assert settings.log_level == "DEBUG"  # flag over env and file
    assert settings.batch_size == 20  # env over file
    assert settings.flush_interval_s == 0.5  # file over default
    assert settings.state_dir == Path("/from/config")  # file over default
    assert settings.port == 8765  # default: a flag given as None counts as not given


@pytest.mark.unit
def test_settings_config_file_from_hub_config(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HUB_CONFIG names the config file when --config is not given."""
    config = tmp_path / "hub.toml"
    config.write_text("batch_size = 123\n")
    monkeypatch.setenv("HUB_CONFIG", str(config))
    assert load_settings().batch_size == 123


@pytest.mark.unit
def test_settings_config_flag_over_hub_config(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config wins over HUB_CONFIG."""
    (tmp_path / "env.toml").write_text("batch_size = 1\n")
    (tmp_path / "flag.toml").write_text("batch_size = 2\n")
    monkeypatch.setenv("HUB_CONFIG", str(tmp_path / "env.toml"))
    assert load_settings(tmp_path / "flag.toml").batch_size == 2


@pytest.mark.unit
def test_settings_bad_config_file_is_a_config_error(env: dict[str, str], tmp_path: Path) -> None:
    """A config file that is not TOML raises ConfigError naming the file."""
    config = tmp_path / "hub.toml"
    config.write_text("batch_size = \n")
    with pytest.raises(ConfigError, match=r"hub\.toml"):
        load_settings(config)


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["env", "config-flag", "hub-config-env"])
def test_cli_finds_the_state_dir_from_every_source(
    env: dict[str, str], tmp_path: Path, source: str
) -> None:
    """`token list` uses the state dir given by HUB_STATE_DIR, --config or HUB_CONFIG."""
    state = tmp_path / "state"
    add_device(state, "sensor-1")
    config = tmp_path / "hub.toml"
    config.write_text(f"state_dir = {str(state)!r}\n")
    args: list[str | Path] = ["token", "list"]
    if source == "env":
        env["HUB_STATE_DIR"] = str(state)
    elif source == "config-flag":
        args += ["--config", config]
    else:
        env["HUB_CONFIG"] = str(config)
    result = hub(env, *args)
    assert result.returncode == 0, result.stderr
    assert "sensor-1" in result.stdout


@pytest.mark.e2e
def test_cli_state_dir_precedence(env: dict[str, str], tmp_path: Path) -> None:
    """--state-dir beats HUB_STATE_DIR, which beats the config file's state_dir."""
    for name in ("flag", "env", "file"):
        add_device(tmp_path / name, f"in-{name}")
    config = tmp_path / "hub.toml"
    config.write_text(f"state_dir = {str(tmp_path / 'file')!r}\n")
    env["HUB_STATE_DIR"] = str(tmp_path / "env")
    from_env = hub(env, "token", "list", "--config", config)
    from_flag = hub(env, "token", "list", "--config", config, "--state-dir", tmp_path / "flag")
    assert (from_env.returncode, from_flag.returncode) == (0, 0)
    assert [line.split()[0] for line in from_env.stdout.splitlines()[1:]] == ["in-env"]
    assert [line.split()[0] for line in from_flag.stdout.splitlines()[1:]] == ["in-flag"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("state_dir = \n", "config file"),
        ("no_such_setting = 1\n", "no_such_setting"),
        ('batch_size = "many"\n', "batch_size"),
    ],
    ids=["missing", "not-toml", "unknown-key", "wrong-type"],
)
def test_cli_bad_config_file_fails_clearly(
    env: dict[str, str], tmp_path: Path, content: str | None, message: str
) -> None:
    """A missing, unparsable or invalid config file exits non-zero with an error on stderr."""
    config = tmp_path / "hub.toml"
    if content is not None:
        config.write_text(content)
    result = hub(env, "token", "list", "--config", config)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "xdg-state").exists()


# --- hub serve ----------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_serve_stores_readings_stops_on_sigterm_and_never_logs_the_token(
    env: dict[str, str], tmp_path: Path, influxdb: LocalServer, influx_db_name: str
) -> None:
    """A real `hub serve` acks and stores readings, exits 0 on SIGTERM, and logs no token."""
    state = tmp_path / "state"
    token = add_device(state, "sensor-1")
    async with HubProcess(state, influxdb, influx_db_name, "--log-level", "DEBUG") as process:
        client = DeviceClient(process.url, token, token_in_query=True)
        await client.connect()
        try:
            readings = [{"name": "env", "fields": {"temp": 20.0 + n}} for n in range(3)]
            ack = await asyncio.wait_for(client.store(readings), 10)
            assert (ack.accepted, ack.rejected) == (3, [])
            stored = points(influxdb, influx_db_name, "env")
            assert sorted(row["temp"] for row in stored) == [20.0, 21.0, 22.0]
            assert {row["device"] for row in stored} == {"sensor-1"}
            # SIGTERM with the device still connected; stop() bounds the wait.
            assert await process.stop() == 0
        finally:
            await client.close()
        log = process.log
    assert " DEBUG " in log and "sensor-1" in log  # the output really was captured, verbosely
    assert token[len(TOKEN_PREFIX) :] not in log
