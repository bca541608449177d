"""The reference OMA CPM Message Storage Client (DESIGN.md R8): library and ``cpm-sync`` CLI.

Typical use as a library::

    from cpmproxy.client import LocalStore, ServerSettings, Syncer, connect

    settings = ServerSettings("imap.example.com", 143, "alice", password, device_id="phone-1",
                              tls="starttls")
    with LocalStore("/var/lib/cpm/alice") as store, store.locked():
        conn = connect(settings)            # TLS, ID (x-cpm-device-id), LOGIN
        try:
            result = Syncer(conn, store).sync()   # CPM SD 5.5.2.20.2 a, every folder
        finally:
            conn.logout()

Modules: :mod:`~cpmproxy.client.connection` (IMAP session), :mod:`~cpmproxy.client.sync` (the sync
engine, commented step by step against the specification), :mod:`~cpmproxy.client.watch` (notification
driven sync), :mod:`~cpmproxy.client.store` (Maildir + SQLite), :mod:`~cpmproxy.client.kinds` (CPM object
classification), :mod:`~cpmproxy.client.cli`.
"""

from cpmproxy.client.connection import Connection, ServerSettings, connect
from cpmproxy.client.errors import ClientError
from cpmproxy.client.kinds import KINDS, classify
from cpmproxy.client.store import Folder, LocalStore, MessageRecord
from cpmproxy.client.sync import FolderResult, Syncer, SyncOptions, SyncResult
from cpmproxy.client.watch import Stopper, Watcher, WatchOptions

__all__ = [
    "KINDS",
    "ClientError",
    "Connection",
    "Folder",
    "FolderResult",
    "LocalStore",
    "MessageRecord",
    "ServerSettings",
    "Stopper",
    "SyncOptions",
    "SyncResult",
    "Syncer",
    "WatchOptions",
    "Watcher",
    "classify",
    "connect",
]
