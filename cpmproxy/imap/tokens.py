"""Tokenizer for the parts of IMAP commands and responses a proxy plugin needs to look at.

The framing layer (``framing``) finds where commands and responses end; this module interprets a
line only when someone asks. Three entry points:

* :func:`parse_command` splits ``tag [UID] NAME`` off a client command and tokenizes the arguments
  lazily, keeping ``args_offset`` so callers can forward or rewrite the original bytes.
* :func:`parse_response_head` classifies a server response with one regex match (it runs on every
  response) and extracts the ``[CODE]`` of status responses.
* :func:`tokenize` turns arguments into :class:`Atom`, :class:`Quoted`, :class:`Literal`,
  :class:`LiteralRef`, :data:`NIL` and :class:`ParenList` tokens.

Lines are passed WITHOUT their final CRLF. A collected multi-part command or response may be passed
whole: a literal marker followed by CRLF and the literal's bytes becomes a :class:`Literal`; a marker
that ends the line (literal not yet received) becomes a :class:`LiteralRef`.

The tokenizer is lenient where leniency is harmless for a proxy (runs of spaces, 8-bit bytes in atoms,
``]``/``*``/``%``/``\\`` in atoms) and strict where misreading would be dangerous (quoting, literals,
parentheses, control characters). All syntax errors raise :class:`TokenError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, NoReturn, Sequence, Union

__all__ = [
    "NIL",
    "Atom",
    "Command",
    "Literal",
    "LiteralRef",
    "Nil",
    "ParenList",
    "Quoted",
    "ResponseHead",
    "Token",
    "TokenError",
    "astring",
    "astring_text",
    "format_list",
    "format_token",
    "format_tokens",
    "nstring",
    "parse_command",
    "parse_response_head",
    "quote",
    "space_run",
    "token_text",
    "tokenize",
]

# Deeper nesting than this is an attack, not mail (BODYSTRUCTURE of real messages stays far below).
MAX_DEPTH = 100
# number64 (RFC 9051) bounds literal sizes.
_MAX_LITERAL = 2**63 - 1


class TokenError(ValueError):
    """Malformed IMAP syntax. ``offset`` is the byte offset in the line, when known."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} at offset {offset}")
        self.offset = offset


# -- tokens ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Atom:
    """A bare word: keywords, numbers, sequence sets, flags, and fetch attributes such as
    ``BODY.PEEK[HEADER.FIELDS (A B)]<0.100>`` (a ``[...]`` section, spaces included, is part of the atom).
    """

    value: bytes

    def is_number(self) -> bool:
        return self.value.isdigit()  # bytes.isdigit() is ASCII-only

    def as_int(self) -> int:
        if not self.value.isdigit() or len(self.value) > 20:
            raise ValueError(f"not a number: {self.value!r}")
        return int(self.value)

    def upper(self) -> bytes:
        return self.value.upper()


@dataclass(frozen=True, slots=True)
class Quoted:
    """A quoted string; ``value`` is the unescaped content."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal whose payload is present (``{n}``, ``{n+}``/``{n-}``: ``non_sync``; ``~{n}``: ``binary``)."""

    value: bytes
    non_sync: bool = False
    binary: bool = False


@dataclass(frozen=True, slots=True)
class LiteralRef:
    """A literal marker ending the line, whose payload has not been received yet."""

    size: int
    non_sync: bool = False
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Nil:
    """The atom ``NIL`` (any case). All instances compare equal; ``text`` keeps the case it was written in,
    for where the grammar takes an astring: ``SELECT nil`` selects the mailbox "nil" (Dovecot's reading)."""

    text: bytes = field(default=b"NIL", compare=False)

    def __repr__(self) -> str:
        return "NIL"


NIL = Nil()


@dataclass(frozen=True, slots=True)
class ParenList:
    """A parenthesized list."""

    items: list[Token]


Token = Union[Atom, Quoted, Literal, LiteralRef, Nil, ParenList]


def astring(token: Token) -> bytes:
    """The string value of an atom, quoted string or literal (``NIL`` as an astring is that word, as written)."""
    text = astring_text(token)
    if text is None:
        raise TokenError(f"expected a string, got {token!r}")
    return text


def astring_text(token: Token) -> bytes | None:
    """The text of a token where the grammar takes an astring (a mailbox name, a user name): a string
    token's, or the atom NIL's as written; None for anything else (a list)."""
    if isinstance(token, (Atom, Quoted, Literal)):
        return token.value
    if isinstance(token, Nil):
        return token.text
    return None


def token_text(token: Token) -> bytes | None:
    """The text of a string token (atom, quoted string, literal); None for anything else (NIL, a list)."""
    if isinstance(token, (Atom, Quoted, Literal)):
        return token.value
    return None


def nstring(token: Token) -> bytes | None:
    """The value of an ``nstring``: a quoted string or literal, or None for NIL."""
    if isinstance(token, Nil):
        return None
    if isinstance(token, (Quoted, Literal)):
        return token.value
    raise TokenError(f"expected a string or NIL, got {token!r}")


# -- tokenizer -------------------------------------------------------------------------------------

# Atom bytes up to something that needs a decision: SP, CTL, parens, quote, literal brace or '['.
_ATOM_RUN_RE = re.compile(rb'[^\x00-\x20\x7f()"{\[]*')
# Quoted-string body (no closing quote: the caller checks what stopped the match, for a precise error).
# The alternatives are disjoint and nothing follows the loop, so this never backtracks.
_QUOTED_RE = re.compile(rb'"((?:[^"\\\r\n\x00]+|\\["\\])*)')
_UNESCAPE_RE = re.compile(rb'\\(["\\])')
_LITERAL_RE = re.compile(rb"(~?)\{([0-9]{1,20})([+-]?)\}")
_BRACKET_STOP_RE = re.compile(rb'[\]"\x00-\x1f\x7f]')
_SECTION_STOP_RE = re.compile(rb'[\]"()\x00-\x1f\x7f]')
# The atoms whose '[' opens a section (RFC 9051 fetch-att and msg-att, RFC 3516's BINARY). Anywhere else a
# '[' is an atom character like any other (RFC 9051 ATOM-CHAR): Dovecot stores keywords such as "[" or
# "a[b" (only ']' it refuses), and read as a section opening, one such keyword in a mailbox made every
# "* FLAGS" of its SELECT unreadable to the proxy, which ended the session (found by the command fuzzer).
_SECTION_ATOMS = frozenset((b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"))


def _describe(c: int) -> str:
    if c < 0x20 or c == 0x7F:
        return f"control character 0x{c:02x}"
    if c >= 0x80:
        return f"unexpected byte 0x{c:02x}"
    return f"unexpected {chr(c)!r}"


def _quoted_end(line: bytes, pos: int) -> tuple[bytes, int]:
    """Parse the quoted string at ``line[pos] == '"'``; return (unescaped value, offset after it)."""
    m = _QUOTED_RE.match(line, pos)
    assert m is not None  # the pattern matches at any '"'
    end = m.end()
    if end >= len(line) or (end + 1 == len(line) and line[end] == 0x5C):
        raise TokenError("unterminated quoted string", pos)
    c = line[end]
    if c != 0x22:
        if c == 0x5C:
            raise TokenError('invalid escape in quoted string (only \\\\ and \\" allowed)', end)
        raise TokenError(f"{_describe(c)} in quoted string", end)
    value = m.group(1)
    if b"\\" in value:
        value = _UNESCAPE_RE.sub(rb"\1", value)
    return value, end + 1


_BRACKET_LITERAL_RE = re.compile(rb"\{(\d{1,19})[+-]?\}\r\n")


def _skip_bracket(line: bytes, pos: int, section: bool = False) -> int | None:
    """Return the offset after the ``]`` that closes the ``[`` at ``pos``: the first one outside quoted
    strings and literals. (Not nested: neither a section nor a response code holds brackets of its own,
    and a '[' in them is a keyword's, as in ``[PERMANENTFLAGS (\\Seen a[b \\*)]``.)

    ``section``: the '[' follows BODY or BINARY, and is a keyword's all the same (None) if the list it is
    in closes before any ']' does, or the line or a literal comes first outside the section's own list
    (a header field name may be a literal, in commands): ``FLAGS (BODY[)``,
    ``KEYWORD body[x`` (Dovecot stores such keywords; read as a section, ``SEARCH KEYWORD BODY[`` under a
    filtered view was refused with BAD, and a FETCH FLAGS with one was read up to the next section's ']')."""
    start = pos
    pos += 1
    depth = 0
    stop = _SECTION_STOP_RE if section else _BRACKET_STOP_RE
    while True:
        m = stop.search(line, pos)
        if m is None:
            if section and not depth:  # (inside the section's list, a literal may have ended the line)
                return None
            raise TokenError("unterminated '['", start)
        p = m.start()
        c = line[p]
        if c == 0x5D:
            return p + 1
        elif c == 0x28:
            depth += 1
            pos = p + 1
        elif c == 0x29:
            if not depth:
                return None
            depth -= 1
            pos = p + 1
        elif c == 0x22:
            pos = _quoted_end(line, p)[1]
        elif c == 0x0D and (brace := line.rfind(b"{", start, p)) > 0 \
                and (lit := _BRACKET_LITERAL_RE.fullmatch(line, brace, p + 2)) is not None:
            if section and not depth:
                return None  # (the command's literal, after a keyword's '[': a section's are in its list)
            # A literal, its bytes inline: a header field name of BODY[HEADER.FIELDS (...)] is an astring.
            # (Its announcement ends at this CR: an earlier literal's, matched from its brace, sent the scan
            # back there, for ever: found by the tokenizer's fuzz test, a proxy process hung.)
            pos = lit.end() + int(lit.group(1))
            if pos > len(line):
                raise TokenError("literal inside '[...]' truncated", p)
        else:
            raise TokenError(f"{_describe(c)} inside '[...]'", p)


def tokenize(line: bytes, literals: Sequence[bytes] = ()) -> list[Token]:
    """Tokenize command arguments or response data (no trailing CRLF).

    Literal markers are resolved in this order: a marker followed by CRLF (or LF) takes the next ``n``
    bytes of ``line`` as its payload; otherwise the next unused entry of ``literals`` is the payload
    (its length must match); otherwise a marker ending the line yields a :class:`LiteralRef`, and any
    parentheses still open are closed implicitly (the tokens are then a prefix of the command).
    """
    if not isinstance(line, bytes):
        line = bytes(line)
    return _tokenize(line, 0, literals)


def _tokenize(line: bytes, pos: int, literals: Sequence[bytes]) -> list[Token]:
    n = len(line)
    top: list[Token] = []
    cur = top
    stack: list[list[Token]] = []
    lit_index = 0
    need_sep = False  # set after a token: the next one must be preceded by SP (or be a ')')
    awaiting_literal = False
    while pos < n:
        c = line[pos]
        if c == 0x20:
            pos += 1
            need_sep = False
            continue
        if c == 0x29:  # ')'
            if not stack:
                raise TokenError("unbalanced ')'", pos)
            items = cur
            cur = stack.pop()
            cur.append(ParenList(items))
            pos += 1
            need_sep = True
            continue
        if need_sep:
            raise TokenError(f"{_describe(c)} (expected space)", pos)
        need_sep = True

        if c == 0x28:  # '('
            if len(stack) >= MAX_DEPTH:
                raise TokenError("parentheses nested too deeply", pos)
            stack.append(cur)
            cur = []
            pos += 1
            need_sep = False
        elif c == 0x22:  # '"'
            value, pos = _quoted_end(line, pos)
            cur.append(Quoted(value))
        elif c == 0x7B or (c == 0x7E and line.startswith(b"{", pos + 1)):  # '{' or '~{'
            m = _LITERAL_RE.match(line, pos)
            if m is None:
                raise TokenError("malformed literal marker", pos)
            size = int(m.group(2))
            if size > _MAX_LITERAL:
                raise TokenError("literal size out of range", pos)
            binary = bool(m.group(1))
            non_sync = bool(m.group(3))
            after = m.end()
            if line.startswith(b"\r\n", after):
                data = after + 2
            elif line.startswith(b"\n", after):
                data = after + 1  # bare LF: the framer tolerates it, so do we
            else:
                data = -1
            if data >= 0:
                if n - data < size:
                    raise TokenError(f"literal of {size} bytes truncated to {n - data}", pos)
                cur.append(Literal(line[data : data + size], non_sync, binary))
                pos = data + size
            elif lit_index < len(literals):
                value = bytes(literals[lit_index])
                lit_index += 1
                if len(value) != size:
                    raise TokenError(f"literal announced as {size} bytes but {len(value)} supplied", pos)
                cur.append(Literal(value, non_sync, binary))
                pos = after
            elif after == n:
                cur.append(LiteralRef(size, non_sync, binary))
                pos = after
                awaiting_literal = True
            else:
                raise TokenError("literal marker must be followed by CRLF or end the line", after)
        else:
            start = pos
            while True:
                m = _ATOM_RUN_RE.match(line, pos)
                assert m is not None  # the pattern can match the empty string
                pos = m.end()
                if pos < n and line[pos] == 0x5B:  # '[': a section (part of the atom), or an atom character
                    end = _skip_bracket(line, pos, section=True) if line[start:pos].upper() in _SECTION_ATOMS else None
                    pos = pos + 1 if end is None else end
                    continue
                break
            if pos == start:
                raise TokenError(_describe(c), pos)
            value = line[start:pos]
            if len(value) == 3 and value.upper() == b"NIL":
                cur.append(NIL if value == b"NIL" else Nil(value))
            else:
                cur.append(Atom(value))

    if stack:
        if not awaiting_literal:
            raise TokenError("unbalanced '('", n)
        while stack:
            items = cur
            cur = stack.pop()
            cur.append(ParenList(items))
    if lit_index < len(literals):
        raise TokenError(f"{len(literals) - lit_index} supplied literal(s) not used")
    return top


# -- commands --------------------------------------------------------------------------------------

# tag: ASTRING-CHARs except '+' (and, here, except ']' too); 7-bit only.
_TAG = rb'[^\x00-\x20\x7f-\xff+(){%*"\\\]]+'
_NAME = rb"[A-Za-z][A-Za-z0-9._-]*"
_COMMAND_RE = re.compile(rb"(%s) (%s)(?: |\Z)" % (_TAG, _NAME))
_NAME_RE = re.compile(rb"(%s)(?: |\Z)" % _NAME)
_TAG_RE = re.compile(_TAG)


@dataclass(slots=True, eq=False)
class Command:
    """A parsed client command. ``args`` is tokenized on first access."""

    line: bytes
    tag: bytes
    name: bytes  # upper-cased; for ``UID FETCH`` this is ``FETCH`` and ``uid`` is True
    uid: bool
    args_offset: int  # where the arguments start in ``line`` (len(line) if there are none)
    literals: Sequence[bytes] = ()
    _args: list[Token] | None = field(default=None, init=False, repr=False)

    @property
    def args(self) -> list[Token]:
        if self._args is None:
            self._args = _tokenize(self.line, self.args_offset, self.literals)
        return self._args

    @property
    def raw_args(self) -> bytes:
        return self.line[self.args_offset :]


def parse_command(line: bytes, literals: Sequence[bytes] = ()) -> Command:
    """Split ``tag [UID] NAME args`` (no trailing CRLF); raises :class:`TokenError` if malformed.

    Argument errors surface only when ``args`` is accessed.
    """
    if not isinstance(line, bytes):
        line = bytes(line)
    m = _COMMAND_RE.match(line)
    if m is None:
        _command_error(line)
    tag, name = m.group(1, 2)
    name = name.upper()
    pos = m.end()
    uid = name == b"UID"
    if uid:
        m2 = _NAME_RE.match(line, pos)
        if m2 is None or pos == len(line):
            raise TokenError("missing or invalid command after UID", pos)
        name = m2.group(1).upper()
        pos = m2.end()
    return Command(line, tag, name, uid, pos, literals)


_SPACE_RUN_RE = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"?|( {2,})')


def space_run(line: bytes) -> int:
    """Where ``line`` has more than one space in a row outside quoted strings; -1 if nowhere. The grammar
    has one SP between arguments; Dovecot takes runs of them, which a reader of the line by patterns
    would not (a proxy must read a command as the server does, or refuse it)."""
    if b"  " not in line:
        return -1
    for m in _SPACE_RUN_RE.finditer(line):
        if m.group(1) is not None:
            return m.start(1)
    return -1


def _command_error(line: bytes) -> NoReturn:
    # Only reached on failure: work out a precise message.
    if not line:
        raise TokenError("empty command line")
    sp = line.find(b" ")
    tag = line if sp < 0 else line[:sp]
    if not tag:
        raise TokenError("empty tag", 0)
    m = _TAG_RE.match(tag)
    if m is None or m.end() != len(tag):
        bad = 0 if m is None else m.end()
        raise TokenError(f"{_describe(tag[bad])} in tag", bad)
    if sp < 0 or sp + 1 == len(line):
        raise TokenError("missing command name", len(line))
    raise TokenError("invalid command name", sp + 1)


# -- responses -------------------------------------------------------------------------------------

_RESPONSE_RE = re.compile(rb"\+ ?|(\*|%s) (?:([0-9]{1,10}) )?(%s)(?: |\Z)" % (_TAG, _NAME))
_STATUS_NAMES = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))
# The usual response code has no brackets or quotes inside; anything else goes through _skip_bracket.
_SIMPLE_CODE_RE = re.compile(rb'\[([^\[\]"\x00-\x1f\x7f]*)\] ?')


class ResponseHead(NamedTuple):
    kind: str  # "untagged", "tagged" or "continuation"
    tag: bytes | None  # None unless tagged
    number: int | None  # the message number of "* 5 FETCH", "* 3 EXPUNGE", "* 7 EXISTS"
    name: bytes | None  # upper-cased keyword (OK, FETCH, EXISTS, CAPABILITY, ...); None for continuations
    code: bytes | None  # response code of a status response, without brackets
    text_offset: int  # where the rest of the line (after name and code, and one SP) starts

    @property
    def code_name(self) -> bytes | None:
        """The upper-cased first word of the response code (``CAPABILITY``, ``READ-WRITE``, ...)."""
        if self.code is None:
            return None
        return self.code.split(b" ", 1)[0].upper()


_new_head = tuple.__new__


def parse_response_head(line: bytes) -> ResponseHead:
    """Classify a server response line (no trailing CRLF); raises :class:`TokenError` if malformed."""
    if not isinstance(line, bytes):
        line = bytes(line)
    m = _RESPONSE_RE.match(line)
    if m is None:
        raise TokenError(f"malformed response line {line[:60]!r}")
    tag, number, name = m.group(1, 2, 3)
    pos = m.end()
    if tag is None:
        return ResponseHead("continuation", None, None, None, None, pos)
    name = name.upper()
    if tag == b"*":
        kind = "untagged"
        tag = None
    else:
        if number is not None:
            raise TokenError("message number in a tagged response", m.start(2))
        kind = "tagged"
    code = None
    if name in _STATUS_NAMES and line.startswith(b"[", pos):
        cm = _SIMPLE_CODE_RE.match(line, pos)
        if cm is not None:
            code = cm.group(1)
            pos = cm.end()
        else:
            end = _skip_bracket(line, pos)
            assert end is not None  # (None only for a section's)
            code = line[pos + 1 : end - 1]
            pos = end + 1 if line.startswith(b" ", end) else end
    # tuple.__new__ skips NamedTuple's Python-level __new__: this runs for every response.
    return _new_head(ResponseHead, (kind, tag, None if number is None else int(number), name, code, pos))


# -- formatting ------------------------------------------------------------------------------------

# Atoms we emit are more conservative than what we accept: no brackets (a '[' would start a section).
_SAFE_ATOM_RE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\[\]]+')
_QUOTABLE_7_RE = re.compile(rb"[^\x00\r\n\x80-\xff]*")
_QUOTABLE_8_RE = re.compile(rb"[^\x00\r\n]*")
_ESCAPE_RE = re.compile(rb'(["\\])')


def _quoted(data: bytes) -> bytes:
    return b'"' + _ESCAPE_RE.sub(rb"\\\1", data) + b'"'


def _literal(data: bytes, non_sync: bool = False, binary: bool = False) -> bytes:
    return b"%s{%d%s}\r\n" % (b"~" if binary else b"", len(data), b"+" if non_sync else b"") + data


def quote(value: bytes | str, *, allow_8bit: bool = False, non_sync: bool = False) -> bytes:
    """Represent ``value`` as an IMAP astring: an atom if safe, else a quoted string, else a literal.

    8-bit bytes are quoted only with ``allow_8bit`` (UTF8=ACCEPT in effect); otherwise they force a
    literal. A literal (``{n}\\r\\n...``, or ``{n+}`` with ``non_sync``) embeds a CRLF: the caller must
    split the command there and, for a synchronizing literal, wait for the server's ``+`` continuation.
    Mailbox names must be passed through ``mutf7.encode`` first unless UTF8=ACCEPT is enabled.
    """
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if _SAFE_ATOM_RE.fullmatch(data) and data.upper() != b"NIL":
        return data
    if (_QUOTABLE_8_RE if allow_8bit else _QUOTABLE_7_RE).fullmatch(data):
        return _quoted(data)
    return _literal(data, non_sync)


def format_list(items: Iterable[bytes | str | list | tuple]) -> bytes:
    """``(a b c)`` from already-serialized items; nested lists/tuples become nested parenthesized lists."""
    parts = []
    for item in items:
        if isinstance(item, (list, tuple)):
            parts.append(format_list(item))
        elif isinstance(item, str):
            parts.append(item.encode("utf-8"))
        else:
            parts.append(bytes(item))
    return b"(" + b" ".join(parts) + b")"


def format_token(token: Token) -> bytes:
    """Serialize one token so that :func:`tokenize` reads it back as an equal token."""
    if isinstance(token, Atom):
        return token.value
    if isinstance(token, Quoted):
        if _QUOTABLE_8_RE.fullmatch(token.value) is None:
            raise ValueError("a quoted string cannot contain CR, LF or NUL")
        return _quoted(token.value)
    if isinstance(token, Literal):
        return _literal(token.value, token.non_sync, token.binary)
    if isinstance(token, LiteralRef):
        return b"%s{%d%s}" % (b"~" if token.binary else b"", token.size, b"+" if token.non_sync else b"")
    if isinstance(token, Nil):
        return token.text
    if isinstance(token, ParenList):
        return b"(" + format_tokens(token.items) + b")"
    raise TypeError(f"not a token: {token!r}")


def format_tokens(tokens: Iterable[Token]) -> bytes:
    """Serialize tokens separated by single spaces."""
    return b" ".join(format_token(t) for t in tokens)
