"""An ack is never larger than 64 KiB, whatever the message it answers; no sockets.

Issue 16 item 9: 5,000 nil readings in 5,032 bytes got a 232,789-byte ack. Past the budget
of `rejected`, the other rejected readings are given as index ranges (`rejected_ranges`);
every entry the ack holds is true, and `accepted` is exact.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.core.frames import FrameLimits, SlicedReadings, decode_device_frame
from hub.core.measurements import MeasurementSchemas, ReadingLimits
from hub.core.protocol import MAX_ERROR_CHARS, ReadingsFrame, cut_reasons, encode, encode_ack
from hub.core.readings import PreparedReadings, prepare_readings
from hub.core.slices import prepare_in_slices
from hub.errors import InvalidMessage
from schemas.messages import ACK_LISTED_BYTES, MAX_HUB_FRAME_BYTES, Ack, ErrorMessage, Rejection

pytestmark = pytest.mark.unit

MS = 10**6
VALIDATOR = MeasurementSchemas().validator(MS, ReadingLimits.defaults())


def pack(obj: object) -> bytes:
    """msgpack as a device would send it."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def ack_for(readings: list[Any]) -> tuple[bytes, int]:
    """The ack the hub's pure core sends for a message of `readings`, and the frame's size."""
    frame = pack({"type": "readings", "seq": 7, "readings": readings})
    limits = FrameLimits(max_readings=max(len(readings), 1))
    event = decode_device_frame(frame, limits)
    if isinstance(event, ReadingsFrame):
        prepared = prepare_readings(event.readings, VALIDATOR, "dev", MS, 0)
    else:
        assert isinstance(event, SlicedReadings)
        steps = prepare_in_slices(
            event.readings,
            lambda part, first: prepare_readings(part, VALIDATOR, "d", MS, first),
            limits,
        )
        prepared = drive(steps)
    return encode_ack(7, prepared.accepted, prepared.reasons), len(frame)


def drive(steps: Any) -> PreparedReadings:
    """Run a `prepare_in_slices` generator to its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: PreparedReadings = done.value
            return result


def covered(ack: Ack) -> list[int]:
    """Every index the ack says was rejected, listed or in a range, in order (each once:
    `rejected_indices` is a set, the list shows there is no overlap)."""
    indices = [r.index for r in ack.rejected]
    for first, last in ack.rejected_ranges:
        indices.extend(range(first, last + 1))
    assert set(indices) == ack.rejected_indices()
    return indices


def test_issue_16_nil_readings_get_a_small_ack() -> None:
    """5,000 nil readings (5,032 bytes) get an ack within 64 KiB that still names each one."""
    packed, frame_size = ack_for([None] * 5000)
    ack = Ack.model_validate(msgpack.unpackb(packed))
    print(f"frame {frame_size} bytes, ack {len(packed)} bytes (was 232,789)")
    assert frame_size == 5032
    assert len(packed) <= MAX_HUB_FRAME_BYTES
    assert ack.accepted == 0
    assert covered(ack) == list(range(5000))
    assert all(r.errors for r in ack.rejected)


def test_small_rejections_are_listed_whole_without_ranges() -> None:
    """A few rejections: all listed with reasons, no `rejected_ranges` key at all."""
    packed, _ = ack_for([{"name": "m", "fields": {"x": 1.0}}, None, None])
    decoded = msgpack.unpackb(packed)
    assert set(decoded) == {"type", "seq", "accepted", "rejected"}
    assert [r["index"] for r in decoded["rejected"]] == [1, 2]


def test_long_unicode_reasons_stay_within_the_frame_bound() -> None:
    """Five 300-character reasons of 4-byte characters per reading, 5,000 readings."""
    reason = "\U0001f600" * 400
    packed = encode_ack(2**64 - 1, 0, {index: [reason] * 9 for index in range(5000)})
    ack = Ack.model_validate(msgpack.unpackb(packed))
    assert len(packed) <= MAX_HUB_FRAME_BYTES
    assert covered(ack) == list(range(5000))
    listed = sum(len(pack({"index": r.index, "errors": r.errors})) for r in ack.rejected)
    assert listed <= ACK_LISTED_BYTES


def test_every_other_reading_rejected_is_still_named() -> None:
    """The worst pattern for ranges, within the default 5,000 readings: all named."""
    good = {"name": "m", "fields": {"x": 1.0}}
    bad = {"name": "m", "fields": {"x": None}}
    packed, _ = ack_for([bad, good] * 2500)
    ack = Ack.model_validate(msgpack.unpackb(packed))
    assert len(packed) <= MAX_HUB_FRAME_BYTES
    assert ack.accepted == 2500
    assert covered(ack) == list(range(0, 5000, 2))


@pytest.mark.parametrize("count", [20_000, 200_000])
def test_ranges_that_do_not_fit_are_cut_and_what_is_sent_is_true(count: int) -> None:
    """With max_readings_per_message raised far, ranges stop at the bound: the ack stays
    within 64 KiB, names only rejected readings, in order, and `accepted` stays exact."""
    reasons = {index: ["fields.x: bad"] for index in range(0, count, 2)}
    packed = encode_ack(1, count // 2, reasons)
    ack = Ack.model_validate(msgpack.unpackb(packed))
    assert len(packed) <= MAX_HUB_FRAME_BYTES
    named = covered(ack)
    assert named == sorted(set(named)) and set(named) <= set(reasons)
    assert len(named) < len(reasons) and ack.accepted == count // 2


def test_everything_listed_is_the_models_encoding() -> None:
    """When every rejection fits, the ack is exactly the `Ack` model's encoding."""
    rejected = [Rejection(index=1, errors=["a"]), Rejection(index=4, errors=["b", "ü"])]
    reasons = {1: ["a"], 4: ["b", "ü"]}
    assert encode_ack(3, 5, reasons) == encode(Ack(seq=3, accepted=5, rejected=rejected))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.integers(0, 2**32),
        st.lists(st.text(max_size=400), min_size=1, max_size=9),
        max_size=3000,
    )
)
def test_any_rejections_give_a_bounded_true_ack(reasons: dict[int, list[str]]) -> None:
    """For any rejections: within 64 KiB; listed entries are the first ones, exact; every
    index named in a range was rejected; ranges come after the listed ones, in order."""
    packed = encode_ack(2**64 - 1, 0, reasons)
    ack = Ack.model_validate(msgpack.unpackb(packed))
    assert len(packed) <= MAX_HUB_FRAME_BYTES
    expected = [Rejection(index=i, errors=cut_reasons(reasons[i])) for i in sorted(reasons)]
    assert ack.rejected == expected[: len(ack.rejected)]
    named = covered(ack)
    assert named == sorted(set(named)) and set(named) <= set(reasons)


def test_error_messages_are_bounded_whatever_key_the_device_sent() -> None:
    """A message map with a 500,000-character unknown key: the `error` text the hub sends
    before 1007 stays within MAX_ERROR_CHARS (it named the whole key before)."""
    key = "k" * 500_000
    frame = pack({"type": "readings", "seq": 1, "readings": [None], key: 1})
    with pytest.raises(InvalidMessage) as refused:
        decode_device_frame(frame, FrameLimits(max_readings=10))
    assert "Extra inputs are not permitted" in refused.value.message
    assert len(refused.value.message) <= MAX_ERROR_CHARS
    sent = encode(ErrorMessage(code="invalid_message", message=refused.value.message))
    assert len(sent) <= 4 * MAX_ERROR_CHARS + 64
