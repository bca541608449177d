"""A real sync client through the proxy: Debian's ``mbsync`` (isync 1.4) against Dovecot directly and via
the proxy must produce identical Maildirs, on a first full sync, after server-side changes, and when
pushing local changes back.

Each sync runs ``mbsync`` as a subprocess with a generated config (``SSLType None``, LOGIN/PLAIN over
loopback, ``SyncState *``), into its own empty Maildir.  Maildirs are compared as sets of
(sha256 of the file without mbsync's ``X-TUID:`` line, maildir flags from the ``:2,`` suffix).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import random
import shutil
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import imapclient
import pytest
from imapclient.imap_utf7 import encode as mutf7_encode

from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import make_object

MBSYNC = shutil.which("mbsync")
pytestmark = pytest.mark.skipif(MBSYNC is None, reason="mbsync (isync) is not installed")

USER = "bob"
PASSWORD = "bobpw"
T0 = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.timezone.utc)

# -- server-side content ---------------------------------------------------------------------------


def _email(subject: str, body: bytes, *, headers: bytes = b"", seed: int = 0) -> bytes:
    return (b"From: Alice Example <alice@example.com>\r\nTo: bob@example.com\r\n"
            b"Date: Fri, 01 Mar 2024 09:30:00 +0000\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Message-ID: <" + uuid.UUID(int=random.Random(seed).getrandbits(128)).hex.encode()
            + b"@mbsync.example.com>\r\nMIME-Version: 1.0\r\n" + headers + b"\r\n" + body)


@functools.cache
def _corpus() -> list[tuple[bytes, tuple[bytes, ...]]]:
    """(message, flags): every CPM kind, plain e-mails, 8-bit and binary bodies, 1 KB .. 1 MB."""
    seen, flagged, answered = imapclient.SEEN, imapclient.FLAGGED, imapclient.ANSWERED
    rnd = random.Random(4711)
    obj = []
    for i, (kind, kw) in enumerate([
        ("chat", {}),  # raw UTF-8 (8-bit) body
        ("imdn", {}),
        ("file-transfer", {"variant": "cpim"}),
        ("file-transfer", {"variant": "related", "group": True}),
        ("sms", {"size": 4000}),
        ("mms", {}),
        ("session-info", {"group": True}),
        ("group-state", {"group": True}),
        ("other", {"variant": "email"}),
        ("other", {"variant": "voicemail", "size": 60_000}),
        ("chat", {"size": 200_000, "text": "Gr\u00fc\u00dfe aus K\u00f6ln \u2013 \U0001f600 "}),
        ("sms", {"size": 1_000_000}),
    ]):
        obj.append(make_object(kind, date=T0 - dt.timedelta(hours=i), seed=100 + i, **kw))
    latin1 = _email("8-bit Latin-1", "Gr\u00fc\u00dfe, \u00e9t\u00e9 \u00e0 Z\u00fcrich\r\n".encode("latin-1") * 40,
                    headers=b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n",
                    seed=1)
    # Binary without NUL: every other octet value, including bare CR and LF.
    blob = bytes(b for b in rnd.randbytes(30_000) if b != 0)
    binary = _email("binary attachment", blob + b"\r\n",
                    headers=b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n",
                    seed=2)
    plain = _email("plain text", b"Hello Bob,\r\n\r\n" + b"just some ASCII text.\r\n" * 100, seed=3)
    flag_sets: list[tuple[bytes, ...]] = [
        (), (seen,), (seen, flagged), (answered, seen), (imapclient.DRAFT,), (b"$Forwarded", seen),
        (flagged,), (seen, answered, flagged), (b"$Label1",),
    ]
    messages = obj + [latin1, binary, plain]
    return [(m, flag_sets[i % len(flag_sets)]) for i, m in enumerate(messages)]


def _nul_message() -> bytes:
    """A message with NUL octets: only storable with a BINARY literal8 APPEND."""
    return _email("NUL octets", b"before\x00\x00after\r\n\x01\x02\x03\xfe\xff\r\n",
                  headers=b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n",
                  seed=4)


@pytest.fixture
def server_folders(dovecot):
    """A fresh folder tree for USER directly on Dovecot: ``<base>`` and ``<base>/Grüße`` (mUTF-7)."""
    base = "mbs-" + uuid.uuid4().hex[:10]
    sub = base + "/Gr\u00fc\u00dfe"
    c = dovecot.imap_direct(USER, tls="none")
    try:
        c.create_folder(base)
        c.create_folder(sub)
        for i, (msg, flags) in enumerate(_corpus()):
            c.append(base, msg, flags=flags, msg_time=T0 - dt.timedelta(minutes=i))
        for i in range(3):
            c.append(sub, make_object("chat", seed=900 + i, text=f"Unterordner {i} \u00e4\u00f6\u00fc"),
                     flags=(imapclient.SEEN,) if i else (), msg_time=T0)
    finally:
        c.logout()
    with RawIMAP(dovecot.host, dovecot.port) as r:
        assert r.login(USER, PASSWORD)[-1].startswith(b"L OK")
        nul = _nul_message()
        resp = r.command(b"a", b"APPEND %s (\\Seen) ~{%d+}\r\n%s" % (base.encode(), len(nul), nul))
        assert resp[-1].startswith(b"a OK"), resp
    yield base, sub
    c = dovecot.imap_direct(USER, tls="none")
    try:
        names = sorted((name for _, _, name in c.list_folders(base)), key=len, reverse=True)
        for name in names:
            c.delete_folder(name)
    finally:
        c.logout()


# -- mbsync ----------------------------------------------------------------------------------------


class Sync:
    """One mbsync setup: a config file, a Maildir and (through SyncState *) its state."""

    def __init__(self, workdir: Path, name: str, host: str, port: int, pattern: str, *,
                 auth: str = "LOGIN", use_passcmd: bool = False):
        self.dir = workdir / name
        self.maildir = self.dir / "Maildir"
        self.maildir.mkdir(parents=True)
        self.name = name
        self.host, self.port, self.pattern = host, port, pattern
        self.auth = auth
        self.use_passcmd = use_passcmd

    def config(self, sync: str, create: str = "Near", expunge: str = "Near") -> Path:
        password = f'PassCmd "printf %s {PASSWORD}"' if self.use_passcmd else f"Pass {PASSWORD}"
        text = f"""\
IMAPAccount {self.name}
Host {self.host}
Port {self.port}
User {USER}
{password}
SSLType None
AuthMechs {self.auth}
Timeout 30

IMAPStore {self.name}-far
Account {self.name}

MaildirStore {self.name}-near
Path {self.maildir}/
Inbox {self.maildir}/INBOX
SubFolders Verbatim

Channel {self.name}
Far :{self.name}-far:
Near :{self.name}-near:
Patterns {self.pattern} {self.pattern}/*
Create {create}
Expunge {expunge}
SyncState *
Sync {sync}
CopyArrivalDate yes
"""
        path = self.dir / f"mbsyncrc-{sync.replace(' ', '-').lower()}"
        path.write_text(text)
        return path

    def run(self, sync: str = "Pull", **kw: str) -> subprocess.CompletedProcess:
        cfg = self.config(sync, **kw)
        env = dict(os.environ, HOME=str(self.dir))
        _backdate_dirs(self.maildir)
        res = subprocess.run([MBSYNC, "-V", "-c", str(cfg), self.name], capture_output=True, text=True,
                             timeout=60, env=env, cwd=self.dir)
        assert res.returncode == 0, (f"mbsync {self.name} ({sync}) failed with {res.returncode}\n"
                                     f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}")
        return res


def _backdate_dirs(root: Path) -> None:
    """mbsync waits for the clock to tick past a Maildir directory's mtime (so it cannot miss a
    change made in the same second): set the directories we just changed into the past."""
    past = time.time() - 10
    for d in [root, *root.rglob("*")]:
        if d.is_dir():
            os.utime(d, (past, past))


def _strip_tuid(data: bytes) -> bytes:
    head, sep, body = data.partition(b"\n\n")
    lines = [ln for ln in head.split(b"\n") if not ln.lower().startswith(b"x-tuid:")]
    return b"\n".join(lines) + sep + body


def _maildir_flags(filename: str) -> str:
    _, sep, info = filename.rpartition(":2,")
    return "".join(sorted(info)) if sep else ""


def maildir_snapshot(root: Path) -> dict[str, Counter]:
    """folder (relative path) -> Counter of (content sha256, flags) over cur/ and new/."""
    out: dict[str, Counter] = {}
    for cur in sorted(root.rglob("cur")):
        folder = cur.parent
        entries: Counter = Counter()
        for sub in ("cur", "new"):
            for f in (folder / sub).iterdir():
                digest = hashlib.sha256(_strip_tuid(f.read_bytes())).hexdigest()[:16]
                entries[(digest, _maildir_flags(f.name))] += 1
        out[str(folder.relative_to(root))] = entries
    return out


def _describe_diff(a: dict[str, Counter], b: dict[str, Counter]) -> str:
    lines = []
    for folder in sorted(set(a) | set(b)):
        ca, cb = a.get(folder, Counter()), b.get(folder, Counter())
        if ca != cb:
            lines.append(f"{folder}: only direct {sorted((ca - cb).elements())}, "
                         f"only proxy {sorted((cb - ca).elements())}")
    return "\n".join(lines)


def assert_same_maildirs(direct: Sync, proxied: Sync) -> dict[str, Counter]:
    a, b = maildir_snapshot(direct.maildir), maildir_snapshot(proxied.maildir)
    assert a == b, "Maildirs differ:\n" + _describe_diff(a, b)
    return a


def _folder_keys(base: str, sub: str) -> tuple[str, str]:
    # isync 1.4 keeps IMAP's modified UTF-7 in local names.
    return base, base + "/" + mutf7_encode(sub.split("/", 1)[1]).decode()


# -- tests -------------------------------------------------------------------------------------------


def test_mbsync_pull_direct_and_via_proxy_identical(dovecot, proxy, server_folders, tmp_path):
    base, sub = server_folders
    direct = Sync(tmp_path, "direct", dovecot.host, dovecot.port, base)
    proxied = Sync(tmp_path, "proxied", proxy.host, proxy.port, base, use_passcmd=True)

    t = time.monotonic()
    direct.run()
    proxied.run()
    snap = assert_same_maildirs(direct, proxied)
    kbase, ksub = _folder_keys(base, sub)
    assert set(snap) == {kbase, ksub}, sorted(snap)
    n_corpus = len(_corpus()) + 1  # + the NUL message
    assert sum(snap[kbase].values()) == n_corpus
    assert sum(snap[ksub].values()) == 3
    flags = Counter(f for _, f in snap[kbase].elements())
    for expected in ("", "S", "FS", "RS", "D", "PS", "F", "FRS"):
        assert flags[expected], (expected, flags)
    # The 1 MB object made it whole (maildir stores LF line ends).
    sizes = sorted(f.stat().st_size for f in (proxied.maildir / base).rglob("*") if f.is_file()
                   and f.parent.name in ("cur", "new"))
    assert sizes[-1] > 950_000

    # Server-side changes, then incremental syncs on both sides.
    c = dovecot.imap_direct(USER, tls="none")
    try:
        c.append(base, _email("arrived later", "neu: \u00e4\u00f6\u00fc\r\n".encode(), seed=77),
                 flags=(imapclient.FLAGGED,), msg_time=T0)
        c.select_folder(base)
        uids = sorted(c.search("ALL"))
        c.add_flags(uids[0], [imapclient.FLAGGED, imapclient.ANSWERED])
        c.remove_flags(uids[1], [imapclient.SEEN])
        c.set_flags(uids[2], [imapclient.SEEN, b"$Forwarded"])
        c.add_flags(uids[3:5], [imapclient.DELETED])
        c.expunge()
        c.select_folder(sub)
        c.add_flags(c.search("ALL"), [imapclient.SEEN])
    finally:
        c.logout()
    direct.run()
    proxied.run()
    snap2 = assert_same_maildirs(direct, proxied)
    assert sum(snap2[kbase].values()) == n_corpus - 2 + 1
    assert {f for _, f in snap2[ksub]} == {"S"}
    assert snap2 != snap

    # A third run with nothing to do changes nothing.
    proxied.run()
    assert maildir_snapshot(proxied.maildir) == snap2
    assert time.monotonic() - t < 30


def test_mbsync_push_via_proxy(dovecot, proxy, server_folders, tmp_path):
    base, sub = server_folders
    proxied = Sync(tmp_path, "proxied", proxy.host, proxy.port, base, auth="PLAIN")
    proxied.run("All")
    folder = proxied.maildir / base
    before = maildir_snapshot(proxied.maildir)

    # A new local message (seen + flagged) and a new local folder, pushed back through the proxy.
    mid = f"<push-{uuid.uuid4().hex}@mbsync.example.com>"
    msg = (f"From: Bob <bob@example.com>\nTo: alice@example.com\nSubject: pushed \u00fcber den Proxy\n"
           f"Message-ID: {mid}\nDate: Fri, 01 Mar 2024 10:00:00 +0000\nMIME-Version: 1.0\n"
           f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           f"Gr\u00fc\u00dfe vom Client.\n").encode() + b"line\n" * 3000
    local = folder / "cur" / f"{int(time.time())}.push1.testhost:2,FS"
    local.write_bytes(msg)
    os.utime(local, (T0.timestamp(), T0.timestamp()))
    newbox = proxied.maildir / base / "Pushed"
    for d in ("cur", "new", "tmp"):
        (newbox / d).mkdir(parents=True)
    (newbox / "new" / f"{int(time.time())}.push2.testhost").write_bytes(
        b"From: bob@example.com\nSubject: in a new folder\nMessage-ID: <push2@x>\n\nhi\n")
    # A local flag change on a message that came from the server.
    first = sorted((folder / "cur").iterdir())[0]
    flags = _maildir_flags(first.name)
    if "F" not in flags:
        first.rename(first.with_name(first.name.split(":2,")[0] + ":2," + "".join(sorted(flags + "F"))))
    proxied.run("Push", create="Both")

    c = dovecot.imap_direct(USER, tls="none")
    try:
        c.select_folder(base, readonly=True)
        found = c.search(["HEADER", "Message-ID", mid])
        assert len(found) == 1, found
        data = c.fetch(found, ["FLAGS", "BODY.PEEK[]", "INTERNALDATE"])[found[0]]
        assert set(data[b"FLAGS"]) == {imapclient.SEEN, imapclient.FLAGGED}
        server_copy = data[b"BODY[]"].replace(b"\r\n", b"\n")
        assert _strip_tuid(server_copy) == msg
        assert data[b"INTERNALDATE"].replace(tzinfo=None) == T0.astimezone().replace(tzinfo=None)
        flagged_before = sum(n for (_, f), n in before[base].items() if "F" in f)
        assert len(c.search(["FLAGGED"])) == flagged_before + 1 + ("F" not in flags)
        assert c.folder_exists(base + "/Pushed")
        c.select_folder(base + "/Pushed", readonly=True)
        assert len(c.search("ALL")) == 1
    finally:
        c.logout()

    # Pulling again through the proxy: the pushed messages stay single, nothing else changes.
    proxied.run("All", create="Both")
    after = maildir_snapshot(proxied.maildir)
    assert sum(after[base].values()) == sum(before[base].values()) + 1
    assert sum(after[base + "/Pushed"].values()) == 1
