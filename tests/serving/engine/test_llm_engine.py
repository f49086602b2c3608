"""Engine behaviour on a tiny real model: memory limits, queueing, aborts, sampling, logprobs."""

from __future__ import annotations

import pytest
import torch

from serving.engine.llm_engine import LLMEngine
from serving.engine.model_runner import score_prompts
from serving.engine_client import EngineConfig, SamplingParams
from serving.errors import EngineOverloadedError, RequestError

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make_engine(mixtral, **config) -> LLMEngine:
    model, experts = mixtral
    return LLMEngine(model, experts, None, EngineConfig(**config))


def prompts(n: int, length: int = 20) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 160, (length + 3 * i,), generator=gen).tolist() for i in range(n)]


def test_full_kv_cache_makes_requests_wait_and_preempts_without_changing_outputs(mixtral):
    batch = prompts(6)
    alone = [make_engine(mixtral).generate_batch([p], GREEDY)[0].token_ids for p in batch]
    # 512 bytes a token (2 layers x K,V x 2 heads x 16 dims x 4 bytes): 32 KiB = 4 blocks of 16 tokens,
    # which hold at most two of these requests at a time.
    tiny = make_engine(mixtral, kv_cache_mb=1 / 32, block_size=16)
    assert tiny.allocator.num_blocks == 4
    done = tiny.generate_batch(batch, GREEDY)
    assert [c.token_ids for c in done] == alone
    assert tiny.allocator.num_free == 4  # everything freed at the end


def test_request_larger_than_context_or_cache_is_refused_with_the_limit(mixtral):
    engine = make_engine(mixtral)
    with pytest.raises(RequestError, match="maximum context length is 256"):
        engine.add_request(list(range(100)), SamplingParams(max_tokens=200))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([5, 9999], GREEDY)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], GREEDY)


def test_queue_limit_refuses_with_overloaded_error(mixtral):
    engine = make_engine(mixtral, max_waiting=2)
    engine.add_request([1, 2], GREEDY)
    engine.add_request([1, 2], GREEDY)
    with pytest.raises(EngineOverloadedError, match="max_waiting=2"):
        engine.add_request([1, 2], GREEDY)


def test_abort_frees_the_cache(mixtral):
    engine = make_engine(mixtral)
    free = engine.allocator.num_free
    rid = engine.add_request(list(range(40)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.allocator.num_free < free
    assert engine.abort(rid)
    assert engine.allocator.num_free == free and not engine.has_unfinished()


def test_max_tokens_finishes_with_length(mixtral):
    [c] = make_engine(mixtral).generate_batch([[1, 2, 3]], GREEDY)
    assert len(c.token_ids) == 10 and c.finish_reason == "length"


def test_stop_token_ids_finish_with_stop(mixtral):
    [c] = make_engine(mixtral).generate_batch([[1, 2, 3]], GREEDY)
    stop_at = c.token_ids[4]
    [s] = make_engine(mixtral).generate_batch([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0.0,
                                                                     stop_token_ids=(stop_at,)))  # fmt: skip
    assert s.token_ids == c.token_ids[: c.token_ids.index(stop_at) + 1] and s.finish_reason == "stop"


def test_seed_makes_sampling_reproducible_regardless_of_batch(mixtral):
    p = [4, 8, 15, 16, 23, 42]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    [a] = make_engine(mixtral).generate_batch([p], params)
    b = make_engine(mixtral).generate_batch([[7, 7, 7], p, [1]], [GREEDY, params, GREEDY])[1]
    [c] = make_engine(mixtral).generate_batch(
        [p], SamplingParams(max_tokens=16, temperature=1.0, seed=124, ignore_eos=True)
    )
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(mixtral):
    p = [9, 8, 7, 6]
    [greedy] = make_engine(mixtral).generate_batch([p], GREEDY)
    for params in (SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=10, temperature=1.5, top_p=1e-6, ignore_eos=True)):  # fmt: skip
        assert make_engine(mixtral).generate_batch([p], params)[0].token_ids == greedy.token_ids


def test_logprobs_are_the_model_distribution(mixtral):
    model, experts = mixtral
    p = [3, 1, 4, 1, 5]
    [c] = make_engine(mixtral).generate_batch(
        [p], SamplingParams(max_tokens=2, temperature=0.0, logprobs=3, ignore_eos=True)
    )
    first = c.logprobs[0]
    want = torch.log_softmax(score_prompts(model, experts, [p])[0][-1], dim=-1)
    assert first.token_id == c.token_ids[0] == int(want.argmax())
    assert abs(first.logprob - float(want.max())) < 1e-5
    assert [t for t, _ in first.top] == torch.topk(want, 3).indices.tolist()
    assert len(c.logprobs) == 2


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=0),
                                 dict(logprobs=21), dict(stop=("",))])  # fmt: skip
def test_bad_sampling_params_name_the_field(bad):
    with pytest.raises(RequestError, match=next(iter(bad))):
        SamplingParams(**bad)
