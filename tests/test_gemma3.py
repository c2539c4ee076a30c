"""Gemma 3 (text) against Hugging Face transformers on a tiny random model: from its folder, and
from a GGUF file written the way llama.cpp's converter writes one (norms + 1, no q/k
permutation), fp32 and packed."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import transformers

from hayate.engine import model_runner, static_decode
from hayate.engine.decode_plan import _plannable
from hayate.kernels import native_kernels
from hayate.llm import LLM
from hayate.loading.builtin_templates import gemma_chat_template
from hayate.loading.chat_template import ChatTemplate
from hayate.loading.gguf import GGUFModelFile
from hayate.loading.gguf_checks import GGUFError, check_model
from hayate.loading.tokenizer import Tokenizer
from hayate.models.config import ModelConfig
from hayate.sampling import SamplingParams
from gguf_files import QType, encode, load_gguf, projections_per_layer, refuses_without
from test_decode_plan import assert_same, count_runs
from test_llama_parity import TURNS, hayate_logits_by_turns, load_hayate
from tiny_models import BYTE_VOCAB, VOCAB_SIZE, save_tiny_folder

# 6 layers so that one (the last) is global; a window shorter than every turn; a query scale
# and a head size that are not hidden / heads.
TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
            sliding_window=4, max_position_embeddings=128, rope_theta=1e6, rope_local_base_freq=1e4,
            tie_word_embeddings=True, bos_token_id=BYTE_VOCAB, eos_token_id=BYTE_VOCAB + 3, pad_token_id=0)
PROMPT = sum(TURNS, [])


def random_gemma(seed: int = 0, **overrides) -> transformers.Gemma3ForCausalLM:
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():   # norms start at 0 (x̂ * (1 + 0)): make a missed +1 show
            if "norm" in name:
                parameter.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def reference() -> transformers.Gemma3ForCausalLM:
    return random_gemma()


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemma3")
    save_tiny_folder(reference, path)
    return path


@pytest.fixture(scope="module")
def expected_logits(reference) -> torch.Tensor:
    with torch.inference_mode():
        return reference(torch.tensor([PROMPT])).logits[0]


@pytest.fixture(scope="module")
def expected_tokens(reference) -> list[int]:
    return greedy(reference, PROMPT, 32)


def export_gguf(path: Path, model: torch.nn.Module, qtype: QType = QType.F32) -> Path:
    """The model as llama.cpp's converter writes a gemma3 file: every norm + 1, q/k as they are,
    no output.weight (tied), and no query_pre_attn_scalar (llama.cpp scales by key_length)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue
        array = value.float().numpy() + (1.0 if "norm" in hf_name else 0.0)
        tensor_type = qtype if array.ndim == 2 else QType.F32
        raw = tensor_type if tensor_type != QType.F32 else None
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), encode(array, tensor_type), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_config_layers_and_scales(folder):
    config = ModelConfig.from_hf(transformers.AutoConfig.from_pretrained(folder).to_dict())
    assert config.layer_windows == (4, 4, 4, 4, 4, None)
    assert (config.rope_theta, config.local_rope_theta, config.query_scale) == (1e6, 1e4, 20 ** -0.5)
    assert config.sliding_window is None and config.norm_weight_offset == 1.0   # contexts not capped


@pytest.mark.parametrize("softcap", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_softcapping_refused(softcap):
    with pytest.raises(ValueError, match=softcap):
        ModelConfig.from_hf({**TINY, "model_type": "gemma3_text", softcap: 30.0})


def test_logits_match_transformers(folder, expected_logits):
    model, config = load_hayate(folder)
    actual = hayate_logits_by_turns(model, config)
    assert (actual - expected_logits).abs().max().item() < 1e-4


def test_greedy_tokens_match_transformers(folder, expected_tokens):
    llm = LLM(str(folder), prefill_chunk=5)   # chunks smaller than the prompt: chunked prefill
    assert not _plannable(llm.engine.runner.model)
    result = llm.generate(PROMPT, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert result.token_ids == expected_tokens


def greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=tokens,
                             min_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_batched_decodes_match_transformers(folder, reference, expected_tokens, monkeypatch):
    """Sequences decoded together (keys padded, the window as a mask); then the fixed-shape
    step that CUDA captures, run here uncaptured."""
    prompts = [PROMPT, PROMPT[3:12], [7, 3]]
    expected = [expected_tokens[:20]] + [greedy(reference, prompt, 20) for prompt in prompts[1:]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    results = LLM(str(folder), prefill_chunk=5).generate(prompts, params)
    assert [result.token_ids for result in results] == expected
    monkeypatch.setattr(model_runner, "graphs_available", lambda device: True)
    monkeypatch.setattr(static_decode, "MIN_WIDTH", 16)
    static = LLM(str(folder), max_model_len=64, max_num_seqs=4, prefix_caching=False)
    assert static.engine.runner.static is not None
    assert [result.token_ids for result in static.generate(prompts, params)] == expected


def test_gguf_logits_match_transformers(reference, expected_logits, tmp_path):
    path = export_gguf(tmp_path / "gemma3.gguf", reference)
    model, config = load_gguf(path)
    assert config.layer_windows[-1] is None and config.query_scale == 24 ** -0.5   # llama.cpp's scale
    # The reference with llama.cpp's query scale (GGUF does not store query_pre_attn_scalar).
    for layer in reference.model.layers:
        layer.self_attn.scaling = 24 ** -0.5
    try:
        with torch.inference_mode():
            expected = reference(torch.tensor([PROMPT])).logits[0]
    finally:
        for layer in reference.model.layers:
            layer.self_attn.scaling = 20 ** -0.5
    assert (hayate_logits_by_turns(model, config) - expected).abs().max().item() < 1e-4


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
def test_gguf_packed_matches_fp32(reference, tmp_path):
    path = export_gguf(tmp_path / "gemma3-q8.gguf", reference, QType.Q8_0)
    packed, fp32 = LLM(str(path), weights="auto", prefill_chunk=5), LLM(str(path), weights="fp32")
    modules = [type(m).__name__ for m in packed.engine.runner.model.modules()]
    assert modules.count("PackedLinear") == projections_per_layer() * 6 + 1   # and the tied head
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=3)
    ours, theirs = packed.generate(PROMPT, params), fp32.generate(PROMPT, params)
    assert ours.token_ids == theirs.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ours.logprobs, theirs.logprobs)) < 1e-3


def test_gemma_chat_template_folds_system_into_first_turn():
    template = ChatTemplate(gemma_chat_template(), "<bos>", "<eos>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert template.render(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_gguf_checks_know_gemma3_tensors(reference, tmp_path):
    """The validator expects Gemma's four norms and QK-norm, with their shapes, and a window."""
    source = GGUFModelFile(export_gguf(tmp_path / "gemma3.gguf", reference))
    tensors = {tensor.name: tensor for tensor in source.reader.tensors}
    check_model(source.metadata, tensors, "gemma3", "tiny.gguf")
    refuses_without(source.metadata, tensors, "gemma3", "blk.2.attn_k_norm.weight")
    wrong = SimpleNamespace(shape=np.array([32]), tensor_type=QType.F32)
    with pytest.raises(GGUFError, match=r"post_ffw_norm.weight has shape \(32,\)"):
        check_model(source.metadata, {**tensors, "blk.0.post_ffw_norm.weight": wrong}, "gemma3", "tiny.gguf")
    with pytest.raises(GGUFError, match="gemma3.attention.sliding_window"):
        check_model({k: v for k, v in source.metadata.items() if "sliding_window" not in k}, tensors,
                    "gemma3", "tiny.gguf")
    with pytest.raises(GGUFError, match="has no place"):   # a Llama file may not carry them
        check_model({k.replace("gemma3.", "llama."): v for k, v in source.metadata.items()}, tensors,
                    "llama", "tiny.gguf")


def test_gguf_gemma_tokenizer_gets_builtin_template_and_space_runs():
    """A Gemma 3 base file: no template (Gemma's own is used), <end_of_turn> stops, and a run of
    spaces (a user-defined token stored with real spaces) encodes as its own id."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  ", "▁", "a", "b",
              "▁a", *[f"<0x{i:02X}>" for i in range(256)]]
    types = [3, 3, 3, 3, 3, 3, 4, 4, 1, 1, 1, 1, *[6] * 256]
    metadata = {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": [0.0] * len(tokens),
                "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
                "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.add_space_prefix": False}
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert tokenizer.chat_template == gemma_chat_template()
    assert 5 in tokenizer.eos_token_ids
    assert tokenizer.encode("<start_of_turn>a  b a\n", add_special_tokens=False) == [4, 9, 7, 10, 11, 6]


@pytest.mark.skipif(native_kernels() is None, reason="no C++ toolchain for the native kernels")
@pytest.mark.parametrize("window, qtype", [(4, QType.Q8_0), (40, QType.Q5_0)])
def test_planned_step_equals_eager_model(window, qtype, tmp_path):
    """Gemma 3 through the planned native step (scaled embedding, four norms, GeGLU, query
    scale, windows and RoPE tables per layer) against its slow twin, sequences batched over
    scattered blocks; a window of 40 leaves whole chunks of 32 keys behind it."""
    model = random_gemma(seed=1, sliding_window=window)
    path = str(export_gguf(tmp_path / "gemma3.gguf", model, qtype))
    planned, eager = LLM(path, max_num_seqs=4, block_size=4), LLM(path, max_num_seqs=4, block_size=4, planned_decode=False)
    assert planned.engine.runner.plan is not None and eager.engine.runner.plan is None
    calls = count_runs(planned)
    prompts = [PROMPT, torch.randint(4, VOCAB_SIZE, (70,)).tolist(), [7, 3]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    for ours, theirs in zip(planned.generate(prompts, params), eager.generate(prompts, params)):
        assert_same(ours, theirs)
    assert_same(planned.generate(prompts[1], params), eager.generate(prompts[1], params))
    assert len(calls) >= 2 * params.max_tokens   # the decode steps ran planned
