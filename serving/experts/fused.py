"""The `vllm` expert kernel: one layer's experts run by vLLM's fused MoE op, with StackedExperts' contract.

On CPU the op is vLLM's `cpu_fused_moe` (what vLLM's own CPUUnquantizedExperts calls) on weights packed
once, at load, by `cpu_prepack_moe_weight`; on CUDA it is vLLM's Triton `fused_experts` on the stack as
it is. vLLM is imported only when an instance is built (importing it takes seconds), never with this module.

    layer = VLLMFusedExperts(StackedExperts(gate_up, down, expert_ids=[1, 4, 6]))
    out = layer.forward(hidden, local_rows, experts, weights)   # [R, D], as StackedExperts.forward

How our assignments meet the op: it takes per-row ids and weights, ``topk_ids [M, k]`` int32 positions
in its weight stack and ``topk_weights [M, k]`` float32, and sums each row's k weighted outputs. When
every row has the same k assignments in the gate's slot-major order (the router's in-process backend),
that is the op's layout as it is (M = R). A shard's rows have a varying number of assignments (only
those of its experts), so there every assignment goes in as a row of its own with k = 1 (M = A), and the
A weighted outputs are added into their rows in expert order, the loop kernel's order of additions.
The op does not check ids: one outside 0..E_held-1 indexes past its buffers. So no id the process does
not hold ever reaches it; such assignments are refused first, with the loop kernel's ValueError.

Shape legend: R = rows sent here, D = hidden, I = expert width, I_p = I padded to the CPU op's
alignment, E_held = experts held here, A = (row, expert) assignments.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from serving.experts.local import StackedExperts

# The CPU op works in tiles of 32 output channels: hidden and expert width must be multiples of 32
# (vLLM's CPUUnquantizedExperts.output_alignment). The width is zero-padded up to it here, as vLLM does;
# a hidden size that is not a multiple cannot run (`unsupported`).
CPU_ALIGN = 32
# The dtypes each device's op takes. CPU: all three, checked against the loop kernel in
# tests/serving/experts/test_fused.py. CUDA: the compute types of vLLM's Triton kernel (not run here).
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
# vLLM's CPU op keeps its scratch buffers in one process-wide manager, so two calls at once (Serve runs a
# shard's sync `run` on a thread pool) would share them: calls in one process take turns. A lock, not state.
_CPU_OP_LOCK = threading.Lock()


def unsupported(dtype: torch.dtype, device: torch.device, hidden_size: int) -> str | None:
    """Why vLLM's op cannot run experts of this dtype, device and hidden size, or None if it can.
    Imports nothing: whether vLLM is installed is the caller's question (serving/experts/kernels.py)."""
    if device.type not in DTYPES:
        return f"vLLM's fused MoE op runs on cpu or cuda, not {device.type}"
    if dtype not in DTYPES[device.type]:
        return f"vLLM's fused MoE op on {device.type} takes {[str(d) for d in DTYPES[device.type]]}, not {dtype}"
    if device.type == "cpu" and hidden_size % CPU_ALIGN:
        return f"vLLM's CPU MoE op needs a hidden size divisible by {CPU_ALIGN}, got {hidden_size}"
    return None


@dataclass(frozen=True)
class _Op:
    """vLLM's op for one device, loaded: `pack` turns a weight stack into the op's layout (once, at load);
    `run(x, w13, w2, weights, ids) -> [M, D]` is the fused MoE over M rows of k assignments."""

    pack: Callable[[Tensor], Tensor]
    run: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def load_op(device: torch.device, dtype: torch.dtype) -> _Op:
    """Import vLLM and return its fused MoE op for `device`. Raises ImportError (or AttributeError, for a
    vLLM built without this device's op) when it cannot; the first call takes seconds (vLLM's import)."""
    if device.type == "cpu":
        from vllm import _custom_ops as ops  # loads vLLM's CPU kernels for this CPU's ISA

        torch.ops._C.cpu_fused_moe  # noqa: B018 (a vLLM built for CUDA has no CPU op: AttributeError here)
        isa = _cpu_isa(dtype)

        def run(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
            out = torch.empty_like(x)  # [M, D]: the op writes every row
            with _CPU_OP_LOCK:
                ops.cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", isa)
            return out

        return _Op(pack=lambda w: ops.cpu_prepack_moe_weight(w.contiguous(), isa), run=run)
    from vllm.model_executor.layers.fused_moe import fused_experts  # Triton; no packing

    def run_cuda(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        return fused_experts(x, w13, w2, topk_weights=weights, topk_ids=ids)  # [M, D]

    return _Op(pack=lambda w: w.contiguous(), run=run_cuda)


def _cpu_isa(dtype: torch.dtype) -> str:
    """vLLM's own choice (X86CPUUnquantizedExperts, else CPUUnquantizedExperts): AMX tiles for bfloat16
    on an x86 CPU that has them, else the portable vector kernel, which every CPU build has."""
    amx = platform.machine().lower() in ("x86_64", "amd64") and torch.cpu._is_amx_tile_supported()
    return "amx" if amx and dtype == torch.bfloat16 else "vec"


def pad_width(gate_up: Tensor, down: Tensor, align: int) -> tuple[Tensor, Tensor]:
    """Zero-pad the expert width I up to a multiple of `align`: gate rows, up rows and down columns.

    A padded unit computes silu(0) * 0 = 0 and meets a zero column of down, so the outputs are unchanged.
    gate_up: [E_held, 2I, D] -> [E_held, 2I_p, D]; down: [E_held, D, I] -> [E_held, D, I_p].
    """
    held, two_i, hidden_size = gate_up.shape
    width = two_i // 2
    padded = -(-width // align) * align
    if padded == width:
        return gate_up, down
    new_gate_up = gate_up.new_zeros(held, 2 * padded, hidden_size)  # [E_held, 2I_p, D]
    new_gate_up[:, :width] = gate_up[:, :width]  # gate rows
    new_gate_up[:, padded : padded + width] = gate_up[:, width:]  # up rows
    new_down = down.new_zeros(held, hidden_size, padded)  # [E_held, D, I_p]
    new_down[:, :, :width] = down
    return new_gate_up, new_down


class VLLMFusedExperts:
    """One layer's experts computed by vLLM's fused MoE op: a LayerExperts, like StackedExperts.

    Built from a StackedExperts (which validates the stack); the weights are padded and packed into the
    op's layout here, once, and the unpacked stack is not kept (memory stays one copy of the experts).
    Raises ValueError for a stack the op cannot run (`unsupported`), ImportError when vLLM's op is missing.
    """

    kernel = "vllm"

    def __init__(self, stacked: StackedExperts) -> None:
        device, dtype, hidden_size = stacked.gate_up.device, stacked.dtype, stacked.gate_up.shape[2]
        if reason := unsupported(dtype, device, hidden_size):
            raise ValueError(f"VLLMFusedExperts: {reason}")
        self.index = stacked.index
        self._op = load_op(device, dtype)
        gate_up, down = pad_width(stacked.gate_up, stacked.down, CPU_ALIGN if device.type == "cpu" else 1)
        self.w13 = self._op.pack(gate_up)  # [E_held, 2I_p, D] in the op's layout (gate rows first)
        self.w2 = self._op.pack(down)  # [E_held, D, I_p] in the op's layout

    @property
    def expert_ids(self) -> Tensor:
        """[E_held] int64 global ids of the held experts, ascending."""
        return self.index.ids

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held (packed, padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.w13, self.w2))

    @property
    def dtype(self) -> torch.dtype:
        return self.w13.dtype

    def forward(self, hidden: Tensor, local_rows: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Weighted expert outputs summed per row: ``out [R, D]`` in hidden's dtype (StackedExperts.forward's
        contract: assignment a adds ``weights[a] * expert_{experts[a]}(hidden[local_rows[a]])`` to
        ``out[local_rows[a]]``; an expert not held is a ValueError). One op call per layer and call."""
        if experts.numel() == 0:
            return torch.zeros_like(hidden)  # [R, D]
        held = len(self.index)
        local = self.index.to_local(experts)  # [A], held = not held here
        if bool((local == held).any()):  # the one host sync per call (the loop kernel has one too)
            self.index.refuse_missing(experts, local)
        local_rows, weights = local_rows.to(hidden.device), weights.to(hidden.device)
        if top_k := _slot_major(local_rows, hidden.shape[0]):
            return self._rows_of_k(hidden, local, weights, top_k)
        return self._row_per_assignment(hidden, local_rows, local, weights)

    def _rows_of_k(self, hidden: Tensor, local: Tensor, weights: Tensor, top_k: int) -> Tensor:
        """Every row has `top_k` assignments, slot-major (the gate's output through `flatten`, as the
        router's in-process backend sends them): the op's own layout, so the op sums each row's k terms
        itself, in float32, and no gather or scatter is needed. [R, D]"""
        rows = hidden.shape[0]
        ids = local.view(top_k, rows).t().to(torch.int32).contiguous()  # [R, k] stack positions
        w = weights.view(top_k, rows).t().float().contiguous()  # [R, k] float32
        return self._op.run(hidden.to(self.dtype).contiguous(), self.w13, self.w2, w, ids).to(hidden.dtype)

    def _row_per_assignment(self, hidden: Tensor, local_rows: Tensor, local: Tensor, weights: Tensor) -> Tensor:
        """Any other layout (a shard's rows carry only its own experts): one op row per assignment. [R, D]"""
        order = torch.sort(local, stable=True).indices  # [A] expert-major, a row's experts ascending
        rows = local_rows[order]  # [A] each assignment's row, in expert order
        x = hidden[rows].to(self.dtype)  # [A, D] one row per assignment (a gather: contiguous)
        ids = local[order].to(torch.int32).unsqueeze(1)  # [A, 1] stack positions, all < E_held
        w = weights[order].float().unsqueeze(1)  # [A, 1] float32, as the op reads them
        y = self._op.run(x, self.w13, self.w2, w, ids)  # [A, D] w[a] * expert(x[a]), experts' dtype
        # Rows repeat across experts; index_add_ adds in index order, so each row sums its experts in
        # ascending order, rounding in hidden's dtype after each, as the loop kernel does.
        return torch.zeros_like(hidden).index_add_(0, rows, y.to(hidden.dtype))  # [R, D]


def _slot_major(local_rows: Tensor, rows: int) -> int:
    """k if the assignments are k per row, slot-major (rows 0..R-1, k times over), else 0."""
    count = local_rows.numel()
    if rows == 0 or count % rows:
        return 0
    top_k = count // rows
    expected = torch.arange(rows, device=local_rows.device).repeat(top_k)  # [A]
    return top_k if torch.equal(local_rows, expected) else 0
