"""Requests described in YAML/JSON, for ``extauthz check`` and ``policy test`` cases.

A description names what Envoy would send (method, host, path, headers, the mTLS peer) and
either a real ``token`` (verified as a request's would be) or ``claims`` taken as verified::

    method: GET
    host: orders.shop
    path: /api/orders?page=2
    principal: spiffe://cluster.local/ns/shop/sa/frontend
    claims: {iss: https://idp.example, sub: alice, groups: [admin]}
    namespace: shop            # the protected workload (Envoy's context_extensions)
    labels: {app: orders}
    service: orders            # for policies with targetRefs (or gateway: <name>)
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .errors import ConfigError
from .policy.source import Node
from .request import CheckInput, split_path

_KEYS = (
    "method",
    "host",
    "path",
    "headers",
    "principal",
    "source_ip",
    "destination_ip",
    "destination_port",
    "sni",
    "token",
    "claims",
    "namespace",
    "labels",
    "service",
    "gateway",
)


@dataclass(frozen=True, slots=True)
class Probe:
    """A described request: the CheckInput Envoy would send, plus claims taken as verified."""

    input: CheckInput
    claims: Mapping[str, Any] | None


def _where(node: Any, key: str | None = None) -> str:
    if isinstance(node, Node) and node.file:
        return f"{node.file}:{node.line_of(key) if key else node.line}: "
    return ""


def _fail(node: Any, key: str | None, message: str) -> ConfigError:
    return ConfigError(f"{_where(node, key)}request{'.' + key if key else ''}: {message}")


def _string(node: Mapping[str, Any], key: str, default: str) -> str:
    value = node.get(key, default)
    if not isinstance(value, str):
        raise _fail(node, key, "must be a string")
    return value


def _labels(node: Mapping[str, Any]) -> str | None:
    value = node.get("labels")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()):
        return ",".join(f"{k}={v}" for k, v in value.items())
    raise _fail(node, "labels", "must be 'a=b,c=d' or a map of strings")


def parse_probe(node: Any) -> Probe:
    """Build a :class:`Probe`; errors name the file, line and field when known."""
    if not isinstance(node, Mapping):
        raise _fail(node, None, "must be a mapping")
    for key in node:
        if key not in _KEYS:
            hint = difflib.get_close_matches(str(key), _KEYS, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise _fail(node, None, f"unknown field {key!r}{suggestion}; known: {', '.join(_KEYS)}")
    headers_in = node.get("headers") or {}
    if not isinstance(headers_in, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers_in.items()
    ):
        raise _fail(node, "headers", "must map header names to strings")
    headers = {k.lower(): v for k, v in headers_in.items()}
    token = _string(node, "token", "")
    if token and "authorization" not in headers:
        headers["authorization"] = f"Bearer {token}"
    claims = node.get("claims")
    if claims is not None and not isinstance(claims, Mapping):
        raise _fail(node, "claims", "must be a map of claims")
    if claims is not None and token:
        raise _fail(node, "claims", "give token or claims, not both")
    port = node.get("destination_port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise _fail(node, "destination_port", "must be a port number")
    host = _string(node, "host", "")
    method = _string(node, "method", "GET")
    raw_path = _string(node, "path", "/")
    path, query = split_path(raw_path)
    extensions = {
        k: v
        for k, v in (
            ("namespace", node.get("namespace")),
            ("labels", _labels(node)),
            ("service", node.get("service")),
            ("gateway", node.get("gateway")),
        )
        if v is not None
    }
    for key, value in extensions.items():
        if not isinstance(value, str):
            raise _fail(node, key, "must be a string")
    inp = CheckInput(
        method=method,
        host=host.lower(),
        path=path,
        query=query,
        scheme="https",
        protocol="HTTP/1.1",
        # Envoy sends the pseudo-headers too; policies may ask for request.headers[:path].
        headers=MappingProxyType(
            {":authority": host, ":method": method, ":path": raw_path, **headers}
        ),
        source_ip=_string(node, "source_ip", "127.0.0.1"),
        destination_ip=_string(node, "destination_ip", "127.0.0.1"),
        destination_port=port,
        source_principal=_string(node, "principal", ""),
        sni=_string(node, "sni", ""),
        context_extensions=MappingProxyType(extensions),
    )
    return Probe(inp, MappingProxyType(dict(claims)) if claims is not None else None)
