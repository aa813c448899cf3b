"""Loading policy directories: every broken input is named by file:line, nothing half-loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from extauthz.errors import PolicySetError
from extauthz.policy.engine import PolicySet
from extauthz.policy.model import Action

SHIPPED = Path(__file__).resolve().parents[1] / "policies"

_KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [json.loads(ECAlgorithm.to_jwk(_KEY.public_key())) | {"kid": "k"}]})

HEAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: p
  namespace: ns1
"""  # lines 1-5; spec starts on line 6

RA_HEAD = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: ns1
spec:
  jwtRules:
  - issuer: https://idp.test
"""  # lines 1-8; the jwtRule continues on line 9


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_error(directory: Path) -> PolicySetError:
    with pytest.raises(PolicySetError) as info:
        PolicySet.load(directory)
    assert info.value.reason == "policy_invalid"
    return info.value


# (id, file text, line, fragment)
BROKEN: list[tuple[str, str, int, str]] = [
    (
        "yaml-syntax-error",
        HEAD + "spec:\n  rules: [{}\n  action: DENY\n",
        8,
        "YAML syntax error",
    ),
    (
        "yaml-mapping-values-not-allowed",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p: q\n",
        4,
        "YAML syntax error: mapping values are not allowed",
    ),
    (
        "request-principal-star-star",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: ['*/*']\n",
        10,
        "a request principal takes one '*', at its start or end",
    ),
    (
        "request-principal-inner-star",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [i/*e]\n",
        10,
        "a request principal takes one '*'",
    ),
    (
        "unknown-source-field-did-you-mean",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        notPrincipal: [a]\n",
        10,
        "rules[0].from[0].source: unknown field 'notPrincipal' (did you mean 'notPrincipals'?)",
    ),
    (
        "unknown-operation-field-did-you-mean",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n",
        10,
        "rules[0].to[0].operation: unknown field 'method' (did you mean 'methods'?)",
    ),
    (
        "unknown-spec-field-did-you-mean",
        HEAD + "spec:\n  rule: []\n",
        7,
        "spec: unknown field 'rule' (did you mean 'rules'?)",
    ),
    (
        "unknown-field-no-suggestion",
        HEAD + "spec:\n  zzzzzz: 1\n",
        7,
        "spec: unknown field 'zzzzzz'",
    ),
    (
        "unknown-top-level-field",
        HEAD + "sepc: {}\n",
        6,
        "unknown field 'sepc' (did you mean 'spec'?)",
    ),
    (
        "principals-not-a-list",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        principals: a\n",
        10,
        "rules[0].from[0].source.principals: must be a list of strings",
    ),
    (
        "principals-list-of-numbers",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [8080]\n",
        10,
        "rules[0].to[0].operation.ports: must be a list of strings",
    ),
    (
        "empty-list",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        principals: []\n",
        10,
        "principals: must not be empty (omit the field instead)",
    ),
    (
        "empty-source",
        HEAD + "spec:\n  rules:\n  - from:\n    - source: {}\n",
        9,
        "rules[0].from[0].source: an empty source matches nothing useful",
    ),
    (
        "bad-cidr",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n",
        10,
        "'10.0.0.0/33' is not an IP address or CIDR block",
    ),
    (
        "bad-ip",
        HEAD + "spec:\n  rules:\n  - when:\n    - key: source.ip\n      values: [nope]\n",
        9,
        "'nope' is not an IP address or CIDR block",
    ),
    (
        "star-in-the-middle",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        principals: [a*b]\n",
        10,
        "'a*b': '*' is only allowed alone, as a prefix",
    ),
    (
        "star-at-both-ends",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['*a*']\n",
        10,
        "'*a*': '*' is only allowed alone",
    ),
    (
        "path-template-after-double-star",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['/a/{**}/b']\n",
        10,
        "'/a/{**}/b': nothing may follow '{**}'",
    ),
    (
        "path-template-partial-segment",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['/a{*}']\n",
        10,
        "must each be a whole path segment",
    ),
    (
        "path-template-with-bare-star",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        notPaths: ['/a/{*}/b*']\n",
        10,
        "a template cannot also use '*'",
    ),
    (
        "path-template-relative",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['a/{*}']\n",
        10,
        "a path template must start with '/'",
    ),
    (
        "bad-port",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        ports: ['http']\n",
        10,
        "'http' is not a port number",
    ),
    (
        "port-out-of-range",
        HEAD + "spec:\n  rules:\n  - to:\n    - operation:\n        ports: ['65536']\n",
        10,
        "'65536' is not a port number",
    ),
    (
        "service-account-wildcard",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: ['ns/*']\n",
        10,
        "write a service account as '<name>' or '<namespace>/<name>'",
    ),
    (
        "service-account-two-slashes",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [a/b/c]\n",
        10,
        "'a/b/c': write a service account as",
    ),
    (
        "unknown-when-key",
        HEAD + "spec:\n  rules:\n  - when:\n    - key: request.foo\n      values: [x]\n",
        9,
        "rules[0].when[0]: unknown condition key 'request.foo'",
    ),
    (
        "when-experimental-key",
        HEAD
        + "spec:\n  rules:\n  - when:\n    - key: experimental.envoy.filters.x[y]\n"
        + "      values: [x]\n",
        9,
        "experimental Envoy filter-state keys are not supported",
    ),
    (
        "when-claims-bad-syntax",
        HEAD
        + "spec:\n  rules:\n  - when:\n    - key: request.auth.claims.groups\n      values: [x]\n",
        9,
        "write claims as request.auth.claims[name]",
    ),
    (
        "when-without-values",
        HEAD + "spec:\n  rules:\n  - when:\n    - key: source.ip\n",
        9,
        "rules[0].when[0]: needs values or notValues",
    ),
    (
        "when-values-typo",
        HEAD + "spec:\n  rules:\n  - when:\n    - key: source.ip\n      value: [1.2.3.4]\n",
        10,
        "unknown field 'value' (did you mean 'values'?)",
    ),
    (
        "custom-action",
        HEAD + "spec:\n  action: CUSTOM\n  provider: {name: x}\n",
        7,
        "spec.action: CUSTOM delegates to an external authorizer",
    ),
    (
        "bad-action",
        HEAD + "spec:\n  action: REJECT\n",
        7,
        "spec.action: 'REJECT' is not one of ALLOW, DENY, AUDIT",
    ),
    (
        "target-refs-gateway-without-group",
        HEAD + "spec:\n  targetRefs: [{kind: Gateway, name: gw}]\n",
        7,
        "spec.targetRefs[0].kind: Gateway is not a target extauthz can identify",
    ),
    (
        "target-refs-gateway-class",
        HEAD
        + "spec:\n  targetRefs:\n  - {group: gateway.networking.k8s.io, kind: GatewayClass,"
        + " name: gw}\n",
        8,
        "GatewayClass is not a target",
    ),
    (
        "target-refs-and-selector",
        HEAD
        + "spec:\n  selector: {matchLabels: {a: b}}\n  targetRefs: [{kind: Service, name: s}]\n",
        7,
        "spec.selector: set selector or targetRefs, not both",
    ),
    (
        "target-refs-other-namespace",
        HEAD + "spec:\n  targetRefs: [{kind: Service, name: s, namespace: other}]\n",
        7,
        "spec.targetRefs[0].namespace: must be the policy's own namespace",
    ),
    (
        "target-refs-empty",
        HEAD + "spec:\n  targetRefs: []\n",
        7,
        "spec.targetRefs: must be a non-empty list",
    ),
    (
        "missing-metadata-name",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n"
        + "  namespace: ns1\nspec: {}\n",
        3,
        "metadata.name: is required",
    ),
    (
        "missing-metadata",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nspec: {}\n",
        1,
        "metadata.name: is required",
    ),
    (
        "missing-kind",
        "apiVersion: security.istio.io/v1\nmetadata: {name: p}\n",
        1,
        "apiVersion and kind are required strings",
    ),
    (
        "unsupported-api-version",
        "apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        1,
        "apiVersion: unsupported version 'security.istio.io/v2'",
    ),
    (
        "duplicate-yaml-key",
        HEAD + "spec:\n  action: DENY\n  rules: [{}]\n  action: ALLOW\n",
        9,
        "duplicate key 'action'",
    ),
    (
        "non-string-key",
        HEAD + "spec:\n  1: x\n",
        7,
        "mapping keys must be strings",
    ),
    (
        "jwks-and-jwks-uri",
        RA_HEAD + "    jwks: '{}'\n    jwksUri: keys.json\n",
        9,
        "spec.jwtRules[0]: set jwks or jwksUri, not both",
    ),
    (
        "jwks-uri-unreadable",
        RA_HEAD + "    jwksUri: missing.json\n",
        9,
        "spec.jwtRules[0].jwksUri: cannot read",
    ),
    (
        "jwks-uri-without-host",
        RA_HEAD + "    jwksUri: https:///keys\n",
        9,
        "spec.jwtRules[0].jwksUri: has no host",
    ),
    (
        "jwks-uri-ftp",
        RA_HEAD + "    jwksUri: ftp://idp.test/keys\n",
        9,
        "spec.jwtRules[0].jwksUri: unsupported scheme 'ftp'",
    ),
    (
        "jwt-rule-timeout-not-a-duration",
        RA_HEAD + "    jwksUri: https://idp.test/keys\n    timeout: 5\n",
        10,
        "spec.jwtRules[0].timeout: must be a positive duration",
    ),
    (
        "jwt-rule-timeout-too-long",
        RA_HEAD + "    jwksUri: https://idp.test/keys\n    timeout: 10m\n",
        10,
        "spec.jwtRules[0].timeout: must be at most 60s",
    ),
    (
        "jwt-rule-timeout-zero",
        RA_HEAD + "    jwksUri: https://idp.test/keys\n    timeout: 0s\n",
        10,
        "spec.jwtRules[0].timeout: must be a positive duration",
    ),
    (
        "jwks-bad-json",
        RA_HEAD + "    jwks: '{not json'\n",
        9,
        "spec.jwtRules[0]: JWKS is not JSON",
    ),
    (
        "jwks-no-usable-key",
        RA_HEAD + "    jwks: '{\"keys\": []}'\n",
        9,
        "JWKS holds no usable signing key",
    ),
    (
        "jwks-not-a-string",
        RA_HEAD + "    jwks: {keys: []}\n",
        9,
        "spec.jwtRules[0].jwks: must be a JSON string",
    ),
    (
        "jwt-rule-without-keys-and-not-discoverable",
        RA_HEAD.replace("https://idp.test", "idp-test") + "    audiences: [a]\n",
        8,
        "needs jwks or jwksUri, or an http(s) issuer to discover",
    ),
    (
        "jwt-rule-unknown-field",
        RA_HEAD + "    audience: [a]\n",
        9,
        "spec.jwtRules[0]: unknown field 'audience' (did you mean 'audiences'?)",
    ),
    (
        "jwt-rule-missing-issuer",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j}\n"
        + "spec:\n  jwtRules:\n  - jwksUri: x.json\n",
        6,
        "spec.jwtRules[0].issuer: is required",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [(t, ln, f) for _, t, ln, f in BROKEN],
    ids=[i for i, *_ in BROKEN],
)
def test_broken_policy(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    err = load_error(tmp_path)
    assert len(err.errors) == 1, err.message
    message = err.errors[0].message
    assert message.startswith(f"{path}:{line}: "), message
    assert fragment in message, message
    assert err.errors[0].file == str(path)
    assert err.errors[0].line == line


DRY_RUN_YES = (
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n"
    "  name: p\n  annotations: {istio.io/dry-run: 'yes'}\nspec:\n  rules: [{}]\n"
)
ALGORITHMS_BAD = (
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n"
    "  name: j\n  annotations: {extauthz.io/jwt-algorithms: 'none'}\nspec:\n"
    f"  jwtRules:\n  - issuer: https://idp.test\n    jwks: '{JWKS}'\n"
)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (DRY_RUN_YES, "metadata.annotations[istio.io/dry-run]: must be true/false"),
        (ALGORITHMS_BAD, "metadata.annotations[extauthz.io/jwt-algorithms]: unsupported"),
    ],
    ids=["dry-run-not-boolean", "jwt-algorithms-unknown"],
)
def test_bad_annotation_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    err = load_error(tmp_path)
    assert err.message.startswith(f"{path}:")
    assert fragment in err.message


@pytest.mark.parametrize("text", [DRY_RUN_YES, ALGORITHMS_BAD], ids=["dry-run", "jwt-algorithms"])
def test_bad_annotation_line_points_at_annotations(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    err = load_error(tmp_path)
    assert err.message.startswith(f"{path}:5: ")


def test_jwks_uri_other_scheme(tmp_path: Path) -> None:
    # The line is the jwtRule's first line (8), not jwksUri's (9): this error passes no key.
    path = write(tmp_path, "ra.yaml", RA_HEAD + "    jwksUri: ftp://idp.test/keys\n")
    err = load_error(tmp_path)
    assert err.message.startswith(f"{path}:")
    assert "spec.jwtRules[0].jwksUri: unsupported scheme 'ftp'" in err.message


def test_duplicate_jwt_issuer(tmp_path: Path) -> None:
    text = RA_HEAD + f"    jwks: '{JWKS}'\n  - issuer: https://idp.test\n    jwks: '{JWKS}'\n"
    path = write(tmp_path, "ra.yaml", text)
    err = load_error(tmp_path)
    assert err.errors[0].message.startswith(f"{path}:7: ")
    assert "issuer(s) ['https://idp.test'] listed twice" in err.message


def test_bare_service_account_needs_a_namespace(tmp_path: Path) -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
        "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [web]\n"
    )
    path = write(tmp_path, "p.yaml", text)
    err = load_error(tmp_path)
    assert err.message.startswith(f"{path}:8: ")
    assert "a policy without a namespace must write '<namespace>/<name>'" in err.message


def test_duplicate_resource_across_files(tmp_path: Path) -> None:
    doc = HEAD + "spec: {}\n"
    first = write(tmp_path, "a.yaml", doc)
    second = write(tmp_path, "b.yaml", "# comment\n" + doc)
    err = load_error(tmp_path)
    assert len(err.errors) == 1
    assert err.message == (
        f"{second}:2: AuthorizationPolicy ns1/p is defined again (first at {first}:1)"
    )


def test_same_name_different_kind_or_namespace_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEAD + "spec: {}\n")
    write(tmp_path, "b.yaml", HEAD.replace("ns1", "ns2") + "spec: {}\n")
    write(tmp_path, "c.yaml", RA_HEAD.replace("name: jwt", "name: p") + f"    jwks: '{JWKS}'\n")
    policies = PolicySet.load(tmp_path)
    assert sorted(p.key for p in policies.authz) == ["ns1/p", "ns2/p"]
    assert [r.key for r in policies.authn] == ["ns1/p"]


def test_errors_from_several_files_reported_together(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", HEAD + "spec:\n  action: REJECT\n")
    b = write(tmp_path, "sub/b.yaml", HEAD + "spec:\n  rules: [{}\n")
    c = write(
        tmp_path,
        "c.yaml",
        HEAD + "spec:\n  rules:\n  - from:\n    - source:\n        principals: a\n",
    )
    write(tmp_path, "good.yaml", HEAD.replace("name: p", "name: good") + "spec: {}\n")
    err = load_error(tmp_path)
    assert len(err.errors) == 3
    lines = err.message.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{a}:7: ")
    assert lines[1].startswith(f"{c}:10: ")
    assert lines[2].startswith(f"{b}:")
    assert "YAML syntax error" in lines[2]


def test_errors_from_several_documents_of_one_file(tmp_path: Path) -> None:
    text = (
        HEAD
        + "spec:\n  action: REJECT\n---\n"
        + HEAD.replace("name: p", "name: q")
        + "spec:\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n"
    )
    path = write(tmp_path, "multi.yaml", text)
    err = load_error(tmp_path)
    assert [e.line for e in err.errors] == [7, 18]
    assert all(e.file == str(path) for e in err.errors)


def test_non_security_kinds_ignored_with_warning(tmp_path: Path) -> None:
    text = (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 1}\n"
        "---\n"
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n"
        "  name: strict\n  namespace: ns1\nspec:\n  mtls: {mode: STRICT}\n"
        "---\n" + HEAD + "spec:\n  action: DENY\n  rules: [{}]\n"
    )
    path = write(tmp_path, "mixed.yaml", text)
    policies = PolicySet.load(tmp_path)
    assert policies.source.warnings == (
        f"{path}:1: ignoring apps/v1 Deployment 'web' (not enforced by extauthz)",
        f"{path}:6: ignoring security.istio.io/v1 PeerAuthentication 'strict' "
        "(not enforced by extauthz)",
    )
    assert [(p.key, p.action) for p in policies.authz] == [("ns1/p", Action.DENY)]


def test_skipped_files(tmp_path: Path) -> None:
    broken = "this: is: not yaml\n"
    write(tmp_path, "cases.test.yaml", broken)
    write(tmp_path, "cases.test.yml", broken)
    write(tmp_path, ".hidden.yaml", broken)
    write(tmp_path, ".git/config.yaml", broken)
    write(tmp_path, "sub/.cache/x.yaml", broken)
    write(tmp_path, "notes.txt", broken)
    write(tmp_path, "keys.json", broken)
    good = write(tmp_path, "sub/p.yml", HEAD + "spec: {}\n")
    policies = PolicySet.load(tmp_path)
    assert policies.source.files == (str(good),)
    assert [p.key for p in policies.authz] == ["ns1/p"]


def test_multi_document_file(tmp_path: Path) -> None:
    text = (
        "---\n"
        + HEAD.replace("name: p", "name: a")
        + "spec: {}\n---\n# only a comment\n---\n"
        + HEAD.replace("name: p", "name: b")
        + "spec:\n  action: DENY\n  rules: [{}]\n---\n"
        + RA_HEAD
        + f"    jwks: '{JWKS}'\n"
    )
    write(tmp_path, "all.yaml", text)
    policies = PolicySet.load(tmp_path)
    assert [(p.key, p.action, p.line) for p in policies.authz] == [
        ("ns1/a", Action.ALLOW, 2),
        ("ns1/b", Action.DENY, 11),
    ]
    assert [(r.key, r.line) for r in policies.authn] == [("ns1/jwt", 20)]


def test_empty_directory(tmp_path: Path) -> None:
    policies = PolicySet.load(tmp_path)
    assert policies.authz == ()
    assert policies.authn == ()
    assert policies.source.files == ()


def test_missing_directory(tmp_path: Path) -> None:
    from extauthz.errors import PolicyError

    with pytest.raises(PolicyError, match="does not exist or is not a directory"):
        PolicySet.load(tmp_path / "nope")


def test_jwks_uri_relative_to_the_policy_file(tmp_path: Path) -> None:
    write(tmp_path, "sub/keys/idp.json", JWKS)
    write(tmp_path, "sub/ra.yaml", RA_HEAD + "    jwksUri: keys/idp.json\n")
    write(
        tmp_path,
        "abs.yaml",
        RA_HEAD.replace("name: jwt", "name: abs")
        + (f"    jwksUri: file://{tmp_path}/sub/keys/idp.json\n"),
    )
    policies = PolicySet.load(tmp_path)
    assert sorted(r.key for r in policies.authn) == ["ns1/abs", "ns1/jwt"]
    assert all(len(r.providers[0].keys) == 1 for r in policies.authn)


def test_revision(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", HEAD + "spec: {}\n")
    first = PolicySet.load(tmp_path).revision
    assert len(first) == 12
    assert int(first, 16) >= 0
    assert PolicySet.load(tmp_path).revision == first
    path.write_text(HEAD + "spec:\n  action: ALLOW\n")
    changed = PolicySet.load(tmp_path).revision
    assert changed != first
    path.write_text(HEAD + "spec: {}\n")
    assert PolicySet.load(tmp_path).revision == first
    write(tmp_path, "q.yaml", HEAD.replace("name: p", "name: q") + "spec: {}\n")
    assert PolicySet.load(tmp_path).revision not in (first, changed)


def test_revision_ignores_skipped_files(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", HEAD + "spec: {}\n")
    first = PolicySet.load(tmp_path).revision
    write(tmp_path, "p.test.yaml", "anything\n")
    write(tmp_path, ".hidden.yaml", "anything\n")
    assert PolicySet.load(tmp_path).revision == first


def test_shipped_policies_load() -> None:
    policies = PolicySet.load(SHIPPED)
    assert sorted(p.key for p in policies.authz) == [
        "shop/deny-admin",
        "shop/frontend",
        "shop/orders",
        "shop/payments",
        "shop/payments-limits",
    ]
    assert [r.key for r in policies.authn] == ["istio-system/demo-idp"]
    assert policies.source.warnings == ()
    (ra,) = policies.authn
    assert ra.scope.namespace is None  # root namespace: every workload
    (provider,) = ra.providers
    assert provider.issuer == "https://idp.demo.local"
    assert provider.audiences == frozenset({"shop"})
    assert len(provider.keys) >= 1
    actions = {p.key: p.action for p in policies.authz}
    assert actions["shop/deny-admin"] is Action.DENY


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("outputClaimToHeaders: [{header: x-extauthz-spiffe-id, claim: sub}]", "reserved header"),
        ("outputClaimToHeaders: [{header: X-Extauthz-Decision-Id, claim: sub}]", "reserved"),
        ("outputClaimToHeaders: [{header: authorization, claim: sub}]", "reserved header"),
        ("outputClaimToHeaders: [{header: host, claim: sub}]", "reserved header"),
        (
            "outputClaimToHeaders: [{header: x-user, claim: sub}, {header: X-User, claim: email}]",
            "'x-user' is written twice",
        ),
        ("outputPayloadToHeader: x-extauthz-spiffe-id", "reserved header"),
        ("outputPayloadToHeader: 'bad header'", "must be a header name"),
    ],
    ids=[
        "spiffe-header",
        "decision-header-any-case",
        "authorization",
        "host",
        "twice",
        "payload-reserved",
        "payload-not-a-name",
    ],
)
def test_output_headers_cannot_shadow_identity_headers(
    tmp_path: Path, output: str, fragment: str
) -> None:
    """A claim must never be able to stand in for the verified SPIFFE ID (review finding)."""
    write(tmp_path, "ra.yaml", RA_HEAD + f"    jwks: '{JWKS}'\n    {output}\n")
    err = load_error(tmp_path)
    assert "ra.yaml:10:" in err.message  # the output field's own line
    assert fragment in err.message


def test_a_policy_in_a_test_file_is_an_error_not_silently_skipped(tmp_path: Path) -> None:
    (tmp_path / "deny.test.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: d, namespace: ns1}\nspec: {action: DENY, rules: [{}]}\n"
    )
    with pytest.raises(PolicySetError) as err:
        PolicySet.load(tmp_path)
    assert "deny.test.yaml" in str(err.value)
    assert "never enforced: rename it" in str(err.value)


def test_symlinked_directories_are_followed_once_and_loops_end(tmp_path: Path) -> None:
    """A ConfigMap volume's subdirectories are symlinks into ``..data``; a loop must end."""
    real = tmp_path / "real"
    (real / "shop").mkdir(parents=True)
    (real / "shop" / "p.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: shop}\nspec: {}\n"
    )
    (real / "shop" / "loop").symlink_to(real)  # a cycle back to the top
    root = tmp_path / "volume"
    root.mkdir()
    (root / "shop").symlink_to(real / "shop")
    (root / ".hidden").symlink_to(real / "shop")  # hidden: skipped
    policies = PolicySet.load(root)
    assert [p.key for p in policies.authz] == ["shop/p"]
