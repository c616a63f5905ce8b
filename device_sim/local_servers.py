"""Throwaway InfluxDB 1.6.7 and VictoriaMetrics servers for tests, the demo and benchmarks.

Stdlib only, so tests and scripts can import it without the hub's dependencies.

Each server runs on free loopback ports with all its files (config, data, log) in one temp
dir, and is stopped by process id, never by name, so parallel runs do not touch each other.

VictoriaMetrics (1.79) notes, checked against the real server:

* Freshness: a sample written to `/write` or `/api/v2/write` is buffered in memory; reads
  see it after about 1 s, or up to ~10 s for a new series. `vm_force_flush()` (GET
  `/internal/force_flush`) makes everything written so far readable at once, and
  `vm_export()` calls it first. `/api/v1/export` without `start` can miss series created
  in the last seconds, so `vm_export()` always passes a `start`/`end` window.
  `-search.disableCache` keeps the response cache from hiding later writes and
  `-search.latencyOffset=0s` keeps `/api/v1/query*` from ignoring the newest 30 s.
* Mapping: each field of a line becomes its own series named `{measurement}_{field}`
  (`-influxMeasurementFieldSeparator`), with the tags as labels. `db=X` in the query
  string of `/write` or `/api/v2/write` adds the label `db="X"`; `bucket`/`org` of
  `/api/v2/write` are ignored, so use `db` to tell test runs apart. Values are float64:
  `true`/`false` become 1/0, integers above 2**53 are rounded, strings become 0.
  Timestamps are trimmed to milliseconds (`-influxTrimTimestamp`, default 1ms).
  Samples older than the retention (1 month by default) are dropped silently.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

INFLUXD = Path("/usr/bin/influxd")
VICTORIA_METRICS = Path("/usr/bin/victoria-metrics")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HAPROXY = Path("/usr/sbin/haproxy")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 30
# The servers are on loopback: an http_proxy in the environment must not get these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A local server is not installed, or could not be started or queried."""


PACKAGES = {
    INFLUXD: "influxdb",
    VICTORIA_METRICS: "victoria-metrics",
    **{PG_BIN / tool: "postgresql" for tool in ("initdb", "postgres", "psql", "pg_isready")},
    HAPROXY: "haproxy",
}
"""The Debian package each server binary comes from."""


def missing_packages(*binaries: Path) -> list[str]:
    """The Debian packages whose binary (of `binaries`, default all) is not installed."""
    return [PACKAGES[b] for b in (binaries or tuple(PACKAGES)) if not b.exists()]


def require_installed(binary: Path) -> None:
    """Raise a `ServerError` naming the package and the command if `binary` is missing.

    This module only starts what is installed; scripts/setup.sh (and the test suite's
    fixtures, tests/packages.py) install what is missing.
    """
    if binary.exists():
        return
    package = PACKAGES[binary]
    raise ServerError(
        f"{binary} is missing: install the Debian package {package} "
        f"(`sudo apt-get install {package}`, or run scripts/setup.sh, which installs it)"
    )


PORTS_ENV = "DEVICE_SIM_PORTS"
"""`LOW-HIGH`: `free_port` takes ports from that range only, else any the kernel offers.

The test suite gives each of its parallel runners a range of its own below Linux's
ephemeral range (tests/ports.py): then no two runners pick one port between choosing it and
their server binding it, and no outgoing connection (whose local port comes from the
ephemeral range) can hold it. Processes the suite starts inherit the range."""

_next_port: dict[tuple[int, int], int] = {}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (from `DEVICE_SIM_PORTS`
    when set: each call the next free one after the last, starting at a random one)."""
    span = _port_range()
    if span is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
            return port
    low, high = span
    size = high - low + 1
    start = _next_port.get(span)
    if start is None:
        start = low + random.randrange(size)
    for step in range(size):
        port = low + (start - low + step) % size
        if _bindable(port):
            _next_port[span] = low + (port - low + 1) % size
            return port
    raise ServerError(f"no free port in {PORTS_ENV}={low}-{high}")


def _port_range() -> tuple[int, int] | None:
    text = os.environ.get(PORTS_ENV, "")
    if not text:
        return None
    low, sep, high = text.partition("-")
    if not (sep and low.isdigit() and high.isdigit() and 0 < int(low) <= int(high) < 65536):
        raise ServerError(f"{PORTS_ENV} must be LOW-HIGH (ports), not {text!r}")
    return int(low), int(high)


def _bindable(port: int) -> bool:
    # Without SO_REUSEADDR: a port still in TIME_WAIT is passed over, as a server that does
    # not set it would have to.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class LocalServer:
    """A server process that this module started, stopped and signalled by its pid."""

    name: str
    url: str
    pid: int
    data_dir: Path
    log_path: Path
    argv: list[str]
    ready_path: str
    ready_status: int
    owns_dir: bool = True
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The HTTP port the server listens on (127.0.0.1)."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def running(self) -> bool:
        """Whether the process is alive (a paused one counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the process: SIGTERM, wait up to `timeout` s, then SIGKILL."""
        if not self.running:
            return
        self._signal(signal.SIGTERM)
        # A paused process would hold the SIGTERM until it is continued.
        self._signal(signal.SIGCONT)
        if not self._wait(timeout):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process, as a crash would end it, and reap it."""
        if self.running:
            self._signal(signal.SIGKILL)
            self._wait(STOP_TIMEOUT_S)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused process (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Stop the process if it runs, then start it again on the same port and data dir."""
        self.stop()
        self._launch(timeout)

    def close(self) -> None:
        """Stop the process and delete the temp dir this module created for it."""
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of the server's log."""
        try:
            return _tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def _wait(self, timeout: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _launch(self, timeout: float) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_clean_env(),
                cwd=self.data_dir,
                # Its own process group: a Ctrl-C meant for pytest must not reach it first.
                start_new_session=True,
            )
        self.pid = self._proc.pid
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = self.url + self.ready_path
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerError(
                    f"{self.name} (pid {self.pid}) exited with {self._proc.returncode} "
                    f"while starting; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with _OPENER.open(url, timeout=1.0) as resp:
                    if resp.status == self.ready_status:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name} (pid {self.pid}) not ready at {url} after {timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)


def start_influxdb(base_dir: Path | None = None, timeout: float = START_TIMEOUT_S) -> LocalServer:
    """Start InfluxDB 1.6.7 on free loopback ports, its files in a new dir under `base_dir`."""

    def argv(data_dir: Path, port: int) -> list[str]:
        config = data_dir / "influxdb.conf"
        config.write_text(_influxdb_config(data_dir, port, free_port()))
        return [str(INFLUXD), "run", "-config", str(config)]

    require_installed(INFLUXD)
    return _start("influxdb", argv, "/ping", 204, base_dir, timeout)


def start_victoria_metrics(
    base_dir: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    extra_args: Sequence[str] = (),
) -> LocalServer:
    """Start VictoriaMetrics on a free loopback port, set up so writes are readable at once."""

    def argv(data_dir: Path, port: int) -> list[str]:
        return [
            str(VICTORIA_METRICS),
            f"-httpListenAddr=127.0.0.1:{port}",
            f"-storageDataPath={data_dir / 'storage'}",
            "-search.latencyOffset=0s",
            "-search.disableCache",
            "-loggerLevel=WARN",
            *extra_args,
        ]

    require_installed(VICTORIA_METRICS)
    return _start("victoria-metrics", argv, "/health", 200, base_dir, timeout)


def _start(
    name: str,
    make_argv: Callable[[Path, int], list[str]],
    ready_path: str,
    ready_status: int,
    base_dir: Path | None,
    timeout: float,
) -> LocalServer:
    if base_dir is not None:
        base_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base_dir))
    last_error: ServerError | None = None
    # A free port can be taken by someone else before the server binds it: try a few.
    for _attempt in range(3):
        port = free_port()
        server = LocalServer(
            name=name,
            url=f"http://127.0.0.1:{port}",
            pid=0,
            data_dir=data_dir,
            log_path=data_dir / "server.log",
            argv=make_argv(data_dir, port),
            ready_path=ready_path,
            ready_status=ready_status,
        )
        try:
            server._launch(timeout)
        except ServerError as exc:
            last_error = exc
            if "address already in use" in server.log_tail().lower():
                continue
            break
        return server
    assert last_error is not None
    raise last_error


def _influxdb_config(data_dir: Path, http_port: int, rpc_port: int) -> str:
    # Only what differs from the defaults; anything writing outside data_dir is moved or
    # switched off so that several servers can run side by side.
    return f"""\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{data_dir / "meta"}"
  logging-enabled = false

[data]
  dir = "{data_dir / "data"}"
  wal-dir = "{data_dir / "wal"}"
  query-log-enabled = false

[monitor]
  store-enabled = false

[http]
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  pprof-enabled = false
  unix-socket-enabled = false

[logging]
  level = "warn"
  suppress-logo = true

[continuous_queries]
  enabled = false
  log-enabled = false

[subscriber]
  enabled = false
"""


def _clean_env() -> dict[str, str]:
    # influxd reads INFLUXDB_* variables as config overrides; a stray one could move ports.
    return {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- HTTP helpers for tests ----------------------------------------------------------------


def http_request(url: str, data: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send a GET (or a POST when `data` is given) and return status and body, even on 4xx/5xx."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    method = "POST" if data is not None else "GET"
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def _checked(url: str, data: bytes | None = None) -> bytes:
    status, body = http_request(url, data)
    if not 200 <= status < 300:
        raise ServerError(f"{url} answered {status}: {body.decode(errors='replace')[:500]}")
    return body


def _qs(**params: str) -> str:
    return urllib.parse.urlencode(params)


def write_lines(url: str, path_and_query: str, lines: str | bytes) -> None:
    """POST line protocol to `url + path_and_query`; raise ServerError unless it answers 2xx."""
    body = lines.encode() if isinstance(lines, str) else lines
    _checked(url + path_and_query, body)


def influx_write(url: str, db: str, lines: str | bytes) -> None:
    """Write line protocol with ns timestamps to an InfluxDB 1.x database."""
    write_lines(url, "/write?" + _qs(db=db, precision="ns"), lines)


def influxql_series(url: str, db: str, query: str) -> list[dict[str, Any]]:
    """Run one InfluxQL statement; return its raw series (name, tags, columns, values)."""
    body = _checked(url + "/query?" + _qs(db=db, epoch="ns"), _qs(q=query).encode())
    results = json.loads(body).get("results", [])
    series: list[dict[str, Any]] = []
    for result in results:
        if "error" in result:
            raise ServerError(f"InfluxQL {query!r} failed: {result['error']}")
        series.extend(result.get("series", []))
    return series


def influxql(url: str, db: str, query: str) -> list[dict[str, Any]]:
    """Run one InfluxQL statement; return its rows as {column: value} dicts (time in ns)."""
    rows: list[dict[str, Any]] = []
    for s in influxql_series(url, db, query):
        # With GROUP BY the tags sit on the series, not in the columns.
        tags = s.get("tags") or {}
        rows.extend({**tags, **dict(zip(s["columns"], v, strict=True))} for v in s["values"])
    return rows


def create_database(url: str, db: str) -> None:
    """Create an InfluxDB 1.x database (no error if it exists)."""
    influxql_series(url, "", f"CREATE DATABASE {quote_ident(db)}")


def drop_database(url: str, db: str) -> None:
    """Drop an InfluxDB 1.x database (no error if it does not exist)."""
    influxql_series(url, "", f"DROP DATABASE {quote_ident(db)}")


def quote_ident(name: str) -> str:
    """Quote an InfluxQL identifier: `"..."` with backslash, quote and LF escaped.

    InfluxQL has no escape for CR or NUL: names containing them cannot be quoted.
    """
    return '"' + _influxql_escape(name).replace('"', '\\"') + '"'


def quote_string(text: str) -> str:
    """Quote an InfluxQL string literal (tag values in WHERE): `'...'`, escaped like names."""
    return "'" + _influxql_escape(text).replace("'", "\\'") + "'"


def _influxql_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def vm_force_flush(url: str) -> None:
    """Make everything written to VictoriaMetrics so far visible to queries and exports."""
    _checked(url + "/internal/force_flush")


def vm_export(
    url: str,
    match: str = '{__name__=~".+"}',
    start_s: float | None = None,
    end_s: float | None = None,
) -> list[dict[str, Any]]:
    """Flush, then return the series matching `match` as dicts of metric/values/timestamps.

    The window defaults to the last 32 days up to 2 days ahead: all that VictoriaMetrics
    accepts with its default retention.
    """
    vm_force_flush(url)
    now = time.time()
    params = {
        "match[]": match,
        "start": f"{now - 32 * 86400 if start_s is None else start_s:.3f}",
        "end": f"{now + 2 * 86400 if end_s is None else end_s:.3f}",
    }
    body = _checked(url + "/api/v1/export?" + urllib.parse.urlencode(params))
    return [json.loads(line) for line in body.decode().split("\n") if line.strip()]


def vm_delete_all(url: str) -> None:
    """Delete every series from VictoriaMetrics, so a test starts from nothing."""
    _checked(url + "/api/v1/admin/tsdb/delete_series?" + _qs(**{"match[]": '{__name__=~".+"}'}))


def labels_of(series: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Return the label sets (including `__name__`) of exported VictoriaMetrics series."""
    return [dict(s["metric"]) for s in series]
