"""`hub check-config`: validates what `hub serve` would load and prints it, secrets masked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from hub.cli.check import describe, toml_value
from hub.settings import Settings

RUN_TIMEOUT_S = 30.0
TOKEN = "s3cr3t-influx-token"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The test's environment without HUB_ variables or credentials, state in a temp dir."""
    dropped = {"STATE_DIRECTORY", "CREDENTIALS_DIRECTORY"}
    clean = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("HUB_") and name not in dropped
    }
    clean["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    return clean


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config file with a URL and a token."""
    path = tmp_path / "hub.toml"
    path.write_text(f'influx_url = "http://db:8086"\ninflux_token = "{TOKEN}"\nport = 9000\n')
    return path


def check_config(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m hub check-config ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "hub", "check-config", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


def setting(output: str, name: str) -> tuple[str, str]:
    """The value printed for setting `name` (`None` if not set), and its origin comment."""
    for line in output.splitlines():
        if match := re.fullmatch(rf"{name} = (.*?)\s+# (.*)", line):
            return match.group(1), match.group(2)
        if match := re.fullmatch(rf"# {name} is not set\s+# (.*)", line):
            return "None", match.group(1)
    raise AssertionError(f"{name} not in:\n{output}")


# --- The command ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_prints_every_setting_with_the_token_masked(env: dict[str, str], config: Path) -> None:
    """Exit 0; every setting is printed, the token as *** and nowhere in clear."""
    result = check_config(env, "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "configuration OK\n"
    assert TOKEN not in result.stdout
    assert setting(result.stdout, "influx_token") == ('"***"', "config file")
    assert setting(result.stdout, "influx_url") == ('"http://db:8086"', "config file")
    for name in Settings.model_fields:
        setting(result.stdout, name)


@pytest.mark.e2e
def test_says_where_each_value_comes_from(
    tmp_path: Path, env: dict[str, str], config: Path
) -> None:
    """Flag over environment over credential over file over default, as `hub serve` loads."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "influx_org").write_text("from-credential\n")
    (credentials / "influx_bucket").write_text("")  # empty: not given
    env.update(HUB_PORT="9100", CREDENTIALS_DIRECTORY=str(credentials))
    state = tmp_path / "state"
    result = check_config(env, "--config", config, "--state-dir", state)
    assert result.returncode == 0, result.stderr
    assert setting(result.stdout, "state_dir") == (f'"{state}"', "flag")
    assert setting(result.stdout, "port") == ("9100", "environment")
    assert setting(result.stdout, "influx_org") == ('"from-credential"', "credential")
    assert setting(result.stdout, "influx_url") == ('"http://db:8086"', "config file")
    assert setting(result.stdout, "influx_bucket") == ('"sensors"', "default")


@pytest.mark.e2e
def test_marks_the_settings_a_sighup_reloads(env: dict[str, str], config: Path) -> None:
    """Live settings say so; others do not."""
    result = check_config(env, "--config", config)
    assert setting(result.stdout, "max_connections") == ("20000", "default, SIGHUP reloads")
    assert setting(result.stdout, "port")[1] == "config file"


@pytest.mark.e2e
def test_an_invalid_value_fails_naming_it(tmp_path: Path, env: dict[str, str]) -> None:
    """A bad value exits 2 with the setting named, and prints no configuration."""
    config = tmp_path / "hub.toml"
    config.write_text('port = "eighty"\n')
    result = check_config(env, "--config", config)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: invalid settings: port: ")


@pytest.mark.e2e
def test_an_unknown_setting_fails(tmp_path: Path, env: dict[str, str]) -> None:
    """A misspelt key is an error, not ignored."""
    config = tmp_path / "hub.toml"
    config.write_text('influx_ulr = "http://db:8086"\n')
    result = check_config(env, "--config", config)
    assert result.returncode == 2
    assert "influx_ulr: Extra inputs are not permitted" in result.stderr


@pytest.mark.e2e
def test_a_missing_config_file_fails(tmp_path: Path, env: dict[str, str]) -> None:
    """A config file that does not exist is named in the error."""
    result = check_config(env, "--config", tmp_path / "nope.toml")
    assert result.returncode == 2
    assert result.stderr == f"error: config file {tmp_path / 'nope.toml'} does not exist\n"


@pytest.mark.e2e
def test_a_broken_schema_file_fails(tmp_path: Path, env: dict[str, str]) -> None:
    """The measurement schema file is validated too."""
    schemas = tmp_path / "schemas.toml"
    schemas.write_text("[measurements.environment.fields]\ntemperature = { type = 'complex' }\n")
    env["HUB_SCHEMAS"] = str(schemas)
    result = check_config(env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: schema file {schemas}: ")


@pytest.mark.e2e
def test_a_v1_token_without_a_password_fails(env: dict[str, str]) -> None:
    """For the v1 API the token must be user:password."""
    env.update(HUB_INFLUX_URL="http://db:8086", HUB_INFLUX_API="v1", HUB_INFLUX_TOKEN=TOKEN)
    result = check_config(env)
    assert result.returncode == 2
    assert "user:password" in result.stderr
    assert TOKEN not in result.stderr


# --- The pure parts -----------------------------------------------------------------------------


@pytest.mark.unit
def test_secrets_and_url_passwords_are_masked() -> None:
    """SecretStr values and the user:password of a URL print as ***."""
    assert toml_value(SecretStr(TOKEN)) == '"***"'
    assert toml_value("http://admin:pw@db:8086/") == '"http://***@db:8086/"'


@pytest.mark.unit
def test_values_print_as_toml() -> None:
    """Booleans, numbers, lists and paths print as TOML values."""
    assert toml_value(True) == "true"
    assert toml_value(0.05) == "0.05"
    assert toml_value(["https://a", "https://b"]) == '["https://a", "https://b"]'
    assert toml_value(Path("/var/lib/sensor-hub")) == '"/var/lib/sensor-hub"'


@pytest.mark.unit
def test_describe_lines_up_the_origins(tmp_path: Path) -> None:
    """One line per setting, origin comments in one column."""
    lines = describe(Settings(state_dir=tmp_path), {"state_dir": "flag"})
    assert len(lines) == len(Settings.model_fields)
    assert len({line.index("  # ") for line in lines}) == 1
    assert lines[0].endswith("# flag")
