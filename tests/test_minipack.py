"""The shim's pure-Python msgpack must agree byte for byte with the C msgpack."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vm_token import _minipack

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
           | st.floats(allow_nan=False) | st.text(max_size=300) | st.binary(max_size=300))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=20)
    | st.dictionaries(st.text(max_size=20), inner, max_size=20),
    max_leaves=60,
)


@given(values)
def test_packs_like_msgpack(value):
    assert _minipack.packb(value) == msgpack.packb(value, use_bin_type=True)


@given(values)
def test_unpacks_what_msgpack_packs(value):
    assert _minipack.unpackb(msgpack.packb(value, use_bin_type=True)) == value


@pytest.mark.parametrize("n", [0, 15, 16, 255, 256, 65535, 65536])
def test_length_boundaries(n):
    for value in ("x" * n, b"x" * n, [1] * n, {str(i): i for i in range(n)}):
        packed = msgpack.packb(value, use_bin_type=True)
        assert _minipack.packb(value) == packed
        assert _minipack.unpackb(packed) == value


def test_float32_is_read():
    assert _minipack.unpackb(msgpack.packb(1.5, use_single_float=True)) == 1.5
    assert math.isnan(_minipack.unpackb(msgpack.packb(float("nan"))))


@given(st.binary(max_size=200))
def test_garbage_raises_only_value_error(data):
    try:
        _minipack.unpackb(data)
    except ValueError:
        pass


@pytest.mark.parametrize("data", [
    b"\xc1", b"\xd4\x01\x02", b"\x92\x01", b"\x81\x01\x02", b"\xdd\xff\xff\xff\xff",
    b"\x91" * 40 + b"\x01", b"\x01\x02",
])
def test_malformed(data):
    with pytest.raises(ValueError):
        _minipack.unpackb(data)
