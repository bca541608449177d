"""Soak: a real Dovecot and a proxy process (policy, localdelete, notify, push), many users and devices
logging in and out, SELECT of many folders, APPEND/EXPUNGE, local deletes, IDLE, NOTIFY, preference changes,
clients that drop the connection mid-command, SIGHUP reloads. Samples the proxy's RSS, open fds and its
connections to Dovecot, and the same after every client left (side_linger, offline_watch).

    .venv/bin/python bench/soak_leaks.py --minutes 5   (not a benchmark: watch its figures level off)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpmproxy.testing.certs import make_ca_and_cert  # noqa: E402
from cpmproxy.testing.dovecot import Dovecot  # noqa: E402
from cpmproxy.testing.proxyproc import ProxyProcess  # noqa: E402
from cpmproxy.testing.rawclient import RawIMAP  # noqa: E402
from cpmproxy.testing.sample import make_object  # noqa: E402
from tests.test_notify import _Receiver  # noqa: E402

PREF = b"/private/vendor/vendor.cpmproxy"
KINDS = ["chat", "imdn", "sms", "file-transfer", "other"]


def sample(p: ProxyProcess, backend_port: int) -> dict:
    pid = p.proc.pid
    rss = 0
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
    backend = sum(1 for line in out.splitlines() if f":{backend_port} " in line.split()[3] + " " and f"pid={pid}," in line)
    clients = sum(1 for line in out.splitlines() if line.split()[2].endswith(f":{p.port}") and f"pid={pid}," in line)
    return {"t": time.strftime("%H:%M:%S"), "rss_kb": rss, "fds": fds, "backend_conns": backend, "client_conns": clients}


class _Drop(Exception):
    pass


class Worker(threading.Thread):
    def __init__(self, p, users, stop, rng_seed, stats):
        super().__init__(daemon=True)
        self.p, self.users, self.stop, self.rng, self.stats = p, users, stop, random.Random(rng_seed), stats

    def run(self):
        while not self.stop.is_set():
            try:
                self.one()
                self.stats["ok"] += 1
            except Exception as e:  # noqa: BLE001
                self.stats["err"] += 1
                self.stats.setdefault("errs", []).append(repr(e)[:200])

    def one(self):
        r = self.rng
        user = r.choice(self.users)
        dev = f"dev{r.randrange(6)}"
        c = RawIMAP(self.p.host, self.p.port, timeout=15)
        if r.random() < 0.05:  # dropped during the login (the plugins' login reads under way)
            c.send(b'i ID ("x-cpm-device-id" "%s")\r\nL LOGIN %s %spw\r\n' % (dev.encode(), user.encode(), user.encode()))
            time.sleep(r.random() * 0.02)
            c.close()
            return
        try:
            c.command(b"i", b'ID ("name" "soak" "x-cpm-device-id" "%s")' % dev.encode())
            if not c.login(user, f"{user}pw")[-1].startswith(b"L OK"):
                raise RuntimeError("login failed")
            try:
                for _ in range(r.randrange(1, 8)):
                    self.step(c, r, user)
            except _Drop:
                c.sock.close()
                return
            if r.random() < 0.15:  # drop mid-command
                how = r.randrange(3)
                if how == 0:
                    c.send(b"a APPEND INBOX {5000}\r\n")
                    c.read_line()
                    c.send(b"x" * 100)
                elif how == 1:
                    c.send(b"f FETCH 1:* (BODY.PEEK[])\r\n")
                else:
                    c.send(b"s SELECT Default/tel:+1555000000")
                c.sock.close()
                return
            c.command(b"z", b"LOGOUT")
        finally:
            c.close()

    def step(self, c, r, user):
        folder = f"Default/tel:+1555{r.randrange(25):06d}"
        op = r.randrange(10)
        if op == 0:
            kind = r.choice(KINDS)
            msg = make_object(kind, text="soak %d" % r.randrange(10**9))
            c.send(b'a APPEND "%s" {%d+}\r\n' % (folder.encode(), len(msg)) + msg + b"\r\n")
            if b"TRYCREATE" in c.until_tagged(b"a")[-1]:
                c.command(b"c", b'CREATE "%s"' % folder.encode())
        elif op == 1:
            c.command(b"s", b'SELECT "%s"' % folder.encode())
            c.command(b"f", b"FETCH 1:* (UID FLAGS)")
        elif op == 2:  # real delete of a few
            c.command(b"s", b'SELECT "%s"' % folder.encode())
            c.command(b"d", b"STORE 1:2 +FLAGS (\\Deleted)")
            c.command(b"e", b"EXPUNGE")
        elif op == 3:  # local delete
            c.command(b"s", b'SELECT "%s"' % folder.encode())
            c.command(b"d", b"STORE 1 +FLAGS (\\Deleted $LocalDelete)")
            if r.random() < 0.7:
                c.command(b"e", b"EXPUNGE")
        elif op == 4:  # IDLE a moment
            c.command(b"s", b'SELECT "%s"' % folder.encode())
            c.send(b"t IDLE\r\n")
            c.read_line()
            time.sleep(r.random() * 1.5)
            if r.random() < 0.2:
                raise _Drop()  # (dropped in IDLE)
            c.send(b"DONE\r\n")
            c.until_tagged(b"t")
        elif op == 5:
            c.command(b"n", b"NOTIFY SET (selected (MessageNew MessageExpunge FlagChange)) "
                            b"(personal (MessageNew MessageExpunge MailboxName))")
            time.sleep(r.random() * 0.5)
            if r.random() < 0.5:
                c.command(b"n2", b"NOTIFY NONE")
        elif op == 6:
            v = r.choice([b"on", b"off"])
            c.command(b"p", b'SETMETADATA "" (' + PREF + b"/notifications " + v + b")")
        elif op == 7:
            v = r.choice([b"on", b"off", b"NIL"])
            k = r.choice([b"imdn", b"chat", b"session-history"])
            c.command(b"p", b'SETMETADATA "" (' + PREF + b"/sync/" + k + b" " + v + b")")
        elif op == 8:
            c.command(b"l", b'LIST "" "*" RETURN (STATUS (MESSAGES UIDNEXT))')
        else:
            c.command(b"st", b'STATUS "%s" (MESSAGES UIDNEXT UNSEEN)' % folder.encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--linger", type=float, default=5)
    ap.add_argument("--offline", type=float, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpm-soak-"))
    users = {f"soak{i}": f"soak{i}pw" for i in range(args.users)}
    d = Dovecot(work / "dovecot", users=users)
    d.start()
    certs = make_ca_and_cert(work / "certs")
    receiver = _Receiver(certs)
    receiver.start()
    pw = work / "master.pw"
    pw.write_text("adminpw\n")
    extra = (f'[policy]\nnotifications = "allowed"\nsync = {{ imdn = false }}\n'
             f'[[policy.class]]\nname = "odd"\nusers = ["*"]\ndevices = ["dev1", "dev3"]\ndelete_mode = "local"\n'
             f'[plugin.push]\nurl = "https://localhost:{receiver.port}/cpm"\nca_file = "{certs.ca_cert}"\n'
             f"backoff = 0.2\noffline_watch = {args.offline}\n"
             f'[admin]\nmaster_user = "admin"\nmaster_password_file = "{pw}"\n')
    p = ProxyProcess(work / "proxy", d.port, config_extra=extra,
                     backend_extra=f"side_linger = {args.linger}",
                     plugins=["policy", "localdelete", "notify", "push", "readreport"])
    p.start()
    print("work", work, "proxy pid", p.proc.pid, "port", p.port, "dovecot", d.port, flush=True)
    samples = [("start", sample(p, d.port))]
    print(samples[-1], flush=True)
    stop = threading.Event()
    stats = {"ok": 0, "err": 0}
    workers = [Worker(p, list(users), stop, i, stats) for i in range(args.workers)]
    for w in workers:
        w.start()
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    last_hup = t0
    while time.monotonic() < end:
        time.sleep(10)
        if time.monotonic() - last_hup > 60:
            p.signal(signal.SIGHUP)
            last_hup = time.monotonic()
        s = sample(p, d.port)
        s["ops_ok"], s["ops_err"] = stats["ok"], stats["err"]
        samples.append(("load", s))
        print(samples[-1], flush=True)
    stop.set()
    for w in workers:
        w.join(30)
    print("errors (first 10):", stats.get("errs", [])[:10], flush=True)
    for label, wait in (("after-clients+1s", 1), ("after-linger", args.linger + 3),
                        ("after-offline", args.offline + 10), ("later", 30)):
        time.sleep(wait)
        samples.append((label, sample(p, d.port)))
        print(samples[-1], flush=True)
    metrics = p.metrics_port
    try:
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        print("\n".join(line for line in body.splitlines()
                        if line.startswith("cpmproxy_") and not line.startswith("cpmproxy_command")), flush=True)
    except Exception as e:  # noqa: BLE001
        print("metrics:", e)
    print("pushes received:", len(receiver.events))
    if os.environ.get("SOAK_KEEP"):
        print("keeping processes; Ctrl-C to end")
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            pass
    p.stop()
    receiver.stop()
    d.close()


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    main()
