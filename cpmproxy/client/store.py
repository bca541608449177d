"""The client's local store: one Maildir per folder plus a SQLite index.

Layout under the store directory ``DIR``::

    DIR/index.sqlite                      folders (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, last sync) and
                                          messages (UID -> file name, flags, CPM kind, size)
    DIR/maildir/<folder path>/{cur,new,tmp}
    DIR/.lock                             one writer at a time (flock)

Folder paths follow the server's hierarchy: ``Default/tel:+15551234567`` (delimiter ``/``) is
``maildir/Default/tel:+15551234567/cur``. Each name component is escaped only where a file system or the
Maildir layout would misread it (see :func:`folder_relpath`); the index records the mapping, so a reader
never has to re-derive it.

Message files are named ``U<uid>.V<uidvalidity>.cpm-sync:2,<flags>`` (standard Maildir info; the letters
D F P R S T for \\Draft \\Flagged $Forwarded \\Answered \\Seen \\Deleted; keywords live in the index). The
name is deterministic for (folder, UIDVALIDITY, UID), which is what makes crash recovery simple.

Crash safety, the rules every writer here follows:

1. A message file is written completely to ``tmp/``; a batch of them is made durable (``syncfs``, or
   ``fsync`` per file; unless disabled) and renamed into ``cur/``: a reader never sees a partial file.
2. Only then is the batch recorded in the index, in one transaction (after an fsync of ``cur/``).
3. The folder's UIDNEXT/HIGHESTMODSEQ advance only after all of the folder's messages are committed, so an
   interrupted sync re-discovers exactly the messages it had not committed.
4. :meth:`LocalStore.reconcile` (run at the start of every sync that opens the folder) removes what an
   interruption can leave behind: ``tmp/`` leftovers and files in ``cur/`` that the index does not know (they are
   fetched again: their UIDs are at or above the folder's recorded UIDNEXT). Files that are not ours are
   never touched. Index entries whose file vanished are dropped and the folder is marked for a full check,
   which fetches them again.
5. Removals commit the index first and unlink files after: a crash in between leaves unindexed files,
   which rule 4 removes.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import time
from collections import namedtuple
from collections.abc import Callable, Iterable, Mapping

from cpmproxy.client.errors import Interrupted, StoreBusy, StoreError
from cpmproxy.client.kinds import classify

__all__ = [
    "Folder",
    "LocalStore",
    "MessageRecord",
    "ReconcileResult",
    "folder_relpath",
    "maildir_info",
    "message_basename",
]

SCHEMA_VERSION = 2  # 2: folders.view_token

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS folders (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,   -- human name (modified UTF-7 decoded)
    wire            BLOB NOT NULL,          -- the name exactly as the server spells it
    delimiter       TEXT,                   -- hierarchy delimiter (NULL: flat)
    path            TEXT NOT NULL UNIQUE,   -- Maildir directory, relative to DIR/maildir
    uidvalidity     INTEGER,
    uidnext         INTEGER NOT NULL DEFAULT 1,  -- everything below is committed locally
    highestmodseq   INTEGER,                -- CONDSTORE state the local copy reflects (NULL: unknown)
    server_messages INTEGER,                -- MESSAGES at the last sync
    last_sync       REAL,                   -- unix time of the last complete sync
    full_check      INTEGER NOT NULL DEFAULT 0, -- 1: next sync compares every UID and flag
    view_token      INTEGER                 -- the proxy's XCPM-VIEW at the last sync (NULL: none)
);
CREATE TABLE IF NOT EXISTS messages (
    folder_id   INTEGER NOT NULL REFERENCES folders(id) ON DELETE CASCADE,
    uid         INTEGER NOT NULL,
    filename    TEXT NOT NULL,              -- in <folder path>/cur
    flags       TEXT NOT NULL,              -- IMAP flags and keywords, space-separated
    kind        TEXT NOT NULL,              -- CPM object kind (cpmproxy.client.kinds)
    size        INTEGER NOT NULL,
    internaldate REAL,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;
"""

# Standard Maildir info letters (they must appear in ASCII order).
_FLAG_LETTERS = {
    "\\draft": "D",
    "\\flagged": "F",
    "$forwarded": "P",
    "\\answered": "R",
    "\\seen": "S",
    "\\deleted": "T",
}
_OUR_FILE_RE = re.compile(r"U([0-9]+)\.V([0-9]+)\.cpm-sync(?::2,[A-Za-z]*)?")
_RESERVED_COMPONENTS = frozenset(("cur", "new", "tmp"))
_MAX_COMPONENT_BYTES = 200


MessageRecord = namedtuple("MessageRecord", "uid filename flags kind size internaldate", defaults=(None,))
MessageRecord.__doc__ = """A message as the index knows it: UID, file name in ``cur/``, flags (tuple of str), CPM kind, size,
INTERNALDATE (unix time)."""


class Folder:
    """A folder as the index knows it."""

    __slots__ = ("id", "name", "wire", "delimiter", "path", "uidvalidity", "uidnext", "highestmodseq",
                 "server_messages", "last_sync", "full_check", "view_token")

    def __init__(self, id: int, name: str, wire: bytes, delimiter: str | None, path: str,  # noqa: A002
                 uidvalidity: int | None = None, uidnext: int = 1, highestmodseq: int | None = None,
                 server_messages: int | None = None, last_sync: float | None = None,
                 full_check: bool = False, view_token: int | None = None) -> None:
        self.id, self.name, self.wire, self.delimiter, self.path = id, name, wire, delimiter, path
        self.uidvalidity, self.uidnext, self.highestmodseq = uidvalidity, uidnext, highestmodseq
        self.server_messages, self.last_sync, self.full_check = server_messages, last_sync, full_check
        self.view_token = view_token  # (what the proxy says of this device's view of the folder: see sync)

    def __repr__(self) -> str:
        return (f"Folder({self.name!r}, uidvalidity={self.uidvalidity}, uidnext={self.uidnext}, "
                f"highestmodseq={self.highestmodseq}, full_check={self.full_check})")


class ReconcileResult:
    __slots__ = ("tmp_removed", "stray_removed", "renamed", "missing")

    def __init__(self) -> None:
        self.tmp_removed = self.stray_removed = self.renamed = self.missing = 0

    def __bool__(self) -> bool:
        return bool(self.tmp_removed or self.stray_removed or self.renamed or self.missing)


def maildir_info(flags: Iterable[str]) -> str:
    """``(\\Seen, \\Flagged, $Label)`` -> ``":2,FS"``."""
    letters = sorted({_FLAG_LETTERS[f.lower()] for f in flags if f.lower() in _FLAG_LETTERS})
    return ":2," + "".join(letters)


def message_basename(uid: int, uidvalidity: int) -> str:
    return f"U{uid}.V{uidvalidity}.cpm-sync"


def _escape_component(component: str, delimiter: str | None) -> str:
    """One folder-name component as one directory name.

    Kept readable (``tel:+15551234567`` stays as it is: ``:`` is an ordinary character in POSIX names),
    with ``%XX`` escapes only where needed: ``%`` itself, control characters, ``/`` (possible when the
    server's delimiter is something else), a leading ``.`` (hidden files, ``.`` and ``..``), and the names
    ``cur``/``new``/``tmp`` that Maildir reserves inside every folder directory (a folder ``Default/tmp``
    would otherwise land in ``Default``'s own tmp/). Over-long components are shortened with a hash.
    """
    out = re.sub(r"[%/\x00-\x1f\x7f]", lambda m: f"%{ord(m.group()):02X}", component)
    if not out:
        return "%"  # an empty component ("a//b"); "%" alone is never produced by escaping
    if out.startswith("."):
        out = "%2E" + out[1:]
    if out in _RESERVED_COMPONENTS:
        out = f"%{ord(out[0]):02X}{out[1:]}"
    raw = out.encode("utf-8", "surrogateescape")
    if len(raw) > _MAX_COMPONENT_BYTES:
        import hashlib

        digest = hashlib.sha256(raw).hexdigest()[:16]
        out = raw[: _MAX_COMPONENT_BYTES - 20].decode("utf-8", "ignore") + "%~" + digest
    return out


def folder_relpath(name: str, delimiter: str | None) -> str:
    """The Maildir directory of folder ``name`` relative to ``DIR/maildir``."""
    parts = name.split(delimiter) if delimiter else [name]
    return "/".join(_escape_component(p, delimiter) for p in parts)


class LocalStore:
    """Maildir tree + SQLite index. Not thread-safe; one process writes at a time (:meth:`locked`)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = os.fspath(root)
        self.maildir = os.path.join(self.root, "maildir")
        self.fsync = fsync
        try:
            os.makedirs(self.maildir, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            # check_same_thread=False: a store may be handed to a worker thread (one user at a time).
            self.db = sqlite3.connect(
                os.path.join(self.root, "index.sqlite"), isolation_level=None, timeout=30.0,
                check_same_thread=False,
            )
            self.db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is durable when it returns (the files it refers to were fsynced before).
            self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", str(SCHEMA_VERSION))
            elif int(version) > SCHEMA_VERSION:
                raise StoreError(f"{self.root} was written by a newer cpm-sync (schema {version})")
            elif int(version) < 2:
                with self._txn() as db:  # (1 -> 2: one column more, NULL: "no token seen yet")
                    columns = {row[1] for row in db.execute("PRAGMA table_info(folders)")}
                    if "view_token" not in columns:  # (another cpm-sync may have just done it)
                        db.execute("ALTER TABLE folders ADD COLUMN view_token INTEGER")
                    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the index in {self.root}: {e}") from None
        except OSError as e:
            raise StoreError(f"cannot use store directory {self.root}: {e.strerror or e}") from None
        self._lock_fd: int | None = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions, metadata, identity -------------------------------------------------------------

    def _txn(self, durable: bool = True) -> _Transaction:
        """``with self._txn() as db:`` -- one transaction; ``durable=False`` skips the commit's fsync
        (WAL keeps it consistent; it may be lost to a power cut, which is fine for bookkeeping)."""
        return _Transaction(self.db, durable or not self.fsync)

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._txn() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def bind(self, server: str, user: str, device_id: str) -> None:
        """Tie the store to one account and device, refusing to mix another one's data into it.

        The server address may change (a new host name, the proxy instead of the server): UIDVALIDITY
        tells whether folders are still the same, and the sync resets those that are not.
        """
        self.check_owner(user, device_id)
        with self._txn() as db:
            for key, value in (("user", user), ("device_id", device_id), ("server", server)):
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def check_owner(self, user: str, device_id: str) -> None:
        """Refuse (:class:`StoreError`) a store tied to another account or device; write nothing (a read-only
        command must not tie a store that no sync has used yet)."""
        for key, value in (("user", user), ("device_id", device_id)):
            known = self.get_meta(key)
            if known is not None and known != value:
                label = "user" if key == "user" else "device id"
                raise StoreError(
                    f"store {self.root} belongs to {label} {known!r}, not {value!r}; use another --store"
                )

    def locked(self, timeout: float = 60.0, should_stop: Callable[[], bool] | None = None) -> _StoreLock:
        """``with store.locked():`` -- exclusive use of the store (another cpm-sync on the same store waits
        up to ``timeout`` seconds, then fails; sooner, :class:`Interrupted`, once ``should_stop()``).
        Re-entrant."""
        return _StoreLock(self, timeout, should_stop)

    # -- folders ------------------------------------------------------------------------------------

    _FOLDER_COLS = (
        "id, name, wire, delimiter, path, uidvalidity, uidnext, highestmodseq, server_messages, "
        "last_sync, full_check, view_token"
    )

    @staticmethod
    def _folder(row: tuple) -> Folder:
        return Folder(
            id=row[0], name=row[1], wire=bytes(row[2]), delimiter=row[3], path=row[4], uidvalidity=row[5],
            uidnext=row[6], highestmodseq=row[7], server_messages=row[8], last_sync=row[9],
            full_check=bool(row[10]), view_token=row[11],
        )

    def folders(self) -> list[Folder]:
        rows = self.db.execute(f"SELECT {self._FOLDER_COLS} FROM folders ORDER BY name").fetchall()
        return [self._folder(r) for r in rows]

    def folder(self, name: str) -> Folder | None:
        row = self.db.execute(f"SELECT {self._FOLDER_COLS} FROM folders WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._folder(row)

    def add_folder(self, name: str, wire: bytes, delimiter: str | None) -> Folder:
        path = folder_relpath(name, delimiter)
        taken = self.db.execute("SELECT name FROM folders WHERE path = ?", (path,)).fetchone()
        if taken is not None:  # only possible through the hash shortening of huge names
            import hashlib

            path = f"{path}%~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
        with self._txn() as db:
            cur = db.execute(
                "INSERT INTO folders(name, wire, delimiter, path) VALUES (?, ?, ?, ?)",
                (name, wire, delimiter, path),
            )
            folder_id = int(cur.lastrowid or 0)
        folder = Folder(folder_id, name, wire, delimiter, path)
        self._make_dirs(folder)
        return folder

    def _make_dirs(self, folder: Folder) -> None:
        base = self.folder_dir(folder)
        try:
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(base, sub), mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create {base}: {e.strerror or e}") from None

    def folder_dir(self, folder: Folder) -> str:
        return os.path.join(self.maildir, folder.path)

    def update_folder(self, folder: Folder, **changes: object) -> None:
        """Persist folder state (``uidvalidity``, ``uidnext``, ``highestmodseq``, ``server_messages``,
        ``last_sync``, ``full_check``, ``wire``, ``view_token``) in one transaction."""
        allowed = {"uidvalidity", "uidnext", "highestmodseq", "server_messages", "last_sync", "full_check", "wire",
                   "view_token"}
        bad = set(changes) - allowed
        if bad:
            raise ValueError(f"not folder state: {sorted(bad)}")
        if not changes:
            return
        cols = ", ".join(f"{k} = ?" for k in changes)
        values = [int(v) if isinstance(v, bool) else v for v in changes.values()]
        with self._txn() as db:
            db.execute(f"UPDATE folders SET {cols} WHERE id = ?", (*values, folder.id))
        for k, v in changes.items():
            setattr(folder, k, v)

    def touch_folders(self, folders: Iterable[Folder], when: float) -> None:
        """Record ``when`` as the last sync time of folders found unchanged (one transaction)."""
        folders = list(folders)
        if not folders:
            return
        with self._txn(durable=False) as db:
            db.executemany("UPDATE folders SET last_sync = ? WHERE id = ?", [(when, f.id) for f in folders])
        for f in folders:
            f.last_sync = when

    def reset_folder(self, folder: Folder, uidvalidity: int) -> int:
        """The server's UIDVALIDITY changed: every local message of the folder is void. Returns how many
        were dropped. Index first, files after (rule 5)."""
        count = self.count(folder)
        with self._txn() as db:
            db.execute("DELETE FROM messages WHERE folder_id = ?", (folder.id,))
            db.execute(
                "UPDATE folders SET uidvalidity = ?, uidnext = 1, highestmodseq = NULL, server_messages = NULL, "
                "full_check = 0, view_token = NULL WHERE id = ?",
                (uidvalidity, folder.id),
            )
        folder.uidvalidity, folder.uidnext, folder.highestmodseq = uidvalidity, 1, None
        folder.server_messages, folder.full_check, folder.view_token = None, False, None
        self._remove_our_files(folder)
        return count

    def remove_folder(self, folder: Folder) -> None:
        """The folder is gone from the server (or from this device's view): drop it locally."""
        with self._txn() as db:
            db.execute("DELETE FROM messages WHERE folder_id = ?", (folder.id,))
            db.execute("DELETE FROM folders WHERE id = ?", (folder.id,))
        import shutil

        base = self.folder_dir(folder)
        for sub in ("cur", "new", "tmp"):
            shutil.rmtree(os.path.join(base, sub), ignore_errors=True)
        # Remove now-empty directories up to maildir/, but never a directory that still holds a child
        # folder (rmdir fails on non-empty directories, which is exactly the test we want).
        path = base
        while path.startswith(self.maildir + os.sep):
            try:
                os.rmdir(path)
            except OSError:
                break
            path = os.path.dirname(path)

    def _remove_our_files(self, folder: Folder) -> None:
        base = self.folder_dir(folder)
        for sub in ("cur", "new", "tmp"):
            for name in _listdir(os.path.join(base, sub)):
                if _OUR_FILE_RE.fullmatch(name):
                    _unlink(os.path.join(base, sub, name))

    # -- messages -----------------------------------------------------------------------------------

    def count(self, folder: Folder) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM messages WHERE folder_id = ?", (folder.id,)).fetchone()
        return int(row[0])

    def counts(self) -> dict[int, tuple[int, int]]:
        """folder id -> (messages, bytes)."""
        rows = self.db.execute("SELECT folder_id, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY folder_id")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def kind_counts(self, folder: Folder) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT kind, COUNT(*) FROM messages WHERE folder_id = ? GROUP BY kind ORDER BY kind", (folder.id,)
        )
        return {r[0]: int(r[1]) for r in rows}

    def messages(self, folder: Folder) -> dict[int, MessageRecord]:
        rows = self.db.execute(
            "SELECT uid, filename, flags, kind, size, internaldate FROM messages WHERE folder_id = ? ORDER BY uid",
            (folder.id,),
        )
        return {r[0]: MessageRecord(r[0], r[1], tuple(r[2].split()), r[3], r[4], r[5]) for r in rows}

    def flags(self, folder: Folder) -> dict[int, tuple[str, ...]]:
        rows = self.db.execute("SELECT uid, flags FROM messages WHERE folder_id = ?", (folder.id,))
        return {r[0]: tuple(r[1].split()) for r in rows}

    def uids(self, folder: Folder) -> set[int]:
        rows = self.db.execute("SELECT uid FROM messages WHERE folder_id = ?", (folder.id,))
        return {r[0] for r in rows}

    def message_path(self, folder: Folder, record: MessageRecord) -> str:
        return os.path.join(self.maildir, folder.path, "cur", record.filename)

    def write_message(
        self,
        folder: Folder,
        uid: int,
        data: bytes,
        flags: Iterable[str],
        internaldate: float | None = None,
    ) -> MessageRecord:
        """Write one message file into ``tmp/`` (rule 1). It moves to ``cur/`` and into the index with
        :meth:`commit_messages`; until then an interruption leaves only a ``tmp/`` leftover."""
        if folder.uidvalidity is None:
            raise ValueError("folder has no UIDVALIDITY yet")
        flags = tuple(flags)
        tmp = os.path.join(self.maildir, folder.path, "tmp", message_basename(uid, folder.uidvalidity))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            if internaldate is not None:
                # Maildir readers (Dovecot included) take a message's arrival time from the file's mtime.
                os.utime(tmp, (internaldate, internaldate))
        except OSError as e:
            # Disk full, quota...: a partial file must not stay behind (nothing else would remove it
            # before the folder's next sync, and many of them fill the disk).
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreError(f"cannot write {tmp}: {e.strerror or e}") from None
        name = message_basename(uid, folder.uidvalidity) + maildir_info(flags)
        return MessageRecord(uid, name, flags, classify(data), len(data), internaldate)

    def commit_messages(self, folder: Folder, records: Iterable[MessageRecord]) -> int:
        """Make written messages durable, move them into ``cur/`` and index them in one transaction
        (rules 1 and 2). One ``syncfs`` per batch instead of one ``fsync`` per file where the OS has it:
        the same guarantee for a fraction of the cost when messages are small."""
        records = list(records)
        if not records:
            return 0
        assert folder.uidvalidity is not None
        base_dir = os.path.join(self.maildir, folder.path)
        tmp_dir, cur_dir = os.path.join(base_dir, "tmp"), os.path.join(base_dir, "cur")
        try:
            if self.fsync:
                _sync_files(tmp_dir, [message_basename(r.uid, folder.uidvalidity) for r in records])
            for r in records:
                os.replace(os.path.join(tmp_dir, message_basename(r.uid, folder.uidvalidity)),
                           os.path.join(cur_dir, r.filename))
        except OSError as e:
            self.discard_written(folder, records)  # what reached cur/ unindexed goes at the next reconcile
            raise StoreError(f"cannot store messages in {cur_dir}: {e.strerror or e}") from None
        if self.fsync:
            _fsync_dir(cur_dir)
        rows = [(folder.id, r.uid, r.filename, " ".join(r.flags), r.kind, r.size, r.internaldate) for r in records]
        with self._txn() as db:
            db.executemany(
                "INSERT OR REPLACE INTO messages(folder_id, uid, filename, flags, kind, size, internaldate) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        return len(rows)

    def discard_written(self, folder: Folder, records: Iterable[MessageRecord]) -> None:
        """Remove the ``tmp/`` files of messages written but not committed (a failed or abandoned batch)."""
        if folder.uidvalidity is None:
            return
        tmp_dir = os.path.join(self.maildir, folder.path, "tmp")
        for r in records:
            try:
                os.unlink(os.path.join(tmp_dir, message_basename(r.uid, folder.uidvalidity)))
            except OSError:
                pass

    def set_flags(self, folder: Folder, changes: Mapping[int, Iterable[str]]) -> int:
        """Apply flag changes from the server: rename files whose Maildir info changes, then update the
        index in one transaction. Returns how many messages actually changed."""
        known = self.messages(folder)
        cur = os.path.join(self.folder_dir(folder), "cur")
        updates: list[tuple[str, str, int, int]] = []
        lost: list[int] = []
        for uid, new_flags in changes.items():
            rec = known.get(uid)
            if rec is None:
                continue
            new_flags = tuple(new_flags)
            if sorted(f.lower() for f in new_flags) == sorted(f.lower() for f in rec.flags):
                continue
            name = rec.filename
            if folder.uidvalidity is not None:
                new_name = message_basename(uid, folder.uidvalidity) + maildir_info(new_flags)
                if new_name != name:
                    try:
                        os.rename(os.path.join(cur, name), os.path.join(cur, new_name))
                        name = new_name
                    except FileNotFoundError:
                        lost.append(uid)
                        continue
                    except OSError as e:
                        raise StoreError(f"cannot rename {os.path.join(cur, name)}: {e.strerror or e}") from None
            updates.append((name, " ".join(new_flags), folder.id, uid))
        if updates or lost:
            if self.fsync and updates:
                _fsync_dir(cur)
            with self._txn() as db:
                db.executemany("UPDATE messages SET filename = ?, flags = ? WHERE folder_id = ? AND uid = ?", updates)
                if lost:  # file gone behind our back: forget it and let a full check fetch it again
                    db.executemany("DELETE FROM messages WHERE folder_id = ? AND uid = ?", [(folder.id, u) for u in lost])
                    db.execute("UPDATE folders SET full_check = 1 WHERE id = ?", (folder.id,))
            if lost:
                folder.full_check = True
        return len(updates)

    def remove_messages(self, folder: Folder, uids: Iterable[int]) -> int:
        """Drop messages (expunged on the server, or deleted by this device). Index first (rule 5)."""
        uids = list(uids)
        if not uids:
            return 0
        known = self.messages(folder)
        victims = [known[u] for u in uids if u in known]
        if not victims:
            return 0
        with self._txn() as db:
            db.executemany("DELETE FROM messages WHERE folder_id = ? AND uid = ?", [(folder.id, r.uid) for r in victims])
        cur = os.path.join(self.folder_dir(folder), "cur")
        for r in victims:
            _unlink(os.path.join(cur, r.filename))
        return len(victims)

    def reconcile(self, folder: Folder) -> ReconcileResult:
        """Make the folder's files and its index agree again after an interruption (rule 4)."""
        result = ReconcileResult()
        base = self.folder_dir(folder)
        self._make_dirs(folder)
        for name in _listdir(os.path.join(base, "tmp")):
            if _OUR_FILE_RE.fullmatch(name):
                _unlink(os.path.join(base, "tmp", name))
                result.tmp_removed += 1
        indexed = {uid: rec.filename for uid, rec in self.messages(folder).items()}
        found: dict[int, list[tuple[str, str]]] = {}
        for sub in ("cur", "new"):
            for name in _listdir(os.path.join(base, sub)):
                m = _OUR_FILE_RE.fullmatch(name)
                if m is None:
                    continue  # not ours: left alone
                uid, validity = int(m.group(1)), int(m.group(2))
                if validity != folder.uidvalidity or uid not in indexed:
                    _unlink(os.path.join(base, sub, name))
                    result.stray_removed += 1
                    continue
                found.setdefault(uid, []).append((sub, name))
        for uid, files in found.items():
            want = ("cur", indexed[uid])
            keep = want if want in files else files[0]
            for f in files:
                if f != keep:
                    _unlink(os.path.join(base, f[0], f[1]))
                    result.stray_removed += 1
            if keep != want:
                # Interrupted between renaming for a flag change and committing it: restore the name the
                # index expects (the flag change itself is re-reported by the next sync).
                os.replace(os.path.join(base, keep[0], keep[1]), os.path.join(base, "cur", indexed[uid]))
                result.renamed += 1
        missing = [uid for uid in indexed if uid not in found]
        if missing:
            with self._txn() as db:
                db.executemany("DELETE FROM messages WHERE folder_id = ? AND uid = ?", [(folder.id, u) for u in missing])
                db.execute("UPDATE folders SET full_check = 1 WHERE id = ?", (folder.id,))
            folder.full_check = True
            result.missing = len(missing)
        return result


# -- small file-system helpers -----------------------------------------------------------------------


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror or e}") from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreError(f"cannot remove {path}: {e.strerror or e}") from None


_SYNCFS: list[Callable[[int], int] | None] = []  # looked up on first use (ctypes costs start-up time)


def _syncfs() -> Callable[[int], int] | None:
    """Linux ``syncfs(2)``: flush one file system (the store's) in one call."""
    if not _SYNCFS:
        try:
            import ctypes

            _SYNCFS.append(ctypes.CDLL(None, use_errno=True).syncfs)
        except (OSError, AttributeError, ImportError):
            _SYNCFS.append(None)
    return _SYNCFS[0]


def _sync_files(directory: str, names: list[str]) -> None:
    """Make the contents of ``directory/names`` durable."""
    syncfs = _syncfs() if len(names) > 1 else None
    if syncfs is not None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for name in names:  # no syncfs (or it failed): one fsync per file
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make renames into ``path`` durable before the index refers to them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error); SQLite errors become StoreError."""

    __slots__ = ("db", "durable")

    def __init__(self, db: sqlite3.Connection, durable: bool) -> None:
        self.db, self.durable = db, durable

    def __enter__(self) -> sqlite3.Connection:
        try:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"index update failed: {e}") from None
        return self.db

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
            if not self.durable:
                self.db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            if exc_type is None:
                raise StoreError(f"index update failed: {e}") from None


class _StoreLock:
    """flock on ``DIR/.lock``, polled until ``timeout``; re-entrant within one LocalStore."""

    __slots__ = ("store", "timeout", "should_stop", "fd")

    def __init__(self, store: LocalStore, timeout: float, should_stop: Callable[[], bool] | None = None) -> None:
        self.store, self.timeout, self.should_stop, self.fd = store, timeout, should_stop, -1

    def __enter__(self) -> None:
        if self.store._lock_fd is not None:
            return  # already held
        fd = os.open(os.path.join(self.store.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if self.should_stop is not None and self.should_stop():
                    os.close(fd)
                    raise Interrupted("interrupted while waiting for the store") from None
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusy(f"store {self.store.root} is in use by another cpm-sync process") from None
                time.sleep(0.1)
        self.fd = self.store._lock_fd = fd

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            self.store._lock_fd = None
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1
