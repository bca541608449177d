"""CPM behaviour benchmarks: filtered view, local delete, notification latency. Proxy vs direct Dovecot,
same run, same data; results are ratios.

    python bench/cpm_bench.py [--quick] [--json out.json]

Timed scenarios are medians of 11 rounds (view: 161; 5 with --quick) that alternate direct and proxy,
after one untimed warm-up each; for the view, the spread of the per-round ratios is printed too.
``--think-time MS`` pauses between a view round's login and its timed commands, as a client over a real
network would: on this 2-vCPU VM a Dovecot process asked at once after its login answers faster than one
asked 50 ms later (33.5 vs 36-39 ms here); view_none read 1.01 and 1.07 with 50 ms, 1.06-1.09 without. Scenarios (issue targets in brackets):
  view_none      SELECT + FETCH 1:* (FLAGS), 20,000 messages, nothing hidden           [<= 1.05]
  view_hidden    the same with 25% hidden by policy (IMDNs), warm classification cache  [<= 1.5]
  view_cold      the first SELECT of that mailbox (cold cache)                          [report]
  view_relay     view_none through a cpmproxy with no plugin at all: the relay alone     [report]
  view_tcp       view_none through HAProxy in TCP mode (a C relay, no IMAP), if installed [report]
                 (the two reference rows tell what the CPM plugins add and what any relay costs here)
  localdelete    local delete of 1,000 messages (one STORE + EXPUNGE) vs a real delete  [<= 2.0]
  ld_select      SELECT of a mailbox with 10,000 local deletions vs a plain SELECT     [<= 1.5]
  expunge_burst  NOOP of a device told of 1,000 expunges by another session in a
                 20,000-message view (25% hidden); median of 5 rounds                   [report]
  notify         APPEND on device A -> notification at device B, vs Dovecot's own NOTIFY
                 directly, p50 and p99                                                  [<= 1.5]
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpmproxy.testing.dovecot import Dovecot, free_port  # noqa: E402
from cpmproxy.testing.proxyproc import ProxyProcess  # noqa: E402
from cpmproxy.testing.rawclient import RawIMAP  # noqa: E402
from cpmproxy.testing.sample import make_object  # noqa: E402

LIMITS = "[limits]\nmax_connections_per_ip = 10000\nmax_connections_per_user = 10000\n"


def seed(port: int, user: str, folder: str, count: int, imdn_every: int = 0) -> None:
    """Pipelined APPENDs with LITERAL+ straight to Dovecot (fast)."""
    chat = make_object("chat", text="benchmark message")
    imdn = make_object("imdn")
    c = RawIMAP("127.0.0.1", port, timeout=300)
    c.login(user, f"{user}pw")
    c.command(b"c", b'CREATE "%s"' % folder.encode())
    batch = 500
    for start in range(0, count, batch):
        out = []
        for i in range(start, min(count, start + batch)):
            m = imdn if imdn_every and i % imdn_every == imdn_every - 1 else chat
            out.append(b'a%d APPEND "%s" {%d+}\r\n%s\r\n' % (i, folder.encode(), len(m), m))
        c.send(b"".join(out))
        c.until_tagged(b"a%d" % (min(count, start + batch) - 1))
    c.close()


def settle(port: int, user: str, folder: str) -> None:
    """Let Dovecot settle a freshly filled Maildir before anything is timed: the first SELECT moves the
    messages from new/ to cur/, and while cur/ was changed in the last seconds every SELECT rescans it
    (3,000 messages: 8 ms per SELECT, then 1.7 ms once settled); both sides would pay it, diluting the
    proxy's share."""
    c = login(port, user)
    c.command(b"s", b'SELECT "%s"' % folder.encode())
    c.close()
    time.sleep(3)


def login(port: int, user: str, device: str | None = None) -> RawIMAP:
    c = RawIMAP("127.0.0.1", port, timeout=300)
    if device:
        c.command(b"i", b'ID ("x-cpm-device-id" "%s")' % device.encode())
    assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
    return c


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


THINK_TIME = 0.0  # --think-time: seconds between the login's OK and the timed commands


def select_fetch(port: int, user: str, folder: str, device: str = "bench") -> float:
    c = login(port, user, device)
    if THINK_TIME:
        time.sleep(THINK_TIME)

    def run():
        c.command(b"s", b'SELECT "%s"' % folder.encode())
        c.command(b"f", b"FETCH 1:* (FLAGS)")
    t = timed(run)
    c.close()
    return t


SPREADS: list[str] = []  # per-round ratio quartiles, printed under the table


WARMUP = 20  # untimed rounds before each alternation (--quick: 1)


def alternating(fns: dict, rounds: int, spread_of: tuple[str, ...] = ()) -> dict[str, float]:
    """Median of ``rounds`` timings of each function. ``WARMUP`` untimed rounds first, then rounds that
    call each function once in turn, so that a change in the machine's load hits every side alike.
    For each name in ``spread_of``, the quartiles of its per-round ratio to the first function go to
    SPREADS: how far one run's median can be trusted.

    Why 20 warm-up rounds, not one call: the first scenario after the seeding and the cold classification
    read higher than the same side measured later in the run (2026-11-27, view_none first: 1.05, 1.09,
    1.06; measured again at the end of the same runs: 1.04, 1.05, 1.05)."""
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(fn())
    base = next(iter(samples.values()))
    for name in spread_of:
        q = statistics.quantiles([p / d for p, d in zip(samples[name], base, strict=True)], n=4)
        SPREADS.append(f"{name}: per-round ratio quartiles {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} ({rounds} rounds)")
    return {name: statistics.median(values) for name, values in samples.items()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def wait_line(c: RawIMAP, needle: bytes, timeout: float) -> float | None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        while b"\n" in c.buf:
            line = c.read_line()
            if needle in line:
                return time.perf_counter()
        ready, _, _ = select.select([c.sock], [], [], max(0.0, deadline - time.perf_counter()))
        if ready and not c._fill():
            return None
    return None


def notify_latency(append_port: int, watch_port: int, direct: bool, folder: str, trials: int) -> list[float]:
    """A appends; B waits for the STATUS of that folder (B: proxy IDLE or native NOTIFY)."""
    a = login(append_port, "bob", "bench-a")
    b = login(watch_port, "bob", "bench-b")
    if direct:
        r = b.command(b"n", b"NOTIFY SET STATUS (personal (MessageNew MessageExpunge))")
        assert r[-1].startswith(b"n OK"), r
    else:
        b.command(b"s", b"SELECT INBOX")
        b.send(b"t IDLE\r\n")
        b.read_line()
    msg = make_object("chat", text="ping")
    r = a.command(b"st", b'STATUS "%s" (MESSAGES)' % folder.encode())
    count = int(r[0].rsplit(b"MESSAGES ", 1)[1].split(b")")[0])
    out = []
    for _ in range(trials):
        time.sleep(0.7)  # changes 0.6-0.9 s apart, as in DESIGN.md's measurement of Dovecot
        lines_within_drain(b)
        count += 1
        t0 = time.perf_counter()
        a.send(b'x APPEND "%s" {%d+}\r\n%s\r\n' % (folder.encode(), len(msg), msg))
        # The notification of *this* message: its STATUS carries the new count.
        t1 = wait_line(b, b"MESSAGES %d " % count, 10)
        a.until_tagged(b"x")
        if t1 is not None:
            out.append(t1 - t0)
    a.close()
    b.close()
    return out


def lines_within_drain(c: RawIMAP) -> None:
    """Discard whatever already arrived (late notifications of earlier changes)."""
    while select.select([c.sock], [], [], 0)[0]:
        if not c._fill():
            break
    c.buf = b""


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--only", action="append",
                    choices=("view", "localdelete", "ld_select", "expunge_burst", "notify"),
                    help="run only these scenario groups (repeatable)")
    ap.add_argument("--think-time", type=float, default=0.0, metavar="MS",
                    help="pause between login and the timed SELECT + FETCH of the view scenarios, as a client "
                         "over a real network has (default 0: at once)")
    args = ap.parse_args()
    global THINK_TIME, WARMUP
    THINK_TIME = args.think_time / 1000
    wanted = set(args.only or ("view", "localdelete", "ld_select", "expunge_burst", "notify"))
    n_view = 2000 if args.quick else 20000
    n_ld = 200 if args.quick else 1000
    n_ld_sel = 1000 if args.quick else 10000
    trials = 10 if args.quick else 40
    # (ld_select takes as many rounds: with 11, its ratio moved from 1.22 to 1.61 between runs.)
    # A view sample takes ~40 ms, and on this 2-core VM one round's proxy/direct ratio spreads from
    # ~0.98 to ~1.16 (quartiles): the median of 41 rounds still moved by +-0.03 between runs, too much for
    # a 5% target. 161 rounds (~30 s) bring that to ~+-0.015.
    rounds = 5 if args.quick else 161
    WARMUP = 1 if args.quick else WARMUP
    load_before = loadavg()
    base = Path(tempfile.mkdtemp(prefix="cpmbench"))
    dovecot = Dovecot(base / "dovecot", users={"alice": "alicepw", "bob": "bobpw"})
    dovecot.start()
    procs = []
    results = []
    try:
        plain = ProxyProcess(base / "p1", dovecot.port, config_extra=LIMITS).start()
        hiding = ProxyProcess(base / "p2", dovecot.port,
                              config_extra=LIMITS + "[policy]\nsync = { imdn = false }\n").start()
        forced = ProxyProcess(base / "p3", dovecot.port,
                              config_extra=LIMITS + '[policy]\nnotifications = "forced"\n').start()
        procs += [plain, hiding, forced]

        if "view" in wanted:
            relay = ProxyProcess(base / "p0", dovecot.port, config_extra=LIMITS, plugins=[]).start()
            procs.append(relay)
            tcp = TcpRelay(base / "haproxy", dovecot.port).start() if shutil.which("haproxy") else None
            if tcp is not None:
                procs.append(tcp)
            view_scenarios(dovecot, {"none": plain, "hidden": hiding, "relay": relay, "tcp": tcp}, n_view,
                           rounds, results)
        if "localdelete" in wanted:
            localdelete_scenario(dovecot, plain, n_ld, results)
        if "ld_select" in wanted:
            ld_select_scenario(dovecot, plain, n_ld_sel, rounds, results)
        if "expunge_burst" in wanted:
            expunge_burst_scenario(dovecot, hiding, n_view, 100 if args.quick else 1000, 5, results)
        if "notify" in wanted:
            seed(dovecot.port, "bob", "Notify", 1)
            nat = notify_latency(dovecot.port, dovecot.port, True, "Notify", trials)
            prx = notify_latency(forced.port, forced.port, False, "Notify", trials)
            results.append(("notify_p50", pct(nat, 50), pct(prx, 50), 1.5))
            results.append(("notify_p99", pct(nat, 99), pct(prx, 99), 1.5))
    finally:
        for p in procs:
            p.stop()
        dovecot.close()
    report(results, load_before, args.json)
    return 0


def view_scenarios(dovecot, sides: dict, n_view, reps, results) -> None:
    seed(dovecot.port, "alice", "View", n_view, imdn_every=4)
    settle(dovecot.port, "alice", "View")
    select_fetch(dovecot.port, "alice", "View")  # (Dovecot's caches warm before anything is timed)
    cold = select_fetch(sides["hidden"].port, "alice", "View")  # the first SELECT through the hiding proxy
    # Each side in its own alternation with direct. With three sides in one cycle a side's time depended
    # on the side before it (2026-11-27, rotating order, 120 rounds): direct after the hiding proxy 8.96
    # ms, after the plain one 9.34; the plain proxy after direct 10.34, after the hiding one 11.11. The
    # fixed cycle (direct, none, hidden) read view_none 1.28; a pair, the same code and machine, 1.05.
    direct = {}
    for name, target in (("none", 1.05), ("hidden", 1.5), ("relay", None), ("tcp", None)):
        side = sides[name]
        if side is None:
            SPREADS.append(f"{name}: skipped (haproxy is not installed)")
            continue
        m = alternating({"direct": lambda: select_fetch(dovecot.port, "alice", "View"),
                         name: lambda side=side: select_fetch(side.port, "alice", "View")}, reps,
                        spread_of=(name,))
        direct[name] = m["direct"]
        results.append((f"view_{name}", m["direct"], m[name], target))
    results.append(("view_cold", direct["none"], cold, None))


class TcpRelay:
    """HAProxy in TCP mode in front of Dovecot: a relay written in C that knows nothing of IMAP, for
    reference (what any relay costs on this machine). Buffers of 256 KiB: with its default 16 KiB it
    wakes up four times as often per bulk FETCH and reads 1.03-1.08 instead of ~1.03."""

    def __init__(self, workdir: Path, backend_port: int):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.workdir / "haproxy.cfg"
        self.config.write_text(
            "global\n  maxconn 1000\n  tune.bufsize 262144\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n"
            f"listen imap\n  bind 127.0.0.1:{self.port}\n  server dovecot 127.0.0.1:{backend_port}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> TcpRelay:
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("haproxy did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def localdelete_scenario(dovecot, plain, n_ld, results) -> None:
    # Local delete of n_ld messages vs a real delete of n_ld, each on a fresh folder.
    seed(dovecot.port, "alice", "LD-local", n_ld)
    seed(dovecot.port, "alice", "LD-real", n_ld)
    c = login(dovecot.port, "alice")
    c.command(b"s", b'SELECT "LD-real"')
    real = timed(lambda: (c.command(b"d", b"STORE 1:* +FLAGS.SILENT (\\Deleted)"), c.command(b"e", b"EXPUNGE")))
    c.close()
    c = login(plain.port, "alice", "bench-ld")
    c.command(b"s", b'SELECT "LD-local"')
    local = timed(lambda: (c.command(b"d", b"STORE 1:* +FLAGS.SILENT (\\Deleted $LocalDelete)"),
                           c.command(b"e", b"EXPUNGE")))
    c.close()
    results.append(("localdelete", real, local, 2.0))


def ld_select_scenario(dovecot, plain, n_ld_sel, reps, results) -> None:
    # SELECT with n_ld_sel local deletions for the device vs a plain SELECT (same proxy, same folder).
    seed(dovecot.port, "alice", "LD-select", n_ld_sel + 100)
    c = login(plain.port, "alice", "bench-many")
    c.command(b"s", b'SELECT "LD-select"')
    c.command(b"d", b"STORE 1:%d +FLAGS.SILENT (\\Deleted $LocalDelete)" % n_ld_sel)
    c.command(b"e", b"EXPUNGE")
    c.close()
    settle(dovecot.port, "alice", "LD-select")

    def sel(device):
        cc = login(plain.port, "alice", device)
        t = timed(lambda: cc.command(b"s", b'SELECT "LD-select"'))
        cc.close()
        return t
    m = alternating({"plain": lambda: sel("bench-other"), "many": lambda: sel("bench-many")}, reps,
                    spread_of=("many",))
    results.append(("ld_select", m["plain"], m["many"], 1.5))


def expunge_burst_scenario(dovecot, hiding, n, k, rounds, results) -> None:
    """Another session expunges ``k`` messages at once in a mailbox of ``n`` (a quarter of them IMDNs the
    policy hides); a device that has it selected hears of them at its NOOP, through the hiding proxy, vs a
    session of Dovecot's own. Each EXPUNGE announced used to rebuild the view's tables: O(k * n), 1,000
    expunges in 200,000 messages held the proxy for 10 s (2026-11-27)."""
    seed(dovecot.port, "alice", "Burst", n, imdn_every=4)
    settle(dovecot.port, "alice", "Burst")
    direct, device, actor = login(dovecot.port, "alice"), login(hiding.port, "alice", "bench-burst"), \
        login(dovecot.port, "alice")
    for c in (direct, device, actor):
        c.command(b"s", b'SELECT "Burst"')
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    for r in range(rounds):
        actor.command(b"d", b"STORE 1:%d +FLAGS.SILENT (\\Deleted)" % k)
        actor.command(b"e", b"EXPUNGE")
        order = [("direct", direct), ("proxy", device)]
        for name, c in order if r % 2 else order[::-1]:
            times[name].append(timed(lambda c=c: c.command(b"n", b"NOOP")))
    for c in (direct, device, actor):
        c.close()
    results.append((f"expunge_burst_{k}", statistics.median(times["direct"]), statistics.median(times["proxy"]),
                    None))


def report(results, load_before: str, json_path: str | None) -> None:
    print("| scenario | direct (s) | proxy (s) | ratio | target |")
    print("|---|---|---|---|---|")
    rows = []
    for name, d, p, target in results:
        ratio = p / d if d else float("inf")
        verdict = "report" if target is None else ("pass" if ratio <= target else "FAIL")
        print(f"| {name} | {d:.4f} | {p:.4f} | {ratio:.2f} | {('<= %.2f ' % target) if target else ''}{verdict} |")
        rows.append({"scenario": name, "direct": d, "proxy": p, "ratio": ratio, "target": target})
    for line in SPREADS:
        print(line)
    print(f"\nload average (1/5/15 min) before: {load_before}, after: {loadavg()}")
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
