"""The cost model against hand counts, and `hayate plan` end to end on a tiny model."""
from __future__ import annotations

from hayate.cli import main
from hayate.layers.linear import PackedLinear
from hayate.llm import LLM
from hayate.plan.cost import decode_cost, group_rows, prefill_cost
from hayate.plan.dispatch import build_twin, dispatch_seconds, twin_config
from hayate.plan.hardware import HardwareProfile, probe_cpu
from gguf_files import QType, export_hf_model, tiny_model
from tiny_models import make_tiny_model


def test_decode_cost_counts_weights_flops_and_kv(tmp_path):
    make_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path))
    model, config = llm.engine.runner.model, llm.model_config
    layer_params = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128     # q, o; k, v (2 kv heads x 16); mlp
    matmul_params = config.num_hidden_layers * layer_params + 320 * 64   # + lm_head
    cost = decode_cost(model, config, batch=2, context=10)
    kv_row = next(row for row in cost.rows if row.name.startswith("attention"))
    linear_bytes = sum(row.bytes for row in cost.rows if row is not kv_row and row.name != "embedding rows")
    assert linear_bytes == 4 * matmul_params                      # fp32 weights, no biases
    assert cost.flops - kv_row.flops == 2 * 2 * matmul_params
    # Each sequence reads 10 cached keys and values and writes one, in each of 2 layers.
    assert kv_row.bytes == 2 * 2 * (2 * 10 + 2 * 1) * 2 * 16 * 4
    assert group_rows(cost)[0].bytes >= group_rows(cost)[-1].bytes


def test_prefill_reads_weights_once_per_chunk(tmp_path):
    make_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path))
    model, config = llm.engine.runner.model, llm.model_config
    one = prefill_cost(model, config, prompt_len=64, chunk=64)
    four = prefill_cost(model, config, prompt_len=64, chunk=16)
    assert one.flops == four.flops and four.bytes > one.bytes
    head = next(row for row in one.rows if row.name == "lm_head")   # the last token's logits only
    assert head.flops == 2 * config.hidden_size * config.vocab_size


def test_roofline_and_probe():
    profile = HardwareProfile("test", bandwidth=1e9, flops=1e9)
    assert profile.floor_seconds(2e9, 1e9) == 2.0 and profile.floor_seconds(1e9, 3e9) == 3.0
    measured = probe_cpu(buffer_mb=16, repeats=2)
    assert measured.bandwidth > 0 and measured.flops > 0


def test_plan_command_prints_floor(tmp_path, capsys):
    make_tiny_model("llama", tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s decode" in out and "time to first token" in out and "lm_head" in out
    assert "decode: eager PyTorch model" in out   # a float folder: no GGUF blocks to plan over


def test_plan_names_the_decode_path_of_a_packed_model(tmp_path, capsys):
    from hayate.kernels import native_kernels

    path = export_hf_model(tmp_path / "m.gguf", tiny_model("llama"), "llama", QType.Q4_1)
    assert main(["plan", "--model", str(path), "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    if native_kernels() is None:
        assert "decode: eager PyTorch model" in out
    else:
        assert "decode: planned native step" in out
        assert ("VNNI" in out) == hasattr(native_kernels(), "InterleavedWeight")


def test_dispatch_twin_keeps_layers_heads_and_format(tmp_path):
    path = export_hf_model(tmp_path / "m.gguf", tiny_model("llama"), "llama", QType.Q4_1)
    real = LLM(str(path)).loaded
    twin = build_twin(real)
    config = twin_config(real.config)
    assert config.num_hidden_layers == real.config.num_hidden_layers
    assert config.num_attention_heads == real.config.num_attention_heads
    mlp = twin.model.layers[0].mlp   # fused or not, as the real model's layers are
    up = mlp.gate_up_proj or mlp.up_proj
    assert isinstance(up, PackedLinear) and up.ggml_type == QType.Q4_1
    assert (mlp.gate_up_proj is None) == (real.model.model.layers[0].mlp.gate_up_proj is None)
    assert dispatch_seconds(real, context=8, steps=3) > 0


def test_prediction_reads_packed_layers_at_the_kernels_rate(tmp_path):
    from hayate.plan.report import predict

    path = export_hf_model(tmp_path / "m.gguf", tiny_model("llama"), "llama", QType.Q4_1)
    llm = LLM(str(path))
    model, config = llm.engine.runner.model, llm.model_config
    fast = HardwareProfile("test", bandwidth=1e9, flops=1e12)
    slow_kernel = HardwareProfile("test", bandwidth=1e9, flops=1e12, packed_rates={int(QType.Q4_1): 1e8})
    packed_bytes = sum(row.bytes for row in decode_cost(model, config, 1, 8).rows if row.ggml_type == QType.Q4_1)
    assert packed_bytes > 0
    a, b = predict(model, config, fast, 8, 512), predict(model, config, slow_kernel, 8, 512)
    assert abs(a.kernel_step_seconds - a.decode_step_seconds) < 1e-12   # no measured rate: the floor
    assert abs((b.kernel_step_seconds - a.kernel_step_seconds) - packed_bytes * (1e-8 - 1e-9)) < 1e-9
    assert b.expected_step_seconds(0.5) == b.kernel_step_seconds + 0.5


def test_probe_measures_the_native_kernel_rates():
    from hayate.kernels import native_kernels
    from hayate.plan.hardware import probe_packed_rates

    from hayate.layers.quant import NATIVE_TYPES

    rates = probe_packed_rates(buffer_mb=4, repeats=1)
    assert set(rates) == ({int(t) for t in NATIVE_TYPES} if native_kernels() is not None else set())
    only = probe_packed_rates(buffer_mb=2, repeats=1, types={QType.Q6_K, QType.F32})
    assert set(only) == ({int(QType.Q6_K)} if native_kernels() is not None else set())
    assert all(rate > 0 for rate in rates.values())


def test_memory_by_format_counts_every_tensor_once(tmp_path):
    from hayate.plan.cost import memory_by_format, module_bytes

    path = export_hf_model(tmp_path / "m.gguf", tiny_model("llama", tie_word_embeddings=True), "llama", QType.Q4_1)
    model = LLM(str(path)).engine.runner.model
    held = memory_by_format(model)
    assert {"Q4_1", "float32"} <= set(held)
    assert sum(held.values()) == module_bytes(model)


def test_jitter_probe_is_a_spread_of_the_same_work():
    from hayate.plan.hardware import probe_jitter

    assert probe_jitter(1 << 20, repeats=50) >= 1.0
