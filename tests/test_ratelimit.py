"""Rate limits without sockets: token buckets and the per-source failed-handshake limiter."""

from __future__ import annotations

import pytest

from hub.core.ratelimit import (
    BLOCKED_CHECKS_BURST,
    BLOCKED_CHECKS_PER_S,
    FailedHandshakeLimiter,
    TokenBucket,
    source_key,
)

pytestmark = pytest.mark.unit

SOURCE = "192.0.2.7"


def limiter(burst: int = 3, per_s: float = 1.0, block_s: float = 60.0) -> FailedHandshakeLimiter:
    """A limiter allowing `burst` failures at once, then `per_s` a second."""
    return FailedHandshakeLimiter(burst, per_s, block_s)


def fail_times(guard: FailedHandshakeLimiter, count: int, now: float = 0.0) -> list[bool]:
    """Record `count` failures of SOURCE at `now`; whether each one blocked it."""
    return [guard.failed(SOURCE, now) for _ in range(count)]


def test_token_bucket_allows_its_burst_then_its_rate() -> None:
    """A bucket gives its burst at once, then refills at its rate."""
    bucket = TokenBucket(rate=2.0, burst=4.0)
    assert [bucket.take(1, 0.0) for _ in range(5)] == [True, True, True, True, False]
    assert bucket.take(1, 0.5)
    assert not bucket.take(1, 0.5)


def test_failures_within_the_burst_do_not_block() -> None:
    """As many failures as the burst leave the source unblocked."""
    guard = limiter(burst=3)
    assert fail_times(guard, 3) == [False, False, False]
    assert guard.blocked_for(SOURCE, 0.0) == 0.0


def test_one_failure_past_the_burst_blocks_for_block_s() -> None:
    """The failure after the burst blocks the source for block_s."""
    guard = limiter(burst=3, block_s=60.0)
    assert fail_times(guard, 4) == [False, False, False, True]
    assert guard.blocked_for(SOURCE, 1.0) == pytest.approx(59.0)
    assert guard.counters.blocks == 1


def test_block_ends_after_block_s() -> None:
    """Once block_s has passed the source is let in again, with its burst refilled."""
    guard = limiter(burst=3, block_s=60.0)
    fail_times(guard, 4)
    assert guard.blocked_for(SOURCE, 60.0) == 0.0
    assert fail_times(guard, 3, now=60.0) == [False, False, False]


def test_failures_at_the_refill_rate_never_block() -> None:
    """Guessing no faster than per_s is slow but not blocked: the bucket refills."""
    guard = limiter(burst=3, per_s=1.0)
    fail_times(guard, 3)
    assert [guard.failed(SOURCE, t + 1.0) for t in range(20)] == [False] * 20


def test_sources_are_limited_separately() -> None:
    """A blocked source does not block another one."""
    guard = limiter(burst=1)
    fail_times(guard, 2)
    assert guard.blocked_for(SOURCE, 0.0) > 0
    assert guard.blocked_for("192.0.2.8", 0.0) == 0.0


def test_refusals_while_blocked_are_counted() -> None:
    """Each handshake refused while its source is blocked is counted, and each failure."""
    guard = limiter(burst=1)
    fail_times(guard, 2)
    for _ in range(3):
        guard.refused_while_blocked()
    assert (guard.counters.failures, guard.counters.refused_while_blocked) == (2, 3)


def test_token_lookups_of_a_blocked_source_are_bounded() -> None:
    """A blocked source gets BLOCKED_CHECKS_BURST lookups at once, then BLOCKED_CHECKS_PER_S."""
    guard = limiter(burst=1)
    fail_times(guard, 2)
    allowed = sum(guard.may_check(SOURCE, 1.0) for _ in range(1000))
    assert allowed == BLOCKED_CHECKS_BURST
    assert sum(guard.may_check(SOURCE, 2.0) for _ in range(1000)) == BLOCKED_CHECKS_PER_S
    assert all(guard.may_check("192.0.2.8", 1.0) for _ in range(1000))  # not blocked


def test_burst_zero_turns_the_limiter_off() -> None:
    """With burst 0 no number of failures blocks."""
    guard = limiter(burst=0)
    assert not any(fail_times(guard, 100))
    assert guard.blocked_for(SOURCE, 0.0) == 0.0


def test_memory_is_bounded_by_max_sources() -> None:
    """Past max_sources, the source that failed longest ago is forgotten."""
    guard = FailedHandshakeLimiter(1, 1.0, 60.0, max_sources=100)
    for n in range(1000):
        guard.failed(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(guard) == 100


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("/run/hub.sock", "/run/hub.sock"),
    ],
)
def test_source_key_is_the_ipv4_address_or_the_ipv6_64(host: str, key: str) -> None:
    """Failures are charged to an IPv4 address, or to the /64 around an IPv6 address."""
    assert source_key(host) == key
