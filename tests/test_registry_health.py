"""The hub while its registry cannot answer (hub.gateway.registryhealth): outages said once,
and the opt-in memory of verified tokens."""

from __future__ import annotations

import logging

import pytest

from hub.gateway.registryhealth import RegistryHealth, VerifiedTokens, error_line
from hub.registry.records import Credential

pytestmark = pytest.mark.unit


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fifty failures make one warning naming the first; the first success another, with
    the outage's length; every failure is counted."""
    clock = Clock()
    health = RegistryHealth(clock)
    assert health.up and health.describe() == "ok"
    with caplog.at_level(logging.WARNING, "hub.registry"):
        health.failed("token lookup", ConnectionRefusedError("connection refused"))
        for _ in range(49):
            clock.now += 0.5
            health.failed("presence flush", TimeoutError())
        assert not health.up
        assert health.describe() == "unavailable for 24 s"
        health.succeeded()
        health.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "token lookup failed: ConnectionRefusedError: connection refused" in lines[0]
    assert "reachable again after 24.5 s" in lines[1]
    assert health.failures == 50 and health.up and health.down_for_s() == 0.0


def test_a_second_outage_is_logged_again() -> None:
    """Once it ended, the next failure starts a new outage."""
    health = RegistryHealth(Clock())
    health.failed("token lookup", OSError("unreachable"))
    health.succeeded()
    health.failed("token lookup", OSError("unreachable"))
    assert not health.up and health.failures == 2


def test_error_line_names_the_error_on_one_line() -> None:
    """Type and first line of the message; the type alone when there is none."""
    assert error_line(TimeoutError()) == "TimeoutError"
    assert error_line(OSError("no route\nmore")) == "OSError: no route"


def credential(device: str, expires_at: float | None = None) -> Credential:
    """A credential as the registry returns it."""
    return Credential(device, f"{device:0<64}"[:64], expires_at)


def test_verified_tokens_are_off_by_default() -> None:
    """With max_age_s 0 nothing is remembered, so nothing is let in from memory."""
    tokens = VerifiedTokens(0.0, 10)
    tokens.remember(credential("a"))
    assert len(tokens) == 0 and tokens.recall(credential("a").token_hash) is None


def test_a_verified_token_is_recalled_within_its_age_only() -> None:
    """Recalled until max_age_s after it was verified, then forgotten."""
    clock = Clock()
    tokens = VerifiedTokens(60.0, 10, clock)
    known = credential("a")
    tokens.remember(known)
    clock.now += 60.0
    assert tokens.recall(known.token_hash) == known
    clock.now += 0.1
    assert tokens.recall(known.token_hash) is None
    assert len(tokens) == 0


def test_a_rotated_out_token_past_its_grace_is_not_recalled() -> None:
    """A credential in a rotation grace works from memory only until the grace ends."""
    tokens = VerifiedTokens(60.0, 10, Clock())
    graced = credential("a", expires_at=1000.0)
    tokens.remember(graced)
    assert tokens.recall(graced.token_hash, now_unix=999.0) == graced
    assert tokens.recall(graced.token_hash, now_unix=1000.0) is None


def test_the_memory_is_bounded_and_forgets_the_least_recently_verified() -> None:
    """At capacity the oldest verification goes; a re-verified token moves to the back;
    a token the registry refused is forgotten at once."""
    tokens = VerifiedTokens(60.0, 2, Clock())
    a, b, c = credential("a"), credential("b"), credential("c")
    tokens.remember(a)
    tokens.remember(b)
    tokens.remember(a)
    tokens.remember(c)
    assert tokens.recall(b.token_hash) is None
    assert tokens.recall(a.token_hash) == a and tokens.recall(c.token_hash) == c
    tokens.forget(a.token_hash)
    assert tokens.recall(a.token_hash) is None and len(tokens) == 1
