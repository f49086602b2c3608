"""The engine loop, named as in nano-vllm: LLMEngine.step() (llm_engine.py) is schedule
(scheduler.py, over sequence.py and the paged kv_cache.py) -> run (model_runner.py, which owns the
step's tensors) -> postprocess (sampler.py, stops.py); async_engine.py streams it to asyncio callers."""
