"""Plugins working on the same command or response: the read-report flag under a filtered view (the policy's
renumbering and readreport's flag mapping compose), and METADATA responses filtered entry by entry, whatever
their split into literals (the policy holds a response until it has all of it).

Against the real Dovecot through real proxy processes; a scripted backend for values Dovecot never sends
as quoted strings.
"""

from __future__ import annotations

import re
import uuid

import pytest

from cpmproxy.imap.tokens import ParenList, tokenize
from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object
from plugins.policyprefs import filter_metadata_response
from tests.proxyfix import raw_via
from tests.test_hostile_backend import scripted  # noqa: F401 (the scripted backend's fixture)

PREFIX = b"/private/vendor/vendor.cpmproxy"
RRS = b"\\read-report-sent"


def q(name: str) -> bytes:
    return b'"' + name.encode() + b'"'


def login(p, user: str, device: str = "phone") -> RawIMAP:
    c = raw_via(p)
    c.command(b"i", b'ID ("x-cpm-device-id" "%s")' % device.encode())
    assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
    return c


def direct(dovecot, user: str) -> RawIMAP:
    d = RawIMAP("127.0.0.1", dovecot.port)
    assert d.login(user, f"{user}pw")[-1].startswith(b"L OK")
    return d


def direct_flags(dovecot, user: str, folder: str) -> dict[int, bytes]:
    d = direct(dovecot, user)
    d.command(b"e", b"EXAMINE " + q(folder))
    out = {}
    for r in d.command(b"f", b"UID FETCH 1:* (FLAGS)"):
        m = re.match(rb"\* \d+ FETCH \((?:UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+))\)", r)
        if m:
            uid = int(m.group(1) or m.group(4))
            out[uid] = m.group(2) if m.group(2) is not None else m.group(3)
    d.close()
    return out


# -- the read-report flag under a view ------------------------------------------------------------------


@pytest.mark.parametrize("hidden_by", ["policy", "preference"])
def test_read_report_flag_is_mapped_where_the_view_hides_something(make_proxy, dovecot, hidden_by):
    """IMDNs hidden (by the provider's policy, or by the user's preference: a deferred decision of the
    policy), so the view renumbers: the flag in STORE, UID STORE, SEARCH, UID SEARCH, FETCH and APPEND is
    still the keyword at the server and the CPM flag at the client."""
    folder = "Default/tel:+1888" + uuid.uuid4().hex[:8]
    uids = {}
    for i, kind in enumerate(["imdn", "chat", "imdn", "chat"]):
        uids[i] = dovecot.deliver("dave", folder, make_object(kind, subject=f"rr {i}"))
    imdn1, chat1, imdn2, chat2 = (uids[i] for i in range(4))
    p = make_proxy(config_extra="[policy]\nsync = { imdn = false }\n" if hidden_by == "policy" else "")
    c = login(p, "dave")
    if hidden_by == "preference":
        r = c.command(b"m", b"SETMETADATA " + q(folder) + b" (" + PREFIX + b'/sync/imdn "off")')
        assert r[-1].startswith(b"m OK"), r
    r = c.command(b"s", b"SELECT " + q(folder))
    assert b"* 2 EXISTS\r\n" in r, r  # the two chats: chat1 is 1, chat2 is 2
    r = c.command(b"u", b"UID STORE %d +FLAGS (%s)" % (chat2, RRS))
    assert r[-1].startswith(b"u OK"), r
    assert any(line.startswith(b"* 2 FETCH") and RRS in line for line in r), r
    r = c.command(b"t", b"STORE 1 +FLAGS.SILENT (%s)" % RRS)
    assert r[-1].startswith(b"t OK"), r
    flags = direct_flags(dovecot, "dave", folder)
    assert b"$ReadReportSent" in flags[chat1] and b"$ReadReportSent" in flags[chat2], flags
    assert b"$ReadReportSent" not in flags[imdn1] + flags[imdn2], flags
    assert c.command(b"us", b"UID SEARCH KEYWORD " + RRS)[0] == b"* SEARCH %d %d\r\n" % (chat1, chat2)
    assert c.command(b"se", b"SEARCH KEYWORD " + RRS)[0] == b"* SEARCH 1 2\r\n"
    r = c.command(b"f", b"FETCH 1:* (FLAGS)")
    assert sum(RRS in line for line in r) == 2 and not any(b"ReadReportSent" in line for line in r), r
    r = c.command(b"t2", b"STORE 2 -FLAGS (%s)" % RRS)
    assert r[-1].startswith(b"t2 OK") and RRS not in b"".join(r), r
    assert c.command(b"se2", b"SEARCH KEYWORD " + RRS)[0] == b"* SEARCH 1\r\n"
    msg = make_object("chat", subject="appended")
    r = c.command(b"a", b"APPEND " + q(folder) + b" (%s \\Seen) {%d+}\r\n" % (RRS, len(msg)) + msg)
    assert r[-1].startswith(b"a OK"), r
    appended = int(re.search(rb"APPENDUID \d+ (\d+)", r[-1]).group(1))
    assert b"$ReadReportSent" in direct_flags(dovecot, "dave", folder)[appended]
    c.close()


# -- METADATA: the proxy's entries filtered out one by one --------------------------------------------


def _metadata(lines: list[bytes]) -> list[tuple[bytes, dict[bytes, bytes | None]]]:
    """(mailbox, {entry: value}) of each ``* METADATA`` response, each parsed whole (well-formed)."""
    out = []
    for line in lines:
        if not line.startswith(b"* METADATA"):
            continue
        tokens = tokenize(line[:-2])
        assert len(tokens) == 4 and isinstance(tokens[3], ParenList), line
        items = tokens[3].items
        assert len(items) % 2 == 0, line
        entries = {items[j].value: getattr(items[j + 1], "value", None) for j in range(0, len(items), 2)}
        out.append((getattr(tokens[2], "value", None), entries))
    return out


@pytest.fixture
def metadata_user(dovecot):
    """dave's account and a folder of his with the user's preferences and the proxy's bookkeeping, as the
    server holds them (written directly); all removed afterwards."""
    folder = "Default/tel:+1999" + uuid.uuid4().hex[:8]
    dovecot.deliver("dave", folder, make_object("chat"))
    device = uuid.uuid4().hex[:8]
    account = {
        PREFIX + b"/notifications": b"off",                      # preference (depth 1)
        PREFIX + b"/sync/group-state": b"on",                    # preference (depth 2)
        PREFIX + b"/devicelist": b"phone tablet",                # bookkeeping (depth 1)
        PREFIX + b"/localdelete/qa" + device.encode(): b"1",     # bookkeeping (depth 2)
        PREFIX + b"/folders/" + folder.encode().hex().encode(): b"1",
        b"/private/comment": b"dave's own",
    }
    mailbox = {
        PREFIX + b"/sync": b"on",                                # preference (depth 1)
        PREFIX + b"/sync/imdn": b"on",                           # preference (depth 2)
        PREFIX + b"/state": b"x" * 300,                          # bookkeeping (depth 1)
        PREFIX + b"/localdelete/qa" + device.encode() + b"/1": b"1:3,7",  # bookkeeping (depth 3)
    }

    def store(target: bytes, entries: dict[bytes, bytes | None]) -> None:
        d = direct(dovecot, "dave")
        body = b" ".join(e + b" " + (b'"%s"' % v if v is not None else b"NIL") for e, v in entries.items())
        assert d.command(b"m", b"SETMETADATA " + target + b" (" + body + b")")[-1].startswith(b"m OK")
        d.close()

    store(b'""', account)
    store(q(folder), mailbox)
    yield folder, account, mailbox
    store(b'""', dict.fromkeys(account))
    store(q(folder), dict.fromkeys(mailbox))


def _visible(entries: dict[bytes, bytes], depth1: bool = False) -> dict[bytes, bytes]:
    keys = (b"/notifications", b"/sync/group-state", b"/sync", b"/sync/imdn")
    if depth1:
        keys = (b"/notifications", b"/sync")
    return {e: v for e, v in entries.items() if e.startswith(PREFIX) and e[len(PREFIX):] in keys}


def test_metadata_bookkeeping_hidden_entry_by_entry(make_proxy, metadata_user):
    """Dovecot sends every value as a literal: a response is one segment per entry. Through the proxy, in
    fresh sessions (reads split differently), with DEPTH 1 and infinity, on the account and on a folder,
    and by name: exactly the preferences (and entries outside the prefix), never the bookkeeping; a
    response left empty is not sent at all."""
    folder, account, mailbox = metadata_user
    p = make_proxy()
    for _ in range(4):
        c = login(p, "dave")
        r = c.command(b"g", b'GETMETADATA (DEPTH infinity) "" (' + PREFIX + b")")
        assert r[-1].startswith(b"g OK"), r
        assert _metadata(r) == [(b"", _visible(account))], r
        r = c.command(b"g1", b'GETMETADATA (DEPTH 1) "" (' + PREFIX + b")")
        assert _metadata(r) == [(b"", _visible(account, depth1=True))], r
        r = c.command(b"h", b"GETMETADATA (DEPTH infinity) " + q(folder) + b" (" + PREFIX + b")")
        assert _metadata(r) == [(folder.encode(), _visible(mailbox))], r
        r = c.command(b"h1", b"GETMETADATA (DEPTH 1) " + q(folder) + b" (" + PREFIX + b")")
        assert _metadata(r) == [(folder.encode(), _visible(mailbox, depth1=True))], r
        # By name: bookkeeping, preferences, an entry outside the prefix, and absent ones (NIL).
        ld = next(e for e in account if b"/localdelete/" in e)
        r = c.command(b"n", b'GETMETADATA "" (' + ld + b" " + PREFIX + b"/notifications /private/comment "
                      + PREFIX + b"/devicelist /private/absent " + PREFIX + b"/localdelete/absent)")
        assert _metadata(r) == [(b"", {PREFIX + b"/notifications": b"off", b"/private/comment": b"dave's own",
                                       b"/private/absent": None})], r
        # Nothing left: no METADATA response at all. Pipelined with the next command: order kept.
        c.send(b'n2 GETMETADATA "" (' + ld + b" " + PREFIX + b"/devicelist)\r\nn3 NOOP\r\n")
        r = c.until_tagged(b"n3")
        assert [line.split(b" ")[0] for line in r] == [b"n2", b"*", b"n3"] or \
            [line.split(b" ")[0] for line in r] == [b"n2", b"n3"], r
        assert not any(line.startswith(b"* METADATA") for line in r), r
        # Only NILs: one line, no literal.
        r = c.command(b"n4", b'GETMETADATA "" (/private/absent ' + PREFIX + b"/localdelete/absent)")
        assert _metadata(r) == [(b"", {b"/private/absent": None})], r
        c.close()


def test_metadata_large_literal_over_several_reads(make_proxy, dovecot, metadata_user):
    """A value larger than one read: the response is held until all of it is in, then filtered."""
    folder, account, mailbox = metadata_user
    big = b"v" * 200_000
    d = direct(dovecot, "dave")
    r = d.command(b"m", b"SETMETADATA " + q(folder) + b" (/private/big {%d+}\r\n" % len(big) + big + b")")
    assert r[-1].startswith(b"m OK"), r
    d.close()
    try:
        c = login(make_proxy(), "dave")
        r = c.command(b"g", b"GETMETADATA (DEPTH infinity) " + q(folder) + b" (" + PREFIX + b" /private/big)")
        assert _metadata(r) == [(folder.encode(), {**_visible(mailbox), b"/private/big": big})], r[:1]
        c.close()
    finally:
        d = direct(dovecot, "dave")
        d.command(b"m", b"SETMETADATA " + q(folder) + b" (/private/big NIL)")
        d.close()


@pytest.mark.parametrize("answer, expected", [
    # Quoted values (one line), bookkeeping first, in the middle, last.
    (b'* METADATA "" (' + PREFIX + b'/localdelete/d "1:3" ' + PREFIX + b'/notifications "on" '
     b'/private/comment "x")\r\n',
     b'* METADATA "" (' + PREFIX + b'/notifications "on" /private/comment "x")\r\n'),
    # Literals and quoted strings mixed.
    (b'* METADATA INBOX (' + PREFIX + b'/sync {3}\r\noff ' + PREFIX + b'/folders/ab "1" /private/c {2}\r\nhi)\r\n',
     b'* METADATA INBOX (' + PREFIX + b'/sync {3}\r\noff /private/c {2}\r\nhi)\r\n'),
    # Only bookkeeping, as a literal: nothing at all.
    (b'* METADATA "" (' + PREFIX + b'/localdelete/d {5}\r\n1:3,5)\r\n', b""),
    # The unsolicited form (entry names only).
    (b'* METADATA "" ' + PREFIX + b"/localdelete/d " + PREFIX + b"/sync/chat\r\n",
     b'* METADATA "" ' + PREFIX + b"/sync/chat\r\n"),
    # Nothing of ours: as it was, byte for byte.
    (b'* METADATA "" (/private/comment {3}\r\nabc /shared/x "y")\r\n',
     b'* METADATA "" (/private/comment {3}\r\nabc /shared/x "y")\r\n'),
])
def test_metadata_filtered_from_a_server_that_quotes(scripted, tmp_path, answer, expected):  # noqa: F811
    from cpmproxy.testing.proxyproc import ProxyProcess
    p = ProxyProcess(tmp_path / "p", scripted.port).start()
    try:
        scripted.script = {b"GETMETADATA": answer + b"{tag} OK done\r\n"}
        c = RawIMAP(p.host, p.port)
        assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
        r = c.command(b"h", b'GETMETADATA (DEPTH infinity) "" ' + PREFIX)
        assert b"".join(r[:-1]) == expected, r
        assert r[-1] == b"h OK done\r\n"
        c.close()
    finally:
        scripted.script = {}
        p.stop()


def test_filter_metadata_response_units():
    same = b'* METADATA "" (/private/comment "x")\r\n'
    assert filter_metadata_response(same) is same
    assert filter_metadata_response(b'* METADATA "" (' + PREFIX + b' "x")\r\n') is None  # the prefix itself
    assert filter_metadata_response(b'* METADATA "" (' + PREFIX + b'/x "unterminated)\r\n') is None  # fail closed
    assert filter_metadata_response(b'* METADATA "" (' + PREFIX.upper() + b'/SYNC/CHAT "off")\r\n') is not None
