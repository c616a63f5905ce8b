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

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from hub.errors import HubError, RegistryUnavailable
from hub.registry.ports import HubRegistry
from hub.registry.records import (
    Claim,
    ConfigState,
    Credential,
    Device,
    DeviceChange,
    HeldSession,
    Presence,
    StaleSession,
)

T = TypeVar("T")

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
                error_line(exc),
            )

    def describe(self) -> str:
        """For /healthz: "ok", or "unavailable for N s"."""
        return "ok" if self.up else f"unavailable for {self.down_for_s():.0f} s"


def error_line(exc: BaseException) -> str:
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


PROBE_EVERY_S = 1.0
"""While a late call hangs (a frozen server, a partition), how often another call may try:
the registry's return is noticed within about this plus `registry_timeout_s`."""


class WatchedRegistry:
    """The hub's registry ports with every call's outcome reported to a `RegistryHealth`.

    A call that fails for want of a registry (refused, cut off, frozen past `timeout_s`,
    SQLite locked past its busy timeout) raises `RegistryUnavailable`, which the callers
    handle as "not now" without a traceback; the registry's own answers (`UnknownDevice`,
    ...) pass through as they are.
    """

    def __init__(self, registry: HubRegistry, health: RegistryHealth, timeout_s: float) -> None:
        self._registry = registry
        self.health = health
        self.timeout_s = timeout_s
        self._probe: asyncio.Task[Any] | None = None
        """A call that outlived `timeout_s` and has not finished: until it does (or for
        PROBE_EVERY_S), the registry counts as unavailable without asking it again."""
        self._probe_started = 0.0

    async def _call(self, what: str, call: Coroutine[Any, Any, T]) -> T:
        # While the registry is down, one call at a time finds out whether it is back (the
        # probe); the others fail at once, so a connect storm during an outage costs nothing.
        probing = self._probe is not None and not self._probe.done()
        if probing and time.monotonic() - self._probe_started < PROBE_EVERY_S:
            call.close()
            raise RegistryUnavailable(f"registry {what}: still unavailable")
        task: asyncio.Task[T] = asyncio.ensure_future(call)
        # Not asyncio.timeout: a driver may take long to give a cancelled call back (asyncpg
        # cancelling on a frozen server); the caller is answered on time all the same.
        done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        if not done:
            task.add_done_callback(_ignore_outcome)
            self._probe, self._probe_started = task, time.monotonic()
            self.health.failed(what, TimeoutError(f"no answer within {self.timeout_s:g} s"))
            raise RegistryUnavailable(f"registry {what}: no answer within {self.timeout_s:g} s")
        try:
            result = task.result()
        except HubError as answer:
            if isinstance(answer, RegistryUnavailable):
                self.health.failed(what, answer)
                raise
            self.health.succeeded()  # it answered, with a refusal
            raise
        except Exception as exc:
            self.health.failed(what, exc)
            raise RegistryUnavailable(f"registry {what} failed: {error_line(exc)}") from exc
        self.health.succeeded()
        return result

    async def credential(self, token_hash: str) -> Credential | None:
        """See `CredentialStore.credential`."""
        return await self._call("token lookup", self._registry.credential(token_hash))

    async def device(self, device_id: str) -> Device | None:
        """See `CredentialStore.device`."""
        return await self._call("device lookup", self._registry.device(device_id))

    async def config_state(self, device_id: str) -> ConfigState:
        """See `ConfigStore.config_state`."""
        return await self._call("config lookup", self._registry.config_state(device_id))

    async def config_states(self, device_ids: Sequence[str]) -> list[ConfigState]:
        """See `ConfigStore.config_states`."""
        return await self._call("config lookup", self._registry.config_states(device_ids))

    async def record_config_ack(
        self, device_id: str, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `ConfigStore.record_config_ack`."""
        return await self._call(
            "config answer", self._registry.record_config_ack(device_id, version, ok, error)
        )

    async def record_presence(self, states: Sequence[Presence]) -> None:
        """See `PresenceStore.record_presence`."""
        await self._call("presence flush", self._registry.record_presence(states))

    async def mark_all_offline(self) -> None:
        """See `PresenceStore.mark_all_offline`."""
        await self._call("presence reset", self._registry.mark_all_offline())

    async def presence(self) -> dict[str, Presence]:
        """See `PresenceStore.presence`."""
        return await self._call("presence read", self._registry.presence())

    async def change_seq(self) -> int:
        """See `ChangeFeed.change_seq`."""
        return await self._call("change read", self._registry.change_seq())

    async def changes_since(self, seq: int) -> tuple[int, list[DeviceChange]]:
        """See `ChangeFeed.changes_since`."""
        return await self._call("change read", self._registry.changes_since(seq))

    async def wait_for_change(self, timeout_s: float) -> bool:
        """See `ChangeFeed.wait_for_change`: it waits by design, so no timeout of ours."""
        try:
            return await self._registry.wait_for_change(timeout_s)
        except Exception as exc:
            self.health.failed("change watch", exc)
            raise RegistryUnavailable(f"registry change watch failed: {error_line(exc)}") from exc

    async def claim(self, device_id: str, remote_address: str) -> Claim | None:
        """See `OwnershipStore.claim`."""
        return await self._call("claim", self._registry.claim(device_id, remote_address))

    async def record_claimed_config_ack(
        self, device_id: str, epoch: int, version: int, ok: bool, error: str | None
    ) -> bool:
        """See `OwnershipStore.record_claimed_config_ack`."""
        return await self._call(
            "config answer",
            self._registry.record_claimed_config_ack(device_id, epoch, version, ok, error),
        )

    async def release(self, device_id: str, epoch: int) -> None:
        """See `OwnershipStore.release`."""
        await self._call("release", self._registry.release(device_id, epoch))

    def watch_takeovers(
        self, listener: Callable[[str, int], None], missed: Callable[[], None]
    ) -> None:
        """See `OwnershipStore.watch_takeovers` (no call to the registry: a registration)."""
        self._registry.watch_takeovers(listener, missed)

    async def stale_sessions(self, sessions: Sequence[HeldSession]) -> list[StaleSession]:
        """See `OwnershipStore.stale_sessions`."""
        return await self._call("safety net", self._registry.stale_sessions(sessions))

    async def close(self) -> None:
        """See `HubRegistry.close`."""
        await self._registry.close()


def _ignore_outcome(task: asyncio.Task[Any]) -> None:
    """A late call's result or error, fetched so that asyncio does not log it: the caller
    was told "unavailable" already."""
    if not task.cancelled():
        task.exception()
