"""``twist cpmproxy --config PATH``: the proxy as a Twisted application plugin."""

from twisted.application.service import ServiceMaker

cpmproxy = ServiceMaker("cpmproxy", "cpmproxy.twist", "OMA CPM message-storage IMAP proxy", "cpmproxy")
