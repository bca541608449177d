"""A tiny blocking IMAP client that speaks raw bytes: for tests of exact wire behaviour and bad input."""

from __future__ import annotations

import re
import socket
import ssl

_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\r\n\Z")


class RawIMAP:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                 server_hostname: str = "localhost"):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname=server_hostname) if tls else sock
        self.buf = b""
        self.greeting = self.read_response()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed; pending {self.buf[:200]!r}")
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        return line

    def read_response(self) -> bytes:
        """One whole response, literals included."""
        out = self.read_line()
        while (m := _LITERAL_AT_END.search(out)) is not None:
            n = int(m.group(1))
            while len(self.buf) < n:
                if not self._fill():
                    raise ConnectionError("connection closed inside a literal")
            out += self.buf[:n]
            self.buf = self.buf[n:]
            out += self.read_line()
        return out

    def until_tagged(self, tag: bytes) -> list[bytes]:
        """Responses up to and including the tagged one for ``tag``."""
        out = []
        while True:
            r = self.read_response()
            out.append(r)
            if r.startswith(tag + b" "):
                return out

    def command(self, tag: bytes, line: bytes) -> list[bytes]:
        self.send(tag + b" " + line + b"\r\n")
        return self.until_tagged(tag)

    def login(self, user: str, password: str) -> list[bytes]:
        return self.command(b"L", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))

    def closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (after reading what it still sends)."""
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
            return True
        except (TimeoutError, socket.timeout):
            return False
        except OSError:
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawIMAP:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
