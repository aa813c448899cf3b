"""What every transport does around a decision: the in-flight limit, and the recent
decisions, telemetry and decision log of each answer.

The gRPC servicer (:mod:`extauthz.server`) and the HTTP one (:mod:`extauthz.httpserver`)
only read their request into a :class:`CheckInput`, ask the Authorizer, and encode; the rest
is here once, so both transports count, trace and log alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from .admin.recent import RecentDecisions
from .authorizer import Authorizer
from .decision import Decision, Outcome
from .decisionlog.log import DecisionLog
from .errors import OverloadedError
from .policy.engine import PolicySet
from .request import CheckInput
from .telemetry import Telemetry

log = logging.getLogger(__name__)

# The answer of last resort: built from constants, it cannot itself fail.
FAILED = Decision(Outcome.ERROR, "internal_error", "the authorization server failed to decide", "")

Metadata = Iterable[tuple[str, Any]]


class CheckRecorder:
    """Shared by the transports of one server: one in-flight count, one limit."""

    def __init__(
        self,
        authorizer: Authorizer,
        telemetry: Telemetry,
        recent: RecentDecisions | None = None,
        decision_log: DecisionLog | None = None,
        max_in_flight: int = 0,
    ) -> None:
        self.authorizer = authorizer
        self.telemetry = telemetry
        # Only with the admin listener on: the inputs and policy snapshots of recent decisions.
        self.recent = recent
        self.decision_log = decision_log
        # Checks decided at once before more are shed (0: no limit).
        self.max_in_flight = max_in_flight

    @property
    def wants_metadata(self) -> bool:
        """Whether the call's metadata is read at all: only spans and the log read it."""
        return self.telemetry.makes_spans or self.decision_log is not None

    def over_limit(self) -> bool:
        return 0 < self.max_in_flight <= self.telemetry.in_flight

    def shed(self) -> Decision:
        """Over the limit: a 503 ``overloaded`` deny at once, rather than a place in a queue
        whose wait Envoy's timeout would turn into an error."""
        return self.authorizer.refuse(
            OverloadedError(f"more than {self.max_in_flight} checks in flight")
        )

    def snapshot(self) -> PolicySet | None:
        """The policy set a decision made now uses, when recent decisions keep it."""
        return self.authorizer.policies if self.recent is not None else None

    def finish(
        self,
        decision: Decision,
        inp: CheckInput | None,
        snapshot: PolicySet | None,
        start: int,
        wall: int,
        decided: int,
        metadata: Metadata,
    ) -> None:
        """Record an answered decision; never raises (the answer is already made)."""
        if self.recent is not None and snapshot is not None:
            try:
                self.recent.record(decision, inp, snapshot)
            except Exception:
                log.exception("cannot record decision %s", decision.decision_id)
        self.record_undecided(decision, inp, start, wall, metadata, decided)

    def record_undecided(
        self,
        decision: Decision,
        inp: CheckInput | None,
        start: int,
        wall: int,
        metadata: Metadata,
        decided: int = 0,
    ) -> None:
        """Telemetry and the decision log, alone: for an answer the policies did not make
        (shed, or the last resort), and the end of :meth:`finish`. Never raises."""
        span = None
        try:
            span = self.telemetry.record(decision, inp, start, metadata)
        except Exception:
            log.exception("telemetry failed for decision %s", decision.decision_id)
        if self.decision_log is not None:  # never raises
            self.decision_log.record(decision, inp, wall, span, metadata, decided)
