"""Prometheus metrics, owned by one app instance.

Every metric lives in the ``CollectorRegistry`` of a ``Metrics`` object that
``create_app`` makes, never in prometheus-client's global default registry:
several apps in one process (tests, embedding) would otherwise share counters
and fail on duplicate names.

Counters that the app already keeps elsewhere (writer takeovers, webhook
calls) are read when scraped rather than mirrored, so they can never drift.

S3 request latency and errors: a store that ``ReportsCalls`` (the S3 store,
from its client's event hooks) tells ``Metrics.s3_calls``, a ``CallObserver``,
about each call; the store never sees Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from app.callbacks.notifier import CompletionNotifier
from app.core.budget import MemoryBudget
from app.engine.writers import WriterRegistry
from app.stores.base import ReportsCalls

NAMESPACE = "upload_proxy"

#: Upload requests run from milliseconds (probes) to many minutes (big bodies).
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0, 300.0, 600.0, float("inf"))
#: Webhook and S3 calls: a few ms when healthy, seconds when something is wrong.
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, float("inf"))



class _FunctionCounters(Collector):
    """Counters whose value is read from a function at scrape time."""

    def __init__(self) -> None:
        self._sources: dict[str, tuple[str, Callable[[], float]]] = {}

    def add(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._sources[f"{NAMESPACE}_{name}"] = (documentation, read)

    def describe(self) -> Iterator[Metric]:
        # Names only: reading the values while registering is not needed.
        for name, (documentation, _) in self._sources.items():
            yield CounterMetricFamily(name, documentation)

    def collect(self) -> Iterator[Metric]:
        for name, (documentation, read) in self._sources.items():
            yield CounterMetricFamily(name, documentation, value=float(read()))


class S3CallMetrics:
    """The ``CallObserver`` that counts a store's S3 calls. One per ``Metrics``,
    so observing with it twice reports each call once."""

    def __init__(self, duration: Histogram, errors: Counter) -> None:
        self._duration = duration
        self._errors = errors

    def __call__(self, operation: str, seconds: float, error: str | None) -> None:
        self._duration.labels(operation).observe(seconds)
        if error is not None:
            self._errors.labels(operation, error).inc()


class Metrics:
    """All metrics of one app; see ``docs`` in each metric for its meaning."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ns = NAMESPACE
        self.bytes_received = Counter(
            "bytes_received", "Request body bytes read from clients, resent overlap included.",
            namespace=ns, registry=r)
        self.bytes_stored = Counter(
            "bytes_stored", "Bytes newly and durably added to uploads (overlap skipped).",
            namespace=ns, registry=r)
        self.uploads_started = Counter(
            "uploads_started", "Uploads created (plain PUT, POST, or first chunk).",
            namespace=ns, registry=r)
        self.uploads_completed = Counter(
            "uploads_completed", "Uploads finished into an object by this process.",
            namespace=ns, registry=r)
        self.uploads_cancelled = Counter(
            "uploads_cancelled", "Uploads cancelled by a client DELETE.",
            namespace=ns, registry=r)
        self.uploads_failed = Counter(
            "uploads_failed", "Upload requests answered with a 5xx status.",
            namespace=ns, registry=r)
        self.uploads_in_progress = Gauge(
            "uploads_in_progress", "Requests currently writing or reading an upload.",
            namespace=ns, registry=r)
        self.buffered_bytes = Gauge(
            "buffered_bytes", "Upload bytes the store holds in memory right now.",
            namespace=ns, registry=r)
        self.http_requests = Counter(
            "http_requests", "HTTP requests by wire dialect, upload action and status code.",
            ["dialect", "action", "status"], namespace=ns, registry=r)
        self.http_request_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by wire dialect and upload action.",
            ["dialect", "action"], namespace=ns, registry=r, buckets=_REQUEST_BUCKETS)
        self.auth_duration = Histogram(
            "auth_duration_seconds",
            "Time to authorize a request (the auth webhook, or its cache).",
            namespace=ns, registry=r, buckets=_CALL_BUCKETS)
        self.auth_decisions = Counter(
            "auth_decisions",
            "Authorization outcomes: allowed, unauthorized, forbidden, refused, "
            "unavailable, error.",
            ["outcome"], namespace=ns, registry=r)
        self.s3_request_duration = Histogram(
            "s3_request_duration_seconds", "S3 API call duration (retries included).",
            ["operation"], namespace=ns, registry=r, buckets=_CALL_BUCKETS)
        self.s3_errors = Counter(
            "s3_errors", "Failed S3 API calls by S3 error code or transport exception.",
            ["operation", "code"], namespace=ns, registry=r)
        self.s3_calls = S3CallMetrics(self.s3_request_duration, self.s3_errors)
        self._function_counters = _FunctionCounters()
        r.register(self._function_counters)
        self.buffered_bytes.set_function(lambda: 0.0)

    # -- wiring ---------------------------------------------------------------

    def track_writers(self, writers: WriterRegistry) -> None:
        self.uploads_in_progress.set_function(lambda: float(writers.active))
        self._function_counters.add(
            "writer_takeovers",
            "Requests that took an upload over from a stalled earlier request.",
            lambda: writers.takeovers,
        )

    def track_store(self, current_store: Callable[[], object | None]) -> None:
        """``current_store`` returns the open store, or None before it is opened."""

        def buffered() -> float:
            value = getattr(current_store(), "buffered_bytes", 0)
            # A store without the attribute, or a mock, holds nothing we can see.
            return float(value) if isinstance(value, int | float) else 0.0

        self.buffered_bytes.set_function(buffered)

    def track_budget(self, budget: MemoryBudget) -> None:
        """The app's memory budget: its size, what is held, the peak, the
        requests waiting for it and the waits that timed out (503)."""
        r, ns = self.registry, NAMESPACE
        for name, doc, read in (
            ("memory_budget_bytes", "The memory budget (storage.memory_budget).",
             lambda: budget.limit),
            ("memory_held_bytes", "Bytes of the memory budget held right now.",
             lambda: budget.held),
            ("memory_held_peak_bytes", "Most bytes of the memory budget ever held at once.",
             lambda: budget.peak),
            ("memory_waiting_requests", "Requests waiting for the memory budget right now.",
             lambda: budget.waiting),
        ):
            gauge = Gauge(name, doc, namespace=ns, registry=r)
            gauge.set_function(lambda read=read: float(read()))
        self._function_counters.add(
            "memory_waits_timed_out",
            "Requests answered 503 after waiting storage.budget_wait for memory.",
            lambda: budget.timeouts,
        )

    def track_calls(self, store: object) -> None:
        """Count the backend calls of ``store`` if it ``ReportsCalls``."""
        if isinstance(store, ReportsCalls):
            store.observe_calls(self.s3_calls)

    def track_callbacks(self, notifier: CompletionNotifier) -> None:
        for name, doc, attr in (
            ("callbacks_delivered", "Completion callbacks the main application accepted.",
             "delivered"),
            ("callback_attempts_failed", "Completion callback attempts that failed.",
             "failed_attempts"),
            ("callbacks_given_up", "Completion callbacks left pending after all attempts.",
             "given_up"),
        ):
            self._function_counters.add(name, doc, lambda attr=attr: getattr(notifier, attr))

    def track_webhook_calls(self, read: Callable[[], float]) -> None:
        self._function_counters.add(
            "auth_webhook_calls", "Requests sent to the auth webhook (cache hits excluded).",
            read,
        )

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type, in the format the scraper's
        ``Accept`` header asks for (Prometheus text 0.0.4 when it asks nothing)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
