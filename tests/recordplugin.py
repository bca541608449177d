"""Plugins for process-level tests that say in the proxy's log when each instance is made and stopped."""

from __future__ import annotations

from twisted.logger import Logger

from cpmproxy.proxy.hooks import Plugin

log = Logger(namespace="cpmproxy.tests")


class Recorder(Plugin):
    """Logs ``recorder <id> made`` and ``recorder <id> stopped`` (its ``stop``), one id per instance."""

    def __init__(self, proxy):
        super().__init__(proxy)
        if proxy is not None:  # (None: the configuration's check)
            log.info("recorder {id} made", id=id(self))

    def stop(self) -> None:
        log.info("recorder {id} stopped", id=id(self))


class OtherRecorder(Recorder):
    """The same under another name: a reload from one to the other changes the plugin list."""
