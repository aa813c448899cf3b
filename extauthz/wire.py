"""Protobuf wire format written by hand, where building messages costs too much per call:
the CheckResponse of every Check (``response.py``), the spans the exporter sends
(``otlp.py``). Both are tested byte for byte against protobuf's own serialization."""

from __future__ import annotations

_SMALL = 0x800  # lengths and counts below this come from a table (one or two bytes)


def _encode(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TABLE = tuple(_encode(n) for n in range(_SMALL))


def varint(n: int) -> bytes:
    """A non-negative integer as a base-128 varint."""
    if n < 0:  # _TABLE[-1] would silently encode 2047
        raise ValueError(f"varint of a negative number: {n}")
    return _TABLE[n] if n < _SMALL else _encode(n)


def length_prefixed(payload: bytes) -> bytes:
    """``payload`` prefixed by its length: a length-delimited field's body."""
    return varint(len(payload)) + payload
