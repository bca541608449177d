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


class Settable(Recorder):
    """Takes any settings and keeps them (``settings``): what a reload gave it, or did not."""

    def configure(self, settings: dict) -> None:
        self.settings = settings


class BreaksWhenMade(Recorder):
    """Its real instances' ``configure`` raises, the configuration's check (no proxy) passes: a reload that
    fails part way, after the plugins before it in the list were made and configured."""

    def configure(self, settings: dict) -> None:
        if self.proxy is not None:
            raise RuntimeError("cannot take its settings up")
