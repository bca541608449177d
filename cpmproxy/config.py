"""TOML configuration: parsed with tomllib, validated against a declarative schema.

Unknown keys are errors (a typo must not silently fall back to a default). Every limit has a default that
is on. Plugins own their own tables (``[plugin.NAME]``, or a top-level section they declare, such as
``[policy]``) and validate them themselves.
"""

from __future__ import annotations

import datetime
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["ConfigError", "Config", "load_config", "parse_config", "has_type", "unknown_key", "wrong_type",
           "permission_hint"]


class ConfigError(Exception):
    pass


def permission_hint(e: OSError) -> str:
    """What to do about a file the proxy may not read (``--check`` run as root passed it; the service, as
    its own user, then failed on it)."""
    return " (the user the proxy runs as must be able to read it)" if isinstance(e, PermissionError) else ""


@dataclass(frozen=True)
class Opt:
    kind: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    doc: str = ""


def _one_of(*values: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in values else f"must be one of {', '.join(repr(x) for x in values)}"
    return check


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _line_length(v: Any) -> str | None:
    # (Shorter, even a client's first CAPABILITY or an ID with a device id is refused: BYE [TOOBIG].)
    return None if v >= 1024 else "must be >= 1024 (bytes: a command line must hold a LOGIN or an ID)"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _str_list(v: Any) -> str | None:
    return None if all(isinstance(x, str) for x in v) else "must be an array of strings"


def _not_empty(v: Any) -> str | None:
    return None if v else "must not be empty"


def _resp_text(v: Any) -> str | None:
    """The greeting goes out as IMAP resp-text (RFC 3501 ``text``: 1*TEXT-CHAR, 7-bit, no CR/LF): a CR or LF
    would start a protocol line of the operator's making, other controls and 8-bit text break clients."""
    if not v:
        return "must not be empty"
    bad = next((c for c in v if not (c.isascii() and c.isprintable())), None)
    return None if bad is None else f"must be printable ASCII text (found {bad!r})"


SCHEMA: dict[str, dict[str, Opt]] = {
    "proxy": {
        "listen": Opt(list, ["tcp:1143:interface=127.0.0.1"], _str_list,
                      "Twisted server endpoint strings (tcp:, ssl:, systemd:, haproxy:...)"),
        "plaintext_auth": Opt(str, "loopback", _one_of("loopback", "always", "never")),
        "tls_cert": Opt(str, "", None, "PEM certificate (chain) offered on STARTTLS"),
        "tls_key": Opt(str, "", None, "PEM private key for tls_cert"),
        "device_id_field": Opt(str, "x-cpm-device-id", _not_empty),
        "greeting": Opt(str, "cpmproxy ready.", _resp_text),
        "shutdown_grace": Opt((int, float), 5.0, _non_negative,
                              "seconds to let sessions finish a response on shutdown"),
    },
    "backend": {
        "host": Opt(str, "127.0.0.1", _not_empty),
        "port": Opt(int, 143, lambda v: None if 0 < v < 65536 else "must be a TCP port"),
        "tls": Opt(str, "none", _one_of("none", "starttls", "implicit")),
        "ca_file": Opt(str, "", None, "CA bundle to verify the backend; empty: system trust store"),
        "server_name": Opt(str, "", None, "name checked in the backend certificate (default: host)"),
        "connect_timeout": Opt((int, float), 10.0, _positive),
        "login_timeout": Opt((int, float), 30.0, _positive),
        "command_timeout": Opt((int, float), 60.0, _positive,
                               "an answer the proxy waits for on a connection of its own (side, watch)"),
        "side_linger": Opt((int, float), 30.0, lambda v: None if v >= 0 else "must be >= 0",
                           "how long a user's side and watch connections outlive their last session"),
        "username_case": Opt(str, "lower", _one_of("lower", "exact"),
                             "how the backend folds login names (Dovecot's auth_username_format %Lu: lower)"),
    },
    "limits": {
        "max_line": Opt(int, 65536, _line_length, "longest command line (bytes)"),
        "max_literal": Opt(int, 100 * 1024 * 1024, _positive,
                           "largest literal from a client (also capped by the backend's APPENDLIMIT)"),
        "max_backend_line": Opt(int, 64 * 1024 * 1024, _positive, "longest response line from the backend"),
        "max_gathered": Opt(int, 1024 * 1024, _positive,
                            "largest command a plugin reads whole, literals included (a search with a literal "
                            "where messages are hidden, a literal mailbox name)"),
        "max_preauth_literal": Opt(int, 8192, _positive, "largest literal before login"),
        "max_connections": Opt(int, 10000, _positive),
        "max_connections_per_ip": Opt(int, 100, _positive),
        "max_connections_per_user": Opt(int, 50, _positive),
        "max_auth_failures": Opt(int, 3, _positive, "failed logins on one connection before BYE"),
        "auth_failure_delay": Opt((int, float), 1.0, _non_negative,
                                  "first delay after a failed login; doubles per failure from that IP (IPv6: /64)"),
        "auth_failure_delay_max": Opt((int, float), 15.0, _non_negative),
        "auth_failure_window": Opt((int, float), 300.0, _positive,
                                   "seconds after which an IP's failure count is forgotten"),
        "max_bad_commands": Opt(int, 20, _positive, "consecutive invalid commands before BYE"),
        "max_waiting_answers": Opt(int, 1000, _positive,
                                   "answers of the proxy's own waiting for earlier pipelined commands before "
                                   "it stops reading the client"),
        "preauth_timeout": Opt((int, float), 60.0, _positive),
        "idle_timeout": Opt((int, float), 1800.0, _positive, "RFC 9051 autologout: 30 minutes"),
        "close_timeout": Opt((int, float), 10.0, _positive,
                             "seconds a session being closed has for its client to read what is left"),
    },
    "admin": {
        "master_user": Opt(str, "", None, "backend master user for `cpmproxy localdelete` (Dovecot: user*master)"),
        "master_password_file": Opt(str, "", None, "file holding the master user's password"),
        "separator": Opt(str, "*", _not_empty, "Dovecot's auth_master_user_separator"),
    },
    "metrics": {
        "listen": Opt(str, "", None, "endpoint for the Prometheus text endpoint; empty: off"),
    },
    "log": {
        "format": Opt(str, "text", _one_of("text", "json")),
        "level": Opt(str, "info", _one_of("debug", "info", "warn", "error")),
    },
}

TOP_LEVEL = {"plugins", "plugin"}

# File settings of plugin tables, resolved against the config file's directory like the core ones (a
# plugin sees its own table only, not where the file is).
PLUGIN_FILES = (("push", "ca_file"),)


@dataclass
class Config:
    proxy: dict[str, Any]
    backend: dict[str, Any]
    limits: dict[str, Any]
    metrics: dict[str, Any]
    log: dict[str, Any]
    admin: dict[str, Any]
    plugins: list[str] | None  # None: every installed plugin
    plugin: dict[str, dict[str, Any]] = field(default_factory=dict)  # [plugin.NAME] tables
    extra: dict[str, Any] = field(default_factory=dict)  # top-level sections owned by plugins
    path: Path | None = None


def master_configured(config: Config) -> bool:
    """Is the ``[admin]`` backend master user set (admin CLI, offline watches)?"""
    return bool(config.admin["master_user"] and config.admin["master_password_file"])


def master_login(config: Config, user: str) -> tuple[str, str]:
    """The backend login name and password acting as ``user`` through the master user (Dovecot:
    ``user*master``). The password file is read each time, so it can be rotated without a reload."""
    admin = config.admin
    with open(admin["master_password_file"]) as f:
        password = f.read().strip()
    return f"{user}{admin['separator']}{admin['master_user']}", password


def unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    """``where`` is the table's prefix (``"limits."``, ``"plugin.push."``); the nearest known key is offered."""
    hint = difflib.get_close_matches(key, known, n=1)
    more = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ConfigError(f"{where}{key}: unknown key{more}")


# TOML's names for the types tomllib gives (an operator writes TOML, not Python).
_TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table",
               datetime.datetime: "date-time", datetime.date: "date", datetime.time: "time"}


def _toml_type(kind: type) -> str:
    return _TOML_TYPES.get(kind, kind.__name__)


def has_type(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance``, except that a boolean is no integer (TOML's ``true`` is not 1)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds)


def wrong_type(key: str, kind: type | tuple[type, ...], value: Any) -> ConfigError:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return ConfigError(f"{key}: expected {' or '.join(map(_toml_type, kinds))}, got {_toml_type(type(value))}")


def _validate_section(name: str, raw: Any) -> dict[str, Any]:
    schema = SCHEMA[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table ([{name}]), got {_toml_type(type(raw))}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in schema:
            raise unknown_key(key, list(schema), f"{name}.")
        opt = schema[key]
        if not has_type(value, opt.kind):
            raise wrong_type(f"{name}.{key}", opt.kind, value)
        if opt.check is not None and (msg := opt.check(value)):
            raise ConfigError(f"{name}.{key}: {msg}")
        out[key] = value
    for key, opt in schema.items():
        out.setdefault(key, list(opt.default) if isinstance(opt.default, list) else opt.default)
    return out


def _resolve(base: Path, value: str) -> Path:
    """A file setting: relative to the config file's directory."""
    return Path(value) if Path(value).is_absolute() else base / value


# An ssl: listener's parameters in Twisted's order (positional ones fill them in so), and those naming files,
# which Twisted opens relative to the working directory (a service's is "/").
_SSL_PARAMS = ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
               "dhParameters")
_SSL_FILES = frozenset(("privateKey", "certKey", "extraCertChain", "dhParameters"))


def _listener_files(base: Path, desc: str) -> str:
    """An ``ssl:`` listener string with its relative file parameters made relative to ``base`` (the config
    file's directory, as every file setting); any other string as it is (a string Twisted cannot read is
    reported as it was written, by the listener checks)."""
    from twisted.internet.endpoints import _parse  # (private: the parser serverFromString uses)

    if not desc.startswith("ssl:"):
        return desc
    try:
        args, kwargs = _parse(desc)
    except Exception:
        return desc
    if len(args) > len(_SSL_PARAMS) + 1 or any(k in kwargs for k in _SSL_PARAMS[:len(args) - 1]):
        return desc  # (too many values, or one given twice: the checks say so)
    params = dict(zip(_SSL_PARAMS, args[1:], strict=False)) | kwargs
    if not any(k in _SSL_FILES and not Path(v).is_absolute() for k, v in params.items()):
        return desc
    params = {k: str(_resolve(base, v)) if k in _SSL_FILES else v for k, v in params.items()}

    def escaped(value: str) -> str:  # (Twisted's escapes: ':' and '=' separate, '\\' escapes)
        return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")

    port = params.pop("port", None)
    return ":".join(["ssl"] + ([escaped(port)] if port is not None else [])
                    + [f"{k}={escaped(v)}" for k, v in params.items()])


def _plugin_tables(raw: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"plugin: expected a table of plugin tables ([plugin.NAME]), got {_toml_type(type(raw))}")
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"plugin.{name}: expected a table ([plugin.{name}]), got {_toml_type(type(table))}")
    return {name: dict(table) for name, table in raw.items()}


def _push_needs_master(push: dict[str, Any], admin: dict[str, Any]) -> bool:
    """Push for users with no device connected, without the [admin] master user. (Only when the settings
    have their types: a wrong one is the plugin's to report, not this rule's.)"""
    url, offline_watch = push.get("url"), push.get("offline_watch")
    if not (isinstance(url, str) and url) or not (offline_watch is None or has_type(offline_watch, (int, float))):
        return False
    return offline_watch != 0 and not (admin["master_user"] and admin["master_password_file"])


def _master_password_readable(path: str) -> None:
    try:
        with open(path, "rb") as f:
            password = f.read().strip()
    except OSError as e:
        raise ConfigError(f"admin.master_password_file: {e.strerror or e}: {path}{permission_hint(e)}") from None
    if not password:
        raise ConfigError(f"admin.master_password_file: the file is empty: {path}")


def parse_config(data: dict[str, Any], path: Path | None = None,
                 plugin_sections: frozenset[str] = frozenset()) -> Config:
    """Validate a parsed TOML document. ``plugin_sections``: extra top-level tables plugins own."""
    known = list(SCHEMA) + sorted(TOP_LEVEL) + sorted(plugin_sections)
    for key in data:
        if key not in known:
            raise unknown_key(key, known, "")
    sections = {name: _validate_section(name, data.get(name, {})) for name in SCHEMA}
    plugins = data.get("plugins")
    if plugins is not None and (not isinstance(plugins, list) or _str_list(plugins)):
        raise ConfigError("plugins: must be an array of plugin names")
    plugin_tables = _plugin_tables(data.get("plugin", {}))
    extra = {k: data[k] for k in plugin_sections if k in data}
    for name, table in extra.items():
        if not isinstance(table, dict):  # (before the plugin reads it)
            raise ConfigError(f"{name}: expected a table ([{name}]), got {_toml_type(type(table))}")
    if not sections["proxy"]["listen"]:
        raise ConfigError("proxy.listen: at least one endpoint is needed")
    if bool(sections["proxy"]["tls_cert"]) != bool(sections["proxy"]["tls_key"]):
        raise ConfigError("proxy.tls_cert and proxy.tls_key go together")
    limits = sections["limits"]
    if limits["auth_failure_delay_max"] < limits["auth_failure_delay"]:
        raise ConfigError(f"limits.auth_failure_delay_max: must be >= limits.auth_failure_delay "
                          f"({limits['auth_failure_delay']})")
    base = path.parent if path else Path.cwd()
    for sec, key in (("proxy", "tls_cert"), ("proxy", "tls_key"), ("backend", "ca_file"),
                     ("admin", "master_password_file")):
        value = sections[sec][key]
        if value:
            p = _resolve(base, value)
            if not p.is_file():
                raise ConfigError(f"{sec}.{key}: {'not a regular file' if p.exists() else 'no such file'}: {p}")
            sections[sec][key] = str(p)
    if sections["admin"]["master_password_file"]:
        # (Read at each use, for rotation without a reload: unreadable, --check passed and every offline
        # watch and `cpmproxy localdelete` failed later, the reason only in the log or a traceback's words.)
        _master_password_readable(sections["admin"]["master_password_file"])
    sections["proxy"]["listen"] = [_listener_files(base, d) if isinstance(d, str) else d
                                   for d in sections["proxy"]["listen"]]
    # (The metrics listener's ssl: files too: --check in the config's directory passed, the service in /
    # could not start.)
    sections["metrics"]["listen"] = _listener_files(base, sections["metrics"]["listen"])
    for name, key in PLUGIN_FILES:
        value = plugin_tables.get(name, {}).get(key)
        if isinstance(value, str) and value:  # (the plugin checks the type, and opens the file)
            plugin_tables[name][key] = str(_resolve(base, value))
    for key in ("ca_file", "server_name"):  # (only TLS reads them: set without it, the operator believes them in force)
        if sections["backend"]["tls"] == "none" and sections["backend"][key]:
            raise ConfigError(f"backend.{key} is set but backend.tls is 'none'")
    # (The one cross-table rule of a plugin, checked here: a plugin sees only its own table.)
    if _push_needs_master(plugin_tables.get("push", {}), sections["admin"]):
        raise ConfigError("plugin.push: pushes for users with no device connected need the [admin] master "
                          "user (master_user, master_password_file); set plugin.push.offline_watch = 0 to push "
                          "only while one of the user's devices is connected")
    return Config(plugins=plugins, plugin=plugin_tables, extra=extra, path=path, **sections)


def load_config(path: str | Path, plugin_sections: frozenset[str] = frozenset()) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as f:
            # (A byte-order mark, as some Windows editors save UTF-8, has no meaning: TOML's parser refused it
            # with "Invalid statement (at line 1, column 1)".)
            text = f.read().decode("utf-8").removeprefix("\ufeff")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except OSError as e:  # a directory, no permission...
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}{permission_hint(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: {e}{_toml_hint(str(e), text)}") from None
    return parse_config(data, p, plugin_sections)


_UNQUOTED = ("Invalid value", "Expected newline or end of document after a statement")


def _toml_hint(error: str, text: str) -> str:
    """The line TOML's parser stopped at, and for the usual mistake, a value written without its quotes
    (``host = 127.0.0.1`` reads "Invalid value" or "Expected newline..."), what to write instead."""
    m = re.search(r"at line (\d+), column \d+", error)
    lines = text.splitlines()
    if m is None or not 0 < int(m.group(1)) <= len(lines):
        return ""
    line = lines[int(m.group(1)) - 1].strip()
    hint = f": {line[:200]!r}"
    key, eq, value = (part.strip() for part in line.partition("="))
    if not (eq and value and error.startswith(_UNQUOTED)) or value[0] in "\"'{":
        return hint
    if value[0] == "[":
        if "\"" in value or "'" in value or not value.endswith("]"):
            return hint
        quoted = "[" + ", ".join(f'"{v.strip()}"' for v in value[1:-1].split(",") if v.strip()) + "]"
    else:
        quoted = f'"{value}"'
    return hint + f" (text is written in double quotes: {key} = {quoted})"
