"""Golden files: CheckRequest → CheckResponse for the shipped example policies.

Each ``tests/golden/*.yaml`` holds a request (CheckRequest as proto JSON) and the exact
response. ``{{token}}`` in a request string is replaced by a token signed at test time with
``tests/fixtures/idp-key.pem`` from the case's ``token`` claims, ``{{certificate}}`` by the
URL-encoded fixture SVID. Decision ids are random and compared as ``<decision-id>``.
Regenerate after an intended change with ``UPDATE_GOLDEN=1 pytest tests/test_golden.py``
and review the diff.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format

from extauthz.authorizer import Authorizer
from extauthz.decision import Outcome
from extauthz.policy.engine import PolicySet
from extauthz.response import OUTCOMES
from extauthz.server import AuthorizationServicer
from extauthz.telemetry import Telemetry

ROOT = Path(__file__).parent
GOLDEN = ROOT / "golden"
FIXTURES = ROOT / "fixtures"
CASES = sorted(GOLDEN.glob("*.yaml"))
DECISION_ID = re.compile(r"\b[0-9a-f]{32}\b")


@pytest.fixture(scope="module")
def authorizer(tmp_path_factory: pytest.TempPathFactory) -> Authorizer:
    key = serialization.load_pem_private_key((FIXTURES / "idp-key.pem").read_bytes(), None)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))  # type: ignore[arg-type]
    jwk.update(kid="golden", alg="ES256")
    policies = tmp_path_factory.mktemp("policies")
    shutil.copytree(ROOT.parent / "policies", policies, dirs_exist_ok=True)
    (policies / "demo-idp.jwks.json").write_text(json.dumps({"keys": [jwk]}))
    return Authorizer(PolicySet.load(policies))


def _token(claims: dict[str, Any]) -> str:
    key = serialization.load_pem_private_key((FIXTURES / "idp-key.pem").read_bytes(), None)
    now = int(time.time())
    payload = {"iss": "https://idp.demo.local", "aud": "shop", "iat": now, **claims}
    payload["exp"] = now + int(payload.pop("ttl", 600))
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "golden"})  # type: ignore[arg-type]


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        for name, value in values.items():
            node = node.replace("{{" + name + "}}", value)
        return node
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    return node


class _Context:
    """What the servicer asks of a gRPC context: metadata and the deadline (none here)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None


def _decide(authorizer: Authorizer, request: Any) -> Any:
    """Through the real servicer (conversion, delegation, response), minus the network."""
    servicer = AuthorizationServicer(authorizer, Telemetry(None))
    answer = asyncio.run(servicer.Check(request, _Context()))
    return external_auth_pb2.CheckResponse.FromString(answer)


def _normalise(response: Any) -> Any:
    text = json.dumps(json_format.MessageToDict(response), sort_keys=True)
    return json.loads(DECISION_ID.sub("<decision-id>", text))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden(case: Path, authorizer: Authorizer) -> None:
    spec = yaml.safe_load(case.read_text())
    values = {"certificate": quote((FIXTURES / "frontend-svid.pem").read_text(), safe="")}
    if "token" in spec:
        values["token"] = _token(spec["token"])
        values["token_b64"] = base64.b64encode(f"Bearer {values['token']}".encode()).decode()
    request = json_format.ParseDict(
        _substitute(spec["request"], values), external_auth_pb2.CheckRequest()
    )
    response = _decide(authorizer, request)
    actual = _normalise(response)
    if os.environ.get("UPDATE_GOLDEN"):
        spec["response"] = actual
        case.write_text(yaml.safe_dump(spec, sort_keys=False, width=100))
    assert actual == spec["response"]
    expected_code = OUTCOMES[Outcome[spec["outcome"]]].grpc_code
    assert response.status.code == expected_code


def test_every_outcome_has_a_golden_case() -> None:
    outcomes = {yaml.safe_load(c.read_text())["outcome"] for c in CASES}
    assert outcomes >= {"ALLOW", "UNAUTHENTICATED", "PERMISSION_DENIED"}
