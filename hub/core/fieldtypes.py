"""The type each field has in InfluxDB, so a conflicting reading is refused in its ack.

InfluxDB fixes a field's type (float, integer, boolean, string) by the first point written
to it, per shard: a later point with another type in the same shard is refused ("field type
conflict"), after the hub has acked it. `FieldTypes` remembers, per measurement and shard
group, the types the hub itself wrote (learnt when a reading is accepted, hub-wide, so the
second of two devices in one batch is already refused), the types InfluxDB reports
(`SHOW FIELD KEYS`, for the shard group of now), and the conflicts InfluxDB named when it
refused a point. A reading whose field has another type than the one known for its shard
group is refused with the reason; one whose fields are unknown there teaches their types.

Shard groups are the retention policy's `shardGroupDuration` long, aligned as InfluxDB
aligns them (Go's `Time.Truncate`: multiples of the duration since year 1, so weekly groups
start on Mondays, not on the Thursday of the Unix epoch); until the server has said, one hour
(the shortest InfluxDB allows), which can only miss conflicts, never invent one. Memory is
bounded (`max_entries` fields and groups: past it the oldest shard groups are forgotten, and a
conflict there is left to InfluxDB, whose refusal then goes to the dead letters). No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping

from hub.core.lineprotocol import FieldValue

HOUR_NS = 3600 * 10**9
GO_ZERO_TIME_NS = -62_135_596_800 * 10**9
"""0001-01-01T00:00:00Z, from which InfluxDB (Go) truncates times to shard group starts."""
DEFAULT_MAX_ENTRIES = 50_000
"""Fields and shard groups held at most: about 8 MB when every group holds one field."""

TYPE_NAMES: dict[type, str] = {float: "float", int: "integer", bool: "boolean", str: "string"}
"""Python types of validated field values, by InfluxDB's name for what they are stored as."""
_TYPES_BY_NAME = {name: kind for kind, name in TYPE_NAMES.items()}
_ARTICLES = {"float": "a float", "integer": "an integer", "boolean": "a boolean",
             "string": "a string"}  # fmt: skip

# InfluxDB 1.x: 'field type conflict: input field "t" on measurement "shared" is type float,
# already exists as type string'
_CONFLICT = re.compile(
    r'field type conflict: input field "(?P<field>.*?)" on measurement "(?P<measurement>.*?)" '
    r"is type \w+, already exists as type (?P<existing>\w+)"
)


CONFLICT_MARK = "; this reading sends "
"""In every field type conflict reason, and in no other reason: metrics label them by it."""


def conflict_reason(measurement: str, field: str, existing: type, sent: type) -> str:
    """What the ack says about a reading whose field conflicts with the stored type."""
    return (
        f"field {field} is {_ARTICLES[TYPE_NAMES[existing]]} in {measurement}"
        f"{CONFLICT_MARK}{_ARTICLES[TYPE_NAMES[sent]]}"
    )


def parse_conflict(reason: str) -> tuple[str, str, type] | None:
    """(measurement, field, existing type) from InfluxDB's field type conflict, or None."""
    match = _CONFLICT.search(reason)
    if match is None or match["existing"] not in _TYPES_BY_NAME:
        return None
    return match["measurement"], match["field"], _TYPES_BY_NAME[match["existing"]]


class FieldTypes:
    """Known field types per (measurement, shard group); see the module docstring."""

    def __init__(self, shard_ns: int = HOUR_NS, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.shard_ns = shard_ns
        self.max_entries = max_entries
        self._groups: dict[tuple[str, int], dict[str, type]] = {}
        self._entries = 0
        self.verified: dict[Hashable, int] = {}
        """Shapes (a caller's key naming a measurement, its field keys and their value types)
        that `check` passed, by the shard group (`time_ns - GO_ZERO_TIME_NS) // shard_ns`)
        they passed in: a reading of that shape in that group would pass again, so the
        caller need not ask. Emptied whenever a known type changes or is forgotten."""

    @property
    def entries(self) -> int:
        """Shard groups and fields held (each group of a measurement counts, and each field)."""
        return self._entries

    def group_start(self, time_ns: int) -> int:
        """Where the shard group of `time_ns` starts, in ns since the Unix epoch."""
        return time_ns - (time_ns - GO_ZERO_TIME_NS) % self.shard_ns

    def set_shard_duration(self, shard_ns: int) -> None:
        """Use the server's shard group duration. What was learnt in groups of a duration it
        is a multiple of is merged into the longer groups (the first type of a field wins,
        as in InfluxDB); otherwise it is forgotten."""
        if shard_ns <= 0 or shard_ns == self.shard_ns:
            return
        old, groups = self.shard_ns, self._groups
        self.shard_ns, self._groups, self._entries = shard_ns, {}, 0
        self.verified.clear()
        if shard_ns % old:
            return
        for (measurement, group), known in groups.items():
            self._learn((measurement, group * old // shard_ns), known.items(), types=True)

    def seed(self, types: Mapping[tuple[str, str], type], time_ns: int) -> None:
        """Record the types InfluxDB reports (`SHOW FIELD KEYS`) for the shard group of
        `time_ns`: it does not say in which shards they are, but now's is where most
        readings go."""
        for (measurement, field), kind in types.items():
            self.learn(measurement, field, kind, time_ns)

    def check(self, measurement: str, fields: Mapping[str, FieldValue], time_ns: int) -> str | None:
        """None, learning the fields' types, or why the reading conflicts with known types."""
        key = (measurement, (time_ns - GO_ZERO_TIME_NS) // self.shard_ns)
        known = self._groups.get(key)
        if known is None:
            self._learn(key, fields.items())
            return None
        # The common case, every field known with the same type, in one plain loop: cheaper
        # per reading than a cached shape key (tuple of names and types) or map() passes,
        # and than remembering the last group (python benchmarks/bench_core.py).
        for name, value in fields.items():
            if known.get(name) is not type(value):
                return self._differs(key, known, fields)
        return None

    def _differs(
        self, key: tuple[str, int], known: dict[str, type], fields: Mapping[str, FieldValue]
    ) -> str | None:
        unknown = False
        for name, value in fields.items():
            have = known.get(name)
            if have is None:
                unknown = True
            elif have is not type(value) and type(value) in TYPE_NAMES:
                return conflict_reason(key[0], name, have, type(value))
        if unknown:
            self._learn(key, fields.items())
        return None

    def mark_verified(self, shape: Hashable, group: int) -> None:
        """Remember that `check` passed a reading of `shape` in shard group `group` (see
        `verified`): bounded like the types, emptied past `max_entries`."""
        if len(self.verified) >= self.max_entries:
            self.verified.clear()
        self.verified[shape] = group

    def learn(self, measurement: str, field: str, kind: type, time_ns: int) -> None:
        """Record that `field` has type `kind` in the shard group of `time_ns`, as InfluxDB
        says; what it says wins over what the hub learnt."""
        key = (measurement, (time_ns - GO_ZERO_TIME_NS) // self.shard_ns)
        known = self._groups.get(key)
        if known is not None and field in known:
            if known[field] is not kind:
                self.verified.clear()  # what passed may conflict now
            known[field] = kind
        else:
            self._learn(key, [(field, kind)], types=True)

    def _learn(
        self,
        key: tuple[str, int],
        items: Iterable[tuple[str, object]],
        types: bool = False,
    ) -> None:
        known = self._groups.get(key)
        if known is None:
            known = self._groups[key] = {}
            self._entries += 1
        for name, value in items:
            if name not in known:
                kind = value if types else type(value)
                if kind in TYPE_NAMES:
                    known[name] = kind
                    self._entries += 1
        while self._entries > self.max_entries:
            # Forget the group learnt first (dicts keep insertion order); this one last.
            self._entries -= 1 + len(self._groups.pop(next(iter(self._groups))))
            self.verified.clear()
