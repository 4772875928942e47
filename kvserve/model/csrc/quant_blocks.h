// GGUF block formats (ggml's layouts, as gguf.quants reads them) for the quantized matmuls:
// each type unpacks any 32 consecutive weights of a row into 32 small integers and the float
// factors that turn them back into weights, and dequantizes whole rows to float for lookups.
//
//   type  block  bytes  weight                       layout
//   Q4_0    32     18   d * (q - 8)                  f16 d, 16 B nibbles
//   Q4_1    32     20   d * q + m                    f16 d, f16 m, 16 B nibbles
//   Q5_0    32     22   d * (q - 16)                 f16 d, u32 high bits, 16 B nibbles
//   Q8_0    32     34   d * q                        f16 d, 32 int8
//   Q4_K   256    144   d*sc_j * q - dmin*m_j        f16 d, f16 dmin, 12 B 6-bit sc/m, 128 B nibbles
//   Q6_K   256    210   d*sc_k * (q - 32)            128 B low nibbles, 64 B 2-bit highs,
//                                                    16 int8 scales (per 16 weights), f16 d
// In a 32-weight block the low nibbles are weights 0..15 and the high ones 16..31; in Q4_K
// nibble byte i of a 64-weight chunk holds weights i (low) and 32 + i (high).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace kvserve::quant {

enum Type : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };  // ggml ids

template <int T> struct Format;
template <> struct Format<Q4_0> { static constexpr int values = 32, bytes = 18; };
template <> struct Format<Q4_1> { static constexpr int values = 32, bytes = 20; };
template <> struct Format<Q5_0> { static constexpr int values = 32, bytes = 22; };
template <> struct Format<Q8_0> { static constexpr int values = 32, bytes = 34; };
template <> struct Format<Q4_K> { static constexpr int values = 256, bytes = 144; };
template <> struct Format<Q6_K> { static constexpr int values = 256, bytes = 210; };

inline float f16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// 32 weights, ready for the integer dot product of quant_matmul.cpp:
//   Q8_0: q = |w_int|, sign = w_int;   Q6_K: q in 0..63, scales = int16 sc per 16 weights;
//   others: q in 0..15 or 0..31. Weight i = d * (q_i - offset) (* sc) + m.
struct Block {
    __m256i q, aux;
    float d, m;
};

inline __m256i nibbles(const uint8_t* p) {  // 16 bytes -> low nibbles, then high nibbles
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low),
                            _mm_and_si128(bytes, low));
}

inline __m256i bit4_from_mask(uint32_t bits) {  // bit i of bits -> 16 in byte i, else 0
    const __m256i which_byte = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                 0x0101010101010101, 0x0000000000000000);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), which_byte);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(16));
}

inline void q4k_scale_min(const uint8_t* s, int j, int& sc, int& m) {
    if (j < 4) {
        sc = s[j] & 63;
        m = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

// Block `b` (32 weights) of a row.
template <int T> inline void decode(const uint8_t* row, int64_t b, Block& w);

template <> inline void decode<Q4_0>(const uint8_t* row, int64_t b, Block& w) {
    const uint8_t* p = row + b * 18;
    w.d = f16(p);
    w.q = nibbles(p + 2);
}

template <> inline void decode<Q4_1>(const uint8_t* row, int64_t b, Block& w) {
    const uint8_t* p = row + b * 20;
    w.d = f16(p);
    w.m = f16(p + 2);
    w.q = nibbles(p + 4);
}

template <> inline void decode<Q5_0>(const uint8_t* row, int64_t b, Block& w) {
    const uint8_t* p = row + b * 22;
    uint32_t high;
    std::memcpy(&high, p + 2, 4);
    w.d = f16(p);
    w.q = _mm256_or_si256(nibbles(p + 6), bit4_from_mask(high));
}

template <> inline void decode<Q8_0>(const uint8_t* row, int64_t b, Block& w) {
    const uint8_t* p = row + b * 34;
    w.d = f16(p);
    w.aux = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    w.q = _mm256_abs_epi8(w.aux);  // -128 -> 128 as unsigned: still exact
}

template <> inline void decode<Q4_K>(const uint8_t* row, int64_t b, Block& w) {
    const uint8_t* p = row + (b / 8) * 144;
    const int j = int(b % 8);
    int sc, m;
    q4k_scale_min(p + 4, j, sc, m);
    w.d = f16(p) * float(sc);
    w.m = -(f16(p + 2) * float(m));
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + (j / 2) * 32));
    const __m256i low = _mm256_set1_epi8(0x0F);
    w.q = (j & 1) ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low)
                  : _mm256_and_si256(bytes, low);
}

template <> inline void decode<Q6_K>(const uint8_t* row, int64_t b, Block& w) {
    const uint8_t* p = row + (b / 8) * 210;
    const int j = int(b % 8), half = j / 4, group = j % 4;
    const __m256i low = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(p + half * 64 + (group & 1) * 32));
    const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + half * 32));
    const __m256i nib = group < 2 ? _mm256_and_si256(low, _mm256_set1_epi8(0x0F))
                                  : _mm256_and_si256(_mm256_srli_epi16(low, 4), _mm256_set1_epi8(0x0F));
    const __m256i two = _mm256_and_si256(_mm256_srli_epi16(high, 2 * group), _mm256_set1_epi8(3));
    w.q = _mm256_or_si256(nib, _mm256_slli_epi16(two, 4));
    const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
    w.aux = _mm256_set_m128i(_mm_set1_epi16(scales[2 * j + 1]), _mm_set1_epi16(scales[2 * j]));
    w.d = f16(p + 208);
}

// Dequantize one row of k weights to float, with the same float operations as gguf.quants
// (so the embedding rows equal the dequantized checkpoint's exactly).
template <int T> void dequantize_row(const uint8_t* row, int64_t k, float* out);

template <> inline void dequantize_row<Q4_0>(const uint8_t* row, int64_t k, float* out) {
    for (int64_t b = 0; b < k / 32; ++b, out += 32) {
        const uint8_t* p = row + b * 18;
        const float d = f16(p);
        for (int i = 0; i < 16; ++i) {
            out[i] = d * float((p[2 + i] & 15) - 8);
            out[i + 16] = d * float((p[2 + i] >> 4) - 8);
        }
    }
}

template <> inline void dequantize_row<Q4_1>(const uint8_t* row, int64_t k, float* out) {
    for (int64_t b = 0; b < k / 32; ++b, out += 32) {
        const uint8_t* p = row + b * 20;
        const float d = f16(p), m = f16(p + 2);
        for (int i = 0; i < 16; ++i) {
            out[i] = d * float(p[4 + i] & 15) + m;
            out[i + 16] = d * float(p[4 + i] >> 4) + m;
        }
    }
}

template <> inline void dequantize_row<Q5_0>(const uint8_t* row, int64_t k, float* out) {
    for (int64_t b = 0; b < k / 32; ++b, out += 32) {
        const uint8_t* p = row + b * 22;
        const float d = f16(p);
        uint32_t high;
        std::memcpy(&high, p + 2, 4);
        for (int i = 0; i < 16; ++i) {
            out[i] = d * float(int((p[6 + i] & 15) | (((high >> i) & 1) << 4)) - 16);
            out[i + 16] = d * float(int((p[6 + i] >> 4) | (((high >> (i + 16)) & 1) << 4)) - 16);
        }
    }
}

template <> inline void dequantize_row<Q8_0>(const uint8_t* row, int64_t k, float* out) {
    for (int64_t b = 0; b < k / 32; ++b, out += 32) {
        const uint8_t* p = row + b * 34;
        const float d = f16(p);
        for (int i = 0; i < 32; ++i) out[i] = d * float(int8_t(p[2 + i]));
    }
}

template <> inline void dequantize_row<Q4_K>(const uint8_t* row, int64_t k, float* out) {
    for (int64_t b = 0; b < k / 32; ++b, out += 32) {
        const uint8_t* p = row + (b / 8) * 144;
        const int j = int(b % 8);
        int sc, m;
        q4k_scale_min(p + 4, j, sc, m);
        const float d = f16(p) * float(sc), dm = f16(p + 2) * float(m);
        const uint8_t* q = p + 16 + (j / 2) * 32;
        for (int i = 0; i < 32; ++i) out[i] = d * float((j & 1) ? q[i] >> 4 : q[i] & 15) - dm;
    }
}

template <> inline void dequantize_row<Q6_K>(const uint8_t* row, int64_t k, float* out) {
    for (int64_t b = 0; b < k / 32; ++b, out += 32) {
        const uint8_t* p = row + (b / 8) * 210;
        const int j = int(b % 8), half = j / 4, group = j % 4;
        const uint8_t* low = p + half * 64 + (group & 1) * 32;
        const uint8_t* high = p + 128 + half * 32;
        const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
        const float d = f16(p + 208);
        for (int i = 0; i < 32; ++i) {
            const int nib = group < 2 ? low[i] & 15 : low[i] >> 4;
            const int q = nib | (((high[i] >> (2 * group)) & 3) << 4);
            out[i] = (d * float(scales[2 * j + i / 16])) * float(q - 32);
        }
    }
}

}  // namespace kvserve::quant
