/* IEEE float16 -> float32, exact (subnormals, infinities, NaN payloads): F16C's conversion
   where the CPU has it, the bits moved by hand elsewhere. Shared by the GEMV kernels
   (cpu_gemv.c: F16 weights) and the GGML block decoders (cpu_quant.c: the blocks' scales). */
#ifndef TP_HALF_H
#define TP_HALF_H
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static inline __attribute__((always_inline)) float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0x1f) u = s | 0x7f800000u | (m << 13);
    else if (e) u = s | ((e + 112) << 23) | (m << 13);
    else if (!m) u = s;
    else {  /* subnormal: m * 2^-24, normalised */
        e = 113;
        while (!(m & 0x400u)) { m <<= 1; e--; }
        u = s | (e << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}
#endif
