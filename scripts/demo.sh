#!/usr/bin/env bash
# Set up, start a local InfluxDB and the hub, stream from a few simulated devices and show
# the readings arriving in InfluxDB. Installs what is missing (Debian's influxdb package).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/device-sim demo "$@"
