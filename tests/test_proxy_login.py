"""The login phase is the proxy's: greeting, CAPABILITY, STARTTLS, LOGIN, AUTHENTICATE PLAIN, ID."""

from __future__ import annotations

import base64
import time
import uuid

import imapclient
import pytest

from tests.proxyfix import client_ssl_context, imap_via, raw_via, still_serving


def test_greeting_has_capabilities(proxy):
    with raw_via(proxy) as c:
        assert c.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
        caps = c.greeting.split(b"]")[0].split()[2:]
        assert b"STARTTLS" in caps and b"AUTH=PLAIN" in caps and b"SASL-IR" in caps
        r = c.command(b"a", b"CAPABILITY")
        assert r[0].startswith(b"* CAPABILITY IMAP4rev1") and r[-1].startswith(b"a OK")
        assert c.command(b"b", b"NOOP")[-1].startswith(b"b OK")
        r = c.command(b"c", b"LOGOUT")
        assert r[0].startswith(b"* BYE") and r[-1].startswith(b"c OK")


def test_login_returns_backend_capabilities_filtered(proxy):
    with raw_via(proxy) as c:
        r = c.command(b"a", b"LOGIN alice alicepw")
        line = r[-1]
        assert line.startswith(b"a OK [CAPABILITY ")
        caps = line[len(b"a OK [CAPABILITY "):line.index(b"]")].split()
        assert b"IMAP4rev1" in caps and b"METADATA" in caps and b"QRESYNC" in caps
        for dropped in (b"STARTTLS", b"AUTH=PLAIN", b"LOGINDISABLED", b"SASL-IR"):
            assert dropped not in caps
        assert not any(c.startswith(b"COMPRESS") for c in caps)
        assert any(c.startswith(b"APPENDLIMIT=") for c in caps)
        r = c.command(b"b", b"CAPABILITY")
        assert r[0].split()[2:] == caps
        assert c.command(b"c", b"COMPRESS DEFLATE")[-1].startswith(b"c NO [CANNOT]")
        assert c.command(b"d", b"STARTTLS")[-1].startswith(b"d BAD")


def test_login_with_literals(proxy):
    with raw_via(proxy) as c:
        c.send(b"a LOGIN {5}\r\n")
        assert c.read_line().startswith(b"+")
        c.send(b"alice {7+}\r\nalicepw\r\n")
        assert c.until_tagged(b"a")[-1].startswith(b"a OK [CAPABILITY")
        assert c.command(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")


def test_authenticate_plain_sasl_ir_and_continuation(proxy):
    blob = base64.b64encode(b"\0bob\0bobpw")
    with raw_via(proxy) as c:
        assert c.command(b"a", b"AUTHENTICATE PLAIN " + blob)[-1].startswith(b"a OK [CAPABILITY")
    with raw_via(proxy) as c:
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        assert c.read_line() == b"+ \r\n"
        c.send(blob + b"\r\n")
        assert c.until_tagged(b"a")[-1].startswith(b"a OK [CAPABILITY")
    with raw_via(proxy) as c:
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        c.read_line()
        c.send(b"*\r\n")
        assert c.until_tagged(b"a")[-1].startswith(b"a BAD")
        assert c.command(b"b", b"AUTHENTICATE CRAM-MD5")[-1].startswith(b"b NO [CANNOT]")
        assert c.command(b"c", b"AUTHENTICATE PLAIN !!notbase64")[-1].startswith(b"c BAD")


def test_wrong_password_is_authenticationfailed_with_delay(proxy):
    with raw_via(proxy) as c:
        t0 = time.monotonic()
        r = c.command(b"a", b"LOGIN alice wrong")
        assert r[-1].startswith(b"a NO [AUTHENTICATIONFAILED]")
        assert time.monotonic() - t0 >= 0.15  # the configured delay (0.2 s, doubling per failure)
        # Two more failures and the connection is closed (max_auth_failures = 3).
        c.command(b"b", b"LOGIN alice wrong")
        r = c.command(b"c", b"LOGIN alice wrong")
        assert r[-1].startswith(b"c NO [AUTHENTICATIONFAILED]")
        assert c.read_line().startswith(b"* BYE")
        assert c.closed()
    assert still_serving(proxy)


def test_id_answered_and_device_id_kept(proxy):
    with raw_via(proxy) as c:
        r = c.command(b"a", b'ID ("name" "cpm-app" "x-cpm-device-id" "phone-1")')
        assert r[0].startswith(b'* ID ("name" "cpmproxy"') and r[-1].startswith(b"a OK")
        assert c.command(b"b", b"ID NIL")[-1].startswith(b"b OK")
        assert c.command(b"c", b"ID (\"odd\")")[-1].startswith(b"c BAD")


def test_id_fields_dovecot_trusts_from_a_proxy_are_not_the_clients_to_set(make_proxy, dovecot):
    """Dovecot trusts x- ID fields from a proxy in login_trusted_networks: a client's x-session-ext-id
    named the session in Dovecot's log, x-forward-* became passdb fields. Only the proxy's own reach it."""
    p = make_proxy()
    with raw_via(p) as c:
        tag = "forged" + uuid.uuid4().hex[:8]
        r = c.command(b"i", b'ID ("name" "app" "x-session-ext-id" "%s" "x-originating-ip" "203.0.113.9" '
                            b'"x-forward-quota" "1")' % tag.encode())
        assert r[-1].startswith(b"i OK"), r
        assert c.login("dave", "davepw")[-1].startswith(b"L OK")
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    deadline = time.monotonic() + 5
    while "user=<dave>" not in dovecot.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = dovecot.log_path.read_text()
    assert "user=<dave>" in log and tag not in log and "203.0.113.9" not in log


def test_a_password_that_is_not_utf8_reaches_the_backend_as_sent(make_proxy, dovecot):
    """A Latin-1 password (the bytes Dovecot has) failed through the proxy: LOGIN's was decoded with
    replacement characters, AUTHENTICATE PLAIN's refused as invalid."""
    password = b"caf\xe9-\xfc"
    dovecot.add_user("latin", password.decode("utf-8", "surrogateescape"))
    with raw_via(dovecot) as direct:
        assert direct.command(b"L", b"LOGIN latin {%d+}\r\n%s" % (len(password), password))[-1].startswith(b"L OK")
    p = make_proxy()
    with raw_via(p) as c:
        r = c.command(b"L", b"LOGIN latin {%d+}\r\n%s" % (len(password), password))
        assert r[-1].startswith(b"L OK"), r
    with raw_via(p) as c:
        blob = base64.b64encode(b"\0latin\0" + password)
        assert c.command(b"A", b"AUTHENTICATE PLAIN " + blob)[-1].startswith(b"A OK")


def test_a_user_named_nil_logs_in_as_written(make_proxy, dovecot):
    """LOGIN's user name and password are astrings: the atom ``nil`` is the name "nil" (Dovecot logs such a
    user in); the proxy read no name there and refused the login."""
    dovecot.add_user("nil", "Nil")
    with raw_via(dovecot) as direct:
        assert direct.command(b"L", b"LOGIN nil Nil")[-1].startswith(b"L OK")
    p = make_proxy()
    with raw_via(p) as c:
        r = c.command(b"L", b"LOGIN nil Nil")
        assert r[-1].startswith(b"L OK"), r
        assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")
    with raw_via(p) as c:
        assert c.command(b"L", b"LOGIN nil NIL")[-1].startswith(b"L NO [AUTHENTICATIONFAILED]")


def test_commands_before_login_refused(proxy):
    with raw_via(proxy) as c:
        r = c.command(b"a", b"SELECT INBOX")
        assert r[-1].startswith(b"a BAD [CLIENTBUG]")
        assert c.command(b"b", b"XYZZY")[-1].startswith(b"b BAD")
        assert c.command(b"c", b"UID FETCH 1 FLAGS")[-1].startswith(b"c BAD")
        assert c.command(b"d", b"LOGIN alice alicepw")[-1].startswith(b"d OK")


def test_backend_down_is_unavailable_quickly(make_proxy):
    from cpmproxy.testing.proxyproc import free_port

    p = make_proxy(backend_tls="none", backend_port=free_port())
    with raw_via(p) as c:
        t0 = time.monotonic()
        r = c.command(b"a", b"LOGIN alice alicepw")
        assert r[-1].startswith(b"a NO [UNAVAILABLE]")
        assert time.monotonic() - t0 < 5
        assert c.command(b"b", b"NOOP")[-1].startswith(b"b OK")  # still usable; may retry


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_backend_by_name_or_address(make_proxy, host):
    """A name is resolved (HostnameEndpoint); an address is connected to directly."""
    p = make_proxy(backend_tls="none", backend_host=host)
    with raw_via(p) as c:
        assert c.command(b"a", b"LOGIN alice alicepw")[-1].startswith(b"a OK")
        assert c.command(b"b", b"SELECT INBOX")[-1].startswith(b"b OK")


def test_backend_name_that_does_not_resolve_is_unavailable(make_proxy):
    p = make_proxy(backend_tls="none", backend_host="no-such-host.invalid")
    with raw_via(p) as c:
        assert c.command(b"a", b"LOGIN alice alicepw")[-1].startswith(b"a NO [UNAVAILABLE]")


def test_plaintext_login_policy(make_proxy, proxy_certs):
    p = make_proxy(tls_cert=str(proxy_certs.cert), tls_key=str(proxy_certs.key))
    # loopback (default): allowed without TLS
    imap_via(p).logout()
    never = make_proxy(tls_cert=str(proxy_certs.cert), tls_key=str(proxy_certs.key),
                       proxy_extra='plaintext_auth = "never"')
    with raw_via(never) as c:
        assert b"LOGINDISABLED" in c.greeting
        assert c.command(b"a", b"LOGIN alice alicepw")[-1].startswith(b"a NO [PRIVACYREQUIRED]")
    # After STARTTLS the same login works.
    client = imapclient.IMAPClient(never.host, never.port, ssl=False, timeout=30)
    client.starttls(client_ssl_context(proxy_certs))
    assert b"AUTH=PLAIN" in client.capabilities()
    client.login("alice", "alicepw")
    assert client.select_folder("INBOX")
    client.logout()
