"""Mixtral (a sparse mixture of experts) against Hugging Face transformers on a tiny random
model: the MoE block bit for bit, logits and greedy tokens through LLM from its folder, and
GGUF files written the way llama.cpp's converter writes them (stacked F32 and Q8_0 experts,
and the older per-expert names)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from hayate.cli import main
from hayate.engine import model_runner
from hayate.engine.decode_plan import _plannable
from hayate.engine.kv_cache import KVCache
from hayate.layers.attention import AttentionMetadata
from hayate.kernels import native_kernels
from hayate.layers.moe import SparseMoE
from hayate.llm import LLM
from hayate.loading.gguf import GGUFModelFile
from hayate.loading.gguf_checks import GGUFError, check_model
from hayate.models.config import ModelConfig
from hayate.models.registry import build_model
from hayate.plan.cost import decode_cost, experts_touched, prefill_cost
from hayate.sampling import SamplingParams
from gguf_files import QType, TINY_CONFIG, encode, llama_cpp_permute, load_gguf, refuses_without, write_model
from test_llama_parity import TURNS, load_hayate
from tiny_models import BYTE_VOCAB, VOCAB_SIZE, save_tiny_folder

TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=256, initializer_range=0.1, bos_token_id=BYTE_VOCAB,
            eos_token_id=BYTE_VOCAB + 3, pad_token_id=0, experts_implementation="eager")
PROMPT = sum(TURNS, [])
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def reference() -> transformers.MixtralForCausalLM:
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny_folder(reference, path)   # per-expert w1/w2/w3 names
    return path


@pytest.fixture(scope="module")
def expected_logits(reference) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([PROMPT])).logits[0]


def greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=tokens,
                             min_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def logits_in_chunks(model, config, prompt: list[int], chunk: int) -> torch.Tensor:
    """Every position's logits, the prompt run in chunks of `chunk` over one KV cache."""
    cache = KVCache(config, num_blocks=16, block_size=4)
    cache.bind(model)
    block_table, logits = [9, 2, 7, 0, 3, 1, 12, 5], []
    with torch.inference_mode():
        for start in range(0, len(prompt), chunk):
            ids = prompt[start:start + chunk]
            meta = AttentionMetadata.build([block_table], [start], [len(ids)], block_size=4)
            logits.append(model.compute_logits(model(torch.tensor(ids), meta.positions(), meta)))
    return torch.cat(logits)


def test_config_reads_experts(folder):
    config = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(folder).to_dict())
    assert (config.model_type, config.num_local_experts, config.num_experts_per_tok) == ("mixtral", 4, 2)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf({**TINY, "model_type": "mixtral", "num_experts_per_tok": 5})


def test_moe_block_equals_transformers_bit_for_bit(reference, folder):
    model, _ = load_hayate(folder)   # the folder's per-expert weights, stacked at load
    torch.manual_seed(1)
    for layer, theirs in zip(model.model.layers, reference.model.layers):
        assert isinstance(layer.mlp, SparseMoE)
        for tokens in (1, 3, 37):
            x = torch.randn(tokens, 64)
            with torch.inference_mode():
                assert torch.equal(layer.mlp(x), theirs.mlp(x[None])[0])


def test_transformers5_stacked_names_load(reference, folder):
    """transformers 5's own state dict (mlp.experts.gate_up_proj / down_proj) loads the same."""
    stacked = build_model(ModelConfig.from_hf(reference.config.to_dict()), max_positions=256)
    stacked.load_weights(reference.state_dict().items())
    per_expert, _ = load_hayate(folder)
    for (name, ours), theirs in zip(stacked.state_dict().items(), per_expert.state_dict().values()):
        assert torch.equal(ours, theirs), name
    with pytest.raises(ValueError, match="lacks some experts"):
        build_model(stacked.config, max_positions=256).load_weights(
            (n, w) for n, w in reference.state_dict().items() if n != "model.layers.1.mlp.experts.down_proj")


@pytest.mark.parametrize("chunk", [len(PROMPT), 5])
def test_logits_match_transformers(folder, expected_logits, chunk):
    llm = LLM(str(folder), prefill_chunk=chunk)
    model = llm.engine.runner.model
    assert not _plannable(model) and llm.engine.runner.static is None
    actual = logits_in_chunks(model, llm.model_config, PROMPT, chunk)
    assert (actual - expected_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunk", [len(PROMPT), 5])
def test_greedy_and_logprobs_match_transformers(folder, reference, chunk):
    """16 greedy tokens through LLM (prefill in one chunk or several, then decode), each
    token's logprob and top 5 as transformers computes them over the whole sequence."""
    result = LLM(str(folder), prefill_chunk=chunk).generate(PROMPT, GREEDY)
    assert result.token_ids == greedy(reference, PROMPT, 16)
    with torch.inference_mode():
        logits = reference(torch.tensor([PROMPT + result.token_ids])).logits[0, len(PROMPT) - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for row, entry in zip(expected, result.logprobs):
        assert abs(entry.logprob - row[entry.token_id].item()) < 1e-4
        assert [token for token, _ in entry.top] == row.topk(5).indices.tolist()


def test_batched_decodes_match_transformers(folder, reference, monkeypatch):
    """Three sequences decoded together; where CUDA graphs would be captured, the MoE model
    opts out (its shapes follow the routing) and still runs eagerly."""
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    expected = [greedy(reference, prompt, 16) for prompt in prompts]
    results = LLM(str(folder), prefill_chunk=5, max_num_seqs=3).generate(prompts, GREEDY)
    assert [result.token_ids for result in results] == expected
    monkeypatch.setattr(model_runner, "graphs_available", lambda device: True)
    llm = LLM(str(folder), max_model_len=64, max_num_seqs=3)
    assert llm.engine.runner.static is None
    assert [result.token_ids for result in llm.generate(prompts, GREEDY)] == expected


# ---- GGUF ------------------------------------------------------------------------------------

def export_gguf(path: Path, model: torch.nn.Module, expert_type: QType = QType.F32,
                per_expert: bool = False, matrix_type: QType = QType.F32) -> Path:
    """The model as llama.cpp's converter writes a Mixtral: architecture llama, q/k permuted,
    the router F32 and the experts stacked into ffn_*_exps (or, as older files, one matrix per
    expert: blk.N.ffn_gate.E); the other matrices in matrix_type."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {}
    for hf_name, value in model.state_dict().items():
        array = value.float().numpy()
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if ".mlp.experts." in hf_name:
            tensors.update(_experts(layer, hf_name, array, config.intermediate_size, expert_type, per_expert))
            continue
        if ".q_proj." in hf_name or ".k_proj." in hf_name:
            heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        if ".mlp.gate." in hf_name:
            tensors[f"blk.{layer}.ffn_gate_inp.weight"] = (array, QType.F32)
            continue
        tensor_type = matrix_type if array.ndim == 2 else QType.F32
        tensors[names.get_name(hf_name, try_suffixes=(".weight",))] = (encode(array, tensor_type), tensor_type)
    metadata = {**TINY_CONFIG, **config.to_dict(), "rope_theta": config.rope_parameters["rope_theta"]}
    tokens = [f"tok{i}" for i in range(config.vocab_size)]
    return write_model(path, "llama", metadata, tensors, vocabulary=(tokens, [1] * len(tokens)))


def _experts(layer: str, hf_name: str, array: np.ndarray, inner: int, qtype: QType,
             per_expert: bool) -> dict[str, tuple[np.ndarray, QType]]:
    """transformers 5's stacked gate_up_proj / down_proj as GGUF's gate, up and down tensors."""
    parts = {"gate": array[:, :inner], "up": array[:, inner:]} if "gate_up_proj" in hf_name else {"down": array}
    tensors = {}
    for part, stacked in parts.items():
        if per_expert:
            for expert, matrix in enumerate(stacked):
                tensors[f"blk.{layer}.ffn_{part}.{expert}.weight"] = (encode(matrix, qtype), qtype)
        else:
            tensors[f"blk.{layer}.ffn_{part}_exps.weight"] = (encode(np.ascontiguousarray(stacked), qtype), qtype)
    return tensors


def q8_0_experts(reference: torch.nn.Module) -> torch.nn.Module:
    """The reference with every expert weight rounded through Q8_0, as a Q8_0 file holds it."""
    import copy

    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for name, parameter in rounded.named_parameters():
            if ".experts." in name:
                values = parameter.numpy()
                blocks = gguf.quants.quantize(values.reshape(-1, values.shape[-1]), QType.Q8_0)
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, QType.Q8_0).reshape(values.shape)))
    return rounded


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_gguf_f32_matches_folder(reference, expected_logits, tmp_path, per_expert):
    model, config = load_gguf(export_gguf(tmp_path / "mixtral.gguf", reference, per_expert=per_expert))
    assert type(model).__name__ == "MixtralForCausalLM" and config.num_local_experts == 4
    assert (logits_in_chunks(model, config, PROMPT, 5) - expected_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_gguf_q8_0_experts_match_rounded_reference(reference, tmp_path, per_expert):
    path = export_gguf(tmp_path / "mixtral-q8.gguf", reference, QType.Q8_0, per_expert)
    model, config = load_gguf(path)
    with torch.inference_mode():
        expected = q8_0_experts(reference)(torch.tensor([PROMPT])).logits[0]
    assert (logits_in_chunks(model, config, PROMPT, 5) - expected).abs().max().item() < 1e-4
    # through the engine, as a user loads it (weights="auto": packed where the file allows)
    tokens = LLM(str(path), prefill_chunk=5).generate(PROMPT, GREEDY).token_ids
    assert tokens == greedy(q8_0_experts(reference), PROMPT, 16)


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
@pytest.mark.parametrize("per_expert", [False, True], ids=["stacked", "per-expert"])
def test_gguf_packed_matches_fp32(reference, tmp_path, per_expert):
    """A Q8_0 file: attention, head and every expert run packed by the native kernels, each
    expert's gate, up and down a packed layer over the file's blocks (the planned step takes
    them, routed, and the eager model too); the same tokens as the file decoded to fp32."""
    path = export_gguf(tmp_path / "mixtral-q8.gguf", reference, QType.Q8_0, per_expert, matrix_type=QType.Q8_0)
    packed, fp32 = LLM(str(path), weights="auto", prefill_chunk=5), LLM(str(path), weights="fp32")
    model = packed.engine.runner.model
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert len(experts.packed) == 4 and experts.gate_up_proj.numel() == experts.down_proj.numel() == 0
        assert all(type(m).__name__ == "PackedLinear" for parts in experts.packed for m in parts)
    assert packed.engine.runner.plan is not None and fp32.engine.runner.model.model.layers[0].mlp.experts.packed is None
    ours, theirs = packed.generate(PROMPT, GREEDY), fp32.generate(PROMPT, GREEDY)
    assert ours.token_ids == theirs.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-3
    # the plan counts the experts a step touches once, as held (blocks rearranged for the kernel)
    rows = decode_cost(model, packed.model_config, batch=1, context=10).rows
    assert not any(".experts." in row.name for row in rows)
    held = sum(m.nbytes() for layer in model.model.layers for parts in layer.mlp.experts.packed for m in parts)
    experts = sum(row.bytes for row in rows if row.name.endswith(".experts"))
    assert experts == pytest.approx(held * 2 / 4, abs=4)   # top 2 of 4 at batch 1
    # the memory check counts quantized experts as stored; batched, the same tokens
    source = GGUFModelFile(path)
    assert source.stored_nbytes() == sum(int(t.n_bytes) for t in source.reader.tensors)
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    assert [r.token_ids for r in packed.generate(prompts, GREEDY)] == [r.token_ids for r in fp32.generate(prompts, GREEDY)]


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_planned_experts_equal_their_eager_twin(reference, tmp_path):
    """The planned step's routed experts (rows grouped per expert, experts ascending): alone,
    in a batch and in prompt chunks, the tokens and logprobs of the eager block over the same
    packed weights."""
    path = export_gguf(tmp_path / "mixtral-q8.gguf", reference, QType.Q8_0, matrix_type=QType.Q8_0)
    planned = LLM(str(path), max_num_seqs=3, prefill_chunk=5)
    eager = LLM(str(path), max_num_seqs=3, prefill_chunk=5, planned_decode=False)
    assert planned.engine.runner.plan is not None and eager.engine.runner.plan is None
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    batched = planned.generate(prompts, GREEDY)
    for ours, theirs in zip(batched, eager.generate(prompts, GREEDY)):
        assert ours.token_ids == theirs.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-4
    # alone (one row) or in a batch, the planned step's experts run in two parallel sections (every
    # touched expert's gate/up, then every down): a row gets the same numbers either way
    for prompt, together in zip(prompts, batched):
        alone = planned.generate(prompt, GREEDY)
        assert alone.token_ids == together.token_ids
        assert [a.logprob for a in alone.logprobs] == [b.logprob for b in together.logprobs]


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_planned_routing_survives_nan(reference, tmp_path):
    """A router with NaN rows (a broken file): the planned step picks NaN first as topk does,
    never an expert out of range, and answers as the eager block does."""
    import copy

    broken = copy.deepcopy(reference)
    with torch.no_grad():
        broken.model.layers[0].mlp.gate.weight[1:3] = float("nan")
    path = export_gguf(tmp_path / "nan.gguf", broken, QType.Q8_0, matrix_type=QType.Q8_0)
    planned, eager = LLM(str(path)), LLM(str(path), planned_decode=False)
    assert planned.engine.runner.plan is not None
    assert planned.generate(PROMPT, GREEDY).token_ids == eager.generate(PROMPT, GREEDY).token_ids


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_dispatch_twin_packs_its_experts(reference, tmp_path):
    """hayate plan's shrunken twin of a packed MoE file packs its experts too (its router
    stays fp32), so the step it times is planned as the real one is."""
    from hayate.plan.dispatch import build_twin, dispatch_seconds

    path = export_gguf(tmp_path / "mixtral-q8.gguf", reference, QType.Q8_0, matrix_type=QType.Q8_0)
    real = LLM(str(path)).loaded
    twin = build_twin(real)
    assert _plannable(real.model) and _plannable(twin)
    assert all(len(layer.mlp.experts.packed) == 4 for layer in twin.model.layers)
    assert dispatch_seconds(real, context=8, steps=2) > 0


def test_gguf_float_and_packed_experts_in_one_layer(reference, tmp_path):
    """A layer whose experts come partly as blocks and partly in float runs them all in float:
    the packed ones are decoded into the slabs, equal to the file decoded to fp32."""
    path = export_gguf(tmp_path / "mixed.gguf", reference, QType.Q8_0, per_expert=True)
    source = GGUFModelFile(path)
    weights = [(n, w.dequantize() if n.endswith("layers.1.block_sparse_moe.experts.1.w2.weight") else w)
               for n, w in source.tensors(keep_packed=True)]
    model = build_model(ModelConfig.from_hf(source.hf_config()), max_positions=256)
    model.load_weights(weights)
    expected, _ = load_gguf(path)
    assert model.model.layers[0].mlp.experts.packed is not None and model.model.layers[1].mlp.experts.packed is None
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(model.model.layers[1].mlp.experts, name),
                           getattr(expected.model.layers[1].mlp.experts, name))


def test_gguf_checks_know_experts(reference, tmp_path):
    source = GGUFModelFile(export_gguf(tmp_path / "mixtral.gguf", reference))
    tensors = {tensor.name: tensor for tensor in source.reader.tensors}
    check_model(source.metadata, tensors, "llama", "tiny.gguf")
    refuses_without(source.metadata, tensors, "llama", "blk.1.ffn_up_exps.weight")
    with pytest.raises(GGUFError, match="expert_used_count is 5"):
        check_model({**source.metadata, "llama.expert_used_count": 5}, tensors, "llama", "tiny.gguf")
    dense = {k: v for k, v in source.metadata.items() if "expert" not in k}
    with pytest.raises(GGUFError, match="ffn_gate.weight is missing"):
        check_model(dense, tensors, "llama", "tiny.gguf")


# ---- hayate plan -----------------------------------------------------------------------------

def test_decode_cost_counts_the_experts_touched(folder, capsys):
    """A step reads the shared weights and, per layer, E * (1 - (1 - k/E)^B) experts' weights."""
    model, config = load_hayate(folder)
    expert_bytes = 4 * 3 * 96 * 64   # fp32 gate, up and down of one expert
    for batch, touched in ((1, 2.0), (3, 3.5), (64, 4.0)):
        cost = decode_cost(model, config, batch=batch, context=10)
        rows = [row for row in cost.rows if row.name.endswith(".experts")]
        assert [row.name for row in rows] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        assert sum(row.bytes for row in rows) == pytest.approx(2 * touched * expert_bytes, abs=2)
        assert sum(row.flops for row in rows) == 2 * 2 * batch * 2 * 3 * 96 * 64   # layers x 2 B k weights
    assert experts_touched(8, 2, 1) == 2 and experts_touched(8, 2, 4) == pytest.approx(8 * (1 - 0.75 ** 4))
    chunked = prefill_cost(model, config, prompt_len=21, chunk=5)   # chunks of 5, 5, 5, 5, 1 tokens
    touched = 4 * experts_touched(4, 2, 5) + experts_touched(4, 2, 1)
    experts = sum(row.bytes for row in chunked.rows if row.name.endswith(".experts"))
    assert experts == pytest.approx(2 * touched * expert_bytes, abs=2)
    assert main(["plan", "--model", str(folder), "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    assert "experts" in out and "decode: eager PyTorch model" in out
