"""A private, throwaway Dovecot instance for tests and the demo.

Each :class:`Dovecot` gets its own generated ``dovecot.conf``, ``base_dir``,
``state_dir``, instance name and loopback ports, so several instances (and a
system-wide Dovecot) can run side by side.  The master runs in the foreground
(``dovecot -F``) as our child in its own session: that lets :meth:`stop` wait
for it and for every worker it spawned, so no stray processes survive a test
run and an immediate restart never hits "Dovecot is already running".
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import imapclient

from cpmproxy.testing.certs import CertPaths, make_ca_and_cert

__all__ = ["Dovecot", "DovecotError", "free_port", "parse_appenduid"]

DOVECOT_BIN = "dovecot"
DOVEADM_BIN = "doveadm"

DEFAULT_USERS: Mapping[str, str] = {"alice": "alicepw", "bob": "bobpw"}

# Unix socket paths are limited to 108 bytes; Dovecot appends names such as
# "token-login/tokenlogin" to base_dir, so keep base_dir comfortably short.
_MAX_BASE_DIR_LEN = 80


class DovecotError(RuntimeError):
    """Dovecot failed to start/stop or a doveadm command failed."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently unused TCP port on ``host`` (racy, but fine for tests)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct unused TCP ports on ``host``: held open together while chosen, so that two of
    them (a proxy's listener and its metrics endpoint) can never be the same number."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _traversable_by_others(path: Path) -> bool:
    """True if every directory from / down to ``path`` has the o+x bit.

    Dovecot's auth process (user ``dovecot``) and mail processes (the mail
    uid) must reach the passwd files and mailboxes; pytest's tmp dirs live
    under a 0700 ``/tmp/pytest-of-root`` and would fail with EACCES.
    """
    for p in [path, *path.parents]:
        try:
            if not p.stat().st_mode & 0o001:
                return False
        except FileNotFoundError:
            continue  # will be created by us below a checked parent
    return True


def _session_members(sid: int) -> list[int]:
    """PIDs whose session id is ``sid`` (i.e. the master and all its workers)."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 2 (comm) may contain spaces/parens; parse after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0]=state, [1]=ppid, [2]=pgrp, [3]=session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Dovecot:
    """A private Dovecot 2.3 listening on 127.0.0.1.

    ``port`` offers STARTTLS, ``tls_port`` is implicit TLS; both present the
    generated ``certs.cert`` (valid for localhost/127.0.0.1, signed by
    ``certs.ca_cert``).  Plaintext LOGIN is allowed (the proxy talks to it
    over loopback in some tests).  Master-user logins use ``user*admin``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        basedir: Path,
        users: Mapping[str, str] | None = None,
        master_user: tuple[str, str] | None = ("admin", "adminpw"),
        *,
        extra_config: str = "",
    ) -> None:
        self.mail_uid, self.mail_gid = self._mail_owner()  # fails early when not root
        self.basedir = Path(basedir).absolute()
        self.basedir.mkdir(parents=True, exist_ok=True)
        self.users: dict[str, str] = dict(DEFAULT_USERS if users is None else users)
        self.master_user = master_user
        self.extra_config = extra_config
        self.port = free_port(self.host)
        self.tls_port = free_port(self.host)
        while self.tls_port == self.port:
            self.tls_port = free_port(self.host)

        self.conf_path = self.basedir / "dovecot.conf"
        self.log_path = self.basedir / "dovecot.log"
        self.certs: CertPaths = make_ca_and_cert(self.basedir / "certs")

        self._owned_tmp: Path | None = None
        self.datadir = self._choose_datadir()
        self.run_dir = self.datadir / "run"
        self.state_dir = self.datadir / "state"
        self.mail_dir = self.datadir / "mail"
        self.instance_name = f"cpmtest-{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)  # last resort against orphaned masters

    # -- layout ------------------------------------------------------------

    def _choose_datadir(self) -> Path:
        """Where files Dovecot accesses as non-root users live."""
        if _traversable_by_others(self.basedir.parent) and (
            len(str(self.basedir / "run")) <= _MAX_BASE_DIR_LEN
        ):
            self.basedir.chmod(self.basedir.stat().st_mode | 0o011)
            return self.basedir
        # Fall back to a short, world-traversable private dir in /tmp and
        # leave symlinks behind so the data is still easy to inspect.
        tmp = Path(tempfile.mkdtemp(prefix="cpmdc-", dir="/tmp"))
        tmp.chmod(0o711)
        self._owned_tmp = tmp
        for name in ("run", "mail"):
            link = self.basedir / name
            if link.is_symlink() or link.exists():
                if link.is_symlink() or link.is_file():
                    link.unlink()
                else:
                    shutil.rmtree(link)
            link.symlink_to(tmp / name)
        return tmp

    @staticmethod
    def _mail_owner() -> tuple[int, int]:
        # Dovecot refuses uid 0 for mail ("userdb returned 0 as uid"); the
        # stock "nobody" account is unprivileged and exists everywhere.
        if os.geteuid() != 0:
            raise DovecotError("cpmproxy.testing.dovecot needs root (Dovecot's master must start as root)")
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid

    # -- config ------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """A user more, who can log in when this returns: Dovecot reads its passwd-file again when it
        changed, at most once a second (a login in the same second as a lookup before the change still
        found no such user), so the second is waited out."""
        self.users[name] = password
        self._write_passwd_files()
        time.sleep(1.1)

    def _write_passwd_files(self) -> None:
        def write(path: Path, entries: Iterable[tuple[str, str]]) -> None:
            lines = []
            for name, pw in entries:
                if ":" in name or ":" in pw or "\n" in name + pw:
                    raise ValueError(f"unsupported character in credentials for {name!r}")
                lines.append(f"{name}:{{PLAIN}}{pw}::::::\n")
            # (surrogateescape: a password given as undecodable bytes, e.g. Latin-1, is written as those bytes)
            path.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
            path.chmod(0o644)  # read by the auth process (user "dovecot")

        write(self.datadir / "users.passwd", self.users.items())
        write(self.datadir / "master.passwd", [self.master_user] if self.master_user else [])

    def config_text(self) -> str:
        """The full standalone dovecot.conf for this instance."""
        d = self.datadir
        master_passdb = ""
        if self.master_user:
            # pass=yes: after master auth, the target user must also exist
            # in the normal passdb (otherwise static userdb accepts anyone).
            master_passdb = f"""
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/master.passwd
  master = yes
  pass = yes
}}
"""
        return f"""\
# Generated by cpmproxy.testing.dovecot -- private test instance.
instance_name = {self.instance_name}
base_dir = {self.run_dir}
state_dir = {self.state_dir}
log_path = {self.log_path}
protocols = imap
listen = {self.host}
verbose_proctitle = yes
login_greeting = Dovecot ready.
# The proxy forwards the client address via ID x-originating-ip.
login_trusted_networks = 127.0.0.0/8

ssl = yes
ssl_cert = <{self.certs.cert}
ssl_key = <{self.certs.key}
ssl_min_protocol = TLSv1.2

disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Negative-login tests would otherwise wait 2 s (plus growing anvil penalty).
auth_failure_delay = 0
auth_master_user_separator = *
{master_passdb}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users.passwd
}}
userdb {{
  driver = static
  args = uid={self.mail_uid} gid={self.mail_gid} home={self.mail_dir}/%u
}}

# LAYOUT=fs + separator "/" gives CPM-style "Default/tel:+1555..." folders.
mail_location = maildir:~/Maildir:LAYOUT=fs
namespace inbox {{
  inbox = yes
  separator = /
  prefix =
}}
# Required for NOTIFY in 2.3.
mailbox_list_index = yes
# IDLE and NOTIFY watch files with inotify, 128 instances per uid by default; past that Dovecot polls
# every mailbox_idle_check_interval (30 s). All test mail belongs to one uid: poll fast.
mailbox_idle_check_interval = 1 secs
mail_attribute_dict = file:%h/dovecot-attributes
# Throwaway data: durability is irrelevant, speed is not.
mail_fsync = never

protocol imap {{
  imap_metadata = yes
  mail_max_userip_connections = 10000
  imap_max_line_length = 1M
}}

default_process_limit = 1000
default_client_limit = 10000

service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.tls_port}
    ssl = yes
  }}
  # Performance mode: a TLS connection otherwise pins one login process,
  # capping concurrent TLS sessions at process_limit.
  service_count = 0
  process_min_avail = 2
  client_limit = 1000
}}

service anvil {{
  # Disables the per-IP auth failure penalty (everything comes from 127.0.0.1).
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{self.extra_config}
"""

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> Dovecot:
        if self.running:
            return self
        for attempt in range(3):
            try:
                return self._start(timeout)
            except DovecotError as e:
                # A port chosen free was taken before Dovecot bound it (another test process, a client's
                # ephemeral port): new ones. Anything else is the caller's to see.
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
                self.port, self.tls_port = free_ports(2, self.host)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> Dovecot:
        self._kill_stale()
        # Stale sockets from an earlier run confuse clients: a leftover
        # anvil-auth-penalty socket makes auth retry connecting for 5 s.
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for d in (self.run_dir, self.state_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.mail_dir, self.mail_uid, self.mail_gid)
        self.mail_dir.chmod(0o700)
        self._write_passwd_files()
        self.conf_path.write_text(self.config_text())

        stdout = open(self.basedir / "dovecot.stdout", "ab")
        try:
            self._proc = subprocess.Popen(
                [DOVECOT_BIN, "-F", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C in a terminal must not hit Dovecot
                # directly (the demo stops the proxy first), and stop() can
                # find every worker by session id.
                start_new_session=True,
            )
        finally:
            stdout.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise DovecotError(
                    f"dovecot exited with status {self._proc.returncode}\n{self.diagnostics()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as s:
                    greeting = s.makefile("rb").readline()
                if greeting.startswith(b"* OK"):
                    return
                last_err = DovecotError(f"unexpected greeting {greeting!r}")
            except OSError as e:
                last_err = e
            time.sleep(0.05)
        raise DovecotError(f"dovecot not ready after {timeout}s ({last_err})\n{self.diagnostics()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the master and wait until it and all its workers are gone."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        sid = proc.pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reap_session(sid, timeout=5.0)
        pidfile = self.run_dir / "master.pid"
        deadline = time.monotonic() + 5.0
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pidfile.unlink(missing_ok=True)  # only left behind after SIGKILL

    @staticmethod
    def _reap_session(sid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _session_members(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _session_members(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _kill_stale(self) -> None:
        """Stop a master left over from a crashed run that used this config."""
        pidfile = self.run_dir / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.conf_path).encode() not in cmdline:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._reap_session(pid, timeout=5.0)

    def wipe_mail(self) -> None:
        """Delete all users' mail (instance must be stopped).

        Also stops a master a crashed earlier run left behind on this basedir,
        which would otherwise keep files open and block start().
        """
        if self.running:
            raise DovecotError("stop() Dovecot before wiping its mail")
        self._kill_stale()
        shutil.rmtree(self.mail_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def close(self) -> None:
        """stop() and remove the private /tmp data dir, if one was needed."""
        self.stop()
        if self._owned_tmp is not None:
            shutil.rmtree(self._owned_tmp, ignore_errors=True)
            self._owned_tmp = None
        atexit.unregister(self.close)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log file)"

    def diagnostics(self) -> str:
        out = f"--- {self.log_path} (tail) ---\n{self.log_tail()}"
        stdout = self.basedir / "dovecot.stdout"
        if stdout.exists():
            out += f"\n--- {stdout} ---\n{stdout.read_text(errors='replace')[-4000:]}"
        return out

    # -- helpers for tests -------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Client context trusting only the generated CA (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.certs.ca_cert))

    def imap_direct(
        self,
        user: str,
        *,
        password: str | None = None,
        tls: str = "starttls",
        timeout: float = 30.0,
    ) -> imapclient.IMAPClient:
        """A logged-in IMAPClient talking straight to Dovecot (no proxy).

        ``tls`` is "starttls" (plain port + STARTTLS), "implicit" (TLS port)
        or "none" (plaintext LOGIN on the plain port).  ``user`` may be a
        master login such as ``"alice*admin"`` (password = master password).
        """
        if password is None:
            if "*" in user and self.master_user:
                password = self.master_user[1]
            else:
                password = self.users[user]
        if tls == "implicit":
            client = imapclient.IMAPClient(
                "localhost", self.tls_port, ssl=True, ssl_context=self.ssl_context(), timeout=timeout
            )
        elif tls in ("starttls", "none"):
            client = imapclient.IMAPClient(self.host, self.port, ssl=False, timeout=timeout)
            if tls == "starttls":
                # server_hostname check happens against the cert's IP SAN.
                client.starttls(self.ssl_context())
        else:
            raise ValueError(f"tls must be 'starttls', 'implicit' or 'none', not {tls!r}")
        try:
            client.login(user, password)
        except BaseException:
            client.shutdown()
            raise
        return client

    def doveadm(self, *args: str, check: bool = True) -> str:
        """Run ``doveadm -c CONF ARGS...`` and return its stdout."""
        res = subprocess.run(
            [DOVEADM_BIN, "-c", str(self.conf_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and res.returncode != 0:
            raise DovecotError(f"doveadm {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def deliver(
        self,
        user: str,
        mailbox: str,
        message: bytes,
        flags: Iterable[str | bytes] = (),
        msg_time: float | None = None,
    ) -> int:
        """APPEND ``message`` to ``user``'s ``mailbox`` (created if missing); return its UID."""
        client = self.imap_direct(user, tls="none")
        try:
            if not client.folder_exists(mailbox):
                client.create_folder(mailbox)
            when = None if msg_time is None else dt.datetime.fromtimestamp(msg_time, dt.timezone.utc)
            resp = client.append(mailbox, message, flags=tuple(flags), msg_time=when)
        finally:
            client.logout()
        return parse_appenduid(resp)


def parse_appenduid(resp: bytes | str) -> int:
    """Extract the UID from an APPEND tagged response ``[APPENDUID <v> <uid>]``."""
    text = resp.decode() if isinstance(resp, bytes) else resp
    start = text.find("[APPENDUID ")
    if start < 0:
        raise DovecotError(f"no APPENDUID in {text!r}")
    return int(text[start + 1 : text.index("]", start)].split()[2])
