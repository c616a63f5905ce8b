"""Settings in groups (`hub.settings.GROUPS`, `hub.options`): the one map from flat names to
groups, what each part's options are built from, and a reload reaching the parts.

The flat surface itself (flags, `HUB_` variables, credentials, TOML, check-config) is tested
in test_settings*.py, test_check_config.py and test_reload_settings.py, unchanged; the
reload of an open connection's limits over a real socket in test_time_range.py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from device_sim.sensors import SCHEMA_TOML
from hub.core.measurements import MeasurementSchemas
from hub.gateway.server import Hub
from hub.ingest.deadletters import DeadLetterFile
from hub.ingest.pipeline import Pipeline
from hub.ops.metrics import HubMetrics
from hub.options import (
    BUILDERS,
    OPTION_GROUPS,
    GatewayOptions,
    HubOptions,
    is_live,
    live_changes,
)
from hub.registry.ports import HubRegistry
from hub.service import reload_parts
from hub.settings import GROUPS, LIVE_SETTINGS, Settings, reload_changes

pytestmark = pytest.mark.unit

README = Path(__file__).parent.parent / "README.md"

DERIVED = {"registry_path": "state_dir", "spool_dir": "state_dir", "dead_letter_path": "state_dir"}
"""`Settings` properties, and the flat setting each is made from."""


def test_every_flat_setting_belongs_to_exactly_one_group() -> None:
    """No setting left out, none in two groups, no group naming a setting that is not one."""
    grouped = [name for group in GROUPS.values() for name in group.settings]
    assert sorted(grouped) == sorted(Settings.model_fields)
    assert len(grouped) == len(set(grouped))


def test_every_live_setting_belongs_to_exactly_one_live_group() -> None:
    """LIVE_SETTINGS is exactly the live groups' settings, each in one of them."""
    live = [name for group in GROUPS.values() if group.live for name in group.settings]
    assert len(live) == len(set(live))
    assert set(live) == LIVE_SETTINGS
    for name in LIVE_SETTINGS:
        (owner,) = [group for group in GROUPS.values() if name in group.settings]
        assert owner.live


def test_the_readme_marks_exactly_the_live_settings() -> None:
    """The README's settings table says *live* for each live setting and no other."""
    text = README.read_text()
    table = text[text.index("| setting | default | meaning |") :]
    table = table[: table.index("\n\n")]
    marked: set[str] = set()
    for row in table.splitlines():
        names = re.findall(r"`(\w+)`", row.split("|")[1])
        if "*live*" in row:
            marked.update(names)
    also = re.search(r"`(\w+)` and `(\w+)` are \*live\* too", text)
    assert also is not None
    marked.update(also.groups())
    assert marked == LIVE_SETTINGS


class _Reads:
    """A stand-in for `Settings` that records which settings are read."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.read: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.read.add(DERIVED.get(name, name))
        return getattr(self._settings, name)


@pytest.mark.parametrize("options", list(OPTION_GROUPS), ids=lambda cls: cls.__name__)
def test_each_options_object_is_built_from_its_groups_only(options: type[Any]) -> None:
    """What `of(settings)` reads is within the groups it names; and it reads something of
    each of them."""
    reads = _Reads(Settings())
    BUILDERS[options](cast(Settings, reads))
    groups = {name: GROUPS[name].settings for name in OPTION_GROUPS[options]}
    allowed = {setting for settings in groups.values() for setting in settings}
    assert reads.read <= allowed, f"reads settings of other groups: {reads.read - allowed}"
    for name, settings in groups.items():
        assert reads.read & set(settings), f"names group {name} but reads none of it"


def test_every_setting_reaches_some_part() -> None:
    """Each flat setting is read by at least one part's options (`HubOptions` builds them
    all; the CLI reads the rest itself): none is dropped on the way to the parts."""
    reads = _Reads(Settings())
    HubOptions.of(cast(Settings, reads))
    # log_format is the CLI's: it installs the handler before the service exists.
    assert set(Settings.model_fields) - reads.read == set()


def test_every_options_object_has_its_groups_and_its_builder() -> None:
    """The two tables name the same types."""
    assert set(BUILDERS) == set(OPTION_GROUPS)


def test_liveness_of_each_options_object_follows_from_its_groups() -> None:
    """Live exactly when one of its groups is: those a reload replaces in the parts."""
    live = {cls.__name__ for cls in OPTION_GROUPS if is_live(cls)}
    assert live == {
        "AdmissionOptions",
        "SessionLimits",
        "BatchOptions",
        "LogOptions",
        "SchemaOptions",
        "DrainOptions",
    }


def _changed(name: str, settings: Settings, schema_file: Path) -> object:
    """A valid value for live setting `name` other than the one in `settings`."""
    value = getattr(settings, name)
    if name == "schemas":
        return schema_file
    if name == "log_level":
        return "DEBUG" if value != "DEBUG" else "INFO"
    if name == "min_time":
        return "2020-01-01T00:00:00Z"
    assert isinstance(value, int | float), name
    return value * 2


@pytest.fixture
def root_level() -> Iterator[None]:
    """The root logger's level put back after a test that reloads `log_level`."""
    root, websockets = logging.getLogger(), logging.getLogger("websockets")
    levels = root.level, websockets.level
    yield
    root.setLevel(levels[0])
    websockets.setLevel(levels[1])


@pytest.mark.parametrize("name", sorted(LIVE_SETTINGS))
async def test_a_reload_changing_each_live_setting_reaches_its_part(
    name: str, tmp_path: Path, root_level: None
) -> None:
    """The gateway, the pipeline, the log level or the schemas: after `reload_parts`, each
    part holds the options built from the reloaded settings, which differ from before."""
    schema_file = tmp_path / "schemas.toml"
    schema_file.write_text(SCHEMA_TOML)
    settings = Settings(state_dir=tmp_path)
    current = HubOptions.of(settings)
    pipeline = Pipeline(None, DeadLetterFile(tmp_path / "dead.jsonl", 2**20), current.batch)
    registry = cast(HubRegistry, _Unstarted())
    hub = Hub(
        current.gateway, registry, MeasurementSchemas(), pipeline, HubMetrics(), node_id="hub-test"
    )
    fresh = HubOptions.of(settings.model_copy(update={name: _changed(name, settings, schema_file)}))
    applied = reload_parts(hub, current, fresh)
    assert applied == sorted(live_changes(current, fresh))
    assert (hub.options, pipeline.options) == (fresh.gateway, fresh.batch)
    if name == "log_level":  # the suite's own level otherwise (its token-leak watch)
        assert logging.getLogger().level == logging.getLevelName(fresh.log.level)
    if name == "schemas":
        assert "environment" in hub.schemas.source.measurements
        assert applied == ["schemas"]
    else:
        (path,) = applied  # exactly the part whose group the setting is in
        assert path in {"gateway.admission", "gateway.session", "gateway.drain", "batch", "log"}
        assert hub.schemas.source.measurements == {}


def test_a_restart_only_change_hands_nothing_to_the_parts(tmp_path: Path) -> None:
    """As the service reloads: only live settings are taken over (`reload_changes`), so a
    change of restart-only settings, even of a live part's (batch_size), changes no part."""
    current = Settings(state_dir=tmp_path)
    fresh = current.model_copy(update={"batch_size": 7, "port": 1, "max_message_bytes": 9})
    live, restart = reload_changes(current, fresh)
    assert (live, sorted(restart)) == ({}, ["batch_size", "max_message_bytes", "port"])
    reloaded = current.model_copy(update=live)
    assert live_changes(HubOptions.of(current), HubOptions.of(reloaded)) == {}


def test_gateway_options_hold_the_session_and_reading_limits_of_the_settings() -> None:
    """One `Settings` gives one set of options; built twice, the same (frozen, comparable)."""
    settings = Settings(device_messages_per_s=3, max_fields_per_reading=9)
    gateway = GatewayOptions.of(settings)
    assert gateway == GatewayOptions.of(settings)
    assert (gateway.session.messages_per_s, gateway.readings.max_fields) == (3, 9)
    with pytest.raises(AttributeError):
        gateway.listen.port = 1  # type: ignore[misc]


class _Unstarted:
    """A registry a hub that never starts is built with: only the takeover watch is
    registered at construction (hub.gateway.ownership); nothing is called."""

    def watch_takeovers(self, listener: object, missed: object) -> None:
        """Registered, never rung."""
