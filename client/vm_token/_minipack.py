"""The msgpack subset the protocol uses, in pure Python, for the `vm-token` shim.

`import msgpack` costs the shim about 3.5 ms (it pulls in datetime and collections for its
extension types) — a third of the interpreter's own start-up. One request and one reply
need none of that: nil, booleans, integers, floats, strings, binary, arrays and maps.
The output is byte-for-byte what msgpack.packb(..., use_bin_type=True) produces, and the
tests hold the two to that.
"""

from __future__ import annotations

# _struct, not struct: the C module itself, one import less for the shim.
from _struct import pack, unpack_from

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def packb(obj: Any) -> bytes:
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj: Any, out: bytearray) -> None:  # noqa: C901 - one branch per type
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        if 0 <= obj < 0x80:
            out.append(obj)
        elif -32 <= obj < 0:
            out.append(obj & 0xFF)
        elif 0 <= obj < 0x100:
            out += pack(">BB", 0xCC, obj)
        elif 0 <= obj < 0x10000:
            out += pack(">BH", 0xCD, obj)
        elif 0 <= obj < 0x100000000:
            out += pack(">BI", 0xCE, obj)
        elif 0 <= obj < 0x10000000000000000:
            out += pack(">BQ", 0xCF, obj)
        elif -0x80 <= obj < 0:
            out += pack(">Bb", 0xD0, obj)
        elif -0x8000 <= obj < 0:
            out += pack(">Bh", 0xD1, obj)
        elif -0x80000000 <= obj < 0:
            out += pack(">Bi", 0xD2, obj)
        elif -0x8000000000000000 <= obj < 0:
            out += pack(">Bq", 0xD3, obj)
        else:
            raise OverflowError("integer out of msgpack's range")
    elif isinstance(obj, float):
        out += pack(">Bd", 0xCB, obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _header(len(data), out, 0xA0, 32, 0xD9, 0xDA, 0xDB)
        out += data
    elif isinstance(obj, bytes | bytearray):
        _header(len(obj), out, None, 0, 0xC4, 0xC5, 0xC6)
        out += obj
    elif isinstance(obj, list | tuple):
        _header(len(obj), out, 0x90, 16, None, 0xDC, 0xDD)
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        _header(len(obj), out, 0x80, 16, None, 0xDE, 0xDF)
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    else:
        raise TypeError(f"cannot serialize {type(obj).__name__}")


def _header(n: int, out: bytearray, fix: int | None, fix_limit: int,
            code8: int | None, code16: int, code32: int) -> None:
    if fix is not None and n < fix_limit:
        out.append(fix | n)
    elif code8 is not None and n < 0x100:
        out += pack(">BB", code8, n)
    elif n < 0x10000:
        out += pack(">BH", code16, n)
    elif n < 0x100000000:
        out += pack(">BI", code32, n)
    else:
        raise ValueError("object too large for msgpack")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("truncated msgpack data")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def number(self, fmt: str, size: int) -> Any:
        if self.pos + size > len(self.data):
            raise ValueError("truncated msgpack data")
        (value,) = unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value


_MAX_DEPTH = 32


def unpackb(data: bytes | memoryview) -> Any:
    """One msgpack object; ValueError for anything malformed, extra, or outside the subset."""
    data = bytes(data)  # (a memoryview's slices are not bytes)
    reader = _Reader(data)
    obj = _unpack(reader, 0)
    if reader.pos != len(data):
        raise ValueError("extra data after the msgpack object")
    return obj


def _unpack(r: _Reader, depth: int) -> Any:  # noqa: C901 - one branch per type
    if depth > _MAX_DEPTH:
        raise ValueError("msgpack data nested too deeply")
    code = r.number(">B", 1)
    if code <= 0x7F:
        return code
    if code >= 0xE0:
        return code - 0x100
    if 0xA0 <= code <= 0xBF:
        return r.take(code & 0x1F).decode("utf-8")
    if 0x90 <= code <= 0x9F:
        return [_unpack(r, depth + 1) for _ in range(code & 0x0F)]
    if 0x80 <= code <= 0x8F:
        return _map(r, code & 0x0F, depth)
    if code == 0xC0:
        return None
    if code == 0xC2:
        return False
    if code == 0xC3:
        return True
    if code in _NUMBERS:
        fmt, size = _NUMBERS[code]
        return r.number(fmt, size)
    if code in _STR:
        return r.take(r.number(*_STR[code])).decode("utf-8")
    if code in _BIN:
        return r.take(r.number(*_BIN[code]))
    if code in (0xDC, 0xDD):
        n = r.number(">H", 2) if code == 0xDC else r.number(">I", 4)
        return [_unpack(r, depth + 1) for _ in range(_bounded(n, r))]
    if code in (0xDE, 0xDF):
        n = r.number(">H", 2) if code == 0xDE else r.number(">I", 4)
        return _map(r, _bounded(n, r), depth)
    raise ValueError(f"msgpack type 0x{code:02x} is not used by the protocol")


def _bounded(n: int, r: _Reader) -> int:
    # Every element takes at least a byte: a count beyond what is left is a lie.
    if n > len(r.data) - r.pos:
        raise ValueError("truncated msgpack data")
    return n


def _map(r: _Reader, n: int, depth: int) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for _ in range(n):
        key = _unpack(r, depth + 1)
        if not isinstance(key, str | bytes):
            raise ValueError("map keys must be strings")
        result[key] = _unpack(r, depth + 1)
    return result


_NUMBERS = {
    0xCA: (">f", 4), 0xCB: (">d", 8),
    0xCC: (">B", 1), 0xCD: (">H", 2), 0xCE: (">I", 4), 0xCF: (">Q", 8),
    0xD0: (">b", 1), 0xD1: (">h", 2), 0xD2: (">i", 4), 0xD3: (">q", 8),
}
_STR = {0xD9: (">B", 1), 0xDA: (">H", 2), 0xDB: (">I", 4)}
_BIN = {0xC4: (">B", 1), 0xC5: (">H", 2), 0xC6: (">I", 4)}
