"""Linears on oneDNN-packed weights (serving/model/prepack.py): the same bits as nn.Linear in bfloat16,
layer by layer and through whole models of every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serving.engine.model_runner import score_prompts
from serving.experts.loading import load_experts
from serving.experts.local import LocalExpertBackend
from serving.model.decoder import load_model
from serving.model.layers import LinearWeight
from serving.model.prepack import PackedLinear, can_prepack, prepack_linears
from tests.serving.hf_models import VARIANTS, VOCAB, build_reference, save_both_layouts

pytestmark = pytest.mark.skipif(
    not can_prepack(torch.bfloat16, torch.device("cpu")), reason="this CPU's oneDNN has no bfloat16 path"
)


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_gives_nn_linears_bits_from_1_to_512_rows(bias):
    torch.manual_seed(0)
    linear = nn.Linear(256, 384, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    packed = PackedLinear(linear)
    for rows in (1, 2, 3, 7, 32, 65, 128, 512):
        x = torch.randn(rows, 256, dtype=torch.bfloat16)
        assert torch.equal(packed(x), linear(x)), rows
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    assert torch.equal(packed(x), linear(x))  # leading dimensions kept
    strided = torch.randn(256, 9, dtype=torch.bfloat16).t()  # a view whose rows are not dense
    assert torch.equal(packed(strided), linear(strided))


def test_kept_linears_and_other_modules_stay_as_they_are():
    model = nn.Sequential(nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 64), LinearWeight(64, 8)), nn.Linear(64, 8))
    model = model.to(torch.bfloat16).requires_grad_(False)
    kept = model[2]
    assert prepack_linears(model, keep=(kept,)) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1][0], PackedLinear)
    assert model[2] is kept and isinstance(model[1][1], LinearWeight)


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_models_give_the_same_bfloat16_logits(variant, tmp_path):
    per_expert, _ = save_both_layouts(build_reference(variant), tmp_path)
    gen = torch.Generator().manual_seed(3)
    batch = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 6, 19)]
    logits = {}
    for prepack in (False, True):
        model, ckpt = load_model(per_expert, torch.bfloat16, "cpu", prepack=prepack)
        every = list(range(model.config.num_experts))
        experts = LocalExpertBackend(load_experts(ckpt, model.config, every, torch.bfloat16, "cpu", "loop"))
        packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
        plain = [m for m in model.modules() if type(m) is nn.Linear]
        assert (len(packed), len(plain)) == ((len(packed), 0) if prepack else (0, len(plain)))
        logits[prepack] = score_prompts(model, experts, batch)
    assert len(packed) > 0
    for plain_logits, packed_logits in zip(logits[False], logits[True], strict=True):
        assert torch.equal(plain_logits, packed_logits), variant
