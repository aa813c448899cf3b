"""Remote JWKS and OIDC discovery against a real HTTPS IdP on 127.0.0.1.

The IdP (:class:`extauthz.devtools.idp.IdpServer`) rotates keys, goes down and comes back,
answers slowly or with garbage; every test counts the requests it received.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from extauthz.authorizer import Authorizer
from extauthz.config import Settings
from extauthz.decision import Decision
from extauthz.devtools.idp import DevIdP, IdpServer
from extauthz.devtools.pki import DevCA
from extauthz.identity.jwks import (
    DISCOVERY_PATH,
    FetchSettings,
    KeySetRegistry,
    RemoteKeySet,
    _cache_lifetime,
)
from extauthz.policy.engine import PolicySet
from extauthz.reload import PolicyReloader
from extauthz.request import CheckInput
from extauthz.server import Server
from extauthz.telemetry import Telemetry

AUDIENCE = "orders"


def fetch_settings(ca_file: Path | None, **overrides: Any) -> FetchSettings:
    values: dict[str, Any] = {
        "refresh_interval": 300.0,
        "min_refetch_interval": 60.0,
        "timeout": 1.0,
        "ca_file": str(ca_file) if ca_file else None,
    }
    values.update(overrides)
    return FetchSettings(**values)


def write_policy(directory: Path, issuer: str, jwks_uri: str | None) -> None:
    uri = f"    jwksUri: {jwks_uri}\n" if jwks_uri else ""
    (directory / "authn.yaml").write_text(
        "apiVersion: security.istio.io/v1\n"
        "kind: RequestAuthentication\n"
        "metadata: {name: idp}\n"
        "spec:\n"
        "  jwtRules:\n"
        f"  - issuer: {issuer}\n"
        f"    audiences: [{AUDIENCE}]\n" + uri
    )


class Rig:
    """Policies trusting ``idp`` loaded through a live registry, and an Authorizer."""

    def __init__(
        self, directory: Path, idp: IdpServer, settings: FetchSettings, *, discovery: bool
    ):
        self.directory = directory
        self.idp = idp
        self.registry = KeySetRegistry(settings)
        write_policy(directory, idp.issuer, None if discovery else idp.jwks_uri)
        self.authorizer = Authorizer(
            PolicySet.load(directory, keys=self.registry), Settings(jwks=settings)
        )

    @property
    def key_set(self) -> RemoteKeySet:
        (only,) = self.authorizer.policies.key_sets
        return only

    def check(self, token: str) -> Decision:
        return self.authorizer.check(bearer(token))

    async def check_async(self, token: str, wait: float = 2.0) -> Decision:
        return await self.authorizer.check_async(bearer(token), wait=wait)

    def close(self) -> None:
        self.registry.close()


@pytest.fixture
def rig(tmp_path: Path, idp: IdpServer, ca: tuple[DevCA, Path]) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(*, discovery: bool = False, **overrides: Any) -> Rig:
        settings = fetch_settings(overrides.pop("ca_file", ca[1]), **overrides)
        r = Rig(tmp_path, idp, settings, discovery=discovery)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def bearer(token: str) -> CheckInput:
    return CheckInput(
        method="GET", host="orders", path="/", headers={"authorization": f"Bearer {token}"}
    )


def key(idp: IdpServer, kid: str) -> DevIdP:
    return DevIdP.create(idp.issuer, kid=kid)


def token(signer: DevIdP) -> str:
    return signer.token("alice", audience=AUDIENCE, jti=uuid.uuid4().hex)


def forged(idp: IdpServer, kid: str) -> str:
    """Signed by a key the IdP never published, under a made-up kid."""
    return token(DevIdP(idp.issuer, ec.generate_private_key(ec.SECP256R1()), kid))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- fetching ------------------------------------------------------------------------------


def test_jwks_uri_over_https_verifies_tokens_with_one_fetch(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig()
    for _ in range(5):
        decision = r.check(token(k1))
        assert decision.allowed, decision.message
    assert idp.fetches() == 1
    assert idp.fetches(DISCOVERY_PATH) == 0
    assert r.key_set.stats.fetches == 1


def test_oidc_discovery_finds_the_keys_from_the_issuer(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig(discovery=True)
    assert r.check(token(k1)).allowed
    assert (idp.fetches(DISCOVERY_PATH), idp.fetches()) == (1, 1)
    assert r.key_set.jwks_url == idp.jwks_uri


def test_discovery_refuses_a_document_for_another_issuer(
    tmp_path: Path, idp: IdpServer, ca: tuple[DevCA, Path]
) -> None:
    # OIDC Discovery 4.3: the document's issuer must be exactly the one configured.
    k1 = key(idp, "k1")
    idp.publish(k1)
    registry = KeySetRegistry(fetch_settings(ca[1]))
    try:
        write_policy(tmp_path, idp.issuer + "/", None)
        policies = PolicySet.load(tmp_path, keys=registry)
        (ks,) = policies.key_sets
        assert "is not" in ks.last_error
        assert idp.fetches() == 0
        decision = Authorizer(policies).check(bearer(token(DevIdP(idp.issuer + "/", k1.key, "k1"))))
        assert decision.reason == "jwks_unavailable"
    finally:
        registry.close()


def test_an_untrusted_certificate_is_a_fetch_failure(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig(ca_file=None)  # the system CAs do not know the dev CA
    assert "CERTIFICATE_VERIFY_FAILED" in r.key_set.last_error
    decision = r.check(token(k1))
    assert (decision.allowed, decision.reason) == (False, "jwks_unavailable")
    assert decision.outcome.value == "unauthenticated"


# --- rotation and the unknown-kid refetch ------------------------------------------------


async def test_a_new_kid_is_fetched_once_and_then_verifies(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1, k2 = key(idp, "k1"), key(idp, "k2")
    idp.publish(k1)
    r = rig()
    idp.publish(k1, k2)  # the IdP rotates in a new key
    decision = await r.check_async(token(k2))
    assert decision.allowed, decision.message
    assert idp.fetches() == 2
    for _ in range(5):
        assert (await r.check_async(token(k2))).allowed
        assert (await r.check_async(token(k1))).allowed
    assert idp.fetches() == 2


async def test_without_waiting_the_first_request_is_refused_and_later_ones_pass(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1, k2 = key(idp, "k1"), key(idp, "k2")
    idp.publish(k1)
    r = rig()
    idp.publish(k2)
    assert r.check(token(k2)).reason == "jwt_key_unknown"  # sync check: never waits
    assert wait_until(lambda: r.key_set.stats.fetches == 2)
    assert r.check(token(k2)).allowed


async def test_a_key_rotated_out_stops_verifying_even_cached_tokens(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1, k2 = key(idp, "k1"), key(idp, "k2")
    idp.publish(k1)
    r = rig()
    old = token(k1)
    assert (await r.check_async(old)).allowed  # now in the verified-token cache
    idp.publish(k2)  # k1 revoked
    assert (await r.check_async(token(k2))).allowed  # the refetch that learns it
    decision = await r.check_async(old)
    assert (decision.allowed, decision.reason) == (False, "jwt_key_unknown")


async def test_a_flood_of_made_up_kids_costs_the_idp_one_fetch(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig()
    tokens = [forged(idp, f"made-up-{i}") for i in range(300)]
    decisions = await asyncio.gather(*(r.check_async(t, wait=1.0) for t in tokens))
    decisions += [r.check(t) for t in tokens]
    assert {d.reason for d in decisions} == {"jwt_key_unknown"}
    assert not any(d.allowed for d in decisions)
    assert idp.fetches() == 2  # the first load and one early refetch
    stats = r.key_set.stats
    assert stats.refetches == 1
    assert stats.refetches_limited >= 300
    assert r.check(token(k1)).allowed


# --- the IdP misbehaving -----------------------------------------------------------------


async def test_idp_outage_keeps_cached_keys_and_refuses_unknown_ones_fast(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1, k2 = key(idp, "k1"), key(idp, "k2")
    idp.publish(k1)
    r = rig()
    idp.stop()
    started = time.monotonic()
    unknown = await r.check_async(token(k2), wait=5.0)
    took = time.monotonic() - started
    assert (unknown.allowed, unknown.reason) == (False, "jwt_key_unknown")
    assert took < 2.0  # connection refused: no hang
    assert r.key_set.stats.failures == 1
    assert "ConnectionRefused" in r.key_set.last_error or "refused" in r.key_set.last_error
    for _ in range(3):
        assert (await r.check_async(token(k1))).allowed  # fresh tokens, cached key
    # The IdP comes back with the new key: the backoff retry (about 1 s) picks it up.
    idp.publish(k1, k2)
    idp.start()
    assert wait_until(lambda: r.check(token(k2)).allowed, timeout=10)
    assert not r.key_set.last_error


async def test_idp_down_at_start_refuses_tokens_then_recovers(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    idp.stop()
    started = time.monotonic()
    r = rig()
    assert time.monotonic() - started < 4.0  # the load waited, bounded, for the first fetch
    decision = await r.check_async(token(k1), wait=0.5)
    assert (decision.allowed, decision.reason) == (False, "jwks_unavailable")
    assert "not available" in decision.message
    idp.start()
    assert wait_until(lambda: r.check(token(k1)).allowed, timeout=10)


async def test_a_slow_idp_times_out_and_a_check_waits_no_longer_than_told(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1, k2 = key(idp, "k1"), key(idp, "k2")
    idp.publish(k1, k2)
    r = rig(timeout=0.5)
    idp.delay = 3.0
    started = time.monotonic()
    decision = await r.check_async(forged(idp, "k3"), wait=0.3)
    assert time.monotonic() - started < 1.0
    assert (decision.allowed, decision.reason) == (False, "jwt_key_unknown")
    assert wait_until(lambda: r.key_set.stats.failures == 1, timeout=3)
    assert "timed out" in r.key_set.last_error
    assert (await r.check_async(token(k1))).allowed
    idp.delay = 0.0


@pytest.mark.parametrize(
    ("misbehave", "error"),
    [
        (lambda s: setattr(s, "status", 500), "HTTP Error 500"),
        (lambda s: setattr(s, "status", 404), "HTTP Error 404"),
        (lambda s: setattr(s, "garbage", True), "not JSON"),
    ],
    ids=["http-500", "http-404", "garbage"],
)
async def test_a_bad_answer_keeps_the_last_good_keys(
    idp: IdpServer,
    rig: Callable[..., Rig],
    misbehave: Callable[[IdpServer], None],
    error: str,
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig()
    revision = r.key_set.state.revision
    misbehave(idp)
    assert not (await r.check_async(forged(idp, "k9"))).allowed
    assert r.key_set.stats.failures == 1
    assert error in r.key_set.last_error
    assert r.key_set.state.revision == revision
    assert (await r.check_async(token(k1))).allowed


async def test_an_unchanged_document_is_revalidated_with_its_etag(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    idp.max_age = 0  # no-cache: refetch as soon as the floor allows
    r = rig(min_refetch_interval=0.2)
    assert wait_until(lambda: r.key_set.stats.not_modified >= 2, timeout=5)
    assert r.key_set.state.revision == 1
    assert r.check(token(k1)).allowed


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 600.0),
        ({"cache-control": "max-age=120"}, 120.0),
        ({"cache-control": "public, max-age=30, must-revalidate"}, 30.0),
        ({"cache-control": 'max-age="45"'}, 45.0),
        ({"cache-control": "no-cache"}, 0.0),
        ({"cache-control": "no-store, max-age=100"}, 0.0),
        ({"cache-control": "max-age=soon"}, 600.0),
        (
            {"expires": "Wed, 21 Oct 2026 07:28:00 GMT", "date": "Wed, 21 Oct 2026 07:27:00 GMT"},
            60.0,
        ),
        ({"expires": "0"}, 0.0),
        ({"cache-control": "max-age=10", "expires": "Wed, 21 Oct 2026 07:28:00 GMT"}, 10.0),
    ],
)
def test_cache_lifetime(headers: dict[str, str], expected: float) -> None:
    assert _cache_lifetime(headers, 600.0) == expected


# --- reload and the gRPC deadline ---------------------------------------------------------


async def test_a_reload_reuses_fetched_keys_and_retires_unused_sets(
    tmp_path: Path, idp: IdpServer, ca: tuple[DevCA, Path]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    settings = fetch_settings(ca[1])
    registry = KeySetRegistry(settings)
    try:
        write_policy(tmp_path, idp.issuer, idp.jwks_uri)
        authorizer = Authorizer(PolicySet.load(tmp_path, keys=registry), Settings(jwks=settings))
        reloader = PolicyReloader(
            authorizer, tmp_path, root_namespace="istio-system", keys=registry
        )
        (first,) = authorizer.policies.key_sets
        (tmp_path / "other.yaml").write_text("# a change that leaves the issuer alone\n")
        await reloader.reload()
        assert authorizer.policies.key_sets == (first,)
        assert idp.fetches() == 1  # the reload did not fetch again
        write_policy(tmp_path, idp.issuer, None)  # now by discovery: another set
        await reloader.reload()
        (second,) = authorizer.policies.key_sets
        assert second is not first
        assert second.discovery
        assert registry.sets() == [second]
        assert first._thread is not None
        assert wait_until(lambda: not first._thread.is_alive(), timeout=5)  # type: ignore[union-attr]
        assert authorizer.check(bearer(token(k1))).allowed
    finally:
        registry.close()


async def test_a_check_answers_before_envoys_deadline_while_the_idp_is_slow(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig(timeout=5.0)
    idp.delay = 3.0
    server = Server(r.authorizer, Telemetry(None), listen="127.0.0.1:0", grace=1.0)
    await server.start()
    try:
        http = attribute_context_pb2.AttributeContext.HttpRequest(
            method="GET",
            host="orders",
            path="/",
            headers={"authorization": "Bearer " + forged(idp, "k7")},
        )
        request = external_auth_pb2.CheckRequest(
            attributes=attribute_context_pb2.AttributeContext(
                request=attribute_context_pb2.AttributeContext.Request(http=http)
            )
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            await channel.channel_ready()  # the deadline is for the Check, not the connect
            started = time.monotonic()
            # A deadline error here would be the failure: the IdP takes 3 s, the Check 0.5 s.
            response = await stub.Check(request, timeout=0.5)
            took = time.monotonic() - started
        assert response.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert response.denied_response.status.code == 401
        assert 0.3 < took < 0.5  # it did wait for the refetch, as long as the deadline let it
    finally:
        idp.delay = 0.0
        await server.stop()


def test_lint_and_policy_loading_without_a_registry_never_fetch(
    tmp_path: Path, idp: IdpServer
) -> None:
    idp.publish(key(idp, "k1"))
    write_policy(tmp_path, idp.issuer, idp.jwks_uri)
    policies = PolicySet.load(tmp_path)
    (ks,) = policies.key_sets
    assert ks._thread is None
    assert idp.fetches() == 0
    decision = Authorizer(policies).check(bearer(jwt.encode({"iss": idp.issuer}, "x" * 32)))
    assert not decision.allowed


def test_a_document_over_the_size_cap_is_refused(idp: IdpServer, rig: Callable[..., Rig]) -> None:
    idp.publish(key(idp, "k1"))
    r = rig(max_bytes=100)
    assert "larger than 100 bytes" in r.key_set.last_error
    assert not r.key_set.state.keys


def test_a_304_without_cache_headers_keeps_the_lifetime_it_had() -> None:
    from extauthz.identity.jwks import HttpResponse

    jwks = DevIdP.create("https://idp.test", "k1").jwks().encode()
    answers = [
        HttpResponse(200, {"etag": '"a"', "cache-control": "max-age=1"}, jwks),
        HttpResponse(304, {"etag": '"a"'}, b""),
    ]
    sent: list[dict[str, str]] = []

    def getter(url: str, headers: Any, timeout: float) -> HttpResponse:
        sent.append(dict(headers))
        return answers[min(len(sent), len(answers)) - 1]

    ks = RemoteKeySet("https://idp.test/jwks", settings=FetchSettings(min_refetch_interval=0.1))
    ks._get = getter
    ks.start()
    try:
        assert wait_until(lambda: ks.stats.not_modified >= 2, timeout=5)
        assert sent[0] == {}
        assert sent[1] == {"If-None-Match": '"a"'}
        assert ks.state.revision == 1
    finally:
        ks.close()


async def test_metrics_count_fetches_refetches_and_cache_lookups(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from otel_helpers import points

    reader = InMemoryMetricReader()
    telemetry = Telemetry(None, MeterProvider(metric_readers=[reader]))
    k1 = key(idp, "k1")
    idp.publish(k1)
    r = rig()
    telemetry.observe_keys(r.registry)
    before = points(reader, "extauthz.token_cache.lookups")
    hot = token(k1)
    for _ in range(4):
        assert r.check(hot).allowed  # 1 miss, then 3 hits
    r.check(forged(idp, "x1"))  # a refetch granted...
    assert wait_until(lambda: r.key_set.stats.fetches == 2)
    for kid in ("x2", "x3"):
        r.check(forged(idp, kid))  # ... and, once it is done, two refused by the rate limit
    idp.status = 500
    r.key_set._next_due = 0.0  # the scheduled refresh, now
    with r.key_set._cond:
        r.key_set._cond.notify_all()
    assert wait_until(lambda: r.key_set.stats.failures == 1)
    after = points(reader, "extauthz.token_cache.lookups")

    def delta(result: str) -> int:
        k = frozenset({("result", result)})
        return after[k] - before.get(k, 0)

    # the three forged tokens miss the cache too (they are looked up, never stored)
    assert (delta("hit"), delta("miss")) == (3, 4)
    fetches = points(reader, "extauthz.jwks.fetches")
    assert fetches == {  # the refetch found the same document: 304 by its ETag
        frozenset({("result", "ok")}): 1,
        frozenset({("result", "not_modified")}): 1,
        frozenset({("result", "error")}): 1,
    }
    refetches = points(reader, "extauthz.jwks.refetches")
    assert refetches == {
        frozenset({("result", "granted")}): 1,
        frozenset({("result", "rate_limited")}): 2,
    }
    idp.status = 200


async def test_an_unknown_kid_refetch_skips_discovery(
    idp: IdpServer, rig: Callable[..., Rig]
) -> None:
    """The refetch a Check waits for is one request, not discovery + JWKS."""
    k1, k2 = key(idp, "k1"), key(idp, "k2")
    idp.publish(k1)
    r = rig(discovery=True)
    idp.publish(k1, k2)
    assert (await r.check_async(token(k2))).allowed
    assert (idp.fetches(DISCOVERY_PATH), idp.fetches()) == (1, 2)


def test_a_bad_ca_file_is_a_config_error_naming_the_flag(tmp_path: Path) -> None:
    from extauthz.errors import ConfigError

    with pytest.raises(ConfigError, match="--jwks-ca-file"):
        KeySetRegistry(FetchSettings(ca_file=str(tmp_path / "missing.pem")))
    assert KeySetRegistry(FetchSettings(ca_file=str(tmp_path / "missing.pem")), live=False)
