"""After login the proxy relays: real clients, every literal form, pipelining, IDLE, big messages."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid

import imapclient
import pytest

from cpmproxy.testing.rawclient import RawIMAP
from tests.proxyfix import imap_via, raw_via, still_serving


def _msg(subject: str, size: int = 0) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (size // 78 + 1) if size else b"hello\r\n"
    return (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: " + subject.encode() +
            b"\r\nMessage-ID: <" + uuid.uuid4().hex.encode() + b"@example.com>\r\n\r\n" + body)


def _fresh_folder(user="alice") -> str:
    return "t-" + uuid.uuid4().hex[:10]


def test_imapclient_session_basic(proxy, dovecot):
    folder = _fresh_folder()
    c = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False, timeout=30)
    c.login("alice", "alicepw")
    c.create_folder(folder)
    for i in range(5):
        c.append(folder, _msg(f"m{i}"), flags=[b"\\Seen"] if i % 2 else [])
    info = c.select_folder(folder)
    assert info[b"EXISTS"] == 5
    uids = c.search(["UNSEEN"])
    assert len(uids) == 3
    c.add_flags(uids, [b"\\Flagged", b"$Custom"])
    flags = c.get_flags(c.search("ALL"))
    assert sum(1 for f in flags.values() if b"\\Flagged" in f) == 3
    body = c.fetch(uids[:1], ["BODY.PEEK[]", "RFC822.SIZE", "ENVELOPE"])
    assert b"Subject: m0" in body[uids[0]][b"BODY[]"]
    c.logout()
    # The change is on the server.
    d = dovecot.imap_direct("alice", tls="none")
    d.select_folder(folder)
    assert len(d.search(["FLAGGED"])) == 3
    d.delete_folder(folder)
    d.logout()


def test_every_literal_form_in_append(proxy):
    folder = _fresh_folder()
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        assert c.command(b"c", b"CREATE " + folder.encode())[-1].startswith(b"c OK")
        m = _msg("sync")
        c.send(b"a1 APPEND %s {%d}\r\n" % (folder.encode(), len(m)))
        assert c.read_line().startswith(b"+")
        c.send(m + b"\r\n")
        assert c.until_tagged(b"a1")[-1].startswith(b"a1 OK [APPENDUID")
        m = _msg("plus")
        assert c.command(b"a2", b"APPEND %s {%d+}\r\n%s" % (folder.encode(), len(m), m))[-1].startswith(b"a2 OK")
        m = _msg("binary") + b"\x00bin"
        r = c.command(b"a3", b"APPEND %s ~{%d+}\r\n%s" % (folder.encode(), len(m), m))
        assert r[-1].startswith(b"a3 OK"), r
        # MULTIAPPEND: three messages in one command, all with non-synchronizing literals.
        parts = b"".join(b" (\\Seen) {%d+}\r\n%s" % (len(x), x) for x in (_msg("ma1"), _msg("ma2"), _msg("ma3")))
        r = c.command(b"a4", b"APPEND " + folder.encode() + parts)
        assert r[-1].startswith(b"a4 OK [APPENDUID"), r
        # CATENATE with a text part in a literal.
        r = c.command(b"a5", b"APPEND %s CATENATE (TEXT {%d+}\r\n%s)" % (folder.encode(), len(m), m))
        assert r[-1].startswith(b"a5 OK"), r
        r = c.command(b"s", b"STATUS %s (MESSAGES)" % folder.encode())
        assert b"MESSAGES 7" in r[0]
        c.command(b"d", b"DELETE " + folder.encode())


def test_literal_of_a_refused_command_never_runs_as_commands(proxy, dovecot):
    """Dovecot reads the non-synchronizing literal of a command it refused (here at a flag it rejects) as
    commands of its own: they would reach it past every hook (a view's, local delete's). The proxy sends
    literals to the backend as synchronizing ones and drops the data of a refused command."""
    folder = _fresh_folder()
    dovecot.deliver("alice", folder, _msg("victim"))
    inner = b'z SELECT "%s"\r\ny STORE 1 +FLAGS (\\Flagged)\r\n' % folder.encode()
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        for tag, flags in ((b"a", b"(\\Bogus)"), (b"b", b"(\\Seen) {3+}\r\nabc (\\Bogus)")):
            c.send(tag + b' APPEND "%s" ' % folder.encode() + flags + b" {%d+}\r\n" % len(inner) + inner + b"\r\n")
            r = c.until_tagged(tag)
            assert r[-1].startswith(tag + b" BAD") and not any(x[:2] in (b"y ", b"z ") for x in r), r
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # (the session goes on, in step)
    imap = dovecot.imap_direct("alice", tls="none")
    imap.select_folder(folder, readonly=True)
    assert imap.search("FLAGGED") == [] and len(imap.search("ALL")) == 1
    imap.logout()


@pytest.mark.parametrize("literal", [b"{%d}", b"{%d-}", b"~{%d-}"])
def test_literal_a_client_sends_too_early_never_runs_as_commands(proxy, dovecot, literal):
    """A client that sends a synchronizing literal's bytes without waiting for "+", or uses LITERAL- (which
    Dovecot does not take): Dovecot answered the command at once and read those bytes as commands of its
    own, past every hook (here a SETMETADATA of the proxy's own entries, which it refuses a client). Now a
    synchronizing literal's bytes wait for the backend's "+" (refused, they are the client's next command,
    through the hooks), and a non-synchronizing one is sent the careful way, as LITERAL+ is."""
    inner = b's1 SETMETADATA "" (/private/vendor/vendor.cpmproxy/localdelete/evil "smuggled")\r\n'
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        end = b"" if literal == b"{%d}" else b"\r\n"  # (after a literal the command goes on to its CRLF)
        c.send(b"a NOOP " + literal % len(inner) + b"\r\n" + inner + end)
        if literal == b"{%d}":
            r = c.until_tagged(b"s1")
            assert any(x.startswith(b"s1 NO [NOPERM]") for x in r), r
        else:  # (the bytes are the literal's: the command is refused, they never run)
            r = c.until_tagged(b"a")
            assert not any(x.startswith(b"s1 ") for x in r), r
        r = c.command(b"n", b"NOOP")
        assert r[-1].startswith(b"n OK") and not any(x.startswith(b"s1 ") for x in r), r  # (in step)
    d = RawIMAP("127.0.0.1", dovecot.port)
    d.login("alice", "alicepw")
    r = d.command(b"g", b'GETMETADATA "" /private/vendor/vendor.cpmproxy/localdelete/evil')
    d.close()
    assert not any(b"smuggled" in x for x in r), r


def test_client_gone_without_logout_leaves_no_backend_connection(make_proxy, dovecot):
    """Over TLS to the backend, a client that closed without LOGOUT left its backend connection open (the
    proxy waited for Dovecot's answer to its TLS close_notify, which never came): one Dovecot process per
    dropped mobile client, until mail_max_userip_connections locked the user out."""
    from cpmproxy.proxy.backend import CLOSE_GRACE

    p = make_proxy(backend_tls="starttls", plugins=[])
    for _ in range(4):
        c = raw_via(p)
        assert c.login("dave", "davepw")[-1].startswith(b"L OK")
        c.close()
    deadline = time.monotonic() + CLOSE_GRACE + 10
    while True:
        out = subprocess.run(["ss", "-tanp"], capture_output=True, text=True).stdout
        open_ = [x for x in out.splitlines() if f"pid={p.proc.pid}," in x and x.split()[4].endswith(f":{dovecot.port}")]
        if not open_:
            break
        assert time.monotonic() < deadline, open_
        time.sleep(0.5)


def test_big_append_and_fetch_20mb(proxy):
    folder = _fresh_folder()
    c = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False, timeout=60)
    c.login("alice", "alicepw")
    c.create_folder(folder)
    big = _msg("big", 20 * 1024 * 1024)
    c.append(folder, big)
    c.select_folder(folder)
    data = c.fetch([1], ["BODY.PEEK[]"])
    assert data[1][b"BODY[]"] == big
    c.delete_folder(folder)
    c.logout()


def test_pipelined_commands_keep_order_and_tags(proxy):
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        batch = b"".join(b"p%d NOOP\r\n" % i for i in range(50)) + b"s SELECT INBOX\r\nf UID FETCH 1:* (FLAGS)\r\n"
        c.send(batch)
        seen = set()
        while len(seen) < 52:
            line = c.read_response()
            tag = line.split(b" ", 1)[0]
            if tag != b"*":
                assert b" OK " in line, line
                seen.add(tag)
        assert seen == {b"p%d" % i for i in range(50)} | {b"s", b"f"}


def test_idle_through_proxy(proxy, dovecot):
    folder = _fresh_folder()
    d = dovecot.imap_direct("alice", tls="none")
    d.create_folder(folder)
    c = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False, timeout=30)
    c.login("alice", "alicepw")
    c.select_folder(folder)
    c.idle()
    d.append(folder, _msg("during idle"))
    responses = c.idle_check(timeout=10)
    c.idle_done()
    assert (1, b"EXISTS") in responses
    assert c.noop()[0]
    c.logout()
    d.delete_folder(folder)
    d.logout()


def test_enable_qresync_and_metadata(proxy):
    c = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False, timeout=30)
    c.login("alice", "alicepw")
    assert c.enable("QRESYNC") == [b"QRESYNC"]
    info = c.select_folder("INBOX")
    assert b"HIGHESTMODSEQ" in info
    c.logout()
    with raw_via(proxy) as r:
        r.login("alice", "alicepw")
        assert r.command(b"m1", b'SETMETADATA "" (/private/comment "hello via proxy")')[-1].startswith(b"m1 OK")
        out = r.command(b"m2", b'GETMETADATA "" /private/comment')
        assert out[0].startswith(b'* METADATA "" (/private/comment ') and b"hello via proxy)" in out[0], out
        assert out[-1].startswith(b"m2 OK")


def test_read_report_flag_mapped_both_ways(proxy, dovecot):
    folder = _fresh_folder()
    c = imap_via(proxy)
    c.create(folder)
    c.append(folder, r"(\Seen)", None, _msg("rr"))
    c.select(folder)
    typ, data = c.store("1", "+FLAGS", r"(\read-report-sent)")
    assert typ == "OK" and b"\\read-report-sent" in data[0]
    typ, data = c.fetch("1", "(FLAGS)")
    assert b"\\read-report-sent" in data[0]
    typ, data = c.search(None, "KEYWORD", r"\read-report-sent")
    assert data[0] == b"1"
    c.logout()
    d = dovecot.imap_direct("alice", tls="none")
    d.select_folder(folder)
    assert b"$ReadReportSent" in d.get_flags([1])[1]
    d.delete_folder(folder)
    d.logout()


def test_read_report_flag_on_every_message_of_a_multiappend(proxy, dovecot):
    """The flag lists of a MULTIAPPEND's later messages come after a literal, in segments the command hooks
    do not see (state["later_segments"]): Dovecot refused the flag there and the APPEND failed whole."""
    folder = _fresh_folder()
    m1, m2 = _msg("first"), _msg("second")
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        assert c.command(b"c", b'CREATE "%s"' % folder.encode())[-1].startswith(b"c OK")
        r = c.command(b"a", b'APPEND "%s" (\\Seen) {%d+}\r\n%s (\\read-report-sent) {%d+}\r\n%s'
                      % (folder.encode(), len(m1), m1, len(m2), m2))
        assert r[-1].startswith(b"a OK [APPENDUID"), r
        c.send(b'b APPEND "%s" (\\Seen) {%d}\r\n' % (folder.encode(), len(m1)))
        assert c.read_line().startswith(b"+")
        c.send(m1 + b" (\\read-report-sent \\Seen) {%d}\r\n" % len(m2))
        assert c.read_line().startswith(b"+")
        c.send(m2 + b"\r\n")
        assert c.until_tagged(b"b")[-1].startswith(b"b OK [APPENDUID")
    d = dovecot.imap_direct("alice", tls="none")
    d.select_folder(folder)
    flags = d.get_flags(d.search("ALL"))
    d.delete_folder(folder)
    d.logout()
    assert [b"$ReadReportSent" in f for _, f in sorted(flags.items())] == [False, True, False, True], flags


def test_slow_client_does_not_make_proxy_buffer(proxy, dovecot):
    """Backpressure: a client that stops reading a 60 MB FETCH costs the proxy far less than 60 MB."""
    folder = _fresh_folder()
    d = dovecot.imap_direct("alice", tls="none")
    d.create_folder(folder)
    big = _msg("big", 20 * 1024 * 1024)
    for _ in range(3):
        d.append(folder, big)
    d.logout()

    def rss_kb() -> int:
        for line in open(f"/proc/{proxy.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect((proxy.host, proxy.port))
    s.recv(4096)
    s.sendall(b"a LOGIN alice alicepw\r\nb SELECT " + folder.encode() + b"\r\n")
    time.sleep(0.5)
    s.recv(65536)
    before = rss_kb()
    s.sendall(b"c FETCH 1:3 BODY.PEEK[]\r\n")
    time.sleep(3)  # the backend would deliver 60 MB in well under a second
    grown = rss_kb() - before
    assert grown < 20 * 1024, f"proxy grew by {grown} KiB while the client was not reading"
    # Now read everything: all 60 MB arrive intact.
    got = 0
    s.settimeout(30)
    buf = b""
    while not buf.endswith(b"c OK Fetch completed.\r\n") and b"\r\nc OK" not in buf[-200:]:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
        buf = buf[-300:] + chunk
    assert got > 3 * len(big)
    s.close()
    assert still_serving(proxy)
    d = dovecot.imap_direct("alice", tls="none")
    d.delete_folder(folder)
    d.logout()


def test_client_vanishing_mid_literal_stores_nothing(proxy, dovecot):
    folder = _fresh_folder()
    d = dovecot.imap_direct("alice", tls="none")
    d.create_folder(folder)
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        c.send(b"a APPEND %s {100000+}\r\n" % folder.encode() + b"x" * 5000)
        time.sleep(0.3)
    time.sleep(0.5)
    assert d.folder_status(folder, ["MESSAGES"])[b"MESSAGES"] == 0
    d.delete_folder(folder)
    d.logout()
    assert still_serving(proxy)


def test_backend_drop_gives_bye(proxy, dovecot):
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        c.command(b"s", b"SELECT INBOX")
        # Kill this user's backend imap processes: the proxy must tell the client why.
        out = dovecot.doveadm("kick", "alice")
        assert out is not None
        line = c.read_line()
        while not line.startswith(b"* BYE"):
            line = c.read_line()
        assert c.closed()
    assert still_serving(proxy)


def test_proxy_process_alive(proxy):
    assert proxy.proc.poll() is None
    assert os.path.exists(proxy.log_path)


def test_bulk_fetch_byte_exact_with_flags_mapped_after_literals(proxy, dovecot):
    """A bulk FETCH goes through the relay's fast path, read by read; responses whose text concerns a
    plugin (the read-report keyword in FLAGS after the body literal, wherever a read ends) still get
    their mapping, and everything else is byte-for-byte what the backend sent."""
    from cpmproxy.testing.rawclient import RawIMAP

    folder = _fresh_folder()
    d = dovecot.imap_direct("alice", tls="none")
    d.create_folder(folder)
    sizes = [0, 10, 70_000, 300, 200_000, 5_000, 1_500_000, 40, 64 * 1024, 9_000] * 3
    for i, size in enumerate(sizes):
        flags = (b"$ReadReportSent",) if i % 3 == 0 else ()
        d.append(folder, _msg("bulk %d" % i, size), flags=flags)
    d.logout()
    line = b"EXAMINE " + folder.encode()
    fetch = b"FETCH 1:* (BODY.PEEK[] FLAGS)"
    got = {}
    for side, (host, port) in {"direct": (dovecot.host, dovecot.port), "proxy": (proxy.host, proxy.port)}.items():
        with RawIMAP(host, port, timeout=30) as c:
            c.login("alice", "alicepw")
            assert c.command(b"e", line)[-1].startswith(b"e OK")
            out = c.command(b"f", fetch)
            assert out[-1].startswith(b"f OK")
            got[side] = out[:-1]
    assert len(got["direct"]) == len(sizes)
    want = [r.replace(b"$ReadReportSent", b"\\read-report-sent") for r in got["direct"]]
    assert got["proxy"] == want
    assert sum(b"\\read-report-sent" in r for r in got["proxy"]) == 10
    d = dovecot.imap_direct("alice", tls="none")
    d.delete_folder(folder)
    d.logout()


def test_read_report_keyword_in_another_case_is_still_mapped(proxy, dovecot):
    """Keywords are case-insensitive: one another client created as "$readreportsent" is mapped too,
    also on the block fast path (a FETCH 1:* of many messages)."""
    folder = _fresh_folder()
    d = dovecot.imap_direct("alice", tls="none")
    d.create_folder(folder)
    for i in range(50):
        d.append(folder, _msg(f"rr{i}"), flags=(b"$readreportsent",) if i % 10 == 3 else ())
    d.logout()
    with raw_via(proxy) as r:
        r.login("alice", "alicepw")
        r.command(b"s", b'SELECT "%s"' % folder.encode())
        out = r.command(b"f", b"FETCH 1:* (FLAGS)")
        mapped = [x for x in out if b"\\read-report-sent" in x]
        assert len(mapped) == 5 and not any(b"readreportsent" in x.lower() for x in out), out


def test_append_to_a_mailbox_named_by_a_literal_with_a_synchronizing_message(proxy, dovecot):
    """The policy collects a literal mailbox name (answering the client's "+" itself); the message's
    synchronizing literal then waits for the backend's "+", which the literal gate took for its own: the
    client never got it and the session hung. Refused instead (no such mailbox), the client's next command
    was read as that literal's bytes."""
    folder = _fresh_folder()
    dovecot.deliver("alice", folder, _msg("first"))
    msg = _msg("by literal name")
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        for opening in (b"a APPEND {%d}\r\n" % len(folder), b"a APPEND {%d+}\r\n" % len(folder)):
            c.send(opening)
            if not opening.endswith(b"+}\r\n"):
                assert c.read_line().startswith(b"+")
            c.send(folder.encode() + b" {%d}\r\n" % len(msg))
            assert c.read_line().startswith(b"+")
            c.send(msg + b"\r\n")
            assert c.until_tagged(b"a")[-1].startswith(b"a OK")
        c.send(b"b APPEND {9}\r\n")
        assert c.read_line().startswith(b"+")
        c.send(b"NoSuchBox {20}\r\n")
        assert c.until_tagged(b"b")[-1].startswith(b"b NO")
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # (not taken for the refused literal)
    imap = dovecot.imap_direct("alice", tls="none")
    imap.select_folder(folder, readonly=True)
    assert len(imap.search("ALL")) == 3
    imap.logout()


def test_read_report_flag_mapped_as_a_flag_only(make_proxy, dovecot):
    """The CPM flag is a flag (an atom): mapped after a literal too (a CHARSET search's SUBJECT {n}: it
    reached Dovecot unmapped), never inside a quoted string (a SUBJECT search for that text was broken,
    an ENVELOPE's subject rewritten) nor in a BODY[HEADER.FIELDS (...)] section name."""
    p = make_proxy(backend_tls="none")
    folder = _fresh_folder()
    dovecot.deliver("alice", folder, _msg("about \\read-report-sent here"))
    dovecot.deliver("alice", folder, _msg("re: $ReadReportSent test"), flags=[b"$ReadReportSent"])
    with raw_via(p) as c:
        c.login("alice", "alicepw")
        c.command(b"s", b'SELECT "%s"' % folder.encode())
        c.send(b"a SEARCH CHARSET UTF-8 SUBJECT {2+}\r\nre KEYWORD \\read-report-sent\r\n")
        assert c.until_tagged(b"a")[0] == b"* SEARCH 2\r\n"
        assert c.command(b"b", b'SEARCH SUBJECT "\\\\read-report-sent here"')[0] == b"* SEARCH 1\r\n"
        # A KEYWORD key's argument as a quoted string (Dovecot takes one) is the flag all the same.
        assert c.command(b"k", b'SEARCH KEYWORD "\\\\read-report-sent"')[0] == b"* SEARCH 2\r\n"
        assert c.command(b"v", b'SEARCH NOT UNKEYWORD "\\\\Read-Report-Sent"')[0] == b"* SEARCH 2\r\n"
        r = c.command(b"f", b"FETCH 2 (FLAGS ENVELOPE BODY.PEEK[HEADER.FIELDS ($ReadReportSent)])")
        assert b"\\read-report-sent)" in r[0].split(b"ENVELOPE")[0], r
        assert b'"re: $ReadReportSent test"' in r[0] and b"HEADER.FIELDS ($READREPORTSENT)" in r[0].upper(), r
