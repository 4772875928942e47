// y[M, N] = x[M, K] @ W^T on GGUF quantized weights W [N, K], on the CPU, without a float
// copy of W. As in llama.cpp, each row of x is quantized once per call to blocks of 32 with a
// float scale, and each (row, block) pair is an integer dot product (AVX2 madd, or AVX-512
// VNNI vpdpwssd where the CPU has it) scaled into a float accumulator. The activations take
// 16 bits (llama.cpp: 8), so that the result stays within float32 rounding of the dequantized
// weights' (8 bits moved top-1 predictions of the default model at 4% of positions); the
// weights are widened to 16 bits as they are unpacked.
//
// Batch invariance: an output element is always computed by the same sequence of operations
// (one 8- or 16-lane float accumulator, blocks in order, one horizontal sum), whatever the
// tile, the thread or the other rows of the call; the library is built without -ffast-math and with
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

// With AVX-512 (BW and VNNI) a pair of blocks is one 512-bit multiply-add (vpdpwssd) per
// half block of both: the 32 values of a register are weights 0..15 of blocks b and b+1, or
// 16..31 of both, and the activations are laid out to match.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KVSERVE_WIDE 1
constexpr int kSecond = 16, kHalfGap = 32;  // where block b+1 starts; values 16..31 of a block
#else
constexpr int kSecond = 32, kHalfGap = 16;
#endif

// The activations, quantized: each row of k values as 16-bit integers in blocks of 32, each
// block with its own scale d = max|x| / 32767 (an odd number of blocks ends with a zero
// block), and per pair of blocks coef = [d_b, d_b * sum(q_b), d_b+1, d_b+1 * sum(q_b+1)].
// A pair's 64 values: b 0..31 then b+1 0..31, or (wide) b 0..15, b+1 0..15, b 16..31,
// b+1 16..31.
struct Act {
    int64_t num_blocks, num_pairs;
    int16_t* qs;
    float* coef;
    const int16_t* x(int64_t row, int64_t pair) const { return qs + (row * num_pairs + pair) * 64; }
    const float* c(int64_t row, int64_t pair) const { return coef + (row * num_pairs + pair) * 4; }
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

// One block of 32 values -> 32 int16 (round to nearest even), values 0..15 at out and 16..31
// at out + kHalfGap, its scale and sum.
template <typename X>
void quantize_block(const X* x, int16_t* out, float& scale, float& scaled_sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
        v[i] = load8(x + i * 8);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float top = _mm_cvtss_f32(m);
    scale = top / 32767.0f;
    const __m256 inv = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
        q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    // packs works within 128-bit lanes; the permute puts the 64-bit groups back in order.
    __m256i sum = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
        const __m256i packed = _mm256_permute4x64_epi64(
            _mm256_packs_epi32(q[2 * h], q[2 * h + 1]), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + kHalfGap * h), packed);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(packed, _mm256_set1_epi16(1)));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    scaled_sum = scale * float(_mm_cvtsi128_si32(s));
}

template <typename X>
void quantize_row(const X* x, const Act& a, int64_t row) {
    for (int64_t pair = 0; pair < a.num_pairs; ++pair) {
        const int64_t b = 2 * pair;
        int16_t* qs = const_cast<int16_t*>(a.x(row, pair));
        float d0, s0, d1 = 0.0f, s1 = 0.0f;
        quantize_block(x + b * 32, qs, d0, s0);
        if (b + 1 < a.num_blocks) {
            quantize_block(x + b * 32 + 32, qs + kSecond, d1, s1);
        } else {
            std::memset(qs + kSecond, 0, 16 * sizeof(int16_t));
            std::memset(qs + kSecond + kHalfGap, 0, 16 * sizeof(int16_t));
        }
        _mm_storeu_ps(const_cast<float*>(a.c(row, pair)), _mm_setr_ps(d0, s0, d1, s1));
    }
}

template <int T> constexpr bool kHasMin = T == Q4_0 || T == Q4_1 || T == Q5_0 || T == Q4_K;

inline __m256i load16x16(const int16_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

#ifdef KVSERVE_WIDE
// A pair of weight blocks as two 512-bit registers of int16: lo = weights 0..15 of b and b+1,
// hi = 16..31 of both; coef as in Pair.
struct Weights {
    __m512i lo, hi;
    __m128 coef;
};
using Acc = __m512;

inline __m512i join(__m256i a, __m256i b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
}

inline __m256i two_loads(const uint8_t* a, const uint8_t* b, bool alone) {  // 16 B each
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
    const __m128i hi = alone ? _mm_setzero_si128()
                             : _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

template <int T>
inline void decode(const uint8_t* row, int64_t b, bool alone, Weights& w) {
    Pair p;  // any type: its 256-bit unpacking, joined
    decode_pair<T>(row, b, alone, p);
    w.lo = join(p.w[0], p.w[2]);
    w.hi = join(p.w[1], p.w[3]);
    w.coef = p.coef;
}

// Q4_1 (the default model's weights): both blocks' nibbles widened at once.
template <>
inline void decode<Q4_1>(const uint8_t* row, int64_t b, bool alone, Weights& w) {
    const uint8_t* p = row + b * 20;
    const __m512i v = _mm512_cvtepu8_epi16(two_loads(p + 4, p + 24, alone));
    w.lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0F));
    w.hi = _mm512_srli_epi16(v, 4);
    w.coef = halves(u32(p), alone ? 0 : u32(p + 20));
}

// Q8_0 (the default model's embedding and LM head).
template <>
inline void decode<Q8_0>(const uint8_t* row, int64_t b, bool alone, Weights& w) {
    const uint8_t* p = row + b * 34;
    w.lo = _mm512_cvtepi8_epi16(two_loads(p + 2, p + 36, alone));
    w.hi = _mm512_cvtepi8_epi16(two_loads(p + 18, p + 52, alone));
    w.coef = halves(u16(p), alone ? 0 : u16(p + 34));
}

// One pair of weight blocks against one row's pair of activation blocks: int32 lanes 0..7
// sum block b's products, 8..15 block b+1's (4 each, |w| <= 4096, |x| <= 32767: in range);
// each lane is scaled into acc. Lanes 1 and 3 of min_acc gather m * d_x * sum(q_x), the part
// of the dot product the offsets m make.
template <int T>
inline void step(const Weights& w, const Act& a, int64_t row, int64_t pair, Acc& acc,
                 __m128& min_acc) {
    const int16_t* x = a.x(row, pair);
    __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w.lo, _mm512_loadu_si512(x));
    dot = _mm512_dpwssd_epi32(dot, w.hi, _mm512_loadu_si512(x + 32));
    const __m128 prod = _mm_mul_ps(w.coef, _mm_loadu_ps(a.c(row, pair)));
    const __m512 scale = _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
        _mm512_castps128_ps512(prod));
    acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc);
    if constexpr (kHasMin<T>) min_acc = _mm_add_ps(min_acc, prod);
}

inline Acc zero_acc() { return _mm512_setzero_ps(); }
inline float acc_sum(Acc v) {  // one fixed order: the two halves, then hsum
    return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
#else
using Weights = Pair;
using Acc = __m256;

template <int T>
inline void decode(const uint8_t* row, int64_t b, bool alone, Weights& w) {
    decode_pair<T>(row, b, alone, w);
}

// One pair of weight blocks against one row's pair of activation blocks. acc gathers the
// scaled integer dot products (lanes 0, 1, 4, 5: block b; 2, 3, 6, 7: block b+1); lanes 1 and
// 3 of min_acc gather m * d_x * sum(q_x), the part of the dot product the offsets m make.
template <int T>
inline void step(const Pair& w, const Act& a, int64_t row, int64_t pair, __m256& acc,
                 __m128& min_acc) {
    const int16_t* x = a.x(row, pair);
    // |w| <= 4096 and |x| <= 32767: each int32 lane below sums 8 products, well within range.
    const __m256i first = _mm256_add_epi32(_mm256_madd_epi16(w.w[0], load16x16(x)),
                                           _mm256_madd_epi16(w.w[1], load16x16(x + 16)));
    const __m256i second = _mm256_add_epi32(_mm256_madd_epi16(w.w[2], load16x16(x + 32)),
                                            _mm256_madd_epi16(w.w[3], load16x16(x + 48)));
    const __m256i dot = _mm256_hadd_epi32(first, second);
    const __m128 prod = _mm_mul_ps(w.coef, _mm_loadu_ps(a.c(row, pair)));
    const __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(prod),
                                                  _mm256_setr_epi32(0, 0, 2, 2, 0, 0, 2, 2));
    acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc);
    if constexpr (kHasMin<T>) min_acc = _mm_add_ps(min_acc, prod);
}

inline Acc zero_acc() { return _mm256_setzero_ps(); }
inline float acc_sum(Acc v) { return hsum(v); }
#endif

struct Out {
    void* data;
    int dtype;  // 0 float32, 1 bfloat16
    int64_t ld;
    void put(int64_t row, int64_t col, float v) const {
        if (dtype == 0) static_cast<float*>(data)[row * ld + col] = v;
        else kvserve::store(static_cast<uint16_t*>(data) + row * ld + col, v);
    }
};

constexpr int64_t kPrefetchBytes = 24 * 1024;  // measured: 8 KB 1.2x slower a token; 16-24 best

// NR weight rows x MR activation rows, over the whole k.
template <int T, int NR, int MR>
void tile(const uint8_t* w, int64_t row_bytes, const Act& a, int64_t m0, const Out& out,
          int64_t col) {
    Acc acc[NR][MR];
    __m128 min_acc[NR][MR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
            acc[r][i] = zero_acc();
            min_acc[r][i] = _mm_setzero_ps();
        }
    // The hardware prefetcher loses track of NR interleaved rows, and one tile ahead is too
    // close to hide the memory's latency: fetch the tile about kPrefetchBytes ahead.
    const int64_t tile_bytes = NR * row_bytes;
    const uint8_t* next = w + std::max<int64_t>(1, kPrefetchBytes / tile_bytes) * tile_bytes;
    const int64_t ahead = (tile_bytes + a.num_pairs - 1) / a.num_pairs;
    for (int64_t pair = 0; pair < a.num_pairs; ++pair) {
        for (int64_t off = 0; off < ahead; off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(next + pair * ahead + off), _MM_HINT_T0);
        const bool alone = 2 * pair + 1 == a.num_blocks;
#pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
            Weights p;
            decode<T>(w + r * row_bytes, 2 * pair, alone, p);
#pragma GCC unroll 8
            for (int i = 0; i < MR; ++i) step<T>(p, a, m0 + i, pair, acc[r][i], min_acc[r][i]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int i = 0; i < MR; ++i) {
            const __m128 m = min_acc[r][i];
            const float offsets = _mm_cvtss_f32(_mm_add_ss(_mm_movehdup_ps(m),
                                                           _mm_movehl_ps(m, _mm_movehdup_ps(m))));
            out.put(m0 + i, col + r, acc_sum(acc[r][i]) + offsets);
        }
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
    const int64_t k = c.act.num_blocks * 32;
    if (c.x_dtype == 0) quantize_row(static_cast<const float*>(c.x) + row * k, c.act, row);
    else quantize_row(static_cast<const uint16_t*>(c.x) + row * k, c.act, row);
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
        const int64_t rb = row_bytes_of(c.types[p], c.act.num_blocks * 32);
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

// A weight of num_parts row blocks stacked (a fused projection): part p has rows[p] rows of k
// weights of types[p], at weights[p].
struct Weight {
    int64_t k;
    int64_t num_parts;
    const int* types;
    const uint8_t* const* weights;
    const int64_t* rows;
};

// 0 if every part's type and k are supported, else -1.
int kvserve_quant_check(const Weight* w) {
    for (int64_t p = 0; p < w->num_parts; ++p)
        if (!supported(w->types[p], w->k)) return -1;
    return 0;
}

// out [m, sum(rows)] = x [m, k] @ w^T, x and out contiguous, dtype 0 float32 or 1 bfloat16
// for both. The weight must have passed kvserve_quant_check.
void kvserve_quant_matmul(const Weight* w, int dtype, const void* x, int64_t m, void* out,
                          int num_threads) {
    int64_t num_cols = 0;
    for (int64_t p = 0; p < w->num_parts; ++p) num_cols += w->rows[p];
    if (m <= 0 || num_cols == 0) return;
    const int64_t num_blocks = w->k / 32, num_pairs = (num_blocks + 1) / 2;
    thread_local std::vector<uint8_t> buffer;
    buffer.resize(size_t(m * num_pairs) * (128 + 16));
    uint8_t* base = buffer.data();
    Act act{num_blocks, num_pairs, reinterpret_cast<int16_t*>(base),
            reinterpret_cast<float*>(base + m * num_pairs * 128)};
    Call call{x, dtype, m, num_cols, int(w->num_parts), w->types, w->weights, w->rows, act,
              Out{out, dtype, num_cols}};
    if (m >= 8) kvserve::parallel_for(quantize_task, &call, m, num_threads);
    else for (int64_t row = 0; row < m; ++row) quantize_task(&call, row);
    kvserve::parallel_for(matmul_task, &call, (num_cols + kChunkCols - 1) / kChunkCols,
                          num_threads);
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
int kvserve_quant_check(const void*) { return -1; }
void kvserve_quant_matmul(const void*, int, const void*, int64_t, void*, int) {}
int kvserve_quant_dequantize_rows(int, const uint8_t*, int64_t, const int64_t*, int64_t,
                                  float*) { return -1; }
}

#endif
