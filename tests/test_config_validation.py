"""Configuration validation (an operator review): every refused setting is a one-line error naming its key,
and ``--check`` refuses what would fail at start-up or be silently ignored."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpmproxy.config import ConfigError, load_config
from cpmproxy.proxy.service import check_config, load_plugins, plugin_sections
from cpmproxy.testing.certs import make_ca_and_cert

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def _refused(tmp_path: Path, text: str) -> str:
    """The reason ``check_config`` refuses the configuration ``text``."""
    with pytest.raises(ConfigError) as e:
        check_config(str(_write(tmp_path, text)))
    return str(e.value)


def _assert_refused(tmp_path: Path, cases: dict[str, str]) -> None:
    for text, start in cases.items():
        reason = _refused(tmp_path, text)
        assert reason.startswith(start) and "\n" not in reason, (text, reason)


def _cli_check(path: Path) -> subprocess.CompletedProcess:
    """``cpmproxy --config PATH --check`` with no socket from systemd and no terminal to ask on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    return subprocess.run([sys.executable, "-m", "cpmproxy.cli", "--config", str(path), "--check"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def _one_line_refusal(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert needle in r.stderr, r.stderr


# -- plugins ---------------------------------------------------------------------------------------

def test_a_plugin_listed_twice_is_refused(tmp_path):
    """Two instances of a plugin passed --check, then every SELECT hung."""
    _assert_refused(tmp_path, {
        'plugins = ["policy", "policy"]\n': "plugins: 'policy' is listed twice",
        'plugins = ["readreport", "plugins.readreport:ReadReportPlugin"]\n':
            "plugins: 'plugins.readreport:ReadReportPlugin' and 'readreport' are the same plugin",
    })


def test_plugin_tables_of_the_wrong_type_are_refused_in_one_line(tmp_path):
    """``policy = 5`` was a TypeError traceback from the policy plugin."""
    _one_line_refusal(_cli_check(_write(tmp_path, "policy = 5\n")),
                      "policy: expected a table ([policy]), got integer")
    _assert_refused(tmp_path, {
        "[plugin]\nnotify = 5\n": "plugin.notify: expected a table ([plugin.notify]), got integer",
        "plugin = 5\n": "plugin: expected a table of plugin tables",
    })


def test_settings_of_a_plugin_not_enabled_are_refused(tmp_path):
    """``[policy]`` without the policy plugin was silently ignored (``[plugin.notify]`` was an error)."""
    _assert_refused(tmp_path, {
        'plugins = ["readreport"]\n[policy]\nfolders = ["*"]\n':
            "policy: settings for the 'policy' plugin, which is not enabled",
        'plugins = ["readreport"]\n[plugin.notify]\nidle_status = true\n':
            "plugin.notify: settings for a plugin that is not enabled",
        "[plugin.policy]\nfolders = []\n": "plugin.policy: the policy plugin's settings go in [policy]",
    })
    check_config(str(_write(tmp_path, 'plugins = ["policy", "readreport"]\n[policy]\nfolders = ["*"]\n')))


# -- file settings ---------------------------------------------------------------------------------

def test_push_ca_file_is_relative_to_the_config_file(tmp_path):
    """``plugin.push.ca_file`` was opened relative to the working directory, every other file setting
    relative to the config file's."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    certs = make_ca_and_cert(conf_dir)
    config = conf_dir / "c.toml"
    config.write_text('[plugin.push]\nurl = "https://push.example.net/cpm"\noffline_watch = 0\n'
                      f'ca_file = "{certs.ca_cert.name}"\n')
    assert Path.cwd() != conf_dir
    push = {p.name: p for p in load_plugins(check_config(str(config)), None)}["push"]
    assert push.ca_file == str(conf_dir / "ca.pem")
    assert _cli_check(config).returncode == 0


@pytest.mark.parametrize("section", ["proxy", "metrics"])
def test_ssl_listener_files_are_relative_to_the_config_file(tmp_path, section):
    """An ``ssl:`` listener's key and certificate, ``[proxy] listen``'s and ``[metrics] listen``'s
    (Prometheus over TLS), were opened relative to the working directory (the operator reviews: ``--check``
    passed in /etc/cpmproxy, and the service, which runs in /, failed)."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    certs = make_ca_and_cert(conf_dir)
    config = conf_dir / "c.toml"
    endpoint = "ssl:1993:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    written = endpoint.format(key=certs.key.name, cert=certs.cert.name)
    config.write_text(f'[proxy]\nlisten = ["{written}"]\n' if section == "proxy"
                      else f'[metrics]\nlisten = "{written}"\n')
    assert Path.cwd() != conf_dir
    r = _cli_check(config)
    assert r.returncode == 0, r.stderr
    checked = check_config(str(config))
    listen = checked.proxy["listen"] if section == "proxy" else [checked.metrics["listen"]]
    assert listen == [endpoint.format(key=certs.key, cert=certs.cert)]


def test_backend_tls_settings_without_tls_are_refused(tmp_path):
    """``backend.server_name`` with ``tls = "none"`` passed --check and was never used (no certificate is
    checked), where ``ca_file`` there is refused (found by the ops review)."""
    certs = make_ca_and_cert(tmp_path / "certs")
    _assert_refused(tmp_path, {
        '[backend]\nserver_name = "imap.example.net"\n': "backend.server_name is set but backend.tls is 'none'",
        f'[backend]\nca_file = "{certs.ca_cert}"\n': "backend.ca_file is set but backend.tls is 'none'",
    })
    check_config(str(_write(tmp_path, '[backend]\ntls = "starttls"\nserver_name = "imap.example.net"\n')))




def test_check_warns_of_listeners_where_no_remote_client_can_log_in(tmp_path):
    """The sample configuration on a public interface (the operator review): no STARTTLS without tls_cert,
    plaintext only from loopback, so every remote client got LOGINDISABLED, and --check said OK."""
    certs = make_ca_and_cert(tmp_path / "certs")
    public = '[proxy]\nlisten = ["tcp:1143:interface=0.0.0.0", "tcp:1144:interface=127.0.0.1", ' \
             '"haproxy:tcp:1145:interface=127.0.0.1", "unix:%s/imap.sock"]\n' % tmp_path
    r = _cli_check(_write(tmp_path, public))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 2 and all("warning: " in w and "cannot log in" in w for w in warnings), r.stderr
    assert "proxy.listen[0]" in warnings[0] and "proxy.listen[2]" in warnings[1], r.stderr  # (behind a balancer)
    for fix in (f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n', 'plaintext_auth = "always"\n'):
        r = _cli_check(_write(tmp_path, public + fix))
        assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("metrics, warned", [
    ("tcp:9143", True), ("tcp:9143:interface=0.0.0.0", True), ("tcp6:9143:interface=\\\\:\\\\:", True),
    ("tcp:9143:interface=127.0.0.1", False), ("tcp:9143:interface=10.1.2.3", False), ("unix:/tmp/m.sock", False),
])
def test_check_warns_of_a_metrics_listener_on_every_interface(tmp_path, metrics, warned):
    """``[metrics] listen = "tcp:9143"`` served /metrics and /healthz on every interface, and --check said
    only OK (found by review helper-100); a wildcard is warned of, not refused (a firewall may close it)."""
    listen = '[proxy]\nlisten = ["tcp:1143:interface=127.0.0.1"]\n'
    r = _cli_check(_write(tmp_path, listen + f'[metrics]\nlisten = "{metrics}"\n'))
    assert r.returncode == 0 and "configuration OK" in r.stdout, r.stderr
    if not warned:
        assert r.stderr == "", r.stderr
        return
    assert r.stderr.count("warning: ") == 1 and "metrics.listen: " in r.stderr, r.stderr
    assert "every interface" in r.stderr and "interface=" in r.stderr, r.stderr


def test_tls_files_say_what_is_wrong(tmp_path):
    """A directory was "no such file"; a file without PEM was ``[('DECODER routines', '', 'unsupported')]``;
    an encrypted key made OpenSSL ask for its passphrase on the terminal."""
    certs = make_ca_and_cert(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    damaged = tmp_path / "damaged.pem"
    damaged.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    _assert_refused(tmp_path, {
        f'[proxy]\ntls_cert = "{tmp_path}"\ntls_key = "{certs.key}"\n': f"proxy.tls_cert: not a regular file: {tmp_path}",
        f'[proxy]\ntls_cert = "{garbage}"\ntls_key = "{certs.key}"\n': f"proxy.tls_cert: no PEM certificate in {garbage}",
        f'[proxy]\ntls_cert = "{certs.cert}"\ntls_key = "{garbage}"\n': f"proxy.tls_key: no PEM private key in {garbage}",
        f'[proxy]\ntls_cert = "{damaged}"\ntls_key = "{certs.key}"\n':
            f"proxy.tls_cert: the certificate in {damaged} cannot be read (damaged data)",
        f'[proxy]\ntls_cert = "{certs.ca_cert}"\ntls_key = "{certs.key}"\n':
            f"proxy.tls_key: the private key in {certs.key} does not match the certificate in {certs.ca_cert}",
    })
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    r = _cli_check(_write(tmp_path, f'[proxy]\ntls_cert = "{certs.cert}"\ntls_key = "{encrypted}"\n'))
    _one_line_refusal(r, f"proxy.tls_key: the private key in {encrypted} is encrypted")


# -- listeners -------------------------------------------------------------------------------------

def test_listeners_that_cannot_start_are_refused(tmp_path):
    """These passed --check and then failed at start-up, or were refused in Python's words."""
    def listen(*descs: str) -> str:
        return "[proxy]\nlisten = [" + ", ".join(f'"{d}"' for d in descs) + "]\n"

    _assert_refused(tmp_path, {
        listen("tcp:99999"): "proxy.listen[0]: invalid endpoint 'tcp:99999': the port must be a number from 0 to 65535",
        listen("tcp:-5"): "proxy.listen[0]: invalid endpoint 'tcp:-5': the port must be a number",
        listen("tcp:notaport"): "proxy.listen[0]: invalid endpoint 'tcp:notaport': the port must be a number",
        listen("tcp:1143:backlog=abc"): "proxy.listen[0]: invalid endpoint 'tcp:1143:backlog=abc': backlog must be a number",
        listen("tcp:1143:interface=999.1.1.1"): "proxy.listen[0]: invalid endpoint 'tcp:1143:interface=999.1.1.1': "
                                                "interface must be an IP address",
        listen("tcp:1143:interface=example.com"): "proxy.listen[0]: invalid endpoint 'tcp:1143:interface=example.com': "
                                                  "interface must be an IP address, not 'example.com'",
        listen("tcp:1143:interface=::1"): "proxy.listen[0]: invalid endpoint 'tcp:1143:interface=::1': escape the "
                                          "colons of an IPv6 address with a backslash, e.g. interface=\\:\\:1",
        listen("haproxy:tcp:1143:interface=2001:db8::1"): "proxy.listen[0]: invalid endpoint "
                                                          "'haproxy:tcp:1143:interface=2001:db8::1': escape the colons",
        listen("tcp:1143:bogus=1"): "proxy.listen[0]: invalid endpoint 'tcp:1143:bogus=1': unknown parameter 'bogus'",
        listen("tcp:1143", "tcp:1143"): "proxy.listen[1]: 'tcp:1143' listens on the same address as proxy.listen[0]",
        listen("tcp:1143:interface=127.0.0.1", "haproxy:tcp:1143"):
            "proxy.listen[1]: 'haproxy:tcp:1143' listens on the same address as proxy.listen[0]",
        listen("unix:/nonexistent/dir/sock"): "proxy.listen[0]: invalid endpoint 'unix:/nonexistent/dir/sock': "
                                              "no such directory: /nonexistent/dir",
        listen("ssl:1993:privateKey=/nonexistent.pem"): "proxy.listen[0]: invalid endpoint "
                                                        "'ssl:1993:privateKey=/nonexistent.pem': privateKey: No such file",
        listen("foo:1143"): "proxy.listen[0]: invalid endpoint 'foo:1143': unknown endpoint type",
        # (It said "privateKey: No such file or directory: server.pem", Twisted's default in the working
        # directory; the operator review.)
        listen("ssl:1993"): "proxy.listen[0]: invalid endpoint 'ssl:1993': no privateKey=FILE (the key, with the "
                            "certificate unless certKey=FILE names it",
        '[metrics]\nlisten = "ssl:9143:certKey=/c.pem"\n': "metrics.listen: invalid endpoint 'ssl:9143:certKey=/c.pem': "
                                                           "no privateKey=FILE",
        listen("haproxy:ssl:1993:privateKey=k.pem"): "proxy.listen[0]: invalid endpoint 'haproxy:ssl:1993:privateKey="
                                                     "k.pem': haproxy:ssl: expects the PROXY header inside TLS",
        listen("haproxy:haproxy:tcp:1143"): "proxy.listen[0]: invalid endpoint 'haproxy:haproxy:tcp:1143': one "
                                            "haproxy: is enough",
        listen("tcp:0:interface=127.0.0.1", "systemd:domain=NOPE:index=0"):
            "proxy.listen[1]: invalid endpoint 'systemd:domain=NOPE:index=0': domain must name an address family",
        '[metrics]\nlisten = "tcp:abc"\n': "metrics.listen: invalid endpoint 'tcp:abc': the port must be a number",
        listen("tcp:9143:interface=127.0.0.1") + '[metrics]\nlisten = "tcp:9143:interface=0.0.0.0"\n':
            "metrics.listen: 'tcp:9143:interface=0.0.0.0' listens on the same address as proxy.listen[0]",
    })
    r = _cli_check(_write(tmp_path, listen("tcp:1143:interface=::1")))
    _one_line_refusal(r, "proxy.listen[0]: invalid endpoint 'tcp:1143:interface=::1': escape the colons")
    # (Twisted reads dhParameters only when the first client connects: each TLS connection failed then)
    certs = make_ca_and_cert(tmp_path / "certs")
    dh = tmp_path / "dh.pem"
    dh.write_text("not DH parameters\n")
    desc = f"ssl:1993:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}:dhParameters={dh}"
    r = _cli_check(_write(tmp_path, listen(desc)))
    _one_line_refusal(r, f"proxy.listen[0]: invalid endpoint '{desc}': no PEM data")
    # (Twisted's parser fails on a trailing backslash with "generator raised StopIteration": a traceback)
    r = _cli_check(_write(tmp_path, '[proxy]\nlisten = ["tcp:1143\\\\"]\n'))
    _one_line_refusal(r, "proxy.listen[0]: invalid endpoint 'tcp:1143\\\\': cannot be read")


def test_listeners_that_can_start_are_accepted(tmp_path):
    certs = make_ca_and_cert(tmp_path)
    for descs in (["tcp:1143:interface=\\\\:\\\\:1", "tcp:1143:interface=127.0.0.1"],
                  ["tcp:0", "tcp:0", "haproxy:tcp:0:interface=127.0.0.1"],
                  ["tcp:1143:interface=127.0.0.1", "tcp:1143:interface=127.0.0.2"],
                  [f"unix:{tmp_path}/imap.sock", "systemd:domain=INET:index=0", "haproxy:systemd:INET:1"],
                  [f"ssl:1993:interface=127.0.0.1:privateKey={certs.key}:certKey={certs.cert}"]):
        text = "[proxy]\nlisten = [" + ", ".join(f'"{d}"' for d in descs) + "]\n"
        check_config(str(_write(tmp_path, text)))


# -- settings --------------------------------------------------------------------------------------

def test_push_settings_are_range_and_type_checked(tmp_path):
    """Negative timeouts, queues and backoffs were accepted (``max_queue = 0`` failed at the first event);
    ``url = 5`` was reported as a missing [admin] master user."""
    push = '[plugin.push]\nurl = "https://push.example.net/cpm"\noffline_watch = 0\n'
    _assert_refused(tmp_path, {
        push + "timeout = -1\n": "plugin.push.timeout: must be > 0",
        push + "timeout = 0\n": "plugin.push.timeout: must be > 0",
        push + "max_queue = -5\n": "plugin.push.max_queue: must be >= 1",
        push + "max_queue = 0\n": "plugin.push.max_queue: must be >= 1 (and finite)",
        push + "concurrency = 0\n": "plugin.push.concurrency: must be >= 1 (and finite)",
        push + "max_retries = -1\n": "plugin.push.max_retries: must be >= 0 (and finite)",
        push + "backoff = -1\n": "plugin.push.backoff: must be >= 0 (and finite)",
        push + "max_backoff = -1\n": "plugin.push.max_backoff: must be >= 0 (and finite)",
        # (Found by review: nan passed every ">= 0" test, then failed each timer: every login, with
        # metadata_poll.)
        push + "backoff = nan\n": "plugin.push.backoff: must be >= 0 (and finite)",
        push + "timeout = inf\n": "plugin.push.timeout: must be > 0 (seconds)",
        "[plugin.notify]\nmetadata_poll = nan\n": "plugin.notify.metadata_poll: expected seconds >= 0 (0: off)",
        push + "backoff = 10\nmax_backoff = 5\n": "plugin.push.max_backoff: must be >= plugin.push.backoff (10)",
        "[plugin.push]\nurl = 5\n": "plugin.push.url: expected string, got integer",
        '[plugin.push]\nurl = "https://push.example.net/cpm"\noffline_watch = "x"\n':
            "plugin.push.offline_watch: expected integer or float, got string",
        push + "timeout = true\n": "plugin.push.timeout: expected integer or float, got boolean",
        push + "urll = 1\n": "plugin.push.urll: unknown key (did you mean 'url'?)",
        "[plugin.notify]\nmetadata_pol = 5\n": "plugin.notify.metadata_pol: unknown key (did you mean 'metadata_poll'?)",
        "[plugin.readreport]\nkeywords = \"$X\"\n": "plugin.readreport.keywords: unknown key (did you mean 'keyword'?)",
    })
    check_config(str(_write(tmp_path, push + "timeout = 0.5\nmax_queue = 1\nmax_retries = 0\nbackoff = 0\n"
                                             "max_backoff = 0\n")))


def test_greeting_must_be_imap_resp_text(tmp_path):
    """A CR/LF in the greeting injected protocol lines (``* BYE evil``)."""
    for greeting, found in (("hi\\r\\n* BYE evil", "'\\r'"), ("tab\\there", "'\\t'"), ("caf\u00e9", "'\u00e9'")):
        reason = _refused(tmp_path, f'[proxy]\ngreeting = "{greeting}"\n')
        assert reason == f"proxy.greeting: must be printable ASCII text (found {found})", reason
    assert _refused(tmp_path, '[proxy]\ngreeting = ""\n') == "proxy.greeting: must not be empty"
    check_config(str(_write(tmp_path, '[proxy]\ngreeting = "Example IMAP [CPM] ready."\n')))


def test_core_settings_that_cannot_work_are_refused(tmp_path):
    _assert_refused(tmp_path, {
        "[limits]\nauth_failure_delay = 10.0\nauth_failure_delay_max = 1.0\n":
            "limits.auth_failure_delay_max: must be >= limits.auth_failure_delay (10.0)",
        '[backend]\nhost = ""\n': "backend.host: must not be empty",
        '[proxy]\ndevice_id_field = ""\n': "proxy.device_id_field: must not be empty",
        '[admin]\nseparator = ""\n': "admin.separator: must not be empty",
        "proxy = 5\n": "proxy: expected a table ([proxy]), got integer",
        # (The operator review: --check passed it, and every client's first command got BYE [TOOBIG].)
        "[limits]\nmax_line = 10\n": "limits.max_line: must be >= 1024",
    })


def test_policy_settings_that_cannot_work_are_refused(tmp_path):
    _assert_refused(tmp_path, {
        "[[policy.class]]\nname = 5\n": "policy.class[0].name: expected a non-empty string",
        "[[policy.class]]\ndevices = []\n": "policy.class[0].devices: expected a non-empty array of glob patterns",
        "[[policy.class]]\nusers = []\n": "policy.class[0].users: expected a non-empty array of glob patterns",
        '[policy]\nuser_may_change = ["nonsense-key"]\n':
            "policy.user_may_change: 'nonsense-key' matches no preference (preferences: notifications, sync,",
        '[[policy.class]]\nuser_may_change = ["sync/imdn", "Notifications"]\n':
            "policy.class[0].user_may_change: 'Notifications' matches no preference",
        '[policy]\nfolder = ["*"]\n': "policy.folder: unknown key (did you mean 'folders'?)",
        "[[policy.class]]\ndevice = []\n": "policy.class[0].device: unknown key (did you mean 'devices'?)",
        "[policy]\nclassification_cache_uids = 0\n": "policy.classification_cache_uids: expected a number >= 1",
        "[policy]\nclassification_cache_mailboxes = true\n":
            "policy.classification_cache_mailboxes: expected a number >= 1",
        "[[policy.class]]\nclassification_cache_uids = 5\n": "policy.class[0].classification_cache_uids: unknown key",
    })
    check_config(str(_write(tmp_path, '[policy]\nuser_may_change = ["notifications", "sync/*", "sync"]\n'
                                      '[[policy.class]]\nname = "tablets"\ndevices = ["tablet-*"]\n'
                                      "user_may_change = []\n")))


def test_policy_globs_that_can_match_nothing_are_refused(tmp_path):
    """They were taken silently, and hid or showed nothing (found by the operator review): an empty pattern,
    a '[' fnmatch takes as the character, a folder pattern with a leading or trailing '/'."""
    _assert_refused(tmp_path, {
        '[policy]\nfolders = ["Default/*", ""]\n': "policy.folders[1]: '': an empty pattern matches nothing",
        '[policy]\nexclude_folders = ["[Gmail/*"]\n':
            "policy.exclude_folders[0]: '[Gmail/*': its '[' is never closed by ']' (for a literal '[', write '[[]')",
        '[policy]\nexclude_folders = ["/Archive/*"]\n': "policy.exclude_folders[0]: '/Archive/*': no folder name "
                                                         "begins or ends with '/'",
        '[[policy.class]]\nexclude_folders = ["Archive/"]\n': "policy.class[0].exclude_folders[0]: 'Archive/':",
        '[[policy.class]]\ndevices = ["tablet-[0-9"]\n': "policy.class[0].devices[0]: 'tablet-[0-9': its '['",
        '[[policy.class]]\nusers = [""]\n': "policy.class[0].users[0]: '': an empty pattern matches nothing",
    })
    check_config(str(_write(tmp_path, '[policy]\nfolders = ["[[]Archive]/*", "Default/[!x]*", "[]]*"]\n'
                                      '[[policy.class]]\ndevices = ["tablet-[0-9]*"]\n')))


def test_the_master_password_file_is_read_at_check(tmp_path, monkeypatch):
    """It is read at each use (rotation), so --check passed a file the service's user could not read, or an
    empty one: every offline watch and `cpmproxy localdelete` failed later (found by the operator review)."""
    import cpmproxy.config as config

    empty = tmp_path / "empty"
    empty.write_text("\n")
    _assert_refused(tmp_path, {
        f'[admin]\nmaster_user = "m"\nmaster_password_file = "{empty}"\n':
            f"admin.master_password_file: the file is empty: {empty}",
    })
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    text = f'[admin]\nmaster_user = "m"\nmaster_password_file = "{secret}"\n'
    check_config(str(_write(tmp_path, text)))

    def denied(path, *args, **kw):  # (the tests run as root, who reads anything)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(config, "open", denied, raising=False)
    assert _refused(tmp_path, text) == (f"admin.master_password_file: Permission denied: {secret} (the user the "
                                        "proxy runs as must be able to read it)")


def test_a_byte_order_mark_is_no_error(tmp_path):
    """A file saved as "UTF-8 with BOM" was refused "Invalid statement (at line 1, column 1)": the operator
    review."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b'\xef\xbb\xbf[proxy]\ngreeting = "hello"\n')
    assert check_config(str(path)).proxy["greeting"] == "hello"
    r = _cli_check(path)
    assert r.returncode == 0, r.stderr
    path.write_bytes(b'[proxy]\ngreeting = "Gr\xfc\xdfe"\n')  # (not UTF-8 still says so)
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(invalid byte at offset 22\)"):
        check_config(str(path))


def test_toml_syntax_errors_show_the_line_and_the_quotes_missing(tmp_path):
    """TOML's parser says only "Invalid value (at line 2, column 10)" for the usual mistake, a text value
    written without its quotes: the line is shown, and how to write it (the operator review)."""
    cases = {
        "[proxy]\nlisten = tcp:1143\n": "Invalid value (at line 2, column 10): 'listen = tcp:1143' (text is "
                                        'written in double quotes: listen = "tcp:1143")',
        "[backend]\nhost = 127.0.0.1\n": "Expected newline or end of document after a statement (at line 2, "
                                        "column 13): 'host = 127.0.0.1' (text is written in double quotes: "
                                        'host = "127.0.0.1")',
        "plugins = [policy, notify]\n": "Invalid value (at line 1, column 12): 'plugins = [policy, notify]' "
                                        '(text is written in double quotes: plugins = ["policy", "notify"])',
        "[proxy\n": "Expected ']' at the end of a table declaration (at line 1, column 7): '[proxy'",
        "plugins = [1,\n": "Invalid value (at end of document)",  # (no line to show)
    }
    for text, expected in cases.items():
        reason = _refused(tmp_path, text)
        assert reason == f"{tmp_path / 'c.toml'}: {expected}", (text, reason)


def test_type_errors_use_tomls_words(tmp_path):
    """They said ``expected dict``, ``expected bool``, ``expected int, got bool``."""
    _assert_refused(tmp_path, {
        "[limits]\nmax_line = true\n": "limits.max_line: expected integer, got boolean",
        '[limits]\npreauth_timeout = "1"\n': "limits.preauth_timeout: expected integer or float, got string",
        '[proxy]\nlisten = "tcp:1143"\n': "proxy.listen: expected array, got string",
        "[policy]\nsync = []\n": "policy.sync: expected table, got array",
        '[policy]\nlocal_delete = "no"\n': "policy.local_delete: expected boolean, got string",
        '[policy]\nfolders = "*"\n': "policy.folders: expected array, got string",
        "[policy]\nmax_size = 1.5\n": "policy.max_size: expected integer, got float",
    })


# -- reload ----------------------------------------------------------------------------------------

def test_a_reload_that_fails_part_way_stops_what_it_made_and_keeps_what_runs(tmp_path):
    """Found by review: a reload whose checked configuration then failed to take effect (a plugin's
    ``configure`` raising for its real instance, after the plugins before it were made and configured)
    left the instances it had made unstopped (their watches, timers, pools kept running for nothing) and
    the running plugins configured with the new settings. Now each instance it made is stopped, the
    running ones have their settings back, the configuration stays the old one, and the log says why."""
    from twisted.logger import globalLogPublisher

    from cpmproxy.proxy.service import ProxyService

    settable, other, breaks = ("tests.recordplugin:" + n for n in ("Settable", "OtherRecorder", "BreaksWhenMade"))
    path = _write(tmp_path, f'plugins = ["{settable}"]\n[plugin."{settable}"]\nlevel = 1\n')
    svc = ProxyService(load_config(path, plugin_sections()))
    running, config = svc.hooks.plugins, svc.config
    path.write_text(f'plugins = ["{settable}", "{other}", "{breaks}"]\n[plugin."{settable}"]\nlevel = 2\n')
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        svc.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    made = [e["id"] for e in events if e.get("log_format") == "recorder {id} made"]
    stopped = [e["id"] for e in events if e.get("log_format") == "recorder {id} stopped"]
    assert len(made) == 2 and sorted(stopped) == sorted(made), events  # (OtherRecorder's, BreaksWhenMade's)
    assert svc.hooks.plugins == running and svc.config is config
    assert running[0].settings == {"level": 1}
    failed = [e for e in events if e.get("log_failure") is not None and "reload failed" in e.get("log_format", "")]
    assert failed and "cannot take its settings up" in str(failed[0]["log_failure"].value), events


def test_reload_warns_that_log_changes_need_a_restart(tmp_path):
    """SIGHUP silently kept the old [log] settings (logging is set up once, at start)."""
    from twisted.logger import globalLogPublisher

    from cpmproxy.proxy.service import ProxyService

    path = _write(tmp_path, 'plugins = []\n[log]\nlevel = "info"\n')
    svc = ProxyService(load_config(path, plugin_sections()))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        svc.reload()  # (unchanged: nothing to say)
        path.write_text('plugins = []\n[log]\nlevel = "debug"\n')
        svc.reload()
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e["log_format"] for e in events if "need a restart" in e.get("log_format", "")]
    assert warnings == ["reload: [log] changes need a restart; keeping the current logging"], warnings
    assert svc.config.log["level"] == "info"  # (what runs: the next reload compares with it)
