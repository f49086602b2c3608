"""A small deterministic Mixture-of-Experts checkpoint in Hugging Face format (`moe-serve make-demo`).

The checkpoint is what transformers itself writes (config.json, model.safetensors,
generation_config.json) plus a byte-level BPE tokenizer trained on demo_data/corpus.txt, so our
engine, transformers and vLLM all load the same folder. Same arguments, same bytes.

>>> make_demo(Path("demo"), arch="deepseek_v3")            # per-expert layout, as most hub checkpoints
>>> make_demo(Path("demo-fused"), fused_experts=True)      # experts stacked: gate_up_proj [E, 2I, D]
>>> make_demo(Path("demo-fp8"), arch="deepseek_v3", fp8=True)  # DeepSeek-V3's block-wise fp8 layout
>>> make_demo(Path("demo-skewed"), router_skew="zipf:1.0")     # expert load ~ rank^-1 (serving/router_skew.py)
>>> make_demo(Path("demo-bench"), arch="deepseek_v3", size="bench")  # DeepSeek-V2-Lite's expert shapes, bf16

Parity tests that build their own transformers model save it the same way:

>>> model = AutoModelForCausalLM.from_config(demo_config("olmoe", DEMO_VOCAB_SIZE, num_hidden_layers=1))
>>> init_weights(model, seed=0); save_hf_checkpoint(model, tmp_path, fused_experts=True)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GenerationConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from serving.errors import ConfigError
from serving.model.fp8 import quantize
from serving.router_skew import calibration_prompts, parse_router_skew, skew_gates
from serving.tokenizer import Tokenizer

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
DEMO_VOCAB_SIZE = 1024
CORPUS = Path(__file__).parent / "demo_data" / "corpus.txt"

# Trained first, so their ids are 0, 1, 2. <|endoftext|> is eos, bos and pad, as in Qwen's tokenizers.
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EOS_ID, IM_END_ID = 0, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

MATRIX_STD = 0.1  # embeddings, projections, experts, gates
BIAS_STD = 0.02  # attention biases (Qwen2-MoE)
SCORE_BIAS_STD = 0.05  # DeepSeek's e_score_correction_bias: big enough to change some top-k choices

# Every arch: D=128, 4 query heads of 32 (vLLM's CPU attention needs head_dim >= 32), 2 KV heads,
# 8 experts of I=64 with top-2 routing (DeepSeek: 16 experts in 4 groups), float32.
# `rope_theta` is folded into transformers 5's `rope_parameters` by demo_config.
# fmt: off
_COMMON = dict(
    hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
    max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, dtype="float32",
)
_ARCH_FIELDS = {
    "mixtral": (MixtralConfig, dict(
        num_hidden_layers=2, head_dim=32, intermediate_size=64, num_local_experts=8, sliding_window=None,
        rope_theta=1e6,
    )),
    # One shared expert of 128 behind a sigmoid gate; qkv biases on (the class default).
    "qwen2_moe": (Qwen2MoeConfig, dict(
        num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
        shared_expert_intermediate_size=128, norm_topk_prob=False, rope_theta=1e6,
    )),
    # head_dim is hidden_size // num_attention_heads = 32 (this config class has no head_dim field).
    "qwen3_moe": (Qwen3MoeConfig, dict(
        num_hidden_layers=2, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
        norm_topk_prob=True, rope_theta=1e6,
    )),
    "olmoe": (OlmoeConfig, dict(
        num_hidden_layers=2, intermediate_size=64, num_experts=8, norm_topk_prob=False, rope_theta=1e4,
    )),
    # MLA: one latent KV of rank 64 per token; heads are 32 nope + 32 rope dims, values 32.
    # Layer 0 is a dense MLP (first_k_dense_replace=1); layers 1-2 are MoE with one shared expert.
    # Routing: sigmoid scores + e_score_correction_bias, best 2 of 4 groups, top-2, x2.5.
    "deepseek_v3": (DeepseekV3Config, dict(
        num_hidden_layers=3, num_key_value_heads=4, intermediate_size=256, moe_intermediate_size=64,
        n_routed_experts=16, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=32, first_k_dense_replace=1, num_nextn_predict_layers=0, rope_theta=1e4,
    )),
}
# fmt: on

# The fp8 demo is the deepseek_v3 demo with low-rank queries (as the real model) and widths that cross
# 128-blocks without filling them: D=192 (128 + 64), dense MLP 320 (2 x 128 + 64), experts 160 (128 + 32),
# so edge blocks appear in rows and columns, alone (kv_b_proj [256, 64]) and after full ones.
FP8_DEMO_OVERRIDES: dict[str, object] = dict(hidden_size=192, intermediate_size=320, moe_intermediate_size=160,
                                             q_lora_rank=96)  # fmt: skip
# size="bench": experts of a real model's shapes on the demo tokenizer, big enough that on a CPU a shard's
# compute, not its hop, sets a MoE layer's time: what sharding, placement and rebalancing change (the tiny demo's
# experts compute in microseconds). bfloat16, 3 MoE layers, 3.5-3.7 GB. Matrices ~ N(0, 0.1 * sqrt(128 / 2048)):
# activations of the tiny demo's scale.
# - deepseek_v3: DeepSeek-V2-Lite's shapes, the bench model of benchmarks/engine.py. Hidden 2048, 64 routed
#   experts of 1408 (top-6, one group), 2 shared, MLA with a latent of 512, 4 layers (the first dense).
# - qwen3_moe: Qwen3-30B-A3B's shapes (transformers' Qwen3MoeConfig defaults). Hidden 2048, 128 experts of 768
#   (top-8), no shared expert, GQA 32 query / 4 KV heads, 3 layers. With no shared expert the router has nothing
#   to compute while a layer's experts run, so on a small CPU machine the shards have its cores to themselves.
SIZES = ("tiny", "bench")
BENCH_OVERRIDES: dict[str, dict[str, object]] = {
    "deepseek_v3": dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6, n_group=1,
        topk_group=1, n_shared_experts=2, routed_scaling_factor=1.0, norm_topk_prob=False, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096, dtype="bfloat16",
    ),
    "qwen3_moe": dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=3,
        num_attention_heads=32, num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=4096, dtype="bfloat16",
    ),
}  # fmt: skip
BENCH_MATRIX_STD = MATRIX_STD * (128 / 2048) ** 0.5
# What DeepSeek-V3/R1 publish in config.json.
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
}  # fmt: skip


def train_tokenizer(out_dir: Path, vocab_size: int = DEMO_VOCAB_SIZE) -> None:
    """Train a byte-level BPE on corpus.txt and save it to `out_dir` (the files in TOKENIZER_FILES).

    Byte-level, no normaliser, no prefix space: `decode(encode(s)) == s` for every string. Special
    tokens <|endoftext|> (id 0: eos and pad), <|im_start|> (1), <|im_end|> (2); ChatML chat template.
    Deterministic: the same corpus and vocab_size give byte-identical files.
    """
    if not CORPUS.is_file():
        raise FileNotFoundError(f"tokenizer corpus {CORPUS} is missing; it ships with the package")
    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,  # would turn " ." into "." and break round trips
        model_max_length=_COMMON["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))


def demo_config(arch: str, vocab_size: int, **overrides: object) -> PreTrainedConfig:
    """The tiny config of `arch` (one of ARCHS), built with transformers' own config class.

    `overrides` are fields of that class (e.g. num_hidden_layers=1, q_lora_rank=32); `rope_theta` is
    folded into `rope_parameters`, the field transformers 5 uses. Raises ConfigError for an unknown
    arch or field.
    """
    if arch not in _ARCH_FIELDS:
        raise ConfigError(f"unknown demo arch {arch!r}; choose one of {', '.join(ARCHS)}")
    config_class, arch_fields = _ARCH_FIELDS[arch]
    fields = {**_COMMON, **arch_fields, **overrides, "vocab_size": vocab_size}
    known = set(vars(config_class())) | set(config_class.attribute_map) | {"rope_theta"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"{config_class.__name__} has no field(s) {', '.join(unknown)}")
    rope_theta = float(fields.pop("rope_theta"))
    fields.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    architectures = [config_class.__name__.replace("Config", "ForCausalLM")]
    return config_class(architectures=architectures, **fields)


def init_weights(model: PreTrainedModel, seed: int, matrix_std: float = MATRIX_STD) -> None:
    """Overwrite every saved tensor of `model` from one seeded generator, in sorted-name order.

    Matrices and embeddings ~ N(0, matrix_std) (0.1); norm weights = 1; biases ~ N(0, 0.02); DeepSeek's
    e_score_correction_bias ~ N(0, 0.05). Raises ValueError naming a 1-D tensor of unknown kind.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.ndim >= 2:
                std = matrix_std
            elif name.endswith("e_score_correction_bias"):
                std = SCORE_BIAS_STD
            elif name.endswith(".bias"):
                std = BIAS_STD
            elif "norm" in name:
                tensor.fill_(1.0)
                continue
            else:
                raise ValueError(f"init_weights: no rule for 1-D tensor {name}; add one in serving/demo.py")
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.copy_(noise * std)


def save_hf_checkpoint(
    model: PreTrainedModel, out_dir: Path, *, fused_experts: bool, tokenizer_dir: Path | None = None
) -> Path:
    """Save `model` as a checkpoint folder with the demo tokenizer and a generation_config.json.

    fused_experts=False writes transformers' default on-disk layout (one tensor per expert and
    projection); True writes the fused one (gate_up_proj [E, 2I, D], down_proj [E, D, I]).
    The tokenizer files are copied from `tokenizer_dir`, or trained into `out_dir` when it is None;
    the model's vocab must cover the tokenizer's ids (ConfigError otherwise). Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        train_tokenizer(out_dir)
    elif Path(tokenizer_dir).resolve() != out_dir.resolve():
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    tokenizer_vocab = RustTokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
    if model.config.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model config vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab} ids in {out_dir / 'tokenizer.json'}"
        )
    model.save_pretrained(str(out_dir), save_original_format=not fused_experts)
    # Chat replies end with <|im_end|>, raw text with <|endoftext|>: both stop generation.
    generation = GenerationConfig(bos_token_id=EOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=EOS_ID)
    generation.save_pretrained(str(out_dir))
    return out_dir


def is_fp8_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether DeepSeek's fp8 checkpoints store `name` in fp8: the linear layers' weights (attention
    projections, dense MLPs, shared and routed experts, fused or not). Embeddings, norms, the gate, its
    e_score_correction_bias and lm_head stay in bf16."""
    parts = name.split(".")
    per_module = parts[-1] == "weight" and "_proj" in parts[-2]  # q_a_proj, kv_a_proj_with_mqa, ..., down_proj
    fused = parts[-2:] in (["experts", "gate_up_proj"], ["experts", "down_proj"])
    return (per_module or fused) and tensor.ndim >= 2


def quantize_checkpoint_fp8(folder: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """Rewrite the float checkpoint in `folder` in place in DeepSeek-V3's block-wise fp8 layout.

    Each tensor `is_fp8_quantized` becomes float8_e4m3fn plus a float32 `<name>_scale_inv` of one scale
    per `block` (serving/model/fp8.py: scale = amax / 448, as DeepSeek quantizes); every other tensor is
    cast to bf16; config.json gets FP8_QUANTIZATION_CONFIG (with `block`) and dtype bfloat16.
    Deterministic: the same checkpoint gives the same bytes. Returns `folder`.
    """
    folder = Path(folder)
    file = folder / "model.safetensors"
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sorted(load_file(file).items()):
        if is_fp8_quantized(name, tensor):
            out[name], out[f"{name}_scale_inv"] = quantize(tensor, block)
        else:
            out[name] = tensor.to(torch.bfloat16)
    save_file(out, file, metadata={"format": "pt"})
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": list(block)}
    config["dtype"] = "bfloat16"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as transformers writes it
    return folder


def make_demo(
    out_dir: Path,
    arch: str = "mixtral",
    seed: int = 0,
    fused_experts: bool = False,
    progress: bool = True,
    fp8: bool = False,
    router_skew: str | None = None,
    size: str = "tiny",
) -> Path:
    """Write the demo checkpoint of `arch` to `out_dir` and return it.

    size="bench" (deepseek_v3 and qwen3_moe) writes it with BENCH_OVERRIDES[arch]: experts of DeepSeek-V2-Lite's
    or Qwen3-30B-A3B's shapes, in bfloat16 (~3.7 GB), for sharding and rebalancing measurements where expert
    compute must count.
    fp8=True (deepseek_v3 only) writes the deepseek_v3 demo with FP8_DEMO_OVERRIDES in DeepSeek-V3's
    block-wise fp8 layout (`quantize_checkpoint_fp8`, 128 x 128 blocks). router_skew="zipf:S" biases the
    gates so that each MoE layer's expert load follows a Zipf law of exponent S (serving/router_skew.py).
    Deterministic: the same arguments give byte-identical files. `progress` shows a tqdm bar over the
    steps tokenizer, config, weights, save. Raises ConfigError for an unknown arch, fp8 with another arch,
    or a bad or too steep router skew, an unknown size, or size "bench" with an arch it has no shapes for or fp8.
    """
    out_dir = Path(out_dir)
    if arch not in ARCHS:
        raise ConfigError(f"unknown demo arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if fp8 and arch != "deepseek_v3":
        raise ConfigError(f"fp8 demo: only arch 'deepseek_v3' (DeepSeek-V3's fp8 layout), not {arch!r}")
    if size not in SIZES:
        raise ConfigError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    bench = size == "bench"
    if bench and (arch not in BENCH_OVERRIDES or fp8):
        archs = ", ".join(BENCH_OVERRIDES)
        raise ConfigError(f"demo size 'bench': only archs {archs} without fp8, not {arch!r}{' fp8' if fp8 else ''}")
    skew = parse_router_skew(router_skew) if router_skew is not None else None
    desc = f"make-demo {arch}{' bench' if bench else ''}{' fp8' if fp8 else ''}{f' {skew.spec()}' if skew else ''}"
    with tqdm(total=4, desc=desc, unit="step", disable=not progress) as bar:
        bar.set_postfix_str("tokenizer")
        train_tokenizer(out_dir)
        bar.update()
        bar.set_postfix_str("config")
        vocab_size = RustTokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
        overrides = FP8_DEMO_OVERRIDES if fp8 else BENCH_OVERRIDES[arch] if bench else {}
        config = demo_config(arch, vocab_size, **overrides)
        bar.update()
        bar.set_postfix_str("weights")
        # from_config draws from the global RNG: seed it, but leave the caller's RNG state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if bench else torch.float32)
        init_weights(model, seed, BENCH_MATRIX_STD if bench else MATRIX_STD)
        if skew is not None:
            skew_gates(model, skew, seed, calibration_prompts(Tokenizer(out_dir)))
        bar.update()
        bar.set_postfix_str("save")
        save_hf_checkpoint(model, out_dir, fused_experts=fused_experts, tokenizer_dir=out_dir)
        if fp8:
            quantize_checkpoint_fp8(out_dir)
        bar.update()
    return out_dir
