"""Bad checkpoints fail loudly, naming the file, the tensor or the config field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serving.errors import CheckpointError, ConfigError
from serving.experts.loading import load_experts
from serving.model.checkpoint import Checkpoint
from serving.model.config import ModelConfig
from serving.model.decoder import load_local


@pytest.fixture
def copy(mixtral_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(mixtral_dir, dst)
    return dst


def rewrite(folder, edit):
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(copy):
    rewrite(copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight.*missing"):
        load_local(copy)


def test_mis_shaped_tensor_names_file_tensor_and_shapes(copy):
    rewrite(copy, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.norm.weight' has shape \(63,\), expected \(64,\)",
    ):
        load_local(copy)


def test_mis_shaped_expert_names_the_layer(copy):
    def edit(t):
        t["model.layers.0.block_sparse_moe.experts.3.w2.weight"] = torch.zeros(64, 47)

    rewrite(copy, edit)
    with pytest.raises(CheckpointError, match="layer 0 expert 3"):
        load_local(copy)


def test_nan_weights_are_refused(copy):
    rewrite(copy, lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(CheckpointError, match="embed_tokens.*NaN"):
        load_local(copy)


def test_corrupt_file_is_named(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_local(copy)


def test_only_the_asked_experts_are_read(mixtral_dir):
    cfg = ModelConfig.from_pretrained(mixtral_dir)
    full, part = Checkpoint(mixtral_dir), Checkpoint(mixtral_dir)
    load_experts(full, cfg, list(range(8)), torch.float32)
    load_experts(part, cfg, [2, 3], torch.float32)
    assert part.bytes_read * 4 == full.bytes_read


def test_each_moe_layer_may_load_other_experts(mixtral_dir):
    """{layer: ids}: a per-layer placement's shard reads, in each layer, only that layer's experts."""
    cfg = ModelConfig.from_pretrained(mixtral_dir)
    first, second = cfg.moe_layer_ids
    every, part = Checkpoint(mixtral_dir), Checkpoint(mixtral_dir)
    full = load_experts(every, cfg, list(range(8)), torch.float32)
    held = load_experts(part, cfg, {first: [1, 6], second: [0, 2, 7]}, torch.float32)
    assert (held[first].expert_ids.tolist(), held[second].expert_ids.tolist()) == ([1, 6], [0, 2, 7])
    torch.testing.assert_close(held[second].gate_up, full[second].gate_up[[0, 2, 7]], rtol=0, atol=0)
    assert part.bytes_read * 8 == every.bytes_read * 5 // 2  # 2 + 3 of 8 experts in the two layers
    with pytest.raises(CheckpointError, match=rf"no expert ids for MoE layers \[{second}\]"):
        load_experts(Checkpoint(mixtral_dir), cfg, {first: [1]}, torch.float32)


def config_dict(mixtral_dir):
    return json.loads((mixtral_dir / "config.json").read_text())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "llama"}, "model_type"),
        ({"num_experts_per_tok": 9}, "top_k"),
        ({"hidden_size": "big"}, "hidden_size"),
    ],
)
def test_unsupported_config_fields_are_errors_naming_the_field(mixtral_dir, change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**config_dict(mixtral_dir), **change})


def test_qwen_dense_layers_and_sliding_windows(mixtral_dir):
    base = {
        **config_dict(mixtral_dir),
        "model_type": "qwen2_moe",
        "moe_intermediate_size": 32,
        "num_experts": 8,
    }
    cfg = ModelConfig.from_dict({**base, "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.sparse_layers == (False, True, False, False)
    with pytest.raises(ConfigError, match="sliding"):
        ModelConfig.from_dict({**base, "use_sliding_window": True})


def test_gates_are_kept_in_float32_with_the_served_dtypes_values(mixtral_dir):
    from serving.model.decoder import load_model

    model, _ = load_model(mixtral_dir, torch.bfloat16)
    gate = model.model.layers[0].mlp.gate.weight
    raw = Checkpoint(mixtral_dir).read("model.layers.0.mlp.gate.weight", tuple(gate.shape), torch.float32)
    assert gate.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert torch.equal(gate, raw.to(torch.bfloat16).float())  # the bf16 model's numbers, upcast once at load
    assert gate.float() is gate  # what route() calls per step: no copy
