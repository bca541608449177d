r"""Which folders exist for a device: the policy's folder patterns, the user's folder preferences and
Session History folders (when the device does not synchronize them) decide; a hidden folder is absent from
LIST/LSUB (a parent of visible ones stays, ``\NonExistent``), STATUS, NOTIFY events, METADATA (but for
the sync preferences the user may bring it back with), and refused as a target; a ``\Noselect`` parent
there only for hidden folders reads as a missing name. What is known of each folder is kept per session
(``FolderInfo``) and read when first needed.

A mixin of ``plugins.policy.PolicyPlugin``: it uses the preferences (``effective``) and the plugin's
caches of what is known of folders (``cache``, ``session_history_cache``)."""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger

from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.proxy.backend import BackendError
from cpmproxy.proxy.hooks import Drop, Hold, Rewrite
from plugins.cpm import (
    PREF_SYNC,
    PREFERENCES,
    SESSION_INFO_CRITERIA,
    pref_entry,
)
from plugins.policyprefs import _metadata_read, parse_metadata_prefs
from plugins.policystate import (
    SESSION_HISTORIES_KEPT,
    FolderInfo,
    PolicySession,
    _code_in,
    _keep_known,
    _select_state,
    side_examine,
)
from plugins.wire import (
    list_name,
    list_nonexistent,
    list_oldname,
    list_without_oldname,
    real_folders_of,
    search_ok,
    wire_name,
)

log = Logger(namespace="cpmproxy.policy")
# How long a folder found holding messages and no Session History is taken for "not one" without asking,
# for pushes of changes that bring no new message (``read_folder_facts``: ``recent_ok``).
NOT_SESSION_HISTORY_TTL = 60.0


class _side_examine_held:
    """In place of ``side_examine`` for a caller that holds it already (the lock is not re-entrant)."""

    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return None


class FolderRules:
    """Which folders exist for the device (see the module docstring)."""

    async def folder_infos(self, session, names: list[str], examining=None) -> bool:
        """Fill ``st.folders`` for ``names``: folder preferences, then (only where Session Histories are
        not synchronized) whether the folder is one. Pipelined on the side connection.

        Fails closed: if the backend refuses or loses a read (``BackendError``), nothing of it is kept
        and the error propagates (the client's command answers ``NO [UNAVAILABLE]``): taken as "no
        preferences" or "not a Session History", it would show what the policy or the user hides."""
        st = self.state(session)
        todo = [n for n in names if not self._folder_info_now(session, st, n)]
        if not todo:
            return False
        infos = {name: FolderInfo() for name in todo}
        await self._read_folder_infos(session, st, infos, examining)
        st.folders.update(infos)
        st.folder_chars += sum(map(len, infos))
        self._forget_plain_folders(st, infos)
        return True

    def _forget_plain_folders(self, st: PolicySession, spare) -> None:
        """Keep a session's folder facts bounded: past ``session_folders`` folders (or 256 characters of
        names per folder on average), those that hold nothing but what any folder is at first (no
        preferences, no Session History fact, no recheck) are forgotten, the oldest first. Forgotten, such
        a folder reads the same to every rule (``_info_hides`` takes none for it), and its facts are made
        again when next asked. Found by the leak review: every name a client named (``STATUS "x1"``,
        ``"x2"``...: folders that do not exist) was kept for the session's life, up to max_line bytes each
        (a session grew by gigabytes). Not the folders just read (``spare``): their reader looks at them next."""
        limit = self.session_folders
        room, room_chars = max(limit, st.folder_room[0]), max(limit * 256, st.folder_room[1])
        if len(st.folders) <= room and st.folder_chars <= room_chars:
            return
        keep = limit * 3 // 4  # (some room, so that the next names do not come here again at once)
        chars = sum(map(len, st.folders))
        for name in [name for name, info in st.folders.items()
                     if not info.prefs and info.session_history is None and not info.recheck and name not in spare]:
            if len(st.folders) <= keep and chars <= keep * 256:
                break
            del st.folders[name]
            chars -= len(name)
        st.folder_chars = chars
        # Still above (folders with facts of their own): not looked through again before a quarter more.
        st.folder_room = (len(st.folders) + limit // 4, chars + limit * 64)

    def _hold_for_folder(self, session, st: PolicySession, mailbox: str):
        """Hold an unsolicited response (NOTIFY) about ``mailbox`` until its folder info is known. If it
        cannot be read, the response is dropped (a notification missed, the device's next sync finds the
        change), rather than shown as if nothing were hidden, or held again and again."""
        if mailbox in st.unreadable_folders:
            st.unreadable_folders.discard(mailbox)
            return Drop()

        async def known():
            try:
                await self.folder_infos(session, [mailbox])
            except (BackendError, defer.TimeoutError) as e:
                log.warn("folder {mailbox!r} unreadable, its notification dropped: {error} session={session}",
                         mailbox=mailbox, error=str(e), session=session.session_id)
                st.unreadable_folders.add(mailbox)

        return Hold(defer.Deferred.fromCoroutine(known()))

    async def _read_folder_infos(self, session, st: PolicySession, infos: dict[str, FolderInfo],
                                 examining=None) -> None:
        """``examining``: the async context of the side connection's EXAMINEs (by default ``side_examine``;
        ``_side_examine_held`` for a caller that holds it already)."""
        await self.read_folder_facts(session.side_command, session.user, [st], infos,
                                     examining or (lambda: side_examine(session)))

    def folder_facts_known(self, user: str, states: list[PolicySession], name: str, recent_ok: bool = False) -> bool:
        """Whether ``read_folder_facts`` for ``name`` would ask the backend nothing."""
        if name in {n for st in states for n in st.pref_folders} and any(self._may_change_sync(st) for st in states):
            return False
        info = FolderInfo()
        return all(self._effective_in(st, info, f"{PREF_SYNC}/session-history", st.policy.default_sync("session-history"))
                   for st in states) or bool(self.session_history_cache.get((user, name))) \
            or (recent_ok and self._not_session_history(user, name))

    def _not_session_history(self, user: str, name: str) -> bool:
        """Found holding messages and no Session History less than ``NOT_SESSION_HISTORY_TTL`` ago."""
        until = self.not_session_history.get((user, name))
        return until is not None and until > time.monotonic()

    async def read_folder_facts(self, run, user: str, states: list[PolicySession], infos: dict[str, FolderInfo],
                                examining, recent_ok: bool = False) -> None:
        """Fill ``infos`` (folder name -> a new ``FolderInfo``) with what hides a folder from the devices
        whose policy states are ``states``: the folder's own preferences (read where any of them may change
        a sync preference), whether it is a Session History folder (asked where any of them does not
        synchronize those). ``run``: a command runner on the backend; ``examining()``: the async context
        the EXAMINEs run in (``side_examine`` for a session's side connection). Also used by push, for
        devices that are not connected (their states made from the policy alone). ``recent_ok``: a folder
        found holding messages and no Session History less than a minute ago is taken for one such (for a
        push of a change that brings no new message; never for a session, which must not show a folder
        whose session info has come since, nor one made anew under the name elsewhere: found by review)."""
        waits = []
        if any(self._may_change_sync(st) for st in states):
            marked = {name for st in states for name in st.pref_folders}
            for name, info in infos.items():
                # Only folders known to carry preferences are read: reading a mailbox's metadata opens
                # it in the side connection's process, and a folder open there while a client renames or
                # deletes it can come back as a ghost in the mailbox list.
                if name in marked:
                    waits.append((name, info, run(
                        b"GETMETADATA (DEPTH infinity) " + wire_name(name) + b" (" + pref_entry("").encode() + b")")))
        for name, info, d in waits:
            reply = await d
            if not _code_in(reply.tagged, b"NONEXISTENT"):  # (deleted meanwhile: no preferences)
                info.prefs = parse_metadata_prefs(_metadata_read(reply, "folder preferences").untagged, name)
        unknown = []
        for name, info in infos.items():
            if all(self._effective_in(st, info, f"{PREF_SYNC}/session-history", st.policy.default_sync("session-history"))
                   for st in states):
                continue
            if self.session_history_cache.get((user, name)):
                info.session_history = True
                continue
            if recent_ok and self._not_session_history(user, name):
                continue
            unknown.append((name, info))
        if not unknown:
            return  # (no EXAMINE: the lock and its closing UNSELECT would only cost a round trip)
        async with examining():
            checks = [(name, info, run(b"EXAMINE " + wire_name(name)),
                       run(b"UID SEARCH RETURN (MIN) " + SESSION_INFO_CRITERIA))
                      for name, info in unknown]
            for name, info, opened, searched in checks:
                opened, searched = await opened, await searched
                if opened.status != b"OK" and (_code_in(opened.tagged, b"NONEXISTENT") or _code_in(opened.tagged, b"CANNOT")
                                               or b"doesn't exist" in opened.tagged):
                    # Gone, or a \Noselect parent (Dovecot 2.3 answers that one with no code), or a name the
                    # backend cannot take ("Visible/": its own answer to the client's command says so): no
                    # messages, nothing to hide in it. Any other refusal fails closed, below.
                    continue
                # (Read in any case: names have no case, RFC 9051 2.3; a server may answer "uid min 3".)
                info.session_history = any(b" MIN " in line.upper() for line in search_ok(searched).untagged)
                if info.session_history:
                    _keep_known(self.session_history_cache, (user, name))
                elif _select_state(opened.untagged).get(b"EXISTS") == 0:
                    # Empty: a Session History folder just created, its session info not yet in it.
                    # Asked again next time (kept as "not one", the device was shown it and its changes).
                    info.recheck = True
                else:
                    known = self.not_session_history
                    known.pop((user, name), None)
                    known[(user, name)] = time.monotonic() + NOT_SESSION_HISTORY_TTL
                    while len(known) > SESSION_HISTORIES_KEPT:
                        known.popitem(last=False)

    @staticmethod
    def _may_change_sync(st: PolicySession) -> bool:
        return any(st.policy.may_change(k) for k in PREFERENCES if k.startswith(PREF_SYNC))

    def _folder_info_now(self, session, st: PolicySession, name: str) -> bool:
        """Fill ``st.folders[name]`` when that needs nothing from the backend (the folder carries no
        preferences to read, and whether it is a Session History folder is either irrelevant or known);
        False when ``folder_infos`` must ask."""
        known = st.folders.get(name)
        if known is not None and not known.recheck:
            return True
        if name in st.pref_folders and self._may_change_sync(st):
            return False
        info = FolderInfo()
        if not self.effective(st, f"{PREF_SYNC}/session-history", name, st.policy.default_sync("session-history")):
            if not self.session_history_cache.get((session.user, name)):
                return False  # (only "is one" is remembered across sessions)
            info.session_history = True
        if name not in st.folders:
            st.folder_chars += len(name)
        st.folders[name] = info
        self._forget_plain_folders(st, (name,))
        return True

    def folder_hidden(self, st: PolicySession, name: str) -> bool:
        if not st.policy.folder_allowed(name):
            return True
        return self._info_hides(st, st.folders.get(name))

    def _info_hides(self, st: PolicySession, info: FolderInfo | None) -> bool:
        """Whether what is known of a folder (its preferences, whether it holds a Session History) hides it."""
        if info is None:
            return False
        if not self._effective_in(st, info, PREF_SYNC, True):
            return True
        return bool(info.session_history) and not self._effective_in(
            st, info, f"{PREF_SYNC}/session-history", st.policy.default_sync("session-history"))

    def _user_may_show(self, st: PolicySession, name: str) -> bool:
        """Whether a folder hidden from the device is hidden only by preferences its user may change (its
        own ``sync``, ``sync/session-history``): the device may then turn it back on, so the CPM sync
        preferences on it stay readable and writable (DESIGN.md section 4). Not a folder the policy's
        patterns exclude, nor a Session History folder where the policy hides those for good."""
        if not st.policy.folder_allowed(name):
            return False
        info = st.folders.get(name)
        return not (info is not None and info.session_history and not st.policy.may_change(
            f"{PREF_SYNC}/session-history") and not st.policy.default_sync("session-history"))

    def _folders_may_hide(self, st: PolicySession) -> bool:
        """Whether any folder can be hidden from this session (False: no folder is, nothing to ask): patterns
        that exclude some, a folder with preferences of its own (its ``sync`` may be off), Session Histories
        not synchronized account-wide."""
        policy = st.policy
        return (policy.folders != ("*",) or bool(policy.exclude_folders)
                or bool(st.pref_folders and self._may_change_sync(st))
                or not self.effective(st, f"{PREF_SYNC}/session-history", None,
                                      policy.default_sync("session-history")))

    def real_folders_matter(self, session, st: PolicySession, mailbox: str) -> bool:
        """Whether messages of ``mailbox`` may be hidden for the folder they are really in: a virtual
        mailbox (Dovecot's ``virtual`` plugin) shows other folders' messages, a hidden folder's too.
        Neither a capability nor a LIST attribute tells a virtual mailbox (Dovecot 2.3.19: its LIST
        attributes, NAMESPACE and STATUS are a plain mailbox's), only FETCH X-MAILBOX of a message (a
        plain mailbox's own name, another folder's in a virtual one). So: only for a device that may
        have hidden folders, and until the mailbox is known plain (one FETCH of one UID, once per mailbox
        and process: ``_hidden_by_folder``); a SELECT where nothing else hides pays nothing after that."""
        return self._folders_may_hide(st) and not self.cache.plain(session.user, mailbox)

    async def _hidden_by_folder(self, session, st: PolicySession, mailbox: str, uidvalidity: int, uids,
                                examined: bool = False) -> set[int]:
        """Which of ``uids`` (a set, or a SequenceSet) of ``mailbox`` are in a folder hidden from the device.
        Their folders are read by FETCH X-MAILBOX on the side connection (on the session's own, the FETCH
        responses would go to the client), cached with the kinds (``KindCache.real_folders``) and asked
        only for UIDs not known yet; ``examined``: the caller holds ``side_examine`` with ``mailbox``
        EXAMINEd. In a virtual mailbox, a message whose folder cannot be read (expunged meanwhile) is hidden:
        nothing to show, and fail closed. Nothing is asked of a mailbox known plain (``real_folders_matter``)."""
        cache = self.cache.get(session.user, mailbox, uidvalidity)
        top = (uids.ranges[-1][1] if uids.ranges else 0) if isinstance(uids, SequenceSet) else max(uids, default=0)
        if cache.virtual is False or not top:
            return set()
        if cache.virtual is None or cache.real_upto < top:
            if examined:
                await self._read_real_folders(session, mailbox, cache, top)
            else:
                async with side_examine(session):
                    opened = await session.side_command(b"EXAMINE " + wire_name(mailbox))
                    if opened.status != b"OK" and not _code_in(opened.tagged, b"NONEXISTENT"):
                        raise BackendError(f"cannot read the real folders of {mailbox!r}: {opened.tagged!r}")
                    if _select_state(opened.untagged).get(b"UIDVALIDITY") != uidvalidity:
                        # The folder the session has selected was deleted since (and perhaps made anew under its
                        # name): its messages cannot be read by name, and Dovecot ends the session or expunges
                        # them soon. A client deletes and makes plain folders; a virtual mailbox is the
                        # operator's configuration. So nothing is hidden by folder now, and nothing learnt.
                        return set()
                    await self._read_real_folders(session, mailbox, cache, top)
            if not cache.virtual:
                return set()
        if examined:
            if await self.folder_infos(session, list(cache.real_folders), _side_examine_held):
                await session.side_command(b"EXAMINE " + wire_name(mailbox))  # (for the caller's commands)
        else:
            await self.folder_infos(session, list(cache.real_folders))
        shown = set().union(*(found for name, found in cache.real_folders.items() if not self.folder_hidden(st, name)))
        if isinstance(uids, SequenceSet):
            return {u for lo, hi in uids.ranges for u in range(lo, hi + 1) if u not in shown}
        return set(uids) - shown

    async def probe_before_select(self, session, mailbox: str) -> None:
        """Whether ``mailbox`` is a virtual mailbox, read before the session's SELECT of it goes out (its EXAMINE
        and one FETCH X-MAILBOX of its last message, on the side connection): a mailbox found plain is then
        selected as any other (the fast path). Not after the SELECT: the side connection has CONDSTORE on,
        and its EXAMINE of a folder no CONDSTORE client had opened yet, while this session had it selected,
        left Dovecot 2.3.19 blind to the session's next STORE in the command pipelined behind it (found by
        review, helper-108: 'STORE 1 +FLAGS.SILENT (\\Deleted)' and 'UID EXPUNGE 1' pipelined after the first
        SELECT of a new folder expunged nothing; direct Dovecot does the same, once per folder). Anything
        unexpected is left to the check after the SELECT (``_hidden_by_folder``), which fails closed."""
        async with side_examine(session):
            opened = await session.side_command(b"EXAMINE " + wire_name(mailbox))
            state = _select_state(opened.untagged)
            if opened.status != b"OK" or not state.get(b"UIDVALIDITY") or not state.get(b"EXISTS"):
                return
            cache = self.cache.get(session.user, mailbox, state[b"UIDVALIDITY"])
            if cache.virtual is not None:
                return
            reply = await session.side_command(b"UID FETCH * (UID X-MAILBOX)")
            if reply.status == b"BAD":
                cache.virtual = False  # (as _read_real_folders: no X-MAILBOX, no Dovecot virtual mailboxes)
                return
            found = real_folders_of(reply)
            if len(found) == 1:
                cache.virtual = next(iter(found.values())) != mailbox

    @staticmethod
    async def _read_real_folders(session, mailbox: str, cache, top: int) -> None:
        """Fill ``cache`` (the mailbox's KindCache) with the real folders of UIDs up to ``top`` (the mailbox
        EXAMINEd on the side connection). Unknown whether the mailbox is virtual: one message tells (the
        last: a plain mailbox is known so at the cost of one message's FETCH)."""
        if cache.virtual is None:
            reply = await session.side_command(b"UID FETCH %d (UID X-MAILBOX)" % top)
            if reply.status == b"BAD":
                # A backend that does not know X-MAILBOX has no Dovecot virtual mailboxes.
                cache.virtual = False
                return
            found = real_folders_of(reply)
            if top in found:
                cache.virtual = found[top] != mailbox
        if cache.virtual is False:
            return
        found = real_folders_of(await session.side_command(b"UID FETCH %d:%d (UID X-MAILBOX)"
                                                           % (cache.real_upto + 1, top)))
        if cache.virtual is None:  # (the last message expunged before the probe read it: any other tells)
            # No message answered: they are gone (Dovecot answers every message there is). Nothing is
            # learnt or hidden by folder; asked again next time.
            if found:
                cache.virtual = any(name != mailbox for name in found.values())
            if not cache.virtual:
                return
        cache.add_real(top, found)

    async def _only_above_hidden(self, session, st: PolicySession, name: str,
                                 names: list[str] | None = None, noselect: set[str] | None = None) -> bool:
        """Whether ``name`` is no folder for the device though the backend has one: a ``\\Noselect`` parent
        (or no folder at all) with folders below it, every one hidden. LIST does not show it
        (``_list_shape``): commands on it must answer as for a name no folder has (Dovecot's "Mailbox has
        children" for DELETE, SUBSCRIBE's OK, RENAME's moving the hidden folders along would tell of them).
        ``names``/``noselect``: the folder list (``_all_folders``), if read already. Reads nothing where
        no folder can be hidden."""
        if names is None:
            if not self._folders_may_hide(st):
                return False
            noselect = set()
            names = await self._all_folders(session, noselect)
        if name in names and name not in noselect:
            return False  # (a folder: whether it is hidden is asked of it)
        # Shown for a folder below that the device sees, selectable (a \Noselect one is only shown for one
        # seen below it in turn).
        below = [n for n in names if n.startswith(name + "/") and n not in noselect]
        if not below:
            return False
        await self.folder_infos(session, below)
        return all(self.folder_hidden(st, n) for n in below)

    def _old_name_hidden(self, st: PolicySession, old: str, new: str) -> bool:
        """Whether a folder renamed (a NOTIFY event) was hidden under its old name: as this session knew
        it; not looked at so, by the policy's verdict on the old name and what moved with the folder
        (its preferences and contents, now known under the new name)."""
        if old in st.folders or not st.policy.folder_allowed(old):
            return self.folder_hidden(st, old)
        return self._info_hides(st, st.folders.get(new))

    def _list_event(self, st: PolicySession, data: bytes, mailbox: str):
        """A LIST response in the device's view. A rename (``OLDNAME``) across the view's edge is, for the
        device, a deletion (into a hidden name: the old name ``\\NonExistent``, RFC 5465 5.4) or a
        creation (out of one: the old name is not told)."""
        hidden = self.folder_hidden(st, mailbox)
        old = list_oldname(data)
        if old is None:
            return Drop() if hidden else None
        old_hidden = self._old_name_hidden(st, old, mailbox)
        st.folders.pop(old, None)  # (gone: a folder created under that name later is another)
        if hidden:
            return Drop() if old_hidden else Rewrite(list_nonexistent(data, old))
        return Rewrite(list_without_oldname(data)) if old_hidden else None

    def _list_shape(self, st: PolicySession, names: list[str], noselect: set[str]) -> tuple[set[str], set[str], set[str]]:
        """What a LIST answer must say of the folders ``names`` (``noselect``: those the backend lists
        ``\\Noselect``), as (the folders the device sees; those of them whose every descendant is hidden:
        ``\\HasChildren`` would tell of folders that do not exist for it, their LIST says
        ``\\HasNoChildren``, or nothing if ``\\Noselect``, there only for them; the hidden folders with one
        the device sees below: listed as a ``\\Noselect`` placeholder, as a server lists a parent that does
        not exist (RFC 3501 6.3.8), or a client that walks the tree level by level (``%``) never reaches
        what is below). A ``\\Noselect`` folder is seen only for one seen below it: the
        ``Default/<conversation>`` above a hidden Session History does not make ``Default`` a parent."""
        hidden = {n for n in names if self.folder_hidden(st, n)}
        if not hidden:
            return set(names), set(), set()
        shown, above, parents = set(), set(), set()
        for name in sorted(names, key=lambda n: n.count("/"), reverse=True):  # (the deepest first)
            parts = name.split("/")
            ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
            parents.update(ancestors)
            if name not in hidden and (name not in noselect or name in above):
                shown.add(name)
                above.update(ancestors)
        return shown, parents - above - hidden, hidden & above

    def _subscribed_above(self, st: PolicySession, names: list[str], shown: set[str],
                          subscribed: list[str]) -> set[str]:
        """The folders with a subscribed one the device sees below them: the others' LSUB ``%`` parent
        lines and RECURSIVEMATCH ``CHILDINFO ("SUBSCRIBED")`` tell only of hidden ones. (A subscribed name
        that does not exist is seen unless the policy's patterns hide it.)"""
        known = set(names)
        above = set()
        for name in subscribed:
            if name in shown or (name not in known and not self.folder_hidden(st, name)):
                parts = name.split("/")
                above.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return above

    async def _all_folders(self, session, noselect: set[str] | None = None, subscribed: bool = False) -> list[str]:
        """Every folder's name (``subscribed``: every subscription's); ``noselect`` gets those listed
        ``\\Noselect`` (or ``\\NonExistent``)."""
        reply = await session.side_command(b'LSUB "" "*"' if subscribed else b'LIST "" "*"')
        head = b"* LSUB " if subscribed else b"* LIST "
        names = []
        for line in reply.untagged:
            if line[:7].upper() == head:
                name = list_name(line)
                if name is not None:
                    names.append(name)
                    attrs = line[7:line.find(b")")].upper()
                    if noselect is not None and (b"\\NOSELECT" in attrs or b"\\NONEXISTENT" in attrs):
                        noselect.add(name)
        return names

    def forget_folders(self, user: str, names) -> None:
        """Folders deleted or renamed (through this process or elsewhere): what the user's sessions and the
        caches here knew of them is not so now; read anew when next needed."""
        for session in self.proxy.sessions_of(user):
            st = session.state.get(self.name)
            if st is not None:
                for name in names:
                    st.folders.pop(name, None)
        for name in names:
            self.session_history_cache.pop((user, name), None)
            self.not_session_history.pop((user, name), None)
            self.cache.forget(user, name)
