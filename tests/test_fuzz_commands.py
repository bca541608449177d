"""Mutated commands through a proxy with a filtered view, against the real Dovecot: every command is
answered (its tagged response, or a BYE with a reason), nothing in the proxy's log is a traceback, and
the proxy serves on. Valid commands of every kind the view rewrites (a corpus), mutated a few tokens at a
time (odd sequence sets, missing or extra arguments, stray brackets, lower case), with messages arriving
meanwhile. Found an APPEND the session hung on (tests/test_append_fastpath.py) in its first minute; then
(seeds 9 and 11 of 1,500 commands) a keyword "[" that made its folder unreadable to the proxy, and an
APPEND answered early whose refused literal left internal commands waiting for ever.

Deterministic: a fixed seed per run (``CPM_FUZZ_SEEDS``, ``CPM_FUZZ_COMMANDS`` for longer hunts)."""

from __future__ import annotations

import os
import random
import uuid

import pytest

from cpmproxy.testing.sample import make_object
from tests.proxyfix import raw_via, still_serving

USER = "carol"
POLICY = "[policy]\nsync = { imdn = false }\nmax_size = 20000\n"
CORPUS = [
    b"SELECT F", b"EXAMINE G", b"SELECT F (CONDSTORE)", b"SELECT F (QRESYNC (1 1 1:8 (1:3 1:5)))", b"ENABLE QRESYNC",
    b"FETCH 1:* (FLAGS UID)", b"FETCH 2,3 (BODY.PEEK[HEADER.FIELDS (Subject)])", b"FETCH 1 (BODY[])",
    b"FETCH 1:3 (MODSEQ) (CHANGEDSINCE 1)", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)",
    b"FETCH * (RFC822.SIZE INTERNALDATE ENVELOPE BODYSTRUCTURE)", b"FETCH $ (UID)", b"FETCH 1 (BINARY.PEEK[1] PREVIEW)",
    b"FETCH 1:2 (BODY.PEEK[1.MIME] BODY.PEEK[TEXT]<0.10>)", b"FETCH 1 (X-GUID X-SAVEDATE SAVEDATE)",
    b"SEARCH ALL", b"SEARCH RETURN (MIN MAX COUNT ALL) UNSEEN", b"SEARCH RETURN (SAVE) 1:2", b"UID SEARCH UID 1:* NOT DELETED",
    b'SEARCH OR SEEN 2:3 (FROM "x" LARGER 10)', b"SEARCH MODSEQ 1", b'SEARCH CHARSET UTF-8 TEXT "a"', b"SEARCH $",
    b"SEARCH MIMEPART (INDEX 2)", b"SEARCH OLDER 100 YOUNGER 5", b"SEARCH INTHREAD REFERENCES ALL",
    b"SORT (DATE) UTF-8 ALL", b"SORT RETURN (MIN COUNT) (REVERSE ARRIVAL) UTF-8 1:*", b"THREAD REFERENCES UTF-8 ALL",
    b"STORE 1 +FLAGS (\\Seen)", b"STORE 1:* -FLAGS.SILENT (\\Flagged)", b"UID STORE 1:* +FLAGS (\\Seen)",
    b"STORE 2 (UNCHANGEDSINCE 1) +FLAGS (x)", b"STORE 1 +FLAGS ($LocalDelete \\Deleted)",
    b"STORE 3 +FLAGS (a[b [)", b"SEARCH KEYWORD a[b", b"UID STORE 1:* -FLAGS.SILENT ([ a[b)",
    b"COPY 1:2 G", b"UID COPY 1:* G", b"MOVE 1 G", b"UID MOVE 3 G", b"EXPUNGE", b"UID EXPUNGE 1:3", b"CLOSE",
    b"UNSELECT", b"CHECK", b"NOOP", b"STATUS G (MESSAGES UNSEEN SIZE UIDNEXT)", b"STATUS F (MESSAGES RECENT XCPM-VIEW)",
    b'LIST "" *', b'LIST (SUBSCRIBED) "" * RETURN (STATUS (MESSAGES))', b'LSUB "" %', b'LIST "" F RETURN (CHILDREN)',
    b"CREATE H", b"RENAME H I", b"DELETE I", b"SUBSCRIBE F", b"UNSUBSCRIBE F", b"GETQUOTAROOT F", b"NAMESPACE",
    b'GETMETADATA "" /private/vendor/vendor.cpmproxy/notifications', b'GETMETADATA (MAXSIZE 10) "*" (/private/comment)',
    b'SETMETADATA F (/private/vendor/vendor.cpmproxy/sync/imdn "on")', b'SETMETADATA "" (/private/comment "x")',
    b"NOTIFY SET (selected (MessageNew (UID) MessageExpunge))", b"NOTIFY NONE", b'ID ("name" "x")', b"CAPABILITY",
    b"APPEND G (\\Seen) {5+}\r\nhello", b"APPEND F (\\Seen) {3+}\r\nabc {4+}\r\nabcd", b"APPEND F CATENATE (TEXT {3+}\r\nabc)",
    b"SELECT {1+}\r\nF", b"SEARCH SUBJECT {1+}\r\nx", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS ({7+}\r\nSubject)])",
]
# (No literal announcements: a mutation that made one would have the next command read as its rest.)
ODD = [b"0", b"*", b"4294967295", b"4294967296", b"1:*", b"*:1", b"$", b"-1", b"1,,2", b"01", b"1:0", b"99", b"()",
       b"(", b")", b'""', b'"\\"', b"NIL", b"\xff", b"[", b"]", b"<1.2>", b'"a b', b"INBOX", b"F", b"G"]


def _mutate(rng: random.Random, line: bytes) -> bytes:
    words = line.split(b" ")
    for _ in range(rng.randint(0, 3)):
        i, op = rng.randrange(len(words)), rng.random()
        if op < 0.3:
            words[i] = rng.choice(ODD)
        elif op < 0.45 and len(words) > 1:
            del words[i]
        elif op < 0.6:
            words.insert(i, rng.choice(ODD))
        elif op < 0.7:
            words[i] = words[i].lower()
        elif op < 0.8:
            words.insert(i, rng.choice(rng.choice(CORPUS).split(b" ")))
        elif words[i]:
            j = rng.randrange(len(words[i]))
            words[i] = words[i][:j] + words[i][j + 1:]
    return b" ".join(words)


def answer(c, tag: bytes, timeout: float = 3, nudges: int = 3) -> list[bytes]:
    """Until the command's tagged response or a BYE. A line a mutation left open (waiting for the rest of a
    literal, a quoted string) is completed, as a client would, with line ends: up to ``nudges`` times, one
    per ``timeout`` without an answer; then the command is taken for unanswered (the test fails). A
    continuation request is given a line end."""
    got, waited = [], 0
    c.sock.settimeout(timeout)
    while True:
        try:
            line = c.read_response()
        except TimeoutError:
            waited += 1
            assert waited <= nudges, f"no answer to {tag!r}: {got[-5:]}"
            c.send(b"\r\n" if waited < nudges else b'))))]]]"\r\n')
            continue
        got.append(line)
        if line.startswith((tag + b" ", b"* BYE")):
            return got
        if line.startswith(b"+"):
            c.send(b"\r\n")


def _login(proxy):
    c = raw_via(proxy, timeout=10)
    assert c.login(USER, USER + "pw")[-1].startswith(b"L OK")
    return c


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("CPM_FUZZ_SEEDS", "1,2").split(",")])
def test_mutated_commands_are_each_answered(make_proxy, dovecot, seed):
    rng = random.Random(seed)
    proxy = make_proxy(config_extra=POLICY)
    names = {b"F": b"Fz" + uuid.uuid4().hex[:8].encode(), b"G": b"Gz" + uuid.uuid4().hex[:8].encode()}
    for name in names.values():
        for i, kind in enumerate(["chat", "imdn", "sms", "imdn", "chat", "file-transfer", "imdn", "chat"]):
            dovecot.deliver(USER, name.decode(), make_object(kind, seed=i))
    corpus = [b" ".join(names.get(w, w) for w in line.split(b" ")) for line in CORPUS]
    c = _login(proxy)
    byes = 0
    try:
        for k in range(int(os.environ.get("CPM_FUZZ_COMMANDS", "300"))):
            line = _mutate(rng, rng.choice(corpus)) if rng.random() < 0.8 else rng.choice(corpus)
            tag = b"t%d" % k
            c.send(tag + b" " + line + b"\r\n")
            got = answer(c, tag)
            if got[-1].startswith(b"* BYE"):
                assert b"BYE [" in got[-1] or len(got[-1]) > 8, got  # (with a reason)
                byes += 1
                c.close()
                c = _login(proxy)
            if k % 40 == 39:  # (mail arriving meanwhile: the view's arrivals and counts)
                dovecot.deliver(USER, rng.choice(list(names.values())).decode(),
                                make_object(rng.choice(["chat", "imdn", "sms"]), seed=k))
    finally:
        c.close()
    assert still_serving(proxy, USER)
    log = proxy.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log, log[-5000:]
    assert byes < 10, f"{byes} sessions ended"
