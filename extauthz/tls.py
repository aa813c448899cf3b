"""TLS and mTLS for extauthz's own gRPC listener, with certificates reloaded without a restart.

gRPC asks :class:`ReloadingCredentials` for the certificate configuration at every new TLS
handshake; it answers from memory and re-reads the files only when their modification time
or size changed (cert-manager and SPIRE rotate them in place). A rotation that leaves the
files unreadable or mismatched keeps the last good configuration and logs why: a half-written
key must not take the listener down.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """``--tls-cert``/``--tls-key``, and ``--tls-client-ca`` to require client certificates."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def _stamp(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


def _load(files: TlsFiles) -> tuple[bytes, bytes, bytes | None]:
    """Read and check the files: a certificate, its key, and they match."""
    cert, key = files.cert.read_bytes(), files.key.read_bytes()
    try:
        leaf = x509.load_pem_x509_certificate(cert)
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: an encrypted key (no password to give); UnsupportedAlgorithm: e.g. DSA.
        raise ConfigError(
            f"{files.cert} / {files.key}: not a PEM certificate and key: {exc}"
        ) from exc
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaf_public = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != leaf_public:
        raise ConfigError(f"{files.key} is not the key of {files.cert}")
    ca = files.client_ca.read_bytes() if files.client_ca else None
    if ca is not None:
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise ConfigError(f"{files.client_ca}: not PEM certificates: {exc}") from exc
    return cert, key, ca


class ReloadingCredentials:
    """Server credentials whose certificate configuration follows the files."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._paths = [files.cert, files.key, *([files.client_ca] if files.client_ca else [])]
        try:
            self._loaded = _load(files)
            self._stamp = _stamp(self._paths)
        except OSError as exc:
            raise ConfigError(f"TLS: cannot read {exc.filename}: {exc.strerror}") from exc
        self._lock = threading.Lock()
        self.reloads = 0
        self.failures = 0

    def credentials(self) -> Any:
        cert, key, ca = self._loaded
        return grpc.dynamic_ssl_server_credentials(
            self._config(cert, key, ca),
            self._fetch,
            require_client_authentication=self.files.client_ca is not None,
        )

    @staticmethod
    def _config(cert: bytes, key: bytes, ca: bytes | None) -> Any:
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> Any:
        """Called by gRPC at each handshake: a new configuration, or None to keep the last."""
        with self._lock:
            try:
                stamp = _stamp(self._paths)
            except OSError:
                return None  # mid-rotation (a file renamed away): ask again next handshake
            if stamp == self._stamp:
                return None
            self._stamp = stamp  # good or bad, look again only when the files change again
            try:
                loaded = _load(self.files)
            except (OSError, ConfigError) as exc:
                self.failures += 1
                log.warning("TLS: keeping the current certificate; the new one fails: %s", exc)
                return None
            self._loaded = loaded
            self.reloads += 1
            log.info("TLS: certificate reloaded from %s", self.files.cert)
            return self._config(*loaded)
