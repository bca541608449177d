"""The files an operator installs: the Dovecot snippet parses with Dovecot's own parser (its commented
optional blocks too, once uncommented), and the systemd unit, its user and the README agree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("doveconf") is None, reason="dovecot-core is not installed")
@pytest.mark.parametrize("optional", [False, True], ids=["as-shipped", "optional-blocks-on"])
def test_dovecot_snippet_parses(tmp_path, optional):
    text = (ROOT / "conf/dovecot/90-cpmproxy.conf").read_text()
    if optional:  # settings commented out are "#name" or "#  name"; prose is "# text"
        text = "\n".join(line[1:] if re.match(r"#(?! |$)|#  ", line) else line for line in text.splitlines())
    (tmp_path / "snippet.conf").write_text(text)
    (tmp_path / "dovecot.conf").write_text(f"protocols = imap\nssl = no\n!include {tmp_path / 'snippet.conf'}\n")
    done = subprocess.run(["doveconf", "-n", "-c", str(tmp_path / "dovecot.conf")], capture_output=True, text=True)
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
    assert "separator = /" in done.stdout and "imap_metadata = yes" in done.stdout
    if optional:
        assert "master = yes" in done.stdout and "process_limit = 10240" in done.stdout, done.stdout


def test_systemd_unit_user_and_readme_agree():
    unit = (ROOT / "systemd/cpmproxy.service").read_text()
    user = re.search(r"^User=(\S+)$", unit, re.M).group(1)
    assert re.search(rf"^u {user} ", (ROOT / "systemd/cpmproxy.sysusers").read_text(), re.M)
    readme = (ROOT / "README.md").read_text()
    for binary in re.findall(r"^Exec\w*=(\S+)", unit, re.M):
        if binary.endswith("/cpmproxy"):
            venv = binary.rsplit("/bin/", 1)[0]
            assert f"python3 -m venv {venv}" in readme, venv
