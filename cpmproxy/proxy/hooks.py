"""The plugin hook API: the only surface CPM behaviours see of the proxy.

A plugin is a class registered under the ``cpmproxy.plugins`` entry-point group and enabled by name in
``plugins = [...]``. One instance lives per proxy process; per-session state goes in
``session.state[plugin.name]``. Every hook is optional; the defaults do nothing, and the proxy only calls
the hooks a plugin overrides, so an unused hook costs nothing on the relay path.

Hooks, in the order a session meets them:

``capabilities(session, caps) -> caps``
    Adjust the post-login capability list (a list of upper-case ``bytes``).
``login(session) -> Deferred | None``
    The backend login succeeded; the client has not yet been told. ``session.side_command`` may be
    used (e.g. to read METADATA preferences; ``backend_command``, on the session's own connection, only
    from the hooks after the login). Raising ``Refuse`` fails the login with that response.
``command(session, cmd) -> Action | None``
    A client command (first segment, tokenizable via ``cmd.args``). Return ``Rewrite(line)`` to forward
    other bytes, ``Answer(...)`` to answer it locally (it never reaches the backend), ``Defer(d)`` to
    decide later, ``Collect()`` to see the command's literals first, or None to pass it on unchanged.
    Plugins are asked in configured order and rewrites compose: the plugins after a ``Rewrite`` see the
    command it makes (parsed anew; same tag, ``cmd.state`` shared) and the last rewrite goes to the backend.
    ``Answer`` and ``Collect`` end the chain. A SELECT or EXAMINE answered other than OK leaves no mailbox
    selected, as a failed SELECT does: the proxy unselects the previous one at the backend. A ``Defer`` ends it until its Deferred fires: a ``Rewrite``
    or None from it goes on to the plugins after it, an ``Answer`` ends it. A plugin that reads the client's
    sequence numbers must come before ``policy`` (which rewrites them into the backend's).
``response(session, resp) -> Action | None``
    A text segment of an untagged backend response (``resp.first`` for the first one; with
    ``response_names`` set, only of responses so named). ``Drop()`` on a first
    segment drops the whole response, literals included; ``Rewrite(data)`` replaces the segment;
    ``Hold(d)`` on a first segment holds this and every later response until ``d`` fires; meanwhile
    ``session.held_response_whole()`` fires with the held response whole (literals included) once all of it is in,
    and ``Drop(data)`` on the hooks' run after the hold sends ``data`` in its place (a response filtered
    whole, where a part to take out is a literal).
``tagged(session, cmd, resp) -> Action | None``
    The tagged completion of a client command (after its untagged responses went through ``response``).
``selected(session, mailbox)``
    A mailbox was selected (``mailbox`` is ``SelectedMailbox``) or deselected (None).
``closed(session)``
    The session is over; release what the plugin holds for it.

A hook that raises (or a ``Defer`` whose Deferred fails) is a bug: in ``command`` that command is answered
``NO [SERVERBUG]``; in ``login`` the login fails that way and the session ends; in ``response``, ``tagged``
and ``selected`` the session ends with ``BYE [SERVERBUG]``; in ``closed`` it is only logged. Logged with
the traceback and counted (``cpmproxy_internal_errors_total``); other sessions go on. A failure that is
the backend's (``BackendError``) is not a bug: the command (or login) is answered ``NO [UNAVAILABLE]``, or
with the backend's own NO (``BackendRefused``).

``session.backend_command(line)`` runs a command on the session's backend connection that the client never
sees (its ESEARCH answers are correlated by tag; IDLE is suspended and resumed around it). Once the client
is gone it is never answered: what awaits it is dropped with the session.
``session.inject(data)`` queues whole untagged responses; the proxy writes them at the next point where
the client is between two responses (never inside a literal or a multi-segment response).
``plugin.peer(name)`` is another enabled plugin (notify and localdelete ask policy what a device sees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from cpmproxy.imap.tokens import Command as ParsedCommand
    from cpmproxy.imap.tokens import ResponseHead

__all__ = [
    "Action", "Answer", "Collect", "Defer", "Drop", "Hold", "Plugin", "Refuse", "Rewrite", "ClientCommand",
    "BackendResponse", "SelectedMailbox",
]


class Action:
    __slots__ = ()


@dataclass(slots=True)
class Rewrite(Action):
    """Other bytes in place of a command's first segment (the plugins after this one see the command it
    makes) or of a response segment (the plugins after this one see ``data``)."""
    data: bytes


@dataclass(slots=True)
class Drop(Action):
    """From ``response``: drop the segment; on a first segment the whole response, literals included.
    ``data`` (first segment only): whole untagged responses (CRLF included) to send in its place, e.g. a
    response filtered after a ``Hold`` let the plugin read all of it (``session.held_response_whole()``)."""
    data: bytes | None = None


@dataclass(slots=True)
class Answer(Action):
    """Answer a client command locally: ``untagged`` responses (each a full line, CRLF included) then
    ``tagged`` = status + text, e.g. ``b"NO [NOPERM] Not allowed"`` (the proxy adds the tag and CRLF)."""
    tagged: bytes
    untagged: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Collect(Action):
    """From ``command``: the first segment is not enough (an argument is a literal). The proxy gathers
    the command — the whole of it, or up to ``literals`` literals and the segment after them — answering
    the client's ``+`` itself, then calls the hooks again with ``cmd.line`` holding what was gathered
    (literals inline, as non-synchronizing ``{n+}``, the form it will be forwarded in) and
    ``cmd.state["collected"]`` set."""
    literals: int | None = None


@dataclass(slots=True)
class Defer(Action):
    """The decision comes later: ``deferred`` fires with another Action (or None for pass); a Rewrite or
    None goes on to the plugins after this one (see ``command``)."""
    deferred: "Deferred[Action | None]"


async def resolved(action):
    """``action`` with its Defers waited for: the decision itself (for a plugin that decides after
    waiting for something, by asking its own ``command`` hook again)."""
    while isinstance(action, Defer):
        action = await action.deferred
    return action


@dataclass(slots=True)
class Hold(Action):
    """From ``response`` on a first segment: this response and all after it wait until ``deferred``
    fires (typically after ``session.backend_command`` gathered what the plugin needs); then the hooks
    run again on it. Internal answers and continuation requests are not held."""
    deferred: "Deferred[object]"


class Refuse(Exception):
    """Raised from ``login`` to refuse the session: ``response`` is e.g. ``b"NO [NOPERM] ..."``."""

    def __init__(self, response: bytes):
        super().__init__(response.decode("ascii", "replace"))
        self.response = response


@dataclass(slots=True)
class ClientCommand:
    """A client command seen by hooks. ``line`` is the first segment as received (CRLF included)."""
    tag: bytes
    name: bytes
    uid: bool
    line: bytes
    parsed: "ParsedCommand"
    has_literal: bool
    # Per-command scratch space for plugins. ``state["later_segments"]``: functions (bytes -> bytes) the
    # session applies to each later text segment of the command (after a literal: the hooks see only the
    # first), e.g. the flag list of a MULTIAPPEND's second message; None refuses the rest of the command
    # (the backend is made to answer it BAD).
    state: dict[str, Any] = field(default_factory=dict)
    # When this is an earlier plugin's Rewrite of the client's command: that command (what the client
    # wrote, in the numbers it knows).
    client: ClientCommand | None = None

    @property
    def args(self):
        return self.parsed.args


@dataclass(slots=True)
class BackendResponse:
    """A text segment of a backend response. ``head`` is the parsed first line of the response."""
    data: bytes
    first: bool
    head: "ResponseHead"
    command: ClientCommand | None  # the client command it answers, when known (tagged responses)


@dataclass(slots=True)
class SelectedMailbox:
    name: str          # decoded (UTF-8) mailbox name
    raw_name: bytes    # as sent on the wire
    read_only: bool
    uidvalidity: int | None = None
    uidnext: int | None = None
    exists: int | None = None
    highestmodseq: int | None = None


class Plugin:
    """Base class for plugins. Subclasses set ``name`` and override hooks they need.

    ``config_section``: a top-level config table the plugin owns (e.g. ``"policy"``); otherwise its
    settings live in ``[plugin.NAME]``. ``configure`` is called at start and on every SIGHUP reload and
    must raise ``cpmproxy.config.ConfigError`` for bad settings.
    """

    name: str = ""
    config_section: str | None = None
    requires: tuple[str, ...] = ()  # names of plugins this one builds on
    # Whether ``response`` wants the segments after a literal too (e.g. FLAGS after BODY[] in a FETCH);
    # most plugins only need the first segment, and bulk FETCHes have a continuation per message.
    response_continuations: bool = False
    # The response names (upper case, e.g. ``frozenset({b"FETCH"})``) whose segments ``response`` is
    # called for; None: every response's. Set it where only a few concern the plugin: each call is a cost
    # on every response line the backend sends.
    response_names: frozenset[bytes] | None = None

    def __init__(self, proxy: Any):
        self.proxy = proxy  # the ProxyService: config, metrics, sessions of a user

    def peer(self, name: str) -> "Plugin | None":
        """Another enabled plugin, by name (None if it is not enabled): e.g. notify asks policy what a
        device sees. A plugin that always needs it lists it in ``requires``."""
        return self.proxy.hooks.by_name.get(name)

    def configure(self, settings: dict[str, Any]) -> None:
        if settings:
            from cpmproxy.config import ConfigError
            raise ConfigError(f"plugin {self.name}: takes no settings, got {sorted(settings)}")

    # Hooks (see module docstring). Defaults do nothing; the proxy skips hooks left as they are.
    def capabilities(self, session, caps: list[bytes]) -> list[bytes]:
        return caps

    def login(self, session) -> "Deferred[None] | None":
        return None

    def command(self, session, cmd: ClientCommand) -> Action | None:
        return None

    def response(self, session, resp: BackendResponse) -> Action | None:
        return None

    def tagged(self, session, cmd: ClientCommand, resp: BackendResponse) -> Action | None:
        return None

    def response_block(self, session, block: bytes) -> bytes | None:
        """Optionally rewrite a whole run of one-line untagged responses at once (faster than line by
        line). Return the new block, or None to have each line go through ``response``."""
        return None

    def block_ok(self, session, block: bytes) -> bool:
        """A run of whole untagged responses may bypass ``response``: return True when nothing in it
        concerns this plugin (a cheap check, e.g. ``b"FOO" not in block``). ``block`` is their text:
        one-line responses, or (a bulk FETCH) the text segments of responses with literals, the literals
        left out. Response names in it are in upper case, as Dovecot spells them (a run with a name
        spelt otherwise, legal for another server, never comes here: it goes through ``response``, which
        gets ``head.name`` in upper case), so a plain ``b"* STATUS "`` test is enough. The default,
        False, sends every segment through ``response``."""
        return False

    def fetch_block_ok(self, session, block: bytes) -> bool:
        """``block_ok`` for a block of one-line responses that the relay has found to be untagged FETCH
        responses and nothing else (a bulk FETCH of flags): a plugin that only cares about other
        responses answers without searching the block. The default asks ``block_ok``."""
        return self.block_ok(session, block)

    def selected(self, session, mailbox: SelectedMailbox | None) -> None:
        return None

    def closed(self, session) -> None:
        return None

    def drain(self) -> "Deferred[None] | None":
        """The proxy is stopping (``shutdown_grace`` to go; sessions are finishing their commands): fire
        once what this plugin queued is done (e.g. notifications on their way), or return None. ``stop``
        follows, when it fired or the grace is over."""
        return None

    def stop(self) -> None:
        """This instance is retired (reload or shutdown): release process-wide resources."""
        return None

    def reloaded(self) -> None:
        """The configuration was reloaded (SIGHUP) and ``configure`` called with its settings: apply them
        to the sessions already open where they change what those see. A plugin that stays enabled keeps
        its instance across a reload."""
        return None


def overrides(plugin: Plugin, hook: str) -> bool:
    """True when ``plugin`` implements ``hook`` itself (so the proxy must call it)."""
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)
