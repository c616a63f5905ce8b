"""Secrets never reach a log line: `redact` and the `RedactingFilter`."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from hub.ops.logs import RedactingFilter, redact
from hub.registry.sqlite import new_token

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-Value_42"


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose only handler formats into a buffer through a RedactingFilter."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("tests.test_logs")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, buffer
    finally:
        logger.handlers.clear()
        logger.propagate = True


# --- redact -----------------------------------------------------------------------------------


def test_redact_masks_hub_tokens() -> None:
    """A hubt_ token anywhere in the text is replaced by ***."""
    token = new_token()
    assert redact(f"device token {token} refused") == "device token *** refused"


def test_redact_masks_every_token_in_the_text() -> None:
    """Several tokens in one text are all masked."""
    first, second = new_token(), new_token()
    assert redact(f"{first},{second}") == "***,***"


@pytest.mark.parametrize("name", ["token", "password", "p", "TOKEN"])
def test_redact_masks_secret_query_parameters(name: str) -> None:
    """The value of token=, password= and p= query parameters is masked, the rest kept."""
    line = f"GET /v1/ws?precision=ms&{name}={SECRET}&x=1 HTTP/1.1"
    assert redact(line) == f"GET /v1/ws?precision=ms&{name}=***&x=1 HTTP/1.1"


@pytest.mark.parametrize("scheme", ["Bearer", "Basic", "bearer", "Token"])
def test_redact_masks_authorization_credentials(scheme: str) -> None:
    """The credentials after Bearer, Basic or Token are masked, the scheme kept."""
    assert redact(f"Authorization: {scheme} {SECRET}") == f"Authorization: {scheme} ***"


def test_redact_leaves_ordinary_text_alone() -> None:
    """Text without secrets comes back unchanged."""
    text = "wrote 5000 points in 12.5 ms to db=sensors (device sensor-1, seq 7)"
    assert redact(text) == text


# --- RedactingFilter --------------------------------------------------------------------------


def test_filter_masks_secrets_in_arguments(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    """A token passed as a %-argument is masked in the formatted line."""
    logger, buffer = logged
    token = new_token()
    logger.info("connect %s from %s", f"/v1/ws?token={token}", "10.0.0.1")
    assert buffer.getvalue() == "INFO tests.test_logs: connect /v1/ws?token=*** from 10.0.0.1\n"


def test_filter_masks_secrets_in_exception_text(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    """A token in an exception's message is masked in the logged traceback, which stays."""
    logger, buffer = logged
    token = new_token()
    try:
        raise ValueError(f"bad header Authorization: Bearer {token}")
    except ValueError:
        logger.exception("handshake failed for %s", token)
    output = buffer.getvalue()
    assert token not in output
    assert token[len("hubt_") :] not in output
    assert output.startswith("ERROR tests.test_logs: handshake failed for ***\nTraceback")
    assert "ValueError: bad header Authorization: Bearer ***" in output


def test_filter_masks_secrets_in_a_chained_exception(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    """A token in the cause of a logged exception is masked too."""
    logger, buffer = logged
    token = new_token()
    try:
        try:
            raise KeyError(token)
        except KeyError as cause:
            raise RuntimeError("lookup failed") from cause
    except RuntimeError:
        logger.exception("no device")
    output = buffer.getvalue()
    assert "RuntimeError: lookup failed" in output
    assert "KeyError: '***'" in output
    assert token not in output


def test_filter_keeps_records_without_secrets_intact(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    """A record without secrets is logged as usual (the filter drops nothing)."""
    logger, buffer = logged
    logger.debug("wrote %d points in %.1f ms", 12, 3.25)
    assert buffer.getvalue() == "DEBUG tests.test_logs: wrote 12 points in 3.2 ms\n"


def test_redact_masks_credentials_in_a_url() -> None:
    """A user:password@ in an InfluxDB URL is masked; the host stays readable."""
    assert redact("writing to http://admin:s3cret@db:8086") == "writing to http://***@db:8086"
