"""Log lines: JSON as an option, syslog priorities for the journal, and a per-device limit
that keeps a broken device from flooding the journal."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.ops.logs import (
    DeviceLineLimit,
    configure_logging,
    device_extra,
    make_formatter,
    stdout_is_journal,
)
from hub.registry.sqlite import new_token

pytestmark = pytest.mark.unit


class FakeClock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stdout() -> Iterator[io.StringIO]:
    """Where `configure_logging` is told to write; the root logger restored afterwards."""
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def limited(limit: int = 3, window_s: float = 60.0) -> tuple[DeviceLineLimit, FakeClock]:
    """A device line limit on a fake clock."""
    clock = FakeClock()
    return DeviceLineLimit(limit, window_s, clock), clock


def record(message: str, device: str | None = "sensor-1") -> logging.LogRecord:
    """A WARNING record, about `device` if given."""
    made = logging.LogRecord("hub.session", logging.WARNING, __file__, 1, message, None, None)
    if device is not None:
        made.device = device
    return made


# --- JSON -----------------------------------------------------------------------------------


def test_json_lines_are_one_object_per_event(stdout: io.StringIO) -> None:
    """log_format json: each event one line of JSON with time, level, logger, message."""
    configure_logging("INFO", "json", stdout)
    logging.getLogger("hub.test").info("hello %s", "world")
    logging.getLogger("hub.test").debug("not at INFO")
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry.keys() == {"time", "level", "logger", "message"}
    assert entry["level"] == "INFO"
    assert entry["logger"] == "hub.test"
    assert entry["message"] == "hello world"


def test_json_lines_name_the_device(stdout: io.StringIO) -> None:
    """A line about a device carries it as a field."""
    configure_logging("INFO", "json", stdout)
    logging.getLogger("hub.session").warning("bad frame", extra=device_extra("sensor-7"))
    assert json.loads(stdout.getvalue())["device"] == "sensor-7"


def test_json_keeps_a_traceback_on_the_line_and_tokens_out(stdout: io.StringIO) -> None:
    """An exception stays on the event's one line, with tokens masked."""
    configure_logging("INFO", "json", stdout)
    token = new_token()
    try:
        raise ValueError(f"refused {token}")
    except ValueError:
        logging.getLogger("hub.test").exception("handshake failed for %s", token)
    output = stdout.getvalue()
    assert token not in output
    (line,) = output.splitlines()
    entry = json.loads(line)
    assert entry["message"] == "handshake failed for ***"
    assert "ValueError: refused ***" in entry["exception"]


def test_text_lines_mask_tokens_too(stdout: io.StringIO) -> None:
    """log_format text keeps the redacting filter."""
    configure_logging("INFO", "text", stdout)
    token = new_token()
    logging.getLogger("hub.test").warning("token %s", token)
    assert token not in stdout.getvalue()
    assert stdout.getvalue().rstrip().endswith("WARNING hub.test: token ***")


# --- The journal ----------------------------------------------------------------------------


def test_journal_lines_start_with_their_priority() -> None:
    """For the journal: <4> for a warning, <3> for an error, and no timestamp of ours."""
    formatter = make_formatter("text", journal=True)
    warning = record("slow down")
    error = logging.LogRecord("hub", logging.ERROR, __file__, 1, "broken", None, None)
    assert formatter.format(warning) == "<4>WARNING hub.session: slow down"
    assert formatter.format(error) == "<3>ERROR hub: broken"


def test_stdout_is_the_journal_when_journal_stream_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM naming stdout's device and inode means the journal; another does not."""
    with (tmp_path / "out").open("w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        stat = Path(tmp_path / "out").stat()
        assert stdout_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
        assert not stdout_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
        assert not stdout_is_journal({})


# --- Per-device limit -----------------------------------------------------------------------


def test_device_lines_over_the_limit_are_dropped() -> None:
    """With a limit of 3 a minute, the 4th and later lines of the minute are dropped."""
    limit, _clock = limited(3)
    passed = [limit.filter(record(f"error {n}")) for n in range(10)]
    assert passed == [True, True, True] + [False] * 7


def test_the_last_line_let_through_says_more_are_suppressed() -> None:
    """The line that reaches the limit says that further lines are suppressed."""
    limit, _clock = limited(3)
    lines = [record(f"error {n}") for n in range(3)]
    for line in lines:
        limit.filter(line)
    assert lines[2].getMessage() == (
        "error 2 (more lines about device sensor-1 suppressed for up to 60 s)"
    )


def test_the_next_window_reports_how_many_were_suppressed() -> None:
    """After the window, the device's next line passes and counts the suppressed ones."""
    limit, clock = limited(3)
    for n in range(10):
        limit.filter(record(f"error {n}"))
    clock.now += 60
    later = record("error 10")
    assert limit.filter(later)
    assert later.getMessage() == "error 10 (7 earlier lines about device sensor-1 suppressed)"


def test_one_noisy_device_does_not_silence_another() -> None:
    """The limit is per device; lines about no device are never limited."""
    limit, _clock = limited(3)
    for n in range(10):
        limit.filter(record(f"error {n}", "noisy"))
    assert limit.filter(record("first words", "quiet"))
    assert all(limit.filter(record(f"hub line {n}", None)) for n in range(10))


def test_configured_logging_limits_device_lines(stdout: io.StringIO) -> None:
    """`configure_logging` installs the limit: a flood from one device stays short."""
    configure_logging("INFO", "text", stdout)
    log = logging.getLogger("hub.session")
    for n in range(1000):
        log.warning("device sensor-1: bad frame %d", n, extra=device_extra("sensor-1"))
    lines = stdout.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[-1].endswith("(more lines about device sensor-1 suppressed for up to 60 s)")
