// SwiGLU's activation on the CPU: out = silu(gate) * up, for the rows [gate | up] of the fused
// gate/up projection, in one pass without temporaries. Each element is computed on its own,
// so a row's result does not depend on the batch.

#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "vec_math.h"

namespace {

using kvserve::exp_nonpositive;
using kvserve::store;
using kvserve::to_float;

// silu(x) = x * sigmoid(x); sigmoid from e = exp(-|x|) <= 1, which cannot overflow.
template <typename T>
void silu_mul(const T* gate_up, int64_t rows, int64_t n, T* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* gate = gate_up + r * 2 * n;
        const T* up = gate + n;
        T* o = out + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            const float x = to_float(gate[i]);
            const float e = exp_nonpositive(-std::fabs(x));
            const float sigmoid = (x >= 0.f ? 1.f : e) / (1.f + e);
            store(o + i, x * sigmoid * to_float(up[i]));
        }
    }
}

}  // namespace

// dtype: 0 = float32, 1 = bfloat16. gate_up [rows, 2 n] -> out [rows, n].
extern "C" int kvserve_silu_mul(int dtype, const void* gate_up, int64_t rows, int64_t n,
                                void* out) {
    if (dtype == 0)
        silu_mul(static_cast<const float*>(gate_up), rows, n, static_cast<float*>(out));
    else if (dtype == 1)
        silu_mul(static_cast<const uint16_t*>(gate_up), rows, n, static_cast<uint16_t*>(out));
    else
        return -1;
    return 0;
}
