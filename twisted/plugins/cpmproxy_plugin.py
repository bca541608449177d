"""``twist cpmproxy --config PATH``: the proxy as a Twisted application plugin."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

cpmproxy = ServiceMaker("cpmproxy", "cpmproxy.twist", "OMA CPM message-storage IMAP proxy", "cpmproxy")

# ``twist --reactor=cpmproxy cpmproxy ...``: the epoll reactor without per-event log context (cpmproxy.reactor).
cpmproxy_reactor = Reactor("cpmproxy", "cpmproxy.reactor", "epoll, without the per-event legacy log context")
