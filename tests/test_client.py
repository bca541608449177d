"""The reference CPM Message Storage Client (``cpm-sync``) end to end: through real proxy processes in
front of the session's real Dovecot, driven as users drive it (the CLI in a subprocess) and as a library.

Every test works in folders of its own (users share mailboxes across the test session); Dovecot reached
directly is the reference for what the server holds.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import imapclient
import pytest

from cpmproxy.client import LocalStore, ServerSettings, Syncer, connect
from cpmproxy.client.errors import (
    ConnectionLost,
    Interrupted,
    ProtocolError,
    ServerRefused,
    ServerUnavailable,
)
from cpmproxy.client.sync import SyncOptions
from cpmproxy.client.watch import Stopper, Watcher, WatchOptions
from cpmproxy.testing.dovecot import parse_appenduid
from cpmproxy.testing.rawclient import RawIMAP
from cpmproxy.testing.sample import classify_reference, make_object

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cpmproxy.client"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop("CPM_SYNC_TRACE", None)

# One object of every kind (and both file-transfer encodings), some with flags.
KIND_SET = [("chat", {}), ("imdn", {}), ("file-transfer", {"variant": "cpim"}),
            ("file-transfer", {"variant": "related", "group": True}), ("sms", {}), ("mms", {}),
            ("session-info", {"group": True}), ("group-state", {"group": True}), ("other", {}),
            ("other", {"variant": "voicemail"})]


def unique_folder(prefix: str = "Default/tel:+1777") -> str:
    return prefix + uuid.uuid4().hex[:10]


def seed(dovecot, user: str, folder: str, messages: Iterable[bytes], flags: Callable[[int], tuple] = lambda i: ()) \
        -> list[int]:
    """APPEND to ``folder`` straight on Dovecot (created if needed); returns the UIDs."""
    c = dovecot.imap_direct(user, tls="none")
    try:
        if not c.folder_exists(folder):
            c.create_folder(folder)
        return [parse_appenduid(c.append(folder, m, flags=flags(i))) for i, m in enumerate(messages)]
    finally:
        c.logout()


def server_messages(dovecot, user: str, folder: str) -> dict[int, tuple[bytes, set[str]]]:
    """uid -> (bytes, flags) as Dovecot has them."""
    c = dovecot.imap_direct(user, tls="none")
    try:
        c.select_folder(folder, readonly=True)
        uids = c.search("ALL")
        data = c.fetch(uids, ["BODY.PEEK[]", "FLAGS"]) if uids else {}
        return {uid: (d[b"BODY[]"], {f.decode() for f in d[b"FLAGS"] if f != b"\\Recent"}) for uid, d in data.items()}
    finally:
        c.logout()


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Device:
    """One device of a user: its own store and device id, and how it reaches the server."""

    def __init__(self, tmp_path: Path, name: str, user: str, port: int, *, tls: str = "none",
                 ca_file: str | None = None, password: str | None = None) -> None:
        self.name, self.user, self.port, self.tls, self.ca_file = name, user, port, tls, ca_file
        self.store_dir = tmp_path / f"store-{name}"
        self.pwfile = tmp_path / f"pw-{name}"
        self.pwfile.write_text((password or f"{user}pw") + "\n")

    def args(self, *cmd: str) -> list[str]:
        out = [*CLI, "--server", f"127.0.0.1:{self.port}", "--user", self.user, "--password-file",
               str(self.pwfile), "--device-id", self.name, "--store", str(self.store_dir), "--tls", self.tls]
        if self.ca_file:
            out += ["--ca-file", self.ca_file]
        return out + list(cmd)

    def run(self, *cmd: str, ok: bool = True, env: dict | None = None, timeout: float = 60) \
            -> subprocess.CompletedProcess:
        res = subprocess.run(self.args(*cmd), capture_output=True, text=True, env=env or ENV, timeout=timeout)
        if ok:
            assert res.returncode == 0, f"{cmd} failed ({res.returncode}): {res.stderr}{res.stdout}"
        return res

    def sync(self, *folders: str, **kw) -> subprocess.CompletedProcess:
        return self.run("sync", *folders, **kw)

    def index(self, folder: str) -> dict:
        with LocalStore(self.store_dir) as store:
            f = store.folder(folder)
            return {} if f is None else store.messages(f)

    def folder_state(self, folder: str):
        with LocalStore(self.store_dir) as store:
            return store.folder(folder)

    def folder_dir(self, folder: str) -> Path:
        return self.store_dir / "maildir" / folder

    def files(self, folder: str, sub: str = "cur") -> list[str]:
        d = self.folder_dir(folder) / sub
        return sorted(os.listdir(d)) if d.is_dir() else []


@pytest.fixture
def device(tmp_path, proxy, proxy_certs):
    """``device(name, user=..., via=proxy, tls=...)``; by default through the session proxy with STARTTLS
    and the test CA, as a real client would."""

    def make(name: str, user: str = "alice", via=None, tls: str | None = None, **kw) -> Device:
        p = via or proxy
        if tls is None:
            tls = "starttls" if via is None else "none"
        ca = str(proxy_certs.ca_cert) if tls != "none" else None
        return Device(tmp_path, name, user, p.port, tls=tls, ca_file=ca, **kw)

    return make


def _watch_in_thread(w) -> tuple[threading.Thread, list[BaseException]]:
    """``w.run()`` in a daemon thread; what it raises lands in the list returned."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.run()
        except Exception as e:  # reported by the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def fetched_body_uids(trace: str) -> list[int]:
    """UIDs in the body FETCH commands of a CPM_SYNC_TRACE."""
    out: list[int] = []
    for m in re.finditer(r"C: \S+ UID FETCH (\S+) \(UID FLAGS INTERNALDATE BODY\.PEEK\[\]\)", trace):
        for part in m.group(1).split(","):
            lo, _, hi = part.partition(":")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def status_line(dev: Device, folder: str) -> str:
    out = dev.run("status").stdout
    return next(ln for ln in out.splitlines() if ln.startswith(folder + " "))


def set_preference(p, user: str, folder: str, key: str, value: str) -> None:
    """A CPM preference on ``folder`` (``sync/imdn`` ...), set through the proxy as a device would."""
    c = RawIMAP(p.host, p.port)
    try:
        assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
        r = c.command(b"m", b'SETMETADATA "%s" (/private/vendor/vendor.cpmproxy/%s "%s")'
                      % (folder.encode(), key.encode(), value.encode()))
        assert r[-1].startswith(b"m OK"), r
    finally:
        c.close()


def dead_port() -> tuple[object, int]:
    """A port bound and never listening (connection refused), and the socket to close afterwards."""
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


# -- explicit sync (5.5.2.20.2 a) ----------------------------------------------------------------------


def test_first_sync_over_tls_stores_files_index_and_kinds(dovecot, proxy, device):
    folder = unique_folder()
    msgs = [make_object(kind, seed=i, **kw) for i, (kind, kw) in enumerate(KIND_SET)]
    uids = seed(dovecot, "alice", folder, msgs,
                flags=lambda i: (b"\\Seen",) if i % 2 else (b"\\Flagged", b"$Work") if i % 3 == 0 else ())
    a = device("phone-first")
    res = a.sync(folder)
    assert f"{folder}: new folder, {len(msgs)} new" in res.stdout

    # The device identified itself (ID x-cpm-device-id, before LOGIN) and the proxy knew it.
    assert "device=phone-first" in proxy.log()

    server = server_messages(dovecot, "alice", folder)
    index = a.index(folder)
    assert sorted(index) == sorted(uids) == sorted(server)
    letters = {"\\Seen": "S", "\\Flagged": "F"}
    for uid, rec in index.items():
        data, flags = server[uid]
        path = a.folder_dir(folder) / "cur" / rec.filename
        assert path.read_bytes() == data
        assert rec.kind == classify_reference(data)
        assert rec.size == len(data)
        assert set(rec.flags) == flags
        assert rec.filename.endswith(":2," + "".join(sorted(letters[f] for f in flags if f in letters)))
    assert sorted(r.kind for r in index.values()) == sorted(k for k, _ in KIND_SET)
    assert a.files(folder, "tmp") == [] and a.files(folder, "new") == []
    assert (a.store_dir / "maildir" / "Default" / folder.split("/")[1] / "cur").is_dir()  # ':' kept as is

    # The folder state matches the server's.
    c = dovecot.imap_direct("alice", tls="none")
    st = c.folder_status(folder, ["UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ"])
    c.logout()
    state = a.folder_state(folder)
    assert (state.uidvalidity, state.uidnext, state.highestmodseq) == (
        st[b"UIDVALIDITY"], st[b"UIDNEXT"], st[b"HIGHESTMODSEQ"])
    assert state.last_sync is not None

    # status: server vs local, in sync; --verbose shows kinds; list shows each object's kind.
    out = a.run("status", "--verbose").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith(folder))
    assert re.search(rf"\s{len(msgs)}\s+{len(msgs)}\s.*in sync", line), line
    assert "file-transfer 2" in line and "session-info 1" in line
    listing = a.run("list", folder).stdout
    for uid, rec in index.items():
        assert re.search(rf"^\s*{uid}\s+{rec.kind}\s", listing, re.M)


def test_incremental_sync_fetches_only_what_changed(dovecot, device):
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(12)])
    a = device("phone-incr")
    a.sync(folder)
    inodes = {name: (a.folder_dir(folder) / "cur" / name).stat().st_ino for name in a.files(folder)}

    c = dovecot.imap_direct("alice", tls="none")
    c.select_folder(folder)
    c.add_flags([uids[0]], [b"\\Flagged"])
    c.delete_messages([uids[1]])
    c.expunge()
    c.logout()
    new = seed(dovecot, "alice", folder, [make_object("sms", seed=100 + i) for i in range(3)])

    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "3 new" in res.stdout and "1 flag changes" in res.stdout and "1 removed" in res.stdout
    # Only the three new messages were downloaded; QRESYNC reported the rest (VANISHED, FETCH FLAGS).
    assert sorted(fetched_body_uids(res.stderr)) == new
    assert "QRESYNC" in res.stderr
    index = a.index(folder)
    assert sorted(index) == sorted([uids[0], *uids[2:], *new])
    assert "\\Flagged" in index[uids[0]].flags and index[uids[0]].filename.endswith(":2,F")
    assert [index[u].kind for u in new] == ["sms"] * 3
    # Untouched messages kept their files (same inode: never rewritten).
    for uid in uids[2:]:
        assert (a.folder_dir(folder) / "cur" / index[uid].filename).stat().st_ino == inodes[index[uid].filename]

    # Nothing changed: step a.1 (LIST-STATUS) says so and the folder is not even opened.
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "0 changed" in res.stdout
    assert "EXAMINE" not in res.stderr and fetched_body_uids(res.stderr) == []


def test_uidvalidity_change_resyncs_from_scratch(dovecot, device):
    folder = unique_folder()
    seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(4)])
    a = device("phone-uidv")
    a.sync(folder)
    old_state, old_files = a.folder_state(folder), a.files(folder)
    assert len(old_files) == 4

    c = dovecot.imap_direct("alice", tls="none")
    c.delete_folder(folder)
    c.create_folder(folder)  # same name, new UIDVALIDITY
    c.logout()
    fresh = [make_object("mms", seed=50 + i) for i in range(2)]
    uids = seed(dovecot, "alice", folder, fresh)

    res = a.sync(folder)
    assert "UIDVALIDITY changed" in res.stdout
    state = a.folder_state(folder)
    assert state.uidvalidity != old_state.uidvalidity
    files = a.files(folder)
    assert not set(files) & set(old_files) and len(files) == 2
    assert all(f".V{state.uidvalidity}." in f for f in files)
    index = a.index(folder)
    assert sorted(index) == uids and {r.kind for r in index.values()} == {"mms"}
    assert sorted((a.folder_dir(folder) / "cur" / r.filename).read_bytes() for r in index.values()) == sorted(fresh)


def test_interrupted_sync_resumes_without_duplicates_or_loss(dovecot, device):
    folder = unique_folder()
    # 300 objects of ~50 KB, appended in one MULTIAPPEND (fast set-up).
    msgs = [make_object("chat", seed=i, size=50_000) for i in range(300)]
    c = dovecot.imap_direct("dave", tls="none")
    c.create_folder(folder)
    c.multiappend(folder, msgs)
    c.logout()

    a = device("phone-kill", user="dave")
    proc = subprocess.Popen(a.args("sync", folder), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        # SIGKILL as soon as message files start to appear: mid-fetch, nothing gets to clean up.
        wait_for(lambda: a.files(folder, "tmp") or a.files(folder, "cur") or proc.poll() is not None,
                 timeout=30, what="the first message files")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, "the sync finished before it could be interrupted"
    committed = set(a.index(folder))
    assert len(committed) < 300

    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    fetched = fetched_body_uids(res.stderr)
    # Resumed: what was committed is not downloaded again, everything else is, once.
    assert not committed & set(fetched) and len(fetched) == len(set(fetched)) == 300 - len(committed)
    server = server_messages(dovecot, "dave", folder)
    index = a.index(folder)
    assert sorted(index) == sorted(server) and len(index) == 300
    files = a.files(folder)
    assert len(files) == 300 and len({f.split(":")[0] for f in files}) == 300  # one file per UID
    assert sorted(r.filename for r in index.values()) == files
    assert a.files(folder, "tmp") == []
    for uid in (min(index), max(index), sorted(index)[150]):
        assert (a.folder_dir(folder) / "cur" / index[uid].filename).read_bytes() == server[uid][0]
    assert a.folder_state(folder).uidnext == max(server) + 1


def test_policy_hidden_objects_are_never_downloaded(dovecot, make_proxy, device):
    folder = unique_folder()
    kinds = ["chat", "imdn", "chat", "imdn", "sms", "imdn", "file-transfer"]
    seed(dovecot, "alice", folder, [make_object(k, seed=i) for i, k in enumerate(kinds)])
    p = make_proxy(backend_tls="none", config_extra='[policy]\nsync = { imdn = false }\n')
    a = device("phone-noimdn", via=p)
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    index = a.index(folder)
    assert sorted(r.kind for r in index.values()) == sorted(k for k in kinds if k != "imdn")
    for rec in index.values():
        assert classify_reference((a.folder_dir(folder) / "cur" / rec.filename).read_bytes()) != "imdn"
    assert "imdn" not in res.stderr.lower() or "message/imdn" not in res.stderr.lower()
    assert len(fetched_body_uids(res.stderr)) == len(kinds) - kinds.count("imdn")


def test_whole_account_sync_follows_the_folder_list(dovecot, proxy, device, sample_store):
    """``sync`` without folder names: every selectable folder, none of the \\Noselect ones; a folder
    deleted on the server disappears locally, children and all other folders untouched."""
    gone = unique_folder("Default/tel:+1666")
    seed(dovecot, "carol", gone, [make_object("chat", seed=1)])
    c = device("phone-account", user="carol")
    res = c.sync()
    assert "folders checked" in res.stdout
    # What this device sees through the proxy (preferences other tests set for carol may hide things).
    view = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False)
    view.id_({"name": "test", "x-cpm-device-id": "phone-account"})
    view.login("carol", "carolpw")
    selectable = {name for flags, _d, name in view.list_folders()
                  if not {b"\\Noselect", b"\\NonExistent"} & set(flags)}
    with LocalStore(c.store_dir) as store:
        local = {f.name: store.count(f) for f in store.folders()}
    assert set(local) == selectable
    for name in {e.mailbox for e in sample_store}:
        assert local[name] == view.select_folder(name, readonly=True)[b"EXISTS"]
    view.logout()
    direct = dovecot.imap_direct("carol", tls="none")
    direct.delete_folder(gone)
    direct.logout()
    res = c.sync()
    assert f"{gone}: gone from the server, removed locally (1 messages)" in res.stdout
    assert c.folder_state(gone) is None and not c.folder_dir(gone).exists()
    assert c.folder_dir(sample_store[0].mailbox).is_dir()


def test_preference_change_is_followed_though_uidnext_and_modseq_stay(dovecot, proxy, device):
    """A preference hides or shows messages of a folder with no new UID and no modseq to tell (only the
    proxy's MESSAGES moves): the counts differ, so status says so and sync reconciles the UID set."""
    folder = unique_folder()
    kinds = ["chat", "imdn", "chat", "imdn", "sms"]
    uids = seed(dovecot, "bob", folder, [make_object(k, seed=i) for i, k in enumerate(kinds)])
    imdns = [u for u, k in zip(uids, kinds, strict=True) if k == "imdn"]
    a = device("phone-pref", user="bob")
    a.sync(folder)
    assert sorted(a.index(folder)) == uids
    try:
        set_preference(proxy, "bob", folder, "sync/imdn", "off")
        assert re.search(r"\s3\s+5\s.*changed", status_line(a, folder))
        res = a.sync(folder)
        assert "2 removed" in res.stdout
        assert sorted(a.index(folder)) == [u for u in uids if u not in imdns]
        assert "in sync" in status_line(a, folder)

        set_preference(proxy, "bob", folder, "sync/imdn", "on")
        assert "changed" in status_line(a, folder)
        res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
        assert "2 new" in res.stdout
        assert sorted(fetched_body_uids(res.stderr)) == imdns  # only what was shown again, no bodies else
        assert sorted(a.index(folder)) == uids
        assert re.search(r"\s5\s+5\s.*in sync", status_line(a, folder))
    finally:
        set_preference(proxy, "bob", folder, "sync/imdn", "on")


def test_a_preference_swap_that_keeps_the_count_is_followed(dovecot, proxy, device):
    """Account preferences swapped (IMDNs shown again, SMS hidden: as many of each) move no UIDNEXT, no
    modseq and no count: sync and status took the folder as unchanged (a README limit). The proxy's
    XCPM-VIEW status item changes with the device's view; sync then compares the UID set."""
    folder = unique_folder()
    kinds = ["chat", "imdn", "sms", "imdn", "sms"]
    uids = seed(dovecot, "bob", folder, [make_object(k, seed=i) for i, k in enumerate(kinds)])
    of = {k: [u for u, kk in zip(uids, kinds, strict=True) if kk == k] for k in set(kinds)}
    a = device("phone-swap", user="bob")
    try:
        set_preference(proxy, "bob", "", "sync/imdn", "off")
        a.sync(folder)
        assert sorted(a.index(folder)) == sorted(of["chat"] + of["sms"])
        set_preference(proxy, "bob", "", "sync/imdn", "on")
        set_preference(proxy, "bob", "", "sync/sms", "off")
        assert re.search(r"\s3\s+3\s.*changed", status_line(a, folder))
        res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
        assert sorted(fetched_body_uids(res.stderr)) == of["imdn"]
        assert sorted(a.index(folder)) == sorted(of["chat"] + of["imdn"])
        assert re.search(r"\s3\s+3\s.*in sync", status_line(a, folder))
        assert "0 changed" in a.sync(folder).stdout  # (the new view's token kept: no compare again)
    finally:
        c = RawIMAP(proxy.host, proxy.port)
        assert c.login("bob", "bobpw")[-1].startswith(b"L OK")
        r = c.command(b"m", b'SETMETADATA "" (/private/vendor/vendor.cpmproxy/sync/imdn NIL '
                            b'/private/vendor/vendor.cpmproxy/sync/sms NIL)')
        c.close()
        assert r[-1].startswith(b"m OK"), r


def test_policy_change_is_followed_with_no_change_on_the_server(dovecot, make_proxy, device):
    """The provider's policy changes (proxy restarted with another config): nothing changed on the server,
    not even a modseq; only the counts tell. The folder's UIDs are compared (no bodies fetched again)."""
    folder = unique_folder()
    kinds = ["chat", "imdn", "chat", "imdn"]
    uids = seed(dovecot, "dave", folder, [make_object(k, seed=i) for i, k in enumerate(kinds)])
    imdns = [u for u, k in zip(uids, kinds, strict=True) if k == "imdn"]
    p = make_proxy(backend_tls="none")
    a = device("phone-policy-change", user="dave", via=p)
    a.sync(folder)
    open_config = p.config_path.read_text()

    def restart(config: str) -> None:
        p.stop()
        p.config_path.write_text(config)
        p.start()

    restart(open_config + "[policy]\nsync = { imdn = false }\n")
    assert re.search(r"\s2\s+4\s.*changed", status_line(a, folder))
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "2 removed" in res.stdout and fetched_body_uids(res.stderr) == []
    assert sorted(a.index(folder)) == [u for u in uids if u not in imdns]
    assert "in sync" in status_line(a, folder)
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "0 changed" in res.stdout and "EXAMINE" not in res.stderr  # and then it is quiet again

    restart(open_config)
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "2 new" in res.stdout and sorted(fetched_body_uids(res.stderr)) == imdns
    assert sorted(a.index(folder)) == uids
    assert re.search(r"\s4\s+4\s.*in sync", status_line(a, folder))


def test_restored_local_deletion_comes_back_on_an_incremental_sync(dovecot, make_proxy, device, tmp_path):
    """The operator restores a device's local deletion (``cpmproxy localdelete restore``): the proxy shows
    the message again (QRESYNC reports it as a FETCH of a UID below the device's UIDNEXT) and a normal
    sync downloads it."""
    folder = unique_folder()
    uids = seed(dovecot, "bob", folder, [make_object("chat", seed=i) for i in range(3)])
    pw = tmp_path / "admin.pw"
    pw.write_text("adminpw\n")
    p = make_proxy(backend_tls="none",
                   config_extra=f'[admin]\nmaster_user = "admin"\nmaster_password_file = "{pw}"\n')
    a = device("phone-restore", user="bob", via=p)
    a.sync(folder)
    a.run("delete", "--local", folder, str(uids[1]))
    assert sorted(a.index(folder)) == [uids[0], uids[2]]
    r = subprocess.run([sys.executable, "-m", "cpmproxy.cli", "--config", str(p.config_path), "localdelete",
                        "restore", "--user", "bob", "--device", "phone-restore", "--mailbox", folder],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=30)
    assert r.returncode == 0, r.stderr

    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "1 new" in res.stdout
    assert "QRESYNC" in res.stderr and fetched_body_uids(res.stderr) == [uids[1]]  # incremental, not a full pass
    assert sorted(a.index(folder)) == uids
    assert re.search(r"\s3\s+3\s.*in sync", status_line(a, folder))


# -- local changes to the server -------------------------------------------------------------------


def test_flag_and_delete_reach_the_server_and_the_other_device(dovecot, device):
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(5)])
    a, b = device("phone-ops-a"), device("tablet-ops-b")
    a.sync(folder)
    b.sync(folder)

    res = a.run("flag", folder, str(uids[0]), f"{uids[1]}:{uids[2]}", "+read")
    assert "+\\Seen on 3 message(s)" in res.stdout
    a.run("flag", folder, str(uids[0]), "-\\Seen")
    a.run("flag", folder, str(uids[3]), "+$Work")
    server = server_messages(dovecot, "alice", folder)
    assert server[uids[0]][1] == set() and server[uids[1]][1] == {"\\Seen"}
    assert server[uids[3]][1] == {"$Work"}
    idx = a.index(folder)
    assert idx[uids[1]].filename.endswith(":2,S") and idx[uids[3]].flags == ("$Work",)

    res = a.run("delete", folder, str(uids[4]))
    assert "deleted on the server" in res.stdout
    assert uids[4] not in server_messages(dovecot, "alice", folder)  # really gone from the server
    assert uids[4] not in a.index(folder)

    # The other device learns all of it on its next sync.
    res = b.sync(folder)
    assert "3 flag changes" in res.stdout and "1 removed" in res.stdout  # uids[0]: +Seen -Seen = unchanged
    idx = b.index(folder)
    assert sorted(idx) == uids[:4]
    assert idx[uids[2]].flags == ("\\Seen",) and idx[uids[3]].flags == ("$Work",)

    # Unknown UIDs: a clear failure, one line.
    res = a.run("delete", folder, "999999", ok=False)  # (it also said "0 message(s) deleted on the server")
    assert res.returncode == 1 and res.stdout == "" and res.stderr.strip().splitlines() == [
        f"cpm-sync: no such message in {folder}: UID 999999"]
    res = a.run("flag", folder, "999999", "+seen", ok=False)  # (it also said "+\\Seen on 0 message(s)")
    assert res.returncode == 1 and res.stdout == "" and res.stderr.strip().splitlines() == [
        f"cpm-sync: no such message in {folder}: UID 999999"]


@pytest.mark.parametrize("command", [["delete"], ["delete", "--local"], ["flag", "+flagged"]])
def test_no_delete_or_flag_on_a_folder_recreated_since_the_sync(dovecot, device, command):
    """The user's UIDs come from the local copy: in a folder recreated on the server (a new UIDVALIDITY)
    they name other messages, and ``delete 2`` deleted the new message 2 on the server."""
    folder = unique_folder()
    seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(2)])
    a = device("phone-stale")
    a.sync(folder)
    d = dovecot.imap_direct("alice", tls="none")
    d.delete_folder(folder)
    d.logout()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=10 + i) for i in range(2)])
    args = [command[0], *command[1:2 if command[0] == "delete" else 1], folder, str(uids[1])]
    if command[0] == "flag":
        args.append(command[1])
    res = a.run(*args, ok=False)
    assert res.returncode == 5 and "recreated" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res
    server = server_messages(dovecot, "alice", folder)
    assert sorted(server) == uids and all(flags == set() for _, flags in server.values()), server


def test_local_delete_refused_where_the_server_lacks_it(dovecot, device):
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(2)])
    direct = device("phone-direct", via=dovecot, tls="none")  # plain Dovecot: no XCPM-LOCALDELETE
    direct.sync(folder)
    res = direct.run("delete", "--local", folder, str(uids[0]), ok=False)
    assert res.returncode == 5
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "XCPM-LOCALDELETE" in err[0] and "Traceback" not in res.stderr
    assert sorted(server_messages(dovecot, "alice", folder)) == uids  # nothing deleted anywhere
    assert sorted(direct.index(folder)) == uids


def test_local_delete_only_leaves_this_device(dovecot, proxy, device):
    c = imapclient.IMAPClient(proxy.host, proxy.port, ssl=False)
    caps = c.capabilities()
    c.login("alice", "alicepw")
    caps = c.capabilities()
    c.logout()
    if b"XCPM-LOCALDELETE" not in caps:
        pytest.skip("the proxy does not advertise XCPM-LOCALDELETE (local delete not available yet)")
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(3)])
    a, b = device("phone-ld-a"), device("tablet-ld-b")
    a.sync(folder)
    b.sync(folder)
    res = a.run("delete", "--local", folder, str(uids[1]))
    assert "deleted on this device only" in res.stdout
    assert uids[1] not in a.index(folder)
    assert sorted(server_messages(dovecot, "alice", folder)) == uids  # the server still has it
    a.sync(folder, "--full")
    assert sorted(a.index(folder)) == [uids[0], uids[2]]  # and it does not come back
    b.sync(folder)
    assert sorted(b.index(folder)) == uids  # the other device keeps it


def test_delete_on_a_device_whose_policy_keeps_deletes_local_says_so(dovecot, make_proxy, device):
    """``delete_mode = "local"``: the proxy turns the device's delete into a local one. The client sees
    that ($LocalDelete in the STORE's answer) and does not claim the server deleted anything."""
    folder = unique_folder()
    uids = seed(dovecot, "bob", folder, [make_object("chat", seed=i) for i in range(2)])
    p = make_proxy(backend_tls="none", config_extra='[policy]\n[[policy.class]]\nname = "legacy"\n'
                   'devices = ["legacy-*"]\ndelete_mode = "local"\n')
    legacy, normal = device("legacy-phone", user="bob", via=p), device("phone-normal-del", user="bob", via=p)
    legacy.sync(folder)
    res = legacy.run("delete", folder, str(uids[0]))
    assert "deleted on this device only" in res.stdout and "deleted on the server" not in res.stdout
    assert sorted(server_messages(dovecot, "bob", folder)) == uids  # the server kept it
    assert sorted(legacy.index(folder)) == [uids[1]]

    normal.sync(folder)
    res = normal.run("delete", folder, str(uids[1]))
    assert "deleted on the server" in res.stdout
    assert sorted(server_messages(dovecot, "bob", folder)) == [uids[0]]


# -- server-initiated sync (5.5.2.20.2 b) ----------------------------------------------------------


@contextlib.contextmanager
def watching(dev: Device, *args: str):
    """``cpm-sync watch`` of ``dev`` running (started, then ended by SIGTERM: exit 0, no traceback)."""
    watcher = subprocess.Popen(dev.args("watch", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("watching" in ln for ln in lines), timeout=20, what="watch to start")
        yield lines
    finally:
        watcher.send_signal(signal.SIGTERM)
        try:
            code = watcher.wait(15)
        except subprocess.TimeoutExpired:
            watcher.kill()
            raise
    assert code == 0, watcher.stderr.read()
    assert "Traceback" not in watcher.stderr.read()


def test_watch_follows_a_preference_another_device_changes(dovecot, device, make_proxy):
    """A preference another device sets for the whole account (``sync/imdn`` off) changes what this one is
    shown in every folder: the watch hears of it through the proxy's metadata events and syncs at once (it
    waited for its periodic check, 300 s by default). (A user of its own: the preference is account-wide.)"""
    if "wanda" not in dovecot.users:
        dovecot.add_user("wanda", "wandapw")
    folder = unique_folder()
    chat, imdn = seed(dovecot, "wanda", folder, [make_object("chat", seed=1), make_object("imdn", seed=2)])
    p = make_proxy(backend_tls="none")
    b = device("tablet-watch-pref", user="wanda", via=p)
    with watching(b, "--interval", "600", folder):
        assert sorted(b.index(folder)) == [chat, imdn]
        a = RawIMAP(p.host, p.port)
        a.command(b"i", b'ID ("x-cpm-device-id" "phone-watch-pref")')
        assert a.login("wanda", "wandapw")[-1].startswith(b"L OK")
        r = a.command(b"m", b'SETMETADATA "" (/private/vendor/vendor.cpmproxy/sync/imdn "off")')
        assert r[-1].startswith(b"m OK"), r
        a.close()
        wait_for(lambda: sorted(b.index(folder)) == [chat], timeout=20, what="the IMDN to leave device B")


def test_watch_follows_changes_from_another_device(dovecot, device):
    folder = unique_folder()
    uids = seed(dovecot, "dave", folder, [make_object("chat", seed=i) for i in range(3)])
    a, b = device("phone-watch-a", user="dave"), device("tablet-watch-b", user="dave")
    with watching(b, folder):
        assert sorted(b.index(folder)) == uids

        # New message (appended by someone else, straight on the server).
        new = seed(dovecot, "dave", folder, [make_object("mms", seed=9)])[0]
        wait_for(lambda: new in b.index(folder), what="the new message on device B")
        assert b.index(folder)[new].kind == "mms"
        # Flag change and a real delete made by device A through the proxy.
        a.run("flag", folder, str(uids[0]), "+\\Flagged")
        wait_for(lambda: "\\Flagged" in b.index(folder).get(uids[0], ((),) * 3)[2], what="the flag on device B")
        a.run("delete", folder, str(uids[1]))
        wait_for(lambda: uids[1] not in b.index(folder), what="the deletion on device B")
        assert not any(f.startswith(f"U{uids[1]}.") for f in b.files(folder))


def test_library_without_extensions_and_idle_watch(dovecot, tmp_path):
    """The fallbacks, driven as a library: no LIST-STATUS (STATUS per folder), no CONDSTORE/QRESYNC (full
    UID and flag comparison), no NOTIFY (IDLE plus periodic checks)."""
    # Own folders only: carol's sample folders (INBOX among them) are other tests' reference data.
    folders = [unique_folder(), unique_folder("Inbox-")]
    uids = seed(dovecot, "carol", folders[0], [make_object("chat", seed=i) for i in range(4)])
    seed(dovecot, "carol", folders[1], [])
    settings = ServerSettings(dovecot.host, dovecot.port, "carol", "carolpw", "lib-dev", tls="none")
    stripped = {b"LIST-STATUS", b"CONDSTORE", b"QRESYNC", b"NOTIFY"}

    def connect_plain(s: ServerSettings, wake_fd=None):
        conn = connect(s, wake_fd)
        conn.capabilities = conn.capabilities - stripped
        return conn

    store = LocalStore(tmp_path / "lib-store")
    conn = connect_plain(settings)
    try:
        with store.locked():
            syncer = Syncer(conn, store)
            assert not conn.qresync
            syncer.sync([folders[0]])
            c = dovecot.imap_direct("carol", tls="none")
            c.select_folder(folders[0])
            c.add_flags([uids[2]], [b"\\Answered"])
            c.delete_messages([uids[3]])
            c.expunge()
            c.logout()
            new = seed(dovecot, "carol", folders[0], [make_object("sms", seed=7)])
            result = syncer.sync([folders[0]])
    finally:
        conn.logout()
    (r,) = result.folders
    assert (r.new, r.flags, r.removed) == (1, 1, 1)
    f = store.folder(folders[0])
    assert f.highestmodseq is None
    msgs = store.messages(f)
    assert sorted(msgs) == [*uids[:3], *new] and "\\Answered" in msgs[uids[2]].flags

    # IDLE (no NOTIFY) on the idle folder: a delivery shows up without waiting for the periodic check.
    stopper = Stopper()
    log: list[str] = []
    w = Watcher(settings, store, options=WatchOptions(folders=tuple(folders), interval=120, idle_folder=folders[1]),
                stopper=stopper, log=log.append, connector=connect_plain)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: any("watching" in m for m in log), timeout=20, what="the watcher")
        assert "(idle" in next(m for m in log if "watching" in m)
        delivered = seed(dovecot, "carol", folders[1], [make_object("other", seed=3)])[0]
        wait_for(lambda: delivered in store.messages(store.folder(folders[1])), what="the delivery")
    finally:
        stopper.stop()
        t.join(15)
    assert not t.is_alive()
    store.close()


def test_watch_reconnects_with_backoff(dovecot, tmp_path):
    """The server unreachable at first, then the connection breaking mid-session: the watcher retries
    with backoff, catches up, and goes on following changes."""
    folder = unique_folder()
    seed(dovecot, "dave", folder, [make_object("chat", seed=1)])
    settings = ServerSettings(dovecot.host, dovecot.port, "dave", "davepw", "lib-reconnect", tls="none")
    attempts: list[object] = []

    def flaky(s: ServerSettings, wake_fd=None):
        attempts.append(None)
        if len(attempts) <= 2:
            return connect(ServerSettings(s.host, 1, s.user, s.password, s.device_id, tls="none"))  # refused
        conn = connect(s, wake_fd)
        attempts[-1] = conn
        return conn

    store = LocalStore(tmp_path / "reconnect")
    stopper, log = Stopper(), []
    w = Watcher(settings, store, options=WatchOptions(folders=(folder,), min_backoff=0.05), stopper=stopper,
                log=log.append, connector=flaky)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        wait_for(lambda: any("watching" in m for m in log), timeout=20, what="the watcher")
        assert len(attempts) == 3 and sum("retrying" in m for m in log) == 2
        attempts[-1].sock.shutdown(__import__("socket").SHUT_RDWR)  # the connection breaks
        wait_for(lambda: len(attempts) == 4 and sum("watching" in m for m in log) == 2, what="a reconnection")
        assert any("connection lost" in m for m in log)
        new = seed(dovecot, "dave", folder, [make_object("sms", seed=2)])[0]
        wait_for(lambda: new in store.messages(store.folder(folder)), what="the new message after reconnecting")
    finally:
        stopper.stop()
        t.join(15)
    assert not t.is_alive()
    store.close()


# -- failures: non-zero, one line, no traceback ---------------------------------------------------------


def _one_line_failure(res: subprocess.CompletedProcess, status: int, *words: str) -> None:
    assert res.returncode == status, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpm-sync: "), res.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_a_deleted_mark_of_the_session_only_is_not_kept_as_the_servers(dovecot, make_proxy, device):
    """Found by review: on a device whose policy deletes locally, ``flag F U +deleted`` is a mark of that
    session only (nothing changes on the server, no MODSEQ moves); the local copy kept ``\\Deleted`` for
    good, ``status`` said "in sync" and no sync looked again. Now the next sync compares every flag."""
    p = make_proxy(backend_tls="none",
                   config_extra='[[policy.class]]\nname = "kiosks"\ndevices = ["kiosk-*"]\ndelete_mode = "local"\n')
    folder = unique_folder()
    uids = seed(dovecot, "dave", folder, [make_object("chat", seed=i) for i in range(3)])
    k = device("kiosk-7", user="dave", via=p)
    k.sync(folder)
    k.run("flag", folder, str(uids[0]), "+deleted")
    assert "\\Deleted" in k.index(folder)[uids[0]].flags  # (as the session said)
    assert "changed" in status_line(k, folder)
    k.sync(folder)
    assert "\\Deleted" not in k.index(folder)[uids[0]].flags and sorted(k.index(folder)) == uids
    assert "in sync" in status_line(k, folder)


def test_a_device_id_the_proxy_refuses_is_no_session_at_all(proxy, device):
    """Found by review: with an id the proxy refuses in ID (over 128 characters), cpm-sync logged in all
    the same, as the proxy's default device (every plain client's): its local deletes hid messages from
    them. The CLI refuses such an id before connecting; the library refuses a session whose ID failed."""
    long_id = "x" * 129
    _one_line_failure(device(long_id).sync(ok=False), 2, "--device-id", "128")
    _one_line_failure(device("ph\tone").sync(ok=False), 2, "--device-id")
    settings = ServerSettings(proxy.host, proxy.port, "alice", "alicepw", long_id, tls="none")
    with pytest.raises(ServerRefused, match="refused the device id"):
        connect(settings)


def test_failures_are_one_line_with_an_exit_status(dovecot, device, tmp_path):
    bad = device("phone-badpw", password="wrong")
    _one_line_failure(bad.sync(ok=False), 4, "login", "alice")

    down = Device(tmp_path, "phone-down", "alice", dovecot.port)
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    down.port = s.getsockname()[1]  # bound, never listening: connection refused
    try:
        _one_line_failure(down.sync(ok=False), 3, "cannot connect", "refused")
    finally:
        s.close()

    untrusted = device("phone-untrusted")
    untrusted.ca_file = None  # the proxy's certificate is not signed by a system CA
    _one_line_failure(untrusted.sync(ok=False), 3, "certificate")

    no_starttls = device("phone-nostarttls", via=dovecot, tls="implicit")  # plain port, TLS expected
    assert no_starttls.sync(ok=False, timeout=30).returncode == 3

    ok = device("phone-missing")
    _one_line_failure(ok.sync("Default/does-not-exist-" + uuid.uuid4().hex, ok=False), 5, "no such folder")
    _one_line_failure(ok.run("flag", "INBOX", "1", "+bad flag", ok=False), 2)


def test_a_password_file_that_is_not_utf8_is_a_usage_error(device):
    """Found by review: a password file saved in Latin-1 ("pässword") ended cpm-sync with "internal error:
    UnicodeDecodeError" (exit 70, "a bug"); it is the user's file to fix, said as such (exit 2)."""
    a = device("phone-latin1-pw")
    a.pwfile.write_bytes("p\u00e4ssword\n".encode("latin-1"))
    _one_line_failure(a.sync(ok=False), 2, "password file", "UTF-8")


def test_login_refused_for_now_is_not_a_credentials_failure(dovecot, make_proxy, device, tmp_path):
    """The proxy answers the login ``NO [UNAVAILABLE]`` while its backend is down (RFC 5530: a temporary
    failure). One-shot commands exit 3 like for an unreachable server (not 4, "login refused"), and watch
    keeps retrying with its backoff until the backend is back."""
    sock, port = dead_port()
    try:
        down = make_proxy(backend_tls="none", backend_port=port)
        dev = device("phone-unavail", via=down)
        _one_line_failure(dev.sync(ok=False), 3, "login", "UNAVAILABLE")
        _one_line_failure(dev.run("status", ok=False), 3, "UNAVAILABLE")
        with pytest.raises(ServerUnavailable):
            connect(ServerSettings(down.host, down.port, "dave", "davepw", "lib-unavail", tls="none"))

        folder = unique_folder()
        seed(dovecot, "dave", folder, [make_object("chat", seed=1)])
        settings = ServerSettings(dovecot.host, dovecot.port, "dave", "davepw", "lib-unavail", tls="none")
        attempts: list[int] = []

        def backend_back_later(s: ServerSettings, wake_fd=None):
            attempts.append(1)
            if len(attempts) <= 2:  # the backend is still down
                return connect(ServerSettings(down.host, down.port, s.user, s.password, s.device_id, tls="none"))
            return connect(s, wake_fd)

        store = LocalStore(tmp_path / "unavail")
        stopper, log = Stopper(), []
        w = Watcher(settings, store, options=WatchOptions(folders=(folder,), min_backoff=0.05), stopper=stopper,
                    log=log.append, connector=backend_back_later)
        t, errors = _watch_in_thread(w)
        try:
            wait_for(lambda: errors or any("watching" in m for m in log), timeout=20, what="the watcher")
            assert not errors, errors
            assert len(attempts) == 3
            assert sum("UNAVAILABLE" in m and "retrying" in m for m in log) == 2, log
            assert len(store.messages(store.folder(folder))) == 1
        finally:
            stopper.stop()
            t.join(15)
        assert not t.is_alive()
        store.close()
    finally:
        sock.close()


# -- robustness: one bad folder, interruptions, the store lock -------------------------------------------


def test_a_folder_the_server_cannot_open_does_not_stop_the_others(dovecot, device):
    """One folder the server refuses to open (its files unreadable on the backend): the other folders
    are still synced; the exit status is non-zero with one line naming the folder."""
    broken, fine = unique_folder(), unique_folder()
    seed(dovecot, "alice", broken, [make_object("chat", seed=1)])
    seed(dovecot, "alice", fine, [make_object("chat", seed=2)])
    a = device("phone-broken-folder")
    a.sync(broken, fine)
    new = seed(dovecot, "alice", fine, [make_object("sms", seed=3)])[0]
    seed(dovecot, "alice", broken, [make_object("sms", seed=4)])  # so that the folder is opened
    path = dovecot.mail_dir / "alice" / "Maildir" / broken
    path.chmod(0)
    try:
        res = a.sync(broken, fine, ok=False)
    finally:
        path.chmod(0o700)
    _one_line_failure(res, 5, broken)
    assert fine not in res.stderr
    assert new in a.index(fine)  # synced although the folder before it failed
    assert len(a.index(broken)) == 1  # the local copy is kept as it was
    a.sync(broken, fine)  # readable again: all well


def test_folder_deleted_between_list_and_examine_counts_as_gone(dovecot, tmp_path):
    """Another client deletes folders right after this client's LIST: the EXAMINE then fails with
    NONEXISTENT. The folders are gone (removed locally, as if LIST had not shown them), the rest synced."""
    victim, fresh, fine = unique_folder(), unique_folder(), unique_folder()
    seed(dovecot, "alice", victim, [make_object("chat", seed=1)])
    seed(dovecot, "alice", fine, [make_object("chat", seed=2)])
    settings = ServerSettings(dovecot.host, dovecot.port, "alice", "alicepw", "lib-race", tls="none")
    store = LocalStore(tmp_path / "race")
    conn = connect(settings)
    try:
        with store.locked():
            syncer = Syncer(conn, store)
            syncer.sync([victim, fine])
            new = seed(dovecot, "alice", fine, [make_object("sms", seed=5)])[0]
            seed(dovecot, "alice", victim, [make_object("chat", seed=3)])
            seed(dovecot, "alice", fresh, [make_object("chat", seed=4)])
            listed = syncer.list_folders

            def list_then_delete(names=None, list_status=True):
                out = listed(names, list_status)
                c = dovecot.imap_direct("alice", tls="none")
                c.delete_folder(victim)
                c.delete_folder(fresh)
                c.logout()
                return out

            syncer.list_folders = list_then_delete
            result = syncer.sync([victim, fresh, fine])
    finally:
        conn.logout()
    assert result.failed == []
    by_name = {f.name: f for f in result.folders}
    assert by_name[victim].deleted and fresh not in by_name
    assert store.folder(victim) is None and store.folder(fresh) is None
    assert new in store.messages(store.folder(fine))
    store.close()


def _lost_settings(dovecot):
    return ServerSettings(dovecot.host, dovecot.port, "alice", "alicepw", "lib-lost", tls="none")


def _sync_breaking_at_a_message(dovecot, tmp_path, folders, victim, breaker, reconnect=True, written=None,
                                should_stop=None):
    """Sync ``folders`` in batches of 2 messages; when the third message of ``victim`` is written (the
    first two committed), run ``breaker(syncer)`` (another client deletes the folder, or the connection
    breaks). ``written``: a list to record the UIDs written in ``victim``. ``reconnect``: True (connect
    again), False (no way to), or a function called to connect again (None: connect as usual)."""
    settings = _lost_settings(dovecot)
    store = LocalStore(tmp_path / "lost")

    def again():
        made = reconnect() if callable(reconnect) else None
        return made if made is not None else connect(settings)

    syncer = Syncer(connect(settings), store, SyncOptions(batch_messages=2, window=1), should_stop=should_stop,
                    reconnect=again if reconnect else None)
    write = store.write_message
    seen = [] if written is None else written

    def write_then_break(lf, uid, *args):
        if lf.name == victim:
            seen.append(uid)
            if len(seen) == 3:
                breaker(syncer)
        return write(lf, uid, *args)

    store.write_message = write_then_break
    try:
        with store.locked():
            return syncer.sync(sorted(folders)), store
    finally:
        syncer.conn.close()


def test_folder_deleted_while_its_messages_are_fetched_counts_as_gone(dovecot, tmp_path):
    """Another client deletes a folder while this one fetches its messages: Dovecot ends the session
    (BYE, "Mailbox was deleted under us"). The sync connects again, finds the folder gone (removed
    locally, as if LIST had not shown it) and syncs the other folders (before, it stopped: exit 3)."""
    victim, fine = unique_folder(), unique_folder()
    seed(dovecot, "alice", victim, [make_object("chat", seed=i) for i in range(6)])
    new = seed(dovecot, "alice", fine, [make_object("chat", seed=9)])

    def delete(_syncer):
        c = dovecot.imap_direct("alice", tls="none")
        c.delete_folder(victim)
        c.logout()

    result, store = _sync_breaking_at_a_message(dovecot, tmp_path, [victim, fine], victim, delete)
    assert result.failed == [] and victim not in {f.name for f in result.folders}
    assert store.folder(victim) is None
    assert sorted(store.messages(store.folder(fine))) == new
    store.close()


def test_connection_lost_in_a_folder_goes_on_with_a_new_one(dovecot, tmp_path):
    """The connection breaks while a folder's messages are fetched: the sync connects again and syncs
    the folder (every message, the ones committed before the loss not fetched twice) and the rest. With no
    way to reconnect (the library's default) the loss ends the sync as before."""
    victim, fine = unique_folder(), unique_folder()
    uids = seed(dovecot, "alice", victim, [make_object("chat", seed=i) for i in range(6)])
    new = seed(dovecot, "alice", fine, [make_object("chat", seed=9)])

    def cut(syncer):
        syncer.conn.sock.shutdown(socket.SHUT_RDWR)

    written = []
    result, store = _sync_breaking_at_a_message(dovecot, tmp_path, [victim, fine], victim, cut, written=written)
    assert result.failed == []
    assert sorted(store.messages(store.folder(victim))) == uids
    assert [written.count(u) for u in uids[:2]] == [1, 1]  # (committed before the loss)
    assert sorted(store.messages(store.folder(fine))) == new
    store.close()
    with pytest.raises(ConnectionLost):
        _sync_breaking_at_a_message(dovecot, tmp_path / "again", [victim, fine], victim, cut, reconnect=False)


def test_a_protocol_error_in_a_folder_is_not_taken_for_a_lost_connection(dovecot, tmp_path):
    """What the server sent cannot be read (a ProtocolError, which ends the connection as a loss does):
    the sync stops at once with it (exit 3), without connecting again to be sent the same thing."""
    folder = unique_folder()
    seed(dovecot, "alice", folder, [make_object("chat", seed=1)])
    settings = ServerSettings(dovecot.host, dovecot.port, "alice", "alicepw", "lib-garbled", tls="none")
    store = LocalStore(tmp_path / "garbled")
    reconnects = []
    syncer = Syncer(connect(settings), store, reconnect=lambda: reconnects.append(1) or connect(settings))

    def garbled(*args, **kwargs):
        raise ProtocolError("malformed FETCH response from the server")

    syncer.sync_folder = garbled
    try:
        with store.locked(), pytest.raises(ProtocolError):
            syncer.sync([folder])
    finally:
        syncer.conn.close()
        store.close()
    assert reconnects == []


def test_vanished_earlier_longer_than_the_line_limit_is_synced(dovecot, tmp_path, monkeypatch):
    """Found by review: every other message of a large folder expunged, the next (QRESYNC) sync got one
    ``* VANISHED (EARLIER)`` line naming them all, which at ~100,000 UIDs is past the client's 1 MB line
    limit: "the server sent a line longer than 1 MB" (exit 3) at every sync from then on, the folder
    stuck (seen with 200,000 messages of 10-digit UIDs). A line of numbers may be longer now. Scaled down:
    4,000 messages, an 8 KB limit, 1 KB reads (as a large line arrives: in pieces)."""
    from cpmproxy.client import connection

    folder = unique_folder()
    c = dovecot.imap_direct("alice", tls="none")
    c.create_folder(folder)
    c.multiappend(folder, [b"Subject: m%d\r\n\r\nhello\r\n" % i for i in range(4000)])
    settings = ServerSettings(dovecot.host, dovecot.port, "alice", "alicepw", "lib-vanished", tls="none")
    store = LocalStore(tmp_path / "s", fsync=False)

    def sync():
        conn = connect(settings)
        try:
            with store.locked():
                return Syncer(conn, store).sync([folder])
        finally:
            conn.logout()

    assert sync().new == 4000
    c.select_folder(folder)
    uids = sorted(c.search("ALL"))
    c.delete_messages(uids[1::2])
    c.expunge()
    c.logout()
    monkeypatch.setattr(connection, "MAX_LINE", 8 * 1024)
    monkeypatch.setattr(connection, "_READ_SIZE", 1024)
    result = sync()
    assert result.removed == 2000 and result.failed == []
    assert sorted(store.messages(store.folder(folder))) == uids[::2]
    store.close()


def test_a_folder_synced_over_a_lost_connection_counts_every_message(dovecot, tmp_path):
    """Found by review: a folder whose connection was lost mid-fetch (and synced again on a new one) was
    reported with only what the second attempt did: "2 new" for a new folder of 6 messages (4 committed
    before the loss), and no "new folder". Both attempts count now."""
    victim, fine = unique_folder(), unique_folder()
    msgs = [make_object("chat", seed=i) for i in range(6)]
    seed(dovecot, "alice", victim, msgs)
    seed(dovecot, "alice", fine, [make_object("chat", seed=9)])

    def cut(syncer):
        syncer.conn.sock.shutdown(socket.SHUT_RDWR)

    result, store = _sync_breaking_at_a_message(dovecot, tmp_path, [victim, fine], victim, cut)
    res = {f.name: f for f in result.folders}[victim]
    assert (res.new, res.bytes, res.created) == (6, sum(map(len, msgs)), True)
    assert result.new == 7 and "new folder, 6 new" in res.summary()
    store.close()


class _SendFails:
    """A connection's socket whose next send fails (the connection broke), after calling ``first``."""

    def __init__(self, sock, first):
        self._sock, self._first = sock, first

    def sendall(self, data):
        self._first()
        raise BrokenPipeError(32, "Broken pipe")

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.mark.parametrize("when", ["as the connection breaks", "while connecting again"])
def test_a_stop_asked_for_around_a_lost_connection_is_obeyed_at_once(dovecot, tmp_path, when):
    """Found by review: SIGTERM asked for as the connection broke, or while the sync connected again, did
    not stop the sync there: it connected (again), listed, opened the folder and fetched another batch
    of messages first (here the last 2 of 6). Now it stops (Interrupted, exit 130) without connecting
    again, or as soon as connected; what was committed stays."""
    victim = unique_folder()
    uids = seed(dovecot, "alice", victim, [make_object("chat", seed=i) for i in range(6)])
    stop, reconnects = [False], []

    def stop_now():
        stop[0] = True

    def cut(syncer):  # (the batch being written, messages 3 and 4, is committed; sending the next fails)
        syncer.conn.sock = _SendFails(syncer.conn.sock, stop_now if when == "as the connection breaks" else list)

    def reconnecting():
        reconnects.append(1)
        if when == "while connecting again":
            stop_now()

    with pytest.raises(Interrupted):
        _sync_breaking_at_a_message(dovecot, tmp_path, [victim], victim, cut, reconnect=reconnecting,
                                    should_stop=lambda: stop[0])
    assert len(reconnects) == (0 if when == "as the connection breaks" else 1)
    store = LocalStore(tmp_path / "lost")
    assert sorted(store.messages(store.folder(victim))) == uids[:4]
    store.close()


def test_a_connection_lost_again_while_connecting_again_is_connected_once_more(dovecot, tmp_path):
    """Found by review: after a loss mid-folder the new connection's own set-up (ENABLE QRESYNC, the LIST
    of the folder) was outside the reconnecting loop: that connection breaking too ended the whole sync
    (exit 3) with reconnections left. It is one more reconnection now, and the sync completes."""
    victim, fine = unique_folder(), unique_folder()
    uids = seed(dovecot, "alice", victim, [make_object("chat", seed=i) for i in range(6)])
    new = seed(dovecot, "alice", fine, [make_object("chat", seed=9)])
    made = []

    def cut(syncer):
        syncer.conn.sock = _SendFails(syncer.conn.sock, list)

    def reconnecting():
        made.append(connect(_lost_settings(dovecot)))
        if len(made) == 1:
            made[0].sock = _SendFails(made[0].sock, list)  # (this one breaks at its first command)
        return made[-1]

    result, store = _sync_breaking_at_a_message(dovecot, tmp_path, [victim, fine], victim, cut,
                                                reconnect=reconnecting)
    assert len(made) == 2 and result.failed == []
    assert sorted(store.messages(store.folder(victim))) == uids
    assert sorted(store.messages(store.folder(fine))) == new
    store.close()
    made[0].close()


def test_flag_and_delete_of_a_range_with_every_other_message_gone(dovecot, device):
    """Found by review: ``flag``/``delete`` of a range acted on the messages of it that still exist, named
    one by one in one UID STORE (and UID EXPUNGE, UID SEARCH) line: with every other message of the range
    expunged, 2,000 of them made a 10 KB line, past the proxy's max_line here (8 KB; 64 KB by default,
    and Dovecot's default imap_max_line_length: ~6,000 such UIDs; seen as "STORE failed: BAD ... Too long
    argument" from Dovecot for 150,000; here the proxy's BYE, exit 3), and the command failed. They go in
    pipelined pieces now. (The UIDs of the range that do not exist are named, exit 1, as before.)"""
    folder = unique_folder()
    c = dovecot.imap_direct("alice", tls="none")
    c.create_folder(folder)
    c.multiappend(folder, [b"Subject: m%d\r\n\r\nhello\r\n" % i for i in range(4000)])
    c.select_folder(folder)
    uids = sorted(c.search("ALL"))
    c.delete_messages(uids[1::2])
    c.expunge()
    kept = uids[::2]
    assert len(b",".join(b"%d" % u for u in kept)) > 8192
    a = device("phone-range")
    res = a.run("flag", folder, f"{uids[0]}:{uids[-1]}", "+seen", ok=False)
    assert res.returncode == 1 and "+\\Seen on 2000 message(s)" in res.stdout, res.stderr
    assert all(b"\\Seen" in f for f in c.get_flags(kept).values())
    res = a.run("delete", folder, f"{uids[0]}:{uids[-1]}", ok=False)
    assert res.returncode == 1 and "2000 message(s) deleted on the server" in res.stdout, res.stderr
    c.noop()
    assert c.search("ALL") == []
    c.logout()


def test_interrupted_flag_update_recovers_without_download(dovecot, device):
    """Killed while applying flag changes (files renamed, index not yet updated) and with a tmp/ leftover:
    the next sync repairs it (no message dropped from the index, nothing downloaded again)."""
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(3)])
    a = device("phone-flagcrash")
    a.sync(folder)
    c = dovecot.imap_direct("alice", tls="none")
    c.select_folder(folder)
    c.add_flags(uids, [b"\\Seen"])
    c.logout()
    cur = a.folder_dir(folder) / "cur"
    for name in a.files(folder):  # what store.set_flags does before its index transaction
        os.rename(cur / name, cur / (name.split(":")[0] + ":2,S"))
    uv = a.folder_state(folder).uidvalidity
    (a.folder_dir(folder) / "tmp" / f"U{uids[0]}.V{uv}.cpm-sync").write_bytes(b"partial")

    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert fetched_body_uids(res.stderr) == []
    index = a.index(folder)
    assert sorted(index) == uids and all(r.flags == ("\\Seen",) for r in index.values())
    assert sorted(r.filename for r in index.values()) == a.files(folder)
    assert a.files(folder, "tmp") == []
    assert not a.folder_state(folder).full_check
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert "0 changed" in res.stdout and fetched_body_uids(res.stderr) == []


def test_a_lost_message_file_comes_back_in_the_same_sync(dovecot, device):
    """A message file removed behind the client's back, then new mail: one sync restores both (the
    folder's full check is not dropped at the end of the pass that found the file missing)."""
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(3)])
    a = device("phone-lostfile")
    a.sync(folder)
    os.unlink(a.folder_dir(folder) / "cur" / a.index(folder)[uids[1]].filename)
    new = seed(dovecot, "alice", folder, [make_object("sms", seed=9)])[0]
    res = a.sync(folder, env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert sorted(fetched_body_uids(res.stderr)) == [uids[1], new]
    assert sorted(a.index(folder)) == [*uids, new]
    assert sorted(r.filename for r in a.index(folder).values()) == a.files(folder)
    assert not a.folder_state(folder).full_check


def test_status_is_in_sync_right_after_flag(dovecot, device):
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(2)])
    a = device("phone-flagstatus")
    a.sync(folder)
    a.run("flag", folder, str(uids[0]), "+seen")
    assert "in sync" in status_line(a, folder)
    # Someone else's change is still seen as one.
    c = dovecot.imap_direct("alice", tls="none")
    c.select_folder(folder)
    c.add_flags([uids[1]], [b"\\Flagged"])
    c.logout()
    a.run("flag", folder, str(uids[0]), "-seen")
    assert "changed" in status_line(a, folder)
    res = a.sync(folder)
    assert "1 flag changes" in res.stdout and "in sync" in status_line(a, folder)


def test_status_is_in_sync_right_after_delete(dovecot, device):
    """Our own UID EXPUNGE moved the server's HIGHESTMODSEQ on: the local copy is at it (the expunge's
    answer names it). Someone else's expunge or flag change in between is still a change."""
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(5)])
    a = device("phone-deletestatus")
    a.sync(folder)
    a.run("delete", folder, str(uids[0]))
    assert re.search(r"\s4\s+4\s.*in sync", status_line(a, folder))
    c = dovecot.imap_direct("alice", tls="none")
    c.select_folder(folder)
    c.delete_messages([uids[1]])
    c.expunge()
    a.run("delete", folder, str(uids[2]))
    assert re.search(r"\s2\s+3\s.*changed", status_line(a, folder))
    a.sync(folder)
    c.add_flags([uids[3]], [b"\\Flagged"])
    c.logout()
    a.run("delete", folder, str(uids[4]))
    assert "changed" in status_line(a, folder)
    res = a.sync(folder)
    assert "1 flag changes" in res.stdout and "in sync" in status_line(a, folder)


def test_watch_waits_for_a_busy_store(dovecot, tmp_path):
    """Another cpm-sync holds the store lock for longer than the lock timeout: watch waits, it does not end."""
    import fcntl

    folder = unique_folder()
    seed(dovecot, "dave", folder, [make_object("chat", seed=1)])
    settings = ServerSettings(dovecot.host, dovecot.port, "dave", "davepw", "lib-busy", tls="none")
    store = LocalStore(tmp_path / "busy")
    fd = os.open(tmp_path / "busy" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    stopper, log = Stopper(), []
    w = Watcher(settings, store, options=WatchOptions(folders=(folder,), lock_timeout=0.2), stopper=stopper,
                log=log.append)
    t, errors = _watch_in_thread(w)
    try:
        wait_for(lambda: errors or any("waiting for it" in m for m in log), what="the watcher to wait")
        assert not errors, errors
        fcntl.flock(fd, fcntl.LOCK_UN)
        wait_for(lambda: errors or any("watching" in m for m in log), what="the watcher")
        assert not errors, errors
        assert len(store.messages(store.folder(folder))) == 1
    finally:
        os.close(fd)
        stopper.stop()
        t.join(15)
    assert not t.is_alive()
    store.close()


def test_a_watch_stopped_during_a_fetch_writes_nothing_once_it_lets_the_store_go(dovecot, tmp_path):
    """Found by the cpm-sync review (helper-87): stopped while body FETCHes were in flight and the server
    silent (here: a relay holds them back), watch sent LOGOUT, which read their answers first: their handler
    wrote those messages into the store after the watch had let its lock go (a manual sync may hold it by
    then), leaving tmp/ files, and the stop took longer. The connection is closed instead, as `sync` does;
    what was committed stays."""
    from tests.gaterelay import GateRelay

    folder = unique_folder()
    uids = seed(dovecot, "dave", folder, [make_object("chat", seed=i) for i in range(6)])
    relay = GateRelay(dovecot.port)
    relay.hold_from(rb"UID FETCH %d \(UID FLAGS INTERNALDATE BODY" % uids[1])
    settings = ServerSettings("127.0.0.1", relay.port, "dave", "davepw", "lib-stop-fetch", tls="none")
    store = LocalStore(tmp_path / "stopfetch")
    stopper = Stopper()
    w = Watcher(settings, store, SyncOptions(batch_messages=1, window=3), WatchOptions(folders=(folder,)),
                stopper=stopper)
    released, late = threading.Event(), []
    locked = w._locked

    @contextlib.contextmanager
    def tracked_lock():
        try:
            with locked():
                yield
        finally:
            released.set()

    w._locked = tracked_lock
    write = store.write_message

    def write_and_stop(lf, uid, *args):
        if released.is_set():
            late.append(uid)
        stopper.stop()  # (at the first message: the next FETCHes are held back, the server silent)
        return write(lf, uid, *args)

    store.write_message = write_and_stop
    t, errors = _watch_in_thread(w)
    try:
        relay.wait_gated()
        assert released.wait(10), "the watch never stopped"
        relay.release()  # (the held FETCHes reach the server now: answered, if anyone still reads)
        t.join(15)
        assert not t.is_alive() and not errors, errors
    finally:
        relay.close()
    assert late == []
    assert sorted(store.messages(store.folder(folder))) == uids[:1]
    store.close()


def test_watch_goes_on_when_a_watched_folder_is_deleted_on_the_server(dovecot, tmp_path):
    """Found by review: ``watch F G`` ended (5, "no such folder: F") at the full pass after another device
    deleted F, and G was watched no more. F's local copy goes, and the watch goes on with G."""
    f, g = unique_folder(), unique_folder()
    seed(dovecot, "dave", f, [make_object("chat", seed=1)])
    seed(dovecot, "dave", g, [make_object("chat", seed=2)])
    settings = ServerSettings(dovecot.host, dovecot.port, "dave", "davepw", "lib-gone", tls="none")
    store = LocalStore(tmp_path / "gone")
    stopper, log = Stopper(), []
    w = Watcher(settings, store, options=WatchOptions(folders=(f, g), interval=0.5), stopper=stopper,
                log=log.append)
    t, errors = _watch_in_thread(w)
    try:
        wait_for(lambda: errors or any("watching" in m for m in log), what="the watcher")
        imap = dovecot.imap_direct("dave", tls="none")
        imap.delete_folder(f)
        imap.logout()
        wait_for(lambda: errors or any("no longer watching" in m for m in log), what="the folder to go")
        new = seed(dovecot, "dave", g, [make_object("chat", seed=3)])[0]
        wait_for(lambda: errors or new in store.messages(store.folder(g)), what="the new message in G")
        assert not errors, errors
        assert store.folder(f) is None and t.is_alive()
    finally:
        stopper.stop()
        t.join(15)
    assert not t.is_alive() and not errors, errors
    store.close()


def test_watch_of_a_folder_that_does_not_exist_ends(device):
    a = device("phone-watch-nofolder")
    name = "Default/no-such-" + uuid.uuid4().hex
    _one_line_failure(a.run("watch", name, ok=False, timeout=30), 5, "no such folder", name)


def test_a_store_error_mid_download_writes_nothing_more(dovecot, device, monkeypatch, capsys):
    """Found by review (a 2 MB tmpfs): the disk filled at one message, the sync ended (6) and cleaned up,
    then its LOGOUT read the rest of the body FETCH in flight, and each message was written into tmp/
    again (the disk full again). The connection is dropped instead."""
    from cpmproxy.client import cli
    from cpmproxy.client.errors import StoreError

    folder = unique_folder()
    seed(dovecot, "dave", folder, [make_object("chat", seed=i) + b"\r\n" + b"z" * 100_000 for i in range(30)])
    a = device("phone-disk-full", user="dave", via=None, tls="none")
    a.port = dovecot.port  # (straight to Dovecot: the store is what is looked at)
    written = []
    real = LocalStore.write_message

    def write_message(self, folder_, uid, data, flags, internaldate=None):
        written.append(uid)
        if len(written) == 2:  # (once: the clean-up after it frees the space again)
            raise StoreError("cannot write a message: No space left on device")
        return real(self, folder_, uid, data, flags, internaldate)

    monkeypatch.setattr(LocalStore, "write_message", write_message)
    assert cli.main(a.args("sync", folder)[len(CLI):]) == 6
    with LocalStore(a.store_dir) as store:
        tmp = a.store_dir / "maildir" / store.folder(folder).path / "tmp"
    assert sorted(os.listdir(tmp)) == [], "written after the error"


def test_sigterm_interrupts_a_wait_for_a_busy_store(device):
    """Found by review: a sync waiting for the store another cpm-sync holds ignored SIGTERM and SIGINT for
    up to the lock's 60 s. It ends at once now (130), having touched nothing."""
    import fcntl

    a = device("phone-busy-store")
    a.sync()
    fd = os.open(a.store_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = subprocess.Popen(a.args("sync"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        time.sleep(1.0)  # (waiting for the lock by now: the process starts in ~0.3 s)
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - started < 5 and proc.returncode == 130, (proc.returncode, err)
        assert "Traceback" not in err and "interrupted" in err, err
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@pytest.mark.parametrize("command, tls", [("sync", "none"), ("watch", "none"), ("sync", "implicit"),
                                          ("watch", "implicit"), ("watch", "starttls")])
def test_sigterm_interrupts_a_wait_for_a_silent_server(device, command, tls):
    """The server accepts and never says a word: SIGTERM ends the sync at once (130), not after --timeout;
    and a watch (found by the operator review: it waited out the greeting's 60 s, under a supervisor's
    stop), whose normal end it is (0). Silent in the TLS handshake too (the diff review: the handshake
    ran before the wake-up could reach it); with STARTTLS, the greeting offers it, then nothing."""
    import socket

    a = device("phone-silent", tls=tls)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(20)
    a.port = srv.getsockname()[1]
    proc = subprocess.Popen(a.args("--timeout", "60", command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        peer, _ = srv.accept()
        if tls == "starttls":
            peer.settimeout(20)
            peer.sendall(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
            line = peer.recv(100)
            assert line.upper().endswith(b" STARTTLS\r\n"), line
            peer.sendall(line.split(b" ")[0] + b" OK Begin TLS now\r\n")
        time.sleep(0.3)  # the client is now waiting for the greeting, or in its TLS handshake
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)  # (not the 60 s greeting timeout)
        peer.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
    if command == "sync":
        assert proc.returncode == 130, (proc.returncode, err)
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err
    else:
        assert proc.returncode == 0, (proc.returncode, err)
        assert err == "" and out.strip().endswith("stopped"), (out, err)


def test_a_folder_below_inbox_is_one_folder_whatever_the_case_of_its_inbox(dovecot, device):
    """Found by review: only "INBOX" itself was folded, so ``sync inbox/Sub`` (the server's INBOX/Sub, as
    Dovecot and the proxy fold it) made a second local folder and downloaded everything again."""
    sub = "Sub" + uuid.uuid4().hex[:8]
    seed(dovecot, "alice", f"INBOX/{sub}", [make_object("chat", seed=i) for i in range(2)])
    a = device("phone-inbox-case")
    a.sync(f"INBOX/{sub}")
    assert len(a.index(f"INBOX/{sub}")) == 2
    res = a.sync(f"inbox/{sub}", env=dict(ENV, CPM_SYNC_TRACE="1"))
    assert fetched_body_uids(res.stderr) == [] and a.folder_state(f"inbox/{sub}") is None, res.stdout
    listed = a.run("list", f"Inbox/{sub}").stdout
    assert len([x for x in listed.splitlines() if x.strip()[:1].isdigit()]) == 2, listed


def test_a_named_folder_that_holds_no_messages_is_said_so(dovecot, device):
    """Found by review: ``sync Parent`` of a \\Noselect parent said "0 folders" and exited 0, as if synced."""
    parent = unique_folder()
    seed(dovecot, "alice", f"{parent}/Child", [make_object("chat")])
    c = dovecot.imap_direct("alice", tls="none")
    try:
        assert b"\\Noselect" in next(f for f, _, n in c.list_folders(parent) if n == parent)
    finally:
        c.logout()
    a = device("phone-noselect")
    res = a.sync(parent, ok=False)
    assert res.returncode == 5 and "Noselect" in res.stderr and parent in res.stderr, (res.returncode, res.stderr)
    a.sync(f"{parent}/Child")
    assert len(a.index(f"{parent}/Child")) == 1



def test_status_is_in_sync_right_after_local_delete(dovecot, device):
    """Found by review: a local delete's record (METADATA on the server) moves the folder's HIGHESTMODSEQ
    on, and status called the folder changed right after it. The proxy's answer names the new modseq."""
    folder = unique_folder()
    uids = seed(dovecot, "alice", folder, [make_object("chat", seed=i) for i in range(3)])
    a = device("phone-localdeletestatus")
    a.sync(folder)
    a.run("delete", "--local", folder, str(uids[0]))
    assert re.search(r"\s2\s+2\s.*in sync", status_line(a, folder))
    c = dovecot.imap_direct("alice", tls="none")
    c.select_folder(folder)
    c.add_flags([uids[1]], [b"\\Flagged"])
    c.logout()
    a.run("delete", "--local", folder, str(uids[2]))
    assert re.search(r"\s1\s+1\s.*changed", status_line(a, folder))
    assert "1 flag changes" in a.sync(folder).stdout and "in sync" in status_line(a, folder)


def test_status_refuses_another_accounts_store(dovecot, device):
    """Found by review: ``status`` with another user or device id than the store's showed that account's
    server counts beside this store's, as if in sync or changed, and ended 0; every other command refuses."""
    folder = unique_folder()
    seed(dovecot, "alice", folder, [make_object("chat", seed=1)])
    a = device("phone-statusowner")
    a.sync(folder)
    for other in (device("phone-statusowner-bob", user="bob"), device("tablet-statusowner")):
        other.store_dir = a.store_dir
        _one_line_failure(other.run("status", ok=False), 6, "belongs to", "use another --store")
    assert "in sync" in status_line(a, folder)
    # A store no sync has used yet is not tied to anyone by a status.
    fresh = device("phone-statusfresh")
    fresh.run("status")
    with LocalStore(fresh.store_dir) as store:
        assert store.get_meta("user") is None and store.get_meta("device_id") is None


def test_idle_watch_on_an_inbox_named_in_another_case_follows_it(dovecot, tmp_path):
    """Found by review: ``watch --idle-folder inbox INBOX`` (no NOTIFY: IDLE) took the EXISTS of the folder
    it idled on for a folder named "inbox", which is not one of those watched ("INBOX"), and dropped it: a
    delivery waited for the periodic check. INBOX is case-insensitive (RFC 9051 5.1), here too."""
    if "ivan" not in dovecot.users:
        dovecot.add_user("ivan", "ivanpw")
    settings = ServerSettings(dovecot.host, dovecot.port, "ivan", "ivanpw", "idle-case", tls="none")

    def connect_idle(s: ServerSettings, wake_fd=None):
        conn = connect(s, wake_fd)
        conn.capabilities = conn.capabilities - {b"NOTIFY"}
        return conn

    store = LocalStore(tmp_path / "idle-case-store")
    stopper = Stopper()
    log: list[str] = []
    w = Watcher(settings, store, options=WatchOptions(folders=("INBOX",), interval=300, idle_folder="inbox"),
                stopper=stopper, log=log.append, connector=connect_idle)
    t, errors = _watch_in_thread(w)
    try:
        wait_for(lambda: any("watching" in m for m in log), timeout=20, what="the watcher")
        time.sleep(0.5)  # (idling by now)
        delivered = seed(dovecot, "ivan", "INBOX", [make_object("chat", seed=5)])[0]
        wait_for(lambda: delivered in store.messages(store.folder("INBOX")), what="the delivery")
    finally:
        stopper.stop()
        t.join(15)
    assert not t.is_alive() and not errors
    store.close()
