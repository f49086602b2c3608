"""Routed experts computed in this process: one layer's experts as stacked weights, and the backend
over them. A shard replica (deployments/shard_deployment.py) runs the same StackedExperts.

Usage::

    layer_experts = StackedExperts(gate_up, down, expert_ids=range(8))
    backend = LocalExpertBackend({3: layer_experts})
    out = backend(3, hidden, weights, ids)   # [T, D]
"""

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from router.dispatch import flatten, group_by_expert
from serving.experts.backend import Computed, LayerExperts
from serving.model.prepack import can_prepack, linear, packed_weight

# T = tokens, K = experts per token, D = hidden, I = expert intermediate size,
# E_held = experts held here, R = rows sent here, A = assignments, n = rows of one expert


class ExpertIndex:
    """The global ids of the experts one process holds, and the map from a global id to a stack position.

    ids: [E_held] int64, non-empty, >= 0, strictly ascending; position i holds expert ``ids[i]``.
    """

    def __init__(self, ids: Tensor) -> None:
        if ids.ndim != 1 or ids.numel() == 0 or int(ids.min()) < 0 or not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError(f"StackedExperts: expert_ids must be non-empty, >= 0, strictly ascending: {ids.tolist()}")
        self.ids = ids.to(torch.int64)  # [E_held]
        held = ids.numel()
        # global id -> position, built once: ids not held (and any id past the table) map to `held`, an
        # overflow bucket that callers count along with the rest, so checking costs no extra sync.
        lookup = torch.full((int(ids[-1]) + 2,), held, dtype=torch.int64, device=ids.device)  # [max id + 2]
        lookup[self.ids] = torch.arange(held, device=ids.device)
        self._lookup = lookup

    def __len__(self) -> int:
        return self.ids.numel()

    def to_local(self, experts: Tensor) -> Tensor:
        """Map global expert ids [A] to positions in the stack [A]; an id not held maps to E_held."""
        experts = experts.to(self._lookup.device)  # [A]
        past = self._lookup.numel() - 1
        return self._lookup[torch.where(experts < 0, past, experts).clamp_(max=past)]  # [A]

    def refuse_missing(self, experts: Tensor, local: Tensor) -> None:
        """Raise ValueError naming the first assignment whose expert is not held (local == E_held)."""
        bad = int(experts.to(local.device)[local == len(self)][0])  # error path: syncs are fine
        raise ValueError(f"expert id {bad} is not held here (held: {_describe_ids(self.ids)})")


class StackedExperts:
    """The gated-SiLU experts of one layer held by one process, as stacked weights.

    gate_up: [E_held, 2I, D], gate rows first, then up rows (HF's fused ``gate_up_proj``).
    down: [E_held, D, I] (HF's fused ``down_proj``).
    expert_ids: the global ids of the held experts, ascending; ``gate_up[i]`` is expert ``expert_ids[i]``.
    Expert e computes ``down_e @ (silu(gate_e @ x) * (up_e @ x))``. This is the `loop` expert kernel; the
    `vllm` one (serving/experts/fused.py) takes the same stack and has the same `forward`.
    prepack: hold each expert's two weights packed for oneDNN instead of the stacks (serving/model/prepack.py;
    only on CPU in bfloat16): the same output bits, and each expert's GEMMs run at a few rows near memory
    speed and at many rows near the cores' peak. The stacks are then not kept (`gate_up` and `down` raise).
    """

    kernel = "loop"

    def __init__(
        self, gate_up: Tensor, down: Tensor, expert_ids: Iterable[int] | Tensor, prepack: bool = False
    ) -> None:
        ids = torch.as_tensor(list(expert_ids) if not isinstance(expert_ids, Tensor) else expert_ids)
        ids = ids.to(device=gate_up.device, dtype=torch.int64)  # [E_held]
        held = ids.shape[0]
        if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[0] != held or down.shape[0] != held:
            raise ValueError(
                f"StackedExperts: gate_up must be [{held}, 2I, D] and down [{held}, D, I] for "
                f"{held} expert_ids, got gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)}"
            )
        two_i, hidden_size = gate_up.shape[1:]
        if two_i % 2 or down.shape[1:] != (hidden_size, two_i // 2):
            raise ValueError(
                f"StackedExperts: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} disagree: "
                f"expected down [{held}, {hidden_size}, {two_i // 2}] and an even gate_up dim 1"
            )
        if down.dtype != gate_up.dtype or down.device != gate_up.device:
            raise ValueError(
                f"StackedExperts: gate_up ({gate_up.dtype}, {gate_up.device}) and down "
                f"({down.dtype}, {down.device}) must share dtype and device"
            )
        if prepack and not can_prepack(gate_up.dtype, gate_up.device):
            raise ValueError(f"StackedExperts: prepack needs bfloat16 on a CPU with oneDNN, got {gate_up.dtype} "
                             f"on {gate_up.device}")  # fmt: skip
        self._stacks = None if prepack else (gate_up, down)
        pack = packed_weight if prepack else (lambda w: w)
        # per expert (gate_up [2I, D], down [D, I]): views of the stacks, or their packed copies
        self._weights = [(pack(g), pack(d)) for g, d in zip(gate_up.unbind(0), down.unbind(0), strict=True)]
        self._dtype, self._nbytes = gate_up.dtype, sum(t.numel() * t.element_size() for t in (gate_up, down))
        self.index = ExpertIndex(ids)

    @property
    def gate_up(self) -> Tensor:
        """[E_held, 2I, D] the stacked gate and up weights (not kept once packed)."""
        return self._stack(0)

    @property
    def down(self) -> Tensor:
        """[E_held, D, I] the stacked down weights (not kept once packed)."""
        return self._stack(1)

    def _stack(self, which: int) -> Tensor:
        if self._stacks is None:
            raise AttributeError("StackedExperts(prepack=True) keeps each expert's packed weights, not the stacks")
        return self._stacks[which]

    @property
    def expert_ids(self) -> Tensor:
        """[E_held] int64 global ids of the held experts, ascending."""
        return self.index.ids

    def to_local(self, experts: Tensor) -> Tensor:
        """Map global expert ids [A] to positions in the stack [A]; an id not held maps to E_held."""
        return self.index.to_local(experts)

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights held (gate_up + down)."""
        return self._nbytes

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, hidden: Tensor, local_rows: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Weighted expert outputs summed per row: ``out [R, D]`` in hidden's dtype.

        hidden: [R, D] the rows sent here; local_rows, experts, weights: [A] assignments, where
        assignment a adds ``weights[a] * expert_{experts[a]}(hidden[local_rows[a]])`` to
        ``out[local_rows[a]]``. Each expert runs once over all its rows; unused experts cost nothing.
        """
        if experts.numel() == 0:
            return torch.zeros_like(hidden)  # [R, D]
        held = len(self.index)
        local = self.index.to_local(experts)  # [A], held = not held here
        order, counts = group_by_expert(local, held + 1)  # [A], [E_held + 1]
        counts = counts.tolist()  # the one host sync per call: split sizes (and the not-held count)
        if counts[held]:
            self.index.refuse_missing(experts, local)
        rows = local_rows.to(hidden.device)[order]  # [A] each assignment's row, expert-major
        y = hidden.new_empty(rows.shape[0], hidden.shape[1], dtype=self.dtype)  # [A, D] outputs, in that order
        start = 0
        for e, (n, rows_e) in enumerate(zip(counts[:held], rows.split(counts)[:held], strict=True)):
            if n == 0:  # sizes come from `counts`: no sync
                continue
            gate_up, down = self._weights[e]
            # A gather of its own per expert, not a slice of one: float32 GEMMs may round differently on
            # a differently aligned input, and shards must give the in-process bits.
            x = hidden[rows_e].to(self.dtype)  # [n, D]
            gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [n, I], [n, I]
            y[start : start + n] = linear(F.silu(gate) * up, down)  # [n, D]
            start += n
        # The product follows torch promotion (float32 gate weights with bf16 experts multiply in float32),
        # then rounds once, as transformers does; in place, so no [A, D] float32 temporary is made (~25 MB for
        # a 512-token chunk of the bench model). index_add_ adds in index order, so each row sums its
        # experts in ascending order, rounding in hidden's dtype after each: the same order of roundings as
        # transformers' eager experts loop, so bf16 results match it bit for bit.
        y.mul_(weights.to(hidden.device)[order, None])  # [A, D]
        return torch.zeros_like(hidden).index_add_(0, rows, y.to(hidden.dtype))  # [R, D]


class LocalExpertBackend:
    """``ExpertBackend`` computing in this process, over ``{layer: LayerExperts}`` (either expert kernel)."""

    def __init__(self, layers: Mapping[int, LayerExperts]) -> None:
        self.layers = dict(layers)

    def __call__(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        experts = self.layers.get(layer)
        if experts is None:
            raise ValueError(f"LocalExpertBackend holds no experts for layer {layer} (holds {sorted(self.layers)})")
        a = flatten(weights, ids)  # [K * T] assignments; row = token
        return experts.forward(hidden, a.rows, a.experts, a.weights)  # [T, D]

    def start(self, layer: int, hidden: Tensor, weights: Tensor, ids: Tensor) -> Computed:
        return Computed(self(layer, hidden, weights, ids))  # here and now: nothing to overlap with


def _describe_ids(ids: Tensor) -> str:
    """'0..3' for a contiguous range of ids, else the list (shortened past 16)."""
    first, last = int(ids[0]), int(ids[-1])
    if last - first + 1 == ids.numel():
        return f"{first}..{last}"
    listed = ids.tolist()
    return str(listed) if len(listed) <= 16 else f"{listed[:16]}... ({len(listed)} ids)"
