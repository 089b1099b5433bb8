"""How the review page is served: uvicorn, in the foreground (`organizer web`) or in a thread of
the service (`organizer run --web`).

The socket is bound here, before uvicorn starts, so that a port in use is a clear error and the
address printed at start is the real one (``--port 0`` picks a free port).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading

import uvicorn

from ..config import Settings
from .app import create_app
from .security import Secrets

log = logging.getLogger(__name__)


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


class WebError(Exception):
    """The page cannot be served (the address cannot be bound)."""


def is_local(host: str) -> bool:
    """True for a loopback address (only this machine can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise WebError(f"cannot serve the review page on {host}:{port}: {exc.strerror or exc}"
                       " (another program uses that port? try --port)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class WebServer:
    """The review page on one address, with the secrets of this run."""

    def __init__(self, settings: Settings, host: str | None = None, port: int | None = None):
        web = settings.web
        self.host = host or web.host
        self.keys = Secrets(web.password.get_secret_value() if web.password else None,
                            LOOPBACK_NAMES if is_local(self.host) else None)
        self.app = create_app(settings, self.keys)
        self._sock = _bind(self.host, web.port if port is None else port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", server_header=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The address to open; it holds the token unless a password guards the page."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        base = f"http://{host}:{self.port}/"
        return base if self.keys.password else f"{base}?token={self.keys.token}"

    @property
    def warning(self) -> str | None:
        if is_local(self.host):
            return None
        return (f"warning: the review page listens on {self.host}, so other machines can reach it; "
                "anyone who has its address (with the token) or the password sees and changes your people. "
                "Leave out --host to keep it on this machine.")

    def catch_signals(self) -> None:
        """From now on SIGINT and SIGTERM stop :meth:`serve`, which then returns (exit status 0).
        uvicorn handles them itself while it runs, then sends the signal again to the handler it
        found: this one (a no-op by then; before uvicorn runs, it is what stops it)."""
        def stop(*_):
            self._server.should_exit = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)

    def serve(self) -> None:
        """Serve in this thread until stopped (see :meth:`catch_signals`)."""
        self._server.run(sockets=[self._sock])

    def start(self) -> None:
        """Serve from a thread (the service's main thread keeps its own signal handlers)."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="review-page", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
