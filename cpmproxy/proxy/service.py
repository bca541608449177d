"""The proxy as a Twisted service: listeners, plugins, limits, metrics, reload and shutdown."""

from __future__ import annotations

import errno
import gc
import importlib
import ipaddress
import os
import re
import socket
import time
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint, _WrapperServerEndpoint, serverFromString
from twisted.internet.endpoints import _parse as _parse_endpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from cpmproxy import __version__
from cpmproxy.config import Config, ConfigError, load_config, permission_hint
from cpmproxy.proxy.backend import backend_address, backend_tls_options, connect_backend
from cpmproxy.proxy.hooks import Plugin, overrides
from cpmproxy.proxy.metrics import Metrics
from cpmproxy.proxy.proxyheader import HeaderFirstEndpoint
from cpmproxy.proxy.session import ClientSession
from cpmproxy.tlstrust import certificate_chain, openssl_reason, server_certificate, server_tls_options

if TYPE_CHECKING:
    pass

log = Logger(namespace="cpmproxy")

ENTRY_POINT_GROUP = "cpmproxy.plugins"
_HOOKS = ("capabilities", "login", "command", "response", "tagged", "selected", "closed")


@dataclass
class HookTable:
    """For each hook, the enabled plugins that implement it, in configured order; login hooks in dependency
    order (a plugin's after those of the plugins it ``requires``: they set up the state it reads), command
    hooks the other way round (a plugin sees a command before the plugins it builds on: local delete must
    take its STORE and EXPUNGE before the view renumbers or carries them out)."""
    plugins: list[Plugin] = field(default_factory=list)
    capabilities: list[Plugin] = field(default_factory=list)
    login: list[Plugin] = field(default_factory=list)
    command: list[Plugin] = field(default_factory=list)
    response: list[Plugin] = field(default_factory=list)
    tagged: list[Plugin] = field(default_factory=list)
    selected: list[Plugin] = field(default_factory=list)
    closed: list[Plugin] = field(default_factory=list)
    response_continuations: list[Plugin] = field(default_factory=list)
    by_name: dict[str, Plugin] = field(default_factory=dict)
    # ``response`` hooks by response name, for the first segment and for the later ones (filled as names
    # are met): a plugin with ``response_names`` is not called for the others.
    _first_by_name: dict[bytes, list[Plugin]] = field(default_factory=dict)
    _later_by_name: dict[bytes, list[Plugin]] = field(default_factory=dict)

    @classmethod
    def build(cls, plugins: list[Plugin]) -> HookTable:
        table = cls(plugins=list(plugins))
        for hook in _HOOKS:
            setattr(table, hook, [p for p in plugins if overrides(p, hook)])
        table.response_continuations = [p for p in table.response if p.response_continuations]
        table.login = _dependencies_first(table.login)
        table.command = _dependencies_first(table.command[::-1])[::-1]
        table.by_name = {p.name: p for p in plugins}
        return table

    def response_for(self, name: bytes, first: bool) -> list[Plugin]:
        """The ``response`` hooks to call for a segment of a response called ``name`` (b"FETCH", b"OK")."""
        cache = self._first_by_name if first else self._later_by_name
        hooks = cache.get(name)
        if hooks is None:
            hooks = [p for p in (self.response if first else self.response_continuations)
                     if p.response_names is None or name in p.response_names]
            if len(cache) < 256:  # (names come from the backend: a bounded cache)
                cache[name] = hooks
        return hooks


def _dependencies_first(plugins: list[Plugin]) -> list[Plugin]:
    """``plugins`` reordered so that each comes after the ones it requires (otherwise as given)."""
    by_name = {p.name: p for p in plugins}
    ordered: list[Plugin] = []

    def place(plugin: Plugin, path: tuple[str, ...]) -> None:
        if plugin in ordered or plugin.name in path:  # (a cycle cannot be ordered: broken where met)
            return
        for name in getattr(plugin, "requires", ()):
            if name in by_name:
                place(by_name[name], path + (plugin.name,))
        ordered.append(plugin)

    for plugin in plugins:
        place(plugin, ())
    return ordered


def section_owners() -> dict[str, str]:
    """The top-level config sections installed plugins own (``policy``), with the plugin owning each."""
    owners = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception:
            continue
        if getattr(cls, "config_section", None):
            owners[cls.config_section] = ep.name
    return owners


def plugin_sections() -> frozenset[str]:
    return frozenset(section_owners())


def load_plugins(config: Config, proxy, live: dict[str, Plugin] | None = None) -> list[Plugin]:
    """The plugins ``config`` enables, configured. ``live``: the running ones by name (a reload), kept
    and configured again where the same class stays enabled, so that what they hold for sessions already
    open (watch connections, known devices) carries over; validate the config first (``proxy=None``)."""
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    names = config.plugins if config.plugins is not None else sorted(eps)
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:  # (two instances of a plugin answer a command twice: every SELECT hung)
        raise ConfigError(f"plugins: {twice!r} is listed twice")
    classes = {name: _plugin_class(name, eps) for name in names}
    _check_plugin_settings(config, classes)
    plugins = []
    made = []  # (instances of this call's making: stopped if it fails, nothing else would stop them)
    try:
        for name, cls in classes.items():
            kept = (live or {}).get(name)
            plugin = kept if type(kept) is cls else cls(proxy)
            if plugin is not kept:
                made.append(plugin)
            plugin.name = name
            section = cls.config_section
            plugin.configure(config.extra.get(section, {}) if section else config.plugin.get(name, {}))
            plugins.append(plugin)
        enabled = {p.name for p in plugins}
        for plugin in plugins:
            missing = [r for r in getattr(plugin, "requires", ()) if r not in enabled]
            if missing:
                raise ConfigError(f"plugins: {plugin.name!r} needs {', '.join(map(repr, missing))} enabled too")
    except BaseException:
        if proxy is not None:  # (a check's instances, made without a proxy, start nothing)
            for plugin in made:
                _stop_plugin(plugin)
        raise
    return plugins


def _stop_plugin(plugin: Plugin) -> None:
    try:
        plugin.stop()
    except Exception:
        log.failure("plugin {name} failed to stop", name=plugin.name)


def _plugin_class(name: str, eps: dict) -> type[Plugin]:
    # "package.module:Class" loads a plugin that is not installed as an entry point (development).
    if name not in eps and ":" not in name:
        raise ConfigError(f"plugins: unknown plugin {name!r} (installed: {', '.join(sorted(eps)) or 'none'})")
    try:
        if name in eps:
            return eps[name].load()
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise ConfigError(f"plugins: cannot load {name!r}: {e}") from None


def _check_plugin_settings(config: Config, classes: dict[str, type[Plugin]]) -> None:
    """Settings for a plugin that is not enabled, or in a table it does not read, are errors (not silently
    left unused: the operator believes them in force)."""
    same = next(((a, b) for a in classes for b in classes if a < b and classes[a] is classes[b]), None)
    if same:
        raise ConfigError(f"plugins: {same[0]!r} and {same[1]!r} are the same plugin")
    for name in config.plugin:
        if name not in classes:
            raise ConfigError(f"plugin.{name}: settings for a plugin that is not enabled")
        if classes[name].config_section:
            raise ConfigError(f"plugin.{name}: the {name} plugin's settings go in [{classes[name].config_section}]")
    read = {cls.config_section for cls in classes.values()}
    for section in config.extra:
        if section not in read:
            owner = section_owners().get(section, section)
            raise ConfigError(f"{section}: settings for the {owner!r} plugin, which is not enabled")


def check_config(path: str, adopt_sockets: bool = False) -> Config:
    """Load and validate a config, plugins included; raises ConfigError. ``systemd:`` endpoints are checked
    for their syntax only, unless ``adopt_sockets`` (starting for real): then the sockets systemd passed must
    be there (``--check`` in ExecStartPre runs without them)."""
    config = load_config(path, plugin_sections())
    load_plugins(config, None)
    _server_tls(config)
    if config.backend["tls"] != "none":
        backend_tls_options(config)
    _check_listeners(config, adopt_sockets)
    return config


def config_warnings(config: Config) -> list[str]:
    """What a valid configuration does that its operator likely does not want (said by ``--check`` and at
    start): a TCP listener other hosts reach where none of them can log in (no STARTTLS to offer, plaintext
    only from loopback: they get LOGINDISABLED, and the log says only that they went away); a metrics
    listener on every interface (its counters and /healthz to anyone who reaches the port: maybe wanted
    behind a firewall, so said, not refused)."""
    return _login_warnings(config) + _metrics_warnings(config)


def _login_warnings(config: Config) -> list[str]:
    proxy = config.proxy
    if proxy["tls_cert"] or proxy["plaintext_auth"] != "loopback":
        return []
    out = []
    for i, desc in enumerate(proxy["listen"]):
        interface = _listen_interface(desc, ("tcp", "tcp6"))
        if interface is None:
            continue
        try:
            ip = ipaddress.ip_address(interface) if interface else None
            if ip is not None and (getattr(ip, "ipv4_mapped", None) or ip).is_loopback \
                    and not desc.startswith("haproxy:"):
                continue  # (behind haproxy:, the client's own address counts)
        except ValueError:
            continue
        out.append(f"proxy.listen[{i}]: clients on other hosts cannot log in on {desc!r}: no STARTTLS to offer "
                   f"(proxy.tls_cert is empty) and plaintext_auth = \"loopback\"; set tls_cert and tls_key, "
                   f"listen with ssl:, or (TLS ended at a balancer) plaintext_auth = \"always\"")
    return out


def _metrics_warnings(config: Config) -> list[str]:
    desc = config.metrics["listen"]
    interface = _listen_interface(desc, ("tcp", "tcp6", "ssl")) if desc else None
    if interface is None:
        return []
    try:
        if interface and not ipaddress.ip_address(interface).is_unspecified:
            return []  # (an address chosen, loopback or a management network's: meant)
    except ValueError:
        return []
    fix = "interface=\\:\\:1" if desc.startswith("tcp6:") else "interface=127.0.0.1"
    return [f"metrics.listen: {desc!r} serves /metrics and /healthz on every interface, to anyone who reaches "
            f"the port; add {fix} (e.g. \"tcp:9143:interface=127.0.0.1\"), unless a firewall keeps others out"]


def _listen_interface(desc: str, kinds: tuple[str, ...]) -> str | None:
    """The address an endpoint of one of ``kinds`` (or ``systemd:``) listens on, ``""`` for every interface;
    None for other endpoints, an endpoint that cannot be read, or a systemd: socket not passed (--check
    has none: ListenStream=143, the shipped socket unit's, is every interface)."""
    try:
        found = _endpoint_params(desc)
        systemd = _systemd_params(desc)
    except ConfigError:
        return None
    if systemd is not None:
        return _passed_address(systemd)
    if found is None or found[0] not in kinds:
        return None
    return found[1].get("interface", "")


def _check_listeners(config: Config, adopt_sockets: bool) -> None:
    """Every listener can be made, and no two listen on the same address (the second could not start)."""
    keyed = [(f"proxy.listen[{i}]", desc) for i, desc in enumerate(config.proxy["listen"])]
    if config.metrics["listen"]:
        keyed.append(("metrics.listen", config.metrics["listen"]))
    taken: dict[str, tuple] = {}
    for key, desc in keyed:
        address = _check_endpoint(desc, adopt_sockets, key)
        if address is None:
            continue
        clash = next((k for k, other in taken.items() if _same_address(address, other)), None)
        if clash:
            raise ConfigError(f"{key}: {desc!r} listens on the same address as {clash}")
        taken[key] = address
    if adopt_sockets and not any(_systemd_params(desc) is not None for _, desc in keyed):
        _check_none_inherited()


def _check_none_inherited() -> None:
    """Raise ConfigError if systemd passed sockets and no listener takes them (cpmproxy.socket enabled, the
    configuration listening elsewhere): their clients would wait for a greeting forever, nothing logged."""
    from twisted.internet import endpoints

    fds = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    count = len(fds.inheritedDescriptors()) if fds is not None else 0
    if count:
        names = ", ".join(sorted(set(fds.inheritedNamedDescriptors())))
        raise ConfigError(f"proxy.listen: systemd passed {count} socket(s) ({names}) and no listener takes them: "
                          f"listen on \"systemd:domain=INET6:index=0\" (cpmproxy.socket's ListenStream), or "
                          f"disable the socket unit")


def _check_endpoint(desc: str, adopt_sockets: bool = True, key: str | None = None) -> tuple | None:
    """Raise ConfigError, starting with ``key`` (the setting), unless the endpoint ``desc`` can be made;
    returns the address it listens on where the string says (``_listen_address``)."""
    from twisted.internet import reactor
    with _named(key):
        params = _systemd_params(desc)
        if params is None or adopt_sockets:
            server_endpoint(reactor, desc, params)
        return _listen_address(desc)


def server_endpoint(reactor, desc: str, params: dict[str, str] | None = None, key: str | None = None):
    """The server endpoint ``desc`` describes; raises ConfigError with the reason, in words. (Twisted's own
    errors are its internals: "invalid literal for int()", "list index out of range" for a ``systemd:``
    endpoint whose socket was not passed; and it takes a port or interface that cannot be bound.)"""
    with _named(key):
        params = _systemd_params(desc) if params is None else params
        if params is not None:
            _check_inherited(desc, params)
        else:
            _check_params(desc)
        try:
            endpoint = serverFromString(reactor, desc)
            if (tls := _ssl_endpoint(endpoint)) is not None:
                _send_chain(desc, tls._sslContextFactory)
                # (Twisted reads some files, dhParameters, only when the first client connects.)
                tls._sslContextFactory.getContext()
            return endpoint
        except Exception as e:
            raise ConfigError(f"invalid endpoint {desc!r}: {_endpoint_error(e)}") from None


@contextmanager
def _named(key: str | None):
    """ConfigErrors raised inside start with ``key``, the setting that gave the endpoint."""
    try:
        yield
    except ConfigError as e:
        if key is None:
            raise
        raise ConfigError(f"{key}: {e}") from None


# The endpoint types checked here before Twisted builds them, with their parameters in Twisted's order
# (positional ones fill them in that order).
_ENDPOINT_PARAMS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
            "dhParameters"),
    "unix": ("address", "mode", "backlog", "lockfile"),
}
# An IPv6 interface with unescaped colons (Twisted's separator): "interface=::1", "interface=2001:db8::1".
_UNESCAPED_IPV6 = re.compile(r"(?:^|:)interface=(?:[0-9A-Fa-f]*:){2}")
_IPV6_HINT = ("escape the colons of an IPv6 address with a backslash, e.g. interface=\\:\\:1 "
              "(in a TOML basic string: \"interface=\\\\:\\\\:1\")")


def _endpoint_params(desc: str) -> tuple[str, dict[str, str]] | None:
    """The type and parameters by name of a tcp:, tcp6:, ssl: or unix: endpoint (also behind ``haproxy:``),
    as Twisted's parser reads them; None for other types. Raises ConfigError for parameters it would refuse
    with a Python error ("got multiple values for argument 'interface'")."""
    if _UNESCAPED_IPV6.search(desc):
        raise ConfigError(f"invalid endpoint {desc!r}: {_IPV6_HINT}")
    try:
        args, kwargs = _parse_endpoint(desc)  # (private: the parser serverFromString uses)
    except Exception:  # (a trailing backslash: "generator raised StopIteration")
        raise ConfigError(f"invalid endpoint {desc!r}: cannot be read (a ':' or '\\' out of place?)") from None
    proxied = False
    while len(args) > 1 and args[0] == "haproxy":
        if proxied:
            raise ConfigError(f"invalid endpoint {desc!r}: one haproxy: is enough (a connection has one PROXY header)")
        args, proxied = args[1:], True
    kind, values = args[0], args[1:]
    if proxied and kind == "ssl":
        # (Twisted reads the PROXY header inside TLS; every load balancer sends it before TLS.)
        raise ConfigError(f"invalid endpoint {desc!r}: haproxy:ssl: expects the PROXY header inside TLS, which "
                          f"no load balancer sends; terminate TLS at the balancer (haproxy:tcp:), or listen "
                          f"with ssl: without the PROXY protocol")
    names = _ENDPOINT_PARAMS.get(kind)
    if names is None:
        return None
    takes = f"{kind}: takes {', '.join(names)}"
    if len(values) > len(names):
        raise ConfigError(f"invalid endpoint {desc!r}: too many ':'-separated values ({takes})")
    params = dict(zip(names, values, strict=False))
    for name, value in kwargs.items():
        if name not in names or name in params:
            raise ConfigError(f"invalid endpoint {desc!r}: {'repeated' if name in params else 'unknown'} "
                              f"parameter {name!r} ({takes})")
        params[name] = value
    return kind, params


def _send_chain(desc: str, options) -> None:
    """An ``ssl:`` listener whose ``certKey`` file holds the chain after the certificate (a "full chain"
    file) sends that chain too: Twisted reads only the file's first certificate (the chain only from its
    own ``extraCertChain``), and clients that have only the root could not verify the proxy."""
    found = _endpoint_params(desc)
    if found is None or found[0] != "ssl" or "extraCertChain" in found[1]:
        return
    params = found[1]
    chain = certificate_chain(params.get("certKey", params.get("privateKey", "server.pem")), "certKey")
    if chain:
        options.extraCertChain = [c.original for c in chain]


def _check_params(desc: str) -> None:
    """Raise ConfigError, in words, for parameters of a tcp:, tcp6:, ssl: or unix: endpoint that Twisted
    would refuse with a Python error, or take and then fail to listen with (a port out of range, an
    interface that is no address, a socket in a directory that does not exist)."""
    found = _endpoint_params(desc)
    if found is None:
        return
    kind, params = found
    if (why := _param_problem(kind, params)) is not None:
        raise ConfigError(f"invalid endpoint {desc!r}: {why}")
    if kind == "ssl":  # (read here, so that what is wrong is said as for proxy.tls_cert)
        key = params.get("privateKey", "server.pem")
        with _named(f"invalid endpoint {desc!r}"):
            server_certificate(params.get("certKey", key), key, "certKey" if "certKey" in params else "privateKey",
                               "privateKey")


def _param_problem(kind: str, params: dict[str, str]) -> str | None:
    problem = _unix_problem(params) if kind == "unix" else _port_problem(kind, params)
    if problem is None and kind == "ssl" and "privateKey" not in params:
        # (Twisted's default, server.pem in the working directory, said "No such file or directory: server.pem":
        # a file nobody named, looked for in the service's "/", not the config file's directory.)
        problem = ("no privateKey=FILE (the key, with the certificate unless certKey=FILE names it; relative to "
                   "the config file's directory)")
    backlog = params.get("backlog", "50")
    if problem is None and not (_is_number(backlog) and int(backlog) > 0):
        problem = f"backlog must be a number > 0, not {backlog!r}"
    return problem


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _port_problem(kind: str, params: dict[str, str]) -> str | None:
    port = params.get("port")
    if port is None:
        return f"no port ({kind}:PORT)"
    if not _is_number(port) or int(port) > 65535:
        return f"the port must be a number from 0 to 65535, not {port!r}"
    interface = params.get("interface", "")
    try:
        if interface:  # (a name would be looked up when listening: "Name or service not known")
            ipaddress.ip_address(interface)
    except ValueError:
        return f"interface must be an IP address, not {interface!r}"
    return None


def _unix_problem(params: dict[str, str]) -> str | None:
    address = params.get("address", "")
    if not address:
        return "no socket path (unix:PATH)"
    directory = os.path.dirname(address) or "."
    if not os.path.isdir(directory):
        return f"no such directory: {directory}"
    mode = params.get("mode", "666")
    if not (mode and set(mode) <= set("01234567")):
        return f"mode must be octal, e.g. 660, not {mode!r}"
    if params.get("lockfile", "1") not in ("0", "1"):
        return f"lockfile must be 0 or 1, not {params['lockfile']!r}"
    return None


def _endpoint_error(e: Exception) -> str:
    """What Twisted's parser raised, in words."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}{permission_hint(e)}" if e.filename else e.strerror
    if isinstance(e, (crypto.Error, SSL.Error)):
        return openssl_reason(e)
    text = str(e)
    if text.startswith("Unknown endpoint type"):
        return f"{text[0].lower()}{text[1:]} (tcp:, ssl:, unix:, systemd:, haproxy:...)"
    return text or type(e).__name__


def _listen_address(desc: str) -> tuple | None:
    """Where a tcp:, tcp6:, ssl: or unix: endpoint listens: ``("tcp", port, address)`` (an unspecified
    address for every interface), ``("unix", path)``; None where the string does not say (``systemd:``,
    port 0)."""
    found = _endpoint_params(desc)
    if found is None:
        return None
    kind, params = found
    if kind == "unix":
        return ("unix", os.path.abspath(params["address"]))
    if int(params["port"]) == 0:
        return None
    return ("tcp", int(params["port"]), ipaddress.ip_address(params.get("interface") or
                                                            ("::" if kind == "tcp6" else "0.0.0.0")))


def _same_address(a: tuple, b: tuple) -> bool:
    """Would listening on both fail? (An unspecified address takes the port on every address of its family,
    and ``::`` on IPv4 ones too: Linux's dual-stack sockets.)"""
    if a[0] != b[0] or a[1] != b[1]:
        return False
    if a[0] == "unix":
        return True
    ip_a, ip_b = a[2], b[2]

    def covers(wild, ip) -> bool:
        return wild.is_unspecified and (wild.version == 6 or ip.version == 4)

    return ip_a == ip_b or covers(ip_a, ip_b) or covers(ip_b, ip_a)


_SYSTEMD_PARAMS = ("domain", "index", "name")


def _systemd_params(desc: str) -> dict[str, str] | None:
    """The parameters of a ``systemd:`` endpoint (also behind ``haproxy:``), checked as Twisted's parser
    takes them, without the sockets; None for any other endpoint."""
    inner = desc
    while inner.startswith("haproxy:"):
        inner = inner[len("haproxy:"):]
    if not inner.startswith("systemd:"):
        return None
    args, params = [], {}
    for part in inner.split(":")[1:]:
        key, eq, value = part.partition("=")
        if not eq:
            args.append(part)
        elif key not in _SYSTEMD_PARAMS or key in params:
            raise ConfigError(f"invalid endpoint {desc!r}: {'repeated' if key in params else 'unknown'} "
                              f"parameter {key!r} (systemd: takes domain, and index or name)")
        else:
            params[key] = value
    if len(args) > len(_SYSTEMD_PARAMS) or any(k in params for k in _SYSTEMD_PARAMS[:len(args)]):
        raise ConfigError(f"invalid endpoint {desc!r}: systemd: takes domain, and index or name")
    params.update(zip(_SYSTEMD_PARAMS[:len(args)], args, strict=True))
    domain = params.get("domain")
    if not domain or not domain.isalnum() or not hasattr(socket, "AF_" + domain):
        raise ConfigError(f"invalid endpoint {desc!r}: domain must name an address family (INET, INET6, UNIX)")
    if ("index" in params) == ("name" in params):
        raise ConfigError(f"invalid endpoint {desc!r}: give exactly one of index or name")
    if "index" in params and not params["index"].isdecimal():
        raise ConfigError(f"invalid endpoint {desc!r}: index must be a number >= 0")
    if "name" in params and not params["name"]:
        raise ConfigError(f"invalid endpoint {desc!r}: name is empty")
    return params


def _check_inherited(desc: str, params: dict[str, str]) -> None:
    """Raise ConfigError unless systemd passed the socket a ``systemd:`` endpoint names."""
    # Twisted reads LISTEN_FDS / LISTEN_FDNAMES once, when its endpoints module is imported (and removes
    # them from the environment): ask its parser what it found (private; a Twisted without it judges alone).
    from twisted.internet import endpoints

    fds = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if fds is None:
        return
    if "index" in params:
        passed = fds.inheritedDescriptors()
        if int(params["index"]) < len(passed):
            return _check_family(desc, params, passed[int(params["index"])])
        why = f"index {params['index']}; " + (f"{len(passed)} passed" if passed else _NONE_PASSED)
    else:
        names = fds.inheritedNamedDescriptors()
        if params["name"] in names:
            return _check_family(desc, params, names[params["name"]])
        why = f"name {params['name']!r}; " + (f"passed: {', '.join(names)}" if names else _NONE_PASSED)
    raise ConfigError(f"listen endpoint {desc}: no socket passed by systemd ({why})")


def _passed_address(params: dict[str, str]) -> str | None:
    """The IP address the socket systemd passed for a ``systemd:`` endpoint is bound to (``""``: every
    interface); None where no such socket was passed, or it is no IP socket."""
    from twisted.internet import endpoints

    fds = getattr(getattr(endpoints, "_SystemdParser", None), "_sddaemon", None)
    if fds is None:
        return None
    if "index" in params:
        passed = fds.inheritedDescriptors()
        fd = passed[int(params["index"])] if int(params["index"]) < len(passed) else None
    else:
        fd = fds.inheritedNamedDescriptors().get(params["name"])
    if fd is None:
        return None
    with socket.socket(fileno=os.dup(fd)) as sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        host = sock.getsockname()[0]
    return "" if ipaddress.ip_address(host).is_unspecified else host


# (Twisted takes sockets only with both variables, as systemd sets them: systemd-socket-activate without
# --fdname sets no LISTEN_FDNAMES, and nothing is passed.)
_NONE_PASSED = "none passed: LISTEN_FDS and LISTEN_FDNAMES are both needed"


_DOMAINS = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def _check_family(desc: str, params: dict[str, str], fd: int) -> None:
    """Twisted takes the socket as ``domain`` says, unchecked: an IPv6 socket (systemd's ``ListenStream=143``)
    adopted as INET gives every client a garbled address (and loopback clients no plaintext login)."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        family = sock.family
    want = _DOMAINS.get(params.get("domain", ""))
    if want is not None and family != want:
        have = next((name for name, value in _DOMAINS.items() if value == family), str(family))
        raise ConfigError(f"listen endpoint {desc}: systemd passed an {have} socket; use domain={have}")


@implementer(IOpenSSLServerConnectionCreator)
class ListenerTLS:
    """The TLS settings of an ``ssl:`` listener, replaced on reload: a renewed certificate is offered to new
    connections without a restart (sessions already open keep theirs)."""

    def __init__(self, options) -> None:
        self.options = options  # Twisted's CertificateOptions, as it reads the endpoint string

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.options.getContext(), None)


def _ssl_endpoint(endpoint) -> SSL4ServerEndpoint | None:
    """The ``ssl:`` endpoint ``endpoint`` is or wraps (``haproxy:ssl:``), else None."""
    while isinstance(endpoint, (_WrapperServerEndpoint, HeaderFirstEndpoint)):
        endpoint = endpoint._wrappedEndpoint
    return endpoint if isinstance(endpoint, SSL4ServerEndpoint) else None


def _listener_tls_options(reactor, listen: list[str], only) -> dict[str, object]:
    """The TLS settings of the ``ssl:`` listeners of ``listen`` that are in ``only``, read afresh
    (ConfigError as at start)."""
    found = {}
    for i, desc in enumerate(listen):
        if desc not in only:
            continue
        endpoint = _ssl_endpoint(server_endpoint(reactor, desc, key=f"proxy.listen[{i}]"))
        if endpoint is not None:
            found[desc] = endpoint._sslContextFactory
    return found


def _server_tls(config: Config):
    cert, key = config.proxy["tls_cert"], config.proxy["tls_key"]
    if not cert:
        return None
    return server_tls_options(cert, key)


class SidePool:
    """The user's shared side connection in this process (see ClientSession.side_command)."""

    def __init__(self) -> None:
        self.proto = None  # None, a Deferred while connecting, or the BackendProtocol
        self.connecting_to: tuple | None = None  # while connecting: where (``backend_address``)
        self.waiting: list[defer.Deferred] = []
        self.sessions: set = set()
        # Sequences that EXAMINE a mailbox on the side connection hold this, so that another
        # coroutine's EXAMINE cannot slip in between their commands.
        self.lock = defer.DeferredLock()
        self.close_call = None  # pending close after the last session left

    def close(self) -> None:
        proto, self.proto = self.proto, None
        # (One still connecting serves those waiting for it, then closes: see ClientSession.side_command.)
        if proto is not None and not isinstance(proto, defer.Deferred):
            proto.close()


AUTH_FAILURES_KEPT = 100_000  # hosts whose recent failed logins are remembered (bounded under attack)


def _printable(text: str) -> str:
    """``text`` (which may quote what the backend sent) with control characters shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def throttle_key(host: str) -> str:
    """Whose connections and failed logins count together: an IPv4 address, or an IPv6 address's /64,
    which one device or one customer gets (a mobile network gives each PDN connection its own /64, as a
    NAT gives a household one IPv4 address), and from which an attacker could otherwise pick a fresh
    address for every try."""
    if ":" not in host:
        return host  # (IPv4, the common case: no parsing)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # (a UNIX socket's peer, or a name)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


HEALTH_CACHE = 5.0  # seconds a backend probe's answer serves /healthz
# /healthz is 503 while this many client logins in a row, of two users or more, failed for the backend's
# sake (not the client's credentials), the last within HEALTH_LOGINS_WINDOW seconds: a backend that greets
# but cannot log anyone in (its auth process hung, its password database down) is no backend to send
# clients to. (One user's failures alone, a mailbox the backend cannot open, say nothing of the others'.)
HEALTH_LOGINS_FAILING = 3
HEALTH_LOGINS_WINDOW = 60.0

class EventBus:
    """In-process publish/subscribe between plugins (e.g. "mailbox changed for user U"): changes made
    through this process reach the user's other sessions at once, without waiting for the backend."""

    def __init__(self) -> None:
        self._subs: dict[str, list] = defaultdict(list)

    def subscribe(self, topic: str, callback) -> None:
        if callback not in self._subs[topic]:
            self._subs[topic].append(callback)

    def unsubscribe(self, topic: str, callback) -> None:
        if callback in self._subs.get(topic, ()):
            self._subs[topic].remove(callback)

    def has_subscribers(self, topic: str) -> bool:
        """Whether anything listens on ``topic`` (an event that costs work to compute may be skipped)."""
        return bool(self._subs.get(topic))

    def publish(self, topic: str, event) -> None:
        for callback in list(self._subs.get(topic, ())):
            try:
                callback(event)
            except Exception:
                log.failure("event subscriber failed for {topic}", topic=topic)


class ProxyService(service.MultiService):
    version = __version__

    def __init__(self, config: Config, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.metrics = Metrics()
        self.events = EventBus()  # (before the plugins, which may subscribe as they are made)
        self.hooks = HookTable.build(load_plugins(config, self))
        self.server_tls = _server_tls(config)
        self.listener_tls: dict[str, ListenerTLS] = {}  # by endpoint string, for reload
        self.sessions: set[ClientSession] = set()
        self.by_ip: dict[str, int] = defaultdict(int)
        self.by_user: dict[str, set[ClientSession]] = defaultdict(set)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # see auth_failed
        self.ports = []
        self._stopping = False
        # Plugins a reload retired, waiting for the sessions it ended to go before their ``stop``; a stop
        # that comes first stops them with the running ones (the process exited without).
        self._retiring: list[Plugin] = []
        self._metrics_port = None  # (closed last at a stop: /healthz says 503 while sessions finish)
        self._side_pools: dict[str, SidePool] = {}
        self._shared: dict[tuple, tuple] = {}
        self._health: tuple | None = None  # (when, (status, text)) of the last backend probe
        self._health_probing = False
        self._health_waiting: list[defer.Deferred] = []
        # (backend failures of logins in a row, the last one's time, its reason, their users: two at most)
        self._logins_failing: tuple[int, float, str, frozenset] = (0, 0.0, "", frozenset())

    # -- listeners ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        backend = self.config.backend
        log.info("cpmproxy {version} starting ({reactor}): backend {host}:{port} (tls {tls}), plugins {plugins}",
                 version=__version__, reactor=type(self.reactor).__name__, host=backend["host"], port=backend["port"],
                 tls=backend["tls"], plugins=", ".join(p.name for p in self.hooks.plugins) or "none")

    @defer.inlineCallbacks
    def listen(self):
        """Start every configured listener; fires with the listening ports."""
        factory = Factory.forProtocol(lambda: ClientSession(self))
        factory.noisy = False
        for i, desc in enumerate(self.config.proxy["listen"]):
            endpoint = server_endpoint(self.reactor, desc)
            if isinstance(endpoint, _WrapperServerEndpoint) and desc.startswith("haproxy:"):
                # (The session begins once the PROXY header is read: see cpmproxy.proxy.proxyheader.)
                # (The limit as it is when a client connects: a reload may change it.)
                endpoint = HeaderFirstEndpoint(endpoint._wrappedEndpoint, self.reactor,
                                               lambda: self.config.limits["preauth_timeout"])
            if (tls := _ssl_endpoint(endpoint)) is not None:
                tls._sslContextFactory = self.listener_tls[desc] = ListenerTLS(tls._sslContextFactory)
            try:
                port = yield endpoint.listen(factory)
            except Exception as e:
                raise self._cannot_listen(f"proxy.listen[{i}]", desc, e) from None
            self.ports.append(port)
            log.info("listening on {desc} ({addr})", desc=desc, addr=port.getHost())
        if self.config.metrics["listen"]:
            _check_endpoint(self.config.metrics["listen"])
            try:
                port = yield self.metrics.listen(self.reactor, self.config.metrics["listen"], self.health)
            except Exception as e:
                raise self._cannot_listen("metrics.listen", self.config.metrics["listen"], e) from None
            self.ports.append(port)
            self._metrics_port = port
            log.info("metrics on {desc}", desc=self.config.metrics["listen"])
        freeze_startup_heap()
        return self.ports

    def _cannot_listen(self, key: str, desc: str, error: Exception) -> ConfigError:
        """Why a listener could not start, in one line naming the file, the setting and what to do (it was
        Twisted's "Couldn't listen on 127.0.0.1:143: [Errno 13] Permission denied.", which names neither)."""
        code = getattr(getattr(error, "socketError", error), "errno", None)
        reason = os.strerror(code) if code else (str(error) or type(error).__name__)
        address = _listen_address(desc)
        if code == errno.EADDRINUSE:
            hint = ("another process listens there: stop it or change the port (Dovecot on this host: move its "
                    "listener, see conf/dovecot/90-cpmproxy.conf)")
        elif code == errno.EACCES and address is not None and address[0] == "tcp" and address[1] < 1024:
            hint = ("a port below 1024 needs CAP_NET_BIND_SERVICE (the unit's commented AmbientCapabilities) "
                    "or socket activation (systemd/cpmproxy.socket)")
        elif code == errno.EACCES:
            hint = "the service's user may not create it there"
        elif code == errno.EADDRNOTAVAIL:
            hint = "the interface is no address of this host"
        else:
            hint = ""
        return ConfigError(f"{self.config.path}: {key}: cannot listen on {desc!r}: {reason}"
                           + (f"; {hint}" if hint else ""))

    # -- health -----------------------------------------------------------------------------------

    def login_outcome(self, user: str, backend_failed: bool, reason: str = "") -> None:
        """A client login of ``user`` ended: ``backend_failed`` if for the backend's sake (unavailable,
        timed out, cut off); otherwise the backend answered (the login succeeded, or the credentials were
        wrong)."""
        if backend_failed:
            count, _, _, users = self._logins_failing
            if len(users) < 2:
                users = users | {user}
            self._logins_failing = (count + 1, self.reactor.seconds(), reason, users)
        elif self._logins_failing[0]:
            self._logins_failing = (0, 0.0, "", frozenset())

    def health(self) -> defer.Deferred:
        """(HTTP status, text) for ``/healthz``: 503 while shutting down, while the backend does not greet
        (a connection of the proxy's own, as a login's: TCP, TLS, greeting, within connect_timeout), or
        while client logins keep failing for the backend's sake (``HEALTH_LOGINS_FAILING``). The backend's
        answer is kept ``HEALTH_CACHE`` seconds, and probes meanwhile share it: a balancer polling every
        second costs the backend one connection per few seconds."""
        if self._stopping:
            return defer.succeed((503, "stopping: the proxy is shutting down"))
        now = self.reactor.seconds()
        failing, last, reason, users = self._logins_failing
        if failing >= HEALTH_LOGINS_FAILING and len(users) >= 2 and now - last < HEALTH_LOGINS_WINDOW:
            return defer.succeed((503, f"backend logins failing: the last {failing} in a row, "
                                       f"{now - last:.0f} s ago the last ({reason})"))
        if self._health is not None and now - self._health[0] < HEALTH_CACHE:
            return defer.succeed(self._health[1])
        d: defer.Deferred = defer.Deferred()
        self._health_waiting.append(d)
        if not self._health_probing:
            self._health_probing = True
            probe = defer.Deferred.fromCoroutine(self._probe_backend())
            # (All of it within connect_timeout: a backend that greets and then hangs is not healthy.)
            probe.addTimeout(self.config.backend["connect_timeout"], self.reactor)
            probe.addErrback(lambda f: (503, "backend unavailable: " + (
                f"no greeting within {self.config.backend['connect_timeout']:g} s" if f.check(defer.TimeoutError)
                else f.getErrorMessage() or f.type.__name__)))
            probe.addCallback(self._probed)
        return d

    async def _probe_backend(self) -> tuple[int, str]:
        b = self.config.backend
        try:
            proto, _ = await connect_backend(self.reactor, self.config)
        except defer.CancelledError:
            raise  # (the probe's time is up: said as such by its timeout, not as an empty reason)
        except Exception as e:  # (BackendError, TLS errors...: all mean "not now")
            return 503, f"backend unavailable: {_printable(str(e))[:200]}"
        proto.close()
        return 200, f"ok: backend {b['host']}:{b['port']} answers"

    def _probed(self, result: tuple[int, str]) -> None:
        self._health = (self.reactor.seconds(), result)
        self._health_probing = False
        waiting, self._health_waiting = self._health_waiting, []
        for d in waiting:
            d.callback(result)

    # -- admission control ----------------------------------------------------------------------

    @staticmethod
    def is_loopback(host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host in ("", "localhost")  # UNIX sockets have no IP
        # (An IPv4 client of a dual-stack socket, e.g. systemd's ListenStream=143, is ::ffff:127.0.0.1.)
        return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback

    def admit(self, session: ClientSession) -> str | None:
        """Register a new connection, or say why it is refused."""
        limits = self.config.limits
        self.metrics.connections.inc()
        if self._stopping:
            return "Server shutting down."
        if len(self.sessions) >= limits["max_connections"]:
            self.metrics.refused.labels(reason="max_connections").inc()
            return "Too many connections."
        source = throttle_key(session.peer_host)  # (an IPv6 client's /64, as for failed logins)
        if self.by_ip.get(source, 0) >= limits["max_connections_per_ip"]:
            self.metrics.refused.labels(reason="per_ip").inc()
            return "Too many connections from your address."
        self.sessions.add(session)
        self.by_ip[source] += 1
        self.metrics.active.inc()
        return None

    def rehome(self, session: ClientSession, host: str) -> None:
        """The session's client address changed (PROXY protocol): move its per-IP count."""
        if session in self.sessions:
            self._drop_ip(session.peer_host)
            self.by_ip[throttle_key(host)] += 1

    def _drop_ip(self, host: str) -> None:
        source = throttle_key(host)
        self.by_ip[source] -= 1
        if self.by_ip[source] <= 0:
            del self.by_ip[source]

    def admit_user(self, session: ClientSession) -> str | None:
        users = self.by_user[session.user]
        if len(users) >= self.config.limits["max_connections_per_user"]:
            self.metrics.refused.labels(reason="per_user").inc()
            return "Too many connections for this user."
        users.add(session)
        return None

    def forget_user(self, session: ClientSession) -> None:
        users = self.by_user.get(session.user)
        if users is not None:
            users.discard(session)
            if not users:
                del self.by_user[session.user]

    def forget(self, session: ClientSession) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.metrics.active.dec()
        self._drop_ip(session.peer_host)
        if session.user is not None:
            self.forget_user(session)

    def shared(self, value: tuple) -> tuple:
        """One copy of equal immutable values held by many sessions (capability lists)."""
        return self._shared.setdefault(value, value)

    @property
    def stopping(self) -> bool:
        """Shutting down: what would linger (backend connections kept for returning devices) goes now."""
        return self._stopping

    def side_linger(self) -> float:
        """How long a user's side connection (and notification watch) outlives their last session here:
        devices reconnect often, and a new backend login costs more than an idle connection for a while."""
        return 0.0 if self._stopping else self.config.backend["side_linger"]

    def side_pool(self, session: ClientSession) -> SidePool:
        pool = self._side_pools.get(session.user)
        if session.phase == "closed":
            # Released already (connectionLost): not registered again, or the pool would never close.
            return pool if pool is not None else SidePool()
        if pool is None:
            pool = self._side_pools[session.user] = SidePool()
        if pool.close_call is not None and pool.close_call.active():
            pool.close_call.cancel()
        pool.close_call = None
        pool.sessions.add(session)
        return pool

    def release_side(self, session: ClientSession) -> None:
        pool = self._side_pools.get(session.user)
        if pool is None or session not in pool.sessions:
            return
        pool.sessions.discard(session)
        if not pool.sessions:
            def close(user=session.user, pool=pool):
                if self._side_pools.get(user) is pool and not pool.sessions:
                    del self._side_pools[user]
                    pool.close()
            pool.close_call = self.reactor.callLater(self.side_linger(), close)

    def _take_up_side(self, pool: SidePool) -> None:
        """After a reload, under the pool's lock (an EXAMINE-dependent sequence under way ends on the
        connection it began on): its connection goes on under the new ``command_timeout``, or, where the
        backend moved, is retired (closed once what was asked on it is answered) and the next command
        opens one to the new backend."""
        address, proto = backend_address(self.config), pool.proto
        if isinstance(proto, defer.Deferred):  # (connecting: to the backend of the config it began under)
            if pool.connecting_to != address:
                pool.proto, pool.waiting = None, []  # (those waiting are served by it, then it closes)
        elif proto is not None:
            if proto.address == address:
                proto.set_answer_timeout(self.config.backend["command_timeout"])
            else:
                pool.proto = None
                proto.close_when_idle()

    def sessions_of(self, user: str) -> set[ClientSession]:
        return set(self.by_user.get(user, ()))

    def auth_failed(self, host: str) -> float:
        """Record a failed login from ``host``; returns the delay before answering.

        Kept oldest failure first (``move_to_end``), so forgetting what is out of the window, or the
        oldest past ``AUTH_FAILURES_KEPT`` hosts under a distributed attack, is a few steps per failure
        (rebuilding the table cost ~10 ms per failure once it was full: a CPU stall an attacker could
        keep up with a few failures a second)."""
        limits = self.config.limits
        window = limits["auth_failure_window"]
        now = time.monotonic()
        key = throttle_key(host)
        failures = self._failures
        count, last = failures.get(key, (0, now))
        if now - last > window:
            count = 0
        count += 1
        failures[key] = (count, now)
        failures.move_to_end(key)
        cutoff = now - window
        while failures:
            _, (_, when) = next(iter(failures.items()))
            if when >= cutoff and len(failures) <= AUTH_FAILURES_KEPT:
                break
            failures.popitem(last=False)
        base = limits["auth_failure_delay"]
        return min(base * 2 ** (count - 1), limits["auth_failure_delay_max"]) if base else 0.0

    # -- reload and shutdown --------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config and the certificate files; sessions keep running; listeners are not
        changed (an ``ssl:`` one still listening takes up its files again). Once a stop began (SIGTERM,
        sessions draining) it is ignored: it would start plugins and side connections that the stop no
        longer ends, and end or reconfigure sessions the stop is draining."""
        path = self.config.path
        if self._stopping:
            log.warn("reload ignored: the proxy is shutting down")
            self.metrics.reloads.labels(result="ignored").inc()
            return
        try:
            new = load_config(path, plugin_sections())
            load_plugins(new, None)  # (every plugin's settings checked before a running one is touched)
            tls = _server_tls(new)
            listener_tls = _listener_tls_options(self.reactor, new.proxy["listen"], self.listener_tls)
            if new.backend["tls"] != "none":
                backend_tls_options(new)
        except ConfigError as e:
            # (A TOML syntax error names the file already; a bad setting names only its key.)
            text = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
            log.error("reload failed, keeping the old configuration: {error}", error=text)
            self.metrics.reloads.labels(result="failed").inc()
            return
        except Exception:  # (a check's own bug: the running configuration stays all the same)
            log.failure("reload failed, keeping the old configuration")
            self.metrics.reloads.labels(result="failed").inc()
            return
        try:
            plugins = load_plugins(new, self, live=self.hooks.by_name)
        except Exception:
            # Checked above: a plugin whose real instance cannot take its settings up (a file it reads
            # changed since) gets here. The instances made are stopped (load_plugins); the running ones
            # had their new settings, some of them: given the running configuration's again.
            log.failure("reload failed while applying the checked configuration, keeping the old one")
            self.metrics.reloads.labels(result="failed").inc()
            try:
                load_plugins(self.config, self, live=self.hooks.by_name)
            except Exception:
                log.failure("the running plugins could not take their settings up again; restart the proxy")
            return
        if new.proxy["listen"] != self.config.proxy["listen"] or new.metrics != self.config.metrics:
            log.warn("reload: listener changes need a restart; keeping the current listeners")
        if new.log != self.config.log:  # (logging is set up once, at start)
            log.warn("reload: [log] changes need a restart; keeping the current logging")
        # What was not taken up stays as it runs, so that the next reload compares with that (it warned
        # again about a change already warned of, and about going back to what runs).
        new.proxy["listen"], new.metrics, new.log = self.config.proxy["listen"], self.config.metrics, self.config.log
        old_config, self.config = self.config, new
        self.server_tls = tls
        for desc, options in listener_tls.items():
            self.listener_tls[desc].options = options
        old, self.hooks = self.hooks, HookTable.build(plugins)
        retired = [plugin for plugin in old.plugins if not any(plugin is p for p in plugins)]
        self._retiring += retired
        if [p.name for p in old.plugins] != [p.name for p in plugins]:
            # What a session shows (its view, its pending local deletes, its notifications) is its plugins'
            # state: with other plugins it would be wrong (message numbers, hidden messages, deletes on the
            # wrong message). Open sessions end, each once its commands under way are done, answered by
            # the plugins they began with (retired ones stop after that); clients reconnect under the new set.
            self._end_sessions(CONFIG_CHANGED, self.config.proxy["shutdown_grace"], old,
                               lambda: self._retire(retired))
        else:
            self._retire(retired)
        for s in self.sessions:
            s.reconfigure(new)
        if backend_address(new) != backend_address(old_config):
            b = new.backend
            log.info("reload: the backend is now {host}:{port} (tls {tls}): the users' side connections and "
                     "watches move to it; sessions already open stay on the backend they logged in to",
                     host=b["host"], port=b["port"], tls=b["tls"])
        for pool in self._side_pools.values():
            pool.lock.run(self._take_up_side, pool).addErrback(
                lambda f: log.failure("moving a side connection after a reload failed", f))
        for plugin in plugins:
            try:
                plugin.reloaded()
            except Exception:
                log.failure("plugin {name} failed to take up the reload", name=plugin.name)
        self.metrics.reloads.labels(result="ok").inc()
        log.info("configuration reloaded from {path}", path=str(path))

    def stopService(self):
        """Stop taking connections; every session completes the commands it has under way and gets its
        BYE between two responses (at once where nothing is under way), and the plugins finish what they
        queued (pushes), all within ``shutdown_grace``; then what is left is ended, the plugins stopped,
        and the metrics listener (``/healthz`` answers 503 meanwhile) closed."""
        self._stopping = True
        super().stopService()
        grace = self.config.proxy["shutdown_grace"]
        deadline = time.monotonic() + grace
        clients = [p for p in self.ports if p is not self._metrics_port]
        d = defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in clients])
        for s in list(self.sessions):
            s.shutdown(SHUTTING_DOWN)
        drains = []
        for plugin in [*self._retiring, *self.hooks.plugins]:
            try:
                drained = plugin.drain()
            except Exception:
                log.failure("plugin {name} failed to drain", name=plugin.name)
                continue
            if drained is not None:
                drains.append(drained)
        plugins_drained = defer.DeferredList(drains)

        def wait(_):
            waiter: defer.Deferred[None] = defer.Deferred()

            def draining():
                busy = [s for s in self.sessions if not s.drained()]
                if time.monotonic() < deadline and (busy or not plugins_drained.called):
                    self.reactor.callLater(0.05, draining)
                    return
                for s in busy:  # (grace is over: BYE where it can go, else the connection is closed)
                    s.bye(SHUTTING_DOWN)
                closing(time.monotonic() + 1.0)

            def closing(until):
                if self.sessions and time.monotonic() < until:
                    self.reactor.callLater(0.05, closing, until)
                    return
                for s in list(self.sessions):
                    s.transport.abortConnection()
                self._stop_plugins()
                ports, self.ports = self.ports, []
                defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports if p not in clients]) \
                    .addCallback(lambda _: waiter.callback(None))
            draining()
            return waiter
        return d.addCallback(wait)

    def _end_sessions(self, text: bytes, grace: float, hooks, then) -> None:
        """End every logged-in session as at a stop (``ClientSession.shutdown``, with the plugins' hook
        table they began with), without stopping; ``then()`` once each has."""
        # (A session in the middle of its login too: its login hooks are the old set's.)
        ending = [s for s in self.sessions if s.phase in ("auth", "login")]
        log.warn("reload: the plugins changed; ending the {n} logged-in sessions", n=len(ending))
        deadline = time.monotonic() + grace
        for s in ending:
            s.shutdown(text, hooks)

        def check():
            busy = [s for s in ending if not s.drained()]
            if busy and time.monotonic() < deadline:
                self.reactor.callLater(0.05, check)
                return
            for s in busy:
                s.bye(text)
            gone(time.monotonic() + 1.0)

        def gone(until):
            # (The retired plugins stop once the sessions are closed: their ``closed`` hooks come first.)
            if any(s.phase != "closed" for s in ending) and time.monotonic() < until:
                self.reactor.callLater(0.05, gone, until)
                return
            then()
        check()

    def _retire(self, plugins) -> None:
        """Stop those of the retired ``plugins`` not stopped yet (by a stop that came meanwhile)."""
        for plugin in plugins:
            if any(plugin is p for p in self._retiring):
                self._retiring = [p for p in self._retiring if p is not plugin]
                _stop_plugin(plugin)

    def _stop_plugins(self) -> None:
        retiring, self._retiring = self._retiring, []
        for plugin in [*retiring, *self.hooks.plugins]:
            _stop_plugin(plugin)
        for pool in list(self._side_pools.values()):
            if pool.close_call is not None and pool.close_call.active():
                pool.close_call.cancel()
            pool.close()
        self._side_pools.clear()


SHUTTING_DOWN = b"Server shutting down."
CONFIG_CHANGED = b"Server configuration changed, please reconnect."


def freeze_startup_heap() -> None:
    """Keep what start-up created (modules, classes, TLS and plugin set-up: ~54,000 objects) out of the
    garbage collector's full passes, which otherwise stop every session of the process for ~30 ms each
    time (measured with gc.callbacks; ~0.3 ms once frozen). Garbage is collected first, so none is kept."""
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen: {count} objects left out of full collections", count=gc.get_freeze_count())
