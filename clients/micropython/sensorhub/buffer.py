"""The readings a device holds until the hub acks them, bounded, without I/O.

`add` encodes a reading at once (its msgpack bytes are all that is kept). Readings wait in
`pending` until `next_message` groups them into a message; a message stays in `unacked`
until its ack, and after a reconnect every unacked message is sent again. At most
`max_readings` readings are held in all: when full, the oldest pending reading is dropped.
"""

from . import mpack

_TYPES = (bool, int, float, str)


def check_reading(name: object, fields: object, tags: object) -> None:
    """Raise ValueError or TypeError, with the reason, for a reading the hub would refuse."""
    if not isinstance(name, str) or not name:
        raise ValueError("a reading's name must be a non-empty string")
    if not isinstance(fields, dict) or not fields:
        raise ValueError("a reading needs at least one field")
    for key in fields:
        value = fields[key]
        if not isinstance(key, str) or not key:
            raise TypeError("field names must be non-empty strings")
        if not isinstance(value, _TYPES):
            raise TypeError("field %s: a float, int, bool or str, not %s" % (key, type(value)))
        if isinstance(value, float) and (value != value or value in (float("inf"), -float("inf"))):
            raise ValueError("field %s: NaN and infinity cannot be stored" % key)
    if tags is not None:
        if not isinstance(tags, dict):
            raise TypeError("tags must be a dict of str to str")
        for key in tags:
            if not isinstance(key, str) or not isinstance(tags[key], str):
                raise TypeError("tags must be a dict of str to str")


def encode_reading_body(name: str, fields: dict[str, object], tags: object) -> tuple[int, bytes]:
    """A reading map's entries other than `time`: their count and msgpack bytes."""
    out = bytearray()
    mpack.encode_into(out, "name")
    mpack.encode_into(out, name)
    mpack.encode_into(out, "fields")
    mpack.encode_into(out, fields)
    entries = 2
    if tags:
        mpack.encode_into(out, "tags")
        mpack.encode_into(out, tags)
        entries = 3
    return entries, bytes(out)


def finish_reading(entries: int, body: bytes, time_ms: int | None) -> bytes:
    """The reading's map: with `time` (Unix ms) when known, else without (the hub stamps)."""
    out = bytearray()
    mpack.encode_map_header(out, entries + (time_ms is not None))
    if time_ms is not None:
        mpack.encode_into(out, "time")
        mpack.encode_into(out, time_ms)
    out.extend(body)
    return bytes(out)


class Sample:
    """A reading encoded but for its `time`, which is known once the clock is set."""

    def __init__(self, entries: int, body: bytes, unix_ms: int | None, ticks: int) -> None:
        self.entries = entries
        self.body = body
        self.unix_ms = unix_ms
        self.ticks = ticks


class Message:
    """A group of encoded readings sent (and resent) together until acked."""

    def __init__(self, readings: list[bytes]) -> None:
        self.readings = readings
        self.sent = False  # on the current connection
        self.seq = -1  # the seq it was last sent with
        self.resends = 0

    def frame(self, seq: int) -> bytes:
        """The whole `readings` message with this `seq`."""
        out = bytearray()
        mpack.encode_map_header(out, 3)
        mpack.encode_into(out, "type")
        mpack.encode_into(out, "readings")
        mpack.encode_into(out, "seq")
        mpack.encode_into(out, seq)
        mpack.encode_into(out, "readings")
        mpack.encode_array_header(out, len(self.readings))
        for reading in self.readings:
            out.extend(reading)
        return bytes(out)


ENVELOPE_BYTES = 40  # the message map around its readings, with a 64-bit seq and a long array


class ReadingsBuffer:
    """Pending readings and unacked messages; see the module docstring."""

    def __init__(self, max_readings: int, max_batch: int, max_message_bytes: int) -> None:
        if max_readings < 1 or max_batch < 1 or max_message_bytes < 64:
            raise ValueError("buffer limits must be positive (max_message_bytes >= 64)")
        self.max_readings = max_readings
        self.max_batch = max_batch
        self.max_message_bytes = max_message_bytes
        # pending readings: finished bytes, or a Sample still to be given its time
        self.pending: list[bytes | Sample] = []
        self.unacked: list[Message] = []
        self.dropped = 0

    def held(self) -> int:
        """Readings held: pending plus unacked."""
        return len(self.pending) + sum(len(m.readings) for m in self.unacked)

    def add(self, entries: int, body: bytes, unix_ms: int | None, ticks: int) -> bool:
        """Hold a reading; False when the buffer was full and a reading was dropped for it."""
        if len(body) + 16 > self.max_message_bytes - ENVELOPE_BYTES:
            raise ValueError("a reading of %d bytes does not fit a message" % len(body))
        kept = True
        if self.held() >= self.max_readings:
            self.dropped += 1
            kept = False
            if not self.pending:
                return False  # every held reading is in a message: refuse the new one
            self.pending.pop(0)
        if unix_ms is None:
            self.pending.append(Sample(entries, body, unix_ms, ticks))
        else:  # the usual case: one bytes object is all a held reading costs
            self.pending.append(finish_reading(entries, body, unix_ms))
        return kept

    def next_message(self, resolve: object) -> Message | None:
        """Group pending readings into a new unacked message (None if there are none).

        `resolve(unix_ms, ticks)` gives a sample's time once the clock is set.
        """
        if not self.pending:
            return None
        readings: list[bytes] = []
        size = ENVELOPE_BYTES
        while self.pending and len(readings) < self.max_batch:
            item = self.pending[0]
            if isinstance(item, Sample):
                time_ms = resolve(item.unix_ms, item.ticks)  # type: ignore[operator]
                reading = finish_reading(item.entries, item.body, time_ms)
            else:
                reading = item
            if readings and size + len(reading) > self.max_message_bytes:
                self.pending[0] = reading
                break
            self.pending.pop(0)
            readings.append(reading)
            size += len(reading)
        message = Message(readings)
        self.unacked.append(message)
        return message

    def acked(self) -> Message:
        """The oldest sent message was acked: forget it."""
        return self.unacked.pop(0)

    def reconnected(self) -> None:
        """A new connection: every unacked message is to be sent again."""
        for message in self.unacked:
            if message.sent:
                message.resends += 1
            message.sent = False

    def drop_oldest(self) -> int:
        """Drop the oldest unacked message (the hub refused it); how many readings it held."""
        if not self.unacked:
            return 0
        count = len(self.unacked.pop(0).readings)
        self.dropped += count
        return count

    def split(self) -> None:
        """Halve every unacked message and the batch size (after 1009)."""
        halves = []
        for message in self.unacked:
            middle = max(1, len(message.readings) // 2)
            for part in (message.readings[:middle], message.readings[middle:]):
                if part:
                    halves.append(Message(part))
        self.unacked = halves
        self.max_batch = max(1, self.max_batch // 2)
        self.max_message_bytes = max(256, self.max_message_bytes // 2)
