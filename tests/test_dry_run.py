"""Dry-run policies: evaluated, never enforced, recorded as a span attribute (test_server),
a counter and, when enforcing them would change the answer, a log line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from otel_helpers import points

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.policy.engine import PolicySet
from extauthz.request import CheckInput
from extauthz.telemetry import Telemetry

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: ns1}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: block-delete
  namespace: ns1
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"""


def test_dry_run_is_counted_and_a_changed_answer_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "p.yaml").write_text(POLICIES)
    authorizer = Authorizer(PolicySet.load(tmp_path), Settings(workload_namespace="ns1"))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(None, meter_provider=MeterProvider(metric_readers=[reader]))
    caplog.set_level(logging.INFO, logger="extauthz.telemetry")
    for method in ("GET", "GET", "DELETE"):
        inp = CheckInput(method=method, path="/x")
        decision = authorizer.check(inp)
        assert decision.allowed  # never enforced
        telemetry.record(decision, inp, 0)
    got = points(reader, "extauthz.dry_run.decisions")
    assert got == {
        frozenset(
            {
                ("decision", "allow"),
                ("dry_run_decision", "allow"),
                ("dry_run_policy", "ns1/allow-all"),
                ("changed", False),
            }
        ): 2,
        frozenset(
            {
                ("decision", "allow"),
                ("dry_run_decision", "deny"),
                ("dry_run_policy", "ns1/block-delete"),
                ("changed", True),
            }
        ): 1,
    }
    (line,) = [r.getMessage() for r in caplog.records if "dry-run" in r.getMessage()]
    assert "would be deny (by ns1/block-delete)" in line


def test_changed_verdicts_are_logged_at_most_once_a_second(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "p.yaml").write_text(POLICIES)
    authorizer = Authorizer(PolicySet.load(tmp_path), Settings(workload_namespace="ns1"))
    telemetry = Telemetry(None)
    caplog.set_level(logging.INFO, logger="extauthz.telemetry")
    inp = CheckInput(method="DELETE", path="/x")
    for _ in range(50):  # a rollout that changes many answers must not flood the log
        telemetry.record(authorizer.check(inp), inp, 0)
    lines = [r.getMessage() for r in caplog.records if "dry-run" in r.getMessage()]
    assert len(lines) == 1


def test_no_dry_run_policy_records_nothing(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(POLICIES.split("---")[0])
    authorizer = Authorizer(PolicySet.load(tmp_path), Settings(workload_namespace="ns1"))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(None, meter_provider=MeterProvider(metric_readers=[reader]))
    inp = CheckInput(method="GET", path="/x")
    telemetry.record(authorizer.check(inp), inp, 0)
    assert points(reader, "extauthz.dry_run.decisions") == {}
