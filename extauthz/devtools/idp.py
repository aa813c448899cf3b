"""A development identity provider: one EC key, its JWKS, and tokens on demand. Dev only."""

from __future__ import annotations

import hashlib
import json
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from ..identity.jwks import DISCOVERY_PATH
from .pki import KeyPair


@dataclass(frozen=True)
class DevIdP:
    """Signs ES256 tokens as ``issuer``; :meth:`jwks` is what a RequestAuthentication trusts."""

    issuer: str
    key: ec.EllipticCurvePrivateKey
    kid: str = "dev-1"

    @classmethod
    def create(cls, issuer: str, kid: str = "dev-1") -> DevIdP:
        return cls(issuer, ec.generate_private_key(ec.SECP256R1()), kid)

    def jwks(self) -> str:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="ES256", use="sig")
        return json.dumps({"keys": [jwk]}, indent=2)

    def token(
        self,
        subject: str,
        *,
        audience: str | list[str] | None = None,
        ttl: float = 600,
        issued: float | None = None,
        **claims: Any,
    ) -> str:
        """A signed token; a negative ``ttl`` makes an expired one."""
        now = time.time() if issued is None else issued
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "iat": int(now),
            "exp": int(now + ttl),
            **claims,
        }
        if audience is not None:
            payload["aud"] = audience
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})


class IdpServer:
    """OIDC discovery and a JWKS endpoint on 127.0.0.1, over HTTPS with ``tls``. Dev only.

    Serves the keys of the :class:`DevIdP` objects given to :meth:`publish` (their issuer
    should be :attr:`issuer`), with ``Cache-Control: max-age`` and an ``ETag``. For tests it
    counts requests per path, and it can misbehave: :meth:`stop` takes it down (connections
    refused) and :meth:`start` brings it back on the same port; ``delay`` answers slowly,
    ``status`` answers with that HTTP status, ``garbage`` with a body that is not JSON.
    """

    JWKS_PATH = "/jwks"

    def __init__(self, tls: KeyPair | None = None, *, max_age: int | None = 300) -> None:
        self.max_age = max_age
        self.delay = 0.0
        self.status = 200
        self.garbage = False
        self.requests: Counter[str] = Counter()
        self._published: tuple[DevIdP, ...] = ()
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if tls is not None:
            self._tmp = tempfile.TemporaryDirectory(prefix="extauthz-idp-")
            cert, key = Path(self._tmp.name, "cert.pem"), Path(self._tmp.name, "key.pem")
            cert.write_bytes(tls.cert_pem)
            key.write_bytes(tls.key_pem)
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(cert, key)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.start()

    @property
    def issuer(self) -> str:
        scheme = "https" if self._context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + self.JWKS_PATH

    def publish(self, *idps: DevIdP) -> None:
        """Serve exactly these keys from now on (a rotation drops the ones left out)."""
        with self._lock:
            self._published = idps

    def fetches(self, path: str = JWKS_PATH) -> int:
        with self._lock:
            return self.requests[path]

    def start(self) -> None:
        if self._httpd is not None:
            return
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        httpd.daemon_threads = True
        if self._context is not None:
            httpd.socket = self._context.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="dev-idp", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _document(self, path: str) -> bytes | None:
        if path == DISCOVERY_PATH:
            doc: dict[str, Any] = {"issuer": self.issuer, "jwks_uri": self.jwks_uri}
        elif path == self.JWKS_PATH:
            keys = [k for idp in self._published for k in json.loads(idp.jwks())["keys"]]
            doc = {"keys": keys}
        else:
            return None
        return json.dumps(doc).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests[path] += 1
                    delay, status, garbage = server.delay, server.status, server.garbage
                    body = server._document(path)
                if delay:
                    time.sleep(delay)
                if body is None or status != 200:
                    self.send_response(404 if body is None else status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if garbage:
                    body = b"<html>not a key set</html>"
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                fresh = self.headers.get("If-None-Match") == etag
                self.send_response(304 if fresh else 200)
                self.send_header("ETag", etag)
                if server.max_age is not None:
                    self.send_header("Cache-Control", f"max-age={server.max_age}")
                if fresh:
                    self.end_headers()
                    return
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
