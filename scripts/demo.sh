#!/usr/bin/env bash
# Set up, start a local InfluxDB and the hub, stream from a few simulated devices and show
# the readings arriving in InfluxDB. scripts/setup.sh installs what is missing (Debian's
# influxdb package); the demo itself only starts what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ ! -x /usr/bin/influxd ]; then
    echo "error: /usr/bin/influxd is missing: install the Debian package influxdb" \
         "(\`sudo apt-get install influxdb\`)" >&2
    exit 2
fi
exec .venv/bin/device-sim demo "$@"
