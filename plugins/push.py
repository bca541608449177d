"""Push for devices that are not connected: change events POSTed as small JSON to an operator's gateway.

``[plugin.push] url = "https://push.example.net/cpm"`` (no url: the plugin does nothing). Events come from
the notify plugin's event bus; one is sent only when the user enabled notifications (preference, within
policy). The body never carries message content:

    {"user": "alice", "mailbox": "Default/tel:+15551234567", "event": "MessageNew", "uidvalidity": 17,
     "uids": [42], "kinds": {"42": "chat"}, "devices": ["tablet-1"], "time": 1764100000.0}

``devices``: the user's devices known to the proxy (recorded at login in METADATA) that have no session
in this process. ``headers`` only with ``include_headers = ["From", "Subject"]`` (message content stays out
unless the operator asks for it). ``id`` is the same for the same change whichever proxy process sends it, so a gateway
behind several proxy nodes can drop duplicates. Delivery is in order, with retries and exponential
backoff; the queue is bounded and what overflows is dropped and counted (``cpmproxy_push_dropped_total``).

When none of the user's devices is connected, pushes matter most (a delivery must wake the phone): the
notify plugin keeps the user's watch connection for ``offline_watch`` seconds after their last session
here ended (logged in with the ``[admin]`` master user; ``[plugin.notify] max_offline_watches`` bounds
how many), with the preferences of that last session.
"""

from __future__ import annotations

import email.policy
import hashlib
import json
import re
import time
from collections import deque
from email.parser import BytesParser
from io import BytesIO

from prometheus_client import Counter, Gauge
from twisted.internet import defer, reactor
from twisted.internet.ssl import Certificate
from twisted.logger import Logger
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from cpmproxy.config import ConfigError
from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.proxy.hooks import Plugin
from plugins.cpm import PREFIX
from plugins.localdelete import device_key
from plugins.notify import TOPIC, ChangeEvent
from plugins.policy import classify, side_examine

log = Logger(namespace="cpmproxy.push")

DEVICES = PREFIX + "/devices"
_DEVICE_VALUE = re.compile(rb'/devices/[^ ]+ (?:"([^"]*)"|\{\d+\}\r\n([^ )]*))')
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 field name: printable ASCII except ":"
_FETCHED_HEADERS = re.compile(rb"UID (\d+)[^{]*\{(\d+)\}\r\n", re.S)
_SETTINGS = {"url": str, "ca_file": str, "timeout": (int, float), "max_queue": int, "max_retries": int,
             "backoff": (int, float), "max_backoff": (int, float), "offline_watch": (int, float), "include_headers": list}


class PushPlugin(Plugin):
    name = "push"
    requires = ("notify",)

    def __init__(self, proxy):
        super().__init__(proxy)
        self.url = ""
        self.queue: deque = deque()
        self.sending = False
        self.stopped = False
        self.devices: dict[str, set[str]] = {}
        self._subscribed = False
        self._agent = None

    def configure(self, settings: dict) -> None:
        for key, value in settings.items():
            if key not in _SETTINGS:
                raise ConfigError(f"plugin.push.{key}: unknown key")
            if not isinstance(value, _SETTINGS[key]) or isinstance(value, bool):
                raise ConfigError(f"plugin.push.{key}: wrong type")
        self.url = settings.get("url", "")
        if self.url and not self.url.startswith(("https://", "http://")):
            raise ConfigError("plugin.push.url: must be an http(s) URL")
        self.ca_file = settings.get("ca_file", "")
        self.timeout = settings.get("timeout", 10.0)
        self.max_queue = settings.get("max_queue", 10000)
        self.max_retries = settings.get("max_retries", 10)
        self.backoff = settings.get("backoff", 1.0)
        self.max_backoff = settings.get("max_backoff", 300.0)
        self.offline_watch = settings.get("offline_watch", 86400.0)
        self.include_headers = settings.get("include_headers", [])
        if not all(isinstance(h, str) and _HEADER_NAME.fullmatch(h) for h in self.include_headers):
            raise ConfigError("plugin.push.include_headers: expected header names, e.g. [\"From\", \"Subject\"]")
        if self.offline_watch < 0:
            raise ConfigError("plugin.push.offline_watch: expected seconds >= 0 (0: off)")
        if self.ca_file:
            try:
                with open(self.ca_file, "rb") as f:
                    self._trust = Certificate.loadPEM(f.read())
            except OSError as e:
                raise ConfigError(f"plugin.push.ca_file: {e}") from None
        else:
            self._trust = None

    # -- wiring ---------------------------------------------------------------------------------

    def _metrics(self):
        m = self.proxy.metrics
        return (m.plugin_metric(Counter, "cpmproxy_push_sent", "Push events delivered"),
                m.plugin_metric(Counter, "cpmproxy_push_failed", "Push delivery attempts that failed"),
                m.plugin_metric(Counter, "cpmproxy_push_dropped", "Push events dropped (queue full, retries)"),
                m.plugin_metric(Gauge, "cpmproxy_push_queue", "Push events waiting"))

    def _notify(self):
        return self.proxy.hooks.by_name.get("notify")

    def login(self, session):
        if not self.url:
            return None
        if not self._subscribed:
            self.proxy.events.subscribe(TOPIC, self._event)
            self._subscribed = True
        return defer.Deferred.fromCoroutine(self._record_device(session))

    async def _record_device(self, session) -> None:
        """Remember the user's devices (on the backend, so every proxy node knows them)."""
        entry = f"{DEVICES}/{device_key(session.device_id)}".encode()
        value = session.device_id.replace("\\", "").replace('"', "").encode()
        session.side_command(b'SETMETADATA "" (' + entry + b' "' + value + b'")')
        reply = await session.side_command(b'GETMETADATA (DEPTH 1) "" (' + DEVICES.encode() + b")")
        found = set()
        for line in reply.untagged:
            for m in _DEVICE_VALUE.finditer(line):
                found.add((m.group(1) or m.group(2) or b"").decode("utf-8", "replace"))
        found.discard("")
        self.devices[session.user] = found | {session.device_id}

    def watch_offline(self, user: str) -> float:
        """Asked by the notify plugin when the user's last session here ends (see the module doc)."""
        return self.offline_watch if self.url and self.devices.get(user) else 0.0

    def stop(self) -> None:
        self.stopped = True
        if self._subscribed:
            self.proxy.events.unsubscribe(TOPIC, self._event)
            self._subscribed = False

    # -- events ---------------------------------------------------------------------------------

    def _event(self, event: ChangeEvent) -> None:
        sessions = self.proxy.sessions_of(event.user)
        notify = self._notify()
        if notify is None or event.event == "MetadataChange":
            return
        if sessions:
            if not any(notify.enabled(s) for s in sessions):
                return
        else:
            watch = notify.watches.get(event.user)
            if watch is None or watch.offline_state is None or not notify.enabled_in(watch.offline_state):
                return
        connected = {s.device_id for s in sessions}
        offline = sorted(self.devices.get(event.user, set()) - connected)
        if not offline:
            return
        d = defer.Deferred.fromCoroutine(self._build(next(iter(sessions), None), event, offline))
        d.addCallback(self._enqueue)
        d.addErrback(lambda f: log.failure("building a push event failed", f))

    async def _build(self, session, event: ChangeEvent, offline: list[str]) -> dict:
        change = [event.user, event.mailbox, event.event, event.uidvalidity, list(event.uids), event.modseq]
        body = {"id": hashlib.sha256(json.dumps(change).encode()).hexdigest()[:32],
                "user": event.user, "mailbox": event.mailbox, "event": event.event,
                "uidvalidity": event.uidvalidity, "uids": list(event.uids), "devices": offline,
                "time": time.time()}
        if event.uids:
            try:
                kinds, headers = await self._inspect(session, event)
            except Exception as e:  # the event still goes out, without them
                log.warn("classifying pushed messages failed: {e}", e=e)
                kinds, headers = {}, {}
            body["kinds"] = {str(u): k for u, k in kinds.items()}
            if self.include_headers:
                body["headers"] = {str(u): h for u, h in headers.items()}
        return body

    async def _inspect(self, session, event: ChangeEvent):
        """Kinds (and the configured header fields) of the new messages, by server-side searches."""
        if session is not None:
            async with side_examine(session):
                return await self._inspect_on(session.side_command, event)
        # No session of the user here (offline watch): a short master-user connection of its own.
        proto = await self._notify().open_master(event.user, "push")
        try:
            return await self._inspect_on(proto.command, event)
        finally:
            proto.command(b"LOGOUT")
            proto.transport.loseConnection()

    async def _inspect_on(self, run, event: ChangeEvent):
        kinds = await classify(run, event.mailbox, event.uids)  # (EXAMINEs the mailbox)
        headers: dict[int, dict[str, str]] = {}
        if self.include_headers:
            fields = " ".join(self.include_headers).encode()
            reply = await run(b"UID FETCH " + SequenceSet.from_iterable(event.uids).format()
                              + b" (UID BODY.PEEK[HEADER.FIELDS (" + fields + b")])")
            for line in reply.untagged:
                m = _FETCHED_HEADERS.search(line)
                if m is None:
                    continue
                raw = line[m.end():m.end() + int(m.group(2))]
                msg = BytesParser(policy=email.policy.default).parsebytes(raw, headersonly=True)
                headers[int(m.group(1))] = {k: str(v) for k, v in msg.items()}
        return kinds, headers

    def _enqueue(self, body: dict) -> None:
        sent, failed, dropped, queued = self._metrics()
        if len(self.queue) >= self.max_queue:
            self.queue.popleft()
            dropped.inc()
        self.queue.append((body, 0))
        queued.set(len(self.queue))
        if not self.sending:
            self._send_next()

    def _send_next(self) -> None:
        sent, failed, dropped, queued = self._metrics()
        queued.set(len(self.queue))
        if not self.queue or self.stopped and not self.queue:
            self.sending = False
            return
        self.sending = True
        body, attempt = self.queue[0]
        if self._agent is None:
            policy = BrowserLikePolicyForHTTPS(trustRoot=self._trust) if self._trust else BrowserLikePolicyForHTTPS()
            self._agent = Agent(reactor, contextFactory=policy, connectTimeout=self.timeout)
        data = json.dumps(body).encode()
        d = self._agent.request(b"POST", self.url.encode(),
                                Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"cpmproxy"]}),
                                FileBodyProducer(BytesIO(data)))
        d.addTimeout(self.timeout, reactor)

        def done(response):
            return readBody(response).addCallback(lambda _: response.code)

        def ok(code):
            if 200 <= code < 300:
                self.queue.popleft()
                sent.inc()
                reactor.callLater(0, self._send_next)
            else:
                retry(f"HTTP {code}")

        def retry(reason):
            failed.inc()
            body, attempt = self.queue[0]
            if attempt + 1 > self.max_retries:
                self.queue.popleft()
                dropped.inc()
                log.warn("push dropped after {n} attempts: {reason}", n=attempt + 1, reason=reason)
                reactor.callLater(0, self._send_next)
                return
            self.queue[0] = (body, attempt + 1)
            delay = min(self.backoff * 2 ** attempt, self.max_backoff)
            reactor.callLater(delay, self._send_next)

        d.addCallback(done)
        d.addCallbacks(ok, lambda f: retry(f.getErrorMessage()))
