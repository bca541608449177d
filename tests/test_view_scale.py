"""A filtered view of a big mailbox: many scattered hidden messages (every other one an IMDN the policy
hides). Its UID set is longer than a backend command line may be (found by the scaling review,
2026-11-27: STATUS and LIST-STATUS of such a folder were ``NO [UNAVAILABLE]`` every time, since the
hidden UIDs' unseen count and sizes were asked in one command naming them all).

Dovecot here keeps a 4 KB line limit (Dovecot's default is 64 KB, the shipped configuration's 1 MB): the
same as ~11,000 scattered hidden messages under the default, with 2,000 messages to store.
"""

from __future__ import annotations

import re
import time

import pytest

from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.testing.dovecot import Dovecot
from cpmproxy.testing.proxyproc import ProxyProcess
from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object

SHORT_LINES = "protocol imap {\n  imap_max_line_length = 4k\n}\n"
COUNT = 2000  # every other one an IMDN: 1,000 hidden, ~5 KB of UIDs


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = Dovecot(tmp_path_factory.mktemp("shortlines"), users={"alice": "alicepw"}, extra_config=SHORT_LINES)
    d.start()
    _filled(d, b"Big", lambda i: b"(\\Seen) " if i % 3 == 0 else b"").close()
    p = ProxyProcess(tmp_path_factory.mktemp("proxy"), d.port,
                     config_extra="[policy]\nsync = { imdn = false }\n").start()
    yield d, p
    p.stop()
    d.close()


def _filled(d, folder: bytes, flags=lambda i: b"") -> RawIMAP:
    """A direct connection, after storing COUNT messages in a new ``folder``: every other one an IMDN (the
    policy hides them), the others chats; ``flags(i)``: the i-th message's flag list (with its space)."""
    chat, imdn = make_object("chat", text="hello"), make_object("imdn")
    c = RawIMAP("127.0.0.1", d.port, timeout=60)
    c.login("alice", "alicepw")
    c.command(b"c", b'CREATE "%s"' % folder)
    c.send(b"".join(b'a%d APPEND "%s" %s{%d+}\r\n%s\r\n' % (i, folder, flags(i), len(m), m)
                    for i, m in enumerate(imdn if i % 2 else chat for i in range(COUNT))))
    assert c.until_tagged(b"a%d" % (COUNT - 1))[-1].startswith(b"a%d OK" % (COUNT - 1))
    return c


def _expected():
    """(messages, unseen, size) the device sees: the chats, those not flagged \\Seen."""
    chat = make_object("chat", text="hello")
    shown = [i for i in range(COUNT) if i % 2 == 0]
    return len(shown), sum(1 for i in shown if i % 3), sum(len(chat) for _ in shown)


def _items(line: bytes) -> dict[bytes, int]:
    m = re.search(rb"\(([^()]*)\)\r\n$", line)
    words = m.group(1).split()
    return {words[i].upper(): int(words[i + 1]) for i in range(0, len(words), 2)}


def _device(p, device: bytes = b"phone") -> RawIMAP:
    c = RawIMAP("127.0.0.1", p.port, timeout=60)
    c.command(b"i", b'ID ("x-cpm-device-id" "%s")' % device)
    assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
    return c


@pytest.mark.parametrize("selected", [False, True])
def test_status_of_a_folder_with_more_hidden_uids_than_a_command_line_holds(big, selected):
    _, p = big
    messages, unseen, size = _expected()
    c = _device(p)
    if selected:
        assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    r = c.command(b"t", b'STATUS "Big" (MESSAGES UNSEEN SIZE)')
    assert r[-1].startswith(b"t OK"), r
    assert _items(r[0]) == {b"MESSAGES": messages, b"UNSEEN": unseen, b"SIZE": size}
    r = c.command(b"l", b'LIST "" "Big" RETURN (STATUS (MESSAGES UNSEEN))')
    assert r[-1].startswith(b"l OK"), r
    status = next(line for line in r if line.startswith(b"* STATUS "))
    assert _items(status) == {b"MESSAGES": messages, b"UNSEEN": unseen}
    c.close()


def _model(d) -> list[tuple[int, bool]]:
    """(UID, seen) of the messages the device sees, in order, from direct access: the chats (odd UIDs:
    the fixture stored them at even positions of a fresh mailbox)."""
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    direct.command(b"s", b'EXAMINE "Big"')
    lines = direct.command(b"f", b"FETCH 1:* (UID FLAGS)")
    direct.close()
    got = [(int(m.group(1)), b"\\Seen" in m.group(2))
           for m in (re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", x) for x in lines) if m]
    return [(u, seen) for u, seen in got if u % 2]


@pytest.mark.parametrize("uid", [False, True], ids=["numbers", "uids"])
def test_esearch_in_a_view_with_more_hidden_uids_than_a_command_line_holds(big, uid):
    """``SEARCH RETURN (...)`` was sent on with ``NOT UID <every hidden UID>`` so that the backend counted
    the visible messages only: past the backend's line limit it was refused (the reference client's
    ``UID SEARCH RETURN (ALL) ALL``, which it reconciles UID sets with, too). The backend now returns
    every match and the proxy computes MIN, MAX, COUNT and ALL of the visible ones."""
    from cpmproxy.imap.seqset import SequenceSet

    d, p = big
    model = _model(d)
    hidden = SequenceSet.from_iterable(range(2, model[-1][0] + 2, 2)).format()
    assert len(hidden) > 4096  # (more than the line limit: before the burst test expunges some)
    c = _device(p)
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")

    def numbers(which):
        return [u if uid else i for i, (u, seen) in enumerate(model, 1) if which(seen)]

    def esearch(criteria: bytes, options: bytes) -> bytes:
        r = c.command(b"x", (b"UID " if uid else b"") + b"SEARCH RETURN (" + options + b") " + criteria)
        assert r[-1].startswith(b"x OK"), r
        found = [x for x in r if x.startswith(b"* ESEARCH")]
        assert len(found) == 1, r
        return found[0]

    prefix = b'* ESEARCH (TAG "x")' + (b" UID" if uid else b"")
    every = numbers(lambda seen: True)
    assert esearch(b"ALL", b"ALL") == prefix + b" ALL " + SequenceSet.from_iterable(every).format() + b"\r\n"
    unseen = numbers(lambda seen: not seen)
    assert esearch(b"UNSEEN", b"COUNT MAX MIN") == prefix + b" MIN %d MAX %d COUNT %d\r\n" % (
        unseen[0], unseen[-1], len(unseen))
    seen = numbers(lambda seen: seen)
    assert esearch(b"SEEN", b"") == prefix + b" ALL " + SequenceSet.from_iterable(seen).format() + b"\r\n"
    assert esearch(b"KEYWORD nothing-has-it", b"MIN COUNT") == prefix + b" COUNT 0\r\n"
    # Only hidden messages match: nothing, as for no match at all.
    hidden_uid = model[-1][0] + 1
    assert esearch(b"UID %d" % hidden_uid, b"MIN MAX ALL") == prefix + b"\r\n"
    # The criteria's numbers are the device's as before; the result counts visible matches only.
    r = esearch(b"UID 1:%d" % model[9][0] if uid else b"1:10", b"COUNT")
    assert r == prefix + b" COUNT 10\r\n"
    # With CHARSET after the options (the diff review: the charset was taken for the options' place).
    assert esearch(b"CHARSET UTF-8 ALL", b"COUNT") == prefix + b" COUNT %d\r\n" % len(every)
    # Two searches pipelined under one tag: each its own options (the review: the first one's, twice).
    cmd = b"UID SEARCH" if uid else b"SEARCH"
    c.send(b"x %s RETURN (COUNT) ALL\r\nx %s RETURN (MIN MAX) UNSEEN\r\n" % (cmd, cmd))
    got = []
    while sum(line.startswith(b"x ") for line in got) < 2:
        got.append(c.read_line())
    assert [x for x in got if x.startswith(b"* ESEARCH")] == [
        prefix + b" COUNT %d\r\n" % len(every), prefix + b" MIN %d MAX %d\r\n" % (unseen[0], unseen[-1])], got
    c.close()


@pytest.mark.parametrize("uid", [False, True], ids=["numbers", "uids"])
def test_modseq_searches_and_esort_in_a_view_with_more_hidden_uids_than_a_command_line_holds(big, uid):
    """A MODSEQ search (CONDSTORE's way to ask what changed) and an ESORT were sent on with ``NOT UID
    <every hidden UID>``: refused past the backend's line limit. A plain one is now filtered on its way
    back; an ESORT's options are computed from every match, in the sort order; MODSEQ stays the backend's
    (hidden matches included: no higher than the HIGHESTMODSEQ the device is told anyway)."""
    d, p = big
    model = _model(d)
    every = [u if uid else i for i, (u, _) in enumerate(model, 1)]
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    direct.command(b"s", b'EXAMINE "Big"')
    found = next(x for x in direct.command(b"m", b"SEARCH MODSEQ 1") if x.startswith(b"* SEARCH"))
    highest = int(re.search(rb"\(MODSEQ (\d+)\)", found).group(1))
    # The sort order as the backend has it (messages appended in the same second tie), of the visible ones.
    found = next(x for x in direct.command(b"o", b"UID SORT (REVERSE ARRIVAL) UTF-8 ALL") if x.startswith(b"* SORT"))
    position = {u: i for i, (u, _) in enumerate(model, 1)}
    order = [u if uid else position[u] for u in map(int, found.split()[2:]) if u in position]
    direct.close()
    c = _device(p)
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    cmd = b"UID " if uid else b""
    r = c.command(b"m", cmd + b"SEARCH MODSEQ 1")
    assert r[-1].startswith(b"m OK"), r
    m = re.fullmatch(rb"\* SEARCH ([\d ]+) \(MODSEQ (\d+)\)\r\n", next(x for x in r if x.startswith(b"* SEARCH")))
    assert m is not None and [int(x) for x in m.group(1).split()] == every and int(m.group(2)) == highest, r
    # Only hidden messages match: no match, and so no MODSEQ (RFC 7162's grammar has none without one).
    r = c.command(b"m", cmd + b"SEARCH MODSEQ 1 UID %d" % (model[-1][0] + 1))
    assert b"* SEARCH\r\n" in r and r[-1].startswith(b"m OK"), r
    prefix = b'* ESEARCH (TAG "e")' + (b" UID" if uid else b"")
    r = c.command(b"e", cmd + b"SEARCH RETURN (MIN MAX COUNT) MODSEQ 1")
    assert r[-1].startswith(b"e OK"), r
    assert [x for x in r if x.startswith(b"* ESEARCH")] == [
        prefix + b" MIN %d MAX %d COUNT %d MODSEQ %d\r\n" % (every[0], every[-1], len(every), highest)], r
    r = c.command(b"e", cmd + b"SORT RETURN (MIN MAX COUNT ALL) (REVERSE ARRIVAL) UTF-8 ALL")
    assert r[-1].startswith(b"e OK"), r
    line = next(x for x in r if x.startswith(b"* ESEARCH"))
    assert line.startswith(prefix + b" MIN %d MAX %d ALL " % (order[0], order[-1])), line
    assert line.endswith(b" COUNT %d\r\n" % len(order)), line
    listed = []
    for part in line.split(b" ALL ")[1].split(b" ")[0].split(b","):
        a, _, b = part.partition(b":")
        a, b = int(a), int(b or a)
        listed += list(range(a, b + 1) if a <= b else range(a, b - 1, -1))
    assert listed == order
    c.close()


def test_a_saved_search_in_a_view_with_more_hidden_uids_than_a_command_line_holds(big):
    """A search with SAVE named every hidden UID (the backend keeps $, which must hold visible messages
    only): refused past the backend's line limit. It now saves the matches and takes the hidden UIDs out
    of $ a few KB at a time, then runs the client's search over what is left."""
    d, p = big
    model = _model(d)
    c = _device(p)
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    r = c.command(b"v", b"UID SEARCH RETURN (SAVE) UNSEEN")
    assert r[-1].startswith(b"v OK") and len(r) == 1, r  # (SAVE alone: no ESEARCH, RFC 5182)
    r = c.command(b"w", b"UID SEARCH $")
    assert r[0] == b"* SEARCH " + b" ".join(b"%d" % u for u, seen in model if not seen) + b"\r\n", r
    seen = [i for i, (_, s) in enumerate(model, 1) if s]
    r = c.command(b"x", b"SEARCH RETURN (SAVE MIN COUNT) SEEN")  # (COUNT: of $ as the backend keeps it)
    assert r[0] == b'* ESEARCH (TAG "x") MIN %d COUNT %d\r\n' % (seen[0], len(seen)) and r[-1].startswith(b"x OK"), r
    r = c.command(b"y", b"FETCH $ (FLAGS)")
    assert [int(x.split()[1]) for x in r if b" FETCH " in x] == seen, r
    # With a charset (the first step's criteria carry it), and an ESORT that saves.
    assert c.command(b"z", b"SEARCH RETURN (SAVE) CHARSET UTF-8 SEEN")[-1].startswith(b"z OK")
    assert c.command(b"z", b"SEARCH RETURN (COUNT) $")[0] == b'* ESEARCH (TAG "z") COUNT %d\r\n' % len(seen)
    r = c.command(b"o", b"UID SORT RETURN (SAVE COUNT) (ARRIVAL) UTF-8 UNSEEN")
    assert r[0] == b'* ESEARCH (TAG "o") UID COUNT %d\r\n' % (len(model) - len(seen)) and r[-1].startswith(b"o OK"), r
    assert c.command(b"z", b"SEARCH RETURN (COUNT) $")[0] == b'* ESEARCH (TAG "z") COUNT %d\r\n' % (len(model) - len(seen))
    # The diff review: a saved result used by a STORE, COPY or FETCH of bodies named every visible UID
    # (refused), a SAVE search for the CPM flag found nothing (the first step passed no hook), and one
    # with a MODSEQ key lost its MODSEQ.
    assert c.command(b"a", b"STORE 1:10 +FLAGS.SILENT (\\read-report-sent)")[-1].startswith(b"a OK")
    r = c.command(b"b", b"SEARCH RETURN (SAVE COUNT) KEYWORD \\read-report-sent")
    assert r[0] == b'* ESEARCH (TAG "b") COUNT 10\r\n', r
    assert c.command(b"b", b"SEARCH RETURN (SAVE) ALL")[-1].startswith(b"b OK")
    assert c.command(b"k", b'CREATE "BigCopy"')[-1].startswith(b"k OK")
    for tag, command in ((b"c", b"STORE $ +FLAGS.SILENT (\\Flagged)"), (b"d", b'COPY $ "BigCopy"'),
                         (b"e", b"FETCH $ (BODY[HEADER.FIELDS (SUBJECT)])")):
        r = c.command(tag, command)
        assert r[-1].startswith(tag + b" OK"), (command, r[-1])
    assert sum(b" FETCH " in x for x in r) == len(model)
    r = c.command(b"f", b"SEARCH RETURN (SAVE COUNT) MODSEQ 1")
    found = next(x for x in r if x.startswith(b"* ESEARCH"))
    assert re.fullmatch(rb'\* ESEARCH \(TAG "f"\) COUNT %d MODSEQ \d+\r\n' % len(model), found), r
    assert c.command(b"g", b'DELETE "BigCopy"')[-1].startswith(b"g OK")
    c.close()
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    direct.command(b"s", b'EXAMINE "Big"')
    assert direct.command(b"x", b"UID SEARCH FLAGGED")[0] == b"* SEARCH " + b" ".join(b"%d" % u for u, _ in model) + b"\r\n"
    direct.command(b"s", b'SELECT "Big"')
    assert direct.command(b"y", b"STORE 1:* -FLAGS.SILENT (\\Flagged $ReadReportSent)")[-1].startswith(b"y OK")
    direct.close()


def test_a_saved_search_the_backend_refuses_gets_its_answer(big):
    """Bad input in a SAVE search taken in steps (past the line limit): the backend's refusal of the first
    step is the client's answer, with its response code; the session goes on."""
    _, p = big
    c = _device(p)
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    r = c.command(b"a", b"SEARCH RETURN (SAVE) CHARSET NO-SUCH-CHARSET SUBJECT x")
    assert r[-1].startswith(b"a NO [BADCHARSET"), r
    r = c.command(b"b", b"SEARCH RETURN (SAVE COUNT) NOSUCHKEY")
    assert re.match(rb"b BAD \[[A-Z]+\] ", r[-1]), r
    assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    c.close()


def test_read_and_delete_everything_over_more_scattered_messages_than_a_command_line_holds(big):
    """"Read all" and "delete all" in a folder whose every other message is hidden: a FETCH of bodies
    (which sets \\Seen, so it names exactly the visible messages), a UID EXPUNGE and an EXPUNGE (the UIDs
    of the visible \\Deleted ones) named one range per visible message in one command: refused past the
    backend's line limit. They now go in pieces; the hidden messages stay as they were."""
    d, p = big
    direct = _filled(d, b"Big2")
    c = _device(p)
    assert b"* %d EXISTS\r\n" % (COUNT // 2) in c.command(b"s", b'SELECT "Big2"')
    r = c.command(b"f", b"FETCH 1:* (BODY[TEXT])")
    assert r[-1].startswith(b"f OK"), r[-1]
    assert sum(1 for x in r if re.match(rb"\* \d+ FETCH ", x)) == COUNT // 2
    assert c.command(b"t", b"STORE 1:* +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"t OK")
    r = c.command(b"v", b"UID EXPUNGE 1:*")  # (every visible UID: ~5 KB, two pieces)
    assert r[-1].startswith(b"v OK") and sum(x.endswith(b" EXPUNGE\r\n") for x in r) == COUNT // 2, r[-1]
    c.close()
    direct.command(b"s", b'EXAMINE "Big2"')
    assert b"* %d EXISTS\r\n" % (COUNT // 2) in direct.command(b"s", b'EXAMINE "Big2"')
    found = direct.command(b"x", b"UID SEARCH SEEN")[0]
    assert found == b"* SEARCH\r\n", found[:200]  # (no IMDN read: they are what is left)
    assert direct.command(b"y", b"UID SEARCH DELETED")[0] == b"* SEARCH\r\n"
    direct.command(b"z", b'DELETE "Big2"')
    direct.close()


def test_an_expunge_of_more_scattered_messages_than_a_command_line_holds(big):
    """EXPUNGE (the visible messages marked \\Deleted, by UID) in the same folder."""
    d, p = big
    direct = _filled(d, b"Big3", lambda i: b"(\\Deleted) ")
    c = _device(p)
    assert b"* %d EXISTS\r\n" % (COUNT // 2) in c.command(b"s", b'SELECT "Big3"')
    r = c.command(b"e", b"EXPUNGE")
    assert r[-1].startswith(b"e OK") and sum(x.endswith(b" EXPUNGE\r\n") for x in r) == COUNT // 2, r[-1]
    c.close()
    assert b"* %d EXISTS\r\n" % (COUNT // 2) in direct.command(b"s", b'EXAMINE "Big3"')  # (the IMDNs)
    direct.command(b"z", b'DELETE "Big3"')
    direct.close()


def test_a_burst_of_expunges_in_a_big_view_is_announced_in_the_devices_numbers(big):
    """Another session expunges 200 messages at once (chats and IMDNs): the device hears of the chats
    only, each by its own number at the time, and its view is the model's afterwards."""
    d, p = big
    c = _device(p)
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    direct.command(b"s", b'SELECT "Big"')
    uids = [int(x) for x in re.search(rb"ALL (\S+)", b"".join(direct.command(
        b"u", b"UID SEARCH RETURN (ALL) ALL"))).group(1).replace(b":", b",").split(b",")]
    all_uids = list(range(uids[0], uids[-1] + 1)) if len(uids) == 2 else uids
    gone = set(all_uids[100:300])
    seqset = b"%d:%d" % (all_uids[100], all_uids[299])
    assert direct.command(b"x", b"UID STORE %s +FLAGS.SILENT (\\Deleted)" % seqset)[-1].startswith(b"x OK")
    assert direct.command(b"e", b"EXPUNGE")[-1].startswith(b"e OK")
    direct.close()
    r = c.command(b"n", b"NOOP")
    visible = [u for i, u in enumerate(all_uids) if i % 2 == 0]  # (UID order is store order)
    shown = list(visible)
    for line in r:  # (each number as the device knows them at that point)
        if line.endswith(b" EXPUNGE\r\n"):
            assert shown.pop(int(line.split()[1]) - 1) in gone, line
    assert shown == [u for u in visible if u not in gone]
    fetched = [line for line in c.command(b"f", b"FETCH 1:* (UID)") if line.startswith(b"* ")]
    assert fetched == [b"* %d FETCH (UID %d)\r\n" % (i, u) for i, u in enumerate(shown, 1)]
    c.close()


def test_uid_set_pieces_cover_the_set_in_short_lines():
    from cpmproxy.imap.seqset import SequenceSet
    from plugins.wire import uid_set_pieces

    for uids in (SequenceSet.from_iterable(range(1, 40000, 2)), SequenceSet.parse(b"1:5,9,4000000000"),
                 SequenceSet.from_iterable([7])):
        pieces = uid_set_pieces(uids, limit=100)
        assert all(len(p) <= 100 for p in pieces)
        assert SequenceSet.parse(b",".join(pieces)) == uids
    assert uid_set_pieces(SequenceSet.empty()) == []


def _exists(c: RawIMAP, mailbox: bytes) -> int:
    lines = c.command(b"s", b'SELECT "%s"' % mailbox)
    assert lines[-1].startswith(b"s OK"), lines
    return next(int(line.split()[1]) for line in lines if line.endswith(b" EXISTS\r\n"))


def test_local_deletes_of_more_scattered_uids_than_a_command_line_holds_are_kept(big):
    """A device deletes locally ~900 scattered messages (every other UID: ~4.4 KB of UIDs, past this
    Dovecot's 4 KB line limit) in nine goes. The records are written (as literals), and merged at the next
    SELECT (the UIDs still on the server asked for in pieces): the device's view keeps them deleted. (Before,
    the merge's one search naming every UID was refused, taken for "none left", and every record erased:
    the device saw all its deleted messages again.)"""
    d, p = big
    c = _device(p, b"tablet")
    before = _exists(c, b"Big")
    assert before >= 880  # (~4.4 KB of scattered UIDs or more)
    for i, seqs in enumerate([b"1:%d" % (before - 20 - 8 * 40)] + [b"1:40"] * 8):
        assert c.command(b"t%d" % i, b"STORE %s +FLAGS.SILENT (\\Deleted $LocalDelete)" % seqs)[-1] \
            .startswith(b"t%d OK" % i)
        assert c.command(b"e%d" % i, b"EXPUNGE")[-1].startswith(b"e%d OK" % i)
    c.close()
    left = 20
    c = _device(p, b"tablet")
    assert _exists(c, b"Big") == left  # (nine records: merged in the background now, while it stays)
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    deadline = time.monotonic() + 30
    while True:
        lines = direct.command(b"g", b'GETMETADATA (DEPTH infinity) "Big" (/private/vendor/vendor.cpmproxy/localdelete)')
        records = re.findall(rb"localdelete/tablet/[0-9a-f-]+", b"".join(lines))
        if len(records) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    direct.close()
    c.close()
    assert len(records) == 1, lines
    c = _device(p, b"tablet")
    assert _exists(c, b"Big") == left
    c.close()
    assert b"compacting local-delete records failed" not in p.log().encode()


def test_fetch_and_search_by_number_over_more_scattered_messages_than_a_command_line_holds(big):
    """The device's numbers became the backend's one by one: ``FETCH 1:* (FLAGS)`` or ``SEARCH 1:* SEEN``
    in a view with scattered hidden messages named every visible one, past the backend's line limit: BAD
    "Too long argument". The FETCH (it changes nothing) now asks for the ranges the device named, the
    hidden answers dropped; a search's numbers cover the hidden messages between them, which match
    nothing anyway."""
    from cpmproxy.imap.seqset import SequenceSet

    d, p = big
    model = _model(d)
    n = len(model)
    c = _device(p)
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    for command, first in ((b"FETCH 1:* (UID FLAGS)", 1), (b"FETCH 3:%d (UID FLAGS)" % n, 3)):
        r = c.command(b"f", command)
        assert r[-1].startswith(b"f OK"), r[-1]
        fetched = [(int(m.group(1)), int(m.group(2)), b"\\Seen" in m.group(3))
                   for m in (re.match(rb"\* (\d+) FETCH \(UID (\d+) FLAGS \(([^)]*)\)\)", x) for x in r) if m]
        assert fetched == [(i, u, seen) for i, (u, seen) in enumerate(model, 1) if i >= first], command

    def search(criteria: bytes, uid: bool = False) -> list[int]:
        r = c.command(b"x", (b"UID " if uid else b"") + b"SEARCH " + criteria)
        assert r[-1].startswith(b"x OK"), (criteria, r[-1])
        return [int(w) for x in r if x.startswith(b"* SEARCH") for w in x.split()[2:]]

    seen = [i for i, (u, s) in enumerate(model, 1) if s]
    assert search(b"1:* SEEN") == seen
    assert search(b"NOT 1:10 SEEN") == [i for i in seen if i > 10]
    assert search(b"OR 2:4 %d:*" % (n - 1)) == [2, 3, 4, n - 1, n]
    assert search(b"1:%d" % n, uid=True) == [u for u, _ in model]
    every = SequenceSet.from_iterable(range(1, n + 1, 2)).format()  # (the device's own scattered set)
    assert search(every.encode() if isinstance(every, str) else every) == list(range(1, n + 1, 2))
    c.close()


def test_store_over_more_scattered_messages_than_a_command_line_holds(big):
    """``STORE 1:* +FLAGS (\\Flagged)`` ("mark all") where every other message is hidden named each visible
    one in one command, past the backend's line limit: BAD "Too long argument". It goes as UID STOREs of
    a few KB each now: every visible message flagged, no hidden one touched, the answers in the device's
    numbers."""
    d, p = big
    model = _model(d)
    n = len(model)
    c = _device(p, b"marker")
    assert c.command(b"s", b'SELECT "Big"')[-1].startswith(b"s OK")
    r = c.command(b"a", b"STORE 1:* +FLAGS (\\Flagged)")
    assert r[-1] == b"a OK Store completed.\r\n", r[-1]
    told = sorted(int(x.split()[1]) for x in r if x.startswith(b"* ") and b" FETCH " in x)
    assert told == list(range(1, n + 1))
    r = c.command(b"b", b"UID STORE 1:* -FLAGS.SILENT (\\Flagged)")
    assert r == [b"b OK Store completed.\r\n"], r[-3:]
    r = c.command(b"c", b"UID STORE 1:%d +FLAGS.SILENT (\\Answered)" % model[-1][0])
    assert r == [b"c OK Store completed.\r\n"], r[-3:]
    # The CPM flag, which the readreport plugin maps (the pieces, which no command hook sees, went out
    # with it as it was: BAD "Invalid system flag"; the last commits' review).
    r = c.command(b"r", b"STORE 1:* +FLAGS (\\read-report-sent)")
    assert r[-1] == b"r OK Store completed.\r\n" and b"\\read-report-sent" in r[0], (r[0], r[-1])
    assert c.command(b"r2", b"STORE 1:* -FLAGS.SILENT (\\read-report-sent)") == [b"r2 OK Store completed.\r\n"]
    # Another session expunges a message the device sees: no EXPUNGE in the middle of its STORE by number
    # (the pieces were UID STOREs, during which Dovecot announces expunges: a command pipelined behind it
    # then used numbers that had moved; the review).
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    direct.command(b"s", b'SELECT "Big"')
    gone = model[-2][0]
    direct.command(b"e", b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % gone)
    direct.command(b"x", b"UID EXPUNGE %d" % gone)
    direct.close()
    c.send(b"e STORE 1:* +FLAGS.SILENT (\\Seen)\r\nf FETCH %d:%d (UID)\r\n" % (n - 1, n))
    r = c.until_tagged(b"e")
    assert r[-1] == b"e OK Store completed.\r\n" and not any(b"EXPUNGE" in x for x in r), r[-3:]
    r += c.until_tagged(b"f")  # (Dovecot may answer the FETCH before the STORE's last piece is done)
    assert r[-1].startswith(b"f OK") and [x for x in r if b"(UID " in x] == [
        b"* %d FETCH (UID %d)\r\n" % (n - 1, gone), b"* %d FETCH (UID %d)\r\n" % (n, model[-1][0])], r[-3:]
    assert b"* %d EXPUNGE\r\n" % (n - 1) in c.command(b"n", b"NOOP")
    c.close()
    direct = RawIMAP("127.0.0.1", d.port, timeout=60)
    direct.login("alice", "alicepw")
    direct.command(b"s", b'EXAMINE "Big"')
    lines = direct.command(b"f", b"FETCH 1:* (UID FLAGS)")
    direct.command(b"u", b'SELECT "Big"')
    direct.command(b"x", b"STORE 1:* -FLAGS.SILENT (\\Answered)")  # (as it was, for the other tests)
    direct.close()
    flags = {int(m.group(1)): m.group(2) for m in (re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", x) for x in lines) if m}
    assert all((b"\\Answered" in f) == (u % 2 == 1) and b"\\Flagged" not in f for u, f in flags.items()), \
        [(u, f) for u, f in flags.items() if (b"\\Answered" in f) != (u % 2 == 1) or b"\\Flagged" in f][:5]


@pytest.mark.parametrize("uid", [False, True], ids=["numbers", "uids"])
def test_min_max_with_a_modseq_key_past_the_line_limit_carry_the_returned_messages_modseq(big, uid):
    """Found by review: MIN/MAX computed by the proxy from every match carried the MODSEQ of every match,
    a hidden one's (RFC 4731 3.2: the returned message's; of MIN and MAX both, the higher of the two)."""
    d, p = big
    folder = b"Mods-uid" if uid else b"Mods"
    direct = _filled(d, folder)
    direct.command(b"e", b"ENABLE CONDSTORE")
    direct.command(b"s", b'SELECT "%s"' % folder)
    direct.command(b"f", b"STORE 3 +FLAGS (\\Flagged)")  # (the second chat)
    direct.command(b"g", b"STORE %d +FLAGS (\\Flagged)" % (COUNT - 1))  # (the last chat)
    direct.command(b"h", b"STORE %d +FLAGS (\\Flagged)" % COUNT)  # (the last IMDN: the highest MODSEQ)
    modseq = {}
    for x in direct.command(b"m", b"FETCH 1:* (UID MODSEQ)"):
        if m := re.match(rb"\* (\d+) FETCH \(UID (\d+) MODSEQ \((\d+)\)\)", x):
            modseq[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    direct.close()
    first, last = modseq[3], modseq[COUNT - 1]  # (UID, MODSEQ): the flagged chats
    assert modseq[COUNT][1] > last[1] > first[1]
    c = _device(p)
    c.command(b"e", b"ENABLE CONDSTORE")
    assert c.command(b"s", b'SELECT "%s"' % folder)[-1].startswith(b"s OK")
    cmd = b"UID " if uid else b""
    number = (lambda u: u[0]) if uid else (lambda u: (u[0] + 1) // 2)  # (the chats are the odd UIDs)
    prefix = b'* ESEARCH (TAG "%s")' + (b" UID" if uid else b"")
    for tag, options, want in ((b"a", b"MIN", b"MIN %d MODSEQ %d" % (number(first), first[1])),
                               (b"b", b"MAX", b"MAX %d MODSEQ %d" % (number(last), last[1])),
                               (b"c", b"MIN MAX", b"MIN %d MAX %d MODSEQ %d" % (number(first), number(last), last[1]))):
        r = c.command(tag, cmd + b"SEARCH RETURN (%s) MODSEQ %d" % (options, first[1]))
        assert r[-1].startswith(tag + b" OK"), r
        assert [x for x in r if x.startswith(b"* ")] == [prefix % tag + b" " + want + b"\r\n"], r
    # Only hidden messages match: nothing returned, no MODSEQ.
    r = c.command(b"d", cmd + b"SEARCH RETURN (MAX) MODSEQ %d" % (last[1] + 1))
    assert [x for x in r if x.startswith(b"* ")] == [prefix % b"d" + b"\r\n"] and r[-1].startswith(b"d OK"), r
    # An ESORT: the first and last in its order.
    r = c.command(b"o", cmd + b"SORT RETURN (MIN MAX) (REVERSE ARRIVAL) UTF-8 MODSEQ %d" % first[1])
    assert [x for x in r if x.startswith(b"* ")] == [prefix % b"o" + b" MIN %d MAX %d MODSEQ %d\r\n" % (
        number(last), number(first), last[1])], r
    c.close()


def test_a_store_in_pieces_is_told_to_the_users_other_devices_at_once(big, tmp_path):
    """Found by review: the pieces of a long STORE were answered by the proxy, so no tagged hook saw the
    client's STORE done and notify told the user's other devices nothing (with no backend watch, never).
    The last piece goes as the client's command now."""
    d, _ = big
    _filled(d, b"Told").close()
    p = ProxyProcess(tmp_path, d.port, config_extra="[policy]\nsync = { imdn = false }\n"
                                                     "[plugin.notify]\nwatch_backend = false\n").start()
    pref = b"/private/vendor/vendor.cpmproxy/notifications"
    b = _device(p, b"tablet")
    try:
        assert b.command(b"p", b'SETMETADATA "" (%s "on")' % pref)[-1].startswith(b"p OK")
        b.command(b"s", b"SELECT INBOX")
        b.send(b"t IDLE\r\n")
        assert b.read_line().startswith(b"+")
        a = _device(p)
        assert a.command(b"s", b'SELECT "Told"')[-1].startswith(b"s OK")
        r = a.command(b"a", b"STORE 1:* +FLAGS.SILENT (\\Answered)")
        assert r == [b"a OK Store completed.\r\n"], r[-3:]
        a.close()
        b.sock.settimeout(5)  # (the watch is off: a change not told at the OK is never told)
        line = b.read_line()
        assert line.startswith(b"* STATUS Told ") and b"MESSAGES 1000 " in line, line
        b.send(b"DONE\r\n")
        assert b.until_tagged(b"t")[-1].startswith(b"t OK")
        assert b.command(b"q", b'SETMETADATA "" (%s NIL)' % pref)[-1].startswith(b"q OK")
    finally:
        b.close()
        p.stop()


@pytest.mark.parametrize("command", [b"COPY", b"UID COPY", b"MOVE", b"UID MOVE"])
def test_copy_and_move_of_more_scattered_messages_than_a_command_line_holds(big, command):
    """``COPY 1:* Archive`` ("move the conversation") where every other message is a hidden IMDN named
    each visible one in one command, past the backend's line limit: BAD. In pieces it would not be one
    atomic command with one COPYUID; it goes by the saved search result now ($ := the visible messages
    named, a few KB at a time), and the client's own $ is as it was before its next command.

    Found by review of that: $ was built from the client's UID set as written (``UID 1:*`` took in an
    IMDN that had arrived unannounced, not yet classified), or from backend numbers taken before a UID
    command of the proxy's own during which the backend announced an expunge (every number after it one
    off: the IMDN again). Both happen here: a chat expunged and an IMDN stored by another session."""
    d, p = big
    source = b"Cm-" + command.replace(b" ", b"-")
    chat, imdn = make_object("chat", text="hello"), make_object("imdn")
    assert len(chat) != len(imdn)  # (told apart by size below)
    direct = _filled(d, source)
    target = source + b"-to"
    c = _device(p)
    assert c.command(b"k", b'CREATE "%s"' % target)[-1].startswith(b"k OK")
    assert c.command(b"s", b'SELECT "%s"' % source)[-1].startswith(b"s OK")
    assert c.command(b"v", b"SEARCH RETURN (SAVE) 2:4")[-1].startswith(b"v OK")  # (the client's $: 3 messages)
    direct.command(b"s", b'SELECT "%s"' % source)
    assert direct.command(b"x", b"UID STORE 1 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"x OK")
    assert direct.command(b"y", b"UID EXPUNGE 1")[-1].startswith(b"y OK")  # (the first chat)
    direct.send(b'a APPEND "%s" {%d+}\r\n%s\r\n' % (source, len(imdn), imdn))
    r = direct.until_tagged(b"a")
    assert r[-1].startswith(b"a OK") and b" %d]" % (COUNT + 1) in r[-1], r[-1]  # (APPENDUID)
    # By UID: every message, the unannounced IMDN among them. By number: all but the last two chats, in
    # the numbers the client knows (the expunge not yet announced to it: its message 1 is UID 1).
    # (Again, once the expunge is known: 998 messages by number.)
    named, shown, again = (b"1:*", list(range(3, COUNT, 2)), 999) if b"UID" in command \
        else (b"1:998", list(range(3, 1996, 2)), 998)
    r = c.command(b"c", command + b' %s "%s"' % (named, target))
    assert r[-1].startswith(b"c OK"), r[-3:]
    copyuid = re.search(rb"\[COPYUID \d+ (\S+) (\S+)\]", b"".join(r))  # (MOVE's comes untagged: RFC 6851)
    assert copyuid and sorted(SequenceSet.parse(copyuid.group(1))) == shown, r[-1]
    moved = b"MOVE" in command
    if moved:
        assert [x for x in r if x.endswith(b"EXPUNGE\r\n") or x.startswith(b"* VANISHED")], r[:3]
    # The client's $ is its own again (when it is next used: 3 messages, or none once moved away).
    r = c.command(b"f", b"UID SEARCH $")
    assert [x for x in r if x.startswith(b"* SEARCH")] == [b"* SEARCH\r\n" if moved else b"* SEARCH 3 5 7\r\n"], r
    if not moved:  # and so with the use of $ pipelined right behind
        c.send(b"c2 " + command + b' %s "%s"\r\nf2 UID SEARCH $\r\n' % (named, target))
        r = c.until_tagged(b"f2")
        assert b"* SEARCH 3 5 7\r\n" in r and r[-1].startswith(b"f2 OK"), r[-3:]
    c.close()
    chats, copied = COUNT // 2 - 1, len(shown)
    direct.command(b"t", b'EXAMINE "%s"' % target)
    sizes = [int(m.group(1)) for x in direct.command(b"f", b"FETCH 1:* (RFC822.SIZE)")
             if (m := re.search(rb"RFC822\.SIZE (\d+)", x))]
    assert len(sizes) == copied + (0 if moved else again) and set(sizes) == {len(chat)}, (len(sizes), set(sizes))
    direct.command(b"u", b'EXAMINE "%s"' % source)
    sizes = [int(m.group(1)) for x in direct.command(b"h", b"FETCH 1:* (RFC822.SIZE)")
             if (m := re.search(rb"RFC822\.SIZE (\d+)", x))]
    assert sizes.count(len(imdn)) == COUNT // 2 + 1 and sizes.count(len(chat)) == chats - (copied if moved else 0)
    direct.close()


def test_min_max_with_a_modseq_key_past_the_line_limit_announce_no_expunge_mid_search(big):
    """Found by review: the proxy found the visible extremes of a search by number with a UID search of its
    own, during which the backend announced an expunge, passed on in the middle of the client's SEARCH
    (RFC 9051 7.5.1: never while answering a SEARCH by number) and renumbering its answer under it. By
    number as the client's now: the client hears of the expunge after, and its answer is in its numbers."""
    d, p = big
    direct = _filled(d, b"Mods-x")
    direct.command(b"s", b'SELECT "Mods-x"')
    for tag, uid in ((b"f", 3), (b"g", COUNT - 1)):  # (the second and the last chat)
        direct.command(tag, b"UID STORE %d +FLAGS (\\Flagged)" % uid)
    modseq = {int(m.group(1)): int(m.group(2)) for x in direct.command(b"m", b"UID FETCH 3,%d (MODSEQ)" % (COUNT - 1))
              if (m := re.search(rb"UID (\d+) MODSEQ \((\d+)\)", x))}
    c = _device(p)
    c.command(b"e", b"ENABLE CONDSTORE")
    assert c.command(b"s", b'SELECT "Mods-x"')[-1].startswith(b"s OK")
    alike = RawIMAP("127.0.0.1", d.port, timeout=60)  # (a direct session in the same state, for the backend's answer)
    alike.login("alice", "alicepw")
    alike.command(b"e", b"ENABLE CONDSTORE")
    alike.command(b"s", b'SELECT "Mods-x"')
    direct.command(b"x", b'CREATE "Mods-x-away"')
    assert direct.command(b"y", b'UID MOVE 1 "Mods-x-away"')[-1].startswith(b"y OK")  # (the first chat, client's 1)
    direct.close()
    search = b"SEARCH RETURN (MIN MAX) MODSEQ %d" % modseq[3]
    r = c.command(b"a", search)
    assert r[-1].startswith(b"a OK"), r
    # (Dovecot matches the message moved away, as it answers a direct session that has not heard of it.
    # The chats are its odd numbers, the client's (n + 1) / 2.)
    m = re.fullmatch(rb'\* ESEARCH \(TAG "a"\) MIN (\d+) MAX (\d+) MODSEQ (\d+)\r\n',
                     [x for x in alike.command(b"a", search) if x.startswith(b"* ")][0])
    alike.close()
    want = b'* ESEARCH (TAG "a") MIN %d MAX %d MODSEQ %s\r\n' % ((int(m[1]) + 1) // 2, (int(m[2]) + 1) // 2, m[3])
    assert [x for x in r if x.startswith(b"* ")] == [want], r
    assert b"* 1 EXPUNGE\r\n" in c.command(b"n", b"NOOP")
    c.close()


@pytest.mark.parametrize("uid", [False, True], ids=["numbers", "uids"])
def test_a_conditional_store_over_more_scattered_messages_than_a_command_line_holds(big, uid):
    """``STORE 1:* (UNCHANGEDSINCE n) +FLAGS (\\Seen)`` (CONDSTORE's "mark all read, unless changed since")
    where every other message is hidden named each visible one in one command: refused past the backend's
    line limit. It goes in pieces as any STORE now, and the answer's [MODIFIED] names what every piece
    left alone (RFC 7162 3.1.3), in the device's numbers (or UIDs)."""
    d, p = big
    folder = b"Cond-uid" if uid else b"Cond"
    direct = _filled(d, folder)
    direct.command(b"e", b"ENABLE CONDSTORE")
    direct.command(b"s", b'SELECT "%s"' % folder)
    since = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(direct.command(b"t", b'STATUS "%s" (HIGHESTMODSEQ)'
                                                                                   % folder))).group(1))
    changed = [3, COUNT // 2 + 1, COUNT - 1]  # (UIDs of chats, in the first, a middle and the last piece)
    for u in changed + [COUNT]:  # (and the last IMDN, hidden)
        direct.command(b"f", b"UID STORE %d +FLAGS (\\Flagged)" % u)
    c = _device(p)
    c.command(b"e", b"ENABLE CONDSTORE")
    assert c.command(b"s", b'SELECT "%s"' % folder)[-1].startswith(b"s OK")
    r = c.command(b"a", b"%sSTORE 1:* (UNCHANGEDSINCE %d) +FLAGS.SILENT (\\Seen)" % (b"UID " if uid else b"", since))
    named = b",".join(b"%d" % (u if uid else (u + 1) // 2) for u in changed)  # (the chats: odd UIDs)
    assert r[-1].startswith(b"a OK [MODIFIED ") and SequenceSet.parse(r[-1].split()[3].rstrip(b"]")) \
        == SequenceSet.parse(named), r[-1]
    c.close()
    lines = direct.command(b"g", b"FETCH 1:* (UID FLAGS)")
    direct.close()
    flags = {int(m.group(1)): m.group(2) for m in (re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", x) for x in lines) if m}
    assert len(flags) == COUNT
    wrong = [(u, f) for u, f in flags.items() if (b"\\Seen" in f) != (u % 2 == 1 and u not in changed)]
    assert not wrong, wrong[:5]


def test_local_delete_stores_over_more_scattered_messages_than_a_command_line_holds(big):
    """A local delete of every message the device sees, where every other message is hidden (``STORE 1:*
    +FLAGS ($LocalDelete \\Deleted)``, its cancelling, with a server flag beside or alone): the local-delete
    plugin named each visible UID in one UID STORE or UID FETCH, refused past the backend's line limit. In
    pieces of a few KB now: every visible message answered, flagged on the server where asked, no hidden
    one touched."""
    d, p = big
    direct = _filled(d, b"Ld-scale")
    c = _device(p, b"ld-scale")
    assert c.command(b"s", b'SELECT "Ld-scale"')[-1].startswith(b"s OK")
    shown = COUNT // 2
    for tag, store in ((b"a", b"+FLAGS ($LocalDelete \\Deleted \\Flagged)"), (b"b", b"-FLAGS ($LocalDelete \\Deleted)"),
                       (b"c", b"+FLAGS ($LocalDelete)"), (b"d", b"-FLAGS ($LocalDelete \\Deleted \\Flagged)"),
                       (b"e", b"+FLAGS (\\Deleted $LocalDelete \\Seen)")):
        r = c.command(tag, b"STORE 1:* " + store)
        assert r[-1].startswith(tag + b" OK"), (store, r[-1])
        told = sorted(int(x.split()[1]) for x in r if b" FETCH " in x)
        assert told == list(range(1, shown + 1)), (store, len(told), r[-1])
    assert c.command(b"x", b"EXPUNGE")[-1].startswith(b"x OK")
    assert b"* 0 EXISTS\r\n" in c.command(b"n", b'SELECT "Ld-scale"')
    c.close()
    direct.command(b"s", b'EXAMINE "Ld-scale"')
    lines = direct.command(b"f", b"FETCH 1:* (UID FLAGS)")
    direct.close()
    flags = {int(m.group(1)): m.group(2) for m in (re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", x) for x in lines) if m}
    assert len(flags) == COUNT  # (nothing deleted on the server)
    wrong = [(u, f) for u, f in flags.items() if b"\\Flagged" in f or b"\\Deleted" in f or b"$LocalDelete" in f
             or (b"\\Seen" in f) != (u % 2 == 1)]
    assert not wrong, wrong[:5]
