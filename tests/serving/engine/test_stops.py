"""Text streaming and stop strings, with the demo checkpoint's real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def engine(demo_dir):
    return LLMEngine.from_pretrained(demo_dir, EngineConfig())


def run(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                deltas.append(out.new_text)
                last = out
    return deltas, last


def test_streamed_text_is_the_decoded_output(engine):
    prompt = engine.tokenizer.encode("Mixture of experts")
    [full] = engine.generate_batch([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    deltas, last = run(engine, prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert "".join(deltas) == full.text == engine.tokenizer.decode(full.token_ids)
    assert last.finished and last.finish_reason == "length"


def test_stop_string_cuts_the_text_before_it_and_is_never_streamed(engine):
    prompt = engine.tokenizer.encode("The router sends")
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    [full] = engine.generate_batch([prompt], sampled)
    assert len(full.text) > 12, full.text
    stop = full.text[8:11]
    cut = full.text[: full.text.find(stop)]
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True, stop=("never there", stop))
    deltas, last = run(engine, prompt, params)
    assert "".join(deltas) == cut
    assert last.finish_reason == "stop"
    streamed = ""
    for d in deltas:  # no prefix of what was streamed ever showed the stop string
        streamed += d
        assert stop not in streamed


def test_each_token_decodes_a_short_window_not_the_whole_output(engine):
    """Stop handling costs O(1) decoding per token: the longest id list decoded stays short however long
    the output grows (decoding the whole output each token was O(n^2) per request)."""
    from serving.engine.stops import StopChecker

    decoded: list[int] = []
    real = engine.tokenizer.decode

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            decoded.append(len(ids))
            return real(ids, skip_special_tokens=skip_special_tokens)

    ids = engine.tokenizer.encode("Experts live on separate replicas, and the router sends them rows. " * 12)
    stops = StopChecker(CountingTokenizer(), ("never there",))
    text = "".join(stops.append(t)[0] for t in ids) + stops.flush()
    assert len(ids) > 150 and text == real(ids)
    assert max(decoded) <= 16, f"decoded up to {max(decoded)} ids at once"
