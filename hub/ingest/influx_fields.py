"""Ask InfluxDB which field types its measurements hold, and how long its shard groups are.

The I/O shell around `hub.fieldtypes`: InfluxQL `SHOW RETENTION POLICIES` and
`SHOW FIELD KEYS` over `/query`. InfluxDB 1.x answers them; 2.x answers them on the same
endpoint (its 1.x compatibility API, for a bucket mapped to a database). A server that is
not InfluxDB is never asked: VictoriaMetrics keeps every field as a float64, so its fields
cannot conflict (and its `/query` answers any statement with a list of databases).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp

from hub.core.fieldtypes import TYPE_NAMES
from hub.errors import PermanentWriteError, TransientWriteError
from hub.options import InfluxOptions

MAX_ANSWER_BYTES = 32 * 2**20
"""Largest `/query` answer read: a schema past this is left to learning as the hub writes."""

_TYPES_BY_NAME = {name: kind for kind, name in TYPE_NAMES.items()}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_NS = {"h": 3600 * 10**9, "m": 60 * 10**9, "s": 10**9, "ms": 10**6, "us": 10**3,
            "µs": 10**3, "ns": 1}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ServerFieldTypes:
    """What InfluxDB holds: the shard group duration of the hub's retention policy, and
    each field with a single type across its shards (fields with several are left out)."""

    shard_ns: int | None
    types: dict[tuple[str, str], type]


def parse_duration(text: str) -> int | None:
    """Nanoseconds of a Go duration as InfluxQL prints it (`168h0m0s`), or None."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return int(sum(float(n) * _UNIT_NS[u] for n, u in parts))


def shard_duration(answer: dict[str, Any], policy: str) -> int | None:
    """The shard group duration of `policy` (the default one when empty) in an answer to
    `SHOW RETENTION POLICIES`."""
    for series in _series(answer):
        columns = series.get("columns", [])
        for row in series.get("values", []):
            entry = dict(zip(columns, row, strict=False))
            if (entry.get("name") == policy) if policy else entry.get("default") is True:
                return parse_duration(str(entry.get("shardGroupDuration", "")))
    return None


def field_types(answer: dict[str, Any]) -> dict[tuple[str, str], type]:
    """(measurement, field) -> type from an answer to `SHOW FIELD KEYS`; a field listed
    with several types (they differ between shards) is left out."""
    found: dict[tuple[str, str], type] = {}
    ambiguous: set[tuple[str, str]] = set()
    for series in _series(answer):
        measurement = series.get("name")
        if not isinstance(measurement, str):
            continue
        for row in series.get("values", []):
            if len(row) < 2 or row[1] not in _TYPES_BY_NAME:
                continue
            key, kind = (measurement, str(row[0])), _TYPES_BY_NAME[row[1]]
            if found.setdefault(key, kind) is not kind:
                ambiguous.add(key)
    for key in ambiguous:
        del found[key]
    return found


async def fetch_field_types(
    options: InfluxOptions, api: str, timeout_s: float = 10.0
) -> ServerFieldTypes:
    """Ask the server; raises TransientWriteError when it cannot be reached, and
    PermanentWriteError when it refuses the question (no such database, no v1 mapping of a
    2.x bucket, not allowed)."""
    assert options.url is not None
    database, _, policy = options.bucket.partition("/")
    auth, headers = None, {}
    if options.token is not None:
        secret = options.token.get_secret_value()
        user, sep, password = secret.partition(":")
        if api == "v1" and sep:
            auth = aiohttp.BasicAuth(user, password)
        else:
            headers["Authorization"] = f"Token {secret}"
    url = options.url.rstrip("/") + "/query"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout, auth=auth, headers=headers) as session:
            policies = await _query(session, url, database, "SHOW RETENTION POLICIES ON " +
                                    _quote(database))  # fmt: skip
            fields = await _query(session, url, database, "SHOW FIELD KEYS ON " + _quote(database))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise TransientWriteError(f"cannot ask {url} for field types: {reason}"[:300]) from None
    except ValueError as exc:
        raise PermanentWriteError(f"{url} does not say its field types: {exc}"[:300]) from None
    return ServerFieldTypes(shard_duration(policies, policy), field_types(fields))


async def _query(
    session: aiohttp.ClientSession, url: str, database: str, statement: str
) -> dict[str, Any]:
    async with session.get(url, params={"db": database, "q": statement}) as response:
        if response.status != 200:
            raise ValueError(f"HTTP {response.status} to {statement.split(' ON ')[0]}")
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(2**16):
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                raise ValueError(f"answer larger than {MAX_ANSWER_BYTES} bytes")
            chunks.append(chunk)
    answer = json.loads(b"".join(chunks))
    if not isinstance(answer, dict):
        raise ValueError("not an InfluxQL answer")
    for result in answer.get("results", []):
        if isinstance(result, dict) and "error" in result:
            raise ValueError(str(result["error"])[:200])
    return answer


def _series(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        series
        for result in answer.get("results", [])
        if isinstance(result, dict)
        for series in result.get("series", [])
        if isinstance(series, dict)
    ]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace("\\", "\\\\").replace('"', '\\"') + '"'
