// Rotary embedding and the K/V cache write of one layer, fused, on the CPU: reads the fused
// qkv projection once, writes the rotated queries and keys out and the keys and values into
// their cache slots, in place of about ten PyTorch ops (slices, mul, neg, cat, add, two
// index copies). The rotation is the Hugging Face one: the halves of each head are rotated.
// The cache may hold another element type than the activations: a float type, or int8 rows
// quantized here from the values as rounded to the activation type, keys rotated first
// (kv_int8.h).

#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "kv_int8.h"

namespace {

using kvserve::row_width;
using kvserve::store;
using kvserve::to_float;
using kvserve::write_row;

template <typename T>
inline void rotate(const T* x, const float* cos, const float* sin, T* out, int half) {
    for (int i = 0; i < half; ++i) {
        const float a = to_float(x[i]), b = to_float(x[i + half]);
        store(out + i, a * cos[i] - b * sin[i]);
        store(out + i + half, b * cos[i + half] + a * sin[i + half]);
    }
}

template <typename T, typename C>
void rope_cache(const T* qkv, int64_t tokens, int nh, int nkv, int d, const float* cos_table,
                const float* sin_table, const int64_t* positions, const int64_t* slots,
                T* q_out, T* k_out, C* k_cache, C* v_cache) {
    const int64_t row = int64_t(nh + 2 * nkv) * d, half = d / 2, r = row_width<C>(d);
    for (int64_t t = 0; t < tokens; ++t) {
        const T* x = qkv + t * row;
        const float* cos = cos_table + positions[t] * d;
        const float* sin = sin_table + positions[t] * d;
        for (int h = 0; h < nh; ++h) rotate(x + h * d, cos, sin, q_out + (t * nh + h) * d, half);
        C* kc = k_cache + slots[t] * nkv * r;
        C* vc = v_cache + slots[t] * nkv * r;
        for (int h = 0; h < nkv; ++h) {
            T* k = k_out + (t * nkv + h) * d;
            rotate(x + (nh + h) * d, cos, sin, k, half);
            write_row<true>(k, kc + h * r, d);
            write_row(x + (nh + nkv + h) * d, vc + h * r, d);
        }
    }
}

template <typename T>
int rope_cache_to(int cache_dtype, const T* qkv, int64_t tokens, int nh, int nkv, int d,
                  const float* cos, const float* sin, const int64_t* positions,
                  const int64_t* slots, T* q_out, T* k_out, void* k_cache, void* v_cache) {
    switch (cache_dtype) {
        case 0:
            rope_cache(qkv, tokens, nh, nkv, d, cos, sin, positions, slots, q_out, k_out,
                       static_cast<float*>(k_cache), static_cast<float*>(v_cache));
            return 0;
        case 1:
            rope_cache(qkv, tokens, nh, nkv, d, cos, sin, positions, slots, q_out, k_out,
                       static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache));
            return 0;
        case 2:
            rope_cache(qkv, tokens, nh, nkv, d, cos, sin, positions, slots, q_out, k_out,
                       static_cast<int8_t*>(k_cache), static_cast<int8_t*>(v_cache));
            return 0;
        default:
            return -1;
    }
}

}  // namespace

// dtype (of qkv, q and k): 0 = float32, 1 = bfloat16; cache_dtype: the same codes, or 2 = int8.
extern "C" int kvserve_rope_cache(int dtype, int cache_dtype, const void* qkv, int64_t tokens,
                                  int num_heads, int num_kv_heads, int head_dim,
                                  const float* cos_table, const float* sin_table,
                                  const int64_t* positions, const int64_t* slots, void* q_out,
                                  void* k_out, void* k_cache, void* v_cache) {
    if (head_dim % 2 || head_dim > kvserve::kMaxHeadDim) return -1;
    if (dtype == 0)
        return rope_cache_to(cache_dtype, static_cast<const float*>(qkv), tokens, num_heads,
                             num_kv_heads, head_dim, cos_table, sin_table, positions, slots,
                             static_cast<float*>(q_out), static_cast<float*>(k_out), k_cache,
                             v_cache);
    if (dtype == 1)
        return rope_cache_to(cache_dtype, static_cast<const uint16_t*>(qkv), tokens, num_heads,
                             num_kv_heads, head_dim, cos_table, sin_table, positions, slots,
                             static_cast<uint16_t*>(q_out), static_cast<uint16_t*>(k_out),
                             k_cache, v_cache);
    return -1;
}
