"""The proxy's reactor (cpmproxy.reactor): the stock epoll reactor's event handling, without the per-event
log context, and still robust to a handler that fails. And the process's start-up heap, frozen."""

from __future__ import annotations

import re
import socket

from twisted.internet.abstract import FileDescriptor
from twisted.logger import globalLogPublisher

from cpmproxy.reactor import ProxyReactor
from cpmproxy.testing.proxyproc import ProxyProcess


class Reader(FileDescriptor):
    def __init__(self, reactor, sock, fail=False):
        super().__init__(reactor)
        self.sock, self.fail, self.got = sock, fail, []

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        if self.fail:
            raise RuntimeError("handler bug")
        self.got.append(self.sock.recv(100))


def _pairs(n):
    pairs = [socket.socketpair() for _ in range(n)]
    for a, b in pairs:
        a.setblocking(False)
        b.sendall(b"ping")
    return pairs


def test_ready_sockets_reach_their_handlers():
    reactor = ProxyReactor()
    pairs = _pairs(2)
    try:
        readers = [Reader(reactor, a) for a, _ in pairs]
        for r in readers:
            reactor.addReader(r)
        reactor.doPoll(1)
        assert [r.got for r in readers] == [[b"ping"], [b"ping"]]
        reactor.doPoll(0)  # nothing more is ready: nothing is called
        assert [r.got for r in readers] == [[b"ping"], [b"ping"]]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_an_escaping_error_is_logged_and_the_other_sockets_are_still_served(monkeypatch):
    reactor = ProxyReactor()
    pairs = _pairs(2)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        failing, fine = Reader(reactor, pairs[0][0]), Reader(reactor, pairs[1][0])
        reactor.addReader(failing)
        reactor.addReader(fine)
        real = reactor._doReadOrWrite

        def handle(selectable, fd, event):
            if selectable is failing:
                raise RuntimeError("escaped the handler")  # (_doReadOrWrite itself catches doRead's errors)
            real(selectable, fd, event)

        monkeypatch.setattr(reactor, "_doReadOrWrite", handle)
        reactor.doPoll(1)
        assert fine.got == [b"ping"]
        failures = [e for e in events if "log_failure" in e]
        assert len(failures) == 1 and "escaped the handler" in str(failures[0]["log_failure"].value)
    finally:
        globalLogPublisher.removeObserver(events.append)
        for a, b in pairs:
            a.close()
            b.close()


def test_a_failing_handler_loses_only_its_connection():
    """Stock behaviour kept: doRead raising disconnects that selectable, the reactor goes on."""
    reactor = ProxyReactor()
    pairs = _pairs(2)
    try:
        failing, fine = Reader(reactor, pairs[0][0], fail=True), Reader(reactor, pairs[1][0])
        lost = []
        failing.connectionLost = lambda reason: lost.append(reason.type)
        reactor.addReader(failing)
        reactor.addReader(fine)
        reactor.doPoll(1)
        assert fine.got == [b"ping"] and lost == [RuntimeError]
        assert failing not in reactor.getReaders() and fine in reactor.getReaders()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_the_cli_runs_on_it_with_its_start_up_heap_frozen(dovecot, tmp_path):
    p = ProxyProcess(tmp_path, dovecot.port, metrics=False).start()
    try:
        # (What an operator needs to read first: what it fronts, with which plugins; the operator review.)
        assert re.search(rf"starting \(ProxyReactor\): backend 127.0.0.1:{dovecot.port} \(tls none\), plugins "
                         r"[a-z, ]*\bpolicy\b", p.log()), p.log()
        assert re.search(r"start-up heap frozen: [1-9][0-9]{3,} objects", p.log())
    finally:
        p.stop()
