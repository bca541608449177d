"""TLS on both sides: STARTTLS and implicit TLS to clients; STARTTLS and implicit TLS to the backend,
verified against the configured CA and hostname."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import time

import imapclient
import pytest
from cryptography import x509

from cpmproxy.testing.certs import make_ca_and_cert, make_cert, make_chain
from cpmproxy.testing.proxyproc import free_port
from tests.proxyfix import check_config, client_ssl_context, raw_via, reload_proxy, still_serving


def test_client_starttls_backend_starttls(make_proxy, proxy_certs):
    p = make_proxy(tls_cert=str(proxy_certs.cert), tls_key=str(proxy_certs.key), backend_tls="starttls")
    c = imapclient.IMAPClient("localhost", p.port, ssl=False, timeout=30)
    c.starttls(client_ssl_context(proxy_certs))
    c.login("alice", "alicepw")
    assert c.select_folder("INBOX")
    c.logout()


def test_an_id_sent_before_starttls_is_forgotten(make_proxy, proxy_certs):
    """Anything said in plaintext may be a man in the middle's: an ID before STARTTLS chose the device
    (its policy class, delete_mode, local-delete records) of the session that logged in over TLS."""
    p = make_proxy(tls_cert=str(proxy_certs.cert), tls_key=str(proxy_certs.key),
                   config_extra='[policy]\n[[policy.class]]\ndevices = ["injected"]\nlocal_delete = false\n')
    c = imapclient.IMAPClient("localhost", p.port, ssl=False, timeout=30)
    c.id_({"name": "mitm", "x-cpm-device-id": "injected"})
    c.starttls(client_ssl_context(proxy_certs))
    c.login("alice", "alicepw")
    assert b"XCPM-LOCALDELETE" in c.capabilities()  # (the "injected" class would take it away)
    c.logout()
    assert "device=injected" not in p.log()


def test_logout_over_a_tls_backend_leaves_no_error(make_proxy):
    """Dovecot closes after LOGOUT; with the client still connected the session let go of the backend's
    transport from inside its connectionLost, which over TLS has lost its protocol by then: a traceback
    in the proxy's log for every LOGOUT (seen when the client was slower to close than the backend)."""
    p = make_proxy(backend_tls="starttls")
    c = raw_via(p)
    assert c.login("alice", "alicepw")[-1].startswith(b"L OK")
    r = c.command(b"z", b"LOGOUT")
    assert r[-1].startswith(b"z OK"), r
    assert c.closed(timeout=5)  # (the proxy closes; the client only reads until it does)
    c.close()
    assert still_serving(p)
    assert "Traceback" not in p.log() and "unhandled error" not in p.log()


def test_client_implicit_tls_backend_implicit_tls(make_proxy, proxy_certs):
    port = free_port()
    p = make_proxy(backend_tls="implicit",
                   listen_extra=[f"ssl:{port}:interface=127.0.0.1:privateKey={proxy_certs.key}:certKey={proxy_certs.cert}"])
    c = imapclient.IMAPClient("localhost", port, ssl=True, ssl_context=client_ssl_context(proxy_certs), timeout=30)
    caps = c.capabilities()
    assert b"STARTTLS" not in caps  # already TLS
    c.login("bob", "bobpw")
    c.select_folder("INBOX")
    c.logout()
    assert p.proc.poll() is None


def _served_serial(port: int, certs, starttls: bool) -> int:
    """The serial number of the certificate the proxy offers on ``port`` (implicit TLS, or STARTTLS)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if starttls:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"s STARTTLS\r\n")
            assert f.readline().startswith(b"s OK")
        with client_ssl_context(certs).wrap_socket(sock, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_a_full_chain_certificate_file_sends_its_intermediates(make_proxy, tmp_path):
    """``tls_cert`` (STARTTLS) and an ``ssl:`` listener's ``certKey`` given a full chain file (the server
    certificate, then the intermediate): a client that trusts only the root verifies the proxy, as it does
    Dovecot given the same file (the proxy sent the first certificate only; found by the TLS review)."""
    chain = make_chain(tmp_path / "chain")
    port = free_port()
    p = make_proxy(tls_cert=str(chain.cert), tls_key=str(chain.key),
                   listen_extra=[f"ssl:{port}:interface=127.0.0.1:privateKey={chain.key}:certKey={chain.cert}"])
    for where, starttls in ((port, False), (p.port, True)):
        assert _served_serial(where, chain, starttls)  # (verified: chain and name)


def test_a_reload_takes_up_renewed_certificates(make_proxy, proxy_certs, tmp_path):
    """Certificates are renewed in place (certbot, an operator's cron job): SIGHUP makes the proxy offer
    the new one on its ``ssl:`` listeners and on STARTTLS, to new connections; sessions already open go on.
    A renewal it cannot read is refused as a whole, and the certificate in use stays."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(proxy_certs.cert, cert)
    shutil.copy(proxy_certs.key, key)
    port = free_port()
    p = make_proxy(tls_cert=str(cert), tls_key=str(key),
                   listen_extra=[f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"])
    first = _served_serial(port, proxy_certs, starttls=False)
    assert _served_serial(p.port, proxy_certs, starttls=True) == first
    ctx = client_ssl_context(proxy_certs)
    open_session = imapclient.IMAPClient("localhost", port, ssl=True, ssl_context=ctx, timeout=30)
    open_session.login("alice", "alicepw")

    renewed = make_cert(tmp_path / "renewed", proxy_certs, "server")
    shutil.copy(renewed.cert, cert)
    shutil.copy(renewed.key, key)
    reload_proxy(p)
    second = _served_serial(port, proxy_certs, starttls=False)
    assert second != first
    assert _served_serial(p.port, proxy_certs, starttls=True) == second
    assert open_session.select_folder("INBOX")[b"UIDVALIDITY"]

    key.write_text("not a key\n")  # (a renewal half written)
    n = p.log().count("reload failed")
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while p.log().count("reload failed") == n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"no PEM private key in {key}" in p.log()
    assert _served_serial(port, proxy_certs, starttls=False) == second
    open_session.logout()
    assert still_serving(p)
    assert "Traceback" not in p.log()


def test_backend_wrong_hostname_refused(make_proxy):
    p = make_proxy(backend_tls="starttls", server_name="wrong.example")
    with raw_via(p) as c:
        r = c.login("alice", "alicepw")
        assert r[-1].startswith(b"L NO [UNAVAILABLE]"), r
    # (The log says why, and that it was the proxy's check: it said "backend closed the connection".)
    assert "TLS with the backend failed: its certificate is not for wrong.example" in p.log()


def test_backend_untrusted_ca_refused(make_proxy, tmp_path):
    """Refused, and the log tells an untrusted CA from an expired certificate (both were "certificate
    verify failed", blamed on the backend; found by the TLS review)."""
    other = make_ca_and_cert(tmp_path / "other-ca")
    p = make_proxy(backend_tls="implicit", ca_file=str(other.ca_cert))
    with raw_via(p) as c:
        assert c.login("alice", "alicepw")[-1].startswith(b"L NO [UNAVAILABLE]")
    assert "its certificate was refused: no trusted CA (backend.ca_file" in p.log()


def test_a_backend_port_of_the_other_tls_kind_is_told_in_words(make_proxy, dovecot):
    """``tls = "implicit"`` on Dovecot's plain port logged OpenSSL's ``[('SSL routines', '', 'wrong version
    number')]``, and ``starttls`` on its TLS port "no answer from the backend in 10 s": the operator review."""
    p = make_proxy(backend_tls="implicit", backend_port=dovecot.port)
    with raw_via(p) as c:
        assert c.login("alice", "alicepw")[-1].startswith(b"L NO [UNAVAILABLE]")
    assert ('TLS with the backend failed: it answered in plain text, not TLS (backend.tls = "implicit" needs its '
            'implicit-TLS port, such as 993; on 143, backend.tls = "starttls")') in p.log(), p.log()
    p = make_proxy(backend_tls="starttls", backend_port=dovecot.tls_port, backend_extra="connect_timeout = 1.0")
    with raw_via(p) as c:
        assert c.login("alice", "alicepw")[-1].startswith(b"L NO [UNAVAILABLE]")
    assert ('no greeting from the backend in 1 s (if backend.port is its implicit-TLS port, such as 993, set '
            'backend.tls = "implicit")') in p.log(), p.log()


def test_backend_ca_bundle_is_read_whole(make_proxy, dovecot, tmp_path):
    """``backend.ca_file`` is a CA bundle: the backend's CA after another one in the file (as in the
    system's ca-certificates.crt) must verify. Only the first certificate was read: every login failed."""
    other = make_ca_and_cert(tmp_path / "other-ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(other.ca_cert.read_bytes() + b"\n" + dovecot.certs.ca_cert.read_bytes())
    p = make_proxy(backend_tls="starttls", ca_file=str(bundle))
    with raw_via(p) as c:
        assert c.login("alice", "alicepw")[-1].startswith(b"L OK")


@pytest.mark.parametrize("backend, key", [('host = "imap_backend.internal"', "backend.host"),
                                          ('host = "127.0.0.1"\nserver_name = "a..b"', "backend.server_name")])
def test_a_backend_name_no_certificate_can_carry_fails_the_check_in_a_line(tmp_path, backend, key):
    """A backend host with "_" (a container's service name) or an empty label, with TLS to the backend:
    ``--check`` and the start ended with a 33-line idna traceback (found by the TLS review)."""
    config = tmp_path / "c.toml"
    config.write_text(f'[backend]\n{backend}\ntls = "implicit"\n')
    r = check_config(config)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{key}: " in r.stderr and "set backend.server_name" in r.stderr and "Traceback" not in r.stderr


def test_backend_ca_file_that_is_no_bundle_fails_the_check(tmp_path):
    """A ``ca_file`` with no certificate in it passed ``--check``; every login then failed with an internal
    error and a traceback."""
    from cpmproxy.config import ConfigError
    from cpmproxy.proxy.service import check_config

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for ca, reason in ((junk, "no PEM certificate"), (broken, "cannot be read"), (tmp_path / "none.pem", "no such file")):
        config = tmp_path / "c.toml"
        config.write_text(f'[backend]\nhost = "127.0.0.1"\ntls = "starttls"\nca_file = "{ca}"\n')
        try:
            check_config(str(config))
        except ConfigError as e:
            assert str(e).startswith("backend.ca_file: ") and reason in str(e), e
        else:
            raise AssertionError(f"{ca}: accepted")


def test_a_tls_client_on_the_plaintext_port_is_told_at_once(make_proxy, proxy_certs):
    """A client set for implicit TLS on the STARTTLS port (the operator review): its ClientHello is no
    IMAP line; the proxy logged a plain disconnect (a client that kept the connection open held it until
    preauth_timeout). Now it ends at once, said in the log, counted; the client's TLS library reports a
    protocol error."""
    from tests.test_plugin_api import metrics_of

    p = make_proxy(tls_cert=str(proxy_certs.cert), tls_key=str(proxy_certs.key),
                   config_extra="[limits]\npreauth_timeout = 30\n")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            client_ssl_context(proxy_certs).wrap_socket(raw, server_hostname="localhost")
    assert time.monotonic() - started < 5
    assert b'cpmproxy_bad_input_total{kind="tls_on_plaintext"} 1.0' in metrics_of(p)
    assert still_serving(p)


def test_a_tls_handshake_whose_first_read_is_one_byte_is_told_too(make_proxy, proxy_certs):
    """Found by review: only the first read was looked at, so a ClientHello whose first byte came alone
    (a slow link; what a PROXY header leaves) went to the IMAP parser and waited for a line."""
    from tests.test_plugin_api import metrics_of

    p = make_proxy(config_extra="[limits]\npreauth_timeout = 30\n")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as raw:
        assert raw.recv(1024).startswith(b"* OK")
        raw.sendall(b"\x16")
        time.sleep(0.2)
        raw.sendall(b"\x03\x01\x00\x05hello")
        answer = raw.recv(1024)
    assert answer.startswith(b"* BYE [CLIENTBUG]"), answer
    assert b'cpmproxy_bad_input_total{kind="tls_on_plaintext"} 1.0' in metrics_of(p)
    assert still_serving(p)
