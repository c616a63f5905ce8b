"""The InfluxDB 2 dialect against facts: what InfluxDB 2.x parsers make of line protocol.

No InfluxDB 2.x runs in the suite, so its rules (hub.dialects) are checked against
influxdata/line-protocol's test corpus: a subset of its decode cases is copied, with where
it comes from and how it was chosen, in tests/data/influxdb2_corpus.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from hub.core.dialects import Dialect
from hub.core.lineprotocol import FieldValue, format_point
from hub.core.reformat import parse_point

pytestmark = pytest.mark.unit

CORPUS = json.loads((Path(__file__).parent / "data" / "influxdb2_corpus.json").read_text())
EXACT = {case["key"]: case for case in CORPUS["exact"]}
REFUSED = {case["key"]: case for case in CORPUS["refused"]}
_NUMBER = re.compile(r"=(-?[0-9][0-9.eE+-]*|-?\.[0-9]+)(?=[, ]|$)")


def normalised(text: str) -> str:
    """`text` with every unquoted number spelled as Python's repr of its float."""
    return _NUMBER.sub(lambda match: "=" + repr(float(match.group(1))), text)


def point_of(case: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, FieldValue], int]:
    """The corpus' decoded point as format_point's arguments."""
    point = case["point"]
    kinds = {"float": float, "int": int, "string": str, "bool": bool}
    fields: dict[str, FieldValue] = {}
    for item in point["fields"]:
        ((kind, value),) = item["value"].items()
        fields[item["key"]] = kinds[kind](value)
    tags = {tag["key"]: tag["value"] for tag in point["tags"]}
    return point["name"], tags, fields, point["time"]


def with_time(case: dict[str, Any]) -> str:
    """The case's text, ending with its point's time (the corpus' default where it has none)."""
    text: str = case["text"]
    timestamp = f" {case['point']['time']}"
    return text if text.endswith(timestamp) else text.rstrip(" ") + timestamp


def test_the_corpus_subset_is_there() -> None:
    """The copied subset holds the cases the tests below need."""
    assert len(EXACT) >= 100 and len(REFUSED) >= 3


@pytest.mark.parametrize("key", sorted(EXACT))
def test_influxdb_2_dialect_writes_the_corpus_point_as_its_text(key: str) -> None:
    """The point a 2.x parser reads from the text is written by the hub as that text."""
    case = EXACT[key]
    line = format_point(*point_of(case), Dialect.INFLUXDB_2)
    assert normalised(line) == normalised(with_time(case))


@pytest.mark.parametrize("key", sorted(EXACT))
def test_the_replay_check_reads_the_corpus_text_as_influxdb_2_does(key: str) -> None:
    """hub.core.reformat reads each text back into the very point the 2.x parser made of it."""
    case = EXACT[key]
    text = with_time(case)
    parsed, end = parse_point(text, 0, Dialect.INFLUXDB_2)
    measurement, tags, fields, time_ns = point_of(case)
    assert (parsed.measurement, parsed.tags, parsed.fields, parsed.time_ns) == (
        measurement,
        tags,
        fields,
        time_ns,
    )
    assert end == len(text)


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_influxdb_2_dialect_refuses_what_the_corpus_shows_is_an_error(key: str) -> None:
    """A control character in a measurement is a parse error there: the dialect refuses it."""
    case = REFUSED[key]
    assert "error" in case["output"]
    assert case["text"].startswith(case["measurement"])
    with pytest.raises(ValueError, match=r"control character|tab"):
        format_point(case["measurement"], {}, {"v": 1.0}, 0, Dialect.INFLUXDB_2)


def test_corpus_backslashes_are_literal_unless_before_an_escaped_character() -> None:
    """The 2.x rule the dialect follows, as the corpus shows it: `\\\\ ` is a backslash and
    an escaped space, so `C:\\ dir` is written with a raw backslash before the escape."""
    texts = {case["text"]: case for case in CORPUS["exact"]}
    case = texts["cpu,regions=\\\\ east value=1.0"]
    assert case["point"]["tags"] == [{"key": "regions", "value": "\\ east"}]
    line = format_point("m", {"t": "C:\\ dir"}, {"f": 1.0}, 1, Dialect.INFLUXDB_2)
    assert line == "m,t=C:\\\\ dir f=1.0 1"
