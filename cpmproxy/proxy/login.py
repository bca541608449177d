"""The session's own phase before the relay: pre-authentication commands (CAPABILITY, ID, STARTTLS,
LOGIN, AUTHENTICATE PLAIN), then the login at the backend with the client's credentials, and the way
into the relay. A mixin of ``ClientSession``, which holds the connection, its framer and its output."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpmproxy.imap.framing import LiteralData
from cpmproxy.imap.tokens import Atom, Nil, ParenList, TokenError, astring_text, parse_command, token_text
from cpmproxy.proxy.backend import (
    UNAVAILABLE,
    AuthFailed,
    BackendError,
    BackendRefused,
    connect_backend,
    id_list,
    login_backend,
)
from cpmproxy.proxy.hooks import Refuse

log = Logger(namespace="cpmproxy.session")

# Capabilities the proxy cannot carry through (or that make no sense after login).
_DROPPED_CAPS = (b"COMPRESS=", b"STARTTLS", b"LOGINDISABLED", b"AUTH=", b"SASL-IR", b"LOGIN-REFERRALS",
                 b"UNAUTHENTICATE")
_PREAUTH_COMMANDS = {b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"LOGIN", b"AUTHENTICATE", b"ID"}
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # (a tab is text)
MAX_DEVICE_ID = 128  # characters


def _token_str(tok: Any) -> str | None:
    v = astring_text(tok)  # (a user named "nil" may write it as an atom: Dovecot reads the name)
    return None if v is None else v.decode("utf-8", "replace")


def _password(tok: Any) -> str | None:
    """A password as the client sent it: bytes that are not UTF-8 (a Latin-1 password) are kept as they
    are, to be sent on unchanged (``login_backend``), where a replacement character failed the login."""
    v = astring_text(tok)
    return None if v is None else v.decode("utf-8", "surrogateescape")


class LoginPhase:
    """Pre-authentication and login (see the module's docstring)."""

    # -- pre-authentication ---------------------------------------------------------------------

    def _preauth_capabilities(self) -> list[bytes]:
        caps = [b"IMAP4rev1", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"LITERAL+"]
        if self.service.server_tls is not None and not self.tls_active:
            caps.append(b"STARTTLS")
        if self._plaintext_ok():
            caps.append(b"AUTH=PLAIN")
        else:
            caps.append(b"LOGINDISABLED")
        return caps

    def _plaintext_ok(self) -> bool:
        if self.tls_active:
            return True
        mode = self.config.proxy["plaintext_auth"]
        if mode == "always":
            return True
        if mode == "never":
            return False
        return self.service.is_loopback(self.peer_host)

    def _preauth_events(self) -> None:
        for ev in self.framer.events():
            if self.phase != "preauth" or self._closing:
                return
            if not isinstance(ev, LiteralData) and ev.first:
                self._parts, self._parts_size = [], 0
            self._parts.append(ev.data)
            self._parts_size += len(ev.data)
            if self._parts_size > self.config.limits["max_line"]:
                # (each literal below max_preauth_literal, but no end to them: memory for the asking)
                self.bye(b"Command too long before login.", code=b"TOOBIG")
                return
            if isinstance(ev, LiteralData):
                continue
            if ev.literal is not None:
                if not ev.non_sync:
                    self._out.append(b"+ OK\r\n")
                continue
            command = b"".join(self._parts)
            self._parts = []
            self._preauth_command(command)
            if self.phase != "preauth":
                return  # login started: the rest waits in the framer until it is done

    def _preauth_command(self, raw: bytes) -> None:
        line = raw[:-2] if raw.endswith(b"\r\n") else raw.rstrip(b"\n")
        if self._auth_tag is not None:
            tag, self._auth_tag = self._auth_tag, None
            self._sasl_response(tag, line)
            return
        try:
            cmd = parse_command(line)
        except TokenError as e:
            tag = self._tag_of(line)
            self._reply(tag or b"*", b"BAD [CLIENTBUG] Invalid command: " + str(e).encode()[:100] + b".")
            self._count_bad()
            return
        name = cmd.name
        self.service.metrics.command(name)
        if name not in _PREAUTH_COMMANDS or cmd.uid:
            self._reply(cmd.tag, b"BAD [CLIENTBUG] Command " + name[:32] + b" is not valid before login.")
            self._count_bad("state")
            return
        try:
            args = cmd.args
        except TokenError as e:
            self._reply(cmd.tag, b"BAD [CLIENTBUG] Invalid arguments: " + str(e).encode()[:100] + b".")
            self._count_bad()
            return
        bad_before = self._bad_replies
        handler = getattr(self, "_cmd_" + name.decode().lower())
        handler(cmd.tag, args)
        if self._bad_replies > bad_before:
            self._count_bad()  # (an ID or LOGIN with bad arguments, as any other invalid command)
        else:
            self.bad_commands = 0

    def _cmd_capability(self, tag: bytes, args: list) -> None:
        if args:
            self._reply(tag, b"BAD [CLIENTBUG] CAPABILITY takes no arguments.")
            return
        self._reply(tag, b"OK Pre-login capabilities listed, post-login capabilities have more.",
                    [b"* CAPABILITY " + b" ".join(self._preauth_capabilities()) + b"\r\n"])

    def _cmd_noop(self, tag: bytes, args: list) -> None:
        self._reply(tag, b"OK NOOP completed.")

    def _cmd_logout(self, tag: bytes, args: list) -> None:
        self._out.append(b"* BYE Logging out\r\n" + tag + b" OK Logout completed.\r\n")
        self._closing = True
        self._flush()
        self._lose_client()

    def _cmd_starttls(self, tag: bytes, args: list) -> None:
        if self.tls_active:
            self._reply(tag, b"BAD [CLIENTBUG] TLS is already active.")
            return
        if self.service.server_tls is None:
            self._reply(tag, b"BAD [CANNOT] TLS is not configured on this server.")
            return
        if self.framer.buffered:
            # Plaintext pipelined after STARTTLS would be read as if it came over TLS (CVE-2011-0411).
            self.bye(b"Commands pipelined after STARTTLS.", code=b"CLIENTBUG")
            return
        self._out.append(tag + b" OK Begin TLS negotiation now.\r\n")
        self._flush()
        self.transport.startTLS(self.service.server_tls)
        self.tls_active = True
        # What was said in plaintext may be a man in the middle's (RFC 9051 6.2.1 forgets capabilities for
        # the same reason): the device id picks the policy and scopes local deletes.
        self.client_id = {}
        self._update_device_id()

    def _cmd_id(self, tag: bytes, args: list) -> None:
        fields = self._parse_id(args)
        if fields is None:
            self._reply(tag, b"BAD [CLIENTBUG] Invalid ID parameters.")
            return
        if len(fields.get(self.config.proxy["device_id_field"].lower()) or "") > MAX_DEVICE_ID:
            # (It names METADATA entries and push records: bounded like any other input.)
            self._reply(tag, b"BAD [CLIENTBUG] The device id is longer than %d characters." % MAX_DEVICE_ID)
            return
        self.client_id = fields
        self._update_device_id()
        ours = b"* ID " + id_list([("name", "cpmproxy"), ("version", self.service.version)]) + b"\r\n"
        self._reply(tag, b"OK ID completed.", [ours])

    @staticmethod
    def _parse_id(args: list) -> dict[str, str | None] | None:
        if len(args) != 1:
            return None
        arg = args[0]
        if isinstance(arg, Nil) or (isinstance(arg, Atom) and arg.value.upper() == b"NIL"):
            return {}
        if not isinstance(arg, ParenList) or len(arg.items) % 2 or len(arg.items) > 60:
            return None
        fields: dict[str, str | None] = {}
        items = arg.items
        for i in range(0, len(items), 2):
            k = _token_str(items[i])
            v = None if isinstance(items[i + 1], Nil) else _token_str(items[i + 1])
            if k is None or len(k) > 30 or _CONTROL_RE.search(k):
                return None
            # (Informational text, RFC 2971: no control characters. A literal can carry CR LF, which the
            # values would take into the proxy's own commands and logs.)
            if v is not None and (len(v) > 1024 or _CONTROL_RE.search(v)):
                return None
            fields[k.lower()] = v
        return fields

    def _update_device_id(self) -> None:
        field = self.config.proxy["device_id_field"].lower()
        value = self.client_id.get(field)
        self.device_id = value if value else "default"

    def _cmd_login(self, tag: bytes, args: list) -> None:
        if not self._plaintext_ok():
            self._reply(tag, b"NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure "
                             b"connections.")
            return
        if len(args) != 2:
            self._reply(tag, b"BAD [CLIENTBUG] LOGIN needs a user name and a password.")
            return
        user, password = _token_str(args[0]), _password(args[1])
        if user is None or password is None:
            self._reply(tag, b"BAD [CLIENTBUG] Invalid LOGIN arguments.")
            return
        self._start_login(tag, "", user, password)

    def _cmd_authenticate(self, tag: bytes, args: list) -> None:
        if not args:
            self._reply(tag, b"BAD [CLIENTBUG] AUTHENTICATE needs a mechanism.")
            return
        mech = (token_text(args[0]) or b"").upper()
        if mech != b"PLAIN":
            self._reply(tag, b"NO [CANNOT] Unsupported authentication mechanism.")
            return
        if not self._plaintext_ok():
            self._reply(tag, b"NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure "
                             b"connections.")
            return
        if len(args) > 2:
            self._reply(tag, b"BAD [CLIENTBUG] Too many arguments.")
            return
        if len(args) == 2:  # SASL-IR
            ir = token_text(args[1]) or b""
            self._sasl_response(tag, b"" if ir == b"=" else ir)
            return
        self._auth_tag = tag
        self._out.append(b"+ \r\n")

    def _sasl_response(self, tag: bytes, data: bytes) -> None:
        if data.strip() == b"*":
            self._reply(tag, b"BAD [CLIENTBUG] Authentication aborted by client.")
            return
        try:
            decoded = base64.b64decode(data.strip(), validate=True)
            authzid, authcid, password = decoded.split(b"\0")
            creds = (authzid.decode("utf-8"), authcid.decode("utf-8"), password.decode("utf-8", "surrogateescape"))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            self._reply(tag, b"BAD [CLIENTBUG] Invalid base64 or PLAIN response.")
            self._count_bad()
            return
        if not creds[1]:
            self._reply(tag, b"NO [AUTHENTICATIONFAILED] Authentication failed.")
            return
        self._start_login(tag, *creds)

    # -- login ----------------------------------------------------------------------------------

    def _start_login(self, tag: bytes, authzid: str, user: str, password: str) -> None:
        if _CONTROL_RE.search(user) or _CONTROL_RE.search(authzid):
            # (No user name has them; a literal can carry CR LF, which would forge lines in the logs.)
            self._reply(tag, b"BAD [CLIENTBUG] Invalid user name.")
            return
        self.phase = "login"
        self.transport.pauseProducing()  # pipelined commands wait in the socket, not in memory
        d = defer.Deferred.fromCoroutine(self._login(tag, authzid, user, password))
        d.addErrback(self._login_crashed, tag)

    def _login_crashed(self, failure: Failure, tag: bytes) -> None:
        self._bug("login failed unexpectedly", failure)
        if self.phase == "login":
            self._out.append(tag + b" NO [SERVERBUG] Internal error.\r\n")
            self.bye(b"Internal error.", code=b"SERVERBUG")

    async def _login(self, tag: bytes, authzid: str, user: str, password: str) -> None:
        from twisted.internet import reactor

        service = self.service
        metrics = service.metrics
        login_user = authzid or user
        backend = None
        deadline = reactor.seconds() + self.config.backend["login_timeout"]
        try:
            d = defer.Deferred.fromCoroutine(self._connect_and_login(authzid, user, password))
            d.addTimeout(self.config.backend["login_timeout"], reactor)
            backend, post_caps = await d
        except AuthFailed as e:
            metrics.logins.labels(result="failed").inc()
            service.login_outcome(login_user, False)
            self.auth_failures += 1
            delay = service.auth_failed(self.peer_host)
            log.info("login failed user={user} peer={peer} reason={reason} session={session}", user=login_user,
                     peer=self.peer_host, reason=e.response.decode("utf-8", "replace")[:200], session=self.session_id)
            if delay:
                await _sleep(reactor, delay)
            if self.phase != "login":
                return
            text = e.response if b"[" in e.response else b"NO [AUTHENTICATIONFAILED] " + e.response[3:]
            self._resume_preauth(tag + b" " + text + b"\r\n")
            if self.auth_failures >= self.config.limits["max_auth_failures"]:
                self.bye(b"Too many failed logins.", code=b"AUTHENTICATIONFAILED")
            return
        except (BackendError, defer.TimeoutError, OSError) as e:
            metrics.logins.labels(result="unavailable").inc()
            metrics.backend_errors.labels(kind="login").inc()
            reason = f"no answer within {self.config.backend['login_timeout']:g} s" \
                if isinstance(e, defer.TimeoutError) else str(e) or type(e).__name__
            service.login_outcome(login_user, True, reason)
            log.warn("backend unavailable: {error} user={user} session={session}", error=reason, user=login_user,
                     session=self.session_id)
            response = e.response if isinstance(e, BackendRefused) else b"NO [UNAVAILABLE] " + UNAVAILABLE
            self._resume_preauth(tag + b" " + response + b"\r\n")
            return
        if self.phase != "login":  # the client went away meanwhile
            backend.close()
            return
        self.backend = backend
        # The user as the backend knows it: every per-user table (sessions, watches, preferences, limits)
        # must find "Alice" and "alice" alike where the backend folds them into one user.
        # (ASCII only, as Dovecot's %Lu: Python's lower() folds other letters too, and would merge users.)
        self.user = login_user.encode().lower().decode() if self.config.backend["username_case"] == "lower" \
            else login_user
        self._credentials = (authzid, user, password)
        refusal = service.admit_user(self)
        if refusal:
            metrics.logins.labels(result="limit").inc()
            self.backend = None
            backend.close()
            self.user = None
            self._resume_preauth(tag + b" NO [LIMIT] " + refusal.encode() + b"\r\n")
            return
        # Identical across sessions: one shared copy (thousands of idle sessions each kept their own).
        self.backend_caps = service.shared(tuple(post_caps))
        self.capabilities = service.shared(tuple(self._post_capabilities(post_caps)))
        try:
            # (Within what is left of login_timeout: a plugin reads from the backend, which may hang.)
            hooks = defer.Deferred.fromCoroutine(self._login_hooks())
            hooks.addTimeout(max(0.0, deadline - reactor.seconds()), reactor)
            await hooks
            if backend.closed:  # (while the hooks ran: the client must not be told it is logged in)
                raise BackendError("backend closed the connection during login")
        except (Refuse, BackendError, defer.TimeoutError) as e:
            if isinstance(e, Refuse):
                metrics.logins.labels(result="refused").inc()
                response = e.response
            else:  # (a plugin's reading from the backend failed: e.g. the side connection went away)
                metrics.logins.labels(result="unavailable").inc()
                metrics.backend_errors.labels(kind="login").inc()
                reason = f"no answer within {self.config.backend['login_timeout']:g} s" \
                    if isinstance(e, defer.TimeoutError) else str(e) or type(e).__name__
                service.login_outcome(login_user, True, reason)
                log.warn("backend unavailable at login: {error} session={session}", error=reason,
                         session=self.session_id)
                response = b"NO [UNAVAILABLE] " + UNAVAILABLE
            self._abandon_login(backend)
            self._resume_preauth(tag + b" " + response + b"\r\n")
            return
        if self.phase != "login":
            backend.close()
            return
        metrics.logins.labels(result="ok").inc()
        service.login_outcome(login_user, False)
        log.info("login user={user} device={device} session={session}", **self._log_fields())
        self._enter_relay(tag)

    def _abandon_login(self, backend) -> None:
        """Undo a login the hooks did not let through: what they registered under the user (the shared
        side connection, the notification watch) is let go now, while the user is still known (a session
        that stayed in them kept that user's connections open for as long as the proxy ran)."""
        self.service.forget_user(self)
        self._close_side()
        started = self._hooks_started
        for plugin in [p for p in self.hooks.closed if any(p is s for s in started)]:
            try:
                plugin.closed(self)
            except Exception:
                self._bug(f"plugin {plugin.name} closed hook failed")
        self.state.clear()
        self.backend = None
        backend.close()
        self.user = None
        self._credentials = None

    async def _login_hooks(self) -> None:
        self._hooks_started = []  # (the plugins to tell if the login goes no further: _abandon_login)
        for plugin in self.hooks.login:
            self._hooks_started.append(plugin)
            await defer.maybeDeferred(plugin.login, self)

    async def _connect_and_login(self, authzid: str, user: str, password: str):
        from twisted.internet import reactor

        backend, caps = await connect_backend(reactor, self.config)
        try:
            local = self.transport.getHost()
            fields: list[tuple[str, str | None]] = [
                ("x-originating-ip", self.peer_host), ("x-originating-port", str(self.peer_port)),
                ("x-connected-ip", getattr(local, "host", "")), ("x-connected-port", str(getattr(local, "port", ""))),
                ("x-session-id", self.session_id),
            ]
            # The client's own fields, but none of the x- ones: Dovecot trusts those from a proxy in its
            # login_trusted_networks (x-session-ext-id names the session in its logs, x-forward-* become
            # passdb fields, x-proxy-ttl, x-client-transport...), and the client is not the proxy.
            fields += [(k, v) for k, v in self.client_id.items() if not k.startswith("x-")]
            post = await login_backend(backend, caps, authzid, user, password, fields)
        except BaseException:
            backend.close()
            raise
        return backend, post

    def _resume_preauth(self, response: bytes) -> None:
        if self.phase != "login":
            return
        self.phase = "preauth"
        self._out.append(response)
        self._flush()
        self.transport.resumeProducing()
        self._process_client()

    def _post_capabilities(self, caps: list[bytes]) -> list[bytes]:
        out = []
        limit = self.config.limits["max_literal"]
        for c in caps:
            u = c.upper()
            if u.startswith(_DROPPED_CAPS):
                continue
            if u.startswith(b"APPENDLIMIT"):
                backend_limit = int(u.split(b"=", 1)[1]) if b"=" in u and u.split(b"=", 1)[1].isdigit() else None
                if backend_limit is not None:
                    limit = min(limit, backend_limit)
                continue
            out.append(c)
        out.append(b"APPENDLIMIT=%d" % limit)
        self.framer.max_literal = limit
        for plugin in self.hooks.capabilities:
            out = plugin.capabilities(self, out)
        return out

    def _enter_relay(self, tag: bytes) -> None:
        self.phase = "auth"
        self.setTimeout(self.config.limits["idle_timeout"])
        self.framer.max_line = self.config.limits["max_line"]
        self.backend.session = self
        self._out.append(tag + b" OK [CAPABILITY " + b" ".join(self.capabilities) + b"] Logged in\r\n")
        self._flush()
        # Backpressure both ways: a slow reader pauses the other side's socket reads.
        self._output_link.backend = self.backend.transport
        if self._output_link.paused:
            self.backend.transport.pauseProducing()
        self.backend.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()
        if self.backend.framer.buffered:
            self.backend_data(b"")
        self._process_client()


def _sleep(reactor, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
