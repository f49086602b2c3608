"""SLO parsing and the numbers of a run (percentiles, throughput, goodput, verdicts) on synthetic records."""

from __future__ import annotations

import pytest

from loadtests.stream import Timing
from loadtests.summary import Record, Slo, SloError, is_good, parse_slos, summarize


def rec(start=0.0, ttft=0.1, itl=(0.01,), e2e=None, tokens=None, error=None, kind="chat") -> Record:
    itl = list(itl)
    tokens = len(itl) + 1 if tokens is None else tokens
    e2e = ttft + sum(itl) if e2e is None else e2e
    return Record(start, kind, Timing(ttft=ttft, itl=itl, e2e=e2e, output_tokens=tokens, error=error))


def test_parse_slos():
    assert parse_slos("ttft_p99=2.0, itl_p99=0.2,errors=0") == (
        Slo("ttft_p99", 2.0), Slo("itl_p99", 0.2), Slo("errors", 0.0))  # fmt: skip
    assert parse_slos("") == ()
    assert [s.metric for s in parse_slos("e2e_mean=5,tpot_max=1,error_rate=0.01")] == ["e2e", "tpot", None]


@pytest.mark.parametrize(
    "text, message",
    [
        ("ttft_p42=1", "unknown key 'ttft_p42'"),
        ("latency=1", "unknown key 'latency'"),
        ("ttft_p99", "expected KEY=VALUE"),
        ("ttft_p99=fast", "ttft_p99: expected a number"),
        ("errors=-1", "errors: -1.0 is out of range"),
        ("error_rate=2", "error_rate: 2.0 is out of range"),
        ("errors=0,errors=1", "errors is given twice"),
    ],
)
def test_bad_slos_name_the_key(text, message):
    with pytest.raises(SloError, match=message):
        parse_slos(text)


def test_percentiles_throughput_and_itl_over_all_gaps():
    # 100 requests, TTFT 0.01 .. 1.00 s, each with gaps (0.02, 0.04), one every 0.1 s
    records = [rec(start=i * 0.1, ttft=(i + 1) / 100, itl=(0.02, 0.04)) for i in range(100)]
    s = summarize(records)
    assert s["requests"] == s["completed"] == 100 and s["failures"] == 0
    assert s["ttft_s"]["p50"] == pytest.approx(0.505) and s["ttft_s"]["p99"] == pytest.approx(0.9901)
    assert s["ttft_s"]["mean"] == pytest.approx(0.505) and s["ttft_s"]["max"] == pytest.approx(1.0)
    assert s["itl_s"]["p50"] == pytest.approx(0.03) and s["itl_s"]["max"] == pytest.approx(0.04)
    assert s["tpot_s"]["mean"] == pytest.approx(0.03)  # (e2e - ttft) / (3 - 1)
    elapsed = 9.9 + 1.0 + 0.06  # the last request: sent at 9.9, TTFT 1.0, gaps 0.06
    assert s["elapsed_s"] == pytest.approx(elapsed)
    assert s["request_throughput_rps"] == pytest.approx(100 / elapsed)
    assert s["output_throughput_tok_s"] == pytest.approx(300 / elapsed) and s["total_output_tokens"] == 300
    assert s["goodput_rps"] == s["request_throughput_rps"] and s["slos"] == [] and s["slos_met"]


def test_tpot_spans_the_first_to_the_last_token_not_the_end_of_the_stream():
    # 4 tokens in 3 chunks (one chunk carries two), and [DONE] 0.3 s after the last token
    s = summarize([rec(ttft=0.1, itl=(0.02, 0.04), e2e=0.1 + 0.06 + 0.3, tokens=4)])
    assert s["tpot_s"]["p50"] == pytest.approx(0.06 / 3), "as vLLM's TPOT and guidellm's ITL"
    assert s["e2e_s"]["p50"] == pytest.approx(0.46) and s["itl_s"]["p50"] == pytest.approx(0.03)


def test_prompt_tokens_are_the_servers_counts_of_the_requests_that_reported_one():
    with_usage = [Record(0.0, "completions", Timing(ttft=0.1, e2e=0.2, output_tokens=2, prompt_tokens=n)) for n in
                  (90, 100)]  # fmt: skip
    without = Record(0.0, "completions", Timing(ttft=0.1, e2e=0.2, output_tokens=2))
    failed = Record(0.0, "completions", Timing(e2e=0.2, prompt_tokens=500, error="HTTP 503"))
    s = summarize([*with_usage, without, failed])
    assert s["prompt_tokens"]["mean"] == 95 and s["prompt_tokens"]["max"] == 100
    assert summarize([without])["prompt_tokens"] is None
    old_line = {"start": 0.0, "kind": "chat", "ok": True, "error": None, "ttft": 0.1, "itl": [], "e2e": 0.1,
                "output_tokens": 1}  # fmt: skip
    assert Record.from_json(old_line).timing.prompt_tokens is None, "records written before the field still load"


def test_goodput_counts_requests_that_meet_every_latency_slo():
    records = [
        rec(ttft=0.1, itl=(0.01, 0.01)),  # good
        rec(ttft=0.9, itl=(0.01,)),  # TTFT over the tightest ttft bound (0.5)
        rec(ttft=0.1, itl=(0.01, 0.5)),  # mean ITL 0.255 over 0.2
        rec(ttft=0.1, itl=(), tokens=1),  # one token: no ITL / TPOT, passes
        rec(ttft=0.1, itl=(0.01,), error="HTTP 500: boom", tokens=0),  # failed: never good
    ]
    slos = parse_slos("ttft_p99=1.0,ttft_p50=0.5,itl_p99=0.2,errors=0")
    assert [is_good(r, slos) for r in records] == [True, False, False, True, False]
    s = summarize(records, slos)
    assert s["good_requests"] == 2 and s["goodput_rps"] == pytest.approx(2 / s["elapsed_s"])
    assert s["failures"] == 1 and s["error_rate"] == 0.2 and s["errors"] == {"HTTP 500: boom": 1}
    verdicts = {v["key"]: (v["value"], v["met"]) for v in s["slos"]}
    assert verdicts["errors"] == (1, False) and verdicts["ttft_p50"] == (0.1, True) and verdicts["ttft_p99"][1]
    assert verdicts["itl_p99"][0] == pytest.approx(0.4804) and not verdicts["itl_p99"][1]
    assert not s["slos_met"]


def test_tpot_slo_and_a_metric_without_data_is_missed():
    records = [rec(ttft=0.1, itl=(), tokens=1), rec(ttft=0.2, itl=(), tokens=1)]
    s = summarize(records, parse_slos("tpot_p99=1.0,ttft_max=0.2"))
    assert s["tpot_s"] is None and s["itl_s"] is None
    assert s["slos"] == [
        {"key": "tpot_p99", "threshold": 1.0, "value": None, "met": False},
        {"key": "ttft_max", "threshold": 0.2, "value": 0.2, "met": True},
    ]
    with pytest.raises(ValueError, match="no request finished"):
        summarize([])
