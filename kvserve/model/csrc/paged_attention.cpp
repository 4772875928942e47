// Decode attention straight from the paged KV cache, on the CPU.
//
// One query token per sequence reads its keys and values through its block table: no copy of
// the context is made, and the cost is the tokens actually attended. Each sequence is one
// task, and a task's result does not depend on the rest of the batch, so a sequence decodes
// the same tokens alone or batched. Built and loaded by kvserve/model/cpu_kernels.py.

#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "kv_int8.h"

namespace {

using kvserve::row_scale;
using kvserve::row_width;
using kvserve::store;
using kvserve::to_float;

// exp(x) for x <= 0, to about 1 ulp, written so that the compiler vectorizes it:
// exp(x) = 2^k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series.
inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float k = __builtin_rintf(x * 1.44269504f);  // round to nearest
    const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;  // ln 2 in two parts
    float p = 1.f / 5040;
    p = p * r + 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t bits = (int32_t(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

constexpr int kMaxHeads = 128;

struct Args {
    const void* q;        // [num_seqs, num_heads, head_dim], sequences q_stride elements apart
    const void* k_cache;  // [num_slots, num_kv_heads, row_width<C>(head_dim)]
    const void* v_cache;
    const int64_t* block_tables;  // [num_seqs, table_stride]
    const int64_t* context_lens;  // [num_seqs]
    void* out;                    // [num_seqs, num_heads, head_dim]
    int64_t q_stride, table_stride;
    int num_seqs, num_heads, num_kv_heads, block_size;
    float scale;
    int window;  // > 0: attend only to the last `window` positions (sliding-window layers)
};

// T: the query and output element; C: the cache element (T, another float type, or int8
// rows whose scale is applied to each dot product and each weight of a V row).
template <typename T, typename C, int D>
void attend(const Args& a, int seq, std::vector<float>& scores) {
    const int nh = a.num_heads, nkv = a.num_kv_heads, group = nh / nkv, bs = a.block_size;
    constexpr int R = row_width<C>(D);
    const int64_t end = a.context_lens[seq], row = int64_t(nkv) * R;  // slot stride
    const int64_t first = a.window > 0 && end > a.window ? end - a.window : 0;
    const int64_t len = end - first;  // positions first .. end - 1; blocks before: not read
    const int64_t* table = a.block_tables + seq * a.table_stride;
    const T* q = static_cast<const T*>(a.q) + seq * a.q_stride;
    const C* kc = static_cast<const C*>(a.k_cache);
    const C* vc = static_cast<const C*>(a.v_cache);

    alignas(64) float qf[kMaxHeads][D];
    for (int h = 0; h < nh; ++h) {
        if constexpr (std::is_same_v<C, int8_t>) {  // keys are stored rotated (kv_int8.h)
            for (int i = 0; i < D; ++i) qf[h][i] = to_float(q[h * D + i]);
            kvserve::hadamard(qf[h], D);
            const float s = a.scale / kvserve::hadamard_size(D);
            for (int i = 0; i < D; ++i) qf[h][i] *= s;
        } else {
            for (int i = 0; i < D; ++i) qf[h][i] = to_float(q[h * D + i]) * a.scale;
        }
    }

    // Scores q.k of every head and position: [num_heads, len].
    scores.resize(size_t(nh) * len);
    float* s = scores.data();
    for (int64_t t = 0; t < len; ++t) {
        const int64_t pos = first + t;
        const C* k = kc + (table[pos / bs] * bs + pos % bs) * row;
        for (int h = 0; h < nh; ++h) {
            const C* kh = k + (h / group) * R;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < D; ++i) dot += qf[h][i] * to_float(kh[i]);
            s[h * len + t] = dot * row_scale(kh, D);
        }
    }
    float inv_sum[kMaxHeads];
    for (int h = 0; h < nh; ++h) {  // softmax over the context, normalized at the end
        float* sh = s + h * len;
        float m = sh[0];
        for (int64_t t = 1; t < len; ++t) m = sh[t] > m ? sh[t] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
            sh[t] = exp_nonpositive(sh[t] - m);
            sum += sh[t];
        }
        inv_sum[h] = 1.f / sum;
    }
    alignas(64) float acc[kMaxHeads][D] = {};
    for (int64_t t = 0; t < len; ++t) {
        const int64_t pos = first + t;
        const C* v = vc + (table[pos / bs] * bs + pos % bs) * row;
        for (int h = 0; h < nh; ++h) {
            const C* vh = v + (h / group) * R;
            const float p = s[h * len + t] * row_scale(vh, D);
#pragma omp simd
            for (int i = 0; i < D; ++i) acc[h][i] += p * to_float(vh[i]);
        }
    }
    T* out = static_cast<T*>(a.out) + int64_t(seq) * nh * D;
    for (int h = 0; h < nh; ++h)
        for (int i = 0; i < D; ++i) store(out + h * D + i, acc[h][i] * inv_sum[h]);
}

template <typename T, typename C, int D>
void run(const Args& a, int num_threads) {
    auto worker = [&](int first) {
        std::vector<float> scores;
        for (int seq = first; seq < a.num_seqs; seq += num_threads)
            attend<T, C, D>(a, seq, scores);
    };
    if (num_threads > a.num_seqs) num_threads = a.num_seqs;
    if (num_threads <= 1) { worker(0); return; }
    std::vector<std::thread> threads;
    for (int i = 1; i < num_threads; ++i) threads.emplace_back(worker, i);
    worker(0);
    for (auto& t : threads) t.join();
}

template <typename T, typename C>
int dispatch(const Args& a, int head_dim, int num_threads) {
    switch (head_dim) {
        case 64: run<T, C, 64>(a, num_threads); return 0;
        case 128: run<T, C, 128>(a, num_threads); return 0;
        case 256: run<T, C, 256>(a, num_threads); return 0;
        default: return -1;
    }
}

template <typename T>
int dispatch_cache(const Args& a, int cache_dtype, int head_dim, int num_threads) {
    switch (cache_dtype) {
        case 0: return dispatch<T, float>(a, head_dim, num_threads);
        case 1: return dispatch<T, uint16_t>(a, head_dim, num_threads);
        case 2: return dispatch<T, int8_t>(a, head_dim, num_threads);
        default: return -1;
    }
}

}  // namespace

extern "C" {

// dtype (of q and out): 0 = float32, 1 = bfloat16; cache_dtype: the same codes, or 2 = int8
// rows (kv_int8.h). Returns 0, or -1 for a shape this kernel does not cover (the caller then
// uses the PyTorch path).
int kvserve_paged_decode(int dtype, int cache_dtype, const void* q, int64_t q_stride, const void* k_cache,
                         const void* v_cache, const int64_t* block_tables, int64_t table_stride,
                         const int64_t* context_lens, void* out, int num_seqs, int num_heads,
                         int num_kv_heads, int head_dim, int block_size, float scale,
                         int window, int num_threads) {
    if (num_heads > kMaxHeads || num_kv_heads < 1 || num_heads % num_kv_heads) return -1;
    const Args a{q, k_cache, v_cache, block_tables, context_lens, out, q_stride, table_stride,
                 num_seqs, num_heads, num_kv_heads, block_size, scale, window};
    if (dtype == 0) return dispatch_cache<float>(a, cache_dtype, head_dim, num_threads);
    if (dtype == 1) return dispatch_cache<uint16_t>(a, cache_dtype, head_dim, num_threads);
    return -1;
}

}
