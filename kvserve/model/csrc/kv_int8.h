// The int8 KV cache row: one token's K (or V) of one kv head is head_dim int8 values followed
// by their float32 scale (4 bytes), absmax / 127, symmetric. A key row is first rotated by a
// Hadamard transform (unnormalized, in blocks of hadamard_size(head_dim)), which spreads the
// few large channels of keys over the whole row before one scale is chosen for it; a query
// is rotated the same way and divided by the block size, so q.k is unchanged. kv_quant.py has
// the same rules in PyTorch; the two must agree bit for bit (tests/model/test_kv_quant.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bf16.h"

namespace kvserve {

constexpr int kScaleBytes = 4;

inline float to_float(int8_t x) { return float(x); }

// Elements of one cache row of one kv head: head_dim values, and for int8 the scale bytes.
template <typename C>
constexpr int row_width(int d) { return std::is_same_v<C, int8_t> ? d + kScaleBytes : d; }

template <typename C>
inline float row_scale(const C* row, int d) {
    if constexpr (std::is_same_v<C, int8_t>) {
        float s;
        std::memcpy(&s, row + d, sizeof s);
        return s;
    } else {
        return 1.f;
    }
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
        float amax = 0.f;
        for (int i = 0; i < d; ++i) {
            const float a = xf[i] < 0 ? -xf[i] : xf[i];
            amax = a > amax ? a : amax;
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int i = 0; i < d; ++i) {
            float r = __builtin_rintf(xf[i] * inv);  // to nearest, ties to even
            r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
            out[i] = int8_t(r);
        }
        const float scale = amax / 127.f;
        std::memcpy(out + d, &scale, sizeof scale);
    } else {
        for (int i = 0; i < d; ++i) store(out + i, to_float(x[i]));
    }
}

}  // namespace kvserve
