"""The private Dovecot backend really offers what the proxy relies on."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import imapclient
import pytest

from cpmproxy.testing.certs import make_ca_and_cert, make_cert
from cpmproxy.testing.dovecot import Dovecot, _session_members
from cpmproxy.testing.sample import (
    ONE_TO_ONE_FOLDER,
    RCS_STORE_FOLDER,
    SESSION_FOLDER,
    ManifestEntry,
    classify_reference,
    generate_store,
    make_object,
)


def raw(client: imapclient.IMAPClient, command: str, *args: str, untagged: str | None = None) -> list:
    """Run a command imaplib/imapclient lack (SETMETADATA, NOTIFY...) and return its untagged data."""
    imap = client._imap
    typ, data = imap.xatom(command, *args)
    assert typ == "OK", (command, data)
    _, items = imap._untagged_response(typ, data, untagged or command)
    return [i for i in items if i is not None]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- connectivity / TLS -----------------------------------------------------


def test_starttls_on_plain_port(dovecot: Dovecot) -> None:
    client = imapclient.IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10)
    try:
        assert client.welcome.endswith(b"Dovecot ready.")
        assert client.has_capability("STARTTLS")
        client.starttls(dovecot.ssl_context())  # verifies chain + IP SAN 127.0.0.1
        client.login("alice", "alicepw")
        assert client.noop()
    finally:
        client.logout()


def test_plaintext_login_allowed(dovecot_direct) -> None:
    # The proxy logs in over plaintext loopback in some configurations.
    client = dovecot_direct("bob", tls="none")
    assert client.noop()


def test_implicit_tls_port(dovecot: Dovecot) -> None:
    client = imapclient.IMAPClient(
        "localhost", dovecot.tls_port, ssl=True, ssl_context=dovecot.ssl_context(), timeout=10
    )
    try:
        cert = client._imap.sock.getpeercert()
        assert ("DNS", "localhost") in cert["subjectAltName"]
        client.login("alice", "alicepw")
    finally:
        client.logout()


def test_untrusted_ca_is_rejected(dovecot: Dovecot) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        imapclient.IMAPClient(
            "localhost", dovecot.tls_port, ssl=True, ssl_context=ssl.create_default_context(), timeout=10
        )


def test_wrong_hostname_cert_fails_verification(tmp_path: Path) -> None:
    ca = make_ca_and_cert(tmp_path)
    wrong = make_cert(tmp_path, ca, "wrong", ["wrong.example"], [])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(wrong.cert, wrong.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client aborts the handshake

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        client_ctx = ssl.create_default_context(cafile=str(ca.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
                client_ctx.wrap_socket(sock, server_hostname="localhost")
        t.join(5)


def test_master_user_login(dovecot_direct) -> None:
    client = dovecot_direct("alice*admin")
    assert client.folder_exists("INBOX")


def test_id_forwarding_from_trusted_network(dovecot: Dovecot) -> None:
    client = imapclient.IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10)
    try:
        client.id_({"name": "cpmproxy-test", "x-originating-ip": "192.0.2.77", "x-originating-port": "4242"})
        client.login("dave", "davepw")
    finally:
        client.logout()
    deadline = time.monotonic() + 5
    while "rip=192.0.2.77" not in dovecot.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "user=<dave>" in dovecot.log_path.read_text()
    assert "rip=192.0.2.77" in dovecot.log_path.read_text()


# -- IMAP extensions the proxy relies on -------------------------------------


@pytest.mark.parametrize("cap", ["NOTIFY", "METADATA", "CONDSTORE", "QRESYNC", "LITERAL+", "UIDPLUS", "ID"])
def test_capabilities(dovecot_direct, cap: str) -> None:
    assert dovecot_direct("alice").has_capability(cap)


def test_metadata_server_and_mailbox(dovecot_direct) -> None:
    client = dovecot_direct("alice")
    folder = unique("Meta")
    client.create_folder(folder)
    raw(client, "SETMETADATA", '""', '(/private/comment "server note")')
    raw(client, "SETMETADATA", f'"{folder}"', '(/shared/comment "folder note")')
    server = raw(client, "GETMETADATA", '""', "/private/comment", untagged="METADATA")
    mailbox = raw(client, "GETMETADATA", f'"{folder}"', "/shared/comment", untagged="METADATA")
    assert server[0][1] == b"server note"
    assert mailbox[0][1] == b"folder note"


def test_notify_reports_new_mailbox(dovecot_direct) -> None:
    watcher = dovecot_direct("bob")
    raw(watcher, "NOTIFY", "SET (personal (MailboxName MessageNew MessageExpunge))")
    folder = unique("Notified")
    dovecot_direct("bob").create_folder(folder)

    def announced(responses: list) -> bool:
        return any(r[0] == b"LIST" and r[-1] == folder.encode() for r in responses)

    deadline = time.monotonic() + 5
    seen: list = []
    while not announced(seen) and time.monotonic() < deadline:
        seen += watcher.noop()[1]
        time.sleep(0.05)
    assert announced(seen), seen


def test_condstore_and_qresync(dovecot_direct, dovecot: Dovecot) -> None:
    client = dovecot_direct("alice")
    folder = unique("Modseq")
    dovecot.deliver("alice", folder, b"Subject: m\r\n\r\nbody\r\n")
    assert client.enable("QRESYNC") == [b"QRESYNC"]
    info = client.select_folder(folder)
    assert info[b"HIGHESTMODSEQ"] > 0
    fetched = client.fetch("1", ["MODSEQ", "FLAGS"])
    assert fetched[1][b"MODSEQ"][0] > 0


def test_slash_separator_and_cpm_folder_names(dovecot_direct) -> None:
    client = dovecot_direct("bob")
    if not client.folder_exists("Default"):
        client.create_folder("Default")
    client.create_folder(ONE_TO_ONE_FOLDER)
    folders = {name: delim for _flags, delim, name in client.list_folders("Default/")}
    assert folders[ONE_TO_ONE_FOLDER] == b"/"
    assert client.select_folder(ONE_TO_ONE_FOLDER)[b"EXISTS"] == 0


def test_deliver_and_doveadm(dovecot: Dovecot) -> None:
    folder = unique("Delivered")
    uid = dovecot.deliver("dave", folder, make_object("sms"), flags=[imapclient.SEEN])
    assert uid == 1
    status = dovecot.doveadm("mailbox", "status", "-u", "dave", "messages unseen", folder)
    assert status.split() == [folder, "messages=1", "unseen=0"]


# -- sample store -------------------------------------------------------------


def test_sample_store_kinds(dovecot_direct, sample_store: list[ManifestEntry]) -> None:
    per_folder = Counter((e.mailbox, e.kind) for e in sample_store)
    assert per_folder[(SESSION_FOLDER, "session-info")] == 1
    assert per_folder[(SESSION_FOLDER, "group-state")] == 1
    assert per_folder[(SESSION_FOLDER, "file-transfer")] == 1
    for kind in ("chat", "imdn", "file-transfer", "sms", "mms"):
        assert per_folder[(ONE_TO_ONE_FOLDER, kind)] >= 1, kind
    assert per_folder[(RCS_STORE_FOLDER, "chat")] == 2
    assert per_folder[("INBOX", "other")] == 2

    client = dovecot_direct("carol")
    for folder in {e.mailbox for e in sample_store}:
        client.select_folder(folder, readonly=True)
        entries = [e for e in sample_store if e.mailbox == folder]
        data = client.fetch([e.uid for e in entries], ["BODY.PEEK[]"])
        for e in entries:
            message = data[e.uid][b"BODY[]"]
            assert b"\n" not in message.replace(b"\r\n", b""), "bare LF"
            assert classify_reference(message) == e.kind, (folder, e.uid)


def test_generate_store_bulk(dovecot_direct) -> None:
    client = dovecot_direct("dave")
    folder = unique("Bulk") + "/chats"
    mix = {"chat": 3, "imdn": 1, "file-transfer": 1, "sms": 1, "mms": 1, "other": 1}
    manifest = generate_store(client, folder, 40, mix, size=3000)
    assert [e.uid for e in manifest] == list(range(1, 41))
    client.select_folder(folder, readonly=True)
    data = client.fetch(client.search(), ["RFC822.SIZE", "BODY.PEEK[]"])
    for e in manifest:
        assert 3000 <= data[e.uid][b"RFC822.SIZE"] < 3100
        assert classify_reference(data[e.uid][b"BODY[]"]) == e.kind


# -- lifecycle / tooling ----------------------------------------------------------


def test_restart_same_basedir_leaves_no_processes(tmp_path: Path) -> None:
    d = Dovecot(tmp_path / "dc", users={"eve": "evepw"}, master_user=None)
    try:
        d.start()
        d.deliver("eve", "INBOX", b"Subject: persists\r\n\r\nx\r\n")
        master = d._proc.pid  # type: ignore[union-attr]
        d.stop()
        assert _session_members(master) == []
        assert not (d.run_dir / "master.pid").exists()
        d.start()  # immediately: must not fail with "already running"
        client = d.imap_direct("eve")
        assert client.select_folder("INBOX")[b"EXISTS"] == 1
        client.logout()
    finally:
        d.close()
    assert not d.running


def test_mbsync_present() -> None:
    path = shutil.which("mbsync")
    assert path, "isync (mbsync) is not installed"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and "isync" in (out.stdout + out.stderr).lower()


def test_proxy_process_takes_other_ports_when_its_free_port_is_taken_first(dovecot: Dovecot, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """Found in CI: a port found free was taken by another process before the proxy bound it (a test run
    beside another), and the test failed at set-up. The harness picks other ports then."""
    from cpmproxy.testing import proxyproc

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    first = [[taken.getsockname()[1], proxyproc.free_port()]]
    real = proxyproc.free_ports
    monkeypatch.setattr(proxyproc, "free_ports", lambda n: first.pop() if first else real(n))
    p = proxyproc.ProxyProcess(tmp_path, dovecot.port)
    try:
        assert p.port == taken.getsockname()[1]
        p.start()
        assert p.port != taken.getsockname()[1]
        with socket.create_connection((p.host, p.port), timeout=5) as s:
            assert s.recv(1024).startswith(b"* OK")
    finally:
        p.stop()
        taken.close()


def test_a_port_taken_before_dovecot_binds_it_is_chosen_again(tmp_path: Path) -> None:
    """Test processes run side by side (make test): a port found free can be taken by another before
    Dovecot binds it; the fixture then starts on new ports instead of failing every test of the process."""
    d = Dovecot(tmp_path / "dc", users={"alice": "alicepw"})
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    d.port = taken.getsockname()[1]
    try:
        d.start()
        assert d.port != taken.getsockname()[1]
        with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
            assert s.recv(100).startswith(b"* OK")
    finally:
        d.close()
        taken.close()
