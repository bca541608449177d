"""The sync engine of the reference CPM Message Storage Client (OMA CPM SD 5.5.2.20.2, client side).

The specification's client procedure, and where each step lives here:

a. *Upon an explicit synchronization request from the CPM User* (``cpm-sync sync``, :meth:`Syncer.sync`):

   1. "initiate a request to the Message Storage Server to provide an update of all modifications in its
      stored resources, i.e. UIDNEXT and UIDVALIDITY for each folder" -- :meth:`Syncer.list_folders`:
      one ``LIST "" "*" RETURN (STATUS (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ))`` (LIST-STATUS,
      RFC 5819) answers for every folder in a single round trip; without LIST-STATUS, a LIST and then one
      STATUS per folder, all pipelined.
   2. "determine what stored objects are new since its last synchronization" -- :meth:`Syncer.sync_folder`
      compares with the index: a different UIDVALIDITY voids the local copy (resync from scratch); equal
      UIDNEXT and HIGHESTMODSEQ, and MESSAGES equal to what the device holds, mean nothing happened and
      the folder is not even selected; otherwise the folder is opened with ``EXAMINE mbox (QRESYNC
      (uidvalidity modseq known-uids))`` (RFC 7162) and the server itself reports what was expunged
      (``VANISHED (EARLIER)``) and which flags changed (FETCH; a FETCH of a UID the device lacks is a
      message shown to it again), and ``UID FETCH <uidnext>:*`` lists what is new. Where the count still
      does not add up (the proxy's view changed with no modseq to tell: a preference, a policy), the
      folder's UIDs (``UID SEARCH``, no bodies) settle what to fetch and what to drop. Without QRESYNC
      every UID and its flags are compared instead.
   3. "upon receiving updates, fetch the new items from the server" -- :meth:`Syncer._fetch_bodies`: the
      new messages, in batches bounded by count and bytes, several batches in flight (pipelined), each
      written to the Maildir and committed to the index before the folder's UIDNEXT advances.

b. *Upon a notification from the server* (``cpm-sync watch``, :mod:`cpmproxy.client.watch`): the same
   steps for the folders the notification names -- 1. fresh UIDNEXT/UIDVALIDITY (STATUS), 2. what is new,
   3. fetch it. "These operations are carried out on a per-folder basis."

The server side's NOTE -- changes made on the client update the server, "except when the deletion on the
client was a so-called local deletion" -- is :meth:`Syncer.set_flags` and :meth:`Syncer.delete` (with
``local=True``: the proxy's ``XCPM-LOCALDELETE``, DESIGN.md section 4).

What this device sees is the proxy's filtered view (policy and preferences, DESIGN.md R1): objects hidden
from it never appear in any response, so they are never downloaded -- the client needs no policy logic.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from cpmproxy.client.connection import (
    Connection,
    PendingCommand,
    Untagged,
    decode_mailbox,
    encode_mailbox,
    mailbox_arg,
)
from cpmproxy.client.errors import (
    ConnectionLost,
    FolderRefused,
    Interrupted,
    NoSuchFolder,
    ProtocolError,
    ServerRefused,
    StaleFolder,
    Unsupported,
)
from cpmproxy.client.imapwire import Atom, UidSet, astring
from cpmproxy.client.progress import NullProgress, ProgressFactory
from cpmproxy.client.store import Folder, LocalStore, MessageRecord

__all__ = [
    "FolderResult",
    "SelectState",
    "ServerFolder",
    "SyncOptions",
    "SyncResult",
    "Syncer",
    "canonical_name",
    "normalize_flag",
    "parse_uid_set",
]

LOCAL_DELETE_CAPABILITY = "XCPM-LOCALDELETE"
LOCAL_DELETE_KEYWORD = b"$LocalDelete"
# The proxy's capability and STATUS item: a number that changes when what the device is shown of a folder
# does (its preferences or the policy); with it, a change that hides and shows as many is not missed.
VIEW_ITEM = b"XCPM-VIEW"
_SESSION_MARKS = frozenset(("\\deleted", LOCAL_DELETE_KEYWORD.decode().lower()))  # (see Syncer.set_flags)
# Longest known-uids argument we put in a QRESYNC SELECT; beyond it the server reports VANISHED for UIDs
# we may not know, which is harmless (removing an unknown UID is a no-op).
_MAX_KNOWN_UIDS = 4000
_MAX_UID = 2**32 - 1  # UIDs are 32-bit (RFC 9051 2.3.1.1)
_LIST_BATCH = 1000  # UIDs per UID FETCH of flags and sizes (a set of 1,000 scattered UIDs: < 12 KB)


class SyncOptions:
    """``batch_messages``/``batch_bytes``: limits of one body FETCH command (one big message may exceed
    the bytes); ``window``: body FETCH commands in flight at once; ``full``: compare every UID and flag
    even where UIDNEXT/HIGHESTMODSEQ say "no change"."""

    __slots__ = ("batch_messages", "batch_bytes", "window", "full")

    def __init__(self, batch_messages: int = 250, batch_bytes: int = 4 * 1024 * 1024, window: int = 3,
                 full: bool = False) -> None:
        self.batch_messages, self.batch_bytes, self.window, self.full = batch_messages, batch_bytes, window, full


class ServerFolder:
    """A folder as the server reports it (step a.1). ``attributes`` are the lower-cased LIST attributes."""

    __slots__ = ("name", "wire", "delimiter", "attributes", "messages", "uidnext", "uidvalidity", "highestmodseq",
                 "view")

    def __init__(self, name: str, wire: bytes, delimiter: str | None, attributes: frozenset[bytes] = frozenset(),
                 messages: int | None = None, uidnext: int | None = None, uidvalidity: int | None = None,
                 highestmodseq: int | None = None) -> None:
        self.name, self.wire, self.delimiter, self.attributes = name, wire, delimiter, attributes
        self.messages, self.uidnext, self.uidvalidity, self.highestmodseq = messages, uidnext, uidvalidity, highestmodseq
        self.view: int | None = None  # the proxy's XCPM-VIEW: which messages this device is shown (None: no proxy)

    def __repr__(self) -> str:
        return (f"ServerFolder({self.name!r}, messages={self.messages}, uidnext={self.uidnext}, "
                f"uidvalidity={self.uidvalidity}, highestmodseq={self.highestmodseq})")

    @property
    def selectable(self) -> bool:
        return not self.attributes & {b"\\noselect", b"\\nonexistent"}

    def merge_status(self, items: dict[bytes, int]) -> None:
        self.messages = items.get(b"MESSAGES", self.messages)
        self.uidnext = items.get(b"UIDNEXT", self.uidnext)
        self.uidvalidity = items.get(b"UIDVALIDITY", self.uidvalidity)
        self.highestmodseq = items.get(b"HIGHESTMODSEQ", self.highestmodseq)
        self.view = items.get(VIEW_ITEM, self.view)

    def view_changed(self, lf: Folder) -> bool:
        """Whether the proxy says this device's view of the folder changed since ``lf`` was synced (a
        preference or the policy now hides or shows other messages, with no UID or modseq to tell)."""
        return self.view is not None and self.view != lf.view_token


class FolderResult:
    """What one folder's sync did. ``reset``: UIDVALIDITY changed, local copy discarded and fetched again;
    ``deleted``: gone from the server (or from this device's view); ``unchanged``: not even opened;
    ``retry``: messages that could not be fetched this time (tried again next sync)."""

    __slots__ = ("name", "new", "bytes", "flags", "removed", "reset", "created", "deleted", "unchanged", "retry")

    def __init__(self, name: str, *, removed: int = 0, deleted: bool = False) -> None:
        self.name = name
        self.new = self.bytes = self.flags = self.retry = 0
        self.removed = removed
        self.reset = self.created = self.unchanged = False
        self.deleted = deleted

    def __repr__(self) -> str:
        return f"<FolderResult {self.summary()}>"

    @property
    def changed(self) -> bool:
        return bool(self.new or self.flags or self.removed or self.reset or self.created or self.deleted)

    def summary(self) -> str:
        if self.deleted:
            # (Or hidden from this device by a preference or policy: the same to the device.)
            return f"{self.name}: gone from the server, removed locally ({self.removed} messages)"
        parts = []
        if self.created:
            parts.append("new folder")
        if self.reset:
            parts.append("UIDVALIDITY changed, resynced from scratch")
        if self.new:
            parts.append(f"{self.new} new ({_human_bytes(self.bytes)})")
        if self.flags:
            parts.append(f"{self.flags} flag changes")
        if self.removed:
            parts.append(f"{self.removed} removed")
        if self.retry:
            parts.append(f"{self.retry} to retry")
        return f"{self.name}: " + (", ".join(parts) if parts else "up to date")


class SyncResult:
    """``failed``: (folder, reason) of folders the server refused to sync (the others were synced)."""

    __slots__ = ("folders", "elapsed", "failed")

    def __init__(self) -> None:
        self.folders: list[FolderResult] = []
        self.elapsed = 0.0
        self.failed: list[tuple[str, str]] = []

    def failure(self) -> str | None:
        """One line naming the folders that could not be synced (None: all were)."""
        if not self.failed:
            return None
        names = ", ".join(name for name, _ in self.failed)
        return f"could not sync {len(self.failed)} folder(s): {names} ({self.failed[0][1]})"

    @property
    def new(self) -> int:
        return sum(f.new for f in self.folders)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.folders)

    @property
    def flags(self) -> int:
        return sum(f.flags for f in self.folders)

    @property
    def removed(self) -> int:
        return sum(f.removed for f in self.folders)

    def summary(self) -> str:
        return (
            f"{len(self.folders)} folders checked, {sum(f.changed for f in self.folders)} changed: "
            f"{self.new} new messages ({_human_bytes(self.bytes)}), {self.flags} flag changes, "
            f"{self.removed} removed in {self.elapsed:.1f} s"
        )


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


# -- response parsing helpers ------------------------------------------------------------------------


# Tokens (cpmproxy.client.imapwire): Atom (bytes subclass), bytes (quoted string or literal), None
# (NIL), list (parenthesized list).


def _fetch_items(resp: Untagged) -> dict[bytes, object]:
    """``* 5 FETCH (UID 9 FLAGS (\\Seen) BODY[] {12}...)`` -> {b"UID": b"9", b"FLAGS": [b"\\Seen"], ...}."""
    toks = resp.tokens
    if not toks or not isinstance(toks[0], list):
        raise ProtocolError("malformed FETCH response from the server")
    items = toks[0]
    out: dict[bytes, object] = {}
    for i in range(0, len(items) - 1, 2):
        key = items[i]
        if isinstance(key, Atom):
            out[key.upper()] = items[i + 1]
    return out


def _int(token: object) -> int | None:
    if isinstance(token, Atom) and token.isdigit():
        return int(token)
    if isinstance(token, list) and token:  # MODSEQ (12345)
        return _int(token[0])
    return None


def _flags(token: object) -> tuple[str, ...]:
    if not isinstance(token, list):
        return ()
    return tuple(t.decode("utf-8", "replace") for t in token if isinstance(t, Atom) and t != b"\\Recent")


def _is_string(token: object) -> bool:
    """A quoted string or literal (as opposed to an atom or NIL)."""
    return isinstance(token, bytes) and not isinstance(token, Atom)


_MONTHS = {m: i for i, m in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"), 1)}
_INTERNALDATE_RE = re.compile(rb" ?([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})")


def _internaldate(token: object) -> float | None:
    """``"17-Jul-1996 02:44:25 -0700"`` -> unix time (a regex, not strptime: it runs per message)."""
    if not _is_string(token):
        return None
    m = _INTERNALDATE_RE.fullmatch(token)  # type: ignore[arg-type]
    month = _MONTHS.get(m.group(2).lower()) if m else None
    if m is None or month is None:
        return None
    offset = (int(m.group(8)) * 3600 + int(m.group(9)) * 60) * (1 if m.group(7) == b"+" else -1)
    days = _days_from_civil(int(m.group(3)), month, int(m.group(1)))
    return float(days * 86400 + int(m.group(4)) * 3600 + int(m.group(5)) * 60 + int(m.group(6)) - offset)


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm; no calendar import)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _status_items(token: object) -> dict[bytes, int]:
    if not isinstance(token, list):
        return {}
    out: dict[bytes, int] = {}
    for i in range(0, len(token) - 1, 2):
        key, value = token[i], _int(token[i + 1])
        if isinstance(key, Atom) and value is not None:
            out[key.upper()] = value
    return out


def _mailbox_token(token: object) -> bytes:
    return astring(token)


def _uid_set(uids: Iterable[int]) -> bytes:
    return UidSet.of(uids).format()


def _search_uids(cmd: PendingCommand) -> set[int]:
    out: set[int] = set()
    for resp in cmd.collected:
        out.update(int(w) for w in resp.data.split() if w.isdigit())
    return out


_FLAG_ALIASES = {
    "seen": "\\Seen",
    "read": "\\Seen",
    "flagged": "\\Flagged",
    "answered": "\\Answered",
    "draft": "\\Draft",
    "deleted": "\\Deleted",
}


def normalize_flag(flag: str) -> bytes:
    """A flag from the command line as an IMAP flag: ``\\Seen``, ``$Label``, or an alias (``seen``,
    ``read``, ``flagged``, ``answered``, ``draft``). Raises ValueError for anything IMAP cannot carry."""
    flag = _FLAG_ALIASES.get(flag.lower(), flag)
    raw = flag.encode("ascii", "strict") if flag.isascii() else b""
    body = raw[1:] if raw.startswith(b"\\") else raw
    if not body or any(c <= 0x20 or c >= 0x7F or c in b'(){%*"\\]' for c in body):
        raise ValueError(f"not a valid IMAP flag or keyword: {flag!r}")
    if raw.lower() == b"\\recent":
        raise ValueError("\\Recent cannot be set by a client")
    return raw


# -- the engine --------------------------------------------------------------------------------------


class SelectState:
    """What a SELECT/EXAMINE told us (the handler claims the responses that belong to it).

    ``previous``: the mailbox selected when the command was sent, with QRESYNC enabled. Until the server's
    ``* OK [CLOSED]`` (RFC 7162 3.2.11) EXISTS/VANISHED/FETCH are still about that mailbox: they are held
    back and, once [CLOSED] arrives, handed to ``spill`` (the connection's unsolicited responses, where the
    watch loop finds them) instead of being taken for the new mailbox's. A server that never says [CLOSED]
    gets them applied as before (:meth:`finish`)."""

    def __init__(self, previous: bytes | None = None, spill: Callable[[Untagged], None] | None = None) -> None:
        self._previous, self._spill = previous, spill
        self._held: list[Untagged] | None = [] if previous is not None and spill is not None else None
        self.uidvalidity: int | None = None
        self.uidnext: int | None = None
        self.highestmodseq: int | None = None
        self.nomodseq = False
        self.exists: int | None = None
        self.vanished: list[UidSet] = []
        self.changed: dict[int, tuple[str, ...]] = {}

    def handle(self, resp: Untagged) -> bool:
        name = resp.name
        if self._held is not None:
            if name == b"OK" and resp.code is not None and resp.code.upper() == b"CLOSED":
                assert self._spill is not None
                for held in self._held:
                    held.mailbox = self._previous
                    self._spill(held)
                self._held = None
                return True
            if name in (b"EXISTS", b"VANISHED", b"FETCH"):
                self._held.append(resp)
                return True
        return self._apply(resp)

    def finish(self) -> None:
        """The command completed: anything still held back (no [CLOSED] came) was this mailbox's."""
        held, self._held = self._held or [], None
        for resp in held:
            if not self._apply(resp) and self._spill is not None:
                resp.mailbox = self._previous
                self._spill(resp)

    def _apply(self, resp: Untagged) -> bool:
        name = resp.name
        if name == b"OK" and resp.code is not None:
            code, _, arg = resp.code.partition(b" ")
            code = code.upper()
            if code == b"UIDVALIDITY":
                self.uidvalidity = int(arg)
            elif code == b"UIDNEXT":
                self.uidnext = int(arg)
            elif code == b"HIGHESTMODSEQ":
                self.highestmodseq = int(arg)
            elif code == b"NOMODSEQ":
                self.nomodseq = True
            return True
        if name == b"EXISTS":
            self.exists = resp.number
            return True
        if name in (b"FLAGS", b"RECENT"):
            return True
        if name == b"VANISHED":
            toks = resp.tokens
            if toks and isinstance(toks[-1], Atom):
                self.vanished.append(UidSet.parse(toks[-1]))
            return True
        if name == b"FETCH":
            items = _fetch_items(resp)
            uid = _int(items.get(b"UID"))
            if uid is not None and b"FLAGS" in items:
                self.changed[uid] = _flags(items[b"FLAGS"])
                return True
        return False


class Syncer:
    """Synchronises a :class:`LocalStore` with the server over one :class:`Connection`.

    ``should_stop`` is polled between batches and folders; when it returns True the current batch is
    committed and :class:`Interrupted` is raised (the next sync resumes from there).

    ``reconnect``, if given, opens a new connection when the server ends one in the middle of a folder:
    Dovecot says BYE to a session whose selected folder another client deletes. The folder is then gone
    (as if LIST had not shown it) or synced again; at most ``MAX_RECONNECTS`` times in one sync.
    """

    MAX_RECONNECTS = 3

    def __init__(
        self,
        conn: Connection,
        store: LocalStore,
        options: SyncOptions | None = None,
        progress: ProgressFactory | None = None,
        should_stop: Callable[[], bool] | None = None,
        log: Callable[[str], None] | None = None,
        reconnect: Callable[[], Connection] | None = None,
    ) -> None:
        self.store = store
        self.options = options or SyncOptions()
        self.progress = progress or (lambda label, n, b: NullProgress())
        self.should_stop = should_stop or (lambda: False)
        self.log = log or (lambda msg: None)
        self.reconnect = reconnect
        self._adopt(conn)

    def _adopt(self, conn: Connection) -> None:
        self.conn = conn
        # QRESYNC must be ENABLEd before it can be used in SELECT; it also makes the server report
        # expunges as VANISHED (UIDs) instead of EXPUNGE (sequence numbers): simpler to keep in step.
        if conn.has("QRESYNC") and not conn.qresync:
            conn.enable("QRESYNC")
        status = [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY"]
        if conn.condstore:
            status.append(b"HIGHESTMODSEQ")
        if conn.has(VIEW_ITEM.decode()):
            status.append(VIEW_ITEM)
        self._status_items = b"(" + b" ".join(status) + b")"

    def _check_stop(self) -> None:
        if self.should_stop():
            raise Interrupted("interrupted; the next sync resumes where this one stopped")

    # -- step a.1: UIDNEXT and UIDVALIDITY for each folder --------------------------------------------

    def list_folders(self, names: Sequence[str] | None = None, list_status: bool = True) -> dict[str, ServerFolder]:
        """LIST (+ STATUS) of every folder, or of the named ones. Pipelined; one round trip with
        LIST-STATUS (unless ``list_status`` is False: then one STATUS per folder, all in flight at once).
        Folders the server does not know are absent from the result."""
        found: dict[bytes, ServerFolder] = {}
        wanted: set[bytes] | None = None
        if names is not None:
            wanted = set()
            for n in map(canonical_name, names):
                local = self.store.folder(n)
                wanted.add(local.wire if local is not None else encode_mailbox(n))

        def on_list(resp: Untagged) -> bool:
            if resp.name == b"LIST":
                toks = resp.tokens
                if len(toks) < 3 or not isinstance(toks[0], list):
                    raise ProtocolError("malformed LIST response from the server")
                wire = _mailbox_token(toks[2])
                if wanted is not None and wire not in wanted:
                    # A wildcard in a requested name matched something else, or a NOTIFY MailboxName
                    # event for another folder: not ours, the caller may want it.
                    return False
                attrs = frozenset(t.lower() for t in toks[0] if isinstance(t, Atom))
                delim = None if toks[1] is None else astring(toks[1]).decode("ascii", "replace")
                sf = found.get(wire)
                if sf is None:
                    found[wire] = ServerFolder(decode_mailbox(wire), wire, delim, attrs)
                else:
                    sf.delimiter, sf.attributes = delim, attrs
                return True
            if resp.name == b"STATUS":
                toks = resp.tokens
                if len(toks) < 2:
                    raise ProtocolError("malformed STATUS response from the server")
                wire = _mailbox_token(toks[0])
                if wanted is not None and wire not in wanted:
                    return False  # not ours: maybe a notification, leave it for the caller
                sf = found.get(wire)
                if sf is None:  # STATUS before LIST: allowed, keep it
                    sf = found[wire] = ServerFolder(decode_mailbox(wire), wire, None)
                sf.merge_status(_status_items(toks[1]))
                return True
            return False

        list_status = list_status and self.conn.has("LIST-STATUS")
        ret = b" RETURN (STATUS " + self._status_items + b")" if list_status else b""
        cmds = []
        if wanted is None:
            cmds.append(self.conn.send(b'LIST "" "*"' + ret, handler=on_list))
        else:
            for wire in sorted(wanted):
                cmds.append(self.conn.send(b'LIST "" ' + mailbox_arg(wire) + ret, handler=on_list))
        for cmd in cmds:
            self.conn.wait(cmd)
        if not list_status:
            # RFC 3501 STATUS, one per folder, all in flight at once.
            cmds = [
                self.conn.send(b"STATUS " + mailbox_arg(sf.wire) + b" " + self._status_items, handler=on_list)
                for sf in found.values()
                if sf.selectable
            ]
            for cmd in cmds:
                self.conn.wait(cmd, check=False)  # a folder deleted meanwhile: NO, and it is skipped
        return {sf.name: sf for sf in found.values()}

    # -- a whole sync -----------------------------------------------------------------------------

    def sync(self, names: Sequence[str] | None = None) -> SyncResult:
        """Explicit sync (5.5.2.20.2 a) of the whole account, or of the named folders."""
        started = time.monotonic()
        result = SyncResult()
        if names is not None:
            names = [canonical_name(n) for n in names]
        if self.conn.selected is not None and self.conn.has("UNSELECT"):
            # A server may answer STATUS for the mailbox this session has selected from the session's own
            # (possibly stale) view: Dovecot reported no new message in the folder the previous pass left
            # open. UNSELECT first (pipelined with the LIST: no extra round trip). Never CLOSE: on a folder
            # opened read-write it would expunge.
            self.conn.send(b"UNSELECT")
            self.conn.selected = None
        server = self.list_folders(names)
        local = {f.name: f for f in self.store.folders()}
        if names is not None:
            missing = [n for n in names if n not in server and n not in local]
            if missing:
                raise NoSuchFolder(f"no such folder on the server: {', '.join(missing)}", missing=tuple(missing))
            targets = list(dict.fromkeys(names))
        else:
            targets = sorted(set(server) | set(local))
        unchanged: list[Folder] = []
        reconnects = [self.MAX_RECONNECTS if self.reconnect is not None else 0]
        for name in targets:
            self._check_stop()
            sf = server.get(name)
            lf = local.get(name)
            if sf is None or not sf.selectable:
                if lf is not None:
                    # Deleted on the server, or hidden from this device by policy/preference: the local
                    # copy follows the device's view of the store.
                    res = FolderResult(name, deleted=True, removed=self.store.count(lf))
                    self.store.remove_folder(lf)
                    result.folders.append(res)
                elif sf is not None and names is not None:
                    # Named, but a folder that holds no messages (a parent only): "0 folders" said nothing.
                    result.failed.append((name, "it holds no messages (\\Noselect): name the folders below it"))
                continue
            try:
                res = self._sync_folder_reconnecting(sf, lf, reconnects)
            except ServerRefused as e:
                # One folder the server will not open must not keep the others from being synced.
                now = self.store.folder(name)
                if isinstance(e, FolderRefused) and e.gone:
                    # Deleted or renamed by someone else since the LIST: as if LIST had not shown it.
                    if now is not None:
                        count = self.store.count(now)
                        self.store.remove_folder(now)
                        if lf is not None:
                            result.folders.append(FolderResult(name, deleted=True, removed=count))
                    continue
                if lf is None and now is not None and self.store.count(now) == 0:
                    self.store.remove_folder(now)  # created by this attempt, nothing in it yet
                self.log(f"{name}: not synced: {e}")
                result.failed.append((name, str(e)))
                continue
            if res.unchanged and lf is not None:
                unchanged.append(lf)
            result.folders.append(res)
        self.store.touch_folders(unchanged, time.time())
        result.elapsed = time.monotonic() - started
        return result

    def _sync_folder_reconnecting(self, sf: ServerFolder, lf: Folder | None, reconnects: list[int]) -> FolderResult:
        """:meth:`sync_folder`; a connection the server ends meanwhile is opened again (``reconnects[0]``
        more times in this sync), and the folder, if the LIST on the new one still shows it, synced again.
        What was committed before the loss stays: that sync goes on from there, and the folder's result
        counts both (what the first attempt committed is new too). A stop asked for meanwhile (SIGTERM)
        is obeyed before connecting again and once connected, not after another batch of messages."""
        res = FolderResult(sf.name)
        lost = False
        while True:
            try:
                if lost:
                    # (Inside the try: the new connection may break too, before the folder is reached.)
                    self.conn.close()
                    self._check_stop()
                    self._adopt(self.reconnect())
                    self._check_stop()
                    again = self.list_folders([sf.name]).get(sf.name)
                    if again is None or not again.selectable:
                        raise FolderRefused(f"{sf.name}: deleted on the server during the sync", gone=True)
                    sf, lf = again, self.store.folder(sf.name)
                return self.sync_folder(sf, lf, res)
            except ConnectionLost as e:
                if reconnects[0] <= 0 or isinstance(e, ProtocolError):
                    raise  # (a server that sent what cannot be read would send it again)
                reconnects[0] -= 1
                self.log(f"{sf.name}: connection lost ({e}); connecting again")
                lost = True

    # -- steps a.2 and a.3 for one folder -------------------------------------------------------------

    def sync_folder(self, sf: ServerFolder, lf: Folder | None = None, res: FolderResult | None = None) -> FolderResult:
        """Bring one folder up to date. ``sf`` comes from :meth:`list_folders` (step a.1). ``res``: the
        result to add to (an attempt before this one, which lost its connection, counted there)."""
        store, conn, opts = self.store, self.conn, self.options
        if res is None:
            res = FolderResult(sf.name)
        if lf is None:
            lf = store.folder(sf.name)
        if lf is None:
            lf = store.add_folder(sf.name, sf.wire, sf.delimiter)
            res.created = True
        elif lf.wire != sf.wire:
            store.update_folder(lf, wire=sf.wire)

        # Step a.2, first question: is the local copy still valid at all? A new UIDVALIDITY means the
        # server renumbered the folder (e.g. deleted and recreated it): every UID we hold is meaningless.
        if sf.uidvalidity is not None and lf.uidvalidity is not None and sf.uidvalidity != lf.uidvalidity:
            self.log(f"{sf.name}: UIDVALIDITY changed ({lf.uidvalidity} -> {sf.uidvalidity}), resyncing")
            res.reset = True
            res.removed += store.reset_folder(lf, sf.uidvalidity)

        # Step a.2, second question: did anything happen since the last sync? Same UIDNEXT (nothing
        # appended), same HIGHESTMODSEQ (no flag change, no expunge) and as many messages as we hold ->
        # nothing to do, not even SELECT. (MESSAGES matters through the proxy: a preference or policy
        # change hides or shows messages without moving UIDNEXT or HIGHESTMODSEQ, DESIGN.md R1.)
        if (
            not opts.full
            and not lf.full_check
            and lf.last_sync is not None
            and sf.highestmodseq is not None
            and lf.highestmodseq == sf.highestmodseq
            and lf.uidvalidity == sf.uidvalidity
            and lf.uidnext == sf.uidnext
            and (sf.messages is None or sf.messages == store.count(lf))
            and not sf.view_changed(lf)
        ):
            res.unchanged = True
            return res

        # Leftovers of an interrupted or failed run (store.py, rule 4): tmp/ files, a flag change renamed but
        # not committed, files the index lost. Before anything is compared, so that a file found missing
        # makes this very pass a full comparison (which fetches it again).
        store.reconcile(lf)
        local_flags = store.flags(lf)
        # QRESYNC lets the server tell us what changed since the modseq we hold; otherwise (first sync,
        # no QRESYNC, or a full check was asked for) we compare everything ourselves.
        incremental = (
            conn.qresync
            and not opts.full
            and not lf.full_check
            and lf.highestmodseq is not None
            and lf.uidvalidity is not None
            and lf.uidvalidity == sf.uidvalidity
        )
        select = b"EXAMINE " + mailbox_arg(sf.wire)
        if incremental:
            assert lf.uidvalidity is not None and lf.highestmodseq is not None
            qr = b"%d %d" % (lf.uidvalidity, lf.highestmodseq)
            if local_flags:
                known = _uid_set(local_flags)
                if len(known) <= _MAX_KNOWN_UIDS:
                    qr += b" " + known
            select += b" (QRESYNC (" + qr + b"))"
        state = SelectState(conn.selected if conn.qresync else None, lambda r: conn.unsolicited.append(r))
        sel_cmd = conn.send(select, handler=state.handle)

        # Pipelined with the EXAMINE: the list of messages to look at (UID, flags, size). Incremental:
        # only UIDs from our UIDNEXT on, and only if STATUS says there are any. Full: all of them.
        listing: dict[int, tuple[tuple[str, ...], int]] = {}

        def on_listing(resp: Untagged) -> bool:
            if resp.name != b"FETCH":
                return False
            items = _fetch_items(resp)
            uid, size = _int(items.get(b"UID")), _int(items.get(b"RFC822.SIZE"))
            if uid is None or size is None:
                return False
            listing[uid] = (_flags(items.get(b"FLAGS")), size)
            return True

        list_cmd: PendingCommand | None = None
        if not incremental:
            list_cmd = conn.send(b"UID FETCH 1:* (UID FLAGS RFC822.SIZE)", handler=on_listing)
        elif sf.uidnext is None or sf.uidnext > lf.uidnext:
            list_cmd = conn.send(b"UID FETCH %d:* (UID FLAGS RFC822.SIZE)" % lf.uidnext, handler=on_listing)

        conn.wait(sel_cmd, check=False)
        state.finish()
        assert sel_cmd.done is not None
        if not sel_cmd.done.ok:
            if list_cmd is not None:
                conn.wait(list_cmd, check=False)
            conn.selected = None  # a failed SELECT/EXAMINE leaves no mailbox selected (RFC 9051 6.3.2)
            done = sel_cmd.done
            raise FolderRefused(f"cannot open folder {sf.name}: EXAMINE failed: {done.status.decode()} {done.text}",
                                gone=self._folder_gone(sf, done.code))
        conn.selected = sf.wire
        if list_cmd is not None:
            conn.wait(list_cmd, check=False)  # "no messages" is not an error
            if list_cmd.done is not None and not list_cmd.done.ok and state.exists:
                raise ServerRefused(f"listing folder {sf.name} failed: {list_cmd.done.text}")

        validity = state.uidvalidity or sf.uidvalidity
        if validity is None:
            raise ProtocolError(f"the server reports no UIDVALIDITY for {sf.name}")
        if lf.uidvalidity is None:
            store.update_folder(lf, uidvalidity=validity)
        elif validity != lf.uidvalidity:
            # Changed between STATUS and EXAMINE: the same as above. A full listing (pipelined when we
            # were not incremental) is still good; an incremental one is relative to the old folder.
            self.log(f"{sf.name}: UIDVALIDITY changed ({lf.uidvalidity} -> {validity}), resyncing")
            res.reset = True
            res.removed += store.reset_folder(lf, validity)
            local_flags = {}
            if incremental:
                sf.uidvalidity = validity
                return self.sync_folder(sf, lf, res)

        if incremental and not state.nomodseq:
            # QRESYNC told us: VANISHED (EARLIER) = expunged since our modseq, FETCH = flags changed.
            gone = [u for u in local_flags if any(u in s for s in state.vanished)]
            changed = {u: f for u, f in state.changed.items() if u in local_flags and u not in gone}
            # A FETCH for a UID we do not hold, below our UIDNEXT, is a message shown to this device again
            # (an operator restored a local deletion, a preference was turned back on: the proxy's view,
            # DESIGN.md R1); above it, one that arrived after STATUS. Either way it is to be fetched.
            unknown = [u for u in state.changed
                       if u not in local_flags and u not in listing and not any(u in s for s in state.vanished)]
            if unknown:
                self._list_messages(unknown, on_listing)
            new = {u: v for u, v in listing.items() if u not in local_flags}
            # A view can also change with no modseq to tell (a preference hiding or showing messages moves
            # only the count): when the count does not add up, ask for the folder's UIDs (no bodies).
            # So can a preference change that hides and shows as many: the proxy's XCPM-VIEW tells.
            if sf.view_changed(lf) or \
                    (state.exists is not None and len(local_flags) - len(gone) + len(new) != state.exists):
                present = self._all_uids()
                gone = [u for u in local_flags if u not in present]
                changed = {u: f for u, f in changed.items() if u in present}
                unknown = [u for u in present if u not in local_flags and u not in listing]
                if unknown:
                    self._list_messages(unknown, on_listing)
                new = {u: v for u, v in listing.items() if u in present and u not in local_flags}
        else:
            if incremental:  # the server cannot do modseqs for this folder after all: compare fully
                store.update_folder(lf, full_check=True)
                return self.sync_folder(sf, lf, res)
            gone = [u for u in local_flags if u not in listing]
            changed = {u: v[0] for u, v in listing.items() if u in local_flags}
            new = {u: v for u, v in listing.items() if u not in local_flags}

        if gone:
            res.removed += store.remove_messages(lf, gone)
        # Whether a file vanished behind our back while this pass ran (store.set_flags then sets it again):
        # the comparison above did not cover it, so the next sync must compare fully.
        lf.full_check = False
        if changed:
            res.flags += store.set_flags(lf, changed)
        lost = lf.full_check

        # Step a.3: fetch the new items.
        retry_from = None
        if new:
            local_now = store.uids(lf)
            todo = sorted((u, size) for u, (_f, size) in new.items() if u not in local_now)
            missing = self._fetch_bodies(lf, todo, res)
            if missing:
                # Not returned by the server (expunged meanwhile, or a transient failure). Those that
                # still exist must be fetched again next time: keep UIDNEXT below them.
                still = self._existing(missing)
                if still:
                    res.retry = len(still)
                    retry_from = min(still)

        # Commit the folder's new state last (store.py, rule 3).
        uidnext = max(state.uidnext or sf.uidnext or 1, max(listing, default=0) + 1, lf.uidnext)
        if retry_from is not None:
            uidnext = min(uidnext, retry_from)
        store.update_folder(
            lf,
            uidnext=uidnext,
            highestmodseq=None if state.nomodseq else (state.highestmodseq or None),
            server_messages=state.exists,
            last_sync=time.time(),
            full_check=lost or bool(retry_from is not None and retry_from < lf.uidnext),
            view_token=sf.view,
        )
        return res

    def _folder_gone(self, sf: ServerFolder, code: bytes | None) -> bool:
        """After a refused EXAMINE: is the folder gone (deleted or renamed since the LIST)? The response
        code says so (RFC 5530 NONEXISTENT); without it, a LIST of the name settles it."""
        if code is not None and code.split(b" ", 1)[0].upper() == b"NONEXISTENT":
            return True
        listed: list[frozenset[bytes]] = []

        def on_list(resp: Untagged) -> bool:
            if resp.name != b"LIST":
                return False
            toks = resp.tokens
            if len(toks) < 3 or not isinstance(toks[0], list) or _mailbox_token(toks[2]) != sf.wire:
                return False
            listed.append(frozenset(t.lower() for t in toks[0] if isinstance(t, Atom)))
            return True

        cmd = self.conn.run(b'LIST "" ' + mailbox_arg(sf.wire), handler=on_list, check=False)
        if cmd.done is None or not cmd.done.ok:
            return False
        # (Not \Noselect: a proxy may list a folder it cannot open that way, and the server still has it.)
        return not listed or any(b"\\nonexistent" in a for a in listed)

    def _list_messages(self, uids: Iterable[int], handler: Callable[[Untagged], bool]) -> None:
        """UID, flags and size of ``uids`` (what a body fetch needs to be planned), into ``handler``: in
        commands of at most ``_LIST_BATCH`` UIDs, pipelined (a scattered set -- every other message of a
        folder whose IMDNs came back -- would otherwise make a line longer than servers take)."""
        cmds = [self.conn.send(b"UID FETCH " + piece + b" (UID FLAGS RFC822.SIZE)", handler=handler)
                for piece in _uid_pieces(uids)]
        for cmd in cmds:
            self.conn.wait(cmd, check=False)

    def _all_uids(self) -> set[int]:
        """Every UID of the selected folder, as this device sees it: ``UID SEARCH ALL`` (ESEARCH, RFC 4731,
        where offered: ranges instead of one number per message)."""
        if self.conn.has("ESEARCH"):
            cmd = self.conn.run(b"UID SEARCH RETURN (ALL) ALL", collect=(b"ESEARCH",))
            out: set[int] = set()
            for resp in cmd.collected:
                words = resp.data.split()
                for i, word in enumerate(words[:-1]):
                    if word.upper() == b"ALL":
                        out.update(UidSet.parse(words[i + 1]))
            return out
        return _search_uids(self.conn.run(b"UID SEARCH ALL", collect=(b"SEARCH",)))

    def _existing(self, uids: Iterable[int]) -> list[int]:
        """Which of ``uids`` the server still has (all of them if it cannot say). In commands of at most
        ``_LIST_BATCH`` UIDs, pipelined, as ``_list``'s: many scattered messages gone mid-sync are one line
        longer than servers take."""
        ordered = sorted(uids)
        cmds = [self.conn.send(b"UID SEARCH UID " + piece, collect=(b"SEARCH",)) for piece in _uid_pieces(ordered)]
        found: set[int] = set()
        for cmd in cmds:
            self.conn.wait(cmd, check=False)
            if cmd.done is None or not cmd.done.ok:
                found = set(ordered)  # (kept for the next sync to fetch again: nothing lost)
            else:
                found |= _search_uids(cmd)
        return sorted(found)

    def _fetch_bodies(self, lf: Folder, todo: list[tuple[int, int]], res: FolderResult) -> list[int]:
        """Fetch ``todo`` [(uid, size)] in batches, ``window`` commands in flight. Each message file is
        written as its response arrives; each completed command commits what has been written, and counts
        it in ``res`` (also when a later batch fails). Returns the UIDs the server did not return."""
        opts, store, conn = self.options, self.store, self.conn
        batches: deque[list[int]] = deque()
        batch: list[int] = []
        batch_bytes = 0
        for uid, size in todo:
            if batch and (len(batch) >= opts.batch_messages or batch_bytes + size > opts.batch_bytes):
                batches.append(batch)
                batch, batch_bytes = [], 0
            batch.append(uid)
            batch_bytes += size
        if batch:
            batches.append(batch)

        written: list[MessageRecord] = []
        wanted = {uid for uid, _ in todo}
        received: set[int] = set()
        total_bytes = sum(size for _, size in todo)
        bar = self.progress(lf.name, len(todo), total_bytes)

        def on_body(resp: Untagged) -> bool:
            if resp.name != b"FETCH":
                return False
            items = _fetch_items(resp)
            body = items.get(b"BODY[]")
            uid = _int(items.get(b"UID"))
            if uid is None or uid not in wanted or not _is_string(body):
                return False  # e.g. an unsolicited flag update: not ours
            if uid in received:
                return True
            rec = store.write_message(lf, uid, body, _flags(items.get(b"FLAGS")), _internaldate(items.get(b"INTERNALDATE")))
            written.append(rec)
            received.add(uid)
            bar.update(1, rec.size)
            return True

        inflight: deque[PendingCommand] = deque()
        stop = False
        try:
            while batches or inflight:
                while batches and len(inflight) < max(opts.window, 1) and not stop:
                    uids = batches.popleft()
                    inflight.append(
                        conn.send(b"UID FETCH " + _uid_set(uids) + b" (UID FLAGS INTERNALDATE BODY.PEEK[])", handler=on_body)
                    )
                if not inflight:
                    break
                cmd = inflight.popleft()
                conn.wait(cmd, check=False)
                # Whatever order the server finishes in, commit everything written so far.
                if written:
                    res.new += store.commit_messages(lf, written)
                    res.bytes += sum(r.size for r in written)
                    written.clear()
                if not stop and self.should_stop():
                    stop = True
                    batches.clear()
        except BaseException:
            store.discard_written(lf, written)  # not committed: no tmp/ files left behind
            raise
        finally:
            bar.close()
        if stop:
            raise Interrupted("interrupted; the next sync resumes where this one stopped")
        return sorted(wanted - received)

    # -- local changes to the server (5.5.2.20.1 NOTE; DESIGN.md R5, R6) -------------------------------

    def _open_rw(self, name: str) -> tuple[Folder | None, bytes, SelectState]:
        name = canonical_name(name)
        lf = self.store.folder(name)
        wire = lf.wire if lf is not None else encode_mailbox(name)
        state = SelectState()
        cmd = self.conn.run(b"SELECT " + mailbox_arg(wire), handler=state.handle, check=False)
        assert cmd.done is not None
        if not cmd.done.ok:
            raise NoSuchFolder(f"cannot open folder {name} on the server: {cmd.done.text}")
        self.conn.selected = wire
        if lf is not None and lf.uidvalidity is not None and state.uidvalidity not in (None, lf.uidvalidity):
            # The UIDs the user has (from the local copy) name other messages now: acting on them would
            # delete or flag the wrong ones, on the server too.
            raise StaleFolder(f"folder {name} was recreated on the server (UIDVALIDITY {lf.uidvalidity} -> "
                              f"{state.uidvalidity}): its UIDs changed; run sync first, nothing was changed")
        return lf, wire, state

    def _present(self, uids: UidSet) -> set[int]:
        cmd = self.conn.run(b"UID SEARCH UID " + uids.format(), collect=(b"SEARCH",))
        return _search_uids(cmd)

    def set_flags(self, name: str, uids: UidSet, flags: Sequence[bytes], add: bool) -> tuple[int, list[int]]:
        """``UID STORE uids +FLAGS/-FLAGS (flags)``; the local copy follows the server's answer.
        Returns (messages updated, requested UIDs that do not exist)."""
        lf, _wire, state = self._open_rw(name)
        present = self._present(uids)
        missing = _expand_missing(uids, present)
        if not present:
            return 0, missing
        op = b"+FLAGS" if add else b"-FLAGS"
        cmds = [self.conn.send(b"UID STORE " + piece + b" " + op + b" (" + b" ".join(flags) + b")", collect=(b"FETCH",))
                for piece in _uid_pieces(present)]
        for cmd in cmds:
            self.conn.wait(cmd)
        updates: dict[int, tuple[str, ...]] = {}
        for resp in (r for cmd in cmds for r in cmd.collected):
            items = _fetch_items(resp)
            uid = _int(items.get(b"UID"))
            if uid is not None and b"FLAGS" in items:
                updates[uid] = _flags(items[b"FLAGS"])
        if lf is not None and updates:
            self.store.set_flags(lf, updates)
        if lf is not None:
            if any(f.lower() in _SESSION_MARKS for flags_ in updates.values() for f in flags_):
                # A \Deleted not expunged: through the proxy, on a device that deletes locally (or with
                # $LocalDelete), a mark of this session only, which changes nothing on the server and so
                # no MODSEQ a later sync would look at. That sync compares every flag instead.
                self.store.update_folder(lf, full_check=True)
            self._adopt_own_changes(lf, state)
        return len(present), missing

    def _adopt_own_changes(self, lf: Folder, state: SelectState, expunged: set[int] = frozenset(),
                           expunge_modseq: int | None = None) -> None:
        """After our own STORE or EXPUNGE the server's HIGHESTMODSEQ moved on, and ``status`` would call the
        folder changed although the local copy already has the change. If everything that changed since the
        modseq the local copy reflects is what the local index now holds (no expunge but of ``expunged``, our
        own, no message it lacks or holds with other flags -- someone else's change in between), the local
        copy is at the newest MODSEQ of those changes (or the one our EXPUNGE's answer named). Otherwise it
        stays as it was and the next sync catches up as usual."""
        hms = lf.highestmodseq
        if not self.conn.qresync or hms is None or state.uidvalidity != lf.uidvalidity or state.nomodseq:
            return
        changes: dict[int, tuple[tuple[str, ...], int | None]] = {}
        vanished: list[UidSet] = []

        def on_fetch(resp: Untagged) -> bool:
            if resp.name == b"VANISHED":
                toks = resp.tokens
                vanished.append(UidSet.parse(toks[-1]) if toks and isinstance(toks[-1], Atom) else UidSet([]))
                return True
            if resp.name != b"FETCH":
                return False
            items = _fetch_items(resp)
            uid = _int(items.get(b"UID"))
            if uid is None or b"MODSEQ" not in items:
                return False
            changes[uid] = (_flags(items.get(b"FLAGS")), _int(items.get(b"MODSEQ")))
            return True

        cmd = self.conn.run(b"UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE %d VANISHED)" % hms, handler=on_fetch,
                            check=False)
        if cmd.done is None or not cmd.done.ok or not all(_within(v, expunged) for v in vanished):
            return
        if expunged and expunge_modseq is None:
            return  # (the modseq of an expunge is in no FETCH: without the answer's, nothing to adopt)
        if not changes and not expunged:
            return
        local = self.store.flags(lf)
        for uid, (flags, modseq) in changes.items():
            mine = local.get(uid)
            if modseq is None or mine is None or sorted(f.lower() for f in mine) != sorted(f.lower() for f in flags):
                return
        newest = max([m for _f, m in changes.values() if m is not None] + [expunge_modseq or 0])
        if newest > hms:
            self.store.update_folder(lf, highestmodseq=newest)

    def delete(self, name: str, uids: UidSet, local: bool = False) -> tuple[int, list[int], bool]:
        """Delete messages on the server (``\\Deleted`` + ``UID EXPUNGE``), or, with ``local``, only from
        this device: ``\\Deleted $LocalDelete`` + ``UID EXPUNGE``, which the proxy (capability
        XCPM-LOCALDELETE) keeps from reaching the server. Either way they leave the local store.
        Returns (messages deleted, requested UIDs that do not exist, whether the deletion was local: asked
        for, or made so by the proxy for a device whose policy has every delete local)."""
        if local and not self.conn.has(LOCAL_DELETE_CAPABILITY):
            raise Unsupported(
                f"the server does not offer local deletion to this device (no {LOCAL_DELETE_CAPABILITY} "
                "capability); without --local the messages would be deleted on the server for every device"
            )
        if not self.conn.has("UIDPLUS"):
            # Plain EXPUNGE would also remove other messages someone marked \Deleted: not our call.
            raise Unsupported("the server lacks UIDPLUS (UID EXPUNGE), so messages cannot be deleted selectively")
        lf, _wire, state = self._open_rw(name)
        present = self._present(uids)
        missing = _expand_missing(uids, present)
        if not present:
            return 0, missing, local
        pieces = _uid_pieces(present)
        if local:
            flags = b"(\\Deleted " + LOCAL_DELETE_KEYWORD + b")"
            store_cmds = [self.conn.send(b"UID STORE " + piece + b" +FLAGS.SILENT " + flags) for piece in pieces]
        else:
            # Not SILENT: the flags in the answer tell whether the proxy turned the delete into a local one
            # (a device whose policy says delete_mode = "local" sees $LocalDelete appear): then the server
            # keeps the messages, and saying "deleted on the server" would be wrong.
            store_cmds = [self.conn.send(b"UID STORE " + piece + b" +FLAGS (\\Deleted)", collect=(b"FETCH",))
                          for piece in pieces]
        expunge_cmds = [self.conn.send(b"UID EXPUNGE " + piece) for piece in pieces]
        for cmd in store_cmds + expunge_cmds:
            self.conn.wait(cmd)
        expunge_cmd = expunge_cmds[-1]
        if not local:
            keyword = LOCAL_DELETE_KEYWORD.decode().lower()
            for resp in (r for cmd in store_cmds for r in cmd.collected):
                items = _fetch_items(resp)
                if _int(items.get(b"UID")) in present and keyword in (f.lower() for f in _flags(items.get(b"FLAGS"))):
                    local = True
        left: set[int] = set()
        for cmd in [self.conn.send(b"UID SEARCH UID " + piece, collect=(b"SEARCH",)) for piece in pieces]:
            left |= _search_uids(self.conn.wait(cmd))
        if left:
            kept = _uid_set(left).decode()
            raise ServerRefused(f"the server kept UIDs {kept if len(kept) < 200 else kept[:200] + '...'} in {name} "
                                "after EXPUNGE")
        if lf is not None:
            self.store.remove_messages(lf, present)
            # (A local delete's too: the proxy's record of it moved the modseq on, and its answer names it.)
            self._adopt_own_changes(lf, state, expunged=present, expunge_modseq=_highestmodseq(expunge_cmd))
        return len(present), missing, local


def _highestmodseq(cmd) -> int | None:
    """The ``[HIGHESTMODSEQ n]`` of a command's tagged OK (an EXPUNGE's, with QRESYNC enabled, RFC 7162)."""
    code = cmd.done.code if cmd.done is not None and cmd.done.ok else None
    name, _, arg = (code or b"").partition(b" ")
    return int(arg) if name.upper() == b"HIGHESTMODSEQ" and arg.isdigit() else None


def _uid_pieces(uids: Iterable[int]) -> list[bytes]:
    """``uids`` as UID sets of at most ``_LIST_BATCH`` UIDs each, for commands pipelined one per piece: the
    messages of a range that still exist, every other one gone, are one line past what servers take (64 KB
    by default, the proxy's max_line too: ~6,000 such UIDs)."""
    ordered = sorted(uids)
    return [_uid_set(ordered[i:i + _LIST_BATCH]) for i in range(0, len(ordered), _LIST_BATCH)]


def _within(uids: UidSet, allowed: set[int]) -> bool:
    """Is every UID of ``uids`` in ``allowed``?"""
    return all(hi - lo < len(allowed) and all(u in allowed for u in range(lo, hi + 1)) for lo, hi in uids.ranges)


def canonical_name(name: str) -> str:
    """INBOX is case-insensitive (RFC 9051 5.1), and so is the prefix of the names below it, as the
    server (Dovecot) and the proxy fold it ("inbox/Sub" is "INBOX/Sub"); every other name is exact."""
    if name[:5].upper() == "INBOX" and name[5:6] in ("", "/"):
        return "INBOX" + name[5:]
    return name


def _expand_missing(requested: UidSet, present: set[int], limit: int = 100_000) -> list[int]:
    """Requested UIDs that are not present (only for explicit, reasonably small sets)."""
    out: list[int] = []
    for lo, hi in requested.ranges:
        if hi - lo > limit:
            return out
        out.extend(u for u in range(lo, hi + 1) if u not in present)
    return out


def parse_uid_set(args: Sequence[str]) -> UidSet:
    """Command-line UIDs (``7``, ``3:5``, ``1,4``) -> a UidSet. ``*`` is refused on purpose: an
    accidental "every message" must not be one keystroke away in a delete command."""
    ranges: list[tuple[int, int]] = []
    for arg in args:
        if "*" in arg:
            raise ValueError("'*' is not accepted here; give explicit UIDs")
        try:
            parsed = UidSet.parse(arg).ranges
        except ValueError:
            raise ValueError(f"not a UID or UID range: {arg!r}") from None
        if any(hi > _MAX_UID or lo > _MAX_UID for lo, hi in parsed):
            raise ValueError(f"UID out of range (1 to {_MAX_UID}): {arg!r}")
        ranges.extend(parsed)
    if not ranges:
        raise ValueError("no UIDs given")
    return UidSet(ranges)
