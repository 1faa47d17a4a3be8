/* GGML block-quantized weights on CPU (kernels/cpu_quant.py): y = W x straight from the
   quantized blocks (decode), and the blocks decoded to float32 / bfloat16 (prefill tiles, tests).
   Built into the same library as cpu_gemv.c, whose thread pool splits the rows.

   Why: a GGUF model's weights stay in their blocks (a Q4_0 weight is 4.5 bits a value, 7x fewer
   bytes than float32), and decode is memory-bound, so reading those bytes and multiplying them
   in the integer units is what makes a token cheap; decoding them to float32 first would read
   and write 7x the bytes.

   Types (GGML ids): Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8 (blocks of 32 values with a float16
   scale d, and an offset m for _1), Q4_K 12, Q5_K 13, Q6_K 14 (superblocks of 256 values with
   float16 d (and dmin) and 6-bit (Q4_K, Q5_K: 8 sub-blocks of 32, scale and min) or int8 (Q6_K: 16
   sub-blocks of 16) sub-scales). The layouts are those of the gguf package's numpy codecs
   (gguf/quants.py); the decoder follows their float operations one for one, so tp_qdequant is
   bit-exact with gguf.quants.dequantize.

   GEMV: the activations are quantised to int8 at the start of each call, symmetric, d = amax/127
   per 32 values for the 32-blocks (with s = d * sum(q) for the offset terms) and per 256 values
   with 16- and 32-value sums for the K-quants (llama.cpp's q8_K habit), then each row is integer
   dot products of its blocks with those bytes (AVX512-VNNI: vpdpbusd u8 x s8 for the 32-blocks,
   vpmaddubsw + vpdpwssd for the K-quants, which applies the sub-block scales in integers), scaled
   per block in float32. The weights' unsigned payloads are the u8 operand as they are; the
   constant offsets (-8, -16, -32) and the mins come back through the activation block sums.
   With AVX2 alone (no AVX-512: most consumer x86 machines) the 32-blocks take vpmaddubsw +
   vpmaddwd per block, the K-quants vpmaddubsw + vpmaddwd against the sub-block scales; without either a plain C loop gives the
   same values up to float summation order. The error is the
   activations' rounding: at most amax/254 per value of its block (tests/test_cpu_quant.py). */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "half.h"

int tp_pool_for(void (*fn)(void*, int64_t, int64_t), void* ctx, int64_t n); /* cpu_gemv.c */
double tp_emulate_start(void); /* cpu_gemv.c: a slower machine emulated (TP_EMULATE_SLOWER) */
void tp_emulate_end(double t0);

#define BAD_SIZE (-2)
#define INLINE static inline __attribute__((always_inline))
/* the decoder's float operations exactly as written: no fused multiply-add, no reassociation
   (the library is built with -fassociative-math and GCC contracts a * b + c by default) */
#define EXACT __attribute__((optimize("fp-contract=off", "no-associative-math")))

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* X8 + T: a Q4_0 / Q4_1 / Q8_0 weight with its rows interleaved by 8 (tp_qpack): for each group
   of 8 rows and each block k, the 8 rows' scales d (then Q4_1's 8 offsets m), float16, in the
   order 0 2 4 6 1 3 5 7 (the order in which the kernel's pairwise sums leave the rows), then
   the 8 rows' payloads (16 or 32 bytes) in order. Same bytes per block and the same size as
   the file's layout, and group g where rows 8g..8g+7 were: a row range on groups of 8 is still
   a slice. Why: one vector load of 8 scales, and each 32-byte load of nibbles feeds two rows,
   where a row at a time spends more instructions on each block's scale than on its dot product
   (AVX2 without VNNI: 1.3-1.7x the read rate). */
#define X8 100
static const int ORD8[8] = {0, 2, 4, 6, 1, 3, 5, 7};

INLINE int packable(int T) { return T == Q4_0 || T == Q4_1 || T == Q8_0; }

static int sizes(int type, int64_t* block, int64_t* bytes) {
    int64_t b = 32, s;
    if (type > X8 && packable(type - X8)) type -= X8;
    switch (type) {
    case Q4_0: s = 18; break;
    case Q4_1: s = 20; break;
    case Q5_0: s = 22; break;
    case Q5_1: s = 24; break;
    case Q8_0: s = 34; break;
    case Q4_K: b = 256; s = 144; break;
    case Q5_K: b = 256; s = 176; break;
    case Q6_K: b = 256; s = 210; break;
    default: return BAD_SIZE;
    }
    *block = b; *bytes = s;
    return 0;
}

int tp_qtype_block(int type, int64_t* block, int64_t* block_bytes) {
    int64_t b, s;
    if (sizes(type, &b, &s)) return BAD_SIZE;
    if (block) *block = b;
    if (block_bytes) *block_bytes = s;
    return 0;
}

/* ---- scalars ---------------------------------------------------------------------------- */

INLINE uint32_t rd32(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* IEEE float16 (little-endian bytes) -> float32, exact (half.h) */
INLINE float f16(const uint8_t* p) { return half_to_float((uint16_t)(p[0] | p[1] << 8)); }

/* float32 -> bfloat16, round to nearest even, NaN kept quiet (as torch converts) */
INLINE uint16_t bf16_of(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ---- the blocks as integers ------------------------------------------------------------- */

/* a 32-block's values as integers q (its constant offset applied), with value = d * q (+ m) */
INLINE void ints32(int T, const uint8_t* b, int8_t* q, float* d, float* m) {
    *d = f16(b);
    *m = 0;
    if (T == Q8_0) { for (int j = 0; j < 32; j++) q[j] = (int8_t)b[2 + j]; return; }
    if (T == Q4_1 || T == Q5_1) *m = f16(b + 2);
    const int qo = T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : 8;  /* the nibbles */
    const int off = T == Q4_0 ? 8 : T == Q5_0 ? 16 : 0;
    const uint32_t qh = (T == Q5_0 || T == Q5_1) ? rd32(b + qo - 4) : 0;  /* bit j: 5th bit of value j */
    for (int j = 0; j < 16; j++) {
        int lo = b[qo + j] & 15, hi = b[qo + j] >> 4;
        lo |= (int)((qh >> j) & 1u) << 4;
        hi |= (int)((qh >> (j + 16)) & 1u) << 4;
        q[j] = (int8_t)(lo - off);
        q[j + 16] = (int8_t)(hi - off);
    }
}

/* Q4_K / Q5_K: the 12 bytes of 6-bit scales and mins of the 8 sub-blocks. Bytes 0-3 hold the
   scales of 0-3 (low 6 bits) and the top 2 bits of 4-7's; bytes 4-7 the mins likewise; bytes
   8-11 the low 4 bits of scales (low nibble) and mins (high nibble) of 4-7. */
INLINE void kscales(const uint8_t* p, uint64_t* sc, uint64_t* mn) {
    uint32_t u0 = rd32(p), u1 = rd32(p + 4), u2 = rd32(p + 8);
    uint32_t s_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    uint32_t m_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    *sc = (u0 & 0x3f3f3f3fu) | (uint64_t)s_hi << 32;
    *mn = (u1 & 0x3f3f3f3fu) | (uint64_t)m_hi << 32;
}

/* a superblock's 256 values as integers in order: Q4_K / Q5_K q in [0, 31] with value
   = d * sc[s] * q - dmin * mn[s] for sub-block s = i / 32; Q6_K q in [-32, 31] with value
   = d * sc[u] * q for u = i / 16 (sc int8). */
INLINE void intsK(int T, const uint8_t* b, int8_t* q, int16_t* sc, int16_t* mn) {
    if (T == Q6_K) {
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        for (int u = 0; u < 16; u++) sc[u] = (int8_t)b[192 + u];
        /* 32-value group t = 4h + 2sh + part: low nibbles (sh 0) or high (sh 1) of
           ql[64h + 32part + i], 2 high bits at 2(t % 4) of qh[32h + i] */
        for (int t = 0; t < 8; t++) {
            int h = t >> 2, sh = (t >> 1) & 1, part = t & 1, hs = 2 * (t & 3);
            for (int i = 0; i < 32; i++) {
                int lo = (ql[64 * h + 32 * part + i] >> (4 * sh)) & 15;
                int hi = (qh[32 * h + i] >> hs) & 3;
                q[32 * t + i] = (int8_t)((lo | hi << 4) - 32);
            }
        }
        return;
    }
    uint64_t s8, m8;
    kscales(b + 4, &s8, &m8);
    for (int s = 0; s < 8; s++) { sc[s] = (int16_t)((s8 >> (8 * s)) & 0xff); mn[s] = (int16_t)((m8 >> (8 * s)) & 0xff); }
    const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
    const uint8_t* qh = b + 16;
    /* sub-block s: low (s even) or high nibbles of qs[32(s / 2) + i], Q5_K's 5th bit at s of qh[i] */
    for (int s = 0; s < 8; s++)
        for (int i = 0; i < 32; i++) {
            int v = (qs[32 * (s >> 1) + i] >> (4 * (s & 1))) & 15;
            if (T == Q5_K) v |= ((qh[i] >> s) & 1) << 4;
            q[32 * s + i] = (int8_t)v;
        }
}

/* ---- dequantize --------------------------------------------------------------------------- */

/* one row of nblk blocks into out (float32 or bfloat16), the numpy codec's float ops */
EXACT static void dequant_row(int T, const uint8_t* w, void* out, int64_t nblk, int bf) {
    float* of = (float*)out;
    uint16_t* ob = (uint16_t*)out;
    if (T == Q4_K || T == Q5_K || T == Q6_K) {
        const int64_t bs = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
        int8_t q[256];
        int16_t sc[16], mn[8];
        float v[256];
        for (int64_t k = 0; k < nblk; k++) {
            const uint8_t* b = w + k * bs;
            intsK(T, b, q, sc, mn);
            if (T == Q6_K) {
                const float d = f16(b + 208);
                for (int u = 0; u < 16; u++) {
                    const float ds = d * (float)sc[u];
                    for (int i = 0; i < 16; i++) v[16 * u + i] = ds * (float)q[16 * u + i];
                }
            } else {
                const float d = f16(b), dmin = f16(b + 2);
                for (int s = 0; s < 8; s++) {
                    const float ds = d * (float)sc[s], dm = dmin * (float)mn[s];
                    for (int i = 0; i < 32; i++) v[32 * s + i] = ds * (float)q[32 * s + i] - dm;
                }
            }
            if (bf) for (int i = 0; i < 256; i++) ob[256 * k + i] = bf16_of(v[i]);
            else memcpy(of + 256 * k, v, sizeof v);
        }
        return;
    }
    const int64_t bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    int8_t q[32];
    float v[32], d, m;
    for (int64_t k = 0; k < nblk; k++) {
        ints32(T, w + k * bs, q, &d, &m);
        if (T == Q4_1 || T == Q5_1) for (int i = 0; i < 32; i++) v[i] = d * (float)q[i] + m;
        else for (int i = 0; i < 32; i++) v[i] = d * (float)q[i];
        if (bf) for (int i = 0; i < 32; i++) ob[32 * k + i] = bf16_of(v[i]);
        else memcpy(of + 32 * k, v, sizeof v);
    }
}

/* row i (0-7) of an X8 group's block k back in the file's layout, into raw (bs bytes) */
INLINE void unpack_block(int T, const uint8_t* g, int64_t k, int i, uint8_t* raw) {
    const int bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : 34, po = T == Q4_1 ? 32 : 16, pay = bs - (T == Q4_1 ? 4 : 2);
    const uint8_t* b = g + k * 8 * bs;
    int slot = 0;
    while (ORD8[slot] != i) slot++;
    memcpy(raw, b + 2 * slot, 2);
    if (T == Q4_1) memcpy(raw + 2, b + 16 + 2 * slot, 2);
    memcpy(raw + bs - pay, b + po + pay * i, (size_t)pay);
}

typedef struct { int type; const uint8_t* W; void* out; int64_t nblk, rowbytes, K; int bf; } dq_job;

static void dequant_slice(void* c, int64_t r0, int64_t r1) {
    const dq_job* j = (const dq_job*)c;
    if (j->type > X8) {  /* r0, r1: groups of 8 rows; each block back in the file's layout first */
        const int T = j->type - X8, elt = j->bf ? 2 : 4;
        uint8_t raw[34];
        for (int64_t g = r0; g < r1; g++)
            for (int i = 0; i < 8; i++) {
                char* row = (char*)j->out + (8 * g + i) * j->K * elt;
                for (int64_t k = 0; k < j->nblk; k++) {
                    unpack_block(T, j->W + g * 8 * j->rowbytes, k, i, raw);
                    dequant_row(T, raw, row + 32 * k * elt, 1, j->bf);
                }
            }
        return;
    }
    for (int64_t r = r0; r < r1; r++)
        dequant_row(j->type, j->W + r * j->rowbytes, (char*)j->out + r * j->K * (j->bf ? 2 : 4), j->nblk, j->bf);
}

/* rows x K values of `type` blocks (row r at W + r * K / block * block_bytes) -> out [rows, K]
   float32, or bfloat16 (round to nearest even) when out_bf16. 0, or BAD_SIZE (nothing written)
   for K or rows below 1, an unknown type or K not in whole blocks. */
int tp_qdequant(int type, const uint8_t* W, void* out, int64_t K, int64_t rows, int out_bf16) {
    int64_t blk, bs;
    if (sizes(type, &blk, &bs) || K < 1 || rows < 1 || K % blk || (type > X8 && rows % 8)) return BAD_SIZE;
    dq_job j = {type, W, out, K / blk, K / blk * bs, K, out_bf16 != 0};
    const int64_t n = type > X8 ? rows / 8 : rows;
    if (rows * K >= (1 << 16)) return tp_pool_for(dequant_slice, &j, n);
    dequant_slice(&j, 0, n);
    return 0;
}

/* ---- the activations, quantised ----------------------------------------------------------- */

#ifdef __AVX512VNNI__
#define HAS_VNNI 1
#else
#define HAS_VNNI 0
#endif

/* one x row's view of the buffer: int8 values; per 32-block its scale d and d * sum(q); per
   256-superblock its scale d, 16-value sums b16 and 32-value sums b32 */
typedef struct { const int8_t* q; const float* d; const float* ds; const int16_t* b16; const int16_t* b32; } xrow;

/* Q4_K / Q5_K with VNNI: each superblock's eight 32-value groups stored in the order 0 2 1 3
   4 6 5 7, the order in which one 64-byte load of weight nibbles pairs them (its low nibbles
   are groups 2c and 2c + 2, its high ones 2c + 1 and 2c + 3) */
static const int PERM[8] = {0, 2, 1, 3, 4, 6, 5, 7};

static struct {
    uint8_t* mem; size_t cap;
    int8_t* q; float* d; float* ds; int16_t* b16; int16_t* b32;
    const float* x; int64_t K, per_row; int block, perm;  /* per_row: blocks per x row */
} xb;
static pthread_mutex_t q_mu = PTHREAD_MUTEX_INITIALIZER;  /* the buffer's owner: one call at a time */

static size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static int xb_layout(int64_t K, int64_t nb, int block) {
    const int64_t units = nb * (K / block);
    size_t oq = 0, od = oq + up64((size_t)(nb * K)), ods = od + up64(sizeof(float) * (size_t)units),
           o16 = ods + up64(sizeof(float) * (size_t)units), o32 = o16 + up64(sizeof(int16_t) * 16 * (size_t)units),
           end = o32 + up64(sizeof(int16_t) * 8 * (size_t)units) + 64;
    if (end > xb.cap) {
        void* p = 0;
        if (posix_memalign(&p, 64, end)) return -1;
        free(xb.mem);
        xb.mem = (uint8_t*)p; xb.cap = end;
    }
    xb.q = (int8_t*)(xb.mem + oq); xb.d = (float*)(xb.mem + od); xb.ds = (float*)(xb.mem + ods);
    xb.b16 = (int16_t*)(xb.mem + o16); xb.b32 = (int16_t*)(xb.mem + o32);
    return 0;
}

/* Each block of B values -> int8 rint(x / d), d = amax / 127 (both versions alike: max, one
   division, a reciprocal, round to nearest even), and the sums of each 16 values. The 32 values
   of chunk c of a superblock go to 32 * perm[c] (perm 0: in order). */
#ifdef __AVX512F__
/* 16 blocks at a time: their maxima first, then the 16 divisions as two vector ones, then the
   rounding (the blocks' steps overlap instead of each waiting on its own reduction) */
static void quant_units(const float* x, int B, int64_t n, int8_t* q, float* dout, int* s16, const int* perm) {
    float am[16], inv[16];
    for (int64_t u0 = 0; u0 < n; u0 += 16) {
        const int m = n - u0 < 16 ? (int)(n - u0) : 16;
        for (int j = 0; j < m; j++) {
            const float* xj = x + (u0 + j) * B;
            __m512 a = _mm512_abs_ps(_mm512_loadu_ps(xj)), b = _mm512_abs_ps(_mm512_loadu_ps(xj + 16));
            for (int i = 32; i < B; i += 32) {
                a = _mm512_max_ps(a, _mm512_abs_ps(_mm512_loadu_ps(xj + i)));
                b = _mm512_max_ps(b, _mm512_abs_ps(_mm512_loadu_ps(xj + i + 16)));
            }
            am[j] = _mm512_reduce_max_ps(_mm512_max_ps(a, b));
        }
        const __mmask16 km = (__mmask16)((1u << m) - 1);
        const __m512 d = _mm512_div_ps(_mm512_maskz_loadu_ps(km, am), _mm512_set1_ps(127.0f));
        const __mmask16 nz = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_OQ);
        _mm512_storeu_ps(inv, _mm512_maskz_div_ps(nz, _mm512_set1_ps(1.0f), d));
        _mm512_mask_storeu_ps(dout + u0, km, d);
        const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
        for (int j = 0; j < m; j++) {
            const float* xj = x + (u0 + j) * B;
            int8_t* qj = q + (u0 + j) * B;
            int* sj = s16 + (u0 + j) * (B / 16);
            const __m512 vi = _mm512_set1_ps(inv[j]);
            for (int i = 0; i < B; i += 32) {
                __m512 r0 = _mm512_mul_ps(_mm512_loadu_ps(xj + i), vi), r1 = _mm512_mul_ps(_mm512_loadu_ps(xj + i + 16), vi);
                r0 = _mm512_max_ps(_mm512_min_ps(r0, lim), nlim);
                r1 = _mm512_max_ps(_mm512_min_ps(r1, lim), nlim);
                const __m512i q0 = _mm512_cvtps_epi32(r0), q1 = _mm512_cvtps_epi32(r1);  /* MXCSR: nearest even, as rintf */
                int8_t* o = qj + (perm ? 32 * perm[i / 32] : i);
                _mm_storeu_si128((__m128i*)o, _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128((__m128i*)(o + 16), _mm512_cvtepi32_epi8(q1));
                sj[i / 16] = _mm512_reduce_add_epi32(q0);
                sj[i / 16 + 1] = _mm512_reduce_add_epi32(q1);
            }
        }
    }
}
#else
static void quant_units(const float* x, int B, int64_t n, int8_t* q, float* dout, int* s16, const int* perm) {
    for (int64_t u = 0; u < n; u++) {
        const float* xu = x + u * B;
        float amax = 0;
        for (int i = 0; i < B; i++) { float a = fabsf(xu[i]); amax = a > amax ? a : amax; }
        const float d = amax / 127.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
        dout[u] = d;
        for (int i = 0; i < B; i += 16) {
            int s = 0;
            for (int j = i; j < i + 16; j++) {
                float r = xu[j] * inv;
                r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                const int8_t v = (int8_t)rintf(r);
                q[u * B + (perm ? 32 * perm[j / 32] + j % 32 : j)] = v;
                s += v;
            }
            s16[u * (B / 16) + i / 16] = s;
        }
    }
}
#endif

/* units [u0, u1) (a block of one x row each: unit u is block u % per_row of row u / per_row;
   rows are K = per_row * B apart, so unit u starts at x + u * B), 64 at a time */
static void quant_slice(void* c, int64_t u0, int64_t u1) {
    (void)c;
    const int B = xb.block;
    int s16[64 * 16];
    for (int64_t a = u0; a < u1; a += 64) {
        const int64_t n = u1 - a < 64 ? u1 - a : 64;
        quant_units(xb.x + a * B, B, n, xb.q + a * B, xb.d + a, s16, B == 256 && xb.perm ? PERM : 0);
        for (int64_t j = 0; j < n; j++) {
            const int* s = s16 + j * (B / 16);
            const int64_t u = a + j;
            if (B == 32) { xb.ds[u] = xb.d[u] * (float)(s[0] + s[1]); continue; }
            for (int g = 0; g < 16; g++) xb.b16[u * 16 + g] = (int16_t)s[g];
            for (int g = 0; g < 8; g++) xb.b32[u * 8 + g] = (int16_t)(s[2 * g] + s[2 * g + 1]);
        }
    }
}

static xrow xrow_of(int64_t b) {
    const int64_t u = b * xb.per_row;
    xrow r = {xb.q + b * xb.K, xb.d + u, xb.ds + u, xb.b16 + u * 16, xb.b32 + u * 8};
    return r;
}

/* ---- dot products: plain C (the fallback, and the 32-blocks' tail under VNNI) ---------------- */

INLINE float dot32_block(int T, const uint8_t* b, const xrow* x, int64_t k) {
    int8_t q[32];
    float d, m;
    ints32(T, b, q, &d, &m);
    const int8_t* xq = x->q + 32 * k;
    int s = 0;
    for (int i = 0; i < 32; i++) s += q[i] * xq[i];
    float r = d * x->d[k] * (float)s;
    if (T == Q4_1 || T == Q5_1) r += m * x->ds[k];
    return r;
}

INLINE float row32_c(int T, const uint8_t* w, const xrow* x, int64_t nblk) {
    const int64_t bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    float r = 0;
    for (int64_t k = 0; k < nblk; k++) r += dot32_block(T, w + k * bs, x, k);
    return r;
}

/* K-quants, x in natural order (the build without VNNI) */
INLINE float rowK_c(int T, const uint8_t* w, const xrow* x, int64_t nsb) {
    const int64_t bs = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
    float r = 0;
    int8_t q[256];
    int16_t sc[16], mn[8];
    for (int64_t k = 0; k < nsb; k++) {
        const uint8_t* b = w + k * bs;
        const int8_t* xq = x->q + 256 * k;
        intsK(T, b, q, sc, mn);
        if (T == Q6_K) {
            int32_t s = 0;
            for (int u = 0; u < 16; u++) {
                int32_t p = 0;
                for (int i = 0; i < 16; i++) p += q[16 * u + i] * xq[16 * u + i];
                s += sc[u] * p;
            }
            r += x->d[k] * f16(b + 208) * (float)s;
        } else {
            int32_t s = 0, smin = 0;
            for (int g = 0; g < 8; g++) {
                int32_t p = 0;
                for (int i = 0; i < 32; i++) p += q[32 * g + i] * xq[32 * g + i];
                s += sc[g] * p;
                smin += mn[g] * x->b32[8 * k + g];
            }
            r += x->d[k] * (f16(b) * (float)s - f16(b + 2) * (float)smin);
        }
    }
    return r;
}

/* ---- dot products: AVX512-VNNI ---------------------------------------------------------------- */

#if HAS_VNNI
/* m <= 16 consecutive 32-blocks (m a constant 16 in the main loop, so it unrolls): their float16
   scales (and Q4_1 / Q5_1 offsets) by one gather, then pairs of blocks as one 64-byte vector of
   u8 payloads against 64 int8 activations. A short chunk (a row's tail, e.g. K = 576: 18
   blocks) masks the gather and the activation scales, so a pair's missing second block has
   scale 0 (its bytes are the first block's again, never past the row). */
INLINE void chunk32_v(const int T, const uint8_t* p, const xrow* x, int64_t k, const int m, __m512* acc0, __m512* acc1, __m512* corr) {
    const int bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    const int qo = T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : T == Q5_1 ? 8 : 2;  /* payload */
    const __m512i gidx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(bs));
    const __m512i m4 = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
    /* per 16-byte lane: 0 (low nibbles: values 0-15 of a block), 4 (high: 16-31) */
    const __m512i nshift = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    const __m512i pbase = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __mmask16 km = (__mmask16)((1u << m) - 1);
    const __m512i g = m == 16 ? _mm512_i32gather_epi32(gidx, (const void*)p, 1) : _mm512_mask_i32gather_epi32(zero, km, gidx, (const void*)p, 1);
    const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
    const __m512 xd = m == 16 ? _mm512_loadu_ps(x->d + k) : _mm512_maskz_loadu_ps(km, x->d + k);
    const __m512 xds = m == 16 ? _mm512_loadu_ps(x->ds + k) : _mm512_maskz_loadu_ps(km, x->ds + k);
    const __m512 s = _mm512_mul_ps(dw, xd);
    if (T == Q4_1 || T == Q5_1) *corr = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))), xds, *corr);
    else if (T != Q8_0) *corr = _mm512_fmadd_ps(dw, xds, *corr);
#pragma GCC unroll 8
    for (int j = 0; j < (m + 1) / 2; j++) {
        const uint8_t* p0 = p + 2 * j * bs;
        const uint8_t* p1 = 2 * j + 1 < m ? p0 + bs : p0;
        const __m512i xv = 2 * j + 1 < m ? _mm512_loadu_si512(x->q + (k + 2 * j) * 32) : _mm512_maskz_loadu_epi8(0xffffffffULL, x->q + (k + 2 * j) * 32);
        __m512i dot;
        if (T == Q8_0) {
            const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(p0 + 2))), _mm256_loadu_si256((const __m256i*)(p1 + 2)), 1);
            const __mmask64 neg = _mm512_movepi8_mask(z);  /* |w| (u8) against x with w's sign */
            dot = _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(z), _mm512_mask_sub_epi8(xv, neg, zero, xv));
        } else {
            __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(p0 + qo)))),
                                           _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(p1 + qo))), 1);
            z = _mm512_and_si512(_mm512_srlv_epi16(z, nshift), m4);
            if (T == Q5_0 || T == Q5_1) {  /* the 5th bits: byte j of each half is value j */
                const __mmask64 hb = _cvtu64_mask64((uint64_t)rd32(p0 + qo - 4) | (uint64_t)rd32(p1 + qo - 4) << 32);
                z = _mm512_mask_add_epi8(z, hb, z, _mm512_set1_epi8(16));
            }
            dot = _mm512_dpbusd_epi32(zero, z, xv);
        }
        const __m512 sc = _mm512_permutexvar_ps(_mm512_add_epi32(pbase, _mm512_set1_epi32(2 * j)), s);
        if (j & 1) *acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, *acc1);
        else *acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, *acc0);
    }
}

INLINE float row32_v(const int T, const uint8_t* w, const xrow* x, int64_t nblk) {
    const int bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), corr = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= nblk; k += 16) chunk32_v(T, w + k * bs, x, k, 16, &acc0, &acc1, &corr);
    if (k < nblk) chunk32_v(T, w + k * bs, x, k, (int)(nblk - k), &acc0, &acc1, &corr);
    float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    const float c = _mm512_reduce_add_ps(corr);
    if (T == Q4_0) r -= 8.0f * c;
    else if (T == Q5_0) r -= 16.0f * c;
    else if (T == Q4_1 || T == Q5_1) r += c;
    return r;
}

/* K-quants: per superblock, vpmaddubsw (u8 weights x s8 activations, pairs to int16) then
   vpdpwssd against the sub-block scales (int16) sums in int32; d * dx per superblock in float */
INLINE float rowK_v(const int T, const uint8_t* w, const xrow* x, int64_t nsb) {
    const int64_t bs = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    __m512 acc = _mm512_setzero_ps();
    if (T == Q6_K) {
        /* the high 2 bits of group t are at 2(t % 4) of qh: moved to bits 4-5 */
        const __m512i sl0 = _mm512_set_epi64(2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL,
                                             4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL);
        const __m512i sr1 = _mm512_set_epi64(2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 0, 0, 0, 0);
        /* int16 lane -> scale index: 16-value group per 16-byte lane */
        const __m512i si0 = _mm512_set_epi64(0x0003000300030003LL, 0x0003000300030003LL, 0x0002000200020002LL, 0x0002000200020002LL,
                                             0x0001000100010001LL, 0x0001000100010001LL, 0, 0);
        const __m512i four = _mm512_set1_epi16(4);
        __m256 cacc = _mm256_setzero_ps();
        for (int64_t k = 0; k < nsb; k++) {
            const uint8_t* b = w + k * bs;
            const int8_t* xq = x->q + 256 * k;
            const float dd = f16(b + 208) * x->d[k];
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b + 192)));
            /* the offset -32: 32 * sum_u sc[u] * b16[u] */
            const __m256i cm = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)(x->b16 + 16 * k)));
            cacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(cm), _mm256_set1_ps(dd), cacc);
            const __m512i scz = _mm512_castsi256_si512(sc16);
            __m512i is = _mm512_setzero_si512();
            __m512i sidx = si0;
            for (int h = 0; h < 2; h++) {
                const __m512i L = _mm512_loadu_si512(b + 64 * h);
                const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h)));
                const __m512i lo = _mm512_or_si512(_mm512_and_si512(L, m4), _mm512_and_si512(_mm512_sllv_epi16(H, sl0), m30));
                const __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4), _mm512_and_si512(_mm512_srlv_epi16(H, sr1), m30));
                is = _mm512_dpwssd_epi32(is, _mm512_maddubs_epi16(lo, _mm512_loadu_si512(xq + 128 * h)), _mm512_permutexvar_epi16(sidx, scz));
                sidx = _mm512_add_epi16(sidx, four);
                is = _mm512_dpwssd_epi32(is, _mm512_maddubs_epi16(hi, _mm512_loadu_si512(xq + 128 * h + 64)), _mm512_permutexvar_epi16(sidx, scz));
                sidx = _mm512_add_epi16(sidx, four);
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_set1_ps(dd), acc);
        }
        __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(cacc), _mm256_extractf128_ps(cacc, 1));
        c4 = _mm_add_ps(c4, _mm_movehl_ps(c4, c4));
        c4 = _mm_add_ss(c4, _mm_movehdup_ps(c4));
        return _mm512_reduce_add_ps(acc) - 32.0f * _mm_cvtss_f32(c4);
    }
    /* Q4_K / Q5_K: vector v (0-3) holds groups PERM[2v], PERM[2v + 1], one per 32-byte half */
    const __m512i idx[4] = {
        _mm512_set_epi64(0x0002000200020002LL, 0x0002000200020002LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0, 0, 0),
        _mm512_set_epi64(0x0003000300030003LL, 0x0003000300030003LL, 0x0003000300030003LL, 0x0003000300030003LL,
                         0x0001000100010001LL, 0x0001000100010001LL, 0x0001000100010001LL, 0x0001000100010001LL),
        _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0006000600060006LL, 0x0006000600060006LL,
                         0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL),
        _mm512_set_epi64(0x0007000700070007LL, 0x0007000700070007LL, 0x0007000700070007LL, 0x0007000700070007LL,
                         0x0005000500050005LL, 0x0005000500050005LL, 0x0005000500050005LL, 0x0005000500050005LL),
    };
    __m512i hbit[4];  /* Q5_K: the qh bit of group s is bit s */
    for (int v = 0; v < 4; v++) {
        const int s0 = PERM[2 * v], s1 = PERM[2 * v + 1];
        hbit[v] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi8((char)(1 << s0))), _mm256_set1_epi8((char)(1 << s1)), 1);
    }
    const __m512i sixteen = _mm512_set1_epi8(16);
    __m128 macc = _mm_setzero_ps();
    for (int64_t k = 0; k < nsb; k++) {
        const uint8_t* b = w + k * bs;
        const int8_t* xq = x->q + 256 * k;
        const float dx = x->d[k];
        uint64_t s8, m8;
        kscales(b + 4, &s8, &m8);
        const __m128i sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)s8));
        const __m128i mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)m8));
        const __m128i mm = _mm_madd_epi16(mn16, _mm_loadu_si128((const __m128i*)(x->b32 + 8 * k)));
        macc = _mm_fmadd_ps(_mm_cvtepi32_ps(mm), _mm_set1_ps(dx * f16(b + 2)), macc);
        const __m512i scz = _mm512_castsi128_si512(sc16);
        const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
        __m512i H = _mm512_setzero_si512();
        if (T == Q5_K) H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(b + 16)));
        __m512i is = _mm512_setzero_si512();
        for (int c = 0; c < 2; c++) {
            const __m512i z = _mm512_loadu_si512(qs + 64 * c);
            __m512i lo = _mm512_and_si512(z, m4), hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
            if (T == Q5_K) {
                lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(H, hbit[2 * c]), lo, sixteen);
                hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(H, hbit[2 * c + 1]), hi, sixteen);
            }
            is = _mm512_dpwssd_epi32(is, _mm512_maddubs_epi16(lo, _mm512_loadu_si512(xq + 128 * c)), _mm512_permutexvar_epi16(idx[2 * c], scz));
            is = _mm512_dpwssd_epi32(is, _mm512_maddubs_epi16(hi, _mm512_loadu_si512(xq + 128 * c + 64)), _mm512_permutexvar_epi16(idx[2 * c + 1], scz));
        }
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_set1_ps(dx * f16(b)), acc);
    }
    macc = _mm_add_ps(macc, _mm_movehl_ps(macc, macc));
    macc = _mm_add_ss(macc, _mm_movehdup_ps(macc));
    return _mm512_reduce_add_ps(acc) - _mm_cvtss_f32(macc);
}
#define ROW32(T) row32_v(T, w, x, n)
#define ROWK(T) rowK_v(T, w, x, n)
#elif defined(__AVX2__)
/* ---- dot products: AVX2 (most consumer x86 machines have it, and no AVX-512) ------------------- */

/* a 32-block's 16 payload bytes as 32 u8 values: low nibbles are values 0-15, high ones 16-31 */
INLINE __m256i nibbles32(const uint8_t* p) {
    const __m128i t = _mm_loadu_si128((const __m128i*)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
}

/* 0xff in byte j where bit j of v is set */
INLINE __m256i bytes_of_bits(uint32_t v) {
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), spread), bit);
    return _mm256_cmpeq_epi8(b, bit);
}

/* u8 x s8 over 32 bytes as 8 int32 sums, exact: a pair of products is at most 2 * 128 * 127 (Q8_0's
   |w| against |x|), inside vpmaddubsw's int16 */
INLINE __m256i dot_u8s8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* one 32-block per step, two accumulators; the blocks' constant offsets (-8, -16) and Q4_1 /
   Q5_1's m come back through the activation sums (ds), as in the VNNI version */
INLINE float row32_a2(const int T, const uint8_t* w, const xrow* x, int64_t nblk) {
    const int bs = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    const int qo = T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : T == Q5_1 ? 8 : 2;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float corr = 0;
    for (int64_t k = 0; k < nblk; k++) {
        const uint8_t* b = w + k * bs;
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(x->q + 32 * k));
        const float dw = f16(b);
        __m256i dot;
        if (T == Q8_0) {
            const __m256i z = _mm256_loadu_si256((const __m256i*)(b + 2));
            dot = dot_u8s8(_mm256_sign_epi8(z, z), _mm256_sign_epi8(xv, z));  /* |w| against x with w's sign */
        } else {
            __m256i z = nibbles32(b + qo);
            if (T == Q5_0 || T == Q5_1) z = _mm256_or_si256(z, _mm256_and_si256(bytes_of_bits(rd32(b + qo - 4)), _mm256_set1_epi8(16)));
            dot = dot_u8s8(z, xv);
            corr += (T == Q4_1 || T == Q5_1 ? f16(b + 2) : dw) * x->ds[k];
        }
        const __m256 sc = _mm256_set1_ps(dw * x->d[k]);
        if (k & 1) acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc0);
    }
    const __m256 a = _mm256_add_ps(acc0, acc1);
    __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r4 = _mm_add_ps(r4, _mm_movehl_ps(r4, r4));
    r4 = _mm_add_ss(r4, _mm_movehdup_ps(r4));
    float r = _mm_cvtss_f32(r4);
    if (T == Q4_0) r -= 8.0f * corr;
    else if (T == Q5_0) r -= 16.0f * corr;
    else if (T == Q4_1 || T == Q5_1) r += corr;
    return r;
}

INLINE int32_t hsum8_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* K-quants, x in natural order: each 32-value group's u8 weights against its 32 activations by
   vpmaddubsw, then vpmaddwd against the group's sub-block scale(s), summed in int32 per
   superblock (exact: at most 2 * 63 * 127 per pair, times a scale of at most 128); the offsets
   (Q6_K's -32) and the mins through the activation sums, d * dx per superblock in float */
INLINE float rowK_a2(const int T, const uint8_t* w, const xrow* x, int64_t nsb) {
    const int64_t bs = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
    float r = 0;
    for (int64_t k = 0; k < nsb; k++) {
        const uint8_t* b = w + k * bs;
        const int8_t* xq = x->q + 256 * k;
        __m256i is = _mm256_setzero_si256();
        if (T == Q6_K) {
            const int8_t* sc = (const int8_t*)(b + 192);
            for (int t = 0; t < 8; t++) {
                const int h = t >> 2, sh = (t >> 1) & 1, part = t & 1, hs = 2 * (t & 3);
                const __m256i L = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32 * part));
                const __m256i H = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
                const __m256i lo = _mm256_and_si256(sh ? _mm256_srli_epi16(L, 4) : L, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(H, _mm_cvtsi32_si128(hs)), m3);
                const __m256i v = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  /* q + 32, in [0, 63] */
                const __m256i scl = _mm256_set_m128i(_mm_set1_epi16(sc[2 * t + 1]), _mm_set1_epi16(sc[2 * t]));
                is = _mm256_add_epi32(is, _mm256_madd_epi16(_mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i*)(xq + 32 * t))), scl));
            }
            const __m256i c = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)sc)), _mm256_loadu_si256((const __m256i*)(x->b16 + 16 * k)));
            r += x->d[k] * f16(b + 208) * (float)(hsum8_i32(is) - 32 * hsum8_i32(c));
            continue;
        }
        uint64_t s8, m8;
        kscales(b + 4, &s8, &m8);
        const uint8_t* qs = b + (T == Q5_K ? 48 : 16);
        const __m256i qh = T == Q5_K ? _mm256_loadu_si256((const __m256i*)(b + 16)) : _mm256_setzero_si256();
        int32_t smin = 0;
        for (int g = 0; g < 8; g++) {
            const __m256i z = _mm256_loadu_si256((const __m256i*)(qs + 32 * (g >> 1)));
            __m256i v = _mm256_and_si256(g & 1 ? _mm256_srli_epi16(z, 4) : z, m4);
            if (T == Q5_K) {
                const __m256i bit = _mm256_set1_epi8((char)(1 << g));
                v = _mm256_or_si256(v, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(16)));
            }
            const __m256i p = _mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i*)(xq + 32 * g)));
            is = _mm256_add_epi32(is, _mm256_madd_epi16(p, _mm256_set1_epi16((short)((s8 >> (8 * g)) & 0xff))));
            smin += (int32_t)((m8 >> (8 * g)) & 0xff) * x->b32[8 * k + g];
        }
        r += x->d[k] * (f16(b) * (float)hsum8_i32(is) - f16(b + 2) * (float)smin);
    }
    return r;
}
#define ROW32(T) row32_a2(T, w, x, n)
#define ROWK(T) rowK_a2(T, w, x, n)
#else
#define ROW32(T) row32_c(T, w, x, n)
#define ROWK(T) rowK_c(T, w, x, n)
#endif

/* ---- X8: 8 interleaved rows at once -------------------------------------------------------- */

/* the 8 rows' dot products of an X8 group (bytes at w) into out[0..7] */
#if defined(__AVX2__) && defined(__F16C__)
INLINE void group32_a2(const int T, const uint8_t* w, const xrow* x, int64_t nblk, float* out) {
    const int gbs = 8 * (T == Q4_0 ? 18 : T == Q4_1 ? 20 : 34), po = T == Q4_1 ? 32 : 16;
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
    for (int64_t k = 0; k < nblk; k++) {
        const uint8_t* b = w + k * gbs;
        __m256i v[8], s;
        if (T == Q8_0) {  /* a row's block per vector, |w| against x with w's sign; rows fed as ORD8 */
            const __m256i xv = _mm256_loadu_si256((const __m256i*)(x->q + 32 * k));
            for (int i = 0; i < 8; i++) {
                const __m256i z = _mm256_loadu_si256((const __m256i*)(b + po + 32 * ORD8[i]));
                v[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(z, z), _mm256_sign_epi8(xv, z)), ones);
            }
            const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
            const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
            s = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
        } else {  /* rows 2p and 2p+1 in one load: low nibbles are values 0-15, high ones 16-31 */
            const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(x->q + 32 * k)));
            const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(x->q + 32 * k + 16)));
            for (int p = 0; p < 4; p++) {
                const __m256i z = _mm256_loadu_si256((const __m256i*)(b + po + 32 * p));
                const __m256i lo = _mm256_and_si256(z, m4), hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), m4);
                /* two products of at most 2 * 15 * 127 each: inside int16 */
                v[p] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi)), ones);
            }
            s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b));  /* lanes in ORD8 */
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(x->d[k])), acc);
        if (T == Q4_0) corr = _mm256_fmadd_ps(dw, _mm256_set1_ps(x->ds[k]), corr);
        if (T == Q4_1) corr = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 16))), _mm256_set1_ps(x->ds[k]), corr);
    }
    __m256 r = acc;
    if (T == Q4_0) r = _mm256_fnmadd_ps(corr, _mm256_set1_ps(8.0f), acc);
    if (T == Q4_1) r = _mm256_add_ps(acc, corr);
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#define GROUP32(T) group32_a2(T, w, x, n, out)
#else
INLINE void group32_c(const int T, const uint8_t* w, const xrow* x, int64_t nblk, float* out) {
    uint8_t raw[34];
    for (int i = 0; i < 8; i++) {
        float r = 0;
        for (int64_t k = 0; k < nblk; k++) {
            unpack_block(T, w, k, i, raw);
            r += dot32_block(T, raw, x, k);
        }
        out[i] = r;
    }
}
#define GROUP32(T) group32_c(T, w, x, n, out)
#endif

typedef void (*group_fn)(const uint8_t*, const xrow*, int64_t, float*);
static void group_q4_0(const uint8_t* w, const xrow* x, int64_t n, float* out) { GROUP32(Q4_0); }
static void group_q4_1(const uint8_t* w, const xrow* x, int64_t n, float* out) { GROUP32(Q4_1); }
static void group_q8_0(const uint8_t* w, const xrow* x, int64_t n, float* out) { GROUP32(Q8_0); }

static group_fn group_of(int T) { return T == Q4_0 ? group_q4_0 : T == Q4_1 ? group_q4_1 : group_q8_0; }

/* W [N, K] of `type` blocks in the file's layout -> out in X8 + type's (N a multiple of 8).
   0, or BAD_SIZE (nothing written) for a type without an X8 layout or sizes that do not fit. */
int tp_qpack(int type, const uint8_t* W, uint8_t* out, int64_t K, int64_t N) {
    int64_t blk, bs;
    if (!packable(type) || sizes(type, &blk, &bs) || K < 1 || N < 8 || N % 8 || K % blk) return BAD_SIZE;
    const int64_t nblk = K / blk, rowbytes = nblk * bs, pay = bs - (type == Q4_1 ? 4 : 2), po = type == Q4_1 ? 32 : 16;
    for (int64_t g = 0; g < N / 8; g++)
        for (int64_t k = 0; k < nblk; k++) {
            uint8_t* o = out + g * 8 * rowbytes + k * 8 * bs;
            for (int s = 0; s < 8; s++) {
                const uint8_t* b = W + (8 * g + ORD8[s]) * rowbytes + k * bs;
                memcpy(o + 2 * s, b, 2);
                if (type == Q4_1) memcpy(o + 16 + 2 * s, b + 2, 2);
            }
            for (int i = 0; i < 8; i++) memcpy(o + po + pay * i, W + (8 * g + i) * rowbytes + k * bs + (bs - pay), (size_t)pay);
        }
    return 0;
}

/* one specialised function per type (the type a constant inside) */
static float row_q4_0(const uint8_t* w, const xrow* x, int64_t n) { return ROW32(Q4_0); }
static float row_q4_1(const uint8_t* w, const xrow* x, int64_t n) { return ROW32(Q4_1); }
static float row_q5_0(const uint8_t* w, const xrow* x, int64_t n) { return ROW32(Q5_0); }
static float row_q5_1(const uint8_t* w, const xrow* x, int64_t n) { return ROW32(Q5_1); }
static float row_q8_0(const uint8_t* w, const xrow* x, int64_t n) { return ROW32(Q8_0); }
static float row_q4_k(const uint8_t* w, const xrow* x, int64_t n) { return ROWK(Q4_K); }
static float row_q5_k(const uint8_t* w, const xrow* x, int64_t n) { return ROWK(Q5_K); }
static float row_q6_k(const uint8_t* w, const xrow* x, int64_t n) { return ROWK(Q6_K); }

typedef float (*row_fn)(const uint8_t*, const xrow*, int64_t);

static row_fn row_of(int T) {
    switch (T) {
    case Q4_0: return row_q4_0;
    case Q4_1: return row_q4_1;
    case Q5_0: return row_q5_0;
    case Q5_1: return row_q5_1;
    case Q8_0: return row_q8_0;
    case Q4_K: return row_q4_k;
    case Q5_K: return row_q5_k;
    default: return row_q6_k;
    }
}

typedef struct { row_fn fn; group_fn gfn; const uint8_t* W; void* y; int64_t rowbytes, nblk, N, nb; int bf; } gemv_job;

INLINE void put(const gemv_job* j, int64_t b, int64_t r, float v) {
    if (j->bf) ((uint16_t*)j->y)[b * j->N + r] = bf16_of(v);
    else ((float*)j->y)[b * j->N + r] = v;
}

/* rows [r0, r1) against every x row: one row after the other (one sequential stream per thread);
   with several x rows, a tile of ~64 KB of weight rows is read from memory once and from cache
   for the other x rows */
static void gemv_slice(void* c, int64_t r0, int64_t r1) {
    const gemv_job* j = (const gemv_job*)c;
    const int64_t per = j->gfn ? 8 : 1;  /* X8: r0, r1 count groups of 8 rows */
    int64_t tile = j->nb == 1 ? r1 - r0 : 65536 / (j->rowbytes * per);
    tile = tile < 1 ? 1 : tile;
    for (int64_t a = r0; a < r1; a += tile) {
        const int64_t e = a + tile < r1 ? a + tile : r1;
        for (int64_t b = 0; b < j->nb; b++) {
            const xrow x = xrow_of(b);
            for (int64_t r = a; r < e; r++) {
                if (j->gfn) {
                    float v[8];
                    j->gfn(j->W + r * 8 * j->rowbytes, &x, j->nblk, v);
                    for (int i = 0; i < 8; i++) put(j, b, 8 * r + i, v[i]);
                } else {
                    put(j, b, r, j->fn(j->W + r * j->rowbytes, &x, j->nblk));
                }
            }
        }
    }
}

/* y [nb, N] = x [nb, K] (float32) times W^T, W being N rows of K values in `type` blocks (row n
   at W + n * K / block * block_bytes); y float32, or bfloat16 (round to nearest even) when ybf16.
   Returns 0; BAD_SIZE (nothing computed) for K, N or nb below 1, an unknown type or K not in
   whole blocks; -1 (nothing computed) if the activation buffer cannot be grown.
   Locks: `q_mu` (this file's: the activation buffer) is held for the whole call, and the pool's
   caller lock is taken inside it by tp_pool_for, once for quantising x (when large) and once
   for the rows. The pool's jobs never take q_mu, so the order is always q_mu -> pool: no
   deadlock, and a second caller waits for the first on q_mu. */
int tp_qgemv(int type, const uint8_t* W, const float* x, void* y, int64_t K, int64_t N, int ybf16, int64_t nb) {
    int64_t blk, bs;
    if (sizes(type, &blk, &bs) || K < 1 || N < 1 || nb < 1 || K % blk || (type > X8 && N % 8)) return BAD_SIZE;
    pthread_mutex_lock(&q_mu);
    if (xb_layout(K, nb, (int)blk)) { pthread_mutex_unlock(&q_mu); return -1; }
    xb.x = x; xb.K = K; xb.per_row = K / blk; xb.block = (int)blk;
    xb.perm = HAS_VNNI && (type == Q4_K || type == Q5_K);
    const int64_t units = nb * (K / blk);
    int rc = 0;
    if (nb * K >= (1 << 18)) rc = tp_pool_for(quant_slice, 0, units);
    else quant_slice(0, 0, units);
    const int packed = type > X8;
    gemv_job j = {packed ? 0 : row_of(type), packed ? group_of(type - X8) : 0, W, y, K / blk * bs, K / blk, N, nb, ybf16 != 0};
    const double t0 = tp_emulate_start();
    if (rc == 0) rc = tp_pool_for(gemv_slice, &j, packed ? N / 8 : N);
    tp_emulate_end(t0);
    pthread_mutex_unlock(&q_mu);
    return rc;
}

int tp_qgemv_has_int8_dot(void) { return HAS_VNNI; }

/* whether loading should pack Q4_0 / Q4_1 / Q8_0 weights into X8: where its kernel is the
   faster one (AVX2 without VNNI; the VNNI row kernel was measured on its own machine only) */
int tp_qpack_preferred(void) {
#if defined(__AVX2__) && defined(__F16C__) && !HAS_VNNI
    return 1;
#else
    return 0;
#endif
}
