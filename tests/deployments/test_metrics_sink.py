"""The Ray metrics sink accepts every value the engine records, including a step that sampled nothing."""

from __future__ import annotations

from deployments.metrics import RaySink
from serving import metrics


def test_zero_counter_increment_is_a_no_op_not_an_error(serve_url):
    sink = RaySink()
    sink.record(metrics.GENERATED_TOKENS, 0, {"model": "m"})  # Ray's Counter.inc(0) raises ValueError
    sink.record(metrics.GENERATED_TOKENS, 3, {"model": "m"})
    sink.record(metrics.KV_USAGE, 0.0, {"model": "m", "replica": "r"})
    sink.record(metrics.STEP, 0.01, {"model": "m"})


def test_every_declared_metric_is_accepted_with_its_labels(serve_url):
    sink = RaySink()
    for metric in metrics.ALL:  # a histogram's buckets, a gauge's or counter's tag keys: as Ray takes them
        sink.record(metric, 1, dict.fromkeys(metric.labels, "0"))
