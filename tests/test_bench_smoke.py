"""The benchmark scripts still run: their quick (smoke) sizes, end to end, each with its own Dovecot and
proxy processes. Only that they run and report every scenario asked for is checked here, never a timing:
performance is judged by the full runs (README, "Benchmarks"), not by tests on a shared machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_relay_bench_quick(tmp_path):
    out = tmp_path / "results.json"
    r = run(["bench/run.py", "--quick", "--only", "bulk", "--only", "pingpong", "--only", "append",
             "--results", str(tmp_path / "RESULTS.md"), "--json", str(out)])
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: a target missed, which a smoke run may
    results = {x["name"]: x for x in json.loads(out.read_text())["results"]}
    assert set(results) == {"bulk", "pingpong", "append"}
    assert all(results[name]["ratio"] > 0 for name in results)
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Quick (smoke) run" in report and "| bulk |" in report and "quartiles" in report


def test_cpm_bench_quick(tmp_path):
    out = tmp_path / "cpm.json"
    r = run(["bench/cpm_bench.py", "--quick", "--only", "view", "--only", "localdelete", "--only", "ld_select",
             "--only", "expunge_burst", "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    results = {x["scenario"]: x for x in json.loads(out.read_text())}
    # view_tcp (HAProxy, for reference) where it is installed (CI installs it); the others always.
    tcp = {"view_tcp"} if shutil.which("haproxy") else set()
    assert set(results) == {"view_none", "view_hidden", "view_relay", "view_cold", "localdelete",
                            "ld_select", "expunge_burst_100"} | tcp
    assert all(x["direct"] > 0 and x["proxy"] > 0 for x in results.values())
    assert "per-round ratio quartiles" in r.stdout


def test_ab_bench_quick():
    """Two versions side by side (HEAD in a temporary worktree, the working tree), both report, and the
    worktree is gone afterwards."""
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    r = run(["bench/ab.py", "--quick"])
    assert r.returncode == 0, r.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in r.stdout.splitlines()}
    for side in ("base", "work"):
        assert "ratio " in lines[side] and "proxy CPU" in lines[side], r.stdout
    assert subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True,
                          text=True).stdout == worktrees
