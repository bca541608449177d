"""Incremental IMAP framing: where each command or response (and each literal in it) ends.

Sans-I/O in the style of h11: feed bytes in, pull events out. The framer never interprets a line beyond
the literal announcement at its end, so the relay can forward bytes as they came and only the few
commands or responses a plugin cares about are tokenized (see ``tokens``).

A command or response is a sequence of text segments, each ending in CRLF; every segment but the last
announces a literal (``{n}``, ``{n+}``, ``{n-}``, ``~{n}``) that follows it. Events:

* ``Segment``: one such text segment (CRLF included). ``first`` marks the start of a new
  command/response; ``literal`` is the size of the literal that follows, or None when this segment ends
  the command/response.
* ``LiteralData``: a chunk of literal payload. Large literals arrive in several chunks as they are fed, so
  a 1 GB literal never sits in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "NEED_DATA",
    "FramingError",
    "Framer",
    "Block",
    "lines_of",
    "lower_case_name",
    "lower_case_name_py",
    "only_fetch_responses",
    "numbered_run_end",
    "numbered_run_end_py",
    "renumber_fetch_lines",
    "renumber_fetch_lines_py",
    "LiteralData",
    "Run",
    "run_events",
    "Segment",
]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

# A literal announcement ends a segment. Anchored at the end; searched only in the segment's tail.
_LITERAL_RE = re.compile(rb"(~?)\{([0-9]{1,20})([+-]?)\}\r?\n\Z")
# Something that looks like an attempted literal but is not a valid one ({-5}, {abc}, {}).
_BAD_LITERAL_RE = re.compile(rb"~?\{[^{}\r\n]{0,24}\}\r?\n\Z")
_TAIL = 40
_MIN_BLOCK = 512
_TEXT_RESPONSE_RE = re.compile(rb"\+|[^ ]+ (?:OK|NO|BAD|BYE|PREAUTH)(?: |\r?\n)", re.I)

# IMAP numbers are 32-bit (RFC 9051 number64 exists for literal8 sizes, but nobody stores 4 GB).
_MAX_NUMBER = 2**63 - 1


@dataclass(slots=True)
class Segment:
    data: bytes
    first: bool
    literal: int | None = None
    non_sync: bool = False
    binary: bool = False

    @property
    def last(self) -> bool:
        return self.literal is None


@dataclass(slots=True)
class Block:
    """Several whole responses/commands in a row, each one line, none announcing a literal (server side
    only, ``Framer(blocks=True)``): lets the relay forward a run of short responses in one piece."""
    data: bytes


@dataclass(slots=True)
class Run:
    """Several whole untagged responses in a row, literals included (server side, ``blocks=True``):
    typically a bulk FETCH. ``data`` is their bytes as received (a memoryview of the framer's buffer: no
    copy), ``text`` their text segments alone, literals left out, so the relay can tell from a few
    substring tests that nothing in them concerns anyone and forward ``data`` in one piece."""
    data: memoryview
    text: bytes


@dataclass(slots=True)
class LiteralData:
    data: bytes
    last: bool


def lines_of(block: bytes) -> list[bytes]:
    """The lines of a Block, each with its line end (only LF separates lines, as the framer saw them)."""
    parts = block.split(b"\n")
    return [p + b"\n" for p in parts[:-1]]


# In a run of untagged lines: a line whose response has a name, not a message number (LIST, FLAGS, BYE...).
_NAMED_UNTAGGED_RE = re.compile(rb"\n\* [^0-9]")
_FETCH_START_RE = re.compile(rb"\* [0-9]+ FETCH ")


# An untagged line ("* ", "* <digits> ") whose response name has a lower-case letter before anything not a
# letter: at the start, and after a line end (a literal first: "^" with re.M searched 5x slower).
_LOWER_CASE_NAME_RE = re.compile(rb"\* (?:[0-9]+ )?[A-Z]*[a-z]")
_LOWER_CASE_NAME_AFTER_RE = re.compile(rb"\n\* (?:[0-9]+ )?[A-Z]*[a-z]")
_NUMBERED_LOWER_CASE_NAME_RE = re.compile(rb"\* [0-9]+ [A-Z]*[a-z]")
# A line end not followed by a numbered line whose name is in upper case (or that has no name: no space
# after the number). Possessive: "* 3 EXa" must not pass as "* 3 E" and a name "Xa". (One search: a
# second one for the lower-case names took 2x this one's time; this takes 3x the plain "\n(?!\* [0-9])".)
_NUMBERED_RUN_BREAK_RE = re.compile(rb"\n(?!\* [0-9]++ [A-Z]*+(?![a-z])|\* [0-9]++(?! ))")


def numbered_run_end_py(data: bytes) -> int:
    """Where the run of numbered untagged lines ("* 17 FETCH ...") that ``data`` starts with ends: the
    offset of the first later line that does not start with "* " and a digit, or ``len(data)``; or
    before that, of the first numbered line whose name is not in upper case (see ``lower_case_name``),
    the first line too (0).

    The reference version; ``numbered_run_end`` is the C one (SSE2 from line to line, ~20x faster on a
    bulk FETCH) when it was built at install time, else this."""
    if _NUMBERED_LOWER_CASE_NAME_RE.match(data):
        return 0
    m = _NUMBERED_RUN_BREAK_RE.search(data)  # (the final line end matches too: the same cut as no match)
    return len(data) if m is None else m.start() + 1


def lower_case_name_py(data: bytes) -> bool:
    """Whether a line of ``data`` (its first, or one after an LF) is an untagged response whose name is
    spelt with a lower-case letter: "* 3 expunge", "* bye", "* Status". Response names have no case
    (RFC 9051 2.3); Dovecot spells them in upper case, and the relay's one-piece paths look for the names
    that concern anyone as plain upper-case substrings (memchr-fast): a block where this is true goes line
    by line instead, each name read as a name. (For numbered lines ``numbered_run_end`` tells as well.)

    The reference version; ``lower_case_name`` is the C one when it was built (one pass of 16 bytes at
    a time to each line end, as ``numbered_run_end``, and the 16 after "* " at once), else this."""
    return _LOWER_CASE_NAME_RE.match(data) is not None or _LOWER_CASE_NAME_AFTER_RE.search(data) is not None


_FETCH_LINE_NUMBER = re.compile(rb"^\* ([0-9]+) FETCH ", re.M)


def renumber_fetch_lines_py(block: bytes, numbers: list[int]) -> bytes | None:
    """A run of FETCH lines (``* 17 FETCH ...``, each ending in LF) with every message number mapped
    through ``numbers``: line n becomes line ``numbers[n]``, or is left out where that is 0 or n is beyond
    the list. None when a line is not a FETCH or the block does not end with a line end: the caller then
    takes the lines one by one.

    The reference version; ``renumber_fetch_lines`` is the C one when it was built, else this. The C one
    makes one pass and no object per line: 20,000 lines, a quarter hidden, take it 0.31 ms and this version
    6.1 ms (a regex split, ``map`` through the table, one formatted prefix per kept line)."""
    parts = _FETCH_LINE_NUMBER.split(block)
    # [b"", n1, rest1, n2, rest2, ...]; every line must be a FETCH (a match starts each line).
    if parts[0] or (block and not block.endswith(b"\n")) or len(parts) // 2 != block.count(b"\n"):
        return None
    try:
        clients = list(map(numbers.__getitem__, map(int, parts[1::2])))
    except IndexError:  # a number beyond the mailbox (a broken server): no message to show
        top = len(numbers)
        clients = [numbers[n] if n < top else 0 for n in map(int, parts[1::2])]
    return b"".join([b"* %d FETCH " % c + rest for c, rest in zip(clients, parts[2::2], strict=True) if c])


def _current(scan):
    """The C module if it was built from this ``_scan.c``, else None. One built from an older one (a
    checkout updated, its extension not built again) has no ``lower_case_name`` and a numbered_run_end
    that reads no names: mixed with this Python it would let a lower-case name pass the relay unread,
    or (the missing function) keep the proxy from starting. The Python versions are used instead, and
    ``SPEEDUPS`` says so (test_c_speedup_is_built_where_a_compiler_is fails: build it again)."""
    return scan if scan is not None and hasattr(scan, "lower_case_name") else None


try:
    from cpmproxy.imap import _scan
except ImportError:  # no compiler at install time
    _scan = None
_scan = _current(_scan)
SPEEDUPS = _scan is not None
numbered_run_end = _scan.numbered_run_end if _scan is not None else numbered_run_end_py
renumber_fetch_lines = _scan.renumber_fetch_lines if _scan is not None else renumber_fetch_lines_py
lower_case_name = _scan.lower_case_name if _scan is not None else lower_case_name_py


def only_fetch_responses(block: bytes, numbered: bool = False) -> bool:
    """Whether a Block of untagged lines (each line starting with "*") holds FETCH responses and nothing
    else: a bulk FETCH, which whoever only cares about other responses can let through unread.

    A few C-level scans, no step per line: the first line is a FETCH, no later line starts with a name
    instead of a number, and none of the other numbered responses (EXISTS, EXPUNGE, RECENT) is in it.
    Their searches are skipped when a one-byte memchr shows the letter they need ("X", "N") is absent,
    as it is from FLAGS, UID and MODSEQ data. Response names are matched in upper case, as Dovecot
    spells them: the caller has seen that they are (``lower_case_name``, ``numbered_run_end``). ``numbered``: the caller has seen that every line starts with a number (it
    cut the block so), and that search is not made again."""
    if _FETCH_START_RE.match(block) is None or (not numbered and _NAMED_UNTAGGED_RE.search(block) is not None):
        return False
    if b"X" in block and (b" EXISTS\r" in block or b" EXPUNGE\r" in block):
        return False
    return b"N" not in block or b" RECENT\r" not in block


def run_events(run: Run) -> list[Segment | LiteralData]:
    """The segments and literals of a Run, one event each, as a framer without blocks gives them."""
    framer = Framer(max_line=len(run.data) + 1, responses=True)
    framer.feed(bytes(run.data))
    return list(framer.events())


class FramingError(Exception):
    """Input that cannot be framed.

    ``code`` is the IMAP response code to use; ``fatal`` means the byte stream cannot be resynchronized
    and the connection must end (with a BYE); otherwise the framer has discarded the offending segment
    and is ready for the next command/response. ``first`` tells whether the segment was the first one of
    its command (nothing of it has been emitted yet) and ``data`` holds that segment when its length
    allows (so the caller can still find the tag).
    """

    def __init__(self, message: str, code: str, *, fatal: bool, first: bool = True, data: bytes = b"",
                 size: int | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.fatal = fatal
        self.first = first
        self.data = data
        self.size = size


class Framer:
    """Splits one direction of an IMAP stream into segments and literal chunks.

    ``max_line``: longest text segment accepted (fatal error beyond: the rest of the line cannot be told
    from a new command). ``max_literal``: largest literal accepted; a larger *synchronizing* literal is
    refused without losing the stream (the peer waits for a continuation that never comes), a larger
    non-synchronizing one is fatal because its bytes are already on the way.
    """

    __slots__ = ("max_line", "max_literal", "responses", "blocks", "_buf", "_pos", "_literal_left", "_first",
                 "_scan_from", "_pending", "_pending_len")

    def __init__(self, max_line: int = 65536, max_literal: int | None = None, *, responses: bool = False,
                 blocks: bool = False):
        self.blocks = blocks
        self.max_line = max_line
        self.max_literal = max_literal
        # Server side: status responses and continuation requests carry human-readable text, never a
        # literal, so text ending in "{5}" there must not be taken for one.
        self.responses = responses
        self._buf = b""
        self._pos = 0
        self._literal_left = 0
        self._first = True
        self._scan_from = 0
        # Reads that continue a line not ended yet, joined once its end comes (joined at each read, a
        # long line cost time in the square of its length: 11 s for a 32 MB SEARCH answer).
        self._pending: list[bytes] = []
        self._pending_len = 0

    # -- state the I/O layer may ask about -----------------------------------------------------

    @property
    def at_boundary(self) -> bool:
        """True between two commands/responses: a safe point to inject a whole response."""
        return self._first and self._literal_left == 0

    @property
    def in_literal(self) -> bool:
        return self._literal_left > 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos + self._pending_len

    # -- feeding -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._pos >= len(self._buf):
            self._buf = data
            self._pos = 0
            self._scan_from = 0
            return
        unended = not self._literal_left and self._scan_from >= len(self._buf)  # (searched to its end: no LF)
        if unended and b"\n" not in data \
                and len(self._buf) - self._pos + self._pending_len + len(data) <= self.max_line:
            self._pending.append(data)  # (no event can come of it yet)
            self._pending_len += len(data)
            return
        # Keep only the unconsumed tail; remember how far we already looked for LF.
        tail = self._buf[self._pos:]
        self._scan_from = max(0, self._scan_from - self._pos) + self._pending_len
        self._buf = b"".join([tail, *self._pending, data]) if self._pending else tail + data
        self._pending.clear()
        self._pending_len = 0
        self._pos = 0

    def refuse_literal(self) -> None:
        """The I/O layer answered a synchronizing literal with a tagged NO/BAD instead of ``+``.

        The client will not send the literal: the command ends here.
        """
        self._literal_left = 0
        self._first = True

    def next_event(self) -> Segment | Block | LiteralData | _NeedData:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if self._literal_left:
            if not avail:
                return NEED_DATA
            n = min(avail, self._literal_left)
            chunk = buf[pos:pos + n] if (pos or n != len(buf)) else buf
            self._pos = pos + n
            self._literal_left -= n
            return LiteralData(chunk, self._literal_left == 0)

        if self.blocks and self._first and avail > _MIN_BLOCK:
            # A run of complete lines with no literal announcement anywhere: one event, found with a
            # few C-level scans instead of one Python step per line. Tried only when the first line
            # itself announces no literal (a FETCH of bodies never qualifies: no wasted scan).
            first_nl = buf.find(b"\n", pos)
            if 0 <= first_nl and buf[first_nl - 1:first_nl] != b"}" and buf[first_nl - 2:first_nl] != b"}\r":
                last = buf.rfind(b"\n", first_nl + 1)
                # No "}" at all (one memchr) settles it; only text that has one needs the slower
                # multi-byte searches for a line ending in "}".
                if last - pos >= _MIN_BLOCK and (buf.find(b"}", pos, last + 1) < 0 or (
                        buf.find(b"}\n", pos, last + 1) < 0 and buf.find(b"}\r\n", pos, last + 1) < 0)):
                    self._pos = last + 1
                    self._scan_from = last + 1
                    return Block(buf[pos:last + 1])
            elif 0 <= first_nl:
                run = self._run(buf, pos)
                if run is not None:
                    return run
        nl = buf.find(b"\n", max(pos, self._scan_from))
        if nl < 0:
            self._scan_from = len(buf)
            if avail > self.max_line:
                self._buf = b""
                self._pos = 0
                self._scan_from = 0
                raise FramingError("Line too long", "TOOBIG", fatal=True, first=self._first)
            return NEED_DATA
        end = nl + 1
        first = self._first
        if end - pos > self.max_line:
            self._pos = end
            self._first = True
            raise FramingError("Line too long", "TOOBIG", fatal=True, first=first)
        line = buf[pos:end] if (pos or end != len(buf)) else buf
        self._pos = end
        self._scan_from = end

        if not (line.endswith(b"}\r\n") or line.endswith(b"}\n")) or (
                self.responses and first and _TEXT_RESPONSE_RE.match(line)):
            # Fast exit: the common case, no literal announced.
            self._first = True
            return Segment(line, first)
        m = _LITERAL_RE.search(line, max(0, len(line) - _TAIL))
        if m is None:
            # A client's malformed marker is refused; a server's line ending in "{...}" that is no
            # literal is only text (the blocks fast path reads it the same way).
            if not self.responses and _BAD_LITERAL_RE.search(line, max(0, len(line) - _TAIL)):
                self._first = True
                raise FramingError("Invalid literal size", "CLIENTBUG", fatal=not first, first=first,
                                   data=line)
            self._first = True
            return Segment(line, first)
        size = int(m.group(2))
        binary = bool(m.group(1))
        non_sync = bool(m.group(3))
        if size > _MAX_NUMBER or (self.max_literal is not None and size > self.max_literal):
            # A synchronizing literal can be refused cleanly; anything else is already in flight.
            fatal = non_sync or not first
            self._first = True
            raise FramingError("Literal too large", "TOOBIG", fatal=fatal, first=first, data=line,
                               size=size)
        self._first = False
        self._literal_left = size  # 0 is legal: the next segment follows at once
        return Segment(line, first, size, non_sync, binary)

    def _run(self, buf: bytes, pos: int) -> Run | None:
        """The complete untagged responses from ``pos`` on, as one Run, or None if not even the first is
        complete. Stops before anything the per-segment path must judge: a tagged or continuation line,
        a status response, an incomplete response, something that only looks like a literal, a limit."""
        end = len(buf)
        max_line = self.max_line
        max_literal = self.max_literal
        texts: list[bytes] = []
        done = 0  # texts belonging to complete responses
        run_end = p = pos
        while buf.startswith(b"* ", p) and not _TEXT_RESPONSE_RE.match(buf, p):
            complete = False
            while True:  # the segments of one response
                nl = buf.find(b"\n", p)
                if nl < 0 or nl - p >= max_line:
                    break
                line_end = nl + 1
                if buf[nl - 1] != 0x7D and buf[nl - 2:nl] != b"}\r":  # no "}" at the end: the last segment
                    texts.append(buf[p:line_end])
                    p = run_end = line_end
                    done = len(texts)
                    complete = True
                    break
                m = _LITERAL_RE.search(buf, max(p, line_end - _TAIL), line_end)
                if m is None:
                    break
                size = int(m.group(2))
                if (max_literal is not None and size > max_literal) or line_end + size > end:
                    break
                texts.append(buf[p:line_end])
                p = line_end + size
            if not complete:
                break
        if run_end == pos:
            return None
        self._pos = self._scan_from = run_end
        return Run(memoryview(buf)[pos:run_end], b"".join(texts[:done]))

    def events(self):
        """Yield every event the buffered bytes allow (FramingError propagates)."""
        while True:
            ev = self.next_event()
            if ev is NEED_DATA:
                return
            yield ev
