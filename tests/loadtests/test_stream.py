"""Timing a streamed response (TTFT, ITL, TPOT, output tokens) and building the workload's requests."""

from __future__ import annotations

import argparse
import itertools
import json

import pytest

from loadtests.stream import Timing, chunk_content, time_stream
from loadtests.workload import RAG_RETRIEVAL, Workload, add_locust_arguments, parse_word_range


def sse(*events) -> list[str]:
    """SSE lines as a server writes them: `data: ...` then a blank separator."""
    lines = []
    for e in events:
        lines += [f"data: {e if isinstance(e, str) else json.dumps(e)}", ""]
    return lines


def chat(content=None, role=None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta}]}


def ticking_clock(step: float = 0.5):
    """A clock that advances `step` on every read: line i of a stream is read at (i + 1) * step."""
    ticks = itertools.count(1)
    return lambda: next(ticks) * step


def test_ttft_is_the_first_content_chunk_not_the_role_or_empty_chunk():
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}
    lines = sse(chat("", role="assistant"), chat(), chat("Hel"), chat("lo"), chat(" world"), usage, "[DONE]")
    t = time_stream(lines, sent=0.0, clock=ticking_clock(0.5))
    # 14 lines read at 0.5, 1.0, ...: content arrives on lines 5, 7, 9 (times 2.5, 3.5, 4.5)
    assert t.error is None
    assert t.ttft == 2.5 and t.itl == [1.0, 1.0]
    assert t.content_chunks == 3 and t.output_tokens == 7  # the usage chunk wins over the chunk count
    assert t.prompt_tokens == 3  # the server's count of the prompt, from the same chunk
    assert t.e2e == 7.0  # [DONE] is line 13 (6.5); one more read at the end
    assert t.tpot == pytest.approx((4.5 - 2.5) / 6), "first to last content chunk: not the usage chunk or [DONE]"


def test_completions_chunks_without_usage_count_chunks_as_tokens():
    text = lambda s: {"choices": [{"index": 0, "text": s}]}  # noqa: E731
    t = time_stream([line.encode() for line in sse(text("a"), text(""), text("b"), "[DONE]")], 0.0, ticking_clock())
    assert t.error is None and t.output_tokens == 2 and t.content_chunks == 2 and len(t.itl) == 1
    assert t.prompt_tokens is None, "no usage: the prompt's length in tokens is unknown"


@pytest.mark.parametrize(
    "lines, error",
    [
        (sse(chat("a"), {"error": {"message": "engine died"}}, "[DONE]"), "stream error: engine died"),
        (sse(chat("a"), chat("b")), "stream ended without data: [DONE]"),
        (sse(chat("", role="assistant"), "[DONE]"), "no chunk carried content (no TTFT)"),
    ],
)
def test_failed_streams(lines, error):
    assert time_stream(lines, 0.0, ticking_clock()).error == error


def test_single_token_has_no_tpot_and_records_are_json():
    t = Timing(ttft=0.2, itl=[], e2e=0.2, output_tokens=1)
    assert t.tpot is None
    record = json.loads(json.dumps(t.record(start=1.0, kind="chat")))
    assert record == {"start": 1.0, "kind": "chat", "ok": True, "error": None, "ttft": 0.2, "itl": [], "e2e": 0.2,
                      "output_tokens": 1, "prompt_tokens": None}  # fmt: skip
    assert chunk_content({"choices": [{"delta": None}]}) == "" and chunk_content({"choices": []}) == ""


def test_workload_bodies_for_chat_completions_and_rag():
    w = Workload(max_tokens=16, rag=True, ignore_eos=True)
    chat_body = w.body("chat", "demo", "hello there")
    assert chat_body["messages"] == [{"role": "user", "content": "hello there"}] and "prompt" not in chat_body
    assert chat_body["stream"] and chat_body["stream_options"] == {"include_usage": True}
    assert chat_body["retrieval"] == RAG_RETRIEVAL and chat_body["ignore_eos"] and chat_body["max_tokens"] == 16
    plain = Workload().body("completions", "demo", "hi")
    assert plain["prompt"] == "hi" and "retrieval" not in plain and "ignore_eos" not in plain


def test_prompts_are_seeded_and_within_the_word_range():
    w = Workload(prompt_words=(3, 5), chat_fraction=0.5, seed=7)
    first = [w.sampler(0).next() for _ in range(2)]
    a, b = w.sampler(0), w.sampler(1)
    drawn = [a.next() for _ in range(200)]
    assert drawn[0] == first[0]  # same seed and user: same prompts
    assert drawn[:20] != [b.next() for _ in range(20)]  # another user: other prompts
    assert {len(p.split()) for _, p in drawn} == {3, 4, 5}
    assert {k for k, _ in drawn} == {"chat", "completions"}
    assert {k for k, _ in (Workload(chat_fraction=0.0).sampler(0).next() for _ in range(50))} == {"completions"}


class LocustLikeParser(argparse.ArgumentParser):
    """argparse that accepts (and drops) locust's extra keywords: no locust import in the test process."""

    def add_argument(self, *args, env_var=None, include_in_web_ui=True, **kwargs):
        return super().add_argument(*args, **kwargs)


def test_workload_round_trips_through_the_locustfile_flags():
    parser = LocustLikeParser()
    add_locust_arguments(parser)
    w = Workload(prompt_words=(8, 12), max_tokens=5, chat_fraction=0.25, rag=True, model="m", rate=3.5,
                 ignore_eos=True, seed=9)  # fmt: skip
    assert Workload.from_options(parser.parse_args(w.to_args())) == w
    assert Workload.from_options(parser.parse_args([])) == Workload()


@pytest.mark.parametrize(
    "make, flag",
    [
        (lambda: parse_word_range("ten"), "--prompt-words"),
        (lambda: parse_word_range("9:3"), "--prompt-words"),
        (lambda: Workload(max_tokens=0), "--max-tokens"),
        (lambda: Workload(chat_fraction=1.5), "--chat-fraction"),
        (lambda: Workload(rate=-1.0), "--rate"),
    ],
)
def test_bad_workload_options_name_the_flag(make, flag):
    with pytest.raises(ValueError, match=flag):
        make()
