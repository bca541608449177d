"""Just enough IMAP syntax for the client: response lines, tokens, UID sets, mailbox names, quoting.

Why not the proxy's own codec (:mod:`cpmproxy.imap`)? Start-up time. ``cpm-sync`` is often run as a
short process (a cron job, a phone's periodic sync); a no-change re-sync of a whole account is a handful
of milliseconds of IMAP, so every import counts. This module uses nothing beyond ``re`` and ``binascii``
and represents tokens with built-in types:

======================  ==========================================================================
``Atom`` (bytes)         atoms: flags, FETCH item names (``BODY[]``, ``RFC822.SIZE``), numbers
``bytes``                quoted strings and literals (their payload)
``None``                 ``NIL``
``list``                 parenthesized lists
======================  ==========================================================================

It is a response reader for a client, lenient where leniency is harmless (runs of spaces, ``]`` in
atoms) and strict where misreading would be dangerous (quoting, literal sizes, parentheses).
"""

from __future__ import annotations

import binascii
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence

__all__ = [
    "Atom",
    "ResponseHead",
    "SyntaxError_",
    "UidSet",
    "astring",
    "mutf7_decode",
    "mutf7_encode",
    "parse_head",
    "tokenize",
]


class SyntaxError_(ValueError):
    """Malformed IMAP syntax from the server."""


class Atom(bytes):
    """An IMAP atom (as opposed to a quoted string or literal, which are plain ``bytes``)."""

    __slots__ = ()

    def upper_value(self) -> bytes:
        return bytes(self).upper()



# -- tokens ------------------------------------------------------------------------------------------

# Atom bytes up to something that needs a decision: SP, CTL, parens, quote, literal brace or '['.
_ATOM_RUN_RE = re.compile(rb'[^\x00-\x20\x7f()"{\[]*')
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n]|\\["\\])*)"')
_UNESCAPE_RE = re.compile(rb'\\(["\\])')
_LITERAL_RE = re.compile(rb"~?\{([0-9]{1,20})[+-]?\}")
_SECTION_STOP_RE = re.compile(rb'[\]"()]')
# The atoms whose '[' opens a section; elsewhere '[' is an atom character (a keyword such as "a[b", which
# Dovecot stores: read as a section, it made the folder's FETCH FLAGS responses unreadable).
_SECTION_ATOMS = frozenset((b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"))


def _section_end(data: bytes, pos: int) -> int | None:
    """Offset after the ``]`` that closes the ``[`` at ``pos`` (``BODY[HEADER.FIELDS (A B)]``): the first
    one outside quoted strings. None if the list the '[' is in closes first, or the data ends: a keyword's
    '[' after all, as in ``FLAGS (BODY[)`` (Dovecot stores such keywords)."""
    pos += 1
    depth = 0
    while True:
        m = _SECTION_STOP_RE.search(data, pos)
        if m is None:
            return None
        c = data[m.start()]
        if c == 0x5D:
            return m.start() + 1
        if c in (0x28, 0x29):
            if c == 0x29 and not depth:
                return None
            depth += 1 if c == 0x28 else -1
            pos = m.start() + 1
            continue
        q = _QUOTED_RE.match(data, m.start())
        if q is None:
            raise SyntaxError_("unterminated quoted string in '[...]'")
        pos = q.end()


def tokenize(data: bytes, literals: Sequence[bytes] = ()) -> list:
    """Tokens of response data (no CRLF). Literal markers take their payloads from ``literals``, in order
    (the connection has already read them by size)."""
    top: list = []
    cur = top
    stack: list[list] = []
    lit = 0
    pos, n = 0, len(data)
    while pos < n:
        c = data[pos]
        if c == 0x20:
            pos += 1
        elif c == 0x28:  # '('
            new: list = []
            cur.append(new)
            stack.append(cur)
            cur = new
            pos += 1
        elif c == 0x29:  # ')'
            if not stack:
                raise SyntaxError_("unbalanced ')'")
            cur = stack.pop()
            pos += 1
        elif c == 0x22:  # '"'
            m = _QUOTED_RE.match(data, pos)
            if m is None:
                raise SyntaxError_("bad quoted string")
            value = m.group(1)
            cur.append(_UNESCAPE_RE.sub(rb"\1", value) if b"\\" in value else value)
            pos = m.end()
        elif c == 0x7B or (c == 0x7E and data.startswith(b"{", pos + 1)):  # '{' or '~{'
            m = _LITERAL_RE.match(data, pos)
            if m is None or lit >= len(literals) or len(literals[lit]) != int(m.group(1)):
                raise SyntaxError_("literal marker without its payload")
            cur.append(literals[lit])
            lit += 1
            pos = m.end()
        else:
            end = _ATOM_RUN_RE.match(data, pos).end()  # type: ignore[union-attr]  # matches ""
            while end < n and data[end] == 0x5B:  # '[': a section (part of the atom), or an atom character
                closed = _section_end(data, end) if data[pos:end].upper() in _SECTION_ATOMS else None
                end = end + 1 if closed is None else closed
                end = _ATOM_RUN_RE.match(data, end).end()  # type: ignore[union-attr]
            if end == pos:
                raise SyntaxError_(f"unexpected byte 0x{c:02x}")
            word = data[pos:end]
            cur.append(None if len(word) == 3 and word.upper() == b"NIL" else Atom(word))
            pos = end
    if stack:
        raise SyntaxError_("unbalanced '('")
    return top


def astring(token: object) -> bytes:
    """The value of an atom, quoted string or literal."""
    if isinstance(token, bytes):
        return bytes(token)
    if token is None:
        return b"NIL"
    raise SyntaxError_(f"expected a string, got {token!r}")


# -- response lines ----------------------------------------------------------------------------------

_TAG = rb'[^\x00-\x20\x7f-\xff(){%*"\\\]+]+'
_HEAD_RE = re.compile(rb"(\*|%s) (?:([0-9]{1,10}) )?([A-Za-z][A-Za-z0-9._-]*)(?: |\Z)" % _TAG)
_STATUS_NAMES = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))


class ResponseHead:
    """``kind`` is "untagged", "tagged" or "continuation"; ``rest`` starts after the name and code."""

    __slots__ = ("kind", "tag", "number", "name", "code", "rest")

    def __init__(self, kind: str, tag: bytes | None, number: int | None, name: bytes | None,
                 code: bytes | None, rest: int) -> None:
        self.kind, self.tag, self.number, self.name, self.code, self.rest = kind, tag, number, name, code, rest


def parse_head(line: bytes) -> ResponseHead:
    if line[:1] == b"+":
        return ResponseHead("continuation", None, None, None, None, 2 if line[1:2] == b" " else 1)
    m = _HEAD_RE.match(line)
    if m is None:
        raise SyntaxError_(f"malformed response line {line[:60]!r}")
    tag, number, name = m.group(1, 2, 3)
    name = name.upper()
    pos = m.end()
    code = None
    if name in _STATUS_NAMES and line.startswith(b"[", pos):
        end = line.find(b"]", pos)
        if end < 0:
            raise SyntaxError_("unterminated response code")
        code = line[pos + 1 : end]
        pos = end + 2 if line.startswith(b" ", end + 1) else end + 1
    if tag == b"*":
        return ResponseHead("untagged", None, None if number is None else int(number), name, code, pos)
    return ResponseHead("tagged", tag, None, name, code, pos)


# -- UID sets ----------------------------------------------------------------------------------------


class UidSet:
    """A set of UIDs as sorted disjoint inclusive ranges: ``1:3,7`` costs two pairs, not four ints."""

    __slots__ = ("ranges",)

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted((min(a, b), max(a, b)) for a, b in ranges):
            if lo < 1:
                raise ValueError("UIDs start at 1")
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        self.ranges: tuple[tuple[int, int], ...] = tuple(merged)

    @classmethod
    def of(cls, uids: Iterable[int]) -> UidSet:
        return cls((u, u) for u in uids)

    @classmethod
    def parse(cls, text: bytes | str) -> UidSet:
        """``b"1:3,5"`` (no ``*``: a client never needs to send or accept it here)."""
        raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
        ranges = []
        for part in raw.split(b","):
            lo, sep, hi = part.partition(b":")
            if not lo.isdigit() or (sep and not hi.isdigit()) or lo.startswith(b"0") or hi.startswith(b"0"):
                raise ValueError(f"not a UID set: {raw[:40]!r}")
            ranges.append((int(lo), int(hi) if sep else int(lo)))
        return cls(ranges)

    def format(self) -> bytes:
        if not self.ranges:
            raise ValueError("an empty UID set cannot be sent")
        return b",".join(b"%d" % lo if lo == hi else b"%d:%d" % (lo, hi) for lo, hi in self.ranges)

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        i = bisect_right(self.ranges, (uid, 1 << 62)) - 1
        return i >= 0 and uid <= self.ranges[i][1]

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for lo, hi in self.ranges:
            yield from range(lo, hi + 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UidSet) and other.ranges == self.ranges

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __repr__(self) -> str:
        return f"UidSet.parse({self.format().decode() if self.ranges else ''!r})"


# -- mailbox names (modified UTF-7, RFC 3501 5.1.3) -------------------------------------------------

_MUTF7_RUN_RE = re.compile(r"&|[^\x20-\x7e]+")


def _b64_run(m: re.Match[str]) -> str:
    run = m.group()
    if run == "&":
        return "&-"
    b64 = binascii.b2a_base64(run.encode("utf-16-be"), newline=False).rstrip(b"=").replace(b"/", b",")
    return "&" + b64.decode("ascii") + "-"


def mutf7_encode(name: str) -> bytes:
    return _MUTF7_RUN_RE.sub(_b64_run, name).encode("ascii")


def mutf7_decode(data: bytes) -> str:
    """Modified UTF-7 -> str. Raises ValueError on what :func:`mutf7_encode` would never produce, so
    that decoding and re-encoding a name always gives back the same bytes."""
    if not data.isascii():
        raise ValueError("modified UTF-7 is 7-bit")
    amp = data.find(b"&")
    if amp < 0:
        return data.decode("ascii")
    out: list[str] = []
    pos = 0
    while amp >= 0:
        out.append(data[pos:amp].decode("ascii"))
        end = data.find(b"-", amp + 1)
        if end < 0:
            raise ValueError("unterminated '&' in modified UTF-7")
        payload = data[amp + 1 : end]
        if not payload:
            out.append("&")
        else:
            try:
                raw = binascii.a2b_base64(payload.replace(b",", b"/") + b"=" * (-len(payload) % 4))
                out.append(raw.decode("utf-16-be"))
            except (binascii.Error, UnicodeDecodeError):
                raise ValueError("bad base64 in modified UTF-7") from None
        pos = end + 1
        amp = data.find(b"&", pos)
    out.append(data[pos:].decode("ascii"))
    text = "".join(out)
    if mutf7_encode(text) != data:
        raise ValueError("non-canonical modified UTF-7")
    return text


# -- quoting -----------------------------------------------------------------------------------------

_SAFE_ATOM_RE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\[\]]+')
_QUOTABLE_RE = re.compile(rb"[^\x00\r\n\x80-\xff]*")
_ESCAPE_RE = re.compile(rb'(["\\])')


def quote(value: bytes | str, *, atom_ok: bool = True) -> bytes:
    """An astring/string argument: an atom where safe (and ``atom_ok``), else a quoted string, else a
    non-synchronizing literal ``{n+}`` (the caller must know the server has LITERAL+)."""
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if atom_ok and _SAFE_ATOM_RE.fullmatch(data) and data.upper() != b"NIL":
        return data
    if _QUOTABLE_RE.fullmatch(data):
        return b'"' + _ESCAPE_RE.sub(rb"\\\1", data) + b'"'
    return b"{%d+}\r\n" % len(data) + data
