"""Prometheus metrics, in a registry of the service's own (several services per process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

# Commands get a label of their own only if they are IMAP's; anything else is "other" (bounded cardinality).
_KNOWN_COMMANDS = frozenset(
    b"APPEND AUTHENTICATE CAPABILITY CHECK CLOSE COMPRESS COPY CREATE DELETE ENABLE EXAMINE EXPUNGE FETCH "
    b"GETACL GETMETADATA GETQUOTA GETQUOTAROOT ID IDLE LIST LISTRIGHTS LOGIN LOGOUT LSUB MOVE MYRIGHTS "
    b"NAMESPACE NOOP NOTIFY RENAME SEARCH SELECT SETACL SETMETADATA SETQUOTA SORT STARTTLS STATUS STORE "
    b"SUBSCRIBE THREAD UNSELECT UNSUBSCRIBE UID ESEARCH DELETEACL XLIST GETANNOTATION".split()
)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.connections = Counter("cpmproxy_connections", "Client connections accepted", registry=r)
        self.active = Gauge("cpmproxy_connections_active", "Client connections open", registry=r)
        self.refused = Counter("cpmproxy_connections_refused", "Connections refused by a limit",
                               ["reason"], registry=r)
        self.logins = Counter("cpmproxy_logins", "Login attempts by result", ["result"], registry=r)
        # Counted on the relay path, per command and per read/write: plain integers, turned into
        # samples only when scraped (a prometheus_client inc takes a lock and several calls).
        self.bytes_in = 0
        self.bytes_out = 0
        self.command_counts: dict[str, int] = {}
        r.register(_RelayCollector(self))
        self.backend_errors = Counter("cpmproxy_backend_errors", "Backend failures by kind", ["kind"],
                                      registry=r)
        self.bad_input = Counter("cpmproxy_bad_input", "Malformed client input by kind", ["kind"], registry=r)
        self.timeouts = Counter("cpmproxy_idle_timeouts", "Sessions closed for inactivity", registry=r)
        self.internal_errors = Counter("cpmproxy_internal_errors",
                                       "Bugs met (ours or a plugin's): a command answered NO [SERVERBUG] or "
                                       "a session ended with BYE [SERVERBUG]; the traceback is in the log",
                                       registry=r)
        self.reloads = Counter("cpmproxy_reloads", "Configuration reloads", ["result"], registry=r)
        self._command_labels: dict[bytes, str] = {}
        self._plugin_metrics: dict[str, object] = {}

    def plugin_metric(self, kind: type, name: str, doc: str, labels: tuple[str, ...] = ()):
        """A metric a plugin owns, created once per process (plugins are re-created on reload)."""
        metric = self._plugin_metrics.get(name)
        if metric is None:
            metric = self._plugin_metrics[name] = kind(name, doc, list(labels), registry=self.registry)
        return metric

    def command(self, name: bytes) -> None:
        label = self._command_labels.get(name)
        if label is None:
            label = name.decode("ascii", "replace").lower() if name in _KNOWN_COMMANDS else "other"
            if name in _KNOWN_COMMANDS:
                self._command_labels[name] = label
        counts = self.command_counts
        counts[label] = counts.get(label, 0) + 1

    def listen(self, reactor, endpoint: str, health=None):
        """Serve ``/metrics`` (and ``/``), and ``/healthz`` when ``health`` is given: a function that
        fires with (HTTP status, one line of text)."""
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.registry))
        root.putChild(b"", MetricsResource(registry=self.registry))
        if health is not None:
            root.putChild(b"healthz", _HealthResource(health))
        return serverFromString(reactor, endpoint).listen(_ProbeSite(root))


class _ProbeSite(Site):
    """The metrics listener's site: scraped and probed every few seconds, so only a request that did not
    succeed is logged (an access line per scrape buried the proxy's own log: ~17,000 a day per scraper)."""

    noisy = False  # (no "Starting factory" line)

    def log(self, request) -> None:
        if request.code >= 400:
            super().log(request)


class _HealthResource(Resource):
    """For a load balancer's or an orchestrator's probe: 200 while the proxy serves and its backend
    answers, 503 with the reason otherwise."""

    isLeaf = True

    def __init__(self, health) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request):
        def answer(result):
            code, text = result
            if request.finished or request._disconnected:
                return
            request.setResponseCode(code)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(text.encode() + b"\n")
            request.finish()

        self.health().addCallback(answer)
        return NOT_DONE_YET


class _RelayCollector:
    """The relay-path counters of a Metrics, as Prometheus counters."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return self.collect()

    def collect(self):
        m = self.metrics
        commands = CounterMetricFamily("cpmproxy_commands", "Client commands by name", labels=["command"])
        for label, n in sorted(m.command_counts.items()):
            commands.add_metric([label], n)
        yield commands
        yield CounterMetricFamily("cpmproxy_client_bytes_received", "Bytes received from clients",
                                  value=m.bytes_in)
        yield CounterMetricFamily("cpmproxy_client_bytes_sent", "Bytes sent to clients", value=m.bytes_out)
