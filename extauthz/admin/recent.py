"""A bounded buffer of recent decisions, for the admin service's Explain by decision id.

Filled by the Check servicer only when the admin listener is on (otherwise it does not
exist and Check pays nothing). Each entry keeps the request as extauthz saw it and the
compiled policy set that decided it, so a replay runs against that exact snapshot even
after a reload. Holding a snapshot keeps it alive until its last entry is evicted.

Everything here runs on the event-loop thread (grpc.aio), so no lock is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ..decision import Decision
from ..policy.engine import PolicySet
from ..request import CheckInput

DEFAULT_CAPACITY = 1024


@dataclass(frozen=True, slots=True)
class Recorded:
    """One decision as it was made: ``input`` is None when the CheckRequest was unreadable."""

    decision: Decision
    input: CheckInput | None
    policies: PolicySet


class RecentDecisions:
    """The last ``capacity`` decisions by id; the oldest is evicted first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[str, Recorded] = OrderedDict()

    def record(self, decision: Decision, inp: CheckInput | None, policies: PolicySet) -> None:
        if self.capacity == 0:
            return
        items = self._items
        kept = None if inp is None else inp.detached()
        items[decision.decision_id] = Recorded(decision, kept, policies)
        while len(items) > self.capacity:
            items.popitem(last=False)

    def get(self, decision_id: str) -> Recorded | None:
        return self._items.get(decision_id)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, decision_id: object) -> bool:
        return decision_id in self._items
