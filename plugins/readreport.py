"""CPM's ``\\read-report-sent`` flag, carried as a keyword the backend accepts.

CPM defines the system-flag-looking ``\\read-report-sent``; IMAP servers refuse unknown system flags
(RFC 9051 reserves ``\\`` names), so the flag is rewritten to a keyword on the way in (STORE, APPEND,
SEARCH) and back on the way out (FETCH FLAGS, FLAGS, PERMANENTFLAGS).
"""

from __future__ import annotations

import re

from cpmproxy.config import ConfigError, unknown_key
from cpmproxy.proxy.hooks import BackendResponse, ClientCommand, Collect, Plugin, Rewrite
from plugins.wire import FETCH_FLAGS, SEARCH_COMMANDS

CPM_FLAG = rb"\read-report-sent"
_IN_COMMANDS = frozenset((b"STORE", b"APPEND", b"SEARCH", b"SORT", b"THREAD"))
_OUT_RESPONSES = frozenset((b"FETCH", b"FLAGS", b"OK"))
_CPM_FLAG_RE = re.compile(rb"\\read-report-sent(?=[\s)\"])", re.I)
# Command text, token by token where it matters: a quoted string (left as it is but for a KEYWORD search
# key's), a literal's announcement (its bytes follow inline in a collected command: left as they are), or
# the CPM flag as an atom.
_COMMAND_TOKENS = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"|~?\{(\d+)[+-]?\}\r?\n|(?<![^\s(])\\read-report-sent(?=[\s)])',
                             re.I)


class ReadReportPlugin(Plugin):
    name = "readreport"
    response_continuations = True  # FLAGS may follow a literal in a FETCH
    response_names = _OUT_RESPONSES

    def __init__(self, proxy):
        super().__init__(proxy)
        self.configure({})

    def configure(self, settings: dict) -> None:
        unknown = set(settings) - {"keyword"}
        if unknown:
            raise unknown_key(sorted(unknown)[0], ["keyword"], "plugin.readreport.")
        keyword = settings.get("keyword", "$ReadReportSent")
        if not isinstance(keyword, str) or not re.fullmatch(r"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]+", keyword):
            raise ConfigError("plugin.readreport.keyword: must be an IMAP keyword atom")
        self.keyword = keyword.encode()
        self._keyword_re = re.compile(rb"(?<=[\s(])" + re.escape(self.keyword) + rb"(?=[\s)])", re.I)

    def command(self, session, cmd: ClientCommand):
        if cmd.name not in _IN_COMMANDS:
            return None
        if cmd.has_literal and cmd.name in SEARCH_COMMANDS and "collected" not in cmd.state:
            # A KEYWORD's flag may be a literal, in any segment: read whole (found by review: not mapped).
            return Collect()
        if cmd.has_literal:
            # What follows a literal comes in later segments: a MULTIAPPEND's later flag lists, search
            # keys after a SUBJECT {n} (a CHARSET search's usual form).
            cmd.state.setdefault("later_segments", []).append(self._to_keyword)
        if _CPM_FLAG_RE.search(cmd.line):
            new = self._to_keyword(cmd.line)
            return Rewrite(new) if new != cmd.line else None
        return None

    def _to_keyword(self, text: bytes) -> bytes:
        """``text`` with the CPM flag, where it is a flag (an atom), as the backend keyword; never inside a
        quoted string or a literal (``SEARCH SUBJECT "\\\\read-report-sent"`` looks for that text)."""
        if _CPM_FLAG_RE.search(text) is None:
            return text
        out, pos, at = [], 0, 0
        while (m := _COMMAND_TOKENS.search(text, at)) is not None:
            at = m.end()
            if m.group(0)[:1] == b'"':
                if _is_quoted_flag_key(text, m):
                    # ``KEYWORD "\\read-report-sent"``: the grammar wants an atom, Dovecot takes a string.
                    out.append(text[pos:m.start()] + self.keyword)
                    pos = at
                continue
            if m.group(1) is not None:  # (the literal's bytes are passed over whole)
                at = min(m.end() + int(m.group(1)), len(text))
                if text[m.end():at].lower() == CPM_FLAG and _after_keyword_key(text, m.start()):
                    out.append(text[pos:m.start()] + self.keyword)  # (``KEYWORD {17+}\r\n\read-report-sent``)
                    pos = at
                continue
            out.append(text[pos:m.start()] + self.keyword)
            pos = at
        out.append(text[pos:])
        return b"".join(out)

    def flags_for_backend(self, text: bytes) -> bytes:
        """``text`` (a flag list, search criteria, a command) with the CPM flag as the backend stores it:
        for plugins that send a STORE or a search of their own, which no command hook sees."""
        return self._to_keyword(text)

    def block_ok(self, session, block: bytes) -> bool:
        # Plain substring tests, no copy: a case-insensitive regex (or lower()) over a 64 KB block costs
        # far more. The keyword is looked for as the selected mailbox spells it: its FLAGS response (which
        # never passes here) lists every keyword the mailbox has, in its stored case.
        spelling = session.state.get(self.name, self.keyword)
        return b"* FLAGS" not in block and b"PERMANENTFLAGS" not in block and spelling not in block

    def fetch_block_ok(self, session, block: bytes) -> bool:
        # FETCH FLAGS may carry the keyword. Its first byte ("$") is looked for first: one memchr, where
        # the whole keyword's search over a 64 KB block is a slower two-way scan (~4% of a bulk FETCH's
        # relay CPU), needed only when some keyword is there at all.
        spelling = session.state.get(self.name, self.keyword)
        return spelling[:1] not in block or spelling not in block

    def response(self, session, resp: BackendResponse):
        head = resp.head
        if head.kind != "untagged" or head.name not in _OUT_RESPONSES:
            return None
        data = resp.data
        if head.name == b"FLAGS":
            m = self._keyword_re.search(data)
            session.state[self.name] = m.group(0) if m else self.keyword
        if head.name == b"OK":
            if not (resp.first and head.code and head.code[:15].upper() == b"PERMANENTFLAGS "):
                return None
        if head.name == b"FETCH":
            if self._keyword_re.search(data) is None:
                return None
            new = self._fetch_flags_mapped(data)
            return Rewrite(new) if new != data else None
        new = self._keyword_re.sub(CPM_FLAG.replace(b"\\", b"\\\\"), data)
        if resp.first and head.name != b"FETCH" and CPM_FLAG not in new.lower():
            # Announce the flag where the mailbox accepts keywords (so clients know it is permanent).
            close = new.find(b")")
            if close > 0 and (head.name == b"FLAGS" or b"\\*" in new[:close]):
                new = new[:close] + b" " + CPM_FLAG + new[close:]
        return Rewrite(new) if new != data else None

    def _fetch_flags_mapped(self, data: bytes) -> bytes:
        """A FETCH response segment with the keyword as the CPM flag in its FLAGS item only (a subject in
        an ENVELOPE, a ``BODY[HEADER.FIELDS (...)]`` section name may hold the keyword's text too)."""
        flag = CPM_FLAG.replace(b"\\", b"\\\\")
        out, pos = [], 0
        for m in FETCH_FLAGS.finditer(data):
            if m.group(1) is not None:
                out.append(data[pos:m.start(1)] + self._keyword_re.sub(flag, b" " + m.group(1) + b" ")[1:-1])
                pos = m.end(1)
        out.append(data[pos:])
        return b"".join(out)


_KEYWORD_KEY_RE = re.compile(rb"(?<![^\s(])(?:UN)?KEYWORD $", re.I)


def _is_quoted_flag_key(text: bytes, quoted: re.Match) -> bool:
    """Whether the quoted string ``quoted`` is the CPM flag as a (UN)KEYWORD search key's argument."""
    return quoted.group(0)[1:-1].replace(b"\\\\", b"\\").lower() == CPM_FLAG and _after_keyword_key(text, quoted.start())


def _after_keyword_key(text: bytes, at: int) -> bool:
    """Whether what starts at ``at`` in ``text`` is a (UN)KEYWORD search key's argument."""
    return _KEYWORD_KEY_RE.search(text, max(0, at - 10), at) is not None
