"""CPM object classification (DESIGN.md section 3) and the CPM preference namespace.

Classification runs on the server (IMAP SEARCH, answered as ESEARCH UID sets), never by fetching bodies;
the results are cached per user, mailbox and UIDVALIDITY, since a message's content never changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("sms", "mms", "session-info", "group-state", "file-transfer", "imdn", "chat", "other")
SYNC_KINDS = KINDS + ("session-history",)

PREFIX = "/private/vendor/vendor.cpmproxy"
PREF_NOTIFICATIONS = "notifications"
PREF_SYNC = "sync"
PREFERENCES = frozenset([PREF_NOTIFICATIONS, PREF_SYNC] + [f"{PREF_SYNC}/{k}" for k in SYNC_KINDS])

# ``cmd.state`` key the plugins share: the command the backend gets in place of this one changes nothing
# there (a local delete; an EXPUNGE with nothing visible to expunge): no change to tell the user's other
# devices of (notify, push).
NO_SERVER_CHANGE = "no_server_change"

# Capability and STATUS item of the proxy's own: a number for what a device is shown of a folder (see
# PolicyPlugin.view_token), so that its client can tell a preference change that hides and shows as many.
VIEW_ITEM = b"XCPM-VIEW"

_CPIM = b'HEADER Content-Type "message/cpim"'
_FT_HTTP = b'BODY "application/vnd.gsma.rcs-ft-http+xml"'
_IMDN = b'BODY "message/imdn+xml"'

# IMAP SEARCH criteria that select each kind (case-insensitive substring matches on the server).
KIND_CRITERIA: dict[str, bytes] = {
    "sms": b'HEADER Message-Context "pager-message"',
    "mms": b'HEADER Message-Context "multimedia-message"',
    "session-info": b'HEADER Content-Type "application/x-cpm-session"',
    "group-state": b'HEADER Content-Type "application/group-state-object+xml"',
    "file-transfer": b'OR HEADER Content-Type "application/x-cpm-file-transfer" (' + _CPIM + b" " + _FT_HTTP + b")",
    "imdn": _CPIM + b" " + _IMDN,
    "chat": _CPIM + b" NOT " + _IMDN + b" NOT " + _FT_HTTP,
}
SESSION_INFO_CRITERIA = KIND_CRITERIA["session-info"]


def pref_entry(key: str) -> str:
    return f"{PREFIX}/{key}" if key else PREFIX


def pref_key(entry: str) -> str | None:
    """``sync/imdn`` for ``/private/vendor/vendor.cpmproxy/sync/imdn`` (any case); None if outside."""
    low = entry.lower()
    if low == PREFIX.lower():
        return ""
    if low.startswith(PREFIX.lower() + "/"):
        return low[len(PREFIX) + 1:]
    return None


@dataclass
class KindCache:
    """What is known of one mailbox: for each kind, its UIDs among UIDs up to ``upto[kind]``."""
    uidvalidity: int
    upto: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, set[int]] = field(default_factory=dict)
    # The mailbox's UIDs (as ranges) when it had ``snapshot`` = (EXISTS, UIDNEXT): a SELECT answering the
    # same pair has exactly these UIDs (nothing added, since UIDNEXT did not move; so nothing expunged).
    snapshot: tuple[int, int] | None = None
    uid_ranges: tuple[tuple[int, int], ...] = ()
    # Whether the mailbox's messages are stored in other folders (a virtual mailbox: Dovecot's FETCH
    # X-MAILBOX names another folder than this one); None until one of its messages was looked at. A
    # mailbox's own kind, so one message tells (see PolicyPlugin._hidden_by_folder).
    virtual: bool | None = None
    # A virtual mailbox's UIDs by the folder each message is really in, for UIDs up to ``real_upto``: a
    # virtual mailbox's UIDs are stable under its UIDVALIDITY (never renumbered), as any mailbox's.
    real_folders: dict[str, set[int]] = field(default_factory=dict)
    real_upto: int = 0
    owner: ClassificationCache | None = field(default=None, repr=False, compare=False)

    def known(self, kind: str) -> int:
        return self.upto.get(kind, 0)

    def add(self, kind: str, upto: int, uids: set[int]) -> None:
        if upto > self.upto.get(kind, 0):
            known = self.kinds.setdefault(kind, set())
            before = len(known)
            known.update(uids)
            self.upto[kind] = upto
            if self.owner is not None:
                self.owner.grew(self, len(known) - before)

    def add_real(self, upto: int, found: dict[int, str]) -> None:
        """The real folders of UIDs up to ``upto`` (``found``: UID -> folder name)."""
        if upto > self.real_upto:
            for uid, folder in found.items():
                if uid > self.real_upto:
                    self.real_folders.setdefault(folder, set()).add(uid)
            self.real_upto = upto
            if self.owner is not None:
                self.owner.grew(self, len(found))

    def size(self) -> int:
        return sum(len(uids) for uids in self.kinds.values()) + sum(len(u) for u in self.real_folders.values())


class ClassificationCache:
    """Process-wide, bounded: (user, mailbox) -> KindCache; at most ``max_mailboxes`` of them, and
    ``max_uids`` UIDs in all (a mailbox of 20,000 messages, a quarter of them IMDNs, keeps ~0.7 MB: the
    count alone let the cache grow to gigabytes). The oldest go first."""

    def __init__(self, max_mailboxes: int = 20000, max_uids: int = 2_000_000):
        self.max_mailboxes = max_mailboxes
        self.max_uids = max_uids
        self.uids = 0  # in all the entries' kind sets
        self._data: dict[tuple[str, str], KindCache] = {}

    def get(self, user: str, mailbox: str, uidvalidity: int) -> KindCache:
        key = (user, mailbox)
        entry = self._data.get(key)
        if entry is None or entry.uidvalidity != uidvalidity:
            if entry is not None:
                self._drop(key)
            if len(self._data) >= self.max_mailboxes:
                self._drop(next(iter(self._data)))  # oldest first (dicts keep insertion order)
            entry = self._data[key] = KindCache(uidvalidity, owner=self)
        return entry

    def grew(self, entry: KindCache, n: int) -> None:
        """``entry`` holds ``n`` UIDs more: the oldest others go while there are too many (never the
        entry itself, in use: alone past the bound, it stays until the next one comes)."""
        self.uids += n
        while self.uids > self.max_uids and len(self._data) > 1:
            oldest = next(iter(self._data))
            if self._data[oldest] is entry:
                break
            self._drop(oldest)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._data.pop(key)
        self.uids -= entry.size()
        entry.owner = None

    def peek(self, user: str, mailbox: str, uidvalidity: int) -> KindCache | None:
        """The entry if there is one for this UIDVALIDITY (nothing is created)."""
        entry = self._data.get((user, mailbox))
        return entry if entry is not None and entry.uidvalidity == uidvalidity else None

    def plain(self, user: str, mailbox: str) -> bool:
        """Whether ``mailbox`` is known to hold its own messages (not a virtual mailbox's of other folders).
        Whatever its UIDVALIDITY: what makes a mailbox virtual is the operator's Dovecot configuration, not
        anything a client can do to the folder (Dovecot cannot CREATE a virtual mailbox), and a process
        that knows no better (this entry evicted) looks again."""
        entry = self._data.get((user, mailbox))
        return entry is not None and entry.virtual is False

    def virtual(self, user: str, mailbox: str) -> bool | None:
        """Whether ``mailbox`` is known to be a virtual mailbox (False: plain, see ``plain``); None if unknown."""
        entry = self._data.get((user, mailbox))
        return None if entry is None else entry.virtual

    def forget(self, user: str, mailbox: str) -> None:
        if (user, mailbox) in self._data:
            self._drop((user, mailbox))

    def resize(self, max_mailboxes: int, max_uids: int) -> None:
        """New bounds (a reload): the oldest entries go at once while past them."""
        self.max_mailboxes, self.max_uids = max_mailboxes, max_uids
        while self._data and (len(self._data) > max_mailboxes or self.uids > max_uids):
            self._drop(next(iter(self._data)))
