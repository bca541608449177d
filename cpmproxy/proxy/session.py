"""The client-facing IMAP session: the login phase owned by the proxy (``login.LoginPhase``), then the relay.

Relay path, per chunk of bytes: the framer finds segment and literal boundaries (bytes.find and a regex on
a line's tail, never a Python loop over bytes); literal chunks are forwarded as slices; each first segment
of a command/response gets a cheap head parse and, only if some plugin asks for it, a hook call. Backend
runs of one-line responses and of FETCH responses with literals skip even that when a few substring tests
on their text show that nothing in them concerns the core or a plugin (``block_ok``). All that is written
for one chunk goes out in one ``sendmsg`` (``wire.send_chunks``).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from cpmproxy.imap.append import literal_always_read, literal_out_of_place
from cpmproxy.imap.framing import (
    Block,
    Framer,
    FramingError,
    LiteralData,
    Run,
    Segment,
    lines_of,
    lower_case_name,
    numbered_run_end,
    only_fetch_responses,
    run_events,
)
from cpmproxy.imap.mutf7 import decode as mutf7_decode
from cpmproxy.imap.mutf7 import fold_inbox
from cpmproxy.imap.tokens import (
    TokenError,
    astring_text,
    parse_command,
    parse_response_head,
    space_run,
)
from cpmproxy.proxy.backend import (
    UNAVAILABLE,
    BackendError,
    BackendRefused,
    Reply,
    backend_address,
    connect_backend,
    fail_answer,
    login_backend,
    pass_answer,
)
from cpmproxy.proxy.hooks import (
    Answer,
    BackendResponse,
    ClientCommand,
    Collect,
    Defer,
    Drop,
    Hold,
    Rewrite,
    SelectedMailbox,
)
from cpmproxy.proxy.login import LoginPhase
from cpmproxy.proxy.wire import send_chunks

if TYPE_CHECKING:
    from cpmproxy.proxy.service import ProxyService

log = Logger(namespace="cpmproxy.session")

_INTERNAL_TAG_PREFIX = b"cpm."  # the tags of the proxy's own commands on a session's backend connection

_NOT_UNTAGGED_RE = re.compile(rb"\n[^*]")
# The answer to one of the proxy's own searches (RFC 4731: the correlator names its tag). Names have no case.
_INTERNAL_ESEARCH_RE = re.compile(rb'\* (?i:ESEARCH) \((?i:TAG) "' + re.escape(_INTERNAL_TAG_PREFIX))
# A non-synchronizing literal's "{n+}" (LITERAL+) or "{n-}" (LITERAL-) + CRLF.
_NONSYNC_MARK_RE = re.compile(rb"(~?\{\d+)[+-](\}\r?\n)")
# A run of lines starting with a message number ("* 12 ..."), FETCH-like (numbered_run_end finds its end).
_NUMBERED_RE = re.compile(rb"\* [0-9]")
_CAPABILITY_CODE_RE = re.compile(rb"(?:OK|NO|BAD|BYE) \[(CAPABILITY [^\]\r\n]*)\]", re.I)  # (after "* " or the tag)
_FETCH_HEAD_RE = re.compile(rb"\* [0-9]+ FETCH ")
_TAG_RE = re.compile(rb'([^\x00-\x20\x7f-\xff+(){%*"\\\]]{1,64})[ \r\n]')
_SELECTING = {b"SELECT", b"EXAMINE"}
_DESELECTING = {b"CLOSE", b"UNSELECT"}




def _coded_bad(status_text: bytes) -> bytes:
    """A tagged response's status and text (b"BAD Unknown command\r\n"), with ``[CLIENTBUG]`` added to a
    BAD that has no response code: every BAD a client gets carries one (DESIGN.md section 7). Anything
    else (OK, NO, a BAD with a code) is returned as it is."""
    if status_text[:3].upper() != b"BAD":
        return status_text
    rest = status_text[3:]
    if rest[:1] == b" ":
        return status_text if rest[1:2] == b"[" else status_text[:3] + b" [CLIENTBUG]" + rest
    if rest[:1] in (b"\r", b"\n", b""):  # (no text at all)
        return status_text[:3] + b" [CLIENTBUG] Invalid command." + rest
    return status_text  # ("BADX...": not a BAD)


def _code_number(line: bytes, code: bytes) -> int | None:
    i = line.find(b"[" + code + b" ")
    if i < 0:
        return None
    j = line.find(b"]", i)
    try:
        return int(line[i + len(code) + 2:j])
    except ValueError:
        return None


def _guarded(method):
    """For the session's entry points from the reactor (data from either side, a plugin's Deferred
    firing): an exception that escapes, a bug of ours or of a plugin, ends this session with ``BYE
    [SERVERBUG]`` and a logged traceback. Without it Twisted drops the connection with no word to the
    client, or a Deferred keeps the error and the session waits forever."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self._internal_error(method.__name__)
            return None
    return guarded


class ClientSession(LoginPhase, Protocol, TimeoutMixin):
    """One client connection and, after login, its backend connection."""

    def __init__(self, service: ProxyService):
        self.service = service
        self.config = service.config
        limits = self.config.limits
        self.framer = Framer(max_line=limits["max_line"], max_literal=limits["max_preauth_literal"])
        self.phase = "preauth"  # preauth -> login -> auth -> closed
        self.session_id = secrets.token_urlsafe(12)
        self.peer_host = ""
        self.peer_port = 0
        self.tls_active = False
        self.client_id: dict[str, str | None] = {}
        self.device_id = "default"
        self.user: str | None = None
        self.backend = None
        self.backend_caps: list[bytes] = []
        self.capabilities: list[bytes] = []
        self.selected: SelectedMailbox | None = None
        self.state: dict[str, Any] = {}  # per-plugin session state, keyed by plugin name
        self.bad_commands = 0
        self._bad_replies = 0  # BAD answers of the proxy's own (counted with bad_commands before login)
        self.auth_failures = 0
        # preauth command collection
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._auth_tag: bytes | None = None
        # relay state
        self._out: list[bytes] = []
        self._pending_inject: list[bytes] = []
        self._inflight: dict[bytes, deque[ClientCommand]] = {}
        # Local answers waiting for the commands sent to the backend before them: (commands sent then,
        # reply). Pipelined commands complete in the order the client sent them, answered here or not.
        self._parked: deque[tuple[int, bytes]] = deque()
        self._parking = False  # too many parked: the client is not read until they go out
        self._discard_command = False
        self._answered_early = False  # (see _relay_client_events)
        self._drop_response = False
        self._idle: str | None = None  # None, "active" (backend idling for the client), "suspended"
        self._idle_cmd: ClientCommand | None = None
        self._idle_done_pending = False  # the client said DONE while we had the backend's IDLE suspended
        self._hooks_started: list = []
        self._idle_ended = False
        self._awaiting_continuation = False  # a forwarded synchronizing literal waits for the backend's "+"
        self._internal: dict[bytes, tuple[defer.Deferred, list[bytes]]] = {}
        self._internal_held_before: dict[bytes, int] = {}  # (see Reply.held_before)
        self._internal_queue: list[bytes] = []
        self._internal_seq = 0
        self._sent = 0
        self._collecting: dict | None = None  # a command being gathered for a plugin (Collect)
        self._held: list | None = None  # backend events waiting while a plugin gathers data (Hold)
        self._held_whole: list[defer.Deferred] = []  # (see held_response_whole)
        self._swallow_tagged: set[bytes] = set()
        self._swallow_continuation = 0
        # A client command whose literal went to the backend as a synchronizing one and awaits its "+";
        # the pieces of it still to send (see _backend_send).
        self._literal_gate: ClientCommand | None = None
        self._gated_pieces: deque[bytes] = deque()
        self._gate_ends_sync = False  # the gated text ends with the client's own synchronizing literal
        self._blocked = False  # a plugin's Defer decision is pending
        self._credentials: tuple[str, str, str] | None = None  # kept for the side connection only

        self._current: ClientCommand | None = None  # command whose later segments we are relaying
        self._resp_cmd: ClientCommand | None = None
        self._resp_head = None
        self._selecting: ClientCommand | None = None
        # UNSELECTs of the proxy's own at the backend (see _unselect_backend): until their answer the
        # backend still has a mailbox selected that the client no longer has.
        self.unselecting = 0
        self._bye_sent = False
        self._ended_with = ""  # the BYE the proxy said, for the disconnect log line
        self._connected_at = service.reactor.seconds()
        # The first two bytes the client sends, until there are two (looked at once: a TLS handshake on a
        # plaintext port); None after. (A read may bring one byte, or none: what a PROXY header left.)
        self._first_bytes: bytes | None = b""
        self._sealed = False  # our BYE is out (or the connection is being closed): nothing follows it
        self._closing = False
        self._draining: bytes | None = None  # shutting down: the BYE text, once the commands are done
        # The plugins' hook table the session runs with: the service's (a reload sets the new one), or the
        # one it began with while a reload that changed the plugins lets it finish (see ``shutdown``).
        self.hooks = service.hooks
        self._peer_unsettled = True
        self._output_link = _OutputLink(self)
        self._cut_call = None  # the abort of a closing connection whose client does not read
        self.bytes_out = 0  # handed to the client's connection (a long download is no idleness)
        self._timeout_mark = 0

    # -- logging helpers ------------------------------------------------------------------------

    def _log_fields(self) -> dict[str, Any]:
        return {"session": self.session_id, "peer": self.peer_host, "user": self.user, "device": self.device_id}

    # -- connection -----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_host = _unmapped(getattr(peer, "host", "") or "")
        self.peer_port = getattr(peer, "port", 0) or 0
        self.tls_active = ISSLTransport.providedBy(self.transport)
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except OSError:
                pass
        refusal = self.service.admit(self)
        if refusal:
            self.transport.write(b"* BYE [UNAVAILABLE] " + refusal.encode() + b"\r\n")
            self._closing = True
            self._lose_client()
            return
        # Told when the client's send buffer fills and drains: no more commands are read while answers
        # wait for a client that does not read them (answers of the proxy's own grew its memory without
        # bound), and after login the backend's socket is paused and resumed with it.
        self.transport.registerProducer(self._output_link, True)
        self.setTimeout(self.config.limits["preauth_timeout"])
        caps = b" ".join(self._preauth_capabilities())
        greeting = self.config.proxy["greeting"].encode("utf-8", "replace")
        self.transport.write(b"* OK [CAPABILITY " + caps + b"] " + greeting + b"\r\n")
        log.info("connect {peer} session={session}", **self._log_fields())

    def _settle_peer(self) -> None:
        """Behind a PROXY-protocol listener the real client address is known only once the header
        has been read, i.e. after connectionMade: take it from the transport with the first data."""
        self._peer_unsettled = False
        peer = self.transport.getPeer()
        host = _unmapped(getattr(peer, "host", "") or "")
        if host and host != self.peer_host:
            self.service.rehome(self, host)
            self.peer_host = host
            self.peer_port = getattr(peer, "port", 0) or 0

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.setTimeout(None)
        if self._cut_call is not None and self._cut_call.active():
            self._cut_call.cancel()
        prev = self.phase
        self.phase = "closed"
        if self.backend is not None and not self.backend.closed:
            # Flush what the client sent (never lose a completed APPEND), then close.
            self.backend.close()
        self._close_side()
        self._credentials = None
        self.service.forget(self)
        for plugin in self.hooks.closed:
            try:
                plugin.closed(self)
            except Exception:
                log.failure("plugin {plugin} closed hook failed", plugin=plugin.name)
        # (The BYE said is the reason where there was one: the connection itself then just closed cleanly.)
        log.info("disconnect session={session} user={user} device={device} phase={phase} seconds={seconds:.1f} "
                 "bytes_out={bytes_out} reason={reason}",
                 session=self.session_id, user=self.user, device=self.device_id, phase=prev,
                 seconds=self.service.reactor.seconds() - self._connected_at, bytes_out=self.bytes_out,
                 reason=self._ended_with or (reason.getErrorMessage() if reason else ""))

    def _bug(self, what: str, failure: Failure | None = None) -> None:
        """Log a bug met in this session (ours or a plugin's) with its traceback (``failure``, or the
        exception being handled), and count it: ``cpmproxy_internal_errors_total``."""
        log.failure("{what} session={session} user={user}", failure, what=what, session=self.session_id,
                    user=self.user)
        self.service.metrics.internal_errors.inc()

    def _internal_error(self, where: str) -> None:
        """An exception escaped (see ``_guarded``): logged with its traceback; the session ends with BYE
        [SERVERBUG], since what it shows the client (a filtered view, held responses) can no longer be
        trusted. The proxy and its other sessions go on."""
        self._bug(f"internal error in {where}")
        try:
            self.bye(b"Internal error.", code=b"SERVERBUG")
        except Exception:  # (the state that failed may fail the BYE too: the connection still goes)
            log.failure("internal error while closing session={session}", session=self.session_id)
            self.transport.abortConnection()
            if self.backend is not None and not self.backend.closed:
                self.backend.transport.abortConnection()

    def timeoutConnection(self) -> None:
        if self.phase == "auth" and self._inflight and not self.idling and self.framer.at_boundary:
            # An answer still going out to a client that reads it (a long download on a slow link) is no
            # idleness; a client that reads nothing of it is, and so is a command that stalls with
            # nothing said (a backend that never answers must not hold the client's slots for ever).
            progressed, self._timeout_mark = self.bytes_out != self._timeout_mark, self.bytes_out
            if progressed:
                self.setTimeout(self.timeOut)  # (a new timer: TimeoutMixin dropped the one that fired)
                return
        self.service.metrics.timeouts.inc()
        self.bye(b"Disconnected for inactivity.")

    def bye(self, text: bytes, code: bytes = b"UNAVAILABLE") -> None:
        """Send BYE (at a safe point) and close both sides."""
        if self.phase == "closed" or self._closing:
            return
        self._closing = True
        msg = b"* BYE " + (b"[" + code + b"] " if code else b"") + text + b"\r\n"
        self._bye_sent = True
        self._ended_with = msg[2:-2].decode("utf-8", "replace")
        if self.backend is not None and self.phase == "auth" and not self._backend_at_boundary():
            # Mid-response to the client: a BYE cannot be placed; closing is all we can do cleanly.
            self._flush()
        else:
            self._out.append(msg)
            self._flush()
        # Responses still arriving or held (a plugin's Hold released after this) must not follow: Twisted
        # still sends what is written before the connection is gone, and a filtered view that gave up
        # would then show what it hides.
        self._sealed = True
        self._lose_client()
        if self.backend is not None and not self.backend.closed:
            self.backend.close()

    def _lose_client(self) -> None:
        """Close the client's connection once what is buffered for it went out. Twisted does not close a
        connection while a producer is registered with it: the links both ways go first (a session ended
        while its client read nothing stayed in CLOSE-WAIT, holding its connection slots, until a
        restart), and a client that does not read what is left is cut after ``[limits] close_timeout``."""
        self.transport.unregisterProducer()
        if self.backend is not None and not self.backend.closed:
            # (Not from inside the backend connection's own connectionLost: over TLS its transport has let
            # go of the protocol by then, and Twisted unregisters its producer itself.)
            self.backend.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._cut_call is None:
            self._cut_call = self.service.reactor.callLater(self.config.limits["close_timeout"],
                                                           self.transport.abortConnection)

    # -- output ---------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._sealed:
            self._out.clear()
        elif self._out:
            out, self._out = self._out, []
            size = sum(map(len, out))
            self.bytes_out += size
            self.service.metrics.bytes_out += size
            send_chunks(self.transport, out)

    def _backend_at_boundary(self) -> bool:
        return self.backend is None or self.backend.framer.at_boundary

    def inject(self, data: bytes) -> None:
        """Queue whole untagged response(s) for the client, written at the next safe point."""
        if self.phase != "auth" or self._closing:
            return
        if self._backend_at_boundary() and not self._drop_response and self._held is None:
            self._out.append(data)
            self._flush()
        else:
            self._pending_inject.append(data)

    def _reply(self, tag: bytes, status_text: bytes, untagged: list[bytes] = ()) -> None:
        """A locally generated answer; in relay mode it waits for a safe point like an injection."""
        if status_text[:3] == b"BAD":
            self._bad_replies += 1
        data = b"".join(untagged) + tag + b" " + _coded_bad(status_text) + b"\r\n"
        if self.phase == "auth":
            if self._inflight:
                self._parked.append((self._sent, data))
            else:
                self.inject(data)
        else:
            self._out.append(data)

    # -- input ----------------------------------------------------------------------------------

    @_guarded
    def dataReceived(self, data: bytes) -> None:
        if self._peer_unsettled:
            self._settle_peer()
        if self.phase != "preauth":
            # (Before login the timeout counts from the connection, as Dovecot's own: reset by every byte,
            # a client trickling a NOOP now and then held a connection slot for ever.)
            self.resetTimeout()
        self.service.metrics.bytes_in += len(data)
        if self._first_bytes is not None:
            first = self._first_bytes = (self._first_bytes + data[:2])[:2]
            if len(first) == 2 or self.tls_active:
                self._first_bytes = None
            if first == b"\x16\x03" and not self.tls_active:
                # A TLS handshake record (a client set for implicit TLS, on the STARTTLS port): no line
                # ever comes. Said at once, and in the log, where it would read as a plain disconnect.
                self.service.metrics.bad_input.labels(kind="tls_on_plaintext").inc()
                log.info("TLS handshake on a plaintext listener, closing peer={peer} session={session}",
                         peer=self.peer_host, session=self.session_id)
                self.bye(b"This port speaks plaintext IMAP (use STARTTLS), not implicit TLS.", code=b"CLIENTBUG")
                return
        self.framer.feed(data)
        self._process_client()

    def _process_client(self) -> None:
        if self._literal_gate is not None or self._awaiting_continuation:
            # (Waiting for the backend's "+": the client's socket stays paused, even when the backend
            # connection's producer link resumes it, or its bytes would pile up in the framer.)
            self.transport.pauseProducing()
            return
        if self.phase in ("login", "closed") or self._blocked or self._parking or self._closing:
            return
        if self._output_link.paused:
            self._output_link.holds_input = True
            self.transport.pauseProducing()  # (until the client reads: _output_drained)
            return
        try:
            if self.phase == "preauth":
                self._preauth_events()
            else:
                self._relay_client_events()
        except FramingError as e:
            self._framing_error(e)
        finally:
            self._flush()
            if self.phase == "auth" and self.backend is not None:
                self.backend.flush()

    def _framing_error(self, e: FramingError) -> None:
        self.service.metrics.bad_input.labels(kind=e.code.lower()).inc()
        tag = self._tag_of(e.data) if e.first else None
        if e.fatal:
            log.info("framing error, closing: {msg} session={session}", msg=e.message, session=self.session_id)
            if self.phase == "auth" and self._current is not None and self.backend is not None:
                # Part of this command is already at the backend: dropping the connection aborts it.
                self.backend.transport.abortConnection()
            self._discard_command = False
            self.bye(e.message.encode() + b".", code=e.code.encode())
            return
        # A refused synchronizing literal: the client will not send it, the command is over.
        self._reply(tag or b"*", b"BAD [" + e.code.encode() + b"] " + e.message.encode() + b".")
        self._count_bad(None)

    @staticmethod
    def _tag_of(line: bytes) -> bytes | None:
        """The tag of a line that failed to parse, if it has a valid one (else answer untagged)."""
        m = _TAG_RE.match(line)
        return m.group(1) if m else None

    def _count_bad(self, kind: str | None = "syntax") -> None:
        """A command the proxy answered BAD itself; ``kind`` for ``cpmproxy_bad_input`` (None: counted
        there already, as a framing error)."""
        if kind is not None:
            self.service.metrics.bad_input.labels(kind=kind).inc()
        self.bad_commands += 1
        if self.bad_commands >= self.config.limits["max_bad_commands"]:
            self.bye(b"Too many invalid commands.", code=b"CLIENTBUG")

    # -- relay: client -> backend ---------------------------------------------------------------

    def _relay_client_events(self) -> None:
        backend = self.backend  # (its ``out`` list is replaced at each flush: looked up each time)
        hooks = self.hooks.command
        for ev in self.framer.events():
            if self._collecting is not None:
                if not self._collect_event(ev) or self._literal_gate is not None:
                    return
                continue
            if isinstance(ev, LiteralData):
                if not self._discard_command:
                    backend.out.append(ev.data)
                continue
            if not ev.first:
                if self._answered_early:
                    # The backend answered the command while its literal was on the way, and read that
                    # literal (Dovecot's delayed APPEND failures): a bare CRLF ends the command there, and
                    # the rest of it is dropped (its tagged answer is already out).
                    self._answered_early = False
                    backend.out.append(b"\r\n")
                    self._discard_command = True
                data = ev.data
                ended = False
                if not self._discard_command and ev.literal is not None and self._current is not None \
                        and self._current.name == b"APPEND" and literal_out_of_place(data):
                    self.backend.out.append(b" X\r\n")  # (ends the command with a syntax error: BAD)
                    self._discard_command = True
                if not self._discard_command:
                    for rewrite in self._current.state.get("later_segments", ()) if self._current else ():
                        data = rewrite(data)  # (see ClientCommand: a plugin's rewrite of later segments)
                        if data is None:
                            # Refused: the backend gets a syntax error where this segment began, which
                            # ends the command there (it answers BAD, saves nothing of an APPEND) and
                            # leaves nothing of the line to read as a command; the rest is dropped.
                            self.backend.out.append(b" X\r\n")
                            self._discard_command = True
                            break
                if not self._discard_command:
                    self._backend_send(self._current, data, False)
                    self._awaiting_continuation = ev.literal is not None and not ev.non_sync
                    if self._awaiting_continuation:
                        self._wait_for_continuation()
                        return
                elif ev.literal is not None and not ev.non_sync:
                    # A locally answered command cannot go on: refuse its next literal. The command ends
                    # here, as at a line end (found by the command fuzzer: kept as the command being
                    # relayed, it held back every internal command, and the session hung at its next
                    # SELECT: 'APPEND F 01 {3+}' whose rest announced a synchronizing literal).
                    self.framer.refuse_literal()
                    ended = True
                if ended or ev.literal is None:
                    self._discard_command = False
                    self._current = None
                    self._send_internal_queue()
                if self._literal_gate is not None:
                    return  # (the rest waits for the backend's "+")
                continue
            # A new command.
            self._discard_command = False
            if self._draining is not None:
                # Shutting down: no new command is taken (it gets no answer: BYE comes instead, once the
                # commands before it are done); nothing more is read.
                self.transport.pauseProducing()
                if ev.literal is not None:
                    self._local_answer_literal(ev)
                return
            if self._idle is not None and self._idle_cmd is not None:
                line = ev.data
                if ev.literal is not None:
                    # Not DONE, whatever follows: the backend ends IDLE on the line (BAD, or OK if the
                    # text is DONE), and would then read the literal as commands: it never gets it.
                    line = _LITERAL_AT_END_RE.sub(b"", line).rstrip() + b"\r\n"
                    self._local_answer_literal(ev)
                self._client_done(line)
                if self._idle_done_pending:
                    # The IDLE ends once our commands are done (_internal_finished); what the client
                    # pipelined after its DONE waits for that, or it would be taken for DONE too.
                    self._blocked = True
                    self.transport.pauseProducing()
                    return
                continue
            line = ev.data
            try:
                parsed = parse_command(line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n"))
                if space_run(line) >= 0:  # (the plugins read commands as written: one space between words)
                    raise TokenError("more than one space between arguments")
            except TokenError as e:
                self._local_answer_literal(ev)
                tag = self._tag_of(line)
                self._reply(tag or b"*", b"BAD [CLIENTBUG] Invalid command: " + str(e).encode()[:100] + b".")
                self._count_bad()
                continue
            self.service.metrics.command(parsed.name)
            cmd = ClientCommand(parsed.tag, parsed.name, parsed.uid, line, parsed, ev.literal is not None)
            action = self._core_command(cmd)
            if action is None:
                action = self._command_hooks(cmd, hooks)
            if isinstance(action, Collect) and ev.literal is not None:
                self._start_collect(cmd, ev, action)
                continue
            if not self._decide(cmd, ev, action):
                return
            if self._awaiting_continuation:
                self._wait_for_continuation()
                return
            if self._closing or self._literal_gate is not None:
                return
            if self._parked and len(self._parked) >= self.config.limits["max_waiting_answers"]:
                # Answers of ours pile up behind a slow command: read no more until they go out.
                self._parking = True
                self.transport.pauseProducing()
                return

    def _command_hooks(self, cmd: ClientCommand, hooks, start: int = 0, rewrite: Rewrite | None = None):
        """The plugins' decision on ``cmd``, asking ``hooks[start:]`` in order. Rewrites compose: the
        plugins after a ``Rewrite`` see the command it makes (``cmd.state`` shared) and the last rewrite is
        the decision; ``Answer`` and ``Collect`` end the chain; a ``Defer`` ends it for now, and when its
        Deferred fires with a Rewrite or None the plugins after it get their say (on the rewritten
        command, or on ``cmd``). ``rewrite``: the rewrite that made ``cmd`` (a resumed chain)."""
        last = len(hooks) - 1
        for i in range(start, last + 1):
            plugin = hooks[i]
            try:
                action = plugin.command(self, cmd)
            except TokenError as e:
                action = Answer(b"BAD [CLIENTBUG] Invalid arguments: " + str(e).encode()[:100] + b".")
            except Exception:
                # Nothing of the command has reached the backend: only it fails, as when a plugin's
                # Deferred decision fails.
                self._bug(f"plugin {plugin.name} command hook failed")
                action = Answer(b"NO [SERVERBUG] Internal error.")
            if action is None:
                continue
            if isinstance(action, Rewrite):
                rewrite = action
                if i < last:  # (the last plugin's rewrite needs no parsing: nobody looks at it)
                    cmd = self._rewritten(cmd, action.data, plugin)
                    if cmd is None:
                        return Answer(b"NO [SERVERBUG] Internal error.")
                continue
            if isinstance(action, Collect) and (cmd.state.get("collected") or not cmd.has_literal):
                continue  # nothing more to gather
            if isinstance(action, Defer) and (i < last or rewrite is not None):
                action.deferred.addCallback(self._resume_hooks, cmd, hooks, i + 1, rewrite)
            return action
        return rewrite

    def _resume_hooks(self, action, cmd: ClientCommand, hooks, start: int, rewrite: Rewrite | None):
        """A plugin's deferred decision is in: the plugins after it decide on what it leaves."""
        if isinstance(action, Rewrite):
            rewrite = action
            if start < len(hooks):
                cmd = self._rewritten(cmd, action.data, None)
                if cmd is None:
                    return Answer(b"NO [SERVERBUG] Internal error.")
        elif action is not None:
            return action  # Answer (or Collect): the chain ends here
        action = self._command_hooks(cmd, hooks, start, rewrite)
        return action.deferred if isinstance(action, Defer) else action  # (chained: fires with the end)

    def _rewritten(self, cmd: ClientCommand, data: bytes, plugin) -> ClientCommand | None:
        """The command a plugin's Rewrite makes of ``cmd``, as the plugins after it see it (same tag,
        ``state`` and literal continuation); None if it cannot be parsed (the plugin's bug)."""
        text = data[:-2] if data.endswith(b"\r\n") else data.rstrip(b"\n")
        try:
            parsed = parse_command(text)
        except TokenError:
            self._bug(f"plugin {plugin.name if plugin else '(deferred)'} rewrote a command into garbage: "
                      f"{data[:100]!r}")
            return None
        return ClientCommand(cmd.tag, parsed.name, parsed.uid, data, parsed, cmd.has_literal, cmd.state,
                             cmd.client or cmd)

    def _decide(self, cmd: ClientCommand, ev, action) -> bool:
        """Apply a hook's decision; False if it is deferred (stop reading commands until it is in)."""
        if isinstance(action, Defer):
            now = _now_or_later(action.deferred, lambda result: self._deferred_failed(result, cmd, ev)
                                if isinstance(result, Failure) else self._deferred_decision(result, cmd, ev))
            if not now:
                self._blocked = True
                self.transport.pauseProducing()
                return False
            # Decided already (a coroutine that never had to wait, as most SELECTs): no pause and resume
            # of the client's socket, which cost two epoll_ctl calls per command.
            action = now[0]
            if isinstance(action, Failure):
                action = self._failed_decision(action)
        self._apply(cmd, ev, action)
        return True

    # -- Collect: gather a command's literals for a plugin ---------------------------------------

    def _start_collect(self, cmd: ClientCommand, ev, action: Collect) -> None:
        if b"LITERAL+" not in {c.upper() for c in self.backend_caps}:
            self._local_answer_literal(ev)
            self._reply(cmd.tag, b"NO [CANNOT] Literal arguments are not supported here; use quoted strings.")
            return
        self._collecting = {"cmd": cmd, "parts": [_nonsync(ev.data)], "literals": 0, "limit": action.literals,
                            "size": len(ev.data), "last": ev}
        if self._too_much_to_gather(ev):
            return
        if not ev.non_sync:
            self.inject(b"+ OK\r\n")

    def _too_much_to_gather(self, ev) -> bool:
        """A segment announcing a literal the gathered command cannot take (``max_gathered``): judged before
        the "+" (given, the client sent it all to be sent away: found by review). A synchronizing one is
        refused and the session goes on; the bytes of a non-synchronizing one are on their way: BYE."""
        col = self._collecting
        if col["size"] + (ev.literal or 0) <= self.config.limits["max_gathered"]:
            return False
        self._collecting = None
        if ev.non_sync:
            self.bye(b"Command too long.", code=b"TOOBIG")
        else:
            self.framer.refuse_literal()
            self._reply(col["cmd"].tag, b"BAD [TOOBIG] Command too long to be read whole here.")
            self._count_bad("toobig")
        return True

    def _collect_event(self, ev) -> bool:
        """Feed one event into the command being collected; False if processing must pause."""
        col = self._collecting
        col["size"] += len(ev.data)
        if col["size"] > self.config.limits["max_gathered"]:
            self._collecting = None
            self.bye(b"Command too long.", code=b"TOOBIG")
            return False
        if isinstance(ev, LiteralData):
            col["parts"].append(ev.data)
            return True
        col["literals"] += 1  # (the one before this segment is in: counted so, a {0} one is too)
        col["last"] = ev
        done = ev.literal is None or (col["limit"] is not None and col["literals"] >= col["limit"])
        if done:
            col["parts"].append(ev.data)
            self._collecting = None
            return self._collected(col, ev)
        col["parts"].append(_nonsync(ev.data))
        if self._too_much_to_gather(ev):
            return not self._closing
        if not ev.non_sync:
            self.inject(b"+ OK\r\n")
        return True

    def _collected(self, col: dict, ev) -> bool:
        first: ClientCommand = col["cmd"]
        line = b"".join(col["parts"])
        complete = ev.literal is None
        text = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
        try:
            parsed = parse_command(text)
            parsed.args  # noqa: B018 - tokenize now: errors are the client's
        except TokenError as e:
            self._local_answer_literal(ev)
            self._reply(first.tag, b"BAD [CLIENTBUG] Invalid arguments: " + str(e).encode()[:100] + b".")
            return True
        cmd = ClientCommand(first.tag, first.name, first.uid, line, parsed, not complete)
        cmd.state["collected"] = True
        action = self._command_hooks(cmd, self.hooks.command)
        return self._decide(cmd, ev, action)

    def _client_done(self, line: bytes) -> None:
        """The client's line that ends IDLE (DONE; the backend judges anything else)."""
        if self._idle == "suspended":
            self._idle_done_pending = True  # answered when our internal commands are done
            return
        self._idle = None
        self._idle_cmd = None
        self.backend.out.append(line)
        self._send_internal_queue()

    def _local_answer_literal(self, ev) -> None:
        """A first segment answered locally: skip whatever of the command follows it."""
        if ev.literal is not None:
            if ev.non_sync:
                self._discard_command = True
            else:
                self.framer.refuse_literal()

    def _backend_send(self, cmd: ClientCommand | None, data: bytes, first: bool) -> None:
        """Relay a piece of a client command. Its non-synchronizing literals (LITERAL+) go to the backend
        as synchronizing ones, each sent on only after the backend's "+": Dovecot reads the literal of a
        command it has already refused as commands of their own, which would reach it past every hook.
        The client is not read meanwhile (one backend round trip per literal). Plain APPENDs, which
        Dovecot can only refuse after reading the literal, keep theirs (cpmproxy/imap/append.py)."""
        if first and cmd is not None and cmd.name == b"APPEND":
            segment, inline = _last_segment(data)  # (a collected command holds literals already read)
            if literal_out_of_place(segment, first=not inline):
                # Dovecot would take its literal neither way. Sent without it, the line gets the backend's
                # own answer, BAD, or NO for a mailbox that does not exist; a LITERAL+ literal and the rest
                # of the command are dropped, a synchronizing one never comes (answered, not "+").
                self._discard_command = _SYNC_MARK_END_RE.search(data) is None
                data = _LITERAL_AT_END_RE.sub(b"", data).rstrip(b" ") + b"\r\n"
        if _NONSYNC_MARK_RE.search(data) is None:
            self.backend.out.append(data)
            return
        if cmd is not None and cmd.name == b"APPEND":
            # A later segment is a message's only after message literals all along (not inside CATENATE,
            # not after a mailbox literal): any segment sent the careful way ends the fast path.
            fast = (first or cmd.state.get("_append_fast", False)) and literal_always_read(data, first)
            cmd.state["_append_fast"] = fast
            if fast:
                self.backend.out.append(data)
                return
        pieces = _split_at_literals(data)
        self._literal_gate = cmd
        # (whether the text ends with the client's own synchronizing literal, after ones the proxy made so)
        self._gate_ends_sync = _SYNC_MARK_END_RE.search(data) is not None
        self._gated_pieces.extend(pieces[1:])
        self.backend.out.append(pieces[0])
        self.backend.flush()  # (also when a deferred decision sends it: nothing else would, until "+")
        self.transport.pauseProducing()

    def _wait_for_continuation(self) -> None:
        """A synchronizing literal went to the backend: nothing more of the client's is read or relayed
        until the backend's "+" (then its bytes are the literal) or its tagged refusal (then they are the
        client's next command, which goes through the hooks). Relayed at once, the bytes of a client that
        did not wait reached a backend that had refused the command as commands of their own."""
        self.transport.pauseProducing()
        self.backend.flush()

    def _gate_opened(self) -> None:
        """The backend's "+" for a literal the proxy made synchronizing: the next piece goes out (its own
        literal then waits for the next "+"), or, none left, the client is read again."""
        if self._gated_pieces:
            piece = self._gated_pieces.popleft()
            self.backend.out.append(piece)
            if _SYNC_MARK_END_RE.search(piece):
                if self._gated_pieces or not self._gate_ends_sync:
                    return  # (a literal the proxy made synchronizing: its "+" is the gate's)
                # The last piece ends with the client's own synchronizing literal (after a literal the
                # proxy collected): the next "+" is the client's, relayed to it (_awaiting_continuation).
                self._literal_gate = None
                self._awaiting_continuation = True
                return
        self._literal_gate = None
        if self._current is None:
            self._send_internal_queue()
        self.service.reactor.callLater(0, self._read_again)

    def _apply(self, cmd: ClientCommand, ev, action) -> None:
        if isinstance(action, Answer):
            self._local_answer_literal(ev)
            untagged = action.untagged
            if cmd.name in _SELECTING and action.tagged[:2].upper() != b"OK" and self.selected is not None:
                untagged = [self._unselect_backend(), *untagged]
            self._reply(cmd.tag, action.tagged, untagged)
            if action.tagged[:3].upper() == b"BAD" and not self._closing:
                # (Counted as the backend's BADs are: a command a plugin refuses as invalid, one not offered
                # that the policy plugin answers as unknown, is no less invalid for not reaching it.)
                self._count_bad(None)
            else:
                self.bad_commands = 0  # (a valid command ends the run, as the backend's OK or NO does)
            return
        if isinstance(action, Collect) and ev.literal is not None and not cmd.state.get("collected"):
            self._start_collect(cmd, ev, action)  # (a deferred decision that needs the literals after all)
            return
        data = action.data if isinstance(action, Rewrite) else cmd.line
        self._sent += 1
        cmd.state["_sent"] = self._sent
        self._inflight.setdefault(cmd.tag, deque()).append(cmd)
        if ev.literal is not None:
            self._current = cmd
            self._awaiting_continuation = not ev.non_sync
        if cmd.name in _SELECTING:
            self._begin_select(cmd)
        elif cmd.name == b"IDLE":
            self._idle = "active"
            self._idle_cmd = cmd
        self._backend_send(cmd, data, True)
        if ev.literal is None and self._literal_gate is None:
            self._send_internal_queue()

    @_guarded
    def _deferred_decision(self, action, cmd: ClientCommand, ev) -> None:
        if self.phase != "auth" or self._closing:
            return
        self._blocked = False
        self._apply(cmd, ev, action)
        if self._awaiting_continuation:
            self._wait_for_continuation()
        elif not self._parking and self._literal_gate is None:
            self.transport.resumeProducing()
            self._process_client()

    def _deferred_failed(self, failure: Failure, cmd: ClientCommand, ev) -> None:
        self._deferred_decision(self._failed_decision(failure), cmd, ev)

    def _failed_decision(self, failure: Failure) -> Answer:
        """The answer to a command whose plugin decision failed: the backend's failure is said as such (its
        NO to a command the proxy sent for this one, e.g. ``NO [OVERQUOTA]``, passed on; a lost
        connection or anything else from it: UNAVAILABLE); anything else is a bug."""
        if failure.check(BackendError, defer.TimeoutError):
            if failure.check(BackendRefused) and failure.value.response[:3].upper() == b"NO ":
                # (The backend's answer, as a client's own command would get it: a SELECT of a folder
                # that does not exist is no trouble of the proxy's, and was logged as a warning each time.)
                return Answer(failure.value.response)
            log.warn("plugin decision failed: {error} session={session}", error=failure.getErrorMessage(),
                     session=self.session_id)
            return Answer(b"NO [UNAVAILABLE] " + UNAVAILABLE)
        if failure.check(TokenError):  # (arguments a plugin read only later, as the command hook would)
            return Answer(b"BAD [CLIENTBUG] Invalid arguments: " + failure.getErrorMessage().encode()[:100] + b".")
        self._bug("plugin decision failed", failure)
        return Answer(b"NO [SERVERBUG] Internal error.")

    def held_lines(self) -> list[bytes]:
        """Text of the backend responses currently held back (see Hold)."""
        return [ev.data for ev in (self._held or ()) if isinstance(ev, Segment)]

    def _held_count(self) -> int | None:
        """``len(self.held_lines())``, or None if nothing is held."""
        held = self._held
        return None if held is None else sum(1 for ev in held if isinstance(ev, Segment))

    def held_response(self) -> bytes | None:
        """The first held response whole (text and literals, as the backend sent it) once all of it is
        held; None before. A plugin that holds a response on its first segment (``Hold``) reads it here,
        and can answer the hooks' run after the hold with ``Drop(data)`` to send something else instead."""
        parts = []
        for ev in self._held or ():
            parts.append(ev.data)
            if type(ev) is Segment and ev.literal is None:
                return b"".join(parts)
        return None

    def held_response_whole(self) -> defer.Deferred[bytes]:
        """``held_response()`` once it is all in: at once if it is, else after the backend read that
        completes it (a large literal arrives over several)."""
        whole = self.held_response()
        if whole is not None:
            return defer.succeed(whole)
        d: defer.Deferred[bytes] = defer.Deferred()
        self._held_whole.append(d)
        return d

    @property
    def idling(self) -> bool:
        """The client is in IDLE: untagged responses may be injected at any time."""
        return self._idle is not None

    @property
    def selecting(self) -> ClientCommand | None:
        """The client's SELECT or EXAMINE on its way to the backend, until it completes."""
        return self._selecting

    def inflight_commands(self) -> list[ClientCommand]:
        """Client commands at the backend, not yet completed, oldest first."""
        cmds = [c for q in self._inflight.values() for c in q]
        cmds.sort(key=lambda c: c.state.get("_sent", 0))
        return cmds

    # -- internal commands on the client's backend connection -----------------------------------

    def backend_command(self, line: bytes) -> defer.Deferred[Reply]:
        """Run ``line`` (without tag) on this session's backend connection, invisibly to the client.

        Fires with a ``Reply``: its ``untagged`` holds the ESEARCH responses correlated by tag; other
        untagged responses the command causes (EXISTS, EXPUNGE, FETCH) go to the client as usual, so use
        ``UID SEARCH RETURN (...)`` to ask questions. Sent at the next command boundary; if the client
        is idling, the backend's IDLE is suspended (DONE) and resumed afterwards, transparently.
        """
        self._internal_seq += 1
        tag = _INTERNAL_TAG_PREFIX + b"%d" % self._internal_seq
        d: defer.Deferred[Reply] = defer.Deferred()
        if self.phase == "closed":
            # The client is gone (a plugin's work for it still going on, as a SELECT's classification):
            # never answered, as the commands in flight when it went. A failure would end that work as
            # a bug, and be logged again ("Unhandled error") for each command issued with it and never
            # awaited.
            return d
        if self.backend is None or self.backend.closed:
            fail_answer(d, BackendError("backend connection is closed"))
            return d
        if self.phase != "auth":
            # (Before the relay the backend connection is the login's: its answer would never come. The
            # ``login`` hook uses ``side_command``.)
            d.errback(RuntimeError("backend_command is for a logged-in session; use side_command"))
            return d
        self._internal[tag] = (d, [])
        self._internal_queue.append(tag + b" " + line + b"\r\n")
        if self._idle == "active":
            self._suspend_idle()
        self._send_internal_queue()
        self.backend.flush()
        return d

    def side_command(self, line: bytes) -> defer.Deferred[Reply]:
        """Run ``line`` on a second backend connection of this user, for questions about mailboxes other
        than the selected one (STATUS counts, folder checks, METADATA). One such connection serves all
        of the user's sessions in this process (``side_lock`` serializes EXAMINE-dependent sequences).
        Never the session's own connection, not even during the ``login`` hook: a LIST or METADATA
        command there makes Dovecot (Maildir) re-read the whole uidlist at every later SELECT on it
        (+18 ms for 20,000 messages). The reply holds every untagged response that came before the
        tagged one (ESEARCH by tag). Raises BackendError once the session has ended."""
        if self.phase == "closed":
            # (A plugin still at work for a session that ended: joining the pool again would keep it, and
            # the user's side connection, for as long as the process runs.) Raised, not a failed Deferred:
            # commands a plugin issues together (pipelined) would all fail at once, and each one not
            # awaited after the first failure be logged as an "Unhandled error in Deferred".
            raise BackendError("session closed")
        d: defer.Deferred[Reply] = defer.Deferred()
        pool = self.service.side_pool(self)

        def send(proto):
            if proto.closed:
                if pool.proto is proto:
                    pool.proto = None
                try:
                    pass_answer(self.side_command(line), d)
                except BackendError as e:  # (the session ended meanwhile: ``d`` is awaited already)
                    fail_answer(d, e)
                return
            pass_answer(proto.command(line), d)

        if pool.proto is None:
            pool.connecting_to = backend_address(self.config)
            connecting = pool.proto = defer.Deferred.fromCoroutine(self._open_side())
            waiting = pool.waiting = []  # (this connection's: a reload may start another meanwhile)

            def opened(proto):
                if pool.proto is connecting:
                    pool.proto = proto
                for w in waiting:
                    w.callback(proto)
                if pool.proto is not proto:  # (retired by a reload while it connected: it served those
                    proto.close_when_idle()  # who waited for it)

            def failed(f):
                if pool.proto is connecting:
                    pool.proto = None  # try again next time
                for w in waiting:
                    w.errback(f)

            connecting.addCallbacks(opened, failed)
        if isinstance(pool.proto, defer.Deferred):
            w: defer.Deferred = defer.Deferred()
            pool.waiting.append(w)
            w.addCallbacks(send, lambda failure: fail_answer(d, failure))  # (it could not be opened)
        else:
            send(pool.proto)
        return d

    @property
    def side_lock(self) -> defer.DeferredLock:
        return self.service.side_pool(self).lock

    def open_backend(self, purpose: str = "side") -> defer.Deferred:
        """A new backend connection logged in as this session's user (for a plugin to own: it must
        close it). Fires with the BackendProtocol; its ``command()`` runs commands."""
        return defer.Deferred.fromCoroutine(self._open_side(purpose))

    async def _open_side(self, purpose: str = "side"):
        from twisted.internet import reactor

        if self._credentials is None:
            raise BackendError("session has no credentials")
        authzid, user, password = self._credentials  # (now: the session may end while connecting)
        proto, caps = await connect_backend(reactor, self.config)
        proto.capabilities = caps
        fields = [("x-originating-ip", self.peer_host), ("x-session-id", f"{self.session_id}-{purpose}")]
        try:
            await login_backend(proto, caps, authzid, user, password, fields)
        except BaseException:
            proto.close()  # (never left connected and owned by no one)
            raise
        if self.phase == "closed" and purpose != "side":  # (the shared side connection is the pool's)
            proto.close()
        elif purpose == "side":
            # Dovecot keeps a MODSEQ per message only in mailboxes opened with CONDSTORE on (before, every
            # message has the mailbox's HIGHESTMODSEQ): plugins that ask "what changed since" need them from
            # the first look on. (Pipelined, answer not awaited: a server without it just says BAD.)
            proto.command(b"ENABLE CONDSTORE").addErrback(lambda f: None)
        return proto

    def _close_side(self) -> None:
        self.service.release_side(self)

    def _send_internal_queue(self) -> None:
        # (Not while a command's literal is awaited: a collected command relayed in pieces has no
        # ``_current``, and the backend would read our command as its literal.)
        if not self._internal_queue or self._current is not None or self._literal_gate is not None \
                or self._idle == "active":
            return
        if self._idle is None or self._idle == "suspended":
            self.backend.out.extend(self._internal_queue)
            self._internal_queue.clear()

    def _suspend_idle(self) -> None:
        self._idle = "suspended"
        self._idle_ended = False  # set when the backend's tagged OK for the suspended IDLE arrives
        self._swallow_tagged.add(self._idle_cmd.tag)
        self.backend.out.append(b"DONE\r\n")

    def _internal_finished(self) -> None:
        """After an internal command: resume the client's IDLE at the backend, or finish it. Only once
        the suspended IDLE is really over at the backend (it may answer our commands first)."""
        if self._internal or self._idle != "suspended" or not self._idle_ended:
            return
        cmd = self._idle_cmd
        if self._idle_done_pending:
            self._idle_done_pending = False
            self._idle = None
            self._idle_cmd = None
            self._reply(cmd.tag, b"OK Idle completed.")
            self._send_internal_queue()
            self._blocked = False
            self.service.reactor.callLater(0, self._read_again)  # (the commands after DONE)
        else:
            self._idle = "active"
            self._inflight.setdefault(cmd.tag, deque()).append(cmd)
            self._swallow_continuation += 1
            self.backend.out.append(cmd.tag + b" IDLE\r\n")
        self.backend.flush()

    def _core_command(self, cmd: ClientCommand):
        name = cmd.name
        if cmd.tag[:4].lower() == _INTERNAL_TAG_PREFIX:
            # (The backend's answer would be taken for one to the proxy's own command, and the reverse.)
            return Answer(b'BAD [CLIENTBUG] Tags beginning with "cpm." are the proxy\'s own: use another.')
        if name == b"CAPABILITY":
            if cmd.has_literal or cmd.line.rstrip(b"\r\n")[len(cmd.tag) + 11:].strip():
                return Answer(b"BAD [CLIENTBUG] CAPABILITY takes no arguments.")
            return Answer(b"OK Capability completed.",
                          [b"* CAPABILITY " + b" ".join(self.capabilities) + b"\r\n"])
        if name == b"UNAUTHENTICATE":
            # (RFC 8437: the backend would drop to not authenticated while the proxy relays as the user.)
            return Answer(b"NO [CANNOT] UNAUTHENTICATE is not supported by this proxy.")
        if name == b"STARTTLS":
            return Answer(b"BAD [CLIENTBUG] STARTTLS is not valid after login.")
        if name == b"COMPRESS":
            return Answer(b"NO [CANNOT] COMPRESS is not supported by this proxy.")
        if name in (b"LOGIN", b"AUTHENTICATE"):
            return Answer(b"BAD [CLIENTBUG] Already logged in.")
        return None

    # -- selected-mailbox tracking --------------------------------------------------------------

    def _begin_select(self, cmd: ClientCommand) -> None:
        raw = b""
        try:
            if cmd.args:
                raw = astring_text(cmd.args[0]) or b""
        except TokenError:
            raw = b""
        try:
            name = mutf7_decode(fold_inbox(raw)) if raw else ""
        except ValueError:
            name = raw.decode("utf-8", "replace")
        cmd.state["select"] = SelectedMailbox(name=name, raw_name=raw, read_only=cmd.name == b"EXAMINE")
        self._selecting = cmd
        if self.selected is not None:
            self._set_selected(None)

    def _unselect_backend(self) -> bytes:
        """A SELECT or EXAMINE refused by the proxy itself (a hidden folder, a plugin's failed question)
        never reached the backend, which keeps the previous mailbox selected, while a failed SELECT leaves
        none (RFC 9051 6.3.2): the plugins dropped their view of it, and the backend would answer the next
        commands in it, unfiltered. Unselected there too, before any later command (the CLOSED response to
        go before the refusal, as Dovecot says it)."""
        if b"UNSELECT" in {c.upper() for c in self.backend_caps}:
            # (What the backend says of that mailbox until its answer is of one the client has left: the
            # view plugin drops it, ``unselecting``.)
            self.unselecting += 1
            self.backend_command(b"UNSELECT").addBoth(self._unselected)
        else:  # (no way to leave a mailbox without expunging in it: the session cannot go on)
            self.bye(b"The backend cannot unselect a mailbox.", code=b"UNAVAILABLE")
        self._set_selected(None)
        return b"* OK [CLOSED] Previous mailbox closed.\r\n"

    def _unselected(self, result):
        self.unselecting -= 1
        return None if isinstance(result, Failure) else result

    def _set_selected(self, mailbox: SelectedMailbox | None) -> None:
        self.selected = mailbox
        for plugin in self.hooks.selected:
            plugin.selected(self, mailbox)

    def _track_untagged(self, line: bytes, head) -> None:
        sel = self._selecting.state["select"] if self._selecting is not None else self.selected
        if sel is None:
            return
        if head.name == b"EXISTS" and head.number is not None:
            sel.exists = head.number
        elif head.name == b"EXPUNGE" and sel.exists:
            sel.exists -= 1
        elif head.name == b"OK" and head.code:
            code = head.code.upper()
            if code.startswith(b"UIDVALIDITY "):
                sel.uidvalidity = _code_number(line, b"UIDVALIDITY")
            elif code.startswith(b"UIDNEXT "):
                sel.uidnext = _code_number(line, b"UIDNEXT")
            elif code.startswith(b"HIGHESTMODSEQ "):
                sel.highestmodseq = _code_number(line, b"HIGHESTMODSEQ")

    def _finish_command(self, cmd: ClientCommand, status: bytes, head) -> None:
        if cmd is self._selecting:
            self._selecting = None
            if status == b"OK":
                sel = cmd.state["select"]
                if head.code and head.code.upper() == b"READ-ONLY":
                    sel.read_only = True
                self._set_selected(sel)
        elif cmd.name in _DESELECTING and status == b"OK" and self.selected is not None:
            self._set_selected(None)
        elif cmd.name == b"IDLE" and self._idle == "active" and self._idle_cmd is cmd:
            self._idle = None  # refused, or ended by the client's DONE
            self._idle_cmd = None

    # -- relay: backend -> client ---------------------------------------------------------------

    @_guarded
    def backend_data(self, data: bytes) -> None:
        if self._sealed:
            return  # (our BYE is out: nothing of the backend's may follow it, nor be parsed and logged again)
        framer = self.backend.framer
        if data:
            framer.feed(data)
        fetch: list = []  # FETCH segments and literal chunks in a row, judged together (_backend_fetch)
        try:
            for ev in framer.events():
                kind = type(ev)
                if kind is LiteralData or (kind is Segment and (not ev.first or _FETCH_HEAD_RE.match(ev.data))):
                    fetch.append(ev)
                    continue
                if fetch:
                    self._backend_fetch(fetch)
                    fetch = []
                if kind is Block:
                    self._backend_block(ev.data)
                elif kind is Run:
                    self._backend_run(ev)
                else:
                    self._backend_events((ev,))
            if fetch:
                self._backend_fetch(fetch)
        except (FramingError, TokenError) as e:
            if fetch and isinstance(e, FramingError):
                self._backend_events(fetch)  # what came before the error still goes out
            self._backend_protocol_error(e)
            return
        self._after_backend()

    def _backend_protocol_error(self, error: Exception) -> None:
        """The backend sent what is not IMAP: the session ends (nothing after it can be framed or trusted)."""
        self.service.metrics.backend_errors.labels(kind="protocol").inc()
        log.error("backend protocol error: {error} session={session}", error=str(error), session=self.session_id)
        self._flush()
        self.bye(b"Backend protocol error.", code=b"UNAVAILABLE")

    def _after_backend(self) -> None:
        if self._held_whole and (whole := self.held_response()) is not None:
            waiting, self._held_whole = self._held_whole, []
            for d in waiting:  # (a reactor turn later: not inside this read's handling)
                self.service.reactor.callLater(0, d.callback, whole)
        if self._pending_inject and self._held is None and self.backend.framer.at_boundary \
                and not self._drop_response:
            self._out.extend(self._pending_inject)
            self._pending_inject.clear()
        self._flush()
        self.backend.flush()

    def _backend_block(self, data: bytes) -> None:
        """A Block of one-line responses. Runs of untagged lines go out in one piece if nothing in them
        concerns anyone (or as plugins rewrote them whole): the fast path. Tagged and continuation lines,
        and runs that need a closer look, go through the per-response path one line at a time."""
        while data:
            if self._held is None and data[:1] == b"*":
                numbered = _NUMBERED_RE.match(data) is not None
                if numbered:
                    # (Also cut before a line whose name is not in upper case, the first one too: 0. In the
                    # same pass: a pass of its own over a 600 KB bulk FETCH cost as much again, ~60 us.)
                    cut = numbered_run_end(data)
                else:
                    # (a plain "\n[^*]" search: an alternation with \A is 40x slower here)
                    m = _NOT_UNTAGGED_RE.search(data)
                    cut = len(data) if m is None else m.start() + 1
                if cut:
                    run = data[:cut] if cut < len(data) else data
                    done = self._block_filter(run, numbered)
                    if done is not None:
                        self._out.append(done)
                        data = data[cut:]
                        continue
                else:  # (a first line whose name is not in upper case goes alone, line by line)
                    cut = data.find(b"\n") + 1
                    run = data[:cut]
                lines = lines_of(run)
                data = data[cut:]
            else:
                nl = data.find(b"\n") + 1
                lines, data = [data[:nl]], data[nl:]
            for line in lines:
                seg = Segment(line, True)
                if self._held is not None and not self._passes_hold(seg):
                    self._hold_tagged(seg)
                else:
                    self._backend_event(seg)

    def _backend_events(self, events) -> None:
        for ev in events:
            if self._held is not None and not self._passes_hold(ev):
                self._hold_tagged(ev)
            else:
                self._backend_event(ev)

    def _backend_fetch(self, events: list) -> None:
        """Untagged FETCH segments, continuation segments and literal chunks, as one read from the
        backend brought them. A bulk FETCH is mostly these: when nothing in their text concerns a plugin
        (``block_ok``) they go out as they are, with no per-response work; otherwise one by one."""
        if self._held is None and not self._drop_response and self._selecting is None \
                and not self._pending_inject:
            text = b"".join([ev.data for ev in events if type(ev) is Segment])
            for plugin in self.hooks.response if text else ():
                if not plugin.block_ok(self, text):
                    break
            else:
                out = self._out
                head = None  # first segment of a response still going on after these events
                for ev in events:
                    out.append(ev.data)
                    if type(ev) is Segment:
                        if ev.literal is None:
                            head = None
                        elif ev.first:
                            head = ev.data
                if head is not None:
                    # Its remaining segments may need the hooks (a read can end inside a response).
                    self._resp_head = parse_response_head(head.rstrip(b"\r\n"))
                    self._resp_cmd = None
                return
        self._backend_events(events)

    def _backend_run(self, run: Run) -> None:
        """Whole untagged responses with literals (a bulk FETCH): forwarded as received, in one piece,
        when nothing in their text concerns the core or a plugin; otherwise response by response."""
        text = run.text
        if self._held is None and self._selecting is None and not self._pending_inject \
                and b" EXISTS" not in text and b" EXPUNGE" not in text and b"* ESEARCH" not in text \
                and not lower_case_name(text):  # (the names looked for here and by plugins: upper case)
            for plugin in self.hooks.response:
                if not plugin.block_ok(self, text):
                    break
            else:
                self._out.append(run.data)
                return
        self._backend_events(run_events(run))

    def _block_filter(self, block: bytes, numbered: bool = False) -> bytes | None:
        """A block of one-line untagged responses as it goes to the client, or None if it must be taken
        line by line: when a line changes what the core tracks, or a plugin can neither let the block
        pass (``block_ok``) nor rewrite it whole (``response_block``). A bulk FETCH (FETCH lines only) is
        told apart once, so that neither the core nor a plugin that only cares about other responses
        searches it again (``fetch_block_ok``): each search of a 600 KB FETCH costs about 0.3 ms.
        Names are searched for in upper case, here and by the plugins: a block with a name spelt
        otherwise ("* 3 expunge", legal if not Dovecot's way) is taken line by line, where every
        name is read as a name (found by review: a lower-case EXPUNGE, BYE or STATUS went unseen).
        ``numbered``: the caller has seen that every line starts with a number and has its name in upper
        case (``numbered_run_end`` cut the block so): neither is searched for again."""
        if self._selecting is not None or self._pending_inject or (not numbered and lower_case_name(block)):
            return None
        fetch_only = only_fetch_responses(block, numbered)
        if not fetch_only and (b" EXISTS\r" in block or b" EXPUNGE\r" in block or b"* BYE" in block
                               or b"* ESEARCH" in block):
            return None
        for plugin in self.hooks.response:
            if plugin.fetch_block_ok(self, block) if fetch_only else plugin.block_ok(self, block):
                continue
            block = plugin.response_block(self, block)
            if block is None:
                return None
        return block

    def _refused_before_literal(self, cmd: ClientCommand) -> None:
        """``cmd`` was answered (refused) while the backend's "+" for its literal was awaited: the literal
        never reaches the backend (Dovecot would read it as commands), nor does the rest of the command;
        the client will not send a synchronizing literal the backend refused (what it sends is its next
        command). Also done as the answer is held back (``_hold_tagged``): what waits for it must not."""
        gated = cmd is self._literal_gate
        if gated:
            # (Unless the literal the client is at is its own synchronizing one: it never sends that.)
            self._literal_gate = None
            self._gated_pieces.clear()
            if cmd is self._current and not self._awaiting_continuation:
                self._discard_command = True
        if cmd is self._current and self._awaiting_continuation and not self._discard_command:
            self.framer.refuse_literal()
            self._awaiting_continuation = False
            self._current = None
        elif not gated:
            return
        if self._current is None:
            self._send_internal_queue()
        self.service.reactor.callLater(0, self._read_again)

    def _hold_tagged(self, ev) -> None:
        """A backend event held back (see Hold). A tagged refusal of the command whose literal awaits the
        backend's "+" is acted on now (the client sees it in order, later): a Hold waiting for an internal
        command, which waits for the literal, which the refusal ends, would wait for ever (found by review)."""
        self._held.append(ev)
        waiting = self._literal_gate or (self._current if self._awaiting_continuation else None)
        if waiting is None or type(ev) is not Segment or not ev.first or ev.data[:1] in b"*+":
            return
        tag = ev.data.split(b" ", 1)[0]
        queue = self._inflight.get(tag)
        # (What the answer is to: its tag's oldest command in flight but those whose answers are held
        # before it; a client may reuse a tag, and the older command's answer held here is still in it.)
        older = sum(1 for h in self._held[:-1] if type(h) is Segment and h.first and h.data.startswith(tag + b" "))
        if queue and len(queue) > older and queue[older] is waiting:
            self._refused_before_literal(waiting)

    @staticmethod
    def _passes_hold(ev) -> bool:
        """Held back responses wait for data that comes *after* them: internal answers and continuation
        requests are processed at once (a client waiting for "+" must not wait for us)."""
        if isinstance(ev, LiteralData) or not ev.first:
            return False
        d = ev.data
        return d[:1] == b"+" or d[:4] == b"cpm." or _INTERNAL_ESEARCH_RE.match(d) is not None

    def _backend_event(self, ev) -> None:
        out = self._out
        if isinstance(ev, LiteralData):
            if not self._drop_response:
                out.append(ev.data)
            return
        if ev.first:
            data = self._backend_first(ev)
            if data is None:
                return
        else:
            if self._drop_response:
                if ev.literal is None:
                    self._drop_response = False
                return
            data = ev.data
            if self.hooks.response_continuations and self._resp_head is not None:
                data = self._response_hooks(ev, data, False)
                if data is None:
                    return
        out.append(data)
        if ev.literal is None and self._pending_inject and self._held is None:
            out.extend(self._pending_inject)
            self._pending_inject.clear()

    def _unpark(self) -> None:
        """Local answers whose earlier commands have all completed go out after this tagged response."""
        oldest = min((c.state.get("_sent", 0) for q in self._inflight.values() for c in q), default=None)
        parked = self._parked
        while parked and (oldest is None or parked[0][0] < oldest):
            self._pending_inject.append(parked.popleft()[1])
        if self._parking and len(parked) < self.config.limits["max_waiting_answers"]:
            self._parking = False
            self.service.reactor.callLater(0, self._read_again)  # (not inside the backend's data handling)

    @_guarded
    def _output_drained(self) -> None:
        """The client read what waited for it: its commands are read again."""
        if self.phase == "auth":
            self._read_again()
        elif self.phase == "preauth" and not self._closing:
            self.transport.resumeProducing()
            self._process_client()

    @_guarded
    def _read_again(self) -> None:
        if self.phase == "auth" and not self._closing and not self._parking and not self._blocked \
                and self._literal_gate is None and not self._awaiting_continuation:
            self.transport.resumeProducing()
            self._process_client()

    def _backend_first(self, ev) -> bytes | None:
        """First segment of a backend response: parse its head, track state, run hooks."""
        data = ev.data
        if data[:1] == b"+":
            self._resp_head = None
            if self._swallow_continuation:
                # Our re-issued IDLE's "+ idling": before any "+" for a command sent after the client's
                # DONE (taken for a gated literal's, it let the literal out before the backend accepted
                # the command, which then ran it as commands: found by review).
                self._swallow_continuation -= 1
                return None
            if self._literal_gate is not None:
                self._gate_opened()  # (the client sent a non-synchronizing literal: not its "+")
                return None
            if self._awaiting_continuation:
                self._awaiting_continuation = False
                self.service.reactor.callLater(0, self._read_again)  # (the literal's bytes may follow)
            return data
        head = parse_response_head(data.rstrip(b"\r\n"))
        self._resp_head = head
        cmd = None
        if head.kind == "tagged":
            tag = head.tag
            internal = self._internal.pop(tag, None)
            if internal is not None:
                d, untagged = internal
                held_before = self._internal_held_before.pop(tag, None)
                if held_before is None and not untagged:
                    held_before = self._held_count()
                d.callback(Reply(untagged, data.rstrip(b"\r\n")[len(tag) + 1:], held_before))
                self._internal_finished()
                return None
            queue = self._inflight.get(tag)
            if queue:
                cmd = queue.popleft()
                if not queue:
                    del self._inflight[tag]
                if self._parked:
                    self._unpark()
                if tag in self._swallow_tagged:
                    self._swallow_tagged.discard(tag)  # the end of an IDLE we suspended
                    self._idle_ended = True
                    self._internal_finished()
                    return None
                self._refused_before_literal(cmd)
                if cmd is self._current and not self._discard_command:
                    # Answered while a non-synchronizing literal is on the way, which the backend reads
                    # all the same: the command stays current (nothing of ours may go out in the middle
                    # of it) until the client's next segment, which ends it.
                    self._answered_early = True
                self._finish_command(cmd, head.name, head)
            self._resp_cmd = cmd
            if cmd is not None and self.hooks.tagged:
                resp = BackendResponse(data, True, head, cmd)
                for plugin in self.hooks.tagged:
                    action = plugin.tagged(self, cmd, resp)
                    if isinstance(action, Rewrite):
                        resp.data = action.data
                data = resp.data
            n = len(tag) + 1
            if self.capabilities and _CAPABILITY_CODE_RE.match(data, n):
                data = self._own_capabilities(data, n)
            if data[n:n + 3].upper() == b"BAD":  # (Dovecot's BADs have no response code)
                data = data[:n] + _coded_bad(data[n:])
                if cmd is not None and self.phase == "auth" and not self._closing:
                    # (The backend's verdict counts: an unknown command is invalid.)
                    self.bad_commands += 1
                    if self.bad_commands >= self.config.limits["max_bad_commands"]:
                        # The BYE goes right after this answer; nothing after it (the answers to more
                        # invalid commands pipelined behind, in the same read) does.
                        self._out.append(data)
                        self.bye(b"Too many invalid commands.", code=b"CLIENTBUG")
                        return None
            elif cmd is not None:
                self.bad_commands = 0
            return data
        self._resp_cmd = None
        if head.kind == "untagged":
            if head.name == b"ESEARCH" and _INTERNAL_ESEARCH_RE.match(data):
                tag = data[len(b'* ESEARCH (TAG "'):data.index(b'"', len(b'* ESEARCH (TAG "'))]
                internal = self._internal.get(tag)
                if internal is not None:
                    if not internal[1] and self._held is not None:
                        self._internal_held_before[tag] = self._held_count()
                    internal[1].append(data)
                    return None
            self._track_untagged(data, head)
            if self.capabilities and (head.name == b"CAPABILITY" or _CAPABILITY_CODE_RE.match(data, 2)):
                data = self._own_capabilities(data, 2)
            if head.name == b"BYE":
                self._bye_sent = True
                if not any(c.name == b"LOGOUT" for c in self.inflight_commands()):
                    # The backend ends the session itself (shutting down, kicked, a mailbox deleted under
                    # it): relayed as it is, and counted and logged as the proxy's own losses are.
                    self.service.metrics.backend_errors.labels(kind="bye").inc()
                    text = data[:200].rstrip().decode("utf-8", "replace")
                    self._ended_with = "backend said: " + text[2:]
                    log.info("the backend ended the session: {text} session={session}", text=text,
                             session=self.session_id)
        if self.hooks.response:
            return self._response_hooks(ev, data, True)
        return data

    def _own_capabilities(self, data: bytes, start: int) -> bytes:
        """A backend's ``CAPABILITY`` response, or ``[CAPABILITY ...]`` code, after login (RFC 9051 7.2.2: a
        server may announce its capabilities at any time): the client is told the list the proxy offers
        (the backend's as filtered at login: what the proxy, and the policy plugin's view, carry), never the
        backend's own, which would offer extensions past them."""
        own = b"CAPABILITY " + b" ".join(self.capabilities)
        if data[start:start + 10].upper() == b"CAPABILITY":
            return data[:start] + own + b"\r\n"
        m = _CAPABILITY_CODE_RE.match(data, start)
        return data[:m.start(1)] + own + data[m.end(1):]

    def _response_hooks(self, ev, data: bytes, first: bool) -> bytes | None:
        head = self._resp_head
        plugins = self.hooks.response_for(head.name, first)
        if not plugins:
            return data
        resp = BackendResponse(data, first, head, self._resp_cmd)
        for plugin in plugins:
            action = plugin.response(self, resp)
            if action is None:
                continue
            if isinstance(action, Drop):
                if first:
                    self._drop_response = ev.literal is not None
                    return action.data  # (what goes out in its place, if anything)
                return None
            if isinstance(action, Hold):
                if not first:
                    raise RuntimeError(f"plugin {plugin.name}: Hold is only allowed on a first segment")
                return self._hold(ev, data, action.deferred)
            if isinstance(action, Rewrite):
                resp.data = action.data
        return resp.data

    def _hold(self, ev, data: bytes, d: defer.Deferred) -> bytes | None:
        """A plugin's Hold on this first segment: it and what follows wait until ``d`` fires."""
        now = _now_or_later(d, self._release)
        if not now:
            self._held = [ev]
            return None
        # Nothing to wait for after all (e.g. the plugin's query was answered first): the hooks run again
        # at once, nothing is held.
        if isinstance(now[0], Failure):
            self._bug("hold failed", now[0])
        return self._response_hooks(ev, data, True)

    @_guarded
    def _release(self, result=None):
        """A Hold is over: replay the held responses (hooks run again for the first of them)."""
        held, self._held = self._held, None
        if held is None or self.phase != "auth":
            return result
        for i, ev in enumerate(held):
            try:
                self._backend_event(ev)
            except TokenError as e:  # (a line held unread, the backend's garbage: as on the direct path)
                self._backend_protocol_error(e)
                return None
            if self._held is not None:  # held again: keep the rest, in order, behind it
                self._held.extend(held[i + 1:])
                break
        if self.backend is not None:
            self._after_backend()
        if isinstance(result, Failure):
            self._bug("hold failed", result)
        return None

    def backend_lost(self, reason: Failure) -> None:
        self.backend.session = None
        if self.phase != "auth" or self._closing:
            return
        if not self._bye_sent:
            self.service.metrics.backend_errors.labels(kind="disconnect").inc()
            log.warn("backend connection lost: {reason} session={session} user={user}",
                     reason=reason.getErrorMessage() if reason else "", session=self.session_id, user=self.user)
            self.bye(b"Backend server closed the connection.", code=b"UNAVAILABLE")
        else:
            self._flush()
            self._closing = True
            self._lose_client()

    # -- shutdown -------------------------------------------------------------------------------

    def reconfigure(self, config) -> None:
        """A reload's configuration: the limits read once a session is logged in apply to it too."""
        self.config = config
        if self._draining is None:
            self.hooks = self.service.hooks
        if self.phase == "auth" and not self._closing:
            self._retime(config.limits["idle_timeout"])
            self.framer.max_line = config.limits["max_line"]

    def _retime(self, period: float) -> None:
        """A reload's ``idle_timeout``, counted from the session's last activity, not from the reload: a
        reload restarted every session's timer, so a client idle under a proxy reloaded more often than
        its ``idle_timeout`` was never timed out. A shorter timeout already exceeded ends the session now."""
        # (TimeoutMixin's private timer: its deadline tells when it was last reset; absent, a restart as before)
        call = getattr(self, "_TimeoutMixin__timeoutCall", None)
        if call is None or not call.active() or self.timeOut is None:
            self.setTimeout(period)
            return
        idle_for = self.timeOut - (call.getTime() - call.seconds())
        self.timeOut = period
        call.reset(max(period - idle_for, 0.0))

    def shutdown(self, text: bytes, hooks=None) -> None:
        """End the session for the proxy's sake (a stop, a reload that changes its plugins): commands the
        client sent are completed first (an APPEND being uploaded is stored *and* acknowledged, a FETCH
        going out is not cut), no new one is taken, then ``BYE [UNAVAILABLE] text`` between two
        responses. ``hooks``: the plugins the session began with, which answer those commands (their
        view and renumbering). The caller checks ``drained()`` and ends what is still running with ``bye``."""
        if hooks is not None and self._draining is None:
            self.hooks = hooks  # (a second reload while it drains: it still finishes under the first set)
        if self.phase != "auth" or self._closing:
            self.bye(text, code=b"UNAVAILABLE")
            return
        self._draining = text
        self.drained()

    def drained(self) -> bool:
        """A session being shut down: BYE now if nothing of the client's is under way (an IDLE is not:
        BYE ends it as the client expects); True once it is closing."""
        if self._closing:
            return True
        if self._draining is None:
            return False
        idle_only = all(c is self._idle_cmd and self._idle == "active" for c in self.inflight_commands())
        if idle_only and not self._internal and self._current is None and self._collecting is None \
                and not self._blocked and not self._parked and not self._pending_inject and self._held is None \
                and self._literal_gate is None and not self._awaiting_continuation and self._backend_at_boundary():
            self.bye(self._draining, code=b"UNAVAILABLE")
        return self._closing


class _OutputLink:
    """The producer registered with the client's connection, which Twisted pauses when the client's
    send buffer fills and resumes when it drains: it passes both on to the backend's socket (after login)
    and tells the session, which reads no more of the client's commands in between."""

    __slots__ = ("session", "backend", "paused", "holds_input")

    def __init__(self, session: ClientSession) -> None:
        self.session = session
        self.backend = None  # the backend connection's transport, once relaying
        self.paused = False
        self.holds_input = False  # the session stopped reading commands for it

    def pauseProducing(self) -> None:
        self.paused = True
        if self.backend is not None:
            self.backend.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.backend is not None:
            self.backend.resumeProducing()
        if self.holds_input:
            self.holds_input = False
            # (Not inside the connection's write handling, which calls this.)
            self.session.service.reactor.callLater(0, self.session._output_drained)

    def stopProducing(self) -> None:
        pass  # (the client is gone: connectionLost closes the backend, after what the client sent)


_SYNC_LITERAL_END = re.compile(rb"(~?\{[0-9]+)\}(\r?\n)\Z")


_LITERAL_AT_END_RE = re.compile(rb"~?\{[0-9]+[+-]?\}\r?\n\Z")
_SYNC_MARK_END_RE = re.compile(rb"~?\{\d+\}\r?\n\Z")
_ANY_LITERAL_MARK_RE = re.compile(rb"~?\{([0-9]+)[+-]?\}\r?\n")


def _split_at_literals(data: bytes) -> list[bytes]:
    """``data`` (command text with inline non-synchronizing literals) as pieces that each end with a
    literal's announcement, made synchronizing (``{n}``), but the last: what follows each "+"."""
    pieces, start, pos = [], 0, 0
    while (m := _NONSYNC_MARK_RE.search(data, pos)) is not None:
        pieces.append(data[start:m.start()] + m.group(1) + m.group(2))
        size = int(data[m.start(1):m.end(1)].lstrip(b"~{"))
        start, pos = m.end(), m.end() + size  # (the literal's bytes open the next piece, never searched)
    if start < len(data) or not pieces:
        pieces.append(data[start:])
    return pieces


def _last_segment(data: bytes) -> tuple[bytes, bool]:
    """The text of ``data`` after its last inline literal, and whether it has one (a collected command's
    literals are in it, each announcement followed by its bytes; one that ends ``data`` is the segment's)."""
    start = pos = 0
    while (m := _ANY_LITERAL_MARK_RE.search(data, pos)) is not None and m.end() < len(data):
        start = pos = m.end() + int(m.group(1))
    return data[start:], start > 0


def _nonsync(segment: bytes) -> bytes:
    """A segment whose literal the proxy already accepted from the client: forwarded as ``{n+}``."""
    return _SYNC_LITERAL_END.sub(rb"\1+}\2", segment)


def _unmapped(host: str) -> str:
    """An IPv4 client of a dual-stack socket (``::ffff:192.0.2.1``) as the IPv4 address it is: one client,
    one address, in logs, per-IP limits and the address forwarded to the backend."""
    return host[7:] if host[:7].lower() == "::ffff:" and "." in host else host


def _now_or_later(d: defer.Deferred, later) -> list:
    """``[result]`` if ``d`` has fired already (its result is taken here), else ``[]``, and ``later(result)``
    runs when it fires. A plugin's Deferred that needed no waiting then costs no pause and no hold."""
    now: list = []
    waiting = False

    def fired(result):
        return later(result) if waiting else now.append(result)

    d.addBoth(fired)
    waiting = not now
    return now
