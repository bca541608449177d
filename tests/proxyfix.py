"""Proxy fixtures: a real cpmproxy process in front of the session's real Dovecot."""

from __future__ import annotations

import imaplib
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cpmproxy.testing.certs import make_ca_and_cert
from cpmproxy.testing.proxyproc import ProxyProcess
from cpmproxy.testing.rawclient import RawIMAP


def check_config(path: Path) -> subprocess.CompletedProcess:
    """``cpmproxy --config PATH --check``, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "cpmproxy.cli", "--config", str(path), "--check"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="session")
def proxy_certs(tmp_path_factory):
    """A CA of the client side and the proxy's own certificate (localhost/127.0.0.1)."""
    return make_ca_and_cert(tmp_path_factory.mktemp("proxy-certs"))


@pytest.fixture(scope="session")
def proxy(dovecot, proxy_certs, tmp_path_factory):
    """The default proxy: STARTTLS to the backend with verification, STARTTLS offered to clients."""
    p = ProxyProcess(tmp_path_factory.mktemp("proxy"), dovecot.port, backend_tls="starttls",
                     ca_file=str(dovecot.certs.ca_cert), server_name="localhost",
                     tls_cert=str(proxy_certs.cert), tls_key=str(proxy_certs.key),
                     config_extra="[limits]\nauth_failure_delay = 0.2\nmax_line = 8192\n"
                                  "max_literal = 30000000\n")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def make_proxy(dovecot, proxy_certs, tmp_path):
    """Start an extra proxy with its own settings (stopped at the end of the test)."""
    started = []

    def make(**kw) -> ProxyProcess:
        kw.setdefault("backend_tls", "starttls")
        if kw["backend_tls"] != "none":
            kw.setdefault("ca_file", str(dovecot.certs.ca_cert))
            kw.setdefault("server_name", "localhost")
        backend_port = kw.pop("backend_port", dovecot.tls_port if kw["backend_tls"] == "implicit" else dovecot.port)
        p = ProxyProcess(tmp_path / f"p{len(started)}", backend_port, **kw)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        p.stop()


def client_ssl_context(certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_cert))


def imap_via(p: ProxyProcess, user: str = "alice", password: str | None = None) -> imaplib.IMAP4:
    c = imaplib.IMAP4(p.host, p.port, timeout=30)
    c.login(user, password or f"{user}pw")
    return c


def reload_proxy(p: ProxyProcess, config: str | None = None) -> None:
    """SIGHUP ``p`` (with ``config`` as its new configuration, if given) and wait until it says it took
    the file up."""
    if config is not None:
        p.config_path.write_text(config)
    n = p.log().count("configuration reloaded")
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while p.log().count("configuration reloaded") == n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.log().count("configuration reloaded") > n, p.log()


def metric(p: ProxyProcess, name: str) -> float:
    """A sample's value on the proxy's metrics endpoint (``name`` with its labels); 0 if absent."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    return next((float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " ")), 0.0)


def raw_via(p: ProxyProcess, **kw) -> RawIMAP:
    return RawIMAP(p.host, p.port, **kw)


def still_serving(p: ProxyProcess, user: str = "bob") -> bool:
    """A second client logs in and runs a command: the proxy survived whatever came before."""
    c = imap_via(p, user)
    try:
        typ, _ = c.noop()
        return typ == "OK"
    finally:
        c.logout()


def send_with_literal(c: RawIMAP, tag: bytes, head: bytes, literal: bytes, rest: bytes) -> list[bytes]:
    """``tag head{literal}``, the server's ``+`` awaited for a synchronizing literal, then ``rest`` (the
    literal's bytes and what follows); every response up to the tagged one."""
    c.send(tag + b" " + head + literal + b"\r\n")
    if not literal.endswith(b"+}"):
        first = c.read_line()
        if not first.startswith(b"+"):
            return [first] if first.startswith(tag + b" ") else [first] + c.until_tagged(tag)
    c.send(rest + b"\r\n")
    return c.until_tagged(tag)


def server_flags(dovecot, user: str, folder: str, uid: int) -> bytes:
    """The FETCH FLAGS line of ``uid`` in ``folder`` as Dovecot has it (read-only, straight to Dovecot)."""
    d = RawIMAP("127.0.0.1", dovecot.port)
    try:
        d.login(user, f"{user}pw")
        d.command(b"x", b'EXAMINE "%s"' % folder.encode())
        lines = [x for x in d.command(b"f", b"UID FETCH %d (FLAGS)" % uid) if x.startswith(b"* ")]
        assert lines, f"UID {uid} not in {folder}"
        return lines[0]
    finally:
        d.close()
