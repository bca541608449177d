"""One IMAP connection of the reference client: TLS, ID, login, then pipelined commands.

Two layers, on purpose:

* **Session set-up uses imapclient** (blocking): TCP, implicit TLS or STARTTLS with certificate and host
  name verification, the ``ID`` command that tells the proxy which device this is (it must come *before*
  LOGIN: the proxy scopes local deletions and notifications by device from the moment the session
  starts), LOGIN and CAPABILITY. That is well-trodden code and there is nothing CPM-specific in it.
* **After login the client speaks on the socket itself** through :class:`Connection`. Synchronisation
  wants things imapclient does not do: several commands in flight at once (pipelining a folder's FETCH
  batches, or one STATUS per folder, saves a round trip each), ``LIST ... RETURN (STATUS ...)``,
  ``SELECT ... (QRESYNC ...)`` with its ``VANISHED (EARLIER)``, ``NOTIFY``, and untagged responses that
  arrive at any time and must be remembered rather than dropped. Responses are parsed with the project's
  own sans-I/O tokenizer (:mod:`cpmproxy.imap.tokens`), which is regex-driven and fast on large FETCHes.

Untagged responses are routed by content, not by position: each command in flight may register a
*handler* that claims the responses it understands (a FETCH carrying a UID it asked for, the STATUS of a
mailbox it named); everything unclaimed is kept in :attr:`Connection.unsolicited` for the caller (the
watch loop turns those into "folder changed" events). Tagged completions are matched by tag, so it does
not matter in which order the server finishes pipelined commands (DESIGN.md section 6).
"""

from __future__ import annotations

import itertools
import os
import re
import select
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import imapclient
import imapclient.exceptions

from cpmproxy import __version__ as _project_version
from cpmproxy.client.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    ServerRefused,
    TLSError,
)
from cpmproxy.imap import mutf7
from cpmproxy.imap.tokens import Token, TokenError, parse_response_head, quote, tokenize

__all__ = [
    "TLS_MODES",
    "Completion",
    "Connection",
    "PendingCommand",
    "ServerSettings",
    "Untagged",
    "connect",
    "decode_mailbox",
    "mailbox_arg",
]

TLS_MODES = ("none", "starttls", "implicit")
CLIENT_NAME = "cpm-sync"
CLIENT_VERSION = str(_project_version)

# A response line longer than this is not IMAP any more (literals do not count: they are read by size).
MAX_LINE = 1024 * 1024
_READ_SIZE = 256 * 1024
_LITERAL_END_RE = re.compile(rb"~?\{([0-9]{1,20})[+-]?\}\Z")


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to connect, and who this device is."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    device_id: str = "default"
    tls: str = "starttls"
    ca_file: str | None = None
    timeout: float = 60.0  # connect timeout and per-read timeout once connected
    client_name: str = CLIENT_NAME

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {self.tls!r}")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# -- responses ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Untagged:
    """One untagged server response (``* ...``), literals already read.

    ``data`` is what follows the response name (and, for status responses, the ``[code]``), with literal
    markers left in place; their payloads are in ``literals``. Tokens are produced on first use.
    """

    name: bytes  # upper-cased: FETCH, EXISTS, STATUS, LIST, VANISHED, OK, BYE, ...
    number: int | None  # "* 5 FETCH" -> 5
    code: bytes | None  # "* OK [UIDVALIDITY 7] ..." -> b"UIDVALIDITY 7"
    data: bytes
    literals: list[bytes]
    _tokens: list[Token] | None = None

    @property
    def tokens(self) -> list[Token]:
        if self._tokens is None:
            try:
                self._tokens = tokenize(self.data, self.literals)
            except TokenError as e:
                raise ProtocolError(f"cannot parse the server's {self.name.decode()} response: {e}") from None
        return self._tokens

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def code_value(self, name: bytes) -> bytes | None:
        """The argument of response code ``name`` (``b"UIDNEXT 12"`` -> ``b"12"``), if that is the code."""
        if self.code is None:
            return None
        word, _, rest = self.code.partition(b" ")
        return rest if word.upper() == name else None


@dataclass(slots=True)
class Completion:
    """The tagged end of a command."""

    tag: bytes
    status: bytes  # OK, NO or BAD
    code: bytes | None
    text: str

    @property
    def ok(self) -> bool:
        return self.status == b"OK"


Handler = Callable[[Untagged], bool]


@dataclass(slots=True, eq=False)
class PendingCommand:
    """A command sent and not yet completed. ``collected`` holds the untagged responses it claimed."""

    tag: bytes
    line: bytes
    handler: Handler | None
    collect: frozenset[bytes]
    collected: list[Untagged] = field(default_factory=list)
    done: Completion | None = None

    def offer(self, resp: Untagged) -> bool:
        if resp.name in self.collect:
            self.collected.append(resp)
            return True
        return self.handler is not None and self.handler(resp)

    @property
    def name(self) -> str:
        """The command verb, for error messages (``UID FETCH`` -> ``FETCH``)."""
        words = self.line.split(b" ", 2)
        verb = words[1] if words[0].upper() == b"UID" and len(words) > 1 else words[0]
        return verb.decode("ascii", "replace").upper()


# -- mailbox names -----------------------------------------------------------------------------------


def decode_mailbox(wire: bytes) -> str:
    """A mailbox name as the server sent it (modified UTF-7) -> the human name.

    A name that is not canonical modified UTF-7 is shown as sent (Latin-1 keeps every byte distinct), so
    it still round-trips to the same wire name.
    """
    try:
        return mutf7.decode(wire)
    except ValueError:
        return wire.decode("latin-1")


def mailbox_arg(wire: bytes) -> bytes:
    """A wire mailbox name as a command argument. Modified UTF-7 is printable ASCII, so it is always an
    atom or a quoted string, never a literal (which would cost a round trip without LITERAL+)."""
    return quote(wire)


def encode_mailbox(name: str) -> bytes:
    return mutf7.encode(name)


# -- the byte stream ---------------------------------------------------------------------------------


class _Reader:
    """Buffered line/literal reader on a blocking socket (plain or TLS)."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(initial)
        self.pos = 0

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(_READ_SIZE)
        except TimeoutError:
            raise ConnectionLost("timed out waiting for the server") from None
        except ssl.SSLError as e:
            raise ConnectionLost(f"TLS error: {e.reason or e}") from None
        except OSError as e:
            raise ConnectionLost(f"connection to the server broke: {e.strerror or e}") from None
        if not chunk:
            raise ConnectionLost("the server closed the connection")
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += chunk

    def readline(self) -> bytes:
        """One line without its CRLF."""
        scanned = 0  # bytes after pos already searched for LF
        while True:
            i = self.buf.find(b"\n", self.pos + scanned)
            if i >= 0:
                end = i - 1 if i > self.pos and self.buf[i - 1] == 0x0D else i
                line = bytes(self.buf[self.pos : end])
                self.pos = i + 1
                return line
            scanned = len(self.buf) - self.pos
            if scanned > MAX_LINE:
                raise ProtocolError("the server sent a line longer than 1 MB")
            self._fill()

    def read(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n:
            self._fill()
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def buffered(self) -> bool:
        """Response bytes already received but not consumed (select() on the socket cannot see them)."""
        if self.pos < len(self.buf):
            return True
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0


# -- the connection ----------------------------------------------------------------------------------


class Connection:
    """An authenticated IMAP session. Build it with :func:`connect`."""

    def __init__(self, client: imapclient.IMAPClient, settings: ServerSettings, capabilities: Iterable[bytes]):
        self.settings = settings
        self._client = client  # kept for shutdown(); not used for commands after login
        self.sock: socket.socket = client.socket()
        # imaplib reads through a buffered file object; anything it buffered past the LOGIN completion
        # (nothing, normally: the server is quiet until we speak) must not be lost.
        self._reader = _Reader(self.sock, _drain_imaplib_buffer(client))
        self.capabilities = frozenset(c.upper() for c in capabilities)
        self.enabled: set[bytes] = set()
        self.selected: bytes | None = None  # wire name of the selected mailbox
        self.unsolicited: list[Untagged] = []
        self._pending: dict[bytes, PendingCommand] = {}
        self._out: list[bytes] = []
        self._tags = (b"C%d" % n for n in itertools.count(1))
        self._closed = False
        self._logging_out = False
        self.idling: PendingCommand | None = None
        # Protocol trace for client developers (responses without literal payloads; commands after login
        # only, so never the password): CPM_SYNC_TRACE=1 or Connection.trace = callable.
        self.trace: Callable[[str], None] | None = _stderr_trace if os.environ.get("CPM_SYNC_TRACE") else None

    # -- capabilities ------------------------------------------------------------------------------

    def has(self, capability: str | bytes) -> bool:
        cap = capability.encode() if isinstance(capability, str) else capability
        return cap.upper() in self.capabilities

    @property
    def qresync(self) -> bool:
        return b"QRESYNC" in self.enabled

    @property
    def condstore(self) -> bool:
        """CONDSTORE is in effect (explicitly, or implied by QRESYNC): MODSEQs and HIGHESTMODSEQ work."""
        return self.has("CONDSTORE") or self.has("QRESYNC")

    def enable(self, *capabilities: str) -> set[bytes]:
        """``ENABLE`` what the server offers of ``capabilities``; returns what it enabled."""
        wanted = [c for c in capabilities if self.has(c)]
        if not wanted or not self.has("ENABLE"):
            return set()
        cmd = self.run(b"ENABLE " + " ".join(wanted).encode(), collect=(b"ENABLED",))
        for resp in cmd.collected:
            self.enabled.update(a.upper() for a in resp.data.split())
        return self.enabled

    # -- commands ----------------------------------------------------------------------------------

    def send(
        self,
        line: bytes,
        handler: Handler | None = None,
        collect: Sequence[bytes] = (),
    ) -> PendingCommand:
        """Queue a command (without tag and CRLF); it goes out with the next read or :meth:`flush`.

        Several commands may be in flight: that is pipelining. ``handler`` sees every untagged response
        while the command is in flight and returns True for those it consumed; ``collect`` names
        response types to keep in ``collected`` instead.
        """
        if self._closed:
            raise ConnectionLost("the connection is closed")
        tag = next(self._tags)
        cmd = PendingCommand(tag, line, handler, frozenset(collect))
        self._pending[tag] = cmd
        self._out.append(tag + b" " + line + b"\r\n")
        return cmd

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self.trace is not None:
            for line in data.splitlines():
                self.trace(f"C: {line.decode('utf-8', 'replace')}")
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise ConnectionLost("timed out sending to the server") from None
        except OSError as e:
            raise ConnectionLost(f"connection to the server broke: {e.strerror or e}") from None

    def wait(self, cmd: PendingCommand, check: bool = True) -> PendingCommand:
        """Read responses until ``cmd`` completes. With ``check``, NO/BAD raises :class:`ServerRefused`."""
        while cmd.done is None:
            self.read_one()
        if check and not cmd.done.ok:
            raise ServerRefused(f"{cmd.name} failed: {cmd.done.status.decode()} {cmd.done.text}".strip())
        return cmd

    def run(self, line: bytes, handler: Handler | None = None, collect: Sequence[bytes] = (),
            check: bool = True) -> PendingCommand:
        """Send one command and wait for it."""
        return self.wait(self.send(line, handler, collect), check)

    def read_one(self) -> str:
        """Read and dispatch one response (blocking); returns its kind: "tagged", "untagged" or
        "continuation"."""
        self.flush()
        line = self._reader.readline()
        literals: list[bytes] = []
        if line.endswith(b"}"):
            parts = [line]
            while (m := _LITERAL_END_RE.search(line)) is not None:
                literals.append(self._reader.read(int(m.group(1))))
                line = self._reader.readline()
                parts.append(line)
            line = b"".join(parts)
        if self.trace is not None:
            self.trace(f"S: {line.decode('utf-8', 'replace')[:300]}" + (f" [+{len(literals)} literal(s)]" if literals else ""))
        try:
            head = parse_response_head(line)
        except TokenError:
            raise ProtocolError(f"unexpected data from the server: {line[:80]!r}") from None
        if head.kind == "continuation":
            if self.idling is not None:
                return "continuation"  # "+ idling": IDLE is now in effect
            raise ProtocolError("unexpected continuation request from the server")
        data = line[head.text_offset :]
        if head.kind == "tagged":
            assert head.tag is not None and head.name is not None
            cmd = self._pending.pop(head.tag, None)
            if cmd is None:
                raise ProtocolError(f"response for a command never sent: {line[:80]!r}")
            cmd.done = Completion(head.tag, head.name, head.code, data.decode("utf-8", "replace"))
            if cmd is self.idling:
                self.idling = None
            return "tagged"
        assert head.name is not None
        resp = Untagged(head.name, head.number, head.code, data, literals)
        if head.name == b"BYE":
            if self._logging_out:
                return "untagged"
            self._closed = True
            raise ConnectionLost(f"the server closed the connection: {resp.text or 'BYE'}")
        for cmd in self._pending.values():
            if cmd.offer(resp):
                return "untagged"
        self.unsolicited.append(resp)
        return "untagged"

    def take_unsolicited(self) -> list[Untagged]:
        out, self.unsolicited = self.unsolicited, []
        return out

    # -- waiting for the server ---------------------------------------------------------------------

    def readable(self, timeout: float | None, wake_fd: int | None = None) -> bool:
        """Wait up to ``timeout`` seconds for server data; False on timeout or when ``wake_fd`` fired."""
        self.flush()
        if self._reader.buffered():
            return True
        fds: list[int | socket.socket] = [self.sock]
        if wake_fd is not None:
            fds.append(wake_fd)
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:  # pragma: no cover - PEP 475 retries, but a handler may raise
            return False
        return self.sock in ready

    def drain(self) -> None:
        """Read whatever responses have already arrived, without waiting for more."""
        while self.readable(0):
            self.read_one()

    def idle_start(self) -> PendingCommand:
        """Enter IDLE (RFC 2177); returns once the server confirmed with a continuation. Responses
        that arrive while idling land in :attr:`unsolicited`."""
        cmd = self.send(b"IDLE")
        self.idling = cmd
        while self.read_one() != "continuation":
            if cmd.done is not None:
                raise ServerRefused(f"IDLE failed: {cmd.done.status.decode()} {cmd.done.text}")
        return cmd

    def idle_done(self, cmd: PendingCommand) -> None:
        self._out.append(b"DONE\r\n")
        self.wait(cmd, check=False)
        self.idling = None

    # -- end ---------------------------------------------------------------------------------------

    def logout(self) -> None:
        """LOGOUT politely (bounded wait), then close the socket. Never raises."""
        if self._closed:
            return
        try:
            self._logging_out = True
            self.sock.settimeout(min(self.settings.timeout, 5.0))
            self.run(b"LOGOUT", check=False)
        except Exception:
            pass
        finally:
            self.close()

    def close(self) -> None:
        self._closed = True
        try:
            self._client.shutdown()
        except Exception:
            try:
                self.sock.close()
            except OSError:
                pass


def _stderr_trace(text: str) -> None:
    sys.stderr.write(f"{time.monotonic():.3f} {text}\n")


def _drain_imaplib_buffer(client: imapclient.IMAPClient) -> bytes:
    """Bytes imaplib's buffered reader holds beyond what it consumed (normally none)."""
    file = getattr(client._imap, "file", None)  # noqa: SLF001 - imaplib's documented reader object
    if file is None:
        return b""
    sock = client.socket()
    timeout = sock.gettimeout()
    try:
        sock.setblocking(False)
        try:
            data = file.peek(1)
        except (BlockingIOError, ssl.SSLWantReadError, OSError):
            return b""
        return file.read(len(data)) if data else b""
    finally:
        sock.settimeout(timeout)


# -- connecting --------------------------------------------------------------------------------------


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the server certificate and its host name: against ``ca_file`` if given (a private CA),
    else against the system's trust store."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot load CA file {ca_file}: {getattr(e, 'strerror', None) or e}") from None


def _server_text(e: BaseException) -> str:
    """imapclient wraps the server's text as ``str(bytes)``; unwrap ``b'...'`` for humans."""
    text = str(e)
    m = re.search(r"b'(.*)'|b\"(.*)\"", text)
    if m:
        text = text[: m.start()] + (m.group(1) or m.group(2) or "") + text[m.end() :]
    return text.strip()


def connect(settings: ServerSettings) -> Connection:
    """Connect, secure, identify the device, log in. Raises a :class:`ClientError` subclass."""
    ctx = None if settings.tls == "none" else _ssl_context(settings.ca_file)
    client: imapclient.IMAPClient | None = None
    try:
        client = imapclient.IMAPClient(
            settings.host,
            settings.port,
            ssl=settings.tls == "implicit",
            ssl_context=ctx,
            timeout=settings.timeout,
        )
        if settings.tls == "starttls":
            if not client.has_capability("STARTTLS"):
                raise TLSError(
                    f"{settings.address} does not offer STARTTLS (use --tls implicit for a TLS port, or "
                    "--tls none only on a trusted loopback connection)"
                )
            client.starttls(ctx)
        # ID before LOGIN: the proxy learns the device identity (x-cpm-device-id) for this session.
        if client.has_capability("ID"):
            client.id_(
                {
                    "name": settings.client_name,
                    "version": CLIENT_VERSION,
                    "x-cpm-device-id": settings.device_id,
                }
            )
        try:
            client.login(settings.user, settings.password)
        except imapclient.exceptions.LoginError as e:
            raise AuthenticationError(f"login as {settings.user} failed: {_server_text(e)}") from None
        caps = client.capabilities()
        conn = Connection(client, settings, caps)
        conn.sock.settimeout(settings.timeout)
        return conn
    except (AuthenticationError, TLSError):
        _shutdown(client)
        raise
    except ssl.SSLCertVerificationError as e:
        _shutdown(client)
        raise TLSError(
            f"TLS certificate of {settings.address} not trusted: {e.verify_message or e.reason}"
            + ("" if settings.ca_file else " (use --ca-file for a private CA)")
        ) from None
    except ssl.SSLError as e:
        _shutdown(client)
        raise TLSError(f"TLS with {settings.address} failed: {e.reason or e}") from None
    except socket.gaierror as e:
        _shutdown(client)
        raise ConnectError(f"cannot resolve {settings.host}: {e.strerror or e}") from None
    except TimeoutError:
        _shutdown(client)
        raise ConnectError(f"timed out connecting to {settings.address}") from None
    except ConnectionRefusedError:
        _shutdown(client)
        raise ConnectError(f"cannot connect to {settings.address}: connection refused") from None
    except OSError as e:
        _shutdown(client)
        raise ConnectError(f"cannot connect to {settings.address}: {e.strerror or e}") from None
    except imapclient.exceptions.IMAPClientError as e:
        _shutdown(client)
        text = _server_text(e)
        if "EOF" in text or "socket" in text.lower():
            raise ConnectError(f"{settings.address} closed the connection during login: {text}") from None
        raise ServerRefused(f"{settings.address} refused the session set-up: {text}") from None


def _shutdown(client: imapclient.IMAPClient | None) -> None:
    if client is not None:
        try:
            client.shutdown()
        except Exception:
            pass
