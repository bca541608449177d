"""A third-party plugin, installed the way a package would be (an entry point in a dist-info), loaded by a
real proxy process: the hook API as outsiders see it, and the proxy's handling of deferred decisions."""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.proxyfix import raw_via, still_serving

PLUGIN = '''
from twisted.internet import defer, reactor, task

from cpmproxy.proxy.hooks import Answer, Defer, Hold, Plugin


class DecidePlugin(Plugin):
    """Decides NOOPs by their tag: at once, later, failing, or passing them on; holds responses."""
    name = "decide"

    def command(self, session, cmd):
        if cmd.name != b"NOOP":
            return None
        tag = cmd.tag
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
        """Holds the tagged answer of a NOOP tagged hold*, once each: ready at once, later, or failing."""
        tag = resp.head.tag or b""
        held = session.state.setdefault(self.name, set())
        if resp.head.kind != "tagged" or not tag.startswith(b"hold") or tag in held:
            return None
        held.add(tag)
        if tag.startswith(b"holdnow"):
            return Hold(defer.succeed(None))
        if tag.startswith(b"holdlater"):
            return Hold(task.deferLater(reactor, 0.2, lambda: None))
        if tag.startswith(b"holdslowfail"):
            return Hold(task.deferLater(reactor, 0.1, lambda: 1 / 0))
        return Hold(defer.fail(RuntimeError("plugin bug")))
'''


@pytest.fixture
def decide_proxy(make_proxy, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "cpmdecide").mkdir(parents=True)
    (site / "cpmdecide" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "cpmdecide-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cpmdecide\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cpmproxy.plugins]\ndecide = cpmdecide:DecidePlugin\n")
    monkeypatch.setenv("PYTHONPATH", str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return make_proxy(plugins=["readreport", "decide"])


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


def test_third_party_plugin_holds_responses(decide_proxy):
    c = raw_via(decide_proxy)
    c.login("alice", "alicepw")
    tags = [b"holdlater1", b"holdnow1", b"holdfail1", b"holdslowfail1", b"plain2"]
    tagged = pipelined(c, tags)
    # Each tagged answer exactly once, in order: a hold keeps what follows behind it.
    assert [t.split(b" ")[0] for t in tagged] == tags
    c.close()
    assert still_serving(decide_proxy)


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
