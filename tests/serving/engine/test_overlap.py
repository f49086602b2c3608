"""Two micro-batches in flight (engine_config.overlap_min_tokens): the same tokens (and logprobs within fp32
noise) as the unsplit step, on sharded experts, for architectures with and without shared experts and dense
layers; each layer's expert calls alternate between the two micro-batches; and where a step is cut."""

from __future__ import annotations

import threading

import pytest
import torch

from router.placement import Placement
from serving.engine.llm_engine import LLMEngine
from serving.engine.model_runner import ModelRunner
from serving.engine_client import EngineConfig, SamplingParams
from serving.experts.loading import load_experts
from serving.experts.sharded import InProcessTransport, ShardedExpertBackend
from serving.model.attention import SequenceChunk
from serving.model.decoder import load_model
from tests.serving.hf_models import build_reference, save_both_layouts

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def sharded(request, tmp_path_factory):
    """(model, 2-shard backend over the in-process transport) of a tiny checkpoint; deepseek_v3 has a dense
    first layer, shared experts and MLA."""
    path, _ = save_both_layouts(build_reference(request.param), tmp_path_factory.mktemp(request.param))
    model, ckpt = load_model(path, torch.float32)
    cfg = model.config
    placement = Placement.contiguous(cfg.num_experts, 2)
    shards = {s: load_experts(ckpt, cfg, list(placement.experts_of(s)), torch.float32) for s in range(2)}
    return model, ShardedExpertBackend(placement, InProcessTransport(shards))


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, 160, (7 + 5 * i,), generator=gen).tolist() for i in range(n)]


class CallOrder:
    """An expert backend that records (thread, layer, rows) per call and delegates."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __call__(self, layer, hidden, weights, ids):
        return self.start(layer, hidden, weights, ids).result()

    def start(self, layer, hidden, weights, ids):
        self.calls.append((threading.current_thread().name, layer, hidden.shape[0]))
        return self.backend.start(layer, hidden, weights, ids)


def test_overlapped_steps_give_the_unsplit_steps_tokens_and_logprobs(sharded):
    model, experts = sharded
    batch = prompts(6)
    plain = LLMEngine(model, experts, None, EngineConfig()).generate_batch(batch, PARAMS)
    counted = CallOrder(experts)
    overlapped = LLMEngine(model, counted, None, EngineConfig(overlap_min_tokens=2))
    split = overlapped.generate_batch(batch, PARAMS)
    assert [c.token_ids for c in split] == [c.token_ids for c in plain]
    # Logprobs within fp32 noise, not to the bit: a micro-batch's matmuls have fewer rows than the whole
    # step's, and a GEMM may block and sum a row's products in another order for another row count (the
    # unsplit engine differs the same way between batch sizes).
    for got, want in zip(split, plain, strict=True):
        assert [[t for t, _ in e.top] for e in got.logprobs] == [[t for t, _ in e.top] for e in want.logprobs]
        diffs = [abs(g.logprob - w.logprob) for g, w in zip(got.logprobs, want.logprobs, strict=True)]
        assert max(diffs) < 1e-5, max(diffs)
    assert any(name.startswith("expert-pipeline") for name, _, _ in counted.calls)  # the split path ran
    overlapped.runner.close()


def test_each_layer_calls_the_experts_for_one_micro_batch_then_the_other(sharded):
    model, experts = sharded
    counted = CallOrder(experts)
    engine = LLMEngine(model, counted, None, EngineConfig(overlap_min_tokens=2, max_batched_tokens=512))
    batch = prompts(4)  # 7, 12, 17, 22 tokens: prefilled in one step, cut after the third prompt (36 of 58)
    engine.generate_batch(batch, SamplingParams(max_tokens=1, temperature=0.0))
    first_step = [(layer, rows) for _, layer, rows in counted.calls[: 2 * len(model.config.moe_layer_ids)]]
    expected = [(layer, rows) for layer in model.config.moe_layer_ids for rows in (36, 22)]
    assert first_step == expected
    engine.runner.close()


@pytest.mark.parametrize(
    ("tokens", "cut"),
    [([5, 1, 1, 1], 1), ([1, 1, 1, 1], 2), ([1, 1, 1, 9], 3), ([3], None), ([1, 1], None)],
)
def test_a_step_is_cut_into_halves_of_about_equal_tokens_or_not_at_all(mixtral, tokens, cut):
    model, experts = mixtral
    runner = ModelRunner(model, experts, cache=None, allocator=None, overlap_min_tokens=3)
    assert runner._split([SequenceChunk(0, n, [0]) for n in tokens]) == cut
    runner.close()
    assert ModelRunner(model, experts, None, None)._split([SequenceChunk(0, 9, [0])] * 4) is None  # off


class Ordering(InProcessTransport):
    """In-process shards that log when a layer's calls are sent and when their answers are collected."""

    def __init__(self, shards, log):
        super().__init__(shards)
        self.log = log

    def start(self, layer, calls):
        self.log.append(("sent", layer))
        collect = super().start(layer, calls)

        def collected():
            self.log.append(("collected", layer))
            return collect()

        return collected


def test_the_shared_expert_runs_while_the_layers_shard_calls_are_out(sharded):
    """Without micro-batches too: each MoE layer sends its routed rows, runs its shared expert (deepseek_v3
    has one) and only then waits for the shards; the tokens are those of the same engine on local experts."""
    model, experts = sharded
    log: list[tuple[str, int]] = []
    ordered = ShardedExpertBackend(experts.every_layer.placement, Ordering(experts.transport.shards, log))
    hooks = [block.mlp.shared_expert.register_forward_hook(lambda *_, i=block.mlp.layer_id: log.append(("shared", i)))
             for block in model.model.layers if block.sparse and block.mlp.shared_expert is not None]  # fmt: skip
    try:
        got = LLMEngine(model, ordered, None, EngineConfig()).generate_batch(prompts(2), PARAMS)
    finally:
        for hook in hooks:
            hook.remove()
    want = LLMEngine(model, experts, None, EngineConfig()).generate_batch(prompts(2), PARAMS)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    per_call = ["sent", "shared", "collected"] if hooks else ["sent", "collected"]
    layers = [layer for event, layer in log if event == "sent"]
    assert layers and log == [(event, layer) for layer in layers for event in per_call]
