"""What a device is told of a folder's counts: STATUS (and LIST-STATUS) answers and NOTIFY's
unsolicited STATUS counted on the device's view (hidden messages taken off MESSAGES, UNSEEN, SIZE), and
whether a change is one the device may hear of at all (not if only messages hidden from it changed).

A mixin of ``plugins.policy.PolicyPlugin``: it uses the plugin's folder rules (``folder_hidden``,
``_hold_for_folder``), what hides messages in a folder (``_criteria``, ``hiders``) and the classification
cache (``cache``)."""

from __future__ import annotations

import re
import zlib

from twisted.internet import defer
from twisted.logger import Logger

from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.imap.tokens import Atom, ParenList, TokenError
from cpmproxy.proxy.backend import BackendError, BackendRefused
from cpmproxy.proxy.hooks import Answer, Drop, Hold, Rewrite
from plugins.cpm import KIND_CRITERIA, VIEW_ITEM
from plugins.policystate import (
    _SIZE_RE,
    PolicySession,
    SelectPlan,
    _among,
    _esearch_ranges,
    _oldest,
    _select_state,
    _status_items,
    _uid_ranges,
    _uid_set,
    _uidvalidity,
    side_examine,
)
from plugins.wire import (
    esearch_all,
    refused_as_dovecot,
    status_line,
    status_mailbox,
    status_parts,
    status_without,
    uid_set_pieces,
    wire_name,
)

log = Logger(namespace="cpmproxy.policy")


class MalformedStatus(BackendError, TokenError):
    """A STATUS line whose counts cannot be read: a BackendError where the side connection asked, a
    TokenError (the session's backend protocol error) in a response hook."""


class MailboxReplaced(BackendError):
    """The folder read on the side connection was deleted and another made under its name meanwhile."""


class StatusCounts:
    """Counts as the device sees them (see the module docstring)."""

    async def status_adjustment(self, session, st: PolicySession, mailbox: str, with_size: bool = True,
                                line: bytes | None = None):
        """How much of ``mailbox`` this device must not count: (messages, unseen, size) hidden; the size
        is 0 unless ``with_size`` (STATUS SIZE asked for). ``line``: the backend's ``* STATUS`` to be
        adjusted, if there is one (see ``status_adjustment_locked``)."""
        kinds, max_size, max_age = self._criteria(st, mailbox)
        hiders = self.hiders(session)
        if not (kinds or max_size or max_age or hiders or self.real_folders_matter(session, st, mailbox)):
            return None
        async with side_examine(session):
            return await self.status_adjustment_locked(session, st, mailbox, kinds, max_size, max_age, hiders,
                                                       with_size, line)

    async def status_adjustment_locked(self, session, st, mailbox, kinds, max_size, max_age, hiders,
                                       with_size: bool = True, line: bytes | None = None):
        """With ``line`` carrying MESSAGES and UIDNEXT (an unselected mailbox), the adjustment is anchored
        to it: the line says how the mailbox was when the backend wrote it, the side connection reads it
        later, and a message that arrived or left in between must not be counted as hidden or visible
        (found by review: a hidden IMDN arriving right after a visible message made it MESSAGES 0). Only
        UIDs below the line's UIDNEXT are looked at, and the adjustment is what takes the line's counts to
        the visible ones found: a message expunged in between is out of both."""
        anchor = _status_anchor(line, mailbox)
        selected_hidden = None
        if st.mailbox == mailbox and st.view is not None:
            # Dovecot counts the selected mailbox as this session knows it (not as it is: changes not yet
            # announced to the session are not in it), and so does the view.
            view = st.view
            hidden, selected_hidden = view.hidden, view.hidden_uids  # (read before any await)
        else:
            examined = session.side_command(b"EXAMINE " + wire_name(mailbox))
            searched = session.side_command(b"UID SEARCH RETURN (ALL) ALL")  # (pipelined)
            opened = await examined
            if opened.status != b"OK":
                await searched
                return None  # a mailbox that cannot be opened (e.g. none of that name): nothing to hide
            uids = SequenceSet.from_ranges(_esearch_ranges(await searched))  # (not expanded: 200,000 UIDs)
            plan = await self._examined_plan(session, mailbox, opened, kinds, max_size, max_age, hiders)
            plan.real_folders = self.real_folders_matter(session, st, mailbox)
            if anchor is not None:
                if anchor.get(b"UIDVALIDITY", plan.uidvalidity) != plan.uidvalidity:
                    # The line is of a folder deleted since, another of its name examined (found by review: the
                    # new folder's messages were counted against the old one's line, and what the old one hid
                    # was counted as visible).
                    raise MailboxReplaced(f"{mailbox!r} was replaced while its counts were read")
                uids &= _below(anchor[b"UIDNEXT"])
            hidden = await self._side_hidden(session, st, plan, uids)
        if not hidden and (anchor is None or selected_hidden is not None or len(uids) == anchor[b"MESSAGES"]):
            return None  # (with an anchor, messages gone since the line are taken off it too)
        n_hidden = len(hidden)  # (now: the selected view's set changes in place as messages go)
        if st.mailbox == mailbox:  # (others were EXAMINEd on the side connection above)
            # (Not awaited: a failure of the connection is the search's next, raised there.)
            session.side_command(b"EXAMINE " + wire_name(mailbox))
        # Which unseen messages are hidden: the unseen UIDs (a CPM store has few), matched here. Naming the
        # hidden UIDs in the command instead cost a command line of ~6 bytes per scattered hidden message.
        unseen = SequenceSet.from_ranges(_esearch_ranges(await session.side_command(
            b"UID SEARCH RETURN (ALL) UNSEEN")))
        told_size = None if anchor is None else next((anchor[k] for k in _SIZES if k in anchor), None)
        if selected_hidden is not None:
            told = None if anchor is None else anchor.get(b"UNSEEN")
            if told is None:
                unseen_n = len(unseen & selected_hidden)
            else:
                # The line counts the unseen messages the session knows, this search those there now: a
                # hidden unseen one another session expunged, not yet told, is in the line and no longer
                # here, and taking off the hidden ones found left it counted (found by the model test). So
                # the visible ones are counted, and the adjustment takes the line's number to that.
                unseen_n = told - len(view.known_visible(u for lo, hi in unseen.ranges for u in range(lo, hi + 1)))
            anchor = None  # (the view is the session's, as the backend counts the selected mailbox)
        else:
            if anchor is not None:
                unseen &= uids
            unseen_n = sum(1 for lo, hi in unseen.ranges for u in range(lo, hi + 1) if u in hidden)
        size = 0  # (not asked for: the sizes of thousands of hidden messages are not fetched)
        if with_size:
            asked = selected_hidden if selected_hidden is not None else SequenceSet.from_iterable(hidden)
            found, size = await _sizes(session, asked)
            # As for UNSEEN: a hidden message expunged since the line (the selected mailbox: not yet told to
            # the session) is in its SIZE, and its size no longer to be had here. Then the visible messages'
            # sizes are added up instead; a race, rare, so a FETCH of every visible message is rarely paid.
            if told_size is None:
                pass
            elif selected_hidden is not None and found < len(asked):
                size = told_size - (await _sizes(session, SequenceSet.from_iterable(view.visible)))[1]
            elif selected_hidden is None and len(uids) < anchor[b"MESSAGES"]:
                size = told_size - (await _sizes(session, uids - SequenceSet.from_iterable(hidden)))[1]
        if anchor is not None:
            n_hidden = anchor[b"MESSAGES"] - (len(uids) - n_hidden)
            if b"UNSEEN" in anchor:  # (may be below 0: a message marked unseen in between)
                unseen_n = anchor[b"UNSEEN"] - (len(unseen) - unseen_n)
        return n_hidden, unseen_n, size

    async def _side_hidden(self, session, st: PolicySession, plan: SelectPlan,
                           uids: set[int] | SequenceSet) -> set[int]:
        """Hidden UIDs among ``uids`` of a mailbox EXAMINEd on the side connection (classification cache
        shared). ``uids`` may be ranges: all of a big mailbox's UIDs are not expanded for a STATUS."""
        cache = self.cache.get(session.user, plan.mailbox, plan.uidvalidity)
        kinds = set(plan.hidden_kinds)
        if "other" in kinds:
            kinds |= set(KIND_CRITERIA)
            kinds.discard("other")
        top = (uids.ranges[-1][1] if uids.ranges else 0) if isinstance(uids, SequenceSet) else max(uids, default=0)
        for kind in sorted(kinds):
            start = cache.known(kind) + 1
            if start > top:
                continue
            reply = await session.side_command(b"UID SEARCH RETURN (ALL) UID %d:* " % start + KIND_CRITERIA[kind])
            cache.add(kind, top, set(esearch_all(reply)))
        hidden: set[int] = set()
        for kind in plan.hidden_kinds:
            if kind == "other":
                known = set().union(*(cache.kinds.get(k, set()) for k in KIND_CRITERIA))
                hidden |= _uid_set(uids) - known
            else:
                hidden |= _among(cache.kinds.get(kind, ()), uids)
        if plan.max_size:
            hidden |= set(esearch_all(await session.side_command(b"UID SEARCH RETURN (ALL) LARGER %d"
                                                                   % plan.max_size)))
        if plan.max_age_days:
            hidden |= set(esearch_all(await session.side_command(b"UID SEARCH RETURN (ALL) OLDER %d"
                                                                   % (plan.max_age_days * 86400))))
        if plan.real_folders:
            hidden |= await self._hidden_by_folder(session, st, plan.mailbox, plan.uidvalidity, uids, examined=True)
        return _among(hidden | _uid_set(plan.extra), uids)

    def count_at_answer(self, session, st: PolicySession, cmd, names: list[str]) -> Rewrite | Answer | None:
        """A STATUS or LIST-STATUS command: the counts of the folders it reports are adjusted as each answer
        comes, anchored to it (``status_adjustment_locked``; counted before the command went out, a hidden
        message arriving in between was counted as visible). The backend is asked for MESSAGES and UIDNEXT
        (and UIDVALIDITY) too if the client asked for a count without them (taken out of the answers again).
        The proxy's own item ``XCPM-VIEW`` is taken out of the command and answered here (``view_token``).
        The command line to send instead, if it changes (the item list edited in place: the rest of the
        line, its tag included, goes as the client wrote it)."""
        cmd.state["status_names"] = set(names)
        cmd.state["status_adjusts"] = {}  # (counted unanchored where the item list cannot be read)
        found = _status_item_span(cmd)
        if found is None:
            return None  # (the backend answers BAD, or says what it makes of it)
        body, start, end = found
        words = body[start:end].split()
        asked = {w.upper() for w in words}
        if (unknown := next((w for w in words if w.upper() not in _STATUS_ITEMS), None)) is not None:
            # (A count the view does not adjust, IMAP4rev2's DELETED, RFC 9208's DELETED-STORAGE, would count
            # hidden messages: refused, in Dovecot's words for an item it does not know.)
            return refused_as_dovecot(cmd.name, b"Invalid status item " + unknown.upper() + b".")
        if VIEW_ITEM in asked:
            words = [w for w in words if w.upper() != VIEW_ITEM]
            cmd.state["view_item"] = True
        added = []
        if asked & _COUNTS and (cmd.name == b"LIST" or any(
                not self.folder_hidden(st, n) and self._may_hide(session, st, n) for n in names)):
            # (A LIST's answers may include a folder made since its folders were read: counted too.)
            # UIDVALIDITY too, which Dovecot's NOTIFY events lack: the answer is then told from an event
            # (MESSAGES UIDNEXT UNSEEN), which keeps its items and is told only if worth it (found by review).
            added = [name for name in (b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY") if name not in asked]
        if not words and not added:
            added = [b"UIDNEXT"]  # (XCPM-VIEW alone: the backend takes no empty list)
        cmd.state["status_added"] = added
        cmd.state["status_sent"] = {w.upper() for w in words} | set(added)
        if not added and not cmd.state.get("view_item"):
            return None
        return Rewrite(body[:start] + b" ".join(words + added) + body[end:] + b"\r\n")

    def view_token(self, st: PolicySession, mailbox: str) -> int:
        """``XCPM-VIEW``: a number that changes when what hides messages of ``mailbox`` from this device
        does (its kinds, the size and age limits); 0 where nothing can be hidden. Not the local deletions,
        which are the device's own doing (it knows them)."""
        kinds, max_size, max_age = self._criteria(st, mailbox)
        if not (kinds or max_size or max_age):
            return 0
        return zlib.crc32(repr((sorted(kinds), max_size, max_age)).encode()) or 1

    async def _answer_adjustment(self, session, st: PolicySession, cmd, mailbox: str, line: bytes) -> None:
        try:
            adjust = await self.status_adjustment(session, st, mailbox, with_size=b"SIZE" in line.upper(), line=line)
        except Exception as e:  # (whatever it is, the answer is replayed once, never held again)
            if isinstance(e, (BackendError, defer.TimeoutError)):
                log.warn("counting hidden messages for a STATUS failed: {error} session={session}", error=str(e),
                         session=session.session_id)
            else:
                log.failure("counting hidden messages for a STATUS failed session={session}",
                            session=session.session_id)
            adjust = _UNCOUNTABLE
            cmd.state["status_uncountable"] = cmd.name == b"STATUS"  # (LIST-STATUS leaves the folder out)
        cmd.state["status_adjusts"][mailbox] = adjust  # the replayed response finds it

    def _status_response(self, session, st: PolicySession, resp):
        parts = status_parts(resp.data)
        mailbox = None if parts is None else status_mailbox(parts[0])
        if mailbox is None:
            return None
        cmd = _oldest(session, (b"STATUS", b"LIST"))
        ours = cmd is not None and _answers(cmd, mailbox, parts[1])
        if mailbox not in st.folders and not (ours and mailbox in cmd.state["status_names"]):
            # (Unsolicited, NOTIFY, also while a STATUS or LIST of other folders is in flight: found by review,
            # a hidden Session History folder's counts went out then. A LIST's answer of a folder made since
            # its folders were read, too.)
            return self._hold_for_folder(session, st, mailbox)  # (as for LIST)
        if self.folder_hidden(st, mailbox):
            return Drop()
        if ours and self._may_hide(session, st, mailbox):
            adjusts = cmd.state["status_adjusts"]
            if mailbox not in adjusts:
                return Hold(defer.Deferred.fromCoroutine(self._answer_adjustment(session, st, cmd, mailbox,
                                                                                 resp.data)))
            adjust = adjusts.pop(mailbox)  # (popped: the next answer of this folder is counted on its own)
        elif ours:
            adjust = None  # (nothing hidden there)
        elif mailbox in st.unsolicited_status:
            adjust = st.unsolicited_status.pop(mailbox)
            if adjust is _NOTHING_VISIBLE:
                return Drop()
        elif self._may_hide(session, st, mailbox):
            # Unsolicited (NOTIFY): counted on the view too, for the state the backend just reported.
            return Hold(defer.Deferred.fromCoroutine(self._unsolicited_adjustment(session, st, mailbox,
                                                                                   resp.data)))
        else:
            return None
        if adjust is _UNCOUNTABLE:
            return Drop()
        new = self.adjust_status_line(resp.data, adjust) if adjust else resp.data
        if ours and (added := cmd.state.get("status_added")):
            new = status_without(new, added)
        if ours and cmd.state.get("view_item"):
            new = _with_item(new, VIEW_ITEM, self.view_token(st, mailbox))
        return None if new == resp.data else Rewrite(new)

    def _may_hide(self, session, st: PolicySession, mailbox: str) -> bool:
        kinds, max_size, max_age = self._criteria(st, mailbox)
        return bool(kinds or max_size or max_age or self.hiders(session) or self.real_folders_matter(session, st, mailbox))

    async def visible_change(self, session, st: PolicySession, mailbox: str, since: int | None,
                             uids: tuple[int, ...] = ()) -> bool | None:
        """Whether a message this device sees in ``mailbox`` arrived or changed after MODSEQ ``since`` (or
        is among ``uids``, new messages whose UIDs are known): True; False if only hidden ones did (an IMDN
        the policy hides arriving, or flagged): told of it, the device would learn of a message that does
        not exist for it; None if no message did (an expunge, or a metadata write).
        (Dovecot gives every message of a mailbox the HIGHESTMODSEQ until CONDSTORE was first used on it,
        which this search does: the first time, every message matches. New UIDs, when known, avoid that.)"""
        kinds, max_size, max_age = self._criteria(st, mailbox)
        hiders = self.hiders(session)
        async with side_examine(session):
            examined = session.side_command(b"EXAMINE " + wire_name(mailbox))
            searched = None if uids else \
                session.side_command(b"UID SEARCH RETURN (ALL) MODSEQ %d" % (since + 1))  # (pipelined)
            opened = await examined
            if opened.status != b"OK":
                if searched is not None:
                    await searched
                return False
            changed = set(uids) if uids else set(esearch_all(await searched))
            if not changed:
                return None
            real = self.real_folders_matter(session, st, mailbox)
            if not (kinds or max_size or max_age or hiders or real):
                return True
            plan = await self._examined_plan(session, mailbox, opened, kinds, max_size, max_age, hiders)
            plan.real_folders = real
            return bool(changed - await self._side_hidden(session, st, plan, changed))

    async def _examined_plan(self, session, mailbox: str, opened, kinds, max_size, max_age, hiders) -> SelectPlan:
        """What hides messages of ``mailbox``, EXAMINEd on the side connection (``opened``: its reply), keyed
        by the examined folder's own UIDVALIDITY. (Asked by name after the EXAMINE, it is the examined
        folder's too with Dovecot, which answers a STATUS of the selected mailbox's name from it, even once
        deleted and made anew: one round trip fewer, and no other folder's for a server that does not.)"""
        uidvalidity = _select_state(opened.untagged).get(b"UIDVALIDITY") or await _uidvalidity(session, mailbox)
        plan = SelectPlan(mailbox, uidvalidity, kinds, max_size, max_age)
        for h in hiders:
            plan.extra |= _uid_ranges(await h.hidden(session, mailbox, uidvalidity))
        return plan

    async def _unsolicited_adjustment(self, session, st: PolicySession, mailbox: str, line: bytes) -> None:
        try:
            adjust = await self.status_adjustment(session, st, mailbox, with_size=b"SIZE" in line.upper(), line=line)
            if not await self._unsolicited_told(session, st, mailbox, adjust, line):
                adjust = _NOTHING_VISIBLE
        except (BackendError, defer.TimeoutError) as e:
            # (Unadjusted, it would count what the device must not see: dropped, a notification missed.)
            log.warn("counting hidden messages for an unsolicited STATUS failed, dropped: {error} "
                     "session={session}", error=str(e), session=session.session_id)
            adjust = _UNCOUNTABLE
        st.unsolicited_status[mailbox] = adjust  # the replayed response finds it (never held twice)

    async def _unsolicited_told(self, session, st: PolicySession, mailbox: str, adjust, line: bytes) -> bool:
        """Whether an unsolicited STATUS ``line`` of ``mailbox`` (a NOTIFY event) goes to the device: its
        counts as the device sees them changed, or a message it sees changed since the last one it was
        told. The answers to NOTIFY SET STATUS all go (they are the device's starting point). What the
        line says is what the device is told, so it is the next one's baseline; the backend is asked only
        for what the line lacks (a later state could hide a change from the next comparison)."""
        now = _status_items([line], mailbox)
        if not all(k in now for k in (b"MESSAGES", b"UNSEEN", b"UIDNEXT", b"HIGHESTMODSEQ")):
            reply = await session.side_command(b"STATUS " + wire_name(mailbox)
                                               + b" (MESSAGES UNSEEN UIDNEXT HIGHESTMODSEQ)")
            now = {**_status_items(reply.untagged, mailbox), **now}
        if b"HIGHESTMODSEQ" not in now:
            return True  # (cannot tell: told, as before)
        hidden, unseen, _ = adjust or (0, 0, 0)
        state = ((now.get(b"MESSAGES", 0) - hidden, now.get(b"UNSEEN", 0) - unseen), now[b"HIGHESTMODSEQ"],
                 now.get(b"UIDNEXT"))
        told = st.status_told.get(mailbox)
        st.status_told[mailbox] = state
        if _oldest(session, (b"NOTIFY",)) is not None:
            return True
        return await self.worth_telling(session, st, mailbox, told, state)

    async def worth_telling(self, session, st: PolicySession, mailbox: str, told: tuple | None, now: tuple,
                            uids: tuple[int, ...] = ()) -> bool:
        """Whether a change of ``mailbox`` is one the device may hear of: not if only hidden messages changed.
        ``now`` and ``told``: (the counts the device sees, HIGHESTMODSEQ, UIDNEXT) now and as it was last
        told (None: nothing told yet; UIDNEXT may be None); ``uids``: the new messages, if known."""
        counts, modseq, uidnext = now
        if told is not None:
            if counts != told[0]:
                return True  # (a message it sees arrived or left)
            if (modseq, uidnext) == tuple(told[1:]):
                return False
            if uidnext is not None and told[2] is not None and uidnext > told[2]:
                # Arrivals, the counts unmoved: told if one of them is visible (new UIDs are certain where
                # MODSEQs are not: see visible_change).
                if uidnext - told[2] > _MAX_NEW_LOOKED_AT:
                    return True
                return await self.visible_change(session, st, mailbox, None, tuple(range(told[2], uidnext))) is True
        # Otherwise the last change alone is looked at (Dovecot reports changes one by one, ~0.5 s apart at
        # most); one that left no message to find (an expunge) is told when nothing was told before, as it
        # may be of a message the device saw.
        seen = await self.visible_change(session, st, mailbox, told[1] if told is not None else modseq - 1, uids)
        return seen is True or (seen is None and told is None)

    @staticmethod
    def adjust_status_line(line: bytes, adjust) -> bytes:
        """``* STATUS mbox (MESSAGES n UNSEEN n SIZE n ...)`` minus what is hidden from the device. A count
        that is not a number cannot be adjusted, nor shown as it is (it counts hidden messages): the backend's
        protocol error."""
        parts = status_parts(line)
        if parts is None or not adjust:
            return line
        hidden, unseen, size = adjust
        sent, items = parts
        for j in range(0, len(items) - 1, 2):
            if items[j].upper() in (b"MESSAGES", b"UNSEEN", *_SIZES) and not items[j + 1].isdigit():
                raise MalformedStatus(f"protocol error from backend: STATUS count not a number {line[:200]!r}")
        messages = None
        for j in range(0, len(items) - 1, 2):
            key = items[j].upper()
            if key == b"MESSAGES":
                messages = max(0, int(items[j + 1]) - hidden)
                items[j + 1] = b"%d" % messages
            elif key == b"UNSEEN":
                items[j + 1] = b"%d" % max(0, int(items[j + 1]) - unseen)
            elif key in _SIZES:
                items[j + 1] = b"%d" % max(0, int(items[j + 1]) - size)
        for j in range(0, len(items) - 1, 2):
            if messages is not None and items[j].upper() == b"UNSEEN" and int(items[j + 1]) > messages:
                # (The selected mailbox: hidden messages the session knows that another one expunged
                # meanwhile are no longer found unseen on the side connection, though Dovecot counts them.)
                items[j + 1] = b"%d" % messages
            # Which recent messages are hidden is not worth a query (RECENT is obsolete in IMAP4rev2):
            # at most the visible messages; without MESSAGES asked for, the hidden ones are taken off.
            if items[j].upper() == b"RECENT" and items[j + 1].isdigit():
                recent = max(0, int(items[j + 1]) - hidden) if messages is None else \
                    min(int(items[j + 1]), messages)
                items[j + 1] = b"%d" % recent
        return status_line(sent, items)


async def _sizes(session, uids: SequenceSet) -> tuple[int, int]:
    """How many of ``uids`` the side connection's mailbox has, and their RFC822.SIZE added up."""
    # (Piece by piece, pipelined: each command line short however scattered the UIDs are.)
    fetches = [session.side_command(b"UID FETCH " + p + b" (RFC822.SIZE)") for p in uid_set_pieces(uids)]
    replies = [await d for d in fetches]  # (all of them, even after a refused one)
    found = total = 0
    for reply in replies:
        if reply.status != b"OK":
            raise BackendRefused("backend fetch of sizes failed", reply.tagged)
        for line in reply.untagged:
            if (m := _SIZE_RE.search(line)) is not None:
                found += 1
                total += int(m.group(1))
    return found, total


def _status_anchor(line: bytes | None, mailbox: str) -> dict[bytes, int] | None:
    """The counts of a ``* STATUS`` line of ``mailbox`` an adjustment can be anchored to (it has MESSAGES
    and UIDNEXT); None otherwise."""
    if line is None:
        return None
    items = _status_items([line], mailbox)
    return items if b"MESSAGES" in items and b"UIDNEXT" in items else None


# The STATUS items a device may ask for: the counts the view adjusts (_COUNTS), and what no hidden message
# changes (a folder's UIDs, MODSEQ, identifiers, APPENDLIMIT: RFC 7889), the proxy's own XCPM-VIEW.
_STATUS_ITEMS = frozenset((b"MESSAGES", b"RECENT", b"UNSEEN", b"SIZE", b"X-SIZE", b"UIDNEXT", b"UIDVALIDITY",
                           b"HIGHESTMODSEQ", b"APPENDLIMIT", b"MAILBOXID", b"X-GUID", VIEW_ITEM))
_SIZES = (b"SIZE", b"X-SIZE")  # (X-SIZE: Dovecot's older name of RFC 8438's SIZE, still answered)
_COUNTS = frozenset((b"MESSAGES", b"UNSEEN", b"RECENT", *_SIZES))  # (the STATUS items a view changes)


def _status_item_span(cmd) -> tuple[bytes, int, int] | None:
    """Where the STATUS item list is in a STATUS command (``tag STATUS mailbox (items)``) or a LIST
    command's ``RETURN (... STATUS (items) ...)``: (the line without CRLF, start and end of the items
    inside the parentheses); None if there is none or the command cannot be read."""
    try:
        args = cmd.args
    except TokenError:
        return None
    if cmd.name == b"STATUS":
        if len(args) != 2 or not isinstance(args[1], ParenList):
            return None
    elif not _returns_status(args):
        return None
    body = cmd.line.rstrip(b"\r\n")
    # (Last in the line either way: RETURN's options end a LIST command, after every pattern.)
    m = next(reversed(list((_STATUS_CMD_ITEMS if cmd.name == b"STATUS" else _LIST_STATUS_ITEMS).finditer(body))),
             None)
    return None if m is None else (body, m.start(1), m.end(1))


def _returns_status(args: list) -> bool:
    """Do a LIST command's arguments end with ``RETURN (... STATUS (items) ...)``?"""
    if len(args) < 2 or not isinstance(args[-1], ParenList) or not isinstance(args[-2], Atom) \
            or args[-2].upper() != b"RETURN":
        return False
    options = args[-1].items
    return any(isinstance(options[j], Atom) and options[j].upper() == b"STATUS" and isinstance(options[j + 1], ParenList)
               for j in range(len(options) - 1))


_STATUS_CMD_ITEMS = re.compile(rb"\(([^()]*)\)\s*$")
_LIST_STATUS_ITEMS = re.compile(rb"\bSTATUS\s*\(([^()]*)\)", re.I)


def _answers(cmd, mailbox: str, words: list[bytes]) -> bool:
    """Is a ``* STATUS`` of ``mailbox`` with item ``words`` the answer of ``cmd`` (a STATUS or LIST command
    in flight), not a NOTIFY event: the items it asked the backend for, of a folder it names (a LIST's of
    any folder: one may be made while it runs)?"""
    names = cmd.state.get("status_names")
    if names is None:
        return False
    sent = cmd.state.get("status_sent")
    if sent is None:
        return mailbox in names
    return {w.upper() for w in words[0::2]} == sent and (cmd.name == b"LIST" or mailbox in names)


def _with_item(line: bytes, name: bytes, value: int) -> bytes:
    """A ``* STATUS`` line with one item more at the end."""
    parts = status_parts(line)
    return line if parts is None else status_line(parts[0], [*parts[1], name, b"%d" % value])


def _below(uidnext: int) -> SequenceSet:
    """The UIDs below ``uidnext``."""
    return SequenceSet.from_ranges([(1, uidnext - 1)] if uidnext > 1 else [])


_UNCOUNTABLE = object()  # (an unsolicited STATUS whose hidden messages could not be counted: dropped)


_NOTHING_VISIBLE = object()  # an unsolicited STATUS about hidden messages only: not passed on


_MAX_NEW_LOOKED_AT = 10000  # more arrivals than this at once: told without a look at each
