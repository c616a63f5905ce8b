"""`registry_url` and `node_id`: what the settings accept, refuse, and show. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.errors import ConfigError
from hub.registry.url import check_registry_url, display_url, has_password
from hub.settings import load_settings, setting_origins

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "url",
    [
        "",
        "postgresql://hub@db.example:5432/sensor_hub",
        "postgresql://hub@db.example/sensor_hub?sslmode=verify-full",
        "postgres://hub@[2001:db8::1]:5432/hub",
    ],
)
def test_empty_and_postgresql_urls_are_accepted(url: str) -> None:
    """Empty (SQLite) and postgresql://USER@HOST[:PORT]/DB, TLS options included."""
    assert check_registry_url(f"  {url} ") == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sqlite:///var/lib/hub.db", "not a sqlite URL"),
        ("mysql://hub@db/hub", "not a mysql URL"),
        ("db.example:5432", "not a db.example URL"),
        ("registry.sqlite3", "scheme-less"),
        ("postgresql://db.example/hub", "no USER"),
        ("postgresql://hub@db.example", "no DB"),
        ("postgresql://hub@/hub", "no HOST"),
        ("postgresql://hub@db.example:99999/hub", "not a URL"),
        ("postgresql://hub@db.example/hub/extra", "must have the form"),
    ],
)
def test_anything_else_is_refused_naming_the_setting(url: str, why: str) -> None:
    """Every other value is a ValueError that names `registry_url` and says why."""
    with pytest.raises(ValueError, match="registry_url") as caught:
        check_registry_url(url)
    assert why in str(caught.value)


def test_a_bad_url_from_the_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HUB_REGISTRY_URL is read like every setting, and a bad one stops the command, its
    password not repeated."""
    monkeypatch.setenv("HUB_REGISTRY_URL", "mysql://hub:pw-secret@db/hub")
    with pytest.raises(ConfigError, match="registry_url") as caught:
        load_settings()
    assert "pw-secret" not in str(caught.value)


def test_the_url_and_node_id_come_from_flag_environment_or_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Flag over HUB_ variable over TOML, and `check-config` can say which."""
    config = tmp_path / "hub.toml"
    config.write_text('registry_url = "postgresql://file@db/hub"\nnode_id = "hub-a"\n')
    monkeypatch.delenv("HUB_REGISTRY_URL", raising=False)
    monkeypatch.delenv("HUB_NODE_ID", raising=False)
    settings = load_settings(config)
    assert (settings.registry_url, settings.node_id) == ("postgresql://file@db/hub", "hub-a")
    monkeypatch.setenv("HUB_NODE_ID", "hub-b")
    settings = load_settings(config, registry_url="postgresql://flag@db/hub")
    assert (settings.registry_url, settings.node_id) == ("postgresql://flag@db/hub", "hub-b")
    origins = setting_origins(config, registry_url="postgresql://flag@db/hub")
    assert (origins["registry_url"], origins["node_id"]) == ("flag", "environment")
    assert load_settings(None).registry_url == ""


@pytest.mark.parametrize("node_id", ["x" * 201, "hub\n1", "hub\x00"])
def test_node_ids_are_short_and_printable(node_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node id is at most 200 printable characters (it is shown and logged)."""
    monkeypatch.delenv("HUB_NODE_ID", raising=False)
    with pytest.raises(ConfigError, match="node_id"):
        load_settings(node_id=node_id)


def test_passwords_are_never_shown() -> None:
    """`display_url` masks a password (even one holding / or @) and keeps the rest."""
    assert display_url("postgresql://hub:p@ss/w@db:5432/hub?x=1") == (
        "postgresql://hub:***@db:5432/hub?x=1"
    )
    assert display_url("postgresql://hub@db/hub") == "postgresql://hub@db/hub"
    assert has_password("postgresql://hub:pw@db/hub")
    assert not has_password("postgresql://hub@db/hub") and not has_password("")
