"""CPM's ``\\read-report-sent`` flag, carried as a keyword the backend accepts.

CPM defines the system-flag-looking ``\\read-report-sent``; IMAP servers refuse unknown system flags
(RFC 9051 reserves ``\\`` names), so the flag is rewritten to a keyword on the way in (STORE, APPEND,
SEARCH) and back on the way out (FETCH FLAGS, FLAGS, PERMANENTFLAGS).
"""

from __future__ import annotations

import re

from cpmproxy.config import ConfigError
from cpmproxy.proxy.hooks import BackendResponse, ClientCommand, Plugin, Rewrite

CPM_FLAG = rb"\read-report-sent"
_IN_COMMANDS = frozenset((b"STORE", b"APPEND", b"SEARCH", b"SORT", b"THREAD"))
_OUT_RESPONSES = frozenset((b"FETCH", b"FLAGS", b"OK"))
_CPM_FLAG_RE = re.compile(rb"\\read-report-sent(?=[\s)])", re.I)


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
            raise ConfigError(f"plugin.readreport.{sorted(unknown)[0]}: unknown key")
        keyword = settings.get("keyword", "$ReadReportSent")
        if not isinstance(keyword, str) or not re.fullmatch(r"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]+", keyword):
            raise ConfigError("plugin.readreport.keyword: must be an IMAP keyword atom")
        self.keyword = keyword.encode()
        self._keyword_re = re.compile(rb"(?<=[\s(])" + re.escape(self.keyword) + rb"(?=[\s)])", re.I)

    def command(self, session, cmd: ClientCommand):
        if cmd.name not in _IN_COMMANDS:
            return None
        if cmd.name == b"APPEND" and cmd.has_literal:
            # The flag lists of a MULTIAPPEND's later messages come in later segments.
            cmd.state.setdefault("later_segments", []).append(self._to_keyword)
        if _CPM_FLAG_RE.search(cmd.line):
            return Rewrite(self._to_keyword(cmd.line))
        return None

    def _to_keyword(self, text: bytes) -> bytes:
        return _CPM_FLAG_RE.sub(self.keyword.replace(b"\\", b"\\\\"), text)

    def flags_for_backend(self, text: bytes) -> bytes:
        """``text`` (a flag list) with the CPM flag as the backend stores it: for plugins that send a
        STORE of their own, which no command hook sees."""
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
        if head.name == b"FETCH" and self._keyword_re.search(data) is None:
            return None
        new = self._keyword_re.sub(CPM_FLAG.replace(b"\\", b"\\\\"), data)
        if resp.first and head.name != b"FETCH" and CPM_FLAG not in new.lower():
            # Announce the flag where the mailbox accepts keywords (so clients know it is permanent).
            close = new.find(b")")
            if close > 0 and (head.name == b"FLAGS" or b"\\*" in new[:close]):
                new = new[:close] + b" " + CPM_FLAG + new[close:]
        return Rewrite(new) if new != data else None
