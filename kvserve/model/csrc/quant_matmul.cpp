// y[M, N] = x[M, K] @ W^T on GGUF quantized weights W [N, K], on the CPU, without a float
// copy of W. As in llama.cpp, each row of x is quantized once per call to 8-bit blocks of 32
// (a float scale per block), and each (row, block) pair is an integer dot product
// (maddubs/madd, AVX2) scaled into a float accumulator.
//
// Batch invariance: an output element is always computed by the same sequence of operations
// (one 8-lane float accumulator, blocks in order, one horizontal sum), whatever the tile, the
// thread or the other rows of the call; the library is built without -ffast-math and with
// -ffp-contract=off so the compiler keeps that order. Columns are split across threads.

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#include <algorithm>
#include <vector>

#include "bf16.h"
#include "quant_blocks.h"
#include "thread_pool.h"

namespace {

using namespace kvserve::quant;

// The activations, quantized: per row of K values, K int8, K/2 int16 sums of adjacent pairs,
// K/4 floats d * (sum of 4 consecutive), K/32 scales d.
struct Act {
    int64_t k;
    int8_t* qs;
    int16_t* pair_sums;
    float* quad_sums;
    float* scales;
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <typename X>
void quantize_row(const X* x, const Act& a, int64_t row) {
    const int64_t k = a.k;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / 32; ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = load8(x + b * 32 + i * 8);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float top = _mm_cvtss_f32(m);
        const float d = top / 127.0f;
        const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; ++i)
            q[i] = _mm256_cvtps_epi32(
                _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        // The packs work within 128-bit lanes; the permute puts the 4-byte groups back in order.
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                            _mm256_packs_epi32(q[2], q[3]));
        packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const int64_t at = row * k + b * 32;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.qs + at), packed);
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), packed);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.pair_sums + at / 2), pairs);
        const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        _mm256_storeu_ps(a.quad_sums + at / 4, _mm256_mul_ps(_mm256_cvtepi32_ps(quads),
                                                             _mm256_set1_ps(d)));
        a.scales[at / 32] = d;
    }
}

// One (weight block, activation block) pair into a row's accumulator.
template <int T>
inline __m256 step(const Block& w, const Act& a, int64_t at, __m256 acc) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs + at));
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i dot;
    if constexpr (T == Q8_0) {
        dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w.q, _mm256_sign_epi8(x, w.aux)), ones);
    } else if constexpr (T == Q4_1 || T == Q4_K) {
        dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w.q, x), ones);
    } else {  // unsigned q with an offset: subtract offset * (pair sums of x), exactly
        constexpr int shift = T == Q4_0 ? 3 : T == Q5_0 ? 4 : 5;
        const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.pair_sums + at / 2));
        const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(w.q, x), _mm256_slli_epi16(pairs, shift));
        dot = _mm256_madd_epi16(p, T == Q6_K ? w.aux : ones);
    }
    acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d * a.scales[at / 32]), _mm256_cvtepi32_ps(dot), acc);
    if constexpr (T == Q4_1 || T == Q4_K)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(w.m), _mm256_loadu_ps(a.quad_sums + at / 4), acc);
    return acc;
}

struct Out {
    void* data;
    int dtype;  // 0 float32, 1 bfloat16
    int64_t ld;
    void put(int64_t row, int64_t col, float v) const {
        if (dtype == 0) static_cast<float*>(data)[row * ld + col] = v;
        else kvserve::store(static_cast<uint16_t*>(data) + row * ld + col, v);
    }
};

// NR weight rows x MR activation rows, over the whole K.
template <int T, int NR, int MR>
void tile(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t m0, const Out& out,
          int64_t col) {
    __m256 acc[NR][MR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) acc[r][i] = _mm256_setzero_ps();
    const int64_t num_blocks = a.k / 32;
    // The hardware prefetcher loses track of NR interleaved rows: fetch the next tile ahead.
    const uint8_t* next = w + NR * row_bytes;
    const int64_t ahead = (NR * row_bytes + num_blocks - 1) / num_blocks;
    for (int64_t b = 0; b < num_blocks; ++b) {
        for (int64_t off = 0; off < ahead; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next + b * ahead + off), _MM_HINT_T0);
        Block blocks[NR];
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) decode<T>(w + r * row_bytes, b, blocks[r]);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            const int64_t at = (m0 + i) * a.k + b * 32;
#pragma GCC unroll 8
            for (int r = 0; r < NR; ++r) acc[r][i] = step<T>(blocks[r], a, at, acc[r][i]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < MR; ++i) out.put(m0 + i, col + r, hsum(acc[r][i]));
}

constexpr int64_t kRowChunk = 64;  // activation rows kept hot in L2 while the weights stream

template <int T, int NR>
void columns(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t m0, int64_t m1,
             const Out& out, int64_t col) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) tile<T, NR, 4>(w, row_bytes, a, m, out, col);
    for (; m < m1; ++m) tile<T, NR, 1>(w, row_bytes, a, m, out, col);
}

// Weight rows [lo, hi) of one part, for every activation row.
template <int T>
void run_part(const uint8_t* w, int64_t row_bytes, int64_t lo, int64_t hi, const Act& a,
              int64_t num_rows, const Out& out, int64_t col0) {
    for (int64_t m0 = 0; m0 < num_rows; m0 += kRowChunk) {
        const int64_t m1 = std::min(num_rows, m0 + kRowChunk);
        int64_t n = lo;
        if (num_rows == 1) {
            for (; n + 4 <= hi; n += 4) tile<T, 4, 1>(w + n * row_bytes, row_bytes, a, 0, out, col0 + n);
        } else {
            for (; n + 2 <= hi; n += 2)
                columns<T, 2>(w + n * row_bytes, row_bytes, a, m0, m1, out, col0 + n);
        }
        for (; n < hi; ++n) columns<T, 1>(w + n * row_bytes, row_bytes, a, m0, m1, out, col0 + n);
    }
}

int64_t row_bytes_of(int type, int64_t k) {
    switch (type) {
        case Q4_0: return k / Format<Q4_0>::values * Format<Q4_0>::bytes;
        case Q4_1: return k / Format<Q4_1>::values * Format<Q4_1>::bytes;
        case Q5_0: return k / Format<Q5_0>::values * Format<Q5_0>::bytes;
        case Q8_0: return k / Format<Q8_0>::values * Format<Q8_0>::bytes;
        case Q4_K: return k / Format<Q4_K>::values * Format<Q4_K>::bytes;
        case Q6_K: return k / Format<Q6_K>::values * Format<Q6_K>::bytes;
        default: return -1;
    }
}

bool supported(int type, int64_t k) {
    if (row_bytes_of(type, k) < 0) return false;
    return k % ((type == Q4_K || type == Q6_K) ? 256 : 32) == 0;
}

struct Call {
    const void* x;
    int x_dtype;
    int64_t num_rows, num_cols;
    int num_parts;
    const int* types;
    const uint8_t* const* weights;
    const int64_t* part_rows;
    Act act;
    Out out;
};

constexpr int64_t kChunkCols = 32;  // columns per unit of work shared out to the threads

void quantize_task(void* ctx, int64_t row) {
    const Call& c = *static_cast<const Call*>(ctx);
    if (c.x_dtype == 0) quantize_row(static_cast<const float*>(c.x) + row * c.act.k, c.act, row);
    else quantize_row(static_cast<const uint16_t*>(c.x) + row * c.act.k, c.act, row);
}

void matmul_task(void* ctx, int64_t chunk) {
    const Call& c = *static_cast<const Call*>(ctx);
    const int64_t lo = chunk * kChunkCols, hi = std::min(c.num_cols, lo + kChunkCols);
    int64_t col0 = 0;
    for (int p = 0; p < c.num_parts; col0 += c.part_rows[p], ++p) {
        const int64_t a = std::max(lo, col0) - col0;
        const int64_t b = std::min(hi, col0 + c.part_rows[p]) - col0;
        if (a >= b) continue;
        const uint8_t* w = c.weights[p];
        const int64_t rb = row_bytes_of(c.types[p], c.act.k);
        switch (c.types[p]) {
            case Q4_0: run_part<Q4_0>(w, rb, a, b, c.act, c.num_rows, c.out, col0); break;
            case Q4_1: run_part<Q4_1>(w, rb, a, b, c.act, c.num_rows, c.out, col0); break;
            case Q5_0: run_part<Q5_0>(w, rb, a, b, c.act, c.num_rows, c.out, col0); break;
            case Q8_0: run_part<Q8_0>(w, rb, a, b, c.act, c.num_rows, c.out, col0); break;
            case Q4_K: run_part<Q4_K>(w, rb, a, b, c.act, c.num_rows, c.out, col0); break;
            case Q6_K: run_part<Q6_K>(w, rb, a, b, c.act, c.num_rows, c.out, col0); break;
        }
    }
}

}  // namespace

extern "C" {

int kvserve_quant_available() { return 1; }

// x [m, k] (x_dtype 0 float32, 1 bfloat16), contiguous; the weight is num_parts row blocks
// stacked (a fused projection), part p of types[p] with part_rows[p] rows of k weights;
// out [m, sum(part_rows)] contiguous, out_dtype as x_dtype. Returns 0, or -1 when a type or k
// is not supported (nothing written).
int kvserve_quant_matmul(int x_dtype, const void* x, int64_t m, int64_t k, int num_parts,
                         const int* types, const uint8_t* const* weights,
                         const int64_t* part_rows, int out_dtype, void* out, int num_threads) {
    if ((x_dtype != 0 && x_dtype != 1) || (out_dtype != 0 && out_dtype != 1) || k <= 0) return -1;
    int64_t num_cols = 0;
    for (int p = 0; p < num_parts; ++p) {
        if (!supported(types[p], k)) return -1;
        num_cols += part_rows[p];
    }
    if (m <= 0 || num_cols == 0) return 0;
    thread_local std::vector<uint8_t> buffer;
    buffer.resize(size_t(m * k) * 4 + size_t(m * (k / 32)) * 4 + 64);
    uint8_t* base = buffer.data();
    Act act{k, reinterpret_cast<int8_t*>(base), reinterpret_cast<int16_t*>(base + m * k),
            reinterpret_cast<float*>(base + 2 * m * k), reinterpret_cast<float*>(base + 3 * m * k)};
    Call call{x, x_dtype, m, num_cols, num_parts, types, weights, part_rows, act,
              Out{out, out_dtype, num_cols}};
    if (m >= 8) kvserve::parallel_for(quantize_task, &call, m, num_threads);
    else for (int64_t row = 0; row < m; ++row) quantize_task(&call, row);
    kvserve::parallel_for(matmul_task, &call, (num_cols + kChunkCols - 1) / kChunkCols,
                          num_threads);
    return 0;
}

// Rows ids[i] of a [rows, k] weight of `type`, dequantized to float32 into out [n, k].
int kvserve_quant_dequantize_rows(int type, const uint8_t* w, int64_t k, const int64_t* ids,
                                  int64_t n, float* out) {
    if (!supported(type, k)) return -1;
    const int64_t rb = row_bytes_of(type, k);
    for (int64_t i = 0; i < n; ++i) {
        const uint8_t* row = w + ids[i] * rb;
        float* o = out + i * k;
        switch (type) {
            case Q4_0: dequantize_row<Q4_0>(row, k, o); break;
            case Q4_1: dequantize_row<Q4_1>(row, k, o); break;
            case Q5_0: dequantize_row<Q5_0>(row, k, o); break;
            case Q8_0: dequantize_row<Q8_0>(row, k, o); break;
            case Q4_K: dequantize_row<Q4_K>(row, k, o); break;
            case Q6_K: dequantize_row<Q6_K>(row, k, o); break;
        }
    }
    return 0;
}

}

#else  // no AVX2/FMA/F16C: the model dequantizes its quantized weights instead

extern "C" {
int kvserve_quant_available() { return 0; }
int kvserve_quant_matmul(int, const void*, int64_t, int64_t, int, const int*,
                         const uint8_t* const*, const int64_t*, int, void*, int) { return -1; }
int kvserve_quant_dequantize_rows(int, const uint8_t*, int64_t, const int64_t*, int64_t,
                                  float*) { return -1; }
}

#endif
