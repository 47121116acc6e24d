"""An ASGI app served by uvicorn in a background thread: the reference API's and the collector's.

Its own layer, below the services that use it and above the flow's packages:
the flow never imports uvicorn (import-linter, pyproject.toml).
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any, Self

import uvicorn

from nudgeflow.core.errors import ServiceError

__all__ = ["LOOPBACK", "AsgiThread"]

LOOPBACK = "127.0.0.1"


class AsgiThread:
    """Serves `app` with uvicorn in a daemon thread; a context manager.

    Port 0 picks a free port: the socket is bound here, before the thread starts,
    so `url` is known at once and no other process can take the port meanwhile.
    On exit the server shuts down and the thread is joined.
    """

    def __init__(
        self,
        app: Any,
        *,
        name: str,
        host: str = LOOPBACK,
        port: int = 0,
        http: str = "auto",
        graceful_shutdown_s: int = 5,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self._app = app
        self._name = name
        self._host = host
        self._port = port
        self._http = http
        self._graceful_shutdown_s = graceful_shutdown_s
        self._startup_timeout_s = startup_timeout_s
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """`http://HOST:PORT`, once started."""
        if self._url is None:
            msg = f"the {self._name} is not started"
            raise RuntimeError(msg)
        return self._url

    def start(self) -> None:
        # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets
        # only then, and without it every response waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._socket = sock
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, http=self._http,
            ws="none",  # no optional websockets import, no surprise warnings
            lifespan="on", timeout_graceful_shutdown=self._graceful_shutdown_s,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=self._name, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                msg = f"the {self._name} did not start on {self._host}:{self._port}"
                raise ServiceError(msg)
            time.sleep(0.005)  # a start-up poll, not a test's wait
        host, port = sock.getsockname()[:2]
        self._url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._url = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
