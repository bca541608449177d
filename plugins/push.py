"""Push for devices that are not connected: change events POSTed as small JSON to an operator's gateway.

``[plugin.push] url = "https://push.example.net/cpm"`` (no url: the plugin does nothing). Events come from
the notify plugin's event bus. The body never carries message content:

    {"user": "alice", "mailbox": "Default/tel:+15551234567", "event": "MessageNew", "uidvalidity": 17,
     "uids": [42], "kinds": {"42": "chat"}, "devices": ["tablet-1"], "time": 1764100000.0}

``devices``: the user's devices known to the proxy (recorded in METADATA at a device's first login, read
at every login) that have no session in this process, each as its own policy and view have it
(``_targets``, ``_build``): its policy class, matched as at login on the device id and the ID "name" it
gave at its last login (recorded with it; a device recorded before names were, or that gave none, is
matched on its id alone until it logs in again), must enable notifications (``forced``, or ``allowed``
and the user's preference on); the mailbox must be in its view (the policy's folder patterns, the
folder's ``sync`` preference, a Session History it does not synchronize); of new messages, only those it
sees are named (not of a kind hidden for it in that folder, nor past its ``max_size`` / ``max_age_days``;
when they cannot be classified, none where anything may be hidden). A change no device sees is not sent;
devices that see it differently get one event each per view (its own ``uids``, ``kinds`` and ``id``): a
gateway wakes each listed device for what it names, so the intersection would leave a device unwoken
for a message it shows, and a union would name messages hidden from the others. A flag change names no
messages: it goes to the devices that see one of the messages changed (asked of the backend by their
MODSEQ and classified, up to ``_CHANGED_INSPECTED`` of them; more, to every device that sees the
folder). An expunge names none either: it goes to every device that sees the folder, but for a device
whose view hides every message it took by kind (an IMDN deleted where IMDNs are hidden from it). Which
messages those were is read off the folder's UID listing, taken at its last event and again now
(``_expunged``), and their kinds off what was classified of them (``_kinds``, the policy's cache); a
message of unknown kind, or no earlier listing, and the expunge goes to every such device. A folder whose facts cannot be
read drops the event (a device's next sync finds the change). Only message changes are pushed: a HIGHESTMODSEQ
that moved for a metadata write alone (a preference, a device record) is checked and dropped. ``headers`` only with ``include_headers = ["From", "Subject"]`` (message content stays out
unless the operator asks for it). ``id`` is the same for the same change whichever proxy process sends it, so a gateway
behind several proxy nodes can drop duplicates. Each user's events go in order, one at a time; users' go
side by side (``concurrency`` POSTs at once on persistent connections) and take turns (``pushqueue``).
A failed attempt (no answer, 408/425/429, 5xx) is retried with exponential backoff (or the ``Retry-After``
the gateway asks for, up to ``max_backoff``), holding up only that user's later events; any other
answer refuses the event for good (dropped). The queue is bounded: the oldest event of the user with the
most waiting is dropped first. Drops are counted (``cpmproxy_push_dropped_total``).

When none of the user's devices is connected, pushes matter most (a delivery must wake the phone): the
notify plugin keeps the user's watch connection for ``offline_watch`` seconds after their last session
here ended (logged in with the ``[admin]`` master user, which the configuration must then have:
``offline_watch = 0`` pushes only while a device of the user is connected; ``[plugin.notify]
max_offline_watches`` bounds how many), with the preferences of that last session. The watch is armed
for pushes while any offline device wants them (``wants_events``), whatever the connected ones want.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.policy
import hashlib
import json
import math
import re
import time
import uuid
from collections import OrderedDict, deque
from email.parser import BytesParser
from io import BytesIO
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from cpmproxy.config import ConfigError, has_type, unknown_key, wrong_type
from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.imap.tokens import quote
from cpmproxy.proxy.hooks import Plugin
from cpmproxy.tlstrust import trust_from_file
from plugins.cpm import PREFIX
from plugins.localdelete import device_key
from plugins.notify import TOPIC, ChangeEvent
from plugins.policy import classify
from plugins.policystate import FolderInfo, _esearch_ranges, side_examine
from plugins.policystatus import MailboxReplaced
from plugins.pushqueue import Entry, Outbox
from plugins.wire import esearch_all, iter_metadata, wire_name

log = Logger(namespace="cpmproxy.push")

DEVICES = PREFIX + "/devices"
DEVICE_NAMES = PREFIX + "/devicenames"  # (the ID "name" each device gave at its last login)
_IDS_KEPT = 10000  # ids of recent events remembered, so that a change is pushed once
_NEW_RANGES_KEPT = 64  # ranges of recently pushed new UIDs remembered per mailbox
_MODSEQS_KEPT = 100000  # (user, mailbox) pairs whose last HIGHESTMODSEQ is remembered (oldest forgotten)
# A flag change of more messages than this (a client marking a folder read) is not classified: it goes to
# every device that sees the folder, as its messages' kinds would cost a long FETCH to learn.
_CHANGED_INSPECTED = 1000
_KINDS_KEPT = 100_000  # kinds of classified messages remembered, by (user, mailbox, UIDVALIDITY, UID)
_LISTINGS_KEPT = 10_000  # folders whose UID listing is kept (to tell which messages an expunge took)
_LISTING_RANGES = 4096  # a listing of more ranges (a very scattered folder) is not kept
# UID ranges of all the kept listings together (``max_listing_ranges``; ~100 bytes each): by folders alone
# (_LISTINGS_KEPT), scattered folders could hold gigabytes (10,000 listings of 4,096 ranges are ~4 GB).
_LISTING_RANGES_KEPT = 500_000
_RETRIED_CODES = (408, 425, 429)  # and 5xx: the gateway's trouble, not the event's
_RESPONSE_CODE_NUMBER = re.compile(rb"^\* OK \[(UIDVALIDITY|UIDNEXT) ([0-9]+)\]", re.I)
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 field name: printable ASCII except ":"
_FETCHED_HEADERS = re.compile(rb"UID (\d+)[^{]*\{(\d+)\}\r\n", re.S)
_SETTINGS = {"url": str, "ca_file": str, "timeout": (int, float), "max_queue": int, "concurrency": int, "max_devices": int, "max_retries": int,
             "backoff": (int, float), "max_backoff": (int, float), "offline_watch": (int, float), "include_headers": list,
             "max_listing_ranges": int}


# The sender's numbers and their least values (max_queue = 0 failed at the first event).
_AT_LEAST = {"max_queue": 1, "concurrency": 1, "max_devices": 1, "max_retries": 0, "backoff": 0, "max_backoff": 0,
             "max_listing_ranges": 0}


def _check_ranges(settings: dict) -> None:
    if not 0 < settings.get("timeout", 10.0) < math.inf:  # (0 times every attempt out at once)
        raise ConfigError("plugin.push.timeout: must be > 0 (seconds)")
    for key, least in _AT_LEAST.items():
        if not least <= settings.get(key, least) < math.inf:  # (nan fails the test too)
            raise ConfigError(f"plugin.push.{key}: must be >= {least} (and finite)")
    backoff = settings.get("backoff", 1.0)
    if settings.get("max_backoff", 300.0) < backoff:
        raise ConfigError(f"plugin.push.max_backoff: must be >= plugin.push.backoff ({backoff})")


class PushPlugin(Plugin):
    name = "push"
    requires = ("notify",)

    def __init__(self, proxy):
        super().__init__(proxy)
        self.url = ""
        self.outbox = Outbox(10000)
        self.concurrency = 8
        self._starting = False  # _send_more is running
        self._building: dict[str, deque] = {}  # user -> [done, body] of its events being built, in order
        self._retries: dict[str, object] = {}  # user -> the timer of its first event's next attempt
        self._pool: HTTPConnectionPool | None = None
        self.stopped = False
        self.devices: dict[str, set[str]] = {}
        self.names: dict[str, dict[str, str]] = {}  # user -> device -> its ID "name" (recorded)
        self._subscribed = False
        self._agent = None
        self._modseqs: OrderedDict[tuple[str, str], int] = OrderedDict()  # last HIGHESTMODSEQ seen
        self._sent_ids: OrderedDict[str, None] = OrderedDict()  # ids of the last events queued
        # (user, mailbox, UIDVALIDITY) -> UIDs of new messages pushed lately (see _fresh_uids)
        self._new_uids: OrderedDict[tuple, SequenceSet] = OrderedDict()
        self._kinds: OrderedDict[tuple, str] = OrderedDict()  # (user, mailbox, UIDVALIDITY, UID) -> kind
        # (user, mailbox) -> (UIDVALIDITY, its UIDs, UIDNEXT) when last listed (see _expunged)
        self._listings: OrderedDict[tuple[str, str], tuple[int, SequenceSet, int]] = OrderedDict()
        self._listing_ranges = 0  # in all of them (bounded by max_listing_ranges)
        self.max_listing_ranges = _LISTING_RANGES_KEPT

    def configure(self, settings: dict) -> None:
        self._agent = None  # (made again with the trust root and timeout set here)
        self._drop_pool()
        for key, value in settings.items():
            if key not in _SETTINGS:
                raise unknown_key(key, list(_SETTINGS), "plugin.push.")
            if not has_type(value, _SETTINGS[key]):
                raise wrong_type(f"plugin.push.{key}", _SETTINGS[key], value)
        self.url = settings.get("url", "")
        if self.url:
            check_url(self.url)
        self.ca_file = settings.get("ca_file", "")
        self.timeout = settings.get("timeout", 10.0)
        self.max_queue = settings.get("max_queue", 10000)
        self.outbox.max_queue = self.max_queue
        self.concurrency = settings.get("concurrency", 8)
        self.max_devices = settings.get("max_devices", 100)  # recorded per user (each login reads them)
        self.max_retries = settings.get("max_retries", 10)
        self.backoff = settings.get("backoff", 1.0)
        self.max_backoff = settings.get("max_backoff", 300.0)
        self.offline_watch = settings.get("offline_watch", 86400.0)
        self.include_headers = settings.get("include_headers", [])
        self.max_listing_ranges = settings.get("max_listing_ranges", _LISTING_RANGES_KEPT)
        self._trim_listings()
        if not all(isinstance(h, str) and _HEADER_NAME.fullmatch(h) for h in self.include_headers):
            raise ConfigError("plugin.push.include_headers: expected header names, e.g. [\"From\", \"Subject\"]")
        if not 0 <= self.offline_watch < math.inf:
            raise ConfigError("plugin.push.offline_watch: expected seconds >= 0 (0: off)")
        _check_ranges(settings)
        if self.ca_file:
            self._trust = trust_from_file(self.ca_file, "plugin.push.ca_file")
        else:
            self._trust = None

    # -- wiring ---------------------------------------------------------------------------------

    def _metrics(self):
        m = self.proxy.metrics
        return (m.plugin_metric(Counter, "cpmproxy_push_sent", "Push events delivered"),
                m.plugin_metric(Counter, "cpmproxy_push_failed", "Push delivery attempts that failed"),
                m.plugin_metric(Counter, "cpmproxy_push_dropped", "Push events dropped (queue full, retries)"),
                m.plugin_metric(Gauge, "cpmproxy_push_queue", "Push events waiting"))

    def login(self, session):
        if not self.url:
            return None
        if not self._subscribed:
            self.proxy.events.subscribe(TOPIC, self._event)
            self._subscribed = True
        return defer.Deferred.fromCoroutine(self._record_device(session))

    async def _record_device(self, session) -> None:
        """Remember the user's devices (on the backend, so every proxy node knows them), each with the ID
        "name" it gave (its policy class may be matched on it: ``_targets``). Written only when the device
        is new (or its entries differ): any SETMETADATA raises INBOX's HIGHESTMODSEQ in Dovecot, which every
        watch of the user hears of, so writing it at every login costs the backend a write and every node a
        check of a change that is none (``_build``)."""
        key = device_key(session.device_id)
        value = session.device_id
        name = session.client_id.get("name") or ""
        reply = await session.side_command(b'GETMETADATA (DEPTH 1) "" (' + DEVICES.encode() + b" "
                                           + DEVICE_NAMES.encode() + b")")
        prefix, names_prefix = DEVICES.lower() + "/", DEVICE_NAMES.lower() + "/"
        entries: dict[str, str] = {}
        names: dict[str, str] = {}
        if reply.status == b"OK":
            for _, entry, raw in iter_metadata(reply.untagged):
                low = entry.lower()
                if low.startswith(prefix):
                    entries[low[len(prefix):]] = raw.decode("utf-8", "replace")
                elif low.startswith(names_prefix):
                    names[low[len(names_prefix):]] = raw.decode("utf-8", "replace")
        else:
            log.warn("reading the devices of {user} failed: {r}", user=session.user, r=reply.tagged[:200])
        if getattr(session, "phase", None) == "closed":
            # (The client left while the read was on the backend: its ``closed`` hook ran already, and
            # a list written now would be kept for good for a user who may have no session here.)
            return
        if reply.status == b"OK":
            self.names[session.user] = {v: names[k] for k, v in entries.items() if v and names.get(k)}
        if reply.status == b"OK" and (entries.get(key.lower()) != value or names.get(key.lower(), "") != name):
            entry = f"{DEVICES}/{key}".encode()
            if len(entries) >= self.max_devices and key.lower() not in entries:
                log.warn("device {device} of {user} not recorded: the user has {n} devices recorded already "
                         "([plugin.push] max_devices)", device=session.device_id, user=session.user, n=len(entries))
                self.devices[session.user] = {v for v in entries.values() if v}
                return
            # (A quoted string, or a literal+ for 8-bit text: ID values have no control characters.)
            named = f"{DEVICE_NAMES}/{key}".encode() + b" " + (quote(name, non_sync=True) if name else b"NIL")
            written = await session.side_command(b'SETMETADATA "" (' + entry + b" "
                                                 + quote(value, non_sync=True) + b" " + named + b")")
            if written.status != b"OK":
                log.warn("recording device {device} of {user} failed: {r}", device=session.device_id,
                         user=session.user, r=written.tagged[:200])
            if getattr(session, "phase", None) == "closed":  # (as above)
                self.closed(session)
                return
        if reply.status == b"OK":
            known = {v for v in entries.values() if v}
        else:
            known = self.devices.get(session.user, set())
        self.devices[session.user] = known | {session.device_id}
        if name:
            self.names.setdefault(session.user, {})[session.device_id] = name
        else:
            self.names.get(session.user, {}).pop(session.device_id, None)
        notify = self.peer("notify")
        if notify is not None:  # (a device known only now may want its pushes: the watch armed for them)
            notify.refresh_watch(session.user)

    def closed(self, session) -> None:
        """A user with no session here and no offline watch (notify decided in its own ``closed``,
        before this one) needs no devices list: read again at the next login (it grew for good)."""
        user = session.user
        if user and not self.proxy.sessions_of(user):
            notify = self.peer("notify")
            watch = notify.watches.get(user) if notify is not None else None
            if watch is None or not watch.offline:
                self.devices.pop(user, None)
                self.names.pop(user, None)

    def offline_ended(self, user: str) -> None:
        """The user's offline watch expired (notify)."""
        if not self.proxy.sessions_of(user):
            self.devices.pop(user, None)
            self.names.pop(user, None)

    def watch_offline(self, user: str) -> float:
        """Asked by the notify plugin when the user's last session here ends (see the module doc)."""
        return self.offline_watch if self.url and self.devices.get(user) else 0.0

    def reloaded(self) -> None:
        if not self.url:  # push turned off: nothing more is built, nothing queued is sent
            if self._subscribed:
                self.proxy.events.unsubscribe(TOPIC, self._event)
                self._subscribed = False
            self.outbox.clear()
            for user in list(self._retries):
                self._cancel_retry(user)
            self._drop_pool()
        else:
            self._send_more()  # (a larger concurrency takes effect at once)

    def drain(self):
        """At a stop: fires once every queued event went out (or was given up), polled: sending goes on as
        usual meanwhile."""
        if not len(self.outbox):
            return None
        done = defer.Deferred()

        def check():
            if len(self.outbox) and not self.stopped:
                reactor.callLater(0.05, check)
            elif not done.called:
                done.callback(None)
        check()
        return done

    def stop(self) -> None:
        if len(self.outbox) and not self.stopped:
            # (Not lost in silence: counted and said; the devices' next sync still finds the changes.)
            self._metrics()[2].inc(len(self.outbox))
            log.warn("push: {n} events not sent at the stop (dropped)", n=len(self.outbox))
            self.outbox.clear()
        self.stopped = True
        if self._subscribed:
            self.proxy.events.unsubscribe(TOPIC, self._event)
            self._subscribed = False
        for user in list(self._retries):
            self._cancel_retry(user)
        self._drop_pool()

    # -- events ---------------------------------------------------------------------------------

    def _event(self, event: ChangeEvent) -> None:
        since = self._seen_modseq(event)
        sessions = self.proxy.sessions_of(event.user)
        notify = self.peer("notify")
        if notify is None or event.event == "MetadataChange":
            return
        targets = self._targets(event.user, sessions, event.mailbox)
        if not targets:
            return
        watch = notify.watches.get(event.user)
        if event.origin is not None and not event.uids and watch is not None and watch.reporting():
            return  # (the watch reports this change in a moment, named by its HIGHESTMODSEQ: pushed then)
        if event.event == "MessageNew" and event.uids:
            fresh = self._fresh_uids(event)
            if not fresh:
                return
            if len(fresh) < len(event.uids):
                event = dataclasses.replace(event, uids=fresh)
        # A user's events are queued in the order they happened, whichever build finishes first (a new
        # message's kinds are asked of the backend; the expunge after it needs nothing).
        slot = [False, None]
        self._building.setdefault(event.user, deque()).append(slot)
        d = defer.Deferred.fromCoroutine(self._build(next(iter(sessions), None), event, targets, since))
        d.addErrback(lambda f: log.failure("building a push event failed", f))
        d.addCallback(self._built, event.user, slot)

    def _account_state(self, user: str, sessions=None):
        """The user's account-wide preferences as last read here (a policy state): a session's, or without
        one the offline watch's. None: not known (nothing is pushed)."""
        for session in self.proxy.sessions_of(user) if sessions is None else sessions:
            st = session.state.get("policy")
            if st is not None and st.login_entries is not None:  # (its login read them)
                return st
        notify = self.peer("notify")
        watch = notify.watches.get(user) if notify is not None else None
        return watch.offline_state if watch is not None else None

    def _targets(self, user: str, sessions, mailbox: str | None) -> list:
        """The devices a change may be pushed to, each with its policy state: the user's known devices with
        no session here whose notifications are enabled (their policy, matched as at login, with the ID
        "name" recorded at their last login, and the user's preference where that policy lets it decide),
        and, for a ``mailbox``, whose policy's folder patterns take it in (the rest of what hides a
        folder, preferences and Session Histories, needs the backend: ``_build``)."""
        policy, notify = self.peer("policy"), self.peer("notify")
        account = self._account_state(user, sessions)
        if policy is None or notify is None or account is None:
            return []
        connected = {s.device_id for s in sessions}
        names = self.names.get(user, {})
        targets = []
        for device in sorted(self.devices.get(user, set()) - connected):
            st = policy.device_state(user, device, names.get(device, ""), account)
            if notify.enabled_in(st) and (mailbox is None or st.policy.folder_allowed(mailbox)):
                targets.append((device, st))
        return targets

    def wants_events(self, user: str) -> bool:
        """Asked by the notify plugin: does a device of the user that is not connected want pushes? (Its
        watch is armed for them, even while the user's connected devices have notifications off.)"""
        return bool(self.url) and not self.stopped and bool(self._targets(user, self.proxy.sessions_of(user), None))

    def _built(self, bodies: list | None, user: str, slot: list) -> None:
        slot[:] = [True, bodies]
        slots = self._building.get(user)
        while slots and slots[0][0]:
            for body in slots.popleft()[1] or ():
                self._enqueue(body)
        if slots is not None and not slots:
            del self._building[user]

    def _fresh_uids(self, event: ChangeEvent) -> tuple[int, ...]:
        """The new messages of ``event`` not pushed yet from here. APPENDs through this process are pushed
        one by one at their OK; the watch then reports a burst of them as one change, whose id (its UIDs)
        is another: taken by the id alone, they were pushed twice (the ops review: 48 POSTs for 40
        APPENDs). Kept per mailbox as ranges (new UIDs ascend), the lowest forgotten first."""
        key = (event.user, event.mailbox, event.uidvalidity)
        known = self._new_uids.pop(key, SequenceSet.empty())
        fresh = tuple(u for u in event.uids if u not in known)
        known = known | SequenceSet.from_iterable(fresh)
        if len(known.ranges) > _NEW_RANGES_KEPT:
            known = SequenceSet.from_ranges(known.ranges[-_NEW_RANGES_KEPT:])
        self._new_uids[key] = known
        while len(self._new_uids) > _MODSEQS_KEPT:
            self._new_uids.popitem(last=False)
        return fresh

    def _seen_modseq(self, event: ChangeEvent) -> int | None:
        """For a change the watch saw on the backend without new UIDs (a flag change: it knows only that
        the mailbox's HIGHESTMODSEQ moved; Dovecot's STATUS may also carry an unchanged UIDNEXT, which
        the watch reports as a MessageNew without UIDs): the MODSEQ from which a message must have
        changed for it to be one.
        Dovecot also raises HIGHESTMODSEQ for METADATA written on the mailbox (server metadata on
        INBOX: a preference on "", a device's record, local-delete bookkeeping), which changes no
        message and must not wake anyone. None: not such an event."""
        if event.modseq is None:
            return None
        key = (event.user, event.mailbox)
        prev = self._modseqs.pop(key, None)
        self._modseqs[key] = event.modseq
        while len(self._modseqs) > _MODSEQS_KEPT:
            self._modseqs.popitem(last=False)
        if event.origin is not None or event.uids or event.event not in ("FlagChange", "MessageNew"):
            return None  # (a change made through this process, or one with its new UIDs: a real one)
        # Changes since the last one seen here; the first time, the last change only (a message whose
        # MODSEQ is the new HIGHESTMODSEQ).
        return prev + 1 if prev is not None and prev < event.modseq else event.modseq

    async def _build(self, session, event: ChangeEvent, targets: list, since: int | None = None) -> list[dict]:
        """The events to POST for a change: one per distinct view of it among ``targets`` (device, policy
        state), each naming the devices that see it so. A device that cannot see the mailbox (folder
        preferences, a Session History it does not synchronize) is left out; of new messages, each device
        is told only those it sees (a kind, size or age its policy or preferences hide is not told). None
        left: nothing is sent."""
        policy = self.peer("policy")
        states = [st for _, st in targets]
        # (A new message may be the session info that makes its folder a Session History: asked anew.)
        recent_ok = not event.uids
        known = policy.folder_facts_known(event.user, states, event.mailbox, recent_ok)
        if since is None and not event.uids and known and not self._by_kind(event, states):
            looked = await self._look(None, event, None, states)  # (nothing to ask the backend)
        else:
            try:
                looked = await self._on_backend(session, event.user,
                                                lambda run: self._look(run, event, since, states))
            except Exception as e:  # (no connection: what needs none still goes out)
                log.warn("push: the backend could not be asked about a change: {e}", e=e)
                looked = await self._look(None, event, None, states, known)
        if looked is None:
            return []
        inspected: _Inspected = looked
        if inspected.event is not None:
            event = dataclasses.replace(event, event=inspected.event)
        views: dict[tuple[int, ...], list[str]] = {}
        for device, st in targets:
            if policy.folder_hidden(st, event.mailbox):
                continue
            uids = self._visible(policy, st, event, inspected)
            if event.uids and not uids:
                continue
            if inspected.changed and not self._visible(policy, st, dataclasses.replace(event, uids=inspected.changed),
                                                        inspected):
                continue  # (flags changed only on messages this device does not see)
            if inspected.expunged and set(inspected.expunged.values()) <= set(policy.hidden_kinds(st, event.mailbox)):
                continue  # (every message it took is of a kind this device does not see)
            views.setdefault(uids, []).append(device)
        bodies = []
        for uids, devices in views.items():
            view = dataclasses.replace(event, uids=uids)
            body = {"id": change_id(view),
                    "user": event.user, "mailbox": event.mailbox, "event": event.event,
                    "uidvalidity": event.uidvalidity, "uids": list(uids), "devices": devices,
                    "time": time.time()}
            if uids:
                body["kinds"] = {str(u): inspected.kinds[u] for u in uids if u in inspected.kinds}
                if self.include_headers:
                    body["headers"] = {str(u): inspected.headers[u] for u in uids if u in inspected.headers}
            bodies.append(body)
        return bodies

    def _by_kind(self, event: ChangeEvent, states: list) -> bool:
        """Is ``event`` an expunge that a device may not see (its view hides a kind in that folder)?"""
        policy = self.peer("policy")
        return event.event == "MessageExpunge" and any(policy.hidden_kinds(st, event.mailbox) for st in states)

    def _may_hide(self, st, mailbox: str) -> bool:
        """Can the device of ``st`` have messages of ``mailbox`` hidden (a kind, a size, an age)?"""
        return bool(self.peer("policy").hidden_kinds(st, mailbox) or st.policy.max_size or st.policy.max_age_days)

    @staticmethod
    def _visible(policy, st, event: ChangeEvent, inspected) -> tuple[int, ...]:
        """The UIDs of ``event`` in the device's view: not of a kind it does not synchronize in that
        folder, nor larger or older than its policy's limits (as a SELECT's view hides them). Not known
        (the backend could not be asked): none, where anything may be hidden."""
        kinds = policy.hidden_kinds(st, event.mailbox)
        max_size, max_age = st.policy.max_size, st.policy.max_age_days
        if not event.uids or not (kinds or max_size or max_age):
            return event.uids
        if not inspected.known:
            return ()
        hidden = set()
        if kinds:
            hidden.update(u for u in event.uids if inspected.kinds.get(u, "other") in kinds)
        if max_size:
            hidden |= inspected.larger.get(max_size, set())
        if max_age:
            hidden |= inspected.older.get(max_age, set())
        return tuple(u for u in event.uids if u not in hidden)

    async def _look(self, run, event: ChangeEvent, since: int | None, states: list, known: bool = True):
        """What the backend says of a change (``run``: a command runner free to EXAMINE; None: no
        connection): False if it changed no message (``since``: see ``_seen_modseq``); else the new
        messages' kinds and sizes (``_Inspected``, None if unknown), with the folder's facts put in every
        state (its preferences, whether it is a Session History). An event whose folder facts cannot be read
        is dropped, as a notification about a folder is (``_hold_for_folder``): taken as "no preferences",
        it would name a folder a device's user hid."""
        changed: tuple[int, ...] = ()
        expunge = False
        if run is not None and since is not None:
            try:
                changed = await _changed_since(run, event, since)
            except Exception as e:  # cannot tell: the event goes out
                log.warn("checking a flag change failed: {e}", e=e)
            else:
                if not changed and not event.coarse:
                    return None  # metadata only: no message changed
                # (A watch that kept nothing of the folder cannot tell an expunge, which leaves no MODSEQ
                # behind, from a metadata write: told as an expunge, never dropped.)
                expunge = not changed
        info = FolderInfo()
        if run is None and not known:
            log.warn("push: folder {mailbox!r} of {user} unreadable, its event dropped", mailbox=event.mailbox,
                     user=event.user)
            return None
        try:
            await self.peer("policy").read_folder_facts(run, event.user, states, {event.mailbox: info}, _nothing,
                                                        recent_ok=not event.uids)
        except Exception as e:
            log.warn("push: folder {mailbox!r} of {user} unreadable, its event dropped: {e}",
                     mailbox=event.mailbox, user=event.user, e=e)
            return None
        for st in states:
            st.folders[event.mailbox] = info
        if expunge:
            return _Inspected(event="MessageExpunge")
        if run is not None and self._by_kind(event, states):
            try:
                return _Inspected(expunged=await self._expunged(run, event))
            except Exception as e:  # (not known: it goes to every device that sees the folder)
                log.warn("push: finding the expunged messages failed: {e}", e=e)
                return _Inspected()
        if not event.uids:
            if changed and len(changed) <= _CHANGED_INSPECTED and any(self._may_hide(st, event.mailbox)
                                                                      for st in states):
                # The messages whose flags changed, classified as new ones are: a device that sees none
                # of them is not woken (an IMDN marked read, where IMDNs are hidden from it).
                try:
                    found = await self._inspect_on(run, dataclasses.replace(event, uids=changed),
                                                   {st.policy.max_size for st in states} - {0},
                                                   {st.policy.max_age_days for st in states} - {0},
                                                   headers=False)  # (the event names none of them)
                except MailboxReplaced as e:
                    # (The messages whose flags changed went with the folder; those found are another
                    # folder's: dropped as a new message's event is, below.)
                    log.info("push: flag change of a folder replaced since dropped: {e}", e=e)
                    return None
                except Exception as e:  # (not known: it goes to every device that sees the folder)
                    log.warn("classifying changed messages failed: {e}", e=e)
                else:
                    found.changed = changed
                    self._remember_kinds(event, found.kinds)
                    return found
            return _Inspected()
        if run is None:
            return _Inspected(known=False)
        try:
            found = await self._inspect_on(run, event, {st.policy.max_size for st in states} - {0},
                                           {st.policy.max_age_days for st in states} - {0})
        except MailboxReplaced as e:
            # Deleted and made again since: the event's new messages are gone with the folder it was of
            # (what has their UIDs now is another's: classified, its kind and header fields went out as
            # theirs). Dropped, as an event of a folder that cannot be read is.
            log.info("push: event of a folder replaced since dropped: {e}", e=e)
            return None
        except Exception as e:  # the event still goes out, without them (and not to devices that may hide some)
            log.warn("classifying pushed messages failed: {e}", e=e)
            return _Inspected(known=False)
        self._remember_kinds(event, found.kinds)
        return found

    def _remember_kinds(self, event: ChangeEvent, kinds: dict[int, str]) -> None:
        """Keep the kinds of classified messages: once expunged, they can no longer be asked."""
        if event.uidvalidity is None:
            return
        for uid, kind in kinds.items():
            key = (event.user, event.mailbox, event.uidvalidity, uid)
            self._kinds.pop(key, None)
            self._kinds[key] = kind
        while len(self._kinds) > _KINDS_KEPT:
            self._kinds.popitem(last=False)

    async def _expunged(self, run, event: ChangeEvent) -> dict[int, str | None] | None:
        """The messages an expunge took, with their kinds where known (None: unknown), or None if it
        cannot be told. The folder's UIDs are listed now and compared with the listing of its previous
        expunge: every message gone since (or arrived since and gone) is in one such comparison, so a
        device left out of one for the kinds it hides is woken by the one that holds a message it saw.
        The first expunge seen of a folder (since the start, or since its listing was forgotten) has
        nothing to compare with."""
        uidvalidity, now, uidnext = await _listing(run, event.mailbox)
        key = (event.user, event.mailbox)
        before = self._listings.pop(key, None)
        if before is not None:
            self._listing_ranges -= len(before[1].ranges)
        if self.max_listing_ranges and len(now.ranges) <= min(_LISTING_RANGES, self.max_listing_ranges):
            self._listings[key] = (uidvalidity, now, uidnext)
            self._listing_ranges += len(now.ranges)
            self._trim_listings()
        if before is None or before[0] != uidvalidity:
            return None
        _, then, then_next = before
        gone = then - now
        if uidnext > then_next:
            gone = gone | (SequenceSet.from_ranges([(then_next, uidnext - 1)]) - now)
        if not gone or len(gone) > _KINDS_KEPT:
            return None
        cache = self.peer("policy").cache.peek(event.user, event.mailbox, uidvalidity)
        out: dict[int, str | None] = {}
        for uid in gone:
            kind = self._kinds.get((event.user, event.mailbox, uidvalidity, uid))
            if kind is None and cache is not None:
                kind = next((k for k, uids in cache.kinds.items() if uid in uids), None)
            out[uid] = kind
        return out

    def _trim_listings(self) -> None:
        """The oldest listings go past ``_LISTINGS_KEPT`` folders or ``max_listing_ranges`` UID ranges."""
        while self._listings and (len(self._listings) > _LISTINGS_KEPT
                                  or self._listing_ranges > self.max_listing_ranges):
            self._listing_ranges -= len(self._listings.popitem(last=False)[1][1].ranges)

    async def _on_backend(self, session, user: str, work):
        """``await work(run)`` with ``run`` a command runner on a connection free to EXAMINE: the
        session's side connection, or without a session of the user here (offline watch) a short
        master-user connection of its own."""
        if session is not None:
            async with side_examine(session):
                return await work(session.side_command)
        proto = await self.peer("notify").open_master(user, "push")
        try:
            return await work(proto.command)
        finally:
            # The server closes the connection after its BYE: the LOGOUT's own answer may never come.
            proto.command(b"LOGOUT").addErrback(lambda _: None)
            proto.transport.loseConnection()

    async def _inspect_on(self, run, event: ChangeEvent, sizes: set[int], ages: set[int],
                          headers: bool = True) -> _Inspected:
        """Kinds (and, with ``headers``, the configured header fields) of the event's messages, and which
        of them are larger than each of ``sizes`` (bytes) or older than each of ``ages`` (days):
        server-side searches, pipelined."""
        # (EXAMINEs the mailbox: the event's, or its messages are gone and others have their UIDs)
        kinds = await classify(run, event.mailbox, event.uids, event.uidvalidity)
        uidset = SequenceSet.from_iterable(event.uids).format()
        larger = {n: run(b"UID SEARCH RETURN (ALL) UID " + uidset + b" LARGER %d" % n) for n in sizes}
        older = {n: run(b"UID SEARCH RETURN (ALL) UID " + uidset + b" OLDER %d" % (n * 86400)) for n in ages}
        found = _Inspected(kinds=kinds)
        for n, d in larger.items():
            found.larger[n] = set(esearch_all(await d))
        for n, d in older.items():
            found.older[n] = set(esearch_all(await d))
        if headers and self.include_headers:
            fields = " ".join(self.include_headers).encode()
            reply = await run(b"UID FETCH " + uidset + b" (UID BODY.PEEK[HEADER.FIELDS (" + fields + b")])")
            for line in reply.untagged:
                m = _FETCHED_HEADERS.search(line)
                if m is None:
                    continue
                raw = line[m.end():m.end() + int(m.group(2))]
                msg = BytesParser(policy=email.policy.default).parsebytes(raw, headersonly=True)
                found.headers[int(m.group(1))] = {k: str(v) for k, v in msg.items()}
        return found

    def _enqueue(self, body: dict | None) -> None:
        if body is None or not self.url or self.stopped:
            return  # (nothing, or built after push was turned off)
        # The same change twice (made through this process, then seen by the watch): pushed once.
        if body["id"] in self._sent_ids:
            return
        self._sent_ids[body["id"]] = None
        while len(self._sent_ids) > _IDS_KEPT:
            self._sent_ids.popitem(last=False)
        sent, failed, dropped, queued = self._metrics()
        overflow = self.outbox.add(body["user"], body)
        if overflow:
            dropped.inc(overflow)
            log.warn("push queue full ([plugin.push] max_queue = {n}): an event dropped", n=self.max_queue)
        self._send_more()

    def _send_more(self) -> None:
        """Start POSTs while fewer than ``concurrency`` are out and an event may go."""
        if self._starting:
            return  # (an attempt that failed at once, inside the loop below: the loop goes on)
        self._starting = True
        try:
            outbox = self.outbox
            while len(outbox.in_flight) < self.concurrency and not self.stopped:
                item = outbox.next()
                if item is None:
                    break
                self._send(*item)
        finally:
            self._starting = False
        self._metrics()[3].set(len(self.outbox))

    def _send(self, user: str, entry: Entry) -> None:
        sent, failed, dropped, queued = self._metrics()
        # (an exception raised at once, e.g. by the Agent for a URL it cannot use, is a failed attempt
        # like any other: retried, then dropped; the user's events never stall with one left out)
        d = defer.maybeDeferred(self._post, entry.body)
        # A kept-open connection the gateway closed meanwhile (an HTTP/1.0 gateway closes after every
        # answer, others after their keep-alive time) fails the POST before any answer: sent again at
        # once on a fresh one, as Twisted does for idempotent requests (ours are: the id lets the
        # gateway drop a copy). Failed every other event, each then waited for its backoff.
        d.addErrback(lambda f: f.trap(ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)
                     and self._post(entry.body))

        def done(response):
            # The status line decides: the body is read only to free the connection, and one a gateway
            # ends by closing (HTTP/1.0 without Content-Length) fails as a PartialDownloadError although
            # the event was taken (it was sent again and again).
            return _drain(response).addBoth(lambda _: response)

        def answered(response):
            code = response.code
            if 200 <= code < 300:
                sent.inc()
                self.outbox.sent(user, entry)
            elif code in _RETRIED_CODES or code >= 500:
                failed_attempt(f"HTTP {code}", _retry_after(response))
            else:  # (the same event would be refused again: a 400 for its body, a 404 for the URL)
                failed.inc()
                dropped.inc()
                log.warn("push refused by the gateway (HTTP {code}): event dropped", code=code)
                self.outbox.drop(user, entry)
            self._send_more()

        def failed_attempt(reason: str, wait: float = 0.0) -> None:
            failed.inc()
            if self.stopped:
                return
            if entry.attempts + 1 > self.max_retries:
                dropped.inc()
                log.warn("push dropped after {n} attempts: {reason}", n=entry.attempts + 1, reason=reason)
                self.outbox.drop(user, entry)
            elif self.outbox.retry_later(user, entry):
                delay = min(max(self.backoff * 2.0 ** min(entry.attempts - 1, 64), wait), self.max_backoff)
                self._cancel_retry(user)
                self._retries[user] = reactor.callLater(delay, self._due, user)
            self._send_more()

        d.addCallback(done)
        d.addTimeout(self.timeout, reactor)  # (the whole attempt: a body that stalls too)
        d.addCallbacks(answered, lambda f: failed_attempt(f.getErrorMessage()))
        d.addErrback(lambda f: log.failure("push sender failed", f))

    def _due(self, user: str) -> None:
        self._retries.pop(user, None)
        self.outbox.due(user)
        self._send_more()

    def _cancel_retry(self, user: str) -> None:
        call = self._retries.pop(user, None)
        if call is not None and call.active():
            call.cancel()

    def _post(self, body: dict) -> defer.Deferred:
        if self._agent is None:
            policy = BrowserLikePolicyForHTTPS(trustRoot=self._trust) if self._trust else BrowserLikePolicyForHTTPS()
            # Persistent connections: a TLS handshake per event would cost the gateway more than the event.
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = self.concurrency
            self._agent = Agent(reactor, contextFactory=policy, connectTimeout=self.timeout, pool=self._pool)
        data = json.dumps(body).encode()
        return self._agent.request(b"POST", self.url.encode(),
                                   Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"cpmproxy"]}),
                                   FileBodyProducer(BytesIO(data)))

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.closeCachedConnections()
            self._pool = None


@dataclasses.dataclass
class _Inspected:
    """What the backend said of a change's new messages (``known`` False: it could not be asked)."""
    known: bool = True
    kinds: dict[int, str] = dataclasses.field(default_factory=dict)
    headers: dict[int, dict[str, str]] = dataclasses.field(default_factory=dict)
    larger: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # max_size -> UIDs larger
    older: dict[int, set[int]] = dataclasses.field(default_factory=dict)  # max_age_days -> UIDs older
    changed: tuple[int, ...] = ()  # a change without new messages: the messages whose flags changed
    expunged: dict[int, str | None] | None = None  # an expunge: the messages it took, their kinds if known
    event: str | None = None  # what the change was found to be, where its event could not say (``coarse``)


def _nothing():
    """The context EXAMINEs run in on a connection ``_on_backend`` gave (free to EXAMINE already)."""
    return contextlib.nullcontext()


class _Discard(Protocol):
    def __init__(self, done: defer.Deferred) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if not self.done.called:  # (cancelled: the attempt timed out)
            self.done.callback(None)


def _drain(response) -> defer.Deferred:
    """Read the answer's body to its end (and throw it away), so that its connection can serve the next.
    Cancelled (the attempt's timeout), the connection is closed: a body that never ends holds nothing."""
    def cancel(_):
        transport = getattr(response, "_transport", None)  # (as Twisted's readBody does)
        close = getattr(transport, "abortConnection", None) or getattr(transport, "loseConnection", None)
        if close is not None:
            close()
    done = defer.Deferred(cancel)
    response.deliverBody(_Discard(done))
    return done


def _retry_after(response) -> float:
    """The seconds of a ``Retry-After: N`` header (429, 503), else 0 (an HTTP-date is not read)."""
    for value in response.headers.getRawHeaders(b"retry-after") or ():
        if value.strip().isdigit():
            return float(value.strip())
    return 0.0


async def _changed_since(run, event: ChangeEvent, since: int) -> tuple[int, ...]:
    """The UIDs of the event's mailbox whose MODSEQ is ``since`` or more (EXAMINEs the mailbox)."""
    examined = run(b"EXAMINE " + wire_name(event.mailbox))
    found = run(b"UID SEARCH RETURN (ALL) MODSEQ %d" % since)  # (pipelined; fails if the EXAMINE did)
    await examined
    return tuple(esearch_all(await found))


async def _listing(run, mailbox: str) -> tuple[int, SequenceSet, int]:
    """(UIDVALIDITY, UIDs, UIDNEXT) of ``mailbox`` now (EXAMINEs it; one round trip)."""
    examined = run(b"EXAMINE " + wire_name(mailbox))
    found = run(b"UID SEARCH RETURN (ALL) ALL")  # (pipelined; fails if the EXAMINE did)
    reply = await examined
    codes = {}
    for line in reply.untagged:
        m = _RESPONSE_CODE_NUMBER.match(line)
        if m:
            codes[m.group(1).upper()] = int(m.group(2))
    ranges = _esearch_ranges(await found)
    if b"UIDVALIDITY" not in codes or b"UIDNEXT" not in codes:
        raise ValueError(f"EXAMINE {mailbox!r} told no UIDVALIDITY or UIDNEXT")
    return codes[b"UIDVALIDITY"], SequenceSet.from_canonical(ranges), codes[b"UIDNEXT"]


def change_id(event: ChangeEvent) -> str:
    """What identifies a change, the same wherever it was seen: new messages by their UIDs (a change made
    through a proxy process knows no HIGHESTMODSEQ, the watch of another one does); anything else by the
    HIGHESTMODSEQ it led to. A change known by neither (a STORE through a proxy process without a watch)
    gets an id of its own: two such changes are two pushes."""
    if not event.uids and event.modseq is None:
        return uuid.uuid4().hex
    change = [event.user, event.mailbox, event.event, event.uidvalidity, list(event.uids),
              None if event.uids else event.modseq]
    return hashlib.sha256(json.dumps(change).encode()).hexdigest()[:32]


def check_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is an http(s) URL the sender can use (Twisted's Agent raises at
    request time for a missing host or a port that is no number)."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # (e.g. an unclosed IPv6 bracket)
        raise ConfigError(f"plugin.push.url: not a URL: {e}") from None
    try:
        port = parts.port
    except ValueError:  # (not a number, or out of range)
        port = 0
    if parts.scheme not in ("http", "https"):
        raise ConfigError("plugin.push.url: must be an http(s) URL")
    if not parts.hostname:
        raise ConfigError("plugin.push.url: no host")
    if port == 0:
        given = parts.netloc.rpartition(":")[2]
        raise ConfigError(f"plugin.push.url: the port must be a number from 1 to 65535, not {given!r}")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in url):
        raise ConfigError("plugin.push.url: spaces, control or non-ASCII characters (percent-encode them)")
    if "@" in parts.netloc:
        raise ConfigError("plugin.push.url: no user or password in the URL (the sender cannot use them)")
