"""A TCP proxy for fault tests: forwards to a server until told to stop answering.

``freeze()`` stops forwarding in both directions while keeping every connection open, and
new connections are still accepted (and connected upstream) but never answered: what a
client sees of a server behind a dead network path or a hung host. Nothing times out on
its own: TCP keepalives see a live proxy. ``thaw()`` lets the held bytes through again.
``cut()`` closes every connection (a reset), the listener stays.
"""

from __future__ import annotations

import selectors
import socket
import threading
from types import TracebackType
from typing import Self

POLL_S = 0.05
CHUNK = 65536


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL_S)
        self.port = int(self._listener.getsockname()[1])
        self._frozen = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.connections = 0  # accepted so far
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    def url(self, url: str, port: int) -> str:
        """``url`` with its port ``:port`` replaced by the proxy's."""
        return url.replace(f":{port}/", f":{self.port}/", 1)

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    @property
    def frozen(self) -> bool:
        return self._frozen.is_set()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        _close(self._listener)
        self.cut()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1  # counted on accept: the client may be gone before upstream answers
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), name=f"proxy-{self.port}-pump",
                             daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until either side closes; while frozen, read nothing."""
        peer = {a: b, b: a}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            while not self._closed.is_set():
                if self._frozen.is_set():
                    self._frozen_wait()
                    continue
                try:
                    ready = sel.select(POLL_S)
                    for key, _ in ready:
                        data = key.fileobj.recv(CHUNK)  # type: ignore[union-attr]
                        if not data:
                            raise ConnectionError("closed")
                        peer[key.fileobj].sendall(data)  # type: ignore[index]
                except OSError:
                    break
        _close(a)
        _close(b)

    def _frozen_wait(self) -> None:
        self._closed.wait(POLL_S)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
