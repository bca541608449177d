"""Server-initiated sync (OMA CPM SD 5.5.2.20.2 b): stay connected, sync a folder when the server says so.

How the server tells us, best first:

* **NOTIFY** (RFC 5465), when offered: one ``NOTIFY SET`` asks for new messages, expunges and flag changes
  in every personal folder (reported as ``* STATUS folder (...)``), for the selected folder in detail
  (``EXISTS``/``VANISHED``/``FETCH``), and for folders created, deleted or renamed (``* LIST``). Dovecot
  2.3 insists that MessageExpunge accompanies MessageNew. The proxy filters these by this device's view
  and policy (DESIGN.md R3), so a notification never points at something hidden. Through the proxy, the
  metadata events are asked for too: a CPM preference another device changes (what this one is shown)
  brings a full sync at once, not at the next periodic check (Dovecot alone refuses them: the next form).
* **IDLE** (RFC 2177) otherwise: it only reports changes of the selected folder (INBOX by default), so a
  periodic check of every folder (one LIST-STATUS round trip) covers the rest.

On a notification the client performs 5.5.2.20.2 b for each named folder: fresh UIDNEXT/UIDVALIDITY
(STATUS), determine what is new, fetch it -- :meth:`Syncer.sync` with those folder names.

The connection is re-established with exponential backoff (1 s doubling to 60 s, with jitter) when it
breaks, and when the login is refused for now (``NO [UNAVAILABLE]``: e.g. the proxy's backend is
restarting); a wrong password, an untrusted certificate or a folder to watch that does not exist is not
retried. A store locked by another cpm-sync (a long manual sync) is waited for. SIGINT/SIGTERM end the loop at the
next safe point: the batch being fetched is committed, the session logged out, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

from cpmproxy.client.connection import (
    Connection,
    ServerSettings,
    Untagged,
    connect,
    decode_mailbox,
    encode_mailbox,
    mailbox_arg,
)
from cpmproxy.client.errors import (
    AuthenticationError,
    ConnectError,
    Interrupted,
    NoSuchFolder,
    ServerRefused,
    StoreBusy,
    TLSError,
)
from cpmproxy.client.progress import ProgressFactory
from cpmproxy.client.store import LocalStore
from cpmproxy.client.sync import SelectState, Syncer, SyncOptions, SyncResult, canonical_name

__all__ = ["NOTIFY_REQUESTS", "Stopper", "WatchOptions", "Watcher"]

# Tried in order: flag changes in non-selected folders too (Dovecot reports them as STATUS HIGHESTMODSEQ),
# then the set every NOTIFY server must accept for this purpose.
NOTIFY_REQUESTS = (
    b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange)) "
    b"(personal (MessageNew MessageExpunge FlagChange MailboxName MailboxMetadataChange ServerMetadataChange))",
    b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange)) "
    b"(personal (MessageNew MessageExpunge FlagChange MailboxName))",
    b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange)) (personal (MessageNew MessageExpunge MailboxName))",
)


_PREFERENCES = b"/private/vendor/vendor.cpmproxy/"  # (the proxy's preference entries, DESIGN.md section 4)


class WatchOptions:
    """``folders``: only these (default: the whole account); ``interval``: a full check every so many
    seconds (default 300 with NOTIFY, 60 with IDLE); ``idle_folder``: what IDLE watches without NOTIFY;
    ``min_backoff``/``max_backoff``: first and longest wait between reconnection attempts (doubling in
    between); ``lock_timeout``: for the store lock."""

    __slots__ = ("folders", "interval", "idle_folder", "min_backoff", "max_backoff", "lock_timeout")

    def __init__(self, folders: tuple[str, ...] = (), interval: float | None = None, idle_folder: str = "INBOX",
                 min_backoff: float = 1.0, max_backoff: float = 60.0, lock_timeout: float = 60.0) -> None:
        self.folders, self.interval, self.idle_folder = tuple(folders), interval, idle_folder
        self.min_backoff, self.max_backoff, self.lock_timeout = min_backoff, max_backoff, lock_timeout


class Stopper:
    """SIGINT/SIGTERM set a flag and wake up whoever waits (self-pipe), instead of raising mid-write."""

    def __init__(self) -> None:
        self.stopped = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._previous: dict[int, object] = {}

    @property
    def fd(self) -> int:
        return self._r

    def install(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Stopper:
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopped and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really means it
        self.stop()

    def stop(self) -> None:
        self.stopped = True
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if stopped meanwhile."""
        if not self.stopped:
            select.select([self._r], [], [], max(seconds, 0))
        return self.stopped

    def close(self) -> None:
        self.uninstall()
        os.close(self._r)
        os.close(self._w)


def _jitter(delay: float) -> float:
    """±20 %: many devices reconnecting after a server restart should not do it in lockstep."""
    import random

    return delay * random.uniform(0.8, 1.2)


class Watcher:
    def __init__(
        self,
        settings: ServerSettings,
        store: LocalStore,
        sync_options: SyncOptions | None = None,
        options: WatchOptions | None = None,
        stopper: Stopper | None = None,
        progress: ProgressFactory | None = None,
        log: Callable[[str], None] | None = None,
        connector: Callable[..., Connection] = connect,  # (settings, wake_fd=fd)
    ) -> None:
        self.settings = settings
        self.store = store
        self.sync_options = sync_options or SyncOptions()
        self.options = options or WatchOptions()
        self.stopper = stopper or Stopper()
        self.progress = progress
        self.log = log or (lambda msg: None)
        self.connector = connector
        self.passes = 0  # completed sync passes (for tests and monitoring)

    def run(self) -> None:
        """Until stopped. Raises only for permanent problems (credentials, TLS trust)."""
        backoff = [self.options.min_backoff]  # doubles per failed attempt; back to the minimum once synced

        def retry(reason: str) -> bool:
            wait = _jitter(backoff[0])
            self.log(f"{reason}; retrying in {wait:.1f} s")
            backoff[0] = min(backoff[0] * 2, self.options.max_backoff)
            return not self.stopper.sleep(wait)

        def ready() -> None:
            backoff[0] = self.options.min_backoff

        while not self.stopper.stopped:
            try:
                # (SIGINT/SIGTERM interrupt a wait for a silent server, here in the greeting and login too)
                conn = self.connector(self.settings, wake_fd=self.stopper.fd)
            except Interrupted:
                break
            except (AuthenticationError, TLSError):
                raise  # permanent: retrying a wrong password only locks the account
            except ConnectError as e:
                if not retry(str(e)):
                    break
                continue
            try:
                self._session(conn, on_ready=ready)
            except Interrupted:
                if conn.busy:
                    # Not LOGOUT: it would read the rest of a body FETCH still in flight, and its handler
                    # write those messages into the store after its lock is let go (as `sync` does).
                    conn.close()
                break
            except NoSuchFolder:
                raise  # a folder to watch that does not exist: reconnecting will not create it
            except (ConnectError, ServerRefused) as e:
                # ConnectionLost (a ConnectError) or the server refusing something mid-session: start over.
                conn.close()
                if not retry(f"connection lost ({e})"):
                    break
            finally:
                conn.logout()

    # -- one connection ------------------------------------------------------------------------------

    def _report(self, result: SyncResult) -> None:
        self.passes += 1
        for f in result.folders:
            if f.changed:
                self.log(f.summary())
        failure = result.failure()  # (each was logged as it happened; the others were synced)
        if failure is not None:
            self.log(failure)

    def _sync(self, syncer: Syncer, names: list[str] | None) -> None:
        """One pass: ``names`` (from notifications) or everything watched (``None``)."""
        scope = list(self.options.folders) or None
        if names is not None and scope is not None:
            names = [n for n in names if n in scope]
            if not names:
                return
        with self._locked():
            try:
                self._report(syncer.sync(names if names is not None else scope))
            except NoSuchFolder as e:
                if names is None and (not self.passes or scope is None
                                      or set(e.missing) >= {canonical_name(f) for f in scope}):
                    raise  # (a folder to watch that never existed, or none left: reconnecting will not help)
                if names is None:
                    # A watched folder deleted on the server since (its local copy went at the last pass):
                    # the watch goes on with the others.
                    self.log(f"no longer watching {', '.join(e.missing)}: deleted on the server")
                    self.options.folders = tuple(f for f in self.options.folders if canonical_name(f) not in e.missing)
                    scope = list(self.options.folders)
                # Named by a notification, gone by the time we asked: a full pass tidies up.
                self._report(syncer.sync(scope))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The store lock, waited for as long as it takes (a long manual ``cpm-sync sync`` holds it): a busy
        store is not a reason to end the daemon. Said once in the log after ``lock_timeout``; a stop request
        ends the wait."""
        waited, told = 0.0, False
        step = min(1.0, self.options.lock_timeout)
        while True:
            lock = self.store.locked(step)
            try:
                lock.__enter__()
                break
            except StoreBusy as e:
                waited += step
                if not told and waited >= self.options.lock_timeout:
                    told = True
                    self.log(f"{e}; waiting for it")
                if self.stopper.stopped:
                    raise Interrupted("interrupted while waiting for the store lock") from None
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    def _session(self, conn: Connection, on_ready: Callable[[], None]) -> None:
        stop = self.stopper
        syncer = Syncer(
            conn, self.store, self.sync_options, self.progress, should_stop=lambda: stop.stopped, log=self.log
        )
        mode = "idle"
        personal_flags = False  # FlagChange accepted for all personal folders?
        if conn.has("NOTIFY"):
            for i, request in enumerate(NOTIFY_REQUESTS):
                cmd = conn.run(request, check=False)
                if cmd.done is not None and cmd.done.ok:
                    mode = "notify"
                    personal_flags = i <= 1
                    break
        if mode == "idle" and not conn.has("IDLE"):
            mode = "poll"
        interval = self.options.interval or (300.0 if mode == "notify" else 60.0)

        # Changes made while we were not connected: a full explicit sync first (5.5.2.20.2 a). NOTIFY is
        # already set, so anything that changes during this pass is queued, not missed.
        self._sync(syncer, None)
        on_ready()
        self.log(f"watching {self.settings.address} ({mode}{'' if mode == 'notify' else f', every {interval:.0f} s'})")
        last_full = time.monotonic()
        while not stop.stopped:
            folders, relist = self._events(conn, conn.take_unsolicited())
            due = time.monotonic() - last_full >= interval
            if relist or due:
                self._sync(syncer, None)
                last_full = time.monotonic()
                continue
            if folders:
                # 5.5.2.20.2 b, per folder named by the notification.
                self._sync(syncer, sorted(folders))
                continue
            timeout = max(interval - (time.monotonic() - last_full), 0.0)
            if mode == "notify":
                if personal_flags and conn.selected is not None:
                    # With nothing selected every change arrives the same way, as "* STATUS folder (...)"
                    # (FlagChange included), which is exactly the per-folder trigger 5.5.2.20.2 b wants;
                    # no need to trust per-message responses for whichever folder the last pass left open.
                    self._deselect(conn)
                    continue
                if conn.readable(timeout, stop.fd):
                    conn.drain()
            elif mode == "idle":
                self._idle(conn, timeout)
            else:
                stop.sleep(timeout)

    @staticmethod
    def _deselect(conn: Connection) -> None:
        # UNSELECT (RFC 3691); CLOSE would do as well here since sync only EXAMINEs (read-only: CLOSE
        # expunges nothing).
        conn.run(b"UNSELECT" if conn.has("UNSELECT") else b"CLOSE", check=False)
        conn.selected = None

    def _idle(self, conn: Connection, timeout: float) -> None:
        wire = self.store.folder(self.options.idle_folder)
        # (Not synced yet: its name in modified UTF-7, as the server knows it.)
        target = wire.wire if wire is not None else encode_mailbox(self.options.idle_folder)
        if conn.selected != target:
            # The EXAMINE's own responses are not news (its handler takes them); anything else stays queued.
            cmd = conn.run(b"EXAMINE " + mailbox_arg(target), handler=SelectState().handle, check=False)
            if cmd.done is None or not cmd.done.ok:
                self.stopper.sleep(timeout)  # nothing to IDLE on: plain polling
                return
            conn.selected = target
        # RFC 2177: re-issue IDLE at least every 29 minutes.
        cmd = conn.idle_start()
        try:
            if conn.readable(min(timeout, 29 * 60), self.stopper.fd):
                conn.drain()
        finally:
            conn.idle_done(cmd)

    @staticmethod
    def _events(conn: Connection, responses: list[Untagged]) -> tuple[set[str], bool]:
        """Turn unsolicited responses into (folders to sync, whether the folder list changed)."""
        folders: set[str] = set()
        relist = False
        for resp in responses:
            if resp.name == b"STATUS":
                toks = resp.tokens
                if toks and isinstance(toks[0], bytes):
                    folders.add(canonical_name(decode_mailbox(bytes(toks[0]))))
            elif resp.name == b"LIST":
                relist = True  # created, deleted or renamed (MailboxName)
            elif resp.name == b"METADATA" and (not resp.data or _PREFERENCES in resp.data.lower()):
                # A CPM preference changed (the entries named, or not said): what this device is shown may
                # have changed anywhere, folders coming into view or leaving it.
                relist = True
            elif resp.name in (b"EXISTS", b"EXPUNGE", b"VANISHED", b"FETCH"):
                # About the mailbox selected when the response arrived (a sync pass may have selected
                # others since): the connection records it with each unsolicited response.
                # (Canonical: the IDLE folder may have been named "inbox", and the watched ones are compared
                # in canonical form.)
                if resp.mailbox is not None:
                    folders.add(canonical_name(decode_mailbox(resp.mailbox)))
        return folders, relist
