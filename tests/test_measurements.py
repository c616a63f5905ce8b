"""Measurement schemas and reading validation, without sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from hub.core.measurements import (
    MeasurementSchemas,
    ReadingsValidator,
    SchemaFile,
    load_schema_file,
)
from hub.errors import ConfigError

pytestmark = pytest.mark.unit

SCHEMA_TOML = """
accept_unknown_measurements = false

[measurements.environment]
tags = ["room"]
[measurements.environment.fields]
temperature = { type = "float", min = -40, max = 85, required = true }
count = { type = "int", min = 0 }
door_open = { type = "bool" }
state = { type = "string" }
"""

MS = 10**6


@pytest.fixture
def strict(tmp_path: Path) -> ReadingsValidator:
    path = tmp_path / "schemas.toml"
    path.write_text(SCHEMA_TOML)
    return MeasurementSchemas(load_schema_file(path)).validator(MS)


@pytest.fixture
def generic() -> ReadingsValidator:
    return MeasurementSchemas().validator(MS)


def env(**fields: Any) -> dict[str, Any]:
    return {"name": "environment", "fields": fields}


def test_generic_numbers_become_floats(generic: ReadingsValidator) -> None:
    """Without a schema, integers are stored as floats; bools and strings stay."""
    valid, rejected = generic.validate([{"name": "m", "fields": {"a": 21, "b": True, "c": "21"}}])
    assert rejected == {}
    assert valid[0]["fields"] == {"a": 21.0, "b": True, "c": "21"}
    assert type(valid[0]["fields"]["a"]) is float


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), None, [1], {"x": 1}])
def test_generic_rejects_non_scalar_and_non_finite(generic: ReadingsValidator, value: Any) -> None:
    """NaN, infinities and non-scalars are rejected with one clear message."""
    _, rejected = generic.validate([{"name": "m", "fields": {"x": value}}])
    assert rejected == {0: ["fields.x: must be a finite number, a bool or a string"]}


def test_schema_int_field_stays_int(strict: ReadingsValidator) -> None:
    """A field declared int is kept as an integer."""
    valid, _ = strict.validate([env(temperature=20, count=3)])
    assert valid[0]["fields"] == {"temperature": 20.0, "count": 3}
    assert type(valid[0]["fields"]["count"]) is int


def test_schema_violations_are_reported_per_reading(strict: ReadingsValidator) -> None:
    """Each rejected reading lists every reason, and the valid ones are kept in order."""
    readings = [
        env(temperature=1.0),
        env(temperature=99.0, count=-1, door_open=1),
        env(temperature=2.0),
    ]
    valid, rejected = strict.validate(readings)
    assert [r["fields"]["temperature"] for r in valid] == [1.0, 2.0]
    assert sorted(rejected[1]) == [
        "fields.count: Input should be greater than or equal to 0",
        "fields.door_open: Input should be a valid boolean",
        "fields.temperature: Input should be less than or equal to 85",
    ]


def test_many_fields_not_in_the_schema_give_one_reason(strict: ReadingsValidator) -> None:
    """More fields than the schema lists: the first unlisted one is the only reason given."""
    extra = {f"extra{n}": 1.0 for n in range(50)}
    _, rejected = strict.validate([env(temperature=99.0, **extra)])
    assert rejected == {0: ["fields.extra0: Extra inputs are not permitted"]}


def test_few_fields_not_in_the_schema_are_each_named(strict: ReadingsValidator) -> None:
    """Within the schema's size, each unlisted field is named beside the other problems."""
    _, rejected = strict.validate([env(temperature=99.0, extra0=1.0, extra1=2.0)])
    assert sorted(rejected[0]) == [
        "fields.extra0: Extra inputs are not permitted",
        "fields.extra1: Extra inputs are not permitted",
        "fields.temperature: Input should be less than or equal to 85",
    ]


def test_required_field_missing(strict: ReadingsValidator) -> None:
    """A reading missing a required field is rejected."""
    _, rejected = strict.validate([env(count=1)])
    assert rejected == {0: ["fields.temperature: Field required"]}


def test_tag_not_allowed(strict: ReadingsValidator) -> None:
    """Tags outside the schema's list are rejected; `device` is always allowed."""
    ok = {**env(temperature=1.0), "tags": {"room": "k", "device": "spoof"}}
    bad = {**env(temperature=1.0), "tags": {"floor": "1"}}
    valid, rejected = strict.validate([ok, bad])
    assert len(valid) == 1
    assert rejected == {1: ["tags.floor: Extra inputs are not permitted"]}


def test_unknown_measurement_refused_when_configured(strict: ReadingsValidator) -> None:
    """With accept_unknown_measurements = false, an unlisted measurement is rejected."""
    _, rejected = strict.validate([{"name": "other", "fields": {"x": 1}}])
    assert rejected == {0: ["no schema for measurement 'other'"]}


@pytest.mark.parametrize(
    "reading",
    [
        "not a map",
        {"name": "", "fields": {"x": 1}},
        {"name": "m", "fields": {}},
        {"name": "m"},
        {"name": 5, "fields": {"x": 1}},
        {"name": "m", "fields": {"x": 1}, "tags": {"t": 1}},
        {"name": "m", "fields": {"x": 1}, "time": 1.5},
        {"name": "m", "fields": {"x": 1}, "time": 2**62},
        {"name": "m", "fields": {"x": 1}, "time": msgpack.Timestamp(10**10)},
    ],
)
def test_structurally_wrong_readings_are_rejected(generic: ReadingsValidator, reading: Any) -> None:
    """Wrong shapes, types and out-of-range times are rejected, never raised."""
    valid, rejected = generic.validate([reading])
    assert valid == []
    assert list(rejected) == [0] and rejected[0]


def test_time_bounds_follow_precision() -> None:
    """An integer time is checked against InfluxDB's range in the connection's precision."""
    schemas = MeasurementSchemas()
    reading = {"name": "m", "fields": {"x": 1}, "time": 2**62}
    assert schemas.validator(1).validate([reading])[1] == {}
    assert schemas.validator(10**9).validate([reading])[1] != {}


def test_bad_schema_file_is_a_config_error(tmp_path: Path) -> None:
    """A schema file with a wrong type name is refused with the path of the problem."""
    path = tmp_path / "bad.toml"
    path.write_text('[measurements.m.fields]\nx = { type = "double" }\n')
    with pytest.raises(ConfigError, match=r"measurements\.m\.fields\.x\.type"):
        load_schema_file(path)


def test_no_schema_file_accepts_everything() -> None:
    """Without a schema file every measurement is accepted."""
    assert load_schema_file(None) == SchemaFile()
