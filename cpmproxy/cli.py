"""``cpmproxy`` console script: run the proxy in the foreground, or check a config."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

from cpmproxy.config import Config, ConfigError

log = Logger(namespace="cpmproxy")


def start_logging(config: Config, stream=None) -> None:
    stream = stream or sys.stdout
    observer = jsonFileLogObserver(stream) if config.log["format"] == "json" else textFileLogObserver(stream)
    level = LogLevel.levelWithName(config.log["level"])
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])], redirectStandardIO=False)


def config_failed(path: str, error: ConfigError) -> str:
    """The one-line reason a configuration is refused, naming the file once (errors about the file itself,
    such as "no such file", already start with its name)."""
    text = str(error)
    return f"cpmproxy: {text}" if text.startswith(f"{Path(path)}: ") else f"cpmproxy: {path}: {text}"


def run(config_path: str) -> int:
    if "twisted.internet.reactor" not in sys.modules:  # (a caller may have installed one already)
        from cpmproxy.reactor import install

        install()
    from twisted.internet import reactor

    from cpmproxy.proxy.service import ProxyService, check_config, config_warnings

    try:
        config = check_config(config_path, adopt_sockets=True)
    except ConfigError as e:
        print(config_failed(config_path, e), file=sys.stderr)
        return 2
    start_logging(config)
    for warning in config_warnings(config):
        log.warn("{warning}", warning=warning)
    svc = ProxyService(config, reactor)
    status = {"code": 0}

    def started_failed(failure):
        log.error("cannot start: {error}", error=failure.getErrorMessage())
        status["code"] = 1
        reactor.stop()

    def start():
        svc.startService()
        svc.listen().addErrback(started_failed)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(svc.reload))
    reactor.run()  # installs SIGTERM/SIGINT handlers that stop the reactor gracefully
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    from cpmproxy import __version__

    parser = argparse.ArgumentParser(prog="cpmproxy", description="OMA CPM message-storage IMAP proxy")
    parser.add_argument("-c", "--config", help="path to cpmproxy.toml (required)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"cpmproxy {__version__}")
    sub = parser.add_subparsers(dest="command")
    ld = sub.add_parser(
        "localdelete", help="list or restore a device's local deletions (master login)",
        description="A device's local deletions, read from the backend with the [admin] master login. "
                    "list: prints mailbox<TAB>UIDs for each mailbox with some. restore: removes the records, "
                    "so the messages are shown to the device again at its next SELECT.")
    ld.add_argument("action", choices=["list", "restore"], help="list the records, or remove them")
    ld.add_argument("--user", required=True, help="the user (login name)")
    ld.add_argument("--device", required=True, help="the device id (its ID x-cpm-device-id)")
    ld.add_argument("--mailbox", help="only this mailbox (default: every mailbox of the user)")
    ld.add_argument("-c", "--config", dest="sub_config", metavar="PATH", help="path to cpmproxy.toml (as before the command)")
    args = parser.parse_args(argv)
    args.config = getattr(args, "sub_config", None) or args.config
    if not args.config:
        parser.error("--config is required")
    if args.command == "localdelete":
        from cpmproxy.admin import run as admin_run
        from cpmproxy.proxy.service import check_config

        try:
            config = check_config(args.config)
            return admin_run(config, args.action, args.user, args.device, args.mailbox)
        except ConfigError as e:
            print(config_failed(args.config, e), file=sys.stderr)
            return 2
        except Exception as e:  # backend down, login refused...
            print(f"cpmproxy: localdelete {args.action} failed: {e}", file=sys.stderr)
            return 1
    if args.check:
        from cpmproxy.proxy.service import check_config, config_warnings

        try:
            config = check_config(args.config)
        except ConfigError as e:
            print(config_failed(args.config, e), file=sys.stderr)
            return 2
        for warning in config_warnings(config):
            print(f"cpmproxy: {args.config}: warning: {warning}", file=sys.stderr)
        print(f"cpmproxy: {args.config}: configuration OK")
        return 0
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
