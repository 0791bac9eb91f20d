"""TLS and mTLS server credentials whose certificate files are re-read when they change (rotation without restart).

gRPC calls the fetcher before each new TLS handshake; it stats the files (cheap) and only when one changed (mtime,
size or inode: cert-manager and Kubernetes secret volumes swap a symlink) reads them and hands gRPC a new
configuration. Connections already open keep the certificate they were set up with. A new pair that gRPC cannot use
(the key of the old certificate beside the new one, half written) is refused by gRPC itself, which keeps the old one
and logs why; the next change of a file is tried again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import grpc

from asr_server.config import TlsConfig

logger = logging.getLogger(__name__)

# (st_mtime_ns, st_size, st_ino) of each file, in the order cert, key, client CA.
_Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class CertificateFiles:
    cert_file: str
    key_file: str
    client_ca_file: str = ""

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def signature(self) -> _Signature:
        stats = [os.stat(path) for path in self.paths()]
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats)

    def load(self) -> grpc.ServerCertificateConfiguration:
        chain = _read(self.cert_file)
        key = _read(self.key_file)
        roots = _read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)


def _read(path: str) -> bytes:
    with open(path, "rb") as pem:
        return pem.read()


class ReloadingCertificates:
    """The certificate-configuration fetcher: a new configuration when the files changed since the last load."""

    def __init__(self, files: CertificateFiles) -> None:
        self._files = files
        # gRPC may call the fetcher from several of its threads at once.
        self._lock = threading.Lock()
        self._signature = files.signature()
        self.initial = files.load()
        self.reloads = 0
        self._unreadable = False

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                signature = self._files.signature()
                if signature == self._signature:
                    return None
                configuration = self._files.load()
            except OSError as exc:
                # Mid-rotation a file may be missing for a moment: keep serving the certificate loaded last. Said
                # once, not at every handshake, until the files are readable again.
                if not self._unreadable:
                    logger.warning("TLS certificate files unreadable, keeping the current ones: %s", exc)
                self._unreadable = True
                return None
            self._unreadable = False
            self._signature = signature
            self.reloads += 1
        logger.info("TLS certificate files changed: loaded them for new connections (%s)", self._files.cert_file)
        return configuration


def server_credentials(tls: TlsConfig) -> tuple[grpc.ServerCredentials, ReloadingCertificates]:
    files = CertificateFiles(tls.cert_file, tls.key_file, tls.client_ca_file)
    fetcher = ReloadingCertificates(files)
    # gRPC documents None from the fetcher as "keep the current configuration"; grpc-stubs types it without None.
    fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], fetcher)
    credentials = grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetch, require_client_authentication=tls.require_client_cert
    )
    return credentials, fetcher
