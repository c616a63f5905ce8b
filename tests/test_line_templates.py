"""Readings of a known shape formatted from a cached template (`prepare_readings` with
`lineprotocol.point_template`) and their field types checked once per shape and shard group
(`FieldTypes.verified`): the same lines, refusals and conflicts as `format_point` and
`FieldTypes.check` reading by reading. Pure tests; what the servers store of these lines is
tests/test_dialect_roundtrip.py's and tests/test_lineprotocol_roundtrip.py's.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.core.dialects import Dialect
from hub.core.fieldtypes import FieldTypes
from hub.core.lineprotocol import format_point, point_template
from hub.core.measurements import MeasurementSchemas
from hub.core.readings import DEVICE_TAG, prepare_readings

pytestmark = pytest.mark.unit

NOW_NS = 1_764_000_000 * 10**9
HOUR_NS = 3600 * 10**9
VALIDATOR = MeasurementSchemas().validator(1)
"""The general rules, nanosecond times: integers become floats."""

# Every character that line protocol, the dialects or %-formatting treat specially.
names = st.text(st.sampled_from('abrsd%\\ ,="#_\t\r\n\0é😀'), max_size=6)
"""Names: `%s`, `%r`, `%d` and `%%` among them."""
values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(st.sampled_from(list('a%"\\\n é')), max_size=4),
)


def expected(
    reading: dict[str, Any], device: str, dialect: Dialect
) -> tuple[str | None, str | None]:
    """(line, None) or (None, why), reading by reading with `format_point`."""
    tags = {**reading.get("tags", {}), DEVICE_TAG: device}
    try:
        return format_point(
            reading["name"], tags, reading["fields"], reading["time"], dialect
        ), None
    except ValueError as exc:
        return None, str(exc)


@settings(max_examples=300, deadline=None)
@given(
    name=names,
    tags=st.dictionaries(names, names, max_size=3),
    fields=st.dictionaries(names, values, min_size=1, max_size=3),
    dialect=st.sampled_from([d for d in Dialect if d is not Dialect.LEGACY]),
)
def test_lines_are_format_points_lines_for_every_shape(
    name: str, tags: dict[str, str], fields: dict[str, Any], dialect: Dialect
) -> None:
    """Twice each shape (its template learnt, then used): exactly `format_point`'s lines, or
    the same refusal, whatever the names hold (`%` included) and whatever the values."""
    reading = {"name": name, "tags": tags, "fields": fields, "time": NOW_NS}
    later = {**reading, "time": NOW_NS + 7}
    valid, reasons = VALIDATOR.validate([reading])
    if reasons:
        return  # refused by validation, before any formatting
    normalised = valid[0]  # integers made floats, as the lines have them
    for device in ("dev-1", "dev%d"):
        prepared = prepare_readings([reading, later], VALIDATOR, device, 1, NOW_NS, dialect)
        lines = []
        for index, one in enumerate([normalised, {**normalised, "time": NOW_NS + 7}]):
            line, why = expected(one, device, dialect)
            if line is None:
                assert prepared.reasons[index] == [why]
            else:
                lines.append(line)
        assert prepared.lines == "\n".join(lines)
        assert prepared.accepted == len(lines)


def test_a_template_formats_every_value_of_its_types() -> None:
    """Floats as their repr, integers with `i`, the time as is; names with `%` stay text."""
    tags = {"r%s": "50%", DEVICE_TAG: "d"}
    fields = {"t%r": 1.0, "n": 1}
    template = point_template("m%", tags, fields, Dialect.INFLUXDB_1)
    assert template is not None
    for point in (
        {"t%r": 21.5, "n": -(2**63)},
        {"t%r": -0.0, "n": 2**63 - 1},
        {"t%r": 1e300, "n": 0},
    ):
        line = template % (*point.values(), 1_700_000_000_123_456_789)
        assert line == format_point(
            "m%", tags, point, 1_700_000_000_123_456_789, Dialect.INFLUXDB_1
        )
    assert point_template("m", tags, {"ok": True}, Dialect.INFLUXDB_1) is None
    assert point_template("m", tags, {"s": "text"}, Dialect.INFLUXDB_1) is None


def test_a_verified_shape_is_refused_once_influxdb_says_the_type_is_another() -> None:
    """A shape checked once in a shard group is not asked again; when InfluxDB reports
    another type for one of its fields (a refusal, `learn`), it is checked, and refused."""
    catalog = FieldTypes()
    reading = {"name": "m", "fields": {"t": 1.5}, "time": NOW_NS}
    first = prepare_readings([reading], VALIDATOR, "d", 1, NOW_NS, field_types=catalog)
    assert first.accepted == 1 and catalog.verified
    again = prepare_readings([reading], VALIDATOR, "d", 1, NOW_NS, field_types=catalog)
    assert again.accepted == 1
    catalog.learn("m", "t", str, NOW_NS)
    assert not catalog.verified
    refused = prepare_readings([reading], VALIDATOR, "d", 1, NOW_NS, field_types=catalog)
    assert refused.reasons == {0: ["field t is a string in m; this reading sends a float"]}


def test_a_shape_verified_in_one_shard_group_is_checked_in_the_next() -> None:
    """Verified per shard group: the next group's first reading is checked (and learnt), so
    a conflict there is still found."""
    catalog = FieldTypes()
    catalog.learn("m", "t", str, NOW_NS + HOUR_NS)  # the next group holds t as a string
    now = {"name": "m", "fields": {"t": 1.5}, "time": NOW_NS}
    later = {**now, "time": NOW_NS + HOUR_NS}
    prepared = prepare_readings([now, later, now], VALIDATOR, "d", 1, NOW_NS, field_types=catalog)
    assert prepared.accepted == 2
    assert prepared.reasons == {1: ["field t is a string in m; this reading sends a float"]}


def test_a_new_shard_duration_forgets_what_was_verified() -> None:
    """Group numbers change meaning with the shard duration: nothing verified is kept."""
    catalog = FieldTypes()
    reading = {"name": "m", "fields": {"t": 1.5}, "time": NOW_NS}
    prepare_readings([reading], VALIDATOR, "d", 1, NOW_NS, field_types=catalog)
    assert catalog.verified
    catalog.set_shard_duration(24 * HOUR_NS)
    assert not catalog.verified
