// The int8 KV cache row: one token's K (or V) of one kv head is head_dim int8 values followed
// by their float32 scale (4 bytes), absmax / 127, symmetric. kv_quant.py has the same rule in
// PyTorch; the two must agree bit for bit (tests/model/test_cpu_kernels.py).
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

// One row of d values of T into the cache: copied, converted, or quantized with its scale.
template <typename T, typename C>
inline void write_row(const T* x, C* out, int d) {
    if constexpr (std::is_same_v<T, C>) {
        std::memcpy(out, x, sizeof(T) * d);
    } else if constexpr (std::is_same_v<C, int8_t>) {
        float amax = 0.f;
        for (int i = 0; i < d; ++i) {
            const float a = to_float(x[i]) < 0 ? -to_float(x[i]) : to_float(x[i]);
            amax = a > amax ? a : amax;
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int i = 0; i < d; ++i) {
            float r = __builtin_rintf(to_float(x[i]) * inv);  // to nearest, ties to even
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
