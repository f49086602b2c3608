"""lm-evaluation-harness against the real app on uvicorn, with the native engine (float32 demo) behind it.

Tasks of our own (local JSONL files, no hub) cover lm-eval's three request types: multiple_choice
(loglikelihood: `echo`, `logprobs: 1`, `max_tokens: 1`, token-id prompts), wikitext-style perplexity
(loglikelihood_rolling: the same requests, one per window of a document) and generate_until (greedy
completions with the task's stop strings). lm-eval runs them with `local-completions` and the generation
task with `local-chat-completions`. Every number lm-eval reports is checked against the model scored in
this process (serving/engine/model_runner.score_prompts: one forward pass, no HTTP, no scheduler), and
every generated text against the engine's own greedy output.

The server's context is 64 tokens, and lm-eval is told so (`max_length`): a long document is then split
into several windows, the longest exactly as long as the server takes (63 prompt tokens + the 1 generated).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from serving.api.app import build_api
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine.model_runner import score_prompts
from serving.engine_client import EngineConfig, SamplingParams
from serving.model.decoder import load_local
from serving.tokenizer import Tokenizer
from tests.serving.api.live_server import live_server

# lm-eval's evaluator, task manager and utils import datasets and pandas (seconds): imported where they are used,
# so that collecting the suite does not pay for them.
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency: pip install -e '.[dev]'")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
MODEL = "demo-mixtral"
MAX_MODEL_LEN = 64
CONFIG = EngineConfig(kv_cache_mb=16, max_model_len=MAX_MODEL_LEN)
TOL = 1e-4  # float32: the engine's chunked, batched prefill against one forward pass over the whole prompt
MAX_GEN_TOKS = 8
# Five stop strings, as HumanEval's (OpenAI's limit is 4; lm-eval adds the EOS string when num_concurrent is 1).
UNTIL = ["!", " th", "scal", "\n\n", "Q:"]

MULTIPLE_CHOICE = [  # the demo's greedy continuation of the last question is " outputs": lm-eval's is_greedy
    {"question": "Where do experts live?", "choices": ["on shards", "in the router", "nowhere"], "answer": 0},
    {"question": "What does the gate pick?", "choices": ["the top-k experts", "a colour"], "answer": 0},
    {"question": "Who holds the KV cache?", "choices": ["the router", "each shard", "Qdrant"], "answer": 0},
    {"question": "Which process runs attention?", "choices": ["the router", "outputs"], "answer": 0},
]
DOCUMENTS = [  # the first is longer than the server's context: lm-eval scores it in several windows
    {"text": "Experts live on shards, and the router sends each shard the rows its experts were picked for. " * 3},
    {"text": "The gate picks two experts for every token."},
    {"text": "Shards hold no state per request."},
]
QUESTIONS = [  # the demo's greedy text ends at different stop strings after these, or at once ("Experts live on")
    {"question": "Shards hold", "answer": " bytes"},
    {"question": "A router sends tokens to", "answer": "ode"},
    {"question": "The gate picks", "answer": " who"},
    {"question": "Experts live on", "answer": ""},
]


def metric(name: str, aggregation: str, higher_is_better: bool) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


TASKS = {  # name: (rows, task config); lm-eval's YAML fields, written out by task_dir
    "demo_choice": (MULTIPLE_CHOICE, {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [metric("acc", "mean", True)],
    }),
    "demo_perplexity": (DOCUMENTS, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            metric("word_perplexity", "weighted_perplexity", False), metric("bits_per_byte", "bits_per_byte", False)
        ],
    }),
    "demo_generate": (QUESTIONS, {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": UNTIL, "max_gen_toks": MAX_GEN_TOKS},
        "metric_list": [metric("exact_match", "mean", True)],
    }),
}  # fmt: skip


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A folder of tasks over local JSONL files (the `json` dataset builder reads them; nothing comes from a hub)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, (rows, config) in TASKS.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        dataset = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")}
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": dataset, "test_split": "test", **config}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def server(demo_dir):
    """The real app around the real engine (its own thread), on uvicorn at http://127.0.0.1:<free port>."""
    engine = LLMEngine.from_pretrained(demo_dir, CONFIG)
    front = AsyncEngine(lambda: engine, name="lm-eval-test")
    app = build_api(front, engine.tokenizer, MODEL, max_model_len=engine.max_model_len)
    try:
        with live_server(app) as url:
            yield url
    finally:
        front.shutdown()


@pytest.fixture(scope="module")
def reference(demo_dir):
    """(model, experts, engine) on the same checkpoint, used offline: what lm-eval's numbers must be."""
    model, experts = load_local(demo_dir)
    return model, experts, LLMEngine(model, experts, Tokenizer(demo_dir), CONFIG)


@pytest.fixture(scope="module")
def hf_tokenizer(demo_dir):
    """The tokenizer lm-eval loads from `tokenizer=` (tokenizer_backend=huggingface): it makes the ids it sends."""
    return AutoTokenizer.from_pretrained(demo_dir)


def evaluate(model: str, model_args: dict, tasks: list[str], task_dir: Path, **kwargs) -> dict:
    """lm-eval's Python entry point on our tasks only (the built-in ones are not indexed)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = {"model": MODEL, "max_retries": 1, **model_args}  # one try: any refusal fails the run, not a retry
    return lm_eval.simple_evaluate(
        model=model, model_args=args, tasks=tasks, task_manager=manager, log_samples=True, **kwargs
    )


def completions_args(server: str, demo_dir: Path) -> dict:
    """local-completions as docs/evaluation.md runs it, with the server's context as max_length."""
    return {
        "base_url": f"{server}/v1/completions",
        "tokenizer": str(demo_dir),
        "tokenizer_backend": "huggingface",
        "num_concurrent": 2,
        "max_length": MAX_MODEL_LEN,
    }


@pytest.fixture(scope="module")
def completions(server, demo_dir, task_dir) -> dict:
    """All three tasks through /v1/completions."""
    return evaluate("local-completions", completions_args(server, demo_dir), list(TASKS), task_dir)


def loglikelihood(model, experts, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log P(continuation | context) from one forward pass over both, and whether each token is the argmax."""
    [logits] = score_prompts(model, experts, [context + continuation])  # [len, V]
    logprobs = torch.log_softmax(logits[len(context) - 1 : -1].double(), dim=-1)  # row i predicts token i + 1
    picked = logprobs[torch.arange(len(continuation)), torch.tensor(continuation)]
    greedy = bool((logprobs.argmax(dim=-1) == torch.tensor(continuation)).all())
    return picked.sum().item(), greedy


def encode(hf_tokenizer, text: str) -> list[int]:
    return hf_tokenizer(text, add_special_tokens=False).input_ids


def encode_pair(hf_tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids lm-eval sends for a (context, continuation) pair: the context alone, then the rest of the whole."""
    assert context == context.rstrip(), "lm-eval moves a context's trailing spaces to the continuation"
    context_ids = encode(hf_tokenizer, context)
    return context_ids, encode(hf_tokenizer, context + continuation)[len(context_ids) :]


def test_every_multiple_choice_loglikelihood_is_the_models(completions, reference, hf_tokenizer):
    model, experts, _ = reference
    samples = completions["samples"]["demo_choice"]
    assert len(samples) == len(MULTIPLE_CHOICE)
    correct, greedy_seen = [], False
    for sample in samples:
        scores = []
        for (context, continuation), [(got, got_greedy)] in zip(sample["arguments"], sample["resps"], strict=True):
            want, want_greedy = loglikelihood(model, experts, *encode_pair(hf_tokenizer, context, continuation))
            assert got == pytest.approx(want, abs=TOL), (context, continuation)
            assert got_greedy == want_greedy, (context, continuation)
            scores.append(want)
            greedy_seen |= want_greedy
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == sample["target"]))
    assert greedy_seen, "no continuation was the greedy one: is_greedy went unchecked"
    assert completions["results"]["demo_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_every_perplexity_window_is_scored_as_the_model_does(completions, reference, hf_tokenizer):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, experts, _ = reference
    # The token before a document's first window: lm-eval takes BOS, or EOS when the tokenizer has none.
    prefix = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else hf_tokenizer.eos_token_id
    samples = completions["samples"]["demo_perplexity"]
    assert len(samples) == len(DOCUMENTS)
    windows_seen, longest = 0, 0
    for sample in samples:
        [(text,)] = sample["arguments"]
        # lm-eval's own split of a document into disjoint windows of at most max_length - 1 tokens (the server adds
        # the one token it generates); each window is one request.
        windows = [
            make_disjoint_window(w)
            for w in get_rolling_token_windows(encode(hf_tokenizer, text), prefix, MAX_MODEL_LEN - 2, 1)
        ]
        longest = max(longest, *(len(context + continuation) for context, continuation in windows))
        want = sum(loglikelihood(model, experts, context, continuation)[0] for context, continuation in windows)
        [[got]] = sample["resps"]
        assert got == pytest.approx(want, abs=TOL * len(windows)), text
        windows_seen += len(windows)
    assert windows_seen > len(DOCUMENTS), "the long document took several windows"
    assert longest == MAX_MODEL_LEN - 1, "a window filled the context (with the token the server generates)"
    results = completions["results"]["demo_perplexity"]
    assert math.isfinite(results["word_perplexity,none"]) and results["word_perplexity,none"] > 1


def greedy(engine: LLMEngine, prompt_ids: list[int], stop: list[str]) -> str:
    params = SamplingParams(max_tokens=MAX_GEN_TOKS, temperature=0, stop=tuple(stop))
    [result] = engine.generate_batch([prompt_ids], params)
    return result.text


def test_generate_until_is_the_engines_greedy_text(completions, reference, hf_tokenizer):
    _, _, engine = reference
    samples = completions["samples"]["demo_generate"]
    assert len(samples) == len(QUESTIONS)
    texts = []
    for sample in samples:
        [(context, gen_kwargs)] = sample["arguments"]
        assert gen_kwargs["until"] == UNTIL
        [[got]] = sample["resps"]
        # num_concurrent > 1 sends the task's stop strings as they are (with 1, lm-eval adds the EOS string,
        # which changes nothing: EOS ends the text anyway).
        assert got == greedy(engine, encode(hf_tokenizer, context), UNTIL), context
        texts.append(got)
    assert any(texts) and not all(texts), f"some texts, and one stopped at once: {texts}"
    assert completions["results"]["demo_generate"]["exact_match,none"] == pytest.approx(
        sum(t == q["answer"] for t, q in zip(texts, QUESTIONS, strict=True)) / len(QUESTIONS)
    )


def test_chat_completions_answer_as_the_engine_does(server, task_dir, reference):
    """local-chat-completions sends messages (the server applies the chat template) and at most 4 stop strings."""
    _, _, engine = reference
    model_args = {"base_url": f"{server}/v1/chat/completions", "num_concurrent": 2}
    run = evaluate("local-chat-completions", model_args, ["demo_generate"], task_dir, apply_chat_template=True)
    samples = run["samples"]["demo_generate"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        [[got]] = sample["resps"]
        messages = [{"role": "user", "content": sample["doc"]["question"]}]
        assert got == greedy(engine, engine.tokenizer.apply_chat_template(messages), UNTIL[:4]), messages
    assert "exact_match,none" in run["results"]["demo_generate"]


def test_the_docs_example_tasks_run(server, demo_dir, tmp_path, monkeypatch):
    """docs/eval_example, as docs/evaluation.md runs it: from the repo root (its data paths are relative to it)."""
    import datasets

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # not the user's cache
    tasks = ["demo_choice", "demo_perplexity", "demo_generate"]
    run = evaluate("local-completions", completions_args(server, demo_dir), tasks, REPO / "docs/eval_example")
    for task in tasks:
        samples = run["samples"][task]
        assert samples and all(sample["resps"] for sample in samples), task
    assert 0 <= run["results"]["demo_choice"]["acc,none"] <= 1
    assert run["results"]["demo_perplexity"]["word_perplexity,none"] > 1
