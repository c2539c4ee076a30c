// The GGUF block formats hayate reads natively, as the file stores them (gguf's quants.py is
// the reference): sizes, one 32-weight sub-block decoded for the fp32 kernels, and a block's
// integers unpacked and packed again (the interleaved layout is made from them, and gives
// the file's bytes back through them).
//
// Every weight is scale * (q - zero) + offset over a sub-block of 32, with q the stored
// unsigned integer: the product is exact in fp32 for all these types (fp16 d times a 6-bit
// K-quant scale and a <= 6-bit q is at most 23 bits), so the only rounding is the add, as in
// gguf's numpy (Q4_K: (d sc) q - (dmin m); Q6_K: (d sc) (q - 32), exact).
#pragma once
#include <torch/extension.h>
#include <cstdint>
#include <cstring>

namespace {

enum GgmlType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

struct BlockFormat {
  int64_t elements, bytes;   // weights and bytes per file block
};

inline BlockFormat block_format(int64_t ggml_type) {
  switch (ggml_type) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "unsupported GGML type ", ggml_type);
  }
}

// Bytes of one row of K weights (K a whole number of the type's blocks).
inline int64_t row_bytes_of(int64_t ggml_type, int64_t K) {
  const BlockFormat format = block_format(ggml_type);
  TORCH_CHECK(K % format.elements == 0, "in_features ", K, " is not a multiple of the block size ", format.elements);
  return K / format.elements * format.bytes;
}

constexpr bool is_k_quant(int64_t t) { return t == kQ4_K || t == kQ5_K || t == kQ6_K; }
// The integer subtracted from the stored q before scaling (Q8_0's int8 is stored here + 128).
constexpr int zero_of(int64_t t) { return t == kQ4_0 ? 8 : t == kQ5_0 ? 16 : t == kQ6_K ? 32 : t == kQ8_0 ? 128 : 0; }
constexpr int q_bits_of(int64_t t) { return t == kQ8_0 ? 8 : t == kQ6_K ? 6 : (t == kQ5_0 || t == kQ5_1 || t == kQ5_K) ? 5 : 4; }

inline float fp16_bits_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

inline uint16_t read_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// One file block's integers. Sub-block scales: Q4_K/Q5_K 8 six-bit scales and mins; Q6_K
// 16 int8 scales (one per 16 weights).
struct BlockInts {
  uint8_t q[256];              // stored unsigned values (Q8_0: int8 + 128)
  uint16_t d = 0, m = 0;       // fp16 bits: d, and Q4_1/Q5_1's m or the K-quants' dmin
  uint8_t scales[16] = {}, mins[8] = {};
};

// Q4_K/Q5_K's 12 bytes of 6-bit scales and mins (gguf's get_scale_min).
inline void unpack_scales_k4(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

inline void pack_scales_k4(const uint8_t* sc, const uint8_t* mn, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4));
  }
}

// Bit 4 of q: Q5_0/Q5_1 from a 32-bit mask (bit i), Q5_K from qh[32] (bit s of qh[l] for
// weight 32 s + l).
inline uint8_t fifth_bit(int64_t t, const uint8_t* qh, int i) {
  return t == kQ5_K ? (qh[i % 32] >> (i / 32)) & 1 : (qh[i / 8] >> (i % 8)) & 1;
}

// Nibble i (0..31) of a 32-weight run stored as 16 bytes: low nibbles first, then high.
inline uint8_t nibble32(const uint8_t* qs, int i) { return i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4; }

// Stored q of weight i of a block, read from the file's bytes.
inline uint8_t file_q(int64_t t, const uint8_t* block, int i) {
  switch (t) {
    case kQ4_0: return nibble32(block + 2, i);
    case kQ4_1: return nibble32(block + 4, i);
    case kQ5_0: return nibble32(block + 6, i) | (fifth_bit(t, block + 2, i) << 4);
    case kQ5_1: return nibble32(block + 8, i) | (fifth_bit(t, block + 4, i) << 4);
    case kQ8_0: return block[2 + i] ^ 0x80;
    case kQ4_K: case kQ5_K: {   // 64 weights per 32 bytes: low nibbles, then high
      const uint8_t byte = block[(t == kQ4_K ? 16 : 48) + 32 * (i / 64) + i % 32];
      const uint8_t low = (i % 64) < 32 ? byte & 0x0F : byte >> 4;
      return t == kQ4_K ? low : low | (fifth_bit(t, block + 16, i) << 4);
    }
    default: {   // Q6_K: ql[128] in halves of 64 bytes (low nibbles, then high), qh[64]
      const int half = i / 128, l = i % 128;
      const uint8_t byte = block[64 * half + l % 64];
      const uint8_t low = l < 64 ? byte & 0x0F : byte >> 4;
      return low | (((block[128 + 32 * half + l % 32] >> (2 * (l / 32))) & 3) << 4);
    }
  }
}

inline void decode_block(int64_t t, const uint8_t* block, BlockInts* out) {
  const int64_t n = block_format(t).elements;
  for (int i = 0; i < n; ++i) out->q[i] = file_q(t, block, i);
  if (t == kQ6_K) {
    std::memcpy(out->scales, block + 192, 16);
    out->d = read_u16(block + 208);
    return;
  }
  out->d = read_u16(block);
  if (t == kQ4_1 || t == kQ5_1 || t == kQ4_K || t == kQ5_K) out->m = read_u16(block + 2);
  if (t == kQ4_K || t == kQ5_K) unpack_scales_k4(block + 4, out->scales, out->mins);
}

// The file's bytes of a block from its integers (the inverse of decode_block).
inline void encode_block(int64_t t, const BlockInts& in, uint8_t* block) {
  const int64_t n = block_format(t).elements;
  std::memset(block, 0, block_format(t).bytes);
  if (t == kQ8_0 || t == kQ4_0 || t == kQ5_0) std::memcpy(block, &in.d, 2);
  if (t == kQ8_0) {
    for (int i = 0; i < 32; ++i) block[2 + i] = in.q[i] ^ 0x80;
    return;
  }
  if (t == kQ4_1 || t == kQ5_1 || t == kQ4_K || t == kQ5_K) {
    std::memcpy(block, &in.d, 2);
    std::memcpy(block + 2, &in.m, 2);
  }
  if (t == kQ4_K || t == kQ5_K) pack_scales_k4(in.scales, in.mins, block + 4);
  if (t == kQ6_K) {
    std::memcpy(block + 192, in.scales, 16);
    std::memcpy(block + 208, &in.d, 2);
  }
  for (int i = 0; i < n; ++i) {
    const uint8_t q = in.q[i], high = q >> 4, low = q & 0x0F;
    if (t == kQ4_0 || t == kQ4_1 || t == kQ5_0 || t == kQ5_1) {
      uint8_t* qs = block + (t == kQ4_0 ? 2 : t == kQ4_1 ? 4 : t == kQ5_0 ? 6 : 8);
      qs[i % 16] |= i < 16 ? low : low << 4;
      if (t == kQ5_0 || t == kQ5_1) block[(t == kQ5_0 ? 2 : 4) + i / 8] |= (high & 1) << (i % 8);
    } else if (t == kQ4_K || t == kQ5_K) {
      block[(t == kQ4_K ? 16 : 48) + 32 * (i / 64) + i % 32] |= (i % 64) < 32 ? low : low << 4;
      if (t == kQ5_K) block[16 + i % 32] |= (high & 1) << (i / 32);
    } else {   // Q6_K
      const int half = i / 128, l = i % 128;
      block[64 * half + l % 64] |= l < 64 ? low : low << 4;
      block[128 + 32 * half + l % 32] |= (high & 3) << (2 * (l / 32));
    }
  }
}

// Sub-block j (weights 32 j .. 32 j + 31) of a block: the exact fp32 scale of each half of
// 16 (they differ only in Q6_K) and offset, so weight i = scale[i / 16] * (q_i - zero) + offset.
inline void sub_block_scales(int64_t t, const uint8_t* block, int j, float scale[2], float* offset) {
  *offset = 0.f;
  if (t == kQ6_K) {
    const float d = fp16_bits_to_float(read_u16(block + 208));
    for (int h = 0; h < 2; ++h) scale[h] = d * static_cast<float>(static_cast<int8_t>(block[192 + 2 * j + h]));
    return;
  }
  const float d = fp16_bits_to_float(read_u16(block));
  scale[0] = scale[1] = d;
  if (t == kQ4_1 || t == kQ5_1) *offset = fp16_bits_to_float(read_u16(block + 2));
  if (t == kQ4_K || t == kQ5_K) {
    uint8_t sc[8], mn[8];
    unpack_scales_k4(block + 4, sc, mn);
    scale[0] = scale[1] = d * static_cast<float>(sc[j]);
    *offset = -(fp16_bits_to_float(read_u16(block + 2)) * static_cast<float>(mn[j]));
  }
}

// Sub-block b (of 32 weights) of a row: q - zero as floats (Q6_K: times its int8 scale, an
// exact integer, so that one scale serves both halves), the scale and the offset.
inline void sub_block_values(int64_t t, const uint8_t* row, int64_t b, float* q, float* d, float* offset) {
  const BlockFormat format = block_format(t);
  const int64_t per_block = format.elements / 32;
  const uint8_t* block = row + (b / per_block) * format.bytes;
  const int j = static_cast<int>(b % per_block), zero = zero_of(t);
  float scale[2];
  sub_block_scales(t, block, j, scale, offset);
  for (int i = 0; i < 32; ++i) q[i] = static_cast<float>(file_q(t, block, 32 * j + i) - zero);
  if (t == kQ6_K) {
    const float d6 = fp16_bits_to_float(read_u16(block + 208));
    for (int i = 0; i < 32; ++i) q[i] *= static_cast<float>(static_cast<int8_t>(block[192 + 2 * j + i / 16]));
    *d = d6;
    return;
  }
  *d = scale[0];
}

}  // namespace
