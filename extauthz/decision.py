"""Decisions: immutable values that know nothing of protobuf.

:mod:`extauthz.response` maps them to a CheckResponse at the edge; telemetry and the audit
log read the same value, so what Envoy enforces and what is recorded cannot drift apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, NamedTuple


class Outcome(Enum):
    """The four answers. Only ALLOW lets the request through."""

    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"  # identity failed: 401
    PERMISSION_DENIED = "permission_denied"  # policy said no: 403
    ERROR = "error"  # extauthz could not decide: fail closed, 503


Header = tuple[str, str]
NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DenyResponse:
    """A policy's own answer to a denied caller, replacing the default 403 JSON body."""

    status: int
    headers: tuple[Header, ...]
    body: str
    content_type: str


class Decision(NamedTuple):
    """One authorization decision and everything it asks Envoy to do.

    ``upstream_headers``/``remove_headers`` apply on allow (to the request going upstream);
    ``client_headers`` go to the caller on deny (e.g. ``www-authenticate``);
    ``deny_response``, set by an ``extauthz.io`` policy, replaces the default deny status/body.
    ``token_audience`` is the ``aud`` of the token minted for the upstream ("" if none).
    ``identity_source`` says where the caller's identity was read (``source.principal``,
    ``certificate``, ``xfcc``); ``audiences`` and ``claims`` are the verified token's, for
    the decision log (claims are left out of equality and repr: they are request data).
    ``namespace`` is the protected workload's (the one whose policies decided), ``audiences``
    the verified token's ``aud``: both for telemetry.

    A NamedTuple rather than a frozen dataclass: it is built on every Check, and a tuple is
    built in one step (a frozen dataclass sets each of its 23 fields with
    ``object.__setattr__``: ~5 µs). ``claims`` stays last: equality and repr skip it.
    """

    outcome: Outcome
    reason: str
    message: str
    decision_id: str
    policy: str = ""
    rule: str = ""
    audit: tuple[str, ...] = ()
    dry_run_allowed: bool | None = None
    dry_run_policy: str = ""
    spiffe_id: str = ""
    principal: str = ""
    issuer: str = ""
    subject: str = ""
    policy_revision: str = ""
    upstream_headers: tuple[Header, ...] = ()
    remove_headers: tuple[str, ...] = ()
    client_headers: tuple[Header, ...] = ()
    deny_response: DenyResponse | None = None
    token_audience: str = ""
    identity_source: str = ""
    namespace: str = ""
    audiences: tuple[str, ...] = ()
    claims: Mapping[str, Any] = NO_CLAIMS

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    def replace(self, **changes: Any) -> Decision:
        """A copy with ``changes`` (the fields by name)."""
        return self._replace(**changes)

    # Claims are request data: left out of equality and repr, as before.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return self[:-1] == other[:-1]

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self[:-1])

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={value!r}" for name, value in zip(self._fields[:-1], self[:-1], strict=True)
        )
        return f"Decision({shown})"


def new_decision_id() -> str:
    """128 random bits as hex: unique enough to look a decision up, cheap to make."""
    return os.urandom(16).hex()
