"""Whether the server takes writes, and where a batch goes next: a pure state machine.

No I/O and no clock: the writers and the replayer report what happened (`failed`,
`succeeded`, `buffered`) and ask whether a batch goes to the server first (`try_sink`).
A writer's round for a batch is: the server (if `try_sink`), then the buffer, then backoff.
The states:

* `NONE`: no server configured; batches go to the buffer, or wait.
* `HEALTHY`: writes go to the server; a failure moves to `FAILING`.
* `FAILING`: new batches go straight to the buffer instead of waiting on the server, which
  the replayer probes; its first success moves back to `HEALTHY`. Without a buffer (or while
  the buffer refuses) the writers keep trying the server themselves, with backoff.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from hub.options import BatchOptions


class SinkState(enum.Enum):
    """The server's state as the last write saw it."""

    NONE = "none"
    HEALTHY = "healthy"
    FAILING = "failing"


@dataclass
class SinkHealth:
    """The server's health, and whether the buffer refused the last batch since it failed."""

    state: SinkState = SinkState.NONE
    buffer_full: bool = False

    @classmethod
    def for_sink(cls, configured: bool) -> SinkHealth:
        """The start state: a configured server is presumed healthy until a write fails."""
        return cls(SinkState.HEALTHY if configured else SinkState.NONE)

    @property
    def healthy(self) -> bool:
        """Whether the last write to the server succeeded (or none failed yet)."""
        return self.state is SinkState.HEALTHY

    def failed(self) -> bool:
        """A write failed and may succeed later; True when this turned a healthy server
        failing (the change worth a warning)."""
        if self.state is SinkState.HEALTHY:
            self.state = SinkState.FAILING
            return True
        return False

    def succeeded(self) -> bool:
        """A write succeeded; True when the server was failing until now."""
        was_failing = self.state is SinkState.FAILING
        self.state = SinkState.HEALTHY
        if was_failing:
            self.buffer_full = False
        return was_failing

    def buffered(self, stored: bool) -> None:
        """The buffer took a batch (`stored`) or refused it."""
        self.buffer_full = not stored

    def try_sink(self, has_buffer: bool, buffer_refused: bool) -> bool:
        """Whether a writer's next round for a batch starts with the server: while it is
        healthy, or when nobody else would try it (no buffer, or the buffer refused this
        batch); while it fails, the replayer probes it instead."""
        if self.state is SinkState.NONE:
            return False
        return self.healthy or not has_buffer or buffer_refused


def backoff_s(
    attempt: int,
    retry_after: float | None,
    options: BatchOptions,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """How long to wait before retry `attempt` (0 first): the server's `Retry-After` if it
    gave one (capped at six times `retry_max_s`), else capped exponential backoff from
    `retry_initial_s`, with jitter."""
    if retry_after is not None:
        return min(retry_after, options.retry_max_s * 6)
    cap = min(options.retry_max_s, options.retry_initial_s * 2**attempt)
    return uniform(options.retry_initial_s / 2, cap)
