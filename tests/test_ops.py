"""Operations: CLI --check, twist plugin, SIGHUP reload, SIGTERM shutdown, metrics, PROXY protocol + ID."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from cpmproxy.testing.proxyproc import ProxyProcess, free_port
from tests.proxyfix import check_config as _check
from tests.proxyfix import imap_via, raw_via, reload_proxy, still_serving

ROOT = Path(__file__).resolve().parents[1]


def test_check_accepts_good_and_rejects_bad_configs(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[proxy]\nlisten = ["tcp:1143:interface=127.0.0.1"]\n[backend]\nhost = "127.0.0.1"\n')
    r = _check(good)
    assert r.returncode == 0, r.stderr
    cases = {
        '[proxy]\nlisen = ["tcp:1"]\n': "did you mean 'listen'",
        '[backend]\ntls = "maybe"\n': "backend.tls",
        '[limits]\nmax_line = -1\n': "limits.max_line",
        '[limits]\nmax_line = "big"\n': "expected int",
        'plugins = ["nope"]\n': "unknown plugin 'nope'",
        '[proxy]\nlisten = ["bogus:xyz"]\n': "invalid endpoint",
        'wat = 1\n': "wat: unknown key",
        '[backend\n': "",
        '[backend]\ntls = "starttls"\nca_file = "/nonexistent.pem"\n': "no such file",
    }
    for text, needle in cases.items():
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        r = _check(bad)
        assert r.returncode != 0, text
        assert needle in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)
    r = _check(tmp_path / "missing.toml")
    assert r.returncode != 0 and "no such file" in r.stderr


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """``cpmproxy ARGS`` with no socket passed by systemd (whatever the environment of the tests)."""
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("LISTEN_")}
    return subprocess.run([sys.executable, "-m", "cpmproxy.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _one_line_reason(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("cpmproxy: ") and needle in r.stderr, r.stderr


def test_unreadable_config_files_get_a_one_line_reason(tmp_path):
    """A directory, a file that is not UTF-8, a file the user cannot read: --check and a real start both
    say why in one line (they printed a traceback)."""
    directory = tmp_path / "dir.toml"
    directory.mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[proxy]\ngreeting = "Gr\xfc\xdfe"\n')
    cases = {directory: "cannot read: Is a directory", latin1: "not UTF-8 text"}
    if os.geteuid() != 0:  # (root reads anything)
        secret = tmp_path / "secret.toml"
        secret.write_text("[proxy]\n")
        secret.chmod(0)
        cases[secret] = "cannot read: Permission denied"
    for path, needle in cases.items():
        _one_line_reason(_cli("--config", str(path), "--check"), needle)
        _one_line_reason(_cli("--config", str(path)), needle)
        assert _cli("--config", str(path), "--check").stderr.count(str(path)) == 1  # named once


def test_systemd_endpoint_checked_without_sockets_and_clear_when_missing(tmp_path):
    """--check (ExecStartPre, where systemd passes no socket) checks a systemd: endpoint's syntax only; a
    real start without the socket says so in one line (it said "list index out of range")."""
    conf = tmp_path / "sd.toml"
    for desc in ("systemd:domain=INET:index=0", "systemd:domain=INET6:name=imap", "systemd:INET:0",
                 "haproxy:systemd:domain=INET:index=0"):
        conf.write_text(f'[proxy]\nlisten = ["{desc}"]\n')
        r = _cli("--config", str(conf), "--check")
        assert r.returncode == 0 and "configuration OK" in r.stdout, (desc, r.stderr)
    for desc, needle in (("systemd:domain=INET", "exactly one of index or name"),
                         ("systemd:domain=NOPE:index=0", "address family"),
                         ("systemd:domain=INET:index=x", "index must be a number"),
                         ("systemd:domain=INET:port=143", "unknown parameter 'port'")):
        conf.write_text(f'[proxy]\nlisten = ["{desc}"]\n')
        _one_line_reason(_cli("--config", str(conf), "--check"), needle)
    conf.write_text('[proxy]\nlisten = ["systemd:domain=INET:index=0"]\n')
    _one_line_reason(_cli("--config", str(conf)),
                     "listen endpoint systemd:domain=INET:index=0: no socket passed by systemd "
                     "(index 0; none passed: LISTEN_FDS and LISTEN_FDNAMES are both needed)")
    conf.write_text('[proxy]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                    '[metrics]\nlisten = "systemd:domain=INET:name=metrics"\n')
    _one_line_reason(_cli("--config", str(conf)), "no socket passed by systemd (name 'metrics'; ")


def _socket_activated(listener, conf: Path, names: str = "imap") -> subprocess.Popen:
    """The proxy started as systemd starts it: ``listener`` on fd 3 (and again on the next fds, one per
    name after the first in ``names``), LISTEN_PID naming the process itself (a small launcher does that),
    LISTEN_FDS/LISTEN_FDNAMES set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    count = len(names.split(":"))  # (the sockets after the first: the same one again, at fds 4, 5, ...)
    launch = ("import os, sys; fd = int(sys.argv[1]); fd == 3 or (os.dup2(fd, 3), os.close(fd)); "
              f"[os.dup2(3, 3 + i) for i in range(1, {count})]; "
              f"os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='{count}', LISTEN_FDNAMES={names!r}); "
              "os.execv(sys.executable, [sys.executable, '-m', 'cpmproxy.cli', '--config', sys.argv[2]])")
    proc = subprocess.Popen([sys.executable, "-c", launch, str(listener.fileno()), str(conf)],
                            pass_fds=[listener.fileno()], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    listener.close()
    return proc


def _greeted_on_a_systemd_socket(tmp_path, address: str = "127.0.0.1") -> str:
    """The proxy started on a socket bound to ``address`` and passed as systemd does (fd 3,
    LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES): it greets a client there, and stops cleanly at SIGTERM. Its output."""
    import socket
    conf = tmp_path / "sd.toml"
    conf.write_text('[proxy]\nlisten = ["systemd:domain=INET:index=0"]\n')
    listener = socket.socket()
    listener.bind((address, 0))
    listener.listen()
    port = listener.getsockname()[1]
    proc = _socket_activated(listener, conf)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.settimeout(15)
            assert s.recv(200).startswith(b"* OK")
    except OSError:
        proc.kill()
        raise AssertionError(proc.communicate(timeout=10)[0].decode()) from None
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0, out
    return out


def test_systemd_socket_activation_serves(tmp_path):
    """With the socket passed as systemd does, the proxy serves on it."""
    _greeted_on_a_systemd_socket(tmp_path)


@pytest.mark.parametrize("address, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_a_socket_systemd_passed_where_no_remote_client_can_log_in_is_warned_of(tmp_path, address, warned):
    """The README's socket activation (cpmproxy.socket's ListenStream=143: every interface) with the example
    configuration (no tls_cert, plaintext_auth = "loopback"): every remote client got LOGINDISABLED, and
    nothing said so, as it is said of such a tcp: listener (found by the ops review). --check cannot know
    the socket's address (ExecStartPre gets none); the start, which has it, warns."""
    out = _greeted_on_a_systemd_socket(tmp_path, address)
    assert ("proxy.listen[0]: clients on other hosts cannot log in" in out) == warned, out


@pytest.mark.parametrize("names, said", [
    ("imap", "systemd passed 1 socket(s) (imap) and no listener takes them"),
    ("imap:imap", "systemd passed 2 socket(s) (imap) and no listener takes them"),
], ids=["one", "two-of-one-name"])
def test_sockets_systemd_passed_that_no_listener_takes_stop_the_start(tmp_path, names, said):
    """cpmproxy.socket enabled while the configuration listens elsewhere (the operator review: its clients
    waited for a greeting forever, nothing logged): the proxy does not start, and says why. Sockets are
    counted as passed, not by name (two of one name were said to be one)."""
    import socket
    conf = tmp_path / "sd.toml"
    conf.write_text('[proxy]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    proc = _socket_activated(listener, conf, names)
    try:
        out = proc.communicate(timeout=30)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out
    assert "Traceback" not in out and out.strip().count("\n") == 0, out
    assert said in out, out


@pytest.mark.skipif(not __import__("socket").has_dualstack_ipv6(), reason="no dual-stack IPv6 here")
def test_systemd_dual_stack_socket(tmp_path):
    """systemd's ``ListenStream=143`` is a dual-stack IPv6 socket: adopted as INET, Twisted would garble
    every client address; the proxy says so and does not start. As INET6, an IPv4 client on loopback
    (``::ffff:127.0.0.1``) counts as loopback (plaintext login allowed by the default policy)."""
    import socket

    def dual_stack():
        listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        return listener, listener.getsockname()[1]

    conf = tmp_path / "sd.toml"
    conf.write_text('[proxy]\nlisten = ["systemd:domain=INET:index=0"]\n')
    listener, _ = dual_stack()
    proc = _socket_activated(listener, conf)
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode != 0 and "systemd passed an INET6 socket; use domain=INET6" in out, out
    assert "Traceback" not in out

    conf.write_text('[proxy]\nlisten = ["systemd:domain=INET6:index=0"]\n[backend]\nport = %d\n' % free_port())
    listener, port = dual_stack()
    proc = _socket_activated(listener, conf)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.settimeout(15)
            assert s.recv(200).startswith(b"* OK")
            s.sendall(b"L LOGIN alice alicepw\r\n")
            answer = s.recv(200)
        # (no backend listens there: refused for that, never for privacy)
        assert answer.startswith(b"L NO [UNAVAILABLE]"), answer
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0, out


def test_example_config_is_valid():
    r = _check(ROOT / "conf" / "cpmproxy.toml")
    assert r.returncode == 0, r.stderr


def test_sigterm_says_bye_and_exits(make_proxy):
    p = make_proxy()
    c = raw_via(p)
    c.login("alice", "alicepw")
    c.command(b"s", b"SELECT INBOX")
    p.signal(signal.SIGTERM)
    line = c.read_line()
    assert line.startswith(b"* BYE [UNAVAILABLE]") and b"shutting down" in line
    assert c.closed()
    assert p.proc.wait(10) == 0


def test_sigterm_lets_commands_under_way_finish_then_says_bye(make_proxy, dovecot):
    """At SIGTERM an APPEND whose literal is half uploaded is completed and acknowledged before the BYE
    (it was stored and the client told BYE instead: a client retrying after reconnecting stored it twice);
    a command sent after it gets no answer, BYE instead; a session with nothing under way gets its BYE at
    once; /healthz says 503 while sessions finish (the listener closed at once); found by the ops review."""
    p = make_proxy(proxy_extra="shutdown_grace = 10.0")
    idle = raw_via(p)
    idle.login("bob", "bobpw")
    c = raw_via(p)
    c.login("alice", "alicepw")
    subject = "drain-" + uuid.uuid4().hex[:8]
    message = (f"Subject: {subject}\r\n\r\n" + "x" * 20000 + "\r\n").encode()
    c.send(b"a APPEND INBOX {%d}\r\n" % len(message))
    assert c.read_line().startswith(b"+")
    c.send(message[:5000])
    p.signal(signal.SIGTERM)
    assert idle.read_line().startswith(b"* BYE [UNAVAILABLE]")  # (nothing under way: at once)
    assert health(p) == (503, "stopping: the proxy is shutting down\n")
    c.send(message[5000:] + b"\r\nb NOOP\r\n")
    lines = [c.read_line(), c.read_line()]
    assert lines[0].startswith(b"a OK [APPENDUID"), lines
    assert lines[1].startswith(b"* BYE [UNAVAILABLE]") and b"shutting down" in lines[1], lines
    assert c.closed()
    assert p.proc.wait(10) == 0
    # (Each disconnect line says why, with the device, the time and the bytes: "Connection was closed
    # cleanly." for every ending before; ops review.)
    assert "reason=BYE [UNAVAILABLE] Server shutting down." in p.log()
    assert re.search(r"disconnect .*device=\S+ phase=auth seconds=[0-9.]+ bytes_out=\d+", p.log())
    d = dovecot.imap_direct("alice", tls="none")
    d.select_folder("INBOX", readonly=True)
    assert len(d.search(["SUBJECT", subject])) == 1
    d.logout()


def test_sighup_reload_keeps_sessions(make_proxy):
    p = make_proxy(config_extra="[limits]\nmax_connections_per_user = 5\n")
    c = raw_via(p)
    c.login("alice", "alicepw")
    reload_proxy(p, p.config_path.read_text().replace("max_connections_per_user = 5", "max_connections_per_user = 1"))
    assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # the old session lives on
    with raw_via(p) as d:
        assert d.login("alice", "alicepw")[-1].startswith(b"L NO [LIMIT]")  # the new limit applies
    # A broken config on reload keeps the running one.
    p.config_path.write_text(p.config_path.read_text() + "\nbogus = 1\n")
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload failed" not in p.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload failed" in p.log()
    assert f"keeping the old configuration: {p.config_path}: limits.bogus: unknown key" in p.log(), p.log()
    assert c.command(b"n2", b"NOOP")[-1].startswith(b"n2 OK")
    c.close()


def test_a_reload_keeps_how_long_a_session_has_been_idle(make_proxy):
    """A reload restarted every session's idle timer: under a proxy reloaded more often than its
    ``idle_timeout`` (certificate renewals, policy pushes) an idle client was never timed out (found by the
    reload review). The timer now counts from the session's last activity, and a shorter timeout that this
    already exceeds ends the session at once."""
    import select

    p = make_proxy(config_extra="[limits]\nidle_timeout = 3.0\n")
    config = p.config_path.read_text()
    c = raw_via(p)
    c.login("alice", "alicepw")
    start = time.monotonic()
    while time.monotonic() - start < 8 and not select.select([c.sock], [], [], 0.4)[0]:
        reload_proxy(p)
    assert c.read_line() == b"* BYE [UNAVAILABLE] Disconnected for inactivity.\r\n"
    assert time.monotonic() - start < 6
    reload_proxy(p, config.replace("idle_timeout = 3.0", "idle_timeout = 60.0"))
    c = raw_via(p)
    c.login("alice", "alicepw")
    time.sleep(1.0)
    assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # (activity: counted from here)
    time.sleep(3.0)
    reload_proxy(p, config.replace("idle_timeout = 3.0", "idle_timeout = 2.5"))  # (idle 3 s already: at once)
    c.sock.settimeout(1.5)
    assert c.read_line() == b"* BYE [UNAVAILABLE] Disconnected for inactivity.\r\n"
    assert c.closed()
    assert still_serving(p)


def test_a_sighup_during_shutdown_is_ignored(make_proxy):
    """A SIGHUP after SIGTERM, while sessions drained, still ran a reload: it reconfigured (or, for a change
    of plugins, ended) sessions the stop was draining and started plugins the stop no longer stopped (found
    by the reload review). It is now ignored, and said."""
    p = make_proxy(proxy_extra="shutdown_grace = 10.0")
    c = raw_via(p)
    c.login("alice", "alicepw")
    message = b"Subject: drain\r\n\r\n" + b"x" * 20000 + b"\r\n"
    c.send(b"a APPEND INBOX {%d}\r\n" % len(message))
    assert c.read_line().startswith(b"+")
    c.send(message[:5000])
    p.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while "stopping" not in health(p)[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    p.config_path.write_text('plugins = ["readreport"]\n' + p.config_path.read_text())
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "reload ignored" not in p.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "reload ignored: the proxy is shutting down" in p.log(), p.log()
    assert "configuration reloaded" not in p.log()
    body = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read().decode()
    assert 'cpmproxy_reloads_total{result="ignored"} 1.0' in body
    c.send(message[5000:] + b"\r\n")
    lines = [c.read_line(), c.read_line()]
    assert lines[0].startswith(b"a OK [APPENDUID"), lines
    assert lines[1] == b"* BYE [UNAVAILABLE] Server shutting down.\r\n", lines
    assert p.proc.wait(10) == 0


def test_a_reload_that_changes_the_plugins_ends_the_open_sessions(make_proxy, dovecot):
    """Taking ``policy`` out of ``plugins`` on reload: a session with a filtered view then got the server's
    numbers with nothing announced, and its ``STORE 2 +FLAGS (\\Deleted)`` + EXPUNGE deleted a hidden
    message it had never seen (found by the ops review). Open sessions now end (after what they have
    under way: BYE [UNAVAILABLE]) and clients reconnect under the new set; with the same plugins, sessions
    live on and take up the new limits."""
    from cpmproxy.testing.sample import make_object

    folder = "Default/tel:+1777" + uuid.uuid4().hex[:6]
    for kind in ("chat", "imdn", "chat"):
        dovecot.deliver("carol", folder, make_object(kind))
    p = make_proxy(config_extra="[policy]\nsync = { imdn = false }\n")
    c = raw_via(p)
    c.login("carol", "carolpw")
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder.encode())
    config = p.config_path.read_text()
    reload_proxy(p, config.replace("[policy]", '[limits]\nmax_line = 1024\n[policy]'))
    assert c.command(b"n", b"NOOP")[-1].startswith(b"n OK")  # (same plugins: the session lives on)
    c.send(b"x NOOP " + b"x" * 1100 + b"\r\n")
    assert c.read_line().startswith(b"* BYE [TOOBIG]")  # (the new limit, for a session opened before)
    c = raw_via(p)
    c.login("carol", "carolpw")
    assert b"* 2 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder.encode())
    # A FETCH under way at the reload is answered by the plugins it began with (the diff review: the new
    # set answered the rest of it, hidden messages and the backend's numbers), then BYE.
    from tests.test_notify import _imap_processes
    stopped = list(_imap_processes("carol"))
    try:
        for pid in stopped:  # (the backend holds the FETCH's answer until the reload is done)
            os.kill(pid, signal.SIGSTOP)
        c.send(b"f FETCH 1:* (UID)\r\n")
        time.sleep(0.2)
        reload_proxy(p, 'plugins = ["readreport"]\n' + config.replace("[policy]\nsync = { imdn = false }\n", ""))
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    lines = [c.read_line() for _ in range(4)]
    assert lines[:2] == [b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 3)\r\n"] and lines[2].startswith(b"f OK"), lines
    assert lines[3] == b"* BYE [UNAVAILABLE] Server configuration changed, please reconnect.\r\n"
    assert c.closed()
    c = raw_via(p)
    c.login("carol", "carolpw")
    assert b"* 3 EXISTS\r\n" in c.command(b"s", b'SELECT "%s"' % folder.encode())  # (no policy now)
    c.close()
    assert still_serving(p)


def test_reload_warnings_compare_with_what_runs(make_proxy):
    """A listener or [log] change needs a restart, said at every reload while the file differs from what
    runs; reloads compared with the last file read instead: after a [log] change alone the listeners
    were warned about again, a file gone back to what runs was warned about, one still asking for
    another listener was not (found by the ops review)."""
    p = make_proxy()
    original = p.config_path.read_text()
    changed = original.replace('[backend]', '[log]\nlevel = "warn"\n[backend]')
    changed = changed.replace(f"tcp:{p.port}:interface=127.0.0.1", f"tcp:{free_port()}:interface=127.0.0.1")
    log_only = original.replace('[backend]', '[log]\nlevel = "warn"\n[backend]')
    for text, listeners, logs in ((changed, 1, 1), (changed, 2, 2), (original, 2, 2), (log_only, 2, 3)):
        reload_proxy(p, text)
        log = p.log()
        assert log.count("listener changes need a restart") == listeners, log
        assert log.count("[log] changes need a restart") == logs, log
    assert still_serving(p)


def test_sighup_keeps_what_plugins_hold_for_open_sessions(make_proxy, dovecot):
    """A reload keeps the plugins that stay enabled: a device idling since before it still hears of new
    mail (the user's watch connection is the notify plugin's; a new instance had none until the user's
    next login)."""
    from cpmproxy.testing.sample import make_object
    from tests.test_notify import device, idle, new_folder, set_pref, wait_status

    folder = new_folder(dovecot)
    p = make_proxy()
    b = device(p, "B")
    set_pref(b, b'"on"')
    try:
        idle(b)
        time.sleep(0.5)  # (the watch arms its NOTIFY)
        reload_proxy(p)
        dovecot.deliver("alice", folder, make_object("chat", text="after the reload"))
        line = wait_status(b, folder)
        assert line is not None and b"MESSAGES 2" in line, line
        b.send(b"DONE\r\n")
        assert b.until_tagged(b"t")[-1].startswith(b"t OK")
    finally:
        with raw_via(p) as c:
            c.login("alice", "alicepw")
            set_pref(c, b"NIL")
        b.close()


def test_metrics_endpoint(proxy):
    imap_via(proxy).logout()
    with raw_via(proxy) as c:
        c.login("alice", "nope")
    body = urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=5).read().decode()
    assert "cpmproxy_connections_total" in body
    assert 'cpmproxy_logins_total{result="ok"}' in body
    assert 'cpmproxy_logins_total{result="failed"}' in body
    assert 'cpmproxy_commands_total{command="login"}' in body
    assert "cpmproxy_client_bytes_sent_total" in body


def health(p) -> tuple[int, str]:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/healthz", timeout=15)
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_endpoint_says_whether_the_backend_answers(make_proxy, proxy, tmp_path):
    """``/healthz`` on the metrics listener, for a load balancer: 200 while the backend greets the proxy
    (over the configured TLS), 503 with the reason while it does not."""
    status, text = health(proxy)
    assert status == 200 and text.startswith("ok: backend 127.0.0.1:"), (status, text)
    closed = make_proxy(backend_port=free_port(), backend_tls="none")  # (nothing listens there)
    status, text = health(closed)
    assert status == 503 and text.startswith("backend unavailable: cannot connect to backend"), (status, text)
    # A backend that takes the connection and never greets (the reason was empty; found by the TLS review).
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for tls in ("none", "implicit"):
            hung = make_proxy(backend_port=silent.getsockname()[1], backend_tls=tls,
                              backend_extra="connect_timeout = 1.0")
            assert health(hung) == (503, "backend unavailable: no greeting within 1 s\n")
    finally:
        silent.close()


def test_logs_never_contain_passwords(proxy):
    with raw_via(proxy) as c:
        c.login("alice", "alicepw")
        c.login("bob", "secret-wrong-pw")
    time.sleep(0.2)
    log = proxy.log()
    assert "alicepw" not in log and "secret-wrong-pw" not in log


def test_proxy_protocol_and_id_forwarding(make_proxy, dovecot):
    port = free_port()
    # The client is not on loopback any more: allow plaintext for this test.
    make_proxy(listen_extra=[f"haproxy:tcp:{port}:interface=127.0.0.1"], proxy_extra='plaintext_auth = "always"')
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 143\r\n")
    assert s.recv(1000).startswith(b"* OK")
    s.sendall(b"a LOGIN carol carolpw\r\n")
    buf = b""
    while b"a OK" not in buf:
        buf += s.recv(1000)
    who = dovecot.doveadm("who", "-1", "carol")
    assert "198.51.100.7" in who, who
    s.sendall(b"b LOGOUT\r\n")
    s.close()


def test_behind_a_proxy_listener_the_greeting_is_for_the_real_client(make_proxy):
    """The session began when the balancer connected, before the PROXY header was read: a balancer on
    loopback made the greeting offer AUTH=PLAIN to a remote client (which then sent its password in the
    clear, to be refused), and per-address limits went by the balancer's address (found by the TLS
    review). Now the greeting waits for the header; a connection that never sends one is closed."""
    import socket
    port = free_port()
    make_proxy(listen_extra=[f"haproxy:tcp:{port}:interface=127.0.0.1"],
               config_extra="[limits]\npreauth_timeout = 1.0\n")
    for header, expected in ((b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 143\r\n", b"LOGINDISABLED"),
                             (b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 143\r\n", b"AUTH=PLAIN"),
                             # (the balancer does not know the client: the connection's own address goes)
                             (b"PROXY UNKNOWN\r\n", b"AUTH=PLAIN"),
                             # v2, binary (its signature holds a "\n": taken for a v1 line's end at first)
                             (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton("198.51.100.7")
                              + socket.inet_aton("127.0.0.1") + (40000).to_bytes(2, "big") + (143).to_bytes(2, "big"),
                              b"LOGINDISABLED")):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1000)  # (nothing before the header)
        s.settimeout(10)
        s.sendall(header[:4])  # (a header in pieces: Twisted's parser closed on fewer than 8 bytes at first)
        time.sleep(0.1)
        s.sendall(header[4:10])
        time.sleep(0.1)
        s.sendall(header[10:] + b"a CAPABILITY\r\n")  # (with the header, what follows it)
        data = b""
        while b"a OK" not in data:
            data += s.recv(1000)
        greeting = data.split(b"\r\n")[0]
        assert greeting.startswith(b"* OK") and expected in greeting, greeting
        s.close()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert s.recv(1000) == b""  # (no header within preauth_timeout: closed)
    s.close()


def test_a_reload_changes_how_long_a_proxy_listener_waits_for_the_header(make_proxy):
    """``preauth_timeout`` is also how long a ``haproxy:`` listener waits for the PROXY header; a reload
    changed it for sessions and left the listener's wait as at start (found by the ops review)."""
    import socket
    port = free_port()
    p = make_proxy(listen_extra=[f"haproxy:tcp:{port}:interface=127.0.0.1"],
                   config_extra="[limits]\npreauth_timeout = 60.0\n")
    reload_proxy(p, p.config_path.read_text().replace("preauth_timeout = 60.0", "preauth_timeout = 1.0"))
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert s.recv(1000) == b""  # (no header within the new preauth_timeout: closed)
    finally:
        s.close()


@pytest.mark.parametrize("reactor", [[], ["--reactor=cpmproxy"]], ids=["default-reactor", "cpmproxy-reactor"])
def test_twist_plugin_runs(dovecot, tmp_path, reactor):
    p = ProxyProcess(tmp_path, dovecot.port, metrics=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    twist = Path(sys.executable).with_name("twist")
    proc = subprocess.Popen([str(twist), *reactor, "cpmproxy", "--config", str(p.config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                c = imap_via(p, "alice")
                break
            except OSError:
                assert time.monotonic() < deadline, proc.stdout.read1().decode() if proc.poll() is not None else ""
                time.sleep(0.1)
        assert c.select("INBOX")[0] == "OK"
        c.logout()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert ("ProxyReactor" if reactor else "EPollReactor") in proc.stdout.read().decode()


def test_twist_plugin_says_the_configuration_warnings(tmp_path):
    """A listener other hosts reach where none of them can log in (no tls_cert, plaintext only from
    loopback) is warned of at the start under twist too (found by the ops review: only cpmproxy's own
    start and --check said it)."""
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'[proxy]\nlisten = ["tcp:{port}:interface=0.0.0.0"]\n[backend]\nhost = "127.0.0.1"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    twist = Path(sys.executable).with_name("twist")
    proc = subprocess.Popen([str(twist), "cpmproxy", "--config", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
    assert "proxy.listen[0]: clients on other hosts cannot log in" in out, out


@pytest.mark.parametrize("broken", ["config", "listener"])
def test_twist_plugin_fails_cleanly(tmp_path, broken):
    """Under twist, a refused configuration is one line and EX_USAGE (it was a traceback), and a listener
    that cannot start ends the process with status 1 (it went on running with no listener at all)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "c.toml"
    if broken == "config":
        config.write_text("[limits]\nmax_line = -1\n")
    else:
        config.write_text(f'[proxy]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n[backend]\nhost = "127.0.0.1"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    twist = Path(sys.executable).with_name("twist")
    try:
        done = subprocess.run([str(twist), "cpmproxy", "--config", str(config)], env=env, capture_output=True,
                              text=True, cwd=ROOT, timeout=30)
    finally:
        busy.close()
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    if broken == "config":
        assert done.returncode == 64 and "limits.max_line" in out, out
    else:
        assert done.returncode == 1 and "cannot start" in out, out


@pytest.mark.parametrize("key", ["proxy.listen[1]", "metrics.listen"])
def test_a_listener_that_cannot_start_names_its_setting_and_what_to_do(tmp_path, key):
    """A port in use said only Twisted's "Couldn't listen on 127.0.0.1:1143: [Errno 98] Address already in
    use.": neither the file nor which setting (found by the operator review)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "c.toml"
    taken = f"tcp:{port}:interface=127.0.0.1"
    if key == "metrics.listen":
        config.write_text(f'[proxy]\nlisten = ["tcp:0:interface=127.0.0.1"]\n[metrics]\nlisten = "{taken}"\n')
    else:
        config.write_text(f'[proxy]\nlisten = ["tcp:0:interface=127.0.0.1", "{taken}"]\n')
    try:
        done = _cli("--config", str(config))
    finally:
        busy.close()
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    said = [line for line in out.splitlines() if "cannot start" in line]
    assert len(said) == 1 and said[0].endswith(
        f"cannot start: {config}: {key}: cannot listen on '{taken}': Address already in use; another process "
        "listens there: stop it or change the port (Dovecot on this host: move its listener, see "
        "conf/dovecot/90-cpmproxy.conf)"), out


def test_login_hooks_run_after_those_of_the_plugins_they_require():
    """The notify plugin's login reads what the policy plugin's login set up, whatever the configured
    order; other hooks keep the configured order."""
    from cpmproxy.proxy.hooks import Plugin
    from cpmproxy.proxy.service import HookTable

    def plugin(name, requires=()):
        cls = type(name, (Plugin,), {"requires": requires, "login": lambda self, s: None,
                                     "command": lambda self, s, c: None})
        p = cls(None)
        p.name = name
        return p

    push, notify, policy, other = (plugin("push", ("notify",)), plugin("notify", ("policy",)),
                                   plugin("policy"), plugin("other", ("missing",)))
    table = HookTable.build([push, other, notify, policy])
    assert [p.name for p in table.login] == ["policy", "notify", "push", "other"]
    assert [p.name for p in table.command] == ["push", "other", "notify", "policy"]
    a, b = plugin("a", ("b",)), plugin("b", ("a",))  # a cycle: each placed once, nothing lost
    assert [p.name for p in HookTable.build([a, b]).login] == ["b", "a"]


def test_client_addresses_of_dual_stack_sockets():
    from cpmproxy.proxy.service import ProxyService
    from cpmproxy.proxy.session import _unmapped

    assert ProxyService.is_loopback("::ffff:127.0.0.1") and ProxyService.is_loopback("::1")
    assert ProxyService.is_loopback("127.0.0.2") and not ProxyService.is_loopback("::ffff:192.0.2.1")
    assert _unmapped("::ffff:192.0.2.1") == "192.0.2.1" and _unmapped("::FFFF:10.0.0.1") == "10.0.0.1"
    assert _unmapped("2001:db8::1") == "2001:db8::1" and _unmapped("::ffff:c000:201") == "::ffff:c000:201"


def test_reload_turns_the_watch_connections_off_and_on(make_proxy, dovecot):
    """``[plugin.notify] watch_backend`` changed by a reload applies to the sessions already open: off,
    the user's watch connection goes; on again, an idling device gets one without sending a command."""
    from tests.test_notify import _gauges_become, device, idle

    p = make_proxy(config_extra="\n[plugin.notify]\nmetadata_poll = 0.5\n")  # (the watch opens at its first poll)
    b = device(p, "B")
    try:
        idle(b)
        assert _gauges_become(p, (1.0, 0.0))[0] == 1.0

        def reload(extra: str) -> None:
            reload_proxy(p, p.config_path.read_text().split("\n[plugin.notify]")[0] + extra)

        reload("\n[plugin.notify]\nmetadata_poll = 0.5\nwatch_backend = false\n")
        assert _gauges_become(p, (0.0, 0.0)) == (0.0, 0.0)
        reload("\n[plugin.notify]\nmetadata_poll = 0.5\n")
        assert _gauges_become(p, (1.0, 0.0))[0] == 1.0
        b.send(b"DONE\r\n")
        assert b.until_tagged(b"t")[-1].startswith(b"t OK")
    finally:
        b.close()


def test_health_probes_that_fail_at_once_or_hang_still_answer(tmp_path, monkeypatch):
    """A probe that failed without waiting left a fired probe behind: that request and every one after
    the cache were never answered. A backend that connects and then says nothing is unhealthy within
    connect_timeout."""
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from cpmproxy.config import ConfigError, load_config
    from cpmproxy.proxy import service as service_module
    from cpmproxy.proxy.service import ProxyService

    path = tmp_path / "c.toml"
    path.write_text('plugins = []\n[proxy]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                    '[backend]\nport = 1\nconnect_timeout = 2\n')
    clock = Clock()
    svc = ProxyService(load_config(path), reactor=clock)

    async def fails_at_once(reactor, config):
        raise ConfigError("backend.ca_file: cannot be read")

    monkeypatch.setattr(service_module, "connect_backend", fails_at_once)
    got = []
    svc.health().addCallback(got.append)
    clock.advance(6)  # (past the cache)
    svc.health().addCallback(got.append)
    assert [code for code, _ in got] == [503, 503], got

    async def hangs(reactor, config):
        await defer.Deferred()

    monkeypatch.setattr(service_module, "connect_backend", hangs)
    clock.advance(6)
    svc.health().addCallback(got.append)
    svc.health().addCallback(got.append)
    clock.advance(2.5)
    assert [code for code, _ in got] == [503] * 4, got


def test_scrapes_and_probes_that_succeed_are_not_logged(make_proxy):
    """Prometheus scrapes ``/metrics`` and a load balancer probes ``/healthz`` every few seconds: a line
    each buried the proxy's own log. A request that fails is still logged."""
    p = make_proxy()
    before = len(p.log())
    assert health(p)[0] == 200
    urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=5).read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{p.metrics_port}/nothing-here", timeout=5)
    time.sleep(0.3)
    lines = [x for x in p.log()[before:].splitlines() if "HTTP/1.1" in x]
    assert len(lines) == 1 and "/nothing-here" in lines[0] and '" 404 ' in lines[0], lines


def _wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _purpose_seen(server, purpose: bytes) -> bool:
    """``server`` (a scripted backend) was sent the ID of a connection the proxy opened for ``purpose``."""
    return any(b'-' + purpose + b'")' in line for line in server.received)


def test_a_reload_that_moves_the_backend_moves_the_side_connections_and_watches(make_proxy):
    """Found by the reload review: after a reload that changed ``[backend] host``/``port``, new sessions
    logged in to the new backend but their side commands (preferences, STATUS counts, METADATA writes) and
    the user's notification watch stayed on the old one for as long as any session of the user lived (a
    device idling for days). Now the watch moves at once and the side connection at the next command
    (closed once what was asked on it is answered); sessions already open stay on the backend they logged
    in to, as with Dovecot's proxy or nginx."""
    from tests.test_hostile_backend import ScriptedBackend, _logged_in

    old, new = ScriptedBackend(), ScriptedBackend()
    try:
        p = make_proxy(backend_port=old.port, backend_tls="none",
                       config_extra="\n[plugin.notify]\nmetadata_poll = 0.5\n")  # (the watch opens at its first poll)
        a = _logged_in(p)
        assert _wait_until(lambda: _purpose_seen(old, b"side") and _purpose_seen(old, b"watch")), old.received
        assert old.open_connections == 3  # (a's own, the side connection, the watch)
        reload_proxy(p, p.config_path.read_text().replace(f"port = {old.port}", f"port = {new.port}"))
        b = _logged_in(p)  # (its login reads the preferences on the side connection)
        assert _wait_until(lambda: _purpose_seen(new, b"side") and _purpose_seen(new, b"watch")), new.received
        assert _wait_until(lambda: old.open_connections == 1), old.open_connections  # (a's own is left)
        assert a.command(b"n", b"NOOP")[-1].startswith(b"n OK")
        a.close()
        b.close()
        assert still_serving(p)
        assert "the backend is now 127.0.0.1:%d" % new.port in p.log()  # (the operator is told)
    finally:
        for server in (old, new):
            server.release.set()
            server.shutdown()
            server.server_close()


def test_a_reload_applies_the_command_timeout_to_open_side_connections(make_proxy):
    """Found by the reload review: a side connection open before a reload kept its ``command_timeout``
    (the user's next logins waited out the old one, here the whole login_timeout, on a hung backend)."""
    from tests.test_hostile_backend import STALL, ScriptedBackend, _logged_in, _login_timed

    server = ScriptedBackend()
    try:
        p = make_proxy(backend_port=server.port, backend_tls="none",
                       backend_extra="command_timeout = 30\nlogin_timeout = 8")
        a = _logged_in(p)  # (the user's side connection is open)
        reload_proxy(p, p.config_path.read_text().replace("command_timeout = 30", "command_timeout = 1"))
        server.internal = {b"GETMETADATA": STALL}
        answer, elapsed = _login_timed(p)
        assert answer.startswith(b"L NO [UNAVAILABLE]") and elapsed < 4, (answer, elapsed)
        assert "gave no answer in 1 s" in p.log(), p.log()
        a.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_side_connection_still_connecting_when_its_pool_closes_is_closed(make_proxy):
    """Found by the reload review (closing a pool whose connection was still being made): the connection,
    once made, was kept by the closed pool, open to the backend for as long as the proxy ran, and closing
    it failed with an AttributeError in a Deferred."""
    from tests.test_hostile_backend import HOLD, ScriptedBackend, _all_let_go, _login_timed

    server = ScriptedBackend()
    try:
        server.internal = {b'-SIDE")': HOLD}  # (the side connection's ID: it stays "connecting")
        p = make_proxy(backend_port=server.port, backend_tls="none",
                       backend_extra="login_timeout = 1\nside_linger = 0.1")
        answer, _ = _login_timed(p)  # (the preferences read waits for the side connection: NO, and gone)
        assert answer.startswith(b"L NO [UNAVAILABLE]"), answer
        time.sleep(0.3)  # (past side_linger: the pool is closed)
        server.release.set()
        _all_let_go(server, p)
        assert "Unhandled error" not in p.log() and "AttributeError" not in p.log(), p.log()
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_systemctl_reload_of_a_broken_configuration_fails_and_says_why(make_proxy):
    """Found by the reload review: the unit's ExecReload only sent SIGHUP, so ``systemctl reload cpmproxy``
    of a broken file said nothing and succeeded (the reason only in the proxy's log); the unit checks the
    file first now, as ``nginx -t`` before a reload: the reload fails with the reason, the old configuration
    runs on untouched. The unit's ExecReload lines are run here as systemd runs them: in turn, until one
    fails."""
    import shlex

    p = make_proxy()
    unit = (ROOT / "systemd/cpmproxy.service").read_text()
    commands = re.findall(r"^ExecReload=(.+)$", unit, re.M)

    def systemctl_reload() -> subprocess.CompletedProcess | None:
        for command in commands:
            argv = shlex.split(command.replace("$MAINPID", str(p.proc.pid))
                               .replace("/etc/cpmproxy/cpmproxy.toml", str(p.config_path)))
            if argv[0].endswith("/cpmproxy"):
                done = _cli(*argv[1:])
            else:
                done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                return done
        return None

    good = p.config_path.read_text()
    p.config_path.write_text(good.replace("[backend]", "[backend]\nbogus = 1"))
    failed = systemctl_reload()
    assert failed is not None, "systemctl reload of a broken configuration succeeded"
    _one_line_reason(failed, "backend.bogus: unknown key")
    time.sleep(0.3)
    assert "reload" not in p.log()  # (the running process was not even asked)
    p.config_path.write_text(good)
    assert systemctl_reload() is None
    assert _wait_until(lambda: "configuration reloaded" in p.log()), p.log()


@pytest.mark.parametrize("client", ["gone", "stays"])
def test_plugins_retired_by_a_reload_are_stopped_once_at_a_stop_that_comes_before(make_proxy, client):
    """A reload that changes the plugins stops the retired ones once the sessions it ends are gone; a
    SIGTERM meanwhile stopped only the new set, and the process exited without the old ones' ``stop``
    (their watch connections, queued pushes; found by review helper-100). Every plugin made is now
    stopped, once."""
    p = make_proxy(plugins=["tests.recordplugin:Recorder"], proxy_extra="shutdown_grace = 4.0")
    c = raw_via(p)
    c.login("alice", "alicepw")
    message = b"Subject: retire\r\n\r\n" + b"x" * 20000 + b"\r\n"
    c.send(b"a APPEND INBOX {%d}\r\n" % len(message))  # (under way: the reload waits for it to end)
    assert c.read_line().startswith(b"+")
    c.send(message[:5000])
    reload_proxy(p, p.config_path.read_text().replace("recordplugin:Recorder", "recordplugin:OtherRecorder"))
    p.signal(signal.SIGTERM)
    if client == "gone":
        c.close()
    else:
        c.send(message[5000:] + b"\r\n")
    assert p.proc.wait(15) == 0
    made = re.findall(r"recorder (\d+) made", p.log())
    stopped = re.findall(r"recorder (\d+) stopped", p.log())
    assert len(made) == 2 and sorted(stopped) == sorted(made), p.log()
