// The planned decode step's weight layout and its matrix-vector kernel (AVX-512 VNNI).
//
// Layout: a GGUF matrix [N, K] of Q4_0 / Q4_1 / Q8_0 blocks is rearranged, bit for bit, into
// groups of 16 output rows; for each group and each block of 32 inputs, the 16 rows' values
// sit so that one 64-byte load holds four consecutive values of every row:
//   Q4: 4 x 64 bytes; byte 4r+k of part j holds q[r, 8j+k] (low nibble) and q[r, 8j+4+k]
//       (high nibble); then 16 fp16 scales d, then 16 fp16 offsets m (Q4_0: m = -8 d, exact);
//   Q8: 8 x 64 bytes; byte 4r+k of part t holds q[r, 4t+k] + 128 as unsigned; then 16 fp16 d.
// The file's bytes (Q4_1: 20 per block, Q8_0: 34; Q4_0: 20, its offsets written out), the
// last group padded to 16 rows, in 2 MB pages where the OS grants them (the weights stream
// through the TLB every step: 4 KB pages cost ~10% of the step).
//
// Arithmetic, exact up to fp32 rounding: each block of an activation row is written as
// s * X with X a 23-bit integer (|X| <= 127 * 2^16), split into three signed bytes
// X = X0 2^16 + X1 2^8 + X2. The integer dot products q . Xp are exact (VPDPBUSD), combined
// in fp32, scaled by d * s, plus m * sum(x). A row's result does not depend on its batch.
#pragma once
#include "ggml_blocks.h"
#include <torch/extension.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAYATE_INTERLEAVED 1

constexpr int64_t kRowsPerGroup = 16;
constexpr int64_t kPlanes = 3;
constexpr int kActivationGroup = 8;   // activation rows whose accumulators share registers

inline int64_t interleaved_block_bytes(int64_t ggml_type) { return ggml_type == 8 ? 512 + 32 : 256 + 64; }

// Zeroed memory, 2 MB aligned and advised into huge pages where it is that big.
inline std::shared_ptr<uint8_t> huge_page_buffer(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, kHuge, std::max(rounded, kHuge)) == 0, "out of memory for ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, rounded, MADV_HUGEPAGE);   // advice only: without it the pages are ordinary
#endif
  std::memset(p, 0, rounded);
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
}

class InterleavedMatrix {
 public:
  InterleavedMatrix() = default;

  // Bytes the rearranged weight of an [N, K] matrix takes.
  static int64_t bytes_for(int64_t ggml_type, int64_t N, int64_t K) {
    return (N + kRowsPerGroup - 1) / kRowsPerGroup * (K / 32) * interleaved_block_bytes(ggml_type);
  }

  // w: uint8 [N, K / 32 * block_bytes] GGUF blocks of type 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0).
  // storage: zeroed memory of bytes_for(...) (a share of one arena), or null for its own.
  InterleavedMatrix(const torch::Tensor& w, int64_t ggml_type, int64_t K, std::shared_ptr<uint8_t> storage = nullptr)
      : type_(ggml_type), N_(w.size(0)), K_(K), blocks_(K / 32), groups_((w.size(0) + 15) / 16) {
    const int64_t source_bytes = block_bytes_of(ggml_type);   // checks the type
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && K % 32 == 0 && w.size(1) == blocks_ * source_bytes,
                "weight bytes do not match K");
    const torch::Tensor source = w.contiguous();
    const int64_t bytes = interleaved_block_bytes(type_);
    data_ = storage ? std::move(storage) : huge_page_buffer(nbytes());
    const uint8_t* src = source.data_ptr<uint8_t>();
    at::parallel_for(0, groups_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        for (int64_t b = 0; b < blocks_; ++b)
          for (int64_t r = 0; r < kRowsPerGroup && g * kRowsPerGroup + r < N_; ++r)
            place(src + ((g * kRowsPerGroup + r) * blocks_ + b) * source_bytes, data_.get() + (g * blocks_ + b) * bytes, r);
    });
  }

  // The weight in fp32 [N, K], as gguf computes it: d * q + m (Q4_0: d * q + (-8 d), the same
  // value as d * (q - 8), both products and the sum being exact), d * q for Q8_0.
  void dequantize_groups(float* out, int64_t g_begin, int64_t g_end) const {
    const int64_t bytes = interleaved_block_bytes(type_);
    for (int64_t g = g_begin; g < g_end; ++g)
      for (int64_t b = 0; b < blocks_; ++b) {
        const uint8_t* block = data_.get() + (g * blocks_ + b) * bytes;
        alignas(64) uint8_t q[8 * 64];   // part t: four values of each row, as in the kernel
        unpack(block, q);
        const uint16_t* halves = reinterpret_cast<const uint16_t*>(block + (type_ == 8 ? 512 : 256));
        for (int64_t r = 0; r < kRowsPerGroup && g * kRowsPerGroup + r < N_; ++r) {
          uint8_t row_q[32];
          for (int t = 0; t < 8; ++t) std::memcpy(row_q + 4 * t, q + t * 64 + 4 * r, 4);
          const __m512 d = _mm512_set1_ps(static_cast<float>(c10::Half(halves[r], c10::Half::from_bits())));
          const __m512 m = _mm512_set1_ps(type_ == 8 ? 0.f : static_cast<float>(c10::Half(halves[16 + r], c10::Half::from_bits())));
          float* row = out + (g * kRowsPerGroup + r) * K_ + b * 32;
          for (int half = 0; half < 2; ++half) {
            const __m128i bytes16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row_q + 16 * half));
            // Q8: back from +128; then d * q (exact) + m, one rounding as gguf's
            const __m512i ints = type_ == 8 ? _mm512_cvtepi8_epi32(_mm_xor_si128(bytes16, _mm_set1_epi8(-128)))
                                            : _mm512_cvtepu8_epi32(bytes16);
            _mm512_storeu_ps(row + 16 * half, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(ints), m));
          }
        }
      }
  }

  // The 8 parts of 64 values (q, or q + 128 for Q8) of an interleaved block, as unsigned bytes.
  void unpack(const uint8_t* block, uint8_t* q) const {
    if (type_ == 8) {
      std::memcpy(q, block, 512);
      return;
    }
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      const __m512i raw = _mm512_loadu_si512(block + 64 * j);
      _mm512_storeu_si512(q + 128 * j, _mm512_and_si512(raw, low));
      _mm512_storeu_si512(q + 128 * j + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
    }
  }

  // The GGUF blocks back, byte for byte: uint8 [N, K / 32 * block_bytes].
  torch::Tensor gguf_blocks() const {
    const int64_t source_bytes = block_bytes_of(type_), bytes = interleaved_block_bytes(type_);
    auto out = torch::empty({N_, blocks_ * source_bytes}, torch::kUInt8);
    for (int64_t n = 0; n < N_; ++n)
      for (int64_t b = 0; b < blocks_; ++b) {
        const int64_t g = n / kRowsPerGroup, r = n % kRowsPerGroup;
        const uint8_t* block = data_.get() + (g * blocks_ + b) * bytes;
        const uint16_t* halves = reinterpret_cast<const uint16_t*>(block + (type_ == 8 ? 512 : 256));
        uint8_t* dst = out.data_ptr<uint8_t>() + (n * blocks_ + b) * source_bytes;
        std::memcpy(dst, halves + r, 2);
        if (type_ == 3) std::memcpy(dst + 2, halves + 16 + r, 2);
        uint8_t* qs = dst + (type_ == 3 ? 4 : 2);
        if (type_ == 8) {
          for (int j = 0; j < 32; ++j) qs[j] = static_cast<uint8_t>(value(block, r, j));
        } else {
          for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>(value(block, r, j) | (value(block, r, j + 16) << 4));
        }
      }
    return out;
  }

  int64_t type() const { return type_; }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }
  int64_t groups() const { return groups_; }
  int64_t blocks() const { return blocks_; }
  int64_t nbytes() const { return bytes_for(type_, N_, K_); }
  const uint8_t* group_block(int64_t g, int64_t b) const {
    return data_.get() + (g * blocks_ + b) * interleaved_block_bytes(type_);
  }

 private:
  // One GGUF block of row r (0..15) into its place in the group's interleaved block.
  void place(const uint8_t* block, uint8_t* out, int64_t r) const {
    uint16_t* halves = reinterpret_cast<uint16_t*>(out + (type_ == 8 ? 512 : 256));
    std::memcpy(halves + r, block, 2);
    if (type_ == 8) {
      for (int t = 0; t < 8; ++t)
        for (int k = 0; k < 4; ++k) out[t * 64 + 4 * r + k] = static_cast<uint8_t>(block[2 + 4 * t + k] ^ 0x80);
      return;
    }
    const uint8_t* packed = block + (type_ == 2 ? 2 : 4);
    uint8_t q[32];
    for (int j = 0; j < 16; ++j) {
      q[j] = packed[j] & 0x0F;
      q[j + 16] = packed[j] >> 4;
    }
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 4; ++k) out[j * 64 + 4 * r + k] = static_cast<uint8_t>(q[8 * j + k] | (q[8 * j + 4 + k] << 4));
    if (type_ == 3) {
      std::memcpy(halves + 16 + r, block + 2, 2);
    } else {  // Q4_0: w = d (q - 8) = d q + (-8 d), and -8 d is exact in fp16
      const c10::Half d(halves[r], c10::Half::from_bits());
      halves[16 + r] = c10::Half(-8.f * static_cast<float>(d)).x;
    }
  }

  // Value j (0..31) of row r in an interleaved block: q (0..15) for Q4, the int8 q for Q8.
  int value(const uint8_t* block, int64_t r, int j) const {
    if (type_ == 8) return static_cast<int8_t>(block[(j / 4) * 64 + 4 * r + j % 4] ^ 0x80);
    const uint8_t byte = block[(j / 8) * 64 + 4 * r + j % 4];
    return (j % 8) < 4 ? byte & 0x0F : byte >> 4;
  }

  int64_t type_ = 0, N_ = 0, K_ = 0, blocks_ = 0, groups_ = 0;
  std::shared_ptr<uint8_t> data_;
};

// M activation rows as three planes of signed bytes, per-block scales, sums, and the Q8
// correction (-128 times each plane's block sum: its weights are stored offset by 128).
struct ActivationPlanes {
  int64_t M = 0, K = 0;
  std::vector<int8_t> planes;                     // [M][3][K]
  std::vector<float> scale, sums;                 // [M][K / 32]
  std::vector<int32_t> corrections;               // [M][K / 32][4]

  void quantize(const float* x, int64_t rows, int64_t K_) {
    M = rows;
    K = K_;
    const int64_t blocks = K / 32;
    planes.resize(M * kPlanes * K);
    scale.resize(M * blocks);
    sums.resize(M * blocks);
    corrections.resize(M * blocks * 4);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < blocks; ++b) quantize_block(x + m * K + b * 32, m, b);
  }

 private:
  void quantize_block(const float* v, int64_t m, int64_t b) {
    const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const int64_t blocks = K / 32;
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
    sums[m * blocks + b] = sum;
    float s = amax / (127.f * 65536.f);
    float inv = s > 0.f ? 1.f / s : 0.f;
    if (!(inv < INFINITY)) s = inv = 0.f;   // |x| < 1e-32 throughout: a zero block
    if (!(s < INFINITY) || std::isnan(sum)) {   // inf or NaN in the block (max drops NaN): pass it on
      s = NAN;
      inv = 0.f;
    }
    scale[m * blocks + b] = s;
    int8_t* out = planes.data() + m * kPlanes * K + b * 32;
    const __m512i limit = _mm512_set1_epi32(127 * 65536), bias = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
    __m512i totals[kPlanes] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int half = 0; half < 2; ++half) {
      __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(half ? hi : lo, _mm512_set1_ps(inv)));  // round to nearest
      X = _mm512_max_epi32(_mm512_min_epi32(X, limit), _mm512_sub_epi32(_mm512_setzero_si512(), limit));
      __m512i digits[kPlanes];
      for (int p = kPlanes - 1; p >= 0; --p) {   // balanced base-256 digits, lowest first
        digits[p] = p == 0 ? X : _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, bias), byte), bias);
        X = _mm512_srai_epi32(_mm512_sub_epi32(X, digits[p]), 8);
      }
      for (int p = 0; p < kPlanes; ++p) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + p * K + half * 16), _mm512_cvtepi32_epi8(digits[p]));
        totals[p] = _mm512_add_epi32(totals[p], digits[p]);
      }
    }
    for (int p = 0; p < kPlanes; ++p) corrections[(m * blocks + b) * 4 + p] = -128 * _mm512_reduce_add_epi32(totals[p]);
  }
};

// Groups g_begin..g_end of the output for activation rows first..first+kRows-1.
template <int kType, int kRows>
void interleaved_groups(const ActivationPlanes& x, int64_t first, const InterleavedMatrix& w, float* out,
                        int64_t g_begin, int64_t g_end) {
  const int64_t K = x.K, blocks = w.blocks(), N = w.N();
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512 radix = _mm512_set1_ps(256.f);
  for (int64_t g = g_begin; g < g_end; ++g) {
    __m512 acc[kRows];
    for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = w.group_block(g, b);
      __m512i q[8];
      if (kType == 8) {
        for (int t = 0; t < 8; ++t) q[t] = _mm512_loadu_si512(block + 64 * t);
      } else {
        for (int j = 0; j < 4; ++j) {
          const __m512i raw = _mm512_loadu_si512(block + 64 * j);
          q[2 * j] = _mm512_and_si512(raw, low);
          q[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        }
      }
      const uint8_t* halves = block + (kType == 8 ? 512 : 256);
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves)));
      for (int m = 0; m < kRows; ++m) {
        const int64_t row = first + m, at = row * blocks + b;
        const int8_t* xp = x.planes.data() + row * kPlanes * K + b * 32;
        __m512i a[kPlanes];
        for (int p = 0; p < kPlanes; ++p)
          a[p] = kType == 8 ? _mm512_set1_epi32(x.corrections[at * 4 + p]) : _mm512_setzero_si512();
        for (int t = 0; t < 8; ++t)
          for (int p = 0; p < kPlanes; ++p) {
            int32_t four;
            std::memcpy(&four, xp + p * K + 4 * t, 4);
            a[p] = _mm512_dpbusd_epi32(a[p], q[t], _mm512_set1_epi32(four));
          }
        __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[0]), radix, _mm512_cvtepi32_ps(a[1]));
        dot = _mm512_fmadd_ps(dot, radix, _mm512_cvtepi32_ps(a[2]));
        acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(x.scale[at])), acc[m]);
        if (kType != 8) {
          const __m512 offsets = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves + 32)));
          acc[m] = _mm512_fmadd_ps(offsets, _mm512_set1_ps(x.sums[at]), acc[m]);
        }
      }
    }
    const int64_t n0 = g * kRowsPerGroup, valid = std::min<int64_t>(kRowsPerGroup, N - n0);
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
    for (int m = 0; m < kRows; ++m) _mm512_mask_storeu_ps(out + (first + m) * N + n0, keep, acc[m]);
  }
}

template <int kType>
void interleaved_rows(const ActivationPlanes& x, int64_t first, int64_t rows, const InterleavedMatrix& w, float* out,
                      int64_t g_begin, int64_t g_end) {
  switch (rows) {
    case 1: return interleaved_groups<kType, 1>(x, first, w, out, g_begin, g_end);
    case 2: return interleaved_groups<kType, 2>(x, first, w, out, g_begin, g_end);
    case 3: return interleaved_groups<kType, 3>(x, first, w, out, g_begin, g_end);
    case 4: return interleaved_groups<kType, 4>(x, first, w, out, g_begin, g_end);
    case 5: return interleaved_groups<kType, 5>(x, first, w, out, g_begin, g_end);
    case 6: return interleaved_groups<kType, 6>(x, first, w, out, g_begin, g_end);
    case 7: return interleaved_groups<kType, 7>(x, first, w, out, g_begin, g_end);
    default: return interleaved_groups<kType, 8>(x, first, w, out, g_begin, g_end);
  }
}

// out [M, N] = x [M, K] W^T, groups of output rows split over `threads`; `planes` is scratch.
template <class Threads>
void interleaved_gemv(const float* x, int64_t M, const InterleavedMatrix& w, ActivationPlanes& planes, float* out,
                      Threads& threads) {
  planes.quantize(x, M, w.K());
  threads.parallel_for(w.groups(), 1, [&](int64_t begin, int64_t end) {
    if (M <= kActivationGroup) {
      if (w.type() == 8) interleaved_rows<8>(planes, 0, M, w, out, begin, end);
      else interleaved_rows<3>(planes, 0, M, w, out, begin, end);
      return;
    }
    for (int64_t g = begin; g < end; ++g)   // a group's weights from memory once, then from cache
      for (int64_t first = 0; first < M; first += kActivationGroup) {
        const int64_t rows = std::min<int64_t>(kActivationGroup, M - first);
        if (w.type() == 8) interleaved_rows<8>(planes, first, rows, w, out, g, g + 1);
        else interleaved_rows<3>(planes, first, rows, w, out, g, g + 1);
      }
  });
}

#endif  // AVX-512 VNNI

}  // namespace
