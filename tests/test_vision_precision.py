"""The vision encoder's bf16 path, held to its fp32 twin on tiny random SmolVLM- and
LLaVA-shaped models: every linear layer of the vision modules converted and none of the text
model's, each converted layer equal to bf16-rounded inputs and weights accumulated in fp32, and
the image embeddings close to fp32's, the native bf16 attention equal to PyTorch's on the same
inputs; fp32, the default, leaves the model as loaded. The CUDA
encoder (bf16 weights and activations) is held to the same CPU twin where a GPU is present."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hayate.config import EngineConfig
from hayate.llm import LLM
from hayate.kernels import native_kernels
from hayate.models.vision.precision import Bf16Linear, bf16_attention, set_vision_precision
from hayate.multimodal.image import ImageLimits, decode_image
from hayate.sampling import SamplingParams
from image_samples import encode, noise
from tiny_vlms import make_tiny_vlm

PICTURE = encode(noise((90, 60), seed=31), "PNG")


@pytest.fixture(scope="module", params=["idefics3", "llava"])
def llm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"precision-{request.param}")
    make_tiny_vlm(request.param, folder)
    return LLM(str(folder))


def pixels(llm: LLM):
    image = decode_image(PICTURE, ImageLimits())
    return llm.processor.process(image.image, image.content_hash, "high")


def embeddings(model: nn.Module, features) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode_image(features.pixel_values.to(_device(model)),
                                  None if features.pixel_attention_mask is None
                                  else features.pixel_attention_mask.to(_device(model))).float().cpu()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def bf16_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    set_vision_precision(twin, "bf16")
    return twin


def test_bf16_converts_the_vision_linears_only(llm):
    model = llm.engine.runner.model
    vision_linears = sum(isinstance(m, nn.Linear) for prefix in model.VISION_MODULES
                         for m in model.get_submodule(prefix).modules())
    twin = copy.deepcopy(model)
    assert set_vision_precision(twin, "bf16") == vision_linears > 0
    assert sum(isinstance(m, Bf16Linear) for m in twin.modules()) == vision_linears
    text_before = [(name, p.dtype) for name, p in model.named_parameters() if not name.startswith(model.VISION_MODULES)]
    text_after = [(name, p.dtype) for name, p in twin.named_parameters() if not name.startswith(model.VISION_MODULES)]
    assert text_before == text_after and all(dtype == torch.float32 for _, dtype in text_after)
    assert set_vision_precision(twin, "bf16") == 0   # already converted


def test_bf16_embeddings_are_close_to_fp32_but_rounded(llm):
    model = llm.engine.runner.model
    features = pixels(llm)
    exact, fast = embeddings(model, features), embeddings(bf16_twin(model), features)
    assert not torch.equal(exact, fast)   # it does round
    assert F.cosine_similarity(exact, fast, dim=-1).min() > 0.999


def test_fp32_leaves_the_model_as_loaded(llm):
    model = llm.engine.runner.model
    assert set_vision_precision(model, "fp32") == 0
    assert not any(isinstance(m, Bf16Linear) for m in model.modules())
    with pytest.raises(ValueError, match="vision precision must be one of fp32, bf16"):
        set_vision_precision(model, "int3")
    with pytest.raises(ValueError, match="vision_precision must be one of"):
        EngineConfig(vision_precision="fp16")


@pytest.mark.parametrize("bf16_out", [False, True])
def test_bf16_linear_is_rounded_inputs_accumulated_in_fp32(bf16_out):
    """The GEMM accumulates the rounded products in fp32 and rounds its output to bf16 once."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    product = F.linear(x.bfloat16().double(), linear.weight.bfloat16().double())
    out = Bf16Linear(linear, bf16_out=bf16_out)(x)
    assert out.dtype == (torch.bfloat16 if bf16_out else torch.float32)
    bias = linear.bias.bfloat16() if bf16_out else linear.bias
    torch.testing.assert_close(out.double(), product + bias.double(), rtol=2 ** -7, atol=1e-3)


def test_engine_answers_with_the_bf16_encoder(tmp_path):
    make_tiny_vlm("idefics3", tmp_path)
    llm = LLM(str(tmp_path), vision_precision="bf16")
    assert any(isinstance(m, Bf16Linear) for m in llm.engine.runner.model.modules())
    content = [{"type": "image", "image": decode_image(PICTURE, ImageLimits())}, {"type": "text", "text": "What?"}]
    result = llm.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=4, temperature=0))
    assert len(result.token_ids) == 4 and result.timings.images.encode > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_encoder_matches_its_cpu_bf16_twin(llm):
    model = llm.engine.runner.model
    features = pixels(llm)
    on_cpu = embeddings(bf16_twin(model), features)
    on_cuda = embeddings(copy.deepcopy(model).to(device="cuda", dtype=torch.bfloat16), features)
    assert F.cosine_similarity(on_cpu, on_cuda, dim=-1).min() > 0.995


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    images, patches, width = q.shape
    q, k, v = (t.double().view(images, patches, heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(images, patches, width)


@pytest.mark.parametrize("images, patches, heads", [(1, 64, 1), (2, 77, 3), (1, 5, 2), (3, 33, 2)])
def test_native_bf16_attention_matches_sdpa_on_the_same_inputs(images, patches, heads):
    """Padding keys (patches not a multiple of 32) and short query blocks included; the
    probabilities and the output round to bf16, the rest is fp32."""
    kernels = native_kernels()
    if kernels is None or not kernels.vision_attention_supported():
        pytest.skip("this CPU has no AVX512-BF16 (the encoder keeps PyTorch's attention)")
    torch.manual_seed(patches)
    q, k, v = (torch.randn(images, patches, heads * 64).bfloat16() for _ in range(3))
    out = bf16_attention(q, k, v, heads, 0.125)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    expected = _sdpa(q, k, v, heads, 0.125)
    assert ((out.double() - expected).norm() / expected.norm()) < 6e-3


def test_bf16_attention_leaves_what_it_does_not_cover_to_pytorch():
    q = torch.randn(1, 8, 2 * 32).bfloat16()
    assert bf16_attention(q, q, q, 2, 0.1) is None            # heads of 32
    assert bf16_attention(q.float(), q.float(), q.float(), 1, 0.1) is None   # fp32
