"""Limits on what one frame and one reading may hold, without sockets.

Decoder limits refuse the whole frame (`InvalidMessage`: error, then 1007); reading limits
reject the reading alone, in the ack. Every answer stays bounded in size and in the work
it takes, whatever the device sent.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from hub.core.measurements import MeasurementSchemas, ReadingLimits, load_schema_file
from hub.core.protocol import MAX_REASON_CHARS, ReadingsFrame, decode_frame
from hub.core.readings import (
    REASONS_BUDGET_CHARS,
    REASONS_OMITTED,
    prepare_readings,
    rejections,
)
from hub.errors import InvalidMessage
from hub.options import reading_limits
from hub.settings import Settings

pytestmark = pytest.mark.unit

MS = 10**6
LIMITS = ReadingLimits(max_fields=3, max_tags=2, max_name_chars=8, max_string_chars=10)


def pack(obj: object) -> bytes:
    """msgpack as a device would send it."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def message(*readings: Any) -> bytes:
    """A readings message."""
    return pack({"type": "readings", "seq": 1, "readings": list(readings)})


def reasons(reading: dict[str, Any], limits: ReadingLimits = LIMITS) -> list[str]:
    """Why `reading` is rejected under `limits` (empty if it is accepted)."""
    _, rejected = MeasurementSchemas().validator(MS, limits).validate([reading])
    return rejected.get(0, [])


def peak_bytes(work: Callable[[], object]) -> int:
    """The most memory Python allocated while `work` ran."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def nested(depth: int) -> Any:
    """Arrays nested `depth` deep around 0."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# --- Decoder: the frame is refused whole -------------------------------------------------------


@pytest.mark.parametrize("depth", [4, 8])
def test_nesting_up_to_the_limit_is_decoded(depth: int) -> None:
    """A frame nesting exactly max_depth levels (the message map counts) is decoded."""
    frame = pack({"type": "config_ack", "version": 1, "ok": True, "x": nested(depth - 1)})
    with pytest.raises(InvalidMessage, match="x"):  # an unknown key, but not too deep
        decode_frame(frame, 10, max_depth=depth)


@pytest.mark.parametrize("depth", [5, 9, 1000, 100_000])
def test_nesting_past_the_limit_is_invalid(depth: int) -> None:
    """Maps and arrays nesting deeper than max_depth make the frame invalid, however deep."""
    frame = b"\x81\xa4type" + b"\x91" * (depth - 1) + b"\x00"
    with pytest.raises(InvalidMessage, match="nest"):
        decode_frame(frame, 10, max_depth=4)


def decode_and_prepare(frame: bytes, max_depth: int) -> tuple[int, list[int]]:
    """Decode a readings frame and prepare its readings as a session does: (accepted, rejected)."""
    event = decode_frame(frame, 10, max_depth=max_depth)
    assert isinstance(event, ReadingsFrame)
    validator = MeasurementSchemas().validator(MS, LIMITS)
    prepared = prepare_readings(event.readings, validator, "d", MS, 0, max_depth=max_depth)
    return prepared.accepted, [rejection.index for rejection in prepared.rejected]


GOOD_READING = {"name": "m", "fields": {"x": 1.0}}


@pytest.mark.parametrize(
    ("where", "depth"),
    # The least depth too deep for 4 levels in each place; the reading itself is level 3.
    [("field", 1), ("tags", 1), ("other_key", 2)],
)
def test_deep_reading_makes_the_frame_invalid(where: str, depth: int) -> None:
    """A reading nesting past the frame's limit refuses the frame, wherever the nesting is.

    decode_frame leaves readings to prepare_readings (valid ones cannot nest too deep), so
    the refusal comes from there; the frame's other keys are checked while decoding.
    """
    bad: Any = {
        "field": {"name": "m", "fields": {"x": nested(depth)}},
        "tags": {"name": "m", "tags": {"t": nested(depth)}, "fields": {"x": 1.0}},
        "other_key": {**GOOD_READING, "extra": nested(depth)},
    }[where]
    with pytest.raises(InvalidMessage, match="nest"):
        decode_and_prepare(message(GOOD_READING, bad), max_depth=4)
    # One level more allowed: the same reading is only rejected (or, with a key the hub
    # ignores, accepted), and the good one accepted.
    expected = (2, []) if where == "other_key" else (1, [1])
    assert decode_and_prepare(message(GOOD_READING, bad), max_depth=5) == expected


def test_reading_that_is_a_deep_array_is_rejected_not_looked_into() -> None:
    """A reading that is an array is rejected as it is, however deep it nests (up to what
    msgpack decodes): a large frame's scan never builds one, so its depth is not known."""
    assert decode_and_prepare(message(GOOD_READING, nested(50)), max_depth=4) == (1, [1])


def test_reading_deeper_than_msgpack_builds_is_invalid_while_decoding() -> None:
    """A reading nesting 100,000 levels is refused by the decoder, which never builds it."""
    envelope = b"\x83" + pack("type") + pack("readings") + pack("seq") + pack(1)
    readings = b"\x92" + pack(GOOD_READING) + b"\x91" * 100_000 + b"\x00"
    with pytest.raises(InvalidMessage, match="nest"):
        decode_frame(envelope + pack("readings") + readings, 10, max_depth=4)


def test_deep_key_beside_the_readings_is_invalid_while_decoding() -> None:
    """Nesting outside the readings list is refused by decode_frame itself."""
    frame = pack({"type": "readings", "seq": 1, "readings": [GOOD_READING], "x": nested(4)})
    with pytest.raises(InvalidMessage, match="nest"):
        decode_frame(frame, 10, max_depth=4)


def test_valid_readings_at_the_smallest_depth_limit_are_accepted() -> None:
    """With max_depth 4 (the least allowed) a full reading, tags and fields, is accepted."""
    reading = {"name": "m", "time": 1, "tags": {"t": "a"}, "fields": {"x": 1.0, "y": 2}}
    assert decode_and_prepare(message(reading, reading), max_depth=4) == (2, [])


def test_deep_telegraf_metric_is_invalid() -> None:
    """A Telegraf metric after the first one is checked for depth too."""
    metric = {"name": "m", "fields": {"x": 1.0}}
    frame = pack(metric) + pack({**metric, "x": nested(10)})
    with pytest.raises(InvalidMessage, match="nest"):
        decode_frame(frame, 10, max_depth=4)


@pytest.mark.parametrize(
    ("header", "what"),
    [
        (b"\xdd\xff\xff\xff\xff", "array"),
        (b"\xdf\xff\xff\xff\xff", "map"),
        (b"\xdb\xff\xff\xff\xff", "str"),
        (b"\xc6\xff\xff\xff\xff", "bin"),
        (b"\xc9\xff\xff\xff\xff\x05", "ext"),
    ],
)
def test_huge_declared_lengths_allocate_nothing(header: bytes, what: str) -> None:
    """A 4 GiB length declared in a few bytes is refused with next to nothing allocated."""

    def decode() -> None:
        with pytest.raises(InvalidMessage):
            decode_frame(b"\x81\xa4type" + header, 5000)

    assert peak_bytes(decode) < 2**20, what


def test_array_longer_than_max_readings_is_invalid() -> None:
    """No array may hold more items than max_readings: the readings list is the longest."""
    with pytest.raises(InvalidMessage, match="at most 3 readings"):
        decode_frame(message(*[{"name": "m", "fields": {"x": 1}}] * 4), 3)


@pytest.mark.parametrize("code", [0, 1, 5, 127, -2, -128])
def test_extension_types_other_than_the_timestamp_are_invalid(code: int) -> None:
    """Any msgpack extension but the timestamp (-1) makes the frame invalid."""
    fixext4 = b"\xd6" + code.to_bytes(1, "big", signed=True) + b"\x00" * 4
    with pytest.raises(InvalidMessage, match=f"extension type {code}"):
        decode_frame(b"\x81\xa4time" + fixext4, 10)


def test_timestamp_extension_is_decoded() -> None:
    """The timestamp extension (-1) is read as a timestamp."""
    reading = {"name": "m", "fields": {"x": 1.0}, "time": msgpack.Timestamp(1_700_000_000)}
    event = decode_frame(message(reading), 10)
    assert event.readings[0]["time"] == msgpack.Timestamp(1_700_000_000)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "key", [b"\xc0", b"\xc3", b"\x05", b"\xcb" + b"\x00" * 8, b"\x90", b"\x80"]
)
def test_map_keys_other_than_strings_are_invalid(key: bytes) -> None:
    """nil, bool, integer, float, array or map keys make the frame invalid."""
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        decode_frame(b"\x82\xa4type\xa8readings" + key + b"\x01", 10)


def test_type_that_is_not_a_string_is_named_by_its_type_only() -> None:
    """A non-string `type` is reported by its type, never echoed (it may be huge or deep)."""
    with pytest.raises(InvalidMessage, match="'type' must be a string, not list"):
        decode_frame(pack({"type": nested(3)}), 10)


def test_long_unknown_type_is_echoed_cut_short() -> None:
    """An unknown `type` string is echoed at most 100 characters long."""
    with pytest.raises(InvalidMessage) as raised:
        decode_frame(pack({"type": "x" * 100_000}), 10)
    assert len(raised.value.message) < 150


# --- Readings: rejected one by one, in the ack ------------------------------------------------


def test_reading_limits_default_to_the_settings() -> None:
    """ReadingLimits.defaults() are the default settings' limits."""
    assert ReadingLimits.defaults() == reading_limits(Settings(state_dir=Path("/nonexistent")))


@pytest.mark.parametrize(
    ("reading", "reason"),
    [
        ({"name": "m", "fields": {"a": 1, "b": 2, "c": 3, "d": 4}}, "fields: Dictionary should"),
        ({"name": "m", "fields": {"a": 1}, "tags": {"a": "1", "b": "2", "c": "3"}}, "tags:"),
        ({"name": "m" * 9, "fields": {"a": 1}}, "name: String should have at most 8"),
        ({"name": "m", "fields": {"k" * 9: 1}}, "at most 8 characters"),
        ({"name": "m", "fields": {"a": 1}, "tags": {"k" * 9: "v"}}, "at most 8 characters"),
        ({"name": "m", "fields": {"a": 1}, "tags": {"k": "v" * 9}}, "tags.k: String should"),
        ({"name": "m", "fields": {"a": "s" * 11}}, "fields.a: strings are limited to 10"),
    ],
)
def test_reading_over_a_limit_is_rejected_with_the_reason(
    reading: dict[str, Any], reason: str
) -> None:
    """Too many fields or tags, or a name or string too long: rejected, saying which."""
    found = reasons(reading)
    assert len(found) == 1 and reason in found[0], found


def test_reading_at_every_limit_is_accepted() -> None:
    """A reading exactly at every limit is accepted."""
    reading = {
        "name": "m" * 8,
        "fields": {"a" * 8: "s" * 10, "b": 1.5, "c": True},
        "tags": {"t" * 8: "v" * 8, "u": "w"},
    }
    assert reasons(reading) == []


def test_long_string_in_a_schema_string_field_is_rejected(tmp_path: Path) -> None:
    """A field declared string in a schema has the same length limit."""
    path = tmp_path / "schemas.toml"
    path.write_text('[measurements.m.fields]\nstate = { type = "string" }\n')
    validator = MeasurementSchemas(load_schema_file(path)).validator(MS, LIMITS)
    _, rejected = validator.validate([{"name": "m", "fields": {"state": "s" * 11}}])
    assert rejected == {0: ["fields.state: String should have at most 10 characters"]}


def test_invalid_fields_give_one_reason_per_reading() -> None:
    """A map of invalid values stops at the first: one reason, not one per entry."""
    fields = {f"f{n}": None for n in range(3)}
    assert len(reasons({"name": "m", "fields": fields})) == 1


def test_a_message_of_bad_readings_costs_no_more_than_a_good_one() -> None:
    """A ~1 MiB message of invalid values: one reason per reading, memory near its size."""
    bad = {"name": "m", "fields": {f"{n:02}": None for n in range(60)}}
    readings = msgpack.unpackb(pack([bad] * 4000))  # decoded, as the hub has it
    validator = MeasurementSchemas().validator(MS, ReadingLimits.defaults())
    prepared: list[Any] = []
    peak = peak_bytes(lambda: prepared.append(prepare_readings(readings, validator, "d", MS, 0)))
    assert len(prepared[0].rejected) == 4000
    assert all(len(r.errors) == 1 for r in prepared[0].rejected)
    assert peak < 32 * 2**20  # 240 000 errors took over 200 MB before they were bounded


def test_reasons_in_one_ack_are_bounded() -> None:
    """Past the reasons budget, rejections carry a short fixed reason; each reason is cut."""
    long = "x" * 1000
    found = rejections({index: [long, long] * 10 for index in range(5000)})
    assert len(found) == 5000
    assert all(len(error) <= MAX_REASON_CHARS for r in found for error in r.errors)
    assert found[-1].errors == [REASONS_OMITTED]
    text = sum(len(error) for r in found for error in r.errors)
    assert text <= REASONS_BUDGET_CHARS + 5 * MAX_REASON_CHARS + 5000 * len(REASONS_OMITTED)


# --- Found by the fuzzer -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [[], {}, [["x"]], None, 1.5])
def test_reading_whose_name_is_not_a_string_is_rejected_not_raised(name: Any) -> None:
    """A name that is a list or map (unhashable) is a rejected reading, not a crash."""
    assert reasons({"name": name, "fields": {"a": 1}})


@pytest.mark.parametrize("version", [2**63, 2**64 - 1])
def test_config_ack_beyond_int64_is_ignored_not_raised(tmp_path: Path, version: int) -> None:
    """A config_ack version the hub could never have sent (over SQLite's INTEGER) is ignored."""
    from hub.registry.sqlite import Registry

    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        registry.add("dev-1")
        assert registry.record_config_ack("dev-1", version, True, None) is False
    finally:
        registry.close()
