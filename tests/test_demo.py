"""The README's first command: `make demo` (python -m cpmproxy.demo) brings up Dovecot and the proxy with
the sample CPM store, says how to connect, and shuts both down on SIGTERM."""

from __future__ import annotations

import imaplib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_its_instructions_work(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    demo = subprocess.Popen([sys.executable, "-m", "cpmproxy.demo", "--dir", str(tmp_path / "demo"),
                             "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("Backend directly:") for line in out):
            line = demo.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(out)
            out.append(line)
        text = "".join(out)
        port = int(re.search(r"cpmproxy demo: proxy on 127\.0\.0\.1:(\d+)", text).group(1))
        assert port != 1143, text  # (--port 0: any free port, not the default)
        c = imaplib.IMAP4("127.0.0.1", port)
        c.login("alice", "alicepw")
        typ, folders = c.list()
        assert typ == "OK" and len(folders) > 3, folders
        folder = re.search(r'd SELECT "([^"]+)"', text).group(1)
        typ, count = c.select(f'"{folder}"')
        assert typ == "OK" and int(count[0]) > 0, count
        c.logout()
        # The operator's command it prints works with the demo's configuration (its master login).
        command = re.search(r"^  (\S*cpmproxy --config \S+ localdelete list .*)$", text, re.M).group(1).split()
        done = subprocess.run([sys.executable, "-m", "cpmproxy.cli", *command[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, "".join(out) + rest
    assert "Traceback" not in "".join(out) + rest
