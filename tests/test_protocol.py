"""Framing: what goes on the wire, and what the parser refuses."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vm_token import protocol


def test_frame_is_length_then_msgpack_map():
    frame = protocol.encode_frame({"v": 1, "op": "get", "vm": "Sales"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"v": 1, "op": "get", "vm": "Sales"}
    assert protocol.decode_body(frame[4:]) == {"v": 1, "op": "get", "vm": "Sales"}


def test_oversize_frames_are_refused_both_ways():
    with pytest.raises(protocol.FrameTooLarge):
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME + 1))
    assert protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME)) == protocol.MAX_FRAME
    with pytest.raises(protocol.FrameTooLarge):
        protocol.encode_frame({"blob": "x" * protocol.MAX_FRAME})


@pytest.mark.parametrize("body", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("get"), msgpack.packb({1: "x"}),
    msgpack.packb({b"op": "get"}), msgpack.packb({"a": 1}) + b"\x00",
])
def test_malformed_bodies(body):
    with pytest.raises(protocol.MalformedFrame):
        protocol.decode_body(body)


@given(st.binary(max_size=512))
def test_decoder_never_raises_anything_but_malformed(body):
    try:
        assert isinstance(protocol.decode_body(body), dict)
    except protocol.MalformedFrame:
        pass


def test_default_socket_path_rules():
    assert protocol.default_socket_path({"VM_TOKEN_SOCKET": "/x/s"}) == "/x/s"
    assert protocol.default_socket_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == \
        "/run/user/7/vm-token/socket"
    assert protocol.default_socket_path({}).startswith("/tmp/vm-token-")


def test_the_example_in_the_protocol_document_is_right():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    example = doc.split("## Example")[1].split("```")[1]
    assert bytes.fromhex(example) == protocol.encode_frame({"v": 1, "op": "get", "vm": "Sales"})
