"""Token buckets for per-device rates, and the per-address limit on failed handshakes.

Pure: time is passed in.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; starts full."""

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` tokens if there are enough; False (and nothing taken) if not."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


def source_key(host: str) -> str:
    """Who a failed handshake is charged to: the IPv4 address, or the IPv6 /64 network.

    One IPv6 host usually holds a whole /64, so counting single addresses would let it
    guess on forever.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class FailureCounters:
    """What the failed-handshake limiter has seen since start."""

    failures: int = 0
    blocks: int = 0
    refused_while_blocked: int = 0


BLOCKED_CHECKS_PER_S = 10.0
BLOCKED_CHECKS_BURST = 50.0
"""Tokens looked up per second (and at once) for one blocked source: a NAT site's valid
devices still get in, while a guesser's hashes and lookups stay bounded."""


@dataclass
class _Source:
    bucket: TokenBucket
    blocked_until: float = 0.0
    checks: TokenBucket | None = None


@dataclass
class FailedHandshakeLimiter:
    """Failed handshakes (bad or missing token) per source: a token bucket each.

    A source may fail `burst` times at once, then `per_s` times a second; one more failure
    blocks it for `block_s`. While blocked, a wrong token from it gets 429 (not 401), so that
    guessing stays slowed and a wrong guess is not told from a blocked one; a valid token is
    let in, so one broken board behind a NAT does not lock out its neighbours. Looking a
    token up costs a hash and a query, so a blocked source may have at most
    `BLOCKED_CHECKS_PER_S` looked up (burst `BLOCKED_CHECKS_BURST`); past that its handshakes
    get 429 unchecked. `burst` 0 turns it off.
    Memory is bounded: past `max_sources`, the source that failed longest ago is forgotten.
    """

    burst: int
    per_s: float
    block_s: float
    max_sources: int = 65_536
    counters: FailureCounters = field(default_factory=FailureCounters)
    _sources: OrderedDict[str, _Source] = field(default_factory=OrderedDict, repr=False)

    def __len__(self) -> int:
        return len(self._sources)

    def blocked_for(self, source: str, now: float) -> float:
        """Seconds `source` stays blocked (0 if it is not)."""
        state = self._sources.get(source)
        if state is None or state.blocked_until <= now:
            return 0.0
        return state.blocked_until - now

    def may_check(self, source: str, now: float) -> bool:
        """Whether a token from `source` may be looked up now (always, unless it is blocked
        and has used its budget of lookups)."""
        state = self._sources.get(source)
        if state is None or state.blocked_until <= now:
            return True
        if state.checks is None:
            state.checks = TokenBucket(BLOCKED_CHECKS_PER_S, BLOCKED_CHECKS_BURST, updated=now)
        return state.checks.take(1, now)

    def refused_while_blocked(self) -> None:
        """Count a handshake answered 429 because its source is blocked."""
        self.counters.refused_while_blocked += 1

    def failed(self, source: str, now: float) -> bool:
        """Record a failed handshake from `source`; True if that failure blocks it."""
        self.counters.failures += 1
        if self.burst <= 0:
            return False
        state = self._sources.get(source)
        if state is None:
            state = self._sources[source] = _Source(
                TokenBucket(self.per_s, self.burst, updated=now)
            )
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        if state.blocked_until > now:
            return False
        if state.bucket.take(1, now):
            return False
        state.blocked_until = now + self.block_s
        state.bucket = TokenBucket(self.per_s, self.burst, updated=now + self.block_s)
        self.counters.blocks += 1
        return True
