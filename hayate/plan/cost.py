"""What one step of a model costs: bytes moved and FLOPs, layer by layer.

Counts come from the built model itself (the bytes each linear layer really holds, in
whatever form it runs: fp32, bf16, GGUF blocks, packed int4), so the plan follows the
weights the engine will actually read. A mixture of experts reads only the experts its
tokens are routed to: the expected number touched, not all of them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hayate.layers.moe import SparseMoE
from hayate.layers.quant import QType
from hayate.models.config import ModelConfig


@dataclass
class CostRow:
    name: str
    bytes: int       # bytes read and written
    flops: int
    ggml_type: int | None = None   # GGUF blocks read by a native kernel, else None


@dataclass
class StepCost:
    rows: list[CostRow]
    tokens: int      # tokens the step produces or consumes

    @property
    def bytes(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def flops(self) -> int:
        return sum(row.flops for row in self.rows)


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's own tensors (parameters and buffers, each counted once), and
    by a packed layer's weight where the planned step has rearranged it."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    interleaved = [m.interleaved.nbytes() for m in module.modules() if getattr(m, "interleaved", None) is not None]
    return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(interleaved)


def packed_types(model: nn.Module) -> set[int]:
    """The GGUF types of the model's packed layers (those a probe should measure)."""
    return {int(m.ggml_type) for m in model.modules() if getattr(m, "ggml_type", None) is not None}


def memory_by_format(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds, by the form its weights are kept in: a GGUF type for packed
    layers, else the tensor dtype (each tensor counted once, tied ones too)."""
    totals: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if getattr(module, "interleaved", None) is not None:   # rearranged for the planned step
            kind = QType(module.ggml_type).name
            totals[kind] = totals.get(kind, 0) + module.interleaved.nbytes()
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            kind = QType(module.ggml_type).name if tensor is packed else str(tensor.dtype).removeprefix("torch.")
            totals[kind] = totals.get(kind, 0) + tensor.numel() * tensor.element_size()
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every leaf module of the text model that multiplies by a weight matrix (nn.Linear or a
    packed twin); a vision model's encoder runs once per image, not per token; experts (a
    packed expert's layers too) are _expert_rows' to count, by the share a step touches."""
    vision = tuple(f"{name}." for name in getattr(model, "VISION_MODULES", ()))
    skipped = vision + tuple(f"{name}.experts." for name, m in model.named_modules() if isinstance(m, SparseMoE))
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features") and not list(m.children())
            and not name.startswith(skipped)}


def experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Experts that `tokens` tokens routed to top_k of num_experts each (uniformly, at random)
    touch, in expectation: E * (1 - (1 - k/E)^tokens)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def _expert_rows(model: nn.Module, step_tokens: list[int]) -> list[CostRow]:
    """Each MoE block's experts over steps of these many tokens: the bytes of the experts each
    step touches, and every token's top_k SwiGLU products."""
    rows = []
    for name, block in model.named_modules():
        if isinstance(block, SparseMoE):
            experts = block.experts
            touched = sum(experts_touched(experts.num_experts, block.top_k, tokens) for tokens in step_tokens)
            weights = 3 * experts.inner * experts.hidden   # one expert's gate, up and down
            packed_type = experts.packed[0][0].ggml_type if experts.packed is not None else None
            rows.append(CostRow(f"{name}.experts", round(touched * module_bytes(experts) / experts.num_experts),
                                2 * sum(step_tokens) * block.top_k * weights, packed_type))
    return rows


def _attention_cost(config: ModelConfig, queries: int, keys: int, kv_bytes: int) -> CostRow:
    """QK^T and PV for `queries` tokens over `keys` cached positions, all layers."""
    per_layer_flops = 4 * queries * keys * config.num_attention_heads * config.head_dim
    kv_read = 2 * keys * config.num_key_value_heads * config.head_dim * kv_bytes
    kv_write = 2 * queries * config.num_key_value_heads * config.head_dim * kv_bytes
    layers = config.num_hidden_layers
    return CostRow("attention (KV cache)", layers * (kv_read + kv_write), layers * per_layer_flops)


def decode_cost(model: nn.Module, config: ModelConfig, batch: int, context: int,
                kv_bytes: int = 4) -> StepCost:
    """One decode step: `batch` sequences, each at `context` cached tokens."""
    rows = [CostRow(name, module_bytes(m), 2 * batch * m.in_features * m.out_features, getattr(m, "ggml_type", None))
            for name, m in _linears(model).items()]
    rows += _expert_rows(model, [batch])
    rows.append(CostRow("embedding rows", batch * config.hidden_size * 4, 0))
    attention = _attention_cost(config, 1, context, kv_bytes)
    rows.append(CostRow(attention.name, batch * attention.bytes, batch * attention.flops))
    return StepCost(rows, batch)


def prefill_cost(model: nn.Module, config: ModelConfig, prompt_len: int, chunk: int,
                 kv_bytes: int = 4) -> StepCost:
    """A whole prompt, run in chunks of `chunk` tokens: weights are read once per chunk; the
    vocabulary projection runs for the prompt's last token only."""
    chunks = -(-prompt_len // chunk)
    head = getattr(model, "lm_head", None)
    rows = [CostRow(name, module_bytes(m) * (1 if m is head else chunks),
                    2 * (1 if m is head else prompt_len) * m.in_features * m.out_features)
            for name, m in _linears(model).items()]
    rows += _expert_rows(model, [min(chunk, prompt_len - start) for start in range(0, prompt_len, chunk)])
    # Causal attention: on average each query sees half the prompt.
    attention = _attention_cost(config, prompt_len, max(prompt_len // 2, 1), kv_bytes)
    rows.append(attention)
    return StepCost(rows, prompt_len)


def group_rows(cost: StepCost) -> list[CostRow]:
    """Per-layer rows folded by kind (q_proj of every layer -> one row), largest first."""
    groups: dict[str, CostRow] = {}
    for row in cost.rows:
        key = row.name.split(".")[-1] if ".layers." in row.name else row.name
        group = groups.setdefault(key, CostRow(key, 0, 0))
        group.bytes += row.bytes
        group.flops += row.flops
    return sorted(groups.values(), key=lambda row: -row.bytes)
