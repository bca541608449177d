"""A view that changes while the mailbox is selected: another device of the user turns a kind off (found by
review, 2026-11-27). RFC 9051 7.5.1 forbids EXPUNGE while answering a FETCH, STORE or SEARCH by number;
RFC 7162 wants VANISHED instead of EXPUNGE once QRESYNC is enabled, and VANISHED (EARLIER) at a QRESYNC
resync for what the device knew and is now gone for it.

Folder preferences (on a folder of the test's own), so no other test sees them.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via

PREFIX = b"/private/vendor/vendor.cpmproxy"
KINDS = ["chat", "imdn", "chat", "chat"]  # UIDs 1..4; UID 2 is the IMDN


@pytest.fixture
def folder(dovecot):
    name = "Changes" + uuid.uuid4().hex[:8]
    uids = [dovecot.deliver("dave", name, make_object(kind, seed=i)) for i, kind in enumerate(KINDS)]
    assert uids == [1, 2, 3, 4]
    return name.encode()


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


def device(proxy, name: str):
    c = raw_via(proxy)
    c.command(b"i", b'ID ("x-cpm-device-id" "%s")' % name.encode())
    assert c.login("dave", "davepw")[-1].startswith(b"L OK")
    return c


def turn_imdn_off(proxy, folder: bytes) -> None:
    other = device(proxy, "other-device")
    r = other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (folder, PREFIX))
    assert r[-1].startswith(b"m OK"), r
    other.close()


def test_no_expunge_during_a_fetch_by_number_and_the_client_numbers_hold(proxy, folder):
    c = device(proxy, "phone")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    turn_imdn_off(proxy, folder)
    # The client's 3 is still UID 3 (the numbers it knows), and nothing is expunged while it is answered.
    assert [line for line in c.command(b"f", b"FETCH 3 (UID)") if line.startswith(b"* ")] == [b"* 3 FETCH (UID 3)\r\n"]
    r = c.command(b"n", b"NOOP")
    assert [line for line in r if line.startswith(b"* ")] == [b"* 2 EXPUNGE\r\n"], r
    assert [line for line in c.command(b"h", b"FETCH 2 (UID)") if line.startswith(b"* ")] == [b"* 2 FETCH (UID 3)\r\n"]
    c.close()


def test_qresync_client_gets_vanished_then_vanished_earlier_at_resync(proxy, folder):
    c = device(proxy, "phone")
    c.command(b"e", b"ENABLE QRESYNC")
    r = c.command(b"s", b'SELECT "%s"' % folder)
    uidvalidity = int(re.search(rb"\[UIDVALIDITY (\d+)\]", b"".join(r)).group(1))
    turn_imdn_off(proxy, folder)
    r = c.command(b"n", b"NOOP")
    assert [line for line in r if line.startswith(b"* ")] == [b"* VANISHED 2\r\n"], r
    c.close()
    # The device comes back and resyncs, saying it knew UIDs 1:4.
    c = device(proxy, "phone")
    c.command(b"e", b"ENABLE QRESYNC")
    r = c.command(b"s", b'SELECT "%s" (QRESYNC (%d 1 1:4))' % (folder, uidvalidity))
    assert b"* VANISHED (EARLIER) 2\r\n" in r, r
    r = c.command(b"f", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)")
    assert b"* VANISHED (EARLIER) 2\r\n" in r, r
    c.close()


@pytest.mark.parametrize("command", [b"NOOP", b"FETCH 1 (BODY.PEEK[TEXT])"])
def test_selected_folder_turned_off_ends_the_session(proxy, folder, command):
    """Also before a command by number: a BYE may come at any time (unlike an EXPUNGE)."""
    c = device(proxy, "phone")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    other = device(proxy, "other-device")
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync "off")' % (folder, PREFIX))[-1].startswith(b"m OK")
    c.send(b"n " + command + b"\r\n")
    assert c.read_response() == b"* BYE [NONEXISTENT] The selected mailbox is no longer synchronized to this device.\r\n"
    with pytest.raises(ConnectionError):
        c.read_response()
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync NIL)' % (folder, PREFIX))[-1].startswith(b"m OK")
    other.close()


def test_commands_pipelined_behind_select_use_the_views_numbers(proxy, folder, dovecot):
    """SELECT and commands by number in one write: they wait for the SELECT's view (the IMDN, UID 2, is
    hidden by a folder preference: the client's 2 is UID 3), so they neither miss nor touch the IMDN."""
    other = device(proxy, "other-device")
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (folder, PREFIX))[-1].startswith(b"m OK")
    c = device(proxy, "phone")
    c.send(b'a SELECT "%s"\r\nb STORE 2 +FLAGS (\\Flagged)\r\nc FETCH 2:3 (UID)\r\nd SEARCH ALL\r\n'
           b"e UID SEARCH ALL\r\n" % folder)
    got, done = [], 0
    while done < 5:
        got.append(c.read_response())
        done += got[-1][:2] in (b"a ", b"b ", b"c ", b"d ", b"e ")
    assert b"* 3 EXISTS\r\n" in got
    assert b"* 2 FETCH (UID 3)\r\n" in got and b"* 3 FETCH (UID 4)\r\n" in got, got
    assert b"* SEARCH 1 2 3\r\n" in got and b"* SEARCH 1 3 4\r\n" in got, got
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(folder.decode(), readonly=True)
    flagged = imap.search("FLAGGED")
    imap.logout()
    assert flagged == [3], flagged
    c.close()
    other.close()


def _answers(c, tags: bytes) -> list[bytes]:
    """Responses up to the tagged answers of each of ``tags`` (one letter each), pipelined."""
    got, done = [], 0
    while done < len(tags):
        try:
            got.append(c.read_response())
        except TimeoutError:
            raise AssertionError(got) from None
        done += got[-1][:1] in tags and got[-1][1:2] == b" "
    return got


def test_commands_before_a_select_are_answered_under_their_own_view(proxy, folder, dovecot):
    """Commands pipelined before a SELECT are answered in the mailbox selected when they were sent: the
    view changed when the SELECT arrived, and their responses passed unfiltered (the hidden IMDN, UID 2,
    with its header; numbers not the view's) or under the next mailbox's view (found by review)."""
    plain = "Plain" + uuid.uuid4().hex[:8]
    for i in range(4):
        dovecot.deliver("dave", plain, make_object("chat", seed=i))
    other = device(proxy, "other-device")
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (folder, PREFIX))[-1].startswith(b"m OK")
    c = device(proxy, "phone")
    c.send(b'a SELECT "%s"\r\nb UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (CONTENT-TYPE)])\r\n'
           b'c FETCH 1:* (UID)\r\nd SEARCH ALL\r\ne SELECT "%s"\r\n' % (folder, plain.encode()))
    got = _answers(c, b"abcde")
    assert all(line.startswith(b"OK", 2) for line in got if line[:1] in b"abcde"), got
    fetched = [line for line in got if b" FETCH (" in line]
    assert [re.search(rb"UID (\d+)", line).group(1) for line in fetched] == [b"1", b"3", b"4"] * 2, got
    assert b"imdn" not in b"".join(fetched).lower(), fetched
    assert b"* 2 FETCH (UID 3)\r\n" in got and b"* SEARCH 1 2 3\r\n" in got, got
    assert b"* 4 EXISTS\r\n" in got  # (the plain mailbox, all shown)
    # The other way round: a FETCH of the plain mailbox pipelined before the SELECT of the filtered one.
    c.send(b'f FETCH 1:* (UID)\r\ng SELECT "%s"\r\nh FETCH 1:* (UID)\r\n' % folder)
    got = _answers(c, b"fgh")
    assert [line for line in got if b" FETCH (" in line] == [
        b"* %d FETCH (UID %d)\r\n" % (i, i) for i in (1, 2, 3, 4)] + [
        b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 3)\r\n", b"* 3 FETCH (UID 4)\r\n"], got
    c.close()
    other.close()


def test_commands_by_number_behind_an_expunge_use_the_numbers_after_it(proxy, folder, dovecot):
    """Under a filtered view (the IMDN, UID 2, hidden), commands by number pipelined behind an EXPUNGE mean
    the numbers after it, as the backend reads them: they were translated with the view from before (a
    STORE flagged the message being expunged; FETCH 1:* was refused "Invalid messageset")."""
    other = device(proxy, "other-device")
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (folder, PREFIX))[-1].startswith(b"m OK")
    c = device(proxy, "phone")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    c.send(b"a STORE 2 +FLAGS.SILENT (\\Deleted)\r\nb EXPUNGE\r\nc FETCH 2 (UID)\r\n"
           b"d STORE 1:2 +FLAGS.SILENT (\\Flagged)\r\ne FETCH 1:* (UID)\r\n")
    got = _answers(c, b"abcde")
    assert all(line.startswith(b"OK", 2) for line in got if line[:1] in b"abcde"), got
    assert b"* 2 EXPUNGE\r\n" in got, got
    assert [line for line in got if b" FETCH (" in line] == [
        b"* 2 FETCH (UID 4)\r\n", b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 4)\r\n"], got
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(folder.decode(), readonly=True)
    assert imap.search("FLAGGED") == [1, 4]
    assert imap.search("ALL") == [1, 2, 4]  # (the hidden IMDN stays)
    imap.logout()
    c.close()
    other.close()


def test_a_local_delete_by_number_after_a_preference_change_marks_the_clients_message(proxy, folder):
    """Nothing hidden at SELECT (no view built); then the IMDN (UID 2) is turned off. The local delete of
    the client's 3 (UID 3) must mark UID 3: the view built for it is what the client was shown, and the
    IMDN leaves at the next command that may announce it."""
    c = device(proxy, "phone")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    turn_imdn_off(proxy, folder)
    r = c.command(b"d", b"STORE 3 +FLAGS (\\Deleted $LocalDelete)")
    assert r[0].startswith(b"* 3 FETCH (") and b"UID 3" in r[0], r
    r = c.command(b"e", b"EXPUNGE")
    assert len([line for line in r if line.endswith(b" EXPUNGE\r\n")]) == 2, r  # (UID 3, and the IMDN)
    assert [line for line in c.command(b"f", b"FETCH 1:* (UID)") if line.startswith(b"* ")] == [
        b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 4)\r\n"]
    c.close()


def test_refused_reselect_keeps_the_session(proxy, folder):
    """The backend refuses a re-SELECT (BAD) after closing the mailbox selected before ("* OK [CLOSED]"):
    the client gets the BAD, not a BYE from a view built for nothing."""
    other = device(proxy, "other-device")
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (folder, PREFIX))[-1].startswith(b"m OK")
    c = device(proxy, "phone")
    c.command(b"e", b"ENABLE QRESYNC")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    r = c.command(b"t", b'SELECT "%s" (BOGUS)' % folder)
    assert r[-1].startswith(b"t BAD"), r
    assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    c.close()
    other.close()


def test_vanished_only_for_qresync_and_this_uidvalidity(proxy, folder):
    other = device(proxy, "other-device")
    assert other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (folder, PREFIX))[-1].startswith(b"m OK")
    c = device(proxy, "phone")
    r = c.command(b"s", b'EXAMINE "%s"' % folder)
    uidvalidity = int(re.search(rb"\[UIDVALIDITY (\d+)\]", b"".join(r)).group(1))
    r = c.command(b"f", b"UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (X-Vanished)])")
    assert not any(b"VANISHED" in line for line in r if line.startswith(b"* VANISHED")), r
    c.close()
    c = device(proxy, "phone")
    c.command(b"e", b"ENABLE QRESYNC")
    r = c.command(b"s", b'SELECT "%s" (QRESYNC (%d 1 1:4))' % (folder, uidvalidity + 1))
    assert r[-1].startswith(b"s OK") and not any(line.startswith(b"* VANISHED") for line in r), r
    c.close()
    other.close()


# -- found by a randomized run against a model (each failed before its fix) --------------------------

def _fresh(dovecot, make_proxy, kinds):
    name = "Vz" + uuid.uuid4().hex[:8]
    uids = [dovecot.deliver("dave", name, make_object(k, seed=i)) for i, k in enumerate(kinds)]
    p = make_proxy(config_extra="[policy]\nsync = { imdn = false }\n")
    c = raw_via(p)
    c.command(b"i", b'ID ("x-cpm-device-id" "phone")')
    assert c.login("dave", "davepw")[-1].startswith(b"L OK")
    return name, uids, c


def _untagged(r):
    return [x for x in r if x.startswith(b"* ")]


def test_a_uid_search_key_star_is_the_last_message_the_device_sees(dovecot, make_proxy):
    """``UID *`` in SEARCH criteria took the backend's last UID, a hidden IMDN: nothing was found."""
    name, uids, c = _fresh(dovecot, make_proxy, ["chat", "chat", "imdn"])
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name.encode())
    want = b"* SEARCH %d\r\n" % uids[1]
    assert _untagged(c.command(b"a", b"UID SEARCH UID *")) == [want]
    assert _untagged(c.command(b"b", b"SEARCH UID *")) == [b"* SEARCH 2\r\n"]
    assert _untagged(c.command(b"c", b"UID SEARCH UID %d:*" % uids[2])) == [want]
    assert b"COUNT 1" in c.command(b"d", b"SEARCH RETURN (COUNT) UID *")[0]
    assert _untagged(c.command(b"e", b"UID SEARCH NOT UID *")) == [b"* SEARCH %d\r\n" % uids[0]]
    c.close()


@pytest.mark.parametrize("third, want", [("unseen", b"* OK [UNSEEN 2] "), ("seen", None)])
def test_select_says_the_first_unseen_message_the_device_sees(dovecot, make_proxy, third, want):
    """Found by review: UIDs 1 chat (seen), 2 IMDN (hidden, unseen), 3 chat: the backend's first unseen
    message is the hidden one, and the view dropped ``[UNSEEN n]``, which told the device that an unseen
    message it does not see came first. It names the first unseen message the device sees (its 2, UID 3),
    and is left out only when there is none."""
    name, uids, c = _fresh(dovecot, make_proxy, ["chat", "imdn", "chat"])
    d = dovecot.imap_direct("dave", tls="none")
    d.select_folder(name)
    d.add_flags([uids[0]] + ([uids[2]] if third == "seen" else []), [b"\\Seen"])
    d.logout()
    r = c.command(b"s", b'SELECT "%s"' % name.encode())
    c.close()
    assert r[-1].startswith(b"s OK") and b"* 2 EXISTS\r\n" in r, r
    said = [x for x in r if b"[UNSEEN " in x]
    assert [x[:len(want)] for x in said] == ([want] if want else []), r


def test_vanished_earlier_leaves_the_view_as_it_is(dovecot, make_proxy):
    """The backend's VANISHED (EARLIER) (RFC 7162: no expunge of the session's messages) took its UIDs out
    of the view, a hidden one among them: the view lost track and FETCHes showed the hidden message."""
    name, uids, c = _fresh(dovecot, make_proxy, ["chat", "imdn", "chat", "chat"])
    assert c.command(b"e", b"ENABLE QRESYNC")[-1].startswith(b"e OK")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name.encode())
    d = dovecot.imap_direct("dave", tls="none")
    d.select_folder(name)
    d.add_flags(uids[1:3], [b"\\Deleted"], silent=True)
    d.uid_expunge(uids[1:3])  # the hidden IMDN and the device's message 2
    d.logout()
    c.command(b"x", b"SEARCH ALL")  # (a command by number: the expunges are held back)
    r = _untagged(c.command(b"f", b"UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 1 VANISHED)"))
    assert not any(b"UID %d " % uids[1] in x for x in r if b" FETCH " in x), r
    assert [x for x in r if x.startswith(b"* VANISHED ") and b"EARLIER" not in x] == [b"* VANISHED %d\r\n" % uids[2]], r
    assert _untagged(c.command(b"g", b"FETCH 1:* (UID)")) == [b"* 1 FETCH (UID %d)\r\n" % uids[0],
                                                            b"* 2 FETCH (UID %d)\r\n" % uids[3]]
    c.close()


def test_status_of_the_selected_mailbox_counts_what_the_session_knows(dovecot, make_proxy):
    """Dovecot counts the selected mailbox as the session knows it; the proxy took off hidden unseen
    messages as the mailbox is now: after another session expunged an unseen hidden IMDN, UNSEEN 3 beside
    MESSAGES 2. STATUS says what the device has been told (its count), and tells it nothing new."""
    name, uids, c = _fresh(dovecot, make_proxy, ["chat", "imdn", "chat"])
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name.encode())
    d = dovecot.imap_direct("dave", tls="none")
    d.select_folder(name)
    d.add_flags([uids[1]], [b"\\Deleted"], silent=True)
    d.uid_expunge([uids[1]])
    d.append(name, make_object("imdn", seed=77), flags=())
    d.logout()
    dovecot.deliver("dave", name, make_object("chat", seed=90))
    r = c.command(b"t", b'STATUS "%s" (MESSAGES UNSEEN)' % name.encode())
    st = next(x for x in r if x.startswith(b"* STATUS "))
    assert re.search(rb"MESSAGES 2\b", st) and re.search(rb"UNSEEN 2\b", st), r
    assert not any(x.endswith((b"EXISTS\r\n", b"EXPUNGE\r\n")) for x in r), r
    assert b"* 3 EXISTS\r\n" in c.command(b"n", b"NOOP")  # (the new chat; the IMDNs are nothing to it)
    st = c.command(b"u", b'STATUS "%s" (MESSAGES UNSEEN)' % name.encode())[0]
    assert re.search(rb"MESSAGES 3\b", st) and re.search(rb"UNSEEN 3\b", st), st
    c.close()


def test_status_of_the_selected_mailbox_renumbers_nothing(dovecot, make_proxy):
    """A STATUS poll brings no EXPUNGE (Dovecot sends none for it): a STORE by number pipelined behind it
    reached another message when the proxy brought the session up to date first."""
    name, uids, c = _fresh(dovecot, make_proxy, ["chat", "imdn", "chat", "chat"])
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name.encode())
    d = dovecot.imap_direct("dave", tls="none")
    d.select_folder(name)
    d.add_flags([uids[0]], [b"\\Deleted"], silent=True)
    d.uid_expunge([uids[0]])
    c.send(b'b STATUS "%s" (MESSAGES UNSEEN)\r\nc STORE 2 +FLAGS.SILENT (\\Seen)\r\n' % name.encode())
    assert c.until_tagged(b"b")[-1].startswith(b"b OK") and c.until_tagged(b"c")[-1].startswith(b"c OK")
    flags = d.get_flags(uids[1:])
    d.logout()
    assert b"\\Seen" in flags[uids[2]] and b"\\Seen" not in flags[uids[3]], flags
    c.close()


@pytest.mark.parametrize("uid", [b"", b"UID "])
def test_a_saved_result_does_not_reach_a_message_hidden_since(proxy, folder, dovecot, uid):
    """$ saved while the IMDN (UID 2) was visible; then another device turns IMDNs off: a STORE, COPY or
    MOVE of $ reached the now hidden message (copied into a folder, it was visible again there)."""
    target = folder.decode() + "-copy"
    c = device(proxy, "phone")
    assert c.command(b"k", b'CREATE "%s"' % target.encode())[-1].startswith(b"k OK")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    assert c.command(b"a", b"SEARCH RETURN (SAVE) ALL")[-1].startswith(b"a OK")
    turn_imdn_off(proxy, folder)
    assert b"* 2 EXPUNGE\r\n" in c.command(b"n", b"NOOP")
    assert c.command(b"b", uid + b"STORE $ +FLAGS.SILENT (\\Flagged)")[-1].startswith(b"b OK")
    copied = c.command(b"c", uid + b'COPY $ "%s"' % target.encode())[-1]
    assert copied.startswith(b"c OK") and re.search(rb"\[COPYUID \d+ 1,3:4 1:3\]", copied), copied
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(folder.decode(), readonly=True)
    assert imap.search("FLAGGED") == [1, 3, 4]
    imap.select_folder(target, readonly=True)
    assert len(imap.search("ALL")) == 3
    imap.logout()
    c.close()


@pytest.mark.parametrize("uid", [b"", b"UID "])
def test_a_body_fetch_of_a_saved_result_does_not_mark_a_message_hidden_since_seen(proxy, folder, dovecot, uid):
    """As above, for a FETCH of $ that reads bodies (without .PEEK it sets \\Seen): it was passed on as it
    was, and Dovecot marked the now hidden IMDN seen (its response was dropped, its flag stayed)."""
    c = device(proxy, "phone")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    assert c.command(b"a", b"SEARCH RETURN (SAVE) ALL")[-1].startswith(b"a OK")
    turn_imdn_off(proxy, folder)
    assert b"* 2 EXPUNGE\r\n" in c.command(b"n", b"NOOP")
    r = c.command(b"f", uid + b"FETCH $ (BODY[TEXT])")
    assert r[-1].startswith(b"f OK") and sum(x.startswith(b"* ") and b" FETCH " in x for x in r) == 3, r
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(folder.decode(), readonly=True)
    assert imap.search("SEEN") == [1, 3, 4]
    imap.logout()
    c.close()


@pytest.mark.parametrize("target", [b"NoSuchFolder", b"Excluded"])
def test_a_select_the_proxy_refuses_leaves_no_mailbox_selected(make_proxy, folder, dovecot, target):
    """Found by the leak hunt: a SELECT the proxy answered NO itself (a device with local deletes: the
    records read of a folder that does not exist failed first; a folder the policy excludes) never
    reached the backend, which kept the previous mailbox selected, while the policy dropped its view:
    the next commands listed, read and expunged the hidden messages and the device's local deletes."""
    p = make_proxy(config_extra='[policy]\nsync = { imdn = false }\nexclude_folders = ["Excluded"]\n')
    dovecot.deliver("dave", "Excluded", make_object("chat"))
    c = device(p, "phone")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)  # (UID 2, the IMDN, hidden)
    assert c.command(b"d", b"UID STORE 3 +FLAGS (\\Deleted $LocalDelete)")[-1].startswith(b"d OK")
    assert c.command(b"e", b"EXPUNGE")[-1].startswith(b"e OK")  # (UID 3: deleted for this device only)
    r = c.command(b"x", b'SELECT "%s"' % target)
    assert r[-1].startswith(b"x NO") and r[0] == b"* OK [CLOSED] Previous mailbox closed.\r\n", r
    r = c.command(b"f", b"UID SEARCH ALL")
    assert r[-1].startswith(b"f BAD") and not any(x.startswith(b"* SEARCH") for x in r), r  # (none selected)
    r = c.command(b"g", b"UID STORE 2 +FLAGS (\\Deleted)")
    assert r[-1].startswith(b"g BAD"), r
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)  # (the view again: 1 and 4)
    c.close()
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(folder.decode(), readonly=True)
    assert imap.search("ALL") == [1, 2, 3, 4] and imap.search("DELETED") == []
    imap.logout()



def test_commands_naming_hidden_uids_only_are_answered_as_for_uids_that_do_not_exist(proxy, folder):
    """Found by the leak hunt: the proxy answered them itself ("completed (no visible messages)"), where
    the backend says otherwise of UIDs that do not exist: a device could tell which UIDs exist, hidden."""
    c = device(proxy, "phone")
    target = folder.decode() + "-t"
    assert c.command(b"k", b'CREATE "%s"' % target.encode())[-1].startswith(b"k OK")
    c.command(b"s", b'SELECT "%s"' % folder)
    turn_imdn_off(proxy, folder)
    c.command(b"n", b"NOOP")

    def answer(line: bytes) -> bytes:
        r = c.command(b"x", line)
        return re.sub(rb" \([0-9.]+ \+ [0-9.]+(?: \+ [0-9.]+)? secs\)", b"", r[-1])  # (the backend's timing)

    for command in (b"UID STORE %d +FLAGS (\\Flagged)", b'UID COPY %d "' + target.encode() + b'"',
                    b'UID MOVE %d "' + target.encode() + b'"', b"UID FETCH %d (BODY[])", b"UID EXPUNGE %d"):
        assert answer(command % 2) == answer(command % 99), command  # (UID 2: the hidden IMDN)
    c.close()


def _set_imdn(proxy, folder: bytes, value: bytes) -> None:
    other = device(proxy, "other-device")
    r = other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "%s")' % (folder, PREFIX, value))
    assert r[-1].startswith(b"m OK"), r
    other.close()


def test_messages_shown_again_never_come_below_the_uidnext_the_client_was_told(dovecot, proxy):
    """Found by the leak hunt: in a folder of IMDNs only, turned off and on again while selected, the
    proxy announced ``* 2 EXISTS`` for UIDs 1 and 2, below the UIDNEXT 3 the client was told at SELECT
    (RFC 9051 2.3.1.1: new messages get ascending UIDs from UIDNEXT on; a client that syncs by UIDNEXT
    would take them as known). They come back at the next SELECT."""
    name = "Back" + uuid.uuid4().hex[:8]
    for i in range(2):
        dovecot.deliver("dave", name, make_object("imdn", seed=i))
    folder = name.encode()
    c = device(proxy, "phone")
    r = c.command(b"s", b'SELECT "%s"' % folder)
    assert b"* 2 EXISTS\r\n" in r and b"* OK [UIDNEXT 3]" in b"".join(r), r
    _set_imdn(proxy, folder, b"off")
    assert _untagged(c.command(b"n", b"NOOP")) == [b"* 2 EXPUNGE\r\n", b"* 1 EXPUNGE\r\n"]
    _set_imdn(proxy, folder, b"on")
    assert _untagged(c.command(b"o", b"NOOP")) == []
    assert _untagged(c.command(b"f", b"UID FETCH 1:* (UID)")) == []
    # An IMDN that arrives while they are off is new to the client: it comes back when they are on again.
    _set_imdn(proxy, folder, b"off")
    uid = dovecot.deliver("dave", name, make_object("imdn", seed=7))
    assert uid == 3 and _untagged(c.command(b"p", b"NOOP")) == []
    _set_imdn(proxy, folder, b"on")
    assert _untagged(c.command(b"q", b"NOOP")) == [b"* 1 EXISTS\r\n"]
    assert _untagged(c.command(b"g", b"FETCH 1:* (UID)")) == [b"* 1 FETCH (UID 3)\r\n"]
    assert b"* 3 EXISTS\r\n" in c.command(b"t", b'SELECT "%s"' % folder)
    c.close()


def test_a_message_hidden_at_select_stays_hidden_until_the_next_select(dovecot, proxy, folder):
    """UID 4 was hidden at SELECT, above every visible UID but below the UIDNEXT told then: the client
    takes it as known not to exist. Shown again mid-session it was announced as new (EXISTS)."""
    dovecot.deliver("dave", folder.decode(), make_object("imdn", seed=40))  # UID 5
    _set_imdn(proxy, folder, b"off")
    c = device(proxy, "phone")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)  # (UIDs 1, 3, 4)
    _set_imdn(proxy, folder, b"on")
    assert _untagged(c.command(b"n", b"NOOP")) == []
    assert _untagged(c.command(b"f", b"FETCH 1:* (UID)"))[-1] == b"* 3 FETCH (UID 4)\r\n"
    assert b"* 5 EXISTS\r\n" in c.command(b"s2", b'SELECT "%s"' % folder)
    c.close()


@pytest.mark.parametrize("command", [b"UID STORE 1:* +FLAGS (\\Flagged)", b"STORE 1:* +FLAGS (\\Flagged)",
                                     b"UID STORE 1:99 +FLAGS (\\Flagged)", b'UID COPY 1:* "%s-copy"',
                                     b'MOVE 1:* "%s-copy"'])
def test_a_command_pipelined_behind_one_that_announces_a_hidden_arrival_does_not_touch_it(
        proxy, dovecot, command):
    """Found by review: in a folder where nothing was hidden, commands went to the backend as written;
    one pipelined behind a command during which the backend took in a new message (its EXISTS held while
    the proxy classifies it) reached that message too through ``*`` or a UID above every one announced,
    though it was an IMDN the device does not see. Flagged, copied, moved away by a device that never
    saw it."""
    name = b"Arrive" + uuid.uuid4().hex[:8].encode()
    for i in range(3):
        dovecot.deliver("dave", name.decode(), make_object("chat", seed=i))
    dovecot.deliver("dave", name.decode() + "-copy", make_object("chat", seed=9))
    c = device(proxy, "phone")
    assert c.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (name, PREFIX))[-1].startswith(b"m OK")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    assert dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5)) == 4
    line = command % name if b"%s" in command else command
    c.send(b"n NOOP\r\n")
    time.sleep(0.001)  # (the NOOP done at the backend, its EXISTS held by the proxy)
    c.send(b"x " + line + b"\r\nf FETCH 1:* (UID FLAGS)\r\n")
    got = _answers(c, b"nxf")
    # (Only a hidden message arrived: nothing to tell, no message 4.)
    assert not [x for x in got if b"EXISTS" in x or x.startswith(b"* 4 ") or b"UID 4" in x], got
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(name.decode(), readonly=True)
    left = imap.fetch(imap.search("ALL"), ["FLAGS"])  # (by UID)
    imap.select_folder(name.decode() + "-copy", readonly=True)
    copies = imap.search("ALL")
    imap.logout()
    assert 4 in left and b"\\Flagged" not in left[4][b"FLAGS"], left  # (the IMDN stayed, as it was)
    assert len(copies) == (1 if b"STORE" in command else 4), copies
    c.close()


@pytest.mark.parametrize("hidden_before", [False, True], ids=["identity", "filtered"])
@pytest.mark.parametrize("command", [b"STORE $ +FLAGS (\\Flagged)", b'MOVE $ "%s-copy"',
                                     b"STORE $ +FLAGS ($LocalDelete \\Flagged)"])
def test_a_saved_result_taken_behind_a_hidden_arrival_does_not_reach_it(proxy, dovecot, command, hidden_before):
    """Found by review: ``$`` saved by a search behind a command during which an IMDN arrived holds it (the
    backend had taken it in), and a STORE or MOVE of ``$`` reached it: passed on as written where nothing
    was hidden, or narrowed by a ``$`` read that passed the held EXISTS, before the IMDN was classified
    (a local delete's too). Flagged or moved away by a device that never saw it; MOVE's COPYUID named it."""
    name = b"Dollar" + uuid.uuid4().hex[:8].encode()
    kinds = ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3
    for i, k in enumerate(kinds):
        dovecot.deliver("dave", name.decode(), make_object(k, seed=i))
    dovecot.deliver("dave", name.decode() + "-copy", make_object("chat", seed=9))
    c = device(proxy, "phone")
    assert c.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (name, PREFIX))[-1].startswith(b"m OK")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    new = dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5))
    c.send(b"n NOOP\r\n")
    time.sleep(0.001)  # (the NOOP done at the backend, its EXISTS held by the proxy)
    c.send(b"v SEARCH RETURN (SAVE) ALL\r\nx " + (command % name if b"%s" in command else command)
           + b"\r\nf FETCH 1:* (UID FLAGS)\r\n")
    got = _answers(c, b"nvxf")
    c.close()
    assert [x for x in got if x.startswith(b"x ")][0].startswith(b"x OK"), got
    assert not [x for x in got if b"EXISTS" in x or x.startswith(b"* 4 ") or b"UID %d" % new in x
                or (b"COPYUID" in x and b",%d " % new in x.replace(b":", b",") + b" ")], got
    imap = dovecot.imap_direct("dave", tls="none")
    imap.select_folder(name.decode(), readonly=True)
    left = imap.fetch(imap.search("ALL"), ["FLAGS"])
    imap.logout()
    assert new in left and not {b"\\Flagged", b"$LocalDelete"} & set(left[new][b"FLAGS"]), (left, got)


def _client_state(known: list[int], lines: list[bytes], by_number: bytes = b"", arrivals=()) -> list[int]:
    """The UIDs a client knows after ``lines``, each EXISTS/EXPUNGE/VANISHED checked to be valid when
    read (new messages are ``arrivals``, in order); no EXPUNGE or VANISHED while the command tagged
    ``by_number`` (a FETCH by number) is answered."""
    known, answering = list(known), bool(by_number)
    for line in lines:
        if by_number and line.startswith(by_number + b" "):
            answering = False
        elif (m := re.match(rb"\* (\d+) (EXISTS|EXPUNGE)\r\n", line)):
            n = int(m.group(1))
            if m.group(2) == b"EXISTS":
                assert n >= len(known), (line, known, lines)
                known += [u for u in arrivals if u > max(known, default=0)][:n - len(known)]
            else:
                assert 1 <= n <= len(known) and not answering, (line, known, lines)
                del known[n - 1]
        elif (m := re.match(rb"\* VANISHED (\S+)\r\n", line)):
            uids = {int(u) for u in m.group(1).split(b",")}
            assert uids <= set(known) and not answering, (line, known, lines)
            known = [u for u in known if u not in uids]
        elif (m := re.match(rb"\* (\d+) FETCH \(UID (\d+)\)", line)):
            n, uid = int(m.group(1)), int(m.group(2))
            assert known[n - 1] == uid, (line, known, lines)
    return known


@pytest.mark.parametrize("qresync", [False, True])
def test_a_view_reapplied_behind_an_unannounced_arrival_keeps_the_client_numbers(make_proxy, folder, dovecot,
                                                                                 qresync):
    """A preference change re-applied at a command pipelined behind a FETCH by number whose answer
    announces a new message (its EXISTS held while it is classified, with a view built: an SMS policy).
    The backend knows the arrival when the view is classified again, the client does not: no VANISHED of
    it, no EXISTS below the client's count, and no EXPUNGE while the FETCH is answered."""
    p = make_proxy(config_extra="[policy]\nsync = { sms = false }\n")
    c = device(p, "phone")
    if qresync:
        c.command(b"e", b"ENABLE QRESYNC")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    assert dovecot.deliver("dave", folder.decode(), make_object("imdn", seed=9)) == 5
    turn_imdn_off(p, folder)
    c.send(b"a FETCH 1 (UID)\r\nb NOOP\r\n")
    r = c.until_tagged(b"a") + c.until_tagged(b"b")
    known = _client_state([1, 2, 3, 4], r, by_number=b"a", arrivals=[5])
    r = c.command(b"f", b"FETCH 1:* (UID)")
    assert _client_state(known, r) == [1, 3, 4], r
    c.close()



def test_a_view_reapplied_in_idle_right_after_an_arrival_keeps_the_client_numbers(proxy, folder, dovecot):
    """Nothing hidden (no view built), the client idles; an IMDN arrives and IMDNs are turned off at once:
    whatever the order in which the backend tells the arrival and the view is classified, the client's
    numbers hold."""
    c = device(proxy, "phone")
    assert b"* 4 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder)
    c.send(b"i IDLE\r\n")
    assert c.read_line().startswith(b"+")
    assert dovecot.deliver("dave", folder.decode(), make_object("imdn", seed=9)) == 5
    turn_imdn_off(proxy, folder)
    time.sleep(1.2)
    c.send(b"DONE\r\n")
    r = c.until_tagged(b"i")
    known = _client_state([1, 2, 3, 4], r, arrivals=[5])
    f = c.command(b"f", b"FETCH 1:* (UID)")
    assert _client_state(known, f) == [1, 3, 4], (r, f)
    c.close()
