"""The one place where MicroPython and CPython differ; every other module imports this.

On a board: `time.ticks_ms`, `os.urandom` (or `random.getrandbits`), `binascii.b2a_base64`,
`ntptime`. On CPython: the standard library equivalents. Nothing here allocates per call
beyond what the platform call itself does.
"""

import binascii
import os
import time

# Ports without os.urandom (the WebAssembly one) fall back to `random` below.
urandom = getattr(os, "urandom", None)

MICROPYTHON = hasattr(time, "ticks_ms")

if MICROPYTHON:
    ticks_ms = time.ticks_ms  # type: ignore[attr-defined]
    ticks_diff = time.ticks_diff  # type: ignore[attr-defined]
    ticks_add = time.ticks_add  # type: ignore[attr-defined]
    sleep_ms = time.sleep_ms  # type: ignore[attr-defined]
else:

    def ticks_ms() -> int:
        """Milliseconds from an arbitrary start, never going back."""
        return time.monotonic_ns() // 1_000_000

    def ticks_diff(later: int, earlier: int) -> int:
        """`later - earlier` in milliseconds (wrap-safe on MicroPython)."""
        return later - earlier

    def ticks_add(ticks: int, delta: int) -> int:
        """`ticks + delta` (wrap-safe on MicroPython)."""
        return ticks + delta

    def sleep_ms(ms: int) -> None:
        """Sleep `ms` milliseconds."""
        time.sleep(ms / 1000)


def random_bytes(count: int) -> bytes:
    """`count` random bytes: os.urandom where the port has it."""
    if urandom is not None:
        return bytes(urandom(count))
    import random  # only on ports without os.urandom

    return bytes(random.getrandbits(8) for _ in range(count))


def random_below(limit: int) -> int:
    """A random integer in [0, limit), limit < 2**32: for backoff jitter."""
    if limit <= 0:
        return 0
    value = int.from_bytes(random_bytes(4), "big")
    return value % limit


def b64encode(data: bytes) -> bytes:
    """Base64 without the newline: MicroPython has no `base64` module, only binascii."""
    return binascii.b2a_base64(data)[:-1]


try:
    import hashlib

    _sha1 = getattr(hashlib, "sha1", None)
except ImportError:
    _sha1 = None


def sha1(data: bytes) -> bytes | None:
    """SHA-1 digest, or None on a port built without it (the accept check is then skipped)."""
    if _sha1 is None:
        return None
    return bytes(_sha1(data).digest())


# Seconds between 1970-01-01 and the port's epoch: 946684800 where time starts in 2000
# (older ESP32 and RP2040 builds), 0 on CPython and on ports using the Unix epoch.
EPOCH_OFFSET_S = 946684800 if time.gmtime(0)[0] == 2000 else 0


def unix_time_ms() -> int:
    """The wall clock in milliseconds since 1970 (whatever it is: check `clock_is_set`)."""
    if hasattr(time, "time_ns"):
        return int(time.time_ns() // 1_000_000) + EPOCH_OFFSET_S * 1000
    return int(time.time() * 1000) + EPOCH_OFFSET_S * 1000


def ntp_sync(host: str | None = None) -> bool:
    """Set the board's clock from NTP (MicroPython's `ntptime`); True when it worked.

    On CPython the operating system keeps the clock, so this only reports success.
    """
    if not MICROPYTHON:
        return True
    try:
        import ntptime  # a MicroPython module, absent elsewhere
    except ImportError:
        return False
    if host:
        ntptime.host = host
    try:
        ntptime.settime()
    except (OSError, OverflowError, IndexError):
        return False
    return True


def wrap_tls(sock: object, host: str, cadata: bytes | None = None) -> object:
    """The socket wrapped in TLS, the hub's certificate checked against `cadata` (DER) or,
    on CPython without it, the system's CAs. A board needs `cadata`: it has no CA store."""
    import ssl  # not every board has it; only wss:// needs it

    if hasattr(ssl, "create_default_context"):  # CPython
        context = ssl.create_default_context(cadata=cadata)
        return context.wrap_socket(sock, server_hostname=host)  # type: ignore[arg-type]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # MicroPython 1.23 and later
    if cadata is not None:
        context.load_verify_locations(cadata=cadata)
    return context.wrap_socket(sock, server_hostname=host)  # type: ignore[arg-type]


_WOULD_BLOCK = (11, 115, 119)  # EAGAIN, EINPROGRESS, MicroPython's lwIP EINPROGRESS


def _would_block(error: OSError) -> bool:
    if isinstance(error, BlockingIOError):
        return True
    code = error.args[0] if error.args else None
    name = type(error).__name__
    return code in _WOULD_BLOCK or name in ("SSLWantReadError", "SSLWantWriteError")


def sock_read_into(sock: object, buffer: memoryview) -> int | None:
    """Read what is there into `buffer`: the count, 0 at end of stream, None if nothing yet."""
    try:
        if MICROPYTHON:
            return sock.readinto(buffer)  # type: ignore[attr-defined, no-any-return]
        return sock.recv_into(buffer)  # type: ignore[attr-defined, no-any-return]
    except OSError as error:
        if _would_block(error):
            return None
        raise


def sock_write(sock: object, data: memoryview) -> int:
    """Write what the socket takes now of `data`: the count, 0 if it takes nothing yet."""
    try:
        # MicroPython's TLS sockets have only write(); CPython's plain ones only send().
        written = sock.write(data) if MICROPYTHON else sock.send(data)  # type: ignore[attr-defined]
    except OSError as error:
        if _would_block(error):
            return 0
        raise
    return written or 0
