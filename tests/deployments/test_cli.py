"""`moe-serve` as a user runs it: a real subprocess through the installed entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from deployments.cli import main
from router.placement import LayeredPlacement
from router.rebalance import read_load, rebalance
from serving.api.app import build_api
from serving.demo import FP8_QUANTIZATION_CONFIG
from serving.engine.llm_engine import LLMEngine
from serving.engine_client import SamplingParams
from serving.tokenizer import Tokenizer
from tests.serving.api.fakes import FixedExpertLoad, ScriptedEngine
from tests.serving.api.live_server import live_server

MOE_SERVE = shutil.which("moe-serve", path=str(Path(sys.executable).parent)) or "moe-serve"


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([MOE_SERVE, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("command", [[], ["make-demo"], ["generate"], ["rebalance"]])
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


def test_make_demo_fp8_writes_deepseeks_layout_and_generates(tmp_path):
    out = tmp_path / "fp8"
    made = cli("make-demo", "--arch", "deepseek_v3", "--fp8", "--out", str(out))
    assert made.returncode == 0, made.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    }  # fmt: skip
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        tensors = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()}
    quantized = [name for name, (dtype, _) in tensors.items() if dtype == "F8_E4M3"]
    for name in quantized:  # a float32 scale per 128x128 block, partial at the edges
        rows, cols = tensors[name][1]
        assert tensors[f"{name}_scale_inv"] == ("F32", [-(-rows // 128), -(-cols // 128)]), name
    assert any(shape[0] % 128 and shape[0] > 128 for _, shape in (tensors[n] for n in quantized))  # edge after a full
    layer = "model.layers.1."
    for part in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                 "self_attn.o_proj", "mlp.shared_experts.gate_proj", "mlp.experts.0.down_proj"):  # fmt: skip
        assert f"{layer}{part}.weight" in quantized, part
    assert "model.layers.0.mlp.up_proj.weight" in quantized  # the dense MLP
    plain = {name: dtype for name, (dtype, _) in tensors.items() if name not in quantized and "_scale_inv" not in name}
    assert set(plain.values()) == {"BF16"}  # embeddings, norms, gates, their bias, lm_head
    assert {"lm_head.weight", "model.embed_tokens.weight", f"{layer}mlp.gate.weight",
            f"{layer}mlp.gate.e_score_correction_bias", f"{layer}input_layernorm.weight"} <= set(plain)  # fmt: skip

    result = cli("generate", "--model", str(out), "--prompt-ids", "5,6,7", "--max-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    [want] = LLMEngine.from_pretrained(out).generate_batch([[5, 6, 7]], SamplingParams(max_tokens=6, temperature=0.0))
    assert json.loads(result.stdout)["token_ids"] == want.token_ids


def test_make_demo_fp8_is_only_for_deepseek(tmp_path):
    result = cli("make-demo", "--arch", "mixtral", "--fp8", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "deepseek_v3" in result.stderr and "Traceback" not in result.stderr


def test_rebalance_json_is_the_planners_report(tmp_path):
    load = {"load": [[90, 10, 10, 10, 5, 5, 5, 5], [1, 1, 1, 1, 1, 1, 1, 50], [3, 3, 3, 3, 3, 3, 3, 3]]}
    path = tmp_path / "load.json"
    path.write_text(json.dumps(load))
    result = cli("rebalance", "--load", str(path), "--shards", "3", "--redundant", "4", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert got == rebalance(read_load(path.read_text(), str(path)), num_shards=3, redundant=4).to_json()
    assert len(got["placement"]) == 3 and got["balancedness"] > got["contiguous_balancedness"]
    LayeredPlacement.from_json(got["placement"], num_experts=8)  # a valid placement in every layer

    text = cli("rebalance", "--load", str(path), "--shards", "3", "--redundant", "4")
    assert text.returncode == 0 and "planned 0.99" in text.stdout and "layer 2:" in text.stdout


def test_rebalance_errors_name_the_problem(tmp_path):
    missing = cli("rebalance", "--load", str(tmp_path / "none.json"), "--shards", "2")
    assert missing.returncode == 2 and "none.json: No such file" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"load": [[1, 2], [3]]}')
    ragged = cli("rebalance", "--load", str(bad), "--shards", "2")
    assert ragged.returncode == 2 and "load[1] has 1 experts, load[0] has 2" in ragged.stderr
    bad.write_text('{"load": [[1, 2]]}')
    too_many = cli("rebalance", "--load", str(bad), "--shards", "3")
    assert too_many.returncode == 2 and "3 shards need at least one slot each" in too_many.stderr
    for result in (missing, ragged, too_many):
        assert "Traceback" not in result.stderr
    no_source = cli("rebalance", "--shards", "2")
    assert no_source.returncode == 2 and "--load" in no_source.stderr


def test_make_demo_router_skew_is_checked_before_anything_is_written(tmp_path, capsys):
    assert main(["make-demo", "--router-skew", "uniform", "--out", str(tmp_path / "x")]) == 2
    assert "router skew 'uniform'" in capsys.readouterr().err and not (tmp_path / "x").exists()


ADMIN, USER = "admin-key-cli", "user-key-cli"


@pytest.fixture(scope="module")
def load_server(tokenizer_dir):
    """An API server with keys whose expert load is FixedExpertLoad (2 layers of 4 experts, 2 routers)."""
    tokenizer = Tokenizer(tokenizer_dir)
    keys = dict(api_keys=frozenset({USER}), admin_keys=frozenset({ADMIN}))
    app = build_api(ScriptedEngine(tokenizer.vocab_size, 256), tokenizer, "demo", max_model_len=256,
                    expert_load=FixedExpertLoad(), **keys)  # fmt: skip
    with live_server(app) as url:
        yield url


def test_rebalance_saves_a_servers_load_file_or_prints_its_summary(load_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_SERVE_ADMIN_KEY", ADMIN)
    out = tmp_path / "load.json"
    assert main(["rebalance", "--url", load_server, "--save", str(out)]) == 0
    assert json.loads(out.read_text()) == FixedExpertLoad.LOAD.to_json()
    assert "wrote the expert load of 2 MoE layers (32 rows, 2 router(s))" in capsys.readouterr().out
    assert main(["rebalance", "--url", load_server]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert "2 router(s)" in summary[0]
    assert "max/mean  2.50 (expert 0)" in summary[1] and "max/mean  1.00" in summary[2]  # 10 of 16 rows; even


def test_rebalance_plans_from_a_servers_load_or_the_file_it_saved(load_server, tmp_path, monkeypatch, capsys):
    """--url with --shards plans from the live load; a saved load file (with the server's metadata) plans
    the same through --load."""
    monkeypatch.setenv("MOE_SERVE_ADMIN_KEY", ADMIN)
    saved = tmp_path / "load.json"
    args = ["--shards", "2", "--redundant", "2", "--json"]
    assert main(["rebalance", "--url", load_server, "--save", str(saved), *args]) == 0
    live = json.loads(capsys.readouterr().out)  # stdout is the report alone; the "wrote" line went to stderr
    assert main(["rebalance", "--load", str(saved), *args]) == 0
    assert json.loads(capsys.readouterr().out) == live
    assert live["balancedness"] >= live["contiguous_balancedness"] and len(live["placement"]) == 2
    assert main(["rebalance", "--load", str(saved)]) == 2
    assert "--shards is required with --load" in capsys.readouterr().err


def test_rebalance_says_why_it_could_not_fetch_or_save(load_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOAD_KEY", USER)
    assert main(["rebalance", "--url", load_server, "--api-key-env", "LOAD_KEY"]) == 2
    assert "HTTP 403" in capsys.readouterr().err
    monkeypatch.delenv("MOE_SERVE_ADMIN_KEY", raising=False)
    assert main(["rebalance", "--url", load_server]) == 2  # no key sent
    assert "HTTP 401" in capsys.readouterr().err
    monkeypatch.setenv("MOE_SERVE_ADMIN_KEY", ADMIN)
    assert main(["rebalance", "--url", load_server, "--save", str(tmp_path / "no" / "such" / "dir.json")]) == 2
    assert "--save" in capsys.readouterr().err
