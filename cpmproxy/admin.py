"""``cpmproxy localdelete list|restore``: operator access to devices' local-delete records.

Works against the backend directly with the master login from ``[admin]`` (Dovecot: ``user*master``), the
same records the proxy writes (``plugins.localdelete``): nothing is kept in the proxy.
"""

from __future__ import annotations

import imaplib
import re
import ssl
import sys

from cpmproxy.config import Config, ConfigError, master_configured, master_login
from cpmproxy.imap import mutf7
from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.imap.tokens import ParenList, TokenError, tokenize
from plugins.localdelete import RECORDS, device_key

for _cmd in ("GETMETADATA", "SETMETADATA"):
    imaplib.Commands.setdefault(_cmd, ("AUTH", "SELECTED"))


class AdminError(Exception):
    """A failure told to the operator as it is (one line, no Python reprs)."""


def _text(value) -> str:
    """An imaplib error or response as text: imaplib puts the server's bytes in its messages as reprs."""
    if isinstance(value, BaseException):
        value = value.args[0] if len(value.args) == 1 else str(value)
    if isinstance(value, (list, tuple)):
        value = b" ".join(v if isinstance(v, bytes) else str(v).encode() for v in value if v is not None)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return re.sub(r"""\[?(?<!\w)b(['"])(.*?)\1\]?""", r"\2", str(value))


def _quoted(name: str) -> str:
    """A mailbox name as an IMAP quoted string (modified UTF-7, backslash and quote escaped)."""
    return '"' + mutf7.encode(name).decode().replace("\\", "\\\\").replace('"', '\\"') + '"'


class _NamedContext(ssl.SSLContext):
    """Checks the certificate for ``name`` whatever the address connected to (imaplib checks the host)."""

    name = ""

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):
        return super().wrap_socket(sock, *args, server_hostname=self.name or server_hostname, **kwargs)


def backend_ssl_context(config: Config) -> ssl.SSLContext:
    """TLS to the backend as the proxy does it: ``ca_file`` (else the system's roots), the certificate
    checked for ``server_name`` (else ``host``)."""
    b = config.backend
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)  # (verifies chain and name, as create_default_context)
    if b["ca_file"]:
        ctx.load_verify_locations(cafile=b["ca_file"])
    else:
        ctx.load_default_certs()
    ctx.name = b["server_name"]
    return ctx


def _connect(config: Config, user: str) -> imaplib.IMAP4:
    b = config.backend
    if not master_configured(config):
        raise ConfigError("[admin] master_user and master_password_file are needed for this command")
    login, password = master_login(config, user)
    ctx = backend_ssl_context(config) if b["tls"] != "none" else None
    if b["tls"] == "implicit":
        conn = imaplib.IMAP4_SSL(b["host"], b["port"], ssl_context=ctx, timeout=b["connect_timeout"])
    else:
        conn = imaplib.IMAP4(b["host"], b["port"], timeout=b["connect_timeout"])
        if b["tls"] == "starttls":
            conn.starttls(ctx)
    try:
        conn.login(login, password)
    except imaplib.IMAP4.error as e:
        try:
            conn.shutdown()
        except OSError:
            pass
        raise AdminError(f"the backend refused the master login as user {user}: {_text(e)}") from None
    typ, data = conn.capability()
    if typ == "OK" and b"XCPM-LOCALDELETE" in b" ".join(d for d in data if isinstance(d, bytes)).upper().split():
        # A proxy hides the records from its clients: the listing would say "0", the restore do nothing.
        conn.logout()
        raise AdminError(f"{b['host']}:{b['port']} is a cpmproxy (it offers XCPM-LOCALDELETE), which hides "
                         "these records: [backend] must name the IMAP server itself")
    return conn


def _mailboxes(conn: imaplib.IMAP4, only: str | None, user: str) -> list[str]:
    """The user's mailboxes that can hold records (not \\Noselect or \\NonExistent), or ``only`` if it
    exists (AdminError if not)."""
    typ, data = conn.list('""', _quoted(only) if only else "*")
    if typ != "OK":
        raise AdminError(f"cannot list the mailboxes: {_text(data)}")
    names = []
    for item in data or []:
        if not item:
            continue
        if isinstance(item, tuple):  # (a name sent as a literal)
            raw = item[0] + b"\r\n" + item[1]
        else:
            raw = item
        try:
            tokens = tokenize(b"* LIST " + raw)
        except TokenError:
            continue
        flags = {f.value.lower() for f in getattr(tokens[2], "items", ()) if hasattr(f, "value")}
        name = getattr(tokens[-1], "value", None)
        if name is None or flags & {b"\\noselect", b"\\nonexistent"}:
            continue
        names.append("INBOX" if name.upper() == b"INBOX" else mutf7.decode(name))
    if only:
        if not any(n == only or n == "INBOX" == only.upper() for n in names):
            raise AdminError(f"user {user} has no mailbox {only!r}")
        return [only]
    return names


def _records(conn: imaplib.IMAP4, mailbox: str, device: str) -> dict[str, str]:
    prefix = f"{RECORDS}/{device_key(device)}"
    typ, data = conn._simple_command("GETMETADATA", "(DEPTH infinity)", _quoted(mailbox), prefix)
    if typ != "OK":
        raise AdminError(f"cannot read the records of {mailbox}: {_text(data)}")
    typ, data = conn._untagged_response(typ, data, "METADATA")
    out = {}
    # imaplib splits literals out of the line; rebuild a line the tokenizer reads.
    parts = []
    for d in data or []:
        if isinstance(d, tuple):
            parts.append(d[0] + b"\r\n" + d[1])
        elif d:
            parts.append(d)
    raw = b"".join(parts)
    try:
        tokens = tokenize(b"* METADATA " + raw)
    except TokenError:
        return out
    for tok in tokens:
        if isinstance(tok, ParenList):
            items = tok.items
            for j in range(0, len(items) - 1, 2):
                out[items[j].value.decode()] = items[j + 1].value.decode()
    return out


def run(config: Config, action: str, user: str, device: str, mailbox: str | None) -> int:
    """List (stdout: ``mailbox<TAB>uid-set`` per mailbox) or restore a device's local deletions. A mailbox
    that fails is told on stderr and the others are still done; exit status 1 if any failed. Failures that
    stop everything (login refused, no such mailbox) raise AdminError."""
    conn = _connect(config, user)
    try:
        found, failed = 0, []
        for name in _mailboxes(conn, mailbox, user):
            try:
                records = _records(conn, name, device)
                if not records:
                    continue
                uids = set()
                for value in records.values():
                    uids |= set(SequenceSet.parse(value))
                if action == "restore":
                    items = " ".join(f"{e} NIL" for e in records)
                    typ, data = conn._simple_command("SETMETADATA", _quoted(name), f"({items})")
                    if typ != "OK":
                        raise AdminError(f"cannot restore {name}: {_text(data)}")
            except (AdminError, imaplib.IMAP4.error, ValueError) as e:
                if isinstance(e, imaplib.IMAP4.abort):
                    raise  # (the connection is gone: nothing more can be done)
                print(f"cpmproxy: {_text(e)}", file=sys.stderr)
                failed.append(name)
                continue
            found += len(uids)
            print(f"{name}\t{SequenceSet.from_iterable(uids).format().decode()}")
        verb = "restored" if action == "restore" else "locally deleted"
        print(f"{found} message(s) {verb} for user {user}, device {device}", file=sys.stderr)
        if failed:
            print(f"cpmproxy: {len(failed)} mailbox(es) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    except imaplib.IMAP4.error as e:
        raise AdminError(_text(e)) from None
    finally:
        try:
            conn.logout()
        except Exception:
            pass
