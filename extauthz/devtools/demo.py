"""``extauthz demo``: the shop mesh on 127.0.0.1, a scripted scenario, then your own requests.

Development only. extauthz and three Envoy sidecars export their traces to a local OTLP sink
(written to ``spans.jsonl``), extauthz writes a decision log, and the scenario shows allowed
calls, denials, a dry-run policy's verdict and a policy hot reload. ``--once`` plays it and
exits non-zero if any step misbehaves or a decision is missing from the log or the traces.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ConfigError
from . import devcli
from .collector import Collector
from .mesh import ISSUER, NAMESPACE, Mesh, Response

WORKLOADS = ("frontend", "orders", "payments")
DECISION_ID = "x-extauthz-decision-id"
RELOAD_BOUND = 15.0  # seconds a hot reload may take to show (it polls every second)
EVIDENCE_BOUND = 10.0  # seconds for the last decision records and spans to arrive

# Evaluated and recorded, never enforced: what would happen if orders stopped taking new ones.
DRY_RUN_POLICY = """\
# Dry run (istio.io/dry-run): extauthz evaluates this DENY and records its verdict in the
# decision log ("dry_run"), on the decision span and in a metric, but does not enforce it.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: freeze-orders
  namespace: shop
  annotations:
    istio.io/dry-run: "true"
spec:
  selector:
    matchLabels:
      app: orders
  action: DENY
  rules:
    - to:
        - operation:
            methods: [POST]
            paths: [/orders]
"""

# Written into the live policy directory by the hot-reload step, then removed again.
HOT_RELOAD_FILE = "shop/suspend-alice.yaml"
HOT_RELOAD_POLICY = f"""\
# Written by the demo's hot-reload step: alice's requests to orders are refused.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: suspend-alice
  namespace: shop
spec:
  selector:
    matchLabels:
      app: orders
  action: DENY
  rules:
    - from:
        - source:
            requestPrincipals: ["{ISSUER}/alice"]
"""


@dataclass(frozen=True)
class Step:
    story: str
    caller: str
    target: str
    method: str
    path: str
    token: Callable[[Mesh], str | None]
    status: int
    reason: str = ""
    dry_run: str = ""  # the verdict the decision log must show with dry-run policies enforced


@dataclass(frozen=True)
class Reload:
    """Change the live policy directory, then poll ``probe`` until it answers as expected."""

    story: str
    change: Callable[[Path], None]
    probe: Step


def _user(mesh: Mesh, **claims: object) -> str:
    return devcli.sign(mesh.idp, subject="alice", claims=claims)


def _expired(mesh: Mesh) -> str:
    return devcli.sign(mesh.idp, subject="alice", ttl=-3600)


def _forged(mesh: Mesh) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    claims = {"iss": ISSUER, "sub": "mallory", "aud": devcli.DEFAULT_AUDIENCE}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": mesh.idp.kid})


def _no_token(mesh: Mesh) -> None:
    return None


def _suspend_alice(policies: Path) -> None:
    path = policies / HOT_RELOAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a poll must not read half a file (hidden files are not loaded).
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(HOT_RELOAD_POLICY)
    partial.replace(path)


def _restore(policies: Path) -> None:
    (policies / HOT_RELOAD_FILE).unlink(missing_ok=True)


ALICE_READS = Step(
    "frontend reads orders for alice", "frontend", "orders", "GET", "/orders/42", _user, 200
)

SCENARIO: tuple[Step | Reload, ...] = (
    ALICE_READS,
    Step("orders charges a card", "orders", "payments", "POST", "/payments/charge", _no_token, 200),
    Step(
        "frontend calls payments directly (lateral move)",
        "frontend",
        "payments",
        "POST",
        "/payments/charge",
        _user,
        403,
        "no_allow_policy_matched",
    ),
    Step(
        "an unknown workload calls orders",
        "intruder",
        "orders",
        "GET",
        "/orders",
        _user,
        403,
        "no_allow_policy_matched",
    ),
    Step(
        "frontend calls orders with no user token",
        "frontend",
        "orders",
        "GET",
        "/orders",
        _no_token,
        403,
        "no_allow_policy_matched",
    ),
    Step(
        "frontend calls orders with an expired token",
        "frontend",
        "orders",
        "GET",
        "/orders",
        _expired,
        401,
        "jwt_expired",
    ),
    Step(
        "frontend calls orders with a forged token",
        "frontend",
        "orders",
        "GET",
        "/orders",
        _forged,
        401,
        "jwt_signature_invalid",
    ),
    Step(
        "a user opens /admin (DENY policy)",
        "orders",
        "frontend",
        "GET",
        "/admin",
        lambda m: _user(m, roles=["user"]),
        403,
        "denied_by_policy",
    ),
    Step(
        "an admin opens /admin",
        "orders",
        "frontend",
        "GET",
        "/admin",
        lambda m: _user(m, roles=["admin"]),
        200,
    ),
    Step(
        "alice places an order; dry-run freeze-orders",
        "frontend",
        "orders",
        "POST",
        "/orders",
        _user,
        200,
        dry_run="deny",
    ),
    Reload(
        f"hot reload: + {HOT_RELOAD_FILE}",
        _suspend_alice,
        replace(ALICE_READS, status=403, reason="denied_by_policy"),
    ),
    Reload("hot reload: original policies back", _restore, ALICE_READS),
)


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    decision_id: str

    @classmethod
    def of(cls, resp: Response) -> Answer:
        if resp.status == 200:
            # The echo upstream shows the headers extauthz added on allow.
            try:
                headers = resp.json().get("headers", {})
            except ValueError:
                headers = {}
            return cls(200, "", str(headers.get(DECISION_ID, "")))
        try:
            reason = str(resp.json().get("reason", ""))
        except (ValueError, AttributeError):  # not extauthz's JSON (e.g. Envoy's own 503)
            reason = ""
        return cls(resp.status, reason, resp.headers.get(DECISION_ID, ""))

    def matches(self, step: Step) -> bool:
        return self.status == step.status and (not step.reason or self.reason == step.reason)

    def verdict(self) -> str:
        return "allowed" if self.status == 200 else f"denied {self.status} {self.reason}"


class DecisionLogReader:
    """Reads extauthz's ``--decision-log`` file back by decision id (written off the request
    path, so a record may land a moment after the answer)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> dict[str, dict[str, Any]]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            out[str(record.get("decision_id", ""))] = record
        return out

    def wait(self, ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.records()
            if all(i in found for i in ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    if kind == "bytes_value":
        return any_value.bytes_value.hex()
    return None if kind is None else getattr(any_value, kind)


def span_record(service: str, span: Any) -> dict[str, Any]:
    """One span as a flat JSON object: ids in hex, attributes as a plain dict."""
    return {
        "service": service,
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "start_unix_nano": span.start_time_unix_nano,
        "end_unix_nano": span.end_time_unix_nano,
        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
    }


@dataclass
class SpanFile:
    """Appends every span the collector receives to a JSON-lines file, as they arrive."""

    collector: Collector
    path: Path
    written: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.write_text("")
        self._thread = threading.Thread(target=self._run, name="demo-spans", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.collector.wait_for(self._more, timeout=0.5)
            except TimeoutError:
                continue
            self.flush()

    def _more(self, collector: Collector) -> bool | None:
        return True if len(collector.spans()) > len(self.written) or self._stop.is_set() else None

    def flush(self) -> None:
        with self._lock:
            new = self.collector.spans()[len(self.written) :]
            records = [span_record(r.service, r.item) for r in new]
            if records:
                with self.path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                self.written.extend(records)

    def decision_spans(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                str(r["attributes"]["extauthz.decision_id"]): r
                for r in self.written
                if "extauthz.decision_id" in r["attributes"]
            }

    def wait(self, ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            found = self.decision_spans()
            if all(i in found for i in ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()


@dataclass
class Player:
    """Plays the scenario against a running mesh and keeps every decision id it saw."""

    mesh: Mesh
    log: DecisionLogReader
    out: Callable[[str], None] = print
    evidence_timeout: float = EVIDENCE_BOUND
    reload_timeout: float = RELOAD_BOUND
    decisions: list[tuple[int, Answer]] = field(default_factory=list)
    failures: int = 0

    def call(self, n: int, step: Step) -> Answer:
        resp = self.mesh.call(
            step.caller, step.target, step.method, step.path, token=step.token(self.mesh)
        )
        answer = Answer.of(resp)
        self.decisions.append((n, answer))
        return answer

    def line(self, n: int, story: str, step: Step, ok: bool, verdict: str) -> None:
        self.failures += not ok
        mark = "ok " if ok else "BAD"
        route = f"{step.caller:>8} -> {step.target:<8}"
        self.out(f" {mark} {n:>2}. {story:<48} {route} {verdict}")

    def play_step(self, n: int, step: Step) -> None:
        answer = self.call(n, step)
        ok = answer.matches(step)
        verdict = answer.verdict()
        if step.dry_run:
            found = self.log.wait([answer.decision_id], self.evidence_timeout)
            record = found.get(answer.decision_id)
            would, policy = _dry_run(record)
            ok = ok and would == step.dry_run
            verdict += f"; dry-run: would be {would or '?'} by {policy or '?'}"
        self.line(n, step.story, step, ok, verdict)
        if not answer.matches(step):
            self.out(f"       expected {step.status} {step.reason}, got {answer.verdict()}")

    def play_reload(self, n: int, reload: Reload) -> None:
        reload.change(self.mesh.policy_dir)
        started = time.monotonic()
        while True:
            answer = self.call(n, reload.probe)
            waited = time.monotonic() - started
            if answer.matches(reload.probe) or waited > self.reload_timeout:
                break
            time.sleep(0.2)
        ok = answer.matches(reload.probe)
        verdict = f"{answer.verdict()} (after {waited:.1f} s)"
        self.line(n, reload.story, reload.probe, ok, verdict)
        if not ok:
            self.out(
                f"       no reload within {self.reload_timeout:g} s; see {self.mesh.extauthz_log}"
            )

    def play(self) -> int:
        for n, item in enumerate(SCENARIO, 1):
            if isinstance(item, Reload):
                self.play_reload(n, item)
            else:
                self.play_step(n, item)
        return self.failures


def _dry_run(record: Mapping[str, Any] | None) -> tuple[str, str]:
    dry = (record or {}).get("dry_run") or {}
    outcome = str(dry.get("outcome", ""))
    would = "allow" if outcome == "OUTCOME_ALLOW" else "deny" if outcome else ""
    return would, str(dry.get("policy", ""))


def evidence(
    player: Player,
    log: DecisionLogReader,
    spans: SpanFile,
    shown: Path,
    *,
    timeout: float = EVIDENCE_BOUND,
) -> int:
    """Print where each decision went; return how many Checks are missing from either."""
    ids = [a.decision_id for _, a in player.decisions]
    records = log.wait(ids, timeout)
    traced = spans.wait(ids, timeout)
    logged = sum(i in records for i in ids)
    spanned = sum(i in traced for i in ids)
    others = sum(r["service"] != "extauthz" for r in spans.written)
    player.out(
        f"\nWhere the {len(ids)} Checks went (reload polls included):\n"
        f"  decision log  {shown / 'decisions.jsonl'}: {logged}/{len(ids)} recorded\n"
        f"  OTLP sink     {shown / 'spans.jsonl'}: {spanned}/{len(ids)} decision spans, "
        f"and {others} Envoy spans so far"
    )
    last: dict[int, Answer] = dict(player.decisions)  # a reload step: its last poll
    for n, answer in sorted(last.items()):
        span = traced.get(answer.decision_id)
        trace = span["trace_id"] if span else "MISSING"
        player.out(f"  {n:>2}. decision {answer.decision_id or 'MISSING':<32}  trace {trace}")
    missing = [i or "(no decision id)" for i in ids if i not in records or i not in traced]
    if missing:
        player.out(f"  BAD: no record or span for {', '.join(missing)}")
    return len(missing)


def instructions(mesh: Mesh, shown: Path) -> str:
    certs = shown / "certs"
    orders = mesh.services["orders"].port
    return f"""
Where to look:
  decision log   {shown / "decisions.jsonl"}   (one JSON line per decision; docs/decisions.md)
  traces         {shown / "spans.jsonl"}       (extauthz's decision spans and Envoy's)
  policies       {shown / "policies"}/         (edit live: extauthz reloads within a second)
  extauthz       127.0.0.1:{mesh.extauthz_port}, its log {shown / "extauthz.log"}
  sidecars       {", ".join(f"{n} https://localhost:{w.port}" for n, w in mesh.services.items())}

Send your own requests (alice's token in {shown / "alice.jwt"} is valid for an hour):
  curl -si --cacert {certs}/ca.pem --cert {certs}/frontend.pem --key {certs}/frontend-key.pem \\
       -H "authorization: Bearer $(cat {shown / "alice.jwt"})" https://localhost:{orders}/orders/42
  A token with other claims (development only):
  {_cli()} token --key {shown / "idp" / "key.pem"} --subject bob --claim 'roles=["admin"]'
  More in README.md ("The demo").
Press Ctrl-C to stop everything."""


def _cli() -> str:
    """How this user runs extauthz: by name when it is on PATH (an activated venv)."""
    return "extauthz" if shutil.which("extauthz") else f"{sys.executable} -m extauthz"


def _check_ports(ports: Mapping[str, int]) -> None:
    for name, port in ports.items():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise ConfigError(
                    f"port {port} ({name}) is in use on 127.0.0.1: is another demo running? "
                    f"Choose other ports with --base-port"
                ) from None


@contextmanager
def _sink(path: Path) -> Iterator[SpanFile]:
    with Collector() as collector:
        spans = SpanFile(collector, path)
        spans.start()
        try:
            yield spans
        finally:
            spans.stop()


def main(*, once: bool, workdir: Path, base_port: int = devcli.DEMO_BASE_PORT) -> int:
    # SIGTERM unwinds like Ctrl-C, so the with-blocks stop every process started here.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ports = {name: base_port + i for i, name in enumerate(WORKLOADS, 1)}
    _check_ports({"extauthz": base_port, **{f"{n} sidecar": p for n, p in ports.items()}})
    root = workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "decisions.jsonl").unlink(missing_ok=True)
    # The code path of `extauthz token --new-key`: a fresh throwaway key every run.
    key = root / "idp" / "key.pem"
    devcli.create_signing_key(key, overwrite=True)
    idp = devcli.load_idp(key, ISSUER)
    print("Starting an OTLP sink, extauthz and three Envoy sidecars (frontend, orders, payments)")
    try:
        with _sink(root / "spans.jsonl") as spans:
            mesh = Mesh(
                root,
                workloads=WORKLOADS,
                idp=idp,
                ports=ports,
                extauthz_port=base_port,
                collector_port=spans.collector.port,
                extra_policies={"shop/freeze-orders.yaml": DRY_RUN_POLICY},
                extauthz_args=[
                    "--decision-log",
                    str(root / "decisions.jsonl"),
                    "--reload-interval",
                    "1",
                ],
                # Spans reach the sink within a fraction of a second, not the SDK's 5 s.
                env={"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "extauthz"},
            )
            with mesh:
                return _run(mesh, spans, once=once, shown=workdir)
    except KeyboardInterrupt:
        print("\nStopped.")
        return 130


def _run(mesh: Mesh, spans: SpanFile, *, once: bool, shown: Path) -> int:
    log = DecisionLogReader(mesh.workdir / "decisions.jsonl")
    print(
        f"\nScenario (SPIFFE identity from mTLS, JWT from the demo IdP, Istio policies in "
        f"{shown / 'policies'}, namespace {NAMESPACE}):"
    )
    player = Player(mesh, log)
    failures = player.play()
    print(f"\n{len(SCENARIO) - failures}/{len(SCENARIO)} steps answered as expected.")
    missing = evidence(player, log, spans, shown)
    bad = failures + missing
    if once:
        return 1 if bad else 0
    (mesh.workdir / "alice.jwt").write_text(devcli.sign(mesh.idp, subject="alice") + "\n")
    stop = threading.Event()
    # Before "Press Ctrl-C" is printed: from then on Ctrl-C is the normal way out (exit 0).
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(instructions(mesh, shown), flush=True)
    stop.wait()
    print("\nStopping...")
    return 1 if bad else 0
