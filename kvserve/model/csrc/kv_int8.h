// The int8 KV cache row: one token's K (or V) of one kv head is head_dim int8 values followed
// by one bfloat16 scale per group of kGroup values (absmax / 127 of the group rounded up to a
// bfloat16, symmetric). A value reads back as float(q) * scale, exact in float32 (8-bit times
// 8-bit significands). A key row is first rotated by a
// Hadamard transform (unnormalized, in blocks of hadamard_size(head_dim)), which spreads the
// few large channels of keys over the whole row before its scales are chosen; a query
// is rotated the same way and divided by the block size, so q.k is unchanged. kv_quant.py has
// the same rules in PyTorch; the two must agree bit for bit (tests/model/test_kv_quant.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16.h"

namespace kvserve {

constexpr int kGroup = 16;  // values per scale (config.py: KV_GROUP)

inline float to_float(int8_t x) { return float(x); }

// Elements of one cache row of one kv head: head_dim values, and for int8 the scale bytes.
template <typename C>
constexpr int row_width(int d) { return std::is_same_v<C, int8_t> ? d + 2 * (d / kGroup) : d; }

// The scale of group g of an int8 row of d values.
inline float group_scale(const int8_t* row, int d, int g) {
    uint16_t s;
    std::memcpy(&s, row + d + 2 * g, sizeof s);
    return to_float(s);
}

// absmax / 127 rounded up to a bfloat16, so no value of a group clips.
inline uint16_t scale_up(float amax) {
    uint32_t bits;
    const float s = amax / 127.f;
    std::memcpy(&bits, &s, sizeof bits);
    return uint16_t((bits >> 16) + ((bits & 0xFFFFu) != 0));
}

constexpr int kMaxHeadDim = 256;

// The Hadamard block of a head: the largest power of two dividing d (d itself for 64, 128, 256).
constexpr int hadamard_size(int d) { return d & -d; }

// x <- H x in place, H the unnormalized Hadamard matrix in blocks of hadamard_size(d): log2
// stages of butterflies (a, b) -> (a + b, a - b), one rounding each, in the order
// kv_quant.py's rotate() takes them.
__attribute__((optimize("no-associative-math")))
inline void hadamard(float* x, int d) {
    const int n = hadamard_size(d);
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < d; i += 2 * h)
            for (int j = i; j < i + h; ++j) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

// One row of d values of T into the cache: copied, converted, or quantized with its scale
// (a key row rotated first).
template <bool Key = false, typename T, typename C>
inline void write_row(const T* x, C* out, int d) {
    if constexpr (std::is_same_v<T, C>) {
        std::memcpy(out, x, sizeof(T) * d);
    } else if constexpr (std::is_same_v<C, int8_t>) {
        float xf[kMaxHeadDim];
        for (int i = 0; i < d; ++i) xf[i] = to_float(x[i]);
        if constexpr (Key) hadamard(xf, d);
        for (int g = 0; g < d / kGroup; ++g) {
            const float* xg = xf + g * kGroup;
            float amax = 0.f;
            for (int i = 0; i < kGroup; ++i) {
                const float a = xg[i] < 0 ? -xg[i] : xg[i];
                amax = a > amax ? a : amax;
            }
            const uint16_t stored = scale_up(amax);
            const float scale = to_float(stored);
            const float inv = scale > 0.f ? 1.f / scale : 0.f;
            for (int i = 0; i < kGroup; ++i) {
                float r = __builtin_rintf(xg[i] * inv);  // to nearest, ties to even
                r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
                out[g * kGroup + i] = int8_t(r);
            }
            std::memcpy(out + d + 2 * g, &stored, sizeof stored);
        }
    } else {
        for (int i = 0; i < d; ++i) store(out + i, to_float(x[i]));
    }
}

}  // namespace kvserve
