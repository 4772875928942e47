// Attention straight from the paged KV cache, on the CPU.
//
// Each query row reads its keys and values through its block table: no copy of the context is
// made, and the cost is the tokens actually attended. Decodes are one row per sequence; the
// queries of a prefill chunk over int8 rows come as rows sharing one table, each with its own
// causal length, and are computed in tiles that load each key and value once. A task is a
// tile and one kv head, and a row's result depends on nothing else in the call, so a token is
// computed the same alone, batched, or in a prefill chunk. Built and loaded by
// kvserve/model/cpu_kernels.py, run on its persistent thread pool (thread_pool.h).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "kv_int8.h"
#include "thread_pool.h"
#include "vec_math.h"

namespace {

using kvserve::exp_nonpositive;
using kvserve::row_width;
using kvserve::store;
using kvserve::to_float;

constexpr int kMaxHeads = 128;
constexpr int kTile = 16;  // queries of one sequence computed together (a prefill chunk)

struct Args {
    const void* q;        // [num_rows, num_heads, head_dim], rows q_stride elements apart
    const void* k_cache;  // [num_slots, num_kv_heads, row_width<C>(head_dim)]
    const void* v_cache;
    const int64_t* block_tables;  // [num_rows, table_stride]; stride 0: one table for all
    const int64_t* context_lens;  // [num_rows]
    void* out;                    // [num_rows, num_heads, head_dim]
    int64_t q_stride, table_stride;
    int num_rows, num_heads, num_kv_heads, block_size;
    float scale;
    int window;  // > 0: attend only to the last `window` positions (sliding-window layers)
};

// Eight floats: the compiler maps it to one AVX2 register, half an AVX-512 one, or SSE pairs.
typedef float v8 __attribute__((vector_size(32)));
constexpr int kBlock = 8;  // positions whose K (or V) rows are loaded together: lanes of a v8

inline v8 load8(const float* p) {
    v8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

// A cache row's values as float (in place for a float cache, else converted into `buf`; an
// int8 value times its group's scale, exact). int8 takes two vector passes, convert then
// scale: GCC 12 leaves one loop with a scale per group scalar (3x slower decode).
template <typename C, int D>
inline const float* load_row(const C* row, float* buf) {
    if constexpr (std::is_same_v<C, float>) {
        return row;
    } else if constexpr (std::is_same_v<C, int8_t>) {
        constexpr int G = kvserve::kGroup;
        float scale[D / G];  // read before buf is written (an int8_t* may alias it)
        for (int g = 0; g < D / G; ++g) scale[g] = kvserve::group_scale(row, D, g);
        for (int i = 0; i < D; ++i) buf[i] = to_float(row[i]);
        for (int g = 0; g < D / G; ++g)
            for (int i = g * G; i < (g + 1) * G; ++i) buf[i] *= scale[g];
        return buf;
    } else {
        for (int i = 0; i < D; ++i) buf[i] = to_float(row[i]);
        return buf;
    }
}

#if defined(__clang__)
#define KV_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t v8i __attribute__((vector_size(32)));
#define KV_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// Sums of neighbouring lanes of a and b: [a01, a23, b01, b23, a45, a67, b45, b67].
inline v8 add_pairs(v8 a, v8 b) {
    return KV_SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
           KV_SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// The lane sums of x[0..7] as one vector (lane p: the sum of x[p]), in one fixed tree.
inline v8 sum_lanes(const v8* x) {
    const v8 g0 = add_pairs(add_pairs(x[0], x[1]), add_pairs(x[2], x[3]));
    const v8 g1 = add_pairs(add_pairs(x[4], x[5]), add_pairs(x[6], x[7]));
    return KV_SHUFFLE(g0, g1, 0, 1, 2, 3, 8, 9, 10, 11) +
           KV_SHUFFLE(g0, g1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// q . k[p] in lane p, for the kBlock rows k[p]: per lane, D / 8 multiply-adds in channel
// order, then sum_lanes.
template <int D>
inline v8 dots(const float* q, const float* const* k) {
    v8 acc[kBlock] = {};
#pragma GCC unroll 32
    for (int c = 0; c < D; c += 8) {
        const v8 qc = load8(q + c);
#pragma GCC unroll 8
        for (int p = 0; p < kBlock; ++p) acc[p] += qc * load8(k[p] + c);
    }
    return sum_lanes(acc);
}

// Scratch of one thread, reused from call to call.
struct Scratch {
    std::vector<float> q, scores, acc, rows;
};

// One task: the query heads of kv heads [kv0, kv1), for rows [row0, row0 + nq) that share
// one block table and each attend causally up to its own context length (nq = 1: a decode).
// Positions are taken kBlock at a time, their K (then V) rows loaded once for all the task's
// queries. Every query's arithmetic (each score, the softmax, the weighted sum in position
// order) is the same whatever nq, its row, the heads alongside or the other rows, so a token
// is computed the same alone, batched, or as part of a prefill chunk.
// T: the query and output element; C: the cache element (T, another float type, or int8
// rows, read back as floats with their group scales as the rows are loaded).
template <typename T, typename C, int D>
void attend(const Args& a, int row0, int nq, int kv0, int kv1, Scratch& sc) {
    const int group = a.num_heads / a.num_kv_heads, bs = a.block_size, nkv = kv1 - kv0;
    constexpr int R = row_width<C>(D);
    const int64_t stride = int64_t(a.num_kv_heads) * R;  // slot stride
    const int64_t* table = a.block_tables + row0 * a.table_stride;
    int64_t first[kTile], end[kTile], lo = INT64_MAX, hi = 0;
    for (int j = 0; j < nq; ++j) {
        end[j] = a.context_lens[row0 + j];
        first[j] = a.window > 0 && end[j] > a.window ? end[j] - a.window : 0;
        lo = first[j] < lo ? first[j] : lo;
        hi = end[j] > hi ? end[j] : hi;
    }
    // positions lo .. hi - 1 (blocks before lo are not read); score rows kBlock-aligned
    const int64_t len = (hi - lo + kBlock - 1) / kBlock * kBlock;
    const int per_query = nkv * group;  // rows r = j * per_query + (kv - kv0) * group + g
    const int nrows = nq * per_query;
    sc.q.resize(size_t(nrows) * D);
    sc.scores.resize(size_t(nrows) * len);
    sc.acc.assign(size_t(nrows) * D, 0.f);
    sc.rows.resize(size_t(kBlock) * D);
    float* qf = sc.q.data();
    float* s = sc.scores.data();
    float* acc = sc.acc.data();
    for (int r = 0; r < nrows; ++r) {
        const int j = r / per_query, h = kv0 * group + r % per_query;
        const T* qh = static_cast<const T*>(a.q) + (row0 + j) * a.q_stride + h * D;
        float* f = qf + r * D;
        if constexpr (std::is_same_v<C, int8_t>) {  // keys are stored rotated (kv_int8.h)
            for (int i = 0; i < D; ++i) f[i] = to_float(qh[i]);
            kvserve::hadamard(f, D);
            const float m = a.scale / kvserve::hadamard_size(D);
            for (int i = 0; i < D; ++i) f[i] *= m;
        } else {
            for (int i = 0; i < D; ++i) f[i] = to_float(qh[i]) * a.scale;
        }
    }
    // body(r, t0, rows, tb, te) for each block of kBlock positions lo + t0 + p of `cache`,
    // each kv head, and each (query, head) row r that attends to positions lo + [tb, te) of
    // the block; rows[p] is the float row of lo + t0 + p (zeros past hi). A block's rows are
    // loaded once for all.
    alignas(64) static const float zeros[D] = {};
    auto each_block = [&](const void* cache, auto&& body) {
        // Slots are found by walking the table position by position (no division each), a
        // block ahead, so that the next block's rows can be prefetched.
        const C* const base = static_cast<const C*>(cache);
        int64_t blk = lo / bs, off = lo % bs;  // of the next position to look up
        auto look_up = [&](const C** out, int count) {
            for (int p = 0; p < count; ++p) {
                out[p] = base + (table[blk] * bs + off) * stride;
                if (++off == bs) off = 0, ++blk;
            }
        };
        auto count = [&](int64_t t0) {  // positions of the block from lo + t0
            return int(std::clamp<int64_t>(hi - lo - t0, 0, kBlock));
        };
        const C* slots[kBlock];
        const C* ahead[kBlock];
        look_up(ahead, count(0));
        for (int64_t t0 = 0; t0 < hi - lo; t0 += kBlock) {
            const int n = count(t0);
            std::copy(ahead, ahead + n, slots);
            const int num_ahead = count(t0 + kBlock);
            look_up(ahead, num_ahead);
            for (int p = 0; p < num_ahead; ++p) {
                const char* next = reinterpret_cast<const char*>(ahead[p]);
                for (int64_t b = kv0 * R * sizeof(C); b < kv1 * R * sizeof(C); b += 64)
                    __builtin_prefetch(next + b);
            }
            for (int kv = kv0; kv < kv1; ++kv) {
                const float* rows[kBlock];
                for (int p = 0; p < kBlock; ++p)
                    rows[p] = p < n ? load_row<C, D>(slots[p] + kv * R, sc.rows.data() + p * D)
                                    : zeros;
                for (int j = 0; j < nq; ++j) {
                    const int64_t tb = first[j] - lo > t0 ? first[j] - lo : t0;
                    const int64_t te = end[j] - lo < t0 + n ? end[j] - lo : t0 + n;
                    if (tb >= te) continue;
                    const int r0 = j * per_query + (kv - kv0) * group;
                    for (int r = r0; r < r0 + group; ++r) body(r, t0, rows, tb, te);
                }
            }
        }
    };
    each_block(a.k_cache, [&](int r, int64_t t0, const float* const* k, int64_t,
                              int64_t) {  // a block of scores q.k
        store8(s + r * len + t0, dots<D>(qf + r * D, k));
    });
    float inv_sum[kTile * kMaxHeads];
    for (int r = 0; r < nrows; ++r) {  // softmax over each query's positions
        const int j = r / per_query;
        float* sr = s + r * len + (first[j] - lo);
        const int64_t n = end[j] - first[j];
        float m = sr[0];
        for (int64_t t = 1; t < n; ++t) m = sr[t] > m ? sr[t] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
            sr[t] = exp_nonpositive(sr[t] - m);
            sum += sr[t];
        }
        inv_sum[r] = 1.f / sum;
    }
    each_block(a.v_cache, [&](int r, int64_t t0, const float* const* v, int64_t tb,
                              int64_t te) {  // weighted values, in position order
        const float* sr = s + r * len;
        float* ar = acc + r * D;
        for (int c0 = 0; c0 < D; c0 += 64) {  // 64 channels kept in registers over the block
            v8 o[8];
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) o[c] = load8(ar + c0 + 8 * c);
            for (int64_t t = tb; t < te; ++t) {
                const float p = sr[t];
                const float* vt = v[t - t0] + c0;
#pragma GCC unroll 8
                for (int c = 0; c < 8; ++c) o[c] += p * load8(vt + 8 * c);
            }
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) store8(ar + c0 + 8 * c, o[c]);
        }
    });
    for (int r = 0; r < nrows; ++r) {
        const int j = r / per_query, h = kv0 * group + r % per_query;
        T* oh = static_cast<T*>(a.out) + (int64_t(row0 + j) * a.num_heads + h) * D;
        for (int i = 0; i < D; ++i) store(oh + i, acc[r * D + i] * inv_sum[r]);
    }
}

// Tasks: a tile of rows, with all kv heads, or one kv head each when there are fewer tiles
// than threads (a long decode alone). Rows with their own tables are tiles of one; rows
// sharing one table (table_stride 0: the queries of one prefill chunk) are tiles of up to
// kTile.
template <typename T, typename C, int D>
struct Job {
    const Args& a;
    int tile, split;  // split: kv heads per task
    static void task(void* ctx, int64_t i) {
        thread_local Scratch scratch;
        const Job& job = *static_cast<const Job*>(ctx);
        const int parts = job.a.num_kv_heads / job.split;
        const int row0 = int(i / parts) * job.tile, kv0 = int(i % parts) * job.split;
        const int nq = job.a.num_rows - row0 < job.tile ? job.a.num_rows - row0 : job.tile;
        attend<T, C, D>(job.a, row0, nq, kv0, kv0 + job.split, scratch);
    }
};

template <typename T, typename C, int D>
void run(const Args& a, int num_threads) {
    const int tile = a.table_stride == 0 ? kTile : 1;
    const int64_t tiles = (a.num_rows + tile - 1) / tile;
    // prefill tiles share nothing across kv heads: a task each keeps the scores small
    const int split = tiles < num_threads || tile > 1 ? 1 : a.num_kv_heads;
    Job<T, C, D> job{a, tile, split};
    kvserve::parallel_for(&Job<T, C, D>::task, &job, tiles * (a.num_kv_heads / split),
                          num_threads);
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
int kvserve_paged_decode(int dtype, int cache_dtype, const void* q, int64_t q_stride,
                         const void* k_cache, const void* v_cache, const int64_t* block_tables,
                         int64_t table_stride, const int64_t* context_lens, void* out,
                         int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, float scale, int window, int num_threads) {
    if (num_heads > kMaxHeads || num_kv_heads < 1 || num_heads % num_kv_heads) return -1;
    if (num_heads / num_kv_heads > kMaxHeads) return -1;
    const Args a{q, k_cache, v_cache, block_tables, context_lens, out, q_stride, table_stride,
                 num_seqs, num_heads, num_kv_heads, block_size, scale, window};
    if (dtype == 0) return dispatch_cache<float>(a, cache_dtype, head_dim, num_threads);
    if (dtype == 1) return dispatch_cache<uint16_t>(a, cache_dtype, head_dim, num_threads);
    return -1;
}

}
