"""The engine: `step()` is schedule -> run the model -> postprocess, as in nano-vllm.

>>> engine = LLMEngine.from_pretrained("demo/", EngineConfig())
>>> [result] = engine.generate_batch([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0))
>>> result.token_ids

`generate_batch` is the offline entry (all prompts to completion); serving streams through
serving/engine/async_engine.py, which drives `add_request` / `step` / `abort` from one thread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving.engine.kv_cache import BlockAllocator, KVCache
from serving.engine.model_runner import ModelRunner
from serving.engine.sampler import make_generator, sample, seed_for_position, token_logprobs
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, Status
from serving.engine.stops import StopChecker
from serving.engine_client import (
    EngineConfig,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    check_request,
    check_resumed,
)
from serving.errors import EngineOverloadedError, RequestError, StepFailedError
from serving.experts.backend import ExpertBackend
from serving.experts.load_window import ExpertLoadWindow
from serving.experts.routing_counter import RoutingCounter
from serving.metrics import (
    BATCH,
    EXPERT_TOKENS,
    GENERATED_TOKENS,
    KV_USAGE,
    PROMPT_TOKENS,
    QUEUE,
    RUNNING,
    STEP,
    WAITING,
    Metric,
    MetricsSink,
    NullSink,
)
from serving.model.decoder import MoEForCausalLM, load_local
from serving.model.device import resolve_device
from serving.model.dtypes import torch_dtype
from serving.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """A whole request's result (from `generate_batch`)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with SamplingParams.prompt_logprobs


class LLMEngine:
    def __init__(
        self,
        model: MoEForCausalLM,
        experts: ExpertBackend,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        metrics: MetricsSink | None = None,
        metric_labels: dict[str, str] | None = None,
    ):
        self.config, self.tokenizer = config, tokenizer
        self.model_config = model.config
        shapes, cache_dtype = model.cache_shapes(), torch_dtype(config.dtype)
        num_blocks = KVCache.blocks_in_budget(shapes, int(config.kv_cache_mb * 2**20), config.block_size, cache_dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_mb={config.kv_cache_mb} holds no block of {config.block_size} tokens")
        # The context limit: the model's, the config's, and what the whole KV cache can hold for one request.
        self.max_model_len = min(
            config.max_model_len or model.config.max_position_embeddings,
            model.config.max_position_embeddings,
            num_blocks * config.block_size,
        )
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.cache = KVCache(shapes, num_blocks, config.block_size, cache_dtype, model.device)
        self.scheduler = Scheduler(self.allocator, config.max_batched_tokens, config.max_running)
        self.metrics, self.metric_labels = metrics or NullSink(), dict(metric_labels or {"model": "model"})
        self.routing = RoutingCounter(experts, model.config.num_experts)  # tokens per expert, for metrics
        # ... and over a sliding window, for GET /v1/admin/expert-load (`expert_load.snapshot()`, any thread)
        self.expert_load = ExpertLoadWindow(
            model.config.moe_layer_ids, model.config.num_experts, config.expert_load_window_s
        )
        self.runner = ModelRunner(model, self.routing, self.cache, self.allocator, config.overlap_min_tokens)
        self.eos_ids = frozenset(tokenizer.eos_token_ids if tokenizer else model.config.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._stops: dict[str, StopChecker] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        """The whole model in this process, with its tokenizer, on config.device (default: cpu)."""
        config = config or EngineConfig()
        device = resolve_device(config.device, "cpu", "LLMEngine.from_pretrained")
        model, experts = load_local(path, torch_dtype(config.dtype), device, config.expert_kernel)
        return cls(model, experts, Tokenizer(path), config)

    # -- requests ---------------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if this request can never be served (before it takes a queue place)."""
        check_request(prompt_ids, params, self.model_config.vocab_size, self.max_model_len)

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resumed_ids: list[int] | tuple[int, ...] = (),
    ) -> str:
        """Queue a request; returns its id. `resumed_ids`: output tokens it already produced on another
        replica (a migrated stream, deployments/ingress.py). They are prefilled with the prompt, count
        toward max_tokens and the usage, pass through the stop checker (a stop string may span them and
        the new tokens), and are not output again."""
        self.check_request(prompt_ids, params)
        resumed = list(resumed_ids)
        check_resumed(resumed, params, self.model_config.vocab_size)
        if self.num_waiting >= self.config.max_waiting:
            raise EngineOverloadedError(
                f"{self.num_waiting} requests are waiting (max_waiting={self.config.max_waiting}); retry later"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, list(prompt_ids), params, make_generator(params.seed), time.perf_counter())
        seq.token_ids += resumed
        stops = StopChecker(self.tokenizer, params.stop)
        for token in resumed:  # the text they give was sent by the replica that generated them
            stops.append(token)
        self._seqs[request_id] = seq
        self._stops[request_id] = stops
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its cache; False if it was not running."""
        seq = self._seqs.pop(request_id, None)
        self._stops.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- the step ---------------------------------------------------------------------------------

    @torch.inference_mode()  # where the work runs: grad mode is per thread (AsyncEngine steps on its own)
    def step(self) -> list[RequestOutput]:
        """Run one batch: schedule, forward, sample, detect ends. Returns outputs of requests that moved."""
        start = time.perf_counter()
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        for chunk in chunks:
            if not chunk.seq.scheduled:
                chunk.seq.scheduled = True
                self._record(QUEUE, start - chunk.seq.arrival_time)
        try:
            logits = self.runner.run(chunks)  # sample: {seq: [V] float32} for sequences whose prompt is done
        except Exception as e:  # the step's requests fail (their cache is freed); queued ones stay queued
            failed = [chunk.seq.request_id for chunk in chunks]
            for request_id in failed:
                self.abort(request_id)
            raise StepFailedError(failed, e) from e
        outputs = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_cached += chunk.num_new
            seq.prompt_logprobs += logits.prompt_logprobs.get(seq, [])
            if seq not in logits.sample:
                continue  # mid-prefill: nothing to sample yet
            outputs.append(self._append_token(seq, logits.sample[seq]))
        self._record_step(time.perf_counter() - start, sum(c.num_new for c in chunks), len(outputs))
        return outputs

    def _record(self, metric: Metric, value: float, **labels: str) -> None:
        base = {k: v for k, v in self.metric_labels.items() if k in metric.labels}
        self.metrics.record(metric, value, {**base, **labels})

    def _record_step(self, seconds: float, tokens: int, sampled: int) -> None:
        self._record(STEP, seconds)
        self._record(BATCH, tokens)
        self._record(GENERATED_TOKENS, sampled)
        self._record(RUNNING, self.num_running)
        self._record(WAITING, self.num_waiting)
        self._record(KV_USAGE, self.allocator.usage)
        layers, rows = self.routing.drain()  # [len(layers), E] on the host
        self.expert_load.add(layers, rows)
        for layer, counts in zip(layers, rows.tolist(), strict=True):
            for expert, n in enumerate(counts):
                if n:
                    self._record(EXPERT_TOKENS, n, layer=str(layer), expert=str(expert))

    def _append_token(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        params = seq.params
        if params.max_tokens == 0:  # prompt scoring: the prefill's prompt logprobs are the whole answer
            seq.finish_reason = "length"
            return self._output(seq, [], "", [])
        if params.seed is not None:
            seed_for_position(seq.generator, params.seed, len(seq.output_ids))
        token = sample(logits, params, seq.generator)
        seq.token_ids.append(token)
        new_logprobs = []
        if params.logprobs is not None:
            new_logprobs = [token_logprobs(logits, token, params.logprobs)]
            seq.logprobs.extend(new_logprobs)
        stops = self._stops[seq.request_id]
        text, stopped = stops.append(token)
        if stopped or token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            text += stops.flush()
        return self._output(seq, [token], text, new_logprobs)

    def _output(self, seq: Sequence, new_ids: list[int], text: str, new_logprobs: list[TokenLogprobs]) -> RequestOutput:
        """The step's output for `seq`; a finished sequence leaves the engine here."""
        if seq.finish_reason is not None:
            seq.status = Status.FINISHED
            self._record(PROMPT_TOKENS, seq.num_prompt)
            self.scheduler.remove(seq)
            del self._seqs[seq.request_id], self._stops[seq.request_id]
        first = len(seq.output_ids) == len(new_ids)  # the request's first output carries the prompt's logprobs
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            new_logprobs=new_logprobs,
            finished=seq.finish_reason is not None,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt,
            num_output_tokens=len(seq.output_ids),
            prompt_logprobs=list(seq.prompt_logprobs) if first and seq.params.prompt_logprobs is not None else None,
        )

    # -- offline use ------------------------------------------------------------------------------

    def generate_batch(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run `prompts` to completion together (continuous batching) and return them in order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        done = {i: GenerationResult(i, [], "", None) for i in ids}
        while self.has_unfinished():
            for out in self.step():
                c = done[out.request_id]
                c.token_ids += out.new_token_ids
                c.text += out.new_text
                c.logprobs += out.new_logprobs
                c.finish_reason = out.finish_reason
                if out.prompt_logprobs is not None:
                    c.prompt_logprobs = out.prompt_logprobs
        return [done[i] for i in ids]
