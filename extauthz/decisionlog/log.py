"""The decision log: a bounded queue in front of one writer thread.

A Check calls :meth:`DecisionLog.record`, which samples, appends the values the Check
already holds to the queue and returns (about a microsecond; no formatting, no I/O). The
writer thread turns them into masked JSON lines and hands them to the sink in batches.

When the writer falls behind (a slow disk, a full stdout pipe) the queue fills. Allows are
dropped once it is three quarters full; the last quarter is kept for denies and errors, so
an allow flood cannot push a deny out. A deny is dropped only when the whole queue is full,
and then it is counted and logged at ERROR (rate-limited), never silently. A Check never
waits for room: it runs on the event loop, and one blocked Check stalls every Check in
flight, so a stuck disk would become an outage.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.trace import SpanContext

from .. import __version__
from ..decision import Decision, Outcome
from ..request import CheckInput
from .record import Entry, Masker, WorkloadOf, to_dict, to_json
from .settings import DEFAULT_QUEUE_SIZE, DecisionLogSettings
from .sink import Sink, open_sink

log = logging.getLogger(__name__)

# At most one log line per interval about dropped records (the counts keep every one).
DENY_DROP_LOG_INTERVAL = 1.0
ALLOW_DROP_LOG_INTERVAL = 60.0
RESULTS = ("written", "sampled_out", "dropped", "failed")
# An :class:`Entry`'s fields.
_Queued = tuple[Decision, CheckInput | None, int, int, SpanContext | None, str, float]


def sampled(decision_id: str, rate: float) -> bool:
    """Whether an allow with this id is kept at ``rate``: a hash of the id, so the choice is
    reproducible (the same id is kept on every run and by every replica)."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(decision_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2.0**64


def _traceparent(metadata: Iterable[tuple[str, Any]]) -> str:
    for key, value in metadata:
        if key == "traceparent":
            return value if isinstance(value, str) else ""
    return ""


class DecisionLog:
    """One record per decision to ``sink``, off the request path. :meth:`record` never
    raises; :meth:`close` writes what is queued (the server calls it after draining Checks).

    ``workload`` resolves the protected workload of a request (the Authorizer's
    :meth:`~extauthz.authorizer.Authorizer.workload`); without it records have none.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        mask: Iterable[str] = (),
        allow_sample_rate: float = 1.0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        workload: WorkloadOf | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        if queue_size < 4:
            raise ValueError("queue_size must be at least 4")
        self.sink = sink
        self.masker = Masker(mask)
        self.allow_sample_rate = allow_sample_rate
        self.workload = workload
        self.queue_size = queue_size
        self._allow_room = queue_size - queue_size // 4
        # Entries as plain tuples: a NamedTuple costs the Check ~1 us more to build.
        self._queue: deque[_Queued] = deque()
        lock = threading.Lock()
        self._lock = lock
        self._work = threading.Condition(lock)  # the writer waits for records
        self._idle = threading.Condition(lock)  # flush() waits for the writer
        self._pending = 0  # queued or being written
        self._writer_waiting = False  # notify() costs ~1 us: only when someone listens
        self._closing = False
        self._thread: threading.Thread | None = None
        self._counts = {(r, k): 0 for r in RESULTS for k in ("allow", "deny")}
        self._next_report = {"allow": 0.0, "deny": 0.0}
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("extauthz", __version__)
        meter.create_observable_counter(
            "extauthz.decision_log.records",
            callbacks=[self._observe],
            description="decision log records, by result (written, sampled_out, dropped: queue "
            "full, failed: not formatted or not written) and decision (allow, deny)",
        )

    @classmethod
    def open(
        cls,
        settings: DecisionLogSettings,
        *,
        workload: WorkloadOf | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> DecisionLog:
        """The log of ``--decision-log``: the file is opened now (a bad path stops startup)."""
        return cls(
            open_sink(settings),
            mask=settings.mask,
            allow_sample_rate=settings.allow_sample_rate,
            queue_size=settings.queue_size,
            workload=workload,
            meter_provider=meter_provider,
        )

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
                self._thread.start()

    def record(
        self,
        decision: Decision,
        inp: CheckInput | None,
        start_ns: int,
        span: SpanContext | None = None,
        metadata: Iterable[tuple[str, Any]] = (),
        decided_ns: int = 0,
    ) -> None:
        """Queue one decision. ``span`` is the decision span's context (from
        ``Telemetry.record``); without one the trace id comes from ``metadata``'s
        ``traceparent``. ``decided_ns`` is when the answer was built (default: now)."""
        try:
            allowed = decision.outcome is Outcome.ALLOW
            kind = "allow" if allowed else "deny"
            rate = self.allow_sample_rate if allowed else 1.0
            if rate < 1.0 and not sampled(decision.decision_id, rate):
                with self._lock:
                    self._counts["sampled_out", kind] += 1
                return
            entry: _Queued = (
                decision,
                None if inp is None else inp.detached(),
                start_ns,
                decided_ns or time.time_ns(),
                span,
                "" if span is not None else _traceparent(metadata),
                rate,
            )
            with self._lock:
                room = self._allow_room if allowed else self.queue_size
                if len(self._queue) < room and not self._closing:
                    self._queue.append(entry)
                    self._pending += 1
                    if self._writer_waiting:
                        self._work.notify()
                    return
                self._counts["dropped", kind] += 1
            self._report_drop(decision, kind)
        except Exception:
            name = getattr(decision, "decision_id", "?")
            log.exception("decision log: cannot queue decision %s", name)

    def _report_drop(self, decision: Decision, kind: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next_report[kind]:
                return
            interval = DENY_DROP_LOG_INTERVAL if kind == "deny" else ALLOW_DROP_LOG_INTERVAL
            self._next_report[kind] = now + interval
            total = self._counts["dropped", kind]
        if kind == "deny":
            log.error(
                "decision log full or closed: deny %s (%s) not written; %d denies dropped so far",
                decision.decision_id,
                decision.reason,
                total,
            )
        else:
            log.warning("decision log full: %d allows dropped so far", total)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._writer_waiting = True
                    self._work.wait()
                    self._writer_waiting = False
                if not self._queue:
                    return
                batch, self._queue = self._queue, deque()
            try:
                self._write(batch)
            finally:
                with self._lock:
                    self._pending -= len(batch)
                    self._idle.notify_all()

    def _write(self, batch: deque[_Queued]) -> None:
        lines: list[str] = []
        kinds = {"allow": 0, "deny": 0}
        failed = {"allow": 0, "deny": 0}
        for queued in batch:
            entry = Entry._make(queued)
            kind = "allow" if entry.decision.allowed else "deny"
            try:
                lines.append(to_json(to_dict(entry, self.masker, self.workload), self.masker))
                kinds[kind] += 1
            except Exception:
                failed[kind] += 1
                log.exception("decision log: cannot format decision %s", entry.decision.decision_id)
        try:
            if lines:
                self.sink.write(lines)
        except Exception as exc:
            failed = {k: failed[k] + kinds[k] for k in kinds}
            kinds = {"allow": 0, "deny": 0}
            log.error(
                "decision log: %d records (%d denies) not written: %s",
                len(lines),
                failed["deny"],
                exc,
            )
        with self._lock:
            for kind in kinds:
                self._counts["written", kind] += kinds[kind]
                self._counts["failed", kind] += failed[kind]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued record is written (or failed); False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop taking records, write the queued ones, close the sink. Bounded by
        ``timeout`` (a hung disk must not hang shutdown); False if records were lost."""
        with self._lock:
            if self._closing:
                # Closed already (a second call at exit): report, never wait again.
                return self._thread is None and self._pending == 0
            self._closing = True
            self._work.notify()
            thread = self._thread
        if thread is None:  # never started: write what was queued before a start
            self._thread = thread = threading.Thread(
                target=self._run, name="decision-log", daemon=True
            )
            thread.start()
        thread.join(timeout)
        if thread.is_alive():
            with self._lock:
                lost = self._pending
            log.error("decision log: %d records not written at shutdown (sink stuck)", lost)
            return False
        with self._lock:
            self._thread = None
        try:
            self.sink.close()
        except Exception as exc:
            log.error("decision log: cannot close: %s", exc)
            return False
        return True

    def counts(self) -> dict[tuple[str, str], int]:
        """(result, "allow" | "deny") → records; result is one of :data:`RESULTS`."""
        with self._lock:
            return dict(self._counts)

    def _observe(self, _: CallbackOptions) -> Iterator[Observation]:
        for (result, kind), n in self.counts().items():
            yield Observation(n, {"result": result, "decision": kind})
