"""``targetRefs``: a policy bound to a Service/ServiceEntry or Gateway applies to the workload
a route names with ``context_extensions`` ``service`` / ``gateway``."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.authorizer import Authorizer
from extauthz.policy.engine import PolicySet
from extauthz.policy.source import load_text
from extauthz.probe import parse_probe

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-svc, namespace: shop}
spec:
  targetRefs:
    - {kind: Service, group: "", name: orders}
    - {kind: ServiceEntry, group: networking.istio.io, name: legacy-orders}
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: edge, namespace: shop}
spec:
  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: edge}
  action: DENY
  rules: [{to: [{operation: {paths: [/internal*]}}]}]
"""


@pytest.fixture
def authorizer(tmp_path: Path) -> Authorizer:
    (tmp_path / "p.yaml").write_text(POLICIES)
    return Authorizer(PolicySet.load(tmp_path))


@pytest.mark.parametrize(
    ("request_yaml", "allowed", "reason"),
    [
        ("service: orders\nmethod: GET\n", True, "allowed_by_policy"),
        ("service: orders\nmethod: POST\n", False, "no_allow_policy_matched"),
        ("service: legacy-orders\nmethod: POST\n", False, "no_allow_policy_matched"),
        # another service in the namespace: the Service policy does not apply
        ("service: payments\nmethod: POST\n", True, "no_allow_policy"),
        ("gateway: edge\npath: /internal/x\n", False, "denied_by_policy"),
        ("gateway: edge\npath: /public\n", True, "no_allow_policy"),
        ("gateway: other\npath: /internal/x\n", True, "no_allow_policy"),
        # labels do not stand in for a target: fail closed rather than skip a policy
        ("labels: app=orders\nmethod: POST\n", False, "workload_unknown"),
        ("method: POST\n", False, "workload_unknown"),
    ],
)
def test_target_refs_select_by_service_and_gateway(
    authorizer: Authorizer, request_yaml: str, allowed: bool, reason: str
) -> None:
    (doc,) = load_text("namespace: shop\n" + request_yaml, "req.yaml")
    decision = authorizer.check(parse_probe(doc.body).input)
    assert (decision.allowed, decision.reason) == (allowed, reason)


def test_target_refs_in_another_namespace_do_not_apply(authorizer: Authorizer) -> None:
    (doc,) = load_text("namespace: web\nservice: orders\nmethod: POST\n", "req.yaml")
    assert authorizer.check(parse_probe(doc.body).input).reason == "no_allow_policy"
