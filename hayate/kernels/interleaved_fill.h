// Filling the interleaved layout (interleaved.h) from GGUF blocks at load time, a group of 16
// rows at a time. A unit's q bytes are parts of 64 bytes, part c holding dword c of every
// row's "image" (byte 4r+k of the part: byte k of row r's dword c). So each row's block is
// unpacked with byte shuffles into its image, staged four dwords at a time ([stage group][row]
// [4]), and each stage group of the 16 rows is transposed into four parts. Every byte of a
// unit is written (padding rows as zeros): the memory needs no zeroing first.
#pragma once
#include "ggml_blocks.h"
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAYATE_INTERLEAVED 1

constexpr int64_t kRowsPerGroup = 16;

// The integer subtracted from the stored q in the kernel (Q4_0 keeps its -8 d as an offset).
constexpr int interleaved_zero(int64_t t) { return t == kQ4_0 ? 0 : zero_of(t); }
constexpr int64_t quant_bytes_of(int64_t t) { return t == kQ8_0 ? 512 : 256 + (q_bits_of(t) - 4) * 64; }
constexpr int64_t unit_blocks_of(int64_t t) { return is_k_quant(t) ? 8 : 1; }   // blocks of 32 per unit
constexpr int64_t header_bytes_of(int64_t t) {
  return t == kQ4_K || t == kQ5_K ? 64 + 256 : t == kQ6_K ? 32 + 256 : has_offset(static_cast<int>(t)) ? 64 : 32;
}
// Types with a second fp16 per row: Q4_1/Q5_1's m, the K-quants' dmin.
constexpr bool has_m(int64_t t) { return t == kQ4_1 || t == kQ5_1 || t == kQ4_K || t == kQ5_K; }
constexpr int64_t unit_bytes_of(int64_t t) { return unit_blocks_of(t) * quant_bytes_of(t) + header_bytes_of(t); }

// Stage groups: the nibble parts (0..3) of each block (Q8_0: its 8 parts), then the bit planes.
constexpr int nibble_groups_of(int64_t t) { return t == kQ8_0 ? 2 : static_cast<int>(unit_blocks_of(t)); }
constexpr int stage_groups_of(int64_t t) {
  return nibble_groups_of(t) + (q_bits_of(t) == 6 ? 4 : q_bits_of(t) == 5 ? (is_k_quant(t) ? 2 : 1) : 0);
}
// The unit's part that column j of stage group s fills, or -1.
constexpr int part_of(int64_t t, int s, int j) {
  const int nibble = nibble_groups_of(t), parts = static_cast<int>(quant_bytes_of(t) / 64), p = s - nibble;
  if (s < nibble) return t == kQ8_0 ? 4 * s + j : s * parts + j;
  if (q_bits_of(t) == 6) return (4 * (p / 2) + j) * parts + 4 + p % 2;   // lane 2h+p: blocks 4h.., plane p
  if (is_k_quant(t)) return (4 * p + j) * parts + 4;
  return j == 0 ? 4 : -1;
}

// Byte 4j+k of each 16-byte lane: the nibbles of bytes a and a + 4 (a = 8(j%2) + k; j < 2 from
// `first`'s lane, j >= 2 from `second`'s) as low and high nibble; high nibbles where `high`.
inline __m512i nibble_images(__m512i first, __m512i second, __mmask64 high) {
  const __m512i at = _mm512_set4_epi32(0x0B0A0908, 0x03020100, 0x0B0A0908, 0x03020100);
  const __m512i at4 = _mm512_add_epi8(at, _mm512_set1_epi8(4));
  constexpr __mmask64 kUpper = 0xFF00FF00FF00FF00ull;   // bytes j >= 2 of each lane
  const __m512i lo = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(first, at), kUpper, second, at);
  const __m512i hi = _mm512_mask_shuffle_epi8(_mm512_shuffle_epi8(first, at4), kUpper, second, at4);
  const __m512i low = _mm512_mask_blend_epi8(high, lo, _mm512_srli_epi16(lo, 4));
  const __m512i up = _mm512_mask_blend_epi8(high, _mm512_slli_epi16(hi, 4), hi);
  return _mm512_ternarylogic_epi32(_mm512_set1_epi8(0x0F), low, up, 0xCA);   // low & 0x0F | up & 0xF0
}

// A K-quant's 64 bytes of nibbles, lanes [c0 first half, c0 second, c1 first, c1 second] of two
// 32-byte runs: images of the four blocks whose lanes take (run, nibble) as `pick_*` and `high`.
template <int kPickFirst, int kPickSecond>
inline __m512i k_nibble_images(const uint8_t* nibbles, __mmask64 high) {
  const __m512i raw = _mm512_loadu_si512(nibbles);
  return nibble_images(_mm512_shuffle_i64x2(raw, raw, kPickFirst), _mm512_shuffle_i64x2(raw, raw, kPickSecond), high);
}

inline void store_lanes(__m512i images, uint32_t (*stage)[16][4], int first_group, int r) {
  _mm_store_si128(reinterpret_cast<__m128i*>(stage[first_group][r]), _mm512_castsi512_si128(images));
  _mm_store_si128(reinterpret_cast<__m128i*>(stage[first_group + 1][r]), _mm512_extracti32x4_epi32(images, 1));
  _mm_store_si128(reinterpret_cast<__m128i*>(stage[first_group + 2][r]), _mm512_extracti32x4_epi32(images, 2));
  _mm_store_si128(reinterpret_cast<__m128i*>(stage[first_group + 3][r]), _mm512_extracti32x4_epi32(images, 3));
}

// Q6_K's qh [64] -> its planes: lane 2h+p, dword c: plane p of block 4h+c (bits 2s.. of byte k:
// bits 4..5 of q[16p + 4s + k], i.e. field c of qh[32h + 16p + 4s + k]).
inline __m512i q6_planes(const uint8_t* qh) {
  const __m512i raw = _mm512_loadu_si512(qh), shift = _mm512_set4_epi32(6, 4, 2, 0), field = _mm512_set1_epi8(3);
  __m512i planes = _mm512_setzero_si512();
  for (int s = 0; s < 4; ++s) {
    const __m512i bytes = _mm512_shuffle_epi8(raw, _mm512_set1_epi32(0x03020100 + 0x04040404 * s));
    const __m512i bits = _mm512_and_si512(_mm512_srlv_epi32(bytes, shift), field);
    planes = _mm512_or_si512(planes, _mm512_slli_epi32(bits, 2 * s));
  }
  return planes;
}

// Q5_K's qh [32] -> dword jb: the plane of block jb (bit t of byte k: bit jb of qh[4t+k]).
inline __m256i q5k_planes(const uint8_t* qh) {
  const __m256i shift = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), bit = _mm256_set1_epi8(1);
  __m256i planes = _mm256_setzero_si256();
  for (int t = 0; t < 8; ++t) {
    uint32_t word;
    std::memcpy(&word, qh + 4 * t, 4);
    const __m256i bits = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shift), bit);
    planes = _mm256_or_si256(planes, _mm256_slli_epi32(bits, t));
  }
  return planes;
}

// Q5_0/Q5_1's 32-bit mask (bit i: bit 4 of q[i]) -> the plane (bit t of byte k: bit 4t+k).
inline uint32_t q5_plane(uint32_t mask) {
  uint32_t plane = 0;
  for (int k = 0; k < 4; ++k) plane |= _pext_u32(mask, 0x11111111u << k) << (8 * k);
  return plane;
}

// Row r's header lanes of one block (the interleaved.h header: fp16 d, m; byte scales, mins).
template <int kType>
inline void place_header(const uint8_t* block, uint8_t* header, int r) {
  uint16_t* halves = reinterpret_cast<uint16_t*>(header);
  const uint16_t d = read_u16(block + (kType == kQ6_K ? 208 : 0));
  halves[r] = d;
  if constexpr (kType == kQ4_0) halves[16 + r] = c10::Half(-8.f * fp16_bits_to_float(d)).x;   // exact
  if constexpr (has_m(kType)) halves[16 + r] = read_u16(block + 2);
  if constexpr (kType == kQ6_K)
    for (int j = 0; j < 16; ++j) header[32 + j * 16 + r] = block[192 + j];
  if constexpr (kType == kQ4_K || kType == kQ5_K) {
    uint8_t scales[8], mins[8];
    unpack_scales_k4(block + 4, scales, mins);
    for (int j = 0; j < 8; ++j) {
      header[64 + j * 16 + r] = scales[j];
      header[192 + j * 16 + r] = mins[j];
    }
  }
}

// One block of each of the group's `valid` rows (row r's at first + r * row_bytes) into the
// stage's images and the header. Rows past `valid` are left as they are (zeros).
template <int kType>
inline void stage_rows(const uint8_t* first, int64_t row_bytes, int64_t valid, uint32_t (*stage)[16][4], uint8_t* header) {
  for (int r = 0; r < valid; ++r) {
    const uint8_t* block = first + r * row_bytes;
    place_header<kType>(block, header, r);
    if constexpr (kType == kQ8_0) {
      const __m256i stored = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
      const __m256i q = _mm256_xor_si256(stored, _mm256_set1_epi8(-128));   // int8 + 128
      _mm_store_si128(reinterpret_cast<__m128i*>(stage[0][r]), _mm256_castsi256_si128(q));
      _mm_store_si128(reinterpret_cast<__m128i*>(stage[1][r]), _mm256_extracti128_si256(q, 1));
    } else if constexpr (kType == kQ4_K || kType == kQ5_K) {   // lanes: (run 0 low, high, run 1 low, high)
      const uint8_t* nibbles = block + (kType == kQ4_K ? 16 : 48);
      store_lanes(k_nibble_images<0xA0, 0xF5>(nibbles, 0xFFFF0000FFFF0000ull), stage, 0, r);
      store_lanes(k_nibble_images<0xA0, 0xF5>(nibbles + 64, 0xFFFF0000FFFF0000ull), stage, 4, r);
      if constexpr (kType == kQ5_K) {
        const __m256i planes = q5k_planes(block + 16);
        _mm_store_si128(reinterpret_cast<__m128i*>(stage[8][r]), _mm256_castsi256_si128(planes));
        _mm_store_si128(reinterpret_cast<__m128i*>(stage[9][r]), _mm256_extracti128_si256(planes, 1));
      }
    } else if constexpr (kType == kQ6_K) {   // lanes: (run 0 low, run 1 low, run 0 high, run 1 high)
      store_lanes(k_nibble_images<0x88, 0xDD>(block, 0xFFFFFFFF00000000ull), stage, 0, r);
      store_lanes(k_nibble_images<0x88, 0xDD>(block + 64, 0xFFFFFFFF00000000ull), stage, 4, r);
      store_lanes(q6_planes(block + 128), stage, 8, r);
    } else {   // 32-weight blocks: the 16 nibble bytes now, the images four rows at a time below
      constexpr int kNibblesAt = kType == kQ4_0 ? 2 : kType == kQ4_1 ? 4 : kType == kQ5_0 ? 6 : 8;
      std::memcpy(stage[0][r], block + kNibblesAt, 16);
      if constexpr (q_bits_of(kType) == 5) {   // the 32-bit mask just before the nibbles
        uint32_t mask;
        std::memcpy(&mask, block + kNibblesAt - 4, 4);
        stage[1][r][0] = q5_plane(mask);
      }
    }
  }
  if constexpr (!is_k_quant(kType) && kType != kQ8_0)
    for (int a = 0; a < 4; ++a) {   // q[l]: low nibble of byte l, then high nibble of byte l - 16
      const __m512i nibbles = _mm512_load_si512(stage[0][4 * a]);
      _mm512_store_si512(stage[0][4 * a], nibble_images(nibbles, nibbles, 0xFF00FF00FF00FF00ull));
    }
}

// Stage group s ([16 rows][4 dwords]) -> its parts (part j: dword j of every row).
template <int kType>
inline void store_group(const uint32_t (*rows)[4], int s, uint8_t* quant) {
  const __m512i z0 = _mm512_load_si512(rows[0]), z1 = _mm512_load_si512(rows[4]);
  const __m512i z2 = _mm512_load_si512(rows[8]), z3 = _mm512_load_si512(rows[12]);
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i pick_high = _mm512_add_epi32(pick, _mm512_set1_epi32(2));
  const __m512i low01 = _mm512_permutex2var_epi32(z0, pick, z1), low23 = _mm512_permutex2var_epi32(z2, pick, z3);
  const __m512i high01 = _mm512_permutex2var_epi32(z0, pick_high, z1), high23 = _mm512_permutex2var_epi32(z2, pick_high, z3);
  const __m512i columns[4] = {_mm512_shuffle_i64x2(low01, low23, 0x44), _mm512_shuffle_i64x2(low01, low23, 0xEE),
                              _mm512_shuffle_i64x2(high01, high23, 0x44), _mm512_shuffle_i64x2(high01, high23, 0xEE)};
  for (int j = 0; j < 4; ++j)
    if (part_of(kType, s, j) >= 0) _mm512_storeu_si512(quant + 64 * part_of(kType, s, j), columns[j]);
}

// A group's units from its rows' blocks (row r's unit u at rows + r * row_bytes + u * block
// bytes; `valid` rows, the rest of the 16 zeros) into `out`, unit after unit.
template <int kType>
void fill_group(const uint8_t* rows, int64_t row_bytes, int64_t valid, int64_t units, uint8_t* out) {
  constexpr int kGroups = stage_groups_of(kType);
  constexpr int64_t kQuant = unit_blocks_of(kType) * quant_bytes_of(kType);
  alignas(64) uint32_t stage[kGroups][16][4];
  if (valid < kRowsPerGroup) std::memset(stage, 0, sizeof stage);
  for (int64_t u = 0; u < units; ++u) {
    uint8_t* unit = out + u * unit_bytes_of(kType);
    if (valid < kRowsPerGroup) std::memset(unit + kQuant, 0, header_bytes_of(kType));
    stage_rows<kType>(rows + u * block_format(kType).bytes, row_bytes, valid, stage, unit + kQuant);
    for (int s = 0; s < kGroups; ++s) store_group<kType>(stage[s], s, unit);
  }
}

#endif  // AVX-512 VNNI

}  // namespace
