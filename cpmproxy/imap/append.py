"""Which APPEND segments may keep their non-synchronizing literal on the way to the backend.

Dovecot (2.3) reads the LITERAL+ literal of a command it refuses *before* the literal as commands of
their own: a BAD for the mailbox argument, a flag list with a non-atom or an unknown system flag, an
internal date it cannot parse, a line over its length limit. Such bytes would reach it past every hook,
so the proxy sends literals on as synchronizing ones and waits for the backend's "+" (one round trip per
literal). Every other refusal of APPEND (no such mailbox, a keyword the storage rejects, quota, a
zero-byte message) is delayed: Dovecot reads the literal first and drops it.

An APPEND segment that matches the strict grammar below cannot meet any of the immediate refusals, so it
keeps its ``{n+}`` and costs no round trip. The grammar is narrower than RFC 3501's on purpose (a tag and
a mailbox of plain characters, system flags and plain keywords, a well-formed date, a segment well under
any server's line limit): whatever falls outside it is not refused, only relayed the careful way.
tests/test_append_fastpath.py sends what this module accepts straight to Dovecot, each with commands in
its literal, and checks that none of them ran.
"""

from __future__ import annotations

import datetime
import re

__all__ = ["MAX_FAST_SEGMENT", "literal_always_read", "literal_out_of_place"]

MAX_FAST_SEGMENT = 4096  # longer segments go the careful way (Dovecot's imap_max_line_length is >= 64 KiB)

_FLAG = rb"(?:\\(?i:seen|answered|flagged|deleted|draft)|[A-Za-z0-9$_.\-]+)"
_FLAGS = rb"\((?:" + _FLAG + rb"(?: " + _FLAG + rb")*)?\)"
_MONTHS = (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec")
_DATE = (rb'"(?P<day> [1-9]|[0-9]{2})-(?P<mon>(?i:' + b"|".join(_MONTHS) + rb'))-(?P<year>[0-9]{4}) '
         rb'(?P<h>[0-9]{2}):(?P<m>[0-9]{2}):(?P<s>[0-9]{2}) [+-][0-9]{4}"')
_MESSAGE = rb"(?: " + _FLAGS + rb")?(?: " + _DATE + rb")? \{(?P<size>[1-9][0-9]{0,11})\+\}\r\n\Z"
_MAILBOX = rb'(?:[A-Za-z0-9&+,./:;<=>?@^_|~!#$\'`\-]+|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*")'
_FIRST = re.compile(rb"[A-Za-z0-9._\-]{1,64} (?i:APPEND) " + _MAILBOX + _MESSAGE)
_LATER = re.compile(_MESSAGE)


def literal_always_read(segment: bytes, first: bool) -> bool:
    """True when the backend reads this APPEND segment's ``{n+}`` literal whatever it decides about the
    command: ``segment`` is the command's first line (``first``) or the text after one of its literals
    (MULTIAPPEND's next message), up to and including the literal's announcement and CRLF."""
    if len(segment) > MAX_FAST_SEGMENT:
        return False
    m = (_FIRST if first else _LATER).match(segment)
    if m is None:
        return False
    if m.group("day") is None:
        return True
    try:
        year = int(m.group("year"))
        datetime.datetime(year, _MONTHS.index(m.group("mon").lower()) + 1, int(m.group("day")),
                          int(m.group("h")), int(m.group("m")), int(m.group("s")))
    except ValueError:
        return False
    return 1970 <= year <= 9999


# Where an APPEND segment may announce a literal: right after a message's optional flag list and date (the
# first segment: after the mailbox), or where an extension's parts begin (CATENATE's TEXT and URL parts,
# RFC 6855's UTF8), whose own grammar the backend checks. A segment that ends the literal mailbox name, or
# whose mailbox this cannot read, is left as it is.
_ANNOUNCED = re.compile(rb"~?\{[0-9]+[+-]?\}\r?\n\Z")
_FIRST_ARGS = re.compile(rb'[^ ]+ (?i:APPEND) (?:"(?:[^"\\\r\n]|\\.)*"|[^ ()"{\r\n]+)')
_MESSAGE_HEAD = re.compile(rb'(?: \([^()\r\n]*\))?(?: "(?:[^"\\\r\n]|\\.)*")?(?:\Z| (?i:CATENATE|UTF8) \()')
_PART_START = re.compile(rb"(?: (?i:CATENATE|TEXT|URL|UTF8) |\))")


def literal_out_of_place(segment: bytes, first: bool = False) -> bool:
    """True when an APPEND segment (its first line with ``first``, else the text after one of its literals)
    announces a literal where none can be: after an argument a message cannot have (``APPEND G x {5+}``,
    ``INBOX {5+}`` after a message: a MULTIAPPEND naming the mailbox again). Dovecot reads such a line to
    its end before it answers, NO or BAD; sent on as a synchronizing literal it never answers (no "+" for a
    literal it will not take, no answer before the line ends; or an answer, and the client's next command
    read as the rest of that line), and the proxy and client wait for ever (found by review and by fuzzing)."""
    announced = _ANNOUNCED.search(segment)
    if announced is None:
        return False  # (no literal: the line ends, and the backend answers)
    head = segment[:announced.start()]
    if first:
        if (args := _FIRST_ARGS.match(head)) is None:
            return False  # (a literal mailbox name, or one this does not read: as before)
        head = head[args.end():]
    elif _PART_START.match(head):
        return False
    if not head.endswith(b" "):
        return True
    return _MESSAGE_HEAD.match(head[:-1]) is None
