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

/* out = w * (v / rms(v)), v = h + res written back to res (`add`), else v = res.
   h, res, w in the model's dtype; out stored per out_bf. */
INLINE void rmsnorm_impl(const void* h, void* res, const void* w, void* out, int64_t n, float eps, int add, int out_bf, const int mbf) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = ld(res, i, mbf);
        if (add) { v = rnd(ld(h, i, mbf) + v, mbf); st(res, i, v, mbf); }
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) st(out, i, rnd(ld(w, i, mbf) * rnd(ld(res, i, mbf) * r, mbf), mbf), out_bf);
}

/* nb rows of n: h, res [nb, n] (model dtype), out [nb, n] */
void tp_rmsnorm(const void* h, void* res, const void* w, void* out, int64_t n, float eps, int add, int out_bf, int mbf, int64_t nb) {
    const int64_t e = mbf ? 2 : 4, eo = out_bf ? 2 : 4;
    for (int64_t b = 0; b < nb; b++) {
        const char* hb = (const char*)h + b * n * e;
        char* rb = (char*)res + b * n * e;
        char* ob = (char*)out + b * n * eo;
        if (mbf) rmsnorm_impl(hb, rb, w, ob, n, eps, add, out_bf, 1);
        else rmsnorm_impl(hb, rb, w, ob, n, eps, add, out_bf, 0);
    }
}

/* One token's q|k|v (model dtype, the GEMV output; `bias` or 0 added first): rotate-half RoPE
   on q and k with position `pos` of the float32 cos/sin tables [*, hd]; q back in place, k and
   v into the cache slots kc/vc + j * head_stride + pos * hd of kv head j. */
INLINE void qkv_rope_impl(void* qkv, const void* bias, const float* cos_t, const float* sin_t, void* kc, void* vc, int64_t head_stride,
                          int64_t pos, int nq, int nkv, int hd, const int mbf) {
    const float* c = cos_t + pos * hd;
    const float* s = sin_t + pos * hd;
    const int half = hd / 2;
    float tmp[1024];
    for (int h = 0; h < nq + 2 * nkv; h++) {
        int64_t o = (int64_t)h * hd;
        for (int i = 0; i < hd; i++) tmp[i] = bias ? rnd(ld(qkv, o + i, mbf) + ld(bias, o + i, mbf), mbf) : ld(qkv, o + i, mbf);
        int kv = h - nq;  /* >= 0: a k head (< nkv) or a v head */
        if (kv >= nkv) {  /* v: stored as is */
            for (int i = 0; i < hd; i++) st(vc, (int64_t)(kv - nkv) * head_stride + pos * hd + i, tmp[i], mbf);
            continue;
        }
        for (int i = 0; i < hd; i++) {
            float rot = i < half ? -tmp[i + half] : tmp[i - half];
            float v = rnd(rnd(tmp[i] * rnd(c[i], mbf), mbf) + rnd(rot * rnd(s[i], mbf), mbf), mbf);
            if (kv < 0) st(qkv, o + i, v, mbf);
            else st(kc, (int64_t)kv * head_stride + pos * hd + i, v, mbf);
        }
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
INLINE void attn_heads(const attn_args* a, int64_t t0, int64_t t1, const int mbf) {
    const int hd = a->hd;
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
            for (int i = 0; i < hd; i++) d += q[i] * ld(a->kc, base + i, mbf);
            d *= a->scale;
            sc[j] = d;
            m = d > m ? d : m;
        }
        float sum = 0;
        for (int64_t j = 0; j < len; j++) { float e = expf(sc[j] - m); sc[j] = e; sum += e; }
        for (int64_t j = 0; j < len; j++) {
            int64_t base = slot * a->batch_stride + kv * a->head_stride + j * hd;
            float p = sc[j];
            for (int i = 0; i < hd; i++) acc[i] += p * ld(a->vc, base + i, mbf);
        }
        float inv = 1.0f / sum;
        for (int i = 0; i < hd; i++) st(a->out, t * hd + i, rnd(acc[i] * inv, mbf), a->out_bf);
    }
}

static void attn_slice(void* ctx, int64_t h0, int64_t h1) {
    const attn_args* a = (const attn_args*)ctx;
    if (a->mbf) attn_heads(a, h0, h1, 1);
    else attn_heads(a, h0, h1, 0);
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

/* out = silu(gate) * up for gu = gate|up [2n] (model dtype; `bias` [2n] or 0 added first);
   out stored per out_bf */
INLINE void silu_mul_impl(const void* gu, const void* bias, void* out, int64_t n, int out_bf, const int mbf) {
    for (int64_t i = 0; i < n; i++) {
        float g = ld(gu, i, mbf), u = ld(gu, n + i, mbf);
        if (bias) { g = rnd(g + ld(bias, i, mbf), mbf); u = rnd(u + ld(bias, n + i, mbf), mbf); }
        st(out, i, rnd(rnd(g / (1.0f + expf(-g)), mbf) * u, mbf), out_bf);
    }
}

/* nb rows: gu [nb, 2n], out [nb, n] */
void tp_silu_mul(const void* gu, const void* bias, void* out, int64_t n, int out_bf, int mbf, int64_t nb) {
    const int64_t e = mbf ? 2 : 4, eo = out_bf ? 2 : 4;
    for (int64_t b = 0; b < nb; b++) {
        const char* g = (const char*)gu + b * 2 * n * e;
        char* o = (char*)out + b * n * eo;
        if (mbf) silu_mul_impl(g, bias, o, n, out_bf, 1);
        else silu_mul_impl(g, bias, o, n, out_bf, 0);
    }
}
