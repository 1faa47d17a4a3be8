/* The fused CPU decode step's ops between the GEMVs (kernels/cpu_decode.py): RMSNorm with the
   residual add, bias + RoPE + KV-cache write, attention of one query per head over the cache,
   SiLU(gate) * up. Built into the same library as cpu_gemv.c (whose thread pool runs the
   attention heads).

   Why in C: on CPU a decode token of a small model is ~40 eager torch ops per layer, each a few
   microseconds of dispatch and a fresh allocation; these ops write into buffers the caller
   allocated once, so a decode step allocates nothing.

   Numerics follow the eager model (kernels/reference.py): values are computed in float32 and,
   for a bfloat16 model (`mbf`), rounded to bfloat16 exactly where the eager ops round, so the
   two paths agree to float32 summation order. Each buffer is stored as bfloat16 or float32
   (`*_bf` flags): what the next GEMV reads best. */
#include <stdint.h>
#include <math.h>

int tp_pool_for(void (*fn)(void*, int64_t, int64_t), void* ctx, int64_t n); /* cpu_gemv.c */

#define INLINE static inline __attribute__((always_inline))

INLINE float from_bf16(uint16_t v) { union { uint32_t u; float f; } c; c.u = (uint32_t)v << 16; return c.f; }
INLINE uint16_t bf16_bits(float f) {
    union { uint32_t u; float f; } c; c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}
/* element i of a buffer stored as bfloat16 (bf) or float32 */
INLINE float ld(const void* p, int64_t i, int bf) { return bf ? from_bf16(((const uint16_t*)p)[i]) : ((const float*)p)[i]; }
INLINE void st(void* p, int64_t i, float v, int bf) { if (bf) ((uint16_t*)p)[i] = bf16_bits(v); else ((float*)p)[i] = v; }
/* v rounded to bfloat16 where the eager model (in bfloat16) holds it as bfloat16 */
INLINE float rnd(float v, int mbf) { return mbf ? from_bf16(bf16_bits(v)) : v; }

/* e^x for a float32 x without a library call, so that the loops calling it vectorise (libm's
   expf is a call per value: it was most of SiLU's and the softmax's time). Computed in double:
   x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^10 (relative error < 3e-13),
   2^n put in the exponent bits, then rounded to float32: so the result is expf's correctly
   rounded value except in ~1e-5 of cases (a cheaper float32 polynomial, 1-2 ulp off, moved
   enough activations across an int8 rounding to flip near-ties in the tests). x is clamped to
   [-87, 88] (results 1.6e-38 .. 1.7e38): a softmax's e^(s - max) and SiLU's 1 + e^-g never need
   more. */
INLINE float exp_fast(float xf) {
    double x = xf < -87.0f ? -87.0 : xf > 88.0f ? 88.0 : (double)xf;
    double n = __builtin_rint(x * 1.4426950408889634);
    double r = x - n * 0.69314718055994531;
    double p = 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    union { uint64_t u; double d; } e;
    e.u = (uint64_t)((int64_t)n + 1023) << 52;
    return (float)(p * e.d);
}

/* out = w * (v / rms(v)), v = h + res written back to res (`add`), else v = res.
   h, res, w in the model's dtype; out stored per out_bf. Every flag is a constant in the loops
   (one copy per combination, chosen by the caller), so that they vectorise: with a flag read
   inside, and pointers that may alias, they ran ~8x slower. */
INLINE void rmsnorm_impl(const void* restrict h, void* restrict res, const void* restrict w, void* restrict out, int64_t n, float eps,
                         const int add, const int out_bf, const int mbf) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = ld(res, i, mbf);
        if (add) { v = rnd(ld(h, i, mbf) + v, mbf); st(res, i, v, mbf); }
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) st(out, i, rnd(ld(w, i, mbf) * rnd(ld(res, i, mbf) * r, mbf), mbf), out_bf);
}

/* one call of f with its last three arguments each 0 or 1 as constants */
#define CONST3(f, x, y, z, ...)                                                                   \
    switch (((x) ? 4 : 0) | ((y) ? 2 : 0) | ((z) ? 1 : 0)) {                                      \
    case 0: f(__VA_ARGS__, 0, 0, 0); break; case 1: f(__VA_ARGS__, 0, 0, 1); break;               \
    case 2: f(__VA_ARGS__, 0, 1, 0); break; case 3: f(__VA_ARGS__, 0, 1, 1); break;               \
    case 4: f(__VA_ARGS__, 1, 0, 0); break; case 5: f(__VA_ARGS__, 1, 0, 1); break;               \
    case 6: f(__VA_ARGS__, 1, 1, 0); break; default: f(__VA_ARGS__, 1, 1, 1); break;              \
    }

/* nb rows of n: h, res [nb, n] (model dtype), out [nb, n] */
void tp_rmsnorm(const void* h, void* res, const void* w, void* out, int64_t n, float eps, int add, int out_bf, int mbf, int64_t nb) {
    const int64_t e = mbf ? 2 : 4, eo = out_bf ? 2 : 4;
    for (int64_t b = 0; b < nb; b++) {
        const char* hb = (const char*)h + b * n * e;
        char* rb = (char*)res + b * n * e;
        char* ob = (char*)out + b * n * eo;
        CONST3(rmsnorm_impl, add, out_bf, mbf, hb, rb, w, ob, n, eps)
    }
}

/* One token's q|k|v (model dtype, the GEMV output; `bias` or 0 added first): rotate-half RoPE
   on q and k with position `pos` of the float32 cos/sin tables [*, hd]; q back in place, k and
   v into the cache slots kc/vc + j * head_stride + pos * hd of kv head j. */
INLINE void qkv_rope_impl(void* restrict qkv, const void* restrict bias, const float* restrict cos_t, const float* restrict sin_t, void* restrict kc,
                          void* restrict vc, int64_t head_stride, int64_t pos, int nq, int nkv, int hd, const int mbf) {
    const float* c = cos_t + pos * hd;
    const float* s = sin_t + pos * hd;
    const int half = hd / 2;
    float tmp[1024], cr[1024], sr[1024];
    for (int i = 0; i < hd; i++) { cr[i] = rnd(c[i], mbf); sr[i] = rnd(s[i], mbf); }
    const int64_t e = mbf ? 2 : 4;
    for (int h = 0; h < nq + 2 * nkv; h++) {
        int64_t o = (int64_t)h * hd;
        if (bias) for (int i = 0; i < hd; i++) tmp[i] = rnd(ld(qkv, o + i, mbf) + ld(bias, o + i, mbf), mbf);
        else for (int i = 0; i < hd; i++) tmp[i] = ld(qkv, o + i, mbf);
        int kv = h - nq;  /* >= 0: a k head (< nkv) or a v head */
        if (kv >= nkv) {  /* v: stored as is */
            void* dst = (char*)vc + ((int64_t)(kv - nkv) * head_stride + pos * hd) * e;
            for (int i = 0; i < hd; i++) st(dst, i, tmp[i], mbf);
            continue;
        }
        void* dst = kv < 0 ? (char*)qkv + o * e : (char*)kc + ((int64_t)kv * head_stride + pos * hd) * e;  /* q in place, k into the cache */
        for (int i = 0; i < half; i++)  /* rotate_half: (-x2, x1) */
            st(dst, i, rnd(rnd(tmp[i] * cr[i], mbf) + rnd(-tmp[i + half] * sr[i], mbf), mbf), mbf);
        for (int i = half; i < hd; i++)
            st(dst, i, rnd(rnd(tmp[i] * cr[i], mbf) + rnd(tmp[i - half] * sr[i], mbf), mbf), mbf);
    }
}

/* nb sequences: qkv [nb, (nq + 2 nkv) hd], sequence b at position pos[b] into its cache rows
   kc/vc + slot * batch_stride, slot = slots[b] (slots 0: slot b). Returns -1 (nothing done) for
   a head size the stack buffer does not hold. */
int tp_qkv_rope(void* qkv, const void* bias, const float* cos_t, const float* sin_t, void* kc, void* vc, int64_t head_stride, int64_t batch_stride,
                int nq, int nkv, int hd, int mbf, int64_t nb, const int64_t* pos, const int64_t* slots) {
    if (hd > 1024 || hd % 2) return -1;
    const int64_t e = mbf ? 2 : 4, row = (int64_t)(nq + 2 * nkv) * hd;
    for (int64_t b = 0; b < nb; b++) {
        char* q = (char*)qkv + b * row * e;
        const int64_t slot = slots ? slots[b] : b;
        char* k = (char*)kc + slot * batch_stride * e;
        char* v = (char*)vc + slot * batch_stride * e;
        if (mbf) qkv_rope_impl(q, bias, cos_t, sin_t, k, v, head_stride, pos[b], nq, nkv, hd, 1);
        else qkv_rope_impl(q, bias, cos_t, sin_t, k, v, head_stride, pos[b], nq, nkv, hd, 0);
    }
    return 0;
}

/* Attention of one query per q head over the first `len` cached keys of its kv head:
   softmax(q k^T * scale) v, in float32; out [nq * hd] stored per out_bf. */
typedef struct {
    const void* q; const void* kc; const void* vc; void* out; const int64_t* kv_of_q; float* scratch;
    const int64_t* lens; const int64_t* slots; int64_t q_row, head_stride, batch_stride, scratch_stride; float scale; int nq, nkv, hd, out_bf, mbf;
} attn_args;

/* items [t0, t1) of nb * nq: item t is q head t % nq of sequence t / nq */
INLINE void attn_heads(const attn_args* a, int64_t t0, int64_t t1, const int out_bf, const int mbf, const int HD) {
    const int hd = HD ? HD : a->hd;  /* HD: the head size as a constant (the loops unroll, acc stays in registers), or 0 */
    const void* restrict kc = a->kc;
    const void* restrict vc = a->vc;
    const int group = a->nq / a->nkv;
    for (int64_t t = t0; t < t1; t++) {
        int64_t b = t / a->nq, h = t % a->nq, len = a->lens[b], slot = a->slots ? a->slots[b] : b;
        int64_t kv = a->kv_of_q ? a->kv_of_q[h] : h / group;
        float* sc = a->scratch + t * a->scratch_stride;
        float q[1024], acc[1024];
        for (int i = 0; i < hd; i++) { q[i] = ld(a->q, b * a->q_row + h * hd + i, mbf); acc[i] = 0; }
        float m = -INFINITY;
        for (int64_t j = 0; j < len; j++) {
            int64_t base = slot * a->batch_stride + kv * a->head_stride + j * hd;
            float d = 0;
            for (int i = 0; i < hd; i++) d += q[i] * ld(kc, base + i, mbf);
            d *= a->scale;
            sc[j] = d;
            m = d > m ? d : m;
        }
        float sum = 0;
        for (int64_t j = 0; j < len; j++) { float e = exp_fast(sc[j] - m); sc[j] = e; sum += e; }
        for (int64_t j = 0; j < len; j++) {
            int64_t base = slot * a->batch_stride + kv * a->head_stride + j * hd;
            float p = sc[j];
            for (int i = 0; i < hd; i++) acc[i] += p * ld(vc, base + i, mbf);
        }
        float inv = 1.0f / sum;
        for (int i = 0; i < hd; i++) st(a->out, t * hd + i, rnd(acc[i] * inv, mbf), out_bf);
    }
}

static void attn_slice(void* ctx, int64_t h0, int64_t h1) {
    const attn_args* a = (const attn_args*)ctx;
#define HEADS(ob, mb) (a->hd == 64 ? attn_heads(a, h0, h1, ob, mb, 64) : a->hd == 128 ? attn_heads(a, h0, h1, ob, mb, 128) : attn_heads(a, h0, h1, ob, mb, 0))
    if (a->mbf) { if (a->out_bf) HEADS(1, 1); else HEADS(0, 1); }
    else { if (a->out_bf) HEADS(1, 0); else HEADS(0, 0); }
#undef HEADS
}

/* nb sequences: q rows of q_row values (its first nq * hd are the heads: a qkv row), out
   [nb, nq * hd]; sequence b reads the first lens[b] keys of its cache rows
   kc/vc + slot * batch_stride, slot = slots[b] (slots 0: slot b). kv_of_q: the kv head of each q head, or 0 for equal consecutive
   groups; scratch: nb * nq rows of scratch_stride >= every lens[b] floats. Returns -1 (nothing
   done) for a head size over 1024, a size below 1 or a length over the scratch. */
int tp_decode_attn(const void* q, int64_t q_row, const void* kc, const void* vc, void* out, const int64_t* kv_of_q, float* scratch, int64_t scratch_stride,
                   int64_t head_stride, int64_t batch_stride, float scale, int nq, int nkv, int hd, int out_bf, int mbf, int64_t nb, const int64_t* lens, const int64_t* slots) {
    if (hd < 1 || hd > 1024 || nq < 1 || nkv < 1 || nb < 1) return -1;
    for (int64_t b = 0; b < nb; b++) if (lens[b] < 1 || lens[b] > scratch_stride) return -1;
    attn_args a = {q, kc, vc, out, kv_of_q, scratch, lens, slots, q_row, head_stride, batch_stride, scratch_stride, scale, nq, nkv, hd, out_bf, mbf};
    return tp_pool_for(attn_slice, &a, nb * nq);
}

/* out = silu(gate) * up for gu = gate|up [2n] (model dtype; `bias` [2n] added first if
   has_bias); out stored per out_bf */
INLINE void silu_mul_impl(const void* restrict gu, const void* restrict bias, void* restrict out, int64_t n, const int has_bias, const int out_bf, const int mbf) {
    for (int64_t i = 0; i < n; i++) {
        float g = ld(gu, i, mbf), u = ld(gu, n + i, mbf);
        if (has_bias) { g = rnd(g + ld(bias, i, mbf), mbf); u = rnd(u + ld(bias, n + i, mbf), mbf); }
        st(out, i, rnd(rnd(g / (1.0f + exp_fast(-g)), mbf) * u, mbf), out_bf);
    }
}

/* nb rows: gu [nb, 2n], out [nb, n] */
void tp_silu_mul(const void* gu, const void* bias, void* out, int64_t n, int out_bf, int mbf, int64_t nb) {
    const int64_t e = mbf ? 2 : 4, eo = out_bf ? 2 : 4;
    for (int64_t b = 0; b < nb; b++) {
        const char* g = (const char*)gu + b * 2 * n * e;
        char* o = (char*)out + b * n * eo;
        CONST3(silu_mul_impl, bias != 0, out_bf, mbf, g, bias, o, n)
    }
}

/* A stretch of the decode step recorded once (model/fused_decode.py records each layer's bound
   calls) and run as one call: the same kernels with the same arguments, without a trip through
   Python and ctypes for each (~1-2 us apiece, 10 a layer). An op holds its kernel's number
   and arguments in the order of its signature: the float arguments in `f`, every other one
   (pointers, sizes, flags, the step's per-sequence arrays) in `a`. */
int tp_gemv(const void* W, const void* x, void* y, int64_t K, int64_t N, int kind, int ybf16, int64_t nb);  /* cpu_gemv.c */
int tp_gemv_q8(const int8_t* W, const int16_t* wsum, const float* scales, const float* x, void* y, int64_t K, int64_t N, int ybf16, int64_t nb);
int tp_qgemv(int type, const uint8_t* W, const float* x, void* y, int64_t K, int64_t N, int ybf16, int64_t nb);  /* cpu_quant.c */

enum { OP_GEMV = 1, OP_GEMV_Q8 = 2, OP_QGEMV = 3, OP_RMSNORM = 4, OP_QKV_ROPE = 5, OP_ATTN = 6, OP_SILU_MUL = 7 };
#define OP_ARGS 20
typedef struct { int64_t kind; int64_t a[OP_ARGS]; double f[2]; } tp_op;

#define P(i) ((void*)(intptr_t)a[i])
#define I(i) ((int)a[i])

/* runs ops[0..n) in order; returns 0, or for the first op that fails ((index + 1) << 32) | its
   return code (as uint32), the ops after it not run */
int64_t tp_program_run(const tp_op* ops, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        const int64_t* a = ops[k].a;
        const double* f = ops[k].f;
        int rc = 0;
        switch (ops[k].kind) {
        case OP_GEMV: rc = tp_gemv(P(0), P(1), P(2), a[3], a[4], I(5), I(6), a[7]); break;
        case OP_GEMV_Q8: rc = tp_gemv_q8(P(0), P(1), P(2), P(3), P(4), a[5], a[6], I(7), a[8]); break;
        case OP_QGEMV: rc = tp_qgemv(I(0), P(1), P(2), P(3), a[4], a[5], I(6), a[7]); break;
        case OP_RMSNORM: tp_rmsnorm(P(0), P(1), P(2), P(3), a[4], (float)f[0], I(5), I(6), I(7), a[8]); break;
        case OP_QKV_ROPE: rc = tp_qkv_rope(P(0), P(1), P(2), P(3), P(4), P(5), a[6], a[7], I(8), I(9), I(10), I(11), a[12], P(13), P(14)); break;
        case OP_ATTN:
            rc = tp_decode_attn(P(0), a[1], P(2), P(3), P(4), P(5), P(6), a[7], a[8], a[9], (float)f[0], I(10), I(11), I(12), I(13), I(14), a[15], P(16), P(17));
            break;
        case OP_SILU_MUL: tp_silu_mul(P(0), P(1), P(2), a[3], I(4), I(5), a[6]); break;
        default: rc = -1;
        }
        if (rc) return ((k + 1) << 32) | (uint32_t)rc;
    }
    return 0;
}
#undef P
#undef I
