"""Two versions of the proxy in one run: is a change faster, or was the machine?

    python bench/ab.py [--base REV] [--rounds N] [--messages N] [--quick]

The view_none round of ``cpm_bench.py`` (a fresh session, then SELECT + FETCH 1:* (FLAGS) of a mailbox of
20,000 messages, nothing hidden) through two proxy processes in front of one Dovecot: one runs git
revision ``--base`` (default HEAD, checked out in a temporary worktree), the other the working tree.
Rounds alternate direct, base, work (the order rotating), and each side's ratio to direct is reported with
its per-round quartiles and the proxy's CPU per round (``/proc/PID/schedstat``, the timed commands only).

Why: on a small shared VM one run's ratio moves by several percent between runs of the same code (view_none
read 1.03-1.08 on one afternoon), more than most changes move it. Side by side, both versions see the same
machine: a change of 0.3 ms CPU per round shows, where two separate runs could not tell it from noise.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpm_bench import LIMITS, login, seed, settle  # noqa: E402

from cpmproxy.testing.dovecot import Dovecot  # noqa: E402
from cpmproxy.testing.proxyproc import ProxyProcess  # noqa: E402


def checkout(rev: str, where: Path) -> Path:
    """A worktree of ``rev``, with this tree's compiled C helper when its source is the same (else that
    version runs its pure-Python scan, and the report says so)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), rev], check=True)
    ours = ROOT / "cpmproxy" / "imap"
    if filecmp.cmp(ours / "_scan.c", where / "cpmproxy" / "imap" / "_scan.c", shallow=False):
        for built in ours.glob("_scan*.so"):
            shutil.copy2(built, where / "cpmproxy" / "imap")
    else:
        print(f"ab: {rev}'s _scan.c differs from this tree's: it runs without the C helper", file=sys.stderr)
    return where


def cpu_seconds(proxy: ProxyProcess | None) -> float:
    if proxy is None:
        return 0.0
    return int((Path("/proc") / str(proxy.proc.pid) / "schedstat").read_text().split()[0]) / 1e9


def one_round(port: int, proxy: ProxyProcess | None) -> tuple[float, float]:
    c = login(port, "alice", "bench")
    cpu0, t0 = cpu_seconds(proxy), time.perf_counter()
    c.command(b"s", b'SELECT "View"')
    c.command(b"f", b"FETCH 1:* (FLAGS)")
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proxy) - cpu0
    c.close()
    return elapsed, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="HEAD", help="git revision to compare the working tree with")
    ap.add_argument("--rounds", type=int, default=161)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="2,000 messages, 5 rounds (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.messages = 5, 2000
    tmp = Path(tempfile.mkdtemp(prefix="cpmab"))
    dovecot = Dovecot(tmp / "dovecot", users={"alice": "alicepw"})
    dovecot.start()
    proxies: dict[str, ProxyProcess] = {}
    try:
        base_tree = checkout(args.base, tmp / "base")
        for name, tree in (("base", base_tree), ("work", ROOT)):
            proxies[name] = ProxyProcess(tmp / name, dovecot.port, config_extra=LIMITS, source=tree).start()
        seed(dovecot.port, "alice", "View", args.messages, imdn_every=4)
        settle(dovecot.port, "alice", "View")
        sides = {"direct": (dovecot.port, None)} | {n: (p.port, p) for n, p in proxies.items()}
        for port, proxy in sides.values():
            one_round(port, proxy)  # (warm-up: Dovecot's caches, each proxy's first session)
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpus: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        for _ in range(args.rounds):
            order = order[1:] + order[:1]  # (each side follows each other side alike)
            for name in order:
                elapsed, cpu = one_round(*sides[name])
                times[name].append(elapsed)
                cpus[name].append(cpu)
        direct = statistics.median(times["direct"])
        print(f"base = {args.base}, work = the working tree; {args.rounds} rounds of SELECT + FETCH 1:* (FLAGS), "
              f"{args.messages} messages; direct {direct * 1e3:.2f} ms")
        for name in proxies:
            per_round = [p / d for p, d in zip(times[name], times["direct"], strict=True)]
            q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
            print(f"{name}: ratio {statistics.median(times[name]) / direct:.3f} (per-round quartiles "
                  f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}), proxy CPU {statistics.mean(cpus[name]) * 1e3:.2f} ms per round")
    finally:
        for p in proxies.values():
            p.stop()
        dovecot.close()
        if (tmp / "base").exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "base")], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # (the base worktree is removed afterwards)
    sys.exit(main())
