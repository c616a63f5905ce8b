"""WebSocket framing (RFC 6455) for a client, without I/O: build masked frames, read frames.

`FrameReader` works in one fixed buffer: it never holds more than `max_payload` bytes of a
frame. A longer frame keeps its first `max_payload` bytes and is delivered marked
`truncated`; the rest is read and thrown away.
"""

import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_MASK_CHUNK = 256  # bytes XORed at once as one integer: no per-byte Python loop


class ProtocolViolation(ValueError):
    """The hub sent something RFC 6455 forbids; the connection must close with `code`."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


def mask(payload: bytes | bytearray | memoryview, key: bytes) -> bytearray:
    """`payload` XORed with the repeated 4-byte `key` (a new bytearray)."""
    out = bytearray(payload)
    mask_in_place(out, 0, key)
    return out


def mask_in_place(buffer: bytearray, start: int, key: bytes) -> None:
    """XOR `buffer[start:]` with the repeated `key`, 256 bytes at a time as one integer."""
    size = len(buffer) - start
    whole = size - size % _MASK_CHUNK
    if whole:
        chunk_key = int.from_bytes(key * (_MASK_CHUNK // 4), "big")
        for offset in range(start, start + whole, _MASK_CHUNK):
            end = offset + _MASK_CHUNK
            value = int.from_bytes(bytes(buffer[offset:end]), "big") ^ chunk_key
            buffer[offset:end] = value.to_bytes(_MASK_CHUNK, "big")
    tail = size - whole
    if tail:
        offset = start + whole
        tail_key = int.from_bytes((key * (tail // 4 + 1))[:tail], "big")
        value = int.from_bytes(bytes(buffer[offset:]), "big") ^ tail_key
        buffer[offset:] = value.to_bytes(tail, "big")


def encode_frame(
    opcode: int, payload: bytes | bytearray | memoryview, key: bytes, fin: bool = True
) -> bytearray:
    """One client frame: header, the 4-byte masking `key`, the payload masked in place (so
    a frame costs its own size once, beside the payload)."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        header = struct.pack(">BB", first, 0x80 | size)
    elif size < 0x10000:
        header = struct.pack(">BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack(">BBII", first, 0x80 | 127, size >> 32, size & 0xFFFFFFFF)
    start = len(header) + 4
    frame = bytearray(start + size)
    frame[0 : len(header)] = header
    frame[len(header) : start] = key
    frame[start:] = payload
    mask_in_place(frame, start, key)
    return frame


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: the code, then up to 123 bytes of reason."""
    return struct.pack(">H", code) + reason.encode("utf-8")[:123]


def parse_close(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """The code and reason of a close frame's payload (1005 when it carries no code)."""
    if len(payload) < 2:
        return 1005, ""
    code = struct.unpack_from(">H", payload, 0)[0]
    try:
        reason = str(bytes(payload[2:]), "utf-8")
    except UnicodeError:
        reason = ""
    return code, reason


class Frame:
    """A frame read from the hub; `payload` is valid until the next `FrameReader.next()`."""

    def __init__(
        self, opcode: int, fin: bool, payload: memoryview, length: int, truncated: bool
    ) -> None:
        self.opcode = opcode
        self.fin = fin
        self.payload = payload
        self.length = length  # the frame's real payload length
        self.truncated = truncated


class FrameReader:
    """Frames from the hub, parsed in one fixed buffer of `max_payload` + 14 bytes."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.buffer = bytearray(max_payload + 14)
        self._view = memoryview(self.buffer)
        self._fill = 0  # bytes held in the buffer
        self._consumed = 0  # bytes of the held ones already handed out
        self._skip = 0  # bytes of an oversized frame still to throw away

    def space(self) -> memoryview:
        """Where the next bytes from the socket go (call `received` after writing them)."""
        self._compact()
        return self._view[self._fill :]

    def received(self, count: int) -> None:
        """`count` bytes were written at the start of `space()`."""
        self._fill += count
        if self._skip:
            dropped = min(self._skip, self._fill)
            self._skip -= dropped
            self.buffer[0 : self._fill - dropped] = self.buffer[dropped : self._fill]
            self._fill -= dropped

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes already read (those after a handshake's headers)."""
        offset = 0
        while offset < len(data):
            space = self.space()
            count = min(len(space), len(data) - offset)
            if count == 0:
                raise ProtocolViolation("frame buffer full", 1009)
            space[:count] = data[offset : offset + count]
            self.received(count)
            offset += count

    def _compact(self) -> None:
        if self._consumed:
            held = self._fill - self._consumed
            self.buffer[0:held] = self.buffer[self._consumed : self._fill]
            self._fill = held
            self._consumed = 0

    def next(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._skip:
            return None
        self._compact()
        view, held = self._view, self._fill
        if held < 2:
            return None
        first, second = view[0], view[1]
        if second & 0x80:
            raise ProtocolViolation("the hub sent a masked frame")
        if first & 0x70:
            raise ProtocolViolation("reserved bits set without an extension")
        length = second & 0x7F
        start = 2
        if length == 126:
            if held < 4:
                return None
            length = struct.unpack_from(">H", view, 2)[0]
            start = 4
        elif length == 127:
            if held < 10:
                return None
            high, low = struct.unpack_from(">II", view, 2)
            length = (high << 32) | low
            start = 10
        opcode = first & 0x0F
        if opcode >= 0x8 and (length > 125 or not first & 0x80):
            raise ProtocolViolation("a control frame longer than 125 bytes or fragmented")
        kept = min(length, self.max_payload)
        if held < start + kept:
            return None
        self._consumed = start + kept
        if length > kept:
            # Keep the first bytes, throw the rest away as it arrives.
            beyond = held - start - kept
            self._skip = length - kept
            if beyond:
                dropped = min(self._skip, beyond)
                self._skip -= dropped
                tail_start = start + kept + dropped
                self.buffer[start + kept : held - dropped] = self.buffer[tail_start:held]
                self._fill = held - dropped
        payload = view[start : start + kept]
        return Frame(opcode, bool(first & 0x80), payload, length, length > kept)
