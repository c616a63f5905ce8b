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
schema declares the field `int`, so `21` then `21.5` never conflicts in InfluxDB. Names
starting with `hub_` (the hub's own measurements, such as `hub_device_connection`) are
refused from devices, and in the file.

All of a message's readings are validated in a single pydantic call: a callable discriminator
routes each reading to its measurement's type, and errors carry the reading's index.

The limits (`ReadingLimits`: fields and tags per reading, characters per name and string) are
part of the same types, so they are checked in pydantic's Rust core. So that a hostile message
costs no more than a valid one, every reading yields a bounded number of errors: maps stop at
their first bad entry (`fail_fast`), and a listed measurement's fields or tags with more keys
than it lists are refused at the first key not listed.
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
    field_validator,
    with_config,
)
from pydantic_core import PydanticCustomError, SchemaValidator, core_schema
from typing_extensions import TypedDict

from hub.errors import ConfigError
from schemas.codes import QUERY_PRECISIONS
from schemas.messages import (
    INT64_MAX,
    INT64_MIN,
    TIME_MAX_NS,
    TIME_MIN_NS,
    FieldValue,
)

FieldType = Literal["float", "int", "bool", "string"]

RESERVED_PREFIX = "hub_"
"""Measurements the hub writes itself (presence: `hub_device_connection`); devices may not:
a point of theirs could fix a field's type before the hub's own points arrive."""
RESERVED_REASON = "measurement names starting with hub_ are reserved for the hub's own"


@dataclass(frozen=True, slots=True)
class ReadingLimits:
    """How big one reading may be; the settings of the same names (`max_..._per_reading`)."""

    max_fields: int
    max_tags: int
    max_name_chars: int
    max_string_chars: int

    @classmethod
    def defaults(cls) -> ReadingLimits:
        """The limits of default settings."""
        from hub.settings import Settings

        fields = Settings.model_fields
        return cls(
            fields["max_fields_per_reading"].default,
            fields["max_tags_per_reading"].default,
            fields["max_name_chars"].default,
            fields["max_string_chars"].default,
        )


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

    @field_validator("measurements")
    @classmethod
    def _not_reserved(cls, value: dict[str, MeasurementSpec]) -> dict[str, MeasurementSpec]:
        reserved = sorted(name for name in value if name.startswith(RESERVED_PREFIX))
        if reserved:
            raise ValueError(f"{RESERVED_REASON}: {', '.join(reserved)}")
        return value


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


class _StringLimit:
    """Cap the length of strings in a union of scalars, with an error saying just that.

    `_UnionError` would hide a too-long string behind its generic message, so the cap is a
    second step in Rust: the same scalars again, the string one with `max_length`.
    """

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        capped = core_schema.union_schema(
            [
                core_schema.bool_schema(strict=True),
                core_schema.float_schema(strict=True),
                core_schema.str_schema(strict=True, max_length=self.max_chars),
            ],
            custom_error_type="string_too_long_in_field",
            custom_error_message=f"strings are limited to {self.max_chars} characters",
        )
        return core_schema.chain_schema([handler(source), capped])


class _KeysIn:
    """Bound the errors about keys not in `keys` that one map can cause.

    A TypedDict with `extra="forbid"` reports every extra key, which would let one message
    of tiny readings make hundreds of thousands of errors. A map with no more keys than
    `keys` goes to the TypedDict as is (one length check), so each unlisted key is named
    beside the map's other problems, at most `len(keys)` of them; a map with more keys
    than that is refused with one error, naming its first unlisted key.
    """

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        known = core_schema.custom_error_schema(
            core_schema.literal_schema(sorted(self.keys)), custom_error_type="extra_forbidden"
        )
        first_unlisted = SchemaValidator(
            core_schema.dict_schema(known, core_schema.any_schema(), fail_fast=True)
        )
        most = len(self.keys)

        def bounded_keys(value: Any) -> Any:
            # A length check, not a key comparison: this runs for every reading, twice.
            if type(value) is dict and len(value) > most:
                # Raises the error (pydantic prefixes its location).
                first_unlisted.validate_python(value)
            return value

        return core_schema.no_info_before_validator_function(bounded_keys, handler(source))


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


def _field_type(spec: FieldSpec, limits: ReadingLimits) -> Any:
    if spec.type == "float":
        return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=spec.min, le=spec.max)]
    if spec.type == "int":
        low = INT64_MIN if spec.min is None else max(INT64_MIN, spec.min)
        high = INT64_MAX if spec.max is None else min(INT64_MAX, spec.max)
        return Annotated[StrictInt, Field(ge=low, le=high)]
    if spec.type == "bool":
        return StrictBool
    return Annotated[StrictStr, Field(max_length=limits.max_string_chars)]


def _strict_typeddict(name: str, items: dict[str, Any]) -> Any:
    typed = TypedDict(name, items, total=False)  # type: ignore[misc]
    return with_config(ConfigDict(extra="forbid"))(typed)


def _reading_type(name: str, fields: Any, tags: Any, time: Any, limits: ReadingLimits) -> Any:
    return TypedDict(  # type: ignore[operator]
        name,
        {
            "name": Annotated[StrictStr, Field(min_length=1, max_length=limits.max_name_chars)],
            "fields": fields,
            "tags": NotRequired[tags],
            "time": NotRequired[time],
        },
    )


_UNKNOWN = "*unknown*"
_RESERVED = "*reserved*"
_GENERIC = "*generic*"


def _reject_reserved(reading: dict[str, Any]) -> dict[str, Any]:
    raise PydanticCustomError("reserved_measurement", RESERVED_REASON)


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
            for error in exc.errors(include_url=False, include_context=False, include_input=False):
                index, _tag, *path = error["loc"]
                # A key's own error ends its path with "[key]": the key is named already.
                where = ".".join(str(part) for part in path if part != "[key]")
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
    _validators: dict[tuple[int, ReadingLimits], ReadingsValidator] = field(
        default_factory=dict, repr=False
    )

    def validator(self, ns_per_unit: int, limits: ReadingLimits | None = None) -> ReadingsValidator:
        """The validator for integer times in units of `ns_per_unit` nanoseconds."""
        if ns_per_unit not in QUERY_PRECISIONS.values():
            raise ValueError(f"unsupported precision: {ns_per_unit} ns")
        key = (ns_per_unit, limits or _DEFAULT_LIMITS)
        found = self._validators.get(key)
        if found is None:
            found = self._validators[key] = ReadingsValidator(self._compile(*key))
        return found

    def _compile(
        self, ns_per_unit: int, limits: ReadingLimits
    ) -> TypeAdapter[list[dict[str, Any]]]:
        time = _time_type(ns_per_unit)
        name = Annotated[StrictStr, Field(max_length=limits.max_name_chars)]
        value = Annotated[
            FieldValue,
            _UnionError("must be a finite number, a bool or a string"),
            _StringLimit(limits.max_string_chars),
        ]
        any_tags = Annotated[dict[name, name], Field(max_length=limits.max_tags, fail_fast=True)]
        generic = _reading_type(
            "Reading",
            Annotated[
                dict[name, value],
                Field(min_length=1, max_length=limits.max_fields, fail_fast=True),
            ],
            any_tags,
            time,
            limits,
        )
        # Both fallbacks are always present so the union is always tagged and every error's
        # location reads (index, tag, ...).
        choices: list[Any] = [
            Annotated[generic, Tag(_GENERIC)],
            Annotated[generic, AfterValidator(_reject_unknown), Tag(_UNKNOWN)],
            Annotated[generic, AfterValidator(_reject_reserved), Tag(_RESERVED)],
        ]
        for measurement, spec in self.source.measurements.items():
            fields: Any = Annotated[
                _strict_typeddict(
                    f"{measurement}_fields",
                    {
                        key: Required[_field_type(f, limits)]
                        if f.required
                        else _field_type(f, limits)
                        for key, f in spec.fields.items()
                    },
                ),
                _KeysIn(frozenset(spec.fields)),
            ]
            tag_keys = frozenset({*spec.tags, "device"}) if spec.tags is not None else None
            tags: Any = (
                any_tags
                if tag_keys is None
                else Annotated[
                    _strict_typeddict(f"{measurement}_tags", dict.fromkeys(tag_keys, name)),
                    _KeysIn(tag_keys),
                ]
            )
            choices.append(
                Annotated[_reading_type(measurement, fields, tags, time, limits), Tag(measurement)]
            )
        union: Any = Annotated[Union[tuple(choices)], Discriminator(self._router())]  # noqa: UP007
        return TypeAdapter(list[union])

    def _router(self) -> Callable[[Any], str]:
        known = frozenset(self.source.measurements)
        fallback = _GENERIC if self.source.accept_unknown_measurements else _UNKNOWN

        def route(reading: Any) -> str:
            if isinstance(reading, dict):
                name = reading.get("name")
                if not isinstance(name, str):  # a list or map is not even hashable
                    return _GENERIC
                if name in known:  # never reserved: the schema file cannot list those
                    return name
                if name.startswith(RESERVED_PREFIX):
                    return _RESERVED
                return fallback if name else _GENERIC
            return _GENERIC

        return route


_DEFAULT_LIMITS = ReadingLimits.defaults()
