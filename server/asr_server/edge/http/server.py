"""uvicorn serving the HTTP front's app inside the server's event loop, started and stopped by AsrServer.

Not `uvicorn.Server.serve()`: it installs its own SIGINT/SIGTERM handlers (signal.signal, replacing the loop's
handlers that edge/server.py's `serve` set), ends the HTTP server by itself on SIGTERM while gRPC calls drain, and
re-raises the signal when it returns. `serve()`'s own steps are run instead (startup, main_loop, shutdown), so the
server's one shutdown sequence decides when HTTP stops: after the drain, with the gRPC port.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from asr_server.config import TlsConfig

logger = logging.getLogger(__name__)

# After the drain, requests still running past the grace get this long before uvicorn cancels them.
_SHUTDOWN_S = 1  # whole seconds: uvicorn's setting is an int


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket for host:port (0: a free port); raises OSError as bind does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and accepted connections
    # inherit it. Without it a keep-alive connection's next response (head and body written apart) waits out
    # Nagle and the client's delayed ACK: ~40-50 ms a request, measured with bench/http_vs_grpc.py.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # As the gRPC port: a port of a server that just exited (TIME_WAIT) is free to use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    return sock


class HttpFront:
    def __init__(self, app: ASGIApp, host: str, port: int, tls: TlsConfig | None = None) -> None:
        self._app = app
        self._tls = tls
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listens (raises OSError when the port cannot be bound) and serves; returns the port."""
        self._socket = listening_socket(self._host, self._port)
        self.port = int(self._socket.getsockname()[1])
        # log_config=None: the server's logging (text or JSON) stays as the CLI set it; our access log covers
        # requests. lifespan off: the app has no startup of its own, AsrServer starts it.
        config = uvicorn.Config(
            self._app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=_SHUTDOWN_S,
            server_header=False,
            **_tls_settings(self._tls),
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        self._loop_task = asyncio.create_task(server.main_loop())
        return self.port

    async def stop(self) -> None:
        """Closes the port and the connections; requests still running get _SHUTDOWN_S, then are cancelled."""
        server, self._server = self._server, None
        if server is None:
            if self._socket is not None:
                self._socket.close()
            return
        server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
        await server.shutdown(sockets=[self._socket] if self._socket is not None else None)


def _tls_settings(tls: TlsConfig | None) -> dict[str, Any]:
    """The server's --tls-* files as uvicorn's settings: the same certificate as the gRPC port, client
    certificates required with --tls-require-client-cert. Read once at start (no rotation on this port)."""
    if tls is None or not tls.enabled:
        return {}
    settings: dict[str, Any] = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.require_client_cert:
        settings.update(ssl_ca_certs=tls.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return settings
