"""Running the app under uvicorn: the socket is bound before anything says "serving on", and a drained shutdown
exits 0.

``listen`` binds host:port itself (uvicorn would bind only once the app had loaded, and a port in use or a bad
host then ended in its exit status 3 after the "serving on" line). ``serve`` runs uvicorn on that socket; on
SIGTERM or SIGINT the bridge starts draining at once (``AsyncEngine.drain``: 503 to new requests, /ready 503),
uvicorn waits for the open responses, and the process ends with ``serve``'s return value — uvicorn itself re-raises
the signal after a graceful shutdown, so a clean drain used to die of SIGTERM (status 143).
"""

from __future__ import annotations

import contextlib
import errno
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from nextscale.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

# ``serve``'s exit statuses besides 0 (every accepted request finished): the drain timed out and abandoned requests
# (their clients got 503), or a second signal forced the exit without draining.
EXIT_ABANDONED, EXIT_FORCED = 1, 130
# uvicorn's own limit on waiting for open responses, past the drain timeout: the bridge answers the requests it
# abandons at the drain timeout, so this only ends responses stuck on a client that stopped reading.
GRACE_S = 5.0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: any free port; ``getsockname`` says which), for ``serve``. A host that
    does not resolve, an address not on this machine or a port in use is a one-line ``ConfigError`` naming
    host:port and the OS's reason."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot serve on {where}: {e.strerror} (--host)") from None
    except (UnicodeError, OverflowError) as e:  # an over-long or non-IDNA host name; a port past 65535
        raise ConfigError(f"cannot serve on {where}: {e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # as uvicorn does: a restarted server may bind while the old one's connections sit in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = "; choose another --port (0: any free port)" if e.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"cannot serve on {where}: {e.strerror}{hint}") from None
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server, calling ``on_exit`` when a signal asks it to stop and not re-raising the signal once it has
    stopped (which made a drained process die of SIGTERM)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's, less the re-raise: signals can only be handled in the main thread
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.on_exit()


def serve(app: FastAPI, sock: socket.socket, drain_timeout: float) -> int:
    """Serve ``app`` (``serve.api.create_app``'s) on ``sock`` until SIGTERM or SIGINT, drain for up to
    ``drain_timeout`` seconds, and return the exit status: 0 when every accepted request finished,
    ``EXIT_ABANDONED`` when the drain timed out, ``EXIT_FORCED`` when a second signal cut it short."""
    bridge = app.state.bridge
    grace = math.ceil(drain_timeout + GRACE_S)  # uvicorn takes whole seconds
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace)
    server = DrainingServer(config, on_exit=lambda: bridge.drain(drain_timeout))
    server.run(sockets=[sock])
    if server.force_exit:
        return EXIT_FORCED
    return EXIT_ABANDONED if bridge.abandoned else 0
