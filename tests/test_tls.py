"""TLS and mTLS on extauthz's own gRPC listener, and certificates rotated without a restart."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import external_auth_pb2_grpc
from test_reload import check_request

from extauthz.authorizer import Authorizer
from extauthz.cli import _tls, parser
from extauthz.devtools.pki import DevCA, KeyPair
from extauthz.errors import ConfigError
from extauthz.policy.engine import PolicySet
from extauthz.server import Server
from extauthz.telemetry import Telemetry
from extauthz.tls import ReloadingCredentials, TlsFiles


@pytest.fixture(scope="module")
def cas() -> tuple[DevCA, DevCA]:
    return DevCA.create("server.test"), DevCA.create("envoy.test")


def _write(directory: Path, name: str, pair: KeyPair) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return cert, key


def _server_pair(ca: DevCA, name: str = "extauthz") -> KeyPair:
    return ca.issue_cert(common_name=name, ip_addresses=["127.0.0.1"])


async def _serving(files: TlsFiles) -> tuple[Server, ReloadingCredentials]:
    creds = ReloadingCredentials(files)
    server = Server(Authorizer(PolicySet.empty()), Telemetry(None), listen="127.0.0.1:0", tls=creds)
    await server.start()
    return server, creds


@pytest.fixture
async def mtls(
    tmp_path: Path, cas: tuple[DevCA, DevCA]
) -> AsyncIterator[tuple[Server, ReloadingCredentials, Path]]:
    server_ca, client_ca = cas
    cert, key = _write(tmp_path, "server", _server_pair(server_ca))
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem)
    server, creds = await _serving(TlsFiles(cert, key, tmp_path / "client-ca.pem"))
    yield server, creds, tmp_path
    await server.stop()


async def _check(port: int, creds: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = await stub.Check(check_request("/a"), timeout=5)
    return int(response.status.code)


def _client(ca: DevCA, pair: KeyPair | None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem, private_key=pair.key_pem, certificate_chain=pair.cert_pem
    )


async def test_tls_answers_and_plaintext_is_refused(
    tmp_path: Path, cas: tuple[DevCA, DevCA]
) -> None:
    cert, key = _write(tmp_path, "server", _server_pair(cas[0]))
    server, _ = await _serving(TlsFiles(cert, key))
    try:
        assert await _check(server.port, _client(cas[0], None)) == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(check_request("/a"), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop()


async def test_mtls_requires_a_client_certificate_from_the_client_ca(
    mtls: tuple[Server, ReloadingCredentials, Path], cas: tuple[DevCA, DevCA]
) -> None:
    server, _, _ = mtls
    server_ca, client_ca = cas
    envoy = client_ca.issue_svid("spiffe://envoy.test/ns/shop/sa/sidecar")
    assert await _check(server.port, _client(server_ca, envoy)) == 0
    stranger = DevCA.create("other.test").issue_svid("spiffe://other.test/x")
    for creds in (_client(server_ca, None), _client(server_ca, stranger)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _check(server.port, creds)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _served_certificate(port: int, ca: DevCA, client: KeyPair, tmp: Path) -> x509.Certificate:
    """The leaf certificate a new TLS connection is shown."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    cert, key = _write(tmp, "probe-client", client)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_a_rotated_certificate_is_served_without_a_restart(
    mtls: tuple[Server, ReloadingCredentials, Path], cas: tuple[DevCA, DevCA]
) -> None:
    server, creds, directory = mtls
    server_ca, client_ca = cas
    envoy = client_ca.issue_svid("spiffe://envoy.test/ns/shop/sa/sidecar")
    first = _served_certificate(server.port, server_ca, envoy, directory)
    _write(directory, "server", _server_pair(server_ca, "extauthz-rotated"))
    second = _served_certificate(server.port, server_ca, envoy, directory)
    assert first.serial_number != second.serial_number
    assert "extauthz-rotated" in second.subject.rfc4514_string()
    assert creds.reloads == 1
    assert await _check(server.port, _client(server_ca, envoy)) == 0


async def test_a_broken_rotation_keeps_the_last_good_certificate(
    mtls: tuple[Server, ReloadingCredentials, Path], cas: tuple[DevCA, DevCA]
) -> None:
    server, creds, directory = mtls
    server_ca, client_ca = cas
    envoy = client_ca.issue_svid("spiffe://envoy.test/ns/shop/sa/sidecar")
    first = _served_certificate(server.port, server_ca, envoy, directory)
    # A new certificate next to the old key: caught mid-rotation, or a mistake.
    (directory / "server.pem").write_bytes(_server_pair(server_ca, "mismatch").cert_pem)
    again = _served_certificate(server.port, server_ca, envoy, directory)
    assert again.serial_number == first.serial_number
    assert creds.failures == 1
    assert await _check(server.port, _client(server_ca, envoy)) == 0


def test_load_time_errors_name_the_files(tmp_path: Path, cas: tuple[DevCA, DevCA]) -> None:
    cert, key = _write(tmp_path, "server", _server_pair(cas[0]))
    other_cert, _ = _write(tmp_path, "other", _server_pair(cas[0], "other"))
    with pytest.raises(ConfigError, match="is not the key of"):
        ReloadingCredentials(TlsFiles(other_cert, key))
    with pytest.raises(ConfigError, match="cannot read"):
        ReloadingCredentials(TlsFiles(tmp_path / "missing.pem", key))
    (tmp_path / "junk.pem").write_text("not pem")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        ReloadingCredentials(TlsFiles(tmp_path / "junk.pem", key))
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "encrypted.pem").write_bytes(encrypted)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        ReloadingCredentials(TlsFiles(cert, tmp_path / "encrypted.pem"))
    for flags, message in (
        (["--tls-cert", str(cert)], "go together"),
        (["--tls-client-ca", str(cert)], "needs --tls-cert"),
    ):
        with pytest.raises(ConfigError, match=message):
            _tls(parser().parse_args(["serve", *flags]))


async def test_a_request_over_the_message_size_limit_is_refused_by_grpc() -> None:
    """4 MiB: far above what Envoy sends (its request headers are capped at 60 KiB by
    default); gRPC refuses more before extauthz reads it, so Envoy applies its failure mode."""
    from extauthz.server import MAX_MESSAGE_BYTES

    server = Server(Authorizer(PolicySet.empty()), Telemetry(None), listen="127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", -1)]
        ) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            fits = check_request("/a")
            fits.attributes.request.http.headers["x-big"] = "a" * (MAX_MESSAGE_BYTES - 1024)
            assert (await stub.Check(fits, timeout=5)).status.code == 0
            too_big = check_request("/a")
            too_big.attributes.request.http.headers["x-big"] = "a" * MAX_MESSAGE_BYTES
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Check(too_big, timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop()
