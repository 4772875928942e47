// Scalar float math written so that the compiler vectorizes the loops that call it, and
// computes the same value for an element wherever it sits in a row or a batch.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvserve {

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

}  // namespace kvserve
