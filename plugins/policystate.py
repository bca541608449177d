"""The policy plugin's shared pieces: what it keeps per session (``PolicySession``, ``FolderInfo``,
``SelectPlan``), the folder-visibility event other plugins listen to, and small helpers its modules share."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from cpmproxy.imap.seqset import SequenceSet, SequenceSetError
from cpmproxy.imap.tokens import (
    Atom,
    ParenList,
    TokenError,
    format_tokens,
    parse_response_head,
    tokenize,
)
from cpmproxy.proxy.hooks import Answer, Rewrite
from plugins.cpm import VIEW_ITEM
from plugins.policyconfig import Policy
from plugins.view import MailboxView
from plugins.wire import (
    malformed_search,
    search_ok,
    status_mailbox,
    status_parts,
    status_values,
    wire_name,
)

# Event bus topic: a folder appeared in or left a session's view (a preference or the policy changed).
FOLDERS_TOPIC = "cpmproxy.policy.folders"


@dataclass(frozen=True)
class FolderVisibility:
    session: Any
    mailbox: str
    visible: bool


class side_examine:
    """``async with side_examine(session):`` around side-connection commands that depend on the mailbox
    EXAMINEd there (the side connection is shared by concurrent coroutines of the session)."""

    def __init__(self, session):
        self.session = session
        self.lock = session.side_lock

    async def __aenter__(self):
        await self.lock.acquire()

    async def __aexit__(self, *exc):
        # Leave nothing selected, and wait for it: a mailbox a client deletes next must not be open
        # here (Dovecot would write its index back on closing it, bringing the folder back).
        try:
            await self.session.side_command(b"UNSELECT")
        except Exception:
            pass
        finally:
            self.lock.release()


@dataclass
class FolderInfo:
    prefs: dict[str, str] = field(default_factory=dict)  # folder-level preferences
    session_history: bool | None = None
    recheck: bool = False  # found empty: whether it is a Session History folder is asked again


@dataclass
class SelectPlan:
    mailbox: str
    uidvalidity: int
    hidden_kinds: tuple[str, ...]
    max_size: int
    max_age_days: int
    # UIDs other plugins hide (local deletes), as ranges: thousands of them are a few ranges, and a set
    # of 10,000 UIDs costs ~0.3 ms per pass (SELECT builds none but the view's own).
    extra: SequenceSet = field(default_factory=SequenceSet.empty)
    # (hider, query Deferred) pairs sent with the SELECT; _build_view awaits them with its responses held
    pending: list = field(default_factory=list)
    # What _classify hid, as ranges, when that was only ``extra`` (a cheap exact key for _share_tables:
    # comparing sets of 10,000 UIDs costs ~0.2 ms per SELECT). None otherwise.
    hidden_ranges: tuple | None = None
    # Whether the messages' real folders may hide them: the device may have folders hidden, and the
    # mailbox is not known to be a plain one (it may be a virtual mailbox: PolicyPlugin._hidden_by_folder).
    real_folders: bool = False

    @property
    def empty(self) -> bool:
        return not (self.hidden_kinds or self.max_size or self.max_age_days or self.extra or self.pending
                    or self.real_folders)


@dataclass
class PolicySession:
    policy: Policy
    account_prefs: dict[str, str] = field(default_factory=dict)
    # Folders that have preferences of their own, with their marks' values (see _mark_pref_folder).
    pref_folders: dict[str, bytes] = field(default_factory=dict)
    # Every account-wide entry under the vendor prefix at login (lower case): other plugins' bookkeeping
    # too (local delete's device marks), read in the same command. None until read.
    login_entries: set[str] | None = None
    folders: dict[str, FolderInfo] = field(default_factory=dict)
    folder_chars: int = 0  # (about) the length of the names in ``folders``: see FolderRules._forget_plain_folders
    folder_room: tuple[int, int] = (0, 0)  # (folders, characters) past which that looks again, when above its bound
    unreadable_folders: set[str] = field(default_factory=set)  # (see PolicyPlugin._hold_for_folder)
    plan: SelectPlan | None = None       # criteria of the mailbox being selected
    pending_select: bool = False         # our SELECT is at the backend, its responses not yet seen
    # A SELECT or EXAMINE of the client's left the mailbox selected before, which the backend keeps until
    # it reads that command (its "* OK [CLOSED]"): what it says of it meanwhile is of a mailbox the client
    # has left (PolicyPlugin._leaving_response).
    leaving: bool = False
    selecting: Any = None                # that SELECT command until it completes (its view is built)
    view: MailboxView | None = None      # the selected mailbox's view (None: identity, nothing tracked)
    mailbox: str | None = None
    reapply: bool = False                # preferences changed: re-apply them before the next command
    # Re-applications running on their own (started in IDLE), and the client commands waiting for them:
    # see PolicyPlugin._reapply_view.
    recomputing: int = 0
    recomputed: list = field(default_factory=list)
    # A CLOSE under a filtered view in progress (PolicyPlugin._expunge_visible): what the backend says of the
    # mailbox meanwhile is not the client's (RFC 9051 6.4.1: no EXPUNGE for CLOSE; after it no mailbox is
    # selected). The lines that change its counts, kept to be told should the CLOSE fail. None: no CLOSE.
    closing: list[bytes] | None = None
    qresync: bool = False                # the client ENABLEd QRESYNC: VANISHED instead of EXPUNGE
    vanish_check: bool = False           # a command in flight may owe VANISHED (EARLIER) (_early_vanished)
    growing_to: int | None = None        # the EXISTS whose new messages were just classified (_grow_view)
    grown: list | None = None            # while _grow_view runs: Deferreds of commands waiting for it
    exists_told: int | None = None       # the client's count before them (only hidden ones: nothing to tell)
    quiet_recent: bool = False           # the RECENT after such an EXISTS goes unsaid too
    # Unsolicited STATUS (NOTIFY) adjustments computed while the response was held, by mailbox.
    unsolicited_status: dict[str, Any] = field(default_factory=dict)
    # What the device was last told of a mailbox by an unsolicited STATUS, where messages may be hidden:
    # (its counts as the device sees them, HIGHESTMODSEQ). A change to hidden messages alone is not told.
    status_told: dict[str, tuple] = field(default_factory=dict)
    metadata_hold: dict | None = None  # a METADATA response held to be read whole (_metadata_response)
    # The client's saved search result ($, RFC 5182) to put back before its next command: a COPY or MOVE
    # of the proxy's making replaced it (PolicyPlugin._by_saved_result). None: nothing to restore.
    restore_saved: list[int] | None = None


_SIZE_RE = re.compile(rb"RFC822\.SIZE (\d+)")
_SELECT_STATE_RE = re.compile(rb"^\* (?:OK \[(UIDVALIDITY|UIDNEXT) (\d+)\]|(\d+) (EXISTS))", re.I)


def _nonexistent(mailbox: str) -> Answer:
    return Answer(b"NO [NONEXISTENT] Mailbox doesn't exist: " + mailbox.encode("utf-8", "replace")[:200])


# Where the mailbox is in the commands _as_missing sends on (the argument's index; GETMETADATA's moves past
# its options: given by the caller).
_MISSING_AT = {b"SELECT": 0, b"EXAMINE": 0, b"STATUS": 0, b"DELETE": 0, b"RENAME": 0, b"COPY": 1, b"MOVE": 1,
               b"SUBSCRIBE": 0,  # (Dovecot: SUBSCRIBE to a missing folder is refused, as it is told here)
               b"GETMETADATA": 0, b"SETMETADATA": 0, b"GETQUOTAROOT": 0}


def _as_missing(cmd, mailbox: str, at: int | None = None):
    """A command on a folder hidden from the device, as the same command on a folder that does not exist (the
    hidden one's name and a suffix no folder has): the backend answers it as it answers any missing folder,
    the suffix taken out again (``PolicyPlugin.tagged``), where the proxy's own answer would tell the device
    that the folder exists, hidden (found by the leak hunt; SUBSCRIBE too, by a later review; METADATA and
    the ``\\Noselect`` parents there only for hidden folders by another). Answered here where a missing
    folder does not fail the command (UNSUBSCRIBE) or the command carries a literal (APPEND). ``at``: the
    mailbox argument's index, where ``_MISSING_AT`` cannot say it."""
    if at is None:
        at = _MISSING_AT.get(cmd.name)
    if at is None or cmd.has_literal:
        return _nonexistent(mailbox)
    head = cmd.tag + b" "  # (as sent: a tag "nil" is no NIL, nor is one the tokenizer refuses a reason to fail)
    try:
        tokens = tokenize(cmd.line[len(head):].rstrip(b"\r\n"))
    except TokenError:
        return _nonexistent(mailbox)
    i = 1 + (1 if cmd.uid else 0) + at
    if i >= len(tokens):
        return _nonexistent(mailbox)
    suffix = "-" + uuid.uuid4().hex[:16]
    tokens[i] = Atom(wire_name(mailbox + suffix))
    if cmd.name == b"STATUS" and i + 1 < len(tokens) and isinstance(tokens[i + 1], ParenList):
        # The proxy's own item must not reach the backend (its BAD would tell a hidden folder from a missing one).
        items = [t for t in tokens[i + 1].items if not (isinstance(t, Atom) and t.upper() == VIEW_ITEM)]
        tokens[i + 1] = ParenList(items or [Atom(b"UIDNEXT")])
    cmd.state["missing_suffix"] = suffix.encode()
    return Rewrite(head + format_tokens(tokens) + b"\r\n")


async def _uidvalidity(session, mailbox: str) -> int:
    return _parse_uidvalidity(await session.side_command(b"STATUS " + wire_name(mailbox) + b" (UIDVALIDITY)"),
                              mailbox)


def _parse_uidvalidity(reply, mailbox: str) -> int:
    return _status_items(reply.untagged, mailbox).get(b"UIDVALIDITY", 0)


SESSION_HISTORIES_KEPT = 100_000  # (user, folder) pairs known to be Session History folders


def _keep_known(known: dict, key: tuple) -> None:
    """Remember ``key`` in ``known`` (insertion-ordered), forgetting the oldest past the bound: CPM makes
    a Session History folder per chat session, for every user, for as long as the process runs."""
    known.pop(key, None)
    known[key] = True
    while len(known) > SESSION_HISTORIES_KEPT:
        del known[next(iter(known))]


def _among(numbers, uids: set[int] | SequenceSet) -> set[int]:
    """The members of ``numbers`` that are in ``uids`` (a set, or ranges: most often one)."""
    if isinstance(uids, set):
        return uids.intersection(numbers)
    if len(uids.ranges) == 1:
        lo, hi = uids.ranges[0]
        return {u for u in numbers if lo <= u <= hi}
    return {u for u in numbers if u in uids}


def _uid_ranges(uids: SequenceSet | set[int]) -> SequenceSet:
    return uids if isinstance(uids, SequenceSet) else SequenceSet.from_iterable(uids)


def _uid_set(uids: SequenceSet | set[int]) -> set[int]:
    if not isinstance(uids, SequenceSet):
        return uids
    out: set[int] = set()
    for lo, hi in uids.ranges:
        out.update(range(lo, hi + 1))  # (in C: iterating the SequenceSet costs 10x)
    return out


def _code_in(tagged: bytes, code: bytes) -> bool:
    """Does the status text ``tagged`` (``NO [NONEXISTENT] ...``, no tag) carry the response code ``code``?"""
    try:
        return parse_response_head(b"* " + tagged).code_name == code
    except TokenError:
        return False


def _esearch_ranges(reply) -> tuple[tuple[int, int], ...]:
    for line in search_ok(reply).untagged:
        i = line.upper().find(b" ALL ")
        if i >= 0:
            try:
                return SequenceSet.parse(line[i + 5:].split(b" ")[0].strip()).ranges
            except SequenceSetError:
                raise malformed_search(line) from None
    return ()


def _oldest(session, names) :
    for c in session.inflight_commands():
        if c.name in names:
            return c
    return None


def _status_items(lines: list[bytes], mailbox: str) -> dict[bytes, int]:
    """The items of ``mailbox``'s ``* STATUS`` among ``lines`` (upper-case names)."""
    for line in lines:
        parts = status_parts(line)
        if parts is not None and status_mailbox(parts[0]) == mailbox:
            return status_values(parts[1])
    return {}


def _select_state(lines: list[bytes]) -> dict[bytes, int]:
    """UIDVALIDITY, UIDNEXT and EXISTS among a SELECT's responses (those present): up to its tagged
    response (an EXISTS after it is news), the last of each (one before [CLOSED] is the old mailbox's)."""
    out = {}
    for line in lines:
        if line[:1] != b"*":
            break
        m = _SELECT_STATE_RE.match(line)
        if m:
            if m.group(1):
                out[m.group(1).upper()] = int(m.group(2))
            else:
                out[b"EXISTS"] = int(m.group(3))
    return out
