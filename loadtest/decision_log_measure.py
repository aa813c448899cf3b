"""What the decision log costs a Check, what its writer costs, and what a slow sink drops.

On the example policies with the request of ``loadtest.micro``'s "allow, ES256 JWT, token
cache hit" case (a SPIFFE caller, 20 browser headers, a verified token with claims):

- ``record``: :meth:`DecisionLog.record`, the only decision-log work on the request path
  (sample, queue), for an allow kept, an allow sampled out at rate 0.1, and a deny;
- ``writer``: the writer thread's work per record, masking + JSON (``to_dict`` +
  ``to_json``), next to ``json_format.MessageToDict`` + ``json.dumps`` of an already built
  ``DecisionRecord`` message alone (the path the writer does not take);
- ``check``: decode → decide → encode as in ``loadtest.micro``, without a log, with
  ``record`` only (no writer), and with the writer running and writing to a file, timed
  until the last record is written: the writer shares the GIL with the Checks, so its CPU
  is paid by them when the process is busy;
- ``throughput``: records per second from first ``record`` to ``close`` into a file;
- ``slow sink``: allows and denies (10:1) recorded as fast as possible into a 1,024-record
  queue whose sink takes 1 ms per record: what is written and what is dropped.

    python -m loadtest.decision_log_measure [--rounds 5] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from extauthz.authorizer import Authorizer
from extauthz.decision import Decision, Outcome
from extauthz.decisionlog.log import DecisionLog
from extauthz.decisionlog.record import Entry, Masker, to_dict, to_json, to_record
from extauthz.decisionlog.settings import DecisionLogSettings
from extauthz.devtools.idp import DevIdP
from extauthz.devtools.mesh import EXAMPLE_POLICIES, ISSUER, JWKS_FILE
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput, from_check_request
from extauthz.response import to_check_response
from loadtest.micro import _request


class NullSink:
    def write(self, lines: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


class SlowSink:
    """A disk that takes ``seconds`` per record."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lines = 0

    def write(self, lines: list[str]) -> None:
        time.sleep(self.seconds * len(lines))
        self.lines += len(lines)

    def close(self) -> None:
        pass


def room_for(records: int) -> int:
    """A queue size that takes ``records`` allows (they get three quarters of it)."""
    return records * 4 // 3 + 8


def best_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=rounds)) / n * 1e6


def _record_us(decision: Decision, inp: CheckInput, rate: float, n: int, rounds: int) -> float:
    """One fresh, never started log per round: the queue only grows, nothing is written (a
    queue never drained across rounds would keep every entry alive and time the GC)."""
    best = float("inf")
    for _ in range(rounds):
        log = DecisionLog(NullSink(), allow_sample_rate=rate, queue_size=room_for(n))
        start = time.time_ns()
        took = timeit.timeit(lambda g=log, s=start: g.record(decision, inp, s), number=n)
        best = min(best, took / n * 1e6)
    return best


def _check_us(
    authorizer: Authorizer, raw: bytes, log: DecisionLog | None, n: int, rounds: int
) -> float:
    def once() -> None:
        start = time.time_ns()
        req = external_auth_pb2.CheckRequest.FromString(raw)
        inp = from_check_request(req)
        decision = authorizer.check(inp)
        to_check_response(decision).SerializeToString()
        if log is not None:
            log.record(decision, inp, start)

    return best_us(once, n, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    n, rounds = args.n, args.rounds
    idp = DevIdP.create(ISSUER)
    results: dict[str, float | int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        policies = Path(tmp) / "policies"
        shutil.copytree(EXAMPLE_POLICIES, policies)
        (policies / JWKS_FILE).write_text(idp.jwks())
        authorizer = Authorizer(PolicySet.load(policies))
        token = idp.token("alice", audience="shop", ttl=3600)
        raw = _request("frontend", "orders", "GET", "/orders/42?expand=items", token)
        inp = from_check_request(external_auth_pb2.CheckRequest.FromString(raw))
        decision = authorizer.check(inp)
        if not decision.allowed or not decision.issuer:
            raise SystemExit(f"expected an allow with a verified token, got {decision.reason}")
        deny = Decision(Outcome.PERMISSION_DENIED, "no_allow_policy_matched", "m", "d" * 32)

        results["record allow (queued)"] = _record_us(decision, inp, 1.0, n, rounds)
        results["record allow, rate 0.1 (mostly sampled out)"] = _record_us(
            decision, inp, 0.1, n, rounds
        )
        results["record deny (queued)"] = _record_us(deny, inp, 1.0, n, rounds)

        masker = Masker(["email"])
        entry = Entry(decision, inp, time.time_ns(), time.time_ns(), None, "", 1.0)
        message = to_record(entry, masker, authorizer.workload)
        results["writer: to_dict + to_json"] = best_us(
            lambda: to_json(to_dict(entry, masker, authorizer.workload), masker), n, rounds
        )
        results["not taken: json_format.MessageToDict + json.dumps (message built)"] = best_us(
            lambda: json.dumps(
                json_format.MessageToDict(message, preserving_proto_field_name=True),
                separators=(",", ":"),
            ),
            n,
            rounds,
        )

        results["check, no decision log"] = _check_us(authorizer, raw, None, n, rounds)
        results["check + record (writer not running)"] = min(
            _check_us(authorizer, raw, DecisionLog(NullSink(), queue_size=room_for(n)), n, 1)
            for _ in range(rounds)
        )
        # The writer's CPU is taken from the same GIL: time the Checks until the last record
        # is written, with room for all (nothing dropped), per Check.
        total = n * rounds
        settings = DecisionLogSettings(
            str(Path(tmp) / "d.log"), mask=frozenset({"email"}), queue_size=room_for(total)
        )
        writing = DecisionLog.open(settings, workload=authorizer.workload)
        writing.start()
        start = time.perf_counter()
        _check_us(authorizer, raw, writing, n, rounds)
        writing.close(timeout=120)
        if writing.counts()["written", "allow"] != total:
            raise SystemExit(f"records lost: {writing.counts()}")
        results["check + record + its writing, until written (per Check)"] = (
            (time.perf_counter() - start) / total * 1e6
        )

        # Room for all: this times the writer, not the queue.
        settings = DecisionLogSettings(
            str(Path(tmp) / "t.log"), mask=frozenset({"email"}), queue_size=room_for(total)
        )
        log = DecisionLog.open(settings, workload=authorizer.workload)
        log.start()
        start = time.perf_counter()
        for _ in range(total):
            log.record(decision, inp, time.time_ns())
        log.close(timeout=120)
        if log.counts()["written", "allow"] != total:
            raise SystemExit(f"records lost: {log.counts()}")
        results["throughput, records/s to a file"] = round(total / (time.perf_counter() - start))

        slow = SlowSink(0.001)
        log = DecisionLog(slow, queue_size=1024, workload=authorizer.workload)
        log.start()
        for i in range(11_000):
            log.record(deny if i % 11 == 10 else decision, inp, time.time_ns())
        log.close(timeout=120)
        counts = log.counts()
        for key in (("written", "allow"), ("dropped", "allow"), ("written", "deny")):
            results[f"slow sink: {key[1]}s {key[0]} (of 10000 allows, 1000 denies)"] = counts[key]
        results["slow sink: denies dropped"] = counts["dropped", "deny"]

    print(f"{'measure':<70} {'value':>10}")
    for name, value in results.items():
        unit = "" if isinstance(value, int) else " µs"
        shown = f"{value:,}" if isinstance(value, int) else f"{value:.2f}"
        print(f"{name:<70} {shown:>10}{unit}")
    machine = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"(best of {rounds} rounds x {n} calls; {machine}, {platform.machine()})")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
