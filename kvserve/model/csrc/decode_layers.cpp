// A decode step's decoder layers in one call (the Llama-family decoder on quantized weights;
// DecodeLayersKernel in cpu_kernels.py). Every sequence of the step has one new token. Each
// layer calls the kernels the module path calls from Python (llama.py), in the same order, on
// the same values: RMSNorm with the residual add, the qkv matmul, rope with the K/V cache
// write, paged decode attention, the o matmul, RMSNorm with the residual add, the gate/up
// matmul, silu(gate) * up, the down matmul. So its results are bit-identical to the module
// path's; what it saves is the Python and PyTorch work between the kernels, which on a small
// model is a good part of a single-stream step.

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" {
int kvserve_rms_norm(int dtype, const void* x, void* residual, const void* weight, void* out,
                     int64_t rows, int64_t dim, float eps);
int kvserve_rope_cache(int dtype, int cache_dtype, const void* qkv, int64_t tokens,
                       int num_heads, int num_kv_heads, int head_dim, const float* cos_table,
                       const float* sin_table, const int64_t* positions, const int64_t* slots,
                       void* q_out, void* k_out, void* k_cache, void* v_cache);
int kvserve_paged_decode(int dtype, int cache_dtype, const void* q, int64_t q_stride,
                         const void* k_cache, const void* v_cache, const int64_t* block_tables,
                         int64_t table_stride, const int64_t* context_lens, void* out,
                         int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, float scale, int window, int num_threads);
int kvserve_silu_mul(int dtype, const void* gate_up, int64_t rows, int64_t n, void* out);
}

namespace {

// kvserve_quant_matmul (quant_matmul.cpp), a library of its own built with other float flags.
using Matmul = void (*)(const void* weight, int dtype, const void* x, int64_t rows, void* out,
                        int num_threads);

// One layer's weights (``weight`` arguments of quant_matmul.cpp) and its K/V cache.
struct Layer {
    const void *input_norm, *post_norm;
    const void *qkv, *o, *gate_up, *down;
    void *k_cache, *v_cache;
};

// What every layer shares: shapes, the step's attention metadata, the matmul.
struct Step {
    Matmul matmul;
    int dtype, cache_dtype;  // codes of kvserve_rope_cache
    int64_t tokens;          // one per sequence
    int hidden, num_heads, num_kv_heads, head_dim, intermediate;
    float eps, scale;
    int window, block_size, matmul_threads, attention_threads;
    const float *cos, *sin;
    const int64_t *positions, *slots;
    const int64_t* block_tables;
    int64_t table_stride;
    const int64_t* context_lens;
};

}  // namespace

// residual: [tokens, hidden], the embeddings in, the residual stream out; x: [tokens, hidden],
// the last layer's MLP output out (the final norm adds it). Returns 0, or -1 when a kernel
// refuses its shape (nothing is then guaranteed about x, residual and the caches' new slots).
extern "C" int kvserve_decode_layers(const Step* s, const Layer* layers, int num_layers,
                                     void* residual, void* x) {
    const int64_t t = s->tokens;
    const size_t elem = s->dtype == 0 ? 4 : 2;
    const int64_t q_size = int64_t(s->num_heads) * s->head_dim;
    const int64_t kv_size = int64_t(s->num_kv_heads) * s->head_dim;
    // Scratch for the activations between kernels, kept between calls: h, qkv, q, k (the
    // rotated keys, read back from the cache), attn, gate_up, act, each on its own cache lines.
    const int64_t sizes[7] = {s->hidden, q_size + 2 * kv_size, q_size, kv_size, q_size,
                              2 * int64_t(s->intermediate), s->intermediate};
    size_t offsets[7], need = 0;
    for (int i = 0; i < 7; ++i) {
        offsets[i] = need;
        need += (elem * t * sizes[i] + 63) / 64 * 64;
    }
    thread_local std::vector<uint8_t> scratch;
    if (scratch.size() < need) scratch.resize(need);
    uint8_t* base = scratch.data();
    void *h = base + offsets[0], *qkv = base + offsets[1], *q = base + offsets[2],
         *k = base + offsets[3], *attn = base + offsets[4], *gate_up = base + offsets[5],
         *act = base + offsets[6];
    for (int i = 0; i < num_layers; ++i) {
        const Layer& l = layers[i];
        // The first layer normalizes the embeddings; later ones add the MLP output first.
        int rc = i == 0 ? kvserve_rms_norm(s->dtype, residual, nullptr, l.input_norm, h, t,
                                           s->hidden, s->eps)
                        : kvserve_rms_norm(s->dtype, x, residual, l.input_norm, h, t,
                                           s->hidden, s->eps);
        s->matmul(l.qkv, s->dtype, h, t, qkv, s->matmul_threads);
        rc |= kvserve_rope_cache(s->dtype, s->cache_dtype, qkv, t, s->num_heads,
                                 s->num_kv_heads, s->head_dim, s->cos, s->sin, s->positions,
                                 s->slots, q, k, l.k_cache, l.v_cache);
        rc |= kvserve_paged_decode(s->dtype, s->cache_dtype, q, q_size, l.k_cache, l.v_cache,
                                   s->block_tables, s->table_stride, s->context_lens, attn,
                                   int(t), s->num_heads, s->num_kv_heads, s->head_dim,
                                   s->block_size, s->scale, s->window, s->attention_threads);
        s->matmul(l.o, s->dtype, attn, t, x, s->matmul_threads);
        rc |= kvserve_rms_norm(s->dtype, x, residual, l.post_norm, h, t, s->hidden, s->eps);
        s->matmul(l.gate_up, s->dtype, h, t, gate_up, s->matmul_threads);
        rc |= kvserve_silu_mul(s->dtype, gate_up, t, s->intermediate, act);
        s->matmul(l.down, s->dtype, act, t, x, s->matmul_threads);
        if (rc != 0) return -1;
    }
    return 0;
}
