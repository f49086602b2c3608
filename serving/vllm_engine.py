"""vLLM as an engine behind our API: `AsyncVLLMEngine` adapts vLLM's AsyncLLM to the EngineClient
protocol (serving/engine_client.py), so the HTTP layer, metrics and load tests are the same for both engines.

>>> engine = AsyncVLLMEngine("demo/", EngineConfig(dtype="float32"), VLLMOptions(enforce_eager=True))
>>> async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=8, temperature=0)):
...     print(out.new_text, end="")

What maps to what:
- EngineConfig (shared with the native engine): dtype -> dtype, max_model_len -> max_model_len,
  kv_cache_mb -> kv_cache_memory_bytes (CPU and GPU alike), max_running -> max_num_seqs,
  max_batched_tokens -> max_num_batched_tokens. block_size, max_waiting, expert_kernel and
  expert_load_window_s are the native engine's own.
- VLLMOptions (vLLM only): tensor_parallel_size, enable_expert_parallel, enforce_eager.
- SamplingParams: one for one; top_k None is vLLM's 0 ("off"); outputs are DELTA (only what is new).
  Logprobs are of the raw distribution (vLLM's default logprobs_mode), as ours. prompt_logprobs maps to
  vLLM's; max_tokens=0 (prompt scoring, which vLLM's SamplingParams refuses) runs with max_tokens=1, as
  vLLM's own server does for echo, and the generated token is dropped.
- Requests are checked by `serving.engine_client.check_request` before vLLM sees them, so a refusal gives the
  same RequestError (and the same HTTP 400) as the native engine.

vLLM is imported only when an engine is built: the base install does not need it, and building one
without it raises ConfigError that says how to install it. `vllm_env()` gives the environment a
process that builds an engine should start with (the Serve deployment puts it in its runtime_env).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.engine_client import (
    EngineConfig,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    check_request,
    check_resumed,
)
from serving.errors import ConfigError, EngineOverloadedError, EngineStoppedError, RequestError
from serving.metrics import (
    GENERATED_TOKENS,
    KV_USAGE,
    PROMPT_TOKENS,
    QUEUE,
    RUNNING,
    WAITING,
    Metric,
    MetricsSink,
    NullSink,
)

INSTALL_HINT = "install it with `make install-vllm` (CPU, this repo's venv) or `pip install vllm` (GPU)"


class VLLMOptions(BaseModel):
    """vLLM's own engine options (with `engine: vllm`). Limits shared with the native engine (dtype,
    max_model_len, KV cache size, batch sizes) come from `engine_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (vLLM tensor parallelism).")
    enable_expert_parallel: bool = Field(
        False, description="Split the experts across the tensor-parallel GPUs (expert parallel size = TP size)."
    )
    enforce_eager: bool = Field(
        False, description="Skip torch.compile and CUDA graphs: starts in seconds, runs slower (tests use it)."
    )


def vllm_env(accelerator: str) -> dict[str, str]:
    """Environment for a process that builds an engine. On CPU, the engine core runs its model in its own
    process rather than in yet another worker process: a start of ~3 s instead of ~17 s (measured on the
    2-core CI machine)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if accelerator == "cpu" else {}


def require_vllm() -> None:
    """Raise ConfigError, saying how to install it, if vLLM is not installed (without importing it: slow)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"engine: vllm needs vLLM, which is not installed; {INSTALL_HINT}")


def engine_args(model: str, config: EngineConfig, options: VLLMOptions) -> dict[str, Any]:
    """vLLM's AsyncEngineArgs fields for this model and config (typed on our side, so no free-form dict)."""
    return dict(
        model=model,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        kv_cache_memory_bytes=int(config.kv_cache_mb * 2**20),
        max_num_seqs=config.max_running,
        max_num_batched_tokens=config.max_batched_tokens,
        tensor_parallel_size=options.tensor_parallel_size,
        enable_expert_parallel=options.enable_expert_parallel,
        enforce_eager=options.enforce_eager,
        disable_log_stats=True,  # vLLM's own loggers off; ours (below) still gets the stats
    )


def to_vllm_params(params: SamplingParams):
    """Our SamplingParams as vLLM's, streaming deltas. Raises RequestError for values vLLM refuses."""
    require_vllm()
    import vllm
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    try:
        return vllm.SamplingParams(
            max_tokens=max(params.max_tokens, 1),  # 0 scores the prompt only: generate() drops the one token
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0 if params.top_k is None else params.top_k,  # vLLM's 0 is "no top-k cut"
            seed=params.seed,
            stop=list(params.stop),
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
    except VLLMValidationError as e:
        raise RequestError(str(e)) from None


def to_token_logprobs(token_id: int, entries: dict[int, Any], top_n: int) -> TokenLogprobs:
    """One position of vLLM's logprobs ({token id: Logprob(logprob, rank)}, the sampled token and the
    top_n best) as our TokenLogprobs, alternatives best first."""
    top = sorted((e.rank, tid, e.logprob) for tid, e in entries.items() if e.rank is not None and e.rank <= top_n)
    chosen = entries[token_id]
    return TokenLogprobs(
        token_id=token_id, logprob=chosen.logprob, top=tuple((tid, lp) for _, tid, lp in top), rank=chosen.rank
    )


def to_prompt_logprobs(prompt_ids: list[int], positions: list[dict[int, Any] | None], top_n: int):
    """vLLM's prompt logprobs (None, then one {token id: Logprob} per prompt token) as ours."""
    return [
        None if entries is None else to_token_logprobs(token_id, entries, top_n)
        for token_id, entries in zip(prompt_ids, positions, strict=True)
    ]


class AsyncVLLMEngine:
    """An EngineClient over vLLM's AsyncLLM, for one checkpoint folder. Build it inside the process and
    event loop that will call `generate` (vLLM starts its engine-core process from here)."""

    def __init__(
        self,
        model: str,
        config: EngineConfig,
        options: VLLMOptions,
        metrics: MetricsSink | None = None,
        metric_labels: dict[str, str] | None = None,
    ):
        require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        labels = dict(metric_labels or {"model": "model"})
        stat_logger = _stat_logger_factory(metrics or NullSink(), labels)
        args = AsyncEngineArgs(**engine_args(model, config, options))
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger])
        self.max_model_len: int = self.llm.model_config.max_model_len
        self.vocab_size: int = self.llm.model_config.get_vocab_size()
        self._ids = itertools.count()

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resumed_ids: list[int] | tuple[int, ...] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Raises RequestError / EngineOverloadedError / EngineStoppedError
        before the first output if the request is refused; closing the iterator aborts the request.

        `resumed_ids` (a migrated stream) go to vLLM as more prompt, with max_tokens cut by their number.
        Greedy output continues exactly; what differs from our engine's resume: vLLM detokenises the new
        tokens with the resumed ones as context but cannot see a stop string that starts in them, and a
        seeded request draws from a fresh stream (vLLM's generator cannot start at a position)."""
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        check_request(prompt_ids, params, self.vocab_size, self.max_model_len)
        resumed = list(resumed_ids)
        check_resumed(resumed, params, self.vocab_size)
        if self.llm.errored:
            raise EngineStoppedError("the vLLM engine has stopped")
        vllm_params = to_vllm_params(replace(params, max_tokens=params.max_tokens - len(resumed)))
        request_id = request_id or f"vreq-{next(self._ids)}"
        num_output, prompt_positions, first = len(resumed), None, True
        scoring_only = params.max_tokens == 0
        stream = self.llm.generate({"prompt_token_ids": list(prompt_ids) + resumed}, vllm_params, request_id)
        async with aclosing(stream):  # leaving early closes vLLM's generator, which aborts the request
            try:
                async for out in stream:
                    [completion] = out.outputs  # n=1
                    if out.prompt_logprobs is not None and prompt_positions is None:  # DELTA: all of them, once
                        prompt_positions = list(out.prompt_logprobs)
                    if scoring_only and not out.finished:
                        continue  # the one token vLLM had to generate is not part of the answer
                    token_ids = [] if scoring_only else list(completion.token_ids)
                    num_output += len(token_ids)
                    logprobs = []
                    if params.logprobs is not None and not scoring_only:  # one {token id: Logprob} per new token
                        pairs = zip(token_ids, completion.logprobs, strict=True)
                        logprobs = [to_token_logprobs(t, entries, params.logprobs) for t, entries in pairs]
                    prompt_logprobs = None
                    if first and params.prompt_logprobs is not None:  # ours come with the first output, as vLLM's
                        prompt_logprobs = to_prompt_logprobs(prompt_ids, prompt_positions, params.prompt_logprobs)
                    first = False
                    yield RequestOutput(
                        request_id=request_id,
                        new_token_ids=token_ids,
                        new_text="" if scoring_only else completion.text,
                        new_logprobs=logprobs,
                        finished=out.finished,
                        finish_reason=("length" if scoring_only else completion.finish_reason)
                        if out.finished
                        else None,
                        num_prompt_tokens=len(prompt_ids),
                        num_output_tokens=num_output,
                        prompt_logprobs=prompt_logprobs,
                    )
            except GracefulHTTPError as e:  # vLLM's admission control (queue full)
                raise EngineOverloadedError(str(e)) from None
            except VLLMClientError as e:
                raise RequestError(str(e)) from None
            except EngineDeadError as e:
                raise EngineStoppedError(f"the vLLM engine has stopped: {e}") from None

    @property
    def alive(self) -> bool:
        return not self.llm.errored

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop vLLM's engine core (AsyncLLM.shutdown takes no timeout; it returns when the core has gone)."""
        self.llm.shutdown()


def _stat_logger_factory(sink: MetricsSink, labels: dict[str, str]):
    """A vLLM stat logger factory that records the moe_ metrics that apply to vLLM: requests running and
    waiting, KV cache usage, prompt and generated tokens, queue time. (Step time, batch tokens, tokens per
    expert and shard dispatch are the native engine's; TTFT/ITL/e2e and HTTP metrics are recorded by the
    Ingress for both engines.)"""
    from vllm.v1.metrics.loggers import StatLoggerBase

    def record(metric: Metric, value: float) -> None:
        sink.record(metric, value, {k: v for k, v in labels.items() if k in metric.labels})

    class MoeStatLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                record(RUNNING, scheduler_stats.num_running_reqs)
                record(WAITING, scheduler_stats.num_waiting_reqs)
                record(KV_USAGE, scheduler_stats.kv_cache_usage)
            if iteration_stats is not None:
                record(GENERATED_TOKENS, iteration_stats.num_generation_tokens)
                for finished in iteration_stats.finished_requests:
                    record(PROMPT_TOKENS, finished.num_prompt_tokens)
                    record(QUEUE, finished.queued_time)

        def log_engine_initialized(self):
            pass

    return MoeStatLogger
