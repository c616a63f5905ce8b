"""A test that leaks a device token into a hub log record, on purpose: collected only when
`SENSOR_HUB_LEAK_PROBE` is set (tests/conftest.py), by tests/test_leak_watch_run.py, which
checks that the suite's token leak watch fails such a run, in one process and in parallel
runners."""

from __future__ import annotations

import logging

import pytest

pytestmark = pytest.mark.unit


def test_a_hub_logger_writes_a_token() -> None:
    logging.getLogger("hub.server").warning("device d1: token hubt_%s", "A" * 43)
