"""A sparse mixture of SwiGLU experts (Mixtral's block): a router picks top_k of the experts
for each token and the block returns their outputs, weighted by the router. The same block
serves Qwen2-MoE (weights not renormalised; a shared expert beside the routed ones, scaled by
a sigmoid gate), Qwen3-MoE and OLMoE (weights renormalised or not, as their configs say).

It computes exactly what transformers' eager sparse MoE blocks compute, in the same order
(experts in ascending order, each over the rows routed to it, added back with index_add_; the
shared expert's share added last), so the two agree bit for bit. Module and parameter names are transformers 5's: the router `gate`,
and each projection stacked over the experts (`experts.gate_up_proj`, `experts.down_proj`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hayate.layers.linear import PackedLinear
from hayate.layers.quant import PackedWeight


def route(router_logits: torch.Tensor, top_k: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [tokens, experts] -> (weights [tokens, top_k] fp32, expert ids [tokens, top_k]):
    softmax over all experts in fp32, the top_k kept (and renormalised to sum to 1 if normalize)."""
    probabilities = F.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probabilities, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), expert_ids


class Experts(nn.Module):
    """num_experts SwiGLU MLPs, each projection's weights stacked: expert e is the slab [e].
    Or, after use_packed(), each expert's gate, up and down as packed layers reading the
    file's blocks (a quantized GGUF file's experts stay as small as stored)."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts, self.hidden, self.inner = num_experts, hidden, inner
        # zeros, not random: the values come from the checkpoint (and on the meta device are free)
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * inner, hidden))   # gate rows, then up
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, inner))
        self.packed: nn.ModuleList | None = None   # per expert: (gate, up, down) PackedLinear
        self.owned = range(num_experts)   # the experts this process runs (keep(): expert parallel)

    def use_packed(self, gate: list[PackedWeight], up: list[PackedWeight], down: list[PackedWeight]) -> None:
        """Run each expert from its packed weights (one list entry per expert); the float
        slabs are let go."""
        self.packed = nn.ModuleList(nn.ModuleList(PackedLinear(w) for w in parts) for parts in zip(gate, up, down))
        self.gate_up_proj = nn.Parameter(torch.empty(0, 2 * self.inner, self.hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(0, self.hidden, self.inner), requires_grad=False)

    def keep(self, owned: range) -> None:
        """Hold and run only the experts in `owned` (expert parallel: the other ranks run the
        rest, and the ranks' outputs are added)."""
        self.owned = owned
        if self.packed is not None:
            self.packed = nn.ModuleList(self.packed[e] for e in owned)
        else:
            self.gate_up_proj = nn.Parameter(self.gate_up_proj.data[owned.start:owned.stop].clone(), requires_grad=False)
            self.down_proj = nn.Parameter(self.down_proj.data[owned.start:owned.stop].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden], expert_ids and weights [tokens, top_k] -> [tokens, hidden]: the
        owned experts' share (all of it unless keep() was called)."""
        out = torch.zeros_like(x)
        for expert, (slots, rows) in _routed_rows(expert_ids).items():
            if expert not in self.owned:
                continue
            expert -= self.owned.start
            if self.packed is not None:
                gate_layer, up_layer, down_layer = self.packed[expert]
                routed = x[rows]
                y = down_layer(F.silu(gate_layer(routed)) * up_layer(routed))
            else:
                gate, up = F.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
                y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, rows, (y * weights[rows, slots, None]).to(out.dtype))
        return out


def _routed_rows(expert_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """expert -> (slots, rows) of the tokens routed to it, experts ascending and, within one,
    slot by slot, tokens ascending: the order transformers' one-hot mask gives (torch.where
    over [top_k, tokens]), grouped in Python (a few dozen ids a step) instead of in ten ops."""
    ids, grouped = expert_ids.tolist(), {}
    for slot in range(expert_ids.shape[1]):
        for row, chosen in enumerate(ids):
            slots, rows = grouped.setdefault(chosen[slot], ([], []))
            slots.append(slot)
            rows.append(row)
    return {e: (torch.tensor(grouped[e][0]), torch.tensor(grouped[e][1])) for e in sorted(grouped)}


class SparseMoE(nn.Module):
    """The MLP of a mixture-of-experts decoder layer: x [tokens, hidden] -> [tokens, hidden].
    shared_expert: an MLP every token also goes through (Qwen2-MoE), weighted by
    sigmoid(shared_expert_gate(x)); None for none."""

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, normalize: bool = True,
                 shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(hidden, num_experts, bias=False)   # the router
        self.experts = Experts(num_experts, hidden, inner)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_expert is not None else None

    def fuse(self, packed_apart: bool = False) -> None:
        """Nothing to fuse (LlamaMLP's hook): each expert's gate and up are stacked already, and
        the shared expert's stay apart, as transformers runs them (stacked, a GEMM may round
        otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_expert(x) if self.shared_expert is not None else None
        weights, expert_ids = route(self.gate(x), self.top_k, self.normalize)
        out = self.experts(x, expert_ids, weights)
        if shared is None:
            return out
        return out + torch.sigmoid(self.shared_expert_gate(x)) * shared
