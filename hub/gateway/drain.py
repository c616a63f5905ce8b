"""A draining hub closes its devices with 1001 at a bounded rate, not all in one burst.

Devices closed with 1001 reconnect at once (with the protocol's jitter), through the
balancer to the other hubs, or to this port's next process. Closed all at once, a hub of
20,000 devices would send the other hubs 20,000 handshakes (each a token lookup and a claim
in the registry) within a second; at `drain_rate` closes per second they spread out. The
drain must still end within `shutdown_timeout_s`: when the rate cannot close every session
in the time the drain has (less a margin for the last close handshakes), the closes are
spread evenly over that time instead: faster, never dropped.

Every 1001 of the drain takes its connection's turn (`DrainPace.turn`) just before its
close frame goes out (hub.gateway.admission's connection class): both the session that
found the hub draining on its next frame (its owed acks already sent: hub.gateway.session's
`_close_after_acks`) and websockets closing the quiet ones when the hub stops listening.
Frames a device sends while it waits for its turn are read and dropped, not acked: it sends
them again wherever it reconnects.
"""

from __future__ import annotations

import asyncio

LAST_CLOSES_MARGIN_S = 1.0
"""At most this much of the drain's time is kept after the last turn, for the last close
handshakes (and the presence flush) to finish."""
MARGIN_FRACTION = 0.2
"""...and at most this fraction of it, so a short drain keeps most of its time for turns."""


def close_interval(sessions: int, rate: float, window_s: float) -> float:
    """Seconds between two closes of a drain of `sessions` sessions: `1/rate`, or shorter
    so that the last one's turn comes within `window_s` (rate 0: no pause at all)."""
    if rate <= 0 or sessions <= 1:
        return 0.0
    return min(1.0 / rate, max(0.0, window_s) / (sessions - 1))


def turns_window(drain_s: float) -> float:
    """Of a drain lasting `drain_s`, the time within which every session gets its turn."""
    return max(0.0, drain_s - min(LAST_CLOSES_MARGIN_S, MARGIN_FRACTION * drain_s))


class DrainPace:
    """Turns to close with 1001, `1/rate` apart or closer so that the sessions still to
    close fit in what is left of the window (the quiet sessions only ask when the hub stops
    listening, after the drain's flush); a close asking after the window goes at once."""

    def __init__(self, sessions: int, rate: float, drain_s: float) -> None:
        """`sessions` to close at `rate` per second within a drain lasting `drain_s`,
        starting now (the event loop's clock: `start`)."""
        self.sessions = sessions
        self.rate = rate
        self._loop = asyncio.get_running_loop()
        self.start = self._loop.time()
        self._next = self.start
        self._end = self.start + turns_window(drain_s)
        self._turns: dict[object, float] = {}

    def reserve(self, closing: object, now: float) -> float:
        """The time of `closing`'s turn, asked at `now`: the next free one, or the one it
        was given already (a session closing itself and websockets closing it too are
        one close)."""
        at = self._turns.get(closing)
        if at is None:
            at = self._turns[closing] = min(max(self._next, now), self._end)
            after = max(1, self.sessions - len(self._turns))  # turns still to give, after it
            self._next = at + close_interval(after + 1, self.rate, self._end - at)
        return at

    async def turn(self, closing: object) -> None:
        """Wait for `closing`'s turn (`reserve`)."""
        now = self._loop.time()
        at = self.reserve(closing, now)
        if at > now:
            await asyncio.sleep(at - now)
