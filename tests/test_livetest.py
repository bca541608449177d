"""An independent IMAP suite through the proxy: IMAPClient's own live-server tests (``imapclient-livetest``,
written by IMAPClient's authors to exercise real servers) must pass exactly as they do against Dovecot."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpmproxy.testing.dovecot import Dovecot
from cpmproxy.testing.proxyproc import ProxyProcess

LIVETEST = Path(sys.executable).with_name("imapclient-livetest")
_CLIENT_TIMEOUT_TESTS = {"test_small_connection_timeout_fail", "test_small_read_timeout_fail"}
_TEST_LINE = re.compile(r"^(test\w+) \(")
_STATUS = re.compile(r" \.\.\. (ok|FAIL|ERROR|skipped|expected failure)")


@pytest.fixture(scope="module")
def live_dovecot(tmp_path_factory):
    # Its own Dovecot: the suite creates and deletes folders freely in the account it is given.
    d = Dovecot(tmp_path_factory.mktemp("livetest-dovecot"), users={"live1": "live1pw", "live2": "live2pw",
                                                                             "live3": "live3pw"})
    d.start()
    yield d
    d.close()


def parse_results(stderr: str) -> list[tuple[str, str]]:
    """(test name, outcome) in the order unittest ran them (the UID and non-UID classes share names)."""
    out, current = [], None
    for line in stderr.splitlines():
        m = _TEST_LINE.match(line)
        if m:
            current = m.group(1)
        s = _STATUS.search(line)
        if s and current:
            out.append((current, s.group(1)))
            current = None
        if line.startswith("=" * 20):
            break
    return out


def run_livetest(tmp_path: Path, port: int, user: str) -> list[tuple[str, str]]:
    ini = tmp_path / f"{user}.ini"
    ini.write_text(f"[DEFAULT]\nhost = 127.0.0.1\nport = {port}\nssl = false\nstarttls = false\n"
                   f"username = {user}\npassword = {user}pw\n")
    r = subprocess.run([str(LIVETEST), str(ini), "-v"], capture_output=True, text=True, timeout=300)
    results = parse_results(r.stderr)
    assert results, r.stderr[-3000:]
    return results


@pytest.mark.skipif(not LIVETEST.exists() and shutil.which("imapclient-livetest") is None,
                    reason="imapclient-livetest not installed")
def test_imapclient_livetest_same_results_through_proxy(live_dovecot, tmp_path):
    direct = run_livetest(tmp_path, live_dovecot.port, "live1")
    # The default configuration, all plugins. A second Dovecot process in NOTIFY mode on the account (the
    # notify plugin's watch, armed only for users with notifications on) can make Dovecot resurrect
    # folders the suite renames and deletes at once (ghost folders: listed, but DELETE says NONEXISTENT):
    # about 1 run in 10 while the watch armed NOTIFY for everyone; none in 10 since it does not for this
    # user. See README "Known limits".
    proxy = ProxyProcess(tmp_path / "proxy", live_dovecot.port).start()
    try:
        proxied = run_livetest(tmp_path, proxy.port, "live2")
        if proxied != direct:
            # Known, rare (about 1 run in 10 here): a folder the suite renamed shows up in a later LIST
            # but DELETE says it does not exist (see the session notes). One more run, in a fresh
            # account (the ghost entry stays in the first one), tells a flake from a real difference;
            # a difference that repeats still fails.
            proxied = run_livetest(tmp_path, proxy.port, "live3")
    finally:
        proxy.stop()
    # TestSocketTimeout checks the client's own socket timeouts against the network, not the server:
    # its outcome varies from run to run whoever answers, so it is not compared.
    direct = [r for r in direct if r[0] not in _CLIENT_TIMEOUT_TESTS]
    proxied = [r for r in proxied if r[0] not in _CLIENT_TIMEOUT_TESTS]
    assert len(direct) > 50 and sum(1 for _, s in direct if s == "ok") > 40
    differences = [(d, p) for d, p in zip(direct, proxied, strict=False) if d != p]
    assert len(direct) == len(proxied) and not differences, differences
