"""Decoding device frames, without sockets."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hub.core.protocol import (
    ReadingsFrame,
    TelegrafFrame,
    decode_frame,
    encode,
    encode_ack,
    plain_readings_envelope,
)
from hub.errors import InvalidMessage
from schemas.messages import Ack, ConfigAck, ReadingsMessage, Rejection

pytestmark = pytest.mark.unit


def pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


READING = {"name": "environment", "fields": {"temperature": 21.5}}


def test_readings_envelope_is_decoded() -> None:
    """A readings message yields its seq and its raw readings."""
    event = decode_frame(pack({"type": "readings", "seq": 17, "readings": [READING]}), 10)
    assert event == ReadingsFrame(seq=17, readings=[READING])


def test_config_ack_is_decoded() -> None:
    """A config_ack message becomes a ConfigAck model."""
    event = decode_frame(pack({"type": "config_ack", "version": 7, "ok": False, "error": "no"}), 10)
    assert event == ConfigAck(type="config_ack", version=7, ok=False, error="no")


def test_telegraf_stream_is_recognised() -> None:
    """Concatenated maps without type but with name and fields are Telegraf metrics."""
    event = decode_frame(pack(READING) * 3, 10)
    assert event == TelegrafFrame(metrics=[READING] * 3, undecodable=0)


def test_telegraf_truncated_tail_is_counted() -> None:
    """A truncated last metric is counted as undecodable; the complete ones are kept."""
    event = decode_frame(pack(READING) * 2 + pack(READING)[:-3], 10)
    assert isinstance(event, TelegrafFrame)
    assert (len(event.metrics), event.undecodable) == (2, 1)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "empty"),
        (b"\xc1", "not valid msgpack"),
        (pack([1, 2]), "must be a msgpack map"),
        (pack({"seq": 1}), "no 'type'"),
        (pack({"type": "launch"}), "unknown message type"),
        (pack({"type": "readings", "seq": -1, "readings": [READING]}), "seq"),
        (pack({"type": "readings", "seq": 1, "readings": []}), "readings"),
        (pack({"type": "readings", "seq": 1, "readings": [READING], "x": 1}), "x"),
        (pack({"type": "readings", "seq": 1, "readings": [READING]}) + b"\x00", "trailing"),
        (pack({"type": "config_ack", "version": 1}), "ok"),
        (pack({1: 2}), "not valid msgpack"),
        (pack("just a string"), "must be a msgpack map"),
    ],
)
def test_malformed_frames_are_invalid_messages(frame: bytes, reason: str) -> None:
    """Every malformed frame raises InvalidMessage naming what is wrong."""
    with pytest.raises(InvalidMessage, match=reason):
        decode_frame(frame, 10)


def test_too_many_readings_is_an_invalid_envelope() -> None:
    """More readings than the limit make the whole message invalid."""
    with pytest.raises(InvalidMessage, match="at most 2"):
        decode_frame(pack({"type": "readings", "seq": 1, "readings": [READING] * 3}), 2)


def test_invalid_utf8_is_an_invalid_message() -> None:
    """A string that is not UTF-8 makes the frame invalid."""
    frame = b"\x81\xa4type\xa3\xff\xfe\xfd"
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        decode_frame(frame, 10)


@pytest.mark.parametrize(
    "rejected",
    [
        [],
        [Rejection(index=0, errors=["fields.x: Input should be a valid number"])],
        [Rejection(index=2, errors=["a", "b"]), Rejection(index=7, errors=["ü ✓"])],
    ],
)
@pytest.mark.parametrize(("seq", "accepted"), [(0, 0), (1, 50), (2**64 - 1, 5000)])
def test_encode_ack_is_the_ack_models_encoding(
    seq: int, accepted: int, rejected: list[Rejection]
) -> None:
    """The hot path's ack encoder gives exactly the bytes of the `Ack` model's encoding."""
    model = Ack(seq=seq, accepted=accepted, rejected=rejected)
    reasons = {rejection.index: rejection.errors for rejection in rejected}
    assert encode_ack(seq, accepted, reasons) == encode(model)


_MISSING = object()
_SEQS: st.SearchStrategy[object] = st.one_of(
    st.integers(min_value=-(2**65), max_value=2**65),
    st.sampled_from([0, 2**64 - 1, 2**64, -1, True, False, 1.0, "1", None, b"1"]),
)
_READINGS: st.SearchStrategy[object] = st.one_of(
    st.lists(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), max_size=3),
    st.sampled_from([[], (), {}, "x", None, 1]),
)


@given(
    seq=st.one_of(st.just(_MISSING), _SEQS),
    readings=st.one_of(st.just(_MISSING), _READINGS),
    extra=st.dictionaries(st.sampled_from(["x", "Seq", "version", ""]), st.integers(), max_size=2),
)
@settings(max_examples=400, deadline=None)
def test_plain_envelope_check_accepts_what_the_model_accepts(
    seq: object, readings: object, extra: dict[str, int]
) -> None:
    """The hot path's envelope check and `ReadingsMessage` agree on every envelope."""
    message: dict[str, object] = {"type": "readings", **extra}
    if seq is not _MISSING:
        message["seq"] = seq
    if readings is not _MISSING:
        message["readings"] = readings
    try:
        model = ReadingsMessage[Any].model_validate(message)
    except ValidationError:
        model = None
    plain = plain_readings_envelope(message)
    if model is None:
        assert plain is None
    else:
        assert plain == ReadingsFrame(seq=model.seq, readings=model.readings)
