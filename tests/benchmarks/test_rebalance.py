"""benchmarks/rebalance.py's arithmetic: quantiles from scraped histogram buckets, the worst starting
placement from measured load, and what counts as a failed request in a phase."""

from __future__ import annotations

import pytest

from benchmarks.rebalance import hot_half_first, quantile, quantiles_by, tokens_between
from loadtests.stream import NO_CONTENT, Timing
from loadtests.summary import Record


def test_quantile_interpolates_within_a_bucket_as_promql_does():
    buckets = {0.001: 0.0, 0.002: 10.0, 0.005: 30.0, float("inf"): 40.0}  # cumulative counts
    assert quantile(buckets, 0.5) == pytest.approx(0.002 + 0.003 * (20 - 10) / (30 - 10))
    assert quantile(buckets, 0.25) == pytest.approx(0.001 + 0.001 * 10 / 10)
    assert quantile(buckets, 0.9) == 0.005  # in the +Inf bucket: its lower bound
    assert quantile({0.001: 0.0, float("inf"): 0.0}, 0.5) is None  # nothing observed


def test_quantiles_are_grouped_by_the_label_in_numeric_order():
    hist = {}
    for layer, below in (("10", 2.0), ("2", 8.0), ("3", 5.0)):  # observations <= 1 ms out of 10, per layer
        for le, n in (("0.001", below), ("0.01", 10.0), ("+Inf", 10.0)):
            hist[frozenset({("layer", layer), ("le", le)})] = n
    got = quantiles_by(hist, "layer")
    assert list(got) == ["2", "3", "10"]
    assert got["2"]["p50"] == pytest.approx(0.001 * 5 / 8)  # within the first bucket, from 0
    assert got["3"]["p50"] == pytest.approx(0.001)
    assert got["10"]["p50"] == pytest.approx(0.001 + 0.009 * 3 / 8)


def test_the_worst_start_puts_each_layers_hottest_half_on_shard_0():
    load = [[5, 1, 9, 0, 3, 7], [0, 0, 1, 2, 3, 4]]
    assert hot_half_first(load) == [[[0, 2, 5], [1, 3, 4]], [[3, 4, 5], [0, 1, 2]]]


def record(start, error=None, ttft=0.1, itl=(0.05, 0.05)):
    timing = Timing(ttft=ttft, itl=list(itl), e2e=0.3, output_tokens=3, error=error)
    return Record(start=start, kind="completions", timing=timing)


def test_a_phase_counts_tokens_and_keeps_empty_streams_apart_from_failed_ones():
    records = [
        record(10.0),  # tokens at 10.1, 10.15, 10.2
        record(10.5, error=NO_CONTENT, ttft=None, itl=()),  # whole stream, no text: empty
        record(11.0, error="HTTP 503"),  # lost
        record(30.0),  # starts after the phase
    ]
    tok_s, itl, failed, empty = tokens_between(records, 10.0, 20.0)
    assert tok_s == pytest.approx(3 / 10.0) and itl == pytest.approx(0.05)
    assert (failed, empty) == (1, 1)
