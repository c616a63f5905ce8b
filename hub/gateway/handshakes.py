"""Answering a device's upgrade request: whose token, and whether it may come in now.

The checks in order: the request's credentials (`hub.core.handshake`), room (draining or at
`max_connections`: 503), a block on the source for failed handshakes (429), the token's
owner from the registry (401 if nobody's), room again. While the registry is unavailable
the answer is 503 with Retry-After, or, with `registry_outage_admit_s`, a token verified
lately is let in from memory (hub.gateway.registryhealth). An admitted connection holds a
slot (hub.gateway.admission) until its TCP connection is lost.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from hub.core.handshake import Handshake, HandshakeRefused, read_credentials
from hub.core.ratelimit import FailedHandshakeLimiter
from hub.errors import RegistryUnavailable
from hub.gateway.admission import (
    ConnectionSlots,
    StrangerCounts,
    StrangerLog,
    address_of,
    source_of,
)
from hub.gateway.registryhealth import VerifiedTokens
from hub.ops.metrics import HubMetrics, refusal_reason
from hub.options import AdmissionOptions
from hub.registry.ports import CredentialStore
from hub.registry.records import Claim, Credential, hash_token

RETRY_AFTER_S = 5
"""What a 503 asks a device to wait before trying again."""
REGISTRY_TURNS = 16
"""Handshakes asking the registry (token lookup, claim) at once; the rest of a connect storm
waits for a turn. Without it, 1000 handshakes at once all queue inside the registry calls
(PostgreSQL: 8 pooled connections per hub; a hub short of CPU: behind its own loop), whose
`registry_timeout_s` then runs out although the registry is idle, and the hub takes that for
an outage: 503s to everyone (`device-sim bench --only postgres`, docs/benchmarks.md). A
turn's wait is not the registry's; it is bounded by the handshake's own timeout."""


def worker_share(burst: int, per_min: float, workers: int) -> tuple[int, float]:
    """One worker's part of the host's failed-handshake limit (burst, per minute), when
    `workers` processes share the port: SO_REUSEPORT spreads one source's connections over
    them by port, so each taking 1/N keeps the host's total at the setting instead of N
    times it, with no state shared. A burst below N leaves each worker one (burst 0 stays
    off); see docs/security.md."""
    if workers <= 1 or burst <= 0:
        return burst, per_min
    return max(1, burst // workers), per_min / workers


class HandshakeGate:
    """Decides each handshake; see the module docstring."""

    def __init__(
        self,
        options: AdmissionOptions,
        credentials: CredentialStore,
        claim: Callable[[ServerConnection, str, str], Awaitable[Claim]],
        slots: ConnectionSlots,
        full: Callable[[int], bool],
        metrics: HubMetrics,
        stranger_log: StrangerLog,
        stranger_counts: StrangerCounts,
        workers: int = 1,
    ) -> None:
        """`claim`: take the device's one live connection for this handshake (across hubs:
        hub.gateway.ownership); `full`: whether the hub takes nobody now (draining, or at
        max_connections) with that many more slots taken; `workers`: processes sharing
        the port, which share the failed-handshake limit (`worker_share`)."""
        self.options = options
        """Replaced on a reload (`Hub.apply`)."""
        self.registry = credentials
        self._claim = claim
        self.slots = slots
        self._full = full
        self._admitting = 0
        """Handshakes past their last room check, awaiting their claim: slots taken."""
        self.metrics = metrics
        self.stranger_log = stranger_log
        self.stranger_counts = stranger_counts
        burst, per_min = worker_share(
            options.auth_failures_burst, options.auth_failures_per_min, workers
        )
        self.failed_handshakes = FailedHandshakeLimiter(burst, per_min / 60, options.auth_block_s)
        self.verified_tokens = VerifiedTokens(
            options.registry_outage_admit_s, 2 * options.max_connections
        )
        self.registry_turns = asyncio.Semaphore(REGISTRY_TURNS)

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """websockets' `process_request`: None lets the upgrade go on, a response refuses it.
        Never logs request.path: its query string may hold the token."""
        try:
            return await self._admit(connection, request)
        except Exception as exc:  # e.g. the client reset the connection: one line, no traceback
            self.stranger_counts.handshake_errors += 1
            self.stranger_log.line(
                logging.WARNING,
                "handshake from %s failed: %s",
                source_of(connection),
                type(exc).__name__,
            )
            return connection.respond(
                HTTPStatus.INTERNAL_SERVER_ERROR, "the hub could not answer this handshake\n"
            )

    async def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        source = source_of(connection)
        limiter = self.failed_handshakes
        now = time.monotonic()
        blocked_s = limiter.blocked_for(source, now)
        try:
            token, ns_per_unit = read_credentials(
                request.path, request.headers, self.options.allowed_origins
            )
            self._check_room()
            if blocked_s and not limiter.may_check(source, now):
                raise _blocked(blocked_s)
            async with self.registry_turns:
                credential = await self._look_up(hash_token(token))
                if credential is None:
                    raise HandshakeRefused(HTTPStatus.UNAUTHORIZED, "invalid or missing token")
                self._check_room()  # again: others may have come in, or a drain begun, meanwhile
                # Last: a claim rings the hub holding the device, which closes it. Its slot is
                # reserved across the await, so two handshakes cannot both take the last one.
                self._admitting += 1
                try:
                    claim = await self._claim_now(connection, credential.device_id)
                finally:
                    self._admitting -= 1
        except HandshakeRefused as refused:
            refusal = refused
            if refusal.status == HTTPStatus.UNAUTHORIZED and blocked_s:
                refusal = _blocked(blocked_s)  # a wrong guess looks like any other while blocked
            elif refusal.status == HTTPStatus.UNAUTHORIZED:
                self._handshake_failed(source, now)
            if refusal.status == HTTPStatus.TOO_MANY_REQUESTS:
                limiter.refused_while_blocked()
            self.metrics.handshakes_refused.labels(refusal_reason(refusal.status)).inc()
            response = connection.respond(refusal.status, refusal.message + "\n")
            if refusal.retry_after is not None:
                response.headers["Retry-After"] = str(math.ceil(refusal.retry_after))
            return response
        if claim.previous_owner is not None:  # taken from another node (or worker)
            self.metrics.takeovers.labels("won").inc()
        self.slots.admit(
            connection,
            Handshake(
                credential.device_id,
                ns_per_unit,
                credential.token_hash,
                credential.expires_at,
                claim.epoch,
            ),
        )
        return None

    async def _look_up(self, token_hash: str) -> Credential | None:
        """Whose token this is, from the registry; while it is unavailable, from the memory
        of tokens verified lately (`registry_outage_admit_s`), else 503 with Retry-After."""
        try:
            credential = await self.registry.credential(token_hash)
        except RegistryUnavailable:
            remembered = self.verified_tokens.recall(token_hash)
            if remembered is None:
                raise HandshakeRefused(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "the device registry is unavailable; try again later",
                    retry_after=RETRY_AFTER_S,
                ) from None
            self.metrics.admitted_from_memory.inc()
            return remembered
        if credential is None:
            self.verified_tokens.forget(token_hash)
        else:
            self.verified_tokens.remember(credential)
        return credential

    async def _claim_now(self, connection: ServerConnection, device_id: str) -> Claim:
        """The device's claim; 503 with Retry-After while the registry cannot give it (a
        device admitted from memory during an outage holds epoch 0: no claim until it
        reconnects)."""
        try:
            return await self._claim(connection, device_id, address_of(connection))
        except RegistryUnavailable:
            if self.verified_tokens.max_age_s > 0:
                return Claim(0, None)
            raise HandshakeRefused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the device registry is unavailable; try again later",
                retry_after=RETRY_AFTER_S,
            ) from None

    def _check_room(self) -> None:
        if self._full(self._admitting):
            raise HandshakeRefused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the hub is not accepting connections now",
                retry_after=RETRY_AFTER_S,
            )

    def _handshake_failed(self, source: str, now: float) -> None:
        limiter = self.failed_handshakes
        if limiter.failed(source, now):
            self.stranger_log.line(
                logging.WARNING,
                "handshakes from %s refused for %g s: more failed handshakes (bad or missing "
                "token) than %d at once or %g a minute",
                source,
                limiter.block_s,
                limiter.burst,
                limiter.per_s * 60,
            )
        else:
            self.stranger_log.line(
                logging.INFO, "handshake from %s refused: invalid or missing token", source
            )


def _blocked(blocked_s: float) -> HandshakeRefused:
    return HandshakeRefused(
        HTTPStatus.TOO_MANY_REQUESTS,
        "too many failed handshakes from this address; retry later",
        retry_after=blocked_s,
    )
