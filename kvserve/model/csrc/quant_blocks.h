// GGUF block formats (ggml's layouts, as gguf.quants reads them) for the quantized matmuls:
// each type unpacks two consecutive blocks of 32 weights into 16-bit integers and the float
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

// Two consecutive blocks b, b+1 of 32 weights (b even), as the integer dot product of
// quant_matmul.cpp takes them: w[0..3] = weights 0..15 and 16..31 of block b, then of b+1, as
// int16, and coef = [d_b, m_b, d_b+1, m_b+1]: weight = d * w + m (Q6_K: w already carries the
// int8 scale of its 16 weights). A lone last block (an odd number of blocks) leaves b+1 zero.
struct Pair {
    __m256i w[4];
    __m128 coef;
};

inline __m256i widen(const uint8_t* p) {  // 16 bytes -> 16 uint16
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i widen_signed(const uint8_t* p) {  // 16 int8 -> 16 int16
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 16 nibble bytes, widened: the low nibbles are weights 0..15, the high ones 16..31.
inline void nibbles(const uint8_t* p, __m256i& low, __m256i& high) {
    const __m256i v = widen(p);
    low = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    high = _mm256_srli_epi16(v, 4);
}

inline uint16_t u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

inline uint32_t u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// Four halves as floats: lo's two (lanes 0, 1) and hi's two (lanes 2, 3), each pair one
// 32-bit word as a block stores it, so the four take two loads and no inserts.
inline __m128 halves(uint32_t lo, uint32_t hi) {
    return _mm_cvtph_ps(_mm_cvtsi64_si128(int64_t(uint64_t(hi) << 32 | lo)));
}

inline void zero_second(Pair& w) { w.w[2] = w.w[3] = _mm256_setzero_si256(); }

template <int T> inline void decode_pair(const uint8_t* row, int64_t b, bool alone, Pair& w);

// Q4_0 and Q5_0 are taken as d * q + m with m = -8 d or -16 d (exact in float).
template <> inline void decode_pair<Q4_0>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 18;
    nibbles(p + 2, w.w[0], w.w[1]);
    if (alone) zero_second(w);
    else nibbles(p + 20, w.w[2], w.w[3]);
    const __m128 d = halves(u16(p), alone ? 0 : u16(p + 18));
    w.coef = _mm_mul_ps(_mm_movelh_ps(_mm_unpacklo_ps(d, d), _mm_unpackhi_ps(d, d)),
                        _mm_setr_ps(1.0f, -8.0f, 1.0f, -8.0f));
}

template <> inline void decode_pair<Q4_1>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 20;
    nibbles(p + 4, w.w[0], w.w[1]);
    if (alone) zero_second(w);
    else nibbles(p + 24, w.w[2], w.w[3]);
    w.coef = halves(u32(p), alone ? 0 : u32(p + 20));
}

inline __m256i fifth_bits(uint32_t bits) {  // bit i of 16 bits -> 16 in lane i, else 0
    const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                          4096, 8192, 16384, -32768);
    const __m256i v = _mm256_and_si256(_mm256_set1_epi16(short(bits)), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi16(v, bit), _mm256_set1_epi16(16));
}

template <> inline void decode_pair<Q5_0>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 22;
    for (int i = 0; i < (alone ? 1 : 2); ++i) {
        const uint8_t* q = p + 22 * i;
        uint32_t high;
        std::memcpy(&high, q + 2, 4);  // bit j: the fifth bit of weight j
        nibbles(q + 6, w.w[2 * i], w.w[2 * i + 1]);
        w.w[2 * i] = _mm256_or_si256(w.w[2 * i], fifth_bits(high & 0xFFFFu));
        w.w[2 * i + 1] = _mm256_or_si256(w.w[2 * i + 1], fifth_bits(high >> 16));
    }
    if (alone) zero_second(w);
    const __m128 d = halves(u16(p), alone ? 0 : u16(p + 22));
    w.coef = _mm_mul_ps(_mm_movelh_ps(_mm_unpacklo_ps(d, d), _mm_unpackhi_ps(d, d)),
                        _mm_setr_ps(1.0f, -16.0f, 1.0f, -16.0f));
}

template <> inline void decode_pair<Q8_0>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 34;
    w.w[0] = widen_signed(p + 2);
    w.w[1] = widen_signed(p + 18);
    if (alone) {
        zero_second(w);
    } else {
        w.w[2] = widen_signed(p + 36);
        w.w[3] = widen_signed(p + 52);
    }
    w.coef = halves(u16(p), alone ? 0 : u16(p + 34));
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

// K-quant rows hold whole super-blocks of 8 blocks, so a pair never straddles two of them.
template <> inline void decode_pair<Q4_K>(const uint8_t* row, int64_t b, bool, Pair& w) {
    const uint8_t* p = row + (b / 8) * 144;
    const int j = int(b % 8);
    const uint8_t* q = p + 16 + (j / 2) * 32;  // low nibbles: block j, high: block j + 1
    const __m256i v0 = widen(q), v1 = widen(q + 16), mask = _mm256_set1_epi16(0x0F);
    w.w[0] = _mm256_and_si256(v0, mask);
    w.w[1] = _mm256_and_si256(v1, mask);
    w.w[2] = _mm256_srli_epi16(v0, 4);
    w.w[3] = _mm256_srli_epi16(v1, 4);
    int sc0, m0, sc1, m1;
    q4k_scale_min(p + 4, j, sc0, m0);
    q4k_scale_min(p + 4, j + 1, sc1, m1);
    const float d = f16(p), dmin = f16(p + 2);
    w.coef = _mm_setr_ps(d * float(sc0), -(dmin * float(m0)), d * float(sc1), -(dmin * float(m1)));
}

template <> inline void decode_pair<Q6_K>(const uint8_t* row, int64_t b, bool, Pair& w) {
    const uint8_t* p = row + (b / 8) * 210;
    const int j = int(b % 8), half = j / 4, group = j % 4;  // group even: the pair is j, j + 1
    const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192 + 2 * j);  // 2 per block
    const int shift = group < 2 ? 0 : 4;
    for (int i = 0; i < 4; ++i) {  // block j + i / 2, weights 16 * (i % 2) ...
        const uint8_t* low = p + half * 64 + (i / 2) * 32 + (i % 2) * 16;
        const uint8_t* high = p + 128 + half * 32 + (i % 2) * 16;
        const __m256i nib = _mm256_and_si256(_mm256_srli_epi16(widen(low), shift),
                                             _mm256_set1_epi16(0x0F));
        const __m256i two = _mm256_and_si256(_mm256_srli_epi16(widen(high), 2 * (group + i / 2)),
                                             _mm256_set1_epi16(3));
        const __m256i q = _mm256_sub_epi16(_mm256_or_si256(nib, _mm256_slli_epi16(two, 4)),
                                           _mm256_set1_epi16(32));
        w.w[i] = _mm256_mullo_epi16(q, _mm256_set1_epi16(scales[i]));  // |w| <= 4096
    }
    const float d = f16(p + 208);
    w.coef = _mm_setr_ps(d, 0.0f, d, 0.0f);
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
