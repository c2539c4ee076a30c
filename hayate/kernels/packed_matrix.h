// The planned step's projections: a GGUF weight rearranged for the VNNI kernel (shared with
// the model's packed layers), a projection's scratch, and a projection as one matrix or
// several side by side.
#pragma once
#include "ggml_blocks.h"
#include "interleaved_kernel.h"
#include "worker_pool.h"
#include <pybind11/pybind11.h>

namespace {

#if HAYATE_INTERLEAVED
// A GGUF weight rearranged for the VNNI kernel: the model's packed layers hold it instead of
// the file's blocks once a plan is built, and the plan shares it (one copy of the weights).
struct InterleavedWeight {
  InterleavedMatrix matrix;
  InterleavedWeight(const torch::Tensor& w, int64_t ggml_type, int64_t K, std::shared_ptr<uint8_t> storage = nullptr,
                    bool fill = true)
      : matrix(w, ggml_type, K, std::move(storage), fill) {}

  // A model's weights rearranged into one arena of 2 MB pages (one page table walk per 2 MB
  // for the whole model, no page rounded up per matrix): ws[i] is [N, row_bytes_of(types[i], K_i)].
  static std::vector<InterleavedWeight> all(const std::vector<torch::Tensor>& ws, const std::vector<int64_t>& types,
                                            const std::vector<int64_t>& Ks) {
    TORCH_CHECK(ws.size() == types.size() && ws.size() == Ks.size(), "one type and K per weight");
    constexpr int64_t kAlign = 4096;
    std::vector<int64_t> offsets;
    int64_t total = 0;
    for (size_t i = 0; i < ws.size(); ++i) {
      offsets.push_back(total);
      total += (InterleavedMatrix::bytes_for(types[i], ws[i].size(0), Ks[i]) + kAlign - 1) / kAlign * kAlign;
    }
    // every byte of each matrix gets written: no zeroing pass over the arena
    const std::shared_ptr<uint8_t> arena = huge_page_buffer(std::max<int64_t>(total, 1), /*zeroed=*/false);
    std::vector<InterleavedWeight> weights;
    for (size_t i = 0; i < ws.size(); ++i)   // each shares the arena's ownership
      weights.emplace_back(ws[i], types[i], Ks[i], std::shared_ptr<uint8_t>(arena, arena.get() + offsets[i]), false);
    std::vector<InterleavedMatrix*> matrices;
    for (InterleavedWeight& weight : weights) matrices.push_back(&weight.matrix);
    InterleavedMatrix::fill_all(matrices, ws);   // all matrices' groups shared by all threads
    return weights;
  }

  // x [M, K] -> [M, N], 16 rows a pass, on PyTorch's threads (the eager model's steps)
  torch::Tensor apply(torch::Tensor x) const {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == matrix.K(),
                "x must be float32 [M, in_features]");
    x = x.contiguous();
    ActivationPlanes planes;
    const int64_t M = x.size(0), K = matrix.K(), N = matrix.N();
    auto out = torch::empty({M, N}, x.options());
    IntraOpThreads threads;
    for (int64_t m = 0; m < M; m += kMaxRows)
      interleaved_gemv(x.data_ptr<float>() + m * K, std::min(kMaxRows, M - m), &matrix, 1, planes,
                       out.data_ptr<float>() + m * N, threads);
    return out;
  }

  // fp32 [N, K] (prefill), into `out` when given: bit for bit gguf's dequantization
  torch::Tensor dequantize(c10::optional<torch::Tensor> into) const {
    torch::Tensor out = into.has_value() ? *into : torch::empty({matrix.N(), matrix.K()}, torch::kFloat32);
    TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == matrix.N() * matrix.K(),
                "out must be a contiguous float32 tensor of N * K elements");
    float* values = out.data_ptr<float>();
    at::parallel_for(0, matrix.groups(), 1, [&](int64_t begin, int64_t end) { matrix.dequantize_groups(values, begin, end); });
    return out;
  }
};
#endif

// Scratch for a projection's input: per-block sums (GGUF-block kernel) or byte planes.
struct Activations {
  std::vector<float> sums;
#if HAYATE_INTERLEAVED
  ActivationPlanes planes;
#endif
};

// A projection's weights: one matrix, or several side by side (q, k and v whose types differ,
// as in a Q4_K_M file), their outputs consecutive columns. Rearranged for the VNNI kernel
// where the CPU has it (interleaved.h; shared with the model's packed layers), else the GGUF
// blocks read in place (ggml_blocks.h).
struct PackedMatrix {
  int64_t N = 0, K = 0;
  torch::Tensor bias;    // float32 [N], or undefined
#if HAYATE_INTERLEAVED
  std::vector<InterleavedMatrix> parts;
#else
  std::vector<torch::Tensor> parts;   // uint8 [N_i, row bytes]
  std::vector<int64_t> types;
#endif

  PackedMatrix() = default;
  // weight: an InterleavedWeight (shared), or GGUF blocks uint8 [N, row bytes] (rearranged into
  // the plan's own copy where the CPU has VNNI, else read in place); or a list of them, with a
  // list of types.
  PackedMatrix(const pybind11::object& weight, const pybind11::object& ggml_type, int64_t in_features,
               c10::optional<torch::Tensor> b)
      : K(in_features) {
    namespace py = pybind11;
    if (py::isinstance<py::list>(weight) || py::isinstance<py::tuple>(weight)) {
      const py::sequence weights = weight.cast<py::sequence>(), types = ggml_type.cast<py::sequence>();
      TORCH_CHECK(weights.size() == types.size() && weights.size() > 0, "one type per weight");
      for (size_t i = 0; i < weights.size(); ++i) add(weights[i], types[i].cast<int64_t>());
    } else {
      add(weight, ggml_type.cast<int64_t>());
    }
    if (b.has_value()) {
      bias = b->contiguous();
      TORCH_CHECK(bias.dtype() == torch::kFloat32 && bias.numel() == N, "bias must be float32 [out_features]");
    }
  }

  void add(const pybind11::object& weight, int64_t type) {
#if HAYATE_INTERLEAVED
    if (pybind11::isinstance<InterleavedWeight>(weight)) {
      parts.push_back(weight.cast<const InterleavedWeight&>().matrix);
      TORCH_CHECK(parts.back().K() == K && parts.back().type() == type, "the rearranged weight does not match its layer");
    } else {
      parts.emplace_back(checked_blocks(weight.cast<torch::Tensor>(), type), type, K);
    }
    N += parts.back().N();
#else
    parts.push_back(checked_blocks(weight.cast<torch::Tensor>(), type).contiguous());
    types.push_back(type);
    N += parts.back().size(0);
#endif
  }

  torch::Tensor checked_blocks(const torch::Tensor& w, int64_t type) const {
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "packed weights must be 2-D uint8");
    TORCH_CHECK(w.size(1) == row_bytes_of(type, K), "weight bytes do not match K");
    return w;
  }

  // out [M, N] = x [M, K] W^T (+ bias)
  void apply(const float* x, int64_t M, Activations& scratch, float* out, WorkerPool& threads) const {
#if HAYATE_INTERLEAVED
    interleaved_gemv(x, M, parts.data(), parts.size(), scratch.planes, out, threads);
#else
    scratch.sums.resize(M * K / kBlock);
    int64_t column = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      gemv_into(x, M, K, parts[i].data_ptr<uint8_t>(), parts[i].size(0), types[i], scratch.sums.data(), out + column,
                N, threads);
      column += parts[i].size(0);
    }
#endif
    if (bias.defined()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) out[m * N + n] += b[n];
    }
  }
};

}  // namespace
