#!/usr/bin/env bash
# The fuzzing suite (tests/test_fuzz.py), long: run it before a release. Each fuzz test draws
# HUB_FUZZ_EXAMPLES frames (20000 unless set; the normal test run draws 1500 and 250).
# Extra arguments go to pytest (scripts/fuzz.sh -k real_hub).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HUB_FUZZ_EXAMPLES="${HUB_FUZZ_EXAMPLES:-20000}"
echo "== fuzzing with $HUB_FUZZ_EXAMPLES examples per test"
.venv/bin/python -m pytest tests/test_fuzz.py --timeout 0 "$@"
