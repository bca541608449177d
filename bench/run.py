#!/usr/bin/env python3
"""cpmproxy benchmark: the same workloads against Dovecot directly and through the proxy.

One run starts one private Dovecot and one real proxy process (``python -m cpmproxy.cli``) in front of
it over plaintext loopback, so the only difference between the "direct" and "proxy" numbers is the
proxy itself (no TLS on either path). Scenarios:

* ``bulk``          -- ``FETCH 1:* BODY.PEEK[]`` of a large mailbox: relay throughput.
* ``pingpong``      -- sequential NOOPs on one connection: added per-command latency.
* ``append``        -- sequential APPENDs of a 2 KB message with LITERAL+, as a device storing what it
                       sent: the upload path (the literal relay, the APPEND fast path).
* ``idle_sessions`` -- thousands of concurrent IDLE sessions: proxy memory per session.

Usage: ``python bench/run.py [--quick] [--only NAME ...] [--json out.json]``. See bench/README.md.

The clients are deliberately lean (raw sockets, no IMAP library): the same client code runs on both
paths, so any client-side cost dilutes the proxy/direct ratio and must stay small.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from importlib.metadata import version as pkg_version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cpmproxy.testing.dovecot import Dovecot  # noqa: E402
from cpmproxy.testing.proxyproc import ProxyProcess  # noqa: E402
from cpmproxy.testing.rawclient import RawIMAP  # noqa: E402

SCENARIOS = ("bulk", "pingpong", "append", "idle_sessions")
# Execution order differs from the listing order on purpose: idle_sessions measures the proxy's RSS
# growth, so it runs first, on a proxy whose heap has not yet been inflated (and fragmented) by
# relaying hundreds of MB in ``bulk`` -- freed memory from earlier scenarios would otherwise be reused
# by the new sessions and hide their real cost.
RUN_ORDER = ("idle_sessions", "pingpong", "append", "bulk")

TARGETS = {"bulk": 1.10, "pingpong": 2.0, "append": 1.5, "idle_sessions": 20.0}  # ratios; KiB/session

# Generous proxy limits: the benchmark opens thousands of sessions from 127.0.0.1 for few users.
PROXY_LIMITS = """\
[limits]
max_connections = 20000
max_connections_per_ip = 20000
max_connections_per_user = 20000
"""

BUSY_LOAD = 0.5  # a 1-minute load average above this before the run flags the report as noisy
LOG_NOISE_BYTES = 16 * 1024  # proxy log growth during timed runs worth pointing out
IDLE_USERS = 20  # idle sessions are spread over several users, away from any per-user limit
# Backend connections one client session may hold: its own, plus the "side" connection that plugins
# (policy) open through ClientSession.side_command for questions about other mailboxes.
BACKEND_CONNS_PER_SESSION = 2
IO_TIMEOUT = 120.0


@dataclass(frozen=True)
class Sizes:
    bulk_messages: int
    bulk_message_size: int  # bytes, approximate (headers + base64 body, CRLF lines)
    bulk_rounds: int
    pingpong_commands: int
    pingpong_rounds: int
    append_commands: int
    append_rounds: int
    idle_sessions: int
    idle_concurrency: int  # sessions being set up at once (the proxy's listen backlog is 50)


# bulk_rounds: one round's proxy/direct ratio spreads from ~0.7 to ~1.3 on a shared 2-CPU machine (other
# processes, page cache, CPU frequency); the median of 5 moved by 0.3 between runs, the median of 21 far less.
FULL = Sizes(bulk_messages=2000, bulk_message_size=50_000, bulk_rounds=21, pingpong_commands=5000,
             pingpong_rounds=3, append_commands=500, append_rounds=7, idle_sessions=2000, idle_concurrency=32)
QUICK = Sizes(bulk_messages=200, bulk_message_size=50_000, bulk_rounds=3, pingpong_commands=500,
              pingpong_rounds=3, append_commands=50, append_rounds=3, idle_sessions=200, idle_concurrency=32)


@dataclass
class Result:
    name: str
    direct: str  # human-readable cells of the table
    proxy: str
    ratio: float | None
    target: str
    passed: bool
    details: dict = field(default_factory=dict)  # raw numbers, for --json


class BenchError(RuntimeError):
    """The benchmark could not measure something (a protocol error, a dead session...)."""


# -- environment ---------------------------------------------------------------------------------------


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; Dovecot and the proxy inherit it (the proxy holds one
    client and up to BACKEND_CONNS_PER_SESSION backend sockets per session, our client one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def dovecot_extra_config(idle_sessions: int) -> str:
    """Dovecot limits for ``idle_sessions`` concurrent logins through the proxy.

    The fixture's defaults (default_process_limit = 1000) cap ``service imap`` -- one process per
    backend connection -- at 1000; raise it for BACKEND_CONNS_PER_SESSION connections per session, with
    headroom for the other scenarios. imap-login already runs in performance mode (service_count = 0,
    client_limit = 1000), and mail_max_userip_connections is 10000. Dovecot merges this ``service imap``
    block with the fixture's.
    """
    limit = max(1000, BACKEND_CONNS_PER_SESSION * idle_sessions + 500)
    return f"""
default_process_limit = {limit}
default_client_limit = {max(10000, 4 * limit)}
service imap {{
  process_limit = {limit}
}}
"""


def dovecot_limit_warnings(dovecot: Dovecot) -> list[str]:
    """Dovecot's own complaints about reaching a limit (process_limit, client_limit...): they mean a
    failure is Dovecot's sizing here, not the proxy's."""
    try:
        lines = dovecot.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "limit" in line and ("Warning" in line or "Error" in line)
            and "Inotify" not in line]


def log_size(proxy: ProxyProcess) -> int:
    try:
        return proxy.log_path.stat().st_size
    except OSError:
        return 0


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process: how much CPU the proxy itself burned during a timed run."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    """1-minute load average: anything else busy on the machine skews every number here."""
    return os.getloadavg()[0]


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        dovecot = subprocess.run(["dovecot", "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
    except OSError:
        dovecot = "?"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": pkg_version("twisted"),
        "dovecot": dovecot,
    }


# -- tiny blocking client helpers --------------------------------------------------------------------


def login(host: str, port: int, user: str, password: str) -> RawIMAP:
    conn = RawIMAP(host, port, timeout=IO_TIMEOUT)
    expect_ok(conn.login(user, password), b"L")
    return conn


def expect_ok(responses: list[bytes], tag: bytes) -> list[bytes]:
    last = responses[-1]
    if not last.startswith(tag + b" OK"):
        raise BenchError(f"{tag.decode()} failed: {last[:200]!r}")
    return responses


def raw_socket(conn: RawIMAP) -> socket.socket:
    """The connection's socket for a timed loop; nothing may be left in RawIMAP's buffer."""
    if conn.buf:
        raise BenchError(f"unexpected buffered data: {conn.buf[:200]!r}")
    return conn.sock


# -- bulk ------------------------------------------------------------------------------------------


def make_message(i: int, size: int) -> bytes:
    """A distinct ~``size``-byte message: a base64 (incompressible, attachment-like) body in 76-char
    CRLF lines, as a typical MIME part."""
    header = (
        f"From: sender{i}@example.com\r\nTo: bench@example.com\r\nSubject: bench message {i}\r\n"
        f"Message-ID: <bench-{i}@example.com>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    body_len = max(0, size - len(header))
    b64 = base64.b64encode(os.urandom(body_len * 3 // 4 * 76 // 78))
    lines = [b64[k:k + 76] for k in range(0, len(b64), 76)]
    return header + b"\r\n".join(lines) + b"\r\n"


def seed_mailbox(dovecot: Dovecot, user: str, count: int, size: int, batch: int = 100) -> int:
    """APPEND ``count`` messages to ``user``'s INBOX directly, pipelined with LITERAL+ (no round trip
    per message). Sent in batches so Dovecot's replies never fill our receive buffer while we only
    write. Returns the total message bytes."""
    total = 0
    conn = login(dovecot.host, dovecot.port, user, dovecot.users[user])
    try:
        caps = b" ".join(conn.command(b"C", b"CAPABILITY")).upper()
        if b"LITERAL+" not in caps:
            raise BenchError("Dovecot does not offer LITERAL+")
        for start in range(0, count, batch):
            stop = min(count, start + batch)
            parts = []
            for i in range(start, stop):
                msg = make_message(i, size)
                total += len(msg)
                parts += [b"A%d APPEND INBOX {%d+}\r\n" % (i, len(msg)), msg, b"\r\n"]
            conn.send(b"".join(parts))
            for i in range(start, stop):
                expect_ok(conn.until_tagged(b"A%d" % i), b"A%d" % i)
        conn.command(b"Z", b"LOGOUT")
    finally:
        conn.close()
    return total


def fetch_all(sock: socket.socket, tag: bytes, rbuf: bytearray) -> tuple[float, int, int, int]:
    """Time ``FETCH 1:* BODY.PEEK[]``, reading every byte. Returns (seconds, wire bytes, literal bytes,
    literals).

    Literals are skipped by count without copying (recv_into a large preallocated buffer); only the
    short response lines are looked at, so the client costs the same few microseconds per message on
    both paths.
    """
    recv_into = sock.recv_into
    pending = bytearray()  # a response line split across reads
    literal_left = 0
    wire = literal_bytes = literals = 0
    done_prefix = tag + b" "
    t0 = time.perf_counter()
    sock.sendall(tag + b" FETCH 1:* BODY.PEEK[]\r\n")
    while True:
        n = recv_into(rbuf)
        if not n:
            raise BenchError("connection closed during FETCH")
        wire += n
        i = 0
        while i < n:
            if literal_left:
                take = min(literal_left, n - i)
                literal_left -= take
                i += take
                continue
            j = rbuf.find(b"\n", i, n)
            if j < 0:
                pending += rbuf[i:n]
                break
            line = bytes(pending + rbuf[i:j + 1]) if pending else bytes(rbuf[i:j + 1])
            pending.clear()
            i = j + 1
            if line.endswith(b"}\r\n"):
                literal_left = int(line[line.rindex(b"{") + 1:-3])
                literal_bytes += literal_left
                literals += 1
            elif line.startswith(done_prefix):
                elapsed = time.perf_counter() - t0
                if not line.startswith(done_prefix + b"OK"):
                    raise BenchError(f"FETCH failed: {line[:200]!r}")
                if i != n or pending:
                    raise BenchError("data after the tagged FETCH response")
                return elapsed, wire, literal_bytes, literals


def scenario_bulk(dovecot: Dovecot, proxy: ProxyProcess, sizes: Sizes, user: str, seeded_bytes: int) -> Result:
    assert proxy.proc is not None
    pid = proxy.proc.pid
    password = dovecot.users[user]
    sides = {"direct": login(dovecot.host, dovecot.port, user, password),
             "proxy": login(proxy.host, proxy.port, user, password)}
    rbuf = bytearray(4 << 20)
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    proxy_cpu: list[float] = []
    wire: dict[str, int] = {}
    try:
        for side, conn in sides.items():
            resp = expect_ok(conn.command(b"E", b"EXAMINE INBOX"), b"E")
            exists = next((int(r.split()[1]) for r in resp if r.endswith(b" EXISTS\r\n")), -1)
            if exists != sizes.bulk_messages:
                raise BenchError(f"{side}: INBOX has {exists} messages, expected {sizes.bulk_messages}")
        # SO_RCVBUF is left alone on purpose: setting it disables the kernel's receive-buffer
        # autotuning (up to tcp_rmem's max), which is what keeps a fast reader from being the limit.
        socks = {side: raw_socket(conn) for side, conn in sides.items()}

        def one(side: str, k: int, record: bool) -> None:
            cpu0 = cpu_seconds(pid)
            elapsed, nbytes, lit_bytes, lits = fetch_all(socks[side], b"F%d" % k, rbuf)
            cpu = cpu_seconds(pid) - cpu0
            if lits != sizes.bulk_messages or lit_bytes != seeded_bytes:
                raise BenchError(f"{side}: got {lits} messages / {lit_bytes} bytes, expected "
                                 f"{sizes.bulk_messages} / {seeded_bytes}")
            # Not compared byte-exact across sides/rounds: Dovecot's tagged OK carries timings.
            wire[side] = nbytes
            if record:
                times[side].append(elapsed)
                if side == "proxy":
                    proxy_cpu.append(cpu)

        # Untimed warm-up: page cache, Dovecot's index/cache files, the proxy's code paths.
        one("direct", 0, False)
        one("proxy", 0, False)
        log0 = log_size(proxy)  # the proxy should log per session, not per response
        for k in range(1, sizes.bulk_rounds + 1):
            # Alternate the order (ABBA...) so drift (caches, CPU frequency) hits both sides alike.
            order = ("direct", "proxy") if k % 2 else ("proxy", "direct")
            for side in order:
                one(side, k, True)
        log_bytes = log_size(proxy) - log0
        for conn in sides.values():
            conn.command(b"Z", b"LOGOUT")
    finally:
        for conn in sides.values():
            conn.close()

    med = {side: statistics.median(v) for side, v in times.items()}
    mbps = {side: wire[side] / med[side] / 1e6 for side in med}
    ratio = med["proxy"] / med["direct"]
    target = TARGETS["bulk"]
    per_round = [p / d for p, d in zip(times["proxy"], times["direct"], strict=True)]
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return Result(
        name="bulk",
        direct=f"{med['direct']:.3f} s ({mbps['direct']:.0f} MB/s)",
        proxy=f"{med['proxy']:.3f} s ({mbps['proxy']:.0f} MB/s)",
        ratio=ratio,
        target=f"ratio ≤ {target:.2f}",
        passed=ratio <= target,
        details={"messages": sizes.bulk_messages, "message_bytes": seeded_bytes, "wire_bytes": wire["direct"],
                 "rounds": sizes.bulk_rounds, "seconds": times, "median_seconds": med, "mb_per_s": mbps,
                 "per_round_ratio_quartiles": quartiles,
                 "proxy_cpu_seconds": proxy_cpu, "median_proxy_cpu_seconds": statistics.median(proxy_cpu),
                 "proxy_log_bytes": log_bytes},
    )


# -- pingpong --------------------------------------------------------------------------------------


def command_loop(sock: socket.socket, count: int, run: int, command: bytes) -> float:
    """``count`` sequential commands (``command``: after the tag, CRLF included), each waiting for its
    tagged OK; returns seconds."""
    recv = sock.recv
    send = sock.sendall
    prefix = b"r%d." % run  # unique tags across runs
    t0 = time.perf_counter()
    for i in range(count):
        tag = prefix + b"%d " % i
        send(tag + command)
        data = recv(65536)
        # The reply is complete once its tagged line (at the start, or after untagged lines) is.
        while True:
            if data.endswith(b"\r\n"):
                if data.startswith(tag):
                    at = 0
                else:
                    at = data.find(b"\r\n" + tag)
                    at = at + 2 if at >= 0 else -1
                if at >= 0:
                    if data[at + len(tag):at + len(tag) + 2] != b"OK":
                        raise BenchError(f"{command[:20]!r} failed: {data[at:at + 200]!r}")
                    break
            chunk = recv(65536)
            if not chunk:
                raise BenchError("connection closed during a command loop")
            data += chunk
    return time.perf_counter() - t0


def per_command_result(name: str, unit: str, digits: int, times: dict[str, list[float]], proxy_cpu: list[float],
                       count: int, rounds: int, **details) -> Result:
    """The result of a scenario timed by ``alternate_rounds``: the median time per command on each side."""
    us = {side: statistics.median(v) / count * 1e6 for side, v in times.items()}
    ratio = us["proxy"] / us["direct"]
    target = TARGETS[name]
    return Result(
        name=name,
        direct=f"{us['direct']:.{digits}f} µs/{unit}",
        proxy=f"{us['proxy']:.{digits}f} µs/{unit} (+{us['proxy'] - us['direct']:.{digits}f})",
        ratio=ratio,
        target=f"ratio ≤ {target:.1f}",
        passed=ratio <= target,
        details={"commands": count, "rounds": rounds, "seconds": times, "median_us_per_command": us,
                 "proxy_cpu_us_per_command": statistics.median(proxy_cpu) / count * 1e6, **details},
    )


def alternate_rounds(socks: dict[str, socket.socket], pid: int, count: int, rounds: int, warmup: int,
                     command: bytes, times: dict[str, list[float]], proxy_cpu: list[float]) -> None:
    """Untimed warm-up on each side, then ``rounds`` rounds of ``count`` sequential ``command``s per side,
    the side that goes first alternating; seconds per round into ``times``, the proxy's CPU into
    ``proxy_cpu``."""
    for side in ("direct", "proxy"):
        command_loop(socks[side], min(warmup, count), 0, command)
    for k in range(1, rounds + 1):
        for side in (("direct", "proxy") if k % 2 else ("proxy", "direct")):
            cpu0 = cpu_seconds(pid)
            times[side].append(command_loop(socks[side], count, k, command))
            if side == "proxy":
                proxy_cpu.append(cpu_seconds(pid) - cpu0)


def scenario_pingpong(dovecot: Dovecot, proxy: ProxyProcess, sizes: Sizes, user: str) -> Result:
    assert proxy.proc is not None
    pid = proxy.proc.pid
    password = dovecot.users[user]
    sides = {"direct": login(dovecot.host, dovecot.port, user, password),
             "proxy": login(proxy.host, proxy.port, user, password)}
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    proxy_cpu: list[float] = []
    try:
        socks = {side: raw_socket(conn) for side, conn in sides.items()}
        log0 = log_size(proxy)
        alternate_rounds(socks, pid, sizes.pingpong_commands, sizes.pingpong_rounds, 200, b"NOOP\r\n",
                         times, proxy_cpu)
        log_bytes = log_size(proxy) - log0
        for conn in sides.values():
            conn.command(b"Z", b"LOGOUT")
    finally:
        for conn in sides.values():
            conn.close()

    return per_command_result("pingpong", "cmd", 1, times, proxy_cpu, sizes.pingpong_commands,
                              sizes.pingpong_rounds, proxy_log_bytes=log_bytes)


# -- idle_sessions ---------------------------------------------------------------------------------


class IdleSession:
    """One client held in IDLE: LOGIN, SELECT INBOX, IDLE -- each step waits for its reply, as a real
    client does (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, user: str, password: str) -> IdleSession:
        reader, writer = await asyncio.open_connection(host, port)
        self = cls(reader, writer)
        try:
            greeting = await reader.readline()
            if not greeting.startswith(b"* OK"):
                raise BenchError(f"greeting: {greeting[:200]!r}")
            await self.command(b"a", f'LOGIN "{user}" "{password}"'.encode())
            await self.command(b"b", b"SELECT INBOX")
            writer.write(b"c IDLE\r\n")
            while True:
                line = await self._line()
                if line.startswith(b"+"):
                    break
                if line.startswith(b"c "):
                    raise BenchError(f"IDLE refused: {line[:200]!r}")
        except BaseException:
            self.close()
            raise
        return self

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise BenchError("connection closed")
        return line

    async def command(self, tag: bytes, line: bytes | None) -> None:
        """Send ``tag line`` (or nothing if ``line`` is None) and wait for the tagged OK."""
        if line is not None:
            self.writer.write(tag + b" " + line + b"\r\n")
        prefix = tag + b" "
        while True:
            resp = await self._line()
            if resp.startswith(prefix):
                if not resp.startswith(prefix + b"OK"):
                    raise BenchError(f"{line!r}: {resp[:200]!r}")
                return

    async def check_and_close(self) -> None:
        """End IDLE, prove the session still works with a NOOP, log out."""
        try:
            self.writer.write(b"DONE\r\n")
            await self.command(b"c", None)
            await self.command(b"d", b"NOOP")
            await self.command(b"e", b"LOGOUT")
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


async def _idle_phase(host: str, port: int, users: list[tuple[str, str]], count: int, concurrency: int,
                      pid: int, settle: float) -> dict:
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def open_one(i: int) -> IdleSession | None:
        user, password = users[i % len(users)]
        async with sem:
            try:
                return await asyncio.wait_for(IdleSession.open(host, port, user, password), IO_TIMEOUT)
            except (OSError, BenchError, asyncio.TimeoutError) as e:
                errors.append(f"open: {type(e).__name__}: {e}")
                return None

    async def check_one(s: IdleSession) -> bool:
        async with sem:
            try:
                await asyncio.wait_for(s.check_and_close(), IO_TIMEOUT)
                return True
            except (OSError, BenchError, asyncio.TimeoutError) as e:
                errors.append(f"check: {type(e).__name__}: {e}")
                return False

    # Warm-up: one full session per user, so that one-time costs (lazy imports, per-user Maildir
    # creation in Dovecot, metric children, first-allocation of Twisted structures) are not counted
    # as per-session growth.
    warm = await asyncio.gather(*(open_one(i) for i in range(len(users))))
    if not all(warm):
        raise BenchError(f"warm-up sessions failed: {errors[:3]}")
    await asyncio.gather(*(check_one(s) for s in warm))
    await asyncio.sleep(settle)
    rss_before = read_rss_kib(pid)
    fds_before = count_fds(pid)

    t0 = time.perf_counter()
    opened = [s for s in await asyncio.gather(*(open_one(i) for i in range(count))) if s is not None]
    open_seconds = time.perf_counter() - t0
    await asyncio.sleep(settle)  # let the proxy finish any deferred work before sampling
    rss_held = read_rss_kib(pid)
    fds_held = count_fds(pid)

    alive = sum(await asyncio.gather(*(check_one(s) for s in opened)))
    await asyncio.sleep(settle)
    rss_after = read_rss_kib(pid)
    return {"requested": count, "opened": len(opened), "alive": alive, "errors": errors[:10],
            "error_count": len(errors), "open_seconds": open_seconds, "rss_before_kib": rss_before,
            "rss_held_kib": rss_held, "rss_after_close_kib": rss_after,
            # One fd for the client socket, the rest are backend connections.
            "proxy_fds_per_session": (fds_held - fds_before) / len(opened) if opened else 0.0}


# -- append ----------------------------------------------------------------------------------------


def scenario_append(dovecot: Dovecot, proxy: ProxyProcess, sizes: Sizes, user: str) -> Result:
    """Sequential ``APPEND "folder" (\\Seen) {n+}`` of a 2 KB message, each waiting for its OK, rounds
    alternating direct and proxy (both append to the same folder)."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    password = dovecot.users[user]
    message = make_message(0, 2000)
    command = b'APPEND "bench-append" (\\Seen) {%d+}\r\n%s\r\n' % (len(message), message)
    sides = {"direct": login(dovecot.host, dovecot.port, user, password),
             "proxy": login(proxy.host, proxy.port, user, password)}
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    proxy_cpu: list[float] = []
    try:
        sides["direct"].command(b"C", b'CREATE "bench-append"')
        socks = {side: raw_socket(conn) for side, conn in sides.items()}
        alternate_rounds(socks, pid, sizes.append_commands, sizes.append_rounds, 50, command, times, proxy_cpu)
        expect_ok(sides["direct"].command(b"D", b'DELETE "bench-append"'), b"D")
    finally:
        for conn in sides.values():
            conn.close()
    return per_command_result("append", "APPEND", 0, times, proxy_cpu, sizes.append_commands,
                              sizes.append_rounds, message_bytes=len(message))


def scenario_idle_sessions(dovecot: Dovecot, proxy: ProxyProcess, sizes: Sizes, users: list[str]) -> Result:
    assert proxy.proc is not None
    creds = [(u, dovecot.users[u]) for u in users]
    d = asyncio.run(_idle_phase(proxy.host, proxy.port, creds, sizes.idle_sessions, sizes.idle_concurrency,
                                proxy.proc.pid, settle=1.0))
    n = d["opened"]
    per_session = (d["rss_held_kib"] - d["rss_before_kib"]) / n if n else float("inf")
    d["kib_per_session"] = per_session
    d["dovecot_limit_warnings"] = dovecot_limit_warnings(dovecot)[:5]
    target = TARGETS["idle_sessions"]
    all_ok = n == d["requested"] and d["alive"] == n
    return Result(
        name="idle_sessions",
        direct="—",
        proxy=(f"{per_session:.1f} KiB/session ({d['alive']}/{d['requested']} alive, "
               f"RSS {d['rss_before_kib'] / 1024:.1f} → {d['rss_held_kib'] / 1024:.1f} MiB)"),
        ratio=None,
        target=f"≤ {target:.0f} KiB/session, all alive",
        passed=all_ok and per_session <= target,
        details=d,
    )


# -- reporting -------------------------------------------------------------------------------------


def markdown_table(results: list[Result]) -> str:
    rows = ["| Scenario | Direct | Proxy | Ratio (proxy/direct) | Target | Result |",
            "|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "—"
        rows.append(f"| {r.name} | {r.direct} | {r.proxy} | {ratio} | {r.target} | "
                    f"{'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(rows)


def results_markdown(results: list[Result], machine: dict, command: str, quick: bool, elapsed: float) -> str:
    m = machine
    busy = (" -- **the machine was busy with other work: the numbers are noisy**"
            if m["load_before"] > BUSY_LOAD else "")
    bulk = next((r for r in results if r.name == "bulk"), None)
    idle = next((r for r in results if r.name == "idle_sessions"), None)
    ping = next((r for r in results if r.name == "pingpong"), None)
    append = next((r for r in results if r.name == "append"), None)
    notes = []
    if bulk:
        b = bulk.details
        notes.append(f"- bulk: {b['messages']} messages, {b['message_bytes'] / 1e6:.1f} MB of message data "
                     f"({b['wire_bytes'] / 1e6:.1f} MB on the wire) per FETCH; median of {b['rounds']} "
                     "alternating rounds after one untimed warm-up per side (per-round ratio quartiles "
                     f"{' / '.join(f'{q:.2f}' for q in b['per_round_ratio_quartiles'])}). The proxy process "
                     f"used {b['median_proxy_cpu_seconds']:.3f} CPU-seconds per FETCH.")
    if ping:
        p = ping.details
        notes.append(f"- pingpong: {p['commands']} sequential NOOPs per round, median of {p['rounds']} rounds. "
                     f"The proxy process used {p['proxy_cpu_us_per_command']:.0f} µs of CPU per NOOP.")
    if append:
        a = append.details
        notes.append(f"- append: {a['commands']} sequential APPENDs of {a['message_bytes']} bytes with LITERAL+ "
                     f"per round, median of {a['rounds']} rounds. The proxy process used "
                     f"{a['proxy_cpu_us_per_command']:.0f} µs of CPU per APPEND.")
    for r in (bulk, ping):
        if r is not None and r.details["proxy_log_bytes"] > LOG_NOISE_BYTES:
            notes.append(f"- {r.name}: the proxy wrote {r.details['proxy_log_bytes'] / 1024:.0f} KiB of log "
                         "during the timed runs (per-command/response logging costs throughput).")
    if idle:
        i = idle.details
        notes.append(f"- idle_sessions: {i['requested']} sessions (LOGIN + SELECT INBOX + IDLE) over "
                     f"{IDLE_USERS} users, opened in {i['open_seconds']:.1f} s "
                     f"({i['opened'] / max(i['open_seconds'], 1e-9):.0f}/s), each holding "
                     f"{i['proxy_fds_per_session'] - 1:.2f} backend connections; proxy RSS after they all "
                     f"logged out: {i['rss_after_close_kib'] / 1024:.1f} MiB.")
        if i["error_count"]:
            notes.append(f"- idle_sessions errors ({i['error_count']}): {i['errors'][:3]}")
        if i["dovecot_limit_warnings"]:
            notes.append(f"- Dovecot hit a limit: {i['dovecot_limit_warnings'][:2]}")
    quick_note = "**Quick (smoke) run: sizes are reduced, numbers are not representative.**\n\n" if quick else ""
    return f"""# cpmproxy benchmark results

{quick_note}{markdown_table(results)}

{chr(10).join(notes)}

Command: `{command}` (run from the repository root; took {elapsed:.0f} s)

Date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}

Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']};
Python {m['python']}, Twisted {m['twisted']}, Dovecot {m['dovecot']}.
Dovecot, the proxy and the benchmark client all run on this machine, over plaintext loopback.
Proxy plugins loaded: {', '.join(m['plugins']) or 'none'}.
1-minute load average before the run: {m['load_before']:.2f}{busy}.
"""


# -- main ------------------------------------------------------------------------------------------


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark cpmproxy against a direct Dovecot connection.")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in well under a minute")
    p.add_argument("--only", action="append", choices=SCENARIOS, metavar="NAME",
                   help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    p.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    p.add_argument("--results", metavar="PATH", default=str(ROOT / "bench" / "RESULTS.md"),
                   help="Markdown report (default: bench/RESULTS.md)")
    p.add_argument("--plugins", default="installed", metavar="LIST",
                   help="proxy plugins: 'installed' (default: every installed plugin, as a config without "
                        "a plugins key), 'none', or a comma-separated list")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, mail) afterwards")
    return p.parse_args(argv)


def proxy_plugins(spec: str) -> tuple[list[str] | None, list[str]]:
    """``--plugins`` as ProxyProcess wants it (None: all installed) and the names actually loaded."""
    if spec == "installed":
        return None, sorted(ep.name for ep in entry_points(group="cpmproxy.plugins"))
    names = [] if spec == "none" else [n.strip() for n in spec.split(",") if n.strip()]
    return names, names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    plugins, plugin_names = proxy_plugins(args.plugins)
    selected = [name for name in RUN_ORDER if not args.only or name in args.only]
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["bench/run.py", *argv])])
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # clean up on kill, as on Ctrl-C
    raise_nofile_limit()

    users = {"bulk": "bulkpw", "ping": "pingpw"}
    idle_users = [f"idle{i:02d}" for i in range(IDLE_USERS)]
    users.update({u: f"{u}pw" for u in idle_users})

    load_before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix="cpmbench-"))
    dovecot = proxy = None
    results: list[Result] = []
    failed = interrupted = False
    t_start = time.monotonic()
    try:
        dovecot = Dovecot(workdir / "dovecot", users=users, extra_config=dovecot_extra_config(sizes.idle_sessions))
        dovecot.start()
        proxy = ProxyProcess(workdir / "proxy", dovecot.port, backend_tls="none", config_extra=PROXY_LIMITS,
                             plugins=plugins)
        proxy.start()

        seeded = 0
        if "bulk" in selected:
            seeded = seed_mailbox(dovecot, "bulk", sizes.bulk_messages, sizes.bulk_message_size)

        runners: dict[str, Callable[[], Result]] = {
            "idle_sessions": lambda: scenario_idle_sessions(dovecot, proxy, sizes, idle_users),
            "pingpong": lambda: scenario_pingpong(dovecot, proxy, sizes, "ping"),
            "append": lambda: scenario_append(dovecot, proxy, sizes, "ping"),
            "bulk": lambda: scenario_bulk(dovecot, proxy, sizes, "bulk", seeded),
        }
        for name in selected:
            results.append(runners[name]())
            if proxy.proc is None or proxy.proc.poll() is not None:
                raise BenchError(f"the proxy exited during {name}:\n{proxy.log()}")
    except KeyboardInterrupt:
        interrupted = True
        print("bench: interrupted, cleaning up", file=sys.stderr)
    except Exception as e:
        # Report what broke and where the logs are (kept); a traceback for anything unexpected.
        failed = True
        if not isinstance(e, (BenchError, OSError, asyncio.TimeoutError)):
            traceback.print_exc()
        print(f"bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        if proxy is not None:
            print(f"bench: proxy log: {proxy.log_path}", file=sys.stderr)
        if dovecot is not None:
            print(f"bench: dovecot log: {dovecot.log_path}", file=sys.stderr)
    finally:
        # A second Ctrl-C must not interrupt the cleanup and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proxy is not None:
            proxy.stop()
        if dovecot is not None:
            dovecot.close()  # waits for the master and every worker to exit
        if failed or args.keep:
            print(f"bench: work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed or interrupted:
        return 130 if interrupted else 2

    elapsed = time.monotonic() - t_start
    machine = machine_info()
    machine.update(load_before=load_before, plugins=plugin_names)
    if load_before > BUSY_LOAD:
        print(f"bench: warning: load average was {load_before:.2f} before the run; results are noisy",
              file=sys.stderr)
    table = markdown_table(results)
    print(table)
    report = results_markdown(results, machine, command, args.quick, elapsed)
    Path(args.results).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command, "quick": args.quick, "machine": machine, "sizes": asdict(sizes),
            "elapsed_seconds": elapsed,
            "results": [asdict(r) for r in results],
        }, indent=2, ensure_ascii=False) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
