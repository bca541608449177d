"""The user's CPM preferences: METADATA entries under ``/private/vendor/vendor.cpmproxy/``
(DESIGN.md section 4), account-wide on mailbox ``""`` or per folder. Read at login, checked against the
provider policy when the user's client sets them (``NO [NOPERM]``), taken up at once by every session of the
user (here, and through the watch connection from other proxy processes); the proxy's own bookkeeping
entries never leave it. The effective value of a setting: the policy's default, unless the user may
change it and did.

A mixin of ``plugins.policy.PolicyPlugin``: a changed preference re-applies the selected folder's view
(``_reapply_view``) and announces the folders that came or went (read anew with the folder rules:
``folder_infos``, ``_all_folders``, ``folder_hidden``)."""

from __future__ import annotations

import re
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from cpmproxy.imap.tokens import (
    Atom,
    Nil,
    ParenList,
    TokenError,
    astring_text,
    format_tokens,
    token_text,
    tokenize,
)
from cpmproxy.proxy.backend import UNAVAILABLE, BackendError, BackendRefused
from cpmproxy.proxy.hooks import Answer, Collect, Defer, Drop, Hold, Rewrite
from plugins.cpm import (
    KINDS,
    PREF_NOTIFICATIONS,
    PREF_SYNC,
    PREFERENCES,
    pref_entry,
    pref_key,
)
from plugins.policystate import (
    FOLDERS_TOPIC,
    FolderInfo,
    FolderVisibility,
    PolicySession,
    _as_missing,
)
from plugins.wire import (
    command_mailbox_name,
    has_caps,
    iter_metadata,
    mailbox_name,
)

log = Logger(namespace="cpmproxy.policy")


class Preferences:
    """The user's preferences (see the module docstring)."""

    def effective(self, st: PolicySession, key: str, folder: str | None, default: bool) -> bool:
        """A preference's effective value: policy default unless the user may change it and did."""
        return self._effective_in(st, None if folder is None else st.folders.get(folder), key, default)

    @staticmethod
    def _effective_in(st: PolicySession, info: FolderInfo | None, key: str, default: bool) -> bool:
        """``effective`` for a folder whose ``info`` is at hand (None: account-wide)."""
        # (The user's value first: mostly there is none, and two dict lookups settle it.)
        value = None
        if info is not None and info.prefs:
            value = info.prefs.get(key)
        if value is None and st.account_prefs:
            value = st.account_prefs.get(key)
        if value is None or not st.policy.may_change(key):
            return default
        return value == "on"

    def kind_synced(self, st: PolicySession, kind: str, folder: str) -> bool:
        return self.effective(st, f"{PREF_SYNC}/{kind}", folder, st.policy.default_sync(kind))

    def hidden_kinds(self, st: PolicySession, folder: str) -> tuple[str, ...]:
        info = st.folders.get(folder)
        if not st.account_prefs and (info is None or not info.prefs):
            return st.policy.default_hidden_kinds
        return tuple(k for k in KINDS if not self.kind_synced(st, k, folder))

    async def _login(self, session) -> None:
        st = self.state(session)
        if not (has_caps(session, b"METADATA") or has_caps(session, b"METADATA-SERVER")):
            st.login_entries = set()  # (a backend without METADATA stores no preferences: the defaults apply)
            return
        # On the side connection (opened here, so the first SELECT does not wait for it). A refusal is
        # not "no preferences": taken so, a device would sync what its user turned off (fails the login
        # NO [UNAVAILABLE]; the client tries again).
        reply = _metadata_read(await session.side_command(
            b'GETMETADATA (DEPTH infinity) "" (' + pref_entry("").encode() + b")"), "account preferences")
        st.account_prefs = parse_metadata_prefs(reply.untagged)
        st.login_entries = {entry.lower() for _, entry, _ in iter_metadata(reply.untagged)}
        st.pref_folders = parse_pref_folders(reply.untagged)

    def _metadata_command(self, session, st: PolicySession, cmd):
        """GETMETADATA / SETMETADATA. A folder hidden from the device does not exist for them either (the
        backend's answer for a missing name: ``_as_missing``), except that where the user may bring it back
        into view (``_user_may_show``), its CPM sync preferences stay readable and writable (DESIGN.md
        section 4), and only those (``_metadata_folder``). Found by review: a Session History folder the
        policy hides answered GETMETADATA with its entries, took SETMETADATA, and was named in the answer to
        GETMETADATA "*" (only the policy's folder patterns were looked at)."""
        if cmd.has_literal and not cmd.state.get("collected"):
            # An entry name or mailbox as a literal: the whole command first (judged on its first segment
            # alone, a bookkeeping entry or a forbidden preference sent as a literal would pass).
            return Collect()
        args = cmd.args
        at = 1 if cmd.name == b"GETMETADATA" and args and isinstance(args[0], ParenList) else 0
        raw = astring_text(args[at]) if at < len(args) else None
        mailbox = command_mailbox_name(raw) if raw else ""
        if cmd.name == b"GETMETADATA":
            # (Responses are filtered: bookkeeping entries never leave the proxy, nor a hidden folder's.)
            if not mailbox:
                return None
            if "*" in mailbox or "%" in mailbox:
                # A pattern (Dovecot takes one): the folders' answers are judged one by one
                # (``_metadata_response``); what is known of them read first, in one go.
                if not self._folders_may_hide(st):
                    return None
                return Defer(defer.Deferred.fromCoroutine(self._folders_read(session, _maxsize_taken_off(cmd, at))))
            entries = args[at + 1] if at + 1 < len(args) else None
            asked = entries.items if isinstance(entries, ParenList) else [entries] if entries is not None else []
            return self._metadata_folder(session, st, cmd, mailbox, at, asked=asked)
        if len(args) < 2 or not isinstance(args[1], ParenList):
            return self._metadata_folder(session, st, cmd, mailbox, at) if mailbox else None
        items = args[1].items
        prefs = {}
        only_sync = True  # (whether every entry set is a CPM sync preference)
        for j in range(0, len(items) - 1, 2):
            entry = (token_text(items[j]) or b"").decode("utf-8", "replace")
            key = pref_key(entry)
            if not _sync_key(key):
                only_sync = False
            if key is None:
                continue
            if key not in PREFERENCES:
                return Answer(b"NO [NOPERM] Entries under " + pref_entry("").encode() +
                              b" other than the CPM preferences belong to the server.")
            value_tok = items[j + 1]
            if isinstance(value_tok, Nil):
                value = None
            else:
                value = (token_text(value_tok) or b"").decode("utf-8", "replace").strip().lower()
                if value not in ("on", "off"):
                    return Answer(b'NO [CLIENTBUG] CPM preferences take "on" or "off".')
            if key == PREF_SYNC and not mailbox:
                return Answer(b"NO [CLIENTBUG] The sync preference is set on a mailbox, not on the account.")
            if key == PREF_NOTIFICATIONS and mailbox and value is not None:  # (removing one is fine)
                # (What the server starts on its own, for the whole account: IDLE notifications, pushes.)
                return Answer(b'NO [CLIENTBUG] The notifications preference is set on the account (mailbox ""), '
                              b"not on a mailbox.")
            if not st.policy.may_change(key):
                return Answer(b"NO [NOPERM] The service provider's policy does not let users change "
                              + key.encode() + b".")
            prefs[key] = value
        if not mailbox:
            if prefs:
                cmd.state["prefs"] = (mailbox, prefs)
            return None
        # (The entries judged first, as for a name no folder has: a refusal of them says nothing of the folder.)
        return self._metadata_folder(session, st, cmd, mailbox, at, setting=(prefs, only_sync and bool(items)))

    def _metadata_folder(self, session, st: PolicySession, cmd, mailbox: str, at: int, asked=None, setting=None):
        """A METADATA command on a folder: as on a missing one if the folder is hidden from the device,
        unless the user may bring it back and the command reads or sets (``setting``: the preferences set,
        whether the command sets nothing else) CPM sync preferences, which alone it then shows
        (``cmd.state["prefs_only"]``: the folder and the entries ``asked``). Decided at once where the
        folder is known."""
        if not st.policy.folder_allowed(mailbox):
            return _as_missing(cmd, mailbox, at)
        if cmd.name == b"GETMETADATA" and at == 1 and b"DEPTH" in cmd.line.upper() and self._folders_may_hide(st):
            # With DEPTH, Dovecot answers a \Noselect folder with "* NO Mailbox doesn't exist" lines, a
            # missing name without: a parent there only for hidden folders must read as missing (found by
            # review; the other METADATA forms answer the two alike).
            return Defer(defer.Deferred.fromCoroutine(self._metadata_on_parent(session, st, cmd, mailbox, at, asked)))
        if self._folder_info_now(session, st, mailbox):
            action = self._metadata_decided(st, cmd, mailbox, at, asked, setting)
            if action is not None or not (setting and setting[0]):
                return action
            return self._set_prefs(session, cmd, mailbox, setting[0])
        return Defer(defer.Deferred.fromCoroutine(self._metadata_after_read(session, st, cmd, mailbox, at, asked,
                                                                              setting)))

    async def _metadata_on_parent(self, session, st: PolicySession, cmd, mailbox: str, at: int, asked):
        if await self._only_above_hidden(session, st, mailbox.rstrip("/") or mailbox):
            return _as_missing(cmd, mailbox, at)
        return await self._metadata_after_read(session, st, cmd, mailbox, at, asked, None)

    async def _metadata_after_read(self, session, st: PolicySession, cmd, mailbox: str, at: int, asked, setting):
        await self.folder_infos(session, [mailbox])
        action = self._metadata_decided(st, cmd, mailbox, at, asked, setting)
        if action is not None or not (setting and setting[0]):
            return action
        cmd.state["prefs"] = (mailbox, setting[0])
        return await self._mark_pref_folder(session, mailbox)

    def _metadata_decided(self, st: PolicySession, cmd, mailbox: str, at: int, asked, setting):
        if not self.folder_hidden(st, mailbox):
            return None
        if not self._user_may_show(st, mailbox) or (setting is not None and not setting[1]):
            return _as_missing(cmd, mailbox, at)
        if setting is None:
            cmd.state["prefs_only"] = (mailbox, {(token_text(t) or b"").lower() for t in asked or ()})
        return None

    def _set_prefs(self, session, cmd, mailbox: str, prefs: dict):
        cmd.state["prefs"] = (mailbox, prefs)
        return Defer(defer.Deferred.fromCoroutine(self._mark_pref_folder(session, mailbox)))

    async def _folders_read(self, session, then=None):
        await self.folder_infos(session, await self._all_folders(session))
        return then

    async def _mark_pref_folder(self, session, mailbox: str) -> None:
        """Record (account-wide, before the client's OK) that ``mailbox`` has preferences of its own, so
        every session reads them (and only those folders' metadata is ever read). The mark gets a new
        value at each change: other proxy processes, which poll the account-wide entries only, see that
        the folder's preferences changed and read them again."""
        value = uuid.uuid4().hex[:16].encode()
        reply = await session.side_command(b'SETMETADATA "" (' + pref_folder_entry(mailbox) + b' "' + value + b'")')
        if reply.status != b"OK":
            # (Unmarked, the folder's preferences would never be read: the change is not made.)
            return Answer(reply.tagged if reply.status == b"NO" else b"NO [UNAVAILABLE] " + UNAVAILABLE)
        for other in self.proxy.sessions_of(session.user):  # (they take the change itself at its OK)
            st = other.state.get(self.name)
            if st is not None:
                if mailbox not in st.pref_folders:
                    st.folders.pop(mailbox, None)  # (read whole when next needed)
                st.pref_folders[mailbox] = value
        return None

    def observe_pref_folders(self, user: str, marks: dict[str, bytes], replace: bool = True) -> None:
        """Folders with preferences as now known (e.g. read again on the watch connection): sessions
        here forget what they knew of new or changed ones, so their preferences are read when next
        needed (a selected one's at once: its view is applied again)."""
        for session in self.proxy.sessions_of(user):
            st = session.state.get(self.name)
            if st is None:
                continue
            known = st.pref_folders
            changed = [name for name, value in marks.items() if known.get(name) != value]
            if replace:  # (a folder whose preferences are all gone: its mark went too)
                changed += [name for name in known if name not in marks]
            # Folders this session knew the preferences of: whether they are in its view, before the change.
            watched = [n for n in changed if n in st.folders] if self.proxy.events.has_subscribers(FOLDERS_TOPIC) \
                else []
            before = {n for n in watched if self.folder_hidden(st, n)}
            # (The marks first: a re-application that starts at once, in IDLE, reads the folder's.)
            st.pref_folders = dict(marks) if replace else {**known, **marks}
            for name in changed:
                st.folders.pop(name, None)
                if name == st.mailbox:
                    self._reapply_view(session, st)
            if watched:
                d = defer.Deferred.fromCoroutine(self._announce_after_read(session, st, watched, before))
                d.addErrback(lambda f: log.failure("announcing folder changes failed", f))

    def _metadata_response(self, session, st: PolicySession, resp):
        """``* METADATA``: the proxy's own entries under the vendor prefix are taken out one by one (only the
        CPM preferences are the user's, DESIGN.md section 4); none left: no response at all. Dovecot sends
        values as literals, so a response is several segments: it is held until all of it is in, filtered
        whole, and sent in its place (``Drop(data)``), or as it was if nothing in it is ours."""
        data = resp.data
        mailbox = _metadata_mailbox(data)
        asked = None  # (a folder hidden from the device: its CPM sync preferences alone are shown)
        if mailbox:
            if not st.policy.folder_allowed(mailbox):
                return Drop()  # (e.g. GETMETADATA "*": a folder the policy excludes does not exist)
            if mailbox not in st.folders and not self._folder_info_now(session, st, mailbox):
                return self._hold_for_folder(session, st, mailbox)  # (then the hooks run again)
            if self.folder_hidden(st, mailbox):
                if not self._user_may_show(st, mailbox):
                    return Drop()  # (a hidden folder does not exist: GETMETADATA "*" does not name it)
                asked = _asked_entries(session, mailbox)
        if _LITERAL_END_RE.search(data) is None:  # one line: the whole response
            new = _within_maxsize(session, filter_metadata_response(data, asked))
            return None if new is data else Drop(new)
        box = st.metadata_hold
        if box is not None and box["first"] == data:  # the hooks' run after our hold: the verdict
            st.metadata_hold = None
            if "whole" not in box:
                return Drop()  # (not read whole: the session is ending, or a bug; never shown unfiltered)
            new = _within_maxsize(session, filter_metadata_response(box["whole"], asked))
            return None if new is box["whole"] else Drop(new)
        st.metadata_hold = box = {"first": data}
        return Hold(defer.Deferred.fromCoroutine(_read_held_response(session, box)))

    def observe_prefs(self, user: str, mailbox: str, prefs: dict[str, str]) -> bool:
        """The user's preferences as read from the backend now (``mailbox`` "" for account-wide ones),
        e.g. changed through another proxy process: sessions here take them up. True if anything changed."""
        for session in self.proxy.sessions_of(user):
            st = session.state.get(self.name)
            if st is None:
                continue
            if mailbox and mailbox not in st.folders:
                continue
            known = st.folders[mailbox].prefs if mailbox else st.account_prefs
            change = {k: prefs.get(k) for k in set(known) | set(prefs) if known.get(k) != prefs.get(k)}
            if change:
                self._prefs_changed(session, (mailbox, change))
                return True
        return False

    def _prefs_changed(self, session, change) -> None:
        """A preference was set through this proxy: every session of the user picks it up at once."""
        mailbox, prefs = change
        watched = self.proxy.events.has_subscribers(FOLDERS_TOPIC)
        for other in self.proxy.sessions_of(session.user):
            st = other.state.get(self.name)
            if st is None:
                continue
            # Which folders the session knows of are in its view, before the change.
            names = list(st.folders) + ([mailbox] if mailbox and mailbox not in st.folders else [])
            before = {n for n in names if self.folder_hidden(st, n)} if watched else set()
            # (A folder this session knew nothing of: whether it is a Session History folder is still to be
            # asked, when next needed; an entry with the preferences alone said "not one".)
            target = st.folders.setdefault(mailbox, FolderInfo(recheck=True)).prefs if mailbox else st.account_prefs
            for k, v in prefs.items():
                if v is None:
                    target.pop(k, None)
                else:
                    target[k] = v
            if not mailbox and f"{PREF_SYNC}/session-history" in prefs:
                # Whether a folder is a Session History one was asked only where it mattered (while
                # they were hidden): what is known of the others says nothing. Read again when needed.
                st.folders.clear()
                if watched:
                    d = defer.Deferred.fromCoroutine(self._announce_after_read(other, st, names, before))
                    d.addErrback(lambda f: log.failure("announcing folder changes failed", f))
            elif watched:
                self._announce_folders(other, st, names, before)
            self._reapply_view(other, st)

    def _announce_folders(self, session, st: PolicySession, names, hidden_before: set[str]) -> None:
        """Tell who listens (notify: a client NOTIFY with MailboxName) of folders that left or came back
        into the session's view."""
        for name in names:
            hidden = self.folder_hidden(st, name)
            if hidden != (name in hidden_before):
                self.proxy.events.publish(FOLDERS_TOPIC, FolderVisibility(session, name, not hidden))

    async def _announce_after_read(self, session, st: PolicySession, names: list[str], before: set[str]) -> None:
        try:
            existing = set(await self._all_folders(session))  # (one deleted meanwhile is no event)
            names = [n for n in names if n in existing]
            await self.folder_infos(session, names)
        except (BackendError, defer.TimeoutError) as e:
            log.warn("folder preferences unreadable, no folder event: {error} session={session}", error=str(e),
                     session=session.session_id)
            return
        self._announce_folders(session, st, names, before)


def _metadata_read(reply, what: str):
    """``reply`` if its GETMETADATA succeeded (see ``search_ok``: a refusal is not "none set")."""
    if reply.status != b"OK":
        raise BackendRefused(f"reading {what} failed", reply.tagged)
    return reply


_LITERAL_END_RE = re.compile(rb"\{[0-9]+\}\r?\n\Z")


async def _read_held_response(session, box: dict) -> None:
    """Keep the response held on its first segment in ``box["whole"]`` once it is all held (a value may
    be a large literal, over several reads)."""
    box["whole"] = await session.held_response_whole()


def _entry_visible(tok) -> bool:
    """A METADATA entry a client may see: anything outside the vendor prefix, and the CPM preferences."""
    name = token_text(tok)
    if name is None:
        return False
    key = pref_key(name.decode("utf-8", "replace"))
    return key is None or key in PREFERENCES


def _sync_key(key: str | None) -> bool:
    """Whether a preference key (``pref_key``) is one of the CPM sync preferences (``sync``, ``sync/<kind>``)."""
    return key is not None and key in PREFERENCES and (key == PREF_SYNC or key.startswith(PREF_SYNC + "/"))


def _sync_entry(tok) -> bool:
    name = token_text(tok)
    return name is not None and _sync_key(pref_key(name.decode("utf-8", "replace")))


def _maxsize_taken_off(cmd, at: int) -> Rewrite | None:
    """A GETMETADATA on a pattern without its MAXSIZE option, which the proxy applies (``_within_maxsize``):
    the backend's ``[METADATA LONGENTRIES n]`` is the longest value of every folder the pattern matches,
    hidden ones too (found by review helper-98: ``GETMETADATA (MAXSIZE 10) "S*" /private/comment`` answered
    ``OK [METADATA LONGENTRIES 300]`` and nothing else, of a hidden folder's comment). None: it has none."""
    options = cmd.args[0].items if at else []
    size, rest = None, []
    for j in range(0, len(options), 2):
        if not isinstance(options[j], Atom) or options[j].upper() != b"MAXSIZE" or j + 1 >= len(options):
            rest += options[j:j + 2]
            continue
        # Every MAXSIZE taken off, the last one applied, as Dovecot does (found by review helper-102: only the
        # first was, and 'GETMETADATA (MAXSIZE 10 MAXSIZE 10) "S*" ...' still told a hidden folder's
        # LONGENTRIES). A value Dovecot refuses (not an atom of digits within 32 bits) leaves the command as it
        # is, for its BAD (a quoted one or 2**32 were answered OK); a quoted option name is not one (BAD too).
        value = options[j + 1]
        if not isinstance(value, Atom) or not value.value.isdigit() or int(value.value) > 0xFFFFFFFF:
            return None
        size = int(value.value)
    if size is None:
        return None
    cmd.state["maxsize"] = size
    args = ([ParenList(rest)] if rest else []) + cmd.args[at:]
    return Rewrite(cmd.tag + b" GETMETADATA " + format_tokens(args) + b"\r\n")


def _within_maxsize(session, data: bytes | None) -> bytes | None:
    """A whole ``* METADATA`` response without the values longer than the MAXSIZE the proxy took off its
    command (``_maxsize_taken_off``), the longest of them noted for the tagged OK's LONGENTRIES (see
    ``PolicyPlugin.tagged``); ``data`` itself for any other."""
    # (The response is the first GETMETADATA's in flight: the backend answers them in order. Not the first
    # with a MAXSIZE: found by review helper-102, one pipelined before it lost its long values.)
    cmd = next((c for c in session.inflight_commands() if c.name == b"GETMETADATA"), None)
    if cmd is None or "maxsize" not in cmd.state or data is None:
        return data
    try:
        tokens = tokenize(data[:-2] if data.endswith(b"\r\n") else data.rstrip(b"\n"))
    except TokenError:
        return None
    if len(tokens) != 4 or not isinstance(tokens[3], ParenList):
        return data  # (a list of entry names, no values)
    items, kept = tokens[3].items, []
    for j in range(0, len(items) - 1, 2):
        value = token_text(items[j + 1])
        if value is not None and len(value) > cmd.state["maxsize"]:
            cmd.state["longest"] = max(cmd.state.get("longest", 0), len(value))
        else:
            kept += items[j:j + 2]
    if len(kept) == len(items):
        return data
    return format_tokens(tokens[:3] + [ParenList(kept)]) + b"\r\n" if kept else None


def _asked_entries(session, mailbox: str) -> set[bytes]:
    """The entries (lower case) a GETMETADATA in flight asked by name of ``mailbox``, a folder hidden from
    the device that shows its sync preferences alone (``cmd.state["prefs_only"]``); an empty set for
    any other response (GETMETADATA "*", unsolicited)."""
    for c in session.inflight_commands():
        if c.name == b"GETMETADATA" and c.state.get("prefs_only", (None,))[0] == mailbox:
            return c.state["prefs_only"][1]
    return set()


_METADATA_MAILBOX_RE = re.compile(rb'\* METADATA ("(?:[^"\\]|\\.)*"|[^ "{(]+) ', re.IGNORECASE)


def _metadata_mailbox(data: bytes) -> str | None:
    """The mailbox a ``* METADATA`` response is about ("" for the account; None if not read here)."""
    m = _METADATA_MAILBOX_RE.match(data)
    if m is None:
        return None
    try:
        raw = astring_text(tokenize(m.group(1))[0])
    except (TokenError, IndexError):
        return None
    return mailbox_name(raw) if raw else ""


def filter_metadata_response(data: bytes, asked: set[bytes] | None = None) -> bytes | None:
    """One whole ``* METADATA`` response (literals inline, CRLF included) without the entries clients may
    not see: ``data`` itself if none is there, None if nothing remains (or if it cannot be read and names
    the vendor prefix: never shown unfiltered). Both forms: ``(entry value ...)`` and the unsolicited
    list of entry names (RFC 5464 section 4.4). ``asked`` (not None): the response is about a folder
    hidden from the device that shows its CPM sync preferences alone; any other entry is left out, or,
    if the command asked for it by name (in ``asked``), answered NIL, as the backend answers an entry
    that is not there."""
    if asked is None and b"vendor.cpmproxy" not in data.lower():
        return data
    visible = _entry_visible if asked is None else _sync_entry
    try:
        tokens = tokenize(data[:-2] if data.endswith(b"\r\n") else data.rstrip(b"\n"))
    except TokenError:
        return None
    if len(tokens) < 4:
        return None
    if len(tokens) == 4 and isinstance(tokens[3], ParenList):
        items = tokens[3].items
        if len(items) % 2:
            return None
        kept = []
        for j in range(0, len(items), 2):
            if visible(items[j]):
                kept += items[j:j + 2]
            elif asked and (token_text(items[j]) or b"").lower() in asked:
                kept += [items[j], Nil()]
        if kept == items:
            return data
        return format_tokens(tokens[:3] + [ParenList(kept)]) + b"\r\n" if kept else None
    names = tokens[3:]
    kept = [t for t in names if visible(t)]
    if len(kept) == len(names):
        return data
    return format_tokens(tokens[:3] + kept) + b"\r\n" if kept else None


_PREF_FOLDERS = pref_entry("folders") + "/"


def pref_folder_entry(mailbox: str) -> bytes:
    # Hex: entry names are case-folded by Dovecot and restricted in their characters.
    return (_PREF_FOLDERS + mailbox.encode("utf-8").hex()).encode()


def parse_pref_folders(lines: list[bytes]) -> dict[str, bytes]:
    """Folders marked as having preferences, with their marks' values (a new one at each change of the
    folder's preferences), from a METADATA response for the account."""
    out = {}
    for raw, entry, value in iter_metadata(lines):
        low = entry.lower()
        if raw == b"" and low.startswith(_PREF_FOLDERS.lower()):
            try:
                out[bytes.fromhex(low[len(_PREF_FOLDERS):]).decode("utf-8")] = value or b""
            except ValueError:
                continue
    return out


def parse_metadata_prefs(lines: list[bytes], mailbox: str | None = None) -> dict[str, str]:
    """CPM preferences in METADATA responses (only those of ``mailbox`` when given: pipelined
    commands may be answered out of order, so responses are matched by name, not by position)."""
    prefs = {}
    for raw, entry, value in iter_metadata(lines):
        if mailbox is not None and (raw is None or (mailbox_name(raw) if raw else "") != mailbox):
            continue
        key = pref_key(entry)
        if key in PREFERENCES:
            prefs[key] = value.decode("utf-8", "replace").strip().lower()
    return prefs
