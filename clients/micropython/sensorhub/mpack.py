"""A compact msgpack codec for what protocol v1 uses, for MicroPython and CPython alike.

Encodes None, bool, int (-2**63 .. 2**64-1), float (as float64), str, bytes, list, tuple,
dict and `Timestamp` (extension -1). Decodes everything msgpack defines; extensions other
than -1 become `Ext`. `decode` refuses truncated or malformed input with `Truncated` or
`ValueError`, and nesting deeper than `max_depth`.
"""

import struct


class Truncated(ValueError):
    """The data ended in the middle of an object."""


class Timestamp:
    """A msgpack timestamp: seconds and nanoseconds since 1970-01-01 UTC."""

    def __init__(self, seconds: int, nanoseconds: int = 0) -> None:
        if not 0 <= nanoseconds < 1_000_000_000:
            raise ValueError("nanoseconds must be in 0 .. 999999999")
        self.seconds = seconds
        self.nanoseconds = nanoseconds

    @classmethod
    def from_unix_ms(cls, ms: int) -> "Timestamp":
        """The timestamp of a millisecond Unix time."""
        return cls(ms // 1000, (ms % 1000) * 1_000_000)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Timestamp)
            and self.seconds == other.seconds
            and self.nanoseconds == other.nanoseconds
        )

    def __hash__(self) -> int:
        return hash((self.seconds, self.nanoseconds))

    def __repr__(self) -> str:
        return "Timestamp(%d, %d)" % (self.seconds, self.nanoseconds)


class Ext:
    """An extension value of a type this codec does not interpret."""

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ext) and self.code == other.code and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.code, self.data))


def encode(value: object) -> bytes:
    """`value` as msgpack bytes."""
    out = bytearray()
    encode_into(out, value)
    return bytes(out)


def encode_into(out: bytearray, value: object, depth: int = 0) -> None:
    """Append `value` as msgpack to `out`."""
    if depth > 32:
        raise ValueError("nested too deep to encode")
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        _encode_int(out, value)
    elif isinstance(value, float):
        out.append(0xCB)
        out.extend(struct.pack(">d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8")
        _header(out, len(data), 0xA0, 31, 0xD9, 0xDA, 0xDB)
        out.extend(data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        size = len(value)
        _header(out, size, -1, -1, 0xC4, 0xC5, 0xC6)
        out.extend(value)
    elif isinstance(value, (list, tuple)):
        _header(out, len(value), 0x90, 15, -1, 0xDC, 0xDD)
        for item in value:
            encode_into(out, item, depth + 1)
    elif isinstance(value, dict):
        _header(out, len(value), 0x80, 15, -1, 0xDE, 0xDF)
        for key in value:
            encode_into(out, key, depth + 1)
            encode_into(out, value[key], depth + 1)
    elif isinstance(value, Timestamp):
        _encode_timestamp(out, value)
    elif isinstance(value, Ext):
        _encode_ext(out, value.code, value.data)
    else:
        raise TypeError("cannot encode %s as msgpack" % type(value).__name__)


def encode_map_header(out: bytearray, size: int) -> None:
    """Append the header of a map of `size` entries (its entries follow)."""
    _header(out, size, 0x80, 15, -1, 0xDE, 0xDF)


def encode_array_header(out: bytearray, size: int) -> None:
    """Append the header of an array of `size` items (its items follow)."""
    _header(out, size, 0x90, 15, -1, 0xDC, 0xDD)


def _header(out: bytearray, size: int, fix: int, fix_max: int, b8: int, b16: int, b32: int) -> None:
    if size <= fix_max:
        out.append(fix | size)
    elif size < 0x100 and b8 >= 0:
        out.append(b8)
        out.append(size)
    elif size < 0x10000:
        out.append(b16)
        out.extend(struct.pack(">H", size))
    elif size < 0x100000000:
        out.append(b32)
        out.extend(struct.pack(">I", size))
    else:
        raise ValueError("too long for msgpack")


def _encode_int(out: bytearray, value: int) -> None:
    if 0 <= value < 0x80:
        out.append(value)
    elif -32 <= value < 0:
        out.append(value & 0xFF)
    elif value >= 0:
        if value < 0x100:
            out.append(0xCC)
            out.append(value)
        elif value < 0x10000:
            out.append(0xCD)
            out.extend(struct.pack(">H", value))
        elif value < 0x100000000:
            out.append(0xCE)
            out.extend(struct.pack(">I", value))
        elif value < 0x10000000000000000:
            out.append(0xCF)
            out.extend(struct.pack(">Q", value))
        else:
            raise OverflowError("integer above 2**64-1")
    elif value >= -0x80:
        out.append(0xD0)
        out.extend(struct.pack(">b", value))
    elif value >= -0x8000:
        out.append(0xD1)
        out.extend(struct.pack(">h", value))
    elif value >= -0x80000000:
        out.append(0xD2)
        out.extend(struct.pack(">i", value))
    elif value >= -0x8000000000000000:
        out.append(0xD3)
        out.extend(struct.pack(">q", value))
    else:
        raise OverflowError("integer below -2**63")


def _encode_timestamp(out: bytearray, stamp: Timestamp) -> None:
    seconds, nanoseconds = stamp.seconds, stamp.nanoseconds
    if nanoseconds == 0 and 0 <= seconds < 0x100000000:
        _encode_ext(out, -1, struct.pack(">I", seconds))
    elif 0 <= seconds < 0x400000000:
        # 30 bits of nanoseconds above 34 bits of seconds, in two 32-bit halves so that no
        # 64-bit integer is built (a MicroPython small int holds 31 bits).
        high = (nanoseconds << 2) | (seconds >> 32)
        _encode_ext(out, -1, struct.pack(">II", high, seconds & 0xFFFFFFFF))
    else:
        _encode_ext(out, -1, struct.pack(">Iq", nanoseconds, seconds))


def _encode_ext(out: bytearray, code: int, data: bytes) -> None:
    size = len(data)
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}.get(size)
    if fixed is not None:
        out.append(fixed)
    elif size < 0x100:
        out.append(0xC7)
        out.append(size)
    elif size < 0x10000:
        out.append(0xC8)
        out.extend(struct.pack(">H", size))
    else:
        out.append(0xC9)
        out.extend(struct.pack(">I", size))
    out.append(code & 0xFF)
    out.extend(data)


def decode(data: bytes | bytearray | memoryview, max_depth: int = 16) -> object:
    """The one msgpack object that `data` holds; trailing bytes are an error."""
    view = memoryview(data)
    value, end = decode_from(view, 0, max_depth)
    if end != len(view):
        raise ValueError("%d bytes after the msgpack object" % (len(view) - end))
    return value


def decode_from(view: memoryview, offset: int, max_depth: int = 16) -> tuple[object, int]:
    """The msgpack object at `offset` in `view`, and the offset just after it."""
    if max_depth < 0:
        raise ValueError("msgpack nested too deep")
    if offset >= len(view):
        raise Truncated("msgpack data ended")
    byte = view[offset]
    offset += 1
    if byte < 0x80:
        return byte, offset
    if byte >= 0xE0:
        return byte - 0x100, offset
    if 0xA0 <= byte <= 0xBF:
        return _str(view, offset, byte & 0x1F)
    if 0x90 <= byte <= 0x9F:
        return _array(view, offset, byte & 0x0F, max_depth)
    if 0x80 <= byte <= 0x8F:
        return _map(view, offset, byte & 0x0F, max_depth)
    if byte == 0xC0:
        return None, offset
    if byte == 0xC2:
        return False, offset
    if byte == 0xC3:
        return True, offset
    fixed = _FIXED.get(byte)
    if fixed is not None:
        fmt, size = fixed
        _need(view, offset, size)
        return struct.unpack_from(fmt, view, offset)[0], offset + size
    sized = _SIZED.get(byte)
    if sized is not None:
        kind, fmt, size = sized
        _need(view, offset, size)
        length = struct.unpack_from(fmt, view, offset)[0]
        offset += size
        if kind == 0:
            return _str(view, offset, length)
        if kind == 1:
            _need(view, offset, length)
            return bytes(view[offset : offset + length]), offset + length
        if kind == 2:
            return _array(view, offset, length, max_depth)
        if kind == 3:
            return _map(view, offset, length, max_depth)
        _need(view, offset, 1)
        return _ext(view, offset + 1, view[offset], length)
    fixext = _FIXEXT.get(byte)
    if fixext is not None:
        _need(view, offset, 1)
        return _ext(view, offset + 1, view[offset], fixext)
    raise ValueError("0x%02x is not a msgpack type" % byte)


# byte -> (struct format, size) of numbers
_FIXED = {
    0xCA: (">f", 4), 0xCB: (">d", 8),
    0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4), 0xCF: (">Q", 8),
    0xD0: (">b", 1), 0xD1: (">h", 2), 0xD2: (">i", 4), 0xD3: (">q", 8),
}  # fmt: skip
# byte -> (0 str, 1 bin, 2 array, 3 map, 4 ext; struct format and size of its length)
_SIZED = {
    0xD9: (0, ">B", 1), 0xDA: (0, ">H", 2), 0xDB: (0, ">I", 4),
    0xC4: (1, ">B", 1), 0xC5: (1, ">H", 2), 0xC6: (1, ">I", 4),
    0xDC: (2, ">H", 2), 0xDD: (2, ">I", 4),
    0xDE: (3, ">H", 2), 0xDF: (3, ">I", 4),
    0xC7: (4, ">B", 1), 0xC8: (4, ">H", 2), 0xC9: (4, ">I", 4),
}  # fmt: skip
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def _need(view: memoryview, offset: int, size: int) -> None:
    if offset + size > len(view):
        raise Truncated("msgpack data ended")


def _str(view: memoryview, offset: int, length: int) -> tuple[object, int]:
    _need(view, offset, length)
    return str(bytes(view[offset : offset + length]), "utf-8"), offset + length


def _array(view: memoryview, offset: int, length: int, max_depth: int) -> tuple[object, int]:
    # Every item takes at least one byte: refuse a count the data cannot hold before
    # allocating anything for it.
    _need(view, offset, length)
    items = []
    for _ in range(length):
        item, offset = decode_from(view, offset, max_depth - 1)
        items.append(item)
    return items, offset


def _map(view: memoryview, offset: int, length: int, max_depth: int) -> tuple[object, int]:
    _need(view, offset, 2 * length)
    result = {}
    for _ in range(length):
        key, offset = decode_from(view, offset, max_depth - 1)
        if isinstance(key, (list, dict)):
            raise ValueError("a msgpack map key that is an array or map")
        value, offset = decode_from(view, offset, max_depth - 1)
        result[key] = value
    return result, offset


def _ext(view: memoryview, offset: int, code: int, length: int) -> tuple[object, int]:
    _need(view, offset, length)
    data = bytes(view[offset : offset + length])
    code = code - 0x100 if code >= 0x80 else code
    if code != -1:
        return Ext(code, data), offset + length
    if length == 4:
        return Timestamp(struct.unpack(">I", data)[0]), offset + length
    if length == 8:
        high, low = struct.unpack(">II", data)
        return Timestamp(((high & 3) << 32) | low, high >> 2), offset + length
    if length == 12:
        nanoseconds, seconds = struct.unpack(">Iq", data)
        return Timestamp(seconds, nanoseconds), offset + length
    raise ValueError("a msgpack timestamp of %d bytes" % length)


def decode_map_prefix(
    data: bytes | bytearray | memoryview, max_depth: int = 16
) -> tuple[dict[object, object], bool]:
    """The complete entries at the start of a map cut short, and whether none was cut.

    A device that keeps only the first bytes of a frame too large for its buffer reads
    what they hold: an ack's `type`, `seq` and `accepted` come before its `rejected` list.
    """
    view = memoryview(data)
    if not view:
        return {}, False
    byte = view[0]
    if 0x80 <= byte <= 0x8F:
        length, offset = byte & 0x0F, 1
    elif byte in (0xDE, 0xDF):
        size = 2 if byte == 0xDE else 4
        if len(view) < 1 + size:
            return {}, False
        length = struct.unpack_from(">H" if size == 2 else ">I", view, 1)[0]
        offset = 1 + size
    else:
        raise ValueError("not a msgpack map")
    result: dict[object, object] = {}
    for _ in range(length):
        try:
            key, offset = decode_from(view, offset, max_depth - 1)
            value, offset = decode_from(view, offset, max_depth - 1)
        except Truncated:
            return result, False
        result[key] = value
    return result, offset == len(view)
