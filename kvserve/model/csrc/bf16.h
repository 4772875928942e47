// float32 <-> bfloat16 for the CPU kernels: a bfloat16 is the high half of a float32's bits.
// The kernels read float or bfloat16 (as uint16_t) through these and compute in float32.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvserve {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
    uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) {  // round to nearest even; NaN stays NaN
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) { *p = uint16_t((bits >> 16) | 0x40); return; }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *p = uint16_t(bits >> 16);
}

}  // namespace kvserve
