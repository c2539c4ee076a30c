// Operators over GGUF blocks and a decode step's few rows, for PyTorch: matrix-vector
// products that read GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) directly with fp32 activations and fp32
// accumulation (the weights move as 4.5-8.5 bits, the arithmetic stays exact to the stored
// values up to fp32 rounding: no 8-bit or bf16 activations), dequantization, RMSNorm, RoPE.
#include "ggml_blocks.h"
#include "kv_elements.h"

void register_decode_plan(pybind11::module& m);  // decode.cpp
void register_vision_attention(pybind11::module& m);  // vision_attention.cpp

// x [M, K] float32 (M <= 16); w [N, row bytes] uint8 of a natively read ggml_type
// (block_formats.h). Returns [M, N] float32.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, int64_t ggml_type) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be a 2-D float32 tensor");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be a 2-D uint8 tensor");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= kMaxRows, "at most ", kMaxRows, " activation rows, got ", M);
  TORCH_CHECK(w.size(1) == row_bytes_of(ggml_type, K), "weight bytes do not match in_features");
  std::vector<float> x_sums(M * (K / kBlock));
  auto out = torch::empty({M, N}, x.options());
  IntraOpThreads threads;
  gemv_into(x.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), N, ggml_type, x_sums.data(), out.data_ptr<float>(),
            N, threads);
  return out;
}

// w [N, row bytes] uint8 -> fp32 [N, K], computed as w = d * q + offset, into
// `out` when given (a reused workspace: no fresh pages to fault in for every prefill chunk).
torch::Tensor dequantize(torch::Tensor w, int64_t ggml_type, int64_t K, c10::optional<torch::Tensor> into) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be a 2-D uint8 tensor");
  w = w.contiguous();
  const int64_t N = w.size(0), row_bytes = row_bytes_of(ggml_type, K);
  TORCH_CHECK(w.size(1) == row_bytes, "weight bytes do not match K");
  torch::Tensor out;
  if (into.has_value()) {
    out = *into;
    TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == N * K,
                "out must be a contiguous float32 tensor of N * K elements");
  } else {
    out = torch::empty({N, K}, torch::kFloat32);
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_type(ggml_type, [&](auto type) {
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      dequantize_rows<decltype(type)::value>(wp, op, K, row_bytes, begin, end);
    });
  });
  return out;
}

// RMSNorm of a few rows (decode): one pass to sum squares, one to scale. For so little work
// a plain loop beats the dispatch and threading of a general operator.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "rms_norm takes float32");
  x = x.contiguous();
  const int64_t H = x.size(-1), M = x.numel() / H;
  TORCH_CHECK(weight.numel() == H, "weight size does not match the hidden size");
  auto out = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), weight.contiguous().data_ptr<float>(), out.data_ptr<float>(), M, H,
                static_cast<float>(eps));
  return out;
}

// Rotary embedding, half-split layout, in place: x [tokens, heads, D], cos/sin [tokens, D].
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 3, "rope_ takes contiguous float32 [T, H, D]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  cos = cos.contiguous();
  sin = sin.contiguous();
  for (int64_t t = 0; t < T; ++t) {
    rope_heads(x.data_ptr<float>() + t * H * D, H, D, cos.data_ptr<float>() + t * D, sin.data_ptr<float>() + t * D);
  }
}

// The first greatest value's index, a NaN counting as greatest (as numpy and torch do).
static int64_t argmax_row(const float* x, int64_t n) {
  float best = -INFINITY;
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 top = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, v);
  }
  best = _mm512_reduce_max_ps(top);
  nan = unordered != 0;
#endif
  for (; i < n; ++i) {
    nan |= std::isnan(x[i]);
    best = std::max(best, x[i]);
  }
  for (i = 0; i < n; ++i)
    if (nan ? std::isnan(x[i]) : x[i] == best) return i;
  return 0;
}

// Each row's argmax of float32 logits [R, V], as Python ints: a greedy step's tokens in one
// short call (numpy's path to the same ints touched enough code to cost ~50 us a token, its
// caches cold after the weights streamed through).
std::vector<int64_t> argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2 && logits.device().is_cpu(),
              "argmax_rows takes 2-D float32 CPU logits");
  logits = logits.contiguous();
  std::vector<int64_t> out(logits.size(0));
  for (int64_t r = 0; r < logits.size(0); ++r) out[r] = argmax_row(logits.data_ptr<float>() + r * logits.size(1), logits.size(1));
  return out;
}

// float32 `values` stored into `out` (float32, float16 or bfloat16, as many elements) as the
// planned step stores keys and values in the KV cache: the tests hold its rounding to torch's.
void store_kv(torch::Tensor values, torch::Tensor out) {
  TORCH_CHECK(values.dtype() == torch::kFloat32 && values.numel() == out.numel() && out.is_contiguous(),
              "store_kv takes float32 values and a contiguous out of as many elements");
  values = values.contiguous();
  const float* from = values.data_ptr<float>();
  switch (out.scalar_type()) {
    case torch::kFloat32: return store_row(from, values.numel(), out.data_ptr<float>());
    case torch::kFloat16: return store_row(from, values.numel(), out.data_ptr<c10::Half>());
    case torch::kBFloat16: return store_row(from, values.numel(), out.data_ptr<c10::BFloat16>());
    default: TORCH_CHECK(false, "out must be float32, float16 or bfloat16, got ", out.scalar_type());
  }
}

// Constrained decoding: in each listed row of float32 logits [R, V], every token whose bit is
// clear in that row of the int32 bitmask [>= R, W] (bit t % 32 of word t / 32) becomes -inf, as
// do tokens past W * 32. One pass over the row; whole words are the common case (a grammar
// allows few tokens), so a clear word is 32 stores and a full word is skipped.
void mask_logits_(torch::Tensor logits, torch::Tensor bitmask, std::vector<int64_t> rows) {
  TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.dim() == 2 && logits.device().is_cpu() &&
              logits.stride(1) == 1, "mask_logits_ takes 2-D float32 CPU logits, contiguous in a row");
  TORCH_CHECK(bitmask.dtype() == torch::kInt32 && bitmask.dim() == 2 && bitmask.is_contiguous() &&
              bitmask.device().is_cpu(), "mask_logits_ takes a contiguous 2-D int32 CPU bitmask");
  const int64_t V = logits.size(1), W = bitmask.size(1);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t r : rows) {
    TORCH_CHECK(r >= 0 && r < logits.size(0) && r < bitmask.size(0), "mask_logits_: row ", r, " out of range");
    float* x = logits.data_ptr<float>() + r * logits.stride(0);
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>()) + r * W;
    for (int64_t w = 0; w * 32 < V; ++w) {
      const uint32_t word = w < W ? bits[w] : 0u;
      const int64_t n = std::min<int64_t>(32, V - w * 32);
      float* chunk = x + w * 32;
      if (word == 0xFFFFFFFFu && n == 32) continue;
      if (word == 0u) {
        for (int64_t b = 0; b < n; ++b) chunk[b] = ninf;
        continue;
      }
      for (int64_t b = 0; b < n; ++b)
        if (!((word >> b) & 1u)) chunk[b] = ninf;
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs, so a server's event loop keeps going meanwhile.
  m.def("gemv", &gemv, "GGUF-block matrix-vector product with fp32 activations",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "GGUF blocks to fp32", py::arg("w"), py::arg("ggml_type"), py::arg("K"),
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "RMSNorm of a few float32 rows", py::call_guard<py::gil_scoped_release>());
  m.def("rope_", &rope_, "rotary embedding in place (half-split)", py::call_guard<py::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, "each row's argmax (the first; NaN counts as greatest)");
  m.def("mask_logits_", &mask_logits_, "grammar bitmask rows applied to logits in place (disallowed -> -inf)",
        py::call_guard<py::gil_scoped_release>());
  m.def("store_kv", &store_kv, "float32 values into a KV-cache-typed tensor, as the planned step stores them");
  register_decode_plan(m);
  register_vision_attention(m);
}
