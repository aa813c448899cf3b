"""Fixtures shared by more than one test module.

``ca`` and ``idp``: a dev CA and a real HTTPS IdP on 127.0.0.1 with a certificate from it
(remote JWKS, OIDC discovery, the unknown-kid refetch: ``test_jwks_remote.py``,
``test_httpserver.py``). A module that defines its own ``ca`` or ``idp`` uses that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.devtools.idp import IdpServer
from extauthz.devtools.pki import DevCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[DevCA, Path]:
    authority = DevCA.create("idp.test")
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(authority.cert_pem)
    return authority, path


@pytest.fixture
def idp(ca: tuple[DevCA, Path]) -> Iterator[IdpServer]:
    pair = ca[0].issue_cert(common_name="127.0.0.1", ip_addresses=["127.0.0.1"])
    with IdpServer(pair) as server:
        yield server
