// Rotary embedding and the K/V cache write of one layer, fused, on the CPU: reads the fused
// qkv projection once, writes the rotated queries and keys out and the keys and values into
// their cache slots, in place of about ten PyTorch ops (slices, mul, neg, cat, add, two
// index copies). The rotation is the Hugging Face one: the halves of each head are rotated.

#include <cstdint>
#include <cstring>

#include "bf16.h"

namespace {

using kvserve::store;
using kvserve::to_float;

template <typename T>
inline void rotate(const T* x, const float* cos, const float* sin, T* out, int half) {
    for (int i = 0; i < half; ++i) {
        const float a = to_float(x[i]), b = to_float(x[i + half]);
        store(out + i, a * cos[i] - b * sin[i]);
        store(out + i + half, b * cos[i + half] + a * sin[i + half]);
    }
}

template <typename T>
void rope_cache(const T* qkv, int64_t tokens, int nh, int nkv, int d, const float* cos_table,
                const float* sin_table, const int64_t* positions, const int64_t* slots,
                T* q_out, T* k_out, T* k_cache, T* v_cache) {
    const int64_t row = int64_t(nh + 2 * nkv) * d, half = d / 2;
    for (int64_t t = 0; t < tokens; ++t) {
        const T* x = qkv + t * row;
        const float* cos = cos_table + positions[t] * d;
        const float* sin = sin_table + positions[t] * d;
        for (int h = 0; h < nh; ++h) rotate(x + h * d, cos, sin, q_out + (t * nh + h) * d, half);
        T* kc = k_cache + slots[t] * nkv * d;
        for (int h = 0; h < nkv; ++h) {
            T* k = k_out + (t * nkv + h) * d;
            rotate(x + (nh + h) * d, cos, sin, k, half);
            std::memcpy(kc + h * d, k, sizeof(T) * d);
        }
        std::memcpy(v_cache + slots[t] * nkv * d, x + (nh + nkv) * d, sizeof(T) * nkv * d);
    }
}

}  // namespace

extern "C" int kvserve_rope_cache(int dtype, const void* qkv, int64_t tokens, int num_heads,
                                  int num_kv_heads, int head_dim, const float* cos_table,
                                  const float* sin_table, const int64_t* positions,
                                  const int64_t* slots, void* q_out, void* k_out, void* k_cache,
                                  void* v_cache) {
    if (head_dim % 2) return -1;
    if (dtype == 0)
        rope_cache(static_cast<const float*>(qkv), tokens, num_heads, num_kv_heads, head_dim,
                   cos_table, sin_table, positions, slots, static_cast<float*>(q_out),
                   static_cast<float*>(k_out), static_cast<float*>(k_cache),
                   static_cast<float*>(v_cache));
    else if (dtype == 1)
        rope_cache(static_cast<const uint16_t*>(qkv), tokens, num_heads, num_kv_heads,
                   head_dim, cos_table, sin_table, positions, slots,
                   static_cast<uint16_t*>(q_out), static_cast<uint16_t*>(k_out),
                   static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache));
    else
        return -1;
    return 0;
}
