"""Wall-clock time for readings, with the board's clock checked before it is trusted.

A board has no real-time clock until NTP set it; before that `time.time()` counts from
2000 or 1970 and the hub refuses such times (by default anything before 2015-01-01). A
reading sampled then remembers `ticks_ms()` and gets its time once the clock is set.
"""

from . import compat

EARLIEST_MS = 1_420_070_400_000  # 2015-01-01T00:00:00Z, the hub's default lower bound


class Clock:
    """The wall clock in Unix milliseconds, or None while it is not set."""

    def __init__(self, wall_ms: object = None, ntp_host: str | None = None) -> None:
        self._wall_ms = wall_ms or compat.unix_time_ms  # a function, replaceable in tests
        self.ntp_host = ntp_host

    def now_ms(self) -> int | None:
        """Unix milliseconds, or None when the clock cannot be right (before 2015)."""
        now: int = self._wall_ms()  # type: ignore[operator]
        return now if now >= EARLIEST_MS else None

    def sample_time(self) -> tuple[int | None, int]:
        """What to remember at sampling: the Unix ms (or None) and `ticks_ms()`."""
        return self.now_ms(), compat.ticks_ms()

    def resolve(self, unix_ms: int | None, ticks: int) -> int | None:
        """The Unix ms of a sample taken at `ticks`, if the clock is set now."""
        if unix_ms is not None:
            return unix_ms
        now = self.now_ms()
        if now is None:
            return None
        elapsed: int = compat.ticks_diff(compat.ticks_ms(), ticks)
        return now - elapsed

    def sync(self) -> bool:
        """Set the clock from NTP if it is not set; True when it is set afterwards."""
        if self.now_ms() is not None:
            return True
        compat.ntp_sync(self.ntp_host)
        return self.now_ms() is not None
