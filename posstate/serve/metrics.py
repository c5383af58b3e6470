"""``GET /metrics``: Prometheus text built with prometheus-client from the source's counters at each scrape.

Each server has its own registry (never the process-global one), so two servers, or a bot that exports its
own metrics, do not collide. The fsync histogram observes every sync of this process
(:func:`posstate.storage.fileops.observe_syncs`): for ``manager.serve()``/``store.serve()`` that is the bot's
own fsync latency; ``posstate serve`` runs in another process and never syncs, so its histogram stays empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from posstate.serve.sources import Source
from posstate.storage import fileops as fs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _SourceCollector(Collector):
    def __init__(self, source: Source, health: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        self._source = source
        self._health = health

    def collect(self) -> Iterator[Metric]:
        s = self._source
        st = s.stats
        for name, value, doc in (
            ("saves", st.saves, "State file saves seen (snapshots written)"),
            ("updates", st.updates, "Changes published (positions, metadata, orders, balances)"),
            ("compactions", st.compactions, "Journal compactions seen (a new journal started)"),
            ("backups", st.backups, "Backups created"),
            ("recoveries", st.recoveries, "Automatic recoveries"),
            ("stream_drops", s.dropped, "Stream clients dropped for falling behind (resync) or not reading"),
            ("stream_heartbeat_timeouts", st.heartbeat_timeouts, "Stream clients dropped for sending no heartbeat"),
            ("connections_refused", st.connections_refused, "Connections closed at once: max_connections were open"),
        ):
            c = CounterMetricFamily(f"posstate_{name}", doc)
            c.add_metric([], value)
            yield c
        queues = s.streams()
        pending = [s.fanout.pending(q) for q in queues]
        use = max((n / q.maxsize for n, q in zip(pending, queues, strict=True)), default=0.0)
        healthy, body = self._health()
        view = s.view()
        now = time.time()
        gauges: list[tuple[str, float | int | None, str]] = [
            ("stream_clients", len(queues), "Connected stream clients"),
            ("stream_queue_items", sum(pending), "Changes not yet sent to stream clients, all clients"),
            ("stream_queue_use_ratio", use, "Stream client furthest behind, as a fraction of queue_size"),
            ("snapshot_version", view.version, "Version of the state being served"),
            ("snapshot_version_age_seconds", max(0.0, now - view.changed_at), "Seconds since the served state last changed"),
            ("generation", view.generation, "Generation of the state being served"),
            ("healthy", 1 if healthy else 0, "1 when /api/health answers 200"),
            ("last_save_age_seconds", body["last_save"]["age_seconds"], "Seconds since the state file was written"),
            ("journal_bytes", body["journal"]["bytes"], "Size of the journal files (.next included)"),
            ("backups_count", body["backups"], "Backups in the backup directory"),
        ]
        newest = body["newest_backup"]
        gauges.append(("newest_backup_age_seconds", newest["age_seconds"] if newest else None, "Age of the newest backup"))
        gauges.append(("replica_lag_seconds", body["replica"]["lag_seconds"], "Replica lag (absent: no replica)"))
        for gname, gvalue, gdoc in gauges:
            if gvalue is None or (isinstance(gvalue, float) and math.isnan(gvalue)):
                continue  # unknown: no sample rather than a made-up zero
            g = GaugeMetricFamily(f"posstate_{gname}", gdoc)
            g.add_metric([], float(gvalue))
            yield g


class Metrics:
    """The server's registry; :meth:`close` stops observing fsyncs."""

    def __init__(self, source: Source, health: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.fsync = Histogram(
            "posstate_fsync_seconds",
            "Duration of fsync/fdatasync calls in this process",
            buckets=_FSYNC_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SourceCollector(source, health))
        self._stop = fs.observe_syncs(self.fsync.observe)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def close(self) -> None:
        self._stop()
