"""Run the proxy as a real subprocess (``python -m cpmproxy.cli``), as operators do: for tests, demo, bench."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cpmproxy.testing.dovecot import free_port, free_ports

__all__ = ["ProxyProcess", "free_port"]

class ProxyProcess:
    """A cpmproxy process listening on a free loopback port in front of ``backend_port``.

    ``config_extra`` is appended verbatim to the generated TOML (extra sections such as ``[limits]``);
    ``proxy_extra`` goes inside ``[proxy]``.
    """

    def __init__(self, workdir: Path, backend_port: int, *, backend_tls: str = "none", ca_file: str = "",
                 server_name: str = "", tls_cert: str = "", tls_key: str = "", config_extra: str = "",
                 listen_extra: list[str] = (), metrics: bool = True, plugins: list[str] | None = None,
                 proxy_extra: str = "", backend_extra: str = "", backend_host: str = "127.0.0.1",
                 source: Path | None = None):
        self.workdir = Path(workdir)
        # The source tree whose code the process runs (bench/ab.py runs another revision beside this one).
        self.source = Path(source) if source is not None else Path(__file__).resolve().parents[2]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self._metrics = metrics
        self._listen_extra = list(listen_extra)
        self._settings = dict(plugins=plugins, proxy_extra=proxy_extra, tls_cert=tls_cert, tls_key=tls_key,
                              backend_host=backend_host, backend_port=backend_port, backend_tls=backend_tls,
                              ca_file=ca_file, server_name=server_name, backend_extra=backend_extra,
                              config_extra=config_extra)
        self.proc: subprocess.Popen | None = None
        self._configure()

    def _configure(self) -> None:
        """Free ports (again: another process may take a free port before the proxy binds it) and the
        configuration file that names them."""
        o = self._settings
        self.port, self.metrics_port = free_ports(2) if self._metrics else (free_port(), None)
        self.listen = [f"tcp:{self.port}:interface=127.0.0.1", *self._listen_extra]
        lines = []
        if o["plugins"] is not None:
            lines.append("plugins = [" + ", ".join(f'"{p}"' for p in o["plugins"]) + "]")
        lines += ["[proxy]", "listen = [" + ", ".join(f'"{d}"' for d in self.listen) + "]"]
        if o["proxy_extra"]:
            lines.append(o["proxy_extra"])
        if o["tls_cert"]:
            lines += [f'tls_cert = "{o["tls_cert"]}"', f'tls_key = "{o["tls_key"]}"']
        lines += ["[backend]", f'host = "{o["backend_host"]}"', f"port = {o['backend_port']}",
                  f'tls = "{o["backend_tls"]}"']
        if o["ca_file"]:
            lines.append(f'ca_file = "{o["ca_file"]}"')
        if o["server_name"]:
            lines.append(f'server_name = "{o["server_name"]}"')
        if o["backend_extra"]:
            lines.append(o["backend_extra"])
        if self._metrics:
            lines += ["[metrics]", f'listen = "tcp:{self.metrics_port}:interface=127.0.0.1"']
        self.config_path = self.workdir / f"cpmproxy-{self.port}.toml"
        self._written = "\n".join(lines) + "\n" + o["config_extra"]
        self.config_path.write_text(self._written)
        self.log_path = self.workdir / f"cpmproxy-{self.port}.log"

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        for _ in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                if "Address already in use" not in str(e) or self.config_path.read_text() != self._written:
                    raise  # (a configuration the caller wrote is theirs, ports and all)
                self._configure()  # (taken by another process between finding it free and binding it)
        return self._start(timeout)

    def _start(self, timeout: float) -> ProxyProcess:
        env = dict(os.environ)
        root = str(self.source)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cpmproxy.cli", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cpmproxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(1024).startswith(b"* OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cpmproxy did not start:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
