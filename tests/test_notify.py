"""CPM notifications: all of a user's devices hear of every change, once the user enabled it.

Real Dovecot, several devices, two proxy processes, a real HTTPS push receiver."""

from __future__ import annotations

import http.server
import json
import select
import socket
import ssl
import threading
import time
import uuid

from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via

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
    assert not any(b"STATUS" in line for line in lines_within(bob, 2.5))
    a.close()
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
                                f"backoff = 0.2\nmax_backoff = 1.0\n")
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
        assert ev["devices"] == ["tablet-1"]
        assert list(ev["kinds"].values()) == ["chat"]
        assert "for the tablet" not in json.dumps(ev)  # never message content
    finally:
        phone.close()
        receiver.stop()
