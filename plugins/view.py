"""The filtered view of a selected mailbox: which messages a device may see, and sequence arithmetic.

Sans-I/O. The backend numbers its messages 1..N (``uids[i]`` is the UID of backend message i+1); some UIDs
are hidden from this device (by policy, preference, or a local delete: hiding is one operation whoever
asks for it). The client sees the visible messages numbered 1..M in UID order. UIDs are never rewritten.

When nothing is hidden the view is the identity and callers skip all rewriting (``identity``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import accumulate, compress, islice
from operator import not_

from cpmproxy.imap.seqset import STAR, SequenceSet


class MailboxView:
    __slots__ = ("uids", "hidden", "_visible", "_hidden_seqs", "_visible_seqs", "_client_map", "_hidden_uids",
                 "_lent", "_visible_shared", "seen_up_to")

    def __init__(self, uids: Iterable[int] = (), hidden: Iterable[int] = ()):
        self.uids: list[int] = sorted(uids)
        self.hidden: set[int] = set(self.uids).intersection(hidden)
        self._visible: list[int] | None = None
        self._hidden_seqs: SequenceSet | None = None
        self._visible_seqs: SequenceSet | None = None
        self._client_map: list[int] | None = None
        self._hidden_uids: SequenceSet | None = None
        self._lent = False  # uids and hidden are shared with other views: copied before a change
        self._visible_shared = False  # _visible is another view's too (share): never changed in place
        # UIDs the client may take as known besides the visible ones: every UID up to the UIDNEXT it was
        # told at SELECT (the policy sets it) and every visible one since removed. No message at or below
        # it can be announced as new (RFC 9051 2.3.1.1: UIDs are assigned ascending, from UIDNEXT on).
        self.seen_up_to = 0

    @classmethod
    def exact(cls, uids: list[int], hidden: set[int]) -> MailboxView:
        """A view of sorted ``uids`` with ``hidden`` a subset of them, both taken as they are (no
        copies, no checks: for callers that built them so; tens of thousands of UIDs cost ms each pass)."""
        view = cls()
        view.uids = uids
        view.hidden = hidden
        return view

    # -- derived state (rebuilt lazily after a change) ------------------------------------------

    def _changed(self) -> None:
        self._visible = None
        self._visible_shared = False
        self._hidden_seqs = None
        self._visible_seqs = None
        self._client_map = None
        self._hidden_uids = None

    def _renumbered(self, hidden_changed: bool) -> None:
        """After a change that kept ``_visible`` up to date itself (a few messages in a big mailbox: a
        rebuild of every table per EXPUNGE made a burst of K expunges cost K full passes): only the tables
        by backend number go, and the hidden UIDs' set if the hidden messages changed."""
        self._hidden_seqs = None
        self._visible_seqs = None
        self._client_map = None
        if hidden_changed:
            self._hidden_uids = None

    def _own_visible(self) -> list[int] | None:
        """The visible list if it is built and this view's own (not ``uids`` itself), to be changed in
        place; else None (it is rebuilt when next needed)."""
        vis = self._visible
        return vis if vis is not None and vis is not self.uids and not self._visible_shared else None

    @property
    def identity(self) -> bool:
        return not self.hidden

    @property
    def visible(self) -> list[int]:
        if self._visible is None:
            h = self.hidden
            self._visible = [u for u in self.uids if u not in h] if h else self.uids
        return self._visible

    @property
    def hidden_seqs(self) -> SequenceSet:
        """Backend sequence numbers of the hidden messages."""
        if self._hidden_seqs is None:
            # The gaps between the visible runs (list comprehensions over runs, not over messages).
            visible = self.visible_seqs.ranges
            top = len(self.uids)
            self._hidden_seqs = SequenceSet.from_canonical(
                [(a + 1, b - 1) for (_, a), (b, _) in zip([(0, 0), *visible], [*visible, (top + 1, 0)], strict=True)
                 if b - a > 1])
        return self._hidden_seqs

    @property
    def hidden_uids(self) -> SequenceSet:
        """The hidden UIDs as a set (for a search restricted to the visible messages)."""
        if self._hidden_uids is None:
            self._hidden_uids = SequenceSet.from_iterable(self.hidden)
        return self._hidden_uids

    @property
    def visible_seqs(self) -> SequenceSet:
        """Backend sequence numbers of the visible messages (what ``1:*`` of the client means)."""
        if self._visible_seqs is None:
            # The runs between the hidden messages' positions (a step per hidden message, not per message).
            cmap = self.client_map
            top = len(cmap) - 1
            holes = list(compress(range(1, top + 1), map(not_, islice(cmap, 1, None))))
            self._visible_seqs = SequenceSet.from_canonical(
                [(a + 1, b - 1) for a, b in zip([0, *holes], [*holes, top + 1], strict=True) if b - a > 1])
        return self._visible_seqs

    @property
    def client_map(self) -> list[int]:
        """Client number of every backend number: ``client_map[n]`` is 0 if message n is hidden (and for
        n = 0). Built once per state of the view, so that renumbering a bulk FETCH is table lookups
        done in C (``map``) rather than a Python step per line."""
        if self._client_map is None:
            h = self.hidden
            shown = [u not in h for u in self.uids]
            # Running count of visible messages, kept where the message itself is visible.
            self._client_map = [0] + [c * v for c, v in zip(accumulate(shown), shown, strict=True)]
        return self._client_map

    def derived(self) -> tuple:
        """The tables this state of the view derives (client map, visible and hidden backend runs, the
        visible UIDs and the hidden ones as a set), built if need be, for another view of the very same
        messages to ``share``. (The last two too: a SELECT of a folder with 10,000 local deletions built
        them again, ~0.8 ms, to find the first visible unseen message.)"""
        self._visible_shared = self._visible_shared or self.visible is not self.uids
        return self.client_map, self.visible_seqs, self.hidden_seqs, self.visible, self.hidden_uids

    def share(self, derived: tuple) -> None:
        """Take over the ``derived()`` tables of a view with equal ``uids`` and ``hidden``. Safe to share:
        tables are never modified in place (a change of either view replaces its own; the visible list,
        which a change edits in place, is first dropped: ``_own``)."""
        self._client_map, self._visible_seqs, self._hidden_seqs, self._visible, self._hidden_uids = derived
        self._visible_shared = self._visible is not self.uids

    def lend(self) -> tuple:
        """``(uids, hidden, derived)`` for ``borrowed`` views of this very state. Copy-on-write: from now
        on this view copies its UID list and hidden set before changing them (so do the borrowers)."""
        self._lent = True
        return self.uids, self.hidden, self.derived()

    @classmethod
    def borrowed(cls, lent: tuple) -> MailboxView:
        """A view of another's ``lend()``: nothing is copied or built until it changes (thousands of
        UIDs cost ~1 ms per SELECT to expand into a list and a set)."""
        uids, hidden, derived = lent
        view = cls.exact(uids, hidden)
        view.share(derived)
        view._lent = True
        return view

    def _own(self) -> None:
        if self._visible_shared:
            self._visible = None
            self._visible_shared = False
        if self._lent:
            if self._visible is self.uids:
                self._visible = None  # (the shared list: never to be changed in place as this view's own)
            self.uids = list(self.uids)
            self.hidden = set(self.hidden)
            self._lent = False

    @property
    def exists(self) -> int:
        return len(self.uids) - len(self.hidden)

    @property
    def max_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    # -- mapping --------------------------------------------------------------------------------

    def uid_of(self, backend_seq: int) -> int | None:
        if 1 <= backend_seq <= len(self.uids):
            return self.uids[backend_seq - 1]
        return None

    def client_seq(self, backend_seq: int) -> int | None:
        """Client (visible) number of a backend message; None if hidden or unknown."""
        u = self.uid_of(backend_seq)
        if u is None or u in self.hidden:
            return None
        if not self.hidden:
            return backend_seq
        if self._visible is not None:
            return bisect_left(self._visible, u) + 1
        # (the table a bulk FETCH needs next anyway, rather than the visible list for one lookup)
        return self.client_map[backend_seq]

    def client_seq_of_uid(self, uid: int) -> int | None:
        if uid in self.hidden:
            return None
        vis = self.visible
        i = bisect_left(vis, uid)
        return i + 1 if i < len(vis) and vis[i] == uid else None

    def backend_seq(self, client_seq: int) -> int | None:
        vis = self.visible
        if not 1 <= client_seq <= len(vis):
            return None
        return bisect_left(self.uids, vis[client_seq - 1]) + 1

    def backend_seqset(self, client_set: SequenceSet) -> SequenceSet:
        """Backend numbers for a client sequence set (``*`` = the last visible message).

        Numbers beyond the visible count are dropped (the caller answers BAD if nothing is left, as a
        server does for an invalid message number)."""
        resolved = self._client_ranges(client_set)
        if not resolved or not self.hidden:
            return resolved
        if resolved.ranges == ((1, self.exists),):
            return self.visible_seqs  # (the usual 1:*: built once per state of the view)
        if _few(resolved):
            # (a number or a few: looked up, not subtracted from the hidden runs, which a change rebuilds)
            vis, uids = self.visible, self.uids
            return SequenceSet.from_iterable([bisect_left(uids, vis[c - 1]) + 1
                                              for lo, hi in resolved.ranges for c in range(lo, hi + 1)])
        return self._cover(resolved) - self.hidden_seqs

    def backend_cover(self, client_set: SequenceSet) -> SequenceSet:
        """Backend numbers that cover a client sequence set: each client range becomes the backend range
        from its first to its last message, hidden messages in between included. As short as the
        client's own set (the exact one, ``backend_seqset``, has a range per run of visible messages: a
        command line past the backend's limit where hidden messages are scattered), for commands whose
        result on the visible messages is the same either way: a search's keys, a FETCH whose answers
        for hidden messages are dropped and which changes nothing."""
        resolved = self._client_ranges(client_set)
        return self._cover(resolved) if resolved and self.hidden else resolved

    def _client_ranges(self, client_set: SequenceSet) -> SequenceSet:
        """``client_set`` with ``*`` resolved, clipped to the messages the client sees."""
        n = self.exists
        return client_set.resolve(n).clip(1, n) if n else SequenceSet.empty()

    def _cover(self, resolved: SequenceSet) -> SequenceSet:
        return SequenceSet.from_ranges([(self.backend_seq(lo), self.backend_seq(hi)) for lo, hi in resolved.ranges])

    def visible_uidset(self, uid_set: SequenceSet) -> SequenceSet:
        """The UIDs of ``uid_set`` the client may touch. ``*`` is the largest UID the client sees: a range
        ``n:*`` includes the last visible message even when n is above it (RFC 9051 6.4.8), and hidden
        UIDs above that message are dropped like any hidden UID. So are UIDs above every one the view
        knows: a message the backend has but not yet announced (its EXISTS not in) is not classified yet,
        and may be one the device must not see."""
        top = self.max_uid
        if top == 0:
            return SequenceSet.empty()
        resolved = (uid_set.resolve(top) if uid_set.has_star else uid_set).clip(1, top)
        if not self.hidden:
            return resolved
        if _few(resolved):
            h = self.hidden
            allowed = SequenceSet.from_iterable([u for lo, hi in resolved.ranges for u in range(lo, hi + 1)
                                                 if u not in h])
        else:
            allowed = resolved - self.hidden_uids
        vis = self.visible
        if uid_set.has_star and vis:
            allowed = allowed | SequenceSet.from_iterable([vis[-1]])
        return allowed

    @property
    def uid_top(self) -> int:
        """The highest UID the client may take as used: every one the view knows and every one below the
        UIDNEXT it was told (``seen_up_to``)."""
        return max(self.max_uid, self.seen_up_to)

    def absent_uids(self, uid_set: SequenceSet) -> SequenceSet:
        """The UIDs of ``uid_set`` (``*``: ``uid_top``) up to ``uid_top`` that name no visible message:
        hidden, expunged and never used alike. For the device they are all the same (no such message),
        so what it is told of one it must be told of the others (a QRESYNC resync's VANISHED (EARLIER))."""
        top = self.uid_top
        if top == 0 or not uid_set:
            return SequenceSet.empty()
        wanted = (uid_set.resolve(top) if uid_set.has_star else uid_set).clip(1, top)
        if not wanted:
            return wanted
        vis = self.visible
        shown = vis[bisect_left(vis, wanted.min()):bisect_right(vis, wanted.max())]
        return wanted - SequenceSet.from_iterable(shown) if shown else wanted

    def known_visible(self, uids: Iterable[int]) -> set[int]:
        """The visible ones of ``uids`` (e.g. a search's answer): none hidden, and none above every UID the
        view knows (the backend took it in, its EXISTS is held while it is classified: maybe hidden)."""
        top, h = self.max_uid, self.hidden
        return {u for u in uids if u <= top and u not in h}

    def uids_of(self, client_set: SequenceSet) -> SequenceSet:
        """The UIDs of the visible messages a client sequence set names (numbers beyond the visible
        count dropped), a slice of the visible list per client range."""
        vis = self.visible
        return SequenceSet.from_iterable(
            [u for lo, hi in self._client_ranges(client_set).ranges for u in vis[lo - 1:hi]])

    def client_seqs(self, backend_seqs: Iterable[int]) -> list[int]:
        """Map backend numbers (e.g. a SEARCH result) to client numbers, dropping hidden ones."""
        out = []
        for s in backend_seqs:
            c = self.client_seq(s)
            if c is not None:
                out.append(c)
        return out

    # -- changes --------------------------------------------------------------------------------

    def append(self, new_uids: Iterable[int], hidden: Iterable[int] = ()) -> None:
        """New messages at the end of the mailbox (EXISTS)."""
        new = sorted(u for u in new_uids if u > self.max_uid)
        if not new:
            return
        vis = self._own_visible()
        self._own()
        self.uids.extend(new)
        newset = set(new)
        newly_hidden = [u for u in hidden if u in newset]
        self.hidden.update(newly_hidden)
        if vis is None or not self.hidden:
            self._changed()
            return
        h = self.hidden
        vis.extend(u for u in new if u not in h)
        self._renumbered(hidden_changed=bool(newly_hidden))

    def expunge(self, backend_seq: int) -> int | None:
        """A backend EXPUNGE; returns the client number to announce, or None (hidden: stay silent).
        A burst of them in a big mailbox costs a bisect and a list deletion each, not a rebuild."""
        u = self.uid_of(backend_seq)
        if u is None:
            return None
        if not self.hidden:
            self._own()
            del self.uids[backend_seq - 1]
            self._changed()
            self.seen_up_to = max(self.seen_up_to, u)
            return backend_seq
        was_hidden = u in self.hidden
        if not was_hidden:
            self.seen_up_to = max(self.seen_up_to, u)
        vis = self.visible if self._visible is None else self._own_visible()
        if vis is None:  # (not ours: rebuilt below)
            client = None if was_hidden else self.client_seq(backend_seq)
        else:
            client = None if was_hidden else bisect_left(vis, u) + 1
        self._own()
        del self.uids[backend_seq - 1]
        if was_hidden:
            self.hidden.discard(u)
        if vis is None or not self.hidden:
            self._changed()
        else:
            if client is not None:
                del vis[client - 1]
            self._renumbered(hidden_changed=was_hidden)
        return client

    def vanish(self, uids: Iterable[int]) -> None:
        """UIDs reported VANISHED (QRESYNC)."""
        gone = set(uids)
        if not gone:
            return
        self._own()
        if len(gone) > _FEW:
            before = len(self.uids)
            self.seen_up_to = max([self.seen_up_to, *(u for u in self.uids if u in gone and u not in self.hidden)])
            self.uids = [u for u in self.uids if u not in gone]
            self.hidden -= gone
            if len(self.uids) != before:
                self._changed()
            return
        vis = self._own_visible()
        if vis is None and self.hidden:
            vis = self.visible
        all_uids, changed, hidden_changed = self.uids, False, False
        for u in gone:
            i = bisect_left(all_uids, u)
            if i == len(all_uids) or all_uids[i] != u:
                continue
            del all_uids[i]
            changed = True
            if u in self.hidden:
                self.hidden.discard(u)
                hidden_changed = True
                continue
            self.seen_up_to = max(self.seen_up_to, u)
            if vis is not None:
                del vis[bisect_left(vis, u)]
        if not changed:
            return
        if vis is None or not self.hidden:
            self._changed()
        else:
            self._renumbered(hidden_changed)

    def hide(self, uids: Iterable[int]) -> list[int]:
        """Hide more messages; returns the client numbers to announce as EXPUNGE, in the order to send
        them (descending, so each number is still valid when the client reads it)."""
        all_uids, hidden = self.uids, self.hidden
        new = []
        for u in set(uids):
            if u not in hidden:
                i = bisect_left(all_uids, u)
                if i < len(all_uids) and all_uids[i] == u:
                    new.append(u)
        if not new:
            return []
        self.seen_up_to = max(self.seen_up_to, max(new))
        seqs = sorted((self.client_seq_of_uid(u) for u in new), reverse=True)
        vis = self._own_visible()
        self._own()
        self.hidden.update(new)
        if vis is None or len(new) > _FEW:
            self._changed()
        else:
            for c in seqs:  # (descending: each deletion leaves the lower numbers in place)
                del vis[c - 1]
            self._renumbered(hidden_changed=True)
        return seqs  # type: ignore[return-value]

    def unhide_tail(self, uids: Iterable[int]) -> int:
        """Make hidden messages visible again, but only those above every UID the client knows (IMAP can
        only announce new messages at the end, with EXISTS, and above the UIDNEXT it told: see
        ``seen_up_to``). Returns how many became visible; the others stay hidden until the mailbox is
        selected again."""
        vis = self.visible
        floor = max(vis[-1] if vis else 0, self.seen_up_to)
        back = sorted({u for u in uids if u in self.hidden and u > floor})  # (each once)
        if not back:
            return 0
        self._own()
        self.hidden.difference_update(back)
        self._changed()
        return len(back)


_FEW = 256  # numbers a set may hold to be handled one by one rather than by whole tables


def _few(numbers: SequenceSet) -> bool:
    """Does ``numbers`` (finite) hold at most ``_FEW`` numbers? (Stops counting early.)"""
    left = _FEW
    for lo, hi in numbers.ranges:
        left -= hi - lo + 1
        if left < 0:
            return False
    return True


def parse_uid_list(text: bytes) -> list[int]:
    """Numbers of an ESEARCH ``ALL`` set or a SEARCH response (``1:3,7`` or ``1 2 3``)."""
    text = text.strip()
    if not text:
        return []
    if b"," in text or b":" in text:
        return expand_ranges(SequenceSet.parse(text).ranges)
    return [int(x) for x in text.split()]


# More numbers than a mailbox the proxy serves can hold (its views keep every UID in a list): a search answer
# or a VANISHED naming more is the backend's error, never a list to build. ('ALL 1:4294967295' would take
# minutes and gigabytes, the process's every session stuck meanwhile: the response fuzzer's VANISHED case.)
MAX_EXPANDED = 1 << 24


def expand_ranges(ranges) -> list[int]:
    """The numbers of sorted ``(lo, hi)`` ranges, as a list (range() in C: ~10x iterating a SequenceSet);
    ValueError past ``MAX_EXPANDED`` numbers."""
    if sum(hi - lo for lo, hi in ranges) + len(ranges) > MAX_EXPANDED:
        raise ValueError(f"more than {MAX_EXPANDED} numbers in a set")
    out: list[int] = []
    for lo, hi in ranges:
        out.extend(range(lo, hi + 1))
    return out


__all__ = ["MAX_EXPANDED", "MailboxView", "expand_ranges", "parse_uid_list", "STAR"]
