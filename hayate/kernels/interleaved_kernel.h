// The planned decode step's matrix-vector kernel (AVX-512 VNNI) over the rearranged weights
// of interleaved.h.
//
// Arithmetic, exact up to fp32 rounding: each block of 32 inputs of an activation row is
// written as s * X with X a 23-bit integer (|X| <= 127 * 2^16), split into three signed bytes
// X = X0 2^16 + X1 2^8 + X2. The integer dot products (q - zero) . Xp are exact (VPDPBUSD on
// the stored unsigned q, the zero taken off through each plane's sum), combined in fp32,
// scaled by the block's scale * s (per 16 inputs for Q6_K), plus offset * sum(x). The
// K-quants' scales d * sc and offsets -dmin * m are formed here, exactly, per block for the
// 16 rows at once. A row's result does not depend on its batch.
#pragma once
#include "interleaved.h"

namespace {

#if HAYATE_INTERLEAVED

constexpr int64_t kPlanes = 3;
constexpr int kActivationGroup = 8;   // activation rows whose accumulators share registers
// How far ahead of the kernel each thread asks for its weights, in bytes. The hardware's own
// prefetcher alone leaves the stream well under the memory's speed whenever the memory is
// shared (this VM's slow phases): asking 4 KB ahead, same binary, turns taking turns
// (2026-12-03): Qwen2.5-Coder-1.5B Q4_K_M decode 13.9 -> 19.9 tok/s, Gemma 3 270M 55.5 -> 64.2,
// a Mixtral-shaped file's eager experts 33 -> 22 ms a token, the default model 142 -> 150;
// bench/kernels.py's Q4_K stream 12.6 -> 25 GB/s. 1-2 KB gained less, 6-12 KB less again.
constexpr int64_t kPrefetchBytes = 4096;
// A unit's bytes per block in whole cache lines: the share each block prefetches.
template <int kType>
constexpr int64_t kPrefetchStride = (unit_bytes_of(kType) / unit_blocks_of(kType) + 63) / 64 * 64;

// M activation rows as three planes of signed bytes, per-block scales and sums, and each
// plane's sum over each half (16 inputs) of a block (the zeros of the weights multiply them).
struct ActivationPlanes {
  int64_t M = 0, K = 0;
  std::vector<int8_t> planes;                     // [M][3][K]
  std::vector<float> scale, sums;                 // [M][K / 32]
  std::vector<int32_t> half_sums;                 // [M][K / 32][2][4]

  void quantize(const float* x, int64_t rows, int64_t K_) {
    M = rows;
    K = K_;
    const int64_t blocks = K / 32;
    planes.resize(M * kPlanes * K);
    scale.resize(M * blocks);
    sums.resize(M * blocks);
    half_sums.resize(M * blocks * 8);
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
        half_sums[(m * blocks + b) * 8 + half * 4 + p] = _mm512_reduce_add_epi32(digits[p]);
      }
    }
  }
};

// The exact dot of parts kFirst..kLast-1 (4 inputs each) of q - zero with a row's planes xp
// (row stride K), as one fp32 vector over the 16 weight rows. sums: the planes' sums over
// those inputs (the zero's share).
template <int kFirst, int kLast, int kZero>
inline __m512 plane_dot(const __m512i* q, const int8_t* xp, int64_t K, const int32_t* sums) {
  __m512i a[kPlanes];
  for (int p = 0; p < kPlanes; ++p) a[p] = kZero ? _mm512_set1_epi32(-kZero * sums[p]) : _mm512_setzero_si512();
  for (int t = kFirst; t < kLast; ++t)
    for (int p = 0; p < kPlanes; ++p) {
      int32_t four;
      std::memcpy(&four, xp + p * K + 4 * t, 4);
      a[p] = _mm512_dpbusd_epi32(a[p], q[t], _mm512_set1_epi32(four));
    }
  const __m512 radix = _mm512_set1_ps(256.f);
  const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[0]), radix, _mm512_cvtepi32_ps(a[1]));
  return _mm512_fmadd_ps(dot, radix, _mm512_cvtepi32_ps(a[2]));
}

// Block jb's scales (per half of 16 inputs) and offsets for the 16 rows of a unit's header;
// d and neg_dmin: the unit's fp16 d and -dmin as fp32 (K-quants).
template <int kType>
inline void block_scales(const uint8_t* header, int64_t jb, __m512 d, __m512 neg_dmin, __m512* lo, __m512* hi,
                         __m512* offset) {
  const auto bytes = [&](int64_t at) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(header + at)); };
  if constexpr (kType == kQ6_K) {
    *lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes(32 + 32 * jb))));
    *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes(48 + 32 * jb))));
  } else if constexpr (kType == kQ4_K || kType == kQ5_K) {
    *lo = *hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(64 + 16 * jb))));
    *offset = _mm512_mul_ps(neg_dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes(192 + 16 * jb))));
  } else {
    *lo = *hi = d;
    if (has_offset(kType)) *offset = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header + 32)));
  }
}

// Groups g_begin..g_end of the output for activation rows first..first+kRows-1, into out
// [rows, ldo] (this matrix's columns 0..N).
template <int kType, int kRows>
void interleaved_groups(const ActivationPlanes& x, int64_t first, const InterleavedMatrix& w, float* out,
                        int64_t ldo, int64_t g_begin, int64_t g_end) {
  constexpr int64_t kUnitBlocks = unit_blocks_of(kType), kQuant = quant_bytes_of(kType);
  constexpr int kZero = interleaved_zero(kType);
  const int64_t K = x.K, blocks = x.K / 32, N = w.N();
  for (int64_t g = g_begin; g < g_end; ++g) {
    __m512 acc[kRows];
    for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t u = 0; u < w.units(); ++u) {
      const uint8_t* unit = w.unit(g, u);
      const uint8_t* header = unit + kUnitBlocks * kQuant;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header)));
      __m512 neg_dmin = _mm512_setzero_ps();
      if (kType == kQ4_K || kType == kQ5_K)
        neg_dmin = _mm512_sub_ps(neg_dmin, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(header + 32))));
      for (int64_t jb = 0; jb < kUnitBlocks; ++jb) {
        // This block's share of the unit kPrefetchBytes ahead, asked for now (see kPrefetchBytes).
        const uint8_t* ahead = unit + kPrefetchBytes + jb * kPrefetchStride<kType>;
        for (int64_t at = 0; at < kPrefetchStride<kType>; at += 64)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + at), _MM_HINT_T0);
        __m512i q[8];
        load_q<kType>(unit + jb * kQuant, q);
        __m512 scale_lo, scale_hi, offset = _mm512_setzero_ps();
        block_scales<kType>(header, jb, d, neg_dmin, &scale_lo, &scale_hi, &offset);
        const int64_t b = u * kUnitBlocks + jb;
        for (int m = 0; m < kRows; ++m) {
          const int64_t row = first + m, at = row * blocks + b;
          const int8_t* xp = x.planes.data() + row * kPlanes * K + b * 32;
          const int32_t* halves = x.half_sums.data() + at * 8;
          const __m512 s = _mm512_set1_ps(x.scale[at]);
          if constexpr (kType == kQ6_K) {   // a scale per 16 inputs
            acc[m] = _mm512_fmadd_ps(plane_dot<0, 4, kZero>(q, xp, K, halves), _mm512_mul_ps(scale_lo, s), acc[m]);
            acc[m] = _mm512_fmadd_ps(plane_dot<4, 8, kZero>(q, xp, K, halves + 4), _mm512_mul_ps(scale_hi, s), acc[m]);
          } else {
            int32_t sums[kPlanes];
            for (int p = 0; p < kPlanes; ++p) sums[p] = halves[p] + halves[4 + p];
            acc[m] = _mm512_fmadd_ps(plane_dot<0, 8, kZero>(q, xp, K, sums), _mm512_mul_ps(scale_lo, s), acc[m]);
          }
          if (has_offset(kType)) acc[m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(x.sums[at]), acc[m]);
        }
      }
    }
    const int64_t n0 = g * kRowsPerGroup, valid = std::min<int64_t>(kRowsPerGroup, N - n0);
    const __mmask16 keep = static_cast<__mmask16>((1u << valid) - 1);
    for (int m = 0; m < kRows; ++m) _mm512_mask_storeu_ps(out + (first + m) * ldo + n0, keep, acc[m]);
  }
}

template <int kType>
void interleaved_rows(const ActivationPlanes& x, int64_t first, int64_t rows, const InterleavedMatrix& w, float* out,
                      int64_t ldo, int64_t g_begin, int64_t g_end) {
  switch (rows) {
    case 1: return interleaved_groups<kType, 1>(x, first, w, out, ldo, g_begin, g_end);
    case 2: return interleaved_groups<kType, 2>(x, first, w, out, ldo, g_begin, g_end);
    case 3: return interleaved_groups<kType, 3>(x, first, w, out, ldo, g_begin, g_end);
    case 4: return interleaved_groups<kType, 4>(x, first, w, out, ldo, g_begin, g_end);
    case 5: return interleaved_groups<kType, 5>(x, first, w, out, ldo, g_begin, g_end);
    case 6: return interleaved_groups<kType, 6>(x, first, w, out, ldo, g_begin, g_end);
    case 7: return interleaved_groups<kType, 7>(x, first, w, out, ldo, g_begin, g_end);
    default: return interleaved_groups<kType, 8>(x, first, w, out, ldo, g_begin, g_end);
  }
}

// Groups g_begin..g_end of one matrix for all M rows of x.
inline void interleaved_range(const ActivationPlanes& x, int64_t M, const InterleavedMatrix& w, float* out, int64_t ldo,
                              int64_t g_begin, int64_t g_end) {
  with_type(w.type(), [&](auto type) {
    constexpr int kType = decltype(type)::value;
    if (M <= kActivationGroup) return interleaved_rows<kType>(x, 0, M, w, out, ldo, g_begin, g_end);
    for (int64_t g = g_begin; g < g_end; ++g)   // a group's weights from memory once, then from cache
      for (int64_t first = 0; first < M; first += kActivationGroup)
        interleaved_rows<kType>(x, first, std::min<int64_t>(kActivationGroup, M - first), w, out, ldo, g, g + 1);
  });
}

// out [M, sum of N] = x [M, K] times `count` matrices side by side (q, k and v of different
// types: one pass over the input, one split of all their groups over `threads`); `planes`
// is scratch.
template <class Threads>
void interleaved_gemv(const float* x, int64_t M, const InterleavedMatrix* parts, size_t count, ActivationPlanes& planes,
                      float* out, Threads& threads) {
  int64_t groups = 0, ldo = 0;
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(parts[i].K() == parts[0].K(), "matrices side by side must share their input");
    groups += parts[i].groups();
    ldo += parts[i].N();
  }
  planes.quantize(x, M, parts[0].K());
  threads.parallel_for(groups, 1, [&](int64_t begin, int64_t end) {
    int64_t group0 = 0, column = 0;
    for (size_t i = 0; i < count; ++i) {
      const InterleavedMatrix& w = parts[i];
      const int64_t lo = std::max(begin, group0), hi = std::min(end, group0 + w.groups());
      if (lo < hi) interleaved_range(planes, M, w, out + column, ldo, lo - group0, hi - group0);
      group0 += w.groups();
      column += w.N();
    }
  });
}

// Several inputs through several matrices in one parallel section instead of one per matrix (a
// mixture's touched experts: each expert's gate and up over its own rows, then each down).
// Part p multiplies input p.input's rows into p.out (row stride p.ldo); every part's groups are
// computed as interleaved_gemv computes them.
struct GemvInput {
  const float* x;
  int64_t M, K;
};
struct GemvPart {
  size_t input;
  const InterleavedMatrix* w;
  float* out;
  int64_t ldo;
};

template <class Threads>
void interleaved_gemv_parts(const std::vector<GemvInput>& inputs, const std::vector<GemvPart>& parts,
                            std::vector<ActivationPlanes>& planes, Threads& threads) {
  if (planes.size() < inputs.size()) planes.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) planes[i].quantize(inputs[i].x, inputs[i].M, inputs[i].K);
  int64_t groups = 0;
  for (const GemvPart& part : parts) {
    TORCH_CHECK(part.w->K() == inputs[part.input].K, "a matrix does not match its input");
    groups += part.w->groups();
  }
  threads.parallel_for(groups, 1, [&](int64_t begin, int64_t end) {
    int64_t group0 = 0;
    for (const GemvPart& part : parts) {
      const int64_t lo = std::max(begin, group0), hi = std::min(end, group0 + part.w->groups());
      if (lo < hi) interleaved_range(planes[part.input], inputs[part.input].M, *part.w, part.out, part.ldo,
                                     lo - group0, hi - group0);
      group0 += part.w->groups();
    }
  });
}

#endif  // AVX-512 VNNI

}  // namespace
