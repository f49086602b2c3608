"""An asyncio front for LLMEngine: one background thread runs engine steps; each request gets an
async stream of its outputs.

>>> engine = AsyncEngine(lambda: LLMEngine.from_pretrained("demo/"))
>>> async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=8)):
...     print(out.new_text, end="")

Only the engine thread touches the LLMEngine; callers talk to it through a command queue, so a
request is accepted or refused (RequestError, EngineOverloadedError) between two steps. Leaving the
`async for` early (client gone, task cancelled) aborts the request and frees its cache.

The engine is built on its own thread too (`build` runs there), so loading the weights (prepacking,
the KV cache's fill) and every step run their parallel torch ops on one thread. Why: GNU OpenMP, which
CPU torch uses, keeps a pool of worker threads per thread that ever ran a parallel region; with two
pools there are more OpenMP threads than cores on a 2-core replica, and libgomp then lets idle workers
spin only briefly, so every small op of a decode step wakes a sleeping worker. Measured on bench,
batch 1, 2 threads: a decode step on a thread other than the loader's took 28-29 ms, on the loader's
own thread 24-25 ms (benchmarks/README.md, Engines).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import RequestOutput, SamplingParams
from serving.errors import EngineOverloadedError, EngineStoppedError, RequestError, StepFailedError
from serving.expert_load import ExpertLoad

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue  # RequestOutput | BaseException


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    resumed_ids: list[int]
    stream: _Stream
    accepted: asyncio.Future


class AsyncEngine:
    def __init__(self, build: Callable[[], LLMEngine], name: str = "engine"):
        """Start the engine thread, build the engine there (`build`), and return once it is built; if
        building fails, its error is raised here and the thread ends."""
        self._commands: queue.Queue = queue.Queue()  # _Add | ("abort", id) | None (stop)
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self.engine: LLMEngine  # set on the engine thread, before `built` is
        built: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(build, built), name=f"{name}-loop", daemon=True)
        self._thread.start()
        built.result()

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        resumed_ids: list[int] | tuple[int, ...] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes. Raises RequestError / EngineOverloadedError
        before the first output if the request is refused. `resumed_ids`: see LLMEngine.add_request."""
        if not self.alive:
            raise EngineStoppedError("the engine has shut down")
        loop = asyncio.get_running_loop()
        request_id = request_id or f"areq-{next(self._ids)}"
        stream = _Stream(loop, asyncio.Queue())
        accepted = loop.create_future()
        self._commands.put(_Add(request_id, list(prompt_ids), params, list(resumed_ids), stream, accepted))
        finished = False
        try:
            try:
                await accepted
            except (RequestError, EngineOverloadedError):
                finished = True  # refused: nothing to abort
                raise
            while True:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after its current step; waiting streams get an error."""
        self._commands.put(None)
        self._thread.join(timeout)
        self.engine.runner.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def expert_load(self) -> ExpertLoad:
        """Rows per (MoE layer, expert) of the last expert_load_window_s (an ExpertLoadSource). Read under
        the window's lock, not through the engine thread: it answers at once, even mid-step."""
        return self.engine.expert_load.snapshot()

    @property
    def max_model_len(self) -> int:
        """The context limit the engine enforces (model, config and KV cache together)."""
        return self.engine.max_model_len

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self, build: Callable[[], LLMEngine], built: concurrent.futures.Future) -> None:
        try:
            self.engine = build()
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        while True:
            idle = not self.engine.has_unfinished()
            try:
                commands = [self._commands.get(timeout=0.5)] if idle else []  # idle: block briefly
            except queue.Empty:
                continue
            while not self._commands.empty():
                commands.append(self._commands.get_nowait())
            for cmd in commands:
                if cmd is None:
                    self._fail_all(EngineStoppedError("the engine is shutting down"))
                    return
                self._handle(cmd)
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except StepFailedError as e:  # a failed step fails its own requests, not the queued ones
                    log.error("engine step failed: %s", e, exc_info=e.cause)
                    self._fail(e.request_ids, e.cause)
                    continue
                except Exception as e:  # a failure outside the model run: nothing says which requests
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                for out in outputs:
                    self._deliver(out)

    def _handle(self, cmd) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id, cmd.resumed_ids)
            except Exception as e:
                _post(cmd.stream.loop, _set_exception, cmd.accepted, e)
                return
            self._streams[cmd.request_id] = cmd.stream
            if not _post(cmd.stream.loop, _set_result, cmd.accepted, None):
                self._streams.pop(cmd.request_id)
                self.engine.abort(cmd.request_id)
        else:
            _, request_id = cmd
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        if not _post(stream.loop, stream.outputs.put_nowait, out):  # the caller's event loop is gone
            self._streams.pop(out.request_id, None)
            self.engine.abort(out.request_id)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)
            if (stream := self._streams.pop(request_id, None)) is not None:
                _post(stream.loop, stream.outputs.put_nowait, error)

    def _fail_all(self, error: BaseException) -> None:
        self._fail(list(self._streams), error)


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
    """Run fn(*args) on the caller's event loop; False if that loop has closed (caller gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
