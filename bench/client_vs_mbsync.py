#!/usr/bin/env python3
"""The reference client (``cpm-sync``) against Debian's ``mbsync`` (isync 1.4): same data, same run.

Both clients talk to the same private Dovecot directly over plaintext loopback (no proxy, no TLS), each
into its own fresh local store, so the comparison is client against client. Scenarios:

* ``initial`` -- first sync of one folder holding N CPM objects (chat, IMDN, file transfer, SMS, MMS,
  e-mail; mostly small, some tens to hundreds of KB), into an empty store. Target: cpm-sync/mbsync <= 1.5.
* ``resync``  -- sync again with nothing changed, across F folders that were already synced. Target <= 1.0.

Each measurement runs the client as a process, exactly as a user would (process start-up included), and
takes the median of several rounds; the two clients alternate so that neither always runs on a warmer
cache. Both fsync what they write (mbsync's default ``FSync yes``; cpm-sync's default).

mbsync configuration (isync 1.4 spelling): ``SSLType None``, ``AuthMechs LOGIN``, a ``MaildirStore``
with ``SubFolders Verbatim``, ``Sync Pull``, ``Create Near``, ``SyncState *``. mbsync waits for the
clock to tick past a Maildir directory's mtime before it trusts it, so its directories are back-dated
(untimed) before each re-sync, as tests/test_mbsync.py does.

Usage: ``python bench/client_vs_mbsync.py [--quick] [--rounds N] [--json out.json]``; exit status 1 when a
full run misses a target (``--quick`` is a smoke run: small sizes, targets not judged).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpmproxy.testing.dovecot import Dovecot  # noqa: E402
from cpmproxy.testing.sample import make_object  # noqa: E402

MBSYNC = shutil.which("mbsync")
# The console script users run (pip install puts it next to the interpreter), else the module.
_SCRIPT = shutil.which("cpm-sync", path=os.path.dirname(sys.executable))
CPM_SYNC = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "cpmproxy.client"]
TARGETS = {"initial": 1.5, "resync": 1.0}
USERS = {"big": "bigpw", "many": "manypw"}
BIG_FOLDER = "Default/tel:+15551234567"


@dataclass(frozen=True)
class Sizes:
    initial_messages: int
    resync_folders: int
    messages_per_folder: int
    rounds: int


FULL = Sizes(initial_messages=5000, resync_folders=200, messages_per_folder=10, rounds=5)
QUICK = Sizes(initial_messages=500, resync_folders=20, messages_per_folder=5, rounds=3)


@dataclass
class Row:
    scenario: str
    description: str
    cpm_sync: float
    mbsync: float
    target: float

    @property
    def ratio(self) -> float:
        return self.cpm_sync / self.mbsync if self.mbsync else float("inf")

    @property
    def passed(self) -> bool:
        return self.ratio <= self.target


# -- data --------------------------------------------------------------------------------------------

_KINDS = ("chat", "chat", "chat", "imdn", "imdn", "sms", "mms", "file-transfer", "other", "chat")


def corpus(count: int, seed: int) -> list[bytes]:
    """``count`` CPM objects: 80% as built (0.5-3 KB), 15% padded to 4-20 KB, 5% to 50-200 KB."""
    rnd = random.Random(seed)
    out = []
    for i in range(count):
        kind = _KINDS[i % len(_KINDS)]
        r = rnd.random()
        size = None if r < 0.80 else rnd.randint(4_000, 20_000) if r < 0.95 else rnd.randint(50_000, 200_000)
        out.append(make_object(kind, seed=seed * 100_003 + i, size=size,
                               direction=rnd.choice(("sent", "received"))))
    return out


class Seeder:
    """Fast server-side seeding: MULTIAPPEND with LITERAL+ on a raw socket (test set-up, not timed)."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.tag = 0
        self.command(f"LOGIN {user} {password}".encode())

    def command(self, line: bytes) -> None:
        self.tag += 1
        tag = b"s%d" % self.tag
        self.sock.sendall(tag + b" " + line + b"\r\n")
        while True:
            resp = self.file.readline()
            if not resp:
                raise RuntimeError("Dovecot closed the connection during seeding")
            if resp.startswith(tag + b" "):
                if not resp.startswith(tag + b" OK"):
                    raise RuntimeError(f"seeding failed: {resp!r}")
                return

    def append(self, folder: str, messages: list[bytes], batch: int = 500) -> None:
        self.command(b'CREATE "' + folder.encode() + b'"')
        for i in range(0, len(messages), batch):
            parts = [b'APPEND "' + folder.encode() + b'"']
            for j, msg in enumerate(messages[i:i + batch]):
                flags = b"(\\Seen)" if (i + j) % 3 else b"()"
                parts.append(b" " + flags + b" {%d+}\r\n" % len(msg) + msg)
            self.command(b"".join(parts))

    def close(self) -> None:
        try:
            self.command(b"LOGOUT")
        except Exception:
            pass
        self.sock.close()


# -- the two clients ---------------------------------------------------------------------------------


class CpmSync:
    name = "cpm-sync"

    def __init__(self, workdir: Path, port: int, user: str, password: str) -> None:
        self.workdir = workdir
        self.store = workdir / "store"
        self.port = port
        self.user = user
        self.pwfile = workdir / "password"
        workdir.mkdir(parents=True, exist_ok=True)
        self.pwfile.write_text(password + "\n")
        # Compiled bytecode as an installed client has it (an environment with PYTHONDONTWRITEBYTECODE
        # would otherwise recompile every module on every run), cached outside the source tree.
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONPYCACHEPREFIX=str(workdir / "pycache"))
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env.pop("CPM_SYNC_TRACE", None)
        subprocess.run([*CPM_SYNC, "--version"], env=self.env, check=True, capture_output=True)

    def reset(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)

    def prepare(self) -> None:
        pass

    def run(self) -> float:
        cmd = [*CPM_SYNC, "--server", f"127.0.0.1:{self.port}", "--user", self.user,
               "--password-file", str(self.pwfile), "--device-id", "bench", "--store", str(self.store),
               "--tls", "none", "--quiet", "sync"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=1800)
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"cpm-sync failed ({res.returncode}): {res.stderr.strip()}")
        return elapsed

    def count(self) -> int:
        return sum(1 for _ in self.store.glob("maildir/**/cur/*"))


class Mbsync:
    name = "mbsync"

    def __init__(self, workdir: Path, port: int, user: str, password: str) -> None:
        self.workdir = workdir
        self.maildir = workdir / "Maildir"
        self.config = workdir / "mbsyncrc"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""\
IMAPAccount bench
Host 127.0.0.1
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN
Timeout 120

IMAPStore bench-far
Account bench

MaildirStore bench-near
Path {self.maildir}/
Inbox {self.maildir}/INBOX
SubFolders Verbatim

Channel bench
Far :bench-far:
Near :bench-near:
Patterns *
Sync Pull
Create Near
SyncState *
""")

    def reset(self) -> None:
        shutil.rmtree(self.maildir, ignore_errors=True)
        self.maildir.mkdir(parents=True)

    def prepare(self) -> None:
        # mbsync sleeps until the clock passes the mtime of Maildir directories changed in the current
        # second (so it cannot miss a change); back-date them, untimed, as tests/test_mbsync.py does.
        past = time.time() - 10
        for d in [self.maildir, *self.maildir.rglob("*")]:
            if d.is_dir():
                os.utime(d, (past, past))

    def run(self) -> float:
        assert MBSYNC is not None
        env = dict(os.environ, HOME=str(self.workdir))
        t0 = time.perf_counter()
        res = subprocess.run([MBSYNC, "-q", "-c", str(self.config), "bench"], capture_output=True, text=True,
                             env=env, cwd=self.workdir, timeout=1800)
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"mbsync failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return elapsed

    def count(self) -> int:
        return sum(1 for p in self.maildir.rglob("*") if p.is_file() and p.parent.name in ("cur", "new"))


# -- scenarios ---------------------------------------------------------------------------------------


def measure(clients: list, rounds: int, fresh: bool) -> dict[str, list[float]]:
    """``rounds`` timed runs per client, alternating which goes first."""
    times: dict[str, list[float]] = {c.name: [] for c in clients}
    for r in range(rounds):
        order = clients if r % 2 == 0 else list(reversed(clients))
        for c in order:
            if fresh:
                c.reset()
            c.prepare()
            times[c.name].append(c.run())
    return times


def scenario_initial(dovecot: Dovecot, work: Path, sizes: Sizes) -> tuple[Row, dict]:
    clients = [CpmSync(work / "initial-cpm", dovecot.port, "big", USERS["big"]),
               Mbsync(work / "initial-mbsync", dovecot.port, "big", USERS["big"])]
    times = measure(clients, sizes.rounds, fresh=True)
    counts = {c.name: c.count() for c in clients}
    for name, n in counts.items():
        if n != sizes.initial_messages:
            raise RuntimeError(f"{name} stored {n} messages, expected {sizes.initial_messages}")
    row = Row("initial", f"first sync, {sizes.initial_messages} messages in one folder",
              statistics.median(times["cpm-sync"]), statistics.median(times["mbsync"]), TARGETS["initial"])
    return row, {"times": times, "stored": counts}


def scenario_resync(dovecot: Dovecot, work: Path, sizes: Sizes) -> tuple[Row, dict]:
    clients = [CpmSync(work / "resync-cpm", dovecot.port, "many", USERS["many"]),
               Mbsync(work / "resync-mbsync", dovecot.port, "many", USERS["many"])]
    for c in clients:  # the initial sync, untimed
        c.reset()
        c.run()
    times = measure(clients, sizes.rounds, fresh=False)
    expected = sizes.resync_folders * sizes.messages_per_folder
    counts = {c.name: c.count() for c in clients}
    for name, n in counts.items():
        if n != expected:
            raise RuntimeError(f"{name} stored {n} messages, expected {expected}")
    row = Row("resync", f"re-sync, no changes, {sizes.resync_folders} folders ({expected} messages)",
              statistics.median(times["cpm-sync"]), statistics.median(times["mbsync"]), TARGETS["resync"])
    return row, {"times": times, "stored": counts}


def table(rows: list[Row], judged: bool) -> str:
    lines = ["| scenario | what | cpm-sync | mbsync | ratio | target | |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        verdict = ("ok" if r.passed else "MISSED") if judged else "(targets: full run)"
        lines.append(f"| {r.scenario} | {r.description} | {r.cpm_sync:.2f} s | {r.mbsync:.2f} s | "
                     f"{r.ratio:.2f} | <= {r.target:.1f} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="cpm-sync against mbsync, same Dovecot, same data, same run.")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run of a few seconds)")
    p.add_argument("--rounds", type=int, help="timed rounds per client and scenario (median is reported)")
    p.add_argument("--json", metavar="PATH", help="also write raw numbers as JSON")
    args = p.parse_args(argv)
    if MBSYNC is None:
        print("mbsync (Debian package isync) is not installed", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(sizes.initial_messages, sizes.resync_folders, sizes.messages_per_folder, args.rounds)

    work = Path(tempfile.mkdtemp(prefix="cpm-bench-client-"))
    dovecot = Dovecot(work / "dovecot", users=USERS)
    try:
        dovecot.start()
        t0 = time.perf_counter()
        seeder = Seeder(dovecot.port, "big", USERS["big"])
        seeder.append(BIG_FOLDER, corpus(sizes.initial_messages, seed=1))
        seeder.close()
        seeder = Seeder(dovecot.port, "many", USERS["many"])
        seeder.command(b'CREATE "Default"')
        for f in range(sizes.resync_folders):
            seeder.append(f"Default/tel:+1555{f:07d}", corpus(sizes.messages_per_folder, seed=1000 + f))
        seeder.close()
        seeded = time.perf_counter() - t0
        print(f"seeded in {seeded:.1f} s; measuring ({sizes.rounds} rounds each)...", file=sys.stderr)

        results = []
        raw = {}
        for fn in (scenario_initial, scenario_resync):
            row, details = fn(dovecot, work / "clients", sizes)
            results.append(row)
            raw[row.scenario] = details
        print(f"\n### cpm-sync vs mbsync ({'quick' if args.quick else 'full'} run, median of {sizes.rounds})\n")
        # The targets are about the full sizes: at --quick sizes a no-change re-sync is dominated by
        # process start-up (an interpreter against a C binary), which says little about the client.
        print(table(results, judged=not args.quick))
        print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{subprocess.run([MBSYNC, '--version'], capture_output=True, text=True).stdout.strip()}, "
              "Dovecot on loopback, plaintext, both clients fsync.")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"sizes": asdict(sizes), "rows": [asdict(r) | {"ratio": r.ratio} for r in results], "raw": raw},
                indent=2))
        return 0 if args.quick or all(r.passed for r in results) else 1
    finally:
        dovecot.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
