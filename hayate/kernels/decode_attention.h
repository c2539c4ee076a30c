// Attention of a decode step's new queries over the paged KV cache, split-K ("flash
// decoding"): each (chunk of 32 keys, rows of one sequence) is one work item, so one sequence
// keeps every thread busy once its context passes a few chunks; an item prefetches its cache
// rows whole (all kv heads of a position are contiguous), and the rows of a prompt chunk read
// them from L1 one after the other; the query heads that share a kv head read its keys and
// values together; the chunks' partial softmaxes are merged at the end.
// The cache holds float, c10::Half or c10::BFloat16 (the template parameter T); scores,
// softmax and the weighted values are fp32 whatever it holds (kv_elements.h widens).
#pragma once
#include "ggml_blocks.h"
#include "kv_elements.h"
#include "worker_pool.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace {

constexpr int64_t kKeysPerChunk = 32;
constexpr int64_t kMaxGroup = 16;  // query heads per kv head
constexpr int64_t kMaxHeadDim = 256;

#if defined(__AVX512F__)
// The first min(count, 16) of a vector's 16 lanes.
inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
}
#endif

// e^x in place on n floats (x clamped to [-87.3, 88.7], where float's e^x lives): Cephes'
// expf polynomial, within 2 ulp, 16 lanes at a time.
inline void exp_in_place(float* x, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    __m512 v = _mm512_max_ps(_mm512_maskz_loadu_ps(lanes, x + i), _mm512_set1_ps(-87.3f));
    v = _mm512_min_ps(v, _mm512_set1_ps(88.7f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), v);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    _mm512_mask_storeu_ps(x + i, lanes, _mm512_scalef_ps(p, k));
  }
#else
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
#endif
}

// x - max(x), exponentiated in place; returns (max, sum of the exponentials): one chunk's
// partial softmax, 16 lanes at a time (a scalar chain of 32 adds waits ~4 cycles an add).
inline std::pair<float, float> exp_shifted(float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 highest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    highest = _mm512_mask_max_ps(highest, lanes, highest, _mm512_maskz_loadu_ps(lanes, x + i));
  }
  const float top = _mm512_reduce_max_ps(highest);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    _mm512_mask_storeu_ps(x + i, lanes, _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + i), _mm512_set1_ps(top)));
  }
  exp_in_place(x, n);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(lanes, x + i));
  }
  return {top, _mm512_reduce_add_ps(total)};
#else
  const float top = *std::max_element(x, x + n);
  for (int64_t i = 0; i < n; ++i) x[i] -= top;
  exp_in_place(x, n);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) total += x[i];
  return {top, total};
#endif
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += a[i] * to_float(b[i]);
  return total;
}

// Scores of one chunk's n keys (cache rows `rows`, kv-head-strided) for the G query heads
// at q (G x D, consecutive), and the exponentials' weighted sum of its values: the portable
// loops, and below them AVX-512 ones with the G heads' accumulators in registers.
template <typename T>
inline void chunk_scores(const float* q, int64_t group, const T* k_cache, const int64_t* rows, int64_t n,
                         int64_t D, float scale, float (*scores)[kKeysPerChunk]) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < group; ++g) scores[g][t] = dot(q + g * D, k_cache + rows[t] * D, D) * scale;
}

template <typename T>
inline void chunk_values(const T* v_cache, const int64_t* rows, int64_t n, int64_t D, int64_t group,
                         float (*weights)[kKeysPerChunk], float* acc) {
  std::fill(acc, acc + group * D, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const T* v = v_cache + rows[t] * D;
    for (int64_t g = 0; g < group; ++g) {
      const float w = weights[g][t];
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) acc[g * D + i] += w * to_float(v[i]);
    }
  }
}

#if defined(__AVX512F__)
// Sixteen vectors' lane sums as one vector (out[t] = sum of a[t]): a tree of lane shuffles
// and adds, ~3 instructions a vector where reducing each alone takes ~10.
inline __m512 sums_of_16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)   // lanes 0-7: a[2j]'s halves added; lanes 8-15: a[2j+1]'s
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44), _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
  for (int k = 0; k < 4; ++k)   // quarter q: four partial sums of a[4k + q]
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88), _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  for (int m = 0; m < 2; ++m)   // quarter q: two partials of a[8m + q], then two of a[8m + 4 + q]
    d[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0x44), _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0xEE));
  // lane 4q + j: the sum of a[4j + q]
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

// Scores of up to 16 keys at a time: one head's products with the 16 keys summed lane-wise,
// then reduced together. The 16 accumulators stay in registers (a short last group repeats
// its last key, masked out at the store), and each step of the dot products issues 16
// independent FMAs, so none waits on the one before it.
template <int G, typename T>
void chunk_scores_avx(const float* q, const T* k_cache, const T* v_cache, const int64_t* rows, int64_t n,
                      int64_t D, float scale, float (*scores)[kKeysPerChunk], int64_t prefetch) {
  for (int64_t t = 0; t < std::min<int64_t>(n, 16); ++t) prefetch_row(k_cache + rows[t] * D, prefetch);
  for (int64_t first = 0; first < n; first += 16) {
    const int64_t keys = std::min<int64_t>(16, n - first);
    for (int64_t t = 0; t < keys; ++t) {   // the next 16 keys, and these keys' values (read next)
      if (first + 16 + t < n) prefetch_row(k_cache + rows[first + 16 + t] * D, prefetch);
      prefetch_row(v_cache + rows[first + t] * D, prefetch);
    }
    const T* k[16];
    for (int t = 0; t < 16; ++t) k[t] = k_cache + rows[first + std::min<int64_t>(t, keys - 1)] * D;
    const __mmask16 lanes = first_lanes(keys);
    for (int g = 0; g < G; ++g) {
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        const __m512 qi = _mm512_loadu_ps(q + g * D + i);
        for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qi, load16(k[t] + i), acc[t]);
      }
      _mm512_mask_storeu_ps(scores[g] + first, lanes, _mm512_mul_ps(sums_of_16(acc), _mm512_set1_ps(scale)));
    }
  }
}

// S vectors (16 * S floats) of the value rows from `first`, for the G heads.
template <int G, int S, typename T>
void value_slab_avx(const T* v_cache, const int64_t* rows, int64_t n, int64_t D, int64_t first,
                    float (*weights)[kKeysPerChunk], float* acc_out) {
  __m512 acc[G][S];
  for (int g = 0; g < G; ++g)
    for (int s = 0; s < S; ++s) acc[g][s] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* v = v_cache + rows[t] * D + first;
    __m512 value[S];
    for (int s = 0; s < S; ++s) value[s] = load16(v + 16 * s);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g][t]);
      for (int s = 0; s < S; ++s) acc[g][s] = _mm512_fmadd_ps(w, value[s], acc[g][s]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int s = 0; s < S; ++s) _mm512_storeu_ps(acc_out + g * D + first + 16 * s, acc[g][s]);
}

template <int G, typename T>
void chunk_values_avx(const T* v_cache, const int64_t* rows, int64_t n, int64_t D,
                      float (*weights)[kKeysPerChunk], float* acc) {
  int64_t first = 0;
  for (; first + 64 <= D; first += 64) value_slab_avx<G, 4, T>(v_cache, rows, n, D, first, weights, acc);
  for (; first < D; first += 16) value_slab_avx<G, 1, T>(v_cache, rows, n, D, first, weights, acc);
}

template <int G, typename T>
bool chunk_avx(const float* q, const T* k_cache, const T* v_cache, const int64_t* rows, int64_t n,
               int64_t D, float scale, float (*scores)[kKeysPerChunk], float* acc, bool values, int64_t prefetch) {
  if (values) chunk_values_avx<G>(v_cache, rows, n, D, scores, acc);
  else chunk_scores_avx<G>(q, k_cache, v_cache, rows, n, D, scale, scores, prefetch);
  return true;
}
#endif

// The scores (values = false) or the weighted values (values = true) of one chunk;
// `prefetch`: elements of each key's and value's cache row to prefetch ahead (0: none).
template <typename T>
inline void chunk_step(const float* q, int64_t group, const T* k_cache, const T* v_cache,
                       const int64_t* rows, int64_t n, int64_t D, float scale, float (*scores)[kKeysPerChunk],
                       float* acc, bool values, int64_t prefetch) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    switch (group) {
      case 1: chunk_avx<1, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      case 2: chunk_avx<2, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      case 3: chunk_avx<3, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      case 4: chunk_avx<4, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      case 5: chunk_avx<5, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      case 6: chunk_avx<6, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      case 8: chunk_avx<8, T>(q, k_cache, v_cache, rows, n, D, scale, scores, acc, values, prefetch); return;
      default: break;
    }
  }
#endif
  if (values) chunk_values(v_cache, rows, n, D, group, scores, acc);
  else chunk_scores(q, group, k_cache, rows, n, D, scale, scores);
}

class DecodeAttention {
 public:
  DecodeAttention(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size)
      : heads_(heads), kv_heads_(kv_heads), group_(heads / kv_heads), head_dim_(head_dim), block_size_(block_size) {
    TORCH_CHECK(group_ <= kMaxGroup && head_dim <= kMaxHeadDim, "at most ", kMaxGroup,
                " query heads per kv head and head_dim ", kMaxHeadDim);
  }

  // q: the B new tokens' query heads, row b at q + b * q_stride; keys 0..pos[b] of sequence b
  // in the cache rows its block table (tables + b * table_width) names, or only its last
  // `window` of them (a sliding-window layer; 0: all). Scores are scaled by `scale`.
  // out [B, heads * D].
  template <typename T>
  void run(const float* q, int64_t q_stride, int64_t B, const int64_t* pos, const int32_t* tables,
           int64_t table_width, const T* k_cache, const T* v_cache, float* out, WorkerPool& threads,
           float scale, int64_t window) {
    const int64_t chunks = (*std::max_element(pos, pos + B) + 1 + kKeysPerChunk - 1) / kKeysPerChunk;
    scale_ = scale;
    first_keys_.resize(B);
    for (int64_t b = 0; b < B; ++b) first_keys_[b] = window > 0 ? std::max<int64_t>(0, pos[b] + 1 - window) : 0;
    first_chunk_ = *std::min_element(first_keys_.begin(), first_keys_.end()) / kKeysPerChunk;
    maxima_.resize(B * heads_ * chunks);
    sums_.resize(B * heads_ * chunks);
    partial_.resize(B * heads_ * chunks * head_dim_);
    plan_items(B, pos, tables, table_width, chunks, threads.size());
    // An item is one chunk of keys for a few rows of one sequence: per kv head, its keys and
    // values (16 KB for 32 keys of a 64-wide head) stay in L1 while every row reads them.
    threads.parallel_for(static_cast<int64_t>(items_.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const Item& item = items_[i];
        for (int64_t kv = 0; kv < kv_heads_; ++kv)
          for (int64_t b = item.first; b < item.first + item.rows; ++b)
            chunk_of(q + b * q_stride, b * heads_ + kv * group_, chunks, item.chunk, first_keys_[b], pos[b] + 1,
                     tables + b * table_width, k_cache, v_cache, kv, kv == 0 && b == item.first);
      }
    });
    for (int64_t row = 0; row < B * heads_; ++row) merge(row, chunks, out + row * head_dim_);
  }

 private:
  struct Item {
    int64_t first, rows, chunk;   // rows first.. of one sequence, over keys [chunk * C, ..)
  };

  // Rows of one sequence (a prompt chunk's: consecutive positions, one block table) share
  // their keys; each such run is cut into parts small enough to give every thread ~4 items.
  // Chunks before every row's window (first_chunk_) get none.
  void plan_items(int64_t B, const int64_t* pos, const int32_t* tables, int64_t width, int64_t chunks,
                  int64_t threads) {
    items_.clear();
    for (int64_t first = 0, last = 0; first < B; first = last) {
      for (last = first + 1; last < B && pos[last] == pos[last - 1] + 1 &&
                             std::equal(tables + last * width, tables + (last + 1) * width, tables + first * width);
           ++last) {
      }
      const int64_t run = last - first, part = std::clamp<int64_t>(run * (chunks - first_chunk_) / (4 * threads), 1, run);
      for (int64_t chunk = first_chunk_; chunk < chunks; ++chunk)
        for (int64_t b = first; b < last; b += part) items_.push_back({b, std::min(part, last - b), chunk});
    }
  }

  // Scores, their exponentials and the weighted values of keys [chunk * C, ..) from first_key
  // on, before `keys`, for the `group_` query heads of kv head `kv`; `first` is the first
  // head's row in [B * heads]. `fetch`: prefetch the chunk's cache rows whole (every kv
  // head), once per item.
  template <typename T>
  void chunk_of(const float* q, int64_t first, int64_t chunks, int64_t chunk, int64_t first_key, int64_t keys,
                const int32_t* table, const T* k_cache, const T* v_cache, int64_t kv, bool fetch) {
    const int64_t D = head_dim_, begin = std::max(first_key, chunk * kKeysPerChunk);
    const int64_t end = std::min(keys, chunk * kKeysPerChunk + kKeysPerChunk);
    if (begin >= end) {
      for (int64_t g = 0; g < group_; ++g) {
        maxima_[(first + g) * chunks + chunk] = -std::numeric_limits<float>::infinity();
        sums_[(first + g) * chunks + chunk] = 0.f;
      }
      return;
    }
    int64_t rows[kKeysPerChunk];
    const int64_t n = slots(table, begin, end, rows);
    for (int64_t t = 0; t < n; ++t) rows[t] = rows[t] * kv_heads_ + kv;
    if (fetch) prefetch_chunk(table, end, std::min(keys, end + kKeysPerChunk), k_cache, v_cache);
    const float scale = scale_;
    const float* q0 = q + (first % heads_) * D;
    float scores[kMaxGroup][kKeysPerChunk];
    float* acc = partial_.data() + first * chunks * D;   // the group's rows: [group][chunks][D]
    chunk_step(q0, group_, k_cache, v_cache, rows, n, D, scale, scores, nullptr, false, fetch ? kv_heads_ * D : 0);
    for (int64_t g = 0; g < group_; ++g) {
      const auto [highest, total] = exp_shifted(scores[g], n);
      maxima_[(first + g) * chunks + chunk] = highest;
      sums_[(first + g) * chunks + chunk] = total;
    }
    float values[kMaxGroup * kMaxHeadDim];
    chunk_step(q0, group_, k_cache, v_cache, rows, n, D, scale, scores, values, true, 0);
    for (int64_t g = 0; g < group_; ++g)
      std::copy(values + g * D, values + (g + 1) * D, acc + (g * chunks + chunk) * D);
  }

  // The cache slots (rows of [rows, kv_heads, head_dim]) of keys [begin, end), at most a chunk.
  int64_t slots(const int32_t* table, int64_t begin, int64_t end, int64_t* out) const {
    for (int64_t t = begin, block = begin / block_size_, offset = begin % block_size_; t < end; ++t) {
      out[t - begin] = static_cast<int64_t>(table[block]) * block_size_ + offset;
      if (++offset == block_size_) offset = 0, ++block;
    }
    return end - begin;
  }

  // The next chunk's cache rows, whole, towards L2 while this one is computed: waiting for
  // them only once they are needed leaves too few reads in flight (measured: 12% at 1500 keys).
  template <typename T>
  void prefetch_chunk(const int32_t* table, int64_t begin, int64_t end, const T* k_cache, const T* v_cache) const {
#if defined(__AVX512F__)
    int64_t slot[kKeysPerChunk];
    const int64_t width = kv_heads_ * head_dim_;
    for (int64_t t = 0, n = slots(table, begin, end, slot); t < n; ++t) {
      prefetch_row(k_cache + slot[t] * width, width);
      prefetch_row(v_cache + slot[t] * width, width);
    }
#endif
  }

  // One query head: the chunks' partial softmaxes rescaled to their common maximum.
  void merge(int64_t row, int64_t chunks, float* out) const {
    const float* m = maxima_.data() + row * chunks;
    const float highest = *std::max_element(m + first_chunk_, m + chunks);
    float total = 0.f;
    std::fill(out, out + head_dim_, 0.f);
    for (int64_t c = first_chunk_; c < chunks; ++c) {
      if (sums_[row * chunks + c] == 0.f) continue;
      const float factor = std::exp(m[c] - highest);
      total += sums_[row * chunks + c] * factor;
      const float* acc = partial_.data() + (row * chunks + c) * head_dim_;
#pragma omp simd
      for (int64_t i = 0; i < head_dim_; ++i) out[i] += factor * acc[i];
    }
    const float inverse = 1.f / total;
    for (int64_t i = 0; i < head_dim_; ++i) out[i] *= inverse;
  }

  int64_t heads_, kv_heads_, group_, head_dim_, block_size_;
  float scale_ = 1.f;                  // this run's score scale
  std::vector<int64_t> first_keys_;    // this run's first key per row (its window's)
  int64_t first_chunk_ = 0;            // the first chunk any row reads
  std::vector<float> maxima_, sums_, partial_;
  std::vector<Item> items_;
};

}  // namespace
