"""The collector's frame decoding never fails on hostile bytes except with ProtocolError."""

from __future__ import annotations

from array import array

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from expman._wire import columns
from expman._wire import frames as proto
from expman._storage.rows import frame_table
from expman._errors import ProtocolError


def valid_metrics_frame() -> bytes:
    body = columns.metrics_body({0: "loss", 1: "acc"}, array("i", [0, 1, 0]).tobytes(), array("d", [1.0, 0.5, 2.0]).tobytes(),
                              [1, None, 3], [None, 2.0, None], [[1, "text", 4, None]])
    return proto.encode_frame("metrics", run="r1", host="h", rank=0, sender="s", seq=7, sent_at=1.0, body=body)


def decode_all_the_way(data: bytes) -> None:
    """What the collector does with a metrics frame: envelope, body, rows."""
    try:
        frame = proto.decode_frame(data)
        if frame.kind == proto.METRICS:
            frame_table(frame)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes(data):
    decode_all_the_way(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_frames(data):
    frame = bytearray(valid_metrics_frame())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    decode_all_the_way(bytes(frame[:cut]))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["keys", "ids", "values", "steps", "times", "texts"]), msgpack_values))
def test_well_formed_envelopes_with_arbitrary_bodies(body):
    data = msgpack.packb({"v": 1, "kind": "metrics", "run": "r", "host": "h", "rank": 0, "sender": "s",
                          "seq": 1, "t": 0.0, "body": body}, use_bin_type=True)
    decode_all_the_way(data)
