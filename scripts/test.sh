#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, then the test pyramid. The unit layer
# (`-m unit`: no server, no process, no network) runs first inside a fresh network namespace
# where not even loopback is up, which proves it needs none; then the integration and e2e
# layers, which start their own InfluxDB and VictoriaMetrics (tests/packages.py installs
# Debian's influxdb and victoria-metrics when missing: needs root or sudo-less apt).
# Extra arguments go to both pytest runs (`scripts/test.sh -k handshake`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict"
.venv/bin/mypy hub schemas device_sim tests benchmarks

# pytest exits 5 when a selection (with -k, say) holds no test of a layer: not a failure.
run_pytest() {
    local status=0
    "$@" || status=$?
    if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
        exit "$status"
    fi
}

echo "== pytest: unit layer, without a network"
if unshare -n true 2>/dev/null; then
    run_pytest unshare -n .venv/bin/python -m pytest -m unit "$@"
elif unshare -r -n true 2>/dev/null; then
    # Not root: a user namespace grants the right to make the network namespace.
    run_pytest unshare -r -n .venv/bin/python -m pytest -m unit "$@"
else
    echo "note: \`unshare -n\` is not permitted here (it needs root or unprivileged user" \
         "namespaces), so the unit layer runs with the network; tests/layers.py still" \
         "refuses inet sockets and processes in unit tests" >&2
    run_pytest .venv/bin/python -m pytest -m unit "$@"
fi
# The integration and e2e layers in parallel runners (pytest-xdist; a file's tests stay in
# one runner, `--dist loadfile`): most of their time goes to waiting on servers, devices and
# timeouts, not to the cores. Each runner has its own servers and its own port range
# (tests/ports.py). HUB_TEST_RUNNERS=1 runs them in this one process.
runners=${HUB_TEST_RUNNERS:-2}
echo "== pytest: integration and e2e layers, $runners runners"
if [ "$runners" -gt 1 ]; then
    run_pytest .venv/bin/python -m pytest -m "not unit" -n "$runners" --dist loadfile "$@"
else
    run_pytest .venv/bin/python -m pytest -m "not unit" "$@"
fi
