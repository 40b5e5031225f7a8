"""A TCP proxy between a client and a broker that a test can break on purpose.

    with TcpProxy(6379) as proxy:             # listens on 127.0.0.1:proxy.port
        url = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.drop()        # reset every open connection now (RST both ways); new ones pass
        proxy.blackhole()   # a network partition: sockets stay open, no byte moves either
                            # way, new connections are accepted and held, unanswered
        proxy.reject()      # the broker's host is up, the broker is not: every new
                            # connection is reset at once (and open ones are dropped)
        proxy.restore()     # pass traffic again; held connections resume where they were

Pure Python, threads: one accept loop, and two pumps per connection. A black hole stops
the pumps reading, so the kernel buffers fill and both ends see silence, as across a
partition; ``restore()`` lets the same connections carry on, as a healed partition would
(unless an end gave up meanwhile). Starts in well under 10 ms.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType
from typing import Literal

Mode = Literal["pass", "blackhole", "reject"]
_TICK = 0.05  # seconds between looks at the mode and the closing flag


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0), as a crashed peer or a firewall."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its upstream connection (made once traffic may pass)."""

    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="tcp-proxy-link", daemon=True).start()

    def _run(self) -> None:
        # Held while black-holed: the client thinks it is connected; nothing answers.
        if not self.proxy.wait_flowing(self.closed):
            return
        try:
            self.upstream = socket.create_connection(self.proxy.target, timeout=5)
        except OSError:
            self.close(reset=True)
            return
        upstream = self.upstream
        pump = threading.Thread(
            target=self._pump, args=(upstream, self.client), name="tcp-proxy-up", daemon=True
        )
        pump.start()
        self._pump(self.client, upstream)
        pump.join()
        self.close(reset=False)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while not self.closed.is_set():
            if not self.proxy.wait_flowing(self.closed):
                return
            try:
                ready, _, _ = select.select([source], [], [], _TICK)
                if not ready:
                    continue
                if not self.proxy.wait_flowing(self.closed):  # black-holed meanwhile
                    return
                data = source.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except (OSError, ValueError):  # the other pump or drop() closed a socket
                self.close(reset=True)
                return

    def close(self, *, reset: bool) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is not None:
                if reset:
                    _reset(sock)
                else:
                    with contextlib.suppress(OSError):
                        sock.close()
        self.proxy.forget(self)


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``host:target_port`` until ``close()``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_TICK)
        self.port: int = self._listener.getsockname()[1]
        self._mode: Mode = "pass"
        self._changed = threading.Condition()
        self._links: set[_Link] = set()
        self._closing = False
        #: Connections accepted so far (a client that reconnects shows up here).
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- controls ---------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def open_connections(self) -> int:
        with self._changed:
            return len(self._links)

    def drop(self) -> int:
        """Reset every open connection now (both ends get an RST); returns how many."""
        with self._changed:
            links = list(self._links)
        for link in links:
            link.close(reset=True)
        return len(links)

    def blackhole(self) -> None:
        """Stop forwarding in both directions, keep every socket open, hold new ones."""
        self._set("blackhole")

    def reject(self) -> None:
        """Reset open connections and every new one: a host whose broker is down."""
        self._set("reject")
        self.drop()

    def restore(self) -> None:
        """Forward again; connections held by a black hole carry on."""
        self._set("pass")

    def close(self) -> None:
        self._closing = True
        self._set("reject")
        self._thread.join(timeout=5)
        self._listener.close()
        self.drop()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the machinery ----------------------------------------------------------------------

    def _set(self, mode: Mode) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def wait_flowing(self, closed: threading.Event) -> bool:
        """Block while black-holed; True once traffic may pass, False if the link is done."""
        with self._changed:
            while self._mode == "blackhole" and not closed.is_set():
                self._changed.wait(_TICK)
            return self._mode == "pass" and not closed.is_set()

    def forget(self, link: _Link) -> None:
        with self._changed:
            self._links.discard(link)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._mode == "reject":
                _reset(client)
                continue
            client.setblocking(True)
            link = _Link(self, client)
            with self._changed:
                self._links.add(link)
            link.start()
