"""Measurement schemas: the operator's TOML file, compiled into one pydantic validator.

    accept_unknown_measurements = true      # readings of measurements not listed below

    [measurements.environment]
    tags = ["room", "floor"]                # allowed tag keys; omit to allow any
    [measurements.environment.fields]
    temperature = { type = "float", min = -40, max = 85, required = true }
    humidity = { type = "float", min = 0, max = 100 }
    door_open = { type = "bool" }
    state = { type = "string" }
    count = { type = "int", min = 0 }

A listed measurement accepts only its listed fields. Numbers are stored as floats unless the
schema declares the field `int`, so `21` then `21.5` never conflicts in InfluxDB.

All of a message's readings are validated in a single pydantic call: a callable discriminator
routes each reading to its measurement's type, and errors carry the reading's index.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Required, Union, cast

import msgpack
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    InstanceOf,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError, core_schema
from typing_extensions import TypedDict

from hub.errors import ConfigError
from schemas.codes import QUERY_PRECISIONS
from schemas.messages import (
    INT64_MAX,
    INT64_MIN,
    TIME_MAX_NS,
    TIME_MIN_NS,
    FieldValue,
    MeasurementName,
)

FieldType = Literal["float", "int", "bool", "string"]


class FieldSpec(BaseModel):
    """One field of a measurement schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: FieldType
    min: float | None = None
    max: float | None = None
    required: bool = False


class MeasurementSpec(BaseModel):
    """The schema of one measurement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: Annotated[dict[str, FieldSpec], Field(min_length=1)]
    tags: list[str] | None = None


class SchemaFile(BaseModel):
    """The whole measurement schema file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accept_unknown_measurements: bool = True
    measurements: dict[str, MeasurementSpec] = {}


def load_schema_file(path: Path | None) -> SchemaFile:
    """Read and check a schema file; no file means every measurement is accepted."""
    if path is None:
        return SchemaFile()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read schema file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"schema file {path} is not valid TOML: {exc}") from None
    try:
        return SchemaFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ConfigError(f"schema file {path}: {problems}") from None


class _UnionError:
    """Replace a union's per-member errors by one message a firmware author can act on."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        schema = handler(source)
        if schema["type"] == "union":
            union = cast(dict[str, Any], schema)
            union["custom_error_type"] = "wrong_type"
            union["custom_error_message"] = self.message
        return schema


_GENERIC_VALUE = Annotated[FieldValue, _UnionError("must be a finite number, a bool or a string")]


def _timestamp_in_range(value: msgpack.Timestamp) -> msgpack.Timestamp:
    if not TIME_MIN_NS <= value.to_unix_nano() <= TIME_MAX_NS:
        raise PydanticCustomError("time_range", "timestamp outside InfluxDB's range")
    return value


def _time_type(ns_per_unit: int) -> Any:
    lowest, highest = -(-TIME_MIN_NS // ns_per_unit), TIME_MAX_NS // ns_per_unit
    integer: Any = Annotated[StrictInt, Field(ge=lowest, le=highest)]
    timestamp: Any = Annotated[InstanceOf[msgpack.Timestamp], AfterValidator(_timestamp_in_range)]  # type: ignore[misc]
    return Annotated[
        integer | timestamp,
        _UnionError(
            "must be a msgpack timestamp or an integer in the connection's precision, "
            "within InfluxDB's time range (years 1677-2262)"
        ),
    ]


def _field_type(spec: FieldSpec) -> Any:
    if spec.type == "float":
        return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=spec.min, le=spec.max)]
    if spec.type == "int":
        low = INT64_MIN if spec.min is None else max(INT64_MIN, spec.min)
        high = INT64_MAX if spec.max is None else min(INT64_MAX, spec.max)
        return Annotated[StrictInt, Field(ge=low, le=high)]
    if spec.type == "bool":
        return StrictBool
    return StrictStr


def _strict_typeddict(name: str, items: dict[str, Any]) -> Any:
    typed = TypedDict(name, items, total=False)  # type: ignore[misc]
    return with_config(ConfigDict(extra="forbid"))(typed)


def _reading_type(name: str, fields: Any, tags: Any, time: Any) -> Any:
    return TypedDict(  # type: ignore[operator]
        name,
        {
            "name": MeasurementName,
            "fields": fields,
            "tags": NotRequired[tags],
            "time": NotRequired[time],
        },
    )


_UNKNOWN = "*unknown*"
_GENERIC = "*generic*"


def _reject_unknown(reading: dict[str, Any]) -> dict[str, Any]:
    raise PydanticCustomError(
        "unknown_measurement", "no schema for measurement '{name}'", {"name": reading["name"]}
    )


@dataclass(frozen=True)
class ReadingsValidator:
    """Validates a list of raw readings for one connection precision."""

    adapter: TypeAdapter[list[dict[str, Any]]]

    def validate(self, readings: list[Any]) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
        """Return the valid readings (index order) and, per rejected index, its reasons."""
        try:
            return self.adapter.validate_python(readings), {}
        except ValidationError as exc:
            reasons: dict[int, list[str]] = {}
            for error in exc.errors(include_url=False):
                index, _tag, *path = error["loc"]
                where = ".".join(str(part) for part in path)
                reasons.setdefault(int(index), []).append(
                    f"{where}: {error['msg']}" if where else error["msg"]
                )
        valid = [r for i, r in enumerate(readings) if i not in reasons]
        # The rest passed on their own; validating them again yields the converted values.
        return (self.adapter.validate_python(valid) if valid else []), reasons


@dataclass
class MeasurementSchemas:
    """The compiled schema file: one validator per connection precision, built on demand."""

    source: SchemaFile = field(default_factory=SchemaFile)
    _validators: dict[int, ReadingsValidator] = field(default_factory=dict, repr=False)

    def validator(self, ns_per_unit: int) -> ReadingsValidator:
        """The validator for integer times in units of `ns_per_unit` nanoseconds."""
        if ns_per_unit not in QUERY_PRECISIONS.values():
            raise ValueError(f"unsupported precision: {ns_per_unit} ns")
        found = self._validators.get(ns_per_unit)
        if found is None:
            found = self._validators[ns_per_unit] = ReadingsValidator(self._compile(ns_per_unit))
        return found

    def _compile(self, ns_per_unit: int) -> TypeAdapter[list[dict[str, Any]]]:
        time = _time_type(ns_per_unit)
        any_tags = dict[StrictStr, StrictStr]
        generic = _reading_type(
            "Reading",
            Annotated[dict[StrictStr, _GENERIC_VALUE], Field(min_length=1)],
            any_tags,
            time,
        )
        # Both fallbacks are always present so the union is always tagged and every error's
        # location reads (index, tag, ...).
        choices: list[Any] = [
            Annotated[generic, Tag(_GENERIC)],
            Annotated[generic, AfterValidator(_reject_unknown), Tag(_UNKNOWN)],
        ]
        for name, spec in self.source.measurements.items():
            fields = _strict_typeddict(
                f"{name}_fields",
                {
                    key: Required[_field_type(f)] if f.required else _field_type(f)
                    for key, f in spec.fields.items()
                },
            )
            tags = (
                any_tags
                if spec.tags is None
                else _strict_typeddict(
                    f"{name}_tags", {key: StrictStr for key in {*spec.tags, "device"}}
                )
            )
            choices.append(Annotated[_reading_type(name, fields, tags, time), Tag(name)])
        union: Any = Annotated[Union[tuple(choices)], Discriminator(self._router())]  # noqa: UP007
        return TypeAdapter(list[union])

    def _router(self) -> Callable[[Any], str]:
        known = frozenset(self.source.measurements)
        fallback = _GENERIC if self.source.accept_unknown_measurements else _UNKNOWN

        def route(reading: Any) -> str:
            if isinstance(reading, dict):
                name = reading.get("name")
                if name in known:
                    return str(name)
                return fallback if isinstance(name, str) and name else _GENERIC
            return _GENERIC

        return route
