"""One server's numbers in Prometheus' model, for ``GET /metrics``.

Every server has a registry of its own, so two servers in one process (s1 and s2 in a test) never
count into each other. What changes per byte is a plain int the network layer adds to; what is a
state (sessions, channels, buffers) is read from the server when scraped, so nothing is kept twice.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from spicewire.server.net import SpiceServer

# Downtimes run from about a millisecond (an idle session) to seconds (a GiB in flight).
DOWNTIME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, server: SpiceServer) -> None:
        self.server = server
        self.bytes_in = 0  # socket bytes, every channel, added by the network layer
        self.bytes_out = 0
        self.registry = CollectorRegistry()
        self.migrations = Counter(
            "spicewire_migrations", "Sessions migrated, by side (source/destination), mode and result",
            ["role", "mode", "result"], registry=self.registry,
        )
        self.downtime = Histogram(
            "spicewire_migration_downtime_seconds",
            "From SPICE_MSG_MIGRATE sent to the session active on the destination (source side)",
            buckets=DOWNTIME_BUCKETS, registry=self.registry,
        )
        self.link_failures = Counter(
            "spicewire_link_failures", "Links that did not become a channel, by reason",
            ["reason"], registry=self.registry,
        )
        self.registry.register(_LiveState(self))

    def migration(self, role: str, mode: str | None, result: str, downtime: float | None = None) -> None:
        self.migrations.labels(role, mode or "none", result).inc()
        if downtime is not None:
            self.downtime.observe(downtime)

    def link_failed(self, reason: str) -> None:
        self.link_failures.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState:
    """The gauges read off the server at scrape time, and the byte counters."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        server = self.metrics.server
        sessions = list(server.sessions.values())
        yield GaugeMetricFamily("spicewire_sessions", "Sessions on this server", value=len(sessions))
        channels = GaugeMetricFamily("spicewire_channels", "Channel connections, by channel type", labels=["type"])
        kinds = Tally(conn.channel.channel_type.name.lower() for conn in server.connections if conn.channel is not None)
        for kind in ("main", "port"):
            channels.add_metric([kind], kinds.get(kind, 0))
        yield channels
        buffered = GaugeMetricFamily(
            "spicewire_buffered_bytes", "Bytes ports hold, by direction (to_device: from clients)",
            labels=["direction"],
        )
        buffered.add_metric(["to_device"], sum(p.to_device_bytes for s in sessions for p in s.ports.values()))
        buffered.add_metric(["to_client"], sum(p.to_client_bytes for s in sessions for p in s.ports.values()))
        yield buffered
        received = CounterMetricFamily("spicewire_received_bytes", "Bytes read from SPICE sockets")
        received.add_metric([], self.metrics.bytes_in)
        yield received
        sent = CounterMetricFamily("spicewire_sent_bytes", "Bytes written to SPICE sockets")
        sent.add_metric([], self.metrics.bytes_out)
        yield sent
