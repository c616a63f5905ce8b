"""Decoding device frames, without sockets."""

from __future__ import annotations

import msgpack
import pytest

from hub.errors import InvalidMessage
from hub.protocol import ReadingsFrame, TelegrafFrame, decode_frame, encode, encode_ack
from schemas.messages import Ack, ConfigAck, Rejection


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
    assert encode_ack(seq, accepted, rejected) == encode(model)
