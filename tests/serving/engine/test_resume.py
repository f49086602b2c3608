"""A request resumed with the tokens it already had (a stream migrated off a dead router) continues
exactly: same tokens, same text deltas, stop strings across the cut, and usage that counts every token once."""

from __future__ import annotations

import pytest

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams
from serving.errors import RequestError


@pytest.fixture(scope="module")
def engine(demo_dir):
    return LLMEngine.from_pretrained(demo_dir, EngineConfig())


def stream(engine, prompt, params, resumed=()):
    """(per-token (token, text delta) pairs, the last output) of one request run alone."""
    rid = engine.add_request(prompt, params, resumed_ids=list(resumed))
    pieces, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            pieces += [(t, out.new_text) for t in out.new_token_ids]
            last = out
    return pieces, last


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_resumed_request_continues_with_the_tokens_and_text_it_would_have_given(engine, params):
    prompt = engine.tokenizer.encode("Experts live on")
    whole, last = stream(engine, prompt, params)
    assert len(whole) == 20 and last.num_output_tokens == 20
    for cut in (1, 6, 19):
        rest, resumed_last = stream(engine, prompt, params, [t for t, _ in whole[:cut]])
        assert rest == whole[cut:], f"cut after {cut} tokens"
        assert (resumed_last.num_prompt_tokens, resumed_last.num_output_tokens) == (len(prompt), 20)
        assert resumed_last.finish_reason == "length"


def test_a_stop_string_that_begins_in_the_resumed_tokens_still_ends_the_request(engine):
    prompt = engine.tokenizer.encode("The router sends")
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    whole, _ = stream(engine, prompt, sampled)
    text = "".join(d for _, d in whole)
    stop = text[8:12]
    want = text[: text.find(stop)]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True, stop=(stop,))
    before, last = stream(engine, prompt, params)
    assert "".join(d for _, d in before) == want and last.finish_reason == "stop"
    for cut in range(1, len(before)):  # every cut, including inside the stop string's tokens
        rest, last = stream(engine, prompt, params, [t for t, _ in before[:cut]])
        assert "".join(d for _, d in before[:cut] + rest) == want, f"cut after {cut} tokens"
        assert last.finish_reason == "stop"


def test_resumed_tokens_must_leave_room_and_be_in_the_vocabulary(engine):
    params = SamplingParams(max_tokens=3, temperature=0.0)
    with pytest.raises(RequestError, match="leave nothing of max_tokens=3"):
        engine.add_request([1, 2], params, resumed_ids=[5, 6, 7])
    with pytest.raises(RequestError, match=r"resumed_ids: token ids \[-1\] are outside"):
        engine.add_request([1, 2], params, resumed_ids=[-1])
    assert not engine.has_unfinished()


def test_a_resumed_request_does_not_ask_for_prompt_logprobs_again(engine):
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=1)
    with pytest.raises(RequestError, match="the first output carried them already"):
        engine.add_request([1, 2], params, resumed_ids=[5])
