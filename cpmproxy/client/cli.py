"""``cpm-sync``: the reference CPM Message Storage Client on the command line (DESIGN.md section 4).

::

    cpm-sync --server HOST:PORT --user U --password-file F --device-id D --store DIR
             [--tls none|starttls|implicit] [--ca-file F] COMMAND

    sync [--full] [FOLDER...]        explicit sync, whole account or the named folders (5.5.2.20.2 a)
    watch [--interval S] [FOLDER...] stay connected, sync on server notifications (5.5.2.20.2 b)
    status [--verbose] [--offline]   per folder: server vs local counts, last sync (--verbose: CPM kinds)
    list FOLDER                      the local copy of a folder: UID, kind, flags, size, file
    delete [--local] FOLDER UID...   delete on the server (and locally); --local: only on this device
    flag FOLDER UID... (+|-)FLAG     add/remove a flag (\\Seen, \\Flagged, $Keyword, or seen/read/flagged...)

Exit status: 0 success; 1 other failure; 2 usage; 3 cannot connect / TLS / login refused for now
([UNAVAILABLE], [INUSE], [LIMIT]: try again later); 4 login refused (credentials); 5 the server
refused the operation (or lacks what it needs); 6 local store problem; 70 internal error; 130 interrupted. On failure one
line on stderr says why (``--debug`` adds the traceback of unexpected errors).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from cpmproxy.client.connection import CLIENT_VERSION, TLS_MODES, ServerSettings, connect
from cpmproxy.client.errors import ClientError, Interrupted, ServerRefused, StoreError
from cpmproxy.client.progress import progress_factory
from cpmproxy.client.store import LocalStore
from cpmproxy.client.sync import (
    ServerFolder,
    Syncer,
    SyncOptions,
    canonical_name,
    normalize_flag,
    parse_uid_set,
)
from cpmproxy.client.watch import Stopper, Watcher, WatchOptions

PROG = "cpm-sync"


class UsageError(ClientError):
    exit_status = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other failure (argparse would print the whole usage first).
        self.exit(2, f"{PROG}: usage error: {message} (see {PROG} --help)\n")


def _seconds(value: str) -> float:
    """A positive, finite number of seconds (argparse type): 0, negative, nan and inf are usage errors."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {value!r}")
    return number


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The connection options, accepted before the command (the documented form) and after it."""

    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("connection and store")
    g.add_argument("--server", metavar="HOST:PORT", default=d(None), help="IMAP server or cpmproxy address")
    g.add_argument("--user", default=d(None))
    g.add_argument("--password-file", metavar="F", default=d(None), help="file whose first line is the password ('-': stdin)")
    g.add_argument("--device-id", metavar="D", default=d(None), help="this device's identity (ID x-cpm-device-id)")
    g.add_argument("--store", metavar="DIR", default=d(None), help="local store directory (Maildir tree + index.sqlite)")
    g.add_argument("--tls", choices=TLS_MODES, default=d("starttls"),
                   help="starttls (default), implicit (TLS port), or none (plaintext: loopback testing only)")
    g.add_argument("--ca-file", metavar="F", default=d(None), help="CA certificate(s) to trust instead of the system's")
    g.add_argument("--timeout", type=_seconds, metavar="S", default=d(60.0), help="network timeout in seconds (60)")
    g.add_argument("--no-fsync", action="store_true", default=d(False),
                   help="do not fsync message files and the index (faster, not power-loss safe)")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="no progress bars, no summaries")
    g.add_argument("--debug", action="store_true", default=d(False), help="tracebacks for unexpected errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Reference OMA CPM Message Storage Client: syncs a CPM message store into a local "
        "Maildir tree with a SQLite index.",
        epilog="Exit status: 0 ok, 1 failure, 2 usage, 3 connection/TLS/server unavailable, 4 login, "
        "5 refused by the server, 6 local store, 70 internal error (a bug: --debug shows where), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {CLIENT_VERSION}")
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("sync", parents=[common], help="sync the account or the named folders")
    p.add_argument("--full", action="store_true", help="compare every message, not just what changed")
    p.add_argument("folders", nargs="*", metavar="FOLDER")

    p = sub.add_parser("watch", parents=[common], help="stay connected and sync on notifications")
    p.add_argument("--interval", type=_seconds, metavar="S", help="full check period (300 s with NOTIFY, 60 s without)")
    p.add_argument("--idle-folder", default="INBOX", metavar="F", help="folder to IDLE on without NOTIFY")
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="watch only these folders (default: all)")

    p = sub.add_parser("status", parents=[common], help="server vs local, per folder")
    p.add_argument("-v", "--verbose", action="store_true", help="also the CPM object kinds of each folder")
    p.add_argument("--offline", action="store_true", help="local index only, no connection")

    p = sub.add_parser("list", parents=[common], help="the local copy of a folder (no connection)")
    p.add_argument("folder", metavar="FOLDER")

    p = sub.add_parser("delete", parents=[common], help="delete messages (on the server, or --local)")
    p.add_argument("--local", action="store_true", help="local deletion: this device only (XCPM-LOCALDELETE)")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("uids", nargs="+", metavar="UID")

    p = sub.add_parser("flag", parents=[common], help="add (+FLAG) or remove (-FLAG) a flag")
    p.add_argument("folder", metavar="FOLDER")
    # REMAINDER: "-\Seen" must not be mistaken for an option.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="UID... (+|-)FLAG")
    return parser


# -- helpers -----------------------------------------------------------------------------------------


def parse_server(value: str, tls: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` (port 143, or 993 with implicit TLS)."""
    default = 993 if tls == "implicit" else 143
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host:
        raise UsageError(f"--server {value!r}: no host")
    try:
        number = int(port) if port else default
        if not 0 < number < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(f"--server {value!r}: bad port") from None
    return host, number


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def read_password(path: str) -> str:
    try:
        if path == "-":
            text = sys.stdin.readline()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.readline()
    except OSError as e:
        raise UsageError(f"cannot read password file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:  # (the user's file to fix, not a bug of ours: not an "internal error")
        raise UsageError(f"password file {path} is not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password:
        raise UsageError(f"password file {path} is empty")
    return password


MAX_DEVICE_ID = 128  # characters, as the proxy takes them


def _settings(args: argparse.Namespace, store: LocalStore) -> ServerSettings:
    device_id = args.device_id or store.get_meta("device_id")  # may be omitted once the store knows it
    missing = [opt for opt, value in (("--server", args.server), ("--user", args.user),
                                      ("--password-file", args.password_file), ("--device-id", device_id))
               if not value]
    if missing:
        raise UsageError(f"{args.command} needs {', '.join(missing)}")
    if len(device_id) > MAX_DEVICE_ID or any(ord(c) < 32 or ord(c) == 127 for c in device_id):
        # (What the proxy takes: an id it refuses would leave the session its default device's.)
        raise UsageError(f"--device-id: at most {MAX_DEVICE_ID} characters, no control characters")
    host, port = parse_server(args.server, args.tls)
    if args.tls == "none" and not _is_loopback(host):
        print(f"{PROG}: warning: --tls none sends the password in clear text to {host}", file=sys.stderr)
    return ServerSettings(
        host=host,
        port=port,
        user=args.user,
        password=read_password(args.password_file),
        device_id=device_id,
        tls=args.tls,
        ca_file=args.ca_file,
        timeout=args.timeout,
    )


def _open_store(args: argparse.Namespace) -> LocalStore:
    if not args.store:
        raise UsageError(f"{args.command} needs --store")
    if (args.command == "list" or (args.command == "status" and args.offline)) and \
            not os.path.exists(os.path.join(args.store, "index.sqlite")):
        # Read-only commands: a mistyped --store must not leave an empty store behind.
        raise StoreError(f"there is no store in {args.store} (run sync first)")
    return LocalStore(args.store, fsync=not args.no_fsync)


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"  # pragma: no cover


def _table(rows: list[list[str]], out: TextIO, right: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.write("  ".join(cells).rstrip() + "\n")


# -- commands ----------------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace, store: LocalStore, out: TextIO) -> int:
    settings = _settings(args, store)
    stopper = Stopper().install()
    try:
        with store.locked(should_stop=lambda: stopper.stopped):  # (a busy store does not delay SIGTERM)
            def reconnect():
                return connect(settings, wake_fd=stopper.fd)  # (a silent server does not delay SIGTERM)

            syncer = None
            conn = reconnect()
            try:
                store.bind(settings.address, settings.user, settings.device_id)
                syncer = Syncer(
                    conn,
                    store,
                    SyncOptions(full=args.full),
                    progress_factory(False if args.quiet else None),
                    should_stop=lambda: stopper.stopped,
                    reconnect=reconnect,
                )
                result = syncer.sync(args.folders or None)
            except BaseException:
                # Not LOGOUT: it would read the rest of a body FETCH still in flight, and its handler write
                # each message into the store the sync just gave up on (a full disk filled again).
                (syncer.conn if syncer is not None else conn).close()
                raise
            syncer.conn.logout()
    finally:
        stopper.close()
    if not args.quiet:
        for f in result.folders:
            if f.changed or f.retry:
                out.write(f.summary() + "\n")
        out.write(result.summary() + "\n")
    failure = result.failure()
    if failure is not None:  # the other folders were synced; say which were not
        raise ServerRefused(failure)
    return 0


def cmd_watch(args: argparse.Namespace, store: LocalStore, out: TextIO) -> int:
    settings = _settings(args, store)
    store.bind(settings.address, settings.user, settings.device_id)

    def log(msg: str) -> None:
        if not args.quiet:
            out.write(f"{dt.datetime.now().strftime('%H:%M:%S')} {msg}\n")
            out.flush()

    stopper = Stopper().install()
    try:
        watcher = Watcher(
            settings,
            store,
            SyncOptions(),
            WatchOptions(folders=tuple(canonical_name(f) for f in args.folders), interval=args.interval,
                         idle_folder=args.idle_folder),
            stopper,
            progress_factory(False if args.quiet else None),
            log,
        )
        watcher.run()
    finally:
        stopper.close()
    log("stopped")
    return 0


def cmd_status(args: argparse.Namespace, store: LocalStore, out: TextIO) -> int:
    server: dict[str, ServerFolder] = {}
    if not args.offline:
        settings = _settings(args, store)
        # (Before connecting: another account's counts beside this store's would be nonsense.)
        store.check_owner(settings.user, settings.device_id)
        conn = connect(settings)
        try:
            # Plain STATUS for the counts: it is what every server (and the proxy's filtered view)
            # reports most carefully; LIST-STATUS is only used where UIDs and modseqs matter.
            server = Syncer(conn, store).list_folders(list_status=False)
        finally:
            conn.logout()
    local = {f.name: f for f in store.folders()}
    counts = store.counts()
    rows = [["FOLDER", "SERVER", "LOCAL", "SIZE", "STATE", "LAST SYNC"] + (["KINDS"] if args.verbose else [])]
    names = sorted(set(local) | {n for n, sf in server.items() if sf.selectable})
    for name in names:
        sf, lf = server.get(name), local.get(name)
        n_local, n_bytes = counts.get(lf.id, (0, 0)) if lf else (0, 0)
        if args.offline:
            state, n_server = "-", "-"
        else:
            n_server = "-" if sf is None or sf.messages is None else str(sf.messages)
            if lf is None:
                state = "not synced"
            elif sf is None or not sf.selectable:
                state = "gone"
            elif (
                (sf.uidvalidity, sf.uidnext) == (lf.uidvalidity, lf.uidnext)
                and (sf.highestmodseq is None or sf.highestmodseq == lf.highestmodseq)
                # (Counted too: a preference or policy change shows or hides messages with no new UID or
                # modseq.)
                and (sf.messages is None or sf.messages == n_local)
                and not lf.full_check  # (a sync has every flag to compare: see Syncer.set_flags)
                and not sf.view_changed(lf)
            ):
                state = "in sync"
            else:
                state = "changed"
        row = [name, n_server, str(n_local) if lf else "-", _size(n_bytes) if lf else "-", state,
               _when(lf.last_sync) if lf else "never"]
        if args.verbose:
            kinds = store.kind_counts(lf) if lf is not None else {}
            row.append(", ".join(f"{k} {n}" for k, n in kinds.items()) or "-")
        rows.append(row)
    _table(rows, out, right={1, 2, 3})
    return 0


def cmd_list(args: argparse.Namespace, store: LocalStore, out: TextIO) -> int:
    lf = store.folder(canonical_name(args.folder))
    if lf is None:
        raise StoreError(f"folder {args.folder} is not in the local store (run sync first)")
    rows = [["UID", "KIND", "FLAGS", "SIZE", "FILE"]]
    for rec in store.messages(lf).values():
        path = os.path.relpath(store.message_path(lf, rec), store.root)
        rows.append([str(rec.uid), rec.kind, " ".join(rec.flags) or "-", str(rec.size), path])
    _table(rows, out, right={0, 3})
    return 0


def _with_syncer(args: argparse.Namespace, store: LocalStore, fn) -> object:  # type: ignore[no-untyped-def]
    settings = _settings(args, store)
    with store.locked():
        conn = connect(settings)
        try:
            store.bind(settings.address, settings.user, settings.device_id)
            return fn(Syncer(conn, store))
        finally:
            conn.logout()


def cmd_delete(args: argparse.Namespace, store: LocalStore, out: TextIO) -> int:
    try:
        uids = parse_uid_set(args.uids)
    except ValueError as e:
        raise UsageError(str(e)) from None
    done, missing, local = _with_syncer(  # type: ignore[misc]
        args, store, lambda s: s.delete(args.folder, uids, local=args.local)
    )
    if not args.quiet and (done or not missing):  # (nothing deleted, and why: the error alone says it)
        if local and not args.local:
            where = "on this device only (the server's policy for this device keeps them on the server)"
        else:
            where = "on this device only" if local else "on the server"
        out.write(f"{args.folder}: {done} message(s) deleted {where}\n")
    if missing:
        raise ClientError(f"no such message in {args.folder}: UID {', '.join(map(str, missing[:20]))}")
    return 0


def cmd_flag(args: argparse.Namespace, store: LocalStore, out: TextIO) -> int:
    rest = list(args.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if len(rest) < 2 or rest[-1][:1] not in "+-" or len(rest[-1]) < 2:
        raise UsageError("flag needs FOLDER UID... followed by +FLAG or -FLAG")
    op, flag = rest[-1][0], rest[-1][1:]
    try:
        uids = parse_uid_set(rest[:-1])
        imap_flag = normalize_flag(flag)
    except ValueError as e:
        raise UsageError(str(e)) from None
    done, missing = _with_syncer(  # type: ignore[misc]
        args, store, lambda s: s.set_flags(args.folder, uids, [imap_flag], add=op == "+")
    )
    if not args.quiet and (done or not missing):  # (none found: the error alone says it)
        out.write(f"{args.folder}: {op}{imap_flag.decode()} on {done} message(s)\n")
    if missing:
        raise ClientError(f"no such message in {args.folder}: UID {', '.join(map(str, missing[:20]))}")
    return 0


COMMANDS = {
    "sync": cmd_sync,
    "watch": cmd_watch,
    "status": cmd_status,
    "list": cmd_list,
    "delete": cmd_delete,
    "flag": cmd_flag,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        store = _open_store(args)
        try:
            return COMMANDS[args.command](args, store, sys.stdout)
        finally:
            store.close()
    except ClientError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"{PROG}: {Interrupted('interrupted; the next sync resumes where this one stopped')}", file=sys.stderr)
        return Interrupted.exit_status
    except BrokenPipeError:
        return 1
    except Exception as e:  # never a traceback for users; one line saying what broke
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{PROG}: internal error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 70


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
