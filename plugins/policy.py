"""Sync policy and user preferences: each device sees a filtered view of the store (DESIGN.md R1, R4).

Provider policy (``[policy]`` in the config, with ``[[policy.class]]`` overrides per user and device)
decides which folders and which kinds of CPM objects are synchronized, size and age limits, and which
preferences a user may change. User preferences are METADATA entries under
``/private/vendor/vendor.cpmproxy/`` on the backend (account-wide on mailbox ``""``, or per folder).

Hidden folders do not exist for the device; hidden messages do not exist in its mailboxes, with sequence
numbers renumbered in every command and response (``plugins.view.MailboxView``). Where nothing is hidden
the view is not built at all.

This module is the plugin and its view of the selected mailbox (commands, responses, SELECT). Its other
parts, each a mixin of ``PolicyPlugin``: ``policyfolders`` (which folders exist for the device),
``policyprefs`` (the user's preferences), ``policystatus`` (counts as the device sees them); the settings
in ``policyconfig``, searches in a view in ``viewsearch``, what the parts share in ``policystate``.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from cpmproxy.config import ConfigError
from cpmproxy.imap.framing import renumber_fetch_lines
from cpmproxy.imap.seqset import SequenceSet, SequenceSetError
from cpmproxy.imap.tokens import (
    Atom,
    Literal,
    LiteralRef,
    ParenList,
    TokenError,
    astring_text,
    format_tokens,
    token_text,
    tokenize,
)
from cpmproxy.proxy.backend import UNAVAILABLE, BackendError
from cpmproxy.proxy.hooks import Answer, Collect, Defer, Drop, Hold, Plugin, Rewrite, resolved
from plugins.cpm import (
    KIND_CRITERIA,
    NO_SERVER_CHANGE,
    VIEW_ITEM,
    ClassificationCache,
)
from plugins.policyconfig import DeviceClass, Policy, parse_policy
from plugins.policyfolders import FolderRules
from plugins.policyprefs import Preferences
from plugins.policystate import (
    _MISSING_AT,
    FOLDERS_TOPIC,
    PolicySession,
    SelectPlan,
    _as_missing,
    _esearch_ranges,
    _oldest,
    _parse_uidvalidity,
    _select_state,
    _uid_ranges,
    _uid_set,
    _uidvalidity,
    side_examine,
)
from plugins.policystatus import MailboxReplaced, StatusCounts
from plugins.view import MailboxView, expand_ranges
from plugins.viewsearch import (
    INLINE_HIDDEN_MAX,
    INLINE_SET_MAX,
    SearchRefused,
    esearch_options,
    local_esearch_options,
    renumber_ordered_set,
    rewrite_search_keys,
    visible_esearch,
    visible_in_order,
)
from plugins.wire import (
    FETCH_ITEMS,
    MODIFIED,
    SEARCH_COMMANDS,
    command_mailbox_name,
    enables_qresync,
    esearch_all,
    fetch_item_names,
    has_caps,
    list_name,
    list_without_extended,
    mailbox_name,
    refused_as_dovecot,
    search_ok,
    uid_set_pieces,
    unknown_search_key,
    wire_name,
)

log = Logger(namespace="cpmproxy.policy")


# -- per-session state ----------------------------------------------------------------------------


MAX_UID = 4294967295  # RFC 9051: UIDs are non-zero 32-bit numbers
_MAX_CACHED_RANGES = 256  # a mailbox's UIDs are cached as ranges; a very fragmented one is not cached
_MAILBOX_ARG = {b"SELECT": 0, b"EXAMINE": 0, b"STATUS": 0, b"DELETE": 0, b"APPEND": 0,
                b"SUBSCRIBE": 0, b"UNSUBSCRIBE": 0, b"CREATE": 0, b"RENAME": 0, b"COPY": 1, b"MOVE": 1,
                b"GETQUOTAROOT": 0}
_SEQ_COMMANDS = frozenset((b"FETCH", b"STORE", b"COPY", b"MOVE"))
# UID FETCH's modifiers (RFC 7162 3.6): "(CHANGEDSINCE n VANISHED)", the last parenthesized group.
_VANISHED_MODIFIER_RE = re.compile(rb"\((?:[^()]*\s)?VANISHED(?:\s[^()]*)?\)\s*$", re.IGNORECASE)
_SEQ_USING = frozenset((b"FETCH", b"STORE", b"COPY", b"MOVE", b"SEARCH", b"SORT", b"THREAD"))  # (unless UID)
_EXPUNGE_ISSUED = b"[EXPUNGEISSUED]"  # (RFC 9051 7.1: a search met messages expunged meanwhile)
_EXPUNGING = frozenset((b"EXPUNGE", b"MOVE", b"CLOSE"))  # (UID EXPUNGE, UID MOVE too)
_RETURNING_RE = re.compile(rb"\S+ (?:UID )?(?:SEARCH|SORT) RETURN \(", re.I)
# Commands after which the backend has the selected mailbox no more (CLOSE: _may_reach_unannounced). A DELETE or
# RENAME of it (or of a parent) leaves it selected at Dovecot, which answers the next command with a BYE
# ("Selected mailbox was deleted", "IMAP session state is inconsistent"): whichever folder they name, as a
# literal or in another form too. After a LOGOUT the backend answers nothing more, and closes.
_LEAVES_MAILBOX = frozenset((b"SELECT", b"EXAMINE", b"UNSELECT", b"DELETE", b"RENAME", b"LOGOUT"))
_NO_EXPUNGE_DURING = frozenset((b"FETCH", b"STORE", b"SEARCH", b"SORT", b"THREAD"))  # (by number: RFC 9051 7.5.1)
_NOT_OFFERED = frozenset((b"CONTEXT=SEARCH", b"CONTEXT=SORT", b"CATENATE", b"URL-PARTIAL"))
# The backend's capabilities a device is offered under the policy plugin: those whose commands, responses
# and parameters the view is known to translate or check (message numbers, UIDs, mailbox names, counts).
# An allowlist: a backend upgraded to one with new extensions (REPLACE, UIDONLY, MULTISEARCH, OBJECTID,
# LIST-METADATA, QUOTA, ACL, ...) does not offer them to devices through a view that does not know them.
# Parameterized ones by prefix; the proxy's own (XCPM-*; APPENDLIMIT=, which the proxy computes) pass.
_OFFERED = frozenset((
    b"IMAP4REV1", b"ID", b"ENABLE", b"IDLE", b"LITERAL+", b"LITERAL-", b"NAMESPACE", b"UNSELECT", b"CHILDREN",
    b"UIDPLUS", b"MOVE", b"MULTIAPPEND", b"BINARY", b"I18NLEVEL=1", b"WITHIN", b"SAVEDATE", b"PREVIEW",
    b"SORT", b"ESORT", b"ESEARCH", b"SEARCHRES", b"CONDSTORE", b"QRESYNC", b"LIST-EXTENDED", b"LIST-STATUS",
    b"SPECIAL-USE", b"CREATE-SPECIAL-USE", b"STATUS=SIZE", b"METADATA", b"METADATA-SERVER", b"NOTIFY",
    b"QUOTA", b"QUOTASET"))  # (QUOTA: GETQUOTAROOT's mailbox is checked; usage is the account's, as stored)
_OFFERED_PREFIXES = (b"SORT=", b"THREAD=", b"PREVIEW=", b"SNIPPET=", b"APPENDLIMIT=", b"XCPM-", b"QUOTA=")
# Commands a device may send under the policy plugin: those of IMAP4rev1 and of the extensions offered
# (the proxy itself answers CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE, COMPRESS and UNAUTHENTICATE). Any
# other is refused here, not passed on: a client may send an extension's command blindly (REPLACE names a
# message by number and a mailbox, MULTISEARCH's ESEARCH searches several mailboxes, ACL and QUOTA
# commands name mailboxes, Dovecot's XLIST lists them), and a backend that knows it would run it past the
# view.
_COMMANDS = frozenset((
    b"NOOP", b"LOGOUT", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE", b"CHECK", b"SELECT", b"EXAMINE", b"CREATE",
    b"DELETE", b"RENAME", b"SUBSCRIBE", b"UNSUBSCRIBE", b"LIST", b"LSUB", b"STATUS", b"APPEND", b"CLOSE",
    b"UNSELECT", b"EXPUNGE", b"SEARCH", b"FETCH", b"STORE", b"COPY", b"MOVE", b"SORT", b"THREAD",
    b"GETMETADATA", b"SETMETADATA", b"NOTIFY", b"GETQUOTA", b"GETQUOTAROOT", b"SETQUOTA"))
_UID_COMMANDS = frozenset((b"FETCH", b"STORE", b"COPY", b"MOVE", b"EXPUNGE", b"SEARCH", b"SORT", b"THREAD"))
# What ENABLE may turn on (RFC 5161): the rest (UTF8=ACCEPT, IMAP4rev2, UIDONLY: they change how responses
# and mailbox names look) is left out of the command, as a server ignores what it does not offer.
_ENABLE_OK = frozenset((b"CONDSTORE", b"QRESYNC"))
# RETURN options of a search (ESEARCH, SEARCHRES, PARTIAL) the view computes or renumbers; not RFC 5267's
# UPDATE and CONTEXT (CONTEXT=SEARCH/SORT, not offered: the backend's later ADDTO/REMOVEFROM would tell of
# hidden arrivals, in its numbers), nor another's.
_RETURN_OPTIONS_RE = re.compile(rb"\S+ (?:UID )?(?:SEARCH|SORT) RETURN \(([^()]*)\)", re.IGNORECASE)
_RETURN_OK = frozenset((b"MIN", b"MAX", b"ALL", b"COUNT", b"SAVE", b"PARTIAL"))
# LIST's RETURN options the policy's LIST handling knows (RFC 5258, 5819, 6154); not LIST-METADATA's
# METADATA (RFC 9590: entries of every folder listed), nor LIST-MYRIGHTS's MYRIGHTS (RFC 8440), nor another's.
_LIST_RETURN_OK = frozenset((b"SUBSCRIBED", b"CHILDREN", b"STATUS", b"SPECIAL-USE"))
# RFC 9394's FETCH modifier (not offered): a page of the messages a UID set names, hidden ones counted.
_PARTIAL_MODIFIER_RE = re.compile(rb"\((?:[^()]*\s)?PARTIAL\s[^()]*\)\s*$", re.IGNORECASE)
_URL_COMMANDS = frozenset((b"URLFETCH", b"GENURLAUTH", b"RESETKEY"))
_LITERAL_OR_QUOTED_RE = re.compile(rb'~?\{(\d+)\+?\}\r\n|"(?:[^"\\]|\\.)*"')
_APPEND_TOKEN_RE = re.compile(rb"\(|\)|[^\s()]+")


def _append_tokens(text: bytes) -> list[re.Match]:
    """The tokens of an APPEND's text (parentheses apart), quoted strings and literals (gathered inline)
    blanked to one token each: a mailbox name or a date may hold anything."""
    blank = bytearray(text)
    pos = 0
    while (m := _LITERAL_OR_QUOTED_RE.search(text, pos)) is not None:
        end = m.end() + int(m.group(1)) if m.group(1) is not None else m.end()
        blank[m.start():end] = b"x" * (min(end, len(text)) - m.start())
        pos = end
    return list(_APPEND_TOKEN_RE.finditer(bytes(blank)))


def _catenate_url(text: bytes) -> bool:
    """Whether an APPEND's first segment (literals gathered inline) makes its message of CATENATE parts
    with an IMAP URL among them (RFC 4469: ``CATENATE (TEXT {n} URL "/Secret/;UID=1")``). The keyword is
    found by position (after the mailbox, its flag list and date if any): a mailbox or a flag may be
    called CATENATE. TEXT parts alone are the client's own bytes, and pass."""
    tokens = _append_tokens(text)
    i = 3  # (tag, APPEND, the mailbox)
    if i < len(tokens) and tokens[i].group(0) == b"(":  # the flag list
        while i < len(tokens) and tokens[i].group(0) != b")":
            i += 1
        i += 1
    if i < len(tokens) and text[tokens[i].start():tokens[i].start() + 1] == b'"':  # the date
        i += 1
    if i >= len(tokens) or tokens[i].group(0).upper() != b"CATENATE":
        return False
    return any(t.group(0).upper() == b"URL" for t in tokens[i + 1:])


def _refuse_urls(segment: bytes) -> bytes | None:
    """A later segment of an APPEND (after a literal: the next part of a CATENATE, a MULTIAPPEND's next
    message) as it is, or None (the command refused) when it has a URL part."""
    return None if any(t.group(0).upper() == b"URL" for t in _append_tokens(segment)) else segment
# FETCH items that set \Seen (RFC 9051 6.4.5): BODY[...] and BINARY[...] without .PEEK, RFC822, RFC822.TEXT.
_SETS_SEEN_RE = re.compile(rb"(?:BODY|BINARY)\[|RFC822(?:\.TEXT)?(?![.\w])", re.IGNORECASE)
_SEQ_ARG_RE = re.compile(rb"^(\S+ (?:UID )?\S+ )(\S+)(.*)$", re.S | re.I)
_UNCHANGEDSINCE_RE = re.compile(rb"\s*\([^()]*UNCHANGEDSINCE", re.I)  # (RFC 7162: [MODIFIED] in the client's numbers)


# Views whose tables are kept for sharing (each ~0.7 MB at 20,000 messages), and the smallest mailbox worth it.
SHARED_TABLES_MAX = 32
SHARED_TABLES_MIN = 1000
# And at most this many messages in all the kept views of each kind (tables, whole views): a lent view
# of 200,000 messages holds ~46 MB (its UID list, hidden set and tables).
SHARED_TABLES_MAX_MESSAGES = 1_000_000


# The classification cache's bounds ([policy] keys): mailboxes, and the UIDs their kind sets hold in all (a
# mailbox of 20,000 messages, a quarter of them IMDNs, keeps ~0.4 MB: 2,000,000 UIDs are some 170 MB).
CACHE_BOUNDS = {"classification_cache_mailboxes": 20000, "classification_cache_uids": 2_000_000}
# Folders a session keeps what it knows of beyond those with facts of their own (FolderRules._forget_plain_folders).
SESSION_FOLDERS = 10000


class PolicyPlugin(StatusCounts, Preferences, FolderRules, Plugin):
    name = "policy"
    config_section = "policy"

    def __init__(self, proxy):
        super().__init__(proxy)
        self.base = Policy()
        self.classes: list[DeviceClass] = []
        self.cache = ClassificationCache()
        self.session_folders = SESSION_FOLDERS
        self.session_history_cache: dict[tuple[str, str], bool] = {}
        # (user, folder) found holding messages and no Session History, until when (monotonic): a folder's
        # session info may come after its messages, so "not one" is remembered only briefly; a session
        # remembers it itself (its FolderInfo). For pushes, whose every event would otherwise ask again.
        self.not_session_history: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Tables of recent filtered views, shared by sessions that see the same view (_share_tables).
        self._tables: OrderedDict[tuple, tuple] = OrderedDict()
        # Recent views hiding by kind or size, lent whole to a later SELECT of the same state (_borrowed_view).
        self._whole_views: OrderedDict[tuple, tuple] = OrderedDict()
        # The backend said "* OK [CLOSED]" at a SELECT after another (Dovecot always does; RFC 9051 too): the
        # end of what it says of the mailbox left is that, not the next SELECT's first response.
        self.closes_mailboxes = False
        self._hiders_of = None  # the hook table _hider_plugins was taken from
        self._hider_plugins: list = []
        self._offered: dict[tuple, list[bytes]] = {}  # capability lists filtered (capabilities)
        self._unknown_caps: set[bytes] = set()  # backend capabilities not offered, logged once each

    def hiders(self, session) -> list:
        """Other enabled plugins that hide messages too (hiding is one operation, whoever asks for it):
        any plugin with

        - ``active(session) -> bool``: whether it may hide anything in this session;
        - ``query(session, mailbox) -> Deferred[Reply]``: its question to the backend, sent at once so
          that it pipelines with the SELECT;
        - ``async hidden(session, mailbox, uidvalidity, reply=None) -> SequenceSet | set[int]`` (UIDs),
          from ``query``'s ``reply`` (or asking anew without one);
        - optionally ``has_records(session, reply) -> bool``: a cheap look at the reply first (False:
          nothing hidden, the view's fast path);
        - a ``reply`` with ``keep_view = True``: a view is built even where nothing is hidden (a plugin
          that reads message numbers in responses, as local delete's pending marks).

        (``plugins/localdelete.py`` is one.)"""
        hooks = self.proxy.hooks
        if self._hiders_of is not hooks:  # (which plugins can hide changes only with the plugin set)
            self._hider_plugins = [p for p in hooks.plugins
                                   if p is not self and hasattr(p, "hidden") and hasattr(p, "active")]
            self._hiders_of = hooks
        return [p for p in self._hider_plugins if p.active(session)]

    def configure(self, settings: dict[str, Any]) -> None:
        settings = dict(settings)
        bounds = []
        for key, default in [*CACHE_BOUNDS.items(), ("session_folders", SESSION_FOLDERS)]:
            value = settings.pop(key, default)  # (the process's, not a policy's: no class sets them)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"policy.{key}: expected a number >= 1")
            bounds.append(value)
        self.base, self.classes = parse_policy(settings)
        self.cache.resize(*bounds[:2])
        self.session_folders = bounds[2]

    def reloaded(self) -> None:
        """A new policy: the sessions already open take it up as they would a preference change (a
        selected folder's view is recomputed, what is now hidden announced as expunged, a folder now
        excluded ends the session that has it selected)."""
        for session in list(self.proxy.sessions):
            st = session.state.get(self.name)
            if st is None or session.user is None:
                continue
            policy = self.policy_for(session.user, session.device_id, session.client_id.get("name") or "")
            if policy != st.policy:  # (a reload that leaves a session's policy as it was costs it nothing)
                names = list(st.folders)
                before = {n for n in names if self.folder_hidden(st, n)}
                st.policy = policy
                if self.proxy.events.has_subscribers(FOLDERS_TOPIC):
                    self._announce_folders(session, st, names, before)
                self._reapply_view(session, st)

    # -- policy resolution ----------------------------------------------------------------------

    def policy_for(self, user: str, device_id: str, id_name: str) -> Policy:
        policy = self.base
        fold = bool(self.classes) and self.proxy.config.backend["username_case"] == "lower"
        for cls in self.classes:
            if cls.matches(user, device_id, id_name, fold):
                settings = cls.settings
                if "sync" in settings:  # (kind by kind: a class that hides chat keeps the base's imdn rule)
                    settings = {**settings, "sync": tuple({**dict(policy.sync), **dict(settings["sync"])}.items())}
                policy = replace(policy, **settings)
        return policy

    def device_state(self, user: str, device_id: str, id_name: str, account: PolicySession) -> PolicySession:
        """The policy state of a device that is not connected (push): its policy, matched as at its login
        (``id_name``: its ID "name" if known, else ""), with the account's preferences as ``account`` (a
        session's of the same user, or an offline watch's) last read them. Its folder facts start empty."""
        return PolicySession(self.policy_for(user, device_id, id_name), account_prefs=account.account_prefs,
                             pref_folders=account.pref_folders)

    def state(self, session) -> PolicySession:
        st = session.state.get(self.name)
        if st is None:
            policy = self.policy_for(session.user or "", session.device_id, session.client_id.get("name") or "")
            st = session.state[self.name] = PolicySession(policy)
        return st

    # -- hooks: login (the account-wide preferences are read: policyprefs), capabilities ----------

    def login(self, session):
        return defer.Deferred.fromCoroutine(self._login(session))

    def selected(self, session, mailbox) -> None:
        """No mailbox selected at the backend any more, other than by the SELECT it is beginning (a SELECT
        another plugin refused, which the proxy unselects at the backend; CLOSE; UNSELECT): no view."""
        st = session.state.get(self.name)
        if mailbox is None and st is not None and session.selecting is None:
            st.view = None
            st.mailbox = None
            st.leaving = False  # (a SELECT refused here: the proxy's UNSELECT takes over, session.unselecting)
            st.closing = None

    def capabilities(self, session, caps):
        """The capabilities in ``_OFFERED`` (and the proxy's own), and XCPM-VIEW. Known and not offered:
        CONTEXT=SEARCH/SORT (RFC 5267: results the backend updates on its own later, ADDTO/REMOVEFROM as
        messages arrive, which may be hidden ones, are not renumbered on the view); IMAP URLs (CATENATE,
        URLAUTH, URL-PARTIAL) name folders and UIDs the view does not check. Any other is left out too,
        logged once (an operator may wonder why a backend's extension is not offered)."""
        key = tuple(caps)
        out = self._offered.get(key)
        if out is None:
            out = []
            for c in caps:
                u = c.upper()
                if u in _OFFERED or u.startswith(_OFFERED_PREFIXES):
                    out.append(c)
                elif u not in _NOT_OFFERED and not u.startswith(b"URLAUTH") and u not in self._unknown_caps:
                    self._unknown_caps.add(u)
                    log.info("backend capability {cap} not offered to devices: the policy plugin's view does "
                             "not know it", cap=c.decode("ascii", "replace"))
            if len(self._offered) >= 16:  # (a few distinct lists: one a backend, a plugin or two adding theirs)
                self._offered.clear()
            self._offered[key] = out
        return out + [VIEW_ITEM]

    # -- commands -------------------------------------------------------------------------------

    def command(self, session, cmd):
        client = cmd.client or cmd  # (what the client sent: a plugin's rewrite is the plugin's)
        if client.name not in (_UID_COMMANDS if client.uid else _COMMANDS) and client.name not in _URL_COMMANDS:
            # (As Dovecot words it: the client is told no more than that the command is not known.)
            return refused_as_dovecot(client.name, b"Unknown command.", client.uid)
        st = self.state(session)
        if st.recomputing:
            # Preferences re-applied while the client idled (see _reapply_view): its commands after IDLE wait,
            # as a command does for a re-application started before it (_reapply_then).
            return Defer(defer.Deferred.fromCoroutine(self._after_recompute(session, st, cmd)))
        if st.restore_saved is not None:
            # The client's $, which a COPY or MOVE of the proxy's making replaced, back before it is used.
            saved, st.restore_saved = st.restore_saved, None
            return Defer(defer.Deferred.fromCoroutine(self._restore_then(session, saved, cmd)))
        st.quiet_recent = False  # (a RECENT after a dropped EXISTS comes with it, before any new command)
        if cmd.name in (b"SELECT", b"EXAMINE") and b"QRESYNC" in cmd.line.upper():
            st.vanish_check = True
        if st.selecting is not None:
            # Pipelined behind a SELECT whose view is not built yet: its message numbers (and what it may
            # touch) are the view's, known once the SELECT completes.
            return Defer(defer.Deferred.fromCoroutine(self._after_done(session, st.selecting, cmd)))
        client = cmd.client or cmd  # (the client's numbers count, not those of a plugin's rewrite)
        if (earlier := self._must_wait_for(session, st, client)):
            return Defer(defer.Deferred.fromCoroutine(self._after_done(session, earlier, cmd)))
        if st.grown is not None and (client.name in _LEAVES_MAILBOX or _may_reach_unannounced(st.view, client)
                                     or (client.name == b"STATUS" and _status_of_selected(st, client))):
            # New messages are being classified (an EXISTS with no client command in flight: one the
            # backend sent after a command of a plugin's own): this command could reach them at the
            # backend, which has them already, before the view says which are hidden. Or it leaves the
            # mailbox, where the classification may still have a search to send (after [EXPUNGEISSUED]):
            # run in the next mailbox, or in none, its answer went into this one's cache (found by review);
            # after a DELETE or RENAME of it, Dovecot answered it with a BYE, and the device never got its
            # command's OK (found by review).
            return Defer(defer.Deferred.fromCoroutine(self._after_growth(session, st, cmd)))
        if st.reapply and (client.uid or client.name not in _SEQ_USING
                           or (st.mailbox is not None and self.folder_hidden(st, st.mailbox))):
            # (Not before a command that names messages by number, which the client wrote in the numbers
            # it knows, and during which no EXPUNGE may be sent: RFC 9051 7.5.1. A folder turned off
            # ends the session at once: BYE may come at any time.)
            st.reapply = False
            return Defer(defer.Deferred.fromCoroutine(self._reapply_then(session, st, cmd)))
        name = cmd.name
        if name == b"ENABLE":
            return _enable(cmd)
        if name in (b"SEARCH", b"SORT") and (m := _RETURN_OPTIONS_RE.match(cmd.line)) is not None \
                and (refused := _return_refused(m.group(1).split())) is not None:
            return Answer(b"NO [CANNOT] RETURN option " + refused + b" is not available here.")
        if name == b"FETCH" and _PARTIAL_MODIFIER_RE.search(cmd.line):
            # (The backend would page through hidden messages too, their answers dropped: short pages.)
            return refused_as_dovecot(b"FETCH", b"Unknown FETCH modifier.", cmd.uid)
        if name == b"FETCH":
            if cmd.has_literal and "collected" not in cmd.state:
                return Collect()  # (a header field name as a literal: the items after it are checked too)
            if (refused := _fetch_refused(cmd)) is not None:
                return refused
        if name == b"NOTIFY":
            if cmd.has_literal and "collected" not in cmd.state:
                return Collect()  # (a mailbox name as a literal: the fetch attributes after it are checked too)
            if (refused := _notify_fetch_refused(cmd)) is not None:
                return refused
        if name in SEARCH_COMMANDS:
            if cmd.has_literal and "collected" not in cmd.state:
                return Collect()  # (a string as a literal: the keys after it are checked too)
            if (refused := _search_refused(cmd)) is not None:
                return refused
        if name in (b"SELECT", b"EXAMINE"):
            if session.selected is not None:
                # (The commands before it are done: see _must_wait_for.) From here on the client has left
                # the mailbox, whatever the decision; the backend has it until it reads the command.
                st.leaving = True
                st.growing_to = st.exists_told = None  # (an arrival there being classified: never told)
            if cmd.has_literal and "collected" not in cmd.state:
                return Collect()  # (a literal after the name too: read whole, for the check below)
            if "collected" in cmd.state and _binary_literal(cmd.args):
                # Dovecot refuses a literal8 outside APPEND as it parses the line, before the command runs:
                # the mailbox selected before stays selected there, while a failed SELECT leaves none here
                # and its view was dropped (its hidden messages were read). Refused here, which unselects
                # the backend's too.
                return refused_as_dovecot(name, b"literal8 not allowed here.")
        if name in (b"SETMETADATA", b"GETMETADATA"):
            return self._metadata_command(session, st, cmd)
        if name in (b"LIST", b"LSUB"):
            if cmd.has_literal and "collected" not in cmd.state:
                return Collect()  # (a literal pattern: RETURN's STATUS items come after it)
            if name == b"LIST" and not _list_returns_known(_args_or_none(cmd)):
                return refused_as_dovecot(b"LIST", b"Unknown return options.")
            return Defer(defer.Deferred.fromCoroutine(self._before_list(session, st, cmd)))
        if name in _URL_COMMANDS or (name == b"APPEND" and _catenate_url(cmd.line)):
            # (Refused, as not offered: an IMAP URL reads any folder and UID, past the view.)
            return Answer(b"NO [CANNOT] IMAP URLs (CATENATE URL parts, URLAUTH) are not available here.")
        if name == b"APPEND" and cmd.has_literal:
            # What follows a literal (a CATENATE's next parts, a MULTIAPPEND's next messages) comes in
            # later segments: a URL part there makes the backend refuse the whole command.
            cmd.state.setdefault("later_segments", []).append(_refuse_urls)
        if name in _MAILBOX_ARG:
            if _literal_mailbox(cmd):
                # The name is a literal: let the proxy gather it (for APPEND only the name, not the message).
                return Collect(literals=1 if name == b"APPEND" else None)
            if name in (b"SELECT", b"EXAMINE"):
                action = self._select_now(session, st, cmd)
                if action is not _LATER:
                    return action
            return Defer(defer.Deferred.fromCoroutine(self._mailbox_command(session, st, cmd)))
        view = st.view
        if view is not None and cmd.has_literal and "collected" not in cmd.state and \
                name in (b"FETCH", b"SEARCH", b"SORT", b"THREAD"):
            # Read whole wherever messages can be hidden, a view with none hidden yet included: what follows
            # a literal decides (found by review: a body read after a literal header field name set \Seen on
            # hidden messages, on a hidden arrival before its classification too; a RETURN (COUNT) search
            # counted such an arrival).
            return Collect()
        if view is not None and view.identity and name in (b"SEARCH", b"SORT") and not cmd.has_literal \
                and _RETURNING_RE.match(cmd.line):
            # A result the backend computes something from (COUNT, MIN/MAX, $): of the messages the view
            # knows, not one the backend took in during a command in flight, which may be hidden.
            return Rewrite(cmd.line.rstrip(b"\r\n") + b" " + format_tokens(_known_only(view)) + b"\r\n")
        if view is not None and not view.identity:
            if name in (b"EXPUNGE", b"CLOSE") and not cmd.uid and has_caps(session, b"UIDPLUS", b"UNSELECT"):
                if earlier := session.inflight_commands():
                    # Its search of the \Deleted messages must see what the commands before it stored. The
                    # proxy sends it behind them, but Dovecot runs pipelined commands side by side, and its
                    # search missed a STORE in flight once another connection had first opened the folder
                    # with CONDSTORE while it was selected here (9f404ea's side EXAMINE, after the SELECT;
                    # any CONDSTORE client's): `STORE 2 +FLAGS (\Deleted)`, `EXPUNGE` pipelined expunged
                    # nothing. (A CLOSE waits already: _must_wait_for.)
                    return Defer(defer.Deferred.fromCoroutine(self._after_done(session, earlier, cmd)))
                return Defer(defer.Deferred.fromCoroutine(self._expunge_visible(session, view, cmd)))
            return self._view_command(session, st, view, cmd)
        return None

    async def _restore_then(self, session, saved: list[int], cmd):
        await self._restore_saved(session, saved)
        return await resolved(self.command(session, cmd))

    async def _saved_result_visible(self, session, view: MailboxView, cmd, m):
        """STORE / COPY / MOVE / UID EXPUNGE of ``$`` (or a FETCH of it that reads bodies) under a filtered
        view: of the messages in it that are visible now. ``$`` saved holds visible ones only; those hidden
        since (a preference changed) are taken out of it at the backend, a few KB at a time, and ``$`` goes
        on as the client wrote it (one command: COPY's COPYUID, however many messages; the backend resolves
        ``$`` in order with what was pipelined before, RFC 5182)."""
        reply = await session.backend_command(b"UID SEARCH RETURN (ALL) $")
        if reply.status != b"OK":
            return None  # (no saved result: the backend answers the command as it would)
        saved = set(esearch_all(reply))
        await self.classified(session)
        hidden = saved - view.known_visible(saved)
        if hidden == saved:
            return _of_no_message(cmd, cmd.tag + b" UID " + cmd.name + b" ", m.group(3)) if saved else None
        pieces = uid_set_pieces(SequenceSet.from_iterable(hidden)) if hidden else []
        return await _run_all(session, [b"SEARCH RETURN (SAVE) $ NOT UID " + piece for piece in pieces])

    async def _expunge_visible(self, session, view: MailboxView, cmd):
        """EXPUNGE / CLOSE under a filtered view remove only the visible messages marked \\Deleted (a
        hidden message does not exist for this device, whoever marked it): UID EXPUNGE of those."""
        st = self.state(session)
        if cmd.name != b"CLOSE":
            return await self._expunge_visible_now(session, st, view, cmd)
        st.closing = []  # (until its tagged answer: see _closing_response)
        cmd.state["closing"] = True
        try:
            return await self._expunge_visible_now(session, st, view, cmd)
        except BaseException:
            # Answered by the proxy (NO), the client still in the mailbox: told what changed its counts
            # meanwhile, and from now on all of it again (found by review: the CLOSE's search refused, every
            # later EXPUNGE and EXISTS of the mailbox was dropped, the device's numbers wrong from then on).
            told, st.closing = st.closing, None
            if told:
                session.inject(b"".join(told))
            raise

    async def _expunge_visible_now(self, session, st: PolicySession, view: MailboxView, cmd):
        reply = await session.backend_command(b"UID SEARCH RETURN (ALL) DELETED")
        await self.classified(session)  # (the answer passes a held EXISTS)
        targets = view.known_visible(esearch_all(reply))
        # (In pieces of a few KB: scattered between hidden ones, they can be more than a command line holds.
        # The pieces' EXPUNGE responses reach the client while its EXPUNGE is in progress: legal; a CLOSE's
        # do not, see _closing_response.)
        pieces = uid_set_pieces(SequenceSet.from_iterable(targets)) if targets else []
        if not pieces:
            cmd.state[NO_SERVER_CHANGE] = True
        last = pieces.pop() if cmd.name == b"EXPUNGE" and pieces else None
        if (refused := await _run_all(session, [b"UID EXPUNGE " + piece for piece in pieces])) is not None:
            if cmd.name == b"CLOSE":
                # Still in the mailbox: told what changed its counts meanwhile, before the refusal.
                refused.untagged, st.closing = st.closing, None
            return refused
        if cmd.name == b"EXPUNGE":
            cmd.state["tagged_text"] = b"Expunge completed."
            return Rewrite(cmd.tag + (b" UID EXPUNGE " + last if last else b" NOOP") + b"\r\n")
        # CLOSE: then the mailbox is left without expunging anything else.
        cmd.state["tagged_text"] = b"Close completed."
        return Rewrite(cmd.tag + b" UNSELECT\r\n")

    async def _before_list(self, session, st, cmd):
        noselect: set[str] = set()
        names = await self._all_folders(session, noselect)
        await self.folder_infos(session, names)
        shown, childless, cmd.state["parents_only"] = self._list_shape(st, names, noselect)
        cmd.state["childless"] = {name: name in noselect for name in childless}
        if len(shown) < len(names) and (cmd.name == b"LSUB" or b"SUBSCRIBED" in cmd.line.upper()):
            # Parents listed for their subscribed folders (LSUB "%", RECURSIVEMATCH's CHILDINFO): which
            # of those the device sees.
            subscribed = await self._all_folders(session, subscribed=True)
            cmd.state["subscribed"] = set(subscribed)
            cmd.state["subscribed_above"] = self._subscribed_above(st, names, shown, subscribed)
        if b"STATUS" in cmd.line.upper() and b"RETURN" in cmd.line.upper():
            # LIST-STATUS counts must be the view's too, like STATUS's.
            return self.count_at_answer(session, st, cmd, names)
        return None

    def _select_now(self, session, st: PolicySession, cmd):
        """SELECT / EXAMINE decided at once in the common case (a folder this session knows, or one that
        needs no read to know, where nothing can be hidden): no coroutine, no Deferred. ``_LATER`` when
        ``_mailbox_command`` must decide."""
        args = cmd.args
        raw = astring_text(args[0]) if args else None
        if raw is None:
            return _LATER
        mailbox = command_mailbox_name(raw)
        if not self._folder_info_now(session, st, mailbox):
            return _LATER
        if self.folder_hidden(st, mailbox):
            return _as_missing(cmd, mailbox)
        if any(self._criteria(st, mailbox)) or self.hiders(session) or self.real_folders_matter(session, st, mailbox):
            return _LATER
        st.view = None  # (what _plan_select's fast path sets)
        st.mailbox = mailbox
        st.plan = None
        return None

    async def _mailbox_command(self, session, st: PolicySession, cmd):
        args = cmd.args
        index = _MAILBOX_ARG[cmd.name]
        targets = [index] + ([1] if cmd.name == b"RENAME" else [])
        names = []
        for i in targets:
            if i >= len(args):
                return None  # the backend will say BAD
            raw = astring_text(args[i])
            if raw is None:
                return None
            names.append(command_mailbox_name(raw))
        if cmd.name == b"CREATE" or (cmd.name == b"RENAME"):
            # (A trailing separator names the same folder: RFC 3501 6.3.3, and Dovecot takes it so.)
            new = names[-1].rstrip("/") or names[-1]
            if not st.policy.folder_allowed(new):
                return Answer(b"NO [CANNOT] That mailbox name is not allowed by the service provider's policy.")
            # A name the device cannot see (a hidden folder there, or preferences that hide it) is not
            # one it can make: the backend's ALREADYEXISTS would tell of a folder that does not exist for
            # it, and a folder made so would vanish from its list at once.
            st.folders.pop(new, None)
            await self.folder_infos(session, [new])
            if self.folder_hidden(st, new):
                return Answer(b"NO [CANNOT] That mailbox name is not available to this device.")
            st.folders.pop(new, None)  # (read for the name before the folder is there: not kept)
            if cmd.name == b"CREATE":
                return None
            # A RENAME takes the folders below along (RFC 9051 6.3.5): not where one of them is hidden from
            # this device (it would act on a folder that does not exist for it, and bring it into view).
            old = names[0].rstrip("/") or names[0]
            noselect: set[str] = set()
            every = await self._all_folders(session, noselect)
            below = [n for n in every if n.startswith(old + "/")]
            await self.folder_infos(session, [old] + below)
            if self.folder_hidden(st, old) or await self._only_above_hidden(session, st, old, every, noselect):
                # (Before the check below: a hidden folder, or a \Noselect parent there only for hidden ones,
                # is not one whose hidden children make the rename fail; it is missing.)
                return _as_missing(cmd, names[0])
            if any(self.folder_hidden(st, n) for n in below):
                return Answer(b"NO [CANNOT] That mailbox cannot be renamed from this device.")
            # Their preferences move with them (the marks say which folders have some: by name).
            for name in [old, *below]:
                moved = new + name[len(old):]
                if name in st.pref_folders and moved not in st.pref_folders:
                    await self._mark_pref_folder(session, moved)
            names, renamed_to = names[:1], new
        else:
            renamed_to = None
        early = None
        if cmd.name in (b"SELECT", b"EXAMINE"):
            # Pipelined with the folder checks: one round trip to the side connection, not three.
            hiders = self.hiders(session)
            criteria = self._criteria(st, names[0])
            # UIDVALIDITY (a STATUS, which makes the side process open the mailbox) only when the
            # policy may hide something here; otherwise only if a hider turns out to have records.
            status_d = (session.side_command(b"STATUS " + wire_name(names[0]) + b" (UIDVALIDITY)")
                        if any(criteria) else None)
            # (The criteria hold for the plan too unless the folder's own preferences are read below.)
            early = (status_d, [(h, h.query(session, names[0])) for h in hiders],
                     criteria if names[0] in st.folders else None)
        await self.folder_infos(session, names)
        if any(self.folder_hidden(st, n) for n in names):
            return _as_missing(cmd, names[0])
        if cmd.name in (b"DELETE", b"SUBSCRIBE") and \
                await self._only_above_hidden(session, st, names[0].rstrip("/") or names[0]):
            # A \Noselect parent LIST does not show (there only for hidden folders): Dovecot's "Mailbox has
            # children", or SUBSCRIBE's OK, would tell of them. (UNSUBSCRIBE, CREATE, SELECT, STATUS, APPEND:
            # the backend answers such a parent as a missing name already.)
            return _as_missing(cmd, names[0])
        if cmd.name in (b"SELECT", b"EXAMINE"):
            await self._plan_select(session, st, names[0], early)
            if st.plan is not None:
                st.selecting = cmd  # (commands pipelined behind it wait for its view: see command())
                line = _without_seq_match(cmd)
                if line is not None:
                    return Rewrite(line)
        elif cmd.name == b"STATUS":
            return self.count_at_answer(session, st, cmd, names)
        if cmd.name == b"DELETE" and (hidden := await self.status_adjustment(session, st, names[0], False)) \
                and hidden[0]:
            # Deleting the folder would delete messages that do not exist for this device (hidden ones are
            # never changed through its view): its own messages it can delete (STORE, EXPUNGE).
            return Answer(b"NO [CANNOT] That mailbox cannot be deleted from this device.")
        if cmd.name in (b"DELETE", b"RENAME"):
            async with side_examine(session):
                pass  # no side sequence has the mailbox open while the backend deletes or renames it
            # (A RENAME's new name too: whatever was known of it is not so now.) Every session of the user
            # here: the notify plugin tells them after the OK, but one may read the folder before it.
            self.forget_folders(session.user, names + ([renamed_to] if renamed_to else []))
        if cmd.name in (b"COPY", b"MOVE"):
            # The source messages are a sequence/UID set of the view, like FETCH or STORE.
            view = st.view
            if view is not None and not view.identity:
                return await resolved(self._view_command(session, st, view, cmd))
        return None

    # -- selecting: plan, then gather classification while the SELECT responses are held ---------

    def _criteria(self, st: PolicySession, mailbox: str) -> tuple[tuple[str, ...], int, int]:
        return self.hidden_kinds(st, mailbox), st.policy.max_size, st.policy.max_age_days

    async def _plan_select(self, session, st: PolicySession, mailbox: str, early) -> None:
        st.view = None
        st.mailbox = mailbox
        st.plan = None
        status_d, queries, criteria = early
        kinds, max_size, max_age = criteria or self._criteria(st, mailbox)
        real = self.real_folders_matter(session, st, mailbox)
        if real and self.cache.virtual(session.user, mailbox) is None:
            await self.probe_before_select(session, mailbox)
            real = self.real_folders_matter(session, st, mailbox)
        if not (kinds or max_size or max_age or queries or real):
            return  # fast path: nothing can be hidden here
        status = await status_d if status_d is not None else None
        if status is not None and status.status != b"OK":
            # No such folder (or none to open now): the SELECT most likely fails alike, with the backend's
            # own NO [NONEXISTENT]. The hiders' answers (refused just the same: a local-delete device's
            # SELECT of a folder that does not exist failed with the records' NO and a warning) are read
            # only if its responses come after all, as where no STATUS was asked.
            status_d = None
        if status_d is None:
            # No STATUS was asked (only hiders such as local delete may hide here, or the folder's own
            # preferences, read since, hide a kind): their queries run while the SELECT is at the backend,
            # not before it; its responses wait for the answers (_build_view), and UIDVALIDITY comes from
            # them.
            plan = SelectPlan(mailbox, 0, kinds, max_size, max_age, real_folders=real)
            plan.pending = queries
            st.plan = plan
            st.pending_select = True
            return
        replies = [(h, await d) for h, d in queries]
        uidvalidity = _parse_uidvalidity(status, mailbox)
        plan = SelectPlan(mailbox, uidvalidity, kinds, max_size, max_age, real_folders=real)
        for h, r in replies:
            plan.extra |= _uid_ranges(await h.hidden(session, mailbox, uidvalidity, r))
        if plan.empty:
            return
        st.plan = plan
        st.pending_select = True

    async def ensure_view(self, session) -> MailboxView | None:
        """The selected mailbox's view, built (identity) if the fast path skipped it; None if nothing is
        selected. Used by plugins that hide messages while a mailbox is selected."""
        st = self.state(session)
        if st.mailbox is None:
            return None
        if st.view is None:
            uidvalidity = await self._selected_uidvalidity(session, st)
            kinds, max_size, max_age = self._criteria(st, st.mailbox)
            st.plan = SelectPlan(st.mailbox, uidvalidity, kinds, max_size, max_age,
                                 real_folders=self.real_folders_matter(session, st, st.mailbox))
            uids, hidden = await self._classify(session, st.plan, b"1:*")
            # What the client was shown: everything (the fast path). Anything the policy hides now (a
            # preference changed since) leaves at the next command that may announce it, not here: the
            # command that asked is in the client's numbers.
            st.view = MailboxView(uids, set())
            if hidden:
                st.reapply = True
        return st.view

    async def _selected_uidvalidity(self, session, st: PolicySession) -> int:
        """The selected mailbox's UIDVALIDITY, from its SELECT's own answer. Asked by name (a STATUS on the side
        connection), it is that of the folder of that name now: another session may have deleted the selected
        one and made it anew, while the backend keeps this session in the old one (found by review: a local
        delete there was recorded under the new folder's UIDVALIDITY, and hid its message of that UID from
        the device for good). By name only while a SELECT is in flight, or the backend did not say."""
        sel = session.selected
        if sel is not None and sel.uidvalidity and sel.name == st.mailbox \
                and _oldest(session, (b"SELECT", b"EXAMINE")) is None:
            return sel.uidvalidity
        return await _uidvalidity(session, st.mailbox)

    def hide_in_view(self, session, uids: set[int]) -> list[int]:
        """Hide ``uids`` in the selected mailbox's view (``ensure_view``, then ``arrivals_told`` first);
        returns the client numbers to announce as EXPUNGE, in sending order."""
        st = self.state(session)
        if st.view is None:
            return []
        if st.plan is not None:
            st.plan.extra |= SequenceSet.from_iterable(uids)
        return st.view.hide(uids)

    async def _classify(self, session, plan: SelectPlan, uid_range: bytes,
                        snapshot: tuple[int, int] | None = None,
                        held_before: list | None = None) -> tuple[list[int], set[int]]:
        """All UIDs in ``uid_range`` and the hidden ones among them (one pipelined round trip).
        ``snapshot``: (EXISTS, UIDNEXT) from the SELECT being answered, for ``1:*``: if the cache has the
        UIDs of that very state, they are not asked for again. ``held_before``: gets the number of
        responses held when the UIDs were answered (``Reply.held_before``)."""
        cache = self.cache.get(session.user, plan.mailbox, plan.uidvalidity)
        kinds = set(plan.hidden_kinds)
        if "other" in kinds:
            kinds |= set(KIND_CRITERIA)
            kinds.discard("other")
        cached = snapshot is not None and cache.snapshot == snapshot
        all_d = None if cached else session.backend_command(b"UID SEARCH RETURN (ALL) UID " + uid_range)
        kind_ds = {}
        for kind in sorted(kinds):
            start = cache.known(kind) + 1
            # Not "start:*": that always includes the last message, and Dovecot's first header search on
            # a connection costs ~80 ms (20,000 messages) even for one message; an empty range is free.
            kind_ds[kind] = (start, session.backend_command(
                b"UID SEARCH RETURN (ALL) UID %d:%d " % (start, MAX_UID) + KIND_CRITERIA[kind]))
        size_d = session.backend_command(b"UID SEARCH RETURN (ALL) UID " + uid_range + b" LARGER %d"
                                         % plan.max_size) if plan.max_size else None
        age_d = session.backend_command(b"UID SEARCH RETURN (ALL) UID " + uid_range + b" OLDER %d"
                                        % (plan.max_age_days * 86400)) if plan.max_age_days else None
        if cached:
            ranges = cache.uid_ranges
            uids = expand_ranges(ranges)
        else:
            all_reply = await all_d
            if held_before is not None:
                held_before.append(all_reply.held_before)
            ranges = _esearch_ranges(all_reply)
            uids = expand_ranges(ranges)
            # Only a consistent answer is kept: every UID below UIDNEXT and as many as EXISTS said (a
            # message added or expunged in between would break one of the two).
            if snapshot is not None and len(uids) == snapshot[0] and (not uids or uids[-1] < snapshot[1]) \
                    and len(ranges) <= _MAX_CACHED_RANGES:
                cache.snapshot, cache.uid_ranges = snapshot, ranges
        top = uids[-1] if uids else 0
        replies = {kind: (start, await d) for kind, (start, d) in kind_ds.items()}
        gone: set[int] = set()
        if any(_EXPUNGE_ISSUED in reply.tagged.upper() for _start, reply in replies.values()):
            # Dovecot's searches skip a message expunged since this session learnt of it, a criterion and
            # its NOT alike (found by review: a hidden IMDN expunged before it was classified matched no
            # kind and was shown). Those no size search finds either are gone: hidden (there is nothing to
            # show), and nothing of this round is cached (another session may not know yet that they are
            # gone, and must classify them itself).
            readable = esearch_all(await session.backend_command(
                b"UID SEARCH RETURN (ALL) UID " + uid_range + b" OR LARGER 0 SMALLER 1"))
            gone = set(uids).difference(readable)
        found_now = {}
        for kind, (start, reply) in replies.items():
            found = set(esearch_all(reply))
            if gone:
                found_now[kind] = cache.kinds.get(kind, set()) | found
            else:
                cache.add(kind, max(top, start - 1), found)

        def of_kind(kind: str) -> set[int]:
            return found_now[kind] if kind in found_now else cache.kinds.get(kind, set())

        hidden: set[int] = set(gone)
        uidset = set(uids) if (plan.hidden_kinds or size_d or age_d) else set()
        for kind in plan.hidden_kinds:
            if kind == "other":
                known = set().union(*(of_kind(k) for k in KIND_CRITERIA))
                hidden |= uidset - known
            else:
                hidden |= of_kind(kind) & uidset
        # (& uidset: a message added since the UID list was taken waits for its EXISTS)
        if size_d is not None:
            hidden |= uidset.intersection(esearch_all(await size_d))
        if age_d is not None:
            hidden |= uidset.intersection(esearch_all(await age_d))
        if plan.real_folders:
            hidden |= await self._hidden_by_folder(session, self.state(session), plan.mailbox, plan.uidvalidity,
                                                   set(uids))
        extra_ranges = plan.extra & SequenceSet.from_ranges(ranges)  # (ranges: intersecting is free)
        extra = _uid_set(extra_ranges)
        plan.hidden_ranges = None
        if hidden:
            hidden |= extra
        else:
            hidden = extra  # (no copy: often the only hidden UIDs, thousands of local deletions)
            plan.hidden_ranges = tuple(extra_ranges.ranges)
        return uids, hidden

    async def _build_view(self, session, st: PolicySession) -> None:
        plan = st.plan
        try:
            replies = []
            if plan.pending:
                try:
                    replies = [(h, await d) for h, d in plan.pending]
                except Exception as e:  # what the device deleted locally cannot be told: not shown at all
                    log.warn("reading a hider's records failed: {e}", e=e)
                    session.bye(UNAVAILABLE)
                    return
                plan.pending = []
                replies = [(h, r) for h, r in replies if getattr(h, "has_records", _maybe)(session, r)]
                if not replies and plan.empty:
                    st.plan = None  # nothing is hidden here after all: no view (the fast path), and if the
                    return  # answers were in before the SELECT's, its responses are not even held
            held = session.held_lines()
            if all(line[:1] == b"*" for line in held):
                # One reactor turn: the rest of the SELECT's responses (one packet, as a rule) are held by
                # now. (Not needed when its tagged answer is: the hiders' answers came after it.)
                await _next_turn()
                held = session.held_lines()
            selected = _select_state(held)
            if plan.uidvalidity and selected.get(b"UIDVALIDITY", plan.uidvalidity) != plan.uidvalidity:
                # The folder was deleted and made anew between the STATUS on the side connection and the
                # SELECT: the one selected is classified, and its hiders' records read, by its own
                # UIDVALIDITY (found by review: the old folder's cache said its UIDs were no IMDN, and the
                # new folder's IMDN was shown; the new folder's kinds went into the old one's cache).
                plan.uidvalidity = selected[b"UIDVALIDITY"]
                plan.extra = SequenceSet.empty()
                for h in self.hiders(session):
                    plan.extra |= _uid_ranges(await h.hidden(session, plan.mailbox, plan.uidvalidity))
            if not plan.uidvalidity:
                # No STATUS was asked (no rule hid anything before the folder's own preferences were read,
                # or only hiders' records hide here): the SELECT's own. Never 0: the classification cache
                # and the hiders' records are keyed by it.
                plan.uidvalidity = selected.get(b"UIDVALIDITY", 0)
                if not plan.uidvalidity:  # not seen (unusual server): ask, never guess (records get pruned)
                    plan.uidvalidity = await _uidvalidity(session, plan.mailbox)
            if replies:
                for h, r in replies:
                    plan.extra |= _uid_ranges(await h.hidden(session, plan.mailbox, plan.uidvalidity, r))
                if plan.empty and not any(getattr(r, "keep_view", False) for _, r in replies):
                    st.plan = None  # nothing is hidden here after all: no view (the fast path)
                    return
            snapshot = None
            if selected.get(b"UIDVALIDITY") == plan.uidvalidity and b"EXISTS" in selected \
                    and b"UIDNEXT" in selected:
                snapshot = (selected[b"EXISTS"], selected[b"UIDNEXT"])
                st.view = self._borrowed_view(session.user, plan, snapshot)
                if st.view is not None:
                    st.view.seen_up_to = snapshot[1] - 1
                    return
            uids, hidden = await self._classify(session, plan, b"1:*", snapshot)
        except Exception as e:
            # Fail closed: without its classification the mailbox cannot be shown as the policy says
            # (unfiltered, the device would get what the operator or the user excluded). The session ends;
            # the client reconnects and selects again.
            self._classification_failed(session, e, "classification failed, the session ends")
            session.bye(UNAVAILABLE)
            return
        st.view = MailboxView.exact(uids, hidden)
        st.view.seen_up_to = selected.get(b"UIDNEXT", 1) - 1
        if hidden and snapshot is not None and len(uids) == snapshot[0] and (not uids or uids[-1] < snapshot[1]):
            self._share_tables(session.user, plan, snapshot, st.view)

    def _classification_failed(self, session, error: Exception, what: str) -> None:
        """The backend's failure (a search refused, lost, not answered, answered in what cannot be read) is
        logged as such; anything else is a bug of ours, with its traceback."""
        if isinstance(error, (BackendError, defer.TimeoutError, defer.CancelledError, ValueError)):
            log.warn("{what}: {error} session={session}", what=what, error=str(error) or type(error).__name__,
                     session=session.session_id)
        else:
            log.failure("{what} session={session}", what=what, session=session.session_id)
            self.proxy.metrics.internal_errors.inc()

    def _borrowed_view(self, user: str, plan: SelectPlan, snapshot: tuple[int, int]) -> MailboxView | None:
        """The view another session built of this very mailbox state, when only hiders' UIDs (local
        deletions) are hidden and they are the same ones: borrowed whole (copy-on-write), so a device
        with 10,000 local deletions does not expand them into a list and a set at every SELECT. None
        when there is none to borrow."""
        if plan.max_age_days or plan.real_folders:
            # (What an age limit hides changes with the clock; what real folders hide, with the device's
            # folder rules, which the keys below do not hold.)
            return None
        cache = self.cache.peek(user, plan.mailbox, plan.uidvalidity)
        if cache is None or cache.snapshot != snapshot:
            return None
        ranges = _extra_in(plan, cache)
        if plan.hidden_kinds or plan.max_size:
            # Kinds and sizes of the same UIDs do not change: the same rules hide the same messages.
            whole_key = _whole_view_key(user, plan, ranges)
            kept = self._whole_views.get(whole_key)
            if kept is None or kept[0] != snapshot:
                return None
            self._whole_views.move_to_end(whole_key)
            return MailboxView.borrowed(kept[1])
        key = (user, plan.mailbox, plan.uidvalidity, sum(hi - lo + 1 for lo, hi in ranges))
        kept = self._tables.get(key)
        if kept is None or kept[0] != snapshot or kept[1] != ranges or kept[4] is None:
            return None
        self._tables.move_to_end(key)
        return MailboxView.borrowed(kept[4])

    def _share_tables(self, user: str, plan: SelectPlan, snapshot: tuple[int, int], view: MailboxView) -> None:
        """A device's sessions (and its device class's) mostly see the same view of a mailbox, and its
        tables cost ~5 ms to build for 20,000 messages: built once, shared while the mailbox state
        (``snapshot`` (EXISTS, UIDNEXT), which fixes the UIDs: the caller checked they match it) and the
        hidden set stay the same. Bounded (LRU), and only for mailboxes big enough to be worth it."""
        if len(view.uids) < SHARED_TABLES_MIN:
            return
        cache = self.cache.peek(user, plan.mailbox, plan.uidvalidity)
        if (plan.hidden_kinds or plan.max_size) and not (plan.max_age_days or plan.real_folders) \
                and cache is not None and cache.snapshot == snapshot:
            # (lent whole: a later SELECT of this state by the same rules builds nothing, see _borrowed_view)
            _keep(self._whole_views, _whole_view_key(user, plan, _extra_in(plan, cache)),
                  (snapshot, view.lend(), len(view.uids)))
        key = (user, plan.mailbox, plan.uidvalidity, len(view.hidden))
        ranges = plan.hidden_ranges  # (an exact, cheap form of the hidden set where there is one)
        kept = self._tables.get(key)
        if kept is not None and kept[0] == snapshot and (
                kept[1] == ranges if ranges is not None else kept[2] == view.hidden):
            view.share(kept[3])
            self._tables.move_to_end(key)
            return
        # (snapshot, hidden ranges or None, hidden set if no ranges, derived tables, the whole view to
        # borrow: only where the ranges say what is hidden, see _borrowed_view)
        lent = view.lend() if ranges is not None else None
        _keep(self._tables, key, (snapshot, ranges, None if ranges is not None else frozenset(view.hidden),
                                  view.derived(), lent, len(view.uids)))

    async def _grow_view(self, session, st: PolicySession) -> None:
        view = st.view
        st.grown = []
        exists = st.growing_to
        held_before: list[int | None] = []
        try:
            uids, hidden = await self._classify(session, st.plan, b"%d:*" % (view.max_uid + 1),
                                                held_before=held_before)
        except Exception as e:
            self._classification_failed(session, e, "classification of new messages failed")
        else:
            if exists is not None and held_before and held_before[0]:
                # Expunges the backend announced between the EXISTS and the answer (a client's command
                # pipelined behind, or the proxy's own) took arrivals out before they could be asked for:
                # placed by them, as hidden messages that their held EXPUNGE or VANISHED removes again.
                placed = arrivals_placed(view.uids, exists, uids, session.held_lines()[:held_before[0]])
                if placed is not None:
                    uids, gone = placed
                    hidden = hidden | gone
            view.append(uids, hidden)
        waiters, st.grown = st.grown, None
        for waiter in waiters:
            waiter.callback(None)

    # -- responses ------------------------------------------------------------------------------

    def response(self, session, resp):
        st = session.state.get(self.name)
        if st is None:
            return None
        head = resp.head
        if head.kind != "untagged" or not resp.first:
            return None
        name = head.name
        if st.closing is not None and name in _CLOSE_SILENCED:
            return self._closing_response(session, st, resp)
        if (st.leaving or session.unselecting) and (action := self._leaving_response(session, st, head)) is not None:
            return action
        if st.pending_select and not st.leaving and name not in _NEVER_SELECT_ANSWERS \
                and (name not in _STATUS_NAMES or head.code_name in _SELECT_CODES) \
                and _answers_select(session):
            # (Not on a status response without one of the SELECT's codes: "* OK [CLOSED]", about the
            # mailbox selected before, or a warning (RFC 9051 7.1: "* NO", "* BAD", "* OK [ALERT]" may come
            # at any time). Taken for the SELECT's first response, a NO or BAD built no view (found by
            # review: the mailbox was shown whole, hidden messages too), an OK built one of a SELECT the
            # backend then refused (its searches failed, and the session ended).)
            st.pending_select = False
            return Hold(defer.Deferred.fromCoroutine(self._build_view(session, st)))
        if name == b"QUOTAROOT" and (cmd := _oldest(session, (b"GETQUOTAROOT",))) is not None \
                and (suffix := cmd.state.get("missing_suffix")) is not None:
            return Rewrite(resp.data.replace(suffix, b"", 1))  # (a hidden folder's, asked as a missing one)
        if name in (b"LIST", b"LSUB"):
            mailbox = list_name(resp.data)
            if mailbox is None:
                return None
            if (mailbox not in st.folders and b"\\NONEXISTENT" not in resp.data[:200].upper()
                    and _oldest(session, (b"LIST", b"LSUB")) is None):
                # Unsolicited (NOTIFY MailboxName/SubscriptionChange) about a folder this session has
                # not looked at: whether it is hidden needs its preferences and kind first. (Not for a
                # LIST command's answers: the side connection's view of the list may lag the backend
                # connection's, and opening a folder there that a client is deleting can resurrect it.)
                return self._hold_for_folder(session, st, mailbox)
            action = self._list_event(st, resp.data, mailbox)
            cmd = _oldest(session, (b"LIST", b"LSUB"))
            if action is None:
                if cmd is None:
                    return None
                data = resp.data
                if mailbox in cmd.state.get("childless", ()):
                    data = _without_children(data, cmd.state["childless"][mailbox])
                if data is not None and "subscribed_above" in cmd.state and mailbox not in cmd.state["subscribed_above"]:
                    data = _without_subscribed_children(data, mailbox in cmd.state["subscribed"])
                return None if data is resp.data else Drop() if data is None else Rewrite(data)
            elif cmd is not None and mailbox in cmd.state.get("parents_only", ()) and isinstance(action, Drop) \
                    and resp.data[:7].upper() == b"* LIST ":
                return Rewrite(_placeholder(resp.data))
            return action
        if name == b"STATUS":
            return self._status_response(session, st, resp)
        if name == b"METADATA":
            return self._metadata_response(session, st, resp)
        view = st.view
        if view is None:
            return None
        if name == b"EXISTS":
            n = head.number
            if n is not None and n > len(view.uids):
                if st.growing_to == n:
                    # Classified once for this very EXISTS and still short of it (the backend's UIDs do
                    # not match its count, or it failed to answer): asking again would loop forever, and
                    # guessing would number every later response wrong. The client reconnects; a fresh
                    # SELECT builds the view anew.
                    log.warn("new messages cannot be classified (EXISTS {n}, {known} UIDs known) "
                             "session={session}", n=n, known=len(view.uids), session=session.session_id)
                    st.growing_to = None
                    session.bye(b"Backend server answers are inconsistent, try again later.")
                    return Drop()
                st.growing_to = n
                st.exists_told = view.exists
                return Hold(defer.Deferred.fromCoroutine(self._grow_view(session, st)))
            st.growing_to = None
            told, st.exists_told = st.exists_told, None
            # (Dovecot sends no RECENT where another session took \Recent: the flag must not outlive this.)
            st.quiet_recent = False
            if view.identity:
                return None
            if told == view.exists:
                st.quiet_recent = True  # (only hidden messages arrived: a wake-up about nothing it may see)
                return Drop()
            return Rewrite(b"* %d EXISTS\r\n" % view.exists)
        if name == b"RECENT":
            if st.quiet_recent:
                st.quiet_recent = False
                return Drop()
            if not session.idling and not session.inflight_commands():
                # Caused by our internal command (held past the client's tagged OK, so it would reach
                # the client after it, as if it answered the next command): obsolete, dropped.
                return Drop()
            # Which of the recent messages are hidden is not worth a query (RECENT is obsolete in
            # IMAP4rev2); never claim more recent messages than exist.
            n = head.number or 0
            return None if n <= view.exists else Rewrite(b"* %d RECENT\r\n" % view.exists)
        if name == b"EXPUNGE":
            client = view.expunge(head.number)
            if client is None:
                return Drop()
            return None if client == head.number else Rewrite(b"* %d EXPUNGE\r\n" % client)
        if st.vanish_check and name in (b"FETCH", b"VANISHED"):
            early = self._early_vanished(session, st, view)
            if early is not None:
                if name == b"VANISHED" and (merged := _earlier_union(early, resp.data)) is not None:
                    return Rewrite(merged)  # (the backend's own names expunged UIDs the proxy's has too, as a rule)
                action = _apply_vanished(view, resp.data) if name == b"VANISHED" else _fetch_response(view, resp)
                if action is None:
                    return Rewrite(early + resp.data)
                if isinstance(action, Drop):
                    return Drop(early + (action.data or b""))
                return Rewrite(early + action.data)
        if name == b"VANISHED":
            return _apply_vanished(view, resp.data)
        if view.identity:
            return None
        if name == b"FETCH":
            return _fetch_response(view, resp)
        if name in (b"SEARCH", b"SORT"):
            return self._search_response(session, view, resp)
        if name == b"ESEARCH":
            return self._esearch_response(session, view, resp)
        if name == b"THREAD":
            return self._thread_response(session, view, resp)
        if name in _STATUS_NAMES and head.code and head.code[:7].upper() == b"UNSEEN ":
            # (on an untagged NO or BAD too: a message number whichever status brings it)
            n = head.code[7:].strip()
            return self._unseen_response(session, view, resp, int(n)) if n.isdigit() else Drop()
        return None

    def _closing_response(self, session, st: PolicySession, resp):
        """An untagged response about the selected mailbox while the client's CLOSE runs as UID EXPUNGE
        and UNSELECT (_expunge_visible; every command before it has completed, _must_wait_for): the view
        follows it as always (an arrival is classified: a Hold, the hooks run again once it is in), the
        client hears nothing of it (RFC 9051 6.4.1: no EXPUNGE for CLOSE; after it the client has no
        mailbox selected). What it would have been told of the counts is kept for a CLOSE refused."""
        closing, st.closing = st.closing, None
        try:
            action = self.response(session, resp)
        finally:
            st.closing = closing
        if isinstance(action, Hold):
            return action
        if resp.head.name in _CLOSE_TOLD_IF_REFUSED:
            told = resp.data if action is None else getattr(action, "data", None)
            if told:
                closing.append(told)
        return Drop()

    def _leaving_response(self, session, st: PolicySession, head):
        """An untagged response while the backend still has the mailbox selected that the client left (its
        SELECT or EXAMINE decided or on its way, or the proxy's UNSELECT after refusing one): the backend's
        events there (a NOTIFY of the selected mailbox's, a command of the proxy's own) are of a mailbox the
        client no longer has, as if the backend had read the SELECT a moment earlier. Dropped: numbered by
        no view (the next mailbox's is not built, or would take them for its own), they showed hidden
        messages (UIDs, flags) and miscounted the next mailbox (found by review: one taken for the
        SELECT's first response, an EXPUNGE of the old mailbox taken out of the new view, and the session
        ended). None: not such a response (``* OK [CLOSED]`` ends the wait)."""
        name = head.name
        if name == b"OK" and head.code is not None and head.code.upper() == b"CLOSED":
            self.closes_mailboxes = True
            st.leaving = False
            return None
        if name == b"FLAGS" and st.leaving and not self.closes_mailboxes and session.selecting is not None:
            st.leaving = False  # (a backend not known to say [CLOSED]: the SELECT's first response, as a rule)
            return None
        if name in _LEFT_MAILBOX_EVENTS:
            if name == b"EXISTS":
                st.growing_to = st.exists_told = None
            return Drop()
        return None

    def _unseen_response(self, session, view: MailboxView, resp, n: int):
        """A SELECT's ``* OK [UNSEEN n]`` in the client's numbers: its first unseen message's. When the
        backend's first unseen is hidden, the first visible one is asked for (the SELECT's responses are
        held meanwhile, and the hooks run again on this one); the code is left out only if there is none.
        (Left out whenever the first unseen was hidden, it told the device a hidden unseen message came
        first.) No question when the backend's first unseen is visible."""
        client = view.client_seq(n)
        if client is None:
            cmd = _oldest(session, (b"SELECT", b"EXAMINE"))
            uid = view.uid_of(n)
            if cmd is None or uid is None:
                return Drop()
            found = cmd.state.get("first_unseen")
            if found is None or found[0] != n:
                cmd.state["first_unseen"] = (n, None)
                return Hold(defer.Deferred.fromCoroutine(self._first_visible_unseen(session, view, cmd, n, uid)))
            client = found[1]
            if client is None:
                return Drop()
        return Rewrite(resp.data.replace(b"[UNSEEN %d]" % n, b"[UNSEEN %d]" % client, 1))

    @staticmethod
    async def _first_visible_unseen(session, view: MailboxView, cmd, n: int, uid: int) -> None:
        """Sets ``cmd.state["first_unseen"]`` to ``(n, client number)`` of the first unseen message the
        device sees after backend message ``n`` (UID ``uid``, hidden), or ``(n, None)`` if there is none.
        One search: the smallest unseen UID above ``uid`` that is not hidden, or where the hidden ones
        past it would make a long command line, all unseen UIDs above it, the first visible one taken."""
        top = view.max_uid
        visible = view.visible
        if uid >= top or (after := bisect_right(visible, uid)) == len(visible):
            return
        # (From the first visible message after it: past a block of hidden ones, 10,000 local deletions at
        # the top of the folder, the backend reads only the messages after them.)
        low = visible[after]
        past = view.hidden_uids & SequenceSet.from_canonical([(low, top)])
        hidden = past.format() if past else b""
        try:
            if len(hidden) <= INLINE_SET_MAX:
                reply = search_ok(await session.backend_command(
                    b"UID SEARCH RETURN (MIN) UID %d:%d UNSEEN" % (low, top)
                    + (b" NOT UID " + hidden if hidden else b"")))
                found = [int(m.group(1)) for line in reply.untagged if (m := _MIN_RE.search(line))]
            else:
                found = esearch_all(await session.backend_command(
                    b"UID SEARCH RETURN (ALL) UID %d:%d UNSEEN" % (low, top)))
        except Exception as e:  # (the code is left out, as before)
            log.warn("the first visible unseen message could not be found: {e} session={session}",
                     e=e, session=session.session_id)
            return
        first = next((u for u in found if u not in view.hidden), None)
        if first is not None:
            cmd.state["first_unseen"] = (n, view.client_seq_of_uid(first))

    def response_block(self, session, block: bytes) -> bytes | None:
        """A run of FETCH lines under a filtered view: renumbered and filtered in one pass (C work, see
        ``renumber_fetch_lines``), or None if a line is not a FETCH."""
        st = session.state.get(self.name)
        view = st.view if st is not None else None
        if view is None or st.pending_select or st.leaving or session.unselecting or st.closing is not None:
            return None
        if st.vanish_check and self._owes_vanished(session, st):
            # Said before the first FETCH line, on the per-line path: a block's output is thrown away
            # when a plugin after this one cannot take it whole, and the VANISHED with it.
            return None
        return renumber_fetch_lines(block, view.client_map)

    def _early_vanished(self, session, st: PolicySession, view: MailboxView) -> bytes | None:
        """The ``* VANISHED (EARLIER)`` line the command now answered owes before its first FETCH response
        (RFC 7162 3.2.5.1, 3.6: "before any FETCH responses", or the client maps numbers to UIDs wrong),
        or None: none owed, or said already (decided once per command)."""
        if not self._owes_vanished(session, st):
            return None
        return self._vanished_line(st, view, session.inflight_commands()[0]) or None

    @staticmethod
    def _owes_vanished(session, st: PolicySession) -> bool:
        """The command now answered owes its VANISHED (EARLIER) still; ``vanish_check`` is cleared when no
        command in flight does (one the proxy answered itself never had a tagged hook to clear it)."""
        cmds = session.inflight_commands()
        if cmds and _asks_vanished(cmds[0]) and not cmds[0].state.get("vanished_sent"):
            return True
        if not any(_asks_vanished(c) and not c.state.get("vanished_sent") for c in cmds):
            st.vanish_check = False
        return False

    @staticmethod
    def _vanished_line(st: PolicySession, view: MailboxView, cmd) -> bytes:
        """A QRESYNC resync (RFC 7162 3.2.5, 3.2.6): messages hidden from the device since it last saw them
        are gone for it. When they were hidden has no mod-sequence, so every UID of the set the client
        names (up to the last one it may take as used) that no visible message has is reported: hidden
        and expunged ones alike, whenever they went. Naming only the hidden ones told the device which
        they were: a message expunged before the client's mod-sequence was not named. VANISHED (EARLIER)
        may name UIDs the client never knew or that went before that mod-sequence (Dovecot does so
        itself where its log no longer reaches back). Once per command."""
        cmd.state["vanished_sent"] = True
        if view.identity:
            return b""
        known = cmd.state.get("vanished_in") or _qresync_known(cmd, view, st.plan.uidvalidity if st.plan else 0)
        gone = view.absent_uids(known) if known is not None else None
        return b"* VANISHED (EARLIER) " + gone.format() + b"\r\n" if gone else b""

    def block_ok(self, session, block: bytes) -> bool:
        st = session.state.get(self.name)
        if st is None:
            return True
        if st.pending_select or st.leaving or session.unselecting or (st.view is not None and not st.view.identity):
            return False
        return not any(x in block for x in (b"* LIST", b"* LSUB", b"* STATUS", b"* METADATA", b"* VANISHED"))

    def fetch_block_ok(self, session, block: bytes) -> bool:
        # FETCH lines concern the policy only to be renumbered (response_block) under a filtered view.
        st = session.state.get(self.name)
        return st is None or not (st.pending_select or st.leaving or session.unselecting
                                  or (st.view is not None and not st.view.identity))

    def tagged(self, session, cmd, resp):
        for d in cmd.state.pop("when_done", ()):  # (searches waiting for this one: see _search_command)
            session.service.reactor.callLater(0, d.callback, None)  # (not inside the response's handling)
        st = session.state.get(self.name)
        if st is None:
            return None
        status = resp.head.name
        data = resp.data
        if cmd.state.pop("closing", False):
            told, st.closing = st.closing, None
            if status != b"OK" and told:  # (still in the mailbox: see _closing_response)
                return Rewrite(b"".join(told) + data)
        if cmd.name in _MISSING_AT and status == b"NO" and resp.head.code is None and b"doesn't exist" in data:
            # Dovecot 2.3 says a folder is missing with no code (SELECT, STATUS, DELETE): RFC 5530's
            # NONEXISTENT added, for a folder hidden from the device and one that does not exist alike.
            data = data.replace(b" NO ", b" NO [NONEXISTENT] ", 1)
        if "missing_suffix" in cmd.state:  # (see _as_missing)
            data = data.replace(cmd.state["missing_suffix"], b"")
        elif "prefs_only" in cmd.state and (code := resp.head.code) is not None \
                and code[:20].upper() == b"METADATA LONGENTRIES":
            # A hidden folder's GETMETADATA shows its sync preferences alone ("on" or "off"): the size of a
            # longer entry is another's (see Preferences._metadata_command).
            data = data.replace(b"[" + code + b"] ", b"", 1)
        elif cmd.state.get("longest") and status == b"OK":
            # (A pattern's MAXSIZE, which the proxy applied: the longest visible value it left out.)
            data = data.replace(b" OK ", b" OK [METADATA LONGENTRIES %d] " % cmd.state["longest"], 1)
        if data != resp.data:
            self._tagged_done(session, st, cmd, status)
            return Rewrite(data)
        if cmd.state.get("status_uncountable") and status == b"OK":
            self._tagged_done(session, st, cmd, status)
            return Rewrite(cmd.tag + b" NO [UNAVAILABLE] The mailbox's counts could not be read; try again.\r\n")
        if "tagged_text" in cmd.state and status == b"OK":
            # The command the client sent answers, not the one the proxy ran for it (NOOP, UNSELECT).
            self._tagged_done(session, st, cmd, status)
            code = resp.head.code  # e.g. [HIGHESTMODSEQ n] under CONDSTORE: kept
            if (before := cmd.state.get("modified_before")):
                last = [code[9:].strip()] if code is not None and code[:9].upper() == b"MODIFIED " else []
                code = b"MODIFIED " + b",".join(before + last)
            code = self._client_modified(st, cmd, code)
            return Rewrite(cmd.tag + b" OK " + (b"[" + code + b"] " if code else b"") + cmd.state["tagged_text"]
                           + b"\r\n")
        self._tagged_done(session, st, cmd, status)
        view = st.view
        if st.vanish_check and _asks_vanished(cmd):
            st.vanish_check = any(_asks_vanished(c) for c in session.inflight_commands() if c is not cmd)
            if status == b"OK" and view is not None and not cmd.state.get("vanished_sent"):
                early = self._vanished_line(st, view, cmd)  # (the command had no FETCH response)
                if early:
                    return Rewrite(early + resp.data)
        code = resp.head.code
        if (renumbered := self._client_modified(st, cmd, code)) is not code:
            if renumbered is None:
                return Rewrite(resp.data.replace(b"[" + code + b"] ", b"", 1))
            return Rewrite(resp.data.replace(b"[" + code + b"]", b"[" + renumbered + b"]", 1))
        return None

    @staticmethod
    def _client_modified(st: PolicySession, cmd, code: bytes | None) -> bytes | None:
        """A ``MODIFIED`` response code in the client's numbers (RFC 7162 3.1.3: the messages a conditional
        STORE left alone), or None if none of them is the client's; any other code, or one of UIDs for a
        UID STORE, as it is."""
        if code is None or code[:9].upper() != b"MODIFIED " or st.view is None:
            return code
        if cmd.state.get("numbers_by_uid"):  # (a STORE by number the view sent by UID: UIDs to numbers)
            view = st.view
            try:
                uids = SequenceSet.parse(code[9:].strip())
            except SequenceSetError:
                return code
            seqs = [s for lo, hi in uids.ranges for u in range(lo, min(hi, view.max_uid) + 1)
                    if (s := view.client_seq_of_uid(u)) is not None]
            return b"MODIFIED " + SequenceSet.from_iterable(seqs).format() if seqs else None
        if not cmd.uid and not st.view.identity:
            return b"MODIFIED " + renumber_ordered_set(st.view, code[9:].strip())
        return code

    def _tagged_done(self, session, st: PolicySession, cmd, status: bytes) -> None:
        if cmd.name in (b"SELECT", b"EXAMINE"):
            st.pending_select = False
            st.leaving = False
            if st.selecting is cmd:
                st.selecting = None
            if status != b"OK":
                st.view = None
                st.mailbox = None
        elif cmd.name in (b"CLOSE", b"UNSELECT") and status == b"OK":
            st.view = None
            st.mailbox = None
        elif cmd.name == b"SETMETADATA" and status == b"OK" and "prefs" in cmd.state:
            self._prefs_changed(session, cmd.state["prefs"])
        elif cmd.name == b"ENABLE" and status == b"OK" and enables_qresync(cmd):
            st.qresync = True
        return None

    # -- sequence-number arithmetic on commands ---------------------------------------------------

    def _view_command(self, session, st: PolicySession, view: MailboxView, cmd):
        name = cmd.name
        if name in _SEQ_COMMANDS or (cmd.uid and name == b"EXPUNGE"):
            m = _SEQ_ARG_RE.match(cmd.line)
            if m is None:
                return None
            token = m.group(2)
            if token == b"$":
                if name == b"FETCH" and _SETS_SEEN_RE.search(cmd.line, m.end(2)) is None:
                    return None  # (the responses of hidden messages are dropped)
                # $ holds what was visible when it was saved: a message hidden since (a preference
                # changed) must not be stored to, copied or moved.
                return Defer(defer.Deferred.fromCoroutine(self._saved_result_visible(session, view, cmd, m)))
            try:
                requested = SequenceSet.parse(token)
            except SequenceSetError:
                # (Never passed on: the backend may read it, "01" in Dovecot, in its own numbers.)
                return Answer(b"BAD [CLIENTBUG] Invalid sequence set.")
            if name == b"STORE" or (name == b"EXPUNGE" and cmd.uid) \
                    or (name == b"FETCH" and _SETS_SEEN_RE.search(cmd.line, m.end(2)) is not None
                        and not _VANISHED_MODIFIER_RE.search(cmd.line, m.end(2))):
                # (Those that name exactly the visible messages, past the line limit: in pieces. A FETCH that
                # reads no body names the client's ranges instead, below; COPY and MOVE stay whole: pieces
                # would not be one atomic command with one COPYUID.)
                pieces = self._pieces(view, requested, cmd.uid)
                if pieces is not None:
                    head = (b"UID " if cmd.uid else b"") + name + b" "
                    return Defer(defer.Deferred.fromCoroutine(self._in_pieces(session, cmd, pieces, head, m.group(3))))
            if cmd.uid:
                allowed = view.visible_uidset(requested)
                # A FETCH of a body section without .PEEK sets \Seen: hidden messages must not get it.
                reads = name == b"FETCH" and _SETS_SEEN_RE.search(cmd.line, m.end(2)) is not None
                if name == b"FETCH" and st.qresync and _VANISHED_MODIFIER_RE.search(cmd.line, m.end(2)):
                    # (CHANGEDSINCE n VANISHED, RFC 7162 3.6: the hidden ones among them have vanished)
                    cmd.state["vanished_in"] = SequenceSet.from_canonical(
                        requested.resolve(max(view.uid_top, 1)).ranges)
                    st.vanish_check = True
                if not allowed:
                    if name == b"FETCH" and not reads:
                        return None  # nothing visible: the backend answers with nothing, which is right
                    # (hidden and expunged alike: see _vanished_line)
                    gone = view.absent_uids(cmd.state["vanished_in"]) \
                        if "vanished_in" in cmd.state and not view.identity else None
                    if gone:
                        return Answer(b"OK " + name + b" completed (no visible messages).",
                                      [b"* VANISHED (EARLIER) " + gone.format() + b"\r\n"])
                    return _of_no_message(cmd, m.group(1), m.group(3))
                if name == b"FETCH" and not reads:
                    # Responses of hidden messages are dropped; only "*" needs help when the last message
                    # is hidden: the client's "n:*" still reaches its last visible message.
                    vis = view.visible
                    if requested.has_star and vis and vis[-1] not in requested.resolve(view.max_uid):
                        return Rewrite(m.group(1) + token + b",%d" % vis[-1] + m.group(3))
                    return None
            else:
                allowed = view.backend_seqset(requested)
                if not allowed or max(requested.resolve(max(view.exists, 1)).ranges[-1]) > view.exists:
                    return refused_as_dovecot(name, b"Invalid messageset")
                if (name != b"FETCH" or _SETS_SEEN_RE.search(cmd.line, m.end(2)) is not None) \
                        and self._expunges_any_time(session):
                    # The client's NOTIFY asks for the selected mailbox's events: the backend may announce
                    # another session's expunge while no command is in progress (RFC 5465), so also between
                    # this translation and its reading of the command, which would then change the message
                    # after the one meant, perhaps a hidden one. By UID it names what the client meant.
                    uids = view.uids_of(requested).format()
                    if len(uids) <= INLINE_SET_MAX:
                        cmd.state["numbers_by_uid"] = True  # (its [MODIFIED] names UIDs: _client_modified)
                        return Rewrite(cmd.tag + b" UID " + m.group(1).split(b" ", 1)[1] + uids + m.group(3))
                text = allowed.format()
                if len(text) > INLINE_SET_MAX and name in (b"COPY", b"MOVE") and has_caps(session, b"SEARCHRES"):
                    # (By the UIDs the client's numbers stand for now: the proxy's steps are UID
                    # commands, during which the backend may announce expunges that renumber.)
                    uids = view.uids_of(requested)
                    return Defer(defer.Deferred.fromCoroutine(self._by_saved_result(session, st, cmd, m, uids)))
                if len(text) > INLINE_SET_MAX and name == b"FETCH" \
                        and _SETS_SEEN_RE.search(cmd.line, m.end(2)) is None:
                    # Past any backend's line limit (hidden messages scattered): the FETCH asks for the
                    # ranges the client named, and the answers of the hidden messages among them are
                    # dropped, as for a UID FETCH (it changes nothing: no body read without .PEEK).
                    text = view.backend_cover(requested).format()
                return Rewrite(m.group(1) + text + m.group(3))
            text = allowed.format()
            if len(text) > INLINE_SET_MAX and name in (b"COPY", b"MOVE") and has_caps(session, b"SEARCHRES"):
                return Defer(defer.Deferred.fromCoroutine(self._by_saved_result(session, st, cmd, m, allowed)))
            return Rewrite(m.group(1) + text + m.group(3))
        if name in SEARCH_COMMANDS:
            if cmd.has_literal and not cmd.state.get("collected"):
                # Criteria after a literal, or a literal inside parentheses: the whole command first
                # (rebuilt from its first segment alone, a parenthesis would close early and the rest
                # of the client's bytes would reach the backend as commands of their own).
                return Collect()
            try:
                action = self._search_command(session, view, cmd)
            except SearchRefused as e:
                return Answer(b"NO [CANNOT] " + str(e).encode() + b" (messages are hidden from this device).")
            except TokenError:
                action = None
            # A search the proxy cannot read would run unrestricted: refused rather than passed on.
            return action or Answer(b"BAD [CLIENTBUG] Search criteria not understood.")
        return None

    def _search_command(self, session, view: MailboxView, cmd):
        """Client sequence sets in the criteria become backend ones. A search whose result the backend
        computes something from (RETURN options: MIN/MAX/COUNT/PARTIAL, ESORT's order, the result SAVEd
        as ``$`` that later commands use; CONDSTORE's MODSEQ) runs on the visible messages only: its
        criteria get ``NOT UID <hidden UIDs>``. Responses only need renumbering (and plain results
        the hidden messages dropped).

        Untagged SEARCH/SORT/THREAD responses do not say which command they answer, and a backend may
        complete pipelined commands out of order: a search waits while one of the same name but other
        UID-ness (so numbered otherwise) is in flight. An ESEARCH says its command's tag: one whose tag a
        search in flight has too (tags should be unique, but are the client's) waits for it."""
        line = cmd.line
        body = line[:-2] if line.endswith(b"\r\n") else line
        try:
            tokens = tokenize(body)
        except TokenError:
            return None
        i = 2 + (1 if cmd.uid else 0)
        head = tokens[:i]
        rest = tokens[i:]
        plain = True  # answered by an untagged SEARCH/SORT/THREAD (not an ESEARCH, which has the tag)
        returning = None  # the RETURN options, at head[returning_at]
        if cmd.name in (b"SEARCH", b"SORT") and rest and isinstance(rest[0], Atom) \
                and rest[0].upper() == b"RETURN" and len(rest) > 1 and isinstance(rest[1], ParenList):
            returning, returning_at = rest[1], len(head) + 1
            head, rest, plain = head + rest[:2], rest[2:], False
            cmd.state["esearch"] = True
            other = next((c for c in session.inflight_commands() if c.tag == cmd.tag and "esearch" in c.state
                          and c.state is not cmd.state), None)
            if other is not None:
                return Defer(defer.Deferred.fromCoroutine(self._after_done(session, other, cmd)))
        if cmd.name == b"SORT" and rest:
            head, rest = head + rest[:2], rest[2:]  # (sort criteria) charset
        elif cmd.name == b"THREAD" and rest:
            head, rest = head + rest[:2], rest[2:]  # algorithm charset
        elif rest and isinstance(rest[0], Atom) and rest[0].upper() == b"CHARSET":
            head, rest = head + rest[:2], rest[2:]  # (CHARSET must come first)
        if plain:
            other = next((c for c in session.inflight_commands() if c.name == cmd.name
                          and c.uid != cmd.uid and "esearch" not in c.state), None)
            if other is not None:
                return Defer(defer.Deferred.fromCoroutine(self._after_done(session, other, cmd)))
        restriction = []
        if cmd.name == b"THREAD" and plain and b"MODSEQ" not in body.upper():
            # Threads are built of the matches: a hidden one among them shaped and ordered the threads (a
            # dummy parent, a date), which no filtering of the answer undoes (found by review). Of the
            # visible messages only, by whichever set is shorter to name; past the line limit both ways,
            # the answer is filtered as before (see Known limits).
            hidden = view.hidden_uids.format()
            visible = SequenceSet.from_iterable(view.visible).format() if len(hidden) > INLINE_HIDDEN_MAX else b""
            if len(hidden) <= INLINE_HIDDEN_MAX:
                restriction = [*_known_only(view), Atom(b"NOT"), Atom(b"UID"), Atom(hidden)]
            elif visible and len(visible) <= INLINE_HIDDEN_MAX:
                restriction = [Atom(b"UID"), Atom(visible)]
        elif not plain or b"MODSEQ" in body.upper():
            rest = _known_only(view) + rest
            # (Only where the backend computes something from the matches: a plain result is filtered
            # exactly on its way back, and Dovecot announces no expunges during a search with UID
            # criteria, which clients syncing with UID SEARCH would notice.)
            hidden = view.hidden_uids.format()
            if len(hidden) <= INLINE_HIDDEN_MAX:
                restriction = [Atom(b"NOT"), Atom(b"UID"), Atom(hidden)]
            elif plain:
                # Too many hidden UIDs to name in one command line (the backend refuses a line past its
                # limit: Dovecot's default 64 KB is ~10,000 scattered UIDs). A plain MODSEQ search: its
                # matches are filtered on their way back, its (MODSEQ n) stays the backend's (see
                # visible_esearch: no visible change since it is missed).
                pass
            elif (wanted := esearch_options(returning)) is not None:
                if set(wanted) <= {b"MIN", b"MAX"} and b"MODSEQ" in body.upper() and not cmd.has_literal:
                    # MIN/MAX with a MODSEQ key: the MODSEQ must be the returned messages' (RFC 4731 3.2),
                    # which only the backend knows: the visible extremes are found first, then the client's
                    # search runs over those two.
                    criteria = rewrite_search_keys(view, rest)
                    return Defer(defer.Deferred.fromCoroutine(
                        self._extremes_then(session, view, head, returning_at, criteria)))
                # The backend returns every match and the proxy computes MIN/MAX/COUNT/ALL of the visible
                # ones (_esearch_response), in the sort order for an ESORT.
                cmd.state["esearch_local"] = (wanted, cmd.name == b"SORT")
                head[returning_at] = ParenList([Atom(b"ALL")])
            elif b"SAVE" in {t.upper() for t in returning.items if isinstance(t, Atom)} and not cmd.has_literal:
                # SAVE (the backend keeps $: visible messages only): the matches saved as $, then narrowed
                # by a piece of the hidden UIDs at a time (RFC 5182: a search that saves reads the $ before
                # it), the client's own search over what is left. (Only where the client replaces $ anyway.)
                criteria = rewrite_search_keys(view, rest)
                return Defer(defer.Deferred.fromCoroutine(self._search_in_steps(session, view, head, criteria)))
            else:
                restriction = [Atom(b"NOT"), Atom(b"UID"), Atom(hidden)]  # (refused past the line limit)
        # (THREAD's sets exact: hidden messages in a covering range would take part in the threading.)
        criteria = rewrite_search_keys(view, rest, exact=cmd.name == b"THREAD")
        return Rewrite(format_tokens(head + restriction + criteria) + b"\r\n")

    @staticmethod
    async def _search_in_steps(session, view: MailboxView, head: list, criteria: list):
        """A search whose result the backend keeps (SAVE) where the hidden UIDs are too many for one command
        line: ``$`` := the matches, then ``$`` minus each piece of the hidden UIDs but the last, on the
        session's connection; the client's command (``head``: tag, name, RETURN options, SORT's criteria,
        charset) then searches ``$`` minus the last piece, so that its results and its ``$`` are the
        visible matches. (The first step passes no command hook: the CPM flag is mapped here, as the
        readreport plugin would. A MODSEQ key is repeated in the last, whose answer must carry MODSEQ.)"""
        name_at = 2 if head[1].upper() == b"UID" else 1
        if head[name_at].upper() == b"SORT":
            charset = [Atom(b"CHARSET"), head[-1]]  # (SORT's charset is its last head token)
        else:  # (SEARCH: CHARSET x after the RETURN options, if any)
            charset = head[-2:] if isinstance(head[-2], Atom) and head[-2].upper() == b"CHARSET" else []
        first = format_tokens([Atom(b"SEARCH"), Atom(b"RETURN"), ParenList([Atom(b"SAVE")])] + charset + criteria)
        if (readreport := session.hooks.by_name.get("readreport")) is not None:
            first = readreport.flags_for_backend(first + b"\r\n")[:-2]  # (a flag ends before a space or CRLF)
        pieces = uid_set_pieces(view.hidden_uids)
        steps = [first] + [b"SEARCH RETURN (SAVE) $ NOT UID " + piece for piece in pieces[:-1]]
        if (refused := await _run_all(session, steps)) is not None:
            return refused
        last = [Atom(b"$"), Atom(b"NOT"), Atom(b"UID"), Atom(pieces[-1])]
        text = format_tokens(criteria)
        if b"MODSEQ" in text.upper() and not re.search(rb"(?:^|[\s(])\$(?=[\s)]|$)", text):
            last += criteria  # (the matches again: they are in $ already; with $ in them, they meant the old one)
        line = format_tokens(head + last) + b"\r\n"
        return Rewrite(readreport.flags_for_backend(line) if readreport is not None else line)

    @staticmethod
    async def _extremes_then(session, view: MailboxView, head: list, returning_at: int, criteria: list):
        """A search for MIN and/or MAX with a MODSEQ key where the hidden UIDs are too many for one command
        line: every match first (a command of the proxy's own, by UID or by number as the client's: the
        backend may announce expunges during a UID search, never during one by number, RFC 9051 7.5.1,
        nor may the client hear of one during its own), then the client's search over the first and last
        visible ones (an ESORT's first and last in its order), so that the backend answers it with their
        MODSEQ. (What changes between the two is what a search a moment later would find.)"""
        by_uid = head[1].upper() == b"UID"
        name_at = 2 if by_uid else 1
        ask = [*head[1:returning_at], ParenList([Atom(b"ALL")]), *head[returning_at + 1:]]  # (no tag)
        line = format_tokens(ask + criteria)
        if (readreport := session.hooks.by_name.get("readreport")) is not None:
            line = readreport.flags_for_backend(line + b"\r\n")[:-2]  # (the first step passes no hook)
        reply = await session.backend_command(line)
        if reply.status != b"OK":
            return _refusal(reply)
        found = b""
        for data in reply.untagged:
            words = data.split()
            if b"ALL" in (upper := [w.upper() for w in words]):
                found = words[upper.index(b"ALL") + 1]
        # The visible matches' UIDs, in the order found (known to the view: not one it has not classified).
        shown = visible_in_order(view, found, uid=by_uid)
        if by_uid:
            shown = [u for u in shown if u <= view.max_uid]
        else:
            vis = view.visible
            shown = [vis[c - 1] for c in shown]
        if head[name_at].upper() != b"SORT":
            shown.sort()
        extremes = [shown[0], shown[-1]] if shown else []
        uids = b",".join(b"%d" % u for u in extremes) or b"%d" % MAX_UID
        line = format_tokens(head + [Atom(b"UID"), Atom(uids)] + criteria) + b"\r\n"
        return Rewrite(readreport.flags_for_backend(line) if readreport is not None else line)

    @staticmethod
    def _must_wait_for(session, st: PolicySession, cmd) -> list:
        """The commands in flight that ``cmd`` must wait for, because the view they are answered under
        changes with it or with them:

        - a SELECT or EXAMINE changes the view at once: responses to the commands before it, still coming
          in the mailbox selected now, would pass unfiltered (hidden messages, their bodies) or be
          renumbered by the next mailbox's view;
        - a command by number behind one during which the backend may announce expunges (its own, or
          another session's: any but a FETCH, STORE or search by number, RFC 9051 7.5.1) under a filtered
          view: its numbers are the view's after the expunges (as the backend reads them), which are known
          once their responses are in (else the client's 1 could be read as a hidden message);
        - one that could reach a message the view does not know yet (see _may_reach_unannounced)."""
        if st.mailbox is None:
            return []
        if cmd.name in _LEAVES_MAILBOX or cmd.name == b"CLOSE":
            # (UNSELECT and CLOSE too: new messages announced during those in flight are classified at the
            # backend in the mailbox, which must still be selected then; a DELETE or RENAME, found by review:
            # their searches, sent after it, were answered with a BYE, and the device got neither those
            # commands' OK nor its own; a DELETE decided before the view knew a hidden arrival deleted it
            # with the folder, which a device may not do; a LOGOUT: those searches were never answered.)
            return session.inflight_commands()
        if cmd.name == b"STATUS" and _status_of_selected(st, cmd):
            # (Counted by the backend as this session knows the mailbox: with messages announced during the
            # commands in flight, which the view knows, and so can take the hidden ones out, once they are in.)
            return session.inflight_commands()
        if st.view is not None and st.view.identity and _may_reach_unannounced(st.view, cmd):
            # Nothing hidden, so the command would go as written: a message the backend takes in during a
            # command in flight (its EXISTS held while the proxy classifies it) would be in its "*" or past
            # the last UID, though it may be one the device must not see. Once those commands are done the
            # view knows it: hidden, the command is narrowed to the visible messages.
            return session.inflight_commands()
        if cmd.uid or cmd.name not in _SEQ_USING or st.view is None or st.view.identity:
            return []
        # (Any command but a FETCH, STORE or search by number may bring another session's expunges.)
        return [c for c in session.inflight_commands()
                if c.uid or c.name not in _NO_EXPUNGE_DURING or (c.client or c).name in _EXPUNGING]

    @staticmethod
    async def decide_after(others, decide):
        """``decide()``'s action, taken once ``others`` (one command or several, in flight) have completed,
        in any order (Dovecot runs some pipelined commands side by side). For the plugins that decide
        before this one, too."""
        waits = []
        for other in (others if isinstance(others, list) else [others]):
            waits.append(defer.Deferred())
            other.state.setdefault("when_done", []).append(waits[-1])  # (fired by tagged())
        for d in waits:
            await d
        return await resolved(decide())

    def _expunges_any_time(self, session) -> bool:
        """May the backend announce expunges in the selected mailbox while no command is in progress (a
        NOTIFY of the client's with events of the selected mailbox)?"""
        notify = self.peer("notify")
        nst = session.state.get(notify.name) if notify is not None else None
        return nst is not None and nst.selected_events

    @staticmethod
    def _pieces(view: MailboxView, requested: SequenceSet, uid: bool) -> list[bytes] | None:
        """The visible messages a command names, in sets of a few KB each (the backend's numbers, or UIDs
        for a UID command), where naming them in one command would pass the backend's line limit (one range
        per run of them between hidden ones: ``STORE 1:* +FLAGS (\\Seen)`` in a folder whose every other
        message is hidden); else None."""
        if uid:
            exact = view.visible_uidset(requested)
        else:
            exact = view.backend_seqset(requested)
            if not exact or max(requested.resolve(max(view.exists, 1)).ranges[-1]) > view.exists:
                return None  # (refused as an invalid set, as before)
        if len(exact.ranges) * 22 <= INLINE_SET_MAX or len(exact.format()) <= INLINE_SET_MAX:
            return None
        return uid_set_pieces(exact)

    async def _in_pieces(self, session, cmd, pieces: list[bytes], head: bytes, rest: bytes):
        """A STORE, a FETCH or a UID EXPUNGE as commands of the proxy's own, one per piece but the last,
        pipelined (``head``: e.g. ``STORE`` or ``UID STORE``), then the client's command with the last
        piece, so that the tagged hooks see it done (notify tells the user's other sessions at once):
        their untagged answers (FETCH, EXPUNGE) go to the client as any, renumbered by the view. By number
        as the client's: the backend announces no expunge during a STORE or FETCH by number (RFC 9051
        7.5.1), so the numbers hold from one piece to the next and the client hears of none in the middle
        of its command. No command hook sees the pieces: a STORE's CPM flag is mapped here, as the
        readreport plugin would. The first refusal is the client's answer (the pieces before it are done,
        as a server's command may stop part way)."""
        text = rest.rstrip(b"\r\n")
        name = head.split()[-1]
        if name == b"STORE" and (readreport := session.hooks.by_name.get("readreport")) is not None:
            text = readreport.flags_for_backend(text)
        lines = [head + piece + text for piece in pieces]
        replies: list = []
        if (refused := await _run_all(session, lines[:-1], replies)) is not None:
            return refused
        if name == b"STORE" and _UNCHANGEDSINCE_RE.match(text):
            # (RFC 7162 3.1.3: the messages a conditional STORE left alone, of every piece, in the answer)
            cmd.state["modified_before"] = [m.group(1) for r in replies if (m := MODIFIED.search(r.tagged))]
        cmd.state["tagged_text"] = name.capitalize() + b" completed."
        return Rewrite(cmd.tag + b" " + lines[-1] + b"\r\n")

    async def _by_saved_result(self, session, st: PolicySession, cmd, m, uids: SequenceSet):
        """COPY or MOVE of more scattered visible messages than a command line holds (the hidden ones
        between them: a folder whose every other message is an IMDN the device does not see). In pieces it
        would not be one atomic command with one COPYUID; so the messages go by the saved search result
        (RFC 5182): ``$`` := ``uids`` (the visible messages the client named, as the view knows them: never
        a hidden one, nor one the backend has not announced yet, which is not classified), a few KB at a
        time, then the client's command on ``$``. The client's own ``$`` is read first and put back before
        its next command (``restore_saved``)."""
        reply = await session.backend_command(b"UID SEARCH RETURN (ALL) $")
        before = esearch_all(reply) if reply.status == b"OK" else []
        st.restore_saved = before  # (also if a step is refused: $ may have changed by then)
        if (refused := await _run_all(session, _saving(uids))) is not None:
            return refused
        return Rewrite(m.group(1) + b"$" + m.group(3))

    @staticmethod
    async def _restore_saved(session, uids: list[int]) -> None:
        """The client's ``$`` as it was before a command of the proxy's own replaced it (see
        _by_saved_result)."""
        if (refused := await _run_all(session, _saving(SequenceSet.from_iterable(uids)))) is not None:
            log.warn("restoring a saved search result failed: {answer} session={session}",
                     answer=refused.tagged, session=session.session_id)

    async def _after_growth(self, session, st: PolicySession, cmd):
        """``cmd``'s decision once the new messages being classified are in the view."""
        if (cmd.client or cmd).name == b"DELETE":
            # (And told, with what the backend said after them: an expunge of one of them taken out of the
            # view, which would refuse the DELETE as holding a hidden message.)
            await self.arrivals_told(session)
        await self.classified(session)
        return await resolved(self.command(session, cmd))

    async def classified(self, session) -> None:
        """Once the new messages being classified, if any, are in the view. (An answer to a command of
        the proxy's own passes a held EXISTS: a ``$`` read so may hold messages the view does not know.)"""
        st = session.state.get(self.name)
        if st is not None and st.grown is not None:
            waiter = defer.Deferred()
            st.grown.append(waiter)
            await waiter

    async def arrivals_told(self, session) -> None:
        """Once new messages being classified, if any, are in the view and the EXISTS that tells of them
        has gone out: a message hidden before that (``hide_in_view``) would be left out of that count while
        its EXPUNGE, queued behind the EXISTS, takes it out of the client's count a second time."""
        st = session.state.get(self.name)
        while st is not None and (st.grown is not None or st.growing_to is not None) and session.phase == "auth":
            await self.classified(session)
            await _next_turn()  # (the held EXISTS is let go once the classification's Deferred has fired)

    async def _after_done(self, session, others, cmd):
        """``cmd``'s decision once ``others`` (in flight) have completed."""
        return await self.decide_after(others, lambda: self.command(session, cmd))

    def _search_response(self, session, view: MailboxView, resp):
        data = resp.data.rstrip(b"\r\n")
        words = data.split(b" ")
        nums, tail = [], []
        for i, w in enumerate(words[2:], 2):
            if w.isdigit():
                nums.append(int(w))
            else:
                tail = words[i:]  # e.g. "(MODSEQ n)" (RFC 7162), of the visible matches
                break
        # (One search of this name and UID-ness in flight at a time: see _search_command.)
        cmd = next((c for c in session.inflight_commands() if c.name == resp.head.name
                    and "esearch" not in c.state), None)
        if cmd is not None and cmd.uid:
            kept = [n for n in nums if n not in view.hidden]
        else:
            kept = view.client_seqs(nums)
        if not kept:
            tail = []  # (RFC 7162: a MODSEQ only after matches; hidden ones alone are none)
        return Rewrite(b" ".join(words[:2] + [b"%d" % n for n in kept] + tail) + b"\r\n")

    def _esearch_response(self, session, view: MailboxView, resp):
        """ESEARCH (and ESORT) computed by the backend on the visible messages (see _search_command):
        message numbers become the client's, in the order given (ESORT's ALL is in sort order);
        COUNT, MODSEQ and the rest stay. (UIDs are the same for both.)"""
        try:
            tokens = tokenize(resp.data.rstrip(b"\r\n"))
        except TokenError:
            return None
        items = tokens[2:]
        out = tokens[:2]
        if items and isinstance(items[0], ParenList):  # (TAG "a")
            out.append(items[0])
            local = local_esearch_options(session, items[0])
            items = items[1:]
            if local is not None:
                return Rewrite(format_tokens(out + visible_esearch(view, items, *local)) + b"\r\n")
        uid = bool(items) and isinstance(items[0], Atom) and items[0].upper() == b"UID"
        for j in range(0, len(items) - 1, 2):
            key, value = (token_text(items[j]) or b"").upper(), items[j + 1]
            if key in (b"MIN", b"MAX", b"ALL"):
                text = token_text(value) or b""
                value = Atom(text if uid else renumber_ordered_set(view, text))
            elif key == b"PARTIAL" and isinstance(value, ParenList) and len(value.items) == 2 and not uid:
                value = ParenList([value.items[0], Atom(renumber_ordered_set(view, token_text(value.items[1]) or b""))])
            out += [items[j], value]
        if len(items) % 2:
            out.append(items[-1])  # "UID" alone, or something the backend knows better
        return Rewrite(format_tokens(out) + b"\r\n")

    def _thread_response(self, session, view: MailboxView, resp):
        # Thread lists are written without spaces between them, "(1 2)(3 (4)(5))": not for tokenize().
        threads_in = _parse_threads(resp.data.rstrip(b"\r\n")[len(b"* THREAD"):])
        if threads_in is None:
            return None
        cmd = _oldest(session, (b"THREAD",))
        uid = cmd is not None and cmd.uid

        def keep(n: int) -> int | None:
            if uid:
                return None if n in view.hidden else n
            return view.client_seq(n)

        def walk(lst: list) -> list | None:
            """A thread without its hidden messages (RFC 5256 shape: numbers, then 0 or 2+ sublists)."""
            members, children = [], []
            for t in lst:
                if isinstance(t, list):
                    sub = walk(t)
                    if sub is not None:
                        children.append(sub)
                else:
                    k = keep(t)
                    if k is not None:
                        members.append(k)
            if len(children) == 1:  # a lone subthread continues its parent's chain
                return members + children[0] if members else children[0]
            if not members and not children:
                return None
            return members + children

        def fmt(lst: list) -> bytes:
            nums = b" ".join(b"%d" % t for t in lst if not isinstance(t, list))
            subs = b"".join(fmt(t) for t in lst if isinstance(t, list))
            return b"(" + nums + (b" " if nums and subs else b"") + subs + b")"

        threads = [fmt(w) for t in threads_in if (w := walk(t)) is not None]
        return Rewrite(b"* THREAD " + b"".join(threads) + b"\r\n" if threads else b"* THREAD\r\n")

    # -- preferences changed: the selected mailbox's view re-applied ----------------------------

    def _reapply_view(self, session, st: PolicySession) -> None:
        """Preferences changed while a mailbox is selected: hide what is now hidden (EXPUNGE), show
        what came back if IMAP can say so (EXISTS for messages after every visible one). EXPUNGE may
        only be sent while a command is in progress: at once in IDLE, else with the next command."""
        if st.mailbox is None:
            return
        if session.idling:
            # (Commands after IDLE wait for it: found by review, a SELECT of another mailbox decided at once
            # left this one's searches to run in that mailbox; their UIDs went into this mailbox's
            # classification cache, which then showed its hidden IMDN to every session, and hid the other's
            # messages from the device's view of it.)
            st.recomputing += 1
            d = defer.Deferred.fromCoroutine(self._recompute(session, st))
            d.addErrback(lambda f: log.failure("re-applying preferences failed", f))
            d.addBoth(lambda _: self._recompute_over(st))
        else:
            st.reapply = True

    @staticmethod
    def _recompute_over(st: PolicySession) -> None:
        st.recomputing -= 1
        if not st.recomputing:
            waiters, st.recomputed = st.recomputed, []
            for waiter in waiters:
                waiter.callback(None)

    async def _after_recompute(self, session, st: PolicySession, cmd):
        while st.recomputing:
            waiter = defer.Deferred()
            st.recomputed.append(waiter)
            await waiter
        return await resolved(self.command(session, cmd))

    async def _reapply_then(self, session, st: PolicySession, cmd):
        if (earlier := session.inflight_commands()):
            # (The commands before it first: one by number is answered with no EXPUNGE in between, and an
            # arrival one of them announces is in the view before it is classified again.)
            await self.decide_after(earlier, lambda: None)
        if st.mailbox is not None:
            try:
                await self._recompute(session, st)
            except (BackendError, defer.TimeoutError) as e:
                # Fail closed, as a SELECT's classification does: the old view shows what the user just
                # turned off. The session ends; the client reconnects and selects again.
                log.warn("re-applying preferences failed: {error} session={session}", error=str(e),
                         session=session.session_id)
                session.bye(UNAVAILABLE)
                return Answer(b"NO [UNAVAILABLE] " + UNAVAILABLE)
        return await resolved(self.command(session, cmd))

    async def _recompute(self, session, st: PolicySession) -> None:
        mailbox = st.mailbox
        await self.folder_infos(session, [mailbox])  # (read again if another process changed them)
        if self.folder_hidden(st, mailbox):
            # The selected folder itself is no longer synchronized: gone for this device, as a mailbox
            # deleted while selected is for Dovecot's clients (BYE).
            session.bye(b"The selected mailbox is no longer synchronized to this device.", code=b"NONEXISTENT")
            return
        kinds, max_size, max_age = self._criteria(st, mailbox)
        uidvalidity = st.plan.uidvalidity if st.plan else await self._selected_uidvalidity(session, st)
        extra = st.plan.extra if st.plan else SequenceSet.empty()
        st.plan = SelectPlan(mailbox, uidvalidity, kinds, max_size, max_age, extra,
                             real_folders=self.real_folders_matter(session, st, mailbox))
        if st.plan.empty:
            if st.view is not None:
                back = st.view.unhide_tail(set(st.view.hidden))
                if back:
                    session.inject(b"* %d EXISTS\r\n" % st.view.exists)
            return
        uids, hidden = await self._classify(session, st.plan, b"1:*")
        while st.grown is not None or st.growing_to is not None:
            # New messages announced meanwhile (an EXISTS held while they are classified): hidden now, the
            # count that EXISTS tells would be short of what the client knows until these EXPUNGEs reach it
            # (they go out after it). Once it is out; what arrived is for that classification to hide.
            if session.phase != "auth":
                return
            await self.classified(session)
            await _next_turn()
        if st.view is None:
            # Nothing was hidden: the client was told of every message the backend announced, as it came,
            # and the view must number those. The listing may be short of them (an arrival told at its end,
            # in IDLE: the view numbered one message fewer than the client knew, for good) or past them.
            told = session.selected.exists if session.selected is not None else None
            while told is not None and len(uids) < told:
                # (Not "n:*": past the last UID that names the last message again, a duplicate in the view.)
                after = uids[-1] if uids else 0
                more, more_hidden = await self._classify(session, st.plan, b"%d:%d" % (after + 1, MAX_UID))
                more = [u for u in more if u > after]
                if not more:
                    break
                uids, hidden = uids + more, hidden | more_hidden
                told = session.selected.exists if session.selected is not None else None
            if told is not None and len(uids) > told:
                uids = uids[:told]  # (the others are classified when their EXISTS comes)
            st.view = MailboxView(uids, set())
        view = st.view
        # (Of the UIDs both know: the client knows no other, a VANISHED must not name one, RFC 7162 3.2.10;
        # one the view took in since the listing is its classification's to hide or show.)
        hidden = hidden.intersection(view.uids)
        newly = SequenceSet.from_iterable(sorted(hidden - view.hidden))  # (UIDs of this very listing)
        gone = view.hide(hidden)
        back = view.unhide_tail(view.hidden.intersection(uids) - hidden)
        if not gone:
            out = b""
        elif st.qresync:  # (RFC 7162 3.2.10: no EXPUNGE once QRESYNC is enabled)
            out = b"* VANISHED " + newly.format() + b"\r\n"
        else:
            out = b"".join(b"* %d EXPUNGE\r\n" % n for n in gone)
        if back:
            out += b"* %d EXISTS\r\n" % view.exists
        if out:
            session.inject(out)


# -- helpers --------------------------------------------------------------------------------------

async def classify(run, mailbox: str, uids, uidvalidity: int | None = None) -> dict[int, str]:
    """CPM kinds of some messages by server-side searches, pipelined: ``run(line)`` runs a command (a
    BackendProtocol's ``command`` or a session's ``side_command``) on a connection free to EXAMINE.
    ``uidvalidity``: that of the mailbox the UIDs are of; the mailbox of that name now has another (it was
    deleted and made again: its UIDs are other messages'): MailboxReplaced, or one told none: ValueError."""
    uidset = SequenceSet.from_iterable(uids).format()
    examined = run(b"EXAMINE " + wire_name(mailbox))
    waits = {kind: run(b"UID SEARCH RETURN (ALL) UID " + uidset + b" " + crit) for kind, crit in KIND_CRITERIA.items()}
    if uidvalidity is not None:
        reply = await examined
        now = next((int(m.group(1)) for line in reply.untagged if (m := _UIDVALIDITY_RE.match(line))), None)
        if now != uidvalidity:
            for d in waits.values():
                await d  # (answered all the same: nothing of them left to arrive later)
            if now is None:
                raise ValueError(f"EXAMINE {mailbox!r} told no UIDVALIDITY: {reply.tagged!r}")
            raise MailboxReplaced(f"{mailbox!r} was replaced: UIDVALIDITY {now}, not {uidvalidity}")
    out = {u: "other" for u in uids}
    for kind, d in waits.items():
        for u in esearch_all(await d):
            if out.get(u) == "other":
                out[u] = kind
    return out


_UIDVALIDITY_RE = re.compile(rb"^\* OK \[UIDVALIDITY ([0-9]+)\]", re.I)
_LATER = object()  # (a decision that needs the backend: taken by a coroutine)
_STATUS_NAMES = frozenset((b"OK", b"NO", b"BAD"))  # (untagged status responses: RFC 9051 7.1)
# Untagged responses about the selected mailbox's messages (see PolicyPlugin._leaving_response).
_LEFT_MAILBOX_EVENTS = frozenset((b"EXISTS", b"RECENT", b"EXPUNGE", b"FETCH", b"VANISHED"))
# Untagged responses about the selected mailbox that a CLOSE does not pass on (see _closing_response), and
# of those the ones a client still in the mailbox must hear (counts, flags) after a CLOSE refused.
_CLOSE_SILENCED = _LEFT_MAILBOX_EVENTS | {b"FLAGS"}
_CLOSE_TOLD_IF_REFUSED = frozenset((b"EXISTS", b"EXPUNGE", b"VANISHED", b"FLAGS"))
# Untagged responses that are never a SELECT's: NOTIFY's events of other mailboxes (RFC 5465), which the
# backend sends while no command is in progress, so also just before a SELECT's own responses.
# A CAPABILITY (a server may say its capabilities changed at any time) is not a SELECT's either.
_NEVER_SELECT_ANSWERS = frozenset((b"STATUS", b"LIST", b"LSUB", b"METADATA", b"CAPABILITY"))
# The response codes of a SELECT's (or EXAMINE's) untagged status responses (RFC 9051 6.3.2, RFC 7162 3.1,
# RFC 8474 4): an untagged OK, NO or BAD without one of them is not its answer.
_SELECT_CODES = frozenset((b"PERMANENTFLAGS", b"UNSEEN", b"UIDVALIDITY", b"UIDNEXT", b"HIGHESTMODSEQ",
                           b"NOMODSEQ", b"MAILBOXID", b"READ-ONLY", b"READ-WRITE"))


def _return_refused(words: list[bytes]) -> bytes | None:
    """The first of a search's RETURN options not in ``_RETURN_OK`` (PARTIAL's range skipped), if any."""
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word.upper() not in _RETURN_OK:
            return word.upper()
        else:
            skip = word.upper() == b"PARTIAL"
    return None


def _list_returns_known(args: list) -> bool:
    """Are a LIST's RETURN options, if any, all in ``_LIST_RETURN_OK`` (STATUS with its item list)?"""
    if args is None:
        return True  # (arguments that do not parse: as before, the LIST's own path says)
    if len(args) < 2 or not isinstance(args[-2], Atom) or args[-2].upper() != b"RETURN" \
            or not isinstance(args[-1], ParenList):
        return True
    items = args[-1].items
    for i, item in enumerate(items):
        if isinstance(item, ParenList) and i and isinstance(items[i - 1], Atom) and items[i - 1].upper() == b"STATUS":
            continue
        if not isinstance(item, Atom) or item.upper() not in _LIST_RETURN_OK:
            return False
    return True


def _args_or_none(cmd) -> list | None:
    try:
        return cmd.args
    except TokenError:
        return None


def _fetch_refused(cmd) -> Answer | None:
    """A FETCH of an item not in ``FETCH_ITEMS`` refused, as Dovecot words an item it does not know. One
    the proxy cannot read goes on, for the backend to refuse in its words (an unbalanced parenthesis, a
    list after a list: Dovecot 2.3 reads no item of such a line either)."""
    m = _SEQ_ARG_RE.match(cmd.line.rstrip(b"\r\n"))
    names = None if m is None else fetch_item_names(m.group(3))
    unknown = next((n for n in names or () if n not in FETCH_ITEMS), None)
    return None if unknown is None else refused_as_dovecot(b"FETCH", b"Unknown parameter: " + unknown + b".", cmd.uid)


def _notify_fetch_refused(cmd) -> Answer | None:
    """A NOTIFY whose MessageNew names a FETCH item not in ``FETCH_ITEMS`` refused, as Dovecot words one it
    does not know: the backend sends the FETCH of each new message itself (found by review helper-98:
    ``MessageNew (UID X-MAILBOX)`` passed, past the FETCH command's check)."""
    try:
        tokens = tokenize(cmd.line[:-2] if cmd.line.endswith(b"\r\n") else cmd.line)
    except TokenError:
        return None  # (Dovecot reads no event of such a line either)
    lists, unknown = [tokens], None
    while lists and unknown is None:
        items = lists.pop()
        for i, t in enumerate(items):
            if isinstance(t, ParenList):
                lists.append(t.items)
            elif isinstance(t, Atom) and t.upper() == b"MESSAGENEW" and i + 1 < len(items) \
                    and isinstance(items[i + 1], ParenList):
                names = fetch_item_names(b" " + format_tokens([items[i + 1]])) or ()
                unknown = next((n for n in names if n not in FETCH_ITEMS), unknown)
    return None if unknown is None else refused_as_dovecot(
        b"NOTIFY", b"Invalid fetch-att list: Unknown parameter: " + unknown + b".")


def _search_refused(cmd) -> Answer | None:
    """A SEARCH, SORT or THREAD with a key ``unknown_search_key`` finds refused, as Dovecot words a key it
    does not know; in a view with nothing hidden too (X-MAILBOX in a virtual mailbox). One the proxy cannot
    read goes on as before (a view with hidden messages refuses it: ``_view_command``)."""
    body = cmd.line[:-2] if cmd.line.endswith(b"\r\n") else cmd.line
    try:
        rest = tokenize(body)[3 if cmd.uid else 2:]
    except TokenError:
        return None
    if cmd.name in (b"SEARCH", b"SORT") and len(rest) > 1 and isinstance(rest[0], Atom) \
            and rest[0].upper() == b"RETURN" and isinstance(rest[1], ParenList):
        rest = rest[2:]
    if cmd.name in (b"SORT", b"THREAD"):
        rest = rest[2:]  # (sort criteria) charset, or algorithm charset
    elif rest and isinstance(rest[0], Atom) and rest[0].upper() == b"CHARSET":
        rest = rest[2:]
    try:
        key = unknown_search_key(rest)
    except TokenError:
        return Answer(b"BAD [CLIENTBUG] Search criteria not understood.")
    return None if key is None else refused_as_dovecot(cmd.name, b"Unknown argument " + key + b".", cmd.uid)


def _enable(cmd):
    """ENABLE of the extensions in ``_ENABLE_OK`` only (RFC 5161: a server ignores one it does not offer);
    None (passed on as it is) where it names no other."""
    names = [token_text(a) for a in cmd.args]  # (a TokenError: the session says BAD)
    if cmd.has_literal or any(n is None for n in names):
        return refused_as_dovecot(b"ENABLE", b"Invalid arguments.")
    kept = [n for n in names if n.upper() in _ENABLE_OK]
    if len(kept) == len(names):
        return None
    if not kept:
        return Answer(b"OK Enabled.")  # (as Dovecot answers an ENABLE of nothing it knows)
    return Rewrite(cmd.tag + b" ENABLE " + b" ".join(kept) + b"\r\n")


def _answers_select(session) -> bool:
    """May an untagged response be the SELECT's (or EXAMINE's) first? Not while a command sent before it
    is still in progress: the backend runs the SELECT after those, and their answers (a STATUS, LIST or
    ENABLE pipelined before it) come first (found by review: taken for the SELECT's, a view was built of
    the mailbox before the backend refused the SELECT; its searches failed, and the session ended). Nor
    before the SELECT is at the backend (decided by a coroutine: what comes meanwhile is not its answer)."""
    inflight = session.inflight_commands()
    return session.selecting is not None and bool(inflight) and inflight[0] is session.selecting


def _binary_literal(tokens) -> bool:
    """Is there a literal8 (``~{n}``) among ``tokens``, in lists too?"""
    return any(t.binary if isinstance(t, (Literal, LiteralRef)) else isinstance(t, ParenList) and _binary_literal(t.items)
               for t in tokens)


def _literal_mailbox(cmd) -> bool:
    """Does a mailbox argument of ``cmd`` come as a literal not received yet?"""
    if not cmd.has_literal:
        return False
    try:
        args = cmd.args
    except TokenError:
        return False
    last = _MAILBOX_ARG[cmd.name] + (1 if cmd.name == b"RENAME" else 0)
    return any(isinstance(t, LiteralRef) for t in args[:last + 1]) or len(args) <= last


def _keep(kept: OrderedDict, key: tuple, entry: tuple) -> None:
    """Keep ``entry`` (its last item: how many messages its view has) as the most recent of ``kept``; the
    least recent go past SHARED_TABLES_MAX entries or SHARED_TABLES_MAX_MESSAGES messages."""
    kept[key] = entry
    kept.move_to_end(key)
    while len(kept) > SHARED_TABLES_MAX or (len(kept) > 1 and sum(e[-1] for e in kept.values())
                                            > SHARED_TABLES_MAX_MESSAGES):
        kept.popitem(last=False)


def _extra_in(plan: SelectPlan, cache) -> tuple:
    """What the hiders (local deletes) hide among the UIDs of the cache's mailbox state, as ranges."""
    return (plan.extra & SequenceSet.from_ranges(cache.uid_ranges)).ranges


def _whole_view_key(user: str, plan: SelectPlan, extra_ranges: tuple) -> tuple:
    """What fixes the hidden set of a mailbox state hidden by kind and size: the rules and what the
    hiders (local deletes) hide in it."""
    return user, plan.mailbox, plan.uidvalidity, tuple(sorted(plan.hidden_kinds)), plan.max_size, extra_ranges


_MIN_RE = re.compile(rb" MIN (\d+)", re.I)


def _maybe(session, reply) -> bool:
    """A hider without ``has_records``: its answer may hold records."""
    return True


def _next_turn() -> defer.Deferred:
    from twisted.internet import reactor

    d: defer.Deferred = defer.Deferred()
    reactor.callLater(0, d.callback, None)
    return d


def _apply_vanished(view: MailboxView, data: bytes):
    """Apply a VANISHED response to the view; returns the hook action. A VANISHED without (EARLIER)
    counts as one EXPUNGE per UID for the client, so the hidden UIDs are taken out of it."""
    words = data.rstrip(b"\r\n").split(b" ")
    token = words[-1]
    try:
        gone = SequenceSet.parse(token)
    except (SequenceSetError, ValueError):
        return None
    earlier = len(words) > 3 and words[2].upper() == b"(EARLIER)"
    if earlier:
        # Not an expunge of this session's messages (RFC 7162 3.2.10): it may name messages the backend
        # still numbers and announces later; taken out of the view now, they showed through it.
        return None
    if gone.has_star:
        # ("*" is not allowed in a VANISHED's UIDs, RFC 7162 7.) Which UIDs it names, neither the view nor
        # the client can tell: the backend's protocol error, the session ends (a view left apart from the
        # client's numbers would renumber what the backend says wrong).
        raise TokenError(f"VANISHED with '*': {data[:100]!r}")
    shown = gone if view.identity else gone - view.hidden_uids
    # The view is told the UIDs it has, not every number of the set: a range such as 1:4294967295 (a
    # broken backend's) was expanded into a set of its every number, the proxy stuck at it for good.
    view.vanish(gone if len(gone) <= len(view.uids) else [u for u in view.uids if u in gone])
    if shown == gone:
        return None
    if not shown:
        return Drop()
    return Rewrite(b"* VANISHED " + shown.format() + b"\r\n")


_COUNT_RE = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE)\r?\n\Z", re.IGNORECASE)
_VANISHED_RE = re.compile(rb"\* VANISHED ([0-9:,]+)\r?\n\Z", re.IGNORECASE)


def arrivals_placed(known: list[int], exists: int, found: list[int],
                    held: list[bytes]) -> tuple[list[int], set[int]] | None:
    """The new messages of a held ``* <exists> EXISTS`` (``held[0]``) in backend order, when expunges in
    ``held`` (the responses after it, up to the answer to the classification's UID search) took some of
    them out before that search: ``found`` (its UIDs, ascending, above ``known``) are the survivors. A
    message expunged so has no UID the proxy could learn; where an EXPUNGE numbered it, a stand-in (the
    lowest free UID after the one before it: the real one is at least that, so the order holds) takes its
    place; a VANISHED names it. Returns (UIDs, the gone ones among them: to be hidden, their EXPUNGE or
    VANISHED replayed after the EXISTS removes them), or None if there is nothing to place or the
    responses do not add up (the caller goes on as before: the EXISTS then finds too few UIDs, and the
    session ends)."""
    first = _COUNT_RE.match(held[0]) if held else None
    if first is None or first.group(2).upper() != b"EXISTS" or int(first.group(1)) != exists \
            or exists < len(known) or (found and known and found[0] <= known[-1]) \
            or not any(_COUNT_RE.match(line) or _VANISHED_RE.match(line) for line in held[1:]):
        return None
    # Backend order: known UIDs as they are (ascending, all before the arrivals), arrival k as -(k + 1).
    slots = exists - len(known)
    order: list[int] = [*known, *range(-1, -slots - 1, -1)]
    arrivals_left = slots
    expunged = False
    vanished: set[int] = set()  # UIDs of arrivals a VANISHED took out
    literal = False
    for line in held[1:]:
        if literal:  # (the text after a literal: not a response of its own)
            literal = line.endswith(b"}\r\n")
            continue
        literal = line.endswith(b"}\r\n")
        if (m := _COUNT_RE.match(line)) is not None:
            n = int(m.group(1))
            if m.group(2).upper() == b"EXISTS":  # (more arrivals, after these)
                if n < len(order):
                    return None
                added = n - len(order)
                order.extend(range(-slots - 1, -slots - added - 1, -1))
                slots += added
                arrivals_left += added
            elif not 1 <= n <= len(order):
                return None
            elif order.pop(n - 1) < 0:
                expunged = True
                arrivals_left -= 1
        elif (m := _VANISHED_RE.match(line)) is not None:
            try:
                uids = expand_ranges(SequenceSet.parse(m.group(1)).ranges)
            except (SequenceSetError, ValueError):
                return None
            kept = len(order) - arrivals_left
            for u in uids:
                i = bisect_left(order, u, 0, kept)
                if i < kept and order[i] == u:
                    del order[i]
                    kept -= 1
                elif known and u <= known[-1]:
                    continue  # (one expunged before, or never there)
                elif not arrivals_left:
                    return None
                else:  # (which arrival it was the UIDs' order tells, below)
                    del order[kept]
                    arrivals_left -= 1
                    vanished.add(u)
    if expunged and vanished or arrivals_left != len(found):
        return None
    if vanished:
        uids = sorted(vanished.union(found))
        return (uids, vanished) if len(uids) == slots else None
    survivor_uids = dict(zip([-x - 1 for x in order if x < 0], found, strict=True))
    uids, stand_ins = [], set()
    before = known[-1] if known else 0
    for slot in range(slots):
        uid = survivor_uids.get(slot)
        if uid is None:
            uid = before + 1
            stand_ins.add(uid)
        elif uid <= before:
            return None
        uids.append(uid)
        before = uid
    return uids, stand_ins


def _earlier_union(early: bytes, data: bytes) -> bytes | None:
    """One ``* VANISHED (EARLIER)`` line for the proxy's ``early`` one and the backend's ``data``, if that
    is one too (else None): a resync is told once what vanished."""
    words = data.rstrip(b"\r\n").split(b" ")
    if len(words) != 4 or words[2].upper() != b"(EARLIER)":
        return None
    try:
        theirs = SequenceSet.parse(words[3])
        ours = SequenceSet.parse(early.rstrip(b"\r\n").rsplit(b" ", 1)[1])
    except (SequenceSetError, ValueError):
        return None
    if theirs.has_star:
        return None
    return b"* VANISHED (EARLIER) " + (ours | theirs).format() + b"\r\n"


def _parse_threads(data: bytes) -> list | None:
    """``(1 2)(3 (4)(5))`` -> ``[[1, 2], [3, [4], [5]]]``; None if it is not thread data."""
    stack: list[list] = [[]]
    for m in re.finditer(rb"\(|\)|\d+| +|.", data):
        t = m.group()
        if t == b"(":
            stack.append([])
        elif t == b")":
            if len(stack) < 2:
                return None
            done = stack.pop()
            stack[-1].append(done)
        elif t.isdigit():
            stack[-1].append(int(t))
        elif t.strip():
            return None
    return stack[0] if len(stack) == 1 else None


def _fetch_response(view: MailboxView, resp):
    client = view.client_seq(resp.head.number)
    if client is None:
        return Drop()
    if client != resp.head.number:
        # (After the number, whatever case the backend wrote FETCH in: response names are case-insensitive.)
        return Rewrite(b"* %d " % client + resp.data.split(b" ", 2)[2])
    return None


def _asks_vanished(cmd) -> bool:
    """The command is a QRESYNC resync: UID FETCH (CHANGEDSINCE n VANISHED) or SELECT/EXAMINE (QRESYNC)."""
    return "vanished_in" in cmd.state or (cmd.name in (b"SELECT", b"EXAMINE") and b"QRESYNC" in cmd.line.upper())


_SEQ_MATCH_RE = re.compile(rb"QRESYNC\s*\(\s*\d+\s+\d+(?:\s+[\d:,*]+)?(\s*\([\d:,*\s]+\))\s*\)", re.I)


def _without_seq_match(cmd) -> bytes | None:
    """A SELECT/EXAMINE (QRESYNC (...)) without its seq-match-data (RFC 7162 3.2.5), or None if it has
    none. The sample pairs are in the client's numbers, which the view changes: the backend, which uses
    them when its own change log does not reach back far enough, would match them against its own numbers
    and could leave out a real expunge. Without them it reports more VANISHED UIDs, never fewer."""
    try:
        args = cmd.args
    except TokenError:
        return None
    params = args[1].items if len(args) > 1 and isinstance(args[1], ParenList) else []
    if not any(isinstance(t, Atom) and t.upper() == b"QRESYNC" and isinstance(params[i + 1], ParenList)
               and params[i + 1].items and isinstance(params[i + 1].items[-1], ParenList)
               for i, t in enumerate(params[:-1])):
        return None
    line = cmd.line
    m = _SEQ_MATCH_RE.search(line, line.upper().rfind(b"QRESYNC"))
    if m is None:
        return None
    return line[:m.start(1)] + line[m.end(1):]


def _qresync_known(cmd, view: MailboxView, uidvalidity: int) -> SequenceSet | None:
    """The UIDs a ``SELECT mbox (QRESYNC (uidvalidity modseq [known-uids ...]))`` says the client knows
    (all up to the last one if it does not say); None without QRESYNC data for this UIDVALIDITY."""
    try:
        args = cmd.args
    except TokenError:
        return None
    params = args[1].items if len(args) > 1 and isinstance(args[1], ParenList) else []
    for i, t in enumerate(params[:-1]):
        if isinstance(t, Atom) and t.upper() == b"QRESYNC" and isinstance(params[i + 1], ParenList):
            q = [token_text(x) or b"" for x in params[i + 1].items if not isinstance(x, ParenList)]
            if len(q) < 2 or not q[0].isdigit() or int(q[0]) != uidvalidity:
                return None  # (RFC 7162 3.2.5: data for another UIDVALIDITY is ignored)
            try:
                known = SequenceSet.parse(q[2]) if len(q) > 2 else SequenceSet.parse(b"1:%d" % max(view.uid_top, 1))
            except SequenceSetError:
                return None
            return SequenceSet.from_canonical(known.resolve(max(view.uid_top, 1)).ranges)
    return None


def _placeholder(line: bytes) -> bytes:
    """The LIST response of a folder the device does not see, as a parent that is only there for what is
    below it: ``\\Noselect \\HasChildren``, the folder's own attributes and extended data left out."""
    tokens = tokenize(line.rstrip(b"\r\n"))
    return b"* LIST (\\Noselect \\HasChildren) " + format_tokens(tokens[3:5]) + b"\r\n"


def _without_children(line: bytes, noselect: bool) -> bytes | None:
    """A LIST response whose name attributes say ``\\HasNoChildren`` instead of ``\\HasChildren``; None
    for a placeholder that is there only for its (hidden) children (``\\Noselect``, ``\\NonExistent``, as
    the side connection's LIST says: LIST-STATUS, REMOTE and the other forms without CHILDREN say no
    ``\\HasChildren``, nor RECURSIVEMATCH's ``\\Noselect``)."""
    close = line.find(b")")
    attrs = line[:close].upper()
    if noselect or b"\\NOSELECT" in attrs or b"\\NONEXISTENT" in attrs:
        return None
    at = attrs.find(b"\\HASCHILDREN")
    if close < 0 or at < 0:
        return line
    return line[:at] + b"\\HasNoChildren" + line[at + len(b"\\HasChildren"):]


def _without_subscribed_children(line: bytes, subscribed: bool) -> bytes | None:
    """The LSUB or LIST response of a folder with no subscribed folder the device sees below it: None if
    it is there only for them (not ``subscribed`` itself: an LSUB ``%`` parent, a RECURSIVEMATCH one with
    ``CHILDINFO``), else without its ``CHILDINFO``."""
    without = list_without_extended(line, b"CHILDINFO")
    if not subscribed and (line[:7].upper() == b"* LSUB " or without is not line):
        return None
    return without


def _status_of_selected(st: PolicySession, cmd) -> bool:
    """Whether ``cmd`` (a STATUS) asks of the mailbox selected, under a view."""
    if st.view is None or st.mailbox is None:
        return False
    try:
        raw = astring_text(cmd.args[0]) if cmd.args else None
    except TokenError:
        return False
    return raw is not None and mailbox_name(raw) == st.mailbox


def _known_only(view: MailboxView) -> list:
    """Search keys for the messages the view knows (none that the backend has taken in but not announced:
    not classified yet)."""
    return [Atom(b"UID"), Atom(b"1:%d" % view.max_uid if view.max_uid else b"%d" % MAX_UID)]


def _may_reach_unannounced(view: MailboxView | None, cmd) -> bool:
    """Whether ``cmd`` changes messages (a STORE, COPY, MOVE or expunge; a FETCH that sets \\Seen) and names them so
    that a message the view does not know yet could be among them: ``*``, past the last UID or number it
    knows, or ``$``. (Explicit known UIDs, as a syncing client names them, reach no other.)"""
    if view is None:
        return False
    if cmd.name == b"CLOSE" or (cmd.name == b"EXPUNGE" and not cmd.uid):
        return True  # (every \\Deleted message: one taken in meanwhile may be marked so already)
    if cmd.name not in _SEQ_COMMANDS and not (cmd.name == b"EXPUNGE" and cmd.uid):
        return False
    m = _SEQ_ARG_RE.match(cmd.line)
    if m is None:
        return False
    if cmd.name == b"FETCH" and _SETS_SEEN_RE.search(cmd.line, m.end(2)) is None:
        return False
    if m.group(2) == b"$":
        return True  # (saved by a search in flight, or since: it may hold a message taken in during it)
    try:
        named = SequenceSet.parse(m.group(2))
    except SequenceSetError:
        return False
    return named.has_star or named.max() > (view.max_uid if cmd.uid else view.exists)


def _saving(uids: SequenceSet) -> list[bytes]:
    """Commands that make the saved search result ``$`` exactly ``uids``: a few KB of them per command
    (``OR $`` each further piece), or none (``NOT ALL``). Searches by number with UID keys: the backend
    announces no expunge during them (RFC 9051 7.5.1)."""
    pieces = uid_set_pieces(uids) if uids else []
    if not pieces:
        return [b"SEARCH RETURN (SAVE) NOT ALL"]
    return [b"SEARCH RETURN (SAVE) UID " + pieces[0]] + [b"SEARCH RETURN (SAVE) OR $ UID " + p for p in pieces[1:]]


async def _run_all(session, lines: list[bytes], replies: list | None = None) -> Answer | None:
    """``lines`` as commands of the proxy's own on the session's connection, pipelined (they run in order):
    None once all are done, or the client's answer for the first the backend refused (``_refusal``; the
    others ran, as a server's command may stop part way). Their replies go to ``replies`` if given."""
    pending = [session.backend_command(line) for line in lines]
    failed = None
    for d in pending:
        reply = await d
        if replies is not None:
            replies.append(reply)
        if reply.status != b"OK" and failed is None:
            failed = reply
    return None if failed is None else _refusal(failed)


def _refusal(reply) -> Answer:
    """The client's answer when a command of the proxy's own, made of the client's, is refused: the
    backend's NO or BAD as it said it (anything else: the backend is not answering as it should)."""
    return Answer(reply.tagged if reply.status in (b"NO", b"BAD") else b"NO [UNAVAILABLE] " + UNAVAILABLE)


def _of_no_message(cmd, head: bytes, rest: bytes) -> Rewrite:
    """A UID command that names hidden messages only, as one of no message at all (the highest UID, which
    no mailbox reaches): the backend's own answer, the same as for UIDs that do not exist, where one of
    the proxy's would tell the device that these do, hidden."""
    cmd.state[NO_SERVER_CHANGE] = True
    return Rewrite(head + b"%d" % MAX_UID + rest)
