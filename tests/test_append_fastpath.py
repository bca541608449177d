"""APPEND's fast path: the segments cpmproxy/imap/append.py lets keep their ``{n+}`` literal are ones whose
literal the real Dovecot reads whatever it decides, so the literal's bytes never run as commands; the rest
still go the careful way (a synchronizing literal and the backend's "+")."""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpmproxy.imap.append import MAX_FAST_SEGMENT, literal_always_read, literal_out_of_place
from cpmproxy.testing.dovecot import Dovecot
from cpmproxy.testing.proxyproc import ProxyProcess
from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via
from tests.test_hostile_backend import scripted  # noqa: F401 (the scripted backend's fixture)

# What a literal would smuggle in if the backend read it as commands: "y" answers betray it.
INNER = b"y NOOP\r\ny NOOP\r\n"

FAST = [
    b'a APPEND INBOX {5+}\r\n',
    b'a1.x APPEND "Sent Items" (\\Seen) {5+}\r\n',
    b'A APPEND inbox (\\SEEN \\answered \\Flagged \\Deleted \\Draft $cpm.read-report-sent Junk) {5+}\r\n',
    b'a append INBOX () "27-Nov-2026 07:30:00 +0100" {5+}\r\n',
    b'a APPEND INBOX " 1-Jan-1970 00:00:00 -1200" {5+}\r\n',
    b'a APPEND "a \\"quoted\\" \\\\ name" {5+}\r\n',
    b'a APPEND &AOQ-t&AOQ--folder/sub {5+}\r\n',
]
CAREFUL = [
    b'a APPEND INBOX (\\Bogus) {5+}\r\n',  # Dovecot: BAD Invalid system flag, then reads the literal as commands
    b'a APPEND INBOX (\\Recent) {5+}\r\n',
    b'a APPEND INBOX ((\\Seen)) {5+}\r\n',
    b'a APPEND INBOX ("kw") {5+}\r\n',
    b'a APPEND INBOX "31-Feb-2026 07:30:00 +0100" {5+}\r\n',
    b'a APPEND INBOX "27-Nov-2026 24:00:00 +0100" {5+}\r\n',
    b'a APPEND INBOX "27-Nov-1969 07:30:00 +0100" {5+}\r\n',
    b'a APPEND INBOX "27-Nov-2026" {5+}\r\n',
    b'a APPEND INBOX "27-Foo-2026 07:30:00 +0100" {5+}\r\n',
    b'a APPEND INBOX ~{5+}\r\n',  # (literal8)
    b'a APPEND INBOX {0+}\r\n',
    b'a APPEND INBOX {5}\r\n',  # (synchronizing already: nothing to decide)
    b'a APPEND INBOX CATENATE (TEXT {5+}\r\n',
    b'a APPEND {5+}\r\n',
    b'a APPEND "unterminated {5+}\r\n',
    b'a APPEND "bad\\xescape" {5+}\r\n',
    b'a APPEND "8bit \xc3\xa4" {5+}\r\n',
    b'a APPEND in*box {5+}\r\n',
    b'a APPEND INBOX (\\Seen) x {5+}\r\n',
    b'a+ APPEND INBOX {5+}\r\n',
    b'a APPEND INBOX (\\Seen) {5+}\r\nmore',
    b'a APPEND INBOX (' + b"k " * (MAX_FAST_SEGMENT // 2) + b') {5+}\r\n',
    b'a STORE 1 +FLAGS (\\Seen) {5+}\r\n',
]


@pytest.mark.parametrize("segment", FAST)
def test_fast_segments(segment):
    assert literal_always_read(segment, first=True)


@pytest.mark.parametrize("segment", CAREFUL)
def test_careful_segments(segment):
    assert not literal_always_read(segment, first=True)


def test_later_segments():
    """The text after a MULTIAPPEND message: the next message's flags, date and literal."""
    assert literal_always_read(b' (\\Seen) {7+}\r\n', first=False)
    assert literal_always_read(b' {7+}\r\n', first=False)
    assert literal_always_read(b' () "27-Nov-2026 07:30:00 +0000" {7+}\r\n', first=False)
    assert not literal_always_read(b' (\\Bogus) {7+}\r\n', first=False)
    assert not literal_always_read(b'a APPEND INBOX {7+}\r\n', first=False)
    assert not literal_always_read(b' (\\Seen) {7+}\r\n', first=True)


def _direct(dovecot) -> RawIMAP:
    c = RawIMAP(dovecot.host, dovecot.port, timeout=10)
    assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
    return c


def _smuggled(c: RawIMAP, command: bytes) -> list[bytes]:
    """Send ``command`` (its literals carry INNER), then a NOOP; every response up to the NOOP's."""
    c.send(command + b"n NOOP\r\n")
    return c.until_tagged(b"n")


def _betrayed(lines: list[bytes]) -> bool:
    return any(line.startswith(b"y ") for line in lines)


def _refused_cases(folder: bytes) -> list[bytes]:
    """Fast-path APPENDs that Dovecot refuses, or partly refuses, for every reason it has after the
    command's first line: its literal must still be read."""
    long_kw = b"k" * 300
    return [
        b'a APPEND "no-such-%s" (\\Seen) {%d+}\r\n%s\r\n' % (folder, len(INNER), INNER),
        b'a APPEND "%s" (%s) {%d+}\r\n%s\r\n' % (folder, long_kw, len(INNER), INNER),
        b'a APPEND "%s" {1+}\r\nx (\\Seen) {%d+}\r\n%s\r\n' % (folder, len(INNER), INNER),
        b'a APPEND "no-such-%s" {1+}\r\nx (%s) "27-Nov-2026 07:30:00 +0100" {%d+}\r\n%s\r\n'
        % (folder, long_kw, len(INNER), INNER),
        b'a APPEND "%s/../x" {%d+}\r\n%s\r\n' % (folder, len(INNER), INNER),
        b'a APPEND "" {%d+}\r\n%s\r\n' % (len(INNER), INNER),
    ]


def test_dovecot_reads_the_literal_of_every_fast_segment(dovecot):
    """Straight to Dovecot: APPENDs the fast path lets through, each refused by Dovecot after its
    first line. Their literals are read as literals, never run; the careful path's reason shows too."""
    folder = b"t-" + uuid.uuid4().hex[:10].encode()
    c = _direct(dovecot)
    try:
        c.command(b"c", b'CREATE "%s"' % folder)
        for command in _refused_cases(folder):
            head, _, rest = command.partition(b"\r\n")
            assert literal_always_read(head + b"\r\n", first=True), command
            lines = _smuggled(c, command)
            assert not _betrayed(lines), (command, lines)
        # The reason the careful path exists (a guard on the test itself): the same smuggling with a
        # flag Dovecot refuses at once works.
        lines = _smuggled(c, b'a APPEND "%s" (\\Bogus) {%d+}\r\n%s\r\n' % (folder, len(INNER), INNER))
        assert _betrayed(lines), lines
    finally:
        c.close()


_words = st.sampled_from([b"\\Seen", b"\\Deleted", b"\\Bogus", b"\\Recent", b"$kw", b"kw.1", b"k]", b"*",
                          b'"q"', b"(\\Seen)", b"NIL", b"{3}", b"\\", b"\xc3\xa4"])
_dates = st.builds(lambda d, m, y, h, z: b'"%s-%s-%s %s:00:00 %s"' % (d, m, y, h, z),
                   st.sampled_from([b"1", b" 1", b"01", b"31", b"32", b"00", b"1x"]),
                   st.sampled_from([b"Jan", b"feb", b"Feb", b"Xyz"]),
                   st.sampled_from([b"1969", b"1970", b"2026", b"9999", b"99"]),
                   st.sampled_from([b"00", b"23", b"24", b"7"]),
                   st.sampled_from([b"+0000", b"-1200", b"+25", b"Z"]))
_mailboxes = st.sampled_from([b"INBOX", b'"INBOX"', b'"no such"', b"no-such", b'"a\\\\b"', b'"a\\b"',
                              b"in%box", b'""', b"&-", b"&Jjo-", b"a]b"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mailbox=_mailboxes, flags=st.none() | st.lists(_words, max_size=4), date=st.none() | _dates,
       later=st.booleans())
def test_fast_path_never_lets_a_literal_run(dovecot, mailbox, flags, date, later):
    """Random APPEND segments, from a grammar wider than the fast path's: whichever it lets through,
    Dovecot reads the literal of (here the first or a MULTIAPPEND's second message)."""
    args = b""
    if flags is not None:
        args += b" (" + b" ".join(flags) + b")"
    if date is not None:
        args += b" " + date
    announce = args + b" {%d+}\r\n" % len(INNER)
    if later:
        first, segment = b"a APPEND %s {1+}\r\n" % mailbox, announce
        fast = literal_always_read(first, first=True) and literal_always_read(segment, first=False)
        command = first + b"x" + segment + INNER + b"\r\n"
    else:
        segment = b"a APPEND %s" % mailbox + announce
        fast = literal_always_read(segment, first=True)
        command = segment + INNER + b"\r\n"
    if not fast:
        return
    c = _direct(dovecot)
    try:
        lines = _smuggled(c, command)
        assert not _betrayed(lines), (command, lines)
    finally:
        c.close()


def test_proxy_keeps_fast_literals_and_gates_the_rest(scripted, make_proxy):  # noqa: F811
    """Through the proxy: a plain APPEND reaches the backend with its ``{n+}`` (no round trip), a
    refusable one with ``{n}`` (sent on after the backend's "+")."""
    proxy = make_proxy(backend_port=scripted.port, backend_tls="none", plugins=[])
    scripted.received = []
    c = raw_via(proxy, timeout=10)
    try:
        assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
        c.send(b'h APPEND INBOX (\\Seen) {5+}\r\nhello\r\n')
        assert c.until_tagged(b"h")[-1].startswith(b"h OK")
        c.send(b'h APPEND INBOX (\\Seen) {2+}\r\nhi (\\Bogus) {5+}\r\nhello\r\n')
        assert c.until_tagged(b"h")[-1].startswith(b"h ")
    finally:
        c.close()
    appends = [line for line in scripted.received if b"APPEND" in line or line.startswith(b" (")]
    assert appends[0] == b'h APPEND INBOX (\\Seen) {5+}\r\n', appends
    assert appends[1] == b'h APPEND INBOX (\\Seen) {2+}\r\n', appends
    assert b' (\\Bogus) {5}\r\n' in scripted.received, scripted.received


# -- through the proxy and the real Dovecot: what review found (2026-11-27) ---------------------------


def _folders(dovecot) -> bytes:
    c = _direct(dovecot)
    try:
        return b"".join(c.command(b"l", b'LIST "" "*"'))
    finally:
        c.close()


def _proxied(proxy) -> RawIMAP:
    c = raw_via(proxy, timeout=10)
    assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
    return c


def test_literal_inside_catenate_is_never_fast(proxy, dovecot):
    """The text after a CATENATE TEXT literal looks like a MULTIAPPEND segment; Dovecot refuses it before
    reading the next literal. Only segments after message literals all along keep ``{n+}``."""
    name = b"Smuggled" + uuid.uuid4().hex[:8].encode()
    inner = b"y CREATE " + name + b"\r\n"
    c = _proxied(proxy)
    try:
        for between in (b"", b' (\\Seen)', b' "27-Nov-2026 07:30:00 +0100"'):
            c.send(b"a APPEND INBOX CATENATE (TEXT {1+}\r\nx%s {%d+}\r\n%s)\r\n" % (between, len(inner), inner))
            assert not _betrayed(c.until_tagged(b"a"))
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    finally:
        c.close()
    assert name not in _folders(dovecot)


def test_an_empty_literal_mailbox_name_is_gathered_alone(proxy):
    """Found by review (helper-72): the proxy gathers an APPEND's literal mailbox name (for the policy) and
    counted the literals by their bytes: an empty one ``{0}`` was not counted, and the message after it was
    gathered too, up to the 1 MB limit of what it gathers: a 2 MB message ended the session (BYE TOOBIG)."""
    c = _proxied(proxy)
    try:
        big = 2 * 1024 * 1024
        c.send(b"a APPEND {0+}\r\n {%d+}\r\n" % big + b"x" * big + b"\r\n")
        r = c.until_tagged(b"a")
        assert r[-1].startswith(b"a NO"), r
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    finally:
        c.close()


def test_early_refusal_then_more_of_the_command(proxy, dovecot):
    """Dovecot says NO to an APPEND to a missing folder before it reads the literal, and reads it all the
    same. The rest of the client's command (another message) must neither hang the session nor run."""
    name = b"Later" + uuid.uuid4().hex[:8].encode()
    inner = b"y CREATE " + name + b"\r\n"
    c = _proxied(proxy)
    try:
        c.send(b"a APPEND nosuch-%s {1+}\r\n" % uuid.uuid4().hex[:8].encode())
        assert c.read_response().startswith(b"a NO")
        c.send(b"x (\\Seen) {%d+}\r\n" % len(inner))
        time.sleep(0.2)
        c.send(inner + b"\r\nz NOOP\r\n")
        r = c.until_tagged(b"z")
        assert r[-1].startswith(b"z OK") and not _betrayed(r), r
    finally:
        c.close()
    assert name not in _folders(dovecot)


def test_nothing_of_the_proxy_goes_inside_an_early_refused_literal(tmp_path):
    """While Dovecot still reads the literal of an APPEND it already refused, the proxy's own commands
    (here notify's nudge, ``cpm.1 NOOP``, set off by another session's APPEND) wait: sent in the middle,
    they would be read as literal bytes, and as many bytes at the end of the client's literal as commands.
    (A Dovecot of its own: a fresh user whose first internal command is the nudge.)"""
    dovecot = Dovecot(tmp_path / "dovecot", users={"alice": "alicepw"}, master_user=None)
    dovecot.start()
    p = ProxyProcess(tmp_path / "proxy", dovecot.port, backend_tls="none").start()
    body = b"x" * 40 + b"\r\ny CREATE Q"  # (its last 12 bytes, as long as the nudge, make a command)
    try:
        s1, s2 = _proxied(p), _proxied(p)
        assert s1.command(b"n", b"NOTIFY SET (SELECTED (MessageNew MessageExpunge))")[-1].startswith(b"n OK")
        assert s1.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        s1.send(b"a APPEND nosuch {%d+}\r\n" % len(body))
        assert s1.read_response().startswith(b"a NO")
        assert s2.command(b"b", b"APPEND INBOX {3+}\r\nhi\n")[-1].startswith(b"b OK")
        time.sleep(0.5)
        s1.send(body + b"\r\n")
        r = s1.command(b"z", b"NOOP")
        assert r[-1].startswith(b"z OK") and not _betrayed(r), r
        s1.close()
        s2.close()
        assert b" Q\r\n" not in _folders(dovecot)
    finally:
        p.stop()
        dovecot.close()


def test_literal_instead_of_done_never_reaches_the_backend(proxy, dovecot):
    """A line other than DONE ends IDLE at Dovecot, which would then read its literal as commands."""
    name = b"Idle" + uuid.uuid4().hex[:8].encode()
    inner = b"y CREATE " + name + b"\r\n"
    c = _proxied(proxy)
    try:
        assert c.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        c.send(b"i IDLE\r\n")
        assert c.read_response().startswith(b"+")
        c.send(b"DONE {%d+}\r\n%s\r\n" % (len(inner), inner))
        r = c.until_tagged(b"i")
        r += c.command(b"z", b"NOOP")
        assert r[-1].startswith(b"z OK") and not _betrayed(r), r
    finally:
        c.close()
    assert name not in _folders(dovecot)


@pytest.mark.parametrize("rest", [b" INBOX {5+}\r\nworld\r\n", b" INBOX {5}\r\n", b" x (\\Seen) {5+}\r\nworld\r\n"])
def test_a_literal_where_an_append_can_have_none_is_answered(proxy, dovecot, rest):
    """After a message, the text of a MULTIAPPEND that names the mailbox again (or any other atom) before a
    literal: Dovecot answers only once it read the line to its end, and sent on as a synchronizing literal
    (the careful way) it never did; the session hung, the client's next commands unanswered (found by
    review). It is BAD at once, nothing saved, and the session goes on."""
    c = _proxied(proxy)
    try:
        c.send(b"a APPEND INBOX {5+}\r\nhello" + rest)
        r = c.until_tagged(b"a")
        assert r[-1].startswith(b"a BAD"), r
        c.send(b"z NOOP\r\n")
        assert c.until_tagged(b"z")[-1].startswith(b"z OK")
    finally:
        c.close()


@pytest.mark.parametrize("segment, out_of_place", [
    (b" {5+}\r\n", False), (b" ~{5+}\r\n", False), (b" (\\Seen) {5+}\r\n", False),
    (b' "27-Nov-2026 07:30:00 +0100" {5}\r\n', False), (b" catenate (TEXT {5+}\r\n", False),
    (b" TEXT {3+}\r\n", False), (b' URL "/INBOX;UID=1" TEXT {3}\r\n', False), (b") (\\Seen) {3+}\r\n", False),
    (b" INBOX {5+}\r\n", True), (b" x (\\Seen) {5}\r\n", True), (b"{5+}\r\n", True), (b"  {5+}\r\n", True),
    (b" (\\Seen) x {5+}\r\n", True), (b' "d" (\\Seen) {5+}\r\n', True),
])
def test_literals_out_of_place_in_an_append(segment, out_of_place):
    """What may follow an APPEND's literal before the next one (MULTIAPPEND, CATENATE, a literal mailbox
    name) is never taken for a literal out of place."""
    assert literal_out_of_place(segment) is out_of_place


def _inbox_count(dovecot) -> bytes:
    c = _direct(dovecot)
    try:
        return b"".join(x for x in c.command(b"s", b"STATUS INBOX (MESSAGES)") if x.startswith(b"* STATUS"))
    finally:
        c.close()


@pytest.mark.parametrize("command, answer", [
    (b"a APPEND INBOX x {5+}\r\nhello\r\n", b"a BAD"),
    (b"a APPEND INBOX (\\Seen) x ~{5+}\r\nhello\r\n", b"a BAD"),
    (b'a APPEND INBOX (\\Seen) "27-Nov-2026 07:30:00 +0100" NIL {5+}\r\nhello\r\n', b"a BAD"),
    (b"a APPEND INBOX (\\Seen) (\\Draft) {5}\r\n", b"a BAD"),
    (b"a APPEND Nope x {5+}\r\nhello\r\n", b"a NO [TRYCREATE]"),
    (b"a APPEND INBOX {5+}\r\nhello (\\Seen) x {5+}\r\nworld\r\n", b"a BAD"),
    (b"a APPEND {5+}\r\nINBOX (\\Seen) x {5+}\r\nhello\r\n", b"a BAD"),
])
def test_an_append_with_an_argument_no_message_has_is_answered(proxy, dovecot, command, answer):
    """An APPEND with an argument before its literal that a message cannot have (found by fuzzing): Dovecot
    answers it only once it read the line to its end. Sent on the careful way (a synchronizing literal) it
    never did, or answered (NO for a missing mailbox) and read the client's next command as the rest of the
    line; the session hung. It gets the backend's own answer now, nothing saved, and the session goes on."""
    before = _inbox_count(dovecot)
    c = _proxied(proxy)
    try:
        c.send(command)
        r = c.until_tagged(b"a")
        assert r[-1].startswith(answer), r
        c.send(b"z NOOP\r\n")
        assert c.until_tagged(b"z")[-1].startswith(b"z OK")
    finally:
        c.close()
    assert _inbox_count(dovecot) == before


@pytest.mark.parametrize("line, out_of_place", [
    (b"a APPEND INBOX {5+}\r\n", False), (b"a APPEND INBOX (\\Seen) {5}\r\n", False),
    (b'a APPEND "My box" (\\Seen) "27-Nov-2026 07:30:00 +0100" ~{5+}\r\n', False),
    (b"a APPEND INBOX CATENATE (TEXT {5+}\r\n", False), (b"a APPEND {5+}\r\n", False), (b"a APPEND INBOX\r\n", False),
    (b"a APPEND INBOX x {5+}\r\n", True), (b"a APPEND INBOX (\\Seen) x {5}\r\n", True),
    (b"a APPEND INBOX (\\Seen) (\\Draft) {5}\r\n", True), (b'a APPEND INBOX "d" "d" {5+}\r\n', True),
])
def test_literals_out_of_place_in_an_append_first_line(line, out_of_place):
    assert literal_out_of_place(line, first=True) is out_of_place


@pytest.mark.parametrize("rest", [b"hello {3}\r\n", b"hello (\\Seen) {3}\r\n"])
def test_an_answered_append_whose_rest_announces_a_synchronizing_literal_ends_there(make_proxy, dovecot, rest):
    """Found by the command fuzzer: an APPEND answered before its end (an argument no message can have,
    'APPEND INBOX x {5+}') whose rest announced a synchronizing literal. The proxy refused that literal
    (no "+": the client sends none) but kept the command as the one being relayed, and every internal
    command of the session waited behind it: the next SELECT of a filtered view, which classifies the
    messages, was never answered. The command ends where its literal is refused."""
    folder = "Ap" + uuid.uuid4().hex[:8]
    for kind in ("chat", "imdn", "chat"):
        dovecot.deliver("alice", folder, make_object(kind))
    p = make_proxy(config_extra="[policy]\nsync = { imdn = false }\n")
    c = raw_via(p)
    try:
        assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
        c.send(b"a APPEND INBOX x {5+}\r\n" + rest)
        assert c.until_tagged(b"a")[-1].startswith(b"a BAD")
        r = c.command(b"s", b'SELECT "%s"' % folder.encode())
        assert r[-1].startswith(b"s OK") and b"* 2 EXISTS\r\n" in r, r
        assert c.command(b"z", b"NOOP")[-1].startswith(b"z OK")
    finally:
        c.close()
