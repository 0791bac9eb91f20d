"""TLS and mTLS on the gRPC port, certificates made here with trustme: the Python client and a raw grpc.aio channel
connect, plaintext and wrong clients are refused, a rotated certificate is served to new connections without a
restart, and the bearer token works over TLS with duplicate `authorization` entries refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr_client import AsyncAsrClient, UnauthenticatedError, tls_credentials
from asr_client.cli import main as cli_main
from asr_server.config import Config, TlsConfig
from asr_server.edge.server import AsrServer
from qwenasr.v1 import asr_pb2 as pb
from qwenasr.v1 import asr_pb2_grpc as pb_grpc
from tests.helpers import fake_config, tone, wav_bytes, with_server

HOST = "127.0.0.1"
# The failed handshakes below should fail fast, not wait out a long connect backoff.
CALL_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Pki:
    """A server CA, its server certificate (for 127.0.0.1 and localhost), a client CA and its client certificate,
    written as PEM files."""

    dir: Path
    server_ca: trustme.CA
    client_ca: trustme.CA
    client_cert: trustme.LeafCert

    def path(self, name: str) -> str:
        return str(self.dir / name)


def write_atomically(path: Path, data: bytes) -> None:
    # As a secret volume or cert-manager rotates: the new file replaces the old in one rename.
    staged = path.with_suffix(".tmp")
    staged.write_bytes(data)
    os.replace(staged, path)


def write_server_cert(pki_dir: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert(HOST, "localhost")
    write_atomically(pki_dir / "server.pem", b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    write_atomically(pki_dir / "server.key", leaf.private_key_pem.bytes())
    write_atomically(pki_dir / "server-ca.pem", ca.cert_pem.bytes())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    write_server_cert(tmp_path, server_ca)
    client_cert = client_ca.issue_cert("caller.example")
    (tmp_path / "client.pem").write_bytes(b"".join(blob.bytes() for blob in client_cert.cert_chain_pems))
    (tmp_path / "client.key").write_bytes(client_cert.private_key_pem.bytes())
    (tmp_path / "client-ca.pem").write_bytes(client_ca.cert_pem.bytes())
    return Pki(tmp_path, server_ca, client_ca, client_cert)


def tls_config(pki: Pki, *, mtls: bool = False, auth_token: str = "") -> Config:
    base = with_server(fake_config(), auth_token=auth_token)
    tls = TlsConfig(
        cert_file=pki.path("server.pem"),
        key_file=pki.path("server.key"),
        client_ca_file=pki.path("client-ca.pem") if mtls else "",
        require_client_cert=mtls,
    )
    return dataclasses.replace(base, tls=tls)


@contextlib.asynccontextmanager
async def tls_server(config: Config) -> AsyncIterator[AsrServer]:
    server = AsrServer(config)
    try:
        await server.start()
        yield server
    finally:
        await server.stop(grace_s=1.0)


def secure_channel(port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(f"{HOST}:{port}", credentials)


async def check(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
    )
    return int(response.status)


async def refused_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check(channel)
    await channel.close()
    return caught.value.code()


def served_issuer(port: int, ca_file: str) -> x509.Name:
    """The issuer of the certificate a new TLS connection is served (read with Python's ssl, offering h2)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((HOST, port), timeout=CALL_TIMEOUT_S) as raw:
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).issuer


def ca_subject(ca: trustme.CA) -> x509.Name:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject


def wav_request() -> pb.TranscribeRequest:
    return pb.TranscribeRequest(audio=wav_bytes(tone(1.0, seed=3)))


async def test_tls_serves_the_python_client_and_a_raw_grpc_channel(pki: Pki) -> None:
    async with tls_server(tls_config(pki)) as server:
        assert server.config.tls.enabled
        async with AsyncAsrClient(f"{HOST}:{server.port}", tls_credentials(ca_file=pki.path("server-ca.pem"))) as client:
            assert await client.health() == "SERVING"
            results = await client.transcribe(wav_bytes(tone(1.0, seed=3)))
            assert results[0].text
        channel = secure_channel(server.port, grpc.ssl_channel_credentials(pki.server_ca.cert_pem.bytes()))
        response = await pb_grpc.AsrServiceStub(channel).Transcribe(wav_request(), timeout=CALL_TIMEOUT_S)
        assert response.transcripts[0].text == results[0].text
        await channel.close()
        # The CLI is synchronous: off the loop the server runs on.
        argv = ["--target", f"{HOST}:{server.port}", "--tls-ca-file", pki.path("server-ca.pem"), "health"]
        assert await asyncio.to_thread(cli_main, argv) == 0


async def test_plaintext_and_an_untrusted_server_certificate_are_refused(pki: Pki) -> None:
    async with tls_server(tls_config(pki)) as server:
        assert await refused_code(grpc.aio.insecure_channel(f"{HOST}:{server.port}")) == grpc.StatusCode.UNAVAILABLE
        # A client trusting another CA does not accept this server's certificate either.
        elsewhere = grpc.ssl_channel_credentials(trustme.CA().cert_pem.bytes())
        assert await refused_code(secure_channel(server.port, elsewhere)) == grpc.StatusCode.UNAVAILABLE
        argv = ["--target", f"{HOST}:{server.port}", "--timeout-s", "3", "health"]
        assert await asyncio.to_thread(cli_main, argv) == 1


async def test_mtls_refuses_clients_without_a_certificate_or_with_one_from_another_ca(pki: Pki) -> None:
    root = pki.server_ca.cert_pem.bytes()
    async with tls_server(tls_config(pki, mtls=True)) as server:
        no_cert = grpc.ssl_channel_credentials(root)
        assert await refused_code(secure_channel(server.port, no_cert)) == grpc.StatusCode.UNAVAILABLE
        stranger = trustme.CA().issue_cert("caller.example")
        foreign = grpc.ssl_channel_credentials(
            root, stranger.private_key_pem.bytes(), b"".join(b.bytes() for b in stranger.cert_chain_pems)
        )
        assert await refused_code(secure_channel(server.port, foreign)) == grpc.StatusCode.UNAVAILABLE

        credentials = tls_credentials(pki.path("server-ca.pem"), pki.path("client.pem"), pki.path("client.key"))
        async with AsyncAsrClient(f"{HOST}:{server.port}", credentials) as client:
            assert (await client.transcribe(wav_bytes(tone(1.0, seed=3))))[0].text
        argv = [
            "--target", f"{HOST}:{server.port}", "--tls-ca-file", pki.path("server-ca.pem"),
            "--tls-cert-file", pki.path("client.pem"), "--tls-key-file", pki.path("client.key"), "health",
        ]
        assert await asyncio.to_thread(cli_main, argv) == 0


async def test_a_rotated_certificate_is_served_to_new_connections_without_a_restart(pki: Pki) -> None:
    async with tls_server(tls_config(pki)) as server:
        old_ca_file = pki.path("old-ca.pem")
        Path(old_ca_file).write_bytes(pki.server_ca.cert_pem.bytes())
        assert served_issuer(server.port, old_ca_file) == ca_subject(pki.server_ca)
        kept = secure_channel(server.port, grpc.ssl_channel_credentials(pki.server_ca.cert_pem.bytes()))
        assert await check(kept) == health_pb2.HealthCheckResponse.SERVING

        new_ca = trustme.CA()
        write_server_cert(pki.dir, new_ca)
        assert served_issuer(server.port, pki.path("server-ca.pem")) == ca_subject(new_ca)
        assert server.certificates is not None and server.certificates.reloads == 1
        fresh = secure_channel(server.port, tls_credentials(ca_file=pki.path("server-ca.pem")))
        assert await check(fresh) == health_pb2.HealthCheckResponse.SERVING
        await fresh.close()
        # A new connection trusting only the old CA no longer gets through; the connection made before goes on.
        stale = secure_channel(server.port, grpc.ssl_channel_credentials(pki.server_ca.cert_pem.bytes()))
        assert await refused_code(stale) == grpc.StatusCode.UNAVAILABLE
        assert await check(kept) == health_pb2.HealthCheckResponse.SERVING
        await kept.close()


async def test_a_half_rotated_pair_keeps_the_served_certificate(pki: Pki) -> None:
    async with tls_server(tls_config(pki)) as server:
        # The certificate of a new CA beside the old key: unusable, so the old pair goes on being served.
        new_ca = trustme.CA()
        new_leaf = new_ca.issue_cert(HOST)
        write_atomically(pki.dir / "server.pem", new_leaf.cert_chain_pems[0].bytes())
        channel = secure_channel(server.port, grpc.ssl_channel_credentials(pki.server_ca.cert_pem.bytes()))
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        await channel.close()
        Path(pki.path("old-ca.pem")).write_bytes(pki.server_ca.cert_pem.bytes())
        assert served_issuer(server.port, pki.path("old-ca.pem")) == ca_subject(pki.server_ca)
        # Its key arrives: the next connection gets the new pair.
        write_atomically(pki.dir / "server.key", new_leaf.private_key_pem.bytes())
        Path(pki.path("new-ca.pem")).write_bytes(new_ca.cert_pem.bytes())
        assert served_issuer(server.port, pki.path("new-ca.pem")) == ca_subject(new_ca)


async def test_bearer_token_over_tls_and_duplicate_authorization_refused(pki: Pki) -> None:
    async with tls_server(tls_config(pki, auth_token="s3cret")) as server:
        channel = secure_channel(server.port, grpc.ssl_channel_credentials(pki.server_ca.cert_pem.bytes()))
        stub = pb_grpc.AsrServiceStub(channel)
        right, wrong = ("authorization", "Bearer s3cret"), ("authorization", "Bearer guess")
        assert (await stub.Transcribe(wav_request(), metadata=[right], timeout=CALL_TIMEOUT_S)).transcripts[0].text
        for metadata in ([wrong, right], [right, right], [right, wrong]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Transcribe(wav_request(), metadata=metadata, timeout=CALL_TIMEOUT_S)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "exactly one" in (caught.value.details() or "")
        await channel.close()
        credentials = tls_credentials(ca_file=pki.path("server-ca.pem"))
        async with AsyncAsrClient(f"{HOST}:{server.port}", credentials, auth_token="s3cret") as client:
            assert (await client.transcribe(wav_bytes(tone(1.0, seed=3))))[0].text
        async with AsyncAsrClient(f"{HOST}:{server.port}", credentials) as client:
            with pytest.raises(UnauthenticatedError):
                await client.transcribe(wav_bytes(tone(1.0, seed=3)))


async def test_files_missing_mid_rotation_keep_the_served_certificate(pki: Pki) -> None:
    async with tls_server(tls_config(pki)) as server:
        (pki.dir / "server.key").unlink()
        channel = secure_channel(server.port, grpc.ssl_channel_credentials(pki.server_ca.cert_pem.bytes()))
        assert await check(channel) == health_pb2.HealthCheckResponse.SERVING
        await channel.close()
        assert server.certificates is not None and server.certificates.reloads == 0
        new_ca = trustme.CA()
        write_server_cert(pki.dir, new_ca)
        assert served_issuer(server.port, pki.path("server-ca.pem")) == ca_subject(new_ca)
        assert server.certificates.reloads == 1
