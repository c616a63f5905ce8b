#!/usr/bin/env bash
# Set up and run the whole test suite: lint, types, tests. The tests install Debian's
# influxdb and victoria-metrics packages when missing (needs root or sudo-less apt).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict"
.venv/bin/mypy hub schemas device_sim tests benchmarks
echo "== pytest"
.venv/bin/python -m pytest "$@"
