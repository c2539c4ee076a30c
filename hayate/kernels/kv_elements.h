// The KV cache's element types (float, c10::Half, c10::BFloat16): storing a row of fp32
// keys or values, and reading cache elements back as fp32 for attention, whose arithmetic
// stays fp32 whatever the cache holds. Half-precision caches halve the bytes attention reads.
#pragma once
#include <torch/extension.h>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// n fp32 values into the cache, rounded to nearest-even: c10's constructors round as torch's
// .to(float16 / bfloat16) does, so the eager and planned steps store the same bits.
template <typename T>
inline void store_row(const float* from, int64_t n, T* to) {
  for (int64_t i = 0; i < n; ++i) to[i] = T(from[i]);
}

template <typename T>
inline float to_float(T value) {
  return static_cast<float>(value);
}

#if defined(__AVX512F__)
// 16 consecutive cache elements widened to fp32.
template <typename T>
inline __m512 load16(const T* p);

template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}

template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is fp32's upper half: zero-extend to 32 bits, then shift into place.
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// A cache row of `elements` values towards the core (Hint: _MM_HINT_T1, into L2), one 64-byte
// line at a time.
template <int Hint = _MM_HINT_T1, typename T>
inline void prefetch_row(const T* row, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t i = 0; i < elements * static_cast<int64_t>(sizeof(T)); i += 64)
    _mm_prefetch(bytes + i, static_cast<_mm_hint>(Hint));
}
#endif

}  // namespace
