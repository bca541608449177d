"""One IMAP connection of the reference client: TLS, ID, login, then pipelined commands.

The client speaks IMAP on the socket itself (:mod:`cpmproxy.client.imapwire` reads the responses).
Synchronisation needs what a one-command-at-a-time library
does not give: several commands in flight at once (pipelining a folder's FETCH batches, one STATUS per
folder, ID together with LOGIN: each saves a round trip), ``LIST ... RETURN (STATUS ...)``,
``SELECT ... (QRESYNC ...)`` with its ``VANISHED (EARLIER)``, ``NOTIFY``, and untagged responses that
arrive at any time and must be remembered rather than dropped. (imapclient, used for set-up in a first
version, also cost ~75 ms of imports and a round trip per start: as much as a whole no-change re-sync
of 200 folders takes mbsync.)

Session set-up, in order (:func:`connect`): TCP (``TCP_NODELAY``), implicit TLS or STARTTLS with
certificate and host name verification, then ``ID ("name" "cpm-sync" ... "x-cpm-device-id" D)`` pipelined
with the login (``AUTHENTICATE PLAIN`` with SASL-IR where offered, else ``LOGIN``). ID comes first on
purpose: the proxy scopes local deletions and notifications by device from the moment the session starts
(DESIGN.md section 4).

Untagged responses are routed by content, not by position: each command in flight may register a
*handler* that claims the responses it understands (a FETCH carrying a UID it asked for, the STATUS of a
mailbox it named); everything unclaimed is kept in :attr:`Connection.unsolicited` for the caller (the
watch loop turns those into "folder changed" events). Tagged completions are matched by tag, so it does
not matter in which order the server finishes pipelined commands (DESIGN.md section 6).
"""

from __future__ import annotations

import binascii
import itertools
import os
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from cpmproxy import __version__ as _project_version
from cpmproxy.client.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLost,
    Interrupted,
    ProtocolError,
    ServerRefused,
    ServerUnavailable,
    TLSError,
)
from cpmproxy.client.imapwire import SyntaxError_, mutf7_decode, mutf7_encode, parse_head, quote, tokenize

if TYPE_CHECKING:  # ssl is imported only when TLS is used: one process start matters (imapwire.py)
    import ssl

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

# A response line longer than this is not IMAP any more (literals do not count: they are read by size)...
MAX_LINE = 1024 * 1024
# ...unless it is made of numbers: a UID set or a list of UIDs grows with the mailbox, and a real server
# sends one past MAX_LINE for a folder that is merely large (Dovecot's ``* VANISHED (EARLIER)`` after
# ~100,000 scattered expunges, a SEARCH of ~150,000 messages). Past its first _NUMBERS_HEAD bytes (what
# names the response: ``* VANISHED (EARLIER) ``, ``* ESEARCH (TAG "C5") UID ALL ``), such a line is
# digits, commas, colons and spaces, and may be up to MAX_NUMBERS_LINE (some 6 million scattered UIDs).
MAX_NUMBERS_LINE = 64 * 1024 * 1024
_NUMBERS_HEAD = 4096
_NUMBERS_RE = re.compile(rb"[0-9,: ]*")
_READ_SIZE = 256 * 1024
_LITERAL_END_RE = re.compile(rb"~?\{([0-9]{1,20})[+-]?\}\Z")
# Response codes (RFC 5530) with which a refused login says "not now" rather than "not you": the
# credentials were not judged (a subsystem is down, the account is busy, too many connections), so trying
# again later is right -- unlike AUTHENTICATIONFAILED & co., where retrying only locks the account.
TRANSIENT_LOGIN_CODES = frozenset((b"UNAVAILABLE", b"INUSE", b"LIMIT"))


class ServerSettings:
    """Where and how to connect, and who this device is."""

    __slots__ = ("host", "port", "user", "password", "device_id", "tls", "ca_file", "timeout", "client_name")

    def __init__(self, host: str, port: int, user: str, password: str, device_id: str = "default",
                 tls: str = "starttls", ca_file: str | None = None, timeout: float = 60.0,
                 client_name: str = CLIENT_NAME) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        self.host, self.port, self.user, self.password = host, port, user, password
        self.device_id, self.tls, self.ca_file, self.timeout = device_id, tls, ca_file, timeout
        self.client_name = client_name

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __repr__(self) -> str:  # never the password
        return f"ServerSettings({self.address}, user={self.user!r}, device_id={self.device_id!r}, tls={self.tls!r})"


# -- responses ---------------------------------------------------------------------------------------


class Untagged:
    """One untagged server response (``* ...``), literals already read.

    ``data`` is what follows the response name (and, for status responses, the ``[code]``), with literal
    markers left in place; their payloads are in ``literals``. Tokens (:mod:`~cpmproxy.client.imapwire`)
    are produced on first use.
    """

    __slots__ = ("name", "number", "code", "data", "literals", "mailbox", "_tokens")

    def __init__(self, name: bytes, number: int | None, code: bytes | None, data: bytes,
                 literals: list[bytes]) -> None:
        self.name = name  # upper-cased: FETCH, EXISTS, STATUS, LIST, VANISHED, OK, BYE, ...
        self.number = number  # "* 5 FETCH" -> 5
        self.code = code  # "* OK [UIDVALIDITY 7] ..." -> b"UIDVALIDITY 7"
        self.data = data
        self.literals = literals
        # Unsolicited responses only: the mailbox selected when it arrived (what EXISTS, EXPUNGE, VANISHED
        # and FETCH are about; a later SELECT does not change that).
        self.mailbox: bytes | None = None
        self._tokens: list | None = None

    @property
    def tokens(self) -> list:
        if self._tokens is None:
            try:
                self._tokens = tokenize(self.data, self.literals)
            except SyntaxError_ as e:
                raise ProtocolError(f"cannot parse the server's {self.name.decode()} response: {e}") from None
        return self._tokens

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Untagged {self.name.decode()} {self.number} {self.data[:60]!r}>"


class Completion:
    """The tagged end of a command."""

    __slots__ = ("tag", "status", "code", "text")

    def __init__(self, tag: bytes, status: bytes, code: bytes | None, text: str) -> None:
        self.tag, self.status, self.code, self.text = tag, status, code, text  # status: OK, NO or BAD

    @property
    def ok(self) -> bool:
        return self.status == b"OK"


Handler = Callable[[Untagged], bool]


class PendingCommand:
    """A command sent and not yet completed. ``collected`` holds the untagged responses it claimed."""

    __slots__ = ("tag", "line", "handler", "collect", "collected", "done")

    def __init__(self, tag: bytes, line: bytes, handler: Handler | None, collect: frozenset[bytes]) -> None:
        self.tag, self.line, self.handler, self.collect = tag, line, handler, collect
        self.collected: list[Untagged] = []
        self.done: Completion | None = None

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
        return mutf7_decode(wire)
    except ValueError:
        return wire.decode("latin-1")


def mailbox_arg(wire: bytes) -> bytes:
    """A wire mailbox name as a command argument. Modified UTF-7 is printable ASCII, so it is always an
    atom or a quoted string, never a literal (which would cost a round trip without LITERAL+)."""
    return quote(wire)


def encode_mailbox(name: str) -> bytes:
    return mutf7_encode(name)


# -- the byte stream ---------------------------------------------------------------------------------


class _Reader:
    """Buffered line/literal reader on a blocking socket (plain or TLS)."""

    # After a stop request, how long the server still gets to deliver what is on its way (the rest of a
    # batch being committed, the answer to LOGOUT) before the wait is abandoned.
    STOP_GRACE = 1.0

    def __init__(self, sock: socket.socket, initial: bytes = b"", wake_fd: int | None = None) -> None:
        self.sock = sock
        self.buf = bytearray(initial)
        self.pos = 0
        self.wake_fd = wake_fd  # readable once the user asked to stop (watch.Stopper's self-pipe)

    def _wait_readable(self) -> None:
        """Block until the socket has data like recv() would, but give up (:class:`Interrupted`) when
        ``wake_fd`` fires and the server stays silent: SIGTERM must not wait out a 60 s network timeout."""
        pending = getattr(self.sock, "pending", None)  # TLS: decrypted bytes waiting in the SSL object
        if self.wake_fd is None or (pending is not None and pending() > 0):
            return
        timeout = self.sock.gettimeout()
        ready, _, _ = select.select([self.sock, self.wake_fd], [], [], timeout)
        if self.sock in ready:
            return
        if self.wake_fd in ready:
            ready, _, _ = select.select([self.sock], [], [], self.STOP_GRACE)
            if ready:
                return
            raise Interrupted("interrupted; the next sync resumes where this one stopped")
        raise ConnectionLost("timed out waiting for the server")

    def _fill(self) -> None:
        self._wait_readable()
        try:
            chunk = self.sock.recv(_READ_SIZE)
        except TimeoutError:
            raise ConnectionLost("timed out waiting for the server") from None
        except OSError as e:  # ssl.SSLError included
            raise ConnectionLost(f"connection to the server broke: {e.strerror or getattr(e, 'reason', None) or e}") \
                from None
        if not chunk:
            raise ConnectionLost("the server closed the connection")
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += chunk

    def readline(self) -> bytes:
        """One line without its CRLF (at most MAX_LINE bytes, or MAX_NUMBERS_LINE of numbers)."""
        scanned = 0  # bytes after pos already searched for LF
        numbers = 0  # past MAX_LINE: bytes after pos known to be numbers up to here
        while True:
            i = self.buf.find(b"\n", self.pos + scanned)
            if i >= 0:
                end = i - 1 if i > self.pos and self.buf[i - 1] == 0x0D else i
                if numbers and not _NUMBERS_RE.fullmatch(self.buf, self.pos + numbers, end):
                    raise ProtocolError("the server sent a line longer than 1 MB")
                line = bytes(self.buf[self.pos : end])
                self.pos = i + 1
                return line
            scanned = len(self.buf) - self.pos
            if scanned > MAX_LINE:
                # (Each byte looked at once: what arrives is checked as it comes.)
                if scanned > MAX_NUMBERS_LINE:
                    raise ProtocolError(f"the server sent a line longer than {MAX_NUMBERS_LINE >> 20} MB")
                if not _NUMBERS_RE.fullmatch(self.buf, self.pos + (numbers or _NUMBERS_HEAD), len(self.buf)):
                    raise ProtocolError("the server sent a line longer than 1 MB")
                numbers = scanned
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
        pending = getattr(self.sock, "pending", None)  # TLS: decrypted bytes waiting in the SSL object
        return pending is not None and pending() > 0


# -- the connection ----------------------------------------------------------------------------------


class Connection:
    """An authenticated IMAP session. Build it with :func:`connect`."""

    def __init__(self, sock: socket.socket, settings: ServerSettings) -> None:
        self.settings = settings
        self.sock = sock
        self._reader = _Reader(sock)
        self.capabilities: frozenset[bytes] = frozenset()
        self.enabled: set[bytes] = set()
        self.selected: bytes | None = None  # wire name of the selected mailbox
        self.unsolicited: list[Untagged] = []
        self._pending: dict[bytes, PendingCommand] = {}
        self._out: list[bytes] = []
        self._tags = (b"C%d" % n for n in itertools.count(1))
        self._closed = False
        self._logging_out = False
        self.idling: PendingCommand | None = None
        # Protocol trace for client developers (responses without literal payloads; credentials masked):
        # CPM_SYNC_TRACE=1 in the environment, or set Connection.trace to a callable.
        self.trace: Callable[[str], None] | None = _stderr_trace if os.environ.get("CPM_SYNC_TRACE") else None

    def set_wake_fd(self, fd: int | None) -> None:
        """A file descriptor that becomes readable when the user asks to stop (SIGINT/SIGTERM): waits for
        the server then end with :class:`Interrupted` instead of running into the network timeout."""
        self._reader.wake_fd = fd

    def set_capabilities(self, caps: Iterable[bytes]) -> None:
        self.capabilities = frozenset(c.upper() for c in caps)

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
        secret: bool = False,
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
        if secret and self.trace is not None:
            self.flush()  # what was queued before goes first, traced as usual
            shown = b" ".join(line.split(b" ")[:2]).decode("ascii", "replace")
            self.trace(f"C: {tag.decode()} {shown} ****")
            self._out.append(tag + b" " + line + b"\r\n")
            self._flush_untraced()
            return cmd
        self._out.append(tag + b" " + line + b"\r\n")
        return cmd

    def flush(self) -> None:
        if self._out and self.trace is not None:
            for line in b"".join(self._out).splitlines():
                self.trace(f"C: {line.decode('utf-8', 'replace')}")
        self._flush_untraced()

    def _flush_untraced(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
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
            head = parse_head(line)
        except SyntaxError_:
            raise ProtocolError(f"unexpected data from the server: {line[:80]!r}") from None
        if head.kind == "continuation":
            if self.idling is not None:
                return "continuation"  # "+ idling": IDLE is now in effect
            raise ProtocolError("unexpected continuation request from the server")
        data = line[head.rest :]
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
        try:
            for cmd in self._pending.values():
                if cmd.offer(resp):
                    return "untagged"
        except (ValueError, SyntaxError_) as e:  # (a handler could not read it: "[UIDVALIDITY abc]", a bad set)
            self._closed = True
            raise ProtocolError(f"malformed {head.name.decode('ascii', 'replace')} response from the server: "
                                f"{line[:80]!r} ({e})") from None
        resp.mailbox = self.selected
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

    @property
    def busy(self) -> bool:
        """A command other than IDLE is waiting for its answer (a LOGOUT now would read that answer first,
        and run its handler)."""
        return any(cmd is not self.idling for cmd in self._pending.values())

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
            self.sock.close()
        except OSError:
            pass

    # -- session set-up (see connect()) --------------------------------------------------------------

    def read_greeting(self) -> Untagged:
        line = self._reader.readline()
        if self.trace is not None:
            self.trace(f"S: {line.decode('utf-8', 'replace')[:300]}")
        try:
            head = parse_head(line)
        except SyntaxError_:
            raise ProtocolError(f"not an IMAP server (greeting {line[:60]!r})") from None
        if head.kind != "untagged" or head.name not in (b"OK", b"PREAUTH", b"BYE"):
            raise ProtocolError(f"not an IMAP server (greeting {line[:60]!r})")
        assert head.name is not None
        return Untagged(head.name, None, head.code, line[head.rest :], [])

    def start_tls(self, ctx: ssl.SSLContext) -> None:
        """Wrap the socket after ``STARTTLS`` completed. Anything already received in plaintext after the
        OK would have been injected by someone on the path (STARTTLS response injection), so it is refused."""
        if self._reader.buffered():
            raise ProtocolError("the server sent data after accepting STARTTLS")
        self.sock = _tls_handshake(ctx, self.sock, self.settings.host, self._reader.wake_fd)
        self._reader = _Reader(self.sock, wake_fd=self._reader.wake_fd)



def _stderr_trace(text: str) -> None:
    sys.stderr.write(f"{time.monotonic():.3f} {text}\n")


# -- connecting --------------------------------------------------------------------------------------


def _tls_handshake(ctx: ssl.SSLContext, sock: socket.socket, host: str, wake_fd: int | None) -> ssl.SSLSocket:
    """``sock`` wrapped in TLS, the handshake done; with ``wake_fd``, waiting for the server the way reads
    do (:class:`Interrupted` when it fires: a server that accepts and never answers the ClientHello must
    not hold SIGTERM for the whole timeout)."""
    if wake_fd is None:
        return ctx.wrap_socket(sock, server_hostname=host)
    import ssl  # (loaded only where TLS is used, as in _ssl_context)

    timeout = sock.gettimeout()
    tls = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                wanted = ([tls, wake_fd], [])
            except ssl.SSLWantWriteError:
                wanted = ([wake_fd], [tls])
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, writable, _ = select.select(*wanted, [], left)
            if wake_fd in readable:
                raise Interrupted("interrupted; the next sync resumes where this one stopped")
            if not readable and not writable:
                raise TimeoutError("the TLS handshake timed out")
    finally:
        tls.settimeout(timeout)
    return tls


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the server certificate and its host name: against ``ca_file`` if given (a private CA),
    else against the system's trust store."""
    import ssl

    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot load CA file {ca_file}: {getattr(e, 'strerror', None) or e}") from None


def _caps_from_code(code: bytes | None) -> list[bytes] | None:
    if code is not None and code[:11].upper() == b"CAPABILITY ":
        return code.split()[1:]
    return None


def _capability(conn: Connection) -> list[bytes]:
    cmd = conn.run(b"CAPABILITY", collect=(b"CAPABILITY",))
    return [c for resp in cmd.collected for c in resp.data.split()]


def _id_command(settings: ServerSettings) -> bytes:
    fields = [("name", settings.client_name), ("version", CLIENT_VERSION), ("x-cpm-device-id", settings.device_id)]
    # ID parameters are strings (never atoms); a value that cannot be quoted becomes a {n+} literal.
    return b"ID (" + b" ".join(quote(k, atom_ok=False) + b" " + quote(v, atom_ok=False) for k, v in fields) + b")"


def _login(conn: Connection, caps: frozenset[bytes]) -> PendingCommand:
    """The login command, queued (pipelined behind ID). SASL PLAIN with an initial response needs no
    quoting and no round trip; LOGIN is the fallback."""
    s = conn.settings
    if b"AUTH=PLAIN" in caps and b"SASL-IR" in caps:
        token = binascii.b2a_base64(b"\0" + s.user.encode("utf-8") + b"\0" + s.password.encode("utf-8"), newline=False)
        return conn.send(b"AUTHENTICATE PLAIN " + token, secret=True)
    if b"LOGINDISABLED" in caps:
        raise AuthenticationError(
            f"{s.address} does not allow a plaintext login here (LOGINDISABLED); use --tls starttls or implicit"
        )
    args = []
    for value in (s.user, s.password):
        q = quote(value)
        if q.startswith(b"{") and b"LITERAL+" not in caps:
            raise AuthenticationError("user name or password needs an IMAP literal, which this server cannot take "
                                      "without a round trip per literal; use AUTH=PLAIN (SASL-IR)")
        args.append(q)
    return conn.send(b"LOGIN " + b" ".join(args), secret=True)


def connect(settings: ServerSettings, wake_fd: int | None = None) -> Connection:
    """Connect, secure, identify the device, log in. Raises a :class:`ClientError` subclass; with
    ``wake_fd`` (see :meth:`Connection.set_wake_fd`), :class:`Interrupted` when it fires while the server
    is silent."""
    ctx = None if settings.tls == "none" else _ssl_context(settings.ca_file)
    address = settings.address
    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=settings.timeout)
    except socket.gaierror as e:
        raise ConnectError(f"cannot resolve {settings.host}: {e.strerror or e}") from None
    except TimeoutError:
        raise ConnectError(f"timed out connecting to {address}") from None
    except ConnectionRefusedError:
        raise ConnectError(f"cannot connect to {address}: connection refused") from None
    except OSError as e:
        raise ConnectError(f"cannot connect to {address}: {e.strerror or e}") from None
    conn: Connection | None = None
    try:
        # Small commands, interactive replies: Nagle would add up to 40 ms per round trip.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if settings.tls == "implicit":
            assert ctx is not None
            sock = _tls_handshake(ctx, sock, settings.host, wake_fd)
        conn = Connection(sock, settings)
        conn.set_wake_fd(wake_fd)
        greeting = conn.read_greeting()
        if greeting.name == b"BYE":
            raise ConnectError(f"{address} refused the connection: {greeting.text}")
        caps = _caps_from_code(greeting.code) or _capability(conn)
        if settings.tls == "starttls":
            if b"STARTTLS" not in {c.upper() for c in caps}:
                raise TLSError(
                    f"{address} does not offer STARTTLS (use --tls implicit for a TLS port, or "
                    "--tls none only on a trusted loopback connection)"
                )
            assert ctx is not None
            conn.run(b"STARTTLS")
            conn.start_tls(ctx)
            caps = _capability(conn)  # capabilities from before TLS are not to be trusted (RFC 9051 6.2.1)
        conn.set_capabilities(caps)
        if greeting.name != b"PREAUTH":
            # ID first: the device identity must be known before the session is authenticated.
            id_cmd = conn.send(_id_command(settings), collect=(b"ID",)) if conn.has("ID") else None
            login = _login(conn, conn.capabilities)
            if id_cmd is not None:
                conn.wait(id_cmd, check=False)  # a server that rejects ID still gets to decide on the login
            conn.wait(login, check=False)
            assert login.done is not None
            if id_cmd is not None and id_cmd.done is not None and not id_cmd.done.ok and login.done.ok:
                # Logged in without the device's identity: as the server's default device, whose local
                # deletes, policy and notifications are every plain client's. Not to be used.
                code = f"[{id_cmd.done.code.decode('utf-8', 'replace')}] " if id_cmd.done.code else ""
                raise ServerRefused(f"{address} refused the device id {settings.device_id!r}: "
                                    f"{code}{id_cmd.done.text}".strip())
            if not login.done.ok:
                text = login.done.text
                code = f"[{login.done.code.decode('utf-8', 'replace')}] " if login.done.code else ""
                if login.done.code is not None and \
                        login.done.code.split(b" ", 1)[0].upper() in TRANSIENT_LOGIN_CODES:
                    raise ServerUnavailable(f"login as {settings.user} refused for now: {code}{text}".strip())
                raise AuthenticationError(f"login as {settings.user} failed: {code}{text}".strip())
            post = _caps_from_code(login.done.code)
            conn.set_capabilities(post if post is not None else _capability(conn))
        return conn
    except BaseException as e:
        if conn is not None:
            conn.close()
        else:
            sock.close()
        ssl = sys.modules.get("ssl")
        if ssl is not None and isinstance(e, ssl.SSLCertVerificationError):
            raise TLSError(
                f"TLS certificate of {address} not trusted: {e.verify_message or e.reason}"
                + ("" if settings.ca_file else " (use --ca-file for a private CA)")
            ) from None
        if ssl is not None and isinstance(e, ssl.SSLError):
            raise TLSError(f"TLS with {address} failed: {e.reason or e}") from None
        if isinstance(e, ConnectionLost) and not isinstance(e, ProtocolError):
            raise ConnectError(f"login to {address} failed: {e}") from None
        if isinstance(e, (TimeoutError, OSError)):
            raise ConnectError(f"connection to {address} failed: {getattr(e, 'strerror', None) or e}") from None
        raise
