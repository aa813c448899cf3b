"""The request model: a frozen, proto-free view of one CheckRequest.

Built once per Check by :func:`from_check_request`; everything after this module (identity,
policy, response) works on :class:`CheckInput` and never sees a protobuf. Keeping the proto
walk in one place is what lets the rest be tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import RequestError

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What Envoy told us about one HTTP request, normalised.

    ``path`` is the raw path without the query (Envoy sends them joined in ``path``; its
    ``query`` field is always empty). ``headers`` keys are lower-case; duplicate headers are
    comma-joined as Envoy does. ``peer_certificate`` is the URL-encoded PEM Envoy sends with
    ``include_peer_certificate``. ``context_extensions`` are the per-route strings set in the
    Envoy config (extauthz reads ``namespace`` and ``labels`` from them).
    """

    method: str = ""
    host: str = ""
    path: str = "/"
    query: str = ""
    scheme: str = ""
    protocol: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    request_id: str = ""
    source_ip: str = ""
    source_port: int = 0
    destination_ip: str = ""
    destination_port: int = 0
    source_principal: str = ""
    destination_principal: str = ""
    peer_certificate: str = ""
    sni: str = ""
    context_extensions: Mapping[str, str] = field(default_factory=lambda: _EMPTY)


def split_path(raw: str) -> tuple[str, str]:
    """Split Envoy's ``path`` attribute into path and query (a fragment never reaches us)."""
    path, _, query = raw.partition("?")
    return (path or "/"), query


def _socket(address: Any) -> tuple[str, int]:
    if address.HasField("socket_address"):
        sa = address.socket_address
        return sa.address, sa.port_value
    if address.HasField("pipe"):
        return address.pipe.path, 0
    return "", 0


def _headers(http: Any) -> Mapping[str, str]:
    if http.headers:
        return MappingProxyType(dict(http.headers))
    if not http.HasField("header_map"):
        return _EMPTY
    # encode_raw_headers: repeated entries, values possibly only in raw_value (bytes).
    merged: dict[str, str] = {}
    for hv in http.header_map.headers:
        key = hv.key.lower()
        value = hv.value if hv.value else hv.raw_value.decode("utf-8", "replace")
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return MappingProxyType(merged)


def from_check_request(req: Any) -> CheckInput:
    """Build the model from an ``envoy.service.auth.v3.CheckRequest``.

    Raises :class:`RequestError` when the request has no HTTP attributes at all (ext_authz on
    a TCP listener), which extauthz does not authorize.
    """
    attrs = req.attributes
    if not attrs.request.HasField("http"):
        raise RequestError("CheckRequest has no attributes.request.http (network filter?)")
    http = attrs.request.http
    headers = _headers(http)
    path, query = split_path(http.path or headers.get(":path", "/"))
    src_ip, src_port = _socket(attrs.source.address)
    dst_ip, dst_port = _socket(attrs.destination.address)
    return CheckInput(
        method=http.method or headers.get(":method", ""),
        host=(http.host or headers.get(":authority", "")).lower(),
        path=path,
        query=query,
        scheme=http.scheme,
        protocol=http.protocol,
        headers=headers,
        request_id=http.id,
        source_ip=src_ip,
        source_port=src_port,
        destination_ip=dst_ip,
        destination_port=dst_port,
        source_principal=attrs.source.principal,
        destination_principal=attrs.destination.principal,
        peer_certificate=attrs.source.certificate,
        sni=attrs.tls_session.sni if attrs.HasField("tls_session") else "",
        context_extensions=(
            MappingProxyType(dict(attrs.context_extensions)) if attrs.context_extensions else _EMPTY
        ),
    )
