"""The rules behind the attack fixes, as pure unit tests (no sockets, no servers) plus the
operator commands they change: redaction, control characters, the stranger limits and log
budget, the file-limit check, the handshake's Origin and token-form rules, `rotate --grace 0`
and the state directory's mode.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from http import HTTPStatus
from pathlib import Path

import pytest

from hub.cli.check import toml_value
from hub.core.handshake import MAX_TOKEN_CHARS, HandshakeRefused, read_credentials
from hub.gateway.admission import StrangerCounts, StrangerGuard, StrangerLimits, StrangerLog
from hub.gateway.presence import MAX_REASON_CHARS, PresenceTracker
from hub.ops.filelimit import FD_HEADROOM, FileLimit, shortfall_warning
from hub.ops.logs import RedactingFilter, escape_control, redact
from hub.registry.sqlite import Registry, new_token, secure_state_dir
from hub.registry.thread import ThreadedSQLiteRegistry

# --- Redaction: real secrets, not the hub's own words (item 10) -------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "line",
    [
        "device sensor-1: token revoked, closing the connection",
        "device sensor-1: its token was rotated out, closing the connection",
        "handshake from 10.0.0.1 refused: invalid or missing token",
        "Token bucket refilled",
    ],
)
def test_redaction_leaves_the_hubs_own_lines_alone(line: str) -> None:
    """Words like "token revoked" are not secrets: the line comes back unchanged."""
    assert redact(line) == line


@pytest.mark.unit
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("http://admin:p@ss@influx:8086", "http://***@influx:8086"),
        ("http://admin:pa/ss@influx:8086/x", "http://***@influx:8086/x"),
        ("http://admin:a@b/c@d@influx:8086", "http://***@influx:8086"),
        ("https://admin:s3cret@influx:8086", "https://***@influx:8086"),
    ],
)
def test_url_credentials_are_masked_whatever_the_password_holds(url: str, masked: str) -> None:
    """Everything between :// and the URL's last @ is masked, unencoded @ and / included."""
    assert redact(f"writing to {url} now") == f"writing to {masked} now"
    assert toml_value(url) == f'"{masked}"'  # what check-config prints


@pytest.mark.unit
@pytest.mark.parametrize(
    "header",
    ["Authorization: Token abc123", "authorization=Digest abc123", "Authorization: abc123"],
)
def test_any_authorization_value_is_masked(header: str) -> None:
    """An Authorization header's credentials are masked whatever its scheme."""
    assert "abc123" not in redact(header)


@pytest.mark.unit
def test_a_hub_token_is_masked_anywhere() -> None:
    """A token as `hub.registry.new_token` mints them is masked in any context."""
    token = new_token()
    assert redact(f"x{token}y") == "x***"  # a token runs to the end of its characters


# --- Control characters in device text (item 8) --------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("tab\there", "tab\\there"),
        ("nul\x00", "nul\\x00"),
        ("c1\x85", "c1\\x85"),
        ("sep\u2028", "sep\\u2028"),
        ("plain ünïcode", "plain ünïcode"),
    ],
)
def test_control_characters_are_escaped(text: str, escaped: str) -> None:
    """Control characters and Unicode line separators become visible escapes."""
    assert escape_control(text) == escaped


@pytest.mark.unit
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_log_filter_escapes_device_text_in_every_format(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line feed in a %-argument cannot start a new log line, in text or JSON format."""
    from hub.ops.logs import make_formatter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(make_formatter(log_format, journal=False))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.attack_rules")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        logger.warning("device x refused config: %s", "no\nFORGED line")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    output = capsys.readouterr().out
    assert output.count("\n") == 1
    assert "FORGED" in output and not any(line.startswith("FORGED") for line in output.splitlines())


@pytest.mark.unit
async def test_presence_records_a_close_reason_with_a_line_feed(tmp_path: Path) -> None:
    """A device's close reason with a line feed becomes one escaped, bounded field value."""
    path = tmp_path / "registry.sqlite3"
    operator = Registry(path)
    operator.add("dev-1")
    operator.close()
    registry = await ThreadedSQLiteRegistry.open(path, poll_s=0.01)
    try:
        presence = PresenceTracker(registry, "hub-test")
        presence.connected("dev-1", "10.0.0.1:5000")
        presence.disconnected("dev-1", "1000 normal closure: bye\nFORGED" + "\r" * 200)
        events = presence.take_events()
    finally:
        await registry.close()
    assert len(events) == 2 and "\n" not in events[1]
    assert 'reason="1000 normal closure: bye\\\\nFORGED' in events[1]
    assert len(events[1]) < 2 * MAX_REASON_CHARS + 200  # backslashes doubled by line protocol


# --- Strangers: per-source cap and the log budget (items 3 and 6) -------------------------------


@pytest.mark.unit
def test_unauthenticated_connections_are_capped_per_source() -> None:
    """A source gets `per_source` unauthenticated connections; others are unaffected."""
    limits = StrangerLimits(per_source=3)
    assert [limits.enter("10.0.0.1") for _ in range(5)] == [True, True, True, False, False]
    assert limits.enter("10.0.0.2")
    limits.leave("10.0.0.1")
    assert limits.enter("10.0.0.1")
    assert (limits.open_from("10.0.0.1"), len(limits)) == (3, 4)


@pytest.mark.unit
def test_leaving_more_than_entered_never_goes_negative() -> None:
    """A source's count never drops below zero and is forgotten at zero."""
    limits = StrangerLimits(per_source=1)
    limits.leave("10.0.0.1")
    assert limits.open_from("10.0.0.1") == 0 and len(limits) == 0


@pytest.mark.unit
def test_the_per_source_cap_never_exceeds_a_quarter_of_the_file_limit() -> None:
    """With a soft limit of 1024, one source may hold at most 256 unauthenticated sockets."""
    counts = StrangerCounts()
    guard = StrangerGuard(
        4096, 3.0, 16384, StrangerLog(logging.getLogger("t"), counts, time.monotonic), counts
    )
    guard.fit_to(1024)
    assert guard.limits.per_source == 256
    guard.fit_to(1_000_000)  # never raised above the setting
    assert guard.limits.per_source == 256


@pytest.mark.unit
def test_stranger_log_lines_are_budgeted_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """At most the burst at once, then the rate; the rest counted; the next line says so."""
    now = [0.0]
    counts = StrangerCounts()
    log = StrangerLog(logging.getLogger("tests.strangers"), counts, lambda: now[0], 5.0, 20.0)
    caplog.set_level(logging.INFO, "tests.strangers")
    logged = sum(log.line(logging.INFO, "refused %s", n) for n in range(1000))
    assert logged == 20 and counts.log_lines_suppressed == 980
    now[0] = 1.0
    assert log.line(logging.INFO, "refused %s", "again")
    assert "(980 earlier lines about unauthenticated clients suppressed)" in caplog.messages[-1]


# --- The open-file limit (item 3) ----------------------------------------------------------------


@pytest.mark.unit
def test_a_file_limit_below_max_connections_is_warned_about() -> None:
    """1024 descriptors cannot hold 20000 connections: the warning says what to change."""
    warning = shortfall_warning(FileLimit(1024, 1024), 20_000)
    assert warning is not None and "LimitNOFILE" in warning and "1024" in warning
    assert shortfall_warning(FileLimit(20_000 + FD_HEADROOM, 524_288), 20_000) is None


@pytest.mark.e2e
def test_serve_raises_its_soft_file_limit_to_the_hard_one() -> None:
    """`raise_file_limit` lifts the soft limit of the process it runs in (a child here)."""
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from hub.ops.filelimit import raise_file_limit\n"
        "limit = raise_file_limit(100)\n"
        "print(limit.soft == hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True", "True"]


# --- The handshake's rules (issue 14, clarification 6) --------------------------------------------

TOKEN = "hubt_" + "x" * 43
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.unit
@pytest.mark.parametrize("origin", ["http://localhost", "file://", "https://evil.example"])
def test_origin_is_ignored_without_an_allowlist(origin: str) -> None:
    """With no allowlist, any Origin passes."""
    assert read_credentials("/v1/ws", {**BEARER, "Origin": origin}, ())[0] == TOKEN


@pytest.mark.unit
def test_origin_is_checked_against_a_configured_allowlist() -> None:
    """With an allowlist, an Origin not on it is 403; one on it, or none, passes."""
    allowed = ["https://dash.example"]
    with pytest.raises(HandshakeRefused) as refusal:
        read_credentials("/v1/ws", {**BEARER, "Origin": "http://localhost"}, allowed)
    assert refusal.value.status == HTTPStatus.FORBIDDEN
    assert read_credentials("/v1/ws", {**BEARER, "Origin": allowed[0]}, allowed)[0] == TOKEN
    assert read_credentials("/v1/ws", BEARER, allowed)[0] == TOKEN


@pytest.mark.unit
def test_a_token_too_long_to_be_one_is_400_before_it_is_hashed() -> None:
    """A token longer than MAX_TOKEN_CHARS is a malformed request (400), not a guess."""
    with pytest.raises(HandshakeRefused) as refusal:
        read_credentials("/v1/ws", {"Authorization": "Bearer " + "a" * (MAX_TOKEN_CHARS + 1)})
    assert refusal.value.status == HTTPStatus.BAD_REQUEST


# --- rotate --grace 0 (item 7) -------------------------------------------------------------------


@pytest.mark.unit
def test_rotate_grace_0_expires_every_retired_token(tmp_path: Path) -> None:
    """After rotate 1h then rotate 0, neither earlier token works; the newest does."""
    registry = Registry(tmp_path / "registry.sqlite3")
    try:
        first = registry.add("dev-1")
        second = registry.rotate("dev-1", 3600)
        assert registry.authenticate(first) == "dev-1"  # in its grace period
        third = registry.rotate("dev-1", 0)
        assert registry.authenticate(first) is None
        assert registry.authenticate(second) is None
        assert registry.authenticate(third) == "dev-1"
    finally:
        registry.close()


# --- The state directory's mode (item 10) --------------------------------------------------------


@pytest.mark.unit
def test_an_existing_state_directory_is_made_private(tmp_path: Path) -> None:
    """A state directory created 0755 is 0700 after the hub or the CLI opens it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # noqa: S103 (the loose mode the hub must correct)
    secure_state_dir(state)
    assert state.stat().st_mode & 0o777 == 0o700


@pytest.mark.e2e
def test_the_cli_makes_the_state_directory_private(tmp_path: Path) -> None:
    """`hub token list` on a 0755 state directory leaves it 0700."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)  # noqa: S103 (the loose mode the hub must correct)
    subprocess.run(
        [sys.executable, "-m", "hub", "token", "list", "--state-dir", str(state)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert state.stat().st_mode & 0o777 == 0o700
