"""The suite-wide check that no device token reaches a log; installed by tests/conftest.py.

`LeakWatch` is a logging handler on the root logger at DEBUG for the whole session. It sees
each record after the filters of the logger that made it (so websockets' request lines have
been through the hub's `RedactingFilter`) and before any handler's own filter: a token that
only the output handler of `hub serve` would mask still counts as leaked. A record leaks if
its text holds anything shaped like a token (`hubt_` + token characters) or the random part
of a token issued in this process, with or without its prefix.

Not the hub's, so not checked: `websockets.client`, the test devices' own side of the
connection, which logs its request line with a query token.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from hub.registry.sqlite import TOKEN_PREFIX

NOT_THE_HUB = ("websockets.client",)
TOKEN_SHAPE = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]{16,}")
BODY_CHARS = 43  # secrets.token_urlsafe(32)
_RUN = re.compile(rf"[A-Za-z0-9_-]{{{BODY_CHARS},}}")
_MASK = re.compile(r"[A-Za-z0-9_-]{16,}")


def holds_token(text: str, issued: set[str]) -> bool:
    """Whether `text` holds a token: token-shaped, or an issued token's random part."""
    if TOKEN_SHAPE.search(text):
        return True
    for run in _RUN.findall(text):
        if any(run[i : i + BODY_CHARS] in issued for i in range(len(run) - BODY_CHARS + 1)):
            return True
    return False


def masked(text: str) -> str:
    """`text` fit for a report: every long run of token characters replaced by ***."""
    return _MASK.sub("***", text)[:300]


class LeakWatch(logging.Handler):
    """Collects every log record that holds a device token (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.issued: set[str] = set()
        self.records = 0
        self.leaks: list[str] = []

    def token_issued(self, token: str) -> None:
        """Remember a token issued in this process (its random part)."""
        self.issued.add(token.removeprefix(TOKEN_PREFIX))

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        if record.name.startswith(NOT_THE_HUB):
            return
        try:
            text = record.getMessage()
        except Exception:  # a broken record is logging's business, not a leak
            return
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if holds_token(text, self.issued):
            self.leaks.append(f"{record.name} {record.levelname}: {masked(text)}")

    def check_files(self, paths: list[Path]) -> None:
        """Check log files written by hub processes the tests started."""
        for path in paths:
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if holds_token(line, self.issued):
                    self.leaks.append(f"{path.name}:{number}: {masked(line)}")
