"""The capabilities a device is offered under the policy plugin: an allowlist (``plugins.policy._OFFERED``),
so that a backend upgraded to one with new extensions does not offer them through a view that does not
translate their message numbers, UIDs or mailbox names; and the commands of extensions not offered, which
a client may send blindly, refused by the proxy rather than run by the backend past the view."""

from __future__ import annotations

import re
import shutil
import uuid
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from cpmproxy.imap.tokens import parse_command
from cpmproxy.proxy.hooks import Answer, ClientCommand, Rewrite
from cpmproxy.testing.dovecot import Dovecot
from cpmproxy.testing.rawclient import RawIMAP
from plugins.policy import PolicyPlugin
from plugins.policyconfig import Policy
from plugins.policystate import PolicySession
from tests.proxyfix import raw_via

# What Dovecot 2.3.19 offers after login (the test instance's configuration: no quota, ACL, zlib or FTS
# plugins), each with its verdict under the policy plugin.
DOVECOT_PASSED = (
    b"IMAP4rev1 ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT "
    b"MULTIAPPEND UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH "
    b"ESORT SEARCHRES WITHIN LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE "
    b"LITERAL+ NOTIFY METADATA").split()
DOVECOT_DROPPED = {
    b"SASL-IR": "the proxy's login phase (pre-login only)",
    b"LOGIN-REFERRALS": "the proxy's login phase",
    b"URL-PARTIAL": "policy: IMAP URLs name folders and UIDs past the view",
    b"CATENATE": "policy: IMAP URLs name folders and UIDs past the view",
    b"CONTEXT=SEARCH": "policy: updates of the backend's own making are not renumbered",
}
# And with the quota, ACL and zlib plugins and special-use folders.
PLUGINS_CONFIG = """
mail_plugins = $mail_plugins quota acl
protocol imap {
  mail_plugins = $mail_plugins imap_quota imap_acl imap_zlib
}
plugin {
  quota = maildir:User quota
  quota_rule = *:storage=1G
  acl = vfile
}
namespace inbox {
  mailbox Sent {
    special_use = \\Sent
  }
}
"""
PLUGINS_PASSED = DOVECOT_PASSED + [b"SPECIAL-USE", b"QUOTA"]
PLUGINS_DROPPED = {**DOVECOT_DROPPED,
                   b"COMPRESS=DEFLATE": "the proxy's relay (no COMPRESS)",
                   b"ACL": "policy: its commands name mailboxes the view does not check",
                   b"RIGHTS=texk": "policy: with ACL"}
PROXY_OWN = [b"XCPM-LOCALDELETE", b"XCPM-VIEW"]


def _caps(ok_line: bytes) -> list[bytes]:
    m = re.search(rb"\[CAPABILITY ([^\]]*)\]", ok_line)
    assert m, ok_line
    return m.group(1).split()


def _plugin() -> PolicyPlugin:
    plugin = PolicyPlugin(SimpleNamespace(hooks=SimpleNamespace(plugins=[])))
    plugin.name = "policy"
    return plugin


def _command(plugin: PolicyPlugin, line: bytes, st: PolicySession | None = None):
    session = SimpleNamespace(state={"policy": st or PolicySession(Policy())}, user="alice", device_id="d1",
                              inflight_commands=lambda: [], selected=None, selecting=None,
                              side_command=lambda line: defer.Deferred())  # (never answered here)
    parsed = parse_command(line[:-2])
    return plugin.command(session, ClientCommand(parsed.tag, parsed.name, parsed.uid, line, parsed, False))


# -- unit: the capabilities hook ------------------------------------------------------------------


def test_capabilities_hook_offers_the_known_ones_only():
    plugin = _plugin()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        backend = (b"IMAP4rev1 ID ENABLE IDLE LITERAL+ SORT SORT=DISPLAY THREAD=REFS ESEARCH CONDSTORE QRESYNC "
                   b"PREVIEW=FUZZY SNIPPET=FUZZY STATUS=SIZE CONTEXT=SEARCH CONTEXT=SORT CATENATE URL-PARTIAL "
                   b"URLAUTH URLAUTH=BINARY REPLACE UIDONLY PARTIAL MULTISEARCH INPROGRESS MESSAGELIMIT=1000 "
                   b"OBJECTID LIST-METADATA X-GM-EXT-1 XLIST QUOTA QUOTA=RES-STORAGE ACL RIGHTS=texk UTF8=ACCEPT "
                   b"IMAP4rev2 JMAPACCESS FILTERS CONVERT ANNOTATE-EXPERIMENT-1 I18NLEVEL=2 SEARCH=FUZZY "
                   b"APPENDLIMIT=1000 XCPM-LOCALDELETE").split()
        out = plugin.capabilities(None, backend)
        assert out == (b"IMAP4rev1 ID ENABLE IDLE LITERAL+ SORT SORT=DISPLAY THREAD=REFS ESEARCH CONDSTORE "
                       b"QRESYNC PREVIEW=FUZZY SNIPPET=FUZZY STATUS=SIZE QUOTA QUOTA=RES-STORAGE APPENDLIMIT=1000 "
                       b"XCPM-LOCALDELETE XCPM-VIEW").split()
        # Case does not matter (capability names are case-insensitive).
        assert plugin.capabilities(None, [b"imap4rev1", b"Move", b"replace"]) == [b"imap4rev1", b"Move", b"XCPM-VIEW"]
        for _ in range(3):  # (another session with the same list, or another list with the same unknowns)
            plugin.capabilities(None, backend)
            plugin.capabilities(None, backend[:-5])
    finally:
        globalLogPublisher.removeObserver(events.append)
    logged = [e["cap"] for e in events if e.get("log_format", "").startswith("backend capability")]
    unknown = {b"REPLACE", b"UIDONLY", b"PARTIAL", b"MULTISEARCH", b"INPROGRESS", b"MESSAGELIMIT=1000", b"OBJECTID",
               b"LIST-METADATA", b"X-GM-EXT-1", b"XLIST", b"ACL", b"RIGHTS=TEXK",
               b"UTF8=ACCEPT", b"IMAP4REV2", b"JMAPACCESS", b"FILTERS", b"CONVERT", b"ANNOTATE-EXPERIMENT-1",
               b"I18NLEVEL=2", b"SEARCH=FUZZY"}
    # Once each, at info level; those deliberately not offered (IMAP URLs, CONTEXT=) are not news.
    assert sorted(c.upper().encode() for c in logged) == sorted(unknown)
    assert all(e["log_level"].name == "info" for e in events if e.get("log_format", "").startswith("backend"))


def test_commands_of_extensions_not_offered_are_refused_before_the_backend():
    plugin = _plugin()
    for line, name in ((b'a REPLACE 1 "Other" {3+}\r\n', b"REPLACE"), (b"a UID REPLACE 4 Other {3}\r\n", b"UID REPLACE"),
                       (b"a ESEARCH IN (subtree Secret) ALL\r\n", b"ESEARCH"), (b'a XLIST "" *\r\n', b"XLIST"),
                       (b"a GETACL Secret\r\n", b"GETACL"), (b"a MYRIGHTS Secret\r\n", b"MYRIGHTS"),
                       (b"a SETACL Secret bob lr\r\n", b"SETACL"), (b"a GETJMAPACCESS\r\n", b"GETJMAPACCESS"),
                       (b"a CONVERT 1 (BODYPARTSTRUCTURE)\r\n", b"CONVERT"), (b"a uid bogus 1\r\n", b"UID BOGUS"),
                       (b"a X-CANCEL b\r\n", b"X-CANCEL"), (b"a UID ID NIL\r\n", b"UID ID")):
        action = _command(plugin, line)
        assert isinstance(action, Answer), line
        assert action.tagged == b"BAD [CLIENTBUG] Error in IMAP command " + name + b": Unknown command.", line


def test_enable_turns_on_only_what_the_view_handles():
    plugin = _plugin()
    assert _command(plugin, b"a ENABLE QRESYNC\r\n") is None
    assert _command(plugin, b"a ENABLE condstore QRESYNC\r\n") is None
    action = _command(plugin, b"a ENABLE UTF8=ACCEPT QRESYNC IMAP4rev2 UIDONLY\r\n")
    assert isinstance(action, Rewrite) and action.data == b"a ENABLE QRESYNC\r\n"
    action = _command(plugin, b"a ENABLE UTF8=ACCEPT UIDONLY\r\n")
    assert isinstance(action, Answer) and action.tagged == b"OK Enabled." and not action.untagged
    action = _command(plugin, b"a ENABLE (QRESYNC)\r\n")
    assert isinstance(action, Answer) and action.tagged.startswith(b"BAD [CLIENTBUG]")


def test_search_updates_are_refused():
    """RFC 5267's UPDATE and CONTEXT (CONTEXT=SEARCH/SORT not offered): the backend's later ADDTO/REMOVEFROM
    would tell of hidden arrivals, in its own numbers. Refused whether or not a view is built yet (a
    message arriving later may be hidden)."""
    plugin = _plugin()
    for line, option in ((b"a SEARCH RETURN (UPDATE) ALL\r\n", b"UPDATE"),
                         (b"a UID SEARCH RETURN (COUNT context) UNSEEN\r\n", b"CONTEXT"),
                         (b"a SORT RETURN (MIN UPDATE) (DATE) UTF-8 ALL\r\n", b"UPDATE"),
                         (b"a SEARCH RETURN (PARTIAL 1:10 RELEVANCY) FUZZY TEXT x\r\n", b"RELEVANCY")):
        action = _command(plugin, line)
        assert isinstance(action, Answer) and action.tagged == b"NO [CANNOT] RETURN option " + option \
            + b" is not available here.", line
    for line in (b"a SEARCH RETURN (MIN MAX COUNT ALL) ALL\r\n", b"a SEARCH RETURN (SAVE) FLAGGED\r\n",
                 b"a UID SEARCH RETURN (PARTIAL -1:-5) ALL\r\n", b"a SEARCH RETURN () ALL\r\n"):
        assert _command(plugin, line) is None, line
    # (UPDATE as a search key: none, refused as Dovecot refuses it.)
    assert _command(plugin, b"a SEARCH UPDATE\r\n").tagged.endswith(b"SEARCH: Unknown argument UPDATE.")


def test_list_return_options_the_view_does_not_know_are_refused():
    """LIST-METADATA's RETURN (METADATA ...) would return entries of every folder listed, LIST-MYRIGHTS's
    (MYRIGHTS) rights; neither is offered, nor is any other return option the policy's LIST does not know."""
    plugin = _plugin()
    for line in (b'a LIST "" "*" RETURN (METADATA (/shared/comment))\r\n', b'a LIST "" % RETURN (MYRIGHTS)\r\n',
                 b'a LIST (SUBSCRIBED) "" * RETURN (CHILDREN X-FOO)\r\n'):
        action = _command(plugin, line)
        assert isinstance(action, Answer) and action.tagged == b"BAD [CLIENTBUG] Error in IMAP command LIST: " \
            b"Unknown return options.", line
    for line in (b'a LIST "" "*" RETURN (STATUS (MESSAGES UNSEEN) SUBSCRIBED CHILDREN SPECIAL-USE)\r\n',
                 b'a LIST "" RETURN\r\n', b'a LIST "" "*" RETURN ()\r\n'):
        assert not isinstance(_command(plugin, line), Answer), line


def test_fetch_with_the_partial_modifier_is_refused():
    """RFC 9394's PARTIAL (not offered): the backend would count hidden messages in the page."""
    plugin = _plugin()
    for line in (b"a UID FETCH 1:* (FLAGS) (PARTIAL -1:-10)\r\n", b"a UID FETCH 1:* FLAGS (CHANGEDSINCE 4 partial 1:5)\r\n"):
        action = _command(plugin, line)
        assert isinstance(action, Answer) and action.tagged == b"BAD [CLIENTBUG] Error in IMAP command UID FETCH: " \
            b"Unknown FETCH modifier.", line
    assert _command(plugin, b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (PARTIAL X)])\r\n") is None


# -- against Dovecot through the proxy ---------------------------------------------------------------


def _logged_in(p, user: str = "alice") -> tuple[RawIMAP, list[bytes]]:
    c = raw_via(p)
    r = c.login(user, f"{user}pw")
    assert r[-1].startswith(b"L OK [CAPABILITY "), r
    return c, _caps(r[-1])


def _direct_caps(d: Dovecot, user: str) -> list[bytes]:
    c = RawIMAP("127.0.0.1", d.port)
    try:
        return _caps(c.login(user, f"{user}pw")[-1])
    finally:
        c.close()


def _check_offered(direct: list[bytes], offered: list[bytes], passed: list[bytes], dropped: dict) -> None:
    # Every capability the backend offers is either passed or deliberately dropped, none unaccounted for.
    assert sorted(direct) == sorted(passed + list(dropped)), set(direct) ^ set(passed + list(dropped))
    appendlimit = [c for c in offered if c.startswith(b"APPENDLIMIT=")]
    assert len(appendlimit) == 1
    assert offered == passed + appendlimit + PROXY_OWN


def test_offered_capabilities_against_dovecot(make_proxy, dovecot):
    p = make_proxy()  # (every installed plugin, the default deployment)
    direct = _direct_caps(dovecot, "alice")
    c, offered = _logged_in(p)
    try:
        _check_offered(direct, offered, DOVECOT_PASSED, DOVECOT_DROPPED)
        r = c.command(b"c", b"CAPABILITY")
        assert r[0] == b"* CAPABILITY " + b" ".join(offered) + b"\r\n"
    finally:
        c.close()
    assert "not offered to devices" not in p.log()  # (Dovecot 2.3.19's are all known)


def _dovecot_with(tmp_path_factory, name: str, extra_config: str):
    """A Dovecot of its own for user erin, with ``extra_config`` (a module fixture's)."""
    d = Dovecot(tmp_path_factory.mktemp(name), users={"erin": "erinpw"}, extra_config=extra_config)
    d.start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def dovecot_with_plugins(tmp_path_factory):
    yield from _dovecot_with(tmp_path_factory, "dovecot-plugins", PLUGINS_CONFIG)


def test_a_backend_with_quota_and_acl_offers_quota_only_and_acl_commands_stay_off(make_proxy, dovecot_with_plugins):
    """Found by the capability review: with Dovecot's ACL plugin the proxy offered ACL and RIGHTS=, whose
    commands name mailboxes the view never checked: MYRIGHTS or GETACL of a folder hidden from the device
    said it exists (OK, not NO), SETACL could share it. And a client sending such commands (or REPLACE,
    MULTISEARCH's ESEARCH, XLIST) without the capability had them run. QUOTA is offered: GETQUOTAROOT of a
    hidden folder is asked as of a missing one (Dovecot answers both alike), its name given back."""
    d = dovecot_with_plugins
    secret = "Secret" + uuid.uuid4().hex[:6]
    direct = RawIMAP("127.0.0.1", d.port)
    direct.login("erin", "erinpw")
    assert direct.command(b"c", b"CREATE " + secret.encode())[-1].startswith(b"c OK")
    assert direct.command(b"a", b"APPEND " + secret.encode() + b" {3+}\r\nx\r\n")[-1].startswith(b"a OK")
    # (What the backend answers for the hidden folder, straight: it exists.)
    assert direct.command(b"m", b"MYRIGHTS " + secret.encode())[-1].startswith(b"m OK")
    assert direct.command(b"q", b"GETQUOTAROOT " + secret.encode())[-1].startswith(b"q OK")
    direct.close()
    p = make_proxy(backend_tls="none", backend_port=d.port,
                   config_extra=f'[policy]\nexclude_folders = ["{secret}"]\n')
    c, offered = _logged_in(p, "erin")
    try:
        _check_offered(_direct_caps(d, "erin"), offered, PLUGINS_PASSED, PLUGINS_DROPPED)
        for tag, line in ((b"m", b"MYRIGHTS %s"), (b"g", b"GETACL %s"), (b"s", b"SETACL %s bob lr"),
                          (b"l", b"LISTRIGHTS %s bob"), (b"x", b'XLIST "" %s'),
                          (b"e", b"ESEARCH IN (mailboxes %s) ALL")):
            r = c.command(tag, line % secret.encode())
            name = line.split(b" ", 1)[0]
            assert r == [tag + b" BAD [CLIENTBUG] Error in IMAP command " + name + b": Unknown command.\r\n"], r
        missing = "Nope" + uuid.uuid4().hex[:6]
        for name in (secret, missing):
            r = c.command(b"q", b"GETQUOTAROOT " + name.encode())
            assert r[0] == b'* QUOTAROOT %s "User quota"\r\n' % name.encode(), r
            assert r[1].startswith(b'* QUOTA "User quota" (STORAGE ') and r[-1].startswith(b"q OK"), r
        assert c.command(b"q", b'GETQUOTA "User quota"')[-1].startswith(b"q OK")
        assert c.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        r = c.command(b"r", b"REPLACE 1 INBOX {3+}\r\nx\r\n")
        assert r == [b"r BAD [CLIENTBUG] Error in IMAP command REPLACE: Unknown command.\r\n"], r
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # (the literal was read as the command's)
        assert c.command(b"u", b"ENABLE UTF8=ACCEPT") == [b"u OK Enabled.\r\n"]
        # A STATUS count the view does not adjust (IMAP4rev2's DELETED, RFC 9208's DELETED-STORAGE: a backend
        # that has them would count hidden messages) is refused by the proxy, as Dovecot 2.3 refuses it.
        for tag, line, name in ((b"d", b"STATUS INBOX (MESSAGES DELETED)", b"DELETED"),
                                (b"e", b"STATUS INBOX (deleted-storage)", b"DELETED-STORAGE"),
                                (b"f", b'LIST "" "*" RETURN (STATUS (MESSAGES DELETED))', b"DELETED")):
            command = line.split(b" ", 1)[0]
            assert c.command(tag, line) == [tag + b" BAD [CLIENTBUG] Error in IMAP command " + command
                                            + b": Invalid status item " + name + b".\r\n"], line
        r = c.command(b"g", b"STATUS INBOX (MESSAGES X-GUID SIZE)")
        assert r[-1].startswith(b"g OK") and b"X-GUID " in r[0], r
    finally:
        c.close()
    log = p.log()
    for cap in (b"ACL", b"RIGHTS=texk"):
        assert log.count(f"backend capability {cap.decode()} not offered") == 1, log
    c, _ = _logged_in(p, "erin")  # (a second session: not logged again)
    c.close()
    assert p.log().count("backend capability ACL not offered") == 1


# -- FETCH items and search keys (review helper-98) ------------------------------------------------------


def test_fetch_items_are_an_allowlist():
    """Dovecot's X-MAILBOX (in a virtual mailbox, the name of the folder a message is in, a hidden one too)
    and any item the view does not know are refused as Dovecot refuses an item it does not know; those of
    ordinary clients, and Dovecot's others that tell of the message itself, go on."""
    plugin = _plugin()
    for line, name, item in ((b"a FETCH 1:* (UID X-MAILBOX)\r\n", b"FETCH", b"X-MAILBOX"),
                             (b"a UID FETCH 1:* x-mailbox\r\n", b"UID FETCH", b"X-MAILBOX"),
                             (b"a FETCH 1 (BODY.PEEK[HEADER.FIELDS (X-MAILBOX)] EMAILID)\r\n", b"FETCH", b"EMAILID"),
                             (b"a UID FETCH 1 (FLAGS THREADID) (CHANGEDSINCE 1)\r\n", b"UID FETCH", b"THREADID")):
        action = _command(plugin, line)
        assert isinstance(action, Answer) and action.tagged == b"BAD [CLIENTBUG] Error in IMAP command " + name \
            + b": Unknown parameter: " + item + b".", line
    # (What the proxy cannot read, Dovecot refuses too, in its own words: "Missing ')'", "Unexpected ')'".)
    for line in (b"a FETCH 1 (FLAGS X-MAILBOX\r\n", b"a FETCH 1 X-MAILBOX)\r\n", b"a FETCH 1 (FLAGS)(X-MAILBOX)\r\n"):
        assert _command(plugin, line) is None, line
    for line in (b"a FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (From To \"X-Mailbox]\")]<0.100> RFC822.SIZE)\r\n",
                 b"a UID FETCH 1:* (INTERNALDATE BODYSTRUCTURE ENVELOPE BINARY.PEEK[1] BINARY.SIZE[1] MODSEQ)"
                 b" (CHANGEDSINCE 3 VANISHED)\r\n",
                 b"a FETCH 1 (PREVIEW (LAZY) SNIPPET (FUZZY) SAVEDATE X-SAVEDATE X-GUID X-REAL-UID)\r\n",
                 b"a FETCH 1:3 FAST\r\n", b"a FETCH 1 full\r\n", b"a FETCH 1 body[]\r\n", b"a FETCH 1 RFC822.HEADER\r\n"):
        assert _command(plugin, line) is None, line


def test_notify_fetch_attributes_are_the_same_allowlist():
    """A NOTIFY's MessageNew fetch attributes: the backend sends those FETCH responses itself."""
    plugin = _plugin()
    for line, item in ((b"a NOTIFY SET (selected (MessageNew (UID X-MAILBOX) MessageExpunge))\r\n", b"X-MAILBOX"),
                       (b"a NOTIFY SET STATUS (personal (MailboxName)) (selected-delayed (MessageNew (FLAGS "
                        b"emailid) MessageExpunge FlagChange))\r\n", b"EMAILID")):
        action = _command(plugin, line)
        assert isinstance(action, Answer) and action.tagged == b"BAD [CLIENTBUG] Error in IMAP command NOTIFY: " \
            b"Invalid fetch-att list: Unknown parameter: " + item + b".", line
    for line in (b"a NOTIFY SET (selected (MessageNew (UID BODY.PEEK[HEADER.FIELDS (From)] PREVIEW (LAZY)) "
                 b"MessageExpunge)) (personal (MailboxName MessageNew))\r\n", b"a NOTIFY NONE\r\n"):
        assert _command(plugin, line) is None, line


def test_search_keys_are_an_allowlist():
    """A key the view does not know the arguments of is not passed on, nor Dovecot's X-MAILBOX; refused
    as Dovecot refuses a key it does not know."""
    plugin = _plugin()
    for line, name, key in ((b"a SEARCH X-MAILBOX Secret\r\n", b"SEARCH", b"X-MAILBOX"),
                            (b"a UID SEARCH RETURN (COUNT) CHARSET UTF-8 OR x-mailbox S* ALL\r\n", b"UID SEARCH",
                             b"x-mailbox"),
                            (b"a SORT (DATE) UTF-8 NOT (EMAILID M1)\r\n", b"SORT", b"EMAILID"),
                            (b"a THREAD REFS UTF-8 FUZZY X-FOO 1\r\n", b"THREAD", b"X-FOO")):
        action = _command(plugin, line)
        assert isinstance(action, Answer) and action.tagged == b"BAD [CLIENTBUG] Error in IMAP command " + name \
            + b": Unknown argument " + key + b".", line
    for line in (b'a SEARCH 1:3 UID 2,4:* NOT FLAGGED OR (SUBJECT "x-mailbox") HEADER X-Mailbox y $\r\n',
                 b"a UID SEARCH RETURN (MIN) MODSEQ \"/flags/\\\\Seen\" all 4 SAVEDATESUPPORTED X-GUID g\r\n",
                 b"a SEARCH CHARSET UTF-8 FUZZY TEXT x OLDER 10 X-SAVEDSINCE 1-Jan-2020 MIMEPART (SIZE LARGER 2)\r\n",
                 b"a SORT RETURN (ALL) (REVERSE DATE) UTF-8 X-REAL-UID 1:* INTHREAD REFS ALL\r\n",
                 b"a THREAD REFERENCES US-ASCII SENTSINCE 1-Feb-2020 LARGER 100\r\n"):
        assert _command(plugin, line) is None, line


VIRTUAL_CONFIG = """
mail_plugins = $mail_plugins virtual
namespace virtual {
  prefix = Virtual/
  separator = /
  location = virtual:~/virtual
}
"""


def make_virtual_mailbox(d, user: str, name: str, folders: list[str]) -> str:
    """A virtual mailbox ``Virtual/<name>`` of every message in ``folders`` (VIRTUAL_CONFIG's namespace),
    owned by the mail user as Dovecot wants; returns its IMAP name."""
    virtual = d.mail_dir / user / "virtual" / name
    virtual.mkdir(parents=True)
    (virtual / "dovecot-virtual").write_text("".join(f"{f}\n" for f in folders) + "  all\n")
    shutil.chown(virtual.parent, d.mail_uid, d.mail_gid)
    shutil.chown(virtual, d.mail_uid, d.mail_gid)
    return "Virtual/" + name


@pytest.fixture(scope="module")
def dovecot_with_virtual(tmp_path_factory):
    yield from _dovecot_with(tmp_path_factory, "dovecot-virtual", VIRTUAL_CONFIG)


def test_a_virtual_mailbox_does_not_name_a_hidden_folder(make_proxy, dovecot_with_virtual):
    """Found by review (helper-98): Dovecot's FETCH X-MAILBOX and search key X-MAILBOX name, in a virtual
    mailbox, the folder a message is in: through the proxy `FETCH 1:* (X-MAILBOX)` answered
    `* 1 FETCH (X-MAILBOX Secret...)`, and `SEARCH X-MAILBOX Secret*` found it, of a folder the device's
    policy hides. Both refused, as Dovecot refuses an item or key it does not know; the rest of the
    virtual mailbox works as any other."""
    d = dovecot_with_virtual
    secret = "Secret" + uuid.uuid4().hex[:6]
    direct = RawIMAP("127.0.0.1", d.port)
    direct.login("erin", "erinpw")
    assert direct.command(b"c", b"CREATE " + secret.encode())[-1].startswith(b"c OK")
    assert direct.command(b"a", b"APPEND " + secret.encode() + b" {3+}\r\nx\r\n")[-1].startswith(b"a OK")
    # (And one the device sees: the hidden folder's is hidden in the virtual mailbox too, test_policy_virtual.)
    assert direct.command(b"a", b"APPEND INBOX {3+}\r\ny\r\n")[-1].startswith(b"a OK")
    direct.close()
    virtual = make_virtual_mailbox(d, "erin", secret.replace("Secret", "All"), ["INBOX", secret])
    p = make_proxy(backend_tls="none", backend_port=d.port,
                   config_extra=f'[policy]\nexclude_folders = ["{secret}"]\n')
    c, _ = _logged_in(p, "erin")
    try:
        r = c.command(b"s", b"SELECT " + virtual.encode())
        assert b"* 1 EXISTS\r\n" in r and r[-1].startswith(b"s OK"), r
        for tag, line, name, what in ((b"f", b"FETCH 1:* (UID X-MAILBOX)", b"FETCH", b"Unknown parameter: X-MAILBOX."),
                                      (b"u", b"UID FETCH 1:* X-MAILBOX", b"UID FETCH",
                                       b"Unknown parameter: X-MAILBOX."),
                                      (b"s", b"SEARCH X-MAILBOX Secret*", b"SEARCH", b"Unknown argument X-MAILBOX."),
                                      (b"o", b"UID SORT (DATE) UTF-8 NOT X-MAILBOX INBOX", b"UID SORT",
                                       b"Unknown argument X-MAILBOX."),
                                      (b"n", b"NOTIFY SET (selected (MessageNew (UID X-MAILBOX) MessageExpunge))",
                                       b"NOTIFY", b"Invalid fetch-att list: Unknown parameter: X-MAILBOX.")):
            r = c.command(tag, line)
            assert r == [tag + b" BAD [CLIENTBUG] Error in IMAP command " + name + b": " + what + b"\r\n"], r
        r = c.command(b"m", b"NOTIFY SET (selected (MessageNew (UID X-GUID BODY.PEEK[HEADER.FIELDS (From)]) "
                            b"MessageExpunge))")
        assert r[-1].startswith(b"m OK"), r
        r = c.command(b"g", b"FETCH 1 (UID X-GUID X-REAL-UID SAVEDATE BODY.PEEK[HEADER.FIELDS (From)])")
        assert re.match(rb"\* 1 FETCH \(UID \d+ X-GUID ", r[0]) and r[-1].startswith(b"g OK"), r
        r = c.command(b"h", b"SEARCH X-REAL-UID 1 NOT X-GUID nope")
        assert r[0] == b"* SEARCH 1\r\n" and r[-1].startswith(b"h OK"), r
    finally:
        c.close()
