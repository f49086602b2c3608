"""Text streaming and stop strings, with the demo checkpoint's real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from serving.engine import EngineConfig, LLMEngine
from serving.sampling import SamplingParams


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
    [full] = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    deltas, last = run(engine, prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert "".join(deltas) == full.text == engine.tokenizer.decode(full.token_ids)
    assert last.finished and last.finish_reason == "length"


def test_stop_string_cuts_the_text_before_it_and_is_never_streamed(engine):
    prompt = engine.tokenizer.encode("The router sends")
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    [full] = engine.generate([prompt], sampled)
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
