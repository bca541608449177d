"""Messages arriving or expunged while the device's commands are in flight (found by a review hunting races,
2026-11-28): a command pipelined 0-3 ms behind a NOOP during which the backend took in a hidden IMDN (its
EXISTS held while the proxy classifies it), or announced another session's expunge. Each test tries a few
timings and fails if any attempt leaks, counts or touches what the device must not see."""
from __future__ import annotations

import imaplib
import re
import socket
import struct
import time
import uuid

import pytest

from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via
from tests.test_notify import lines_within

PREFIX = b"/private/vendor/vendor.cpmproxy"
DELAYS = [0, 0.0005, 0.001, 0.002, 0.003] * 2


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


def device(proxy):
    c = raw_via(proxy)
    c.command(b"i", b'ID ("x-cpm-device-id" "phone")')
    assert c.login("dave", "davepw")[-1].startswith(b"L OK")
    return c


def answers(c, tags):
    got, done = [], 0
    while done < len(tags):
        got.append(c.read_response())
        done += got[-1][:1] in tags and got[-1][1:2] == b" "
    return got


def behind(c, lead: bytes, delay: float, commands: bytes, tags: bytes) -> list[bytes]:
    """``commands`` (whole lines, tagged ``x``...) sent ``delay`` s behind ``n <lead>``: the responses up to
    the tagged answer of ``n`` and of each of ``tags``."""
    c.send(b"n " + lead + b"\r\n")
    time.sleep(delay)
    c.send(commands)
    return answers(c, b"n" + tags)


def folder(proxy, dovecot, kinds):
    name = b"Race" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(kinds):
        dovecot.deliver("dave", name.decode(), make_object(k, seed=i))
    c = device(proxy)
    assert c.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (name, PREFIX))[-1].startswith(b"m OK")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    return name, c


@pytest.mark.parametrize("hidden_before", [False, True], ids=["identity", "filtered"])
@pytest.mark.parametrize("command", [b"UID SEARCH RETURN (MAX ALL COUNT) ALL",
                                     b"UID SORT RETURN (MAX ALL COUNT) (ARRIVAL) UTF-8 ALL",
                                     b"SEARCH RETURN (COUNT) ALL",
                                     b"UID SEARCH RETURN (MAX ALL COUNT) OR ALL SUBJECT {1+}\r\nx",
                                     b"UID SORT RETURN (MAX ALL COUNT) (ARRIVAL) UTF-8 OR ALL SUBJECT {1+}\r\nx"])
def test_esearch_behind_a_hidden_arrival_neither_names_nor_counts_it(proxy, dovecot, command, hidden_before):
    """Found by review: RETURN (MIN/MAX/COUNT/ALL) computed by the backend over a message it took in during
    the NOOP in flight (a hidden IMDN): its UID and its count reach the device."""
    kinds = ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3
    leaks = []
    for delay in DELAYS:
        name, c = folder(proxy, dovecot, kinds)
        new = dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5))
        got = behind(c, b"NOOP", delay, b"x " + command + b"\r\n", b"x")
        c.close()
        esearch = b"".join(x for x in got if x.startswith(b"* ESEARCH"))
        if re.search(rb"COUNT 4|MAX %d|[:,]%d\b" % (new, new), esearch):
            leaks.append((delay, esearch))
    assert not leaks, leaks


@pytest.mark.parametrize("hidden_before", [False, True], ids=["identity", "filtered"])
def test_status_of_the_selected_mailbox_behind_a_hidden_arrival_does_not_count_it(proxy, dovecot, hidden_before):
    """Found by review: STATUS of the selected mailbox pipelined behind the NOOP: MESSAGES/UNSEEN count the IMDN."""
    kinds = ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3
    leaks = []
    for delay in DELAYS:
        name, c = folder(proxy, dovecot, kinds)
        dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5))
        got = behind(c, b"NOOP", delay, b'x STATUS "%s" (MESSAGES UNSEEN)\r\n' % name, b"x")
        c.close()
        status = b"".join(x for x in got if x.startswith(b"* STATUS"))
        if b"MESSAGES 3 " not in status:
            leaks.append((delay, status))
    assert not leaks, leaks


@pytest.mark.parametrize("hidden_before", [False, True], ids=["identity", "filtered"])
@pytest.mark.parametrize("literal", [b"+", b""], ids=["nonsync", "sync"])
@pytest.mark.parametrize("command", [b"STATUS {%d%s}\r\n%s (MESSAGES)", b"STATUS {5%s}\r\nINBOX (MESSAGES)",
                                     b"UID SEARCH SUBJECT {%d%s}\r\n%s"])
def test_a_gathered_command_behind_a_hidden_arrival_is_answered(proxy, dovecot, command, literal, hidden_before):
    """Found by review (2026-11-29): a command whose literal the proxy gathers, pipelined behind a NOOP whose
    EXISTS is held while a hidden arrival is classified, went to the backend in pieces awaiting its "+";
    the classification's own command went out in between, read by Dovecot as the literal: neither it nor
    anything after it was ever answered (not even the NOOP). Every attempt must answer both, and STATUS
    must count the device's messages (the hidden arrival not among them)."""
    kinds = ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3
    failed = []
    for delay in [0, 0.0005, 0.001, 0.002]:
        name, c = folder(proxy, dovecot, kinds)
        dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5))
        c.sock.settimeout(10)
        arg = name if command.startswith(b"STATUS {%d") else b"x"
        line = command % literal if b"INBOX" in command else command % (len(arg), literal, arg)
        try:
            got = behind(c, b"NOOP", delay, b"x " + line + b"\r\n", b"x")
        except TimeoutError:
            got = [b"(no answer within 10 s)"]
        c.close()
        tagged = [x for x in got if x[:2] in (b"n ", b"x ")]
        status = b"".join(x for x in got if x.startswith(b"* STATUS"))
        # (In either order: Dovecot may finish the STATUS before the NOOP, which waits for its mailbox sync.)
        if sorted(x[:4] for x in tagged) != [b"n OK", b"x OK"] or (name in status and b"MESSAGES 3)" not in status):
            failed.append((delay, got))
    assert not failed, failed


@pytest.mark.parametrize("hidden_before", [False, True], ids=["identity", "filtered"])
@pytest.mark.parametrize("command", [b"UID SEARCH SUBJECT ~{1+}\r\nx", b"STATUS ~{5+}\r\nINBOX (MESSAGES)",
                                     b"XFOO {1}", b"XFOO {1+}\r\nx", b'ID ("a" ~{1+}\r\nb)'])
def test_a_command_refused_before_its_literal_behind_a_hidden_arrival_is_answered(proxy, dovecot, command,
                                                                                   hidden_before):
    """Found by review (helper-72): the backend refused a command before its literal (Dovecot takes a
    literal8 only in APPEND; an unknown command) while the NOOP's EXISTS was held for a hidden arrival's
    classification. The refusal was held too, and only on its way out would it have ended the wait for
    the literal's "+", which kept the classification's command from going out: nothing was ever answered."""
    failed = []
    for delay in [0, 0.0005, 0.001, 0.002]:
        name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3)
        dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5))
        c.sock.settimeout(10)
        try:
            got = behind(c, b"NOOP", delay, b"x " + command + b"\r\n", b"x") + c.command(b"z", b"NOOP")
        except (TimeoutError, ConnectionError) as e:
            got = [b"(%r)" % e]
        c.close()
        tagged = [x[:4] for x in got if x[:2] in (b"n ", b"x ", b"z ")]
        if len(tagged) != 3 or b"n OK" not in tagged or tagged[-1] != b"z OK":
            failed.append((delay, got))
    assert not failed, failed


@pytest.mark.parametrize("command", [b"XFOO {1+}\r\nx", b"UID SEARCH SUBJECT ~{1+}\r\nx"])
def test_a_refusal_whose_tag_a_held_answer_shares_is_acted_on(proxy, dovecot, command):
    """Found by review (helper-78): the client reuses the tag of the NOOP whose answer is held; the refusal
    of its command before the literal was taken for the NOOP's (the oldest of that tag in flight), not
    acted on, and the session hung."""
    failed = []
    for delay in [0, 0.0005, 0.001, 0.002, 0.003]:
        name, c = folder(proxy, dovecot, ["chat"] * 3)
        dovecot.deliver("dave", name.decode(), make_object("imdn", seed=5))
        c.sock.settimeout(10)
        c.send(b"n NOOP\r\n")
        time.sleep(delay)
        c.send(b"n " + command + b"\r\nz NOOP\r\n")
        try:
            got = c.until_tagged(b"z")
        except (TimeoutError, ConnectionError) as e:
            got = [b"(%r)" % e]
        c.close()
        if not got[-1].startswith(b"z OK"):
            failed.append((delay, got))
    assert not failed, failed


@pytest.mark.parametrize("command", [b"UID SEARCH SUBJECT ~{%d+}\r\n%s", b"XFOO {%d+}\r\n%s"])
def test_a_literal_right_after_a_resumed_idle_never_runs_as_commands(proxy, dovecot, command):
    """Found by review (helper-72): the proxy suspends the client's IDLE for a classification and resumes it
    with an IDLE of its own, whose "+ idling" it swallows. A DONE and then a command whose literal waits
    for the backend's "+", ahead of that "+ idling": taken for the literal's, it let the literal out before
    the backend had accepted the command, which refused it and ran the literal's bytes as a command (here
    a CREATE the client never sent)."""
    ran = []
    for attempt, delay in enumerate([0, 0.0002, 0.0005, 0.001, 0.002] * 3):
        name, c = folder(proxy, dovecot, ["chat"] * 3)
        evil = b"Evil" + uuid.uuid4().hex[:8].encode()
        inner = b"y CREATE " + evil
        c.send(b"i IDLE\r\n")
        assert c.read_line().startswith(b"+")
        dovecot.deliver("dave", name.decode(), make_object("chat", seed=7))
        c.sock.settimeout(10)
        while not c.read_line().endswith(b" EXISTS\r\n"):
            pass
        time.sleep(delay)
        c.send(b"DONE\r\nx " + command % (len(inner), inner) + b"\r\nz NOOP\r\n")
        try:
            got = c.until_tagged(b"z")
        except (TimeoutError, ConnectionError) as e:
            got = [b"(%r)" % e]
        made = c.command(b"l", b'LIST "" "%s"' % evil)
        c.close()
        if len(made) > 1 or not got[-1].startswith(b"z OK") or any(x.startswith(b"y ") for x in got):
            ran.append((attempt, delay, got))
    assert not ran, ran


@pytest.mark.parametrize("lead", [b"NOOP", b"CHECK"])
@pytest.mark.parametrize("command", [b"STORE 1 +FLAGS (\\Flagged)", b'COPY 1 "%s-copy"', b"FETCH 1 (BODY[])"])
def test_by_number_behind_an_expunge_of_another_session_never_reaches_a_hidden_message(proxy, dovecot, command, lead):
    """Found by review: filtered view (UID 2 a hidden IMDN); another session expunges UID 1; the device pipelines
    a command by number behind NOOP/CHECK. The proxy maps the client's 1 to backend 1 with the view as it
    was; the backend, which sent the EXPUNGE first, reads 1 as UID 2: the hidden IMDN is flagged, copied,
    marked \\Seen."""
    touched = []
    for delay in DELAYS:
        name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
        dovecot.deliver("dave", name.decode() + "-copy", make_object("chat", seed=9))
        imap = dovecot.imap_direct("dave", tls="none")
        imap.select_folder(name.decode())
        imap.add_flags([1], [b"\\Deleted"])
        imap.expunge()
        got = behind(c, lead, delay, b"x " + (command % name if b"%s" in command else command) + b"\r\n", b"x")
        c.close()
        imap.select_folder(name.decode(), readonly=True)
        flags = imap.fetch([2], ["FLAGS"])[2][b"FLAGS"]
        imap.logout()
        # (The client's 1, read after the expunge it had not heard of when it sent it: a visible message,
        # as a server without a view would read it; never the hidden UID 2.)
        copied = re.search(rb"\[COPYUID \d+ (\S+) ", b"".join(got))
        if set(flags) & {b"\\Flagged", b"\\Seen"} or (copied and copied.group(1) == b"2"):
            touched.append((delay, flags, [x for x in got if x.startswith(b"x ")]))
    assert not touched, touched


@pytest.mark.parametrize("command,hidden_before", [(b"EXPUNGE", False), (b"EXPUNGE", True),
                                                   (b"UID EXPUNGE 1:99", False)])
def test_expunge_behind_an_arrival_of_a_deleted_hidden_message_leaves_it(proxy, dovecot, command, hidden_before):
    """Found by review: an IMDN arrives already \\Deleted (another device set it) during the NOOP in flight; the
    device's EXPUNGE / UID EXPUNGE pipelined behind it expunges the IMDN it never saw (identity: passed as
    written; filtered: _expunge_visible's UID SEARCH DELETED minus view.hidden, before classification)."""
    kinds = ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3
    removed = []
    for delay in DELAYS:
        name, c = folder(proxy, dovecot, kinds)
        imap = dovecot.imap_direct("dave", tls="none")
        imap.append(name.decode(), make_object("imdn", seed=5), flags=[b"\\Deleted"])
        new = len(kinds) + 1
        got = behind(c, b"NOOP", delay, b"x " + command + b"\r\n", b"x")
        c.close()
        imap.select_folder(name.decode(), readonly=True)
        if new not in imap.search("ALL"):
            removed.append((delay, got))
        imap.logout()
    assert not removed, removed


@pytest.mark.parametrize("command,hidden_before", [(b"UNSELECT", False), (b"UNSELECT", True), (b"CLOSE", False)])
def test_leaving_the_mailbox_behind_any_arrival_keeps_the_session(proxy, dovecot, command, hidden_before):
    """Found by review: NOOP + UNSELECT/CLOSE pipelined while a new (even visible) message arrives: the proxy
    classifies it on the session's connection after the mailbox was left ("BAD No mailbox selected"),
    logs a critical traceback and drops the client (no answer to CLOSE/UNSELECT)."""
    kinds = ["chat", "imdn", "chat", "chat"] if hidden_before else ["chat"] * 3
    failures = []
    for delay in DELAYS:
        name, c = folder(proxy, dovecot, kinds)
        dovecot.deliver("dave", name.decode(), make_object("chat", seed=5))
        try:
            behind(c, b"NOOP", delay, b"x " + command + b"\r\ny NOOP\r\n", b"xy")
        except (ConnectionError, TimeoutError) as e:
            failures.append((delay, repr(e)))
        c.close()
    assert not failures and "classification of new messages failed" not in proxy.log(), failures


@pytest.mark.parametrize("command", [b"STORE 1 +FLAGS.SILENT (\\Flagged)", b"FETCH 1 (BODY[])"])
def test_by_number_with_notify_of_the_selected_mailbox_never_reaches_a_hidden_message(proxy, dovecot, command):
    """With a NOTIFY of the selected mailbox's events the backend tells another session's expunge while no
    command is in progress: between the proxy's mapping of the client's 1 to the backend's 1 and the
    backend's reading of it. The device sends the command again and again while UID 1 is expunged; the
    hidden IMDN (UID 2, the backend's 1 after the expunge) is never flagged or marked \\Seen. (COPY and MOVE
    go the same way; pipelined, each waits for the one before it, and the window was never hit.)"""
    name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
    assert c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange))")[-1].startswith(b"n OK")
    other = dovecot.imap_direct("dave", tls="none")
    other.select_folder(name.decode())
    got = []
    c.send(b"".join(b"a%d %s\r\n" % (i, command) for i in range(100)))
    other.add_flags([1], [b"\\Deleted"])
    other.expunge()
    for i in range(30):  # (the expunge comes to the device within ~0.5 s: Dovecot's NOTIFY delay)
        c.send(b"".join(b"b%d.%d %s\r\n" % (i, j, command) for j in range(10)))
        got += c.until_tagged(b"b%d.9" % i)
        time.sleep(0.03)
    c.close()
    other.select_folder(name.decode(), readonly=True)
    flags = other.fetch([2], ["FLAGS"])[2][b"FLAGS"]
    other.logout()
    assert any(x.endswith(b" EXPUNGE\r\n") for x in got), "the device was never told of the expunge"
    assert not set(flags) & {b"\\Flagged", b"\\Seen"}, flags


def test_conditional_store_by_number_with_notify_reports_modified_in_client_numbers(proxy, dovecot):
    """A STORE by number under a NOTIFY of the selected mailbox goes to the backend by UID (above): the
    [MODIFIED] of its answer, UIDs from the backend, is in the client's numbers, as for any STORE by number
    (RFC 7162 3.1.3). UID 1 expunged, UID 3 a hidden IMDN: the client's 1 is UID 2, its 2 UID 4."""
    name, c = folder(proxy, dovecot, ["chat", "chat", "imdn", "chat"])
    other = dovecot.imap_direct("dave", tls="none")
    other.select_folder(name.decode())
    other.delete_messages([1])
    other.expunge()
    other.logout()
    got = c.command(b"e", b"ENABLE CONDSTORE")
    got += c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange))")
    assert b"* 1 EXPUNGE\r\n" in got + c.command(b"x", b"NOOP")
    since = max(int(m) for m in re.findall(rb"MODSEQ \((\d+)\)", b"".join(c.command(b"m", b"FETCH 1:* (MODSEQ)"))))
    assert c.command(b"a", b"STORE 1 +FLAGS.SILENT (\\Answered)")[-1].startswith(b"a OK")
    r = c.command(b"b", b"STORE 1:2 (UNCHANGEDSINCE %d) +FLAGS (\\Flagged)" % since)
    assert re.match(rb"b OK \[MODIFIED 1\] ", r[-1]), r
    # (Dovecot sends a STORE's FETCH only where the NOTIFY asks for FlagChange events.)
    assert re.fullmatch(rb"\* 2 FETCH \((UID 4 )?MODSEQ \(\d+\) FLAGS \(\\Flagged[^)]*\)\)\r\n", r[0]) and len(r) == 2, r


@pytest.mark.parametrize("att", [b"BODY[HEADER.FIELDS (From)]", b"BODY[]", b"BINARY[1]"])
def test_notify_fetch_attributes_never_mark_a_hidden_arrival_seen(proxy, dovecot, att):
    """Found by review: NOTIFY SET's MessageNew may carry fetch attributes, which the backend runs on every
    new message, hidden ones too; without .PEEK it sets \\Seen (RFC 9051 6.4.5) on a hidden IMDN the device
    is never shown. They go to the backend as .PEEK; RFC822 and RFC822.TEXT are refused."""
    name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
    r = c.command(b"n", b"NOTIFY SET (selected (MessageNew (UID " + att + b") MessageExpunge FlagChange))")
    assert r[-1].startswith(b"n OK"), r
    imdn = dovecot.deliver("dave", name.decode(), make_object("imdn", seed=7))
    chat = dovecot.deliver("dave", name.decode(), make_object("chat", seed=8))
    got, deadline = [], time.monotonic() + 15  # (the loop ends at the event: the deadline only bounds a loaded machine)
    while time.monotonic() < deadline and not any(b"UID %d " % chat in x for x in got):
        got += lines_within(c, 0.2)
    assert c.command(b"r", b"NOTIFY SET (selected (MessageNew (RFC822.TEXT)))")[-1].startswith(b"r NO [CANNOT]")
    c.close()
    assert any(b"UID %d " % chat in x for x in got) and not any(b"UID %d " % imdn in x for x in got), got
    other = dovecot.imap_direct("dave", tls="none")
    other.select_folder(name.decode(), readonly=True)
    flags = other.fetch([imdn], ["FLAGS"])[imdn][b"FLAGS"]
    other.logout()
    assert b"\\Seen" not in flags, flags


def test_notify_names_a_mailbox_as_written_whatever_its_name_holds(proxy, dovecot):
    """The rewrite to .PEEK and the refusal of RFC822 look at the fetch attributes only: a mailbox named
    in a quoted string with ``BODY[`` or ``RFC822`` in it was renamed (events of another mailbox asked for)
    or the command refused."""
    name = "Odd BODY[x] RFC822 " + uuid.uuid4().hex[:6]
    dovecot.deliver("dave", name, make_object("chat", seed=1))
    c = device(proxy)
    r = c.command(b"n", b'NOTIFY SET STATUS (selected (MessageNew (UID BODY[HEADER]) MessageExpunge)) '
                        b'(mailboxes "%s" (MessageNew MessageExpunge))' % name.encode())
    assert r[-1].startswith(b"n OK") and any(name.encode() in x for x in r), r
    dovecot.deliver("dave", name, make_object("chat", seed=2))
    got, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline and not got:
        got = [x for x in lines_within(c, 0.2) if x.startswith(b"* STATUS ") and name.encode() in x]
    c.close()
    assert got and b"MESSAGES 2 " in got[0], got


@pytest.mark.parametrize("command", [b'STATUS "%s" (MESSAGES UNSEEN)',
                                     b'LIST "" "%s" RETURN (STATUS (MESSAGES UNSEEN))'])
def test_status_of_another_mailbox_during_a_hidden_arrival_does_not_count_it(proxy, dovecot, command):
    """Found by review: a STATUS (or LIST-STATUS) of a mailbox not selected had its hidden messages counted
    before it went to the backend; an IMDN arriving in between was counted as visible. Counted now as the
    answer comes, anchored to its UIDNEXT (asked for by the proxy, not shown to the device)."""
    leaks = []
    for delay in [0.0005 * i for i in range(16)]:
        name = b"Race" + uuid.uuid4().hex[:8].encode()
        for i, k in enumerate(["chat", "imdn", "chat"]):
            dovecot.deliver("dave", name.decode(), make_object(k, seed=i))
        c = device(proxy)
        assert c.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (name, PREFIX))[-1].startswith(b"m OK")
        d = dovecot.imap_direct("dave", tls="none")
        c.send(b"x " + command % name + b"\r\n")
        time.sleep(delay)
        d.append(name.decode(), make_object("imdn", seed=7))
        got = answers(c, b"x")
        d.logout()
        c.close()
        assert got[-1].startswith(b"x OK"), got
        status = b"".join(x for x in got if x.startswith(b"* STATUS"))
        if not re.search(rb"\(MESSAGES 2 UNSEEN 2\)", status):
            leaks.append((delay, status))
    assert not leaks, leaks


def test_a_hidden_arrival_expunged_before_it_is_classified_is_never_shown(proxy, dovecot):
    """Found by review: Dovecot's searches skip a message expunged since the session learnt of it (a
    positive criterion and its NOT alike, answered OK [EXPUNGEISSUED]); a hidden IMDN expunged by another
    session between the backend's EXISTS and the proxy's classification matched no kind and was shown
    (EXISTS, then EXPUNGE)."""
    shown = []
    for delay in [0.002 * i for i in range(10)]:
        name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
        d = dovecot.imap_direct("dave", tls="none")
        d.select_folder(name.decode())
        # (Many new messages before it: the classification's header searches take a while to reach it.)
        d.multiappend(name.decode(), [make_object("chat", seed=10 + i) for i in range(300)] + [make_object("imdn", seed=5)])
        new = max(d.search("ALL"))
        c.send(b"n NOOP\r\n")
        time.sleep(delay)
        d.delete_messages([new])
        d.uid_expunge([new])
        got = answers(c, b"n")
        got += c.command(b"m", b"NOOP")
        d.logout()
        c.close()
        if any(re.match(rb"\* (\d+ EXPUNGE|\d+ FETCH|304 EXISTS)", x) for x in got):
            shown.append((delay, got))
    assert not shown, shown


def _hidden_imdn_folder(proxy, dovecot, name: bytes | None = None):
    """A folder of dave's with chat, IMDN, chat (the IMDN hidden by its preference), not selected."""
    name = name or b"Race" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", name.decode(), make_object(k, seed=i))
    c = device(proxy)
    assert c.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (name, PREFIX))[-1].startswith(b"m OK")
    return name, c


def test_a_status_command_reaches_the_backend_as_written_but_for_its_items(proxy, dovecot):
    """Found by review: the proxy's MESSAGES/UIDNEXT were added by writing the whole command out again from
    its tokens: a tag or mailbox ``nil`` became ``NIL`` (the command never completed for the client; the
    counts of another folder came back), and a tag the tokenizer refused (``a[1``, legal IMAP) left the
    hidden messages counted."""
    name, c = _hidden_imdn_folder(proxy, dovecot)
    got = c.command(b"nil", b'STATUS "%s" (UNSEEN)' % name)
    assert got == [b'* STATUS %s (UNSEEN 2)\r\n' % name, got[-1]] and got[-1].startswith(b"nil OK"), got
    for command in (b'STATUS "%s" (MESSAGES UNSEEN)', b'LIST "" "%s" RETURN (STATUS (MESSAGES UNSEEN))'):
        got = c.command(b"a[1", command % name)
        assert got[-1].startswith(b"a[1 OK") and b"* STATUS %s (MESSAGES 2 UNSEEN 2)\r\n" % name in got, got
    c.close()
    _, c = _hidden_imdn_folder(proxy, dovecot, b"nil")
    for i in range(5):
        dovecot.deliver("dave", "NIL", make_object("chat", seed=10 + i))
    got = c.command(b"l", b'LIST "" nil RETURN (STATUS (UNSEEN))')
    c.close()
    assert any(x.startswith(b'* STATUS "nil" (UNSEEN ') or x.startswith(b"* STATUS nil (UNSEEN ") for x in got), got
    assert not any(b"NIL" in x for x in got if x.startswith(b"* STATUS")), got


def test_a_notify_event_during_a_status_of_its_folder_keeps_its_items(proxy, dovecot):
    """Found by review: a NOTIFY STATUS event of the folder a STATUS command was asking about was taken for
    the command's answer and lost its MESSAGES and UIDNEXT (the items the proxy had added to the command)."""
    name, c = _hidden_imdn_folder(proxy, dovecot)
    r = c.command(b"n", b'NOTIFY SET STATUS (mailboxes "%s" (MessageNew MessageExpunge))' % name)
    assert r[-1].startswith(b"n OK"), r
    d = dovecot.imap_direct("dave", tls="none")
    stripped, events, deadline = [], 0, time.monotonic() + 3
    while time.monotonic() < deadline:
        d.append(name.decode(), make_object("chat", text="x"))
        for _ in range(5):
            lines = [x for x in c.command(b"s", b'STATUS "%s" (UNSEEN)' % name) if x.startswith(b"* STATUS")]
            events += len(lines) - 1
            stripped += [x for x in lines if b"MESSAGES" not in x][1:]  # (one is the answer)
    d.logout()
    c.close()
    assert events and not stripped, (events, stripped[:3])


def test_list_status_of_a_folder_made_while_it_runs_shows_only_the_items_asked(proxy, dovecot):
    """Found by review: a folder made after a LIST-STATUS had read the folder list was not taken for one of
    its answers: its line kept the MESSAGES and UIDNEXT the proxy had asked for besides."""
    import threading

    c = device(proxy)
    pref = b'SETMETADATA "" (%s/sync/imdn %s)'
    assert c.command(b"m", pref % (PREFIX, b'"off"'))[-1].startswith(b"m OK")
    d = dovecot.imap_direct("dave", tls="none")
    prefix = "Cr" + uuid.uuid4().hex[:6]
    stop = threading.Event()

    def creator():
        while not stop.is_set():
            d.create_folder(prefix + uuid.uuid4().hex[:8])

    t = threading.Thread(target=creator)
    t.start()
    bad, deadline = [], time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            got = c.command(b"l", b'LIST "" "%s*" RETURN (STATUS (UNSEEN))' % prefix.encode())
            assert got[-1].startswith(b"l OK"), got
            bad += [x for x in got if x.startswith(b"* STATUS") and (b"MESSAGES" in x or b"UIDNEXT" in x)]
    finally:
        stop.set()
        t.join()
        d.logout()
        assert c.command(b"m", pref % (PREFIX, b"NIL"))[-1].startswith(b"m OK")
        c.close()
    assert not bad, bad[:5]


def test_a_notify_event_of_a_hidden_arrival_during_a_list_status_is_not_told(proxy, dovecot):
    """Found by review: with a LIST-STATUS in flight asking for the very items of Dovecot's NOTIFY events
    (MESSAGES UIDNEXT UNSEEN), an event of another folder was taken for one of its answers and went out
    though only hidden IMDNs had arrived there."""
    import threading

    name, c = _hidden_imdn_folder(proxy, dovecot)
    other = b"Ot" + uuid.uuid4().hex[:8].encode()
    dovecot.deliver("dave", other.decode(), make_object("chat"))
    r = c.command(b"n", b'NOTIFY SET STATUS (mailboxes "%s" (MessageNew MessageExpunge))' % name)
    assert r[-1].startswith(b"n OK"), r
    stop = threading.Event()
    d = dovecot.imap_direct("dave", tls="none")

    def deliver():
        i = 0
        while not stop.is_set():
            d.append(name.decode(), make_object("imdn", seed=100 + i))
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=deliver)
    t.start()
    told, deadline = [], time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            got = c.command(b"l", b'LIST "" "%s" RETURN (STATUS (MESSAGES UIDNEXT UNSEEN))' % other)
            told += [x for x in got if x.startswith(b"* STATUS %s " % name)]
    finally:
        stop.set()
        t.join()
        d.logout()
        c.close()
    assert not told, told[:5]


def test_xcpm_view_never_reaches_the_backend(proxy, dovecot, make_proxy):
    """Found by review: XCPM-VIEW in a LIST-STATUS whose pattern is a literal went to the backend (BAD), and
    so did it in a STATUS of a folder hidden from the device, answered BAD where a missing one is answered
    NO [NONEXISTENT] (telling the device that the folder exists)."""
    name, c = _hidden_imdn_folder(proxy, dovecot)
    quoted = c.command(b"q", b'LIST "" "%s" RETURN (STATUS (MESSAGES XCPM-VIEW))' % name)
    literal = c.command(b"l", b'LIST "" {%d+}\r\n%s RETURN (STATUS (MESSAGES XCPM-VIEW))' % (len(name), name))
    c.close()
    assert quoted[-1].startswith(b"q OK") and literal[-1].startswith(b"l OK"), (quoted, literal)
    assert literal[:-1] == quoted[:-1] and any(b"XCPM-VIEW" in x for x in quoted), (quoted, literal)
    hidden = "Hid" + uuid.uuid4().hex[:6]
    dovecot.deliver("dave", hidden, make_object("chat"))
    c = device(make_proxy(config_extra=f'[policy]\nexclude_folders = ["{hidden}"]\n'))
    for items in (b"(MESSAGES XCPM-VIEW)", b"(XCPM-VIEW)"):
        for folder in (hidden, "Mis" + hidden[3:]):
            got = c.command(b"nil", b'STATUS "%s" %s' % (folder.encode(), items))
            assert got[-1].startswith(b"nil NO [NONEXISTENT]"), (folder, got)
    c.close()


def test_a_device_gone_while_its_select_is_classified_leaves_no_traceback(proxy, dovecot):
    """Found by the adversarial-input review: a device that drops its connection right after SELECT of a
    folder with hidden messages (a phone losing its network). The classification went on for the closed
    session; its searches failed at once ("backend_command is for a logged-in session"), logged as a
    CRITICAL "classification failed" with a traceback (and counted as an internal error), and each search
    not awaited after the first failure as a CRITICAL "Unhandled error in Deferred"."""
    name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
    c.close()
    for _ in range(40):
        c = device(proxy)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # (RST, at once)
        c.send(b's SELECT "%s"\r\n' % name)
        c.sock.close()
    c = device(proxy)  # (the proxy is still there, and has logged all of it)
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    c.close()
    log = proxy.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[log.find("Traceback") - 300:][:3000]


@pytest.mark.parametrize("second", [b"SELECT", b"STATUS"])
def test_a_device_gone_with_a_command_waiting_behind_its_select_leaves_no_traceback(proxy, dovecot, second):
    """Found by the adversarial-input review: a command pipelined behind a SELECT waits for it; the device
    went, the SELECT's answer came, and the waiting command was decided for the closed session: its side
    connection commands, issued together, all failed at once ("session closed"), and each one never
    awaited after the first failure was logged as a CRITICAL "Unhandled error in Deferred"."""
    name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
    c.close()
    for _ in range(40):
        c = device(proxy)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # (RST, at once)
        c.send(b's SELECT "%s"\r\nt %s "%s"%s\r\n' % (name, second, name, b" (MESSAGES)" if second == b"STATUS" else b""))
        c.sock.close()
    time.sleep(0.5)
    c = device(proxy)  # (the proxy is still there, and has logged all of it)
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    c.close()
    log = proxy.log()
    assert "Traceback" not in log and "Unhandled" not in log, log[log.find("Traceback") - 300:][:3000]


@pytest.mark.parametrize("lead", [b"STATUS INBOX (MESSAGES)", b'LIST "" INBOX', b"ENABLE CONDSTORE"])
def test_a_select_the_backend_refuses_behind_a_command_with_answers_keeps_the_session(proxy, dovecot, lead):
    """Found by the adversarial-input review: a command with untagged answers pipelined before a SELECT of
    a folder with hidden messages that the backend refuses (BAD: QRESYNC not enabled, an unknown
    parameter). The earlier command's first answer was taken for the SELECT's and a view was built of
    nothing selected; its searches failed, and the session ended with BYE [UNAVAILABLE]."""
    name, c = folder(proxy, dovecot, ["chat", "imdn", "chat", "chat"])
    c.close()
    c = device(proxy)
    c.send(b'a %s\r\nb SELECT "%s" (QRESYNC (1 1))\r\nc SELECT "%s" (BOGUS)\r\nd NOOP\r\n' % (lead, name, name))
    got = answers(c, b"abcd")
    tagged = sorted(x[:5] for x in got if x[:2] in (b"a ", b"b ", b"c ", b"d "))
    assert tagged == [b"a OK ", b"b BAD", b"c BAD", b"d OK "], got
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    c.close()


# -- the backend's unsolicited responses around a SELECT, put exactly in the race's place -----------------
# (tests/gaterelay.py: the proxy's backend connections go through a relay that holds what the proxy sends
# from a chosen line on, until the test lets it go; meanwhile Dovecot, which has not read that line, sends
# its NOTIFY events as to a connection with no command in progress.)


@pytest.fixture
def relay(dovecot):
    from tests.gaterelay import GateRelay

    r = GateRelay(dovecot.port)
    yield r
    r.close()


def _until_told(link, change, patterns: list[bytes], tries: int = 30) -> None:
    """``change()`` (again, every 0.5 s) until the backend has told all of ``patterns`` on ``link`` (NOTIFY
    events: Dovecot watches the selected mailbox from 1 s after a connection's last command, its own
    event's included, and tells of the changes before that at the next one it sees)."""
    from tests.gaterelay import GateRelay

    start = len(link.down)
    for _ in range(tries):
        change()
        try:
            for pattern in patterns:
                GateRelay.wait_sent(link, pattern, timeout=0.5, start=start)
            return
        except AssertionError:
            pass
    for pattern in patterns:
        GateRelay.wait_sent(link, pattern, timeout=5, start=start)


def _gated_proxy(make_proxy, relay):
    return make_proxy(backend_tls="none", backend_port=relay.port, config_extra="[policy]\nsync = { imdn = false }\n")


@pytest.mark.parametrize("event", ["status", "list"])
def test_a_notify_event_just_before_a_select_is_not_taken_for_its_answer(make_proxy, relay, dovecot, event):
    """Found by review (suspicion 1 of helper-93's brief): with NOTIFY events of other mailboxes on, the
    backend told of a change elsewhere (``* STATUS``, ``* LIST``) just before the responses of a SELECT it
    had not read yet. The proxy took it for the SELECT's first response and built a view of a mailbox
    before the SELECT was answered; with the SELECT refused (a folder that does not exist) the view's
    searches failed, and the session ended with BYE: the device got neither its NO nor the event."""
    proxy = _gated_proxy(make_proxy, relay)
    other = b"Ev" + uuid.uuid4().hex[:8].encode()
    dovecot.deliver("dave", other.decode(), make_object("chat"))
    c = device(proxy)
    r = c.command(b"n", b"NOTIFY SET STATUS (personal (MessageNew MessageExpunge MailboxName))")
    assert r[-1].startswith(b"n OK"), r
    missing = b"Missing" + uuid.uuid4().hex[:8].encode()
    relay.hold_from(rb'^s SELECT "%s"' % missing)
    c.send(b's SELECT "%s"\r\n' % missing)
    link = relay.wait_gated()  # (the proxy sent the SELECT; the backend has not read it)
    mark = len(link.down)
    if event == "status":
        dovecot.deliver("dave", other.decode(), make_object("chat", seed=2))
        relay.wait_sent(link, rb"\* STATUS \"?%s" % other, start=mark)
    else:
        made = other + b"-new"
        d = dovecot.imap_direct("dave", tls="none")
        d.create_folder(made.decode())
        d.logout()
        relay.wait_sent(link, rb"\* LIST \([^)]*\) \"/\" \"?%s" % made, start=mark)
    relay.release()  # (its answer comes behind the event on the same connection)
    got = c.until_tagged(b"s") + c.command(b"z", b"NOOP")
    c.close()
    assert [x[:4] for x in got if x[:2] in (b"s ", b"z ")] == [b"s NO", b"z OK"], got
    assert any(x.startswith(b"* STATUS " if event == "status" else b"* LIST ") for x in got), got


def _events_while_leaving(make_proxy, relay, dovecot, gate: bytes, select: bytes) -> list[bytes]:
    """The device (QRESYNC on) has a folder selected (chat, IMDN, chat, chat; the IMDN hidden) with a NOTIFY
    of its events, and sends ``select`` (tagged ``s``); the relay holds the proxy's line matching ``gate``
    meanwhile, while another session flags the hidden IMDN and expunges UID 1 there until the backend
    has told the device's connection. Then it lets go: the device's responses up to the SELECT's answer,
    and to a NOOP after it."""
    proxy = make_proxy(backend_tls="none", backend_port=relay.port, config_extra="[policy]\nsync = { imdn = false }\n")
    left = b"Left" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(["chat", "imdn", "chat", "chat"]):
        dovecot.deliver("dave", left.decode(), make_object(k, seed=i))
    c = device(proxy)
    assert c.command(b"e", b"ENABLE QRESYNC")[-1].startswith(b"e OK")
    assert b"* 3 EXISTS\r\n" in c.command(b"a", b'SELECT "%s"' % left)
    r = c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange))")
    assert r[-1].startswith(b"n OK"), r
    relay.hold_from(gate)
    c.send(b"s " + select + b"\r\n")
    relay.wait_gated()
    session_link = next(link for link in relay.links if b'a SELECT "%s"' % left in link.up)
    other = dovecot.imap_direct("dave", tls="none")
    other.select_folder(left.decode())
    other.delete_messages([1])
    other.expunge()
    toggle = iter([other.add_flags, other.remove_flags] * 20)
    _until_told(session_link, lambda: next(toggle)([2], [b"\\Flagged"]), [rb"FETCH \(UID 2 ", rb"VANISHED 1\r\n"])
    other.logout()
    if session_link is not relay.gated_link:
        time.sleep(0.2)  # (passed on to the proxy: let it read them before the decision's answer comes)
    relay.release()
    got = c.until_tagged(b"s")
    got += c.command(b"f", b"FETCH 1:* (UID)") + c.command(b"z", b"NOOP")
    c.close()
    return got


def _told_of_the_left_mailbox(got: list[bytes]) -> list[bytes]:
    return [x for x in got if re.match(rb"\* (\d+ FETCH \((?!UID \d+\)\r)|VANISHED|\d+ EXPUNGE)", x)]


@pytest.mark.parametrize("next_folder", ["filtered", "identity"])
@pytest.mark.parametrize("gate", ["select", "decision"])
def test_events_of_the_mailbox_left_never_reach_the_device(make_proxy, relay, dovecot, gate, next_folder):
    """Found by review: with a NOTIFY of the selected mailbox's events, the backend tells another session's
    changes in the mailbox selected while no command is in progress: so also after the device's SELECT of
    another one was decided or sent, before the backend read it. The proxy had dropped the old view by then:
    the hidden IMDN's flag change went out as it came (``* 2 FETCH (UID 2 MODSEQ ... FLAGS ...)``: its UID
    and flags), its expunges unrenumbered; or, taken for the SELECT's first response, they were applied to
    the next mailbox's view (an EXPUNGE took a message out of it, and the session ended for inconsistent
    counts). ``gate``: held at the SELECT itself (at the backend, unread), or at the proxy's question that
    decides it (the SELECT not sent yet)."""
    nxt = b"Next" + uuid.uuid4().hex[:8].encode()
    kinds = ["chat", "imdn", "chat", "chat"] if next_folder == "filtered" else ["chat"] * 3
    for i, k in enumerate(kinds):
        dovecot.deliver("dave", nxt.decode(), make_object(k, seed=10 + i))
    gate_line = rb'^s SELECT "%s"' % nxt if gate == "select" else rb'STATUS "?%s"? \(UIDVALIDITY\)' % nxt
    got = _events_while_leaving(make_proxy, relay, dovecot, gate_line, b'SELECT "%s"' % nxt)
    assert not _told_of_the_left_mailbox(got), got
    visible = [1, 3, 4] if next_folder == "filtered" else [1, 2, 3]
    assert b"* 3 EXISTS\r\n" in got and got[-1].startswith(b"z OK"), got
    assert [x for x in got if b" FETCH " in x] == [b"* %d FETCH (UID %d)\r\n" % (i + 1, u) for i, u in enumerate(visible)], got


def test_events_of_the_mailbox_left_by_a_refused_select_never_reach_the_device(make_proxy, relay, dovecot):
    """The same, for a SELECT the proxy refuses itself (a literal8 name, which Dovecot would refuse while
    parsing, the old mailbox still selected): it unselects the mailbox at the backend with an UNSELECT of
    its own, and what the backend tells of it until that is answered is of a mailbox the device has left
    (it went out unfiltered: the hidden IMDN's UID and flags)."""
    got = _events_while_leaving(make_proxy, relay, dovecot, rb"^cpm\.\d+ UNSELECT", b"SELECT ~{5+}\r\nINBOX")
    assert not _told_of_the_left_mailbox(got), got
    assert [x[:5] for x in got if x[:2] in (b"s ", b"f ", b"z ")] == [b"s BAD", b"f BAD", b"z OK "], got


def test_a_local_delete_while_an_arrival_is_classified_keeps_the_counts(make_proxy, relay, dovecot):
    """Found by review (suspicion 2 of helper-93's brief): a local EXPUNGE while the view classifies new
    messages (their EXISTS, which no command of the client's brought, held meanwhile). The local delete
    hid its message in the view at once and queued its EXPUNGE behind the held EXISTS, which was then
    counted on the view without that message: the client, still counting it, was told of no arrival (the
    EXISTS was dropped as telling nothing new), then of the EXPUNGE; it numbered one message fewer than the
    view for good."""
    proxy = _gated_proxy(make_proxy, relay)
    name = b"Ld" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", name.decode(), make_object(k, seed=i))
    c = device(proxy)
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % name)
    assert c.command(b"d", b"STORE 1 +FLAGS.SILENT (\\Deleted $LocalDelete)")[-1].startswith(b"d OK")
    r = c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange))")
    assert r[-1].startswith(b"n OK"), r
    relay.hold_from(rb"UID SEARCH RETURN \(ALL\) UID 4:\*")  # (the arrival's classification)
    dovecot.deliver("dave", name.decode(), make_object("chat", seed=7))
    relay.wait_gated()  # (its EXISTS is held by now)
    side = next(link for link in relay.links if b"-side" in link.up[:200])
    mark = len(side.down)
    c.send(b"x EXPUNGE\r\n")
    relay.wait_sent(side, rb"OK Setmetadata completed", start=mark)  # (the local delete's record)
    time.sleep(0.2)  # (passed on to the proxy: let it take the record's answer before the arrival's)
    relay.release()
    got = c.until_tagged(b"x") + c.command(b"f", b"FETCH 1:* (UID)")
    c.close()
    count, told = 2, []
    for line in got:
        if (m := re.match(rb"\* (\d+) (EXISTS|EXPUNGE)\r\n", line)):
            n = int(m.group(1))
            assert m.group(2) == b"EXPUNGE" or n >= count, got  # (EXISTS never shrinks the mailbox)
            count = n if m.group(2) == b"EXISTS" else count - 1
        elif b" FETCH (UID " in line:
            told.append(line)
    assert told == [b"* 1 FETCH (UID 3)\r\n", b"* 2 FETCH (UID 4)\r\n"] and count == 2, got


_PREF = b"/private/vendor/vendor.cpmproxy"


def _uids(got: list[bytes]) -> list[int]:
    return [int(m.group(1)) for x in got if (m := re.match(rb"\* \d+ FETCH \(UID (\d+)\)", x))]


def test_an_arrival_classified_when_the_device_selects_another_mailbox(make_proxy, relay, dovecot):
    """Suspicion of helper-95's brief: a SELECT does not wait for the classification of an arrival in the
    mailbox it leaves (UNSELECT does). Its searches were sent before the SELECT (at the EXISTS): they run
    in the mailbox left, and nothing of the next one reaches its classification cache."""
    proxy = _gated_proxy(make_proxy, relay)
    a = b"Ga" + uuid.uuid4().hex[:8].encode()
    b = b"Gb" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", a.decode(), make_object(k, seed=i))
    for i, k in enumerate(["chat", "chat", "chat", "chat", "chat"]):
        dovecot.deliver("dave", b.decode(), make_object(k, seed=20 + i))
    c = device(proxy)
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % a)
    r = c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange))")
    assert r[-1].startswith(b"n OK"), r
    relay.hold_from(rb"UID SEARCH RETURN \(ALL\) UID 4:\*")  # (the arrival's classification)
    dovecot.deliver("dave", a.decode(), make_object("imdn", seed=7))  # (UID 4, hidden)
    relay.wait_gated()
    c.send(b't SELECT "%s"\r\n' % b)
    time.sleep(0.3)
    relay.release()
    got = c.until_tagged(b"t")
    assert got[-1].startswith(b"t OK") and b"* 5 EXISTS\r\n" in got, got
    assert _uids(c.command(b"f", b"FETCH 1:* (UID)")) == [1, 2, 3, 4, 5]
    assert b"* 2 EXISTS\r\n" in c.command(b"a", b'SELECT "%s"' % a)
    assert _uids(c.command(b"g", b"FETCH 1:* (UID)")) == [1, 3]
    c.close()
    d = device(proxy)
    assert b"* 2 EXISTS\r\n" in d.command(b"s", b'SELECT "%s"' % a)
    assert _uids(d.command(b"f", b"FETCH 1:* (UID)")) == [1, 3]
    d.close()


def test_preferences_reapplied_in_idle_are_not_applied_to_the_mailbox_selected_next(make_proxy, relay, dovecot):
    """A folder preference changed (another session turns the folder's IMDNs off) while a device idles
    with it selected: the view is classified again by a coroutine of its own, which asks the folder's
    preferences first. Meanwhile the device leaves IDLE and selects another folder (nothing hidden there:
    decided at once). The re-classification's searches then ran in that folder: its IMDN's UID went into
    the first folder's classification cache (a later SELECT of the first folder showed its hidden IMDN and
    hid a chat), and that folder's messages were expunged from the device's view of the second one."""
    proxy = make_proxy(backend_tls="none", backend_port=relay.port)
    a = b"Ra" + uuid.uuid4().hex[:8].encode()
    b = b"Rb" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", a.decode(), make_object(k, seed=i))
    for i, k in enumerate(["imdn", "chat", "chat", "chat"]):
        dovecot.deliver("dave", b.decode(), make_object(k, seed=20 + i))
    c = device(proxy)
    assert b"* 4 EXISTS\r\n" in c.command(b"s0", b'SELECT "%s"' % b)  # (known to the session: decided at once)
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % a)  # (nothing hidden yet)
    c.send(b"i IDLE\r\n")
    assert c.read_response().startswith(b"+ ")
    # (The re-classification's first question: the folder's preferences read again.)
    relay.hold_from(rb'GETMETADATA \(DEPTH infinity\) "?%s"? \(/private/vendor/vendor.cpmproxy\)' % a)
    other = device(proxy)
    r = other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (a, _PREF))
    assert r[-1].startswith(b"m OK"), r
    relay.wait_gated()
    c.send(b"DONE\r\n")
    got = c.until_tagged(b"i")
    assert got[-1].startswith(b"i OK"), got
    c.send(b't SELECT "%s"\r\n' % b)
    time.sleep(0.3)  # (decided at once, it reached the backend before the re-classification's searches)
    relay.release()
    got = c.until_tagged(b"t")
    assert got[-1].startswith(b"t OK") and b"* 4 EXISTS\r\n" in got, got
    link = next(link for link in relay.links if b'SELECT "%s"' % a in link.up)
    search = re.compile(rb"\r\n(\S+) UID SEARCH RETURN \(ALL\) UID \d+:\d+ HEADER")  # (the IMDN one)
    deadline = time.monotonic() + 10
    while (m := search.search(bytes(link.up))) is None:  # (sent before the SELECT, or after it)
        assert time.monotonic() < deadline, bytes(link.up)
        time.sleep(0.05)
    tag = m.group(1)
    relay.wait_sent(link, rb"\r\n%s OK" % re.escape(tag))
    time.sleep(0.3)  # (taken by the proxy)
    in_b = c.command(b"f", b"FETCH 1:* (UID)")
    c.close()
    d = device(proxy)  # (a session of the same process: the same classification cache)
    in_a = d.command(b"s", b'SELECT "%s"' % a) + d.command(b"f", b"FETCH 1:* (UID)")
    d.close()
    assert b"* 2 EXISTS\r\n" in in_a and _uids(in_a) == [1, 3], (in_b, in_a)
    assert not [x for x in in_b if b"EXPUNGE" in x or b"VANISHED" in x] and _uids(in_b) == [1, 2, 3, 4], (in_b, in_a)
    other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn NIL)' % (a, _PREF))
    other.close()


def _arrival_expunged_while_classified(proxy, relay, dovecot, select_next, between=None,
                                       kinds=("chat", "imdn", "chat")):
    """The device (``c``) has A selected (chat, IMDN, chat; the IMDN hidden) with a NOTIFY of its events; an
    IMDN arrives (UID 4) and the relay holds its kind search while another session expunges it (the search
    is answered [EXPUNGEISSUED], which calls for a follow-up search) and the device sends ``select_next``
    (tagged ``t``; a function of A's name or the line). ``between(a)``: called before the expunge. A's name,
    the device and its responses up to ``t``'s answer."""
    a = b"Xa" + uuid.uuid4().hex[:8].encode()
    if callable(select_next):
        select_next = select_next(a)
    for i, k in enumerate(kinds):
        dovecot.deliver("dave", a.decode(), make_object(k, seed=i))
    c = device(proxy)
    assert b"* %d EXISTS\r\n" % (len(kinds) - kinds.count("imdn")) in c.command(b"s", b'SELECT "%s"' % a)
    r = c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange))")
    assert r[-1].startswith(b"n OK"), r
    relay.hold_from(rb"UID SEARCH RETURN \(ALL\) UID 4:4294967295 HEADER")  # (the arrival's kind search)
    dovecot.deliver("dave", a.decode(), make_object("imdn", seed=7))  # (UID 4, hidden)
    relay.wait_gated()
    if between is not None:
        between(a)
    other = dovecot.imap_direct("dave", tls="none")
    other.select_folder(a.decode())
    other.delete_messages([4])
    other.expunge()
    other.logout()
    c.send(b"t " + select_next + b"\r\n")
    time.sleep(0.3)  # (decided and sent at once, it reached the backend behind the held kind search)
    relay.release()
    return a, c, c.until_tagged(b"t")


def test_an_arrival_expunged_while_classified_is_never_shown_to_another_session(make_proxy, relay, dovecot):
    """Found by review (suspicion 1 of helper-96's brief): a kind search answered [EXPUNGEISSUED] is followed
    by a search for the messages still there, sent once its answer is in. A SELECT of another mailbox the
    device sent meanwhile (it did not wait for the arrival's classification, as UNSELECT does) reached the
    backend first, and that search ran in the other mailbox: it had UID 4, so nothing seemed gone, and the
    kind search's answer, which skipped the expunged IMDN, went into A's classification cache as "UID 4 is
    no IMDN". Another device of the user that had opened A before the expunge then took UID 4 from the cache:
    its SELECT said ``* 3 EXISTS``, and it was sent the hidden IMDN's flags and EXPUNGE."""
    proxy = _gated_proxy(make_proxy, relay)
    b = b"Xb" + uuid.uuid4().hex[:8].encode()
    for i in range(5):
        dovecot.deliver("dave", b.decode(), make_object("chat", seed=20 + i))
    victim = {}

    def between(a):
        # (Its backend session opens A with the IMDN; its classification waits for the relay to pass on the
        # SELECT's answer, after the device's.)
        before = list(relay.links)
        d = victim["d"] = device(proxy)
        link = victim["link"] = next(x for x in relay.links if x not in before and b"-side" not in x.up[:200])
        relay.pause_down(link)
        d.send(b'v SELECT "%s"\r\n' % a)
        relay.wait_sent(link, rb"v OK")

    _a, c, got = _arrival_expunged_while_classified(proxy, relay, dovecot, b'SELECT "%s"' % b, between)
    assert got[-1].startswith(b"t OK") and b"* 5 EXISTS\r\n" in got, got
    relay.resume_down(victim["link"])
    d = victim["d"]
    seen = d.until_tagged(b"v") + d.command(b"f", b"FETCH 1:* (UID)") + d.command(b"z", b"NOOP")
    c.close()
    d.close()
    assert b"* 2 EXISTS\r\n" in seen and _uids(seen) == [1, 3], seen
    assert not [x for x in seen if b"EXPUNGE" in x or b"FLAGS (\\Deleted)" in x], seen


def test_an_arrival_expunged_while_classified_when_the_device_selects_a_missing_mailbox(make_proxy, relay, dovecot):
    """The same with a SELECT the backend refuses (no mailbox selected after it): the follow-up search was
    refused (BAD No mailbox selected), and the proxy logged a failed classification, with a traceback."""
    proxy = _gated_proxy(make_proxy, relay)
    missing = b"Missing" + uuid.uuid4().hex[:8].encode()
    _a, c, got = _arrival_expunged_while_classified(proxy, relay, dovecot, b'SELECT "%s"' % missing)
    got += c.command(b"z", b"NOOP")
    c.close()
    assert [x[:4] for x in got if x[:2] in (b"t ", b"z ")] == [b"t NO", b"z OK"], got
    assert "classification of new messages failed" not in proxy.log(), proxy.log()


@pytest.mark.parametrize("command", [b'DELETE "%s"', b'RENAME "%s" "%s-renamed"'], ids=["delete", "rename"])
def test_the_selected_mailbox_deleted_or_renamed_while_an_arrival_is_classified(make_proxy, relay, dovecot,
                                                                                 command):
    """Found by review (suspicion 1 of helper-100's brief): a DELETE or RENAME of the selected mailbox did not
    wait for an arrival's classification, as a SELECT does. It reached the backend before the follow-up
    search the [EXPUNGEISSUED] kind search calls for, which Dovecot answered with a BYE ("Selected mailbox
    was deleted", "IMAP session state is inconsistent"): the device never got its command's OK, only the
    proxy's "BYE [UNAVAILABLE] Backend server closed the connection", though its folder was deleted or
    renamed. (Nothing was cached: the search was never answered OK.) Now the command waits: its OK reaches
    the device."""
    proxy = _gated_proxy(make_proxy, relay)
    _a, c, got = _arrival_expunged_while_classified(
        proxy, relay, dovecot, lambda a: command.replace(b"%s", a), kinds=("chat", "chat", "chat"))
    c.close()
    assert got[-1].startswith(b"t OK"), got
    assert "Traceback" not in proxy.log(), proxy.log()


@pytest.mark.parametrize("command", [b'DELETE "%s"', b'RENAME "%s" "%s-renamed"'], ids=["delete", "rename"])
def test_the_selected_mailbox_deleted_or_renamed_behind_a_command_announcing_an_arrival(make_proxy, relay,
                                                                                         dovecot, command):
    """The same with the arrival announced during a command in flight (a NOOP): a DELETE or RENAME of the
    selected mailbox pipelined behind it did not wait for it, as a SELECT does, and reached the backend
    before the classification's searches, sent at the NOOP's EXISTS: Dovecot answered them with a BYE,
    and the device got neither the NOOP's OK nor its command's. Worse, the DELETE was decided before the
    view knew the arrival: the folder was deleted with the hidden IMDN in it, which a device may not do
    (hidden messages are never changed through its view: "cannot be deleted from this device")."""
    proxy = _gated_proxy(make_proxy, relay)
    a = b"Xd" + uuid.uuid4().hex[:8].encode()
    for i in range(3):
        dovecot.deliver("dave", a.decode(), make_object("chat", seed=i))
    before = list(relay.links)
    c = device(proxy)
    link = next(x for x in relay.links if x not in before and b"-side" not in x.up[:200])
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % a)
    dovecot.deliver("dave", a.decode(), make_object("imdn", seed=7))  # (UID 4, hidden)
    relay.pause_down(link)  # (the NOOP's EXISTS reaches the proxy once the device's command was decided)
    start = len(link.down)
    c.send(b"n NOOP\r\nt " + command.replace(b"%s", a) + b"\r\n")
    relay.wait_sent(link, rb"n OK", start=start)
    time.sleep(0.3)  # (decided at once, it reached the backend behind the NOOP)
    relay.resume_down(link)
    got = answers(c, b"nt")
    c.close()
    told = [x[:4] for x in got if x[:2] in (b"n ", b"t ")]
    assert told == [b"n OK", b"t NO" if command.startswith(b"DELETE") else b"t OK"], got
    assert not [x for x in got if b"EXISTS" in x and x != b"* 3 EXISTS\r\n"], got
    assert "Traceback" not in proxy.log(), proxy.log()
    if command.startswith(b"DELETE"):
        other = dovecot.imap_direct("dave", tls="none")
        assert other.folder_exists(a.decode()) and other.folder_status(a.decode(), ["MESSAGES"])[b"MESSAGES"] == 4
        other.logout()


def test_a_mailbox_made_anew_while_its_select_is_decided_is_classified_as_itself(make_proxy, relay, dovecot):
    """Found by review (suspicion 2 of helper-100's brief): a SELECT's plan takes UIDVALIDITY from a STATUS
    on the side connection, before the SELECT reaches the backend. The folder deleted and made anew in
    between (another device or CPM itself), the SELECT opened the new one (its own UIDVALIDITY), but its
    classification was read from and written to the cache of the old one: the old folder's UIDs 1-3 were
    "known, no IMDN", so the new folder's IMDN at UID 2 was shown (``* 3 EXISTS``, not 2), and the new
    folder's kinds went into the old one's cache."""
    proxy = _gated_proxy(make_proxy, relay)
    a = b"Xn" + uuid.uuid4().hex[:8].encode()
    for i in range(3):
        dovecot.deliver("dave", a.decode(), make_object("chat", seed=i))
    first = device(proxy)
    assert b"* 3 EXISTS\r\n" in first.command(b"s", b'SELECT "%s"' % a)  # (the cache: UIDs 1-3, no IMDN)
    first.close()
    c = device(proxy)
    relay.hold_from(rb'^s SELECT "%s"' % a)
    c.send(b's SELECT "%s"\r\n' % a)
    relay.wait_gated()
    other = dovecot.imap_direct("dave", tls="none")
    other.delete_folder(a.decode())
    other.logout()
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", a.decode(), make_object(k, seed=10 + i))
    relay.release()
    got = c.until_tagged(b"s") + c.command(b"f", b"FETCH 1:* (UID)")
    c.close()
    assert got[0].startswith(b"* FLAGS") and b"* 2 EXISTS\r\n" in got and _uids(got) == [1, 3], got
    d = device(proxy)
    seen = d.command(b"s", b'SELECT "%s"' % a) + d.command(b"f", b"FETCH 1:* (UID)")
    d.close()
    assert b"* 2 EXISTS\r\n" in seen and _uids(seen) == [1, 3], seen


def test_preferences_reapplied_after_the_selected_folder_was_renamed_away(proxy, dovecot):
    """Suspicion 2 of helper-100's brief, disproven: a re-application of preferences to a folder selected by
    the fast path (nothing could be hidden at its SELECT) asked UIDVALIDITY of the folder's name on the side
    connection (since helper-99's review it takes the SELECT's own). Another device renamed the folder away and another one to its name (Dovecot keeps the
    session in the folder it selected): were the re-classification's searches answered there, their answers
    would go into the cache of the folder now of that name, by its UIDVALIDITY, and its IMDN be shown to
    the next device that selects it. Dovecot refuses them (NO [SERVERBUG] Internal error: the folder's
    files moved), and the session ends: nothing is cached. Guards that it stays so."""
    a = b"Sa" + uuid.uuid4().hex[:8].encode()
    b = b"Sb" + uuid.uuid4().hex[:8].encode()
    for i in range(3):
        dovecot.deliver("dave", a.decode(), make_object("chat", seed=i))
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", b.decode(), make_object(k, seed=20 + i))
    c = device(proxy)
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % a)  # (nothing hidden: no view)
    direct = dovecot.imap_direct("dave", tls="none")
    direct.rename_folder(a.decode(), a.decode() + "-old")
    direct.rename_folder(b.decode(), a.decode())
    direct.logout()
    other = device(proxy)
    r = other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn "off")' % (a, PREFIX))
    assert r[-1].startswith(b"m OK"), r
    try:
        c.command(b"n", b"NOOP")  # (the preferences re-applied: the session's folder classified again)
    except ConnectionError:
        pass  # (Dovecot's NO: the session ended)
    c.close()
    d = device(proxy)
    seen = d.command(b"s", b'SELECT "%s"' % a) + d.command(b"f", b"FETCH 1:* (UID)")
    d.close()
    other.command(b"m", b'SETMETADATA "%s" (%s/sync/imdn NIL)' % (a, PREFIX))
    other.close()
    assert b"* 2 EXISTS\r\n" in seen and _uids(seen) == [1, 3], seen



def test_a_local_delete_in_a_folder_made_anew_since_its_select_is_recorded_for_the_folder_selected(proxy, dovecot):
    """Found by review (helper-99): the view a local delete builds where the SELECT took the fast path took
    the selected folder's UIDVALIDITY from a STATUS of its name. Another session deleted the folder and made
    it anew (Dovecot keeps this session in the old one): the delete of the old folder's UID 2 was recorded
    under the new folder's UIDVALIDITY, and the new folder's UID 2, never seen by the device, was hidden
    from it for good (``* 2 EXISTS``, UIDs 1 and 3)."""
    for _attempt in range(5):
        a = b"Ln" + uuid.uuid4().hex[:8].encode()
        for i in range(3):
            dovecot.deliver("dave", a.decode(), make_object("chat", seed=i))
        c = device(proxy)
        assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % a)  # (nothing hidden: no view)
        direct = dovecot.imap_direct("dave", tls="none")
        direct.delete_folder(a.decode())
        direct.logout()
        for i in range(3):
            dovecot.deliver("dave", a.decode(), make_object("chat", seed=20 + i))
        try:
            stored = c.command(b"d", b"UID STORE 2 +FLAGS (\\Deleted $LocalDelete)")
        except ConnectionError:
            # (Dovecot noticed the deletion first and ended the session, "Mailbox was deleted": at times,
            # by when its index saw it; not the race this is about. Again, with another folder.)
            c.close()
            continue
        assert stored[-1].startswith(b"d OK"), stored
        assert c.command(b"e", b"EXPUNGE")[-1].startswith(b"e OK")
        c.close()
        break
    else:
        pytest.fail("Dovecot ended every session whose folder was deleted")
    d = device(proxy)
    seen = d.command(b"s", b'SELECT "%s"' % a) + d.command(b"f", b"FETCH 1:* (UID)")
    d.close()
    assert b"* 3 EXISTS\r\n" in seen and _uids(seen) == [1, 2, 3], seen


def _status_while_made_anew(make_proxy, relay, dovecot, gate: bytes, answered: bytes | None = None,
                            made_anew=None) -> tuple[bytes, list[bytes]]:
    """A folder of three messages, two of them deleted locally by the device, asked STATUS (MESSAGES) by it
    with the side connection held at the line ``gate`` of its counting, once the backend said ``answered``
    there; meanwhile the folder is deleted and made anew (three other messages), then ``made_anew(other, name)`` runs (a direct session). The folder's
    name and the answer."""
    proxy = make_proxy(backend_tls="none", backend_port=relay.port)
    a = b"Sn" + uuid.uuid4().hex[:8].encode()
    for i in range(3):
        dovecot.deliver("dave", a.decode(), make_object("chat", seed=i))
    c = device(proxy)
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % a)
    assert c.command(b"d", b"UID STORE 1:2 +FLAGS (\\Deleted $LocalDelete)")[-1].startswith(b"d OK")
    assert c.command(b"e", b"EXPUNGE")[-1].startswith(b"e OK")
    assert c.command(b"u", b"UNSELECT")[-1].startswith(b"u OK")
    assert c.command(b"t", b'STATUS "%s" (MESSAGES)' % a)[0] == b"* STATUS %s (MESSAGES 1)\r\n" % a
    heard = {id(link): len(link.down) for link in relay.links}
    relay.hold_from(gate.replace(b"%s", a))
    c.send(b't STATUS "%s" (MESSAGES)\r\n' % a)
    link = relay.wait_gated()
    if answered is not None:
        relay.wait_sent(link, answered, start=heard.get(id(link), 0))
    other = dovecot.imap_direct("dave", tls="none")
    other.delete_folder(a.decode())
    for i in range(3):
        dovecot.deliver("dave", a.decode(), make_object("chat", seed=10 + i))
    if made_anew is not None:
        made_anew(other, a.decode())
    other.logout()
    relay.release()
    got = c.until_tagged(b"t")
    c.close()
    return a, got


def test_status_answered_of_a_folder_replaced_before_it_is_counted_never_counts_what_it_hid(make_proxy, relay,
                                                                                             dovecot):
    """Found by review (helper-99): a STATUS's answer is counted on the side connection (EXAMINE, the UIDs)
    after the backend gave it. The folder deleted and made anew in between (three messages, nothing hidden),
    the new folder was examined and its counts taken off the old folder's answer: the device's two local
    deletions were counted as visible (``MESSAGES 3``, not 1). An answer whose UIDVALIDITY is not the
    examined folder's is not countable: NO, try again."""
    _a, got = _status_while_made_anew(make_proxy, relay, dovecot, rb'^\S+ EXAMINE "?%s')
    assert got == [b"t NO [UNAVAILABLE] The mailbox's counts could not be read; try again.\r\n"], got


def test_counting_a_folder_replaced_while_examined_keeps_the_new_folders_local_deletions(make_proxy, relay, dovecot):
    """Found by review (helper-99): a STATUS counted on the side connection reads the device's local-delete
    records by the folder's name after the EXAMINE, and prunes those of another UIDVALIDITY. The folder
    deleted and made anew after the EXAMINE (Dovecot keeps the old one open there, and answers its
    UIDVALIDITY for the name), the records read were the new folder's: all pruned as stale, and the new
    folder's message 3, deleted locally by the device (on another proxy node, say), came back to it."""
    def deleted_locally(other, name):
        uidvalidity = other.folder_status(name, ["UIDVALIDITY"])[b"UIDVALIDITY"]
        imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
        typ, _ = other._imap._simple_command("SETMETADATA", name, f'({PREFIX.decode()}/localdelete/phone/'
                                                                 f'{uidvalidity}-abc "3")')
        assert typ == "OK"

    for _attempt in range(5):
        a, got = _status_while_made_anew(make_proxy, relay, dovecot, rb"^\S+ UID SEARCH RETURN \(ALL\) ALL",
                                         rb"OK \[READ-ONLY\]", deleted_locally)
        # (At times Dovecot ends the side connection whose examined folder was deleted, before the count
        # reads the records: "try again", nothing pruned, not the race this is about. Again, anew.)
        if not got[-1].startswith(b"t NO [UNAVAILABLE]"):
            break
    assert got[-1].startswith(b"t OK"), got
    proxy = make_proxy(backend_tls="none", backend_port=relay.port)
    d = device(proxy)
    seen = d.command(b"s", b'SELECT "%s"' % a) + d.command(b"f", b"FETCH 1:* (UID)")
    d.close()
    assert b"* 2 EXISTS\r\n" in seen and _uids(seen) == [1, 2], seen


def test_a_logout_while_an_arrival_is_classified_is_answered(make_proxy, relay, dovecot):
    """Found by review (helper-100): a LOGOUT did not wait for an arrival's classification. It reached the
    backend before the follow-up search the [EXPUNGEISSUED] kind search calls for, which was never answered
    (the backend closed the connection): the device got neither ``* BYE`` nor its LOGOUT's OK (RFC 9051
    6.1.3), only the connection closed, and the proxy logged "backend connection lost"."""
    proxy = _gated_proxy(make_proxy, relay)
    _a, c, got = _arrival_expunged_while_classified(proxy, relay, dovecot, b"LOGOUT")
    c.close()
    assert got[-1].startswith(b"t OK") and [x for x in got if x.startswith(b"* BYE")], got
    assert "backend connection lost" not in proxy.log(), proxy.log()


def test_status_size_of_another_mailbox_leaves_out_a_hidden_message_expunged_meanwhile(make_proxy, relay, dovecot):
    """A STATUS of a folder not selected is counted on the side connection after the backend's answer: a
    hidden IMDN another session expunged in between is in the answer's SIZE and no longer found there, and
    its size stayed in (the UNSEEN and MESSAGES of such a race were anchored already; SIZE was not)."""
    proxy = _gated_proxy(make_proxy, relay)
    name = b"Gone" + uuid.uuid4().hex[:8].encode()
    for i, k in enumerate(["chat", "imdn", "chat"]):
        dovecot.deliver("dave", name.decode(), make_object(k, seed=i))
    d = dovecot.imap_direct("dave", tls="none")
    d.select_folder(name.decode())
    sizes = {u: v[b"RFC822.SIZE"] for u, v in d.fetch([1, 2, 3], ["RFC822.SIZE"]).items()}
    c = device(proxy)
    relay.hold_from(rb'^\S+ EXAMINE "?%s' % name)  # (the side connection's, once the backend has answered)
    c.send(b'x STATUS "%s" (MESSAGES UNSEEN SIZE)\r\n' % name)
    relay.wait_gated()
    d.delete_messages([2])
    d.uid_expunge([2])
    d.logout()
    relay.release()
    got = answers(c, b"x")
    c.close()
    assert got[-1].startswith(b"x OK"), got
    want = b'* STATUS %s (MESSAGES 2 UNSEEN 2 SIZE %d)\r\n' % (name, sizes[1] + sizes[3])
    assert [x for x in got if x.startswith(b"* STATUS")] == [want], got
