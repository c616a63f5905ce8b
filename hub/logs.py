"""Logging: one line per event on stdout for the journal, with secrets kept out.

Tokens must never reach a log line. The hub never logs one on purpose, and the redacting
filter below is the second line of defence: it masks anything shaped like a token, a
`token=` query parameter or a bearer header in every record, including those of libraries
(websockets logs request lines at debug level).
"""

from __future__ import annotations

import logging
import re
import sys

from hub.registry import TOKEN_PREFIX

_SECRET = re.compile(
    rf"({re.escape(TOKEN_PREFIX)}[A-Za-z0-9_-]+)"
    r"|((?:token|password|p)=)[^&\s'\"]+"
    r"|((?:Bearer|Basic|Token)\s+)[^\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with every token-like secret replaced by `***`."""
    return _SECRET.sub(lambda m: (m.group(2) or m.group(3) or "") + "***", text)


class RedactingFilter(logging.Filter):
    """Masks secrets in the final message of every record passing through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.exc_info:
            record.msg, record.args = cleaned, None
            if record.exc_info:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def configure_logging(level: str) -> None:
    """Send log lines to stdout at `level`; websockets' own chatter only from WARNING up."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
