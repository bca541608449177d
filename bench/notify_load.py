#!/usr/bin/env python3
"""Notification load: many users, each with several idle CPM devices on the proxy, changes at random.

    python bench/notify_load.py [--users 1000] [--devices 3] [--seconds 60] [--rate 10] [--quick]

Every user has ``--devices`` sessions through one proxy process, all identified as CPM devices and
idling (notifications forced by policy). For ``--seconds``, changes arrive at random (Poisson, ``--rate``
per second) for random users, half of them made directly on Dovecot (like a delivery: the proxy learns
of it from its watch connection) and half by the user's first device through the proxy (DONE, APPEND,
IDLE again). A change is an APPEND to the user's own folder ``chat-<user>``, so:

* a notification for change n is a ``* STATUS "chat-<user>" (MESSAGES m ...)`` with m >= n at a device
  that should hear of it (all devices for a direct change; the others for a device's own change);
* a STATUS naming another user's folder is a notification to the wrong user (must be 0).

Reported: changes, expected and delivered notifications, wrong-user notifications, latency p50 / p99 /
max from the APPEND being sent to the STATUS arriving. Results go to stdout and ``--out`` (markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpmproxy.testing.dovecot import Dovecot  # noqa: E402
from cpmproxy.testing.proxyproc import ProxyProcess  # noqa: E402
from cpmproxy.testing.sample import make_object  # noqa: E402

_STATUS = re.compile(rb'^\* STATUS "?([^" ]+)"? \((.*)\)\r\n$', re.I)
_MESSAGES = re.compile(rb"MESSAGES (\d+)", re.I)
MESSAGE = make_object("chat", text="load")


@dataclass
class Change:
    user: str
    n: int                  # MESSAGES of the user's folder after this change
    sent: float
    expected: tuple[int, ...]  # device indexes that must hear of it


@dataclass
class Device:
    user: str
    index: int
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    waiters: dict[bytes, asyncio.Future] = field(default_factory=dict)
    seen: list[tuple[float, bytes, int]] = field(default_factory=list)  # (time, folder, MESSAGES)
    continuation: asyncio.Future | None = None
    alive: bool = False

    async def open(self, host: str, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port)
        await self.reader.readline()  # greeting
        asyncio.ensure_future(self._read())
        await self.command(b'ID ("name" "loadbench" "x-cpm-device-id" "%s-d%d")' % (self.user.encode(), self.index))
        status = await self.command(b"LOGIN %s %spw" % (self.user.encode(), self.user.encode()))
        if not status.startswith(b"OK"):
            raise RuntimeError(f"login {self.user}: {status!r}")
        if self.index == 0:
            await self.command(b'CREATE "chat-%s"' % self.user.encode())
        await self.command(b"SELECT INBOX")
        await self.idle()
        self.alive = True

    async def _read(self) -> None:
        while True:
            line = await self.reader.readline()
            if not line:
                self.alive = False
                return
            if line.startswith(b"* STATUS "):
                m = _STATUS.match(line)
                if m:
                    n = _MESSAGES.search(m.group(2))
                    self.seen.append((time.perf_counter(), m.group(1), int(n.group(1)) if n else -1))
            elif line.startswith(b"+") and self.continuation is not None and not self.continuation.done():
                self.continuation.set_result(line)
            elif not line.startswith(b"*"):
                tag, _, rest = line.partition(b" ")
                fut = self.waiters.pop(tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(rest)

    async def command(self, line: bytes, tag: bytes = b"t") -> bytes:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[tag] = fut
        self.writer.write(tag + b" " + line + b"\r\n")
        return await fut

    async def idle(self) -> None:
        self.continuation = asyncio.get_running_loop().create_future()
        self.waiters[b"idle"] = asyncio.get_running_loop().create_future()
        self.writer.write(b"idle IDLE\r\n")
        await self.continuation

    async def change(self) -> float:
        """DONE, APPEND to the user's folder, IDLE again; returns when the APPEND was sent."""
        done = self.waiters[b"idle"]
        self.writer.write(b"DONE\r\n")
        await done
        sent = time.perf_counter()
        status = await self.command(b'APPEND "chat-%s" {%d+}\r\n%s' % (self.user.encode(), len(MESSAGE), MESSAGE),
                                    tag=b"a")
        if not status.startswith(b"OK"):
            raise RuntimeError(f"APPEND through the proxy: {status!r}")
        await self.idle()
        return sent


async def direct_change(host: str, port: int, user: str) -> float:
    """A change made on the backend itself (a delivery): LOGIN, APPEND, LOGOUT straight to Dovecot."""
    reader, writer = await asyncio.open_connection(host, port)
    await reader.readline()
    writer.write(b"l LOGIN %s %spw\r\n" % (user.encode(), user.encode()))
    await _tagged(reader, b"l ")
    sent = time.perf_counter()
    writer.write(b'a APPEND "chat-%s" {%d+}\r\n%s\r\n' % (user.encode(), len(MESSAGE), MESSAGE))
    status = await _tagged(reader, b"a ")
    writer.write(b"z LOGOUT\r\n")
    writer.close()
    if not status.startswith(b"a OK"):
        raise RuntimeError(f"APPEND direct: {status!r}")
    return sent


async def _tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line or line.startswith(tag):
            return line


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


async def run(args, proxy: ProxyProcess, dovecot: Dovecot) -> dict:
    users = [f"u{i:04d}" for i in range(args.users)]
    devices = {u: [Device(u, i) for i in range(args.devices)] for u in users}
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(64)

    async def open_user(u):
        for d in devices[u]:  # device 0 first: it creates the folder
            async with sem:
                await d.open(proxy.host, proxy.port)
    results = await asyncio.gather(*(open_user(u) for u in users), return_exceptions=True)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} users failed to connect, e.g. {errors[0]!r}")
    connect_s = time.perf_counter() - t0
    await asyncio.sleep(2)  # let the last watch connections settle

    counts = dict.fromkeys(users, 0)
    locks = {u: asyncio.Lock() for u in users}
    changes: list[Change] = []
    failures: list[str] = []
    direct_sem = asyncio.Semaphore(16)

    async def one_change(user: str, via_device: bool):
        async with locks[user]:
            try:
                if via_device:
                    sent = await devices[user][0].change()
                    expected = tuple(range(1, args.devices))
                else:
                    async with direct_sem:
                        sent = await direct_change(dovecot.host, dovecot.port, user)
                    expected = tuple(range(args.devices))
            except Exception as e:  # counted, never hidden
                failures.append(repr(e))
                return
            counts[user] += 1
            changes.append(Change(user, counts[user], sent, expected))

    rng = random.Random(42)
    tasks = []
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        await asyncio.sleep(rng.expovariate(args.rate))
        tasks.append(asyncio.ensure_future(one_change(rng.choice(users), rng.random() < 0.5)))
    await asyncio.gather(*tasks)
    await asyncio.sleep(args.grace)

    latencies: dict[str, list[float]] = {"direct": [], "device": []}
    expected_n = delivered = 0
    missing = []
    for ch in changes:
        folder = f"chat-{ch.user}".encode()
        for i in ch.expected:
            expected_n += 1
            hit = next((t for t, f, m in devices[ch.user][i].seen if f == folder and m >= ch.n and t >= ch.sent), None)
            if hit is None:
                missing.append((ch.user, i, ch.n))
                continue
            delivered += 1
            latencies["device" if len(ch.expected) < args.devices else "direct"].append(hit - ch.sent)
    wrong = sum(1 for u in users for d in devices[u] for _, f, _ in d.seen if f != f"chat-{u}".encode())
    alive = sum(d.alive for u in users for d in devices[u])
    everything = latencies["direct"] + latencies["device"]
    return {
        "users": args.users, "devices_per_user": args.devices, "sessions_alive": alive,
        "sessions": args.users * args.devices, "connect_s": connect_s, "seconds": args.seconds,
        "changes": len(changes), "change_failures": len(failures), "failure_examples": failures[:3],
        "expected": expected_n, "delivered": delivered, "missing_examples": missing[:5], "wrong_user": wrong,
        "p50": pct(everything, 50), "p99": pct(everything, 99), "max": max(everything, default=float("nan")),
        "p50_direct": pct(latencies["direct"], 50), "p99_direct": pct(latencies["direct"], 99),
        "p50_device": pct(latencies["device"], 50), "p99_device": pct(latencies["device"], 99),
    }


def raise_limits(users: int, devices: int) -> list[str]:
    notes = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, users * devices * 3 + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    # Every Dovecot process watching mailboxes takes an inotify instance; past the per-uid limit (128 by
    # default) IDLE/NOTIFY fall back to polling. Raised when allowed (root), reported either way.
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    try:
        if int(path.read_text()) < 8192 and os.geteuid() == 0:
            path.write_text("8192\n")
        notes.append(f"fs.inotify.max_user_instances = {path.read_text().strip()}")
    except OSError as e:
        notes.append(f"fs.inotify.max_user_instances unchanged ({e})")
    return notes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate", type=float, default=10.0, help="changes per second, all users together")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds to wait for late notifications")
    ap.add_argument("--quick", action="store_true", help="100 users, 20 s")
    ap.add_argument("--out", default=str(ROOT / "bench" / "NOTIFY_LOAD.md"))
    args = ap.parse_args()
    if args.quick:
        args.users, args.seconds = 100, 20
    notes = raise_limits(args.users, args.devices)
    base = Path(tempfile.mkdtemp(prefix="notifyload"))
    users = {f"u{i:04d}": f"u{i:04d}pw" for i in range(args.users)}
    # Backend connections: one per session, one watch per user, side connections, direct changers.
    procs = args.users * (args.devices + 2) + 500
    extra = (f"default_process_limit = {procs}\ndefault_client_limit = {4 * procs}\n"
             f"service imap {{\n  process_limit = {procs}\n}}\n")
    dovecot = Dovecot(base / "dovecot", users=users, extra_config=extra)
    dovecot.start()
    proxy = None
    started = time.time()
    try:
        proxy = ProxyProcess(base / "proxy", dovecot.port, config_extra=(
            "[limits]\nmax_connections_per_ip = 100000\nmax_connections_per_user = 100\n"
            '[policy]\nnotifications = "forced"\n')).start()
        r = asyncio.run(run(args, proxy, dovecot))
        r["proxy_rss_mib"] = proxy_rss(proxy)
    finally:
        if proxy is not None:
            proxy.stop()
        dovecot.close()
    load = os.getloadavg()[0]
    ok = r["delivered"] == r["expected"] and r["wrong_user"] == 0 and r["sessions_alive"] == r["sessions"]
    lines = [
        "# Notification load",
        "",
        f"{r['users']:,} users x {r['devices_per_user']} idle CPM devices ({r['sessions']:,} sessions through one "
        f"proxy process, {r['sessions_alive']:,} alive at the end; connected in {r['connect_s']:.0f} s), changes at "
        f"random for {r['seconds']:.0f} s at {args.rate:g}/s, half made directly on Dovecot and half by a device "
        "through the proxy.",
        "",
        "| changes | notifications expected | delivered | to the wrong user | p50 | p99 | max |",
        "|---|---|---|---|---|---|---|",
        f"| {r['changes']:,} | {r['expected']:,} | {r['delivered']:,} | {r['wrong_user']} | {r['p50'] * 1000:.0f} ms "
        f"| {r['p99'] * 1000:.0f} ms | {r['max'] * 1000:.0f} ms |",
        "",
        f"- changes made directly on Dovecot (the proxy hears of them on its watch connections): p50 "
        f"{r['p50_direct'] * 1000:.0f} ms, p99 {r['p99_direct'] * 1000:.0f} ms (Dovecot itself reports a change "
        "about 0.5 s after it);",
        f"- changes made by a device through the proxy: p50 {r['p50_device'] * 1000:.0f} ms, p99 "
        f"{r['p99_device'] * 1000:.0f} ms;",
        f"- change attempts that failed: {r['change_failures']} {r['failure_examples'] or ''}",
        f"- missing notifications (user, device, change): {r['missing_examples'] or 'none'}",
        f"- proxy RSS at the end: {r['proxy_rss_mib']:.0f} MiB; {'; '.join(notes)}; "
        f"1-minute load average after the run: {load:.1f}.",
        f"- result: {'pass' if ok else 'FAIL'} (every notification delivered, none to the wrong user, all "
        "sessions alive).",
        "",
        f"Command: `.venv/bin/python bench/notify_load.py --users {args.users} --devices {args.devices} "
        f"--seconds {args.seconds:g} --rate {args.rate:g}` ({time.time() - started:.0f} s, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0 if ok else 1


def proxy_rss(proxy: ProxyProcess) -> float:
    try:
        for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, AttributeError):
        pass
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
