"""A virtual mailbox (Dovecot's ``virtual`` plugin) through the policy: the messages stored in a folder hidden
from the device are hidden in it too, like any other hidden message (renumbered away), and a plain mailbox
pays for the check only once per process (one FETCH of one message's X-MAILBOX on the side connection)."""

from __future__ import annotations

import re
import shutil
import uuid

import pytest

from cpmproxy.testing.rawclient import RawIMAP
from tests.proxyfix import raw_via
from tests.test_policy_capabilities import VIRTUAL_CONFIG, _dovecot_with, make_virtual_mailbox

# Every command Dovecot reads is logged (rawlog), to count what the proxy asks of it.
RAWLOG_CONFIG = VIRTUAL_CONFIG + """
protocol imap {
  rawlog_dir = %h/rawlog
}
"""


@pytest.fixture(scope="module")
def dovecot_virtual(tmp_path_factory):
    yield from _dovecot_with(tmp_path_factory, "dovecot-virtual-hiding", RAWLOG_CONFIG)


def _message(subject: str) -> bytes:
    return b"From: a@example.com\r\nSubject: %s\r\n\r\nbody of %s\r\n" % (subject.encode(), subject.encode())


def _append(c: RawIMAP, folder: str, subject: str) -> None:
    data = _message(subject)
    r = c.command(b"a", b"APPEND %s {%d+}\r\n%s" % (folder.encode(), len(data), data))
    assert r[-1].startswith(b"a OK"), r


def _backend_commands(d, pattern: bytes) -> int:
    """How many commands Dovecot read (every connection of erin's) match ``pattern``."""
    return sum(len(re.findall(pattern, path.read_bytes())) for path in (d.mail_dir / "erin" / "rawlog").glob("*.in"))


@pytest.fixture
def virtual_setup(dovecot_virtual, make_proxy):
    """A hidden folder with one message, INBOX with two, and a virtual mailbox of both (its own names: the
    module's Dovecot is shared); a proxy whose policy hides the folder."""
    d = dovecot_virtual
    rawlog = d.mail_dir / "erin" / "rawlog"
    if not rawlog.exists():
        rawlog.mkdir(parents=True)
        shutil.chown(rawlog.parent, d.mail_uid, d.mail_gid)
        shutil.chown(rawlog, d.mail_uid, d.mail_gid)
    tag = uuid.uuid4().hex[:6]
    secret, inbox = "Secret" + tag, "Inbox" + tag
    direct = RawIMAP("127.0.0.1", d.port)
    direct.login("erin", "erinpw")
    for folder in (secret, inbox):
        assert direct.command(b"c", b"CREATE " + folder.encode())[-1].startswith(b"c OK")
    _append(direct, inbox, "visible one")
    _append(direct, secret, "hidden one")
    _append(direct, inbox, "visible two")
    virtual = make_virtual_mailbox(d, "erin", "All" + tag, [inbox, secret])
    p = make_proxy(backend_tls="none", backend_port=d.port,
                   config_extra=f'[policy]\nexclude_folders = ["{secret}"]\n')
    try:
        yield p, direct, secret, inbox, virtual
    finally:
        direct.close()


def _subjects(lines: list[bytes]) -> list[bytes]:
    return re.findall(rb"Subject: ([^\r\n]*)", b"".join(lines))


def test_a_virtual_mailbox_shows_no_message_of_a_hidden_folder(virtual_setup):
    """Found by review (helper-103's brief): a virtual mailbox of INBOX and a folder the policy hides showed,
    through the proxy, the hidden folder's messages (SELECT counted them, FETCH read them, STATUS counted
    them): mail of a folder that does not exist for the device. Now hidden by the folder each message is
    really in (Dovecot's FETCH X-MAILBOX on the side connection), as a hidden kind is: renumbered away."""
    p, direct, secret, inbox, virtual = virtual_setup
    # (What the backend shows of it: the three.)
    assert b"* 3 EXISTS\r\n" in direct.command(b"s", b"EXAMINE " + virtual.encode())
    c = raw_via(p)
    try:
        assert c.login("erin", "erinpw")[-1].startswith(b"L OK")
        r = c.command(b"t", b"STATUS %s (MESSAGES UNSEEN SIZE)" % virtual.encode())
        size = len(_message("visible one")) + len(_message("visible two"))
        assert r[0] == b"* STATUS %s (MESSAGES 2 UNSEEN 2 SIZE %d)\r\n" % (virtual.encode(), size), r
        r = c.command(b"s", b"SELECT " + virtual.encode())
        assert b"* 2 EXISTS\r\n" in r and r[-1].startswith(b"s OK"), r
        r = c.command(b"f", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (Subject)])")
        assert _subjects(r) == [b"visible one", b"visible two"] and r[-1].startswith(b"f OK"), r
        assert c.command(b"e", b"SEARCH ALL")[0] == b"* SEARCH 1 2\r\n"
        r = c.command(b"e", b"SEARCH SUBJECT hidden")
        assert r[0] == b"* SEARCH\r\n" and r[-1].startswith(b"e OK"), r
        r = c.command(b"t", b"STATUS %s (MESSAGES UNSEEN SIZE)" % virtual.encode())
        assert r[0] == b"* STATUS %s (MESSAGES 2 UNSEEN 2 SIZE %d)\r\n" % (virtual.encode(), size), r
        # An arrival in the hidden folder while the virtual mailbox is selected is not announced; one in
        # INBOX's place is, as message 3.
        _append(direct, secret, "hidden two")
        r = c.command(b"n", b"NOOP")
        assert r == [b"n OK NOOP completed.\r\n"] or (len(r) == 1 and r[0].startswith(b"n OK")), r
        _append(direct, inbox, "visible three")
        r = c.command(b"n", b"NOOP")
        assert b"* 3 EXISTS\r\n" in r and r[-1].startswith(b"n OK"), r
        r = c.command(b"f", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (Subject)])")
        assert _subjects(r) == [b"visible one", b"visible two", b"visible three"], r
        # The folder's own messages, selected as such, as before.
        r = c.command(b"s", b"SELECT " + inbox.encode())
        assert b"* 3 EXISTS\r\n" in r, r
    finally:
        c.close()


def test_a_plain_mailbox_is_looked_at_once(virtual_setup, dovecot_virtual):
    """What a plain mailbox pays for the check, measured in Dovecot's rawlog: the first SELECT of it (in the
    proxy process) one ``UID FETCH * (UID X-MAILBOX)`` of its last message on the side connection, with its
    EXAMINE, before the SELECT goes out; that SELECT and every later one, in any session, nothing more:
    sent as it came, answered as it came (the fast path)."""
    p, direct, secret, inbox, virtual = virtual_setup
    d = dovecot_virtual
    before = _backend_commands(d, rb"X-MAILBOX")
    searches = _backend_commands(d, rb"UID SEARCH")
    c = raw_via(p)
    try:
        assert c.login("erin", "erinpw")[-1].startswith(b"L OK")
        assert b"* 2 EXISTS\r\n" in c.command(b"s", b"SELECT " + inbox.encode())
        assert _backend_commands(d, rb"X-MAILBOX") == before + 1
        assert _backend_commands(d, rb"UID FETCH \* \(UID X-MAILBOX\)") >= 1
        assert _backend_commands(d, rb"UID SEARCH") == searches  # (no view: the fast path)
        examines = _backend_commands(d, rb"EXAMINE")
        assert b"* 2 EXISTS\r\n" in c.command(b"s", b"SELECT " + inbox.encode())
    finally:
        c.close()
    c = raw_via(p)
    try:
        assert c.login("erin", "erinpw")[-1].startswith(b"L OK")
        assert b"* 2 EXISTS\r\n" in c.command(b"s", b"SELECT " + inbox.encode())
        r = c.command(b"f", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (Subject)])")
        assert _subjects(r) == [b"visible one", b"visible two"], r
    finally:
        c.close()
    assert _backend_commands(d, rb"X-MAILBOX") == before + 1
    assert _backend_commands(d, rb"UID SEARCH") == searches
    assert _backend_commands(d, rb"EXAMINE") == examines


@pytest.mark.parametrize("behind", [b"UID EXPUNGE 1", b"SEARCH DELETED"])
def test_commands_behind_a_store_after_the_first_select_of_a_folder_see_it(virtual_setup, behind):
    """Found by review of 41d91a1 (helper-108's brief): a device that may have hidden folders SELECTs a plain
    folder no CONDSTORE client had opened yet, then pipelines ``STORE 1 +FLAGS.SILENT (\\Deleted)`` and a
    command that reads the flag: ``UID EXPUNGE 1`` expunged nothing, ``SEARCH DELETED`` found nothing (every
    time). The proxy's check for a virtual mailbox EXAMINEd the folder on the side connection (CONDSTORE on)
    after the SELECT: the folder's first CONDSTORE open, while this session had it selected, which leaves
    Dovecot 2.3.19 blind to the session's next STORE in the command pipelined behind it (direct Dovecot does
    the same). Now that check runs before the SELECT goes out. Three new folders each."""
    p, direct, secret, inbox, virtual = virtual_setup
    c = raw_via(p)
    try:
        assert c.login("erin", "erinpw")[-1].startswith(b"L OK")
        missed = []
        for i in range(3):
            folder = "Fresh%d" % i + uuid.uuid4().hex[:6]
            assert direct.command(b"c", b"CREATE " + folder.encode())[-1].startswith(b"c OK")
            _append(direct, folder, "one")
            _append(direct, folder, "two")
            assert b"* 2 EXISTS\r\n" in c.command(b"s", b"SELECT " + folder.encode())
            c.send(b"a STORE 1 +FLAGS.SILENT (\\Deleted)\r\nb " + behind + b"\r\n")
            got = [c.read_response()]
            while not got[-1].startswith(b"b "):
                got.append(c.read_response())
            assert got[-1].startswith(b"b OK"), got
            if b"* 1 EXPUNGE\r\n" not in got and b"* SEARCH 1\r\n" not in got:
                missed.append((folder, got))
        assert not missed, missed
    finally:
        c.close()
