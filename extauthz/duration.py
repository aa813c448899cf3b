"""Durations as policy YAML writes them: ``5s``, ``1.5s``, ``250ms``, ``10m``, ``1h``, ``1m30s``.

Protobuf JSON (what Istio's own YAML becomes) writes ``Ns``; the Go forms are accepted too
because that is what people type. A bare number is refused: ``60`` could mean seconds or
minutes to the reader.
"""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds; ValueError for anything that is not a sequence of number+unit parts."""
    parts = list(_PART.finditer(text))
    if not parts or "".join(p[0] for p in parts) != text:
        raise ValueError(f"{text!r} is not a duration such as 5s, 250ms, 10m or 1h")
    return sum(float(p[1]) * _UNITS[p[2]] for p in parts)
