"""Tests of schemas.export: the committed JSON Schema files and what they accept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas import export
from schemas.messages import DEVICE_MESSAGES, HUB_MESSAGES, Ack, Reading, ReadingsMessage

pytestmark = pytest.mark.unit

VALID_READINGS: dict[str, Any] = {
    "type": "readings",
    "seq": 17,
    "readings": [
        {
            "name": "environment",
            "time": 1_700_000_000_000,
            "tags": {"room": "kitchen"},
            "fields": {"temperature": 21.5, "humidity": 40, "door_open": False, "state": "ok"},
        },
        {"name": "environment", "fields": {"temperature": 21.6}},
    ],
}

# jsonschema is not a dependency, so a checker for exactly the keywords pydantic emits here.
# It refuses any other keyword rather than ignoring it, so it cannot pass by not looking.
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "default"})
_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
    "null": type(None),
}


def _has_type(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in {"integer", "number"}:
        return False
    return isinstance(value, _PYTHON_TYPES[name])


def _violations(
    schema: dict[str, Any], value: Any, root: dict[str, Any], at: str = ""
) -> list[str]:
    found: list[str] = []
    for keyword, rule in schema.items():
        if keyword in _ANNOTATIONS or keyword.startswith("x-"):
            continue
        if keyword == "$ref":
            assert rule.startswith("#/$defs/"), rule
            found += _violations(root["$defs"][rule.removeprefix("#/$defs/")], value, root, at)
        elif keyword == "type":
            if not _has_type(value, rule):
                found.append(f"{at}: not {rule}")
        elif keyword == "const":
            if value != rule:
                found.append(f"{at}: not {rule!r}")
        elif keyword == "anyOf":
            if all(_violations(option, value, root, at) for option in rule):
                found.append(f"{at}: matches no option")
        elif keyword == "minimum":
            if _has_type(value, "number") and value < rule:
                found.append(f"{at}: below {rule}")
        elif keyword == "maximum":
            if _has_type(value, "number") and value > rule:
                found.append(f"{at}: above {rule}")
        elif keyword in {"minLength", "minItems", "minProperties"}:
            if isinstance(value, str | list | dict) and len(value) < rule:
                found.append(f"{at}: shorter than {rule}")
        elif keyword == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    found += _violations(rule, item, root, f"{at}.{i}")
        elif keyword == "required":
            if isinstance(value, dict):
                found += [f"{at}.{key}: missing" for key in rule if key not in value]
        elif keyword == "properties":
            if isinstance(value, dict):
                for key, sub in rule.items():
                    if key in value:
                        found += _violations(sub, value[key], root, f"{at}.{key}")
        elif keyword == "additionalProperties":
            if isinstance(value, dict):
                known = schema.get("properties", {})
                for key in value.keys() - known.keys():
                    if rule is False:
                        found.append(f"{at}.{key}: not allowed")
                    elif isinstance(rule, dict):
                        found += _violations(rule, value[key], root, f"{at}.{key}")
        else:
            raise AssertionError(f"the test checker does not know the keyword {keyword!r}")
    return found


def _committed(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((export.DIRECTORY / name).read_text(encoding="utf-8"))
    return loaded


def _readings_violations(message: Any) -> list[str]:
    schema = _committed("readings.schema.json")
    return _violations(schema, message, schema)


def test_committed_schema_files_are_current() -> None:
    """The files in schemas/json match what `python -m schemas.export` would write now."""
    rendered = export.render()
    on_disk = {
        path.name: path.read_text(encoding="utf-8")
        for path in export.DIRECTORY.glob(f"*{export.SUFFIX}")
    }
    stale = sorted(
        name for name in rendered.keys() | on_disk.keys() if rendered.get(name) != on_disk.get(name)
    )
    assert not stale, f"stale schema files {stale}: run `python -m schemas.export`"


def test_one_file_per_wire_message() -> None:
    """Every message type in both directions, and the single reading, has a schema file."""
    expected = {*DEVICE_MESSAGES, *HUB_MESSAGES, "reading"}
    assert set(export.render()) == {f"{name}{export.SUFFIX}" for name in expected}


def test_files_are_pretty_printed_with_a_trailing_newline() -> None:
    """Each file is indented JSON that ends with exactly one newline."""
    for text in export.render().values():
        assert text.endswith("}\n")
        assert text == json.dumps(json.loads(text), indent=2) + "\n"


def test_each_file_has_a_distinct_id_and_a_title() -> None:
    """Each schema names itself with its own `$id` and has a title."""
    schemas = [json.loads(text) for text in export.render().values()]
    assert all(schema["title"] for schema in schemas)
    assert len({schema["$id"] for schema in schemas}) == len(schemas)


def test_descriptions_say_the_payload_is_msgpack() -> None:
    """Every schema's description warns that the payload is msgpack, not JSON."""
    for text in export.render().values():
        assert "msgpack, not JSON" in json.loads(text)["description"]


def test_descriptions_mention_the_timestamp_extension_where_time_appears() -> None:
    """The schemas that contain `time` say it may be a msgpack timestamp, ext type -1."""
    for name in ("readings.schema.json", "reading.schema.json"):
        assert "extension type -1" in _committed(name)["description"]


def test_example_readings_message_is_valid_for_the_models() -> None:
    """The example used below is a message the pydantic models accept."""
    ReadingsMessage[Reading].model_validate(VALID_READINGS)


def test_readings_schema_accepts_a_valid_message() -> None:
    """The exported readings schema accepts a well-formed readings message."""
    assert _readings_violations(VALID_READINGS) == []


def test_readings_schema_rejects_a_reading_with_empty_fields() -> None:
    """The exported readings schema rejects a reading whose `fields` map is empty."""
    message = {**VALID_READINGS, "readings": [{"name": "environment", "fields": {}}]}
    assert _readings_violations(message) == [".readings.0.fields: shorter than 1"]


def test_readings_schema_rejects_a_message_without_seq() -> None:
    """The exported readings schema rejects a message that has no `seq`."""
    message = {key: value for key, value in VALID_READINGS.items() if key != "seq"}
    assert _readings_violations(message) == [".seq: missing"]


def test_readings_schema_rejects_a_string_seq() -> None:
    """The exported readings schema rejects a `seq` that is not an integer."""
    assert _readings_violations({**VALID_READINGS, "seq": "17"}) == [".seq: not integer"]


def test_ack_schema_requires_every_key_the_hub_sends() -> None:
    """The ack schema lists as required exactly the keys of an ack the hub encodes."""
    sent = Ack(seq=1, accepted=1).model_dump()
    assert set(_committed("ack.schema.json")["required"]) == set(sent)


def test_ack_schema_has_rejected_ranges_as_optional() -> None:
    """`rejected_ranges` is described, and optional: the hub sends it only when needed."""
    schema = _committed("ack.schema.json")
    assert "rejected_ranges" in schema["properties"]
    assert "rejected_ranges" not in schema["required"]
    with_ranges = Ack(seq=1, accepted=0, rejected_ranges=[(0, 4)]).model_dump()
    assert with_ranges["rejected_ranges"] == [(0, 4)]


def test_check_lists_missing_files_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--check` on an empty directory exits 1, names each missing file and writes nothing."""
    assert export.main(["--check", "--directory", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert all(name in err for name in export.render())
    assert list(tmp_path.iterdir()) == []


def test_check_passes_after_write(tmp_path: Path) -> None:
    """`--check` exits 0 on a directory `write` has just filled."""
    export.write(tmp_path)
    assert export.main(["--check", "--directory", str(tmp_path)]) == 0


def test_check_reports_an_edited_file(tmp_path: Path) -> None:
    """A schema file that differs from the rendered text is stale."""
    export.write(tmp_path)
    edited = tmp_path / "ack.schema.json"
    edited.write_text("{}\n", encoding="utf-8")
    assert export.stale(tmp_path) == [edited]


def test_write_deletes_schema_files_no_longer_generated(tmp_path: Path) -> None:
    """`write` removes a leftover `*.schema.json` so it cannot mislead a firmware author."""
    leftover = tmp_path / "renamed.schema.json"
    leftover.write_text("{}\n", encoding="utf-8")
    export.write(tmp_path)
    assert not leftover.exists()
