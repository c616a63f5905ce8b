"""The suite-wide token leak watch itself (tests/token_leaks.py, installed by conftest.py)."""

from __future__ import annotations

import logging

import pytest

from hub.registry.sqlite import new_token
from tests.token_leaks import LeakWatch, holds_token, masked

pytestmark = pytest.mark.unit


def test_a_token_with_its_prefix_is_found() -> None:
    """Text holding a token-shaped string holds a token."""
    assert holds_token(f"GET /v1/ws?token={new_token()} HTTP/1.1", set())


def test_an_issued_token_without_its_prefix_is_found() -> None:
    """The random part of an issued token, alone inside other text, is found too."""
    token = new_token()
    issued = {token.removeprefix("hubt_")}
    assert holds_token(f"key=x{token.removeprefix('hubt_')}y", issued)


def test_ordinary_log_lines_hold_no_token() -> None:
    """Device ids, hashes and messages of the hub are not mistaken for tokens."""
    issued = {new_token().removeprefix("hubt_")}
    line = "device sensor-042 connected from 127.0.0.1:5000; sha256 " + "ab12" * 16
    assert not holds_token(line, issued)


def test_the_report_masks_what_it_found() -> None:
    """A leak is reported with the token masked."""
    token = new_token()
    assert token not in masked(f"leaked {token}")


def test_the_watch_sees_hub_records_at_debug() -> None:
    """The session's watch is installed on the root logger and sees DEBUG records."""
    watch = next(h for h in logging.getLogger().handlers if isinstance(h, LeakWatch))
    before = watch.records
    logging.getLogger("hub.test_token_leaks").debug("a record at DEBUG")
    assert watch.records == before + 1


def test_tokens_issued_by_the_registry_are_remembered() -> None:
    """Tokens made by hub.registry.new_token are known to the watch."""
    watch = next(h for h in logging.getLogger().handlers if isinstance(h, LeakWatch))
    from hub.registry import sqlite as registry

    token = registry.new_token()
    assert token.removeprefix("hubt_") in watch.issued
