// A vision encoder's attention in bf16 (the `--vision-precision bf16` path): every patch
// attends to every patch of its image, no mask, head size 64. Scores and the weighted sum of
// values are AVX512-BF16 dot products (vdpbf16ps: bf16 pairs, fp32 accumulation); the softmax
// is fp32, its probabilities rounded to bf16 for the second product. PyTorch's CPU flash
// attention converts bf16 to fp32 and runs no faster than fp32 on CPUs without AMX.
//
// q, k, v [B, N, H * 64] bf16 as the projections write them; out [B, N, H * 64] bf16 as the
// output projection reads it: no transposes on either side.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

namespace {

constexpr int64_t kHead = 64;        // head size handled (SigLIP-B, CLIP-L)
constexpr int64_t kQueryBlock = 12;  // queries whose scores one pass over the keys computes

// e^x for x <= 0 (softmax's shifted scores), to fp32 rounding: 2^n * p(f) with f in [-0.5, 0.5].
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));   // ln 2 * frac
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

struct Head {
  const uint32_t* q;      // row i's pairs at q + i * row_pairs
  const uint32_t* keys;   // [32][Np]: key j's dims (2p, 2p + 1) at keys[p * Np + j]
  const uint32_t* values; // [Np / 2][64]: keys (2m, 2m + 1)'s dim d at values[m * 64 + d]
  uint16_t* out;          // row i at out + i * row_stride
  int64_t N, Np, row_pairs, row_stride;
  float scale;
};

// Scores of queries [first, first + rows) against every key, softmax, weighted sum of values.
// probs [Np / 2][kQueryBlock]: each row's bf16 probabilities of keys (2m, 2m + 1) at m, rows
// side by side, so the weighted sum's loop reads them like the scores' loop reads queries.
// The loops run whole blocks and groups (constant trip counts keep the accumulators in
// registers); rows past `rows` are computed from zeros and never stored.
void attend_block(const Head& h, int64_t first, int64_t rows, float* scores, uint32_t* probs) {
  const int64_t Np = h.Np;
  uint32_t q[kQueryBlock][kHead / 2] = {};
  for (int64_t r = 0; r < rows; ++r) std::memcpy(q[r], h.q + (first + r) * h.row_pairs, kHead * 2);
  // Two vectors of 16 keys (or dims) by kQueryBlock rows per pass: each broadcast feeds two
  // products and each load kQueryBlock, so the loop is bound by the products, not the loads.
  for (int64_t j0 = 0; j0 < Np; j0 += 32) {
    __m512 lo[kQueryBlock], hi[kQueryBlock];
    for (int64_t r = 0; r < kQueryBlock; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kHead / 2; ++p) {
      const __m512i k0 = _mm512_loadu_si512(h.keys + p * Np + j0);
      const __m512i k1 = _mm512_loadu_si512(h.keys + p * Np + j0 + 16);
      for (int64_t r = 0; r < kQueryBlock; ++r) {
        const __m512i pair = _mm512_set1_epi32(static_cast<int>(q[r][p]));
        lo[r] = _mm512_dpbf16_ps(lo[r], (__m512bh)pair, (__m512bh)k0);
        hi[r] = _mm512_dpbf16_ps(hi[r], (__m512bh)pair, (__m512bh)k1);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      _mm512_storeu_ps(scores + r * Np + j0, _mm512_mul_ps(lo[r], _mm512_set1_ps(h.scale)));
      _mm512_storeu_ps(scores + r * Np + j0 + 16, _mm512_mul_ps(hi[r], _mm512_set1_ps(h.scale)));
    }
  }
  std::vector<float> sums(rows);
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * Np;
    for (int64_t j = h.N; j < Np; ++j) s[j] = -std::numeric_limits<float>::infinity();   // padding keys
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < Np; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    alignas(32) uint32_t pairs[8];
    for (int64_t j = 0; j < Np; j += 16) {
      const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift));
      total = _mm512_add_ps(total, e);
      _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), (__m256i)_mm512_cvtneps_pbh(e));
      for (int64_t t = 0; t < 8; ++t) probs[(j / 2 + t) * kQueryBlock + r] = pairs[t];
    }
    sums[r] = _mm512_reduce_add_ps(total);
  }
  // The weighted sum, one 16-dim slice of the head at a time for the whole block: the same
  // shape of loop as the scores' (one load feeds every row's accumulator).
  for (int64_t c = 0; c < kHead / 16; c += 2) {
    __m512 lo[kQueryBlock], hi[kQueryBlock];
    for (int64_t r = 0; r < kQueryBlock; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
    for (int64_t m = 0; m < Np / 2; ++m) {
      const __m512i v0 = _mm512_loadu_si512(h.values + m * kHead + c * 16);
      const __m512i v1 = _mm512_loadu_si512(h.values + m * kHead + c * 16 + 16);
      for (int64_t r = 0; r < kQueryBlock; ++r) {
        const __m512i pair = _mm512_set1_epi32(static_cast<int>(probs[m * kQueryBlock + r]));
        lo[r] = _mm512_dpbf16_ps(lo[r], (__m512bh)pair, (__m512bh)v0);
        hi[r] = _mm512_dpbf16_ps(hi[r], (__m512bh)pair, (__m512bh)v1);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 inverse = _mm512_set1_ps(1.0f / sums[r]);
      uint16_t* out = h.out + (first + r) * h.row_stride + c * 16;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(lo[r], inverse)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(hi[r], inverse)));
    }
  }
}

}  // namespace

bool vision_attention_supported() { return true; }

torch::Tensor vision_attention_bf16(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t heads, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              v.scalar_type() == torch::kBFloat16, "q, k and v must be bfloat16");
  TORCH_CHECK(q.dim() == 3 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v must be [B, N, H * 64]");
  TORCH_CHECK(q.size(2) == heads * kHead, "heads of ", kHead, " only");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  const int64_t B = q.size(0), N = q.size(1), width = q.size(2), Np = (N + 31) / 32 * 32;
  auto out = torch::empty_like(q);
  // Keys as dim pairs per key, values as key pairs per dim (padding keys zero), per image and head.
  std::vector<uint32_t> keys(B * heads * (kHead / 2) * Np, 0), values(B * heads * (Np / 2) * kHead, 0);
  const uint16_t* ks = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const uint16_t* vs = reinterpret_cast<const uint16_t*>(v.data_ptr());
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      uint32_t* kp = keys.data() + bh * (kHead / 2) * Np;
      uint32_t* vp = values.data() + bh * (Np / 2) * kHead;
      for (int64_t j = 0; j < N; ++j) {
        const uint16_t* krow = ks + (b * N + j) * width + h * kHead;
        const uint16_t* vrow = vs + (b * N + j) * width + h * kHead;
        for (int64_t p = 0; p < kHead / 2; ++p) std::memcpy(kp + p * Np + j, krow + 2 * p, 4);
        uint16_t* half = reinterpret_cast<uint16_t*>(vp + (j / 2) * kHead) + (j % 2);
        for (int64_t d = 0; d < kHead; ++d) half[2 * d] = vrow[d];
      }
    }
  });
  const int64_t blocks = (N + kQueryBlock - 1) / kQueryBlock;
  const uint32_t* qs = reinterpret_cast<const uint32_t*>(q.data_ptr());
  uint16_t* os = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, B * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kQueryBlock * Np);
    std::vector<uint32_t> probs(kQueryBlock * Np / 2, 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, block = task % blocks, b = bh / heads, h = bh % heads;
      const Head head{qs + (b * N * width + h * kHead) / 2, keys.data() + bh * (kHead / 2) * Np,
                      values.data() + bh * (Np / 2) * kHead, os + b * N * width + h * kHead,
                      N, Np, width / 2, width, static_cast<float>(scale)};
      const int64_t first = block * kQueryBlock;
      attend_block(head, first, std::min(kQueryBlock, N - first), scores.data(), probs.data());
    }
  });
  return out;
}

#else

bool vision_attention_supported() { return false; }

torch::Tensor vision_attention_bf16(torch::Tensor, torch::Tensor, torch::Tensor, int64_t, double) {
  TORCH_CHECK(false, "this CPU has no AVX512-BF16");
  return {};
}

#endif

void register_vision_attention(pybind11::module& m) {
  m.def("vision_attention_supported", &vision_attention_supported, "whether vision_attention_bf16 runs on this CPU");
  m.def("vision_attention_bf16", &vision_attention_bf16,
        "unmasked attention over [B, N, H * 64] bf16 q, k, v (AVX512-BF16) -> [B, N, H * 64] bf16",
        py::call_guard<py::gil_scoped_release>());
}
