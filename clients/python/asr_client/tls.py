"""TLS channel credentials from PEM files: the server's CA, and for mTLS the client's own certificate and key."""

from __future__ import annotations

from pathlib import Path

import grpc

__all__ = ["tls_credentials"]


def tls_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Credentials for `AsrClient(target, tls_credentials(...))`.

    `ca_file`: the CA bundle that signs the server's certificate; empty: the system's root certificates.
    `cert_file`, `key_file`: the client certificate chain and its key, for servers that require client
    certificates (mTLS); both or neither.
    """
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key: give both cert_file and key_file, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
