"""The request model: an immutable, proto-free view of one CheckRequest.

Built once per Check by :func:`from_check_request`; everything after this module (identity,
policy, response) works on :class:`CheckInput` and never sees a protobuf. Keeping the proto
walk in one place is what lets the rest be tested with plain values.

Reading a protobuf field costs ~0.2-0.5 µs and copying Envoy's header map into a dict ~10 µs,
so the model reads eagerly only what every decision needs (method, host, path, the peer
principal, the route's context extensions); the headers are read in place through
:class:`Headers`, and the addresses, ports, SNI, certificate and the like are read from the
request on first access (policies and the decision log that ask for them pay for them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any, NamedTuple

from .errors import RequestError, SpiffeIdError

_EMPTY: Mapping[str, str] = MappingProxyType({})
_set = object.__setattr__


class Headers(Mapping[str, str]):
    """The request's headers, read in place from Envoy's ``headers`` map: no copy per Check.

    Read-only; the request message it reads is owned by this Check and never modified.
    """

    __slots__ = ("_map", "get")
    _map: Any

    def __init__(self, source: Any) -> None:
        _set(self, "_map", source)
        # The map's own get, in C, rather than a Python method around it: headers are read by
        # name a few times per Check. (A slot, so it shadows Mapping.get.)
        _set(self, "get", source.get)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Headers are read-only ({name})")

    def __getitem__(self, key: str) -> str:
        # Never ``self._map[key]``: a protobuf map inserts a missing key on ``[]``.
        value: str | None = self._map.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def copy(self) -> dict[str, str]:
        return dict(self._map)


def _socket(address: Any) -> tuple[str, int]:
    if address.HasField("socket_address"):
        sa = address.socket_address
        return sa.address, sa.port_value
    if address.HasField("pipe"):
        return address.pipe.path, 0
    return "", 0


class _Connection:
    """The rarely read part of a request, read from the proto in one go on first access."""

    __slots__ = (
        "destination_ip",
        "destination_port",
        "destination_principal",
        "peer_certificate",
        "protocol",
        "request_id",
        "scheme",
        "sni",
        "source_ip",
        "source_port",
    )

    def __init__(
        self,
        scheme: str = "",
        protocol: str = "",
        request_id: str = "",
        source_ip: str = "",
        source_port: int = 0,
        destination_ip: str = "",
        destination_port: int = 0,
        destination_principal: str = "",
        peer_certificate: str = "",
        sni: str = "",
    ) -> None:
        self.scheme = scheme
        self.protocol = protocol
        self.request_id = request_id
        self.source_ip = source_ip
        self.source_port = source_port
        self.destination_ip = destination_ip
        self.destination_port = destination_port
        self.destination_principal = destination_principal
        self.peer_certificate = peer_certificate
        self.sni = sni

    @classmethod
    def read(cls, attrs: Any) -> _Connection:
        http = attrs.request.http
        src_ip, src_port = _socket(attrs.source.address)
        dst_ip, dst_port = _socket(attrs.destination.address)
        return cls(
            http.scheme,
            http.protocol,
            http.id,
            src_ip,
            src_port,
            dst_ip,
            dst_port,
            attrs.destination.principal,
            attrs.source.certificate,
            attrs.tls_session.sni if attrs.HasField("tls_session") else "",
        )


_FIELDS = (
    "method",
    "host",
    "path",
    "query",
    "scheme",
    "protocol",
    "headers",
    "request_id",
    "source_ip",
    "source_port",
    "destination_ip",
    "destination_port",
    "source_principal",
    "destination_principal",
    "peer_certificate",
    "sni",
    "context_extensions",
)


class CheckInput:
    """What Envoy told us about one HTTP request, normalised. Immutable: every field is a
    read-only property.

    ``path`` is the raw path without the query (Envoy sends them joined in ``path``; its
    ``query`` field is always empty). ``headers`` keys are lower-case; duplicate headers are
    comma-joined as Envoy does. ``peer_certificate`` is the URL-encoded PEM Envoy sends with
    ``include_peer_certificate``. ``context_extensions`` are the per-route strings set in the
    Envoy config (extauthz reads ``namespace`` and ``labels`` from them).
    """

    __slots__ = (
        "_attrs",
        "_conn",
        "_context_extensions",
        "_headers",
        "_host",
        "_method",
        "_path",
        "_query",
        "_source_principal",
    )

    def __init__(
        self,
        method: str = "",
        host: str = "",
        path: str = "/",
        query: str = "",
        scheme: str = "",
        protocol: str = "",
        headers: Mapping[str, str] = _EMPTY,
        request_id: str = "",
        source_ip: str = "",
        source_port: int = 0,
        destination_ip: str = "",
        destination_port: int = 0,
        source_principal: str = "",
        destination_principal: str = "",
        peer_certificate: str = "",
        sni: str = "",
        context_extensions: Mapping[str, str] = _EMPTY,
    ) -> None:
        self._method = method
        self._host = host
        self._path = path
        self._query = query
        self._headers = headers
        self._source_principal = source_principal
        self._context_extensions = context_extensions
        self._attrs: Any = None
        self._conn: _Connection | None = _Connection(
            scheme,
            protocol,
            request_id,
            source_ip,
            source_port,
            destination_ip,
            destination_port,
            destination_principal,
            peer_certificate,
            sni,
        )

    @classmethod
    def _read(
        cls,
        attrs: Any,
        method: str,
        host: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        context_extensions: Mapping[str, str],
    ) -> CheckInput:
        """The model of a request whose rarely read fields stay in ``attrs`` until asked."""
        inp = cls.__new__(cls)
        inp._method = method
        inp._host = host
        inp._path = path
        inp._query = query
        inp._headers = headers
        inp._source_principal = attrs.source.principal
        inp._context_extensions = context_extensions
        inp._attrs = attrs
        inp._conn = None
        return inp

    def detached(self) -> CheckInput:
        """This request without the CheckRequest's body: what a queue or a record that
        outlives the Check may keep (``with_request_body`` bodies can be megabytes)."""
        if self._attrs is None:  # built from fields, not read from a CheckRequest
            return self
        http = self._attrs.request.http
        if not http.body and not http.raw_body:
            return self
        attrs = type(self._attrs)()
        attrs.CopyFrom(self._attrs)
        attrs.request.http.ClearField("body")
        attrs.request.http.ClearField("raw_body")
        ext = attrs.context_extensions
        return CheckInput._read(
            attrs,
            self._method,
            self._host,
            self._path,
            self._query,
            _headers(attrs.request.http),
            Headers(ext) if ext else _EMPTY,
        )

    @property
    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None:
            # Two threads (a Check and the decision-log writer) may both read: equal values.
            conn = self._conn = _Connection.read(self._attrs)
        return conn

    @property
    def method(self) -> str:
        return self._method

    @property
    def host(self) -> str:
        return self._host

    @property
    def path(self) -> str:
        return self._path

    @property
    def query(self) -> str:
        return self._query

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def source_principal(self) -> str:
        return self._source_principal

    @property
    def context_extensions(self) -> Mapping[str, str]:
        return self._context_extensions

    @property
    def scheme(self) -> str:
        return self._connection.scheme

    @property
    def protocol(self) -> str:
        return self._connection.protocol

    @property
    def request_id(self) -> str:
        return self._connection.request_id

    @property
    def source_ip(self) -> str:
        return self._connection.source_ip

    @property
    def source_port(self) -> int:
        return self._connection.source_port

    @property
    def destination_ip(self) -> str:
        return self._connection.destination_ip

    @property
    def destination_port(self) -> int:
        return self._connection.destination_port

    @property
    def destination_principal(self) -> str:
        return self._connection.destination_principal

    @property
    def peer_certificate(self) -> str:
        return self._connection.peer_certificate

    @property
    def sni(self) -> str:
        return self._connection.sni

    def _values(self) -> tuple[Any, ...]:
        return tuple(
            dict(v) if isinstance(v, Mapping) else v for v in map(self.__getattribute__, _FIELDS)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CheckInput):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mappings inside: not hashable

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"CheckInput({fields})"


def split_path(raw: str) -> tuple[str, str]:
    """Split Envoy's ``path`` attribute into path and query (a fragment never reaches us)."""
    path, _, query = raw.partition("?")
    return (path or "/"), query


def client_ip(inp: CheckInput, trusted_hops: int) -> str:
    """Istio's ``remote.ip``: the client address behind ``trusted_hops`` trusted proxies."""
    if trusted_hops <= 0:
        return inp.source_ip
    xff = [a.strip() for a in inp.headers.get("x-forwarded-for", "").split(",") if a.strip()]
    if len(xff) <= trusted_hops:
        # Fewer entries than trusted proxies: nothing in XFF is trustworthy (Envoy's rule).
        return inp.source_ip
    return xff[-trusted_hops - 1]


def _headers(http: Any) -> Mapping[str, str]:
    headers = http.headers
    if headers:
        return Headers(headers)
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
    request = attrs.request
    if not request.HasField("http"):
        raise RequestError("CheckRequest has no attributes.request.http (network filter?)")
    http = request.http
    headers = _headers(http)
    path, query = split_path(http.path or headers.get(":path", "/"))
    ext = attrs.context_extensions
    return CheckInput._read(
        attrs,
        http.method or headers.get(":method", ""),
        (http.host or headers.get(":authority", "")).lower(),
        path,
        query,
        headers,
        Headers(ext) if ext else _EMPTY,
    )


# --- Envoy's ext_authz http_service -----------------------------------------------------
# Envoy sends the original method, the path after ``path_prefix``, and the headers its
# ``allowed_headers`` let through; no peer attributes, no context_extensions. Those come in
# one header that Envoy's ``authorization_request.headers_to_add`` sets (one line):
#     x-extauthz-peer: namespace=shop;labels=app=orders;src=%DOWNSTREAM_REMOTE_ADDRESS%;
#                      dst=%DOWNSTREAM_LOCAL_ADDRESS%;uri=%DOWNSTREAM_PEER_URI_SAN%
# ``src``, ``dst`` and ``uri`` are the connection's; every other field is a context
# extension (the workload's namespace and labels, as a route's context_extensions). The
# value is never empty, so Envoy always sets it and overrides a client's copy (an empty
# formatter result would let a client's header through).

PEER_HEADER = "x-extauthz-peer"
TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
# Envoy's framing of the check request, not the client's request.
# x-envoy-internal too: Envoy's HTTP client marks every check with it, so over HTTP it says
# nothing of the client's request (a policy trusting it would trust every caller).
_NOT_REQUEST_HEADERS = frozenset(
    {PEER_HEADER, TIMEOUT_HEADER, "content-length", "x-envoy-internal"}
)


class _Peer(NamedTuple):
    principal: str = ""
    source_ip: str = ""
    source_port: int = 0
    destination_ip: str = ""
    destination_port: int = 0
    context_extensions: Mapping[str, str] = _EMPTY


_NO_PEER = _Peer()


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return value, 0  # a pipe path, or nothing
    return host.strip("[]"), int(port)


def _peer_fields(value: str) -> _Peer:
    # One value per client connection, repeated on each of its requests: cached, and
    # bounded in size by leaving long values uncached.
    return _parse_peer(value) if len(value) > 512 else _cached_peer(value)


def _parse_peer(value: str) -> _Peer:
    """The fields of :data:`PEER_HEADER`.

    ``uri`` comes last and takes the rest of the value: a URI may hold ``;``. Several URI
    SANs (Envoy joins them with ``,``) are refused (401), as are two ``uri`` fields. The
    field starts the value or follows a ``;``: a label key ending in ``uri`` is no field.
    """
    if value.startswith("uri="):
        head, sep, uris = "", "uri=", value[4:]
    else:
        head, sep, uris = value.partition(";uri=")
    if not sep:
        raise RequestError(f"{PEER_HEADER}: no uri= field (is Envoy's headers_to_add set?)")
    if ";uri=" in uris:
        # Two values joined (Envoy joins repeated headers with ','): Envoy's replaces a
        # client's, so this is no request of the documented config; believe neither.
        raise RequestError(f"{PEER_HEADER}: two uri= fields")
    if "," in uris:
        # Envoy joins several URI SANs with ',': which one is the SPIFFE ID, and whether a
        # SAN itself held the ',', cannot be told. An SVID has exactly one URI SAN.
        raise SpiffeIdError(f"{PEER_HEADER}: several URI SANs (an SVID has one)")
    fields = dict(part.partition("=")[::2] for part in head.split(";") if part)
    src_ip, src_port = _address(fields.pop("src", ""))
    dst_ip, dst_port = _address(fields.pop("dst", ""))
    return _Peer(
        uris.strip(),
        src_ip,
        src_port,
        dst_ip,
        dst_port,
        MappingProxyType(fields) if fields else _EMPTY,
    )


_cached_peer = lru_cache(maxsize=1024)(_parse_peer)


def from_http(method: str, target: str, headers: dict[str, str], prefix: str = "") -> CheckInput:
    """Build the model from an ext_authz ``http_service`` request.

    ``target`` is the request target, ``prefix`` Envoy's ``path_prefix`` in front of the
    client's path. ``headers`` (lower-case names, repeated ones comma-joined) is taken over:
    Envoy's own headers are removed, the client's ``host`` becomes ``:authority`` and the
    pseudo-headers a CheckRequest carries are added, so policies read the same names over
    either transport. Raises :class:`RequestError` for a target outside ``prefix``.
    """
    if prefix:
        rest = target[len(prefix) :]
        if not target.startswith(prefix) or rest[:1] not in ("", "/", "?"):
            raise RequestError(f"request target {target[:200]!r} is not under {prefix!r}")
        target = rest if rest[:1] == "/" else "/" + rest
    if not target.startswith("/"):
        raise RequestError(f"request target {target[:200]!r}: expected an origin-form path")
    value = headers.get(PEER_HEADER)
    peer = _NO_PEER if value is None else _peer_fields(value)
    for name in _NOT_REQUEST_HEADERS.intersection(headers):
        del headers[name]
    host = headers.pop("host", "").lower()
    headers[":authority"] = host
    headers[":method"] = method
    headers[":path"] = target
    path, query = split_path(target)
    return CheckInput(
        method=method,
        host=host,
        path=path,
        query=query,
        scheme=headers.get("x-forwarded-proto", ""),
        protocol="",
        headers=MappingProxyType(headers),
        request_id=headers.get("x-request-id", ""),
        source_ip=peer.source_ip,
        source_port=peer.source_port,
        destination_ip=peer.destination_ip,
        destination_port=peer.destination_port,
        source_principal=peer.principal,
        context_extensions=peer.context_extensions,
    )
