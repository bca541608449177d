"""IMAP text helpers the CPM plugins share: mailbox names between the wire and Python, the parts of
LIST, ESEARCH and METADATA responses they read, search-key arity, backend capabilities.

Sans-I/O, no plugin state: anything here is a pure function of its arguments.
"""

from __future__ import annotations

import re

from cpmproxy.imap import mutf7
from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.imap.tokens import (
    Atom,
    Literal,
    ParenList,
    Quoted,
    TokenError,
    astring_text,
    format_token,
    format_tokens,
    quote,
    token_text,
    tokenize,
)
from cpmproxy.proxy.backend import BackendError, BackendRefused
from cpmproxy.proxy.hooks import Answer
from plugins.view import parse_uid_list

SEARCH_COMMANDS = frozenset((b"SEARCH", b"SORT", b"THREAD"))

NOARG_SEARCH_KEYS = frozenset(b"ALL ANSWERED DELETED DRAFT FLAGGED NEW OLD RECENT SEEN UNANSWERED UNDELETED "
                              b"UNDRAFT UNFLAGGED UNSEEN SAVEDATESUPPORTED".split())
ONEARG_SEARCH_KEYS = frozenset(b"BCC BEFORE BODY CC FROM KEYWORD LARGER ON SENTBEFORE SENTON SENTSINCE SINCE "
                               b"SMALLER SUBJECT TEXT TO UID UNKEYWORD OLDER YOUNGER SAVEDBEFORE SAVEDON "
                               b"SAVEDSINCE X-SAVEDBEFORE X-SAVEDON X-SAVEDSINCE FILTER CHARSET X-GUID X-MAILBOX "
                               b"X-REAL-UID MIMEPART".split())
# (FUZZY is no such key: RFC 6203's FUZZY is followed by a search key, read as one of its own. Dovecot's
# MIMEPART takes a list of MIME part criteria, part indexes and depths among them: no message numbers, taken
# whole.)
# Search keys a device may not use: Dovecot's X-MAILBOX matches, in a virtual mailbox, the name of the folder
# a message is in (a hidden one too: its name could be guessed).
REFUSED_SEARCH_KEYS = frozenset((b"X-MAILBOX",))

# FETCH items a device may ask for (section specs and partials aside): IMAP4rev1's and its macros, those of
# the extensions offered (MODSEQ, BINARY, PREVIEW, SAVEDATE, Dovecot's SNIPPET), and Dovecot's X-GUID,
# X-SAVEDATE and X-REAL-UID: each tells of the message its ``* n FETCH`` names, which the view renumbers
# or drops. Not Dovecot's X-MAILBOX (in a virtual mailbox, the name of the folder a message is in, a hidden
# one too), nor what a newer backend may have (OBJECTID's EMAILID, THREADID: not offered).
FETCH_ITEMS = frozenset(b"ALL FAST FULL ENVELOPE FLAGS INTERNALDATE RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT "
                        b"BODY BODY.PEEK BODYSTRUCTURE UID BINARY BINARY.PEEK BINARY.SIZE MODSEQ PREVIEW SNIPPET "
                        b"SAVEDATE X-SAVEDATE X-GUID X-REAL-UID".split())
_FETCH_PARTS_RE = re.compile(rb'"(?:[^"\\]|\\.)*"|~?\{(\d+)[+-]?\}\r\n|<[^>]*>|\[|\]')


def fetch_item_names(text: bytes) -> list[bytes] | None:
    """The item names (upper case) of a FETCH's ``text`` after its message set (items, then modifiers),
    without their section specs and partials; None where it cannot be read (the backend refuses it)."""
    out, i, in_section = [], 0, False
    while (m := _FETCH_PARTS_RE.search(text, i)) is not None:
        if not in_section:
            out.append(text[i:m.start()])
        i = m.end() + (int(m.group(1)) if m.group(1) else 0)  # (a literal: its bytes too)
        if m.group(0) in (b"[", b"]"):
            in_section = m.group(0) == b"["  # (a section's header field names, quoted or literals, left out)
    if in_section:
        return None
    out.append(text[i:])
    try:
        tokens = tokenize(b"".join(out))
    except TokenError:
        return None
    if not tokens:
        return None
    items = tokens[0].items if isinstance(tokens[0], ParenList) else [tokens[0]]
    # (A list after PREVIEW or SNIPPET is its modifiers: (LAZY), (FUZZY).)
    return [t.upper() for t in items if isinstance(t, Atom)] if all(isinstance(t, (Atom, ParenList)) for t in items) \
        else None


# A section spec: '[', names and at most parenthesised lists of them (quoted ones too), ']'. (Not to a ')'
# that closes the list it is in: ``FLAGS (BODY[) UID 5 BODY[HEADER]``, a keyword Dovecot stores.)
_SECTION_SPEC = rb'\[[^\]()\r\n]*(?:\((?:[^()"\r\n]|"(?:[^"\\\r\n]|\\.)*")*\)[^\]()\r\n]*)*\]'


def fetch_item_pattern(item: bytes) -> re.Pattern:
    """A pattern for one item of a FETCH response segment, whose group 1 is the item's value: it matches
    only where a word starts outside quoted strings and ``[...]`` section specs (an ENVELOPE's subject, a
    ``BODY[HEADER.FIELDS (...)]`` name list may hold the item's name). Use with :func:`find_fetch_item`.
    (A section is a '[' after BODY or BINARY: a keyword's '[', ``FLAGS (a[b)``, opened one to the next
    section's ']' and hid the items between.)"""
    return re.compile(rb'"(?:[^"\\\r\n]|\\.)*"|(?<![^\s(])(?:BODY|BINARY)[.A-Z]*' + _SECTION_SPEC + rb'|(?<![^\s(])'
                      + item, re.I)


# The UIDVALIDITY and UIDs an APPEND's tagged OK names (RFC 4315 UIDPLUS).
APPENDUID = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.I)
MODIFIED = re.compile(rb"\[MODIFIED ([0-9:,]+)\]", re.I)  # (RFC 7162 3.1.3: what a conditional STORE left alone)
FETCH_FLAGS = fetch_item_pattern(rb"FLAGS \(([^()]*)\)")  # a FETCH's FLAGS item, group 1 its flags


def find_fetch_item(pattern: re.Pattern, data: bytes) -> re.Match | None:
    """The first real match of a :func:`fetch_item_pattern` in a FETCH segment, or None."""
    for m in pattern.finditer(data):
        if m.group(1) is not None:
            return m
    return None


def mailbox_name(raw: bytes) -> str:
    """A mailbox name as the backend spells it (modified UTF-7) as text, INBOX and the names below it
    in the one spelling the backend takes them in whatever their case ("inbox/Private" is
    "INBOX/Private": policy patterns must not see another name than the backend opens)."""
    raw = mutf7.fold_inbox(raw)
    if raw == b"INBOX":
        return "INBOX"
    try:
        return mutf7.decode(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def command_mailbox_name(raw: bytes) -> str:
    """:func:`mailbox_name` of a mailbox a client's command names, refused (``TokenError``: the command is
    answered BAD) where it is another spelling of a name, which the backend may take for that name
    (Dovecot ignores the padding bits of the last base64 character: ``&AOR-`` opens "\u00e4",
    canonically ``&AOQ-``) while the policy would judge a folder of another name (found by review: an
    excluded folder was opened so). A name that reads as no name at all goes on, for the backend to refuse
    (or to take as written, as the policy does)."""
    if raw.isascii() and b"&" in raw:
        raw = mutf7.fold_inbox(raw)
        try:
            mutf7.decode(raw)
        except ValueError as e:
            try:
                mutf7.decode(raw, strict=False)
            except ValueError:
                pass
            else:
                raise TokenError(f"mailbox name: {e}") from None
    return mailbox_name(raw)


def literals_quoted(cmd) -> bytes | None:
    """A gathered command (``Collect``) written again with each literal as a quoted string (a mailbox name,
    a header field name: the same astring to the backend), for a plugin that reads the line by patterns,
    which must not take a literal's bytes for the command's; None where one cannot be quoted (CR, LF,
    NUL, 8-bit). The tag goes as sent."""
    def unliteral(items: list) -> list:
        out = []
        for t in items:
            if isinstance(t, Literal):
                if not t.value.isascii():
                    raise ValueError("8-bit")
                t = Quoted(t.value)
            elif isinstance(t, ParenList):
                t = ParenList(unliteral(t.items))
            out.append(t)
        return out

    try:
        args = format_tokens(unliteral(cmd.args))
    except (ValueError, TokenError):  # (format_token refuses CR, LF and NUL in a quoted string)
        return None
    return cmd.tag + b" " + (b"UID " if cmd.uid else b"") + cmd.name + (b" " + args if args else b"") + b"\r\n"


def wire_name(name: str) -> bytes:
    """A mailbox name as a command argument."""
    return b"INBOX" if name == "INBOX" else quote(mutf7.encode(name))


def list_name(line: bytes) -> str | None:
    """The mailbox a ``* LIST`` (or LSUB) response names; None for one that cannot be read."""
    try:
        tokens = tokenize(line.rstrip(b"\r\n"))
    except TokenError:
        return None
    # * LIST (flags) "sep" name [extended items]
    if len(tokens) < 5:
        return None
    raw = astring_text(tokens[4])
    return None if raw is None else mailbox_name(raw)


_STATUS_RE = re.compile(rb"\* STATUS (.*) \(([^()]*)\)\r?\n?\Z", re.S | re.I)  # (a line, with its CRLF or without)


def status_parts(line: bytes) -> tuple[bytes, list[bytes]] | None:
    """A ``* STATUS mailbox (NAME value ...)`` line as (the mailbox as sent, the item list's words); None
    for anything else. The items are the last parenthesis: a mailbox name may hold one, the items none."""
    m = _STATUS_RE.match(line)
    return None if m is None else (m.group(1), m.group(2).split())


def status_line(sent: bytes, words: list[bytes]) -> bytes:
    """``status_parts`` put back together (with other item words)."""
    return b"* STATUS " + sent + b" (" + b" ".join(words) + b")\r\n"


def status_without(line: bytes, names: list[bytes]) -> bytes:
    """A ``* STATUS`` line without the items ``names`` (upper case)."""
    parts = status_parts(line)
    if parts is None:
        return line
    sent, words = parts
    pairs = [(words[i], words[i + 1]) for i in range(0, len(words) - 1, 2)]
    return status_line(sent, [w for k, v in pairs if k.upper() not in names for w in (k, v)])


def status_mailbox(sent: bytes) -> str | None:
    """The mailbox of ``status_parts``' first part, as text; None if it cannot be read."""
    try:
        raw = astring_text(tokenize(sent)[0])
    except (TokenError, IndexError):
        return None
    return None if raw is None else mailbox_name(raw)


def status_values(words: list[bytes]) -> dict[bytes, int]:
    """The numeric items of ``status_parts``' words, by upper-case name."""
    return {words[i].upper(): int(words[i + 1]) for i in range(0, len(words) - 1, 2) if words[i + 1].isdigit()}


def _extended_at(tokens: list, name: bytes) -> int | None:
    """Where the tag ``name`` (``OLDNAME``) is in a LIST response's extended data (``tokens[5]``), if it is."""
    if len(tokens) < 6 or not isinstance(tokens[5], ParenList):
        return None
    items = tokens[5].items
    for j in range(0, len(items) - 1, 2):
        tag = token_text(items[j])
        if tag is not None and tag.upper() == name and isinstance(items[j + 1], ParenList):
            return j
    return None


def list_oldname(line: bytes) -> str | None:
    """The former name a ``* LIST`` response gives (a NOTIFY rename event: ``("OLDNAME" (name))``, RFC
    5465 5.4); None if it gives none."""
    if b"OLDNAME" not in line.upper():
        return None  # (the common case, every line of a LIST command's answer: not tokenized again)
    try:
        tokens = tokenize(line.rstrip(b"\r\n"))
    except TokenError:
        return None
    j = _extended_at(tokens, b"OLDNAME")
    if j is None or not tokens[5].items[j + 1].items:
        return None
    raw = astring_text(tokens[5].items[j + 1].items[0])
    return None if raw is None else mailbox_name(raw)


def list_without_oldname(line: bytes) -> bytes:
    """The ``* LIST`` response without its OLDNAME item (a rename told as a creation)."""
    return list_without_extended(line, b"OLDNAME")


def list_without_extended(line: bytes, name: bytes) -> bytes:
    """The ``* LIST`` response without its extended data item ``name`` (``line`` itself if it has none)."""
    if name not in line.upper():
        return line  # (the common case: not tokenized)
    tokens = tokenize(line.rstrip(b"\r\n"))
    j = _extended_at(tokens, name)
    if j is None:
        return line
    rest = tokens[5].items[:j] + tokens[5].items[j + 2:]
    return format_tokens(tokens[:5] + ([ParenList(rest)] if rest else [])) + b"\r\n"


def list_nonexistent(line: bytes, name: str) -> bytes:
    """A ``* LIST (\\NonExistent)`` response for ``name``, with the delimiter of ``line`` (RFC 5465 5.4:
    how a deleted mailbox is told)."""
    tokens = tokenize(line.rstrip(b"\r\n"))
    return b"* LIST (\\NonExistent) " + format_token(tokens[3]) + b" " + wire_name(name) + b"\r\n"


def refused_as_dovecot(command: bytes, reason: bytes, uid: bool = False) -> Answer:
    """A BAD in Dovecot 2.3's words ("Error in IMAP command X: reason"), with RFC 5530's CLIENTBUG: what the
    proxy refuses itself reads as the backend's own refusal of such a command."""
    return Answer(b"BAD [CLIENTBUG] Error in IMAP command " + (b"UID " if uid else b"") + command + b": " + reason)


def enables_qresync(cmd) -> bool:
    """Does this ENABLE name QRESYNC (an argument of its own, in any case: not ``X-QRESYNC-FOO``)?"""
    return b"QRESYNC" in cmd.line.upper().split()[2:]


def has_caps(session, *names: bytes) -> bool:
    """Whether the session's backend announced every capability in ``names``."""
    caps = {c.upper() for c in session.backend_caps}
    return all(n in caps for n in names)


def search_ok(reply):
    """``reply`` if its search succeeded. A NO or BAD is not "nothing found": taken so, a failed search
    would show what a kind rule hides, and the classification cache would keep it so for good."""
    if reply.status != b"OK":
        raise BackendRefused("backend search failed", reply.tagged)
    return reply


class MalformedSearch(BackendError, ValueError):
    """A search's answer that cannot be read: the backend's protocol error, handled as one (like a line the
    backend connection cannot parse), not a bug of the proxy's logged with a traceback; still the ValueError
    its parsing raised, for those that catch that."""


def malformed_search(line: bytes) -> MalformedSearch:
    return MalformedSearch(f"protocol error from backend: malformed search result {line[:200]!r}")


def esearch_all(reply) -> list[int]:
    """The numbers of a successful ``SEARCH RETURN (ALL)`` reply (ESEARCH), expanded."""
    for line in search_ok(reply).untagged:
        i = line.upper().find(b" ALL ")
        if i >= 0:
            try:
                return parse_uid_list(line[i + 5:].split(b" ")[0])
            except ValueError:  # (SequenceSetError is one)
                raise malformed_search(line) from None
    return []


def real_folders_of(reply) -> dict[int, str]:
    """UID -> folder name of a ``UID FETCH ... (X-MAILBOX)`` reply (Dovecot: the folder a message is stored
    in, another one's in a virtual mailbox). A refused FETCH raises (``BackendRefused``), but Dovecot's NO for
    messages expunged meanwhile: those are missing from the answer, as lines that cannot be read are."""
    if reply.status != b"OK" and not (reply.status == b"NO" and b"EXPUNGEISSUED" in reply.tagged.upper()):
        raise BackendRefused("backend fetch failed", reply.tagged)
    found = {}
    for line in reply.untagged:
        try:
            tokens = tokenize(line.rstrip(b"\r\n"))
        except TokenError:
            continue
        if len(tokens) != 4 or token_text(tokens[2]) is None or tokens[2].value.upper() != b"FETCH" \
                or not isinstance(tokens[3], ParenList):
            continue
        items = tokens[3].items
        fields = {token_text(items[i]).upper(): items[i + 1] for i in range(0, len(items) - 1, 2)
                  if token_text(items[i]) is not None}
        uid, folder = fields.get(b"UID"), fields.get(b"X-MAILBOX")
        raw = None if folder is None else astring_text(folder)
        if isinstance(uid, Atom) and uid.is_number() and raw is not None:
            found[uid.as_int()] = mailbox_name(raw)
    return found


def uid_set_pieces(uids: SequenceSet, limit: int = 3800) -> list[bytes]:
    """``uids`` in wire form, cut into pieces of at most ``limit`` bytes, for commands whose results
    add up (counts, FETCHes): 50,000 scattered hidden UIDs are 330 KB in one command line, past the
    backend's line limit (Dovecot's default is 64 KB: the command is refused). Pieces of a few KB keep
    under any limit a server would set, and cost a command per ~700 scattered UIDs."""
    pieces, piece, size = [], [], 0
    for lo, hi in uids.ranges:
        item = b"%d" % lo if lo == hi else b"%d:%d" % (lo, hi)
        if piece and size + len(item) + 1 > limit:
            pieces.append(b",".join(piece))
            piece, size = [], 0
        piece.append(item)
        size += len(item) + 1
    if piece:
        pieces.append(b",".join(piece))
    return pieces


_QUOTED_VALUE_MAX = 1024


def metadata_value(session, value: bytes) -> bytes:
    """``value`` (plain text, no quote or backslash) as a SETMETADATA value: quoted, or past a KB a
    non-synchronizing literal where the backend takes one (LITERAL+): a quoted string counts towards the
    backend's line limit (Dovecot's default 64 KB: a record of ~10,000 scattered UIDs), a literal not."""
    if len(value) <= _QUOTED_VALUE_MAX or not has_caps(session, b"LITERAL+"):
        return b'"' + value + b'"'
    return b"{%d+}\r\n" % len(value) + value


def iter_metadata(lines: list[bytes]):
    """(raw mailbox name, entry name, value) for every entry of the ``* METADATA`` responses in
    ``lines``; entries whose value is NIL are skipped."""
    for line in lines:
        if not line.upper().startswith(b"* METADATA "):
            continue
        try:
            tokens = tokenize(line.rstrip(b"\r\n"))
        except TokenError:
            continue
        if len(tokens) < 4 or not isinstance(tokens[3], ParenList):
            continue
        raw = astring_text(tokens[2])
        items = tokens[3].items
        for j in range(0, len(items) - 1, 2):
            value = token_text(items[j + 1])
            if value is not None:
                yield raw, (token_text(items[j]) or b"").decode("utf-8", "replace"), value


def unknown_search_key(criteria: list, depth: int = 0) -> bytes | None:
    """The first of ``criteria`` that is no search key the proxy knows (nor an argument of one, a sequence
    set, ``$``), or one in ``REFUSED_SEARCH_KEYS``; None if there is none. The view rewrites the keys it
    knows the arguments of: another's argument could be a number it would take for a message's (found by
    review: MIMEPART's), or a set in the backend's numbers; a newer backend's key is not passed unread."""
    if depth > 100:  # (as deep as the view's rewriting goes: viewsearch.MAX_KEY_DEPTH)
        raise TokenError("search criteria nested too deeply")
    i = 0
    while i < len(criteria):
        t = criteria[i]
        i += 1
        if isinstance(t, ParenList):
            if (found := unknown_search_key(t.items, depth + 1)) is not None:
                return found
            continue
        if not isinstance(t, Atom):
            continue  # (a string where a key should be: the backend refuses it)
        key = t.upper()
        if key in REFUSED_SEARCH_KEYS:
            return t.value
        if key in NOARG_SEARCH_KEYS or key in (b"NOT", b"OR", b"FUZZY", b"$"):
            continue  # (NOT's, OR's and FUZZY's operands are keys: read as such next)
        if (n := search_key_args(criteria, i - 1, key)):
            i += n
        elif not _SEQUENCE_SET_RE.fullmatch(t.value):
            return t.value
    return None


_SEQUENCE_SET_RE = re.compile(rb"[0-9:,*]+")


def search_key_args(tokens: list, i: int, key: bytes | None) -> int:
    """How many arguments the search key ``key`` at ``tokens[i]`` takes (0: none, or not a key that takes
    any: a set, a list, NOT/OR, whose operands are keys)."""
    if key in ONEARG_SEARCH_KEYS:
        return 1
    if key == b"HEADER":
        return 2
    if key == b"INTHREAD":  # Dovecot's INTHREAD algorithm search-key: the key after it is read as one
        return 1
    if key == b"MODSEQ":  # MODSEQ ["entry-name" entry-type] mod-sequence
        return 3 if i + 1 < len(tokens) and isinstance(tokens[i + 1], Quoted) else 1
    return 0
