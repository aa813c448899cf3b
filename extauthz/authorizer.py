"""The decision pipeline: request model → identity → policy → Decision.

Pure and synchronous: no protobuf, no I/O, no clock reads beyond PyJWT's. The policy set is
one reference swapped whole on reload, so a Check sees either the old set or the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from .config import Settings
from .decision import NO_CLAIMS as _NO_CLAIMS
from .decision import Decision, DenyResponse, Header, Outcome, new_decision_id
from .errors import (
    ExtAuthzError,
    IdentityError,
    OverloadedError,
    SpiffeIdError,
    TokenError,
    TokenMintError,
    TokenSigningUnconfiguredError,
    TrustDomainError,
    UnavailableError,
)
from .identity import peer as peer_identity
from .identity import spiffe
from .identity.jwt import VerifiedToken
from .identity.mint import TokenMinter, TokenSpec, request_audience, token_header
from .policy.engine import PolicySet, Verdict, WorkloadPolicies
from .policy.explain import Explanation, explain_policies
from .policy.model import Attributes, Target
from .request import CheckInput
from .response import DECISION_ID_HEADER

log = logging.getLogger(__name__)

_NO_TARGETS: frozenset[Target] = frozenset()
# context_extensions naming what a targetRefs policy targets
_TARGET_KINDS = (("service", "Service"), ("gateway", "Gateway"))
# A shed Check is worth retrying soon: the load that shed it is measured in milliseconds.
_RETRY_AFTER: tuple[Header, ...] = (("retry-after", "1"),)
_MEMO_SIZE = 8192  # remembered decisions in all; all forgotten past it
# Requests whose keyed strings (host, path, the headers the rules read) are longer are decided
# afresh and not remembered: callers choose them, and 8,192 keys of 60 KB would be ~475 MB.
_MEMO_KEY_CHARS = 1024
# A remembered decision and the peer and token it was made for.
_Seen = tuple[peer_identity.Peer | None, VerifiedToken | None, Decision]
_DENY_MESSAGES = {"denied_by_policy": "a DENY policy matched"}  # else no ALLOW matched


class Authorizer:
    """Turns one :class:`CheckInput` into one :class:`Decision`; never raises."""

    def __init__(
        self,
        policies: PolicySet,
        settings: Settings | None = None,
        *,
        minter: TokenMinter | None = None,
        remember: bool = True,
    ) -> None:
        self._policies = policies
        self.settings = settings or Settings()
        # False: every request is decided from the policies (benchmarks compare the two).
        self.remember = remember
        # Signs the tokens ``token:`` rules ask for; None: such rules fail closed (503).
        self.minter = minter
        # Headers only extauthz may set upstream: its SPIFFE ID header, and XFCC unless it is
        # trusted (then Envoy set it). A caller's copy is removed when extauthz sets none.
        untrusted = () if self.settings.trust_xfcc else (peer_identity.XFCC_HEADER,)
        self._own_headers = frozenset({self.settings.spiffe_id_header, *untrusted})
        # Decisions by workload (id -> the workload, its memo): see _check.
        self._memos: dict[int, tuple[WorkloadPolicies, dict[tuple[Any, ...], _Seen]]] = {}
        self._remembered = 0

    @property
    def policies(self) -> PolicySet:
        return self._policies

    def swap(self, policies: PolicySet) -> None:
        """Install a new compiled set; in-flight checks finish on the one they started with."""
        self._policies = policies
        self._memos.clear()  # the old set's workloads: never asked for again
        self._remembered = 0

    def refuse(self, exc: ExtAuthzError, decision_id: str = "") -> Decision:
        """The deny for an error: 401 for identity failures, 503 when extauthz's own
        configuration cannot carry out the policy or it is overloaded (with ``retry-after``),
        403 for everything else."""
        headers: tuple[Header, ...] = ()
        if isinstance(exc, IdentityError):
            outcome = Outcome.UNAUTHENTICATED
            headers = (_www_authenticate(exc.reason),)
        elif isinstance(exc, UnavailableError):
            outcome = Outcome.ERROR
            if isinstance(exc, OverloadedError):
                headers = _RETRY_AFTER
        else:
            outcome = Outcome.PERMISSION_DENIED
        return Decision(
            outcome,
            exc.reason,
            exc.message,
            decision_id or new_decision_id(),
            policy_revision=self._policies.revision,
            client_headers=headers,
        )

    def check(self, inp: CheckInput) -> Decision:
        return self._decide(inp, None, None)

    async def check_async(self, inp: CheckInput, *, wait: float) -> Decision:
        """:meth:`check`, but a token signed by a key not fetched yet may wait for the keys.

        When the issuer's keys come from the network and the token names an unknown ``kid``,
        the JWKS is refetched early (rate-limited); this waits for that fetch at most ``wait``
        seconds, without blocking the event loop, and decides once more on the same policy
        snapshot. With nothing to wait for it is exactly :meth:`check`.
        """
        decision, pending, policies = self.check_now(inp)
        if pending is None:
            return decision
        return await self.check_again(inp, decision, pending, policies, wait=wait)

    def check_now(self, inp: CheckInput) -> tuple[Decision, Future[bool] | None, PolicySet]:
        """The first half of :meth:`check_async`, without an event loop: the decision now,
        the early JWKS refetch it could wait for (None: final), and the snapshot it used.
        A transport that answers from a callback calls :meth:`check_again` only when the
        refetch is not None, and so creates no task for the common case."""
        policies = self._policies
        pending: list[Future[bool]] = []
        decision = self._decide(inp, None, None, policies, pending)
        return decision, (pending[0] if pending else None), policies

    async def check_again(
        self,
        inp: CheckInput,
        decision: Decision,
        pending: Future[bool],
        policies: PolicySet,
        *,
        wait: float,
    ) -> Decision:
        """The second half: wait at most ``wait`` s for the refetch, then decide once more on
        the same snapshot (``decision`` stands if the keys do not come)."""
        if wait <= 0:
            return decision
        try:
            fetched = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(pending)), timeout=wait
            )
        except TimeoutError:
            return decision
        if not fetched:
            return decision
        return self._decide(inp, None, None, policies)

    def explain(
        self,
        inp: CheckInput,
        *,
        claims: Mapping[str, Any] | None = None,
        policies: PolicySet | None = None,
    ) -> Explanation:
        """The decision for ``inp`` and why: every applicable policy and rule, evaluated.

        ``claims`` stand in for an already verified token (``extauthz check``, policy tests):
        they must name an issuer a RequestAuthentication of the workload trusts. ``policies``
        evaluates against that snapshot instead of the set in force (the admin service's
        replay of a recorded decision).
        """
        trace = _Trace()
        decision = self._decide(inp, claims, trace, policies)
        attrs, workload = trace.attrs, trace.workload
        results = (
            explain_policies(workload.authz, attrs)
            if attrs is not None and workload is not None
            else ()
        )
        return Explanation(
            decision,
            trace.namespace,
            trace.labels,
            attrs.principal or "" if attrs else "",
            "/".join(attrs.request_principal or ()) if attrs else "",
            results,
            trace.targets,
        )

    def _decide(
        self,
        inp: CheckInput,
        claims: Mapping[str, Any] | None,
        trace: _Trace | None,
        snapshot: PolicySet | None = None,
        refresh: list[Future[bool]] | None = None,
    ) -> Decision:
        decision_id = new_decision_id()
        policies = self._policies if snapshot is None else snapshot
        try:
            return self._check(inp, policies, decision_id, claims, trace)
        except ExtAuthzError as exc:
            if refresh is not None and isinstance(exc, TokenError) and exc.refresh is not None:
                refresh.append(exc.refresh)
            namespace, principal, spiffe_id = self._known_before(inp)
            return self.refuse(exc, decision_id).replace(
                policy_revision=policies.revision,
                namespace=namespace,
                principal=principal,
                spiffe_id=spiffe_id,
            )
        except Exception:
            # Fail closed: a bug must never become an allow or an RPC error.
            log.exception("decision %s failed; denying", decision_id)
            return Decision(
                Outcome.ERROR,
                "internal_error",
                "the authorization server failed to decide",
                decision_id,
                policy_revision=policies.revision,
            )

    def _known_before(self, inp: CheckInput) -> tuple[str, str, str]:
        """What a refused decision still knows, for telemetry: the workload's namespace, and
        the caller's principal and SPIFFE ID unless it was the caller's identity that failed
        (a 401 for a token, say)."""
        namespace = self.workload(inp)[0] or ""
        try:
            peer = peer_identity.resolve(inp, trust_xfcc=self.settings.trust_xfcc)
        except Exception:  # the refusal stands; only its description is poorer
            return namespace, "", ""
        if peer is None:
            return namespace, "", ""
        return namespace, peer.principal, peer.spiffe.uri if peer.spiffe else ""

    def workload(self, inp: CheckInput) -> tuple[str | None, str | None, frozenset[Target]]:
        """The protected workload's namespace, labels and targetRefs targets: the route's
        ``context_extensions``, else the server's defaults, else the namespace of Envoy's
        own SPIFFE ID. Pure: it reads only ``inp`` and the settings."""
        ext = inp.context_extensions
        namespace = (
            ext.get("namespace")
            or self.settings.workload_namespace
            or _namespace_of(inp.destination_principal)
        )
        labels = ext.get("labels", self.settings.workload_labels)
        # get(), not ``in``: a Headers view's get is the protobuf map's own, in C
        if ext.get("service") is None and ext.get("gateway") is None:
            return namespace, labels, _NO_TARGETS
        targets = frozenset((kind, ext[key]) for key, kind in _TARGET_KINDS if ext.get(key))
        return namespace, labels, targets

    def _check(
        self,
        inp: CheckInput,
        policies: PolicySet,
        decision_id: str,
        claims: Mapping[str, Any] | None = None,
        trace: _Trace | None = None,
    ) -> Decision:
        namespace, labels, targets = self.workload(inp)
        if trace is not None:
            trace.namespace, trace.labels, trace.targets = namespace, labels, targets
        workload = policies.for_workload(namespace, labels, targets, remember=trace is None)
        peer = peer_identity.resolve(inp, trust_xfcc=self.settings.trust_xfcc)
        if peer is not None and self.settings.trust_domains:
            _check_trust_domain(peer, self.settings.trust_domains)
        if claims is not None:
            token: VerifiedToken | None = workload.verifier.assume(claims)
        else:
            token = None if _is_cors_preflight(inp) else workload.verifier.verify(inp)
        if trace is None and claims is None and workload.memo_headers is not None and self.remember:
            # Everything the policies read is in the key: a decision seen before is reused
            # with a new id. The token is verified above every time (expiry, key rotation).
            memo = self._memo(workload)
            host, path, named = inp.host, inp.path, workload.memo_headers
            read = tuple(map(inp.headers.get, named)) if named else ()
            size = len(host) + len(path)
            for value in read:
                if value is not None:
                    size += len(value)
            if size > _MEMO_KEY_CHARS:
                return self._by_policy(inp, workload, peer, token, namespace, policies, decision_id)
            key = (id(peer), id(token), inp.method, host, path, *read)
            seen = memo.get(key)
            # The entry holds the peer and token it was made for, so their ids stay theirs.
            if seen is not None and seen[0] is peer and seen[1] is token:
                return _again(seen[2], decision_id)
            decision = self._by_policy(inp, workload, peer, token, namespace, policies, decision_id)
            self._remembered += 1
            if self._remembered > _MEMO_SIZE:  # bounded for the process: forget them all
                self._memos.clear()
                self._remembered = 1
                memo = self._memo(workload)
            memo[key] = (peer, token, decision)
            return decision
        return self._by_policy(inp, workload, peer, token, namespace, policies, decision_id, trace)

    def _memo(self, workload: WorkloadPolicies) -> dict[tuple[Any, ...], _Seen]:
        """This authorizer's remembered decisions for ``workload`` (its settings shape them)."""
        found = self._memos.get(id(workload))
        if found is not None and found[0] is workload:
            return found[1]
        memo: dict[tuple[Any, ...], _Seen] = {}
        self._memos[id(workload)] = (workload, memo)
        return memo

    def _by_policy(
        self,
        inp: CheckInput,
        workload: WorkloadPolicies,
        peer: peer_identity.Peer | None,
        token: VerifiedToken | None,
        namespace: str | None,
        policies: PolicySet,
        decision_id: str,
        trace: _Trace | None = None,
    ) -> Decision:
        """The decision of ``workload``'s policies once the caller is identified."""
        attrs = Attributes(
            inp,
            principal=peer.principal if peer else None,
            token=token,
            trusted_hops=self.settings.xff_trusted_hops,
        )
        if trace is not None:
            trace.attrs, trace.workload = attrs, workload
        verdict = workload.evaluate(attrs)
        sid = peer.spiffe if peer is not None else None
        spiffe_id = sid.uri if sid is not None else ""
        # What every outcome from here records besides its own answer (see _decision).
        basis = (decision_id, verdict, spiffe_id, peer, token, policies.revision, namespace)
        if not verdict.allowed:
            message = _DENY_MESSAGES.get(verdict.reason, "no ALLOW policy matched")
            return _decision(
                Outcome.PERMISSION_DENIED,
                verdict.reason,
                message,
                *basis,
                deny_response=verdict.deny_response,
            )
        minted: Header | None = None
        audience = ""
        if verdict.token is not None:
            try:
                audience, minted = self._mint(verdict.token, inp, peer, token, cached=trace is None)
            except ExtAuthzError as exc:
                # The rule allowed, but not without the token it promised the upstream.
                refused = self.refuse(exc, decision_id)
                return _decision(
                    refused.outcome,
                    refused.reason,
                    refused.message,
                    *basis,
                    client_headers=refused.client_headers,
                )
        upstream, remove = self._upstream_headers(
            workload, spiffe_id, token, decision_id, verdict.headers, minted
        )
        return _decision(
            Outcome.ALLOW,
            verdict.reason,
            "allowed",
            *basis,
            upstream,
            remove,
            token_audience=audience,
        )

    def _mint(
        self,
        spec: TokenSpec,
        inp: CheckInput,
        peer: peer_identity.Peer | None,
        token: VerifiedToken | None,
        *,
        cached: bool,
    ) -> tuple[str, Header]:
        """The audience and the header of the token ``spec`` asks for; raise if none can be."""
        if self.minter is None:
            raise TokenSigningUnconfiguredError(
                "the allowing rule mints a token for the upstream, but the server runs "
                "without --signing-key"
            )
        actor = peer.spiffe.uri if peer is not None and peer.spiffe is not None else ""
        subject = (token.subject if token is not None else "") or actor
        if not subject:
            raise TokenMintError(
                "the allowing rule mints a token, but the caller has neither a token subject "
                "nor a SPIFFE ID to put in it"
            )
        audience = spec.audience or request_audience(inp.host)
        if not audience:
            raise TokenMintError(
                "the allowing rule mints a token for the request's host, but it has none"
            )
        jwt = self.minter.mint(
            spec, audience=audience, subject=subject, actor=actor, original=token, cached=cached
        )
        return audience, token_header(spec, jwt)

    def _upstream_headers(
        self,
        workload: WorkloadPolicies,
        spiffe_id: str,
        token: VerifiedToken | None,
        decision_id: str,
        rule_headers: tuple[Header, ...],
        minted: Header | None = None,
    ) -> tuple[tuple[Header, ...], tuple[str, ...]]:
        managed = workload.managed_headers(self._own_headers)
        # A policy's static header never stands in for an identity header left unset.
        out: list[Header] = [h for h in rule_headers if h[0] not in managed] if rule_headers else []
        remove: list[str] = []
        if token is not None:
            provider = token.provider
            out.extend(token.claim_headers)
            if provider.output_payload_to_header:
                out.append((provider.output_payload_to_header, token.payload_segment))
            if token.location.kind == "header":
                # Beside a minted token the original goes upstream only if asked for and
                # under another name; in the same header the minted one replaces it.
                keep = provider.forward_original_token and (
                    minted is None or minted[0] != token.location.name
                )
                if not keep:
                    remove.append(token.location.name)
        if minted is not None:
            out = [h for h in out if h[0] != minted[0]]
            out.append(minted)
        # Written last so that they win even if a claim header had the same name.
        out.append((DECISION_ID_HEADER, decision_id))
        if spiffe_id:
            out.append((self.settings.spiffe_id_header, spiffe_id))
        # Strip every identity header a caller could have forged and we did not set.
        written = dict(out)  # names (the pairs' keys), built in C
        forged = managed.difference(written)
        if forged:
            remove.extend(sorted(forged))
        # Envoy removes after it sets: a header both written and removed would be lost.
        if any(h in written for h in remove):
            remove = [h for h in remove if h not in written]
        return tuple(out), tuple(remove)


_ID = Decision._fields.index("decision_id")
_UPSTREAM = Decision._fields.index("upstream_headers")


def _again(seen: Decision, decision_id: str) -> Decision:
    """A remembered decision under a new id (also in the upstream header that carries it)."""
    fields = list(seen)
    fields[_ID] = decision_id
    upstream = seen.upstream_headers
    if upstream:
        entry = (DECISION_ID_HEADER, seen.decision_id)
        fields[_UPSTREAM] = tuple(
            (DECISION_ID_HEADER, decision_id) if h == entry else h for h in upstream
        )
    return Decision._make(fields)


def _decision(
    outcome: Outcome,
    reason: str,
    message: str,
    decision_id: str,
    verdict: Verdict,
    spiffe_id: str,
    peer: peer_identity.Peer | None,
    token: VerifiedToken | None,
    revision: str,
    namespace: str | None,
    upstream: tuple[Header, ...] = (),
    remove: tuple[str, ...] = (),
    *,
    client_headers: tuple[Header, ...] = (),
    deny_response: DenyResponse | None = None,
    token_audience: str = "",
) -> Decision:
    """A decision reached by policy: the verdict's, the caller's and the token's fields."""
    shadow = verdict.dry_run
    return Decision(
        outcome,
        reason,
        message,
        decision_id,
        verdict.policy,
        verdict.rule,
        verdict.audit,
        shadow.allowed if shadow is not None else None,
        shadow.policy if shadow is not None else "",
        spiffe_id,
        peer.principal if peer is not None else "",
        token.issuer if token is not None else "",
        token.subject if token is not None else "",
        revision,
        upstream,
        remove,
        client_headers,
        deny_response,
        token_audience,
        peer.source if peer is not None else "",
        namespace or "",
        token.audiences if token is not None else (),
        token.claims if token is not None else _NO_CLAIMS,
    )


class _Trace:
    """What an explanation needs from inside one decision; None on the request path."""

    namespace: str | None = None
    labels: str | None = None
    targets: frozenset[Target] = frozenset()
    attrs: Attributes | None = None
    workload: WorkloadPolicies | None = None


def _check_trust_domain(peer: peer_identity.Peer, trusted: frozenset[str]) -> None:
    """With an allow-list, only SPIFFE peers of those trust domains are callers at all."""
    if peer.spiffe is None:
        raise TrustDomainError(
            f"peer {peer.principal!r} is not a SPIFFE ID; only trust domains "
            f"{sorted(trusted)} are accepted"
        )
    if peer.spiffe.trust_domain not in trusted:
        raise TrustDomainError(
            f"trust domain {peer.spiffe.trust_domain!r} is not one of {sorted(trusted)}"
        )


def _namespace_of(principal: str) -> str | None:
    if not principal.startswith(spiffe.SCHEME):
        return None
    try:
        return spiffe.parse(principal).namespace or None
    except SpiffeIdError:
        return None


def _is_cors_preflight(inp: CheckInput) -> bool:
    # Browsers send preflights without credentials; Envoy's jwt_authn lets them through.
    h = inp.headers
    return inp.method == "OPTIONS" and "origin" in h and "access-control-request-method" in h


def _www_authenticate(reason: str) -> Header:
    error = "invalid_request" if reason == "jwt_multiple" else "invalid_token"
    return (
        "www-authenticate",
        f'Bearer realm="extauthz", error="{error}", error_description="{reason}"',
    )
