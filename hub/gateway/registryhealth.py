"""What the hub does while its registry cannot answer (PostgreSQL stopped, frozen, cut off).

Ingest never waits on the registry: connected devices keep streaming and being acked. What
needs it is a new handshake (whose token is this?), presence flushes and config answers, and
the fleet watcher. Each of those reports its outcome here, so that an outage is

* **logged once** when it starts (the first failure, with what failed and why) and once when
  it ends (with how long it lasted), instead of a line per handshake or flush;
* **shown** by `/healthz` (`registry`: "ok" or "unavailable for N s"; a warning, not a 503: a
  balancer taking every hub out would cut the devices that are still streaming) and
  **counted** in `/metrics` (`hub_registry_up`, `hub_registry_failures_total`).

New handshakes get 503 with `Retry-After` while the registry cannot say whose a token is,
unless the operator opted in to `registry_outage_admit_s`: then a token this hub verified
within that many seconds is let in again from memory (`VerifiedTokens`). The trade-off: a
token revoked during the outage keeps working here until the outage ends or the memory
expires, whichever is first (a revocation cannot reach a hub that cannot read the registry
anyway); once the registry is back, the safety net closes it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from hub.registry.records import Credential

log = logging.getLogger("hub.registry")


class RegistryHealth:
    """Whether the registry answered the hub's latest call; outages logged once each."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._down_since: float | None = None
        self.failures = 0
        """Registry calls that failed since start (`hub_registry_failures_total`)."""

    @property
    def up(self) -> bool:
        """Whether the latest registry call succeeded."""
        return self._down_since is None

    def down_for_s(self) -> float:
        """How long the registry has been failing (0 while it answers)."""
        return 0.0 if self._down_since is None else self._clock() - self._down_since

    def succeeded(self) -> None:
        """A registry call answered: an outage, if there was one, is over."""
        if self._down_since is not None:
            log.warning(
                "registry reachable again after %.1f s: new devices are let in again",
                self._clock() - self._down_since,
            )
            self._down_since = None

    def failed(self, what: str, exc: BaseException) -> None:
        """A registry call (`what`: "token lookup", "presence flush", ...) failed with `exc`."""
        self.failures += 1
        if self._down_since is None:
            self._down_since = self._clock()
            log.warning(
                "registry unavailable (%s failed: %s): connected devices keep streaming, new "
                "devices get 503 until it is back; said once, until it is",
                what,
                describe(exc),
            )

    def describe(self) -> str:
        """For /healthz: "ok", or "unavailable for N s"."""
        return "ok" if self.up else f"unavailable for {self.down_for_s():.0f} s"


def describe(exc: BaseException) -> str:
    """One line naming an error: its type and message (a timeout has none)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class VerifiedTokens:
    """Tokens this hub verified lately, for admitting their devices during an outage.

    Off (remembers nothing) when `max_age_s` is 0, the default. Holds at most `capacity`
    tokens, the least recently verified forgotten first. Only hashes and credentials are
    kept, never a token.
    """

    def __init__(
        self, max_age_s: float, capacity: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self.capacity = capacity
        self._clock = clock
        self._verified: OrderedDict[str, tuple[Credential, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._verified)

    def remember(self, credential: Credential) -> None:
        """The registry just vouched for `credential`."""
        if self.max_age_s <= 0:
            return
        self._verified[credential.token_hash] = (credential, self._clock())
        self._verified.move_to_end(credential.token_hash)
        while len(self._verified) > self.capacity:
            self._verified.popitem(last=False)

    def forget(self, token_hash: str) -> None:
        """The registry says this token no longer works."""
        self._verified.pop(token_hash, None)

    def recall(self, token_hash: str, now_unix: float | None = None) -> Credential | None:
        """The credential of a token verified within `max_age_s`, and not past its rotation
        grace (`expires_at`), else None."""
        found = self._verified.get(token_hash)
        if found is None:
            return None
        credential, verified_at = found
        if self._clock() - verified_at > self.max_age_s:
            del self._verified[token_hash]
            return None
        wall = time.time() if now_unix is None else now_unix
        if credential.expires_at is not None and credential.expires_at <= wall:
            return None
        return credential
