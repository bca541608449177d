"""Tests for the sans-I/O IMAP framer (``cpmproxy.imap.framing``).

Sections:
  * helpers (feeding, normalizing events)
  * unit tests: lines, literal forms, odd '}' endings, errors, ``at_boundary``, ``buffered``
  * property tests: byte-exact relay and model segmentation under random chunking; random garbage
  * streaming: a 50 MB literal never accumulates in the framer
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmproxy.imap.framing import NEED_DATA, Framer, FramingError, LiteralData, Segment

FAST = settings(max_examples=150, deadline=None)


# -- helpers -----------------------------------------------------------------------------------


def drain(framer: Framer) -> list[Segment | LiteralData]:
    return list(framer.events())


def feed_all(framer: Framer, data: bytes) -> list[Segment | LiteralData]:
    framer.feed(data)
    return drain(framer)


def seg(data: bytes, first: bool, literal: int | None = None, non_sync: bool = False,
        binary: bool = False) -> Segment:
    return Segment(data, first, literal, non_sync, binary)


def coalesce(events: list) -> list:
    """Merge consecutive LiteralData chunks into one ("lit", bytes); segments become tuples."""
    out: list = []
    for ev in events:
        if isinstance(ev, LiteralData):
            if out and out[-1][0] == "lit" and not out[-1][2]:
                out[-1] = ("lit", out[-1][1] + ev.data, ev.last)
            else:
                out.append(("lit", ev.data, ev.last))
        elif isinstance(ev, Segment):
            out.append(("seg", ev.data, ev.first, ev.literal, ev.non_sync, ev.binary))
        else:  # FramingError
            out.append(("err", ev.code, ev.fatal, ev.first, ev.data, ev.size))
    return out


def emitted_bytes(events: list) -> bytes:
    return b"".join(ev.data for ev in events if isinstance(ev, (Segment, LiteralData)))


# -- simple lines ------------------------------------------------------------------------------


def test_simple_line():
    f = Framer()
    assert f.at_boundary
    assert feed_all(f, b"a1 NOOP\r\n") == [seg(b"a1 NOOP\r\n", True)]
    assert f.at_boundary
    assert f.buffered == 0
    assert f.next_event() is NEED_DATA


def test_several_lines_in_one_feed_and_segment_last():
    f = Framer()
    evs = feed_all(f, b"a1 NOOP\r\na2 CAPABILITY\r\n* OK hi\r\n")
    assert evs == [seg(b"a1 NOOP\r\n", True), seg(b"a2 CAPABILITY\r\n", True), seg(b"* OK hi\r\n", True)]
    assert all(ev.last for ev in evs)


def test_lf_only_lines():
    f = Framer()
    assert feed_all(f, b"a1 NOOP\na2 LOGOUT\n") == [seg(b"a1 NOOP\n", True), seg(b"a2 LOGOUT\n", True)]
    # LF-only literal announcement too
    evs = feed_all(f, b"a3 APPEND x {3}\nabc\n")
    assert evs == [seg(b"a3 APPEND x {3}\n", True, 3), LiteralData(b"abc", True), seg(b"\n", False)]


def test_empty_line():
    f = Framer()
    assert feed_all(f, b"\r\n\n") == [seg(b"\r\n", True), seg(b"\n", True)]


def test_partial_line_is_buffered():
    f = Framer()
    f.feed(b"a1 NO")
    assert f.next_event() is NEED_DATA
    assert f.buffered == 5
    assert f.at_boundary
    f.feed(b"OP\r")
    assert f.next_event() is NEED_DATA
    assert f.buffered == 8
    f.feed(b"\na2")
    assert f.next_event() == seg(b"a1 NOOP\r\n", True)
    assert f.buffered == 2
    assert f.next_event() is NEED_DATA
    f.feed(b" NOOP\r\n")
    assert f.next_event() == seg(b"a2 NOOP\r\n", True)
    assert f.buffered == 0


def test_feed_before_draining_keeps_everything():
    """Feeding more while events are still pending (pos inside the buffer) loses nothing."""
    f = Framer()
    f.feed(b"a1 NOOP\r\na2 NO")
    assert f.next_event() == seg(b"a1 NOOP\r\n", True)
    assert f.next_event() is NEED_DATA
    f.feed(b"OP\r\na3 APPEND x {2}\r\nab")
    f.feed(b"\r\na4 NOOP\r\n")
    assert drain(f) == [
        seg(b"a2 NOOP\r\n", True),
        seg(b"a3 APPEND x {2}\r\n", True, 2),
        LiteralData(b"ab", True),
        seg(b"\r\n", False),
        seg(b"a4 NOOP\r\n", True),
    ]


def test_empty_feed():
    f = Framer()
    f.feed(b"")
    assert f.next_event() is NEED_DATA
    f.feed(b"a1 NO")
    f.feed(b"")
    f.feed(b"OP\r\n")
    assert drain(f) == [seg(b"a1 NOOP\r\n", True)]


# -- literal forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "announce, non_sync, binary",
    [
        (b"{5}", False, False),
        (b"{5+}", True, False),
        (b"{5-}", True, False),
        (b"~{5}", False, True),
        (b"~{5+}", True, True),
        (b"~{5-}", True, True),
        (b"{005}", False, False),
    ],
)
@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_literal_forms(announce, non_sync, binary, eol):
    f = Framer()
    head = b"a1 APPEND INBOX " + announce + eol
    evs = feed_all(f, head + b"hello" + b"\r\n")
    assert evs == [
        seg(head, True, 5, non_sync, binary),
        LiteralData(b"hello", True),
        seg(b"\r\n", False),
    ]
    assert not evs[0].last and evs[2].last
    assert f.at_boundary


def test_zero_length_literal():
    f = Framer()
    f.feed(b"a1 LOGIN {0}\r\n")
    ev = f.next_event()
    assert ev == seg(b"a1 LOGIN {0}\r\n", True, 0)
    assert not f.at_boundary  # the command goes on, even though no literal byte follows
    assert not f.in_literal
    assert f.next_event() is NEED_DATA
    f.feed(b" {0+}\r\n\r\n")
    assert drain(f) == [seg(b" {0+}\r\n", False, 0, True), seg(b"\r\n", False)]
    assert f.at_boundary


def test_literal_content_is_not_reparsed():
    payload = b"x\r\n{5}\r\na2 NOOP\r\n}\r\n{-1}\r\n"
    stream = b"a1 APPEND INBOX {%d}\r\n" % len(payload) + payload + b"\r\na3 NOOP\r\n"
    f = Framer()
    evs = feed_all(f, stream)
    assert evs == [
        seg(b"a1 APPEND INBOX {%d}\r\n" % len(payload), True, len(payload)),
        LiteralData(payload, True),
        seg(b"\r\n", False),
        seg(b"a3 NOOP\r\n", True),
    ]
    # Byte by byte: same segmentation.
    f = Framer()
    evs = []
    for i in range(len(stream)):
        f.feed(stream[i:i + 1])
        evs += drain(f)
    assert coalesce(evs) == coalesce(feed_all(Framer(), stream))
    assert all(len(ev.data) == 1 for ev in evs if isinstance(ev, LiteralData))
    assert [ev.last for ev in evs if isinstance(ev, LiteralData)].count(True) == 1


def test_multiappend():
    stream = (b"a1 APPEND INBOX (\\Seen) {3}\r\nabc (\\Draft) ~{4+}\r\n\x00\r\n\xff INBOX {2}\r\nxy\r\n"
              b"a2 NOOP\r\n")
    f = Framer()
    evs = feed_all(f, stream)
    assert evs == [
        seg(b"a1 APPEND INBOX (\\Seen) {3}\r\n", True, 3),
        LiteralData(b"abc", True),
        seg(b" (\\Draft) ~{4+}\r\n", False, 4, True, True),
        LiteralData(b"\x00\r\n\xff", True),
        seg(b" INBOX {2}\r\n", False, 2),
        LiteralData(b"xy", True),
        seg(b"\r\n", False),
        seg(b"a2 NOOP\r\n", True),
    ]
    assert emitted_bytes(evs) == stream


def test_response_with_literal_mid_line():
    stream = b"* 1 FETCH (BODY[] {5}\r\nhello FLAGS (\\Seen))\r\n* 2 FETCH (FLAGS ())\r\n"
    f = Framer()
    assert feed_all(f, stream) == [
        seg(b"* 1 FETCH (BODY[] {5}\r\n", True, 5),
        LiteralData(b"hello", True),
        seg(b" FLAGS (\\Seen))\r\n", False),
        seg(b"* 2 FETCH (FLAGS ())\r\n", True),
    ]


@pytest.mark.parametrize(
    "line",
    [
        b"* OK [ALERT] }\r\n",
        b"a NOOP {}x\r\n",
        b"a SEARCH SUBJECT \"x}\"\r\n",
        b"a NOOP }}\r\n",
        b"a NOOP {5}}\r\n",
        b"a NOOP {5} \r\n",
        b"a NOOP {5}x\r\n",
        b"}\n",
    ],
)
def test_brace_endings_that_are_not_literals(line):
    f = Framer()
    assert feed_all(f, line + b"a2 NOOP\r\n") == [seg(line, True), seg(b"a2 NOOP\r\n", True)]
    assert f.at_boundary


# -- invalid literal announcements -------------------------------------------------------------


@pytest.mark.parametrize(
    "announce",
    [b"{-5}", b"{abc}", b"{}", b"{ 5}", b"{5 }", b"{+5}", b"{5++}", b"~{x}", b"{123456789012345678901}"],
)
def test_invalid_literal_on_first_segment_is_not_fatal(announce):
    f = Framer()
    line = b"a1 APPEND INBOX " + announce + b"\r\n"
    f.feed(line + b"a2 NOOP\r\n")
    with pytest.raises(FramingError) as ei:
        f.next_event()
    e = ei.value
    assert (e.code, e.fatal, e.first, e.data) == ("CLIENTBUG", False, True, line)
    assert f.at_boundary
    # The framer goes on with the next command.
    assert drain(f) == [seg(b"a2 NOOP\r\n", True)]


def test_invalid_literal_on_non_first_segment_is_fatal():
    f = Framer()
    f.feed(b"a1 APPEND INBOX {1}\r\nx {abc}\r\n")
    assert f.next_event() == seg(b"a1 APPEND INBOX {1}\r\n", True, 1)
    assert f.next_event() == LiteralData(b"x", True)
    with pytest.raises(FramingError) as ei:
        f.next_event()
    e = ei.value
    assert (e.code, e.fatal, e.first, e.data) == ("CLIENTBUG", True, False, b" {abc}\r\n")


# -- too-large literals ------------------------------------------------------------------------


def test_too_large_sync_literal_refused_then_next_command():
    f = Framer(max_literal=10)
    head = b"a1 APPEND INBOX {11}\r\n"
    f.feed(head)
    with pytest.raises(FramingError) as ei:
        f.next_event()
    e = ei.value
    assert (e.code, e.fatal, e.first, e.data, e.size) == ("TOOBIG", False, True, head, 11)
    f.refuse_literal()
    assert f.at_boundary
    assert not f.in_literal
    # The client does not send the literal; the next command parses from its start.
    assert feed_all(f, b"a2 APPEND INBOX {10}\r\n0123456789\r\na3 NOOP\r\n") == [
        seg(b"a2 APPEND INBOX {10}\r\n", True, 10),
        LiteralData(b"0123456789", True),
        seg(b"\r\n", False),
        seg(b"a3 NOOP\r\n", True),
    ]


def test_too_large_sync_literal_with_next_command_already_buffered():
    f = Framer(max_literal=3)
    f.feed(b"a1 LOGIN {4}\r\na2 NOOP\r\n")
    with pytest.raises(FramingError) as ei:
        f.next_event()
    assert not ei.value.fatal
    f.refuse_literal()
    assert drain(f) == [seg(b"a2 NOOP\r\n", True)]


@pytest.mark.parametrize("announce", [b"{11+}", b"{11-}", b"~{11+}"])
def test_too_large_non_sync_literal_is_fatal(announce):
    f = Framer(max_literal=10)
    f.feed(b"a1 APPEND INBOX " + announce + b"\r\n")
    with pytest.raises(FramingError) as ei:
        f.next_event()
    e = ei.value
    assert (e.code, e.fatal, e.first, e.size) == ("TOOBIG", True, True, 11)


def test_too_large_sync_literal_on_non_first_segment_is_fatal():
    """Earlier segments are already relayed: the command cannot be refused cleanly any more."""
    f = Framer(max_literal=10)
    f.feed(b"a1 APPEND INBOX {1}\r\nx {11}\r\n")
    assert f.next_event() == seg(b"a1 APPEND INBOX {1}\r\n", True, 1)
    assert f.next_event() == LiteralData(b"x", True)
    with pytest.raises(FramingError) as ei:
        f.next_event()
    e = ei.value
    assert (e.code, e.fatal, e.first, e.data, e.size) == ("TOOBIG", True, False, b" {11}\r\n", 11)


def test_literal_at_max_literal_is_accepted():
    f = Framer(max_literal=10)
    evs = feed_all(f, b"a1 X {10+}\r\n0123456789\r\n")
    assert evs[0] == seg(b"a1 X {10+}\r\n", True, 10, True)


def test_absurd_literal_size_without_max_literal():
    f = Framer(max_literal=None)
    head = b"a1 APPEND INBOX {99999999999999999999}\r\n"  # 20 digits, > 2**63 - 1
    f.feed(head + b"a2 NOOP\r\n")
    with pytest.raises(FramingError) as ei:
        f.next_event()
    assert (ei.value.code, ei.value.fatal, ei.value.size) == ("TOOBIG", False, 99999999999999999999)
    f.refuse_literal()
    assert drain(f) == [seg(b"a2 NOOP\r\n", True)]


def test_refuse_literal_after_accepted_sync_literal():
    """The I/O layer may refuse an acceptable literal (e.g. a plugin says NO): the command ends."""
    f = Framer()
    f.feed(b"a1 APPEND INBOX {5}\r\n")
    assert f.next_event() == seg(b"a1 APPEND INBOX {5}\r\n", True, 5)
    assert not f.at_boundary and f.in_literal
    f.refuse_literal()
    assert f.at_boundary and not f.in_literal
    assert feed_all(f, b"a2 NOOP\r\n") == [seg(b"a2 NOOP\r\n", True)]


# -- over-long lines ---------------------------------------------------------------------------


def test_line_too_long_without_lf_is_fatal_once_over_max_line():
    f = Framer(max_line=10)
    f.feed(b"a1 NOOP ")
    assert f.next_event() is NEED_DATA
    f.feed(b"xx")  # 10 bytes buffered: still allowed to end with LF... in principle
    assert f.next_event() is NEED_DATA
    assert f.buffered == 10
    f.feed(b"x")  # 11 bytes, no LF
    with pytest.raises(FramingError) as ei:
        f.next_event()
    e = ei.value
    assert (e.code, e.fatal, e.first) == ("TOOBIG", True, True)
    assert f.buffered == 0  # the garbage is dropped


def test_line_too_long_with_lf_is_fatal():
    f = Framer(max_line=10)
    f.feed(b"a1 NOOP xxxx\r\na2 NOOP\r\n")
    with pytest.raises(FramingError) as ei:
        f.next_event()
    assert (ei.value.code, ei.value.fatal, ei.value.first) == ("TOOBIG", True, True)


def test_line_too_long_on_non_first_segment():
    f = Framer(max_line=12)
    f.feed(b"a1 X {1}\r\nx" + b"y" * 20)
    assert f.next_event() == seg(b"a1 X {1}\r\n", True, 1)
    assert f.next_event() == LiteralData(b"x", True)
    with pytest.raises(FramingError) as ei:
        f.next_event()
    assert (ei.value.fatal, ei.value.first) == (True, False)


def test_line_of_exactly_max_line_is_accepted():
    assert feed_all(Framer(max_line=10), b"a1 NOOPx\r\n") == [seg(b"a1 NOOPx\r\n", True)]
    assert feed_all(Framer(max_line=10), b"a1 NOOPxx\n") == [seg(b"a1 NOOPxx\n", True)]
    f = Framer(max_line=10)
    f.feed(b"a1 NOOPx\r")
    assert f.next_event() is NEED_DATA
    assert feed_all(f, b"\n") == [seg(b"a1 NOOPx\r\n", True)]
    f = Framer(max_line=10)
    f.feed(b"a1 NOOPxx\r\n")  # 11 bytes
    with pytest.raises(FramingError):
        f.next_event()


def test_literal_is_not_limited_by_max_line():
    f = Framer(max_line=16)
    payload = b"z" * 1000
    evs = feed_all(f, b"a1 X {1000}\r\n" + payload + b"\r\n")
    assert emitted_bytes(evs) == b"a1 X {1000}\r\n" + payload + b"\r\n"


# -- state: at_boundary / in_literal / buffered -------------------------------------------------


def test_at_boundary_transitions():
    f = Framer()
    states = [f.at_boundary]
    f.feed(b"a1 APPEND INBOX {3}\r\nab")
    for ev in f.events():
        states.append((type(ev).__name__, f.at_boundary, f.in_literal))
    assert states == [True, ("Segment", False, True), ("LiteralData", False, True)]
    f.feed(b"c")
    assert f.next_event() == LiteralData(b"c", True)
    assert (f.at_boundary, f.in_literal) == (False, False)
    f.feed(b" {0}\r\n")
    assert f.next_event() == seg(b" {0}\r\n", False, 0)
    assert (f.at_boundary, f.in_literal) == (False, False)
    f.feed(b")")
    assert f.next_event() is NEED_DATA
    assert not f.at_boundary  # still inside the command
    f.feed(b"\r\n")
    assert f.next_event() == seg(b")\r\n", False)
    assert f.at_boundary


def test_buffered_counts_unconsumed_bytes():
    f = Framer()
    assert f.buffered == 0
    f.feed(b"a1 X {4}\r\nab")
    assert f.buffered == 12
    f.next_event()
    assert f.buffered == 2
    assert f.next_event() == LiteralData(b"ab", False)
    assert f.buffered == 0
    f.feed(b"cd\r\na2")
    assert f.buffered == 6
    assert f.next_event() == LiteralData(b"cd", True)
    assert f.buffered == 4
    assert f.next_event() == seg(b"\r\n", False)
    assert f.buffered == 2
    assert f.next_event() is NEED_DATA
    assert f.buffered == 2


# -- property tests: well-formed streams -------------------------------------------------------


@dataclass
class Lit:
    size_form: bytes  # "", "+", "-"
    binary: bool
    payload: bytes


_TEXT = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))
_PAYLOAD_PIECES = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"\r\n", b"\n", b"{5}\r\n", b"~{3+}\r\n", b"}\r\n", b"a2 NOOP\r\n", b"\x00", b"\xff"]),
)
_PAYLOAD = st.one_of(
    st.just(b""),
    st.lists(_PAYLOAD_PIECES, max_size=6).map(b"".join),
    st.integers(0, 3000).map(lambda n: bytes(range(256)) * (n // 256) + bytes(range(n % 256))),
)
_LIT = st.builds(Lit, st.sampled_from([b"", b"+", b"-"]), st.booleans(), _PAYLOAD)
_EOL = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def commands(draw):
    """A command/response: text segments alternating with literals, ending with a text segment."""
    n_lits = draw(st.integers(0, 3))
    parts = []
    for _ in range(n_lits):
        text = draw(_TEXT)
        if text.endswith(b"~"):
            text += b" "  # would turn the announcement into ~{n}
        parts.append((text, draw(_EOL), draw(_LIT)))
    last = draw(_TEXT)
    if last.endswith(b"}"):
        last += b")"  # would look like a (possibly invalid) literal announcement
    parts.append((last, draw(_EOL), None))
    return parts


def serialize(cmds) -> tuple[bytes, list]:
    """The byte stream and the expected (coalesced) event model."""
    out = []
    model: list = []
    for cmd in cmds:
        first = True
        for text, eol, lit in cmd:
            if lit is None:
                line = text + eol
                out.append(line)
                model.append(("seg", line, first, None, False, False))
            else:
                size = len(lit.payload)
                line = text + (b"~" if lit.binary else b"") + b"{%d%s}" % (size, lit.size_form) + eol
                out.append(line)
                out.append(lit.payload)
                model.append(("seg", line, first, size, bool(lit.size_form), lit.binary))
                if size:
                    model.append(("lit", lit.payload, True))
            first = False
    return b"".join(out), model


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks = []
    i = 0
    k = 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        chunks.append(data[i:i + n])
        i += n
        k += 1
    return chunks


_CHUNKING = st.one_of(
    st.just([1]),
    st.lists(st.integers(1, 8), min_size=1, max_size=10),
    st.lists(st.integers(1, 4096), min_size=1, max_size=10),
)


def run_chunked(framer: Framer, chunks: list[bytes], pulls: list[int] | None = None) -> list:
    """Feed chunks; after each, pull at most ``pulls[i]`` events (None: all); drain at the end.

    Checks the per-event invariants on the way.
    """
    events: list = []

    def pull(limit: int | None) -> None:
        n = 0
        while limit is None or n < limit:
            ev = framer.next_event()
            if ev is NEED_DATA:
                return
            n += 1
            if isinstance(ev, LiteralData):
                assert ev.data, "empty literal chunk"
                assert framer.at_boundary is False
                assert framer.in_literal is not ev.last
            else:
                assert framer.at_boundary is ev.last
                assert framer.in_literal is bool(ev.literal)
            events.append(ev)

    for i, chunk in enumerate(chunks):
        framer.feed(chunk)
        pull(None if pulls is None else pulls[i % len(pulls)])
    pull(None)
    return events


@FAST
@given(st.lists(commands(), max_size=6), _CHUNKING)
def test_property_relay_is_byte_exact_and_matches_model(cmds, sizes):
    stream, model = serialize(cmds)
    framer = Framer(max_line=1 << 20, max_literal=None)
    events = run_chunked(framer, split(stream, sizes))
    # (a) byte-exact relay
    assert emitted_bytes(events) == stream
    assert framer.buffered == 0
    assert framer.at_boundary
    # (b) segmentation matches the model (literal chunks merged)
    assert coalesce(events) == model
    # (c) literal chunks: sizes sum to the literal size, `last` exactly once, on the final chunk
    expected_sizes = [m[3] for m in model if m[0] == "seg" and m[3]]
    runs: list[list[LiteralData]] = []
    prev_lit = False
    for ev in events:
        if isinstance(ev, LiteralData):
            if not prev_lit:
                runs.append([])
            runs[-1].append(ev)
        prev_lit = isinstance(ev, LiteralData)
    assert [sum(len(c.data) for c in run) for run in runs] == expected_sizes
    for run in runs:
        assert [c.last for c in run] == [False] * (len(run) - 1) + [True]


@FAST
@given(st.lists(commands(), max_size=5), _CHUNKING, st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_property_partial_pulls_between_feeds(cmds, sizes, pulls):
    """Feeding while earlier events are still pending (the framer's buffer compaction) changes nothing."""
    stream, model = serialize(cmds)
    framer = Framer(max_line=1 << 20)
    events = run_chunked(framer, split(stream, sizes), pulls)
    assert emitted_bytes(events) == stream
    assert coalesce(events) == model


@FAST
@given(st.lists(commands(), min_size=1, max_size=4), _CHUNKING, st.data())
def test_property_refused_literal_then_stream_resumes(cmds, sizes, data):
    """A too-large sync literal on a first segment is refused; what follows frames as usual."""
    stream, model = serialize(cmds)
    tag = data.draw(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").rstrip(b"~")))
    bad = tag + b" APPEND INBOX {%d}\r\n" % data.draw(st.integers(4001, 10**12))
    where = data.draw(st.integers(0, len(cmds)))
    before, _ = serialize(cmds[:where])
    after, _ = serialize(cmds[where:])
    framer = Framer(max_line=1 << 20, max_literal=4000)  # above any literal `commands()` makes
    events: list = []
    errors: list[FramingError] = []
    for chunk in split(before + bad + after, sizes):
        framer.feed(chunk)
        while True:
            try:
                ev = framer.next_event()
            except FramingError as e:
                errors.append(e)
                framer.refuse_literal()
                continue
            if ev is NEED_DATA:
                break
            events.append(ev)
    assert len(errors) == 1
    e = errors[0]
    assert (e.code, e.fatal, e.first, e.data) == ("TOOBIG", False, True, bad)
    assert emitted_bytes(events) == before + after
    assert coalesce(events) == model


# -- property tests: garbage -------------------------------------------------------------------

_GARBAGE = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"\r\n", b"\n", b"{", b"}", b"~", b"+", b"-", b"{3}\r\n", b"{-5}\r\n", b"{abc}\n",
                         b"{200}\r\n", b"{2+}\r\n", b"~{1}\n", b"{99999999999999999999}\r\n", b"{}\r\n"]),
    ),
    max_size=40,
).map(b"".join)


def run_garbage(stream: bytes, sizes: list[int], max_line: int, max_literal: int | None) -> tuple[list, bytes]:
    """Feed garbage; collect events and errors until the first fatal one. Returns (events, bytes fed)."""
    framer = Framer(max_line=max_line, max_literal=max_literal)
    out: list = []
    fed = b""
    for chunk in split(stream, sizes):
        framer.feed(chunk)
        fed += chunk
        while True:
            try:
                ev = framer.next_event()
            except FramingError as e:
                assert e.code in ("TOOBIG", "CLIENTBUG")
                out.append(e)
                if e.fatal:
                    return out, fed
                assert e.first  # non-fatal errors only ever concern a whole (first) segment
                assert framer.at_boundary
                framer.refuse_literal()
                continue
            if ev is NEED_DATA:
                break
            assert isinstance(ev, (Segment, LiteralData))
            out.append(ev)
    # Nothing fatal: every byte is either relayed, discarded with a non-fatal error, or still buffered.
    accounted = b"".join(ev.data for ev in out)  # a non-fatal error carries the discarded segment
    assert accounted + fed[len(fed) - framer.buffered:] == fed
    return out, fed


@settings(max_examples=300, deadline=None)
@given(_GARBAGE | st.binary(max_size=300), _CHUNKING, st.sampled_from([8, 30, 1000]),
       st.sampled_from([None, 0, 5, 100]))
def test_property_garbage_only_events_or_framing_errors(stream, sizes, max_line, max_literal):
    events, _ = run_garbage(stream, sizes, max_line, max_literal)
    # The outcome does not depend on how the bytes were chunked (up to literal chunk boundaries).
    whole, _ = run_garbage(stream, [max(1, len(stream))], max_line, max_literal)
    assert coalesce(events) == coalesce(whole)


@FAST
@given(st.lists(st.tuples(_GARBAGE, st.booleans()), max_size=6), _CHUNKING)
def test_property_framer_recovers_after_non_fatal_errors(items, sizes):
    """Interleave well-formed commands with invalid/refused announcements on first segments."""
    stream = b""
    expected: list = []
    for i, (junk, invalid) in enumerate(items):
        tag = b"t%d" % i
        if invalid:
            bad = tag + b" APPEND INBOX {" + junk.replace(b"\n", b"").replace(b"\r", b"").replace(b"{", b"").replace(b"}", b"")[:20]
            bad += b"x}\r\n"
            expected.append(("err", "CLIENTBUG", False, True, bad, None))
        else:
            bad = tag + b" APPEND INBOX {%d}\r\n" % (50 + len(junk))
            expected.append(("err", "TOOBIG", False, True, bad, 50 + len(junk)))
        good = tag + b"b APPEND INBOX {%d}\r\n" % min(len(junk), 49) + junk[:49] + b")\r\n"
        stream += bad + good
        good_expected = [("seg", tag + b"b APPEND INBOX {%d}\r\n" % min(len(junk), 49), True,
                          min(len(junk), 49), False, False)]
        if junk[:49]:
            good_expected.append(("lit", junk[:49], True))
        good_expected.append(("seg", b")\r\n", False, None, False, False))
        expected += good_expected
    framer = Framer(max_line=4096, max_literal=49)
    out: list = []
    for chunk in split(stream, sizes):
        framer.feed(chunk)
        while True:
            try:
                ev = framer.next_event()
            except FramingError as e:
                assert not e.fatal
                out.append(e)
                framer.refuse_literal()
                continue
            if ev is NEED_DATA:
                break
            out.append(ev)
    assert coalesce(out) == expected
    assert framer.at_boundary and framer.buffered == 0


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [0, 7])
def test_big_literal_is_streamed_not_accumulated(skew):
    chunk_size = 64 * 1024
    n_chunks = 800  # 50 MiB
    size = chunk_size * n_chunks
    block = bytes(range(256)) * (chunk_size // 256)
    head = b"a1 APPEND INBOX ~{%d+}\r\n" % size
    framer = Framer(max_line=8192, max_literal=None)

    got = 0
    lasts = 0
    max_chunk = 0
    n_events = 0
    framer.feed(head + block[:chunk_size - skew])
    pieces = [block[chunk_size - skew:] + block[:chunk_size - skew]] * (n_chunks - 1)
    pieces.append(block[chunk_size - skew:] + b"\r\na2 NOOP\r\n")
    evs = drain(framer)
    assert evs[0] == seg(head, True, size, True, True)
    for ev in evs[1:]:
        got += len(ev.data)
    for piece in pieces:
        assert framer.buffered == 0
        assert len(framer._buf) <= chunk_size + len(head)  # no accumulation in the internal buffer
        framer.feed(piece)
        evs = drain(framer)
        n_events += len(evs)
        assert evs, "each fed chunk yields literal data right away"
        for ev in evs:
            if isinstance(ev, LiteralData):
                got += len(ev.data)
                lasts += ev.last
                max_chunk = max(max_chunk, len(ev.data))
        assert framer.buffered == 0
        assert len(framer._buf) <= chunk_size + 16
    assert got == size
    assert lasts == 1
    assert max_chunk <= chunk_size
    assert isinstance(evs[-1], Segment) and evs[-1].data == b"a2 NOOP\r\n"
    assert framer.at_boundary


def test_server_status_text_ending_like_a_literal_is_text():
    """A server's human-readable text may end in "{5}": status responses and "+" carry no literals."""
    f = Framer(responses=True)
    f.feed(b"a1 NO Mailbox does not exist: {5}\r\n* OK [ALERT] hello {user}\r\n+ send {3}\r\n"
           b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n")
    events = list(f.events())
    assert [e.data for e in events[:3]] == [b"a1 NO Mailbox does not exist: {5}\r\n",
                                            b"* OK [ALERT] hello {user}\r\n", b"+ send {3}\r\n"]
    assert all(e.literal is None for e in events[:3])
    assert events[3].literal == 5 and events[4].data == b"hello"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.binary(min_size=0, max_size=60).map(lambda b: b"* " + b.replace(b"\n", b"").replace(b"\r", b"") + b"\r\n"),
    st.integers(0, 300).map(lambda n: b"* 1 FETCH (BODY[] {%d}\r\n" % n + b"x" * n + b")\r\n"),
    st.just(b"a1 OK done\r\n"),
), max_size=60), st.integers(1, 5000))
def test_blocks_mode_is_byte_exact_and_never_hides_a_literal(items, chunk):
    from cpmproxy.imap.framing import Block, lines_of

    stream = b"".join(items)
    f = Framer(max_line=1 << 20, responses=True, blocks=True)
    out = []
    for i in range(0, len(stream), chunk):
        f.feed(stream[i:i + chunk])
        for ev in f.events():
            if isinstance(ev, Block):
                assert ev.data.endswith(b"\n")
                for line in lines_of(ev.data):
                    assert re.search(rb"\{[0-9]+\}\r?\n\Z", line) is None  # no literal inside a block
            out.append(ev.data)
    assert b"".join(out) == stream


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.integers(0, 300).map(lambda n: b"* 1 FETCH (BODY[] {%d}\r\n" % n + (b"x}\r\n" * n)[:n] + b")\r\n"),
    st.integers(0, 50).map(lambda n: b"* 2 FETCH (BODY[1] {%d}\r\n%s BODY[2] {0}\r\n FLAGS ())\r\n" % (n, b"y" * n)),
    st.just(b"* 3 FETCH (FLAGS (\\Seen))\r\n"),
    st.just(b"* OK [ALERT] text {5}\r\n"),
    st.just(b"* LIST () \"/\" {3}\r\nabc\r\n"),
    st.just(b"a1 OK done\r\n"),
    st.just(b"+ go\r\n"),
), max_size=40), st.integers(1, 3000))
def test_runs_are_whole_untagged_responses_and_byte_exact(items, chunk):
    """Runs (blocks mode, responses with literals) cover whole untagged responses only; framed again they
    give the segments a plain framer gives, and their text is those segments without the literals."""
    from cpmproxy.imap.framing import Block, Run, lines_of, run_events

    stream = b"".join(items)
    plain = Framer(max_line=1 << 20, responses=True)
    plain.feed(stream)
    want = [(ev.data, ev.first, ev.literal) for ev in plain.events() if isinstance(ev, Segment)]
    f = Framer(max_line=1 << 20, responses=True, blocks=True)
    out, got = [], []
    for i in range(0, len(stream), chunk):
        f.feed(stream[i:i + chunk])
        for ev in f.events():
            if isinstance(ev, Run):
                assert f.at_boundary
                evs = run_events(ev)
                segs = [e for e in evs if isinstance(e, Segment)]
                assert segs[0].first and segs[0].data.startswith(b"* ") and segs[-1].literal is None
                assert b"".join(e.data for e in evs) == bytes(ev.data)
                assert b"".join(e.data for e in segs) == ev.text
                got += [(e.data, e.first, e.literal) for e in segs]
            elif isinstance(ev, Block):
                got += [(line, True, None) for line in lines_of(ev.data)]
            elif isinstance(ev, Segment):
                got.append((ev.data, ev.first, ev.literal))
            out.append(bytes(ev.data))
    assert b"".join(out) == stream
    assert got == want


def test_server_line_ending_in_a_bad_marker_is_text():
    """Found by the blocks property test: ``* {}`` from a server is text, in both framing paths."""
    for blocks in (False, True):
        f = Framer(responses=True, blocks=blocks)
        f.feed(b"* {}\r\n* 1 FETCH (X {x})\r\n")
        assert b"".join(e.data for e in f.events()) == b"* {}\r\n* 1 FETCH (X {x})\r\n"
    client = Framer()
    client.feed(b"a APPEND x {}\r\n")
    with pytest.raises(FramingError):
        list(client.events())


_FETCH_LINES = st.one_of(
    st.sampled_from([b"FLAGS (\\Seen)", b"FLAGS (\\Recent $NotJunk)", b"UID 7 FLAGS (XFOO)", b"MODSEQ (12)",
                     b'ENVELOPE (NIL "EXISTS and RECENT" NIL)', b"FLAGS ()"]).flatmap(
        lambda body: st.integers(1, 99999).map(lambda n: b"* %d FETCH (%s)\r\n" % (n, body))),
)
_OTHER_LINES = st.sampled_from([
    b"* 3 EXISTS\r\n", b"* 2 EXPUNGE\r\n", b"* 1 RECENT\r\n", b"* FLAGS (\\Seen XFOO)\r\n",
    b'* LIST () "/" INBOX\r\n', b"* STATUS INBOX (MESSAGES 3)\r\n", b"* BYE going\r\n",
    b"* OK [PERMANENTFLAGS (\\*)] ok\r\n", b"* ESEARCH (TAG \"a\") ALL 1\r\n", b"* VANISHED 4\r\n",
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_FETCH_LINES, _FETCH_LINES, _FETCH_LINES, _OTHER_LINES), min_size=1, max_size=30))
def test_only_fetch_responses_matches_a_line_by_line_check(lines):
    """The few-scans test of a block against the obvious per-line one, FETCH data carrying the very
    letters (X, N) and words (EXISTS, RECENT) its shortcuts look for."""
    from cpmproxy.imap.framing import only_fetch_responses

    block = b"".join(lines)
    want = all(re.match(rb"\* [0-9]+ FETCH ", line) for line in lines)
    assert only_fetch_responses(block) == want
    if all(re.match(rb"\* [0-9]", line) for line in lines):  # what a caller that cut the block so may say
        assert only_fetch_responses(block, numbered=True) == want


_RUN_LINES = st.one_of(
    st.sampled_from([b"* 1 FETCH (FLAGS ())\r\n", b"* 22 EXISTS\r\n", b"* 0 RECENT\r\n", b"* 9 FETCH (UID 9)\n"]),
    st.sampled_from([b"* 3 expunge\r\n", b"* 3 Exists\r\n", b"* 12345678901234567 fetch (x)\r\n", b"* 3x exists\r\n",
                     b"* 3 EXPUNGe\n", b"* 3 CAPABILITYANDMORE x\r\n", b"* 3 CAPABILITYANDMOREb\r\n", b"* bye\r\n"]),
    st.sampled_from([b"* OK done\r\n", b"a1 OK done\r\n", b"+ go\r\n", b"\r\n", b"*\r\n", b"* \r\n", b"*  1\r\n",
                     b"* x1\r\n", b"** 1\r\n", b"*x1\r\n", b"*11\r\n", b"* /\r\n", b"* :\r\n"]),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"") + b"\n"),
)


def _numbered_run_end_model(data: bytes) -> int:
    """Line by line: the offset of the first line after the first not starting with '* <digit>', or of
    the first numbered line whose name has a lower-case letter, the first line too."""
    if re.match(rb"\* [0-9]", data) and _lower_case_name_model(data.split(b"\n")[0]):
        return 0
    offset = data.find(b"\n") + 1 if b"\n" in data else len(data)
    while offset < len(data):
        line = data[offset:].split(b"\n")[0]
        if not re.match(rb"\* [0-9]", line) or _lower_case_name_model(line):
            return offset
        nl = data.find(b"\n", offset)
        offset = len(data) if nl < 0 else nl + 1
    return len(data)


@settings(max_examples=400, deadline=None)
@given(st.lists(_RUN_LINES, max_size=20), st.binary(max_size=4) | st.sampled_from([b"* 3 ex", b"* 3 EX"]))
def test_numbered_run_end_c_and_python_match_a_line_model(lines, tail):
    """The C speedup and the Python reference against a per-line model, with lines that almost start
    with a number ("* x", "*  1", "*x1", digits' neighbours "/" and ":"), names not in upper case (long
    numbers and names: past the 16 bytes the C scan looks at at once) and a trailing partial line."""
    from cpmproxy.imap import framing

    data = b"".join(lines) + tail
    want = _numbered_run_end_model(data)
    assert framing.numbered_run_end_py(data) == want
    assert framing.numbered_run_end(data) == want
    assert framing.numbered_run_end(memoryview(data)) == want


_FETCH_RUN_LINES = st.one_of(
    st.builds(lambda n, zeros, rest, eol: b"* " + b"0" * zeros + b"%d FETCH " % n + rest + eol,
              st.integers(0, 30) | st.integers(2**62, 2**70), st.integers(0, 2) | st.just(25),
              st.sampled_from([b"(FLAGS ())", b"", b"(UID 4 FLAGS (\\Seen))", b"* 3 FETCH x"]),
              st.sampled_from([b"\r\n", b"\n"])),
    st.sampled_from([b"* 3 EXISTS\r\n", b"* OK [ALERT] 3 FETCH \r\n", b"a1 OK done\r\n", b"* 3 FETCH\r\n",
                     b"* 3  FETCH x\r\n", b"*  3 FETCH x\r\n", b"* 3 fetch x\r\n", b"* FETCH x\r\n", b"\r\n"]),
)


def _renumber_model(block: bytes, numbers: list[int]) -> bytes | None:
    """Line by line: each line "* <n> FETCH <rest>" becomes "* <numbers[n]> FETCH <rest>", or goes."""
    if block and not block.endswith(b"\n"):
        return None
    out = []
    for line in re.findall(rb"[^\n]*\n", block):  # (LF alone ends a line, as for the relay)
        m = re.match(rb"\* ([0-9]+) FETCH (.*)\Z", line, re.S)
        if m is None:
            return None
        n = int(m.group(1))
        client = numbers[n] if n < len(numbers) else 0
        if client:
            out.append(b"* %d FETCH " % client + m.group(2))
    return b"".join(out)


@settings(max_examples=400, deadline=None)
@given(st.lists(_FETCH_RUN_LINES, max_size=20), st.lists(st.integers(0, 10**6), max_size=40), st.binary(max_size=3))
def test_renumber_fetch_lines_c_and_python_match_a_line_model(lines, numbers, tail):
    """A filtered view's bulk FETCH: the C speedup and the Python reference against a per-line model,
    with numbers beyond the table (dropped), leading zeros, numbers of more digits than any mailbox has,
    lines that are almost FETCHes, and a trailing partial line (refused: the block is not whole lines)."""
    from cpmproxy.imap import framing

    block = b"".join(lines) + tail
    want = _renumber_model(block, numbers)
    assert framing.renumber_fetch_lines_py(block, numbers) == want
    assert framing.renumber_fetch_lines(block, numbers) == want


_NAME_LINES = st.one_of(
    st.builds(lambda number, name, eol: b"* " + number + name + eol,
              st.sampled_from([b"", b"3 ", b"0017 ", b"3", b"3  ", b" ", b"x ", b"12345678901234 ", b"123456789012345 ",
                               b"1234567890123456 ", b"12345678901234567"]),
              st.sampled_from([b"FETCH (FLAGS (\\Seen))", b"EXPUNGE", b"expunge", b"Expunge", b"EXPUNGe", b"bye x",
                               b"OK [ALERT] lower case", b"X-y", b"ID", b"9abc", b"", b"\xe9t\xe9", b"[a]", b"{5}",
                               b"CAPABILITYANDMORE", b"CAPABILITYANDMORe", b"FETCHFETCHFETCh", b"FETCHFETCHFETCHf"]),
              st.sampled_from([b"\r\n", b"\n", b""])),
    st.sampled_from([b"a1 ok done\r\n", b"+ go on\r\n", b"\r\n", b"** bye\r\n", b"*bye\r\n", b" * bye\r\n"]),
    st.binary(max_size=12),
)


def _lower_case_name_model(data: bytes) -> bool:
    """Line by line: an untagged line ("* ", "* <digits> ") whose name's letters (up to the first byte
    that is none) include a lower-case one."""
    for line in data.split(b"\n"):
        if not line.startswith(b"* "):
            continue
        rest = line[2:]
        digits = re.match(rb"[0-9]*", rest).group()
        if digits:
            if rest[len(digits):len(digits) + 1] != b" ":
                continue
            rest = rest[len(digits) + 1:]
        name = re.match(rb"[A-Za-z]*", rest).group()
        if name != name.upper():
            return True
    return False


@settings(max_examples=600, deadline=None)
@given(st.lists(_NAME_LINES, max_size=20))
def test_lower_case_name_c_and_python_match_a_line_model(lines):
    """Whether a block names a response in other than upper case (the relay then takes it line by line):
    the C speedup and the Python reference against a per-line model, with numbers not followed by a
    space, names that end at a non-letter, 8-bit bytes, lines that almost start "* ", no line end."""
    from cpmproxy.imap import framing

    data = b"".join(lines)
    want = _lower_case_name_model(data)
    assert framing.lower_case_name_py(data) is want
    assert framing.lower_case_name(data) is want
    assert framing.lower_case_name(memoryview(data)) is want


def test_lower_case_name_c_and_python_agree_on_every_window():
    """The C scan reads the 16 bytes after "* " at once where the data goes on that far, byte by byte
    where not: each line below at every distance from the end of the data, and at every length of
    number and name around those 16 bytes, both ways agree with the model (and numbered_run_end too)."""
    from cpmproxy.imap import framing

    names = [b"FETCH", b"fetch", b"FETCh", b"FETCHFETCHFETCHF", b"FETCHFETCHFETCHf", b"FETCHFETCHFETCHFE",
             b"FETCHFETCHFETCHFe", b"E", b"e", b"", b"{x}", b"~", b"\xe9"]
    for digits in [b"", b"7", b"1234567890123", b"12345678901234", b"123456789012345", b"1234567890123456"]:
        for name in names:
            for after in [b"", b" ", b" (FLAGS (\\Seen))", b"(", b" x y"]:
                line = b"* " + digits + (b" " if digits else b"") + name + after
                for tail in range(0, 20):
                    data = line + b"\r\n"[:tail] + b"X" * max(0, tail - 2)
                    want = _lower_case_name_model(data)
                    assert framing.lower_case_name_py(data) is want, data
                    assert framing.lower_case_name(data) is want, data
                    run = b"* 1 FETCH ()\r\n" + data
                    assert framing.numbered_run_end_py(run) == framing.numbered_run_end(run), run
                    assert framing.numbered_run_end(data) == framing.numbered_run_end_py(data), data


@pytest.mark.parametrize("data,found", [
    (b"* 3 FETCH (FLAGS (\\Seen))\r\n" * 40 + b"* 3 expunge\r\n" + b"* 4 FETCH (UID 9)\r\n" * 40, True),
    (b"* 3 FETCH (FLAGS (\\Seen))\r\n" * 40 + b"* 4 EXISTS\r\n", False),
    (b"* 4 eXISTS\r\n* 1 FETCH (x)\r\n", True),  # (the first line too)
    (b"* OK [ALERT] nothing here\r\n* 1 FETCH (BODY[] {5}\r\n", False),
    (b"* OK x\r\n* bye\r\n", True),
    (b"* OK x\r\n* Esearch (TAG \"a\")\r\n", True),
    (b"", False),
])
def test_lower_case_name_examples(data, found):
    from cpmproxy.imap import framing

    assert framing.lower_case_name_py(data) is found
    assert framing.lower_case_name(data) is found


def test_c_speedup_is_built_where_a_compiler_is():
    """`pip install -e .` builds cpmproxy.imap._scan when there is a C compiler; without one the proxy
    still works (the Python version), only slower: this test says so rather than fail."""
    import shutil
    import sysconfig

    from cpmproxy.imap import framing

    if not (shutil.which("cc") or shutil.which("gcc")) or not sysconfig.get_paths().get("include"):
        pytest.skip("no C compiler or Python headers: the pure-Python scan is in use")
    assert framing.SPEEDUPS, "cpmproxy.imap._scan was not built: run `pip install -e .` again"


def test_a_c_module_built_from_an_older_source_is_not_used():
    """Found in review of the lower-case names change: a checkout updated without building the extension
    again (helpers copy the main repo's .so) kept the old _scan: ``framing`` failed to import (no
    ``lower_case_name``), and the proxy with it. Such a module is not used; the Python versions are."""
    from types import SimpleNamespace

    from cpmproxy.imap import _scan, framing

    older = SimpleNamespace(numbered_run_end=_scan.numbered_run_end, renumber_fetch_lines=_scan.renumber_fetch_lines)
    assert framing._current(older) is None
    assert framing._current(None) is None
    assert framing._current(_scan) is _scan


@pytest.mark.parametrize("blocks", [False, True])
def test_a_long_line_read_in_many_pieces_is_joined_once(blocks):
    """Found by review (helper-80): each read of a line not ended yet copied the whole of it again (a 32 MB
    SEARCH answer from the backend: 11 s of CPU). The reads are kept as they came and joined at its end."""
    f = Framer(max_line=1 << 20, responses=True, blocks=blocks)
    f.feed(b"* SEARCH ")
    assert list(f.events()) == []
    for _ in range(200):
        f.feed(b"1 " * 1000)
        assert list(f.events()) == []
    assert len(f._pending) == 200 and f.buffered == 9 + 200 * 2000  # (not copied: kept as read)
    f.feed(b"2\r\n* 3 EXISTS\r\n")
    events = list(f.events())
    assert b"".join(e.data for e in events) == b"* SEARCH " + b"1 " * 200_000 + b"2\r\n* 3 EXISTS\r\n"
    assert f.buffered == 0 and not f._pending


def test_a_line_past_max_line_in_pieces_is_still_refused():
    f = Framer(max_line=10_000)
    f.feed(b"a SEARCH ")
    list(f.events())
    with pytest.raises(FramingError) as ei:
        for _ in range(20):
            f.feed(b"x" * 1000)
            list(f.events())
    assert ei.value.code == "TOOBIG" and ei.value.fatal
