"""`HubClient`: stream readings to a sensor-hub, keep them until acked, reconnect, resend.

Single-threaded and never blocking longer than asked: the firmware calls `add()` for each
sample and `poll(ms)` to let the client connect, send, read acks, answer pings and apply
config for up to that long. See clients/micropython/README.md.
"""

from . import compat, mpack, policy, wsframe
from .buffer import ReadingsBuffer, check_reading, encode_reading_body
from .clock import Clock
from .ws import HandshakeRefused, WebSocket


class HubClient:
    """One device's connection to the hub, with its readings buffer and reconnect policy."""

    def __init__(
        self,
        url: str,
        token: str,
        on_config: object = None,
        *,
        max_readings: int = 1000,
        max_batch: int = 50,
        max_message_bytes: int = 16384,
        max_frame_bytes: int = 8192,
        window: int = 4,
        backoff_ms: int = 1000,
        backoff_cap_ms: int = 300_000,
        stable_ms: int = 30_000,
        connect_timeout_ms: int = 10_000,
        idle_timeout_ms: int = 60_000,
        fragment_bytes: int = 0,
        origin: str | None = None,
        token_in_query: bool = False,
        cadata: bytes | None = None,
        clock: Clock | None = None,
        log: object = None,
    ) -> None:
        base = url.rstrip("/")
        if not base.endswith("/v1/ws"):
            base += "/v1/ws"
        self.url = base + "?precision=ms" + ("&token=" + token if token_in_query else "")
        self._headers = [] if token_in_query else ["Authorization: Bearer " + token]
        if origin:
            self._headers.append("Origin: " + origin)
        self.on_config = on_config  # on_config(config: dict, version) -> None | str (refusal)
        self.buffer = ReadingsBuffer(max_readings, max_batch, max_message_bytes)
        self.max_frame_bytes = max(125, max_frame_bytes)  # a ping's 125 bytes fit
        self.window = window
        self.backoff_ms, self.backoff_cap_ms, self.stable_ms = backoff_ms, backoff_cap_ms, stable_ms
        self.connect_timeout_ms = connect_timeout_ms
        self.idle_timeout_ms = idle_timeout_ms
        self.fragment_bytes = fragment_bytes
        self.cadata = cadata
        self.clock = clock or Clock()
        self._log = log
        self.ws: WebSocket | None = None
        self.stopped: str | None = None  # "revoked", "unauthorized" or "refused": given up
        self.config_version = -1  # the last config version answered
        self._config_answer: str | None = None
        self.last_error: str | None = None  # the hub's last `error` message
        self.close_codes: list[int] = []  # the last 16 ways a connection ended
        self.refusals: list[int] = []  # the last 16 handshake refusals (HTTP status)
        self.sent = self.resent = self.acked = self.rejected = 0
        self.connects = self.failed_connects = 0
        self._attempt = 0
        self._next_attempt = compat.ticks_ms()
        self._seq = 0
        self._opened_at = 0
        self._connection_acked = False

    # The firmware's side

    def add(
        self,
        name: str,
        fields: dict[str, object],
        tags: dict[str, str] | None = None,
        time_ms: int | None = None,
    ) -> bool:
        """Hold one reading for sending; False when the full buffer dropped one for it.

        Without `time_ms` the reading is stamped now, or, while the clock is not set, when
        it gets set (from the ticks at sampling). Raises ValueError/TypeError for a reading
        the hub would refuse.
        """
        check_reading(name, fields, tags)
        entries, body = encode_reading_body(name, fields, tags)
        unix_ms: int | None = time_ms
        ticks = 0
        if time_ms is None:
            unix_ms, ticks = self.clock.sample_time()
        return self.buffer.add(entries, body, unix_ms, ticks)

    def poll(self, timeout_ms: int) -> None:
        """Do the client's work (connect, send, receive) for up to `timeout_ms`."""
        deadline = compat.ticks_add(compat.ticks_ms(), timeout_ms)
        while True:
            remaining = compat.ticks_diff(deadline, compat.ticks_ms())
            if remaining <= 0:
                return
            ws = self.ws
            if self.stopped is not None:
                compat.sleep_ms(remaining)
                return
            if ws is None:
                wait = compat.ticks_diff(self._next_attempt, compat.ticks_ms())
                if wait > 0:
                    compat.sleep_ms(min(wait, remaining))
                    continue
                self._connect()
                continue
            self._fill_window(ws)
            ws.service(min(remaining, 1000), self._on_message)
            now = compat.ticks_ms()
            if not ws.closed and compat.ticks_diff(now, ws.received_at) > self.idle_timeout_ms:
                # The hub pings every ping_interval_s (20 s): this much silence is a dead link.
                ws.abort(1006)
            if ws.closed:
                self._closed(ws)

    def flush(self, timeout_ms: int) -> bool:
        """Poll until every held reading is acked (True) or `timeout_ms` passed (False)."""
        deadline = compat.ticks_add(compat.ticks_ms(), timeout_ms)
        while self.buffer.held() and self.stopped is None:
            remaining = compat.ticks_diff(deadline, compat.ticks_ms())
            if remaining <= 0:
                return False
            self.poll(min(remaining, 100))
        return not self.buffer.held()

    def close(self, timeout_ms: int = 2000) -> None:
        """Close the connection (1000), waiting up to `timeout_ms` for the hub's answer."""
        ws = self.ws
        if ws is None:
            return
        ws.close(1000)
        deadline = compat.ticks_add(compat.ticks_ms(), timeout_ms)
        while not ws.closed and compat.ticks_diff(deadline, compat.ticks_ms()) > 0:
            ws.service(50, self._on_message)
        ws.abort(1000)
        self.ws = None

    def retry_in_ms(self) -> int:
        """Milliseconds until the next connection attempt (0 when connected or due)."""
        if self.ws is not None:
            return 0
        wait: int = compat.ticks_diff(self._next_attempt, compat.ticks_ms())
        return max(0, wait)

    # Connecting

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log(text)  # type: ignore[operator]

    def _connect(self) -> None:
        ws = WebSocket(self.max_frame_bytes)
        try:
            ws.open(self.url, self._headers, self.connect_timeout_ms, self.cadata)
        except HandshakeRefused as refusal:
            self.failed_connects += 1
            _remember(self.refusals, refusal.status)
            self._say("hub refused the connection: HTTP %d" % refusal.status)
            action, floor_s = policy.after_refusal(refusal.status, refusal.retry_after_s)
            self._retry_later(action, floor_s, refusal.status)
            return
        except (OSError, ValueError) as error:
            self.failed_connects += 1
            self._say("cannot connect: %s" % error)
            self._retry_later(policy.RETRY, 0, 0)
            return
        self.ws = ws
        self.connects += 1
        self._opened_at = compat.ticks_ms()
        self._connection_acked = False
        self.buffer.reconnected()

    def _retry_later(self, action: str, floor_s: int, why: int) -> None:
        if action == policy.STOP:
            self.stopped = policy.STOP_REASONS.get(why, "refused")
            self._say("giving up: %s" % self.stopped)
            return
        delay = policy.backoff_ms(self._attempt, self.backoff_ms, self.backoff_cap_ms, floor_s)
        self._attempt += 1
        self._next_attempt = compat.ticks_add(compat.ticks_ms(), delay)

    def _closed(self, ws: WebSocket) -> None:
        code = ws.close_code or 1006
        self.ws = None
        _remember(self.close_codes, code)
        self._say("connection closed: %d %s" % (code, ws.close_reason))
        up_ms = compat.ticks_diff(compat.ticks_ms(), self._opened_at)
        if self._connection_acked or up_ms >= self.stable_ms:
            self._attempt = 0
        action, floor_s = policy.after_close(code)
        if action == policy.DROP_OLDEST:
            self.buffer.drop_oldest()
        elif action == policy.SPLIT:
            self.buffer.split()
        self._retry_later(action, floor_s, code)

    # Sending

    def _fill_window(self, ws: WebSocket) -> None:
        if ws.pending():
            return  # one frame at a time: the next one is made once this one is out
        in_flight = 0
        for message in self.buffer.unacked:
            if message.sent:
                in_flight += 1
                continue
            if in_flight >= self.window:
                return
            self._send(ws, message)
            return
        if in_flight < self.window:
            new = self.buffer.next_message(self.clock.resolve)
            if new is not None:
                self.sent += len(new.readings)
                self._send(ws, new)

    def _send(self, ws: WebSocket, message: object) -> None:
        self._seq += 1
        frame = message.frame(self._seq)  # type: ignore[attr-defined]
        if message.resends:  # type: ignore[attr-defined]
            self.resent += len(message.readings)  # type: ignore[attr-defined]
        message.sent = True  # type: ignore[attr-defined]
        message.seq = self._seq  # type: ignore[attr-defined]
        step = self.fragment_bytes
        if not step or len(frame) <= step:
            ws.send(wsframe.OP_BINARY, frame)
            return
        # Fragments let a pong go out between them on a slow link; the hub reassembles.
        view = memoryview(frame)
        for start in range(0, len(frame), step):
            opcode = wsframe.OP_BINARY if start == 0 else wsframe.OP_CONTINUATION
            ws.send(opcode, view[start : start + step], start + step >= len(frame))

    # Receiving

    def _on_message(self, opcode: int, payload: memoryview, truncated: bool) -> None:
        ws = self.ws
        if ws is None or opcode != wsframe.OP_BINARY:
            return
        message: object
        try:
            if truncated:
                message, _ = mpack.decode_map_prefix(payload)
            else:
                message = mpack.decode(payload)
        except ValueError as error:
            self._say("undecodable frame from the hub: %s" % error)
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "ack":
            self._ack(ws, message, truncated)
        elif kind == "config":
            self._config(ws, message, truncated)
        elif kind == "error":
            self.last_error = "%s: %s" % (message.get("code"), message.get("message"))
            self._say("hub error " + self.last_error)

    def _ack(self, ws: WebSocket, ack: dict[object, object], truncated: bool) -> None:
        unacked = self.buffer.unacked
        if not unacked or not unacked[0].sent or ack.get("seq") != unacked[0].seq:
            # Acks come in order: one that matches nothing means we lost track; start over.
            self._say("unexpected ack %s: reconnecting" % ack.get("seq"))
            ws.close(1002, "unexpected ack")
            return
        message = self.buffer.acked()
        accepted = ack.get("accepted")
        count = len(message.readings)
        accepted = accepted if isinstance(accepted, int) else 0
        self.acked += accepted
        self.rejected += count - accepted
        rejected = ack.get("rejected")
        if isinstance(rejected, list) and rejected and isinstance(rejected[0], dict):
            self._say("hub rejected %d readings, first: %s" % (count - accepted, rejected[0]))
        elif truncated and accepted < count:
            self._say("hub rejected %d readings (ack too large to read)" % (count - accepted))
        self._connection_acked = True

    def _config(self, ws: WebSocket, message: dict[object, object], truncated: bool) -> None:
        version = message.get("version")
        if not isinstance(version, int) or version < self.config_version:
            return  # versions only grow: an older one may be ignored
        if version != self.config_version:
            config = message.get("config")
            if truncated or not isinstance(config, dict):
                answer: str | None = "config larger than this device's %d-byte frame buffer" % (
                    self.max_frame_bytes
                )
            else:
                answer = self._apply(config, version)
            self.config_version, self._config_answer = version, answer
        ack: dict[str, object] = {"type": "config_ack", "version": version, "ok": True}
        if self._config_answer is not None:
            ack["ok"] = False
            ack["error"] = self._config_answer
        ws.send(wsframe.OP_BINARY, mpack.encode(ack))

    def _apply(self, config: dict[object, object], version: int) -> str | None:
        if self.on_config is None:
            return None
        try:
            refusal = self.on_config(config, version)  # type: ignore[operator]
        except Exception as error:  # the device's own code: report it, do not crash
            return "%s: %s" % (type(error).__name__, error)
        return None if refusal is None or refusal is True else str(refusal)


def _remember(history: list[int], value: int) -> None:
    history.append(value)
    if len(history) > 16:
        history.pop(0)
