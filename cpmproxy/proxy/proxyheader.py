"""PROXY protocol listeners whose sessions begin once the header is read.

Twisted's ``haproxy:`` wrapper starts the wrapped protocol as soon as the load balancer connects and only
then reads the PROXY header: the session greeted the client, and was admitted, by the balancer's address.
A balancer on loopback made the greeting offer ``AUTH=PLAIN`` to every remote client (``plaintext_auth =
"loopback"``), which then sent its password in the clear to be refused only afterwards (RFC 9051 6.2.3:
``LOGINDISABLED`` is announced so that it never does). Here the session starts with the header read, so
its greeting, admission and limits see the real client; Twisted still parses the header.
"""

from __future__ import annotations

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["HeaderFirstEndpoint"]


class _Collected(Protocol):
    """Stands in for the session while Twisted's wrapper reads the header: keeps what follows it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


class _HeaderFirstWrapper(HAProxyProtocolWrapper):
    _started = False
    _header_timer = None
    _early = b""  # the header's first bytes, until Twisted's parser can tell its version from them

    def makeConnection(self, transport) -> None:
        # (ProtocolWrapper's, but the wrapped protocol waits for the header.)
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._header_timer = self.factory.reactor.callLater(self.factory.header_timeout(), transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            # (Twisted's wrapper tells v1 from v2 by the first bytes it gets, and closes the connection if
            # they are fewer than a v2 signature or a v1 line's start: a header may come in pieces.)
            self._early += data
            if len(self._early) < 16 and not (self._early.startswith(b"PROXY") and b"\n" in self._early):
                return  # (a v1 line may be shorter; v2's signature holds a "\n" of its own)
            data, self._early = self._early, b""
            if data.startswith(b"PROXY UNKNOWN"):
                # (v1's "the balancer does not know the client", e.g. its own health checks: the session
                # goes by the connection's own addresses, as the protocol says; Twisted refuses the line.)
                end = data.find(b"\n")
                if end < 0:
                    self._early = data
                    return
                self._start(data[end + 1:])
                return
        session, collected = self.wrappedProtocol, _Collected()
        self.wrappedProtocol = collected
        try:
            super().dataReceived(data)  # (an invalid header closes the connection)
        finally:
            self.wrappedProtocol = session
        if self._proxyInfo is None:
            return
        self._start(b"".join(collected.chunks))

    def _start(self, rest: bytes) -> None:
        """The header is read: the session begins, with what followed it."""
        self._started = True
        self._header_timer.cancel()
        self.wrappedProtocol.makeConnection(self)
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def connectionLost(self, reason) -> None:
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        if self._started:
            super().connectionLost(reason)
        else:  # (no header, or not all of it: the session never began)
            self.factory.unregisterProtocol(self)


class _HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = _HeaderFirstWrapper

    def __init__(self, wrapped, reactor, header_timeout) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.header_timeout = header_timeout


@implementer(IStreamServerEndpoint)
class HeaderFirstEndpoint:
    """``endpoint`` (what a ``haproxy:`` description wraps) with the PROXY header read first; a connection
    that has not sent all of it within ``header_timeout()`` seconds is closed (a function: asked at each
    connection, so that a reload's ``preauth_timeout`` applies)."""

    def __init__(self, endpoint, reactor, header_timeout) -> None:
        self._wrappedEndpoint = endpoint  # (the name Twisted's wrapper endpoints use: see _ssl_endpoint)
        self._reactor = reactor
        self._header_timeout = header_timeout

    def listen(self, factory):
        return self._wrappedEndpoint.listen(_HeaderFirstFactory(factory, self._reactor, self._header_timeout))
