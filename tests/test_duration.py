"""Durations in policy YAML (jwtRule ``timeout``, ``token.ttl``)."""

from __future__ import annotations

import pytest

from extauthz.duration import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h0m5s", 3605.0),
        ("0s", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5 s", "s", "1d", "-5s", "5sx", "x5s", "1.s", ".5s"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)
