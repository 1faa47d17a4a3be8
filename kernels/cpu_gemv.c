/* Decode GEMV on CPU: y = W x for one activation row (or a few: a decode batch), W row-major
   [N, K] float32, bfloat16 or int8, y float32 or bfloat16. Built at first use by kernels/cpu_gemv.py (gcc -O3 -march=native).

   Why: BLAS (MKL / oneDNN through F.linear) treats a single row as a tiny GEMM and streams the
   weights at ~15-20 GB/s on the 2-core Zen 4 this project measures on, where the memory gives
   ~34 GB/s and more; decode is nothing but these products. This kernel splits the rows over a
   small pool of persistent threads that spin briefly between calls, then sleep, and each thread
   walks its rows one after the other, so it reads one sequential stream (x stays in L1). Walking
   4 rows at once (x read once per 4 rows) read 7-30% slower here: 4 short streams per core
   (a 768-wide bfloat16 row is 1.5 KB) keep the hardware prefetchers from running ahead.
   bench/gemv.py measures it against F.linear. */
#include <stdint.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

static inline float bf16(uint16_t v) { union { uint32_t u; float f; } c; c.u = (uint32_t)v << 16; return c.f; }

/* float32 -> bfloat16, round to nearest even (as torch's conversion), NaN kept quiet */
static inline uint16_t to_bf16(float f) {
    union { uint32_t u; float f; } c; c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* the output row of a call: float32, or bfloat16 (the model's dtype, so no conversion after) */
static int y_bf16 = 0;
static inline void put(float* y, int64_t r, float v) { if (y_bf16) ((uint16_t*)y)[r] = to_bf16(v); else y[r] = v; }

#define LANES 64  /* independent sums per row: enough vector accumulators to hide FMA latency */

/* y[r] = sum_i W[r*K + i] * x[i] for rows r in [r0, r1); plain C the compiler vectorises
   (-O3 -march=native -fassociative-math: the sums are reordered, as any SIMD dot product does). */
static void rows_f32(const float* restrict W, const float* restrict x, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const float* w = W + r * K;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= K; i += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += w[i + j] * x[i + j];
        float s = 0;
        for (int j = 0; j < LANES; j++) s += acc[j];
        for (; i < K; i++) s += w[i] * x[i];
        put(y, r, s);
    }
}

/* bfloat16 weights, float32 x and accumulation */
static void rows_bf16(const uint16_t* restrict W, const float* restrict x, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t* w = W + r * K;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= K; i += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += bf16(w[i + j]) * x[i + j];
        float s = 0;
        for (int j = 0; j < LANES; j++) s += acc[j];
        for (; i < K; i++) s += bf16(w[i]) * x[i];
        put(y, r, s);
    }
}

/* bfloat16 weights and bfloat16 x: AVX512-BF16's dot product (32 pairs per instruction,
   products exact in float32, float32 accumulation) where the machine has it */
#ifdef __AVX512BF16__
#define HAS_BF16_DOT 1
static void rows_bf16x(const uint16_t* restrict W, const uint16_t* restrict x, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    /* one row at a time: each thread reads its rows as one sequential stream */
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t* w = W + r * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 128 <= K; i += 128) {
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + i + 64), (__m512bh)_mm512_loadu_si512(x + i + 64));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + i + 96), (__m512bh)_mm512_loadu_si512(x + i + 96));
        }
        for (; i + 32 <= K; i += 32) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; i < K; i++) s += bf16(w[i]) * bf16(x[i]);
        put(y, r, s);
    }
}
#else
#define HAS_BF16_DOT 0
static void rows_bf16x(const uint16_t* restrict W, const uint16_t* restrict x, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    (void)W; (void)x; (void)y; (void)K; (void)r0; (void)r1;  /* never called: tp_gemv_has_bf16_dot() says 0 */
}
#endif

int tp_gemv_has_bf16_dot(void) { return HAS_BF16_DOT; }

/* int8 weights (one float32 scale per row) against int8 activations with one scale per 64
   values (quantised per call, as llama.cpp's Q8 dot products do): AVX512-VNNI's u8 x s8 dot
   product, 64 pairs per instruction. x is stored offset by 128 (unsigned), so each row's
   block sums of weights (`wsum`, made at load) take the offset back out:
       y[r] = sc[r] * sum_b d_b * (dot(xu_b, w_rb) - 128 * wsum[r][b]) */
#ifdef __AVX512VNNI__
#define HAS_INT8_DOT 1
static void rows_q8(const int8_t* restrict W, const int16_t* restrict wsum, const float* restrict sc, const uint8_t* restrict xu,
                    const float* restrict d, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    const int64_t nb = K / 64;
    for (int64_t r = r0; r < r1; r++) {
        const int8_t* w = W + r * K;
        const int16_t* ws = wsum + r * nb;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  /* two chains: the FMA latency overlaps */
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2) {
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xu + b * 64), _mm512_loadu_si512(w + b * 64));
            __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xu + b * 64 + 64), _mm512_loadu_si512(w + b * 64 + 64));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(d[b]), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(d[b + 1]), acc1);
        }
        for (; b < nb; b++) {
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xu + b * 64), _mm512_loadu_si512(w + b * 64));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(d[b]), acc0);
        }
        float corr = 0;
        for (int64_t c = 0; c < nb; c++) corr += d[c] * (float)ws[c];
        put(y, r, sc[r] * (_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - 128.0f * corr));
    }
}
#else
#define HAS_INT8_DOT 0
static void rows_q8(const int8_t* restrict W, const int16_t* restrict wsum, const float* restrict sc, const uint8_t* restrict xu,
                    const float* restrict d, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    (void)W; (void)wsum; (void)sc; (void)xu; (void)d; (void)y; (void)K; (void)r0; (void)r1;  /* never called: tp_gemv_has_int8_dot() says 0 */
}
#endif

int tp_gemv_has_int8_dot(void) { return HAS_INT8_DOT; }

/* x [n] (n % 64 == 0) -> offset-128 int8 per 64-block and the blocks' scales, row after row */
static uint8_t* xu_buf = 0;
static float* d_buf = 0;
static int64_t cap = 0;

static int quantize_x(const float* x, int64_t K) {
    if (K > cap) {
        uint8_t* nx = realloc(xu_buf, (size_t)K);
        if (!nx) return -1;
        xu_buf = nx;
        float* nd = realloc(d_buf, sizeof(float) * (size_t)(K / 64 + 1));
        if (!nd) return -1;
        d_buf = nd;
        cap = K;
    }
    for (int64_t b = 0; b < K / 64; b++) {
        const float* xb = x + b * 64;
        float m = 0;
        for (int i = 0; i < 64; i++) { float a = fabsf(xb[i]); m = a > m ? a : m; }
        float db = m / 127.0f, inv = db > 0 ? 1.0f / db : 0.0f;
        d_buf[b] = db;
        for (int i = 0; i < 64; i++) xu_buf[b * 64 + i] = (uint8_t)(lrintf(xb[i] * inv) + 128);
    }
    return 0;
}

/* a tiny persistent pool: worker t computes its share of the rows of the current job. `job`,
   `y_bf16` and the int8 activation buffer are shared state, and ctypes releases the GIL during
   a call, so every entry point holds `call_mu`: a second caller (a server thread beside the
   decode loop) waits for the first instead of running on its job. */
#define MAXT 64
static int nthreads = 1;  /* threads created (the caller's included) */
static int active = 1;    /* threads that share a call's rows: tp_gemv_start sets it */
static pthread_t threads[MAXT];
static struct {
    const void* W; const void* x; float* y; int64_t K, N, nb; int kind; const int16_t* wsum; const float* scales;
    void (*fn)(void*, int64_t, int64_t); void* ctx;  /* kind 4: a parallel for over [0, N) */
} job;
static atomic_long generation = 0;
static atomic_int pending = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_int sleepers = 0;  /* seq_cst with `generation`: no wake-up is lost */
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one caller at a time */
static long start_gen[MAXT];  /* the generation current when worker t was created */

/* rows [r0, r1) of the current job against its x row i, into y row i */
static void rows(int64_t i, int64_t r0, int64_t r1) {
    float* y = (float*)((char*)job.y + i * job.N * (y_bf16 ? 2 : 4));
    const int64_t K = job.K;
    if (job.kind == 1) rows_bf16((const uint16_t*)job.W, (const float*)job.x + i * K, y, K, r0, r1);
    else if (job.kind == 2) rows_bf16x((const uint16_t*)job.W, (const uint16_t*)job.x + i * K, y, K, r0, r1);
    else if (job.kind == 3) rows_q8((const int8_t*)job.W, job.wsum, job.scales, xu_buf + i * K, d_buf + i * (K / 64), y, K, r0, r1);
    else rows_f32((const float*)job.W, (const float*)job.x + i * K, y, K, r0, r1);
}

static void share(int t) {
    if (job.kind == 4) {
        int64_t per = (job.N + active - 1) / active, i0 = t * per, i1 = i0 + per < job.N ? i0 + per : job.N;
        if (i0 < i1) job.fn(job.ctx, i0, i1);
        return;
    }
    int64_t N = job.N, per = ((N + active - 1) / active + 3) / 4 * 4;
    int64_t r0 = t * per, r1 = r0 + per < N ? r0 + per : N;
    if (r0 >= r1) return;
    if (job.nb == 1) { rows(0, r0, r1); return; }
    /* several x rows: a tile of weight rows (~64 KB) comes from memory once, and from cache
       for the other x rows */
    int64_t wbytes = job.kind == 0 ? 4 : job.kind == 3 ? 1 : 2;
    int64_t tile = 65536 / (job.K * wbytes);
    tile = tile < 4 ? 4 : tile;
    for (int64_t a = r0; a < r1; a += tile) {
        int64_t b = a + tile < r1 ? a + tile : r1;
        for (int64_t i = 0; i < job.nb; i++) rows(i, a, b);
    }
}

static void* worker(void* arg) {
    int t = (int)(intptr_t)arg;
    long seen = start_gen[t];  /* jobs before its creation are not its own: none is run twice */
    for (;;) {
        long g;
        int spins = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < 200000) { CPU_RELAX(); continue; }
            pthread_mutex_lock(&mu);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&cv, &mu);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&mu);
            spins = 0;
        }
        seen = g;
        if (t < active) {
            share(t);
            atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
        }
    }
    return 0;
}

/* n threads share each call from now on (created as needed); returns how many do */
int tp_gemv_start(int n) {
    if (n < 1) n = 1;
    if (n > MAXT) n = MAXT;
    pthread_mutex_lock(&call_mu);
    for (int t = nthreads; t < n; t++) {
        start_gen[t] = atomic_load(&generation);
        if (pthread_create(&threads[t], 0, worker, (void*)(intptr_t)t)) break;
        nthreads = t + 1;
    }
    active = n < nthreads ? n : nthreads;
    int a = active;
    pthread_mutex_unlock(&call_mu);
    return a;
}

#define BAD_SIZE (-2)  /* a size the kernels cannot take: nothing computed */

static void run(void);

/* y [nb, N] = x [nb, K] W^T. kind: 0 float32 W and x, 1 bfloat16 W and float32 x, 2 bfloat16
   W and x; y float32, or bfloat16 when ybf16. Returns 0, or BAD_SIZE (nothing computed) for
   K, N or nb below 1 or a kind this build lacks. */
int tp_gemv(const void* W, const void* x, void* y, int64_t K, int64_t N, int kind, int ybf16, int64_t nb) {
    if (K < 1 || N < 1 || nb < 1 || kind < 0 || kind > 2 || (kind == 2 && !HAS_BF16_DOT)) return BAD_SIZE;
    pthread_mutex_lock(&call_mu);
    job.W = W; job.x = x; job.y = y; job.K = K; job.N = N; job.nb = nb; job.kind = kind; y_bf16 = ybf16;
    run();
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* fn(ctx, i0, i1) over slices of [0, n), one per pool thread (the decode step's attention
   heads); fn must not call back into this pool */
int tp_pool_for(void (*fn)(void*, int64_t, int64_t), void* ctx, int64_t n) {
    if (n < 0) return BAD_SIZE;
    if (n == 0) return 0;
    pthread_mutex_lock(&call_mu);
    job.fn = fn; job.ctx = ctx; job.N = n; job.kind = 4;
    run();
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* int8 W with per-row `scales` and 64-block sums `wsum` [N, K/64]; float32 x. Returns 0, -1
   (nothing computed) if the activation buffer cannot be allocated, or BAD_SIZE for K, N or nb
   below 1, K not a multiple of 64 (the blocks must not straddle rows) or a build without VNNI. */
int tp_gemv_q8(const int8_t* W, const int16_t* wsum, const float* scales, const float* x, void* y, int64_t K, int64_t N, int ybf16, int64_t nb) {
    if (K < 1 || N < 1 || nb < 1 || K % 64 || !HAS_INT8_DOT) return BAD_SIZE;
    pthread_mutex_lock(&call_mu);
    int rc = quantize_x(x, K * nb);
    if (rc == 0) {
        job.W = W; job.x = x; job.y = y; job.K = K; job.N = N; job.nb = nb; job.kind = 3; job.wsum = wsum; job.scales = scales; y_bf16 = ybf16;
        run();
    }
    pthread_mutex_unlock(&call_mu);
    return rc;
}

/* Flags of the shared-memory transport (comm/shm.py): a rank publishes "my slot of collective
   s is written" with a release store, and peers read the flags with acquire loads, so the slot's
   bytes are visible before the flag on every CPU, not only on x86's ordered stores. */
void tp_flag_store(int64_t* flag, int64_t value) { __atomic_store_n(flag, value, __ATOMIC_RELEASE); }

/* the smallest of n flags `stride` int64s apart */
int64_t tp_flags_min(const int64_t* flags, int64_t n, int64_t stride) {
    int64_t m = __atomic_load_n(flags, __ATOMIC_ACQUIRE);
    for (int64_t i = 1; i < n; i++) {
        int64_t v = __atomic_load_n(flags + i * stride, __ATOMIC_ACQUIRE);
        m = v < m ? v : m;
    }
    return m;
}

static void run(void) {
    atomic_store(&pending, active - 1);
    atomic_fetch_add(&generation, 1);
    if (atomic_load(&sleepers)) { pthread_mutex_lock(&mu); pthread_cond_broadcast(&cv); pthread_mutex_unlock(&mu); }
    share(0);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) CPU_RELAX();
}
