"""``--decision-log*`` flags: one frozen value, and the argparse options that build it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ..errors import DecisionLogError

STDOUT = "-"
# Values of these headers are credentials or carry them: never written, whatever the flags.
ALWAYS_MASKED = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-forwarded-client-cert"}
)
DEFAULT_BACKUPS = 5
# Records waiting for the writer. A quarter of the room is kept for denies: allows are
# dropped once the queue is three quarters full, denies only when it is full.
DEFAULT_QUEUE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class DecisionLogSettings:
    """Where records go (a file path, or ``-`` for stdout) and what they keep.

    ``max_bytes`` rotates the file before a record would make it larger (0: never);
    ``backups`` rotated files are kept (``PATH.1`` newest). ``allow_sample_rate`` of allows
    are written, chosen by a hash of the decision id; every other decision is. ``mask``
    names headers and claims (case-insensitive) whose values are written as ``***``.
    """

    path: str
    max_bytes: int = 0
    backups: int = DEFAULT_BACKUPS
    allow_sample_rate: float = 1.0
    mask: frozenset[str] = frozenset()
    queue_size: int = DEFAULT_QUEUE_SIZE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--decision-log",
        metavar="PATH",
        help="write one JSON record per decision to this file, or - for stdout (default: off)",
    )
    p.add_argument(
        "--decision-log-max-bytes",
        type=_count,
        default=0,
        metavar="N",
        help="rotate the decision log before it grows past N bytes: PATH -> PATH.1 -> ... "
        "(default 0: never)",
    )
    p.add_argument(
        "--decision-log-backups",
        type=_count,
        default=DEFAULT_BACKUPS,
        metavar="N",
        help=f"rotated decision logs kept, PATH.1 (newest) to PATH.N (default {DEFAULT_BACKUPS})",
    )
    p.add_argument(
        "--decision-log-allow-sample-rate",
        type=_rate,
        default=1.0,
        metavar="R",
        help="share of allows written, 0..1, chosen by decision id (default 1); denies and "
        "errors are always written",
    )
    p.add_argument(
        "--decision-log-mask",
        action="append",
        default=[],
        metavar="NAME",
        help="a header or claim whose value the decision log writes as *** (repeatable); "
        + ", ".join(sorted(ALWAYS_MASKED))
        + " always are",
    )


def from_args(args: argparse.Namespace) -> DecisionLogSettings | None:
    """The settings, or None without ``--decision-log`` (then the other flags must be unset:
    a rotation or mask flag that silently did nothing would be a surprise)."""
    path: str | None = getattr(args, "decision_log", None)
    if path is None:
        given = [
            flag
            for flag, value, default in (
                ("--decision-log-max-bytes", "decision_log_max_bytes", 0),
                ("--decision-log-backups", "decision_log_backups", DEFAULT_BACKUPS),
                ("--decision-log-allow-sample-rate", "decision_log_allow_sample_rate", 1.0),
                ("--decision-log-mask", "decision_log_mask", []),
            )
            if getattr(args, value, default) != default
        ]
        if given:
            raise DecisionLogError(f"{', '.join(given)}: needs --decision-log PATH")
        return None
    if not path:
        raise DecisionLogError("--decision-log: expected a file path or - (stdout)")
    if path == STDOUT and args.decision_log_max_bytes:
        raise DecisionLogError(
            "--decision-log-max-bytes: only a file is rotated, not stdout (--decision-log -)"
        )
    masked = [name.strip().lower() for name in args.decision_log_mask]
    if not all(masked):
        raise DecisionLogError("--decision-log-mask: expected a header or claim name, got ''")
    return DecisionLogSettings(
        path=path,
        max_bytes=args.decision_log_max_bytes,
        backups=args.decision_log_backups,
        allow_sample_rate=args.decision_log_allow_sample_rate,
        mask=frozenset(masked),
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a rate from 0 to 1, got {text!r}")
    return value
