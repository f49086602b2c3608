"""Prompt logprobs (SamplingParams.prompt_logprobs): scored by the chunked, batched prefill itself, equal to
transformers' log_softmax of the same model, and to what generation gives the same tokens."""

from __future__ import annotations

import pytest
import torch

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams
from serving.errors import RequestError
from serving.metrics import BATCH, MemorySink
from tests.serving.hf_models import VOCAB, build_reference

TOL = 1e-4  # float32, two implementations (ours and transformers, or prefill and decode batches)


def prompts(lengths, seed=5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def engine_for(mixtral, **config) -> LLMEngine:
    model, experts = mixtral
    return LLMEngine(model, experts, None, EngineConfig(**config))


def score(engine: LLMEngine, batch: list[list[int]], top_n: int = 3):
    """Each prompt's logprobs, all prompts in one batch, without generating (max_tokens=0)."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=top_n)
    return engine.generate_batch(batch, params)


def test_prompt_logprobs_equal_transformers_log_softmax_with_chunked_prefill(mixtral):
    hf = build_reference("mixtral")  # the weights the `mixtral` checkpoint was saved from
    batch = prompts((1, 5, 23, 40))
    engine = engine_for(mixtral, max_batched_tokens=16)  # 40 tokens: prefilled in 3+ chunks, beside the others
    for prompt, result in zip(batch, score(engine, batch), strict=True):
        assert result.token_ids == [] and result.finish_reason == "length", "max_tokens=0 generates nothing"
        entries = result.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None, "one entry per prompt token; none for the first"
        with torch.inference_mode():
            want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [len, V]
        for p, entry in enumerate(entries[1:]):
            row = want[p]  # position p predicts prompt token p + 1
            assert entry.token_id == prompt[p + 1]
            assert abs(entry.logprob - row[prompt[p + 1]].item()) <= TOL, f"prompt of {len(prompt)}, token {p + 1}"
            assert entry.rank == int((row > row[prompt[p + 1]]).sum()) + 1
            values, ids = torch.topk(row, 3)
            assert [t for t, _ in entry.top] == ids.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=TOL)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_scoring_a_continuation_gives_the_logprobs_its_generation_gave(mixtral, temperature):
    """Generate C after P with logprobs; then score P + C as a prompt: C's entries are the same."""
    [prompt] = prompts((9,))
    gen_params = SamplingParams(max_tokens=12, temperature=temperature, seed=3, logprobs=2, ignore_eos=True)
    [generated] = engine_for(mixtral).generate_batch([prompt], gen_params)
    [scored] = score(engine_for(mixtral, max_batched_tokens=8), [prompt + generated.token_ids], top_n=2)
    teacher_forced = scored.prompt_logprobs[len(prompt) :]
    assert [e.token_id for e in teacher_forced] == generated.token_ids
    for got, want in zip(teacher_forced, generated.logprobs, strict=True):
        assert abs(got.logprob - want.logprob) <= TOL
        assert got.rank == want.rank
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
    if temperature:
        assert any(e.rank > 1 for e in generated.logprobs), "sampling picked some token that is not the argmax"


def test_the_prompt_runs_through_the_model_once(mixtral):
    model, experts = mixtral
    sink = MemorySink()
    engine = LLMEngine(model, experts, None, EngineConfig(max_batched_tokens=16), metrics=sink)
    [prompt] = prompts((40,))
    [result] = engine.generate_batch([prompt], SamplingParams(max_tokens=4, prompt_logprobs=1, ignore_eos=True))
    assert len(result.prompt_logprobs) == 40 and len(result.token_ids) == 4
    assert sum(sink.values(BATCH.name)) == 40 + 3, "prefill once, then one token per decode: no scoring pass"


def test_preempted_sequences_keep_one_entry_per_prompt_token(mixtral):
    batch = prompts((20, 23, 26, 29, 32, 35), seed=3)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    alone = [engine_for(mixtral).generate_batch([p], params)[0] for p in batch]
    tiny = engine_for(mixtral, kv_cache_mb=1 / 32, block_size=16)  # 4 blocks: two requests at a time, preempting
    for got, want in zip(tiny.generate_batch(batch, params), alone, strict=True):
        assert got.token_ids == want.token_ids
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs)
        for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= TOL


def test_max_tokens_zero_is_only_for_prompt_scoring():
    with pytest.raises(RequestError, match=r"max_tokens=0: must be at least 1 \(0 only scores a prompt"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="prompt_logprobs=21"):
        SamplingParams(prompt_logprobs=21)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0
