"""A TCP relay between a proxy and the real Dovecot that can hold back what the proxy sends on one of its
backend connections, at a line of the test's choosing, until the test lets it go.

With it a test puts the backend's own unsolicited responses (NOTIFY events, which Dovecot sends while no
command of the connection is in progress) exactly where a race would put them: after the proxy sent a
command, before the backend read it. Deterministic: the test waits for what it needs to have happened
(``wait_sent``), never for a chosen time. It can also hold what the backend sends on a link (``pause_down``):
a backend session that has answered, whose answer reaches the proxy only when the test says. Plaintext only
(the proxy's ``backend_tls = "none"``)."""

from __future__ import annotations

import re
import socket
import threading
import time


class _Link:
    def __init__(self, proxy_side: socket.socket, backend_side: socket.socket):
        self.proxy_side = proxy_side
        self.backend_side = backend_side
        self.up = bytearray()    # what the proxy sent (all of it, held or not)
        self.down = bytearray()  # what the backend sent
        self.changed = threading.Condition()
        self.flowing = threading.Event()  # (cleared: what the backend sends is held, see GateRelay.pause_down)
        self.flowing.set()


class GateRelay:
    def __init__(self, backend_port: int, backend_host: str = "127.0.0.1"):
        self.backend = (backend_host, backend_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.links: list[_Link] = []
        self._gate: re.Pattern | None = None
        self.gated = threading.Event()     # the gate's line was met: what follows it on that link is held
        self.released = threading.Event()
        self.gated_link: _Link | None = None
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_from(self, pattern: bytes) -> None:
        """Hold what the proxy sends from the first line matching ``pattern`` (a regex searched in each
        line) on, on whichever link sends it, until ``release()``."""
        self.gated.clear()
        self.released.clear()
        self.gated_link = None
        self._gate = re.compile(pattern)

    def release(self) -> None:
        self._gate = None
        self.released.set()

    def wait_gated(self, timeout: float = 10.0) -> _Link:
        assert self.gated.wait(timeout), "the gated line was never sent: " + repr(
            [bytes(link.up)[-300:] for link in self.links])
        return self.gated_link

    @staticmethod
    def wait_sent(link: _Link, pattern: bytes, timeout: float = 10.0, start: int = 0) -> re.Match:
        """Until the backend has sent something matching ``pattern`` on ``link`` (passed on to the proxy)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with link.changed:
            while (m := rx.search(bytes(link.down), start)) is None:
                left = deadline - time.monotonic()
                assert left > 0, f"the backend never sent {pattern!r}: {bytes(link.down)[-500:]!r}"
                link.changed.wait(left)
        return m

    @staticmethod
    def pause_down(link: _Link) -> None:
        """Hold what the backend sends on ``link`` (still recorded in ``down``: ``wait_sent`` sees it) until
        ``resume_down``."""
        link.flowing.clear()

    @staticmethod
    def resume_down(link: _Link) -> None:
        link.flowing.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        for link in self.links:
            link.flowing.set()
        try:
            self.listener.close()
        except OSError:
            pass
        for link in self.links:
            for s in (link.proxy_side, link.backend_side):
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                proxy_side, _ = self.listener.accept()
            except OSError:
                return
            backend_side = socket.create_connection(self.backend)
            for s in (proxy_side, backend_side):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(proxy_side, backend_side)
            self.links.append(link)
            threading.Thread(target=self._up, args=(link,), daemon=True).start()
            threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: _Link) -> None:
        pending = b""  # (an unfinished line: the gate looks at whole lines)
        try:
            while True:
                data = link.proxy_side.recv(65536)
                if not data:
                    break
                link.up += data
                gate = self._gate
                if gate is None or self.gated.is_set():
                    if self.gated.is_set() and link is self.gated_link and not self.released.is_set():
                        self.released.wait()
                    link.backend_side.sendall(pending + data)
                    pending = b""
                    continue
                data = pending + data
                cut = data.rfind(b"\n") + 1
                whole, pending = data[:cut], data[cut:]
                at = None
                pos = 0
                for line in whole.splitlines(keepends=True):
                    if gate.search(line):
                        at = pos
                        break
                    pos += len(line)
                if at is None:
                    link.backend_side.sendall(whole)
                    continue
                link.backend_side.sendall(whole[:at])
                self.gated_link = link
                self.gated.set()
                self.released.wait()
                link.backend_side.sendall(whole[at:])
        except OSError:
            pass
        finally:
            try:
                link.backend_side.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _down(self, link: _Link) -> None:
        try:
            while True:
                data = link.backend_side.recv(65536)
                if not data:
                    break
                with link.changed:
                    link.down += data
                    link.changed.notify_all()
                link.flowing.wait()
                link.proxy_side.sendall(data)
        except OSError:
            pass
        finally:
            try:
                link.proxy_side.shutdown(socket.SHUT_WR)
            except OSError:
                pass
