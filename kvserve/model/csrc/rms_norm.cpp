// RMSNorm fused with the residual add before it, on the CPU: one pass over each row instead
// of the five or six PyTorch ops (add, pow, mean, rsqrt, mul, mul) and their temporaries.
// Rows are independent, so a row's result does not depend on the batch.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"

namespace {

using kvserve::store;
using kvserve::to_float;

// residual (in/out, may be null): residual = x + residual, then out = norm(residual) * weight.
// Without residual: out = norm(x) * weight. The sum is rounded to T before it is normalized,
// as PyTorch does when it adds two T tensors.
template <typename T>
void rms_norm(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t dim,
              float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * dim;
        T* res = residual ? residual + r * dim : nullptr;
        T* o = out + r * dim;
        if (res) {
            for (int64_t i = 0; i < dim; ++i) store(res + i, to_float(xr[i]) + to_float(res[i]));
            xr = res;
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; ++i) ss += to_float(xr[i]) * to_float(xr[i]);
        const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
        for (int64_t i = 0; i < dim; ++i) store(o + i, to_float(xr[i]) * inv * to_float(weight[i]));
    }
}

}  // namespace

extern "C" int kvserve_rms_norm(int dtype, const void* x, void* residual, const void* weight,
                                void* out, int64_t rows, int64_t dim, float eps) {
    if (dtype == 0)
        rms_norm(static_cast<const float*>(x), static_cast<float*>(residual),
                 static_cast<const float*>(weight), static_cast<float*>(out), rows, dim, eps);
    else if (dtype == 1)
        rms_norm(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(residual),
                 static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, dim,
                 eps);
    else
        return -1;
    return 0;
}
