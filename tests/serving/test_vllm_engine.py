"""The vLLM adapter without Ray: how our parameters, configs and logprobs map to vLLM's, the error that
says how to install vLLM, and (with vLLM installed) streams that refuse, finish and abort like ours."""

from __future__ import annotations

import asyncio
import importlib.util
from types import SimpleNamespace

import pytest

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import EngineConfig, SamplingParams
from serving.errors import ConfigError, RequestError
from serving.vllm_engine import (
    VLLMOptions,
    engine_args,
    require_vllm,
    to_prompt_logprobs,
    to_token_logprobs,
    vllm_env,
)
from tests.polling import poll

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (`make install-vllm`; `make test` does it)"
)


def test_engine_config_maps_to_vllms_engine_args():
    config = EngineConfig(dtype="bfloat16", kv_cache_mb=512, max_running=8, max_batched_tokens=256, max_model_len=300)
    args = engine_args("/m", config, VLLMOptions(tensor_parallel_size=2, enable_expert_parallel=True))
    assert args == dict(model="/m", dtype="bfloat16", max_model_len=300, kv_cache_memory_bytes=512 * 2**20,
                        max_num_seqs=8, max_num_batched_tokens=256, tensor_parallel_size=2,
                        enable_expert_parallel=True, enforce_eager=False, disable_log_stats=True)  # fmt: skip


def test_cpu_engines_run_the_model_in_the_engine_core_process():
    assert vllm_env("cpu") == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert vllm_env("gpu") == {}


def test_missing_vllm_is_a_config_error_that_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"engine: vllm needs vLLM.*make install-vllm.*pip install vllm"):
        require_vllm()


def test_logprobs_keep_the_n_best_alternatives_best_first():
    lp = lambda logprob, rank: SimpleNamespace(logprob=logprob, rank=rank)  # noqa: E731 (vLLM's Logprob)
    # the sampled token (9) ranked 4th: vLLM sends it beside the 2 best
    entries = {7: lp(-0.5, 2), 9: lp(-3.0, 4), 3: lp(-0.1, 1)}
    got = to_token_logprobs(9, entries, top_n=2)
    assert (got.token_id, got.logprob, got.top) == (9, -3.0, ((3, -0.1), (7, -0.5)))
    assert to_token_logprobs(3, {3: lp(-0.1, 1)}, top_n=0).top == ()
    assert got.rank == 4


def test_prompt_logprobs_have_no_entry_for_the_first_token():
    lp = lambda logprob, rank: SimpleNamespace(logprob=logprob, rank=rank)  # noqa: E731 (vLLM's Logprob)
    first, second = to_prompt_logprobs([4, 8], [None, {8: lp(-2.0, 3), 1: lp(-0.2, 1)}], top_n=1)
    assert first is None
    assert (second.token_id, second.logprob, second.top, second.rank) == (8, -2.0, ((1, -0.2),), 3)


@needs_vllm
def test_sampling_params_map_one_for_one():
    from vllm.sampling_params import RequestOutputKind

    from serving.vllm_engine import to_vllm_params

    ours = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=None, seed=3, stop=("a", "bc"),
                          stop_token_ids=(5,), ignore_eos=True, logprobs=2)  # fmt: skip
    theirs = to_vllm_params(ours)
    assert (theirs.max_tokens, theirs.temperature, theirs.top_p, theirs.top_k, theirs.seed) == (7, 0.5, 0.9, 0, 3)
    assert (theirs.stop, theirs.stop_token_ids, theirs.ignore_eos, theirs.logprobs) == (["a", "bc"], [5], True, 2)
    assert theirs.output_kind == RequestOutputKind.DELTA
    assert to_vllm_params(SamplingParams(temperature=0.7, top_k=4)).top_k == 4
    scoring = to_vllm_params(SamplingParams(max_tokens=0, prompt_logprobs=3))
    assert (scoring.max_tokens, scoring.prompt_logprobs) == (1, 3), "vLLM generates one token; ours drops it"


@needs_vllm
def test_a_value_vllm_refuses_is_a_request_error():
    from serving.vllm_engine import to_vllm_params

    with pytest.raises(RequestError, match="temperature"):
        to_vllm_params(SamplingParams(temperature=5.0))  # ours allows up to 100; vLLM up to 2


@pytest.fixture(scope="module")
def vllm_engine(demo_dir):
    """An AsyncVLLMEngine on the demo checkpoint, with its own event loop (vLLM binds to it)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (`make install-vllm`; `make test` does it)")
    from serving.vllm_engine import AsyncVLLMEngine

    async def build():
        return AsyncVLLMEngine(str(demo_dir), EngineConfig(max_model_len=256), VLLMOptions(enforce_eager=True))

    loop = asyncio.new_event_loop()
    with pytest.MonkeyPatch.context() as env:
        for name, value in vllm_env("cpu").items():
            env.setenv(name, value)
        engine = loop.run_until_complete(build())
        yield engine, loop
        engine.shutdown()
    pending = asyncio.all_tasks(loop)  # vLLM's output handlers, cancelled by shutdown(): let them finish
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@needs_vllm
def test_streams_match_the_native_engine_refuse_and_abort(vllm_engine, demo_dir):
    engine, loop = vllm_engine
    native = LLMEngine.from_pretrained(demo_dir)
    prompts = [native.tokenizer.encode(p) for p in ("Experts live on", "Hello", "x y z")]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [(c.token_ids, c.text) for c in native.generate_batch(prompts, params)]

    async def collect(prompt):
        outs = [out async for out in engine.generate(prompt, params)]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 16
        return [t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs)

    async def refused(prompt_ids, max_tokens):
        with pytest.raises(RequestError) as info:
            await anext(engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens)))
        return str(info.value)

    async def abandoned():
        stream = engine.generate(prompts[0], SamplingParams(max_tokens=200, ignore_eos=True))
        await anext(stream)
        await stream.aclose()  # the client left: vLLM must drop the request
        return await poll(lambda: engine.llm.get_num_unfinished_requests() == 0)

    async def main():
        got = await asyncio.gather(*(collect(p) for p in prompts))  # batched together
        too_long = await refused([1] * 250, 10)
        outside = await refused([5000], 1)
        return got, too_long, outside, await abandoned()

    got, too_long, outside, aborted = loop.run_until_complete(main())
    assert got == want
    assert too_long == "this model's maximum context length is 256 tokens; the request asks for 260 " \
                       "(250 in the prompt + 10 max_tokens)"  # fmt: skip
    assert outside == "prompt: token ids [5000] are outside the vocabulary [0, 1024)"
    assert aborted


@needs_vllm
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=0, prompt_logprobs=2),
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1),
    ],
    ids=["scoring only", "with generation"],
)
def test_prompt_logprobs_match_the_native_engine(vllm_engine, demo_dir, params):
    engine, loop = vllm_engine
    native = LLMEngine.from_pretrained(demo_dir)  # float32, as the vLLM engine
    prompt = native.tokenizer.encode("Experts live on every shard; the router sends them rows")
    [want] = native.generate_batch([prompt], params)

    async def collect():
        return [out async for out in engine.generate(prompt, params)]

    outs = loop.run_until_complete(collect())
    assert [t for o in outs for t in o.new_token_ids] == want.token_ids
    assert outs[-1].finish_reason == want.finish_reason == "length"
    assert all(o.prompt_logprobs is None for o in outs[1:]), "only the first output carries them"
    got = outs[0].prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for ours, theirs in zip(want.prompt_logprobs[1:], got[1:], strict=True):
        assert ours.token_id == theirs.token_id and ours.rank == theirs.rank
        assert abs(ours.logprob - theirs.logprob) <= 1e-4
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert [lp for _, lp in ours.top] == pytest.approx([lp for _, lp in theirs.top], abs=1e-4)
