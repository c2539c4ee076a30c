// The planned decode step's weight layout (AVX-512 VNNI; its kernel: interleaved_kernel.h).
//
// A GGUF matrix [N, K] is rearranged, bit for bit, into groups of 16 output rows. A group is
// a run of units: one file block of every row (32 inputs; 256 for the K-quants). For each 32
// inputs, the 16 rows' q values sit so that one 64-byte part holds four consecutive values of
// every row (part t, byte 4r+k: row r's value 4t+k), as stored unsigned bytes:
//   4-bit q: 4 x 64 bytes; byte 4r+k of part j holds q[r, 8j+k] (low nibble) and
//            q[r, 8j+4+k] (high nibble);
//   5-bit q: those, then 64 bytes: bit t of byte 4r+k is bit 4 of q[r, 4t+k];
//   6-bit q: those nibbles, then 2 x 64 bytes: bits 2(t%4)..+1 of byte 4r+k of the
//            (t/4)th hold bits 4..5 of q[r, 4t+k];
//   Q8_0:    8 x 64 bytes of q + 128.
// Then the unit's header (fp16 and byte arrays of 16, one lane per row):
//   Q4_0/Q4_1/Q5_1: d[16], m[16] (Q4_0: m = -8 d, exact); Q5_0, Q8_0: d[16];
//   Q4_K/Q5_K: d[16], dmin[16], scale[8][16], min[8][16] (6-bit values unpacked to bytes);
//   Q6_K: d[16], scale[16][16] (int8, one per 16 inputs).
// Bytes per 16 rows x 256 inputs against the file's: Q4_0 2560 / 2304, Q4_1 2560, Q5_0 2816,
// Q5_1 3072, Q8_0 4352 (as the file), Q4_K 2368 / 2304, Q5_K 2880 / 2816, Q6_K 3360 (as the
// file). The last group is padded to 16 rows; all in 2 MB pages where the OS grants them (the
// weights stream through the TLB every step: 4 KB pages cost ~10% of the step).
#pragma once
#include "interleaved_fill.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
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

#if HAYATE_INTERLEAVED

// The 8 parts of 64 q values (stored unsigned bytes) of one block of 32 inputs.
template <int kType>
inline void load_q(const uint8_t* quant, __m512i* q) {
  if constexpr (kType == kQ8_0) {
    for (int t = 0; t < 8; ++t) q[t] = _mm512_loadu_si512(quant + 64 * t);
    return;
  }
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m512i raw = _mm512_loadu_si512(quant + 64 * j);
    q[2 * j] = _mm512_and_si512(raw, low);
    q[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
  }
  constexpr int kBits = q_bits_of(kType);
  if constexpr (kBits == 5) {   // bit t of each byte to bit 4 of part t: q | (shifted & 0x10)
    const __m512i plane = _mm512_loadu_si512(quant + 256), bit = _mm512_set1_epi8(0x10);
    q[0] = _mm512_ternarylogic_epi32(q[0], _mm512_slli_epi16(plane, 4), bit, 0xF8);
    q[1] = _mm512_ternarylogic_epi32(q[1], _mm512_slli_epi16(plane, 3), bit, 0xF8);
    q[2] = _mm512_ternarylogic_epi32(q[2], _mm512_slli_epi16(plane, 2), bit, 0xF8);
    q[3] = _mm512_ternarylogic_epi32(q[3], _mm512_slli_epi16(plane, 1), bit, 0xF8);
    q[4] = _mm512_ternarylogic_epi32(q[4], plane, bit, 0xF8);
    q[5] = _mm512_ternarylogic_epi32(q[5], _mm512_srli_epi16(plane, 1), bit, 0xF8);
    q[6] = _mm512_ternarylogic_epi32(q[6], _mm512_srli_epi16(plane, 2), bit, 0xF8);
    q[7] = _mm512_ternarylogic_epi32(q[7], _mm512_srli_epi16(plane, 3), bit, 0xF8);
  } else if constexpr (kBits == 6) {   // bits 2(t%4)..+1 to bits 4..5 of part t
    const __m512i bits = _mm512_set1_epi8(0x30);
    for (int p = 0; p < 2; ++p) {
      const __m512i plane = _mm512_loadu_si512(quant + 256 + 64 * p);
      q[4 * p] = _mm512_ternarylogic_epi32(q[4 * p], _mm512_slli_epi16(plane, 4), bits, 0xF8);
      q[4 * p + 1] = _mm512_ternarylogic_epi32(q[4 * p + 1], _mm512_slli_epi16(plane, 2), bits, 0xF8);
      q[4 * p + 2] = _mm512_ternarylogic_epi32(q[4 * p + 2], plane, bits, 0xF8);
      q[4 * p + 3] = _mm512_ternarylogic_epi32(q[4 * p + 3], _mm512_srli_epi16(plane, 2), bits, 0xF8);
    }
  }
}

// Memory 2 MB aligned and advised into huge pages where it is that big.
// (zeroed unless every byte is about to be written anyway).
inline std::shared_ptr<uint8_t> huge_page_buffer(size_t bytes, bool zeroed = true) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, kHuge, std::max(rounded, kHuge)) == 0, "out of memory for ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, rounded, MADV_HUGEPAGE);   // advice only: without it the pages are ordinary
#endif
  if (zeroed) std::memset(p, 0, rounded);
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
}

class InterleavedMatrix {
 public:
  InterleavedMatrix() = default;

  // Bytes the rearranged weight of an [N, K] matrix takes.
  static int64_t bytes_for(int64_t ggml_type, int64_t N, int64_t K) {
    return (N + kRowsPerGroup - 1) / kRowsPerGroup * (K / block_format(ggml_type).elements) * unit_bytes_of(ggml_type);
  }

  // w: uint8 [N, row_bytes_of(type, K)] GGUF blocks of a natively read type.
  // storage: memory of bytes_for(...) (a share of one arena), or null for its own.
  // fill: false leaves the arrangement to fill_all (a model's matrices at once).
  InterleavedMatrix(const torch::Tensor& w, int64_t ggml_type, int64_t K, std::shared_ptr<uint8_t> storage = nullptr,
                    bool fill = true)
      : type_(ggml_type), N_(w.size(0)), K_(K), groups_((w.size(0) + 15) / 16) {
    const BlockFormat format = block_format(ggml_type);   // checks the type
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.size(1) == row_bytes_of(ggml_type, K),
                "weight bytes do not match K");
    units_ = K / format.elements;
    data_ = storage ? std::move(storage) : huge_page_buffer(nbytes(), /*zeroed=*/false);
    if (fill) fill_all({this}, {w});
  }

  // Arranges each matrices[i] from its blocks sources[i]: chunks of groups of all the matrices
  // handed out to all threads as they come free (no barrier per matrix, small ones included).
  static void fill_all(const std::vector<InterleavedMatrix*>& matrices, const std::vector<torch::Tensor>& sources) {
    std::vector<torch::Tensor> blocks;
    std::vector<std::pair<size_t, int64_t>> chunks;   // (matrix, first group)
    for (size_t i = 0; i < matrices.size(); ++i) {
      blocks.push_back(sources[i].contiguous());
      for (int64_t g = 0; g < matrices[i]->groups_; g += matrices[i]->groups_per_chunk()) chunks.emplace_back(i, g);
    }
    std::atomic<size_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (size_t c = next++; c < chunks.size(); c = next++) {
        const auto [i, g] = chunks[c];
        const int64_t g_end = std::min(g + matrices[i]->groups_per_chunk(), matrices[i]->groups_);
        matrices[i]->fill_groups(blocks[i].data_ptr<uint8_t>(), g, g_end);
      }
    });
  }

  // The weight in fp32 [N, K], as gguf computes it: scale * (q - zero) + offset per 32
  // inputs, the product exact, so one rounding (none without an offset), as gguf's.
  void dequantize_groups(float* out, int64_t g_begin, int64_t g_end) const {
    with_type(type_, [&](auto type) {
      constexpr int kType = decltype(type)::value;
      for (int64_t g = g_begin; g < g_end; ++g)
        for (int64_t u = 0; u < units_; ++u)
          for (int64_t jb = 0; jb < unit_blocks_of(kType); ++jb) dequantize_block<kType>(out, g, u, jb);
    });
  }

  // The GGUF blocks back, byte for byte: uint8 [N, row_bytes_of(type, K)].
  torch::Tensor gguf_blocks() const {
    const BlockFormat format = block_format(type_);
    auto out = torch::empty({N_, units_ * format.bytes}, torch::kUInt8);
    BlockInts ints;
    for (int64_t n = 0; n < N_; ++n)
      for (int64_t u = 0; u < units_; ++u) {
        extract(unit(n / kRowsPerGroup, u), n % kRowsPerGroup, &ints);
        encode_block(type_, ints, out.data_ptr<uint8_t>() + (n * units_ + u) * format.bytes);
      }
    return out;
  }

  int64_t type() const { return type_; }
  int64_t N() const { return N_; }
  int64_t K() const { return K_; }
  int64_t groups() const { return groups_; }
  int64_t units() const { return units_; }
  int64_t nbytes() const { return bytes_for(type_, N_, K_); }
  const uint8_t* unit(int64_t g, int64_t u) const { return data_.get() + (g * units_ + u) * unit_bytes_of(type_); }

 private:
  uint8_t* unit(int64_t g, int64_t u) { return data_.get() + (g * units_ + u) * unit_bytes_of(type_); }

  // About 64 units a chunk: big enough to amortise taking it, small enough to balance.
  int64_t groups_per_chunk() const { return std::max<int64_t>(1, 64 / units_); }

  void fill_groups(const uint8_t* src, int64_t g_begin, int64_t g_end) {
    with_type(type_, [&](auto type) {   // the type a constant: the shuffles fold
      constexpr int kType = decltype(type)::value;
      const int64_t row_bytes = units_ * block_format(kType).bytes;
      for (int64_t g = g_begin; g < g_end; ++g)
        fill_group<kType>(src + g * kRowsPerGroup * row_bytes, row_bytes, std::min(kRowsPerGroup, N_ - g * kRowsPerGroup),
                          units_, unit(g, 0));
    });
  }

  // Block jb of unit u of group g into out, one row of 32 floats each.
  template <int kType>
  void dequantize_block(float* out, int64_t g, int64_t u, int64_t jb) const {
    const uint8_t* block = unit(g, u);
    alignas(64) uint8_t q[8 * 64];   // part t: four values of each row, as in the kernel
    __m512i parts[8];
    load_q<kType>(block + jb * quant_bytes_of(kType), parts);
    for (int t = 0; t < 8; ++t) _mm512_store_si512(q + 64 * t, parts[t]);
    const uint8_t* header = block + unit_blocks_of(kType) * quant_bytes_of(kType);
    const __m512i zero = _mm512_set1_epi32(interleaved_zero(kType));
    for (int64_t r = 0; r < kRowsPerGroup && g * kRowsPerGroup + r < N_; ++r) {
      alignas(16) uint8_t row_q[32];
      for (int t = 0; t < 8; ++t) std::memcpy(row_q + 4 * t, q + t * 64 + 4 * r, 4);
      float scale[2], offset;
      header_scales(kType, header, jb, r, scale, &offset);
      float* row = out + (g * kRowsPerGroup + r) * K_ + (u * unit_blocks_of(kType) + jb) * 32;
      for (int half = 0; half < 2; ++half) {
        const __m512i ints = _mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(row_q + 16 * half))), zero);
        const __m512 values = _mm512_cvtepi32_ps(ints);
        _mm512_storeu_ps(row + 16 * half, _mm512_fmadd_ps(_mm512_set1_ps(scale[half]), values, _mm512_set1_ps(offset)));
      }
    }
  }

  // Row r's exact fp32 scales (per 16 inputs) and offset for block jb of a unit's header.
  static void header_scales(int64_t t, const uint8_t* header, int64_t jb, int64_t r, float scale[2], float* offset) {
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(header);
    const float d = fp16_bits_to_float(halves[r]);
    *offset = 0.f;
    scale[0] = scale[1] = d;
    if (t == kQ6_K) {
      for (int h = 0; h < 2; ++h) scale[h] = d * static_cast<float>(static_cast<int8_t>(header[32 + (2 * jb + h) * 16 + r]));
    } else if (t == kQ4_K || t == kQ5_K) {
      scale[0] = scale[1] = d * static_cast<float>(header[64 + jb * 16 + r]);
      *offset = -(fp16_bits_to_float(halves[16 + r]) * static_cast<float>(header[192 + jb * 16 + r]));
    } else if (has_offset(static_cast<int>(t))) {
      *offset = fp16_bits_to_float(halves[16 + r]);
    }
  }

  // Row r's block back out of a unit (the inverse of fill_group).
  void extract(const uint8_t* in, int64_t r, BlockInts* ints) const {
    const int64_t blocks = unit_blocks_of(type_), quant = quant_bytes_of(type_);
    for (int64_t jb = 0; jb < blocks; ++jb)
      for (int i = 0; i < 32; ++i) {
        const uint8_t* part = in + jb * quant;
        const int t = i / 4, at = 4 * static_cast<int>(r) + i % 4;
        uint8_t v = type_ == kQ8_0 ? part[t * 64 + at] : (part[(t / 2) * 64 + at] >> (4 * (t % 2))) & 0x0F;
        if (q_bits_of(type_) == 5) v |= ((part[256 + at] >> t) & 1) << 4;
        if (q_bits_of(type_) == 6) v |= ((part[256 + 64 * (t / 4) + at] >> (2 * (t % 4))) & 3) << 4;
        ints->q[32 * jb + i] = v;
      }
    const uint8_t* header = in + blocks * quant;
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(header);
    ints->d = halves[r];
    ints->m = has_m(type_) ? halves[16 + r] : 0;
    for (int j = 0; j < 16 && type_ == kQ6_K; ++j) ints->scales[j] = header[32 + j * 16 + r];
    for (int j = 0; j < 8 && (type_ == kQ4_K || type_ == kQ5_K); ++j) {
      ints->scales[j] = header[64 + j * 16 + r];
      ints->mins[j] = header[192 + j * 16 + r];
    }
  }

  int64_t type_ = 0, N_ = 0, K_ = 0, units_ = 0, groups_ = 0;
  std::shared_ptr<uint8_t> data_;
};

#endif  // AVX-512 VNNI

}  // namespace
