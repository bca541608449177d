"""Options and service maker behind ``twist cpmproxy``."""

from __future__ import annotations

import signal

from twisted.application import service
from twisted.python import usage

from cpmproxy.config import ConfigError


class Options(usage.Options):
    optParameters = [["config", "c", None, "path to cpmproxy.toml"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")


class _Runner(service.Service):
    """Starts the listeners once the reactor runs, and stops the proxy with the application."""

    def __init__(self, proxy):
        self.proxy = proxy

    def startService(self):
        from twisted.internet import reactor

        super().startService()
        self.proxy.startService()
        self.proxy.listen().addErrback(lambda f: (print(f"cpmproxy: {f.getErrorMessage()}"), reactor.stop()))
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.proxy.reload))

    def stopService(self):
        super().stopService()
        return self.proxy.stopService()


def makeService(options: Options) -> service.IService:
    from cpmproxy.proxy.service import ProxyService, check_config

    try:
        config = check_config(options["config"])
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    return _Runner(ProxyService(config))
