"""The metrics sink on Ray: ray.util.metrics instruments, exported on each node's Ray metrics port.

Why Ray's export rather than a /metrics route per replica: replicas come and go and several share a
node; Ray's metrics agent aggregates every replica's instruments and serves them on one port per node
(`ray_` is prepended to each name), which is also what KubeRay's PodMonitor scrapes. A prometheus_client
registry inside a replica would only be visible on that process's own HTTP route.
"""

from __future__ import annotations

from ray.util import metrics as ray_metrics

from serving.metrics import Metric


class RaySink:
    """Creates each instrument once per process, on first use."""

    def __init__(self) -> None:
        self._instruments: dict[str, object] = {}

    def _instrument(self, metric: Metric):
        if metric.name not in self._instruments:
            if metric.kind == "counter":
                made = ray_metrics.Counter(metric.name, metric.description, tag_keys=metric.labels)
            elif metric.kind == "gauge":
                made = ray_metrics.Gauge(metric.name, metric.description, tag_keys=metric.labels)
            else:
                made = ray_metrics.Histogram(metric.name, metric.description, list(metric.buckets), metric.labels)
            self._instruments[metric.name] = made
        return self._instruments[metric.name]

    def record(self, metric: Metric, value: float, labels: dict[str, str]) -> None:
        instrument = self._instrument(metric)
        if metric.kind == "counter":
            if value > 0:  # Ray's Counter refuses inc(0); adding nothing is a no-op anyway
                instrument.inc(value, tags=labels)
        elif metric.kind == "gauge":
            instrument.set(value, tags=labels)
        else:
            instrument.observe(value, tags=labels)
