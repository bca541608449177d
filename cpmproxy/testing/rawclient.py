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
        # Unread bytes are _data[_pos:]: lines are sliced off by moving _pos, not by copying the rest of the
        # buffer per line (that made the client's cost grow with the size of the chunks it happened to get,
        # which differ between a proxy and a direct server and so skewed benchmark ratios).
        self._data = b""
        self._pos = 0
        self.greeting = self.read_response()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    @property
    def buf(self) -> bytes:
        """What has been received and not read yet."""
        return self._data[self._pos:]

    @buf.setter
    def buf(self, value: bytes) -> None:
        self._data, self._pos = value, 0

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return False
        self._data = self._data[self._pos:] + chunk if self._pos < len(self._data) else chunk
        self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def read_line(self) -> bytes:
        scanned = self._pos
        while (i := self._data.find(b"\n", scanned)) < 0:
            scanned = len(self._data) - self._pos
            if not self._fill():
                raise ConnectionError(f"connection closed; pending {self.buf[:200]!r}")
        return self._take(i + 1 - self._pos)

    def read_response(self) -> bytes:
        """One whole response, literals included."""
        out = self.read_line()
        while (m := _LITERAL_AT_END.search(out)) is not None:
            n = int(m.group(1))
            parts = [self._take(n)]
            missing = n - len(parts[0])
            while missing > 0:  # (chunks collected, not appended to a growing buffer)
                if not self._fill():
                    raise ConnectionError("connection closed inside a literal")
                parts.append(self._take(missing))
                missing -= len(parts[-1])
            out += b"".join(parts)
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
