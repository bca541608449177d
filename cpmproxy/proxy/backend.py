"""The connection to the backend IMAP server: connect, TLS, ID forwarding, login.

During login the protocol runs its own tiny command/response engine (``command``); once the session
switches to relay mode, every byte goes to the session, which owns the same framer from then on.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet import defer, tcp
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpmproxy.config import ConfigError
from cpmproxy.imap.framing import Block, Framer, FramingError, LiteralData, Run, Segment, lines_of, run_events
from cpmproxy.imap.tokens import TokenError, parse_response_head, quote
from cpmproxy.proxy.wire import adapt_read_size, send_chunks
from cpmproxy.tlstrust import trust_from_file

if TYPE_CHECKING:
    from cpmproxy.config import Config

log = Logger(namespace="cpmproxy.backend")

__all__ = ["BackendError", "BackendRefused", "AuthFailed", "BackendProtocol", "backend_address", "connect_backend",
           "fail_answer", "login_backend", "pass_answer",
           "parse_capabilities", "UNAVAILABLE"]


# What a client is told when the backend cannot serve it (``[UNAVAILABLE]``, RFC 5530: try again later).
UNAVAILABLE = b"Backend server is not available, try again later."


class BackendError(Exception):
    """The backend cannot be used (down, TLS failure, protocol error, timeout)."""


class BackendRefused(BackendError):
    """The backend answered a command the proxy sent on its own NO or BAD. ``response`` is its status and
    text (``NO [OVERQUOTA] ...``): a NO is passed on to the client whose command needed it."""

    def __init__(self, what: str, response: bytes):
        super().__init__(f"{what}: {response[:200]!r}")
        self.response = response


class AuthFailed(Exception):
    """The backend refused the credentials; ``response`` is its status + text (``NO [..] ...``)."""

    def __init__(self, response: bytes):
        super().__init__(response.decode("utf-8", "replace"))
        self.response = response


# Response codes of a refused login that say the backend could not judge the credentials (RFC 5530):
# ``NO [UNAVAILABLE]`` (its password database is down), ``[SERVERBUG]``, ``[LIMIT]``, ``[INUSE]``. Those are
# BackendRefused, passed on as they are, with no delay and no failed login counted; any other NO (no
# code, AUTHENTICATIONFAILED, an ALERT with a password database's reason...) is a failed login.
_BACKEND_TROUBLE = frozenset((b"UNAVAILABLE", b"SERVERBUG", b"LIMIT", b"INUSE"))
_NO_CODE = re.compile(rb"NO \[([!#-'*-Z^-z|~]+)")  # (atom characters, "]" excluded)


@dataclass
class Reply:
    untagged: list[bytes]
    tagged: bytes  # the tagged line without tag and CRLF, e.g. b"OK [CAPABILITY ...] Logged in"
    # (``backend_command``) How many of ``Session.held_lines()`` were held when the first of ``untagged``
    # came (else the tagged line): the backend responses that came before the answer while a plugin's
    # Hold was on. None if nothing was held.
    held_before: int | None = None

    @property
    def status(self) -> bytes:
        return self.tagged.split(b" ", 1)[0].upper()


def parse_capabilities(text: bytes) -> list[bytes]:
    """Capabilities from ``CAPABILITY a b c`` (untagged data or the inside of a response code)."""
    words = text.split()
    if words and words[0].upper() == b"CAPABILITY":
        words = words[1:]
    return [w for w in words if w]


def _capability_code(line: bytes) -> list[bytes] | None:
    """The capabilities of a ``[CAPABILITY ...]`` response code in ``line``, in any case (RFC 9051 2.3:
    atoms such as the code's name are case-insensitive; ``[Capability`` came through as none, and the
    proxy asked again or took the server for one without LITERAL+)."""
    start = line.upper().find(b"[CAPABILITY ")
    if start < 0:
        return None
    end = line.find(b"]", start)
    if end < 0:
        return None
    return parse_capabilities(line[start + 1:end])


_GREETING_OK_RE = re.compile(rb"\* OK(?:[ \r\n]|\Z)", re.I)

CLOSE_GRACE = 5.0  # seconds a closing backend connection may take to end TLS once all is sent


def _unsent(transport) -> bool:
    """Whether bytes written to ``transport`` (a TCP one, or TLS over one) still wait to go out."""
    while transport is not None:
        if getattr(transport, "dataBuffer", b"") or getattr(transport, "_tempDataBuffer", None):
            return True
        transport = getattr(transport, "transport", None)
    return False


def fail_answer(answer: defer.Deferred, error: Exception | Failure) -> None:
    """Fail a command's ``answer`` because its connection failed (lost, BYE, a protocol error, no answer
    in time, never opened), not because the backend refused the command (a NO or BAD is an answer).

    Such a failure fails every command in flight at once. A plugin that sent several together awaits
    them one after the other and stops at the first failure raised; each of the others, never awaited,
    was logged as a CRITICAL "Unhandled error in Deferred" with a traceback when collected. The one
    failure of the connection is reported by whoever awaits a command on it (and by the session's end):
    a command nobody awaits now keeps it without that log, and raises it if awaited later."""
    answer.errback(error)
    # (getattr: should a later Twisted drop this private record, the failure is only logged again.)
    debug = getattr(answer, "_debugInfo", None)
    if isinstance(getattr(answer, "result", None), Failure) and hasattr(debug, "failResult"):
        # Twisted's record of a failure no callback took, logged when collected. (No public way: an
        # errback taking it would take it from whoever awaits the command later. A callback added later
        # that leaves it failed records it anew. tests/test_hostile_backend.py checks this holds.)
        debug.failResult = None


def pass_answer(source: defer.Deferred, answer: defer.Deferred) -> None:
    """``source.chainDeferred(answer)`` for a command's answer: a failure of ``source`` (its connection
    failed) fails ``answer`` as ``fail_answer`` does."""
    source.addCallbacks(answer.callback, lambda failure: fail_answer(answer, failure))


class BackendProtocol(Protocol):
    def __init__(self, max_line: int, answer_timeout: float | None = None):
        self.framer = Framer(max_line=max_line, max_literal=None, responses=True, blocks=True)
        # While the proxy waits for an answer of its own (the greeting, a command's) and not one byte
        # comes in this long, the connection is given up: a hung backend process must not hold a shared
        # side connection, or a user's logins, for ever. (Relayed sessions have their idle timeout.)
        self.answer_timeout = answer_timeout
        self._stall = None  # the IDelayedCall of that
        self.session = None  # set when relaying
        self.connected_d: defer.Deferred[BackendProtocol] = defer.Deferred()
        self.greeting: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._waiters: dict[bytes, defer.Deferred[Reply]] = {}
        self._continuations: deque[bytes] = deque()
        self._untagged: list[bytes] = []
        self._esearch: dict[bytes, list[bytes]] = {}
        self._parts: list[bytes] = []
        self._tag = 0
        self._got_greeting = False
        self.closed = False
        self._plain_tcp = False
        self.out: list[bytes] = []  # relay output, written once per input chunk
        self.on_unsolicited = None  # called with untagged responses that arrive while no command runs
        self.address: tuple | None = None  # the backend it was opened to (``backend_address``)
        self._close_when_idle = False

    def flush(self) -> None:
        if self.out and not self.closed:
            out, self.out = self.out, []
            send_chunks(self.transport, out)

    def close(self) -> None:
        """Close the connection once what was written went out. Over TLS that waits for the backend's
        answer to our close_notify, which Dovecot may never send (each client that left without LOGOUT
        kept a Dovecot process): ``CLOSE_GRACE`` seconds after the last byte went out (a big APPEND may
        still be on its way: never cut), the connection is cut."""
        if self.closed:
            return
        self.transport.loseConnection()
        from twisted.internet import reactor

        reactor.callLater(CLOSE_GRACE, self._cut, reactor)

    def close_when_idle(self) -> None:
        """Close once every command sent on it has its answer (a connection a reload retired: what was
        asked on it before is still answered there)."""
        self._close_when_idle = True
        if not self._waiters:
            self.close()

    def set_answer_timeout(self, seconds: float) -> None:
        """A reload's ``command_timeout``, for a connection already open (an answer awaited now too)."""
        self.answer_timeout = seconds
        if self._stall is not None:
            self._stall.reset(seconds)

    def _cut(self, reactor) -> None:
        if self.closed:
            return
        if _unsent(self.transport):
            reactor.callLater(CLOSE_GRACE, self._cut, reactor)
        else:
            self.transport.abortConnection()

    # -- Twisted ----------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._plain_tcp = isinstance(self.transport, tcp.Connection)
        setnodelay = getattr(self.transport, "setTcpNoDelay", None)
        if setnodelay is not None:
            setnodelay(True)
        self._watch_answers()  # (the greeting)

    def _watch_answers(self) -> None:
        """(Re)start the wait for an answer, or stop it when none is due."""
        due = self.answer_timeout is not None and not self.closed and self.session is None \
            and (self._waiters or not self._got_greeting)
        if not due:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
        elif self._stall is None:
            from twisted.internet import reactor

            self._stall = reactor.callLater(self.answer_timeout, self._stalled)
        else:
            self._stall.reset(self.answer_timeout)

    def _stalled(self) -> None:
        self._stall = None
        if not self._got_greeting and self._plain_tcp:
            # (An implicit-TLS port waits for the client's TLS hello: the same silence, the usual cause.)
            why = (f"no greeting from the backend in {self.answer_timeout:g} s (if backend.port is its "
                   f'implicit-TLS port, such as 993, set backend.tls = "implicit")')
            log.warn("{why}: connection given up", why=why)
            self._give_up(BackendError(why))
        else:
            log.warn("backend gave no answer in {seconds:g} s: connection given up", seconds=self.answer_timeout)
            self._give_up(BackendError(f"no answer from the backend in {self.answer_timeout:g} s"))

    def _give_up(self, err: Exception) -> None:
        """Fail what waits on this connection and abort it; ``closed`` from now on, not only once
        connectionLost comes (on the reactor's next turn): nothing more is sent or read on it."""
        self._fail(err)
        self.closed = True
        self._watch_answers()
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.session is not None:
            if self._plain_tcp:
                adapt_read_size(self.transport, len(data))
            self.session.backend_data(data)
            return
        if self.closed:  # (given up: what it still sends is not read)
            return
        if self._stall is not None:
            self._stall.reset(self.answer_timeout)  # (a long answer still coming in is no stall)
        self.framer.feed(data)
        try:
            for ev in self._events():
                if isinstance(ev, LiteralData):
                    self._parts.append(ev.data)
                    continue
                self._parts.append(ev.data)
                if ev.literal is None:
                    line = b"".join(self._parts)
                    self._parts = []
                    self._response(line)
        except (FramingError, TokenError) as e:
            # Its framer may be left mid-line or mid-literal, and what came before the error is still
            # held: a later command's answer would be misread, or given to another command. (A shared
            # side connection would stay in the pool: ``closed`` at once makes the next one open another.)
            self._give_up(BackendError(f"protocol error from backend: {e}"))
            return
        self._watch_answers()

    def _events(self):
        """Framer events, blocks split into their lines (the login engine handles one at a time)."""
        for ev in self.framer.events():
            if isinstance(ev, Block):
                for line in lines_of(ev.data):
                    yield Segment(line, True)
            elif isinstance(ev, Run):
                yield from run_events(ev)
            else:
                yield ev

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self._watch_answers()
        if self.session is not None:
            self.session.backend_lost(reason)
        self._fail(BackendError(_tls_failure(self.transport, reason) or
                                f"backend closed the connection: {reason.getErrorMessage() if reason else ''}"))
        if not self.lost.called:
            self.lost.callback(None)

    # -- login-phase engine ---------------------------------------------------------------------

    def _fail(self, err: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for d in waiters.values():
            fail_answer(d, err)
        if not self.greeting.called:
            self.greeting.errback(err)

    def _response(self, line: bytes) -> None:
        if not self._got_greeting:
            self._got_greeting = True
            self.greeting.callback(line)
            return
        head = parse_response_head(line.rstrip(b"\r\n"))
        if head.kind == "continuation":
            if self._continuations:
                self.transport.write(self._continuations.popleft() + b"\r\n")
            else:
                self.transport.write(b"*\r\n")  # cancel an exchange nobody expects
            return
        if head.kind == "untagged":
            if head.name == b"ESEARCH" and line[:16].upper() == b'* ESEARCH (TAG "':  # (names have no case)
                # Correlated by tag: pipelined searches may be answered out of order.
                tag = line[16:line.find(b'"', 16)]
                if tag in self._waiters:
                    self._esearch.setdefault(tag, []).append(line)
                    return
            if self.on_unsolicited is not None and not self._waiters:
                self.on_unsolicited(line)  # e.g. NOTIFY events on a watching connection
            else:
                self._untagged.append(line)
            return
        d = self._waiters.pop(head.tag, None)
        untagged, self._untagged = self._untagged, []
        untagged += self._esearch.pop(head.tag, [])
        if d is not None:
            d.callback(Reply(untagged, line.rstrip(b"\r\n")[len(head.tag) + 1:]))
        if self._close_when_idle and not self._waiters:
            self.close()

    def command(self, line: bytes, continuation: bytes | None = None) -> defer.Deferred[Reply]:
        """Send ``TAG line``; fires with the Reply. ``continuation`` answers one ``+`` from the server."""
        self._tag += 1
        tag = b"P%d" % self._tag
        d: defer.Deferred[Reply] = defer.Deferred()
        self._waiters[tag] = d
        if continuation is not None:
            self._continuations.append(continuation)
        # At once, not on the reactor's next turn: a side query sent beside a SELECT runs in parallel
        # with it in Dovecot (a Twisted write waits for the next poll).
        send_chunks(self.transport, [tag + b" " + line + b"\r\n"])
        if self._stall is None:
            self._watch_answers()
        return d


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, max_line: int, answer_timeout: float | None = None):
        self.max_line = max_line
        self.answer_timeout = answer_timeout

    def buildProtocol(self, addr):
        p = BackendProtocol(self.max_line, self.answer_timeout)
        p.factory = self
        return p


_tls_cache: tuple | None = None  # (config, its options): the CA file is read once per configuration


def _mismatched(error) -> str:
    """The name or address a certificate was not for (a service_identity mismatch)."""
    found = getattr(error, "mismatched_id", None)
    value = getattr(found, "hostname", None) or getattr(found, "ip", None) or error
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _tls_failure(transport, reason) -> str | None:
    """Why TLS with the backend failed, None if it did not. OpenSSL says only "certificate verify failed"
    (and pyOpenSSL gives no verification result): the certificate the backend sent tells an expired one
    from one no trusted CA signed."""
    from OpenSSL import SSL
    from service_identity import VerificationError
    if reason is not None and reason.check(VerificationError):
        ids = ", ".join(_mismatched(e) for e in reason.value.errors)
        return f"TLS with the backend failed: its certificate is not for {ids} (backend.server_name names the " \
               f"name to check)"
    if reason is None or not reason.check(SSL.Error):
        return None
    text = f"TLS with the backend failed: {reason.getErrorMessage()}"
    if "wrong version number" in text:  # (OpenSSL's words for a TLS hello answered in plain text)
        return ("TLS with the backend failed: it answered in plain text, not TLS (backend.tls = \"implicit\" "
                "needs its implicit-TLS port, such as 993; on 143, backend.tls = \"starttls\")")
    if "certificate verify failed" not in text:
        return text
    try:
        chain = transport.getHandle().get_peer_cert_chain() or []
        leaf = chain[0].to_cryptography()
    except Exception:  # (no certificate to look at)
        return text
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        why = f"it expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    elif leaf.not_valid_before_utc > now:
        why = f"it is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    else:
        why = f"no trusted CA (backend.ca_file, else the system's) signed it or its chain; issuer {leaf.issuer.rfc4514_string()!r}"
    return f"TLS with the backend failed: its certificate was refused: {why}"


def backend_tls_options(config: Config):
    """The TLS client options for the backend: ConfigError if ``ca_file`` is no CA bundle. Built once per
    configuration (a reload re-reads the file), not at every login."""
    global _tls_cache
    if _tls_cache is None or _tls_cache[0] is not config:
        _tls_cache = (config, _tls_options(config))
    return _tls_cache[1]


def _tls_options(config: Config):
    b = config.backend
    name = b["server_name"] or b["host"]
    if b["ca_file"]:
        trust = trust_from_file(b["ca_file"], "backend.ca_file")
    else:
        trust = platformTrust()
    # optionsForClientTLS verifies the chain and, with service_identity, the hostname/IP.
    try:
        return optionsForClientTLS(name, trustRoot=trust)
    except (UnicodeError, ValueError) as e:  # (idna's errors: "_" in a name, an empty label)
        key = "backend.server_name" if b["server_name"] else "backend.host"
        raise ConfigError(f"{key}: {name!r} is no host name a certificate can be checked against ({e}); "
                          f"set backend.server_name to the name in the backend's certificate") from None


def _tcp_endpoint(reactor, host: str, port: int, timeout: float):
    """An address connects directly; a name goes through HostnameEndpoint (resolution in a thread, then
    every address tried, happy-eyeballs style), which costs ~10% of a login's CPU for nothing if there
    is no name to resolve."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    return (TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint)(reactor, host, port, timeout=timeout)


def backend_address(config: Config) -> tuple:
    """Where, and how, a backend connection made under ``config`` goes: a reload that changes it moves the
    proxy's own connections (side, watch) to the new backend."""
    b = config.backend
    return b["host"], b["port"], b["tls"], b["server_name"], b["ca_file"]


async def connect_backend(reactor, config: Config) -> tuple[BackendProtocol, list[bytes]]:
    """Connect (and TLS) to the backend; returns the protocol and its pre-login capabilities."""
    b = config.backend
    endpoint = _tcp_endpoint(reactor, b["host"], b["port"], b["connect_timeout"])
    if b["tls"] == "implicit":
        endpoint = wrapClientTLS(backend_tls_options(config), endpoint)
    # (The greeting within connect_timeout; answers to the proxy's own commands within command_timeout.)
    factory = _BackendFactory(config.limits["max_backend_line"], b["connect_timeout"])
    try:
        proto: BackendProtocol = await endpoint.connect(factory)
    except Exception as e:  # ConnectError, DNSLookupError, TimeoutError...
        raise BackendError(f"cannot connect to backend {b['host']}:{b['port']}: {e}") from None
    proto.address = backend_address(config)
    try:
        greeting = await proto.greeting
        if not _GREETING_OK_RE.match(greeting):  # (any case: a server's "* ok" was refused)
            raise BackendError(f"backend refused the connection: {greeting[:200]!r}")
        caps = _capability_code(greeting)
        proto.answer_timeout = b["command_timeout"]
        if b["tls"] == "starttls":
            reply = await proto.command(b"STARTTLS")
            if reply.status != b"OK":
                raise BackendError(f"backend refused STARTTLS: {reply.tagged[:200]!r}")
            if proto.framer.buffered:
                # Bytes after the OK were sent in plaintext before TLS: an injection attempt.
                raise BackendError("backend sent data after STARTTLS OK")
            proto.transport.startTLS(backend_tls_options(config))
            caps = None  # capabilities before TLS must not be trusted
        if caps is None:
            reply = await proto.command(b"CAPABILITY")
            if reply.status != b"OK":
                raise BackendError("backend CAPABILITY failed")
            caps = []
            for line in reply.untagged:
                if line[2:12].upper() == b"CAPABILITY":
                    caps = parse_capabilities(line[2:].strip())
    except BaseException:
        proto.transport.abortConnection()
        raise
    return proto, caps


_ID_UNSAFE = re.compile(rb"[\x00-\x1f\x7f-\xff]")
_ID_ESCAPE = re.compile(rb'(["\\])')


def id_string(value: str) -> bytes:
    """An ID field as an IMAP quoted string (RFC 2971 wants strings, not atoms); informational text, so
    characters a quoted string cannot carry become '?' rather than forcing a literal."""
    data = _ID_UNSAFE.sub(b"?", value.encode("utf-8", "replace"))
    return b'"' + _ID_ESCAPE.sub(rb"\\\1", data) + b'"'


def id_list(fields) -> bytes:
    parts = []
    for k, v in fields:
        parts.append(id_string(k))
        parts.append(b"NIL" if v is None else id_string(v))
    return b"(" + b" ".join(parts) + b")"


async def login_backend(proto: BackendProtocol, caps: list[bytes], authzid: str, user: str, password: str,
                        id_fields: list[tuple[str, str | None]]) -> list[bytes]:
    """ID (forwarding the client's address) and AUTHENTICATE PLAIN, pipelined; returns post-login
    capabilities. Raises AuthFailed, BackendRefused (a NO for a reason other than the credentials) or
    BackendError."""
    upper = {c.upper() for c in caps}
    waits = []
    if b"ID" in upper:
        waits.append(proto.command(b"ID " + id_list(id_fields)))
    secret = password.encode("utf-8", "surrogateescape")  # (the client's bytes, UTF-8 or not)
    blob = base64.b64encode(f"{authzid}\0{user}\0".encode() + secret)
    if b"AUTH=PLAIN" in upper and b"SASL-IR" in upper:
        auth = proto.command(b"AUTHENTICATE PLAIN " + blob)
    elif b"AUTH=PLAIN" in upper:
        auth = proto.command(b"AUTHENTICATE PLAIN", continuation=blob)
    elif b"LOGINDISABLED" in upper:
        raise BackendError("backend offers no usable login mechanism (LOGINDISABLED, no AUTH=PLAIN)")
    else:
        auth = proto.command(b"LOGIN " + quote(user) + b" " + quote(secret))
    for d in waits:
        await d  # an ID refused is not fatal: the backend may not trust us for x-* fields
    reply = await auth
    if reply.status != b"OK":
        if reply.status == b"NO":
            code = _NO_CODE.match(reply.tagged)
            if code is not None and code.group(1).upper() in _BACKEND_TROUBLE:
                raise BackendRefused("backend refused the login", reply.tagged)
            raise AuthFailed(reply.tagged)
        raise BackendError(f"backend login error: {reply.tagged[:200]!r}")
    post = _capability_code(reply.tagged)
    if post is None:
        for line in reply.untagged:
            if line[2:12].upper() == b"CAPABILITY":
                post = parse_capabilities(line[2:].strip())
    if post is None:
        r = await proto.command(b"CAPABILITY")
        post = []
        for line in r.untagged:
            if line[2:12].upper() == b"CAPABILITY":
                post = parse_capabilities(line[2:].strip())
    return post
