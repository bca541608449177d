"""Options and service maker behind ``twist cpmproxy``."""

from __future__ import annotations

import os
import signal
import sys

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from cpmproxy.config import ConfigError

log = Logger(namespace="cpmproxy")


class Options(usage.Options):
    optParameters = [["config", "c", None, "path to cpmproxy.toml"]]

    def postOptions(self) -> None:
        # The configuration is checked here: twist prints a UsageError raised while options are parsed as
        # one line and exits with EX_USAGE; raised later (makeService), it was a traceback.
        if not self["config"]:
            raise usage.UsageError("--config is required")
        from cpmproxy.cli import config_failed
        from cpmproxy.proxy.service import check_config

        try:
            self.checked = check_config(self["config"], adopt_sockets=True)
        except ConfigError as e:
            raise usage.UsageError(config_failed(self["config"], e)) from None


class _Runner(service.Service):
    """Starts the listeners once the reactor runs, and stops the proxy with the application. A listener
    that cannot start stops the process with exit status 1 (it went on running without one, which no
    supervisor restarts)."""

    def __init__(self, proxy):
        self.proxy = proxy

    def startService(self):
        from twisted.internet import reactor

        from cpmproxy.proxy.service import config_warnings

        # (Said as the proxy's own start says them: under twist they were never said at all.)
        for warning in config_warnings(self.proxy.config):
            log.warn("{warning}", warning=warning)
        super().startService()
        self.proxy.startService()
        reactor.callWhenRunning(self._listen, reactor)  # (twist starts services before the reactor runs)
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(self.proxy.reload))

    def _listen(self, reactor) -> None:
        def failed(failure):
            log.critical("cannot start: {error}", error=failure.getErrorMessage())
            reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
            reactor.stop()

        self.proxy.listen().addErrback(failed)

    def stopService(self):
        super().stopService()
        return self.proxy.stopService()


def _exit_failed() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # (twist itself would exit 0 once the reactor stopped)


def makeService(options: Options) -> service.IService:
    from cpmproxy.proxy.service import ProxyService

    return _Runner(ProxyService(options.checked))
