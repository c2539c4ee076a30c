// GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) read directly by fp32 kernels,
// shared by the operator wrappers (native.cpp) and the planned decode step (decode.cpp).
//
// Over sub-blocks b of 32 weights (block_formats.h):
// out[m, n] = sum_b ( d[n,b] * sum_j x[m, 32b+j] * q[n,b,j]  +  offset[n,b] * sum_j x[m, 32b+j] )
#pragma once
#include "block_formats.h"
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; the portable conversion below is ~10
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

// Types whose weights have an offset times the block's sum of x (Q4_0's classic path: -8 d).
constexpr bool has_offset(int kType) {
  return kType == kQ4_0 || kType == kQ4_1 || kType == kQ5_1 || kType == kQ4_K || kType == kQ5_K;
}

// Q4_0, Q4_1 and Q8_0 have vector unpacking below; the other types decode a sub-block in scalar code.
constexpr bool is_classic(int kType) { return kType == kQ4_0 || kType == kQ4_1 || kType == kQ8_0; }

// Sub-block b (32 weights) of a row: its q values (less their zero) and scale / offset.
template <int kType>
inline void block_values(const uint8_t* row, int64_t b, float* q, float* d, float* offset) {
  if constexpr (!is_classic(kType)) {
    sub_block_values(kType, row, b, q, d, offset);
    return;
  }
  const uint8_t* block = row + b * block_format(kType).bytes;
  *d = half_to_float(block);
  if (kType == 8) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(block + 2);
    for (int j = 0; j < 32; ++j) q[j] = static_cast<float>(qs[j]);
    *offset = 0.f;
  } else {
    const uint8_t* qs = block + (kType == 2 ? 2 : 4);
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<float>(qs[j] & 0x0F);
      q[j + 16] = static_cast<float>(qs[j] >> 4);
    }
    // Q4_0: w = d (q - 8); Q4_1: w = d q + m.
    *offset = kType == 2 ? -8.f * *d : half_to_float(block + 2);
  }
}

constexpr int64_t kMaxRows = 16;  // activation rows handled per pass over the weights

#if defined(__AVX512F__)
// Sub-block b of a row as two vectors of 16 floats (elements 0..15 and 16..31), its scale
// and offset.
template <int kType>
inline void block_vectors(const uint8_t* row, int64_t b, __m512* lo, __m512* hi, float* d, float* offset) {
  if constexpr (!is_classic(kType)) {   // the weights themselves, exact: one fp32 dot as F.linear's
    alignas(64) float q[32];
    sub_block_values(kType, row, b, q, d, offset);
    const __m512 scale = _mm512_set1_ps(*d), add = _mm512_set1_ps(*offset);
    *lo = _mm512_fmadd_ps(scale, _mm512_load_ps(q), add);
    *hi = _mm512_fmadd_ps(scale, _mm512_load_ps(q + 16), add);
    *d = 1.f;
    *offset = 0.f;
    return;
  }
  const uint8_t* block = row + b * block_format(kType).bytes;
  *d = half_to_float(block);
  *offset = kType == 8 ? 0.f : (kType == 2 ? -8.f * *d : half_to_float(block + 2));
  if (kType == 8) {
    const __m128i* qs = reinterpret_cast<const __m128i*>(block + 2);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qs + 1)));
  } else {
    const __m512i bytes = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (kType == 2 ? 2 : 4))));
    *lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)));
    *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
  }
}
#endif

// Output rows n_begin..n_end for up to kMaxRows activation rows: each block is unpacked
// once and used for every activation row, so a batch costs little more than one row.
// Per-block products are scaled by d in vector registers and reduced once per row.
template <int kType, int kRows>
void rows_fixed(const float* x, const float* x_sums, const uint8_t* w, float* out, int64_t M, int64_t N,
                int64_t K, int64_t row_bytes, int64_t n_begin, int64_t n_end);

#if defined(__AVX512F__)
constexpr int kRowGroup = 8;   // activation rows whose accumulators fit in registers together

// Output row n for kRows (1..8) activation rows at x (row stride K): the row count a constant
// so the accumulators stay in registers; the offsets of all rows advance as one vector over
// the block sums, stored [blocks][kRowGroup].
template <int kType, int kRows>
void row_group(const float* x, const float* sums_by_block, const uint8_t* row, float* out, int64_t N,
               int64_t K, int64_t row_bytes, int64_t n) {
  const int64_t blocks = K / kBlock;
  __m512 acc[kRows];
  for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
  __m256 offsets = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 lo, hi;
    float d, offset;
    block_vectors<kType>(row, b, &lo, &hi, &d, &offset);
    const __m512 dv = _mm512_set1_ps(d);
    // The single row's arithmetic, exactly: a row's result does not depend on its batch.
    for (int m = 0; m < kRows; ++m) {
      const float* xb = x + m * K + b * kBlock;
      const __m512 dot = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), hi, _mm512_mul_ps(_mm512_loadu_ps(xb), lo));
      acc[m] = _mm512_fmadd_ps(dv, dot, acc[m]);
    }
    if (has_offset(kType)) {
      offsets = _mm256_fmadd_ps(_mm256_set1_ps(offset), _mm256_loadu_ps(sums_by_block + b * kRowGroup), offsets);
    }
  }
  float row_offsets[kRowGroup];
  _mm256_storeu_ps(row_offsets, offsets);
  for (int m = 0; m < kRows; ++m) out[m * N + n] = _mm512_reduce_add_ps(acc[m]) + row_offsets[m];
}

template <int kType>
void row_group_of(int64_t rows, const float* x, const float* sums, const uint8_t* row, float* out, int64_t N,
                  int64_t K, int64_t row_bytes, int64_t n) {
  switch (rows) {
    case 1: return row_group<kType, 1>(x, sums, row, out, N, K, row_bytes, n);
    case 2: return row_group<kType, 2>(x, sums, row, out, N, K, row_bytes, n);
    case 3: return row_group<kType, 3>(x, sums, row, out, N, K, row_bytes, n);
    case 4: return row_group<kType, 4>(x, sums, row, out, N, K, row_bytes, n);
    case 5: return row_group<kType, 5>(x, sums, row, out, N, K, row_bytes, n);
    case 6: return row_group<kType, 6>(x, sums, row, out, N, K, row_bytes, n);
    case 7: return row_group<kType, 7>(x, sums, row, out, N, K, row_bytes, n);
    default: return row_group<kType, 8>(x, sums, row, out, N, K, row_bytes, n);
  }
}

// Output rows n_begin..n_end for M (2..16) activation rows, in groups of up to 8: each
// weight row is read from memory once, and again from cache for the second group.
template <int kType>
void rows_many(const float* x, const float* x_sums, const uint8_t* w, float* out, int64_t M, int64_t N,
               int64_t K, int64_t row_bytes, int64_t n_begin, int64_t n_end) {
  const int64_t blocks = K / kBlock, groups = (M + kRowGroup - 1) / kRowGroup;
  thread_local std::vector<float> sums;   // [groups][blocks][kRowGroup]
  sums.assign(groups * blocks * kRowGroup, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < blocks; ++b)
      sums[((m / kRowGroup) * blocks + b) * kRowGroup + m % kRowGroup] = x_sums[m * blocks + b];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * kRowGroup;
      row_group_of<kType>(std::min<int64_t>(kRowGroup, M - first), x + first * K,
                          sums.data() + g * blocks * kRowGroup, row, out + first * N, N, K, row_bytes, n);
    }
  }
}
#endif

// Single-row decode is the hot case: a loop whose row count is a constant; a few rows (a
// batch of decodes, a short prompt chunk) get one too. N here is out's row stride.
template <int kType>
void rows(const float* x, const float* x_sums, const uint8_t* w, float* out, int64_t M, int64_t N,
          int64_t K, int64_t row_bytes, int64_t n_begin, int64_t n_end) {
  if (M == 1) return rows_fixed<kType, 1>(x, x_sums, w, out, 1, N, K, row_bytes, n_begin, n_end);
#if defined(__AVX512F__)
  rows_many<kType>(x, x_sums, w, out, M, N, K, row_bytes, n_begin, n_end);
#else
  rows_fixed<kType, 0>(x, x_sums, w, out, M, N, K, row_bytes, n_begin, n_end);
#endif
}

// kRows: the row count when known at compile time (1), else 0 and M is used.
template <int kType, int kRows>
void rows_fixed(const float* x, const float* x_sums, const uint8_t* w, float* out, int64_t M_, int64_t N,
                int64_t K, int64_t row_bytes, int64_t n_begin, int64_t n_end) {
  const int64_t M = kRows > 0 ? kRows : M_;
  const int64_t blocks = K / kBlock;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = w + n * row_bytes;
    float offsets[kMaxRows] = {0.f};
#if defined(__AVX512F__)
    __m512 acc[kMaxRows];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m512 lo, hi;
      float d, offset;
      block_vectors<kType>(row, b, &lo, &hi, &d, &offset);
      const __m512 dv = _mm512_set1_ps(d);
      for (int64_t m = 0; m < M; ++m) {
        const float* xb = x + m * K + b * kBlock;
        const __m512 dot = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), hi, _mm512_mul_ps(_mm512_loadu_ps(xb), lo));
        acc[m] = _mm512_fmadd_ps(dv, dot, acc[m]);
        offsets[m] += offset * x_sums[m * blocks + b];
      }
    }
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = _mm512_reduce_add_ps(acc[m]) + offsets[m];
#else
    float acc[kMaxRows] = {0.f};
    float q[kBlock];
    for (int64_t b = 0; b < blocks; ++b) {
      float d, offset;
      block_values<kType>(row, b, q, &d, &offset);
      for (int64_t m = 0; m < M; ++m) {
        const float* xb = x + m * K + b * kBlock;
        float dot = 0.f;
        for (int j = 0; j < kBlock; ++j) dot += xb[j] * q[j];
        acc[m] += d * dot;
        offsets[m] += offset * x_sums[m * blocks + b];
      }
    }
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = acc[m] + offsets[m];
#endif
  }
}

// Dequantize rows n_begin..n_end into fp32 [N, K].
template <int kType>
void dequantize_rows(const uint8_t* w, float* out, int64_t K, int64_t row_bytes, int64_t n_begin,
                     int64_t n_end) {
  const int64_t blocks = K / kBlock;
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t b = 0; b < blocks; ++b) {
      float q[kBlock], d, offset;
      block_values<kType>(w + n * row_bytes, b, q, &d, &offset);
      float* dst = out + n * K + b * kBlock;
#pragma omp simd
      for (int j = 0; j < kBlock; ++j) dst[j] = d * q[j] + offset;
    }
  }
}


// Runs fn(begin, end) over [0, n) on PyTorch's intra-op threads.
struct IntraOpThreads {
  template <class F>
  void parallel_for(int64_t n, int64_t grain, const F& fn) const { at::parallel_for(0, n, grain, fn); }
};

// Calls fn(std::integral_constant<int, type>) for a natively read GGML type.
template <class F>
void with_type(int64_t ggml_type, const F& fn) {
  switch (ggml_type) {
    case kQ4_0: return fn(std::integral_constant<int, kQ4_0>());
    case kQ4_1: return fn(std::integral_constant<int, kQ4_1>());
    case kQ5_0: return fn(std::integral_constant<int, kQ5_0>());
    case kQ5_1: return fn(std::integral_constant<int, kQ5_1>());
    case kQ8_0: return fn(std::integral_constant<int, kQ8_0>());
    case kQ4_K: return fn(std::integral_constant<int, kQ4_K>());
    case kQ5_K: return fn(std::integral_constant<int, kQ5_K>());
    case kQ6_K: return fn(std::integral_constant<int, kQ6_K>());
    default: TORCH_CHECK(false, "unsupported GGML type ", ggml_type);
  }
}

// out [M, ldo] (columns 0..N) = x [M, K] times the packed weight w [N, row_bytes_of(type, K)]
// (M <= kMaxRows), output rows split over `threads` (anything with parallel_for(n, grain,
// fn)). x_sums: scratch of M * K / 32 floats.
template <class Threads>
void gemv_into(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t ggml_type,
               float* x_sums, float* out, int64_t ldo, Threads& threads) {
  const int64_t row_bytes = row_bytes_of(ggml_type, K);
  // Per-block sums of x, shared by every output row (the offsets multiply them).
  for (int64_t i = 0; i < M * (K / kBlock); ++i) {
    float sum = 0.f;
    for (int j = 0; j < kBlock; ++j) sum += x[i * kBlock + j];
    x_sums[i] = sum;
  }
  with_type(ggml_type, [&](auto type) {
    threads.parallel_for(N, 16, [&](int64_t begin, int64_t end) {
      rows<decltype(type)::value>(x, x_sums, w, out, M, ldo, K, row_bytes, begin, end);
    });
  });
}

// RMSNorm of M rows of H floats: one pass to sum squares, one to scale.
inline void rms_norm_rows(const float* x, const float* weight, float* out, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * H;
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t h = 0; h < H; ++h) squares += row[h] * row[h];
    const float scale = 1.f / std::sqrt(squares / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) out[m * H + h] = weight[h] * (row[h] * scale);
  }
}

// Rotary embedding, half-split layout, in place on `heads` vectors of D floats at v
// (consecutive), with this token's cos/sin [D].
inline void rope_heads(float* v, int64_t heads, int64_t D, const float* c, const float* s) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h, v += D) {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * c[i] - b * s[i];
      v[i + half] = b * c[i + half] + a * s[i + half];
    }
  }
}

}  // namespace
