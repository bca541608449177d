"""``cpmproxy localdelete list|restore``: operator access to devices' local-delete records.

Works against the backend directly with the master login from ``[admin]`` (Dovecot: ``user*master``), the
same records the proxy writes (``plugins.localdelete``): nothing is kept in the proxy.
"""

from __future__ import annotations

import imaplib
import ssl
import sys

from cpmproxy.config import Config, ConfigError, master_configured, master_login
from cpmproxy.imap import mutf7
from cpmproxy.imap.seqset import SequenceSet
from cpmproxy.imap.tokens import ParenList, TokenError, tokenize
from plugins.localdelete import RECORDS, device_key

for _cmd in ("GETMETADATA", "SETMETADATA"):
    imaplib.Commands.setdefault(_cmd, ("AUTH", "SELECTED"))


def _connect(config: Config, user: str) -> imaplib.IMAP4:
    b = config.backend
    if not master_configured(config):
        raise ConfigError("[admin] master_user and master_password_file are needed for this command")
    login, password = master_login(config, user)
    ctx = None
    if b["tls"] != "none":
        ctx = ssl.create_default_context(cafile=b["ca_file"] or None)
    if b["tls"] == "implicit":
        conn = imaplib.IMAP4_SSL(b["host"], b["port"], ssl_context=ctx, timeout=b["connect_timeout"])
    else:
        conn = imaplib.IMAP4(b["host"], b["port"], timeout=b["connect_timeout"])
        if b["tls"] == "starttls":
            conn.starttls(ctx)
    conn.login(login, password)
    return conn


def _mailboxes(conn: imaplib.IMAP4, only: str | None) -> list[str]:
    if only:
        return [only]
    typ, data = conn.list('""', "*")
    names = []
    for item in data or []:
        if not item:
            continue
        raw = item if isinstance(item, bytes) else item[0]
        try:
            tokens = tokenize(raw)
        except TokenError:
            continue
        name = getattr(tokens[-1], "value", None)
        if name is not None:
            names.append("INBOX" if name.upper() == b"INBOX" else mutf7.decode(name))
    return names


def _records(conn: imaplib.IMAP4, mailbox: str, device: str) -> dict[str, str]:
    wire = '"' + mutf7.encode(mailbox).decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
    prefix = f"{RECORDS}/{device_key(device)}"
    typ, data = conn._simple_command("GETMETADATA", "(DEPTH infinity)", wire, prefix)
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
    conn = _connect(config, user)
    try:
        found = 0
        for name in _mailboxes(conn, mailbox):
            records = _records(conn, name, device)
            if not records:
                continue
            uids = set()
            for value in records.values():
                uids |= set(SequenceSet.parse(value))
            found += len(uids)
            print(f"{name}\t{SequenceSet.from_iterable(uids).format().decode()}")
            if action == "restore":
                wire = '"' + mutf7.encode(name).decode().replace('"', '\\"') + '"'
                items = " ".join(f"{e} NIL" for e in records)
                typ, _ = conn._simple_command("SETMETADATA", wire, f"({items})")
                if typ != "OK":
                    print(f"cpmproxy: cannot restore {name}", file=sys.stderr)
                    return 1
        verb = "restored" if action == "restore" else "locally deleted"
        print(f"{found} message(s) {verb} for user {user}, device {device}", file=sys.stderr)
        return 0
    finally:
        try:
            conn.logout()
        except Exception:
            pass
