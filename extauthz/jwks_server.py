"""The public half of token exchange: extauthz's JWKS over plain HTTP (``--jwks-listen``).

Upstreams that receive minted tokens verify them with this key set, fetched like any IdP's:
``GET /.well-known/jwks.json`` and, for clients that discover it from the issuer,
``GET /.well-known/openid-configuration`` (``issuer``, ``jwks_uri``). Everything served is
public and built at start; a stdlib ``ThreadingHTTPServer`` in a daemon thread is enough for
a document that clients cache (``Cache-Control: max-age``), and keeps it off the gRPC loop.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .config import host_port
from .errors import ConfigError
from .identity.jwks import DISCOVERY_PATH
from .identity.mint import SigningKey

log = logging.getLogger(__name__)

JWKS_PATH = "/.well-known/jwks.json"
MAX_AGE_SECONDS = 300
# A Host header we are willing to echo into jwks_uri: a name or address and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    # A thread per connection: an idle or trickling client must not hold one for ever.
    timeout = 10

    def version_string(self) -> str:
        return "extauthz"  # not the Python version

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, *, head: bool) -> None:
        path = self.path.partition("?")[0]
        if path == JWKS_PATH:
            status, body = 200, self.server.jwks_body
        elif path == DISCOVERY_PATH:
            status, body = 200, self.server.discovery(self.headers.get("host", ""))
        else:
            status, body = 404, _json({"error": "not_found"})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 200:
            self.send_header("Cache-Control", f"public, max-age={MAX_AGE_SECONDS}")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("jwks %s: " + format, self.address_string(), *args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], key: SigningKey, issuer: str) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.issuer = issuer
        self.jwks_body = _json(key.jwks())
        raw, port = self.server_address[:2]
        host = raw.decode() if isinstance(raw, bytes) else raw
        self.fallback_host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.fixed_discovery: bytes | None = None
        if issuer.startswith(("https://", "http://")):
            # A URL issuer says where it lives: OIDC discovery wants jwks_uri under it.
            uri = issuer.rstrip("/") + JWKS_PATH
            self.fixed_discovery = _json({"issuer": issuer, "jwks_uri": uri})

    def discovery(self, host: str) -> bytes:
        if self.fixed_discovery is not None:
            return self.fixed_discovery
        # A bare-name issuer: point at this listener as the client reached it.
        where = host if _HOST.fullmatch(host) else self.fallback_host
        return _json({"issuer": self.issuer, "jwks_uri": f"http://{where}{JWKS_PATH}"})


class JwksServer:
    """Serves ``key``'s JWKS and a discovery document for ``issuer`` on ``listen``."""

    def __init__(self, listen: str, key: SigningKey, issuer: str) -> None:
        self.listen = listen
        self.address = host_port(listen, "--jwks-listen")
        self.key = key
        self.issuer = issuer
        self.port = 0
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            httpd = _HttpServer(self.address, self.key, self.issuer)
        except OSError as exc:
            raise ConfigError(f"--jwks-listen {self.listen}: cannot bind: {exc}") from exc
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="jwks", daemon=True
        )
        self._thread.start()
        log.info("JWKS (kid %s, %s) served on port %d", self.key.kid, self.key.algorithm, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket (blocks up to one poll interval)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
