"""What a hostile client tried, found by a security review (2026-11-27): values of its own that reached the
proxy's commands to the backend, and ways past the view that the backend reads otherwise than the proxy.

Real Dovecot and proxy processes."""

from __future__ import annotations

import uuid

import pytest

from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via
from tests.test_hostile_backend import internal_errors
from tests.test_notify import _Receiver
from tests.test_push_admin import _push_config

DEVICES = b"/private/vendor/vendor.cpmproxy/devices"


def ensure_user(dovecot, name: str) -> None:
    """A user of these tests' own."""
    if name not in dovecot.users:
        dovecot.add_user(name, f"{name}pw")


@pytest.fixture(autouse=True)
def erin(dovecot):
    ensure_user(dovecot, "erin")


def login(p, user: str = "erin", device: bytes = b"phone") -> RawIMAP:
    c = raw_via(p)
    assert c.command(b"i", b'ID ("x-cpm-device-id" "%s")' % device)[-1].startswith(b"i OK")
    assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
    return c


def folders(dovecot, user: str) -> list[str]:
    d = dovecot.imap_direct(user, tls="none")
    names = [name for _, _, name in d.list_folders()]
    d.logout()
    return names


def test_id_values_with_control_characters_are_refused(make_proxy, dovecot, proxy_certs):
    """A device id in a literal carried CR LF into the push plugin's SETMETADATA on the user's side
    connection: the lines after it ran there as commands of their own, past every hook (an EXAMINE of an
    excluded folder and a COPY out of it, a CREATE)."""
    receiver = _Receiver(proxy_certs)
    receiver.start()
    try:
        p = make_proxy(config_extra=_push_config(receiver, proxy_certs, offline_watch=0))
        marker = "Injected" + uuid.uuid4().hex[:6]
        evil = b'zz"\r\nX1 CREATE ' + marker.encode() + b'\r\nX2 NOOP'
        c = raw_via(p)
        r = c.command(b"i", b'ID ("x-cpm-device-id" {%d+}\r\n%s)' % (len(evil), evil))
        assert r[-1].startswith(b"i BAD [CLIENTBUG] Invalid ID parameters."), r
        long_id = b"d" * 129
        r = c.command(b"j", b'ID ("x-cpm-device-id" "%s")' % long_id)
        assert r[-1].startswith(b"j BAD [CLIENTBUG] The device id is longer than 128"), r
        assert c.login("erin", "erinpw")[-1].startswith(b"L OK")
        c.close()
        # A device id the quoted form cannot carry (quotes, 8-bit) is recorded as it is, as one value.
        odd = 'tab"let\\ \u00e9'.encode()
        c = raw_via(p)
        r = c.command(b"i", b'ID ("x-cpm-device-id" {%d+}\r\n%s)' % (len(odd), odd))
        assert r[-1].startswith(b"i OK"), r
        assert c.login("erin", "erinpw")[-1].startswith(b"L OK")
        c.close()
        assert marker not in folders(dovecot, "erin")
        d = RawIMAP("127.0.0.1", dovecot.port)
        d.login("erin", "erinpw")
        r = d.command(b"m", b'GETMETADATA (DEPTH 1) "" (' + DEVICES + b")")
        assert odd in b"".join(r), r
        d.close()
        assert "Traceback" not in p.log()
    finally:
        receiver.stop()


def test_user_names_with_control_characters_are_refused(make_proxy):
    """A CR in a user name (a literal) forged lines in the proxy's text log ("login user=admin ...")."""
    p = make_proxy()
    c = raw_via(p)
    name = b"x\rlogin user=admin device=x"
    r = c.command(b"L", b"LOGIN {%d+}\r\n%s pw" % (len(name), name))
    assert r[-1].startswith(b"L BAD [CLIENTBUG] Invalid user name."), r
    c.close()
    assert "user=admin" not in p.log()


def test_inbox_children_are_excluded_in_any_case(make_proxy, dovecot):
    """The backend takes "inbox/Private" for "INBOX/Private"; the policy compared the name as written."""
    dovecot.deliver("erin", "INBOX/Private", make_object("chat", text="private"))
    for pattern in ("INBOX/Private", "inbox/Priv*"):  # (an operator's pattern in lower case, too)
        p = make_proxy(config_extra=f'[policy]\nexclude_folders = ["{pattern}"]\n')
        c = login(p)
        for spelling in (b"inbox/Private", b"Inbox/Private", b"INBOX/Private"):
            r = c.command(b"s", b'STATUS "%s" (MESSAGES)' % spelling)
            assert r[-1].startswith(b"s NO [NONEXISTENT]"), (pattern, spelling, r)
            r = c.command(b"e", b'EXAMINE "%s"' % spelling)
            assert r[-1].startswith(b"e NO [NONEXISTENT]"), (pattern, spelling, r)
        c.close()


def test_imap_urls_are_neither_offered_nor_taken(make_proxy, dovecot):
    """APPEND ... CATENATE (URL "/Secret/;UID=1") copied a message out of an excluded folder (and a hidden
    message's text out of a visible one); URLs name folders and UIDs the view never checks."""
    dovecot.deliver("erin", "Secret", make_object("chat", text="secret"))
    p = make_proxy(config_extra='[policy]\nexclude_folders = ["Secret"]\n')
    c = login(p)
    caps = c.command(b"c", b"CAPABILITY")[0].upper()
    assert b" CATENATE" not in caps and b"URL-PARTIAL" not in caps and b"URLAUTH" not in caps, caps
    r = c.command(b"a", b'APPEND INBOX CATENATE (URL "/Secret/;UID=1")')
    assert r[-1].startswith(b"a NO [CANNOT]"), r
    r = c.command(b"u", b'URLFETCH "imap://erin@localhost/Secret/;UID=1"')
    assert r[-1].startswith(b"u NO [CANNOT]"), r
    # (A mailbox name in a literal, with a quote in it, hid the keyword from a first version of the check.)
    name = b'qa"x'
    r = c.command(b"l", b'APPEND {%d+}\r\n%s CATENATE (URL "/Secret/;UID=1")' % (len(name), name))
    assert r[-1].startswith(b"l NO [CANNOT]"), r
    # A mailbox or a flag named CATENATE is no CATENATE.
    assert c.command(b"k", b"CREATE CATENATE")[-1].startswith(b"k OK")
    for tag, head in ((b"v", b"APPEND CATENATE (\\Seen)"), (b"w", b"APPEND INBOX (CATENATE \\Seen)")):
        msg = make_object("chat", text="named so")
        r = c.command(tag, head + b" {%d+}\r\n%s" % (len(msg), msg))
        assert r[-1].startswith(tag + b" OK"), r
    # A URL part after a literal (a CATENATE's TEXT part, a MULTIAPPEND's first message): the whole
    # command refused, nothing saved, and nothing of the line left to be read as a command of its own.
    before = c.command(b"s", b"STATUS INBOX (MESSAGES)")[0]
    marker = "Injected" + uuid.uuid4().hex[:6]
    msg = make_object("chat", text="first")
    for tag, command in (
            (b"m", b'APPEND INBOX {%d+}\r\n%s CATENATE (URL "/Secret/;UID=1")' % (len(msg), msg)),
            (b"t", b'APPEND INBOX CATENATE (TEXT {5+}\r\nhello URL "/Secret/;UID=1")'),
            (b"x", b"APPEND INBOX CATENATE (TEXT {5+}\r\nhello URL x1 CREATE %s)" % marker.encode())):
        r = c.command(tag, command)
        assert r[-1].startswith(tag + b" BAD"), r
        assert c.command(b"s", b"STATUS INBOX (MESSAGES)")[0] == before
    # TEXT parts alone are the client's own bytes: taken.
    r = c.command(b"y", b"APPEND INBOX CATENATE (TEXT {%d+}\r\n%s)" % (len(msg), msg))
    assert r[-1].startswith(b"y OK"), r
    assert marker not in folders(dovecot, "erin")
    c.close()


def _selected_hiding_an_imdn(make_proxy, dovecot, kinds: tuple[str, ...]) -> tuple:
    """A new folder of erin's holding ``kinds`` (one IMDN among two chats), selected through a proxy whose
    policy hides IMDNs: (the proxy, the client, the folder); the client sees two messages."""
    folder = "Default/tel:+1666" + uuid.uuid4().hex[:6]
    for kind in kinds:
        dovecot.deliver("erin", folder, make_object(kind))
    p = make_proxy(config_extra="[policy]\nsync = { imdn = false }\n")
    c = login(p)
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder.encode())
    return p, c, folder


def test_sequence_sets_the_view_cannot_read_are_refused(make_proxy, dovecot):
    """Dovecot reads "01" as 1; the view could not parse it and passed the command on in the client's
    numbers: as UID 01 a hidden message was flagged \\Deleted and expunged, by number the backend's
    message 1 (a hidden one) was touched."""
    p, c, folder = _selected_hiding_an_imdn(make_proxy, dovecot, ("imdn", "chat", "chat"))
    for tag, command in ((b"a", b"UID STORE 01 +FLAGS (\\Deleted)"), (b"b", b"STORE 01 +FLAGS (\\Flagged)"),
                         (b"c", b"UID COPY 01 INBOX"), (b"d", b"COPY 01:2 INBOX"), (b"e", b"SEARCH 01"),
                         (b"f", b"UID EXPUNGE 01")):
        r = c.command(tag, command)
        assert r[-1].startswith(tag + b" BAD [CLIENTBUG]"), (command, r)
    # Criteria nested past what the view rewrites: refused, not a traceback per command in the log.
    r = c.command(b"n", b"UID SEARCH " + b"NOT " * 1200 + b"ALL")
    assert r[-1].startswith(b"n BAD [CLIENTBUG]"), r
    # ... with parentheses between the NOTs (each list began the count again: a RecursionError, SERVERBUG;
    # found by the code-shape review).
    r = c.command(b"p", b"UID SEARCH " + (b"(" + b"NOT " * 99) * 10 + b"ALL" + b")" * 10)
    assert r[-1].startswith(b"p BAD [CLIENTBUG]"), r
    c.close()
    d = dovecot.imap_direct("erin", tls="none")
    d.select_folder(folder, readonly=True)
    assert d.get_flags([1]) == {1: ()}, "the hidden IMDN must not be touched"
    d.logout()
    assert internal_errors(p) == 0 and "Traceback" not in p.log()


def test_a_users_recorded_devices_are_bounded(make_proxy, dovecot, proxy_certs):
    """Every new device id was recorded for good (METADATA read at every login of the user, listed in every
    push): a client making up ids grew them without bound."""
    ensure_user(dovecot, "frank")
    receiver = _Receiver(proxy_certs)
    receiver.start()
    try:
        p = make_proxy(config_extra=_push_config(receiver, proxy_certs, offline_watch=0) + "max_devices = 2\n")
        for i in range(4):
            login(p, "frank", b"made-up-%d" % i).close()
        d = RawIMAP("127.0.0.1", dovecot.port)
        d.login("frank", "frankpw")
        recorded = b"".join(d.command(b"m", b'GETMETADATA (DEPTH 1) "" (' + DEVICES + b")"))
        d.close()
        assert [i for i in range(4) if b"made-up-%d" % i in recorded] == [0, 1], recorded
        assert "not recorded: the user has 2 devices recorded already" in p.log()
    finally:
        receiver.stop()


def test_failed_logins_count_per_ipv4_address_and_per_ipv6_slash_64():
    from cpmproxy.proxy.service import throttle_key

    assert throttle_key("192.0.2.7") == "192.0.2.7"
    # One device or customer gets a /64: any address of it is the same source of failures.
    assert throttle_key("2001:db8:1:2::1") == throttle_key("2001:db8:1:2:ffff:0:0:9") == "2001:db8:1:2::/64"
    assert throttle_key("2001:db8:1:3::1") != throttle_key("2001:db8:1:2::1")
    assert throttle_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert throttle_key("/run/cpmproxy.sock") == "/run/cpmproxy.sock"  # (not an address: kept as it is)


def test_failed_login_delays_double_per_source_forget_old_ones_and_stay_bounded(tmp_path, monkeypatch):
    """The table of recent failures is kept oldest first: an address past the window starts again at the
    base delay, and under a distributed attack the oldest sources are forgotten one by one (the table
    was rebuilt whole at every failure once it held 100,000 sources, ~10 ms of CPU each)."""
    from twisted.internet.task import Clock

    from cpmproxy.config import load_config
    from cpmproxy.proxy import service as service_module
    from cpmproxy.proxy.service import ProxyService

    path = tmp_path / "c.toml"
    path.write_text('plugins = []\n[proxy]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[backend]\nport = 1\n'
                    '[limits]\nauth_failure_delay = 1.0\nauth_failure_delay_max = 4.0\nauth_failure_window = 60\n')
    svc = ProxyService(load_config(path), reactor=Clock())
    now = [1000.0]

    class FakeTime:
        @staticmethod
        def monotonic():
            return now[0]

    monkeypatch.setattr(service_module, "time", FakeTime)
    assert [svc.auth_failed("2001:db8::%d" % i) for i in range(1, 5)] == [1.0, 2.0, 4.0, 4.0]
    assert svc.auth_failed("192.0.2.1") == 1.0  # another source: its own count
    now[0] += 61
    assert svc.auth_failed("2001:db8::9") == 1.0  # past the window: counted from the start again
    assert list(svc._failures) == ["2001:db8::/64"]  # (the old entry of 192.0.2.1 is gone)

    monkeypatch.setattr(service_module, "AUTH_FAILURES_KEPT", 3)
    for i in range(5):
        svc.auth_failed(f"198.51.100.{i}")
    assert list(svc._failures) == ["198.51.100.2", "198.51.100.3", "198.51.100.4"]
    svc.auth_failed("198.51.100.2")  # a repeated source becomes the newest, its count kept
    assert list(svc._failures) == ["198.51.100.3", "198.51.100.4", "198.51.100.2"]
    assert svc._failures["198.51.100.2"][0] == 2


def test_connections_count_per_ipv4_address_and_per_ipv6_slash_64(tmp_path):
    """max_connections_per_ip counts an IPv6 client's /64 as one source, as the login throttle does: a
    client with a /64 could otherwise open connections from as many addresses as it liked."""
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from cpmproxy.config import load_config
    from cpmproxy.proxy.service import ProxyService

    path = tmp_path / "c.toml"
    path.write_text('plugins = []\n[proxy]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[backend]\nport = 1\n'
                    '[limits]\nmax_connections_per_ip = 2\n')
    svc = ProxyService(load_config(path), reactor=Clock())

    class Client(SimpleNamespace):
        __hash__ = object.__hash__

    def client(host):
        return Client(peer_host=host, user=None)

    first = [client("2001:db8:0:7::1"), client("2001:db8:0:7::2")]
    assert [svc.admit(c) for c in first] == [None, None]
    assert svc.admit(client("2001:db8:0:7::3")) == "Too many connections from your address."
    assert svc.admit(client("2001:db8:0:8::1")) is None  # (another /64)
    assert svc.admit(client("192.0.2.1")) is None and svc.admit(client("192.0.2.2")) is None
    svc.forget(first[0])
    assert svc.admit(client("2001:db8:0:7::4")) is None
    moved = client("2001:db8:0:8::2")
    assert svc.admit(moved) is None
    svc.rehome(moved, "198.51.100.9")  # (PROXY protocol: the real address)
    moved.peer_host = "198.51.100.9"
    assert svc.by_ip == {"2001:db8:0:7::/64": 2, "2001:db8:0:8::/64": 1, "192.0.2.1": 1, "192.0.2.2": 1,
                         "198.51.100.9": 1}


@pytest.mark.parametrize("select", [b'SELECT "%s" ~{1+}\r\nx', b'EXAMINE "%s" (CONDSTORE ~{1}\r\nx)',
                                    b"SELECT {%d+}\r\n%%s ~{1+}\r\nx", b'SELECT ~{%d+}\r\n%%s'])
def test_a_select_with_a_binary_literal_keeps_the_view(make_proxy, dovecot, select):
    """Found by the adversarial-input review: Dovecot refuses a literal8 outside APPEND as it parses the line,
    before the command runs, and the mailbox selected before stays selected; the proxy took the BAD for a
    failed SELECT (none selected) and dropped the view: the hidden IMDN was read, by number and by UID."""
    p, c, folder = _selected_hiding_an_imdn(make_proxy, dovecot, ("chat", "imdn", "chat"))
    name = folder.encode()
    line = select % len(name) % name if b"%d" in select else select % name
    head, rest = line.split(b"\r\n", 1)
    if head.endswith(b"+}"):
        r = c.command(b"b", line)
    else:  # (a synchronizing literal: the refusal, or "+" and then the rest)
        c.send(b"b " + head + b"\r\n")
        r = [c.read_response()]
        if r[0].startswith(b"+"):
            c.send(rest + b"\r\n")
            r = c.until_tagged(b"b")
        elif not r[0].startswith(b"b "):
            r += c.until_tagged(b"b")
    assert r[-1].startswith((b"b BAD", b"b NO")), r
    got = c.command(b"f", b"FETCH 1:* (UID)") + c.command(b"u", b"UID FETCH 1:* (UID)")
    c.close()
    assert not any(b"UID 2)" in x for x in got), got


def test_a_carriage_return_in_a_section_after_a_literal_is_refused_not_a_hung_proxy(make_proxy, dovecot):
    """Found by the tokenizer's fuzz test (test_tokens.py, in CI): inside ``[...]`` after a literal, a bare
    CR sent the scan back to that literal's announcement, for ever. A FETCH is read whole where messages
    can be hidden, so one command hung the proxy process, every user's session with it."""
    p, c, _folder = _selected_hiding_an_imdn(make_proxy, dovecot, ("imdn", "chat", "chat"))
    c.sock.settimeout(10)
    c.send(b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS ({2+}\r\nab X\rY)])\r\n")
    r = c.until_tagged(b"a")
    assert r[-1].startswith(b"a BAD [CLIENTBUG]"), r
    assert c.command(b"b", b"NOOP")[-1].startswith(b"b OK")
    c.close()
    assert internal_errors(p) == 0 and "Traceback" not in p.log()
