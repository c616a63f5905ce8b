"""Write the JSON Schema of every wire message of device protocol v1 into `schemas/json/`.

Firmware authors in other languages read these files instead of our pydantic models. The
files are generated from the models in `schemas.messages` and committed; a test fails when
they are stale. Regenerate with `python -m schemas.export`; `--check` only reports.

The payload on the wire is msgpack, not JSON: each schema describes the map a msgpack decoder
returns, and says so in its description.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from schemas.messages import DEVICE_MESSAGES, HUB_MESSAGES, PROTOCOL_VERSION, Reading

DIRECTORY = Path(__file__).resolve().parent / "json"
"""Where the committed schema files live."""
SUFFIX = ".schema.json"
ID_PREFIX = f"urn:sensor-hub:protocol-v{PROTOCOL_VERSION}:"
"""`$id` of each file is this prefix plus the message name: a name, not a download location."""
DIALECT = "https://json-schema.org/draft/2020-12/schema"

_MSGPACK_NOTE = (
    "The payload is msgpack, not JSON: this schema describes the map a msgpack decoder returns. "
    "Strings and map keys are msgpack str, never bin."
)
_FRAME_NOTE = "Sent as one binary WebSocket frame holding this one map."
_TIME_NOTE = (
    "`time` may also be a msgpack timestamp (extension type -1, any of its three sizes), "
    "which JSON cannot express; its branch is marked `x-msgpack-ext: -1`."
)
# Schema keywords shown first; the rest follow in alphabetical order.
_HEAD = ("$schema", "$id", "title", "description")


@dataclass(frozen=True)
class _Message:
    name: str
    target: Any
    direction: str
    # Validation mode says what the hub accepts, serialization mode what it sends.
    mode: JsonSchemaMode
    summary: str
    whole_frame: bool = True


def _summary(target: Any) -> str:
    # A parametrised generic model (ReadingsMessage[Reading]) has no docstring of its own.
    origin = getattr(target, "__pydantic_generic_metadata__", {}).get("origin")
    doc = inspect.getdoc(target) or (inspect.getdoc(origin) if origin else None) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def _messages() -> list[_Message]:
    found = [
        _Message(name, model, "device -> hub", "validation", _summary(model))
        for name, model in DEVICE_MESSAGES.items()
    ]
    found.append(
        _Message(
            "reading",
            Reading,
            "device -> hub",
            "validation",
            _summary(Reading)
            + " One item of `readings`; a Telegraf frame is these maps concatenated, with no "
            "envelope.",
            whole_frame=False,
        )
    )
    found.extend(
        _Message(name, model, "hub -> device", "serialization", _summary(model))
        for name, model in HUB_MESSAGES.items()
    )
    return found


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every sub-schema of `node`, itself included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for item in node:
            yield from _objects(item)


def _ordered(node: Any, *, keep: bool = False) -> Any:
    """Sort keywords for a stable file; `keep` leaves a `properties` map in wire order."""
    if isinstance(node, list):
        return [_ordered(item) for item in node]
    if not isinstance(node, dict):
        return node
    keys = list(node) if keep else sorted(node, key=lambda k: (_rank(k), k))
    # Inside a `properties` map the keys are field names, so a field called "properties"
    # is a sub-schema like any other.
    return {key: _ordered(node[key], keep=key == "properties" and not keep) for key in keys}


def _rank(key: str) -> int:
    return _HEAD.index(key) if key in _HEAD else len(_HEAD)


def _schema(message: _Message) -> dict[str, Any]:
    schema: dict[str, Any] = TypeAdapter(message.target).json_schema(mode=message.mode)
    if message.mode == "serialization":
        # Defaults make pydantic list `type` and `rejected` as optional, but the hub dumps every
        # field, so a device can rely on all of them being present: all but those the model
        # leaves out when empty (`exclude_if`, as the ack's `rejected_ranges`).
        fields = getattr(message.target, "model_fields", {})
        optional = {name for name, info in fields.items() if info.exclude_if is not None}
        for sub in _objects(schema):
            if isinstance(sub.get("properties"), dict):
                sub["required"] = [key for key in sub["properties"] if key not in optional]
    notes = [message.summary, f"Device protocol v{PROTOCOL_VERSION}, {message.direction}."]
    notes.append(_MSGPACK_NOTE)
    if message.whole_frame:
        notes.append(_FRAME_NOTE)
    if any("x-msgpack-ext" in sub for sub in _objects(schema)):
        notes.append(_TIME_NOTE)
    schema.update(
        {
            "$schema": DIALECT,
            "$id": f"{ID_PREFIX}{message.name}",
            "title": f"{message.name} ({message.direction}, protocol v{PROTOCOL_VERSION})",
            "description": " ".join(note for note in notes if note),
        }
    )
    ordered: dict[str, Any] = _ordered(schema)
    return ordered


def render() -> dict[str, str]:
    """Return each schema file's name and text, as it should be on disk."""
    return {
        f"{message.name}{SUFFIX}": json.dumps(_schema(message), indent=2) + "\n"
        for message in _messages()
    }


def write(directory: Path = DIRECTORY) -> list[Path]:
    """Write every schema file into `directory`, delete ones no longer generated; return paths."""
    expected = render()
    directory.mkdir(parents=True, exist_ok=True)
    for orphan in _orphans(directory, expected):
        orphan.unlink()
    written = []
    for name, text in expected.items():
        path = directory / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def stale(directory: Path = DIRECTORY) -> list[Path]:
    """Return the files in `directory` that are missing, out of date, or no longer generated."""
    expected = render()
    found = []
    for name, text in expected.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            found.append(path)
    found.extend(_orphans(directory, expected))
    return found


def _orphans(directory: Path, expected: dict[str, str]) -> list[Path]:
    # A schema file left behind by a renamed message would mislead firmware authors.
    return [p for p in sorted(directory.glob(f"*{SUFFIX}")) if p.name not in expected]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the schema files, or with `--check` list stale ones and exit 1 if any."""
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing stale files"
    )
    parser.add_argument("--directory", type=Path, default=DIRECTORY, help="default: %(default)s")
    args = parser.parse_args(argv)
    directory: Path = args.directory
    if args.check:
        outdated = stale(directory)
        for path in outdated:
            print(f"stale: {path}", file=sys.stderr)
        if outdated:
            print("run `python -m schemas.export` to regenerate", file=sys.stderr)
        return 1 if outdated else 0
    for path in write(directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
