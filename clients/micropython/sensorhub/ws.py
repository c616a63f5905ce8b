"""A WebSocket client connection over `socket` (and `ssl` for wss://), never blocking.

`open` does the HTTP upgrade with a timeout; after it the socket is non-blocking and
`service` does all I/O: one `select.poll` wait, then reads (pings are answered, a close is
echoed) and writes what is queued. Control frames (pong, close) go out before any data
frame not yet started, so a long send never starves the hub's pings.
"""

import select

from . import compat, wsframe

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_RESPONSE_HEAD = 4096  # bytes of HTTP response headers accepted on the upgrade


class HandshakeRefused(OSError):
    """The hub answered the upgrade with an HTTP status other than 101."""

    def __init__(self, status: int, retry_after_s: int | None, reason: str) -> None:
        super().__init__("HTTP %d %s" % (status, reason))
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason


def split_url(url: str) -> tuple[bool, str, int, str]:
    """`ws://host:port/path?query` as (tls, host, port, path-and-query)."""
    if url.startswith("wss://"):
        tls, rest, port = True, url[6:], 443
    elif url.startswith("ws://"):
        tls, rest, port = False, url[5:], 80
    else:
        raise ValueError("the hub URL must start with ws:// or wss://")
    slash = rest.find("/")
    hostport, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if hostport.startswith("["):  # [::1]:8765
        close = hostport.find("]")
        host, tail = hostport[1:close], hostport[close + 1 :]
        if tail.startswith(":"):
            port = int(tail[1:])
    elif ":" in hostport:
        host, port_text = hostport.rsplit(":", 1)
        port = int(port_text)
    else:
        host = hostport
    if not host:
        raise ValueError("the hub URL has no host")
    return tls, host, port, path


def handshake_request(host: str, port: int, path: str, key: bytes, headers: list[str]) -> bytes:
    """The HTTP/1.1 upgrade request (`headers` as complete `Name: value` lines)."""
    lines = [
        "GET %s HTTP/1.1" % path,
        "Host: %s:%d" % (host, port),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: %s" % key.decode(),
        "Sec-WebSocket-Version: 13",
    ]
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_response_head(head: bytes, key: bytes) -> None:
    """Check the upgrade response's status and accept header; raise `HandshakeRefused`."""
    lines = head.decode("utf-8", "replace").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HandshakeRefused(0, None, "not an HTTP response")
    status = int(parts[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if status != 101:
        retry_after = None
        text = fields.get("retry-after", "")
        if text.isdigit():
            retry_after = int(text)
        raise HandshakeRefused(status, retry_after, parts[2] if len(parts) > 2 else "")
    digest = compat.sha1(key + _GUID)
    if digest is not None and fields.get("sec-websocket-accept", "").encode() != compat.b64encode(
        digest
    ):
        raise HandshakeRefused(101, None, "wrong Sec-WebSocket-Accept")


class WebSocket:
    """One connection to the hub; see the module docstring."""

    def __init__(self, max_payload: int) -> None:
        self.reader = wsframe.FrameReader(max_payload)
        self.sock: object = None
        self.poller: object = None
        self.close_code: int | None = None  # set once closed: the hub's code, or 1006
        self.close_reason = ""
        self.received_at = compat.ticks_ms()  # when bytes last came from the hub (pings too)
        self.pongs = 0  # pings answered
        self._control: list[bytearray] = []  # pong and close frames, sent first
        self._data: list[bytearray] = []  # data frames, in order
        self._current: memoryview | None = None  # the frame being written
        self._close_sent = False

    def open(self, url: str, headers: list[str], timeout_ms: int, cadata: bytes | None) -> None:
        """Connect and upgrade, within `timeout_ms` per step; raise OSError on failure."""
        # Imported here so that the rest loads where there is no socket module (the
        # WebAssembly port the test suite runs the pure modules on).
        import socket

        tls, host, port, path = split_url(url)
        address = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        sock = socket.socket(address[0], socket.SOCK_STREAM)
        self.sock = sock
        try:
            sock.settimeout(timeout_ms / 1000)
            sock.connect(address[-1])
            if tls:
                sock = compat.wrap_tls(sock, host, cadata)  # type: ignore[assignment]
                self.sock = sock
            key = compat.b64encode(compat.random_bytes(16))
            request = handshake_request(host, port, path, key, headers)
            view = memoryview(request)
            while view:
                view = view[compat.sock_write(sock, view) :]
            self._read_response_head(sock, key)
            sock.setblocking(False)
        except BaseException:
            self.abort()
            raise
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def _read_response_head(self, sock: object, key: bytes) -> None:
        head = bytearray()
        # Never read more than the frame buffer holds: what follows the headers goes there.
        chunk = bytearray(min(512, self.reader.max_payload + 14))
        view = memoryview(chunk)
        while True:
            count = compat.sock_read_into(sock, view)
            if not count:
                raise OSError("connection closed during the handshake")
            head.extend(view[:count])
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                parse_response_head(bytes(head[:end]), key)
                self.reader.feed(memoryview(head)[end + 4 :])
                return
            if len(head) > _MAX_RESPONSE_HEAD:
                raise OSError("handshake response headers too long")

    @property
    def closed(self) -> bool:
        """True once the connection has ended (see `close_code`)."""
        return self.close_code is not None

    def pending(self) -> int:
        """Frames queued or being written."""
        return len(self._control) + len(self._data) + (self._current is not None)

    def send(self, opcode: int, payload: bytes | bytearray | memoryview, fin: bool = True) -> None:
        """Queue a data frame (binary, or a continuation of a fragmented message)."""
        self._data.append(wsframe.encode_frame(opcode, payload, compat.random_bytes(4), fin))

    def _send_control(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        self._control.append(wsframe.encode_frame(opcode, payload, compat.random_bytes(4)))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (the close frame goes out before queued data)."""
        if not self._close_sent and not self.closed:
            self._close_sent = True
            self._data.clear()
            self._send_control(wsframe.OP_CLOSE, wsframe.close_payload(code, reason))

    def abort(self, code: int = 1006) -> None:
        """Drop the connection without a closing handshake."""
        if self.close_code is None:
            self.close_code = code
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()  # type: ignore[attr-defined]
            except OSError:
                pass

    def service(self, timeout_ms: int, on_message: object) -> None:
        """Wait up to `timeout_ms` for the socket, then read and write what it allows.

        `on_message(opcode, payload, truncated)` is called for each complete data message;
        its payload is valid only during the call.
        """
        if self.sock is None:
            return
        self._frames(on_message)  # frames that came with the handshake response
        if self.sock is None:
            return
        self._next_current()
        poller = self.poller
        mask = select.POLLIN | (select.POLLOUT if self._current is not None else 0)
        poller.modify(self.sock, mask)  # type: ignore[attr-defined]
        events = poller.poll(timeout_ms)  # type: ignore[attr-defined]
        for event in events:
            flags = event[1]
            if flags & select.POLLOUT:
                self._write()
            if flags & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read(on_message)
            if self.sock is None:
                return

    def _next_current(self) -> None:
        if self._current is None:
            if self._control:
                self._current = memoryview(self._control.pop(0))
            elif self._data:
                self._current = memoryview(self._data.pop(0))

    def _write(self) -> None:
        while self.sock is not None:
            self._next_current()
            current = self._current
            if current is None:
                return
            try:
                written = compat.sock_write(self.sock, current)
            except OSError:
                self.abort()
                return
            if not written:
                return
            current = current[written:]
            self._current = current if len(current) else None

    def _read(self, on_message: object) -> None:
        while self.sock is not None:
            space = self.reader.space()
            try:
                count = compat.sock_read_into(self.sock, space)
            except OSError:
                self.abort()
                return
            if count is None:
                return
            if count == 0:
                self.abort()
                return
            self.received_at = compat.ticks_ms()
            self.reader.received(count)
            self._frames(on_message)

    def _frames(self, on_message: object) -> None:
        while self.sock is not None:
            try:
                frame = self.reader.next()
            except wsframe.ProtocolViolation as violation:
                self.close(violation.code, str(violation))
                self._write()
                self.abort(violation.code)
                return
            if frame is None:
                return
            opcode = frame.opcode
            if opcode == wsframe.OP_PING:
                self._send_control(wsframe.OP_PONG, frame.payload)
                self.pongs += 1
            elif opcode == wsframe.OP_CLOSE:
                code, reason = wsframe.parse_close(frame.payload)
                self.close_reason = reason
                if not self._close_sent:
                    self._close_sent = True
                    self._data.clear()
                    self._control.append(
                        wsframe.encode_frame(
                            wsframe.OP_CLOSE, frame.payload[:2], compat.random_bytes(4)
                        )
                    )
                self._current = None
                self._write()
                self.abort(code)
                return
            elif opcode in (wsframe.OP_BINARY, wsframe.OP_TEXT, wsframe.OP_CONTINUATION):
                self._message(frame, on_message)
            # pongs (we send no pings) and unknown opcodes are ignored

    def _message(self, frame: wsframe.Frame, on_message: object) -> None:
        # The hub never fragments its frames (docs/protocol.md); a fragmented message is
        # still read, up to the same bound, so that a proxy that fragments is no problem.
        if frame.opcode != wsframe.OP_CONTINUATION and frame.fin and self._partial is None:
            on_message(frame.opcode, frame.payload, frame.truncated)  # type: ignore[operator]
            return
        if frame.opcode != wsframe.OP_CONTINUATION:
            self._partial_opcode = frame.opcode
            self._partial = bytearray()
            self._partial_truncated = False
        if self._partial is None:
            return  # a continuation without a start: ignore it
        room = self.reader.max_payload - len(self._partial)
        self._partial.extend(frame.payload[:room])
        self._partial_truncated |= frame.truncated or len(frame.payload) > room
        if frame.fin:
            partial, self._partial = self._partial, None
            on_message(self._partial_opcode, memoryview(partial), self._partial_truncated)  # type: ignore[operator]

    _partial: bytearray | None = None
    _partial_opcode = 0
    _partial_truncated = False
