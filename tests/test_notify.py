"""CPM notifications: all of a user's devices hear of every change, once the user enabled it.

Real Dovecot, several devices, two proxy processes, a real HTTPS push receiver."""

from __future__ import annotations

import http.server
import json
import os
import select
import signal
import socket
import ssl
import threading
import time
import urllib.request
import uuid

import pytest

from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object
from plugins.wire import list_name
from tests.proxyfix import raw_via, send_with_literal, server_flags

PREF = b"/private/vendor/vendor.cpmproxy/notifications"


def device(p, name: str, user: str = "alice") -> RawIMAP:
    c = raw_via(p)
    c.command(b"i", b'ID ("name" "test" "x-cpm-device-id" "%s")' % name.encode())
    assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
    return c


def set_pref(c: RawIMAP, value: bytes) -> None:
    r = c.command(b"p", b'SETMETADATA "" (' + PREF + b" " + value + b")")
    assert r[-1].startswith(b"p OK"), r


def idle(c: RawIMAP) -> None:
    c.command(b"s", b"SELECT INBOX")
    c.send(b"t IDLE\r\n")
    assert c.read_line().startswith(b"+")


def lines_within(c: RawIMAP, seconds: float) -> list[bytes]:
    """Whatever the proxy sends within ``seconds`` (no command running: only injections)."""
    out = []
    deadline = time.monotonic() + seconds
    while True:
        while b"\n" in c.buf:
            out.append(c.read_line())
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        ready, _, _ = select.select([c.sock], [], [], left)
        if ready and not c._fill():
            return out


def wait_status(c: RawIMAP, folder: str, seconds: float = 8) -> bytes | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in lines_within(c, 0.2):
            if line.startswith(b"* STATUS ") and folder.encode() in line:
                return line
    return None


def new_folder(dovecot, user="alice") -> str:
    folder = "Default/tel:+1999" + uuid.uuid4().hex[:6]
    dovecot.deliver(user, folder, make_object("chat"))
    return folder


def append(c: RawIMAP, folder: str, msg: bytes) -> None:
    r = c.command(b"a", b'APPEND "%s" {%d+}\r\n%s' % (folder.encode(), len(msg), msg))
    assert r[-1].startswith(b"a OK"), r


def test_idle_device_hears_of_changes_through_proxy_and_direct(make_proxy, dovecot):
    folder = new_folder(dovecot)
    p = make_proxy()
    b = device(p, "B")
    set_pref(b, b'"on"')
    a = device(p, "A")
    try:
        idle(b)
        append(a, folder, make_object("chat", text="via proxy"))
        line = wait_status(b, folder, 3)
        assert line is not None and b"MESSAGES 2" in line, line
        dovecot.deliver("alice", folder, make_object("chat", text="direct"))
        line = wait_status(b, folder)
        assert line is not None and b"MESSAGES 3" in line, line
        b.send(b"DONE\r\n")
        assert b.until_tagged(b"t")[-1].startswith(b"t OK")
    finally:
        set_pref(a, b"NIL")
        a.close()
        b.close()


def test_preference_off_means_no_injected_notifications(make_proxy, dovecot):
    folder = new_folder(dovecot)
    p = make_proxy()
    b = device(p, "B")
    a = device(p, "A")
    set_pref(b, b'"off"')
    idle(b)
    append(a, folder, make_object("chat"))
    assert wait_status(b, folder, 2) is None
    b.send(b"DONE\r\n")
    b.until_tagged(b"t")
    set_pref(a, b'"on"')  # another device turns it on: takes effect in b's open session
    b.send(b"t IDLE\r\n")
    assert b.read_line().startswith(b"+")
    append(a, folder, make_object("chat"))
    assert wait_status(b, folder, 3) is not None
    set_pref(a, b"NIL")
    a.close()
    b.close()


def test_policy_forced_and_off(make_proxy, dovecot):
    folder = new_folder(dovecot)
    forced = make_proxy(config_extra='[policy]\nnotifications = "forced"\n')
    b = device(forced, "B")
    a = device(forced, "A")
    idle(b)  # preference unset (off by default), but the provider forces notifications
    append(a, folder, make_object("chat"))
    assert wait_status(b, folder, 3) is not None
    a.close()
    b.close()
    off = make_proxy(config_extra='[policy]\nnotifications = "off"\n')
    b = device(off, "B")
    assert b"NOTIFY" not in b.command(b"c", b"CAPABILITY")[0].split()
    r = b.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge))")
    assert r[-1].startswith(b"n NO [CANNOT]")
    set_pref(b, b'"on"')
    a = device(off, "A")
    idle(b)
    append(a, folder, make_object("chat"))
    assert wait_status(b, folder, 2) is None
    set_pref(a, b"NIL")
    a.close()
    b.close()


def test_hidden_folder_never_announced(make_proxy, dovecot):
    hidden = "Secret/" + uuid.uuid4().hex[:6]
    dovecot.deliver("alice", hidden, make_object("chat"))
    p = make_proxy(config_extra='[policy]\nexclude_folders = ["Secret/*"]\nnotifications = "forced"\n')
    b = device(p, "B")
    idle(b)
    dovecot.deliver("alice", hidden, make_object("chat"))
    assert not any(hidden.encode() in line for line in lines_within(b, 3))
    b.close()


def test_cross_process_delivery(make_proxy, dovecot):
    folder = new_folder(dovecot)
    p1 = make_proxy(config_extra='[policy]\nnotifications = "forced"\n')
    p2 = make_proxy(config_extra='[policy]\nnotifications = "forced"\n')
    b = device(p2, "B")
    a = device(p1, "A")
    idle(b)
    append(a, folder, make_object("chat"))
    line = wait_status(b, folder)
    assert line is not None and b"MESSAGES 2" in line
    a.close()
    b.close()


def test_users_never_cross(make_proxy, dovecot):
    folder = new_folder(dovecot, "alice")
    p = make_proxy(config_extra='[policy]\nnotifications = "forced"\n')
    bob = device(p, "bob-phone", "bob")
    a = device(p, "A")
    idle(bob)
    append(a, folder, make_object("chat"))
    dovecot.deliver("alice", folder, make_object("chat"))
    got = lines_within(bob, 2.5)
    assert not any(b"STATUS" in line for line in got), got
    a.close()
    bob.close()


def test_unchanged_mailboxes_are_not_announced(make_proxy, dovecot):
    """Dovecot re-announces mailboxes whose list index entry it has just refreshed (here: created a
    moment before the watch arms its NOTIFY) with nothing changed: no notification for those."""
    tag = uuid.uuid4().hex[:6]
    c = dovecot.imap_direct("bob", tls="none")
    try:
        for i in range(5):
            c.create_folder(f"Fresh-{tag}/f{i}")
    finally:
        c.logout()
    p = make_proxy(config_extra='[policy]\nnotifications = "forced"\n')
    bob = device(p, "bob-phone", "bob")
    idle(bob)
    got = lines_within(bob, 2.5)
    assert not any(b"STATUS" in line for line in got), got
    dovecot.deliver("bob", f"Fresh-{tag}/f3", make_object("chat"))  # a real change still is
    assert wait_status(bob, f"Fresh-{tag}/f3") is not None
    bob.close()


def test_client_notify_with_metadata_events(make_proxy):
    p = make_proxy()
    b = device(p, "B")
    r = b.command(b"n", b"NOTIFY SET STATUS (selected (MessageNew MessageExpunge)) "
                        b"(personal (MessageNew MessageExpunge MailboxMetadataChange ServerMetadataChange))")
    assert r[-1].startswith(b"n OK"), r
    a = device(p, "A")
    set_pref(a, b'"on"')
    got = [line for line in lines_within(b, 2) if line.startswith(b"* METADATA")]
    assert got, "no METADATA event"
    set_pref(a, b"NIL")
    a.close()
    b.close()


class _Receiver:
    """A real HTTPS push gateway for the test (certificate from the proxy's test CA)."""

    def __init__(self, certs):
        self.certs = certs
        self.events: list[dict] = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = None

    def start(self):
        events = self.events

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers["Content-Length"])
                events.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.certs.cert), str(self.certs.key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def test_push_to_disconnected_devices_with_retry(make_proxy, dovecot, proxy_certs):
    folder = new_folder(dovecot)
    receiver = _Receiver(proxy_certs)  # not started yet: the gateway is down
    p = make_proxy(config_extra=f'[policy]\nnotifications = "forced"\n[plugin.push]\n'
                                f'url = "https://localhost:{receiver.port}/cpm"\nca_file = "{proxy_certs.ca_cert}"\n'
                                f"backoff = 0.2\nmax_backoff = 1.0\noffline_watch = 0\n")  # (no [admin] here)
    tablet = device(p, "tablet-1")
    tablet.close()  # known device, now offline
    phone = device(p, "phone-1")
    try:
        time.sleep(0.3)
        append(phone, folder, make_object("chat", text="for the tablet"))
        time.sleep(1.5)  # a few failed attempts while the gateway is down
        receiver.start()
        deadline = time.monotonic() + 10
        while not receiver.events and time.monotonic() < deadline:
            time.sleep(0.1)
        assert receiver.events, "no push arrived"
        ev = next(e for e in receiver.events if e["mailbox"] == folder)
        assert ev["user"] == "alice" and ev["event"] == "MessageNew"
        assert "tablet-1" in ev["devices"] and "phone-1" not in ev["devices"]  # phone-1 is connected
        assert list(ev["kinds"].values()) == ["chat"]
        assert "for the tablet" not in json.dumps(ev)  # never message content
    finally:
        phone.close()
        receiver.stop()


def _collect(c: RawIMAP, seconds: float, until=None) -> list[bytes]:
    """Lines received within ``seconds`` (stops early once ``until(lines)`` is true)."""
    got: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += lines_within(c, 0.2)
        if until is not None and until(got):
            break
    return got


def test_client_notify_every_event_kind_filtered_by_the_view(make_proxy, dovecot):
    """A client's own NOTIFY through the proxy: each event kind arrives, in the device's view (hidden
    kinds, excluded folders and its local deletions stay silent; counts and numbers are the view's)."""
    tag = uuid.uuid4().hex[:6]
    chat_box, other_box = f"Chat-{tag}", f"Other-{tag}"
    dovecot.deliver("alice", chat_box, make_object("chat", text="one"))
    dovecot.deliver("alice", chat_box, make_object("chat", text="two"))
    dovecot.deliver("alice", other_box, make_object("chat"))
    dovecot.deliver("alice", other_box, make_object("imdn"))
    p = make_proxy(config_extra='[policy]\nexclude_folders = ["Secret/*"]\nsync = { imdn = false }\n')
    b = device(p, "B")
    a = dovecot.imap_direct("alice", tls="none")
    try:
        b.command(b"s", b'SELECT "%s"' % chat_box.encode())
        # B locally deletes message 1: from now on it does not exist for B.
        r = b.command(b"d", b"STORE 1 +FLAGS.SILENT (\\Deleted $LocalDelete)")
        assert r[-1].startswith(b"d OK"), r
        b.command(b"e", b"EXPUNGE")
        r = b.command(b"n", b"NOTIFY SET STATUS (selected (MessageNew (UID FLAGS) MessageExpunge FlagChange)) "
                            b"(personal (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange))")
        assert r[-1].startswith(b"n OK"), r
        initial = [x for x in r if x.startswith(b"* STATUS") and other_box.encode() in x]
        assert initial and b"MESSAGES 1 " in initial[0], initial  # the IMDN is not counted

        # MessageNew in another mailbox: STATUS with the view's counts (a hidden IMDN changes nothing).
        dovecot.deliver("alice", other_box, make_object("imdn"))
        dovecot.deliver("alice", other_box, make_object("chat"))
        got = _collect(b, 8, lambda g: any(b"MESSAGES 2 " in x and other_box.encode() in x for x in g))
        statuses = [x for x in got if x.startswith(b"* STATUS")]
        assert any(b"MESSAGES 2 " in x for x in statuses), got
        assert not any(b"MESSAGES 3 " in x or b"MESSAGES 4 " in x for x in statuses), got

        # MessageNew in the selected mailbox, with its fetch attributes; the IMDN never shows.
        imdn_uid = dovecot.deliver("alice", chat_box, make_object("imdn"))
        chat_uid = dovecot.deliver("alice", chat_box, make_object("chat", text="three"))
        got = _collect(b, 8, lambda g: any(b"UID %d " % chat_uid in x for x in g))
        assert b"* 2 EXISTS\r\n" in got, got  # B sees message 2 (UID 2) and the new chat
        assert any(x.startswith(b"* 2 FETCH (UID %d FLAGS" % chat_uid) for x in got), got
        assert not any(b"UID %d " % imdn_uid in x or x == b"* 3 EXISTS\r\n" for x in got), got

        # FlagChange: on a visible message it arrives; on the hidden IMDN and on B's local deletion not.
        a.select_folder(chat_box)
        a.add_flags([1, imdn_uid], [b"$Marked"])
        a.add_flags([chat_uid], [b"\\Flagged"])
        got = _collect(b, 8, lambda g: any(b"\\Flagged" in x for x in g))
        fetches = [x for x in got if b" FETCH " in x]
        assert fetches and all(x.startswith(b"* 2 FETCH ") and b"\\Flagged" in x for x in fetches), got
        # FlagChange in a mailbox that is not selected: a STATUS carrying the new HIGHESTMODSEQ.
        a.select_folder(other_box)
        a.add_flags([1], [b"$Marked"])
        got = _collect(b, 8, lambda g: any(x.startswith(b"* STATUS") and other_box.encode() in x for x in g))
        assert any(x.startswith(b"* STATUS") and b"HIGHESTMODSEQ" in x for x in got), got
        a.select_folder(chat_box)

        # MessageExpunge of a visible message: EXPUNGE renumbered to B's view.
        a.delete_messages([chat_uid])
        a.expunge()
        got = _collect(b, 8, lambda g: b"* 2 EXPUNGE\r\n" in g)
        assert b"* 2 EXPUNGE\r\n" in got, got

        # MailboxName and SubscriptionChange: announced, except for folders excluded by policy.
        a.create_folder("Secret/x" + tag)
        a.create_folder("Visible" + tag)
        a.subscribe_folder("Visible" + tag)
        got = _collect(b, 8, lambda g: sum(b"Visible" + tag.encode() in x for x in g) >= 2)
        lists = [x for x in got if x.startswith(b"* LIST")]
        assert any(b"Visible" + tag.encode() in x and b"\\Subscribed" in x for x in lists), got
        assert not any(b"Secret/" in x for x in got), got  # (its parent "Secret" is not excluded)

        # BADEVENT names every event the proxy supports; NOTIFY NONE silences everything.
        r = b.command(b"n", b"NOTIFY SET (personal (MessageNew MessageExpunge AnnotationChange))")
        assert r[-1].startswith(b"n NO [BADEVENT (") and b"ServerMetadataChange" in r[-1], r
        assert b.command(b"n", b"NOTIFY NONE")[-1].startswith(b"n OK")
        dovecot.deliver("alice", other_box, make_object("chat"))
        assert not any(x.startswith(b"* STATUS") for x in lines_within(b, 2.5))
    finally:
        a.logout()
        b.close()


def test_preference_changed_through_another_proxy_process(make_proxy, dovecot):
    """Turning notifications on at device A (proxy process 1) takes effect in device B's open session
    on process 2 (polled on the user's watch connection), and a metadata-watching client hears of it."""
    folder = new_folder(dovecot)
    poll = "[plugin.notify]\nmetadata_poll = 0.5\n"
    p1, p2 = make_proxy(config_extra=poll), make_proxy(config_extra=poll)
    b = device(p2, "B")
    c = device(p2, "C")
    r = c.command(b"n", b"NOTIFY SET (personal (ServerMetadataChange))")
    assert r[-1].startswith(b"n OK"), r
    a = device(p1, "A")
    try:
        set_pref(a, b'"off"')
        time.sleep(1.5)
        idle(b)
        append(a, folder, make_object("chat"))
        assert wait_status(b, folder, 2.5) is None  # off: nothing injected
        lines_within(c, 0.2)  # (C's event for "off")
        set_pref(a, b'"on"')
        # The event reaches C once process 2 has turned its watch on: what follows is heard.
        got = _collect(c, 5, lambda g: any(x.startswith(b"* METADATA") for x in g))
        assert b'* METADATA "" ' + PREF + b"\r\n" in got, got
        append(a, folder, make_object("chat"))
        assert wait_status(b, folder, 5) is not None  # on, set on the other process: injected
    finally:
        set_pref(a, b"NIL")
        for x in (a, b, c):
            x.close()


def test_push_when_no_device_is_connected(make_proxy, dovecot, proxy_certs, tmp_path):
    """The user's only device left: a delivery still reaches the push gateway (offline watch, logged in
    with the [admin] master user), with UIDVALIDITY, UIDs and kinds; duplicates share an id."""
    folder = new_folder(dovecot)
    pw = tmp_path / "master.pw"
    pw.write_text(dovecot.master_user[1])
    receiver = _Receiver(proxy_certs)
    receiver.start()
    p = make_proxy(config_extra=f'[policy]\nnotifications = "forced"\n[plugin.push]\n'
                                f'url = "https://localhost:{receiver.port}/cpm"\nca_file = "{proxy_certs.ca_cert}"\n'
                                f'offline_watch = 60\ninclude_headers = ["Subject"]\n'
                                f'[admin]\nmaster_user = "{dovecot.master_user[0]}"\n'
                                f'master_password_file = "{pw}"\n')
    try:
        phone = device(p, "phone-9")
        phone.command(b"z", b"LOGOUT")
        phone.close()
        time.sleep(0.5)
        uid = dovecot.deliver("alice", folder, make_object("chat", text="while you were away", subject="hi there"))
        deadline = time.monotonic() + 10
        while not any(e["mailbox"] == folder for e in receiver.events) and time.monotonic() < deadline:
            time.sleep(0.1)
        ev = next((e for e in receiver.events if e["mailbox"] == folder), None)
        assert ev is not None, receiver.events
        assert ev["user"] == "alice" and ev["event"] == "MessageNew" and "phone-9" in ev["devices"]
        assert ev["uids"] == [uid], receiver.events
        assert ev["kinds"] == {str(uid): "chat"} and ev["uidvalidity"]
        assert len(ev["id"]) == 32 and "while you were away" not in json.dumps(ev)  # the body never
        assert ev["headers"] == {str(uid): {"Subject": "hi there"}}  # the header asked for in the config
    finally:
        receiver.stop()


def test_no_push_while_the_user_has_notifications_off(make_proxy, dovecot, proxy_certs):
    """Policy "allowed": the user's preference decides; off means no push, and turning it on resumes."""
    folder = new_folder(dovecot)
    receiver = _Receiver(proxy_certs)
    receiver.start()
    p = make_proxy(config_extra=f'[plugin.push]\nurl = "https://localhost:{receiver.port}/cpm"\n'
                                f'ca_file = "{proxy_certs.ca_cert}"\noffline_watch = 0\n')  # (no [admin] here)
    device(p, "tablet-7").close()  # known device, offline
    phone = device(p, "phone-7")
    try:
        set_pref(phone, b'"off"')
        append(phone, folder, make_object("chat"))
        time.sleep(2)
        assert not [e for e in receiver.events if e["mailbox"] == folder]
        set_pref(phone, b'"on"')
        append(phone, folder, make_object("chat"))
        deadline = time.monotonic() + 10
        while not [e for e in receiver.events if e["mailbox"] == folder] and time.monotonic() < deadline:
            time.sleep(0.1)
        pushed = [e for e in receiver.events if e["mailbox"] == folder]
        assert pushed and "tablet-7" in pushed[0]["devices"], receiver.events
    finally:
        set_pref(phone, b"NIL")
        phone.close()
        receiver.stop()


def _watch_gauges(p) -> tuple[float, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    values = dict(line.split() for line in body.splitlines() if line.startswith("cpmproxy_notify_watches"))
    return float(values["cpmproxy_notify_watches"]), float(values["cpmproxy_notify_watches_armed"])


def _gauges_become(p, want: tuple[float, float], seconds: float = 5) -> tuple[float, float]:
    deadline = time.monotonic() + seconds
    while (got := _watch_gauges(p)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_watch_sets_notify_only_while_someone_wants_events(make_proxy, dovecot):
    """A NOTIFY on the account makes Dovecot slower at every SELECT of the user's, so the watch arms it
    only while a session has notifications on or watches its selected mailbox itself; it is armed
    before such a login completes. Without them its connection waits for the first preferences poll,
    and it outlives the last session a little, disarmed."""
    folder = new_folder(dovecot)
    p = make_proxy(config_extra="[plugin.notify]\nmetadata_poll = 3\n")
    a = device(p, "A")
    try:
        set_pref(a, b"NIL")
        assert _watch_gauges(p) == (0, 0)  # no connection before the first poll is due
        assert _gauges_become(p, (1, 0), 6) == (1, 0)  # then one, without NOTIFY
        set_pref(a, b'"on"')
        assert _gauges_become(p, (1, 1)) == (1, 1)
        b = device(p, "B")  # notifications on: B's login needs nothing more
        idle(b)
        dovecot.deliver("alice", folder, make_object("chat"))
        assert wait_status(b, folder) is not None
        b.close()
        set_pref(a, b'"off"')
        assert _gauges_become(p, (1, 0)) == (1, 0)
        # A client's own NOTIFY on its selected mailbox needs the watch's events (see _nudge).
        a.command(b"s", b"SELECT INBOX")
        assert a.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge))")[-1].startswith(b"n OK")
        assert _gauges_become(p, (1, 1)) == (1, 1)
        assert a.command(b"n", b"NOTIFY NONE")[-1].startswith(b"n OK")
        assert _gauges_become(p, (1, 0)) == (1, 0)
        set_pref(a, b'"on"')
        assert _gauges_become(p, (1, 1)) == (1, 1)
    finally:
        set_pref(a, b"NIL")
        a.close()
    assert _gauges_become(p, (1, 0)) == (1, 0)  # lingering for a returning device, disarmed
    c = device(p, "C")
    try:
        set_pref(c, b'"on"')
        assert _gauges_become(p, (1, 1)) == (1, 1)  # the same connection, armed again
    finally:
        set_pref(c, b"NIL")
        c.close()


def test_client_notify_naming_more_mailboxes_than_dovecot_takes(make_proxy, dovecot):
    """Dovecot 2.3 refuses NOTIFY naming more than 100 mailboxes; through the proxy it works, and only
    the named mailboxes (and subtrees) are announced."""
    tag = uuid.uuid4().hex[:6]
    named = [f"Many-{tag}/m{i:03d}" for i in range(120)]
    a = dovecot.imap_direct("alice", tls="none")
    try:
        for name in named + [f"Unnamed-{tag}", f"Tree-{tag}/leaf"]:
            a.create_folder(name)
        p = make_proxy()
        b = device(p, "B")
        names = b" ".join(b'"%s"' % n.encode() for n in named)
        r = b.command(b"n", b"NOTIFY SET STATUS (mailboxes (" + names + b") (MessageNew MessageExpunge)) "
                            b'(subtree "Tree-%s" (MessageNew MessageExpunge MailboxName))' % tag.encode())
        assert r[-1].startswith(b"n OK"), r[-1]
        initial = [x for x in r if x.startswith(b"* STATUS")]
        assert len(initial) == 121 and not any(b"Unnamed" in x for x in initial), len(initial)
        dovecot.deliver("alice", f"Unnamed-{tag}", make_object("chat"))
        dovecot.deliver("alice", named[117], make_object("chat"))
        dovecot.deliver("alice", f"Tree-{tag}/leaf", make_object("chat"))
        # (Dovecot may also announce some of the freshly created named mailboxes unchanged: allowed.)
        got = _collect(b, 8, lambda g: any(named[117].encode() in x for x in g)
                       and any(b"Tree-%s/leaf" % tag.encode() in x for x in g))
        statuses = [x for x in got if x.startswith(b"* STATUS")]
        assert any(named[117].encode() in x for x in statuses), got
        assert any(b"Tree-%s/leaf" % tag.encode() in x for x in statuses), got
        a.create_folder(f"Tree-{tag}/fresh")
        a.create_folder(f"Unnamed-{tag}/fresh")
        got += _collect(b, 5, lambda g: any(x.startswith(b"* LIST") for x in g))
        assert any(x.startswith(b"* LIST") and b"Tree-%s/fresh" % tag.encode() in x for x in got), got
        assert not any(b"Unnamed" in x for x in got), got  # neither its messages nor its children
        b.close()
    finally:
        a.logout()


def test_widen_named_groups_keeps_the_other_groups():
    from cpmproxy.imap.tokens import tokenize
    from plugins.notify import parse_event_groups, widen_named_groups
    line = (b'n NOTIFY SET STATUS (selected (MessageNew (UID FLAGS) MessageExpunge)) '
            b'(mailboxes (a "b c") (MessageNew MessageExpunge)) (subtree d (MailboxName)) (inboxes NONE)')
    tokens = tokenize(line)
    start, groups = parse_event_groups(tokens)
    assert start == 4 and [g.filter for g in groups] == ["selected", "mailboxes", "subtree", "inboxes"]
    assert groups[1].names == ("a", "b c") and groups[2].covers("d/e") and not groups[2].covers("de")
    assert widen_named_groups(tokens, start, groups) == (
        b"n NOTIFY SET STATUS (selected (MessageNew (UID FLAGS) MessageExpunge)) (inboxes NONE) "
        b"(personal (MessageNew MessageExpunge MailboxName))\r\n")
    assert parse_event_groups(tokenize(b"n NOTIFY SET (mailboxes)")) is None


def test_notify_and_push_settings_are_validated(tmp_path):
    """Each new setting: a wrong value is a clear configuration error naming it (cpmproxy --check)."""
    from tests.proxyfix import check_config
    for text, needle in {
        "[plugin.notify]\nmetadata_poll = -1\n": "metadata_poll",
        "[plugin.notify]\nmax_offline_watches = \"many\"\n": "max_offline_watches",
        "[plugin.notify]\nmax_watch_mailboxes = -1\n": "max_watch_mailboxes: expected a number >= 0",
        "[plugin.push]\noffline_watch = -5\n": "offline_watch",
        "[plugin.push]\ninclude_headers = [\"Sub ject\"]\n": "include_headers",
        "[plugin.push]\ninclude_headers = \"Subject\"\n": "push.include_headers",
    }.items():
        f = tmp_path / "c.toml"
        f.write_text(text)
        r = check_config(f)
        assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)


@pytest.mark.parametrize("across", [False, True])
def test_folder_leaving_the_view_is_a_mailbox_event(make_proxy, dovecot, across):
    """A folder a preference takes out of a device's view (set by another device, on this proxy process
    or another one) is, to a client whose NOTIFY asks for MailboxName events, a deleted mailbox (LIST
    \\NonExistent); turned back on, a created one. Devices that did not ask hear nothing of it."""
    folder = new_folder(dovecot)
    poll = "[plugin.notify]\nmetadata_poll = 0.5\n"
    p1 = make_proxy(config_extra=poll)
    p2 = make_proxy(config_extra=poll) if across else p1
    b, c = device(p2, "B"), device(p2, "C")
    r = b.command(b"n", b"NOTIFY SET (personal (MailboxName))")
    assert r[-1].startswith(b"n OK"), r
    assert b.command(b"l", b'LIST "" "*"')[-1].startswith(b"l OK")  # (B knows its folders)
    a = device(p1, "A")
    entry = b"/private/vendor/vendor.cpmproxy/sync"
    try:
        r = a.command(b"p", b'SETMETADATA "%s" (%s "off")' % (folder.encode(), entry))
        assert r[-1].startswith(b"p OK"), r
        got = _collect(b, 5, lambda g: any(b"LIST" in x for x in g))
        assert [(x.split(b'"/"')[0], list_name(x)) for x in got if b"LIST" in x] == \
            [(b"* LIST (\\NonExistent) ", folder)], got
        r = a.command(b"q", b'SETMETADATA "%s" (%s NIL)' % (folder.encode(), entry))
        assert r[-1].startswith(b"q OK"), r
        got = _collect(b, 5, lambda g: any(b"LIST" in x for x in g))
        assert [(x.split(b'"/"')[0], list_name(x)) for x in got if b"LIST" in x] == [(b"* LIST () ", folder)], got
        assert not any(b"LIST" in x for x in lines_within(c, 0.5))
    finally:
        for x in (a, b, c):
            x.close()


def test_folder_excluded_by_a_reloaded_policy_is_a_mailbox_event(make_proxy, dovecot):
    """The provider excludes a folder (SIGHUP with a new policy): a device whose NOTIFY asks for
    MailboxName events hears that it is gone."""
    import signal

    folder = new_folder(dovecot)
    p = make_proxy()
    b = device(p, "B")
    try:
        assert b.command(b"n", b"NOTIFY SET (personal (MailboxName))")[-1].startswith(b"n OK")
        assert b.command(b"l", b'LIST "" "*"')[-1].startswith(b"l OK")
        p.config_path.write_text(p.config_path.read_text() + f'\n[policy]\nexclude_folders = ["{folder}"]\n')
        p.signal(signal.SIGHUP)
        got = _collect(b, 5, lambda g: any(b"LIST" in x for x in g))
        assert [(x.split(b'"/"')[0], list_name(x)) for x in got if b"LIST" in x] == \
            [(b"* LIST (\\NonExistent) ", folder)], got
    finally:
        b.close()


def test_session_histories_turned_off_account_wide_are_mailbox_events(make_proxy, dovecot):
    """``sync/session-history`` off for the account: the Session History folders a device knows leave its
    view (whether a folder is one was not asked while they were shown) and are MailboxName events; back
    on, they come back; a folder deleted meanwhile is no event."""
    user = "carol"
    sh, gone = ("Default/sh-" + uuid.uuid4().hex[:6] for _ in range(2))
    for folder in (sh, gone):
        dovecot.deliver(user, folder, make_object("session-info"))
    entry = b"/private/vendor/vendor.cpmproxy/sync/session-history"
    p = make_proxy()
    a, b = device(p, "A", user), device(p, "B", user)
    try:
        assert b.command(b"n", b"NOTIFY SET (personal (MailboxName))")[-1].startswith(b"n OK")
        assert sh.encode() in b"".join(b.command(b"l", b'LIST "" "*"'))
        assert a.command(b"p", b'SETMETADATA "" (%s "off")' % entry)[-1].startswith(b"p OK")
        # (Other tests' Session History folders of the user, the sample store's, are events too.)
        mine = (sh, gone)
        got = [x for x in _collect(b, 5, lambda g: sum(list_name(x) in mine for x in g if b"LIST" in x) >= 2)
               if b"LIST" in x and list_name(x) in mine]
        assert sorted((x.split(b'"/"')[0], list_name(x)) for x in got) == \
            sorted([(b"* LIST (\\NonExistent) ", sh), (b"* LIST (\\NonExistent) ", gone)]), got
        r = b.command(b"l2", b'LIST "" "*"')
        assert r[-1].startswith(b"l2 OK") and sh.encode() not in b"".join(r), r
        d = dovecot.imap_direct(user, tls="none")
        d.delete_folder(gone)
        d.logout()
        assert a.command(b"q", b'SETMETADATA "" (%s NIL)' % entry)[-1].startswith(b"q OK")
        got = [x for x in _collect(b, 5, lambda g: any(list_name(x) == sh for x in g if b"LIST" in x))
               if b"LIST" in x and list_name(x) in mine]
        assert [(x.split(b'"/"')[0], list_name(x)) for x in got] == [(b"* LIST () ", sh)], got
    finally:
        a.command(b"z", b'SETMETADATA "" (%s NIL)' % entry)
        a.close()
        b.close()


def test_a_folder_made_again_elsewhere_under_a_session_historys_name_is_seen(make_proxy, dovecot):
    """A Session History folder deleted and made again as a plain folder straight on the backend (another
    proxy node, a server-side tool): the proxy kept knowing the name as a Session History, for every
    session of the process and for good; an IDLE device never heard of the new folder, a new session did
    not list it. The watch's MailboxName events now make the name be looked at anew."""
    user = "dave"
    name = "Default/sh-" + uuid.uuid4().hex[:8]
    dovecot.deliver(user, name, make_object("session-info"))
    p = make_proxy(config_extra='[policy]\nsync = { session-history = false }\nnotifications = "forced"\n')
    a = device(p, "phone", user)
    try:
        assert name.encode() not in b"".join(a.command(b"l", b'LIST "" "*"'))
        idle(a)
        d = dovecot.imap_direct(user, tls="none")
        d.delete_folder(name)
        d.create_folder(name)
        d.logout()
        dovecot.deliver(user, name, make_object("chat", text="a plain folder now"))
        assert wait_status(a, name) is not None
        a.send(b"DONE\r\n")
        a.until_tagged(b"t")
        assert name.encode() in b"".join(a.command(b"l2", b'LIST "" "*"'))
        b = device(p, "tablet", user)
        assert name.encode() in b"".join(b.command(b"l", b'LIST "" "*"'))
        b.close()
    finally:
        a.close()


def test_a_watch_that_lost_its_connection_reports_nothing():
    """Push leaves a change made through the proxy to the watch only while the watch reports: after its
    connection is lost (and until its NOTIFY is armed again) it does not."""
    from twisted.internet import defer

    from plugins.notify import UserWatch

    class Proto:
        closed = False

    watch = UserWatch.__new__(UserWatch)
    watch.proto, watch.notifying, watch._armed = Proto(), True, defer.succeed(None)
    assert watch.reporting()
    watch._armed = defer.Deferred()
    assert not watch.reporting()  # (NOTIFY SET on its way)
    watch._armed = defer.succeed(None)
    watch.is_ready, watch._keepalive, watch.closed = True, None, True
    watch._lost()
    assert not watch.reporting() and not watch.notifying


def test_watch_events_from_status():
    """What the watch makes of Dovecot's NOTIFY STATUS lines: a new, empty mailbox is no message event
    (it was a MessageNew without UIDs, which push sent to every offline device); new UIDs from UIDNEXT,
    expunges from MESSAGES, flag changes from HIGHESTMODSEQ; an unchanged re-announcement is nothing."""
    from types import SimpleNamespace

    from plugins.notify import UserWatch

    watch = UserWatch(SimpleNamespace(max_watch_mailboxes=1000), "alice")

    def event(mailbox: str, items: bytes):
        e = watch._status_event(mailbox, b"* STATUS %s (%s)\r\n" % (mailbox.encode(), items))
        return e and (e.event, e.uids)

    assert event("New", b"MESSAGES 0 UIDNEXT 1 UIDVALIDITY 7 HIGHESTMODSEQ 1") is None
    assert event("New", b"MESSAGES 2 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 3") == ("MessageNew", (1, 2))
    assert event("New", b"MESSAGES 2 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 3") is None
    assert event("New", b"MESSAGES 2 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 4") == ("FlagChange", ())
    assert event("New", b"MESSAGES 1 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 5") == ("MessageExpunge", ())
    assert event("Full", b"MESSAGES 4 UIDNEXT 9 UIDVALIDITY 8 HIGHESTMODSEQ 9") == ("MessageNew", ())


def test_the_watchs_mailbox_states_are_bounded_and_past_the_bound_a_change_is_still_told():
    """The watch kept the last STATUS of every mailbox, for up to a day offline: thousands of Session
    History folders cost megabytes a watch (found by review helper-100). At most ``max_watch_mailboxes``
    are kept, the least recently changed going first; a change in a mailbox without one is told as some
    change (``coarse``), an expunge to nothing too (it was "a new, empty mailbox": nothing told)."""
    from types import SimpleNamespace

    from plugins.notify import UserWatch

    plugin = SimpleNamespace(max_watch_mailboxes=2, forget_mailbox=lambda user, mailbox: None)
    watch = UserWatch(plugin, "alice")

    def status(mailbox: str, items: bytes, baseline: bool = False):
        return watch._status_event(mailbox, b"* STATUS %s (%s)\r\n" % (mailbox.encode(), items), baseline)

    for name in ("A", "B", "C"):  # (the NOTIFY's baseline: the first ones are kept)
        status(name, b"MESSAGES 1 UIDNEXT 2 UIDVALIDITY 7 HIGHESTMODSEQ 2", baseline=True)
    assert list(watch.mailboxes) == ["A", "B"] and watch.partial
    e = status("C", b"MESSAGES 0 UIDNEXT 2 UIDVALIDITY 7 HIGHESTMODSEQ 3")
    assert (e.event, e.uids, e.coarse, e.modseq) == ("MessageNew", (), True, 3)
    assert list(watch.mailboxes) == ["B", "C"]  # (A changed least recently)
    e = status("B", b"MESSAGES 2 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 3")
    assert (e.event, e.uids, e.coarse) == ("MessageNew", (2,), False) and list(watch.mailboxes) == ["C", "B"]
    assert status("B", b"MESSAGES 2 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 3") is None  # (unchanged)
    e = status("A", b"MESSAGES 0 UIDNEXT 2 UIDVALIDITY 7 HIGHESTMODSEQ 4")
    assert e.coarse and len(watch.mailboxes) == 2
    plugin.max_watch_mailboxes = 0  # (a reload: none kept, every change told coarse)
    assert status("B", b"MESSAGES 1 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 5").event == "MessageExpunge"
    assert watch.mailboxes == {} and status("B", b"MESSAGES 1 UIDNEXT 3 UIDVALIDITY 7 HIGHESTMODSEQ 6").coarse
    assert status("New", b"MESSAGES 0 UIDNEXT 1 UIDVALIDITY 9 HIGHESTMODSEQ 1") is None  # (never held one)


def test_watch_events_of_a_mailbox_made_anew():
    """A mailbox deleted and made again by another connection: Dovecot 2.3 tells only a STATUS with another
    UIDVALIDITY. What was known of the old mailbox is forgotten (the policy's folder facts: a Session
    History once, a plain folder now), and its HIGHESTMODSEQ is no baseline: the new messages' MODSEQs can
    be lower, and the change was taken for one already told (found with the Session History test above).
    A LIST event (created, renamed: OLDNAME, deleted: \\NonExistent) forgets its names the same way."""
    from types import SimpleNamespace

    from plugins.notify import UserWatch

    forgotten, published = [], []
    plugin = SimpleNamespace(forget_mailbox=lambda user, mailbox: forgotten.append(mailbox),
                             publish=published.append, max_watch_mailboxes=1000)
    watch = UserWatch(plugin, "alice")
    assert watch._status_event("F", b"* STATUS F (MESSAGES 3 UIDNEXT 4 UIDVALIDITY 7 HIGHESTMODSEQ 9)\r\n")
    assert not forgotten
    e = watch._status_event("F", b"* STATUS F (MESSAGES 1 UIDNEXT 2 UIDVALIDITY 8 HIGHESTMODSEQ 2)\r\n")
    assert (e.event, e.uids, e.uidvalidity, e.modseq, e.modseq_before) == ("MessageNew", (), 8, 2, None)
    assert forgotten == ["F"]
    e = watch._status_event("F", b"* STATUS F (MESSAGES 2 UIDNEXT 3 UIDVALIDITY 8 HIGHESTMODSEQ 3)\r\n")
    assert (e.event, e.uids, e.modseq_before) == ("MessageNew", (2,), 2)  # (counted from the new one)

    forgotten.clear()
    watch._event(b'* LIST () "/" G\r\n')
    watch._event(b'* LIST () "/" H ("OLDNAME" ("G"))\r\n')
    watch._event(b'* LIST (\\NonExistent) "/" H\r\n')
    assert forgotten == ["G", "H", "G", "H"]
    assert [(e.mailbox, e.event, e.gone) for e in published] == \
        [("G", "MailboxName", False), ("H", "MailboxName", False), ("H", "MailboxName", True)]


def test_rename_across_the_view_edge_is_a_deletion_or_creation(make_proxy, dovecot):
    """A folder renamed into a name the policy excludes leaves the device's view: to its NOTIFY, the old
    name is deleted (LIST \\NonExistent, RFC 5465 5.4). Renamed back out of it, it is created: the hidden
    old name (OLDNAME) is never told."""
    tag = uuid.uuid4().hex[:6]
    visible, hidden, back = f"Vis-{tag}", f"Secret-{tag}", f"Vis-{tag}b"
    dovecot.deliver("alice", visible, make_object("chat"))
    p = make_proxy(config_extra='[policy]\nexclude_folders = ["Secret*"]\n')
    b = device(p, "B")
    d = dovecot.imap_direct("alice", tls="none")
    try:
        assert b.command(b"n", b"NOTIFY SET (personal (MailboxName))")[-1].startswith(b"n OK")
        assert visible.encode() in b"".join(b.command(b"l", b'LIST "" "*"'))
        d.rename_folder(visible, hidden)
        got = [x for x in _collect(b, 5, lambda g: any(b"LIST" in x for x in g)) if b"LIST" in x]
        assert got == [b'* LIST (\\NonExistent) "/" %s\r\n' % visible.encode()], got
        d.rename_folder(hidden, back)
        got = [x for x in _collect(b, 5, lambda g: any(b"LIST" in x for x in g)) if b"LIST" in x]
        assert [list_name(x) for x in got] == [back] and not any(b"Secret" in x for x in got), got
    finally:
        d.logout()
        b.close()


def test_metadata_events_name_the_entries_that_changed(make_proxy):
    """The proxy's METADATA events have RFC 5464's unsolicited form (the mailbox, then the entries that
    changed, no values): for a change through this proxy process, and for a preference another process
    changed (learnt by polling)."""
    poll = "[plugin.notify]\nmetadata_poll = 0.5\n"
    p1 = make_proxy(config_extra=poll)
    p2 = make_proxy(config_extra=poll)
    b, a, c = device(p1, "B"), device(p1, "A"), device(p2, "C")
    try:
        r = b.command(b"n", b"NOTIFY SET (personal (MailboxMetadataChange ServerMetadataChange))")
        assert r[-1].startswith(b"n OK"), r
        assert a.command(b"p", b'SETMETADATA "" (/private/comment "hello")')[-1].startswith(b"p OK")
        got = [x for x in _collect(b, 3, lambda g: any(b"METADATA" in x for x in g)) if b"METADATA" in x]
        assert got == [b'* METADATA "" /private/comment\r\n'], got
        set_pref(c, b'"on"')  # (through the other proxy process)
        got = [x for x in _collect(b, 5, lambda g: any(b"METADATA" in x for x in g)) if b"METADATA" in x]
        assert got == [b'* METADATA "" ' + PREF + b"\r\n"], got
    finally:
        set_pref(a, b"NIL")
        a.command(b"q", b'SETMETADATA "" (/private/comment NIL)')
        for x in (a, b, c):
            x.close()


def test_metadata_events_only_as_asked(make_proxy, dovecot):
    """A client that asked MailboxMetadataChange for one named mailbox hears of changes there only: not
    of the server's metadata, not of another mailbox's."""
    tag = uuid.uuid4().hex[:6]
    named, other = f"Md1-{tag}", f"Md2-{tag}"
    for folder in (named, other):
        dovecot.deliver("alice", folder, make_object("chat"))
    p = make_proxy()
    b, a = device(p, "B"), device(p, "A")
    try:
        r = b.command(b"n", b'NOTIFY SET (mailboxes "%s" (MailboxMetadataChange))' % named.encode())
        assert r[-1].startswith(b"n OK"), r
        set_pref(a, b'"on"')
        for folder in (other, named):
            r = a.command(b"c", b'SETMETADATA "%s" (/private/comment "x")' % folder.encode())
            assert r[-1].startswith(b"c OK"), r
        got = [x for x in _collect(b, 3, lambda g: any(b"METADATA" in x for x in g)) if b"METADATA" in x]
        got += [x for x in lines_within(b, 0.5) if b"METADATA" in x]
        assert got == [b"* METADATA %s /private/comment\r\n" % named.encode()], got
    finally:
        set_pref(a, b"NIL")
        a.close()
        b.close()


def test_metadata_event_waits_for_a_getmetadata_answer(monkeypatch):
    """A METADATA event is not injected while a GETMETADATA is answered (it would read as part of the
    answer), and names its mailbox quoted as IMAP wants it."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    import plugins.notify as notify

    clock = Clock()
    monkeypatch.setattr(notify, "reactor", clock)
    sent: list[bytes] = []
    inflight = [SimpleNamespace(name=b"GETMETADATA")]
    session = SimpleNamespace(phase="auth", inflight_commands=lambda: inflight, inject=sent.append)
    line = notify.metadata_event_line("a\\b", ("/private/comment",))
    assert line == b'* METADATA "a\\\\b" /private/comment\r\n'
    plugin = notify.NotifyPlugin.__new__(notify.NotifyPlugin)
    plugin._inject_after(session, line, (b"GETMETADATA",))
    clock.advance(0.05)
    assert sent == []
    inflight.clear()
    clock.advance(0.05)
    assert sent == [line]


def test_widened_notify_keeps_the_subscribed_and_inboxes_filters(make_proxy, dovecot):
    """NOTIFY naming more mailboxes than Dovecot takes is widened to ``personal``; its ``subscribed``
    group still takes only subscribed mailboxes (a subscription made through the proxy counts at once)."""
    tag = uuid.uuid4().hex[:6]
    named = [f"W-{tag}/m{i:03d}" for i in range(101)]
    unsub, sub = f"Unsub-{tag}", f"Sub-{tag}"
    d = dovecot.imap_direct("alice", tls="none")
    for name in named + [unsub, sub]:
        d.create_folder(name)
    d.subscribe_folder(sub)
    d.logout()
    p = make_proxy()
    b = device(p, "B")
    try:
        names = b" ".join(b'"%s"' % n.encode() for n in named)
        r = b.command(b"n", b"NOTIFY SET (subscribed (MessageNew)) (mailboxes (" + names + b") (MessageNew))")
        assert r[-1].startswith(b"n OK"), r[-1]
        lines_within(b, 0.5)
        dovecot.deliver("alice", unsub, make_object("chat"))
        dovecot.deliver("alice", sub, make_object("chat"))
        got = _collect(b, 5, lambda g: any(sub.encode() in x for x in g)) + lines_within(b, 0.5)
        assert any(sub.encode() in x for x in got) and not any(unsub.encode() in x for x in got), got
        assert b.command(b"s", b'SUBSCRIBE "%s"' % unsub.encode())[-1].startswith(b"s OK")
        dovecot.deliver("alice", unsub, make_object("chat"))
        assert wait_status(b, unsub, 5) is not None
    finally:
        b.close()


def test_inboxes_and_subscribed_filters_cover_only_their_mailboxes():
    from plugins.notify import EventGroup

    inboxes, subscribed = EventGroup("inboxes", (), []), EventGroup("subscribed", (), [])
    assert inboxes.covers("INBOX") and not inboxes.covers("Default/tel:+1555")
    assert subscribed.covers("a", {"a"}) and not subscribed.covers("b", {"a"}) and not subscribed.covers("a")
    assert EventGroup("personal", (), []).covers("anything")


def test_refused_notify_changes_nothing(make_proxy):
    """A NOTIFY SET the backend refuses leaves the notification state as it was: the metadata events the
    proxy makes keep coming, like the backend's own (MailboxName)."""
    p = make_proxy()
    b, a = device(p, "B"), device(p, "A")
    folder = "Fn-" + uuid.uuid4().hex[:6]
    try:
        r = b.command(b"n", b"NOTIFY SET (personal (MailboxName ServerMetadataChange))")
        assert r[-1].startswith(b"n OK"), r
        r = b.command(b"m", b"NOTIFY SET (personal (MessageNew AnnotationChange))")
        assert r[-1].startswith(b"m NO"), r
        assert a.command(b"c", b'CREATE "%s"' % folder.encode())[-1].startswith(b"c OK")
        set_pref(a, b'"on"')
        got = _collect(b, 4, lambda g: any(b"METADATA" in x for x in g) and any(b"LIST" in x for x in g))
        assert any(x.startswith(b"* LIST") for x in got) and any(x.startswith(b"* METADATA") for x in got), got
    finally:
        set_pref(a, b"NIL")
        a.close()
        b.close()



def _imap_processes(user: str) -> dict[int, str]:
    """Dovecot's imap processes of ``user``, by pid, with their titles (verbose_proctitle: the user and the
    command running)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "/imap [" in title and f"[{user} " in title:
            found[int(entry)] = title
    return found


def test_a_change_made_while_the_watch_reconnects_is_told(make_proxy, dovecot):
    """The watch's connection is lost (its Dovecot process dies: a backend restart) and mail is delivered
    before it is back: when its NOTIFY is armed again, what differs from the baseline it had is told like
    any other change (it was taken as the new baseline, and the change told to nobody)."""
    p = make_proxy()
    user = "gap" + uuid.uuid4().hex[:6]
    dovecot.add_user(user, f"{user}pw")
    folder = new_folder(dovecot, user)
    phone = device(p, "phone-1", user)
    set_pref(phone, b'"on"')
    idle(phone)
    time.sleep(0.5)
    background = [pid for pid, title in _imap_processes(user).items() if " IDLE]" not in title]
    assert len(background) == 2, _imap_processes(user)  # (the side connection and the watch)
    for pid in background:
        os.kill(pid, signal.SIGKILL)
    dovecot.deliver(user, folder, make_object("chat", seed=7))
    line = wait_status(phone, folder, 10)
    assert line is not None and b"MESSAGES 2" in line, line
    phone.close()


def _socket_fds(pid: int) -> int:
    fds = f"/proc/{pid}/fd"
    count = 0
    for f in os.listdir(fds):
        try:
            count += os.readlink(os.path.join(fds, f)).startswith("socket:")
        except FileNotFoundError:
            pass  # (closed since the listing)
    return count


def _settled_socket_fds(pid: int, timeout: float = 8.0) -> int:
    """The count of ``pid``'s sockets once it stopped changing for a second (connections lingering or
    being closed are gone; a loaded machine takes longer than the proxy's own delays)."""
    count, since, deadline = _socket_fds(pid), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < 1.0 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _socket_fds(pid)
        if now != count:
            count, since = now, time.monotonic()
    return count


def test_a_watch_opened_as_its_session_ends_is_closed(make_proxy, dovecot):
    """Found by the soak review: notifications turned on and LOGOUT at once, the user's watch connection
    finished connecting after the session had ended: its login raised (the credentials were gone) and
    the connection was left open, owned by no one (300 of 300 such sessions), until the backend's own
    timeout for connections that never log in."""
    user = "watchend" + uuid.uuid4().hex[:6]
    dovecot.add_user(user, "pw")
    p = make_proxy(backend_extra="side_linger = 0.2")
    c = raw_via(p)
    c.command(b"i", b'ID ("x-cpm-device-id" "phone")')
    assert c.login(user, "pw")[-1].startswith(b"L OK")
    c.close()
    baseline = _settled_socket_fds(p.proc.pid)  # (the first session's side connections gone)
    for on in (b"on", b"off") * 6:
        c = raw_via(p)
        c.command(b"i", b'ID ("x-cpm-device-id" "phone")')
        assert c.login(user, "pw")[-1].startswith(b"L OK")
        c.send(b'm SETMETADATA "" (/private/vendor/vendor.cpmproxy/notifications "%s")\r\nz LOGOUT\r\n' % on)
        c.closed()  # (the BYE, the LOGOUT answer, then the end)
        c.close()
        time.sleep(0.3)  # (past side_linger: each round opens the watch anew)
    assert _settled_socket_fds(p.proc.pid) <= baseline


def test_an_offline_watch_goes_by_any_device_of_the_user_with_notifications_on(monkeypatch):
    """Found by the backend-failure review: after a user's last session here ended, whether their changes
    were still watched (for pushes to offline devices) was decided by that last session's device alone:
    a device of a class with notifications forced that had left a moment before no longer counted, and
    nothing was pushed. Any device of the user seen here since the watch was last offline counts now,
    with the account's preferences as last read."""
    from types import SimpleNamespace

    from twisted.internet import defer
    from twisted.internet.task import Clock

    import plugins.notify as notify
    from plugins.policy import PolicyPlugin
    from plugins.policyconfig import Policy
    from plugins.policystate import PolicySession

    monkeypatch.setattr(notify, "reactor", Clock())
    monkeypatch.setattr(notify.UserWatch, "refresh", lambda self: defer.succeed(None))
    monkeypatch.setattr(notify.UserWatch, "start_later", lambda self: None)
    policy = PolicyPlugin(None)
    push = SimpleNamespace(watch_offline=lambda user: 86400.0)
    proxy = SimpleNamespace(hooks=SimpleNamespace(plugins=[push, policy], by_name={"policy": policy}))
    plugin = notify.NotifyPlugin(proxy)
    monkeypatch.setattr(plugin, "master_configured", lambda: True)

    class Session(SimpleNamespace):
        __hash__ = object.__hash__

    def session(device_policy, prefs):
        return Session(state={"policy": PolicySession(device_policy, account_prefs=prefs)}, user="alice",
                       phase="auth", device_id="d")

    def online(*sessions):
        for s in sessions:
            plugin._ensure_watch(s)

    def offline(last):  # (every session gone, ``last`` the last to leave)
        watch = plugin.watches["alice"]
        watch.sessions.clear()
        assert plugin._keep_offline(watch, last)
        return plugin.events_wanted(watch)

    forced, plain = session(Policy(notifications="forced"), {}), session(Policy(), {})
    online(forced, plain)
    assert offline(plain)  # (the forced device left first)
    online(plain)  # online again with the plain device only: its leaving decides, nothing else was seen
    assert not offline(plain)
    on = session(Policy(), {"notifications": "on"})  # (the account's preference as last read, any device's)
    online(session(Policy(notifications="off"), {}), on)
    assert offline(on)


def test_an_offline_watch_keeps_one_timer_and_only_what_it_reads(monkeypatch):
    """Found by the soak review: each logout of a user with pushes armed one more 24-hour expiry timer
    (the one before was never cancelled: 1,030 timers after 1,000 logouts of 30 users), and the watch
    kept the last session's whole policy state, its selected mailbox's view too (~0.4 MB each)."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    import plugins.notify as notify
    from plugins.policy import PolicyPlugin
    from plugins.policyconfig import Policy
    from plugins.policystate import PolicySession
    from plugins.view import MailboxView

    clock = Clock()
    monkeypatch.setattr(notify, "reactor", clock)
    policy = PolicyPlugin(None)
    last = PolicySession(Policy(), account_prefs={"notifications": "on"})
    last.view = MailboxView(range(1, 3001), {5})
    session = SimpleNamespace(state={"policy": last}, user="alice")
    push = SimpleNamespace(watch_offline=lambda user: 86400.0)
    proxy = SimpleNamespace(hooks=SimpleNamespace(plugins=[push, policy], by_name={"policy": policy}))
    plugin = notify.NotifyPlugin(proxy)
    monkeypatch.setattr(plugin, "master_configured", lambda: True)
    watch = plugin.watches["alice"] = notify.UserWatch(plugin, "alice")
    for _ in range(5):  # (five logouts, each the user's last session)
        assert plugin._keep_offline(watch, session)
    assert len(clock.getDelayedCalls()) == 1
    kept = watch.offline_state
    assert kept.view is None and not kept.folders and kept.account_prefs == {"notifications": "on"}
    assert plugin.enabled_in(kept) == plugin.enabled_in(last)
    watch.cancel_expiry()  # (online again: _ensure_watch)
    assert not clock.getDelayedCalls()


def test_a_watch_connection_the_backend_drops_is_counted(monkeypatch):
    """Found by the backend-failure review: a watch connection lost (its Dovecot process killed) was
    reconnected without a word in the log or the metrics. Closed by the proxy itself, it is neither."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    import plugins.notify as notify
    from cpmproxy.proxy.metrics import Metrics

    monkeypatch.setattr(notify, "reactor", Clock())
    metrics = Metrics()
    plugin = SimpleNamespace(proxy=SimpleNamespace(metrics=metrics))
    watch = notify.UserWatch(plugin, "alice")
    monkeypatch.setattr(watch, "wanted", lambda: False)

    def lost_count():
        return metrics.registry.get_sample_value("cpmproxy_backend_errors_total", {"kind": "watch"}) or 0

    watch.proto = SimpleNamespace(closed=True, close=lambda: None)
    watch._lost()
    assert lost_count() == 1
    watch.proto = SimpleNamespace(closed=False, close=lambda: None)
    watch.close()
    watch._lost()  # (the proxy closed it)
    assert lost_count() == 1


@pytest.mark.parametrize("hidden", [False, True], ids=["plain", "view"])
@pytest.mark.parametrize("how", [b"CLOSE", b"EXPUNGE"])
def test_the_last_status_an_idle_device_hears_is_the_mailbox_as_it_is(make_proxy, dovecot, hidden, how):
    """Found by review (without the backend watch, so that only the proxy's own publishing tells): a CLOSE
    that expunged was never told (at its OK no mailbox is selected, and under a view it is an UNSELECT at
    the backend); and under a view the STATUS of the flag change before an EXPUNGE, whose counts took
    longer to adjust, came after the expunge's: the device was left with the older count."""
    folder = new_folder(dovecot)  # (a chat)
    dovecot.deliver("alice", folder, make_object("imdn"))
    dovecot.deliver("alice", folder, make_object("chat", text="second"))
    extra = "[plugin.notify]\nwatch_backend = false\n" + ("[policy]\nsync = { imdn = false }\n" if hidden else "")
    p = make_proxy(config_extra=extra)
    b = device(p, "B")
    set_pref(b, b'"on"')
    a = device(p, "A")
    try:
        idle(b)
        assert a.command(b"s", b'SELECT "%s"' % folder.encode())[-1].startswith(b"s OK")
        assert a.command(b"d", b"STORE 1 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"d OK")
        assert a.command(b"c", how)[-1].startswith(b"c OK")
        told = [x for x in lines_within(b, 2.5) if x.startswith(b"* STATUS")]
        assert told and b"(MESSAGES %d " % (1 if hidden else 2) in told[-1], told
    finally:
        set_pref(a, b"NIL")
        a.close()
        b.close()


def test_the_close_of_a_mailbox_examined_tells_no_one(make_proxy, dovecot):
    """Found by review: every CLOSE was told as expunges (a STATUS to each of the user's devices), though
    one of a mailbox EXAMINEd, read-only, expunges nothing (RFC 9051 6.4.1)."""
    folder = new_folder(dovecot)
    p = make_proxy(config_extra="[plugin.notify]\nwatch_backend = false\n")
    b = device(p, "B")
    set_pref(b, b'"on"')
    a = device(p, "A")
    try:
        idle(b)
        for tag, select in ((b"e", b"EXAMINE"), (b"s", b"SELECT")):
            assert a.command(tag, b'%s "%s"' % (select, folder.encode()))[-1].startswith(tag + b" OK")
            assert a.command(b"c", b"CLOSE")[-1].startswith(b"c OK")
            told = [x for x in lines_within(b, 1.0) if x.startswith(b"* STATUS")]
            assert len(told) == (0 if select == b"EXAMINE" else 1), (select, told)
    finally:
        set_pref(a, b"NIL")
        a.close()
        b.close()


@pytest.mark.parametrize("literal", [b"{3}", b"{3+}"])
def test_notify_fetch_att_after_a_literal_never_sets_seen_on_a_hidden_message(make_proxy, dovecot, literal):
    """Found by review (helper-70): a NOTIFY whose mailbox name is a literal had the rest of it (filters,
    MessageNew's fetch attributes) go to the backend unread: its `BODY[]` set \\Seen on a hidden IMDN
    as it arrived, for every device."""
    folder = "Vis" + uuid.uuid4().hex[:8]
    dovecot.deliver("alice", folder, make_object("chat", text="visible"))
    p = make_proxy(config_extra='[policy]\nsync = { imdn = false }\n')
    b = device(p, "B")
    try:
        assert b.command(b"s", b'SELECT "%s"' % folder.encode())[-1].startswith(b"s OK")
        r = send_with_literal(b, b"n", b"NOTIFY SET (mailboxes ", literal,
                              b"Foo (MessageNew)) (selected (MessageNew (UID BODY[]) MessageExpunge))")
        assert r[-1].startswith(b"n OK"), r
        uid = dovecot.deliver("alice", folder, make_object("imdn"))
        lines_within(b, 1.5)
        b.command(b"o", b"NOOP")
        assert b"\\Seen" not in server_flags(dovecot, "alice", folder, uid)
        # (RFC822 after a literal is refused as it is without one)
        r = send_with_literal(b, b"r", b"NOTIFY SET (mailboxes ", literal, b"Foo (MessageNew)) (selected (MessageNew (UID RFC822)))")
        assert r[-1].startswith(b"r NO [CANNOT]"), r
    finally:
        b.close()
