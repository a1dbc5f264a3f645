"""Running the app with uvicorn on a socket bound first (so the real port, also for port 0, is
known before any client connects): in the foreground (`minlora serve`) or on a background
thread (tests, `minlora bench serve`, embedding)."""
from __future__ import annotations

import socket
import threading
import time
from typing import Optional

from .app import create_app
from .service import Service

__all__ = ["Server"]


class Server:
    """`Server(service, host, port)`: bound at once; `run()` blocks, `start()` runs on a thread."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000, *,
                 log_level: str = "warning") -> None:
        import uvicorn

        self.service = service
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.sock.listen(1024)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(service), log_level=log_level, access_log=False,
                                timeout_keep_alive=65, lifespan="on")
        self._uvicorn = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serves until interrupted (SIGINT / SIGTERM in the main thread) or stop()."""
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 30.0) -> "Server":
        """Serves on a daemon thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.run, name="minlora-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stops serving (requests in flight finish) and closes the service."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.service.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
