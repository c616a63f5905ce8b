#!/usr/bin/env bash
# Create .venv with the project and its test tools installed, and install the database
# servers the demo, the benchmarks and the tests start (Debian's influxdb and
# victoria-metrics) when they are missing. Idempotent. The hub's own code installs nothing:
# its launchers (device_sim/local_servers.py) only start what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed (found: $("$python" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    "$python" -m venv .venv
fi
echo "installing the hub and its test tools into .venv"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# binary:package pairs; only what is missing is installed.
missing=()
for pair in /usr/bin/influxd:influxdb /usr/bin/victoria-metrics:victoria-metrics; do
    [ -x "${pair%%:*}" ] || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=(sudo -n -E); fi
    install=("${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}")
    echo "installing the Debian packages ${missing[*]}: ${install[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # `apt-get update` is slow and networked: only when the install fails without it.
    if ! command -v apt-get >/dev/null \
        || ! { "${install[@]}" >/dev/null 2>&1 \
               || { "${sudo[@]}" apt-get update >/dev/null 2>&1 && "${install[@]}" >/dev/null; }; }
    then
        # Not fatal: lint, types and the unit tests need no server.
        echo "warning: could not install ${missing[*]}; the demo, the benchmarks and the" \
             "integration tests need them: run \`sudo apt-get install ${missing[*]}\`" >&2
    fi
fi
