"""Fuzzing the Check handler, the token verifier and the XFCC parser. Development only.

One target, :class:`CheckTarget`, runs a CheckRequest through the real servicer against a
policy set whose allow condition is known exactly, and fails loudly if the answer is not a
CheckResponse, carries an unexpected status, or allows a request the policies do not grant.
The same target serves three drivers:

- ``tests/test_fuzz.py``: hypothesis on structured requests, and :func:`mutate` over
  serialized seeds for 100,000 inputs within the CI budget;
- ``make fuzz``: this module under atheris (coverage-guided), for as long as you like:
  ``python -m extauthz.devtools.fuzz check|token|xfcc [atheris flags, e.g. -runs=1000000]``.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.message import DecodeError

from ..authorizer import Authorizer
from ..errors import TokenError, XfccError
from ..identity import xfcc
from ..identity.jwt import TokenVerifier
from ..policy.engine import PolicySet
from ..request import CheckInput
from ..server import AuthorizationServicer
from ..telemetry import Telemetry

ISSUER = "https://idp.fuzz"
GOOD_PEER = "spiffe://cluster.local/ns/a/sa/good"
EXPECTED_CODES = frozenset({0, 7, 14, 16})  # OK, PERMISSION_DENIED, UNAVAILABLE, UNAUTHENTICATED

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: idp}
spec:
  jwtRules:
  - issuer: %(issuer)s
    audiences: [api]
    jwks: '%(jwks)s'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-good}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/a/sa/good]
        requestPrincipals: ["%(issuer)s/alice"]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[x-block]", values: ["*"]}]
"""


class Violation(AssertionError):
    """The handler did something it must never do."""


class _Context:
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def time_remaining(self) -> float | None:
        return None


class CheckTarget:
    """The real servicer over a policy set that allows exactly: peer ``GOOD_PEER``, a valid
    token for ``alice``, ``GET /api/...``, no ``x-block`` header."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="k1", alg="ES256")
        self._dir = tempfile.TemporaryDirectory(prefix="extauthz-fuzz-")
        Path(self._dir.name, "p.yaml").write_text(
            POLICIES % {"issuer": ISSUER, "jwks": json.dumps({"keys": [jwk]})}
        )
        self.authorizer = Authorizer(PolicySet.load(Path(self._dir.name)))
        self.servicer = AuthorizationServicer(self.authorizer, Telemetry(None))
        self.signed: set[str] = set()  # every token this target signed: the only ones to accept
        self.token = self.sign(sub="alice", aud="api")
        self.verifier = TokenVerifier(
            p for a in self.authorizer.policies.authn for p in a.providers
        )
        self.answers: dict[str, int] = {}

    def sign(self, **claims: Any) -> str:
        body = {"iss": ISSUER, "exp": int(time.time()) + 3600, **claims}
        token = jwt.encode(body, self.key, algorithm="ES256", headers={"kid": "k1"})
        self.signed.add(token)
        return token

    def close(self) -> None:
        self._dir.cleanup()

    def seeds(self) -> list[bytes]:
        """Requests that reach every branch: allowed, denied by each condition, 401s."""
        good = {"authorization": f"Bearer {self.token}", "user-agent": "fuzz"}
        cases = [
            request(GOOD_PEER, "GET", "/api/orders?x=1", good),
            request(GOOD_PEER, "GET", "/api/orders", good, raw=True),
            request(GOOD_PEER, "POST", "/api/orders", good),
            request(GOOD_PEER, "GET", "/admin", good),
            request("spiffe://cluster.local/ns/a/sa/bad", "GET", "/api/x", good),
            request(GOOD_PEER, "GET", "/api/x", {**good, "x-block": "1"}),
            request(GOOD_PEER, "GET", "/api/x", {"authorization": "Bearer abc.def.ghi"}),
            request(GOOD_PEER, "GET", f"/api/x?access_token={self.token}", {}),
            request("", "GET", "/api/x", good),
        ]
        return [c.SerializeToString() for c in cases]

    def check_bytes(self, data: bytes) -> None:
        """Parse ``data`` as a CheckRequest (gRPC refuses what does not parse) and check it."""
        try:
            req = external_auth_pb2.CheckRequest.FromString(data)
        except (DecodeError, RecursionError, ValueError):
            return
        self.check(req)

    def check(self, req: Any) -> Any:
        coro = self.servicer.Check(req, _Context())  # type: ignore[arg-type]
        try:
            coro.send(None)
        except StopIteration as done:
            response = done.value
        else:  # it awaited: only a JWKS refetch does, and this set has no remote keys
            coro.close()
            raise Violation("Check awaited with no remote keys to wait for")
        if not isinstance(response, bytes):
            raise Violation(f"answer is {type(response).__name__}, not a serialized CheckResponse")
        try:
            response = external_auth_pb2.CheckResponse.FromString(response)
        except DecodeError as exc:
            raise Violation(f"answer does not parse as a CheckResponse: {exc}") from None
        code = response.status.code
        if code not in EXPECTED_CODES:
            raise Violation(f"unexpected status code {code}")
        self.answers[str(code)] = self.answers.get(str(code), 0) + 1
        if code == 0:
            self._allowed_must_be_granted(req, response)
        elif response.HasField("ok_response"):
            raise Violation("a deny carries an ok_response")
        return response

    def _allowed_must_be_granted(self, req: Any, response: Any) -> None:
        attrs = req.attributes
        http = attrs.request.http
        headers = _headers(http)
        method = http.method or headers.get(":method", "")
        path = (http.path or headers.get(":path", "/")).partition("?")[0]
        problems = []
        if attrs.source.principal != GOOD_PEER:
            problems.append(f"peer {attrs.source.principal!r}")
        if method != "GET":
            problems.append(f"method {method!r}")
        if not path.startswith("/api/"):
            problems.append(f"path {path!r}")
        if "x-block" in headers:
            problems.append("x-block present")
        if self.token not in json.dumps(headers) + (http.path or headers.get(":path", "")):
            problems.append("no valid token")
        if not response.HasField("ok_response"):
            problems.append("allowed without ok_response")
        if problems:
            raise Violation("allowed although " + ", ".join(problems))

    def check_token(self, data: bytes) -> None:
        """A token string: verifying it may refuse, never crash, never accept a forgery."""
        token = data.decode("utf-8", "replace")
        inp = CheckInput(headers={"authorization": f"Bearer {token}"})
        try:
            verified = self.verifier.verify(inp)
        except TokenError:
            return
        if verified is not None and token.strip() not in self.signed:
            raise Violation(f"accepted a token that extauthz never signed: {token[:80]!r}")


def check_xfcc(data: bytes) -> None:
    """The XFCC parser returns elements or raises XfccError; nothing else."""
    try:
        xfcc.parse(data.decode("utf-8", "replace"))
    except XfccError:
        return


def request(
    principal: str, method: str, path: str, headers: dict[str, str], *, raw: bool = False
) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, host="orders.test", path=path, protocol="HTTP/2"
    )
    if raw:  # Envoy's encode_raw_headers: header_map with raw_value bytes
        for k, v in headers.items():
            http.header_map.headers.add(key=k, raw_value=v.encode())
    else:
        http.headers.update(headers)
    ctx = attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http),
        source=attribute_context_pb2.AttributeContext.Peer(principal=principal),
    )
    ctx.source.address.socket_address.address = "10.0.0.1"
    ctx.source.address.socket_address.port_value = 4711
    return external_auth_pb2.CheckRequest(attributes=ctx)


def _headers(http: Any) -> dict[str, str]:
    if http.headers:
        return dict(http.headers)  # as Envoy sends them: already lower-case
    merged: dict[str, str] = {}
    for hv in http.header_map.headers:
        value = hv.value or hv.raw_value.decode("utf-8", "replace")
        key = hv.key.lower()
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return merged


# --- a mutation fuzzer for CI (atheris does the same, coverage-guided, under `make fuzz`) ---

_INTERESTING = [
    b"\x00",
    b"\xff",
    b"\xc3\x28",  # invalid UTF-8
    b"\r\n",
    b"%00",
    b"..",
    b"/../",
    b"*",
    b"eyJ",
    b"Bearer ",
    b"spiffe://",
    b'"',
    b"\\",
    b"{" * 64,
]


def mutate(seed: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """One random edit (or a few) of ``seed``: flips, inserts, deletes, copies, splices."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and data:
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 3 and data:
            start = rng.randrange(len(data))
            chunk = data[start : start + rng.randint(1, 64)]
            data[pos:pos] = chunk * rng.randint(1, 4)
        elif op == 4:
            data[pos:pos] = rng.choice(_INTERESTING)
        elif op == 5:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            data = data[:pos] + bytearray(other[cut:])
        elif op == 6 and data:
            data[min(pos, len(data) - 1)] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
    return bytes(data)


def mutate_request(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """A field-level edit of a serialized CheckRequest, so that mutants reach the decision:
    string fields get byte-level edits, headers are added, dropped, duplicated or moved
    between ``headers`` and ``header_map``. One in five is a raw byte edit instead."""
    if rng.random() < 0.2:
        return mutate(data, rng, corpus)
    try:
        req = external_auth_pb2.CheckRequest.FromString(data)
    except (DecodeError, RecursionError, ValueError):
        return mutate(data, rng, corpus)
    attrs = req.attributes
    http = attrs.request.http
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0:
            http.method = _edit(http.method, rng)
        elif op == 1:
            http.path = _edit(http.path, rng)
        elif op == 2:
            attrs.source.principal = _edit(attrs.source.principal, rng)
        elif op == 3 and http.headers:
            name = rng.choice(sorted(http.headers))
            http.headers[name] = _edit(http.headers[name], rng)
        elif op == 4:
            name = rng.choice(["x-block", "authorization", "cookie", ":path", "x-" + "a" * 8])
            http.headers[name] = _edit("", rng)
        elif op == 5 and http.headers:
            del http.headers[rng.choice(sorted(http.headers))]
        elif op == 6:  # to encode_raw_headers form, duplicating one header
            for k, v in sorted(http.headers.items()):
                http.header_map.headers.add(key=k, raw_value=v.encode())
            if http.header_map.headers:
                twin = rng.choice(http.header_map.headers)
                http.header_map.headers.add(key=twin.key, raw_value=_edit_bytes(b"", rng))
            http.ClearField("headers")
        elif op == 7:
            attrs.context_extensions[rng.choice(["namespace", "labels", "service"])] = _edit(
                "", rng
            )
    out: bytes = req.SerializeToString()
    return out


def _edit_bytes(value: bytes, rng: random.Random) -> bytes:
    return mutate(value, rng, [value or b"x"])


def _edit(value: str, rng: random.Random) -> str:
    # Proto strings must be UTF-8: the invalid bytes an edit makes become U+FFFD.
    return _edit_bytes(value.encode(), rng).decode("utf-8", "replace")


def run_mutations(
    target: Callable[[bytes], None],
    seeds: list[bytes],
    n: int,
    *,
    seed: int = 0,
    edit: Callable[[bytes, random.Random, list[bytes]], bytes] = mutate,
) -> int:
    """Feed ``n`` mutants of ``seeds`` to ``target``; a :class:`Violation` is re-raised with
    the input attached so that it can be replayed. Returns ``n``."""
    rng = random.Random(seed)  # noqa: S311 - reproducible fuzzing, not secrecy
    corpus = list(seeds)
    for i in range(n):
        data = edit(rng.choice(corpus), rng, corpus)
        try:
            target(data)
        except Violation as exc:
            raise Violation(f"input #{i} {data!r}: {exc}") from exc
        if i % 97 == 0 and len(corpus) < 512:
            corpus.append(data)  # keep some mutants: deeper edits without coverage feedback
    return n


def main(argv: list[str]) -> None:
    import atheris  # type: ignore[import-untyped]  # only here: a dev dependency for `make fuzz`

    which = argv[1] if len(argv) > 1 else "check"
    target = CheckTarget()
    fn: Callable[[bytes], None] = {
        "check": target.check_bytes,
        "token": target.check_token,
        "xfcc": check_xfcc,
    }[which]
    corpus_dir = Path(tempfile.mkdtemp(prefix=f"extauthz-fuzz-{which}-"))
    seeds = (
        target.seeds()
        if which == "check"
        else [target.token.encode(), b"By=spiffe://a;URI=spiffe://b,URI=x"]
    )
    for i, s in enumerate(seeds):
        (corpus_dir / f"seed-{i}").write_bytes(s)
    print(f"fuzzing {which}; corpus in {corpus_dir}", file=sys.stderr)
    _instrument(atheris)
    atheris.Setup([argv[0], *argv[2:], str(corpus_dir)], fn)
    atheris.Fuzz()


def _instrument(atheris: Any) -> None:
    """Coverage feedback from extauthz's own code (atheris.instrument_all stalls on some
    third-party bytecode, and coverage of grpc/protobuf internals is not what we fuzz)."""
    import inspect

    for name, module in list(sys.modules.items()):
        if not name.startswith("extauthz") or name.endswith("_pb2") or module is None:
            continue
        for _, obj in inspect.getmembers(module):
            if getattr(obj, "__module__", None) != name:
                continue
            members = inspect.getmembers(obj) if inspect.isclass(obj) else [("", obj)]
            for _, fn in members:
                if inspect.isfunction(fn) and fn.__module__ == name:
                    atheris.instrument_func(fn)


if __name__ == "__main__":
    main(sys.argv)
