"""`moe-serve` as a user runs it: a real subprocess through the installed entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving.engine.llm_engine import LLMEngine
from serving.engine_client import SamplingParams

MOE_SERVE = shutil.which("moe-serve", path=str(Path(sys.executable).parent)) or "moe-serve"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([MOE_SERVE, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("command", [[], ["make-demo"], ["generate"]])
def test_every_subcommand_has_help(command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and "usage: moe-serve" in result.stdout


def test_make_demo_then_generate_json_matches_the_engine(tmp_path):
    out = tmp_path / "demo"
    made = cli("make-demo", "--arch", "deepseek_v3", "--out", str(out))
    assert made.returncode == 0, made.stderr
    assert (out / "config.json").exists() and "make-demo deepseek_v3" in made.stderr  # progress bar

    result = cli("generate", "--model", str(out), "--prompt", "Experts live on", "--max-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    engine = LLMEngine.from_pretrained(out)
    prompt = engine.tokenizer.encode("Experts live on")
    [want] = engine.generate_batch([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    assert got["token_ids"] == want.token_ids and got["text"] == want.text

    by_ids = cli("generate", "--model", str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens", "8",
                 "--json")  # fmt: skip
    assert json.loads(by_ids.stdout)["token_ids"] == want.token_ids


def test_bad_model_folder_is_a_clear_error(tmp_path):
    result = cli("generate", "--model", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr
