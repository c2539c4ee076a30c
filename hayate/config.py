"""EngineConfig: every engine setting, validated once at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass

from hayate.models.vision.precision import VISION_PRECISIONS
from hayate.sampling import check_speculative
from hayate.tools.formats import FORMAT_NAMES

WEIGHT_MODES = ("auto", "fp32", "packed", "int4-bf16")
DTYPES = ("auto", "float32", "bfloat16")
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")
GRAMMAR_BACKENDS = ("auto", "llguidance")


@dataclass
class EngineConfig:
    model: str | None = None          # .gguf file or Hugging Face folder; None = the default model
    mmproj: str | None = None         # llama.cpp's image encoder GGUF beside a .gguf model (SmolVLM)
    threads: int | None = None        # torch intra-op threads; None = one per usable CPU (hayate.cpus)
    max_model_len: int | None = None  # context length; None = min(model's, 4096)
    max_num_seqs: int = 1             # sequences that can run at once (the batch)
    prefill_chunk: int = 512          # prompt tokens run per forward pass
    block_size: int = 16              # tokens per KV-cache block
    kv_cache_tokens: int | None = None  # KV-cache capacity shared by all requests; None = by memory
    # fp32: dequantize at load (exact) | packed: dequantize per layer (exact, for big models)
    # | int4-bf16: packed int4 kernels with bf16 activations (fast, lossy) | auto: fp32 or packed
    weights: str = "auto"
    show_progress: bool = False       # progress bar while loading
    encoder_cache_mb: int = 256       # image embeddings kept by content hash (vision models)
    # the vision encoder's linear layers: fp32 (exact) | bf16 (bf16 weights and inputs, fp32
    # accumulation: ~2x faster on CPUs with AVX512-BF16 or AMX, lossy: models/vision/precision.py)
    vision_precision: str = "fp32"
    planned_decode: bool = True       # decode steps as one native call where the model allows
    prefix_caching: bool = True       # share the KV blocks of prompts' common prefixes (block_manager.py)
    device: str = "cpu"               # "cpu", or "cuda" / "cuda:N": weights dequantized (or int4-bf16)
    cuda_graphs: bool = True          # on CUDA, decode steps replay graphs captured per batch and context bucket
    dtype: str = "auto"               # weights and activations: auto = float32 on the CPU, bfloat16 on CUDA
    # KV cache elements: auto = the weights' dtype (float32 on the CPU: exact). float16 / bfloat16
    # halve the cache's bytes (twice the tokens where sizing is by memory) and attention's reads,
    # but round every key and value: lossy, so an explicit opt-in. Attention math stays fp32.
    kv_cache_dtype: str = "auto"
    # structured output: where the grammar allows one continuation, append its tokens and run
    # them as a prompt chunk (one step) instead of one decode step each
    grammar_fast_forward: bool = True
    # which engine fills the masks: "auto" = xgrammar for the JSON schemas it enforces as
    # llguidance does (a step's fill from masks precomputed per state), llguidance for the rest;
    # "llguidance" = llguidance for everything (structured/xgrammar_backend.py)
    grammar_backend: str = "auto"
    tool_format: str = "auto"         # how the model writes tool calls (hayate.tools.formats); auto: from its template
    # speculative decoding (engine/speculative.py): "ngram" drafts up to speculative_tokens tokens
    # copied from where the last speculative_ngram (then fewer) tokens occurred before; "draft"
    # has speculative_model (a path or a pulled name, the target's vocabulary) draft them
    # greedily (engine/draft_model.py); exact either way
    speculative: str | None = None
    speculative_tokens: int = 6
    speculative_ngram: int = 3
    speculative_model: str | None = None
    # tensor parallel (engine/tensor_parallel.py): this process and tensor_parallel - 1 workers
    # each run a slice of every layer (threads shared out among them); expert_parallel deals a
    # mixture's experts out whole instead of splitting each one
    tensor_parallel: int = 1
    expert_parallel: bool = False

    @property
    def plans_decode(self) -> bool:
        """Whether decode steps may run as the planned native step (not under tensor parallel,
        whose ranks add partial sums between the layers' halves)."""
        return self.planned_decode and self.tensor_parallel == 1

    def __post_init__(self) -> None:
        if self.mmproj is not None and self.model is None:
            raise ValueError("mmproj needs model: the .gguf text model the image encoder belongs to")
        if self.threads is not None and not 1 <= self.threads <= 4 * (os.cpu_count() or 1):
            raise ValueError(f"threads must be between 1 and {4 * (os.cpu_count() or 1)}, got {self.threads}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len must be >= 16, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 16:
            raise ValueError(f"kv_cache_tokens must be >= 16, got {self.kv_cache_tokens}")
        if self.encoder_cache_mb < 0:
            raise ValueError(f"encoder_cache_mb must be >= 0, got {self.encoder_cache_mb}")
        if self.device != "cpu" and not (self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.device != "cpu" and self.weights not in ("auto", "fp32", "int4-bf16"):
            raise ValueError(f"weights {self.weights} run on the CPU only; on {self.device} weights are "
                             "dequantized at load (weights auto or fp32) or int4-bf16")
        if self.vision_precision not in VISION_PRECISIONS:
            raise ValueError(f"vision_precision must be one of {', '.join(VISION_PRECISIONS)}, "
                             f"got {self.vision_precision!r}")
        if self.grammar_backend not in GRAMMAR_BACKENDS:
            raise ValueError(f"grammar_backend must be one of {', '.join(GRAMMAR_BACKENDS)}, "
                             f"got {self.grammar_backend!r}")
        if self.tool_format not in FORMAT_NAMES:
            raise ValueError(f"tool_format must be one of {', '.join(FORMAT_NAMES)}, got {self.tool_format!r}")
        check_speculative(self.speculative, self.speculative_tokens, self.speculative_ngram)
        if (self.speculative == "draft") != (self.speculative_model is not None):
            raise ValueError('speculative "draft" and speculative_model go together: the draft model drafts')
        if not 1 <= self.tensor_parallel <= 64:
            raise ValueError(f"tensor_parallel must be between 1 and 64, got {self.tensor_parallel}")
        if self.tensor_parallel > 1 and self.device != "cpu":
            raise ValueError("tensor parallel runs on the CPU (gloo) for now, not on " + self.device)
        if self.expert_parallel and self.tensor_parallel == 1:
            raise ValueError("expert_parallel deals experts out over tensor_parallel ranks: set tensor_parallel >= 2")
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}")
