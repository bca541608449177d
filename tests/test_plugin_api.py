"""A third-party plugin, installed the way a package would be (an entry point in a dist-info), loaded by a
real proxy process: the hook API as outsiders see it, and the proxy's handling of deferred decisions."""

from __future__ import annotations

import os
import signal
import textwrap
import time
import urllib.request

import pytest

from tests.proxyfix import raw_via, still_serving
from tests.test_notify import _imap_processes

PLUGIN = '''
from collections import deque

from twisted.internet import defer, reactor, task

from cpmproxy.proxy.hooks import Answer, Defer, Hold, Plugin, Rewrite


class DecidePlugin(Plugin):
    """Decides NOOPs by their tag: at once, later, failing, or passing them on; holds the STATUS responses
    of STATUS commands tagged hold*; a NOOP tagged "seen" answers which response names it was shown."""
    name = "decide"
    response_names = frozenset((b"STATUS",))

    def state(self, session):
        return session.state.setdefault(self.name, {"holds": deque(), "rerun": False, "seen": set()})

    def command(self, session, cmd):
        if cmd.name == b"STATUS":
            self.state(session)["holds"].append(cmd.tag if cmd.tag.startswith(b"hold") else None)
            return None
        if cmd.name != b"NOOP":
            return None
        tag = cmd.tag
        if tag == b"seen":
            return Answer(b"OK seen " + b",".join(sorted(self.state(session)["seen"])))
        if tag.startswith(b"now"):
            return Defer(defer.succeed(Answer(b"OK decided at once")))
        if tag.startswith(b"later"):
            return Defer(task.deferLater(reactor, 0.2, Answer, b"OK decided later"))
        if tag.startswith(b"broken"):
            return Defer(defer.fail(RuntimeError("plugin bug")))
        if tag.startswith(b"slowbroken"):
            return Defer(task.deferLater(reactor, 0.1, lambda: 1 / 0))
        if tag.startswith(b"pass"):
            return Defer(defer.succeed(None))
        return None

    def response(self, session, resp):
        """Holds a STATUS command's response if it was tagged hold*: ready at once, later, or failing."""
        st = self.state(session)
        st["seen"].add(resp.head.name)
        if st["rerun"]:  # (the hooks run again for a response once its hold is over)
            st["rerun"] = False
            return None
        tag = st["holds"].popleft()
        if tag is None:
            return None
        st["rerun"] = True
        if tag.startswith(b"holdnow"):
            return Hold(defer.succeed(None))
        if tag.startswith(b"holdlater"):
            return Hold(task.deferLater(reactor, 0.2, lambda: None))
        if tag.startswith(b"holdslowfail"):
            return Hold(task.deferLater(reactor, 0.1, lambda: 1 / 0))
        return Hold(defer.fail(RuntimeError("plugin bug")))


class BuggyPlugin(Plugin):
    """Raises where a command's tag says: in its command hook, its tagged hook, or in its response hook
    for the command's STATUS response, at once or when the hooks run again after a hold."""
    name = "buggy"
    response_names = frozenset((b"STATUS",))

    def login(self, session):
        if session.user == "carol":  # (the session's own connection is the login's until the client's OK)
            return session.backend_command(b"NOOP")
        return None

    def command(self, session, cmd):
        if cmd.tag == b"bugcommand":
            raise KeyError("command hook bug")
        session.state[self.name] = cmd.tag
        return None

    def tagged(self, session, cmd, resp):
        if cmd.tag == b"bugtagged":
            raise KeyError("tagged hook bug")
        return None

    def response(self, session, resp):
        tag = session.state.get(self.name)
        if tag == b"bugresponse":
            raise IndexError("response hook bug")
        if tag == b"bugrelease":
            session.state[self.name] = b"bugresponse"  # (raises when the hold is over)
            return Hold(task.deferLater(reactor, 0.1, lambda: None))
        return None


def _mailbox(cmd):
    return cmd.args[0].value if cmd.args else None


class FirstRewriter(Plugin):
    """Makes STATUS of "alias-a" a STATUS of "alias-b": at once, later (tag late*), or decides otherwise:
    an answer (answer*, at once or later), a pass decided later (passlater*)."""
    name = "rewritea"

    def command(self, session, cmd):
        if cmd.name != b"STATUS" or _mailbox(cmd) != b"alias-a":
            return None
        new = cmd.line.replace(b"alias-a", b"alias-b")
        if cmd.tag.startswith(b"answerlater"):
            return Defer(task.deferLater(reactor, 0.1, Answer, b"OK answered by the first, later"))
        if cmd.tag.startswith(b"answer"):
            return Answer(b"OK answered by the first")
        if cmd.tag.startswith(b"passlater"):
            return Defer(task.deferLater(reactor, 0.1, lambda: None))
        if cmd.tag.startswith(b"late"):
            return Defer(task.deferLater(reactor, 0.1, Rewrite, new))
        return Rewrite(new)


class SecondRewriter(Plugin):
    """Makes STATUS of "alias-b" a STATUS of INBOX, deciding later for tags *deferb; remembers the STATUS
    commands it was shown (name, UID, mailbox, line), told by a NOOP tagged "shown"."""
    name = "rewriteb"

    def command(self, session, cmd):
        shown = session.state.setdefault(self.name, [])
        if cmd.name == b"NOOP" and cmd.tag == b"shown":
            return Answer(b"OK shown " + b"|".join(shown))
        if cmd.name != b"STATUS":
            return None
        shown.append(b"%s %s" % (cmd.tag, _mailbox(cmd)))
        if _mailbox(cmd) != b"alias-b":
            return None
        new = Rewrite(cmd.line.replace(b"alias-b", b"INBOX"))
        if cmd.tag.endswith(b"deferb"):
            return Defer(task.deferLater(reactor, 0.05, lambda: new))
        return new


class InternalInIdle(Plugin):
    """Half a second into an IDLE tagged "suspend": a command of its own on the session's connection (the
    proxy suspends the backend's IDLE for it, as the view does to classify new mail)."""
    name = "internalidle"

    def command(self, session, cmd):
        if cmd.name == b"IDLE" and cmd.tag == b"suspend":
            reactor.callLater(0.5, lambda: session.backend_command(b"NOOP"))
        return None
'''


def install_plugins(tmp_path, monkeypatch) -> None:
    """The plugins above as a package installs them: an entry point in a dist-info on the path."""
    site = tmp_path / "site"
    (site / "cpmdecide").mkdir(parents=True)
    (site / "cpmdecide" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "cpmdecide-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cpmdecide\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cpmproxy.plugins]\ndecide = cpmdecide:DecidePlugin\n"
                                           "buggy = cpmdecide:BuggyPlugin\nrewritea = cpmdecide:FirstRewriter\n"
                                           "rewriteb = cpmdecide:SecondRewriter\n"
                                           "internalidle = cpmdecide:InternalInIdle\n")
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def decide_proxy(make_proxy, tmp_path, monkeypatch):
    install_plugins(tmp_path, monkeypatch)
    return make_proxy(plugins=["readreport", "decide", "buggy"])


@pytest.fixture
def compose_proxy(make_proxy, tmp_path, monkeypatch):
    """The two plugins that rewrite STATUS commands, ``rewritea`` first."""
    install_plugins(tmp_path, monkeypatch)
    return make_proxy(plugins=["rewritea", "rewriteb"])


def metrics_of(proxy) -> bytes:
    return urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=5).read()


def pipelined(c, tags: list[bytes]) -> list[bytes]:
    """Send a NOOP per tag in one write; the tagged answers, in the order they came."""
    c.send(b"".join(tag + b" NOOP\r\n" for tag in tags))
    tagged = []
    while len(tagged) < len(tags):
        line = c.read_response()
        if not line.startswith(b"*"):
            tagged.append(line)
    return tagged


def test_third_party_plugin_decisions_keep_pipelined_order(decide_proxy):
    c = raw_via(decide_proxy)
    c.login("alice", "alicepw")
    # Pipelined: a decision that waits must hold back the commands behind it, whatever they are.
    tagged = pipelined(c, [b"later1", b"now1", b"pass1", b"broken1", b"slowbroken1", b"plain1"])
    assert [t.split(b" ")[0] for t in tagged] == [b"later1", b"now1", b"pass1", b"broken1", b"slowbroken1",
                                                    b"plain1"]
    assert tagged[0] == b"later1 OK decided later\r\n"
    assert tagged[1] == b"now1 OK decided at once\r\n"
    assert tagged[2].startswith(b"pass1 OK NOOP")  # Dovecot's own answer: it went to the backend
    assert tagged[3] == b"broken1 NO [SERVERBUG] Internal error.\r\n"
    assert tagged[4] == b"slowbroken1 NO [SERVERBUG] Internal error.\r\n"
    assert tagged[5].startswith(b"plain1 OK NOOP")
    c.close()
    assert still_serving(decide_proxy)
    assert b"cpmproxy_internal_errors_total 2.0" in metrics_of(decide_proxy)  # (broken1, slowbroken1)


def test_third_party_plugin_holds_responses(decide_proxy):
    c = raw_via(decide_proxy)
    c.login("alice", "alicepw")
    tags = [b"holdlater1", b"holdnow1", b"holdfail1", b"holdslowfail1", b"plain2", b"holdlater2"]
    c.send(b"".join(tag + b' STATUS "INBOX" (MESSAGES)\r\n' for tag in tags))
    lines = []
    while sum(1 for line in lines if not line.startswith(b"*")) < len(tags):
        lines.append(c.read_response())
    # Each STATUS response exactly once, before its command's tagged answer, all in order: a hold keeps
    # what follows behind it, and a failed one still lets the response through.
    assert [line.split(b" ")[0] if not line.startswith(b"*") else line[:len(b"* STATUS INBOX")]
            for line in lines] == [x for tag in tags for x in (b"* STATUS INBOX", tag)]
    # The plugin's response_names: it was shown STATUS responses, not the others (LIST, FLAGS, EXISTS...).
    c.command(b"l", b'LIST "" "*"')
    c.command(b"s", b"SELECT INBOX")
    assert c.command(b"seen", b"NOOP")[-1] == b"seen OK seen STATUS\r\n"
    c.close()
    assert still_serving(decide_proxy)
    assert b"cpmproxy_internal_errors_total 2.0" in metrics_of(decide_proxy)  # (the two failed holds)


def test_a_plugin_bug_fails_its_command_or_ends_its_session_never_the_proxy(decide_proxy):
    """An exception in a hook: in ``command`` (nothing sent yet) that command fails with NO [SERVERBUG]
    and the session goes on; in ``response`` or ``tagged``, at once or after a hold, what the session
    shows can no longer be trusted: BYE [SERVERBUG]. Logged with the traceback and counted; the other
    sessions are not touched."""
    bystander = raw_via(decide_proxy)
    bystander.login("bob", "bobpw")
    c = raw_via(decide_proxy)
    c.login("alice", "alicepw")
    assert c.command(b"bugcommand", b"NOOP")[-1] == b"bugcommand NO [SERVERBUG] Internal error.\r\n"
    assert c.command(b"after", b"NOOP")[-1].startswith(b"after OK")
    c.close()
    for tag in (b"bugtagged", b"bugresponse", b"bugrelease"):
        c = raw_via(decide_proxy)
        c.login("alice", "alicepw")
        c.send(tag + b' STATUS "INBOX" (MESSAGES)\r\n')
        lines = []
        while not lines or not lines[-1].startswith(b"* BYE"):
            lines.append(c.read_response())
        assert lines[-1] == b"* BYE [SERVERBUG] Internal error.\r\n", tag
        assert not any(line.startswith(tag) for line in lines), tag
        assert c.closed(), tag
    assert bystander.command(b"b", b"NOOP")[-1].startswith(b"b OK")
    bystander.close()
    assert still_serving(decide_proxy)
    log = decide_proxy.log()
    for text in ("command hook bug", "tagged hook bug", "response hook bug"):
        assert text in log
    assert b"cpmproxy_internal_errors_total 4.0" in metrics_of(decide_proxy)


def test_local_answers_wait_behind_earlier_commands_and_are_bounded(make_proxy):
    """Answers the proxy makes itself (CAPABILITY after login) wait for the command sent before them (an
    IDLE, until the backend completes it); past max_waiting_answers the proxy stops reading the client
    until they went out, then goes on: every answer arrives, once, in order."""
    p = make_proxy(backend_tls="none", config_extra="[limits]\nmax_waiting_answers = 2\n")
    c = raw_via(p)
    c.login("alice", "alicepw")
    c.command(b"s", b"SELECT INBOX")
    c.send(b"i1 IDLE\r\n")
    assert c.read_response().startswith(b"+")
    tags = [b"c%d" % i for i in range(20)]
    c.send(b"DONE\r\n" + b"".join(tag + b" CAPABILITY\r\n" for tag in tags))
    tagged = []
    while len(tagged) < 21:
        line = c.read_response()
        if not line.startswith(b"*"):
            tagged.append(line.split(b" ")[0])
    assert tagged == [b"i1", *tags]
    c.close()
    assert still_serving(p)


def test_rewrites_of_several_plugins_compose(compose_proxy):
    """A plugin after one that rewrote a command sees the rewritten command (parsed anew: its name and
    arguments), and the last rewrite goes to the backend; also when either decides later (Defer), and when
    the first defers and then passes. An Answer (at once or later) ends the chain: the second never sees
    that command."""
    c = raw_via(compose_proxy)
    c.login("alice", "alicepw")
    tags = [b"now", b"late", b"nowdeferb", b"latedeferb"]
    for tag in tags:
        r = c.command(tag, b'STATUS "alias-a" (MESSAGES)')
        assert r[0].startswith(b"* STATUS INBOX (MESSAGES "), (tag, r)  # alias-a -> alias-b -> INBOX
        assert r[-1].startswith(tag + b" OK"), (tag, r)
    r = c.command(b"passlater", b'STATUS "alias-a" (MESSAGES)')
    assert r[-1].startswith(b"passlater NO"), r  # (Dovecot: no such mailbox)
    assert c.command(b"answer", b'STATUS "alias-a" (MESSAGES)') == [b"answer OK answered by the first\r\n"]
    assert c.command(b"answerlater", b'STATUS "alias-a" (MESSAGES)') == [
        b"answerlater OK answered by the first, later\r\n"]
    # Pipelined, mixed: order kept.
    c.send(b"".join(t + b' STATUS "alias-a" (MESSAGES)\r\n' for t in (b"p1late", b"p2", b"p3latedeferb")))
    tagged = [line for line in (c.read_response() for _ in range(6)) if not line.startswith(b"*")]
    assert [t.split(b" ")[:2] for t in tagged] == [[b"p1late", b"OK"], [b"p2", b"OK"], [b"p3latedeferb", b"OK"]]
    shown = c.command(b"shown", b"NOOP")[-1]
    assert shown == (b"shown OK shown now alias-b|late alias-b|nowdeferb alias-b|latedeferb alias-b|"
                     b"passlater alias-a|p1late alias-b|p2 alias-b|p3latedeferb alias-b\r\n")
    c.close()
    assert still_serving(compose_proxy)
    assert b"cpmproxy_internal_errors_total 0.0" in metrics_of(compose_proxy)


def test_commands_after_a_done_that_waits_for_the_proxys_own_commands(make_proxy, tmp_path, monkeypatch):
    """DONE came while the proxy had the backend's IDLE suspended for a command of its own: the command
    pipelined after the DONE was taken for another DONE, and never answered."""
    install_plugins(tmp_path, monkeypatch)
    p = make_proxy(plugins=["internalidle"])
    c = raw_via(p)
    user = "carol"
    assert c.login(user, f"{user}pw")[-1].startswith(b"L OK")
    c.command(b"s", b"SELECT INBOX")
    c.send(b"suspend IDLE\r\n")
    assert c.read_response().startswith(b"+")
    # (The user's Dovecot processes stopped: the proxy's NOOP is not answered before the DONE comes.)
    stopped = [pid for pid, title in _imap_processes(user).items()]
    assert stopped
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(0.8)
        c.send(b"DONE\r\nafter NOOP\r\n")
        time.sleep(0.3)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    tagged = []
    while len(tagged) < 2:
        line = c.read_response()
        if not line.startswith(b"*"):
            tagged.append(line)
    assert [t.split(b" ", 1)[0] for t in tagged] == [b"suspend", b"after"], tagged
    c.close()


def test_a_login_hook_asking_on_the_sessions_own_connection_fails_at_once(decide_proxy):
    """``backend_command`` in a ``login`` hook (the hook API said it could be used there): its answer never
    came (the connection is the login's until the client's OK), the login hung until ``login_timeout``.
    Now a bug of the plugin's, at once, whose log says what to use instead (found by the code-shape
    review)."""
    c = raw_via(decide_proxy)
    started = time.monotonic()
    assert c.login("carol", "carolpw")[-1].startswith(b"L NO [SERVERBUG]")
    assert time.monotonic() - started < 3
    c.close()
    assert "use side_command" in decide_proxy.log()
    assert still_serving(decide_proxy)
