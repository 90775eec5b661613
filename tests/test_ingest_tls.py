"""DICOM TLS (PS3.15 B.1) with a throwaway CA made here: a peer with a certificate of that CA
stores, a plain-TCP peer and a peer without a client certificate get nowhere."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.uid import CTImageStorage
from pynetdicom import AE, build_context

from node.config import Settings
from node.ingest import NodeServer
from tests.conftest import make_ct_series, wait_until


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _issue(directory: Path, stem: str, subject: str, ca: Issued | None) -> Issued:
    """Write ``<stem>.pem`` and ``<stem>.key``: a CA (``ca`` None) or a leaf signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if ca is None else ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(key if ca is None else ca[1], hashes.SHA256())
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = _issue(tmp_path, "ca", "liver-node test CA", None)
    _issue(tmp_path, "server", "localhost", ca)
    _issue(tmp_path, "client", "SCANNER", ca)
    _issue(tmp_path, "rogue-ca", "rogue CA", None)
    return tmp_path


def _client_context(pki: Path, *, cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert:
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return context


def _store(port: int, tls: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, [build_context(CTImageStorage)], ae_title="LIVERNODE",
                         tls_args=(tls, "localhost") if tls is not None else None)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_store(make_ct_series(n=1)[0]).Status) == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("processes", [1, 2])
def test_tls_with_client_certificates(
    pki: Path, tmp_path: Path, free_port: Callable[[], int], processes: int
) -> None:
    """With 2 listener processes connections alternate between them: each case is seen by
    both (the handshake happens in the process that serves the connection)."""
    settings = Settings(port=free_port(), spool_dir=tmp_path / "spool", min_free_bytes=0,
                        tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                        tls_ca=str(pki / "ca.pem"), listener_processes=processes)
    rogue = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                       cafile=str(pki / "rogue-ca.pem"))
    with NodeServer(settings, lambda *_: None) as node:
        for _ in range(2):
            assert _store(node.port, _client_context(pki))
            assert not _store(node.port, None)  # plain TCP to a TLS port
            assert not _store(node.port, _client_context(pki, cert=False))  # no client cert
            assert not _store(node.port, rogue)  # the client does not trust the node
            assert _store(node.port, _client_context(pki))
        assert node.metrics.received == (4 if processes == 1 else 2)
        assert wait_until(lambda: node.total_metrics().received == 4, 5.0)
