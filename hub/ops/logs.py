"""Logging: one line per event on stdout for the journal, with secrets kept out.

Lines are text (`log_format = "text"`) or one JSON object each (`"json"`). When stdout is
the journal (systemd's `JOURNAL_STREAM` names it), each line starts with its syslog
priority (`<4>`), so `journalctl -p warning` works, and the journal's own timestamp replaces
ours. A log call about one device passes `extra=device_extra(device_id)`: the device is then
a field of JSON lines, and `DeviceLineLimit` keeps a broken device from flooding the journal.

Tokens must never reach a log line. The hub never logs one on purpose, and the redacting
filter below is the second line of defence: it masks anything shaped like a token, a
`token=` query parameter, an `Authorization` value or URL credentials in every record,
including those of libraries (websockets logs request lines at debug level). The same
filter is the one place where device-supplied text is made safe: control characters are
escaped, so that no device can end a line or forge the next one, in any format.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from hub.registry.sqlite import TOKEN_PREFIX

_SECRET = re.compile(
    # a hub token anywhere: how `hub.registry.new_token` mints them
    rf"({re.escape(TOKEN_PREFIX)}[A-Za-z0-9_-]+)"
    # a secret query parameter
    r"|((?:token|password|p)=)[^&\s'\"]+"
    # an Authorization header's value, whatever its scheme (the scheme is kept)
    r"|(\bAuthorization[\"']?\s*[:=]\s*[\"']?(?:[A-Za-z][\w.+-]*[ \t]+)?)[^\s'\",]+"
    # a bearer or basic credential outside a header
    r"|(\b(?:Bearer|Basic)[ \t]+)[^\s'\"]+"
    # URL credentials: everything between :// and the last @ of the URL, since a password
    # may hold unencoded @ and / (over-masking a path with an @ is the safe mistake)
    r"|(://)[^\s'\"]*@",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every token-like secret replaced by `***`."""
    return _SECRET.sub(_mask, text)


def _mask(match: re.Match[str]) -> str:
    if match.group(5):
        return "://***@"
    return (match.group(2) or match.group(3) or match.group(4) or "") + "***"


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def escape_control(text: str) -> str:
    """`text` with control characters (and Unicode line separators) written as escapes, so
    that text a device chose can neither end a log line nor forge the next one."""
    return text.translate(_CONTROL)


class RedactingFilter(logging.Filter):
    """Masks secrets in, and escapes control characters of, the final message of every
    record passing through a handler: the one place where device text is made safe for a
    log line, whatever the format (tracebacks keep their line feeds, secrets masked)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = escape_control(redact(message))
        if cleaned != message or record.exc_info:
            record.msg, record.args = cleaned, None
            if record.exc_info:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


DEVICE_LINE_LIMIT = 20
DEVICE_LINE_WINDOW_S = 60.0


def device_extra(device_id: str) -> dict[str, str]:
    """The `extra=` of a log call about one device."""
    return {"device": device_id}


@dataclass
class _Window:
    start: float
    lines: int = 1
    suppressed: int = 0


class DeviceLineLimit(logging.Filter):
    """At most `limit` lines about one device per `window_s`; the last one says that more are
    suppressed, and the first line after the window says how many were."""

    def __init__(
        self,
        limit: int = DEVICE_LINE_LIMIT,
        window_s: float = DEVICE_LINE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._pruned = clock()

    def filter(self, record: logging.LogRecord) -> bool:
        device = getattr(record, "device", None)
        if not isinstance(device, str):
            return True
        now = self._clock()
        window = self._windows.get(device)
        if window is None or now - window.start >= self.window_s:
            self._windows[device] = _Window(now)
            self._prune(now)
            if window is not None and window.suppressed:
                _rewrite(
                    record,
                    f"{record.getMessage()} ({window.suppressed} earlier lines about device "
                    f"{device} suppressed)",
                )
            return True
        window.lines += 1
        if window.lines < self.limit:
            return True
        if window.lines == self.limit:
            _rewrite(
                record,
                f"{record.getMessage()} (more lines about device {device} suppressed for up to "
                f"{self.window_s:g} s)",
            )
            return True
        window.suppressed += 1
        return False

    def _prune(self, now: float) -> None:
        # Windows with a suppressed count are kept (a while) to report it on the next line.
        if now - self._pruned < self.window_s:
            return
        self._pruned = now
        self._windows = {
            device: window
            for device, window in self._windows.items()
            if now - window.start < self.window_s
            or (window.suppressed and now - window.start < 10 * self.window_s)
        }


def _rewrite(record: logging.LogRecord, message: str) -> None:
    record.msg, record.args = message, None


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, device, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (device := getattr(record, "device", None)) is not None:
            entry["device"] = device
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _JournalPriority(logging.Formatter):
    """Prefixes each line with its syslog priority, which the journal reads and strips."""

    _PRIORITIES = (
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
    )

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self._PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{self._inner.format(record)}"


def stdout_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether stdout is connected to the journal (systemd sets `JOURNAL_STREAM=dev:inode`)."""
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        stat = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def make_formatter(log_format: str, journal: bool) -> logging.Formatter:
    """The formatter for `log_format` (`text` or `json`), with priorities for the journal."""
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    elif journal:
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _JournalPriority(formatter) if journal else formatter


def configure_logging(level: str, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Send log lines to stdout (or `stream`) at `level`; websockets' own chatter only from
    WARNING up."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(make_formatter(log_format, stream is None and stdout_is_journal()))
    handler.addFilter(DeviceLineLimit())
    handler.addFilter(RedactingFilter())
    logging.getLogger().handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """Log at `level` from now on (a SIGHUP reload calls this)."""
    root = logging.getLogger()
    root.setLevel(level)
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


class WorkerTag(logging.Filter):
    """Names the worker in each line of one of several: `hub.server[2]: ...`, so the lines
    of N processes on one stdout (one journal) can be told apart."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.suffix = f"[{number}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def tag_worker_lines(number: int) -> None:
    """From now on, every line `configure_logging` prints names worker `number`."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerTag(number))
