"""Does InfluxDB 1.6.7 keep every point it answered 204 for when it is SIGKILLed?

    python benchmarks/check_influxdb_kill.py [--kills 15] [--writers 4]

The hub acks a reading once InfluxDB answered 204 for it, so the chaos run's "nothing acked
lost" holds only if InfluxDB keeps what it acknowledged across a kill. `--writers` threads
POST batches of 10 points to a throwaway InfluxDB while it is SIGKILLed and restarted
`--kills` times at random moments; then every acknowledged point is looked for. Exits 1 if
any is missing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from device_sim.local_servers import (
    LocalServer,
    create_database,
    http_request,
    influxql,
    start_influxdb,
)

DB = "kills"
BATCH = 10
BASE_NS = 1_700_000_000_000_000_000


class Writers:
    """Threads writing batches of distinct points; the timestamps InfluxDB answered 204 for."""

    def __init__(self, server: LocalServer, count: int) -> None:
        self.server = server
        self.acked: list[int] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _times(self) -> list[int]:
        with self._lock:
            first, self._next = self._next, self._next + BATCH
        return [BASE_NS + (first + i) * 1000 for i in range(BATCH)]

    def _run(self, writer: int) -> None:
        url = f"{self.server.url}/write?db={DB}&precision=ns"
        while not self._stop.is_set():
            times = self._times()
            body = "\n".join(f"m,writer={writer} v={t}i {t}" for t in times).encode()
            try:
                status, _ = http_request(url, body, timeout=2)
            except OSError:  # down or restarting: try again shortly
                time.sleep(0.01)
                continue
            if status == 204:
                with self._lock:
                    self.acked.extend(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--writers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        server = start_influxdb(Path(directory))
        try:
            create_database(server.url, DB)
            writers = Writers(server, args.writers)
            writers.start()
            try:
                for kill in range(1, args.kills + 1):
                    time.sleep(random.uniform(0.3, 1.5))  # noqa: S311
                    server.kill()
                    time.sleep(0.2)
                    server.restart()
                    print(f"kill {kill}/{args.kills}: {len(writers.acked)} points acked so far")
            finally:
                writers.stop()
            stored = {int(row["time"]) for row in influxql(server.url, DB, "SELECT v FROM m")}
        finally:
            server.stop()
    missing = [t for t in writers.acked if t not in stored]
    print(
        f"{args.kills} SIGKILLs, {len(writers.acked)} points acknowledged (204), "
        f"{len(stored)} stored, {len(missing)} acknowledged but missing"
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
