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


# What may follow a literal of an APPEND, up to its next literal: a MULTIAPPEND message (flags, a date, the
# literal or CATENATE), a CATENATE part (TEXT, URL) or its end, or after a literal mailbox name the same.
_LATER_START = re.compile(rb"(?: (?:\(|\"|~?\{|(?i:CATENATE|TEXT|URL) )|\))")


def literal_out_of_place(segment: bytes) -> bool:
    """True when a later segment of an APPEND (the text after one of its literals) announces a literal where
    none can be: it starts with neither a message's nor a CATENATE part's beginning (``INBOX {5+}`` after a
    message: a mailbox named again). Dovecot reads such a line to its end before it answers BAD; sent on as
    a synchronizing literal it never answers (no "+" for a literal it will not take, no BAD before the line
    ends), and the proxy and client wait for ever (found by review)."""
    return _LATER_START.match(segment) is None
