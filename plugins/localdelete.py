"""Local delete: a device deletes a message for itself only; the server never sees it (DESIGN.md R6).

Signal (DESIGN.md section 4): capability ``XCPM-LOCALDELETE``; ``STORE ... +FLAGS (\\Deleted $LocalDelete)``
marks messages, ``-FLAGS`` cancels, EXPUNGE / UID EXPUNGE / CLOSE carry it out. A device whose policy says
``delete_mode = "local"`` has every ``\\Deleted`` treated as local, and its expunges never reach the server:
messages flagged ``\\Deleted`` there by someone else leave that device's view only.

Neither flag nor expunge of those messages reaches the backend: while pending, the flags live in the proxy
(merged into FETCH FLAGS responses); at expunge, a record is written to the backend as METADATA on the
mailbox and acknowledged *before* the client's tagged OK:

    /private/vendor/vendor.cpmproxy/localdelete/<device>/<uidvalidity>-<unique>  =  "<uid set>"

One new entry per expunge (never read-modify-write, so two connections of a device cannot lose each
other's records); entries are merged and pruned (UIDVALIDITY changed, messages gone from the server) when
the mailbox is selected. Hiding itself is the policy plugin's view (the same operation as policy hiding).

Before a device's first record, a server-level entry marks the device as one that deletes locally:

    /private/vendor/vendor.cpmproxy/localdelete/<device>  =  "1"     (GETMETADATA "" ...)

It is read at login, with the account's preferences (one command). A device without it has no records
anywhere, so its SELECTs ask the backend nothing more (most devices never delete locally; the records
query was a second backend command for every SELECT). Sessions of the device in this process learn of a new mark at once; a session of the same device
on another proxy process that logged in before the device's very first local delete learns of it at its
next login (README, "Known limits").
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from cpmproxy.config import ConfigError
from cpmproxy.imap.seqset import SequenceSet, SequenceSetError
from cpmproxy.imap.tokens import (
    Atom,
    LiteralRef,
    ParenList,
    TokenError,
    astring_text,
    format_tokens,
    tokenize,
)
from cpmproxy.proxy.backend import BackendError, BackendRefused, Reply
from cpmproxy.proxy.hooks import Answer, Collect, Defer, Plugin, Rewrite, resolved
from plugins.cpm import NO_SERVER_CHANGE, PREFIX
from plugins.policystate import side_examine
from plugins.wire import (
    APPENDUID,
    FETCH_FLAGS,
    MODIFIED,
    SEARCH_COMMANDS,
    enables_qresync,
    esearch_all,
    fetch_item_pattern,
    find_fetch_item,
    has_caps,
    iter_metadata,
    mailbox_name,
    metadata_value,
    search_key_args,
    uid_set_pieces,
    wire_name,
)

log = Logger(namespace="cpmproxy.localdelete")

CAPABILITY = b"XCPM-LOCALDELETE"
KEYWORD = b"$LOCALDELETE"
_MAX_LEFT_MAILBOXES = 100  # mailboxes whose pending marks a session keeps while another is selected
RECORDS = PREFIX + "/localdelete"
# tag, UID, set, modifiers ("(UNCHANGEDSINCE n) ", RFC 7162), operation, flags: a list in parentheses or
# flags separated by spaces (RFC 3501: "flag-list / (flag *(SP flag))"), or none at all (Dovecot reads
# ``STORE 1 FLAGS`` as a replace with no flags: found by review, a local-mode device's cleared the server's
# \Deleted of another device)
_STORE_RE = re.compile(rb"^(\S+) (UID )?STORE (\S+) (\([^()]*\) )?(\S+)(?: (\([^()]*\)|[^()]+))?$", re.I | re.S)
# Commands that may enable CONDSTORE (RFC 7162 3.1), and what in them does.
_CONDSTORE_ENABLING = frozenset((b"ENABLE", b"SELECT", b"EXAMINE", b"FETCH", b"STORE", b"SEARCH", b"STATUS"))
_CONDSTORE_ENABLING_RE = re.compile(rb"CONDSTORE|QRESYNC|MODSEQ|CHANGEDSINCE", re.I)
_FETCH_UID = fetch_item_pattern(rb"UID (\d+)")
# Commands this plugin may decide (see _must_wait_for), and those in flight that change what a search means.
_LOCAL_DECISIONS = frozenset((b"STORE", b"EXPUNGE", b"CLOSE")) | SEARCH_COMMANDS
_RESELECTING = frozenset((b"SELECT", b"EXAMINE", b"EXPUNGE", b"MOVE", b"CLOSE", b"UNSELECT"))
_SAFE_DEVICE = re.compile(r"[a-z0-9._-]{1,64}")
_ENCODED_DEVICE = re.compile(r"x(?:[0-9a-f]{2})*")


def device_key(device_id: str) -> str:
    """The device id as a METADATA entry name component. Dovecot folds entry names to lower case, so
    anything but lower-case-safe ids is hex-encoded (devices "A" and "a" must stay apart). A safe id
    that looks encoded is encoded too: device "x41" must not get the key of device "A"."""
    if _SAFE_DEVICE.fullmatch(device_id) and not _ENCODED_DEVICE.fullmatch(device_id):
        return device_id
    return "x" + device_id.encode().hex()


@dataclass
class RecordsReply(Reply):
    """``query``'s answer for a mailbox where this session left pending marks."""
    keep_view: bool = False


@dataclass
class LocalState:
    pending: set[int] = field(default_factory=set)  # UIDs marked for local deletion, not yet expunged
    pending_in: Any = None  # the SelectedMailbox ``pending`` is of
    # Marks of mailboxes left before their EXPUNGE, by name: (UIDVALIDITY, UIDs), back at their next SELECT
    # (IMAP's \Deleted stays on a message while another mailbox is selected: found by review, they were lost).
    left: OrderedDict = field(default_factory=OrderedDict)
    need_view: bool = False  # pending marks set where no view reads message numbers: the next command makes one
    qresync: bool = False
    condstore: bool = False  # the client enabled CONDSTORE (RFC 7162 3.1): FETCH FLAGS carry MODSEQ
    marked: bool | None = None  # the device's server-level mark, as read at login (None: not known yet)


class LocalDeletePlugin(Plugin):
    name = "localdelete"
    requires = ("policy",)
    response_continuations = True  # FLAGS may follow a literal in a FETCH
    response_names = frozenset((b"FETCH",))  # (the FLAGS of a message being deleted locally)

    def __init__(self, proxy):
        super().__init__(proxy)
        # (user, device key) whose mark is known to be on the backend: set by a session of this process
        # (so the device's other sessions here query records from then on) or read at a login.
        self._marked: set[tuple[str, str]] = set()

    def configure(self, settings: dict) -> None:
        if settings:
            raise ConfigError(f"plugin.localdelete: takes no settings (policy decides), got {sorted(settings)}")

    # -- wiring ---------------------------------------------------------------------------------

    def _allowed(self, session) -> tuple[bool, bool]:
        """(local delete allowed, every delete is local) for this device."""
        policy = self.peer("policy")
        if policy is None:
            return False, False
        pol = policy.state(session).policy
        every = pol.delete_mode == "local"
        # (A device whose every delete is local has local delete, whatever local_delete says elsewhere:
        # its deletes would be recorded and never applied.)
        return pol.local_delete or every, every

    def state(self, session) -> LocalState:
        st = session.state.get(self.name)
        if st is None:
            st = session.state[self.name] = LocalState()
        return st

    # -- hider API used by the policy plugin ------------------------------------------------------

    def active(self, session) -> bool:
        """Whether this session's views must ask for local deletions: allowed, and the device has (or may
        have) records. An unmarked device has none: its SELECTs then take the view's fast path."""
        st = self.state(session)
        return self._allowed(session)[0] and (not self._unmarked(session) or bool(st.left or st.pending))

    def _unmarked(self, session) -> bool:
        """The device is known to have no records: unmarked at login, and not marked since in this process."""
        return self.state(session).marked is False \
            and (session.user, device_key(session.device_id)) not in self._marked

    def query(self, session, mailbox: str):
        """Ask the backend for this device's records of ``mailbox`` (sent at once, so it pipelines); a
        device that never deleted locally has none, and the answer is ready without asking."""
        # (Where the mark is not known, the records are asked for, as before marks existed.)
        if self._unmarked(session) or not _has_metadata(session):
            # (A backend without METADATA holds no records: the device's deletes there cannot be local.)
            d = defer.succeed(Reply([], b"OK No local deletions by this device."))
        else:
            prefix = f"{RECORDS}/{device_key(session.device_id)}"
            d = session.side_command(b"GETMETADATA (DEPTH infinity) " + wire_name(mailbox) + b" ("
                                     + prefix.encode() + b")")
        st = self.state(session)
        if mailbox in st.left or (st.pending and st.pending_in is not None and st.pending_in.name == mailbox):
            # Marks this session left there (or has there: the same mailbox selected again) come back at
            # its SELECT: they need the view (has_records).
            d.addCallback(lambda r: RecordsReply(r.untagged, r.tagged, keep_view=True))
        return d

    def _mark_entry(self, session) -> bytes:
        return f"{RECORDS}/{device_key(session.device_id)}".encode()

    def login(self, session):
        """The device's mark, from the policy plugin's login read of the account's entries (the marks are
        among them: no command of its own)."""
        if not self._allowed(session)[0]:
            return None
        entries = self.peer("policy").state(session).login_entries
        if entries is not None:  # (else not known: records are asked for at every SELECT)
            self._set_marked(session, self._mark_entry(session).decode().lower() in entries)
        return None

    def closed(self, session) -> None:
        """The last session of a device here forgets that it was marked: its next login reads the mark
        from the server (kept for every device that ever deleted locally, the set grew for good)."""
        if not session.user or not session.device_id:
            return
        key = (session.user, device_key(session.device_id))
        if key in self._marked and not any(device_key(s.device_id) == key[1]
                                           for s in self.proxy.sessions_of(session.user) if s.device_id):
            self._marked.discard(key)

    def _set_marked(self, session, marked: bool) -> None:
        self.state(session).marked = marked
        if marked:
            self._marked.add((session.user, device_key(session.device_id)))

    async def _mark(self, session) -> None:
        """Put the device's mark on the backend before its first record (idempotent)."""
        key = (session.user, device_key(session.device_id))
        if key in self._marked:
            return
        reply = await session.side_command(b'SETMETADATA "" (' + self._mark_entry(session) + b' "1")')
        if reply.status != b"OK":
            raise BackendRefused("backend refused the local-delete mark", reply.tagged)
        if getattr(session, "phase", None) != "closed":  # (else its ``closed`` hook ran already: kept for good)
            self._marked.add(key)

    def has_records(self, session, reply) -> bool:
        """Did ``query`` find any record (cheap test before anything else is asked of the backend)?"""
        _records_read(reply)
        if getattr(reply, "keep_view", False):
            return True
        low = f"{RECORDS}/{device_key(session.device_id)}/".lower()
        return any(entry.lower().startswith(low) for _, entry, _ in iter_metadata(reply.untagged))

    async def hidden(self, session, mailbox: str, uidvalidity: int, reply=None) -> SequenceSet:
        """This device's local deletions in ``mailbox`` (as ranges: thousands of them are a few ranges,
        cheap to combine with the mailbox's UIDs); also prunes stale records."""
        prefix = f"{RECORDS}/{device_key(session.device_id)}"
        if reply is None:
            reply = await self.query(session, mailbox)
        records = _parse_records(_records_read(reply).untagged, prefix)
        ranges = []
        stale = []
        for entry, (valid, value) in records.items():
            if valid != uidvalidity:
                # Only a lower one is an older folder's of this name, stale (Dovecot gives a folder made anew
                # a greater UIDVALIDITY). A greater one is of a folder made after the one asked about was
                # opened, its records read by name (found by review: a STATUS counting the EXAMINEd folder,
                # deleted and made anew meanwhile, deleted the new folder's records: its local deletions came
                # back). (A server that gives a lower one leaves such records unpruned, never applied.)
                if valid < uidvalidity:
                    stale.append(entry)
                continue
            ranges += value.ranges
        uids = SequenceSet.from_ranges(ranges)
        current = [e for e, (v, _) in records.items() if v == uidvalidity]
        if stale or len(current) > 8:
            defer.Deferred.fromCoroutine(self._compact(session, mailbox, uidvalidity, uids, stale, current)) \
                .addErrback(self._compact_failed, session)
        return uids

    async def _compact(self, session, mailbox, uidvalidity, uids, stale, current) -> None:
        """Merge this device's records for the mailbox into one (dropping UIDs gone from the server),
        then delete the old ones: write first, delete after, so a crash in between loses nothing; a
        search the backend refuses stops it (taken for "none left", it would delete every record)."""
        wire = wire_name(mailbox)
        if len(current) > 1 and uids:
            async with side_examine(session):
                opened = session.side_command(b"EXAMINE " + wire)
                # (In pieces, pipelined: ~10,000 scattered UIDs in one line pass Dovecot's default limit.)
                searches = [session.side_command(b"UID SEARCH RETURN (ALL) UID " + piece)
                            for piece in uid_set_pieces(uids)]
                if (await opened).status != b"OK":
                    raise BackendRefused("backend refused to open the mailbox", (await opened).tagged)
                alive = set()
                for d in searches:
                    alive.update(esearch_all(await d))
            if alive:
                await self._write(session, mailbox, uidvalidity, alive)
            stale = stale + current
        if stale:
            items = b" ".join(e.encode() + b" NIL" for e in stale)
            await session.side_command(b"SETMETADATA " + wire + b" (" + items + b")")

    def _compact_failed(self, failure, session) -> None:
        if failure.check(BackendError, defer.TimeoutError, defer.CancelledError):
            # (Nothing lost: the records stay as they were, and the next SELECT tries again.)
            log.warn("compacting local-delete records failed: {error} session={session}",
                     error=str(failure.value) or failure.type.__name__, session=session.session_id)
        else:
            log.failure("compacting local-delete records failed session={session}", failure,
                        session=session.session_id)
            self.proxy.metrics.internal_errors.inc()

    async def _write(self, session, mailbox: str, uidvalidity: int, uids: set[int]) -> None:
        await self._mark(session)
        entry = f"{RECORDS}/{device_key(session.device_id)}/{uidvalidity}-{int(time.time() * 1000):x}" \
                f"{secrets.token_hex(4)}"
        value = metadata_value(session, SequenceSet.from_iterable(uids).format())
        reply = await session.side_command(b"SETMETADATA " + wire_name(mailbox) + b" (" + entry.encode() + b" "
                                           + value + b")")
        if reply.status != b"OK":
            raise BackendRefused("backend refused the local-delete record", reply.tagged)

    # -- hooks ----------------------------------------------------------------------------------

    def capabilities(self, session, caps):
        if self._allowed(session)[0]:
            return caps + [CAPABILITY]
        return caps

    def selected(self, session, mailbox) -> None:
        st = self.state(session)
        old = st.pending_in
        if st.pending and old is not None and old.uidvalidity is not None:
            st.left[old.name] = (old.uidvalidity, st.pending)
            st.left.move_to_end(old.name)
            while len(st.left) > _MAX_LEFT_MAILBOXES:
                st.left.popitem(last=False)
        st.pending, st.pending_in = set(), mailbox

    def _selected_again(self, session) -> None:
        """A SELECT's OK: the marks left in that mailbox are pending again (same UIDVALIDITY: same UIDs)."""
        st = self.state(session)
        mailbox = session.selected
        if mailbox is not None and st.left and (saved := st.left.pop(mailbox.name, None)) is not None \
                and saved[0] == mailbox.uidvalidity:
            st.pending |= saved[1]

    def command(self, session, cmd):
        name = cmd.name
        st = self.state(session)
        if st.need_view:
            st.need_view = False
            policy = self.peer("policy")
            if session.selected is not None and policy is not None and policy.state(session).view is None:
                # Pending marks are shown in FETCH answers by number too, which only a view reads.
                return Defer(defer.Deferred.fromCoroutine(self._with_view(session, policy, cmd)))
        if name in _LOCAL_DECISIONS and (earlier := self._must_wait_for(session, cmd)):
            return Defer(defer.Deferred.fromCoroutine(self._after(session, earlier, cmd)))
        if name in _CONDSTORE_ENABLING and not self.state(session).condstore:
            if _CONDSTORE_ENABLING_RE.search(cmd.line):
                self.state(session).condstore = True
            elif cmd.has_literal:  # (``FETCH 1 (BODY[HEADER.FIELDS ({4}\r\nFrom)] MODSEQ)``)
                cmd.state.setdefault("later_segments", []).append(lambda text: self._condstore_in(session, text))
        if name == b"ENABLE":
            if enables_qresync(cmd):
                self.state(session).qresync = True
            return None
        if name == b"APPEND":
            return self._append(session, cmd)
        read_only = session.selected is not None and session.selected.read_only
        if name == b"STORE":
            return self._store(session, cmd, read_only)
        if read_only and name in (b"EXPUNGE", b"CLOSE"):
            return None  # (EXAMINE: the backend refuses an EXPUNGE, its CLOSE removes nothing: so for the view)
        if name in (b"EXPUNGE", b"CLOSE"):
            st = self.state(session)
            if self._allowed(session)[1]:
                return Defer(defer.Deferred.fromCoroutine(self._expunge_as_local(session, st, cmd)))
            if st.pending:
                return Defer(defer.Deferred.fromCoroutine(self._expunge(session, st, cmd)))
        if name in SEARCH_COMMANDS:
            st = session.state.get(self.name)
            if st is not None and st.pending:
                if cmd.has_literal and "collected" not in cmd.state:
                    return Collect()  # (a DELETED after a literal: found by review, it missed the marks)
                return _search_with_pending(cmd, st.pending)
        return None

    async def _with_view(self, session, policy, cmd):
        await policy.ensure_view(session)
        return await resolved(self.command(session, cmd))

    def _condstore_in(self, session, text: bytes) -> bytes:
        """A later segment of a command that may enable CONDSTORE, passed on as it is."""
        if _CONDSTORE_ENABLING_RE.search(text):
            self.state(session).condstore = True
        return text

    def _must_wait_for(self, session, cmd) -> list:
        """The commands in flight that a command of ours must wait for (this plugin decides before the
        view's, whose waiting does not cover it): a local STORE or EXPUNGE behind anything (their
        numbers, the view, the mailbox's being read-only are those after the commands before them; and
        the marks they set or clear, the messages they hide, must not change the answers to those); a
        search with marks pending behind a SELECT, EXAMINE, EXPUNGE, MOVE, CLOSE or UNSELECT."""
        inflight = session.inflight_commands()
        if not inflight:
            return []
        name = cmd.name
        st = session.state.get(self.name)
        pending = st is not None and bool(st.pending)
        if name == b"STORE":
            local = pending or KEYWORD in cmd.line.upper() or self._allowed(session)[1]
            return inflight if local else []
        if name in (b"EXPUNGE", b"CLOSE"):
            # (Also behind an APPEND that marks what it adds: its messages are pending once it is done.)
            marking = any(c.name == b"APPEND" and any(c.state.get("local_appends", ())) for c in inflight)
            return inflight if pending or marking or self._allowed(session)[1] else []
        if not pending:  # a search
            return []
        return [c for c in inflight if (c.client or c).name in _RESELECTING]

    async def _after(self, session, earlier: list, cmd):
        """``cmd``'s decision once the commands ``earlier`` have completed."""
        return await self.peer("policy").decide_after(earlier, lambda: self.command(session, cmd))

    def _store(self, session, cmd, read_only: bool):
        line = cmd.line.rstrip(b"\r\n")
        m = _STORE_RE.match(line)
        allowed, all_local = self._allowed(session)
        if m is None:
            upper = line.upper()
            if KEYWORD in upper or (all_local and b"\\DELETED" in upper):
                # Never passed on unread with local flags in it.
                return Answer(b"BAD [CLIENTBUG] Invalid STORE arguments.")
            return None
        tag, uid, seqs, modifiers, op, flag_text = _store_groups(m)
        op_u = op.upper()
        base = op_u[:-7] if op_u.endswith(b".SILENT") else op_u
        if base not in (b"+FLAGS", b"-FLAGS", b"FLAGS"):
            return None  # e.g. X-GM-LABELS: not ours
        flags = flag_text.strip(b"()").split()
        upper = [f.upper() for f in flags]
        has_local = KEYWORD in upper
        has_deleted = b"\\DELETED" in upper
        if has_local and not allowed:
            return Answer(b"NO [CANNOT] Local deletion is not allowed by the service provider's policy.")
        local = has_local or (all_local and has_deleted)
        if read_only and (local or base == b"FLAGS" and all_local):
            # (Passed on, the backend would ignore it, but register $LocalDelete in the mailbox's FLAGS.)
            return Answer(b"NO [READ-ONLY] The mailbox is selected read-only (EXAMINE): nothing is deleted.")
        st = self.state(session)
        # A FLAGS replace that keeps \Deleted local must not clear the server's, another device's.
        keep_deleted = base == b"FLAGS" and (all_local or local)
        # (Pending local deletes end by a FLAGS replace, or a -FLAGS that names \Deleted: not by any -FLAGS.)
        cancels = st.pending and (base == b"FLAGS" or (base == b"-FLAGS" and has_deleted))
        if not (keep_deleted or local or cancels):
            return None
        if modifiers:
            return Defer(defer.Deferred.fromCoroutine(
                self._conditional_store(session, st, cmd, m, flags, local, keep_deleted)))
        if keep_deleted:
            return Defer(defer.Deferred.fromCoroutine(self._replace_keeping_deleted(session, st, cmd, m, local)))
        return Defer(defer.Deferred.fromCoroutine(self._store_local(session, st, cmd, m, local)))

    async def _replace_keeping_deleted(self, session, st: LocalState, cmd, m, local: bool):
        r"""``STORE ... FLAGS (list)`` of a ``delete_mode = "local"`` device: its \Deleted stays local
        (pending), and the server's, another device's, stays on the server. One silent STORE for the
        messages the server has \Deleted (the list plus \Deleted), one for the others; the client then
        gets the flags it now sees."""
        tag, uid, seqs, modifiers, op, flag_text = _store_groups(m)
        found = await self._view_and_targets(session, uid, seqs)
        if isinstance(found, Answer):
            return found
        view, targets = found
        others = self._for_backend(
            [f for f in flag_text.strip(b"()").split() if f.upper() not in (KEYWORD, b"\\DELETED")])
        cmd.state["localdelete"] = True
        if not targets:
            return Answer(b"OK Store completed.")
        uidset = SequenceSet.from_iterable(targets).format()
        reply = await session.backend_command(b"UID SEARCH RETURN (ALL) UID " + uidset + b" DELETED")
        kept = set(esearch_all(reply)) & targets
        for group, flags in ((kept, others + [b"\\Deleted"]), (targets - kept, others)):
            if group:
                done = await session.backend_command(b"UID STORE %s FLAGS.SILENT (%s)" % (
                    SequenceSet.from_iterable(group).format(), b" ".join(flags)))
                if done.status != b"OK":
                    return Answer(b"NO [UNAVAILABLE] The flags could not be stored.")
        if local:
            st.pending |= targets
        else:
            st.pending -= targets
        if op.upper().endswith(b".SILENT"):
            return Answer(b"OK Store completed.")
        return Rewrite(b"%s UID FETCH %s (%s)\r\n" % (tag, uidset, _flags_items(st)))

    async def _conditional_store(self, session, st: LocalState, cmd, m, flags: list, local: bool,
                                 keep_deleted: bool):
        """A STORE with ``(UNCHANGEDSINCE n)`` (RFC 7162 3.1.3) that carries local flags, or a FLAGS replace
        that must keep the server's \\Deleted: its server part as conditional UID STOREs of the proxy's own
        (with nothing for the server, a MODSEQ search applies the test), so the messages that failed the
        test are known: they keep every flag, the local ones too, and go back to the client in
        ``[MODIFIED ...]``, in its numbers (passed on as it was, the local flags' STORE would report UIDs
        for a sequence-number STORE, or lose the code)."""
        tag, uid, seqs, modifiers, op, _ = _store_groups(m)
        op_u = op.upper()
        silent = op_u.endswith(b".SILENT")
        base = op_u[:-7] if silent else op_u
        since = _unchangedsince(modifiers)
        if since is None:
            return Answer(b"BAD [CLIENTBUG] Invalid STORE modifier: only UNCHANGEDSINCE (0 to 2^63-1) is supported.")
        found = await self._view_and_targets(session, uid, seqs)
        if isinstance(found, Answer):
            return found
        view, targets = found
        cmd.state["localdelete"] = True
        if not targets:
            return Answer(b"OK Store completed.")
        flags = self._for_backend(flags)
        others = [f for f in flags if f.upper() not in (KEYWORD, b"\\DELETED")]
        if keep_deleted:
            reply = await session.backend_command(b"UID SEARCH RETURN (ALL) UID %s DELETED"
                                                  % SequenceSet.from_iterable(targets).format())
            kept = set(esearch_all(reply)) & targets
            groups = [(kept, b"FLAGS", others + [b"\\Deleted"]), (targets - kept, b"FLAGS", others)]
        elif base == b"-FLAGS":
            # (a local cancel's \\Deleted is the device's own; the server's is another device's and stays)
            groups = [(targets, base, others if local else flags)]
        elif local:
            groups = [(targets, base, others)]
        else:  # FLAGS without the local flags: replaces them, pending ones included
            groups = [(targets, base, flags)]
        modified: set[int] = set()
        server_change = False
        for group, store_op, server_flags in groups:
            if not group:
                continue
            uidset = SequenceSet.from_iterable(group).format()
            if server_flags or store_op == b"FLAGS":
                server_change = True
                done = await session.backend_command(b"UID STORE %s (UNCHANGEDSINCE %d) %s.SILENT (%s)" % (
                    uidset, since, store_op, b" ".join(server_flags)))
                failed = MODIFIED.search(done.tagged)
                if failed is not None:
                    modified.update(SequenceSet.parse(failed.group(1)))
            else:  # nothing for the server: the test alone (a message changed since then fails it)
                done = await session.backend_command(b"UID SEARCH RETURN (ALL) UID %s MODSEQ %d" % (uidset, since + 1))
                modified.update(set(esearch_all(done)) & group)
            if done.status != b"OK":
                return Answer(b"NO [UNAVAILABLE] The flags could not be stored.")
        updated = targets - modified
        if local and base != b"-FLAGS":
            st.pending |= updated
        else:
            st.pending -= updated
        if modified:
            numbers = modified if uid else {view.client_seq_of_uid(u) for u in modified} - {None}
            cmd.state["localdelete_modified"] = SequenceSet.from_iterable(numbers).format()
        if not server_change:
            cmd.state[NO_SERVER_CHANGE] = True
        if not updated:
            return Answer(_store_done(cmd))
        # The client gets the flags it now sees, with their MODSEQ (.SILENT: the MODSEQ alone, which RFC
        # 7162 3.1.3 asks for all the same).
        st.condstore = True  # (UNCHANGEDSINCE enables CONDSTORE)
        return Rewrite(b"%s UID FETCH %s (%s)\r\n" % (tag, SequenceSet.from_iterable(updated).format(),
                                                      b"MODSEQ" if silent else _flags_items(st)))

    async def _view_and_targets(self, session, uid, seqs: bytes):
        """(the selected mailbox's view, the visible UIDs a STORE names), or the Answer that ends it."""
        view = await self.peer("policy").ensure_view(session)
        if view is None:
            return Answer(b"BAD [CLIENTBUG] No mailbox selected.")
        targets = await self._store_targets(session, view, uid, seqs)
        return targets if isinstance(targets, Answer) else (view, targets)

    async def _store_targets(self, session, view, uid, seqs: bytes) -> set[int] | Answer:
        """The visible UIDs a STORE names, or the answer to a set the proxy cannot use."""
        if seqs == b"$":
            # The saved search result (RFC 5182): its UIDs, asked of the backend (passed on as it is, the
            # local flags would reach the server, and the next EXPUNGE delete the message there).
            reply = await session.backend_command(b"UID SEARCH RETURN (ALL) $")
            if reply.status != b"OK":
                return Answer(b"NO [CANNOT] No saved search result to use.")
            await self.peer("policy").classified(session)  # (the answer passes a held EXISTS)
            return view.known_visible(esearch_all(reply))
        try:
            requested = SequenceSet.parse(seqs)
        except SequenceSetError:
            # Never passed on with local flags in it: refused here.
            return Answer(b"BAD [CLIENTBUG] Invalid message set.")
        if uid:
            return set(view.visible_uidset(requested))
        targets = {view.uid_of(s) for s in view.backend_seqset(requested)}
        targets.discard(None)
        return targets

    async def _store_local(self, session, st: LocalState, cmd, m, local: bool):
        tag, uid, seqs, modifiers, op, flag_text = _store_groups(m)
        op_u = op.upper()
        silent = op_u.endswith(b".SILENT")
        base = op_u[:-7] if silent else op_u
        flags = flag_text.strip(b"()").split()
        policy = self.peer("policy")
        view = await policy.ensure_view(session)
        if view is None:
            return Answer(b"BAD [CLIENTBUG] No mailbox selected.")
        targets = await self._store_targets(session, view, uid, seqs)
        if isinstance(targets, Answer):
            return targets
        ours = {f for f in flags if f.upper() in (KEYWORD, b"\\DELETED")}
        others = [f for f in flags if f not in ours]
        if base == b"-FLAGS":
            return await self._unflag(session, st, cmd, m, targets, flags, others, local)
        if local:
            st.pending |= targets
            server_flags = others
        else:  # FLAGS without the local flags: replaces them, so nothing stays pending
            st.pending -= targets
            server_flags = flags
        cmd.state["localdelete"] = True
        if not targets:
            return Answer(b"OK Store completed.")
        uids = SequenceSet.from_iterable(targets)
        if server_flags or base == b"FLAGS":
            # UID form: the numbers stay unambiguous whatever the view; FETCH responses get renumbered.
            return await self._uid_command(session, tag, b"STORE", uids, b" %s (%s)" % (op, b" ".join(server_flags)),
                                           b" %s (%s)" % (op, b" ".join(self._for_backend(server_flags))))
        if silent:
            return Answer(b"OK Store completed.")
        # Nothing for the server: report the flags the client now sees (server's + pending local ones).
        cmd.state[NO_SERVER_CHANGE] = True
        return await self._uid_command(session, tag, b"FETCH", uids, b" (%s)" % _flags_items(st))

    @staticmethod
    async def _uid_command(session, tag: bytes, name: bytes, uids: SequenceSet, rest: bytes,
                           backend_rest: bytes | None = None) -> Rewrite | Answer:
        """``UID <name> <uids><rest>`` as the client's command; where ``uids`` are more scattered than a
        command line holds (a local delete of every other message), in pieces of a few KB: commands of the
        proxy's own first (``backend_rest``: ``rest`` as the backend takes it, the CPM flag mapped, as no
        command hook sees them), then the client's with the last, whose answer is the client's."""
        pieces = uid_set_pieces(uids)
        head = b"UID " + name + b" "
        for reply in [session.backend_command(head + piece + (backend_rest or rest)) for piece in pieces[:-1]]:
            if (await reply).status != b"OK":
                return Answer(b"NO [UNAVAILABLE] The flags could not be stored.")
        return Rewrite(tag + b" " + head + pieces[-1] + rest + b"\r\n")

    def _for_backend(self, flags: list) -> list:
        """``flags`` for a STORE of the proxy's own, which passes no command hook: the CPM flag mapped."""
        readreport = self.peer("readreport")
        if readreport is None or not flags:
            return flags
        return readreport.flags_for_backend(b"(" + b" ".join(flags) + b")")[1:-1].split()

    async def _unflag(self, session, st: LocalState, cmd, m, targets: set[int], flags: list, others: list,
                      local: bool):
        """``-FLAGS`` naming a local flag. Where the device had marked a message, the marks go (before the
        expunge) and a \\Deleted on the server is another device's: it stays. Elsewhere ``\\Deleted
        $LocalDelete`` has no mark to cancel and the \\Deleted is the server's to clear, but for a
        ``delete_mode = "local"`` device, whose \\Deleted never reaches the server. The client hears of the
        flags it now sees like after any STORE (the server, whose flags may not change, would say nothing)."""
        tag, uid, seqs, modifiers, op, flag_text = _store_groups(m)
        cancelled = targets & st.pending
        plain = [f for f in flags if f.upper() != KEYWORD]
        groups = [(cancelled, others if local else flags),
                  (targets - cancelled, others if self._allowed(session)[1] else plain)]
        cmd.state["localdelete"] = True
        if not targets:
            return Answer(b"OK Store completed.")
        if not cancelled:
            server_flags = groups[1][1]
            if not server_flags:
                return Answer(b"OK Store completed.")
            return await self._uid_command(session, tag, b"STORE", SequenceSet.from_iterable(targets),
                                           b" %s (%s)" % (op, b" ".join(server_flags)),
                                           b" %s (%s)" % (op, b" ".join(self._for_backend(server_flags))))
        for group, server_flags in groups:
            if group and server_flags:
                line = b" -FLAGS.SILENT (%s)" % b" ".join(self._for_backend(server_flags))
                done = [session.backend_command(b"UID STORE " + piece + line)
                        for piece in uid_set_pieces(SequenceSet.from_iterable(group))]
                if any([(await d).status != b"OK" for d in done]):
                    return Answer(b"NO [UNAVAILABLE] The flags could not be stored.")  # (marks kept)
        st.pending -= targets
        if op.upper().endswith(b".SILENT"):
            return Answer(b"OK Store completed.")
        return await self._uid_command(session, tag, b"FETCH", SequenceSet.from_iterable(targets),
                                       b" (%s)" % _flags_items(st))

    async def _expunge(self, session, st: LocalState, cmd):
        policy = self.peer("policy")
        view = await policy.ensure_view(session)
        mailbox = policy.state(session).mailbox
        if view is None or mailbox is None:
            return None
        targets = set(st.pending)
        if cmd.name == b"EXPUNGE" and cmd.uid and _first_arg(cmd) == b"$":
            # The saved result (RFC 5182; found by review: the marks in it stayed pending): its UIDs, read
            # in order with the commands before (the pending marks are UIDs the view shows).
            reply = await session.backend_command(b"UID SEARCH RETURN (ALL) $")
            if reply.status != b"OK":
                return None  # (no saved result: the backend answers the command as it would)
            targets &= set(esearch_all(reply))
        elif cmd.name == b"EXPUNGE" and cmd.uid:
            try:
                requested = SequenceSet.parse(cmd.args[0].value)
            except (SequenceSetError, IndexError, AttributeError, TokenError):
                return None
            targets &= set(view.visible_uidset(requested))
        if targets:
            await self._carry_out(session, st, policy, view, mailbox, targets, cmd)
        # The rest of the command is the view's business (hidden messages stay out of UID EXPUNGE): the
        # policy plugin's command hook comes next (command hooks run dependents first).
        return None

    async def _expunge_as_local(self, session, st: LocalState, cmd):
        """EXPUNGE / UID EXPUNGE / CLOSE of a ``delete_mode = "local"`` device: nothing is expunged on the
        server. What the device sees as \\Deleted (its pending marks, and messages someone flagged
        \\Deleted on the server) leaves its view only, recorded like its own local deletes."""
        policy = self.peer("policy")
        view = await policy.ensure_view(session)
        mailbox = policy.state(session).mailbox
        if view is None or mailbox is None:
            return None  # nothing selected: the backend says so
        if cmd.name == b"CLOSE" and not has_caps(session, b"UNSELECT"):
            return Answer(b"NO [CANNOT] This server cannot close without expunging; select another mailbox.")
        requested = None
        if cmd.name == b"EXPUNGE" and cmd.uid:
            try:
                requested = SequenceSet.parse(cmd.args[0].value)
            except (SequenceSetError, IndexError, AttributeError, TokenError):
                # Never passed on: the backend could take it ("$") and expunge for every device.
                return Answer(b"BAD [CLIENTBUG] Invalid UID set.")
        reply = await session.backend_command(b"UID SEARCH RETURN (ALL) DELETED")
        targets = (set(esearch_all(reply)) - view.hidden) | st.pending
        if requested is not None:
            targets &= set(view.visible_uidset(requested))
        if targets:
            await self._carry_out(session, st, policy, view, mailbox, targets, cmd)
        # The proxy's NOOP / UNSELECT answers as the client's command (policy's tagged hook).
        cmd.state[NO_SERVER_CHANGE] = True
        if cmd.name == b"CLOSE":
            cmd.state["tagged_text"] = b"Close completed."
            return Rewrite(cmd.tag + b" UNSELECT\r\n")
        cmd.state["tagged_text"] = b"Expunge completed."
        return Rewrite(cmd.tag + b" NOOP\r\n")

    async def _carry_out(self, session, st, policy, view, mailbox, targets, cmd) -> None:
        uidvalidity = policy.state(session).plan.uidvalidity if policy.state(session).plan else 0
        # Durable first: the record is on the backend before the client hears OK.
        await self._write(session, mailbox, uidvalidity, targets)
        st.pending -= targets
        # (Not while an arrival's EXISTS is held for its classification: the EXPUNGEs go out behind it,
        # and it would count the client's messages without these already. Found by review.)
        await policy.arrivals_told(session)
        # (A VANISHED names only what the client still has: a pending mark another session expunged or a
        # preference hid meanwhile was told gone already, and its count would drop twice.)
        current = policy.state(session).view  # (the one hide_in_view changes)
        shown = sorted(u for u in targets if current is not None and current.client_seq_of_uid(u) is not None)
        gone = policy.hide_in_view(session, targets)
        if cmd.name != b"CLOSE" and gone:
            if st.qresync:
                session.inject(b"* VANISHED " + SequenceSet.from_iterable(shown).format() + b"\r\n")
            else:
                session.inject(b"".join(b"* %d EXPUNGE\r\n" % n for n in gone))

    def block_ok(self, session, block: bytes) -> bool:
        st = session.state.get(self.name)
        return st is None or not st.pending

    def response(self, session, resp):
        st = session.state.get(self.name)
        if st is None or not st.pending or resp.head.name != b"FETCH" or resp.head.kind != "untagged":
            return None
        data = resp.data
        fm = find_fetch_item(FETCH_FLAGS, data)
        if fm is None:
            return None
        um = find_fetch_item(_FETCH_UID, data)
        uid = int(um.group(1)) if um else None
        if uid is None:
            policy = self.peer("policy")
            view = policy.state(session).view if policy else None
            uid = view.uid_of(resp.head.number) if view is not None else None
        if uid not in st.pending:
            return None
        have = fm.group(1).split()
        upper = {f.upper() for f in have}
        add = [f for f in (b"\\Deleted", b"$LocalDelete") if f.upper() not in upper]
        if not add:
            return None
        new = b"FLAGS (" + b" ".join(have + add) + b")"
        return Rewrite(data[:fm.start()] + new + data[fm.end():])

    def _append(self, session, cmd):
        r"""An APPEND's flag lists lose the local flags: ``$LocalDelete`` always, ``\Deleted`` with it or
        from a ``delete_mode = "local"`` device (stored on the server, it was a real delete's mark: the
        next EXPUNGE by any device removed the message for all). A message so marked in the selected
        mailbox is pending local deletion once its UID is known (``_appended``); elsewhere the mark is
        dropped, as at a reconnect (README, "Known limits"). A device not allowed local deletes is
        refused, as its STORE is (in a later message of a MULTIAPPEND: the backend is made to refuse the
        command, nothing of it saved)."""
        allowed, all_local = self._allowed(session)
        marks: list[bool] = []  # per message of the command, in order: marked for local deletion
        refused = []
        scan = AppendScan()

        def strip(text: bytes, first: bool) -> bytes | None:
            body = text[:-2] if text.endswith(b"\r\n") else text
            out, pos = [], 0
            # The flag lists are rewritten in place, the rest of the segment left byte for byte: written out
            # again from tokens, a segment ending in a literal inside a CATENATE's parentheses had them
            # closed before the literal's bytes, which the backend then ran as a command of their own; and a
            # segment the tokenizer refused (one starting with a CATENATE's ")") kept its local flags (both
            # found by review). A CATENATE's parts are one message (counted as several, the mark was lost).
            for start, end in scan.messages(body, first):
                upper = body[start:end].upper()
                found = None
                if KEYWORD in upper or (all_local and b"\\DELETED" in upper):
                    found = next((m for m in _FLAG_LIST_RE.finditer(body, start, end) if m.group(1) is not None),
                                 None)
                if found is None:
                    marks.append(False)
                    continue
                flags = found.group(1).split()
                upper_flags = [f.upper() for f in flags]
                if KEYWORD in upper_flags and not allowed:
                    refused.append(True)
                    return None
                local = KEYWORD in upper_flags or (all_local and b"\\DELETED" in upper_flags)
                marks.append(local)
                kept = [f for f, u in zip(flags, upper_flags, strict=True)
                        if u != KEYWORD and not (local and u == b"\\DELETED")]
                out.append(text[pos:found.start(1)] + b" ".join(kept))
                pos = found.end(1)
            return b"".join(out) + text[pos:] if out else text

        line = strip(cmd.line, True)
        if refused:
            return Answer(b"NO [CANNOT] Local deletion is not allowed by the service provider's policy.")
        cmd.state["local_appends"] = marks
        if cmd.has_literal:
            cmd.state.setdefault("later_segments", []).append(lambda text: strip(text, False))
        action = Rewrite(line) if line != cmd.line else None
        if any(marks) and self._to_selected(session, cmd) and (policy := self.peer("policy")) is not None:
            # A message marked so in the selected mailbox is pending: shown marked in FETCH answers by number
            # too, which only a view reads (the fast path built none).
            return Defer(defer.Deferred.fromCoroutine(policy.ensure_view(session)).addCallback(lambda _: action))
        return action

    @staticmethod
    def _to_selected(session, cmd) -> bool:
        """Whether an APPEND's mailbox is the selected one."""
        selected = session.selected
        if selected is None:
            return False
        try:
            target = astring_text(tokenize(cmd.line.rstrip(b"\r\n"))[2])
        except (TokenError, IndexError):
            return False
        return target is not None and mailbox_name(target) == selected.name

    def _appended(self, session, cmd, resp) -> None:
        """The messages of an APPEND to the selected mailbox that were marked for local deletion are
        pending now: the device sees them ``\\Deleted``, its next EXPUNGE hides them from it alone."""
        m = APPENDUID.search(resp.data)
        if m is None or not self._to_selected(session, cmd) or int(m.group(1)) != session.selected.uidvalidity:
            return
        uids = list(SequenceSet.parse(m.group(2)))
        marks = cmd.state["local_appends"]
        if len(uids) == len(marks):
            st = self.state(session)
            st.pending |= {u for u, marked in zip(uids, marks, strict=True) if marked}
            # (Marked in a later message only: no view was made for the command; the next one makes it.)
            st.need_view = bool(st.pending)

    def tagged(self, session, cmd, resp):
        if cmd.name in (b"SELECT", b"EXAMINE") and resp.head.name == b"OK":
            self._selected_again(session)
            return None
        if cmd.name == b"APPEND" and resp.head.name == b"OK" and any(cmd.state.get("local_appends", ())):
            self._appended(session, cmd, resp)
            return None
        if cmd.state.get("localdelete") and resp.head.name == b"OK":
            # The client sent STORE; the backend answered a FETCH or UID STORE: say what the client did.
            return Rewrite(resp.data[:len(cmd.tag) + 1] + _store_done(cmd) + b"\r\n")
        return None




def _store_groups(m: re.Match) -> tuple:
    """A STORE's (tag, UID, set, modifiers, operation, flags) as _STORE_RE read it; no flags: ``b""``."""
    tag, uid, seqs, modifiers, op, flag_text = m.groups()
    return tag, uid, seqs, modifiers, op, flag_text or b""


def _flags_items(st: LocalState) -> bytes:
    """The FETCH items that tell a client its flags after a STORE the proxy carried out: with MODSEQ once
    CONDSTORE is on (RFC 7162 3.1: every FETCH a STORE causes carries it; Dovecot adds it to its own
    unsolicited FETCHes, not to the answers of a FETCH that does not ask)."""
    return b"FLAGS MODSEQ" if st.condstore else b"FLAGS"


def _store_done(cmd) -> bytes:
    """The tagged OK of a STORE the proxy carried out: with the messages a conditional one left alone."""
    modified = cmd.state.get("localdelete_modified")
    if modified:
        return b"OK [MODIFIED " + modified + b"] Conditional STORE failed."
    return b"OK Store completed."


def _unchangedsince(modifiers: bytes) -> int | None:
    """n of a ``(UNCHANGEDSINCE n)`` store modifier list; None for any other (RFC 7162 3.1.3)."""
    words = modifiers.strip().strip(b"()").split()
    if len(words) == 2 and words[0].upper() == b"UNCHANGEDSINCE" and words[1].isdigit() \
            and len(words[1]) <= 20 and int(words[1]) <= _MAX_MODSEQ:
        return int(words[1])
    return None


_MAX_MODSEQ = (1 << 63) - 1  # (RFC 7162's mod-sequence-valzer: past it the backend refuses our own commands)


# An APPEND segment's flag list: the first parenthesized list of atoms outside quoted strings (a CATENATE's
# parts hold a literal or a quoted URL, a date is quoted, a mailbox name cannot be a list).
_FLAG_LIST_RE = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"|\(([^()"{}\[\]\r\n]*)\)')
# An APPEND's head up to its mailbox: a quoted string, a literal (ending the segment, or with its bytes
# inline in a command a plugin gathered), or an atom.
_APPEND_HEAD_RE = re.compile(rb'[^ ]+ APPEND (?:"(?:[^"\\\r\n]|\\.)*"|\{(\d+)\+?\}(?:\r\n)?|[^ ]+)', re.I)
# Where a message's CATENATE part list opens or closes (quoted strings passed over: a URL may hold ")").
_CATENATE_TOKENS = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"|(?<![^\s)])CATENATE \(|\)', re.I)


class AppendScan:
    """Where the messages of an APPEND (RFC 3502 MULTIAPPEND, RFC 4469 CATENATE) start, segment by segment
    (the text between literals): each message's flags, date and ``{n}`` or ``CATENATE (`` come in one
    segment; the segments that follow a CATENATE part's literal hold its next parts, until its ``)``."""

    def __init__(self) -> None:
        self.in_catenate = False

    def messages(self, body: bytes, first: bool) -> list[tuple[int, int]]:
        """The (start, end) of each message's head in ``body`` (a segment without its CRLF): from after
        the mailbox or the previous message to its literal's ``{n}`` or its ``CATENATE (``."""
        pos, found = 0, []
        if first:
            m = _APPEND_HEAD_RE.match(body)
            if m is None:
                return []  # (not an APPEND the backend will take: it answers BAD)
            pos = m.end() + (int(m.group(1)) if m.group(1) and m.end() < len(body) else 0)
        while pos < len(body):
            if self.in_catenate:
                close = _catenate_close(body, pos)
                if close < 0:
                    return found  # (a part's literal ends the segment: no message starts in it)
                self.in_catenate, pos = False, close
                continue
            catenate = next((t for t in _CATENATE_TOKENS.finditer(body, pos) if t.group(0)[:1] not in b'")'),
                            None)
            if catenate is not None:
                found.append((pos, catenate.start()))
                self.in_catenate, pos = True, catenate.end()
                continue
            if body.endswith(b"}") and body[pos:].strip():
                found.append((pos, len(body)))
            return found
        return found


def _catenate_close(body: bytes, pos: int) -> int:
    """The index after the ``)`` that closes a CATENATE's part list, -1 if not in ``body``."""
    for t in _CATENATE_TOKENS.finditer(body, pos):
        if t.group(0) == b")":
            return t.end()
    return -1


def _first_arg(cmd) -> bytes | None:
    try:
        return cmd.args[0].value
    except (IndexError, AttributeError, TokenError):
        return None


def _search_with_pending(cmd, pending: set[int]):
    """SEARCH / SORT / THREAD: the pending marks are shown to the client as \\Deleted $LocalDelete but the
    server does not have them, so the criteria about those flags also match (or exclude) their UIDs. Reads
    ``cmd.line``, which an earlier plugin may have rewritten (UID criteria mean the same in any numbering)."""
    line = cmd.line
    upper = line.upper()
    if b"DELETED" not in upper and KEYWORD not in upper:
        return None
    body = line[:-2] if line.endswith(b"\r\n") else line
    try:
        tokens = tokenize(body)
    except TokenError:
        return None  # the backend answers BAD
    if _literal_in_parens(tokens):
        return None  # (the tokens close the parentheses a literal leaves open: not to be sent as they are)
    start = 3 if len(tokens) > 1 and isinstance(tokens[1], Atom) and tokens[1].upper() == b"UID" else 2
    criteria = _mark_keys(tokens[start:], SequenceSet.from_iterable(pending).format())
    if criteria == tokens[start:]:
        return None
    return Rewrite(format_tokens(tokens[:start] + criteria) + b"\r\n")


def _mark_keys(tokens: list, pending: bytes) -> list:
    """``tokens`` (search keys) with DELETED, UNDELETED, KEYWORD and UNKEYWORD $LocalDelete extended to
    the UIDs ``pending``; each replacement is one search key, so NOT and OR keep their meaning."""
    out = []
    i = 0
    uids = [Atom(b"UID"), Atom(pending)]
    while i < len(tokens):
        t = tokens[i]
        i += 1
        if isinstance(t, ParenList):
            out.append(ParenList(_mark_keys(t.items, pending)))
            continue
        key = t.upper() if isinstance(t, Atom) else None
        if key == b"DELETED":
            out += [Atom(b"OR"), t, *uids]
        elif key == b"UNDELETED":
            out.append(ParenList([t, Atom(b"NOT"), *uids]))
        elif key in (b"KEYWORD", b"UNKEYWORD") and i < len(tokens) \
                and getattr(tokens[i], "value", b"").upper() == KEYWORD:
            arg = tokens[i]
            i += 1
            if key == b"KEYWORD":
                out += [Atom(b"OR"), t, arg, *uids]
            else:
                out.append(ParenList([t, arg, Atom(b"NOT"), *uids]))
        else:
            # Arguments are skipped, never taken for keys ("SUBJECT DELETED" is about a subject).
            n = search_key_args(tokens, i - 1, key)
            out += tokens[i - 1:i + n]
            i += n
    return out


def _literal_in_parens(tokens: list) -> bool:
    last = tokens[-1] if tokens else None
    while isinstance(last, ParenList):
        if not last.items:
            return False
        if isinstance(last.items[-1], LiteralRef):
            return True
        last = last.items[-1]
    return False


def _has_metadata(session) -> bool:
    return has_caps(session, b"METADATA") or has_caps(session, b"METADATA-SERVER")


def _records_read(reply):
    """``reply`` if the records were read. A refusal is not "no records": taken so, the device would be
    shown every message it deleted locally (and its SELECT ends, fail-closed, as for a classification)."""
    if reply.status != b"OK":
        raise BackendRefused("backend refused to read the local-delete records", reply.tagged)
    return reply


def _parse_records(lines: list[bytes], prefix: str) -> dict[str, tuple[int, SequenceSet]]:
    """entry -> (UIDVALIDITY, UIDs) for the records under ``prefix`` in METADATA responses."""
    out = {}
    low = prefix.lower() + "/"
    for _, entry, value in iter_metadata(lines):
        if not entry.lower().startswith(low):
            continue
        try:
            valid = int(entry[len(low):].split("-", 1)[0])
            uids = SequenceSet.parse(value)
            if uids.has_star:
                raise SequenceSetError("* in a record")
        except (ValueError, SequenceSetError):
            continue
        out[entry] = (valid, uids)
    return out


