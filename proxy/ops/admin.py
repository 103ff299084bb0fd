"""Operating the proxy: Prometheus metrics, liveness and readiness, the admin endpoints.

Theory of operation. :class:`Metrics` owns one prometheus-client registry per server
(not the library's global one, so that tests and embedded uses stay independent) and
offers a few methods that the server calls where things happen: a connection opens or
closes, a handshake ends, a request is answered, an upstream fails, a TCP tunnel opens,
moves bytes or ends, a generation is installed, a reload ends (``reload_finished``, for
generation/reload.py). Token signatures reach it through the token's :data:`SignatureObserver`,
beside the audit log (:meth:`Metrics.observe_signature`).

Under ``--workers`` each worker's metrics live in prometheus-client's multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor), which the supervisor's endpoint
adds up (ops/fleet.py): counters and histograms are summed, including what workers that
have since exited counted; each gauge says how it combines (``multiprocess_mode``: open
connections add up, a certificate's expiry is the earliest any live worker serves, the
generation number is per worker, with a ``pid`` label). A gauge computed on demand
(``set_function``) is not written to those files, so there the token queue depth is
sampled once a second instead (:meth:`Metrics.sample`), and a server name a reload dropped
is left at +Inf, which the supervisor leaves out (the files cannot forget a label).

:class:`Readiness` answers "should this instance get traffic?". It is ready when a test
signature by the token key verified against the certificate recently (the server probes
every ``probe_interval`` seconds, and every handshake signature counts too, so a failing
token flips it at once), the served certificate is within its validity dates, and the
upstream accepted a TCP connection at the last probe. :meth:`Readiness.add_check` is the
seam for more conditions (token health from the token layer, routes, ...).

:class:`AdminEndpoint` is sans-IO, like http/rules.py: it maps a request's method and path
to a status, headers and body (``/healthz``, ``/readyz``, ``/metrics``). The admin
listener is net/server.py's and its HTTP side http/admin.py's; the probes that need the
token or the network (net/readiness.py: :func:`sign_probes` in a worker thread, a TCP
connection to each upstream group) report here.
"""

from __future__ import annotations

import datetime
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from proxy import __version__
from proxy.config import AdminConfig
from proxy.errors import ProxyError
from proxy.ops.logs import connection_context
from proxy.pkcs11.keys import SignatureEvent
from proxy.pkcs11.testsign import PublicKey, SignedDigest, sign_test_digest, verifies
from proxy.pkcs11.token import Token, TokenKey
from proxy.tls.certificates import Chain, not_valid_before

# Handshakes and token signatures are milliseconds on a local token, tens of ms on a
# network HSM (CloudHSM), seconds when something is wrong.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


# Who or what ends a TCP passthrough connection (the access line's closed_by).
TCP_CLOSED_BY = ("client", "upstream", "idle_timeout", "max_lifetime", "drain", "error")


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


@dataclass(frozen=True)
class ServedCertificate:
    """What readiness and metrics need of a served chain, read once when it is installed.

    cryptography's certificate objects must not be used from two threads at once (its Rust
    objects raise "Already borrowed"), and the readiness probe uses the chain in a worker
    thread; so the trio thread reads these facts up front and never touches the chain again.
    """

    names: tuple[str, ...]
    source: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    public_key: PublicKey = field(compare=False, repr=False)  # used in the trio thread only

    @classmethod
    def of(cls, chain: Chain) -> ServedCertificate:
        starts = max(not_valid_before(certificate) for certificate in chain.certificates)
        return cls(
            tuple(server_names(chain)),
            chain.source,
            starts,
            chain.not_after(),
            chain.leaf.public_key(),  # type: ignore[arg-type]
        )


def server_names(chain: Chain) -> list[str]:
    """The DNS names and IP addresses the leaf certificate is valid for (its SAN)."""
    try:
        san = chain.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [chain.leaf.subject.rfc4514_string()]
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names += [str(address) for address in san.get_values_for_type(x509.IPAddress)]
    return names


# Set by the --workers supervisor for its workers (prometheus-client's own variable).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A server name's expiry that a reload dropped, in multiprocess files (left out when read).
DROPPED_EXPIRY = math.inf
READY_METRIC = "hsm_proxy_ready"
EXPIRY_METRIC = "hsm_proxy_certificate_expiry_timestamp_seconds"


class Metrics:
    """Every metric hsm-proxy exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # A worker of a --workers supervisor: values go to the shared multiprocess files.
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self._sampled: list[tuple[Gauge, Callable[[], int]]] = []
        self._expiry_names: set[str] = set()
        r = self.registry
        Gauge(
            "hsm_proxy_info",
            "hsm-proxy version",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        ).labels(__version__).set(1)
        self.connections_open = Gauge(
            "hsm_proxy_connections_open",
            "Client TCP connections open now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections = Counter(
            "hsm_proxy_connections", "Client TCP connections accepted", registry=r
        )
        self.connections_refused = Counter(
            "hsm_proxy_connections_refused",
            "Client connections closed at once, by reason (max_connections, handshake_limit, "
            "handshake_rate)",
            ["reason"],
            registry=r,
        )
        self.handshakes = Counter(
            "hsm_proxy_handshakes",
            "TLS handshakes by protocol version and result (ok, failed, timeout)",
            ["version", "result"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "hsm_proxy_handshake_duration_seconds",
            "Duration of successful TLS handshakes, token signature included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Counter(
            "hsm_proxy_tls_sessions",
            "Successful handshakes by kind: full (one token signature) or resumed (none)",
            ["kind"],
            registry=r,
        )
        self.signatures = Counter(
            "hsm_proxy_token_signatures",
            "Signatures made by the token, by mechanism and result",
            ["mechanism", "result"],
            registry=r,
        )
        self.signature_seconds = Histogram(
            "hsm_proxy_token_signature_duration_seconds",
            "Latency of one token signature (session wait included), by mechanism",
            ["mechanism"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sign_queue = Gauge(
            "hsm_proxy_token_queue_depth",
            "Handshake steps waiting for a token session slot (each may need a signature)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "hsm_proxy_requests",
            "HTTP requests answered, by status class (2xx, 4xx, 5xx, ...)",
            ["status_class"],
            registry=r,
        )
        self.protocol_requests = Counter(
            "hsm_proxy_protocol_requests",
            "HTTP requests answered, by the protocol the client spoke (http/1.1, h2)",
            ["protocol"],
            registry=r,
        )
        self.http2_streams_active = Gauge(
            "hsm_proxy_http2_streams_active",
            "HTTP/2 streams being served now (a request forwarded or being answered)",
            registry=r,
        )
        self.http2_resets = Counter(
            "hsm_proxy_http2_resets",
            "HTTP/2 RST_STREAM frames, by direction (sent by the proxy, received from clients)",
            ["direction"],
            registry=r,
        )
        self.http2_protocol_errors = Counter(
            "hsm_proxy_http2_protocol_errors",
            "HTTP/2 connections and streams ended for what the client sent, by kind "
            "(uppercase_header, connection_header, pseudo_header, content_length, "
            "authority_host, header_list_size, rapid_reset, continuation_flood, "
            "control_flood, zero_window, stream_id, flow_control, protocol ...)",
            ["kind"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "hsm_proxy_upstream_errors",
            "Upstream failures by kind (connect, connect_timeout, read_timeout, reset, protocol)",
            ["kind"],
            registry=r,
        )
        self.reloads = Counter(
            "hsm_proxy_reloads",
            "Reloads of certificates, PIN and keys, by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            EXPIRY_METRIC,
            "Not-after time of the served certificate, per server name (Unix time)",
            ["server_name"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.generation = Gauge(
            "hsm_proxy_generation",
            "Number of the generation being served",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.ready = Gauge(
            READY_METRIC,
            "1 when /readyz says ready, else 0 (as of the last probe)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.tcp_tunnels_open = Gauge(
            "hsm_proxy_tcp_tunnels_open",
            "TCP passthrough tunnels relaying bytes now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tcp_connections = Counter(
            "hsm_proxy_tcp_connections",
            "Client connections served by TCP passthrough, counted when they end, by who or "
            "what ended them (client, upstream, idle_timeout, max_lifetime, drain, error)",
            ["closed_by"],
            registry=r,
        )
        self.tcp_bytes = Counter(
            "hsm_proxy_tcp_bytes",
            "Bytes relayed by TCP passthrough, by direction (up: client to upstream, down: "
            "upstream to client)",
            ["direction"],
            registry=r,
        )
        self.tcp_connect_failures = Counter(
            "hsm_proxy_tcp_upstream_connect_failures",
            "TCP passthrough connects that failed, per address tried, by kind (connect, "
            "connect_timeout)",
            ["kind"],
            registry=r,
        )
        # Label values known in advance appear at 0, so rate() works from the first scrape.
        for closed_by in TCP_CLOSED_BY:
            self.tcp_connections.labels(closed_by)
        for reason in ("max_connections", "handshake_limit", "handshake_rate"):
            self.connections_refused.labels(reason)
        for kind in ("connect", "connect_timeout"):
            self.tcp_connect_failures.labels(kind)
        self._tcp_up = self.tcp_bytes.labels("up")
        self._tcp_down = self.tcp_bytes.labels("down")
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for kind in ("full", "resumed"):
            self.sessions.labels(kind)
        for direction in ("sent", "received"):
            self.http2_resets.labels(direction)
        self._protocol_counters = {
            protocol: self.protocol_requests.labels(protocol) for protocol in ("http/1.1", "h2")
        }
        # labels() costs more than the increment: the per-request children are kept.
        self._request_counters: dict[int, Counter] = {}
        self._handshake_counters: dict[tuple[str | None, str], Counter] = {}

    # -- hooks the server and the token call ----------------------------------------------

    def connection_opened(self) -> None:
        self.connections.inc()
        self.connections_open.inc()

    def connection_closed(self) -> None:
        self.connections_open.dec()

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def handshake_finished(
        self, version: str | None, result: str, seconds: float, resumed: bool = False
    ) -> None:
        counter = self._handshake_counters.get((version, result))
        if counter is None:
            counter = self.handshakes.labels(version or "none", result)
            self._handshake_counters[(version, result)] = counter
        counter.inc()
        if result == "ok":
            self.handshake_seconds.observe(seconds)
            self.sessions.labels("resumed" if resumed else "full").inc()

    def request_answered(self, status: int, protocol: str = "http/1.1") -> None:
        counter = self._request_counters.get(status)
        if counter is None:
            counter = self._request_counters[status] = self.requests.labels(status_class(status))
        counter.inc()
        self._protocol_counters[protocol].inc()

    def http2_reset(self, sent: bool) -> None:
        self.http2_resets.labels("sent" if sent else "received").inc()

    def http2_protocol_error(self, kind: str) -> None:
        self.http2_protocol_errors.labels(kind).inc()

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind or "other").inc()

    def tunnel_opened(self) -> None:
        self.tcp_tunnels_open.inc()

    def tunnel_closed(self) -> None:
        self.tcp_tunnels_open.dec()

    def tcp_connection_ended(self, closed_by: str) -> None:
        self.tcp_connections.labels(closed_by).inc()

    def tcp_moved(self, up: bool, size: int) -> None:
        """Bytes relayed by a tunnel: ``up`` from the client to the upstream, else back."""
        (self._tcp_up if up else self._tcp_down).inc(size)

    def tcp_connect_failed(self, kind: str) -> None:
        self.tcp_connect_failures.labels(kind).inc()

    def reload_finished(self, ok: bool) -> None:
        """For the reloader: count one reload attempt (the old generation stays on failure)."""
        self.reloads.labels("ok" if ok else "failed").inc()

    def generation_installed(self, number: int, served: Sequence[ServedCertificate]) -> None:
        """The server serves a new generation: export its number and certificates' expiry."""
        self.generation.set(number)
        names = {name for certificate in served for name in certificate.names}
        if self.multiprocess:
            for dropped in self._expiry_names - names:
                self.certificate_expiry.labels(dropped).set(DROPPED_EXPIRY)
        else:
            self.certificate_expiry.clear()
        self._expiry_names = names
        for certificate in served:
            for name in certificate.names:
                self.certificate_expiry.labels(name).set(certificate.not_after.timestamp())

    def track_queue(self, waiting: Callable[[], int]) -> None:
        if self.multiprocess:
            self._sampled.append((self.sign_queue, waiting))
        else:
            self.sign_queue.set_function(lambda: float(waiting()))

    def sample(self) -> None:
        """Multiprocess mode: write the gauges that are computed on demand (the server
        calls this once a second)."""
        for gauge, value in self._sampled:
            gauge.set(value())

    def observe_signature(self, event: SignatureEvent) -> None:
        """Token observer (called from worker threads; prometheus-client is thread-safe)."""
        mechanism = event.mechanism.value
        self.signatures.labels(mechanism, "ok" if event.ok else "error").inc()
        self.signature_seconds.labels(mechanism).observe(event.seconds)


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass
class _Probe:
    ok: bool
    detail: str
    at: float  # time.monotonic()


class Readiness:
    """What /readyz reports: recent probe outcomes plus checks evaluated on each request."""

    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._signature: _Probe | None = None
        self._upstream: _Probe | None = None
        self._served: tuple[ServedCertificate, ...] = ()
        self._extra: list[Callable[[], CheckResult]] = []

    def add_check(self, check: Callable[[], CheckResult]) -> None:
        """A seam for other modules: one more condition /readyz requires."""
        self._extra.append(check)

    def serving(self, served: Sequence[ServedCertificate]) -> None:
        self._served = tuple(served)

    def signature_result(self, ok: bool, detail: str) -> None:
        with self._lock:
            self._signature = _Probe(ok, detail, time.monotonic())

    def upstream_result(self, ok: bool, detail: str) -> None:
        with self._lock:
            self._upstream = _Probe(ok, detail, time.monotonic())

    def observe_signature(self, event: SignatureEvent) -> None:
        """Token observer: every handshake signature is evidence the token works (or not)."""
        if event.ok:
            self.signature_result(True, f"signature by {event.key_uri} succeeded")
        else:
            self.signature_result(False, f"signature by {event.key_uri} failed: {event.error}")

    def _probe_check(self, name: str, probe: _Probe | None, now: float) -> CheckResult:
        if probe is None:
            return CheckResult(name, False, "not probed yet")
        age = now - probe.at
        if probe.ok and age > self.max_age:
            return CheckResult(name, False, f"last success {age:.0f}s ago (stale)")
        return CheckResult(name, probe.ok, probe.detail)

    def checks(self) -> list[CheckResult]:
        now = time.monotonic()
        with self._lock:
            results = [
                self._probe_check("token", self._signature, now),
                self._probe_check("upstream", self._upstream, now),
            ]
        if not self._served:
            results.append(CheckResult("certificate", False, "no certificate loaded"))
        wall = datetime.datetime.now(datetime.UTC)
        for served in self._served:
            names = ", ".join(served.names)
            if wall < served.not_before:
                detail = f"not valid before {served.not_before:%Y-%m-%dT%H:%M:%SZ}"
            elif wall > served.not_after:
                detail = f"expired on {served.not_after:%Y-%m-%dT%H:%M:%SZ}"
            else:
                detail = f"valid until {served.not_after:%Y-%m-%dT%H:%M:%SZ}"
            ok = detail.startswith("valid until")
            where = names if ok else f"{served.source} ({names})"
            results.append(CheckResult("certificate", ok, f"{where} {detail}"))
        results += [check() for check in self._extra]
        return results


def sign_probes(keys: Sequence[TokenKey]) -> list[SignedDigest] | str:
    """Worker thread: one test signature per served key, or why the token failed. Touches no
    certificate object. The audit lines say ``purpose: readiness_probe``."""
    connection_context.set({"purpose": "readiness_probe"})
    try:
        return [sign_test_digest(key, b"hsm-proxy readiness probe") for key in keys]
    except ProxyError as exc:
        return str(exc)


def token_state(*tokens: Token) -> CheckResult:
    """The token layer's own view of every token: down (failing, being recovered) or
    usable. Each token recovers on its own; any one down makes this check fail."""
    down = [
        f"token {token.label!r} unusable: {token.unusable_reason}"
        for token in tokens
        if token.unusable_reason is not None
    ]
    if down:
        return CheckResult("token_state", False, "; ".join(down))
    labels = ", ".join(repr(token.label) for token in tokens)
    return CheckResult("token_state", True, f"token {labels} usable")


class Operations:
    """Metrics, readiness and the admin listener's settings, shared by the server and CLI."""

    def __init__(self, config: AdminConfig | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        interval = config.probe_interval if config is not None else 10.0
        # A probe result stays good for three probe intervals: one slow probe is not a flap.
        self.readiness = Readiness(max_age=3 * interval)
        self.endpoint = AdminEndpoint(self.metrics, self.readiness)
        self._generation: int | None = None
        self._served: list[ServedCertificate] = []

    def observe_signature(self, event: SignatureEvent) -> None:
        self.metrics.observe_signature(event)
        self.readiness.observe_signature(event)

    def serving(self, number: int, chains: Sequence[Chain]) -> None:
        """Called with the current generation's number and served chains whenever it may
        have changed (cheap when it has not)."""
        if number != self._generation:
            self._generation = number
            self._served = [ServedCertificate.of(chain) for chain in chains]
            self.metrics.generation_installed(number, self._served)
            self.readiness.serving(self._served)

    def probe_signed(self, outcome: list[SignedDigest] | str) -> None:
        """Trio thread: verify the probe's signatures (from :func:`sign_probes`, made by the
        keys of the chains last given to :meth:`serving`, in order) and record the result."""
        if isinstance(outcome, str):
            self.readiness.signature_result(False, outcome)
            return
        for test, served in zip(outcome, self._served, strict=True):
            if not verifies(served.public_key, test):
                self.readiness.signature_result(
                    False,
                    f"a test signature by the token key does not verify against {served.source}",
                )
                return
        self.readiness.signature_result(
            True, f"test signature verified against the certificate ({len(outcome)} key(s))"
        )


AdminAnswer = tuple[int, list[tuple[str, str]], bytes]
_TEXT = ("content-type", "text/plain; charset=utf-8")


def common_answer(method: str, target: str) -> tuple[str, AdminAnswer | None]:
    """The path asked for, and the answer when every admin endpoint gives the same one
    (an unknown path, a method other than GET and HEAD, ``/healthz``); None for
    ``/readyz`` and ``/metrics``, which are the endpoint's own."""
    path = target.split("?", 1)[0]
    if path not in ("/healthz", "/readyz", "/metrics"):
        return path, (404, [_TEXT], b"not found; try /healthz, /readyz or /metrics\n")
    if method not in ("GET", "HEAD"):
        return path, (405, [_TEXT, ("allow", "GET, HEAD")], b"method not allowed\n")
    if path == "/healthz":
        return path, (200, [_TEXT], b"ok\n")
    return path, None


def readiness_answer(ready: bool, lines: Sequence[str]) -> AdminAnswer:
    """``/readyz``: 200 or 503, "ready" or "not ready", then one line per check."""
    body = "\n".join(["ready" if ready else "not ready", *lines]) + "\n"
    return (200 if ready else 503), [_TEXT], body.encode()


class AdminEndpoint:
    """The admin HTTP answers, sans-IO: (method, target) in, (status, headers, body) out."""

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self.metrics = metrics
        self.readiness = readiness

    def respond(self, method: str, target: str) -> AdminAnswer:
        path, answer = common_answer(method, target)
        if answer is not None:
            return answer
        if path == "/readyz":
            results = self.readiness.checks()
            ready = all(result.ok for result in results)
            self.metrics.ready.set(1 if ready else 0)
            return readiness_answer(
                ready,
                [
                    f"{'ok' if result.ok else 'FAIL'} {result.name}: {result.detail}"
                    for result in results
                ],
            )
        return 200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(self.metrics.registry)
