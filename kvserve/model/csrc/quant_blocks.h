// GGUF block formats (ggml's layouts, as gguf.quants reads them) for the quantized matmuls:
// each type unpacks two consecutive blocks of 32 weights into small integers and the float
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
// quant_matmul.cpp takes them: `lo` holds weights 0..15 of both blocks, `hi` weights 16..31
//   lo = [b: 0..15 | b+1: 0..15],  hi = [b: 16..31 | b+1: 16..31]
// (the activations are laid out the same way), and coef = [d_b, m_b, d_b+1, m_b+1]: weight
// i = d * q_i + m. Q8_0: lo/hi hold |q| and lo_aux/hi_aux the signed q; Q6_K: the weight is
// d * (q - 32) times the int16 scale of its 16 weights, in lo_aux / hi_aux. A lone last block
// (an odd number of blocks) has zeros in place of b+1.
struct Pair {
    __m256i lo, hi, lo_aux, hi_aux;
    __m128 coef;
};

inline __m256i load32(const uint8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline __m128i load16(const uint8_t* p) {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// Nibble bytes of two blocks (16 each; the second zero when alone) -> lo, hi.
inline void split_nibbles(__m128i first, __m128i second, Pair& w) {
    const __m256i bytes = _mm256_set_m128i(second, first);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    w.lo = _mm256_and_si256(bytes, mask);
    w.hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
}

// Two blocks of 32 values in order -> lo, hi.
inline void interleave(__m256i first, __m256i second, Pair& w) {
    w.lo = _mm256_permute2x128_si256(first, second, 0x20);
    w.hi = _mm256_permute2x128_si256(first, second, 0x31);
}

inline __m128 halves(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
    return _mm_cvtph_ps(_mm_setr_epi16(short(a), short(b), short(c), short(d), 0, 0, 0, 0));
}

inline uint16_t u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

template <int T> inline void decode_pair(const uint8_t* row, int64_t b, bool alone, Pair& w);

// Q4_0 and Q5_0 become d * q + m with m = -8 d or -16 d (exact in float).
template <> inline void decode_pair<Q4_0>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 18;
    split_nibbles(load16(p + 2), alone ? _mm_setzero_si128() : load16(p + 20), w);
    const __m128 d = halves(u16(p), 0, alone ? 0 : u16(p + 18), 0);
    w.coef = _mm_mul_ps(_mm_movelh_ps(_mm_unpacklo_ps(d, d), _mm_unpackhi_ps(d, d)),
                        _mm_setr_ps(1.0f, -8.0f, 1.0f, -8.0f));
}

template <> inline void decode_pair<Q4_1>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 20;
    split_nibbles(load16(p + 4), alone ? _mm_setzero_si128() : load16(p + 24), w);
    w.coef = halves(u16(p), u16(p + 2), alone ? 0 : u16(p + 20), alone ? 0 : u16(p + 22));
}

inline __m256i bit4_from_mask(uint32_t bits) {  // bit i of bits -> 16 in byte i, else 0
    const __m256i which_byte = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                 0x0101010101010101, 0x0000000000000000);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), which_byte);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(16));
}

template <> inline void decode_pair<Q5_0>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 22;
    uint32_t high0, high1 = 0;
    std::memcpy(&high0, p + 2, 4);
    if (!alone) std::memcpy(&high1, p + 24, 4);
    split_nibbles(load16(p + 6), alone ? _mm_setzero_si128() : load16(p + 28), w);
    // bit i of a block's mask is weight i's fifth bit: weights 0..15 join lo, 16..31 hi.
    const __m256i h_lo = bit4_from_mask((high0 & 0xFFFFu) | (high1 << 16));
    const __m256i h_hi = bit4_from_mask((high0 >> 16) | (high1 & 0xFFFF0000u));
    w.lo = _mm256_or_si256(w.lo, h_lo);
    w.hi = _mm256_or_si256(w.hi, h_hi);
    const __m128 d = halves(u16(p), 0, alone ? 0 : u16(p + 22), 0);
    w.coef = _mm_mul_ps(_mm_movelh_ps(_mm_unpacklo_ps(d, d), _mm_unpackhi_ps(d, d)),
                        _mm_setr_ps(1.0f, -16.0f, 1.0f, -16.0f));
}

template <> inline void decode_pair<Q8_0>(const uint8_t* row, int64_t b, bool alone, Pair& w) {
    const uint8_t* p = row + b * 34;
    interleave(load32(p + 2), alone ? _mm256_setzero_si256() : load32(p + 36), w);
    w.lo_aux = w.lo;
    w.hi_aux = w.hi;
    w.lo = _mm256_abs_epi8(w.lo);  // -128 -> 128 as unsigned: still exact
    w.hi = _mm256_abs_epi8(w.hi);
    w.coef = halves(u16(p), 0, alone ? 0 : u16(p + 34), 0);
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
    const __m256i bytes = load32(p + 16 + (j / 2) * 32);  // low nibbles: block j, high: j + 1
    const __m256i mask = _mm256_set1_epi8(0x0F);
    interleave(_mm256_and_si256(bytes, mask),
               _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask), w);
    int sc0, m0, sc1, m1;
    q4k_scale_min(p + 4, j, sc0, m0);
    q4k_scale_min(p + 4, j + 1, sc1, m1);
    const float d = f16(p), dmin = f16(p + 2);
    w.coef = _mm_setr_ps(d * float(sc0), -(dmin * float(m0)), d * float(sc1), -(dmin * float(m1)));
}

template <> inline void decode_pair<Q6_K>(const uint8_t* row, int64_t b, bool, Pair& w) {
    const uint8_t* p = row + (b / 8) * 210;
    const int j = int(b % 8), half = j / 4, group = j % 4;  // group even: the pair is j, j + 1
    const __m256i mask = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
    const __m256i first = load32(p + half * 64), second = load32(p + half * 64 + 32);
    const __m256i high = load32(p + 128 + half * 32);
    const int shift = group < 2 ? 0 : 4;
    const __m256i q0 = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi16(first, shift), mask),
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * group), two), 4));
    const __m256i q1 = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi16(second, shift), mask),
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * group + 2), two), 4));
    interleave(q0, q1, w);
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192 + 2 * j);  // 2 per block
    w.lo_aux = _mm256_set_m128i(_mm_set1_epi16(sc[2]), _mm_set1_epi16(sc[0]));
    w.hi_aux = _mm256_set_m128i(_mm_set1_epi16(sc[3]), _mm_set1_epi16(sc[1]));
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
