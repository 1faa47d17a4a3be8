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
#include "half.h"

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

/* float16 weights (a GGUF file's F16 tensors, kept as the file stores them: half the bytes of
   float32 for a decode that only streams weights), float32 x and accumulation: each weight is
   widened exactly, so the products are the float32 path's on the same values */
static void rows_f16(const uint16_t* restrict W, const float* restrict x, float* restrict y, int64_t K, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t* w = W + r * K;
        int64_t i = 0;
        float s = 0;
#ifdef __AVX512F__
        /* four chains of 16: the FMA latency overlaps; vcvtph2ps widens 16 halves per load */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        for (; i + 64 <= K; i += 64) {
            a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i))), _mm512_loadu_ps(x + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i + 16))), _mm512_loadu_ps(x + i + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i + 32))), _mm512_loadu_ps(x + i + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i + 48))), _mm512_loadu_ps(x + i + 48), a3);
        }
        for (; i + 16 <= K; i += 16) a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i))), _mm512_loadu_ps(x + i), a0);
        s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (; i + 32 <= K; i += 32) {
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i))), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i + 16))), _mm256_loadu_ps(x + i + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + i + 24))), _mm256_loadu_ps(x + i + 24), a3);
        }
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
        for (; i < K; i++) s += half_to_float(w[i]) * x[i];
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

/* A small persistent pool. A job (a GEMV's rows, or a parallel for) is split into one
   contiguous range per thread, the caller's included; each thread computes its range front to
   back (one sequential stream, what the prefetchers like), and a thread done with its own takes
   pieces from the back of the others' ranges, halving what is left each time. So a worker that
   is asleep, or that the OS has descheduled (a 2-core machine shared with other work), never
   holds the caller up: the caller takes the worker's range too, and the worker joins when it
   runs; and threads that run at different speeds finish within a small piece of each other (a
   thread idle at the end of a GEMV is memory bandwidth lost, and a decode step is a hundred
   GEMVs). Each range is one atomic word, (job number, front, back), claimed by compare-and-swap:
   a late worker can never take rows of a later job as its own.

   Waiting: an idle worker spins ~0.2 ms (the gaps between a decode step's calls are a few
   microseconds), then yields the core until ~2 ms, then sleeps on a condition variable; the
   caller waiting for pieces another thread took spins ~20 us, then yields. Spinning past that
   would take the core a descheduled peer needs.

   `job`, `y_bf16` and the int8 activation buffer are shared state, and ctypes releases the GIL
   during a call, so every entry point holds `call_mu`: a second caller (a server thread beside
   the decode loop) waits for the first instead of running on its job. */
#include <sched.h>
#include <time.h>
#define MAXT 64
static int nthreads = 1;  /* threads created (the caller's included) */
static int active = 1;    /* threads that share a call: tp_gemv_start sets it */
static pthread_t threads[MAXT];
static struct {
    const void* W; const void* x; float* y; int64_t K, N, nb; int kind; const int16_t* wsum; const float* scales;
    void (*fn)(void*, int64_t, int64_t); void* ctx;  /* kind 4: a parallel for over [0, N) */
    int64_t unit, own, least;  /* claims are whole units of items ([0, N): rows, or the for's indices); an owner's piece, a thief's least */
} job;
static atomic_long generation = 0;      /* job number: a worker wakes when it changes */
/* thread t's range of the current job in units: (job number & 0xffff) << 48 | front << 24 | back */
static struct { _Atomic uint64_t w; char pad[56]; } ranges[MAXT] __attribute__((aligned(64)));
static _Atomic int64_t done = 0;        /* items of the current job finished */
#define RANGE(g, f, b) ((((uint64_t)(g) & 0xffff) << 48) | (((uint64_t)(f) & 0xffffff) << 24) | ((uint64_t)(b) & 0xffffff))
#define R_GEN(w) ((long)((w) >> 48))
#define R_FRONT(w) ((int64_t)(((w) >> 24) & 0xffffff))
#define R_BACK(w) ((int64_t)((w) & 0xffffff))
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static atomic_int sleepers = 0;  /* seq_cst with `generation`: no wake-up is lost */
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;  /* one caller at a time */
static long start_gen[MAXT];  /* the generation current when worker t was created */

static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec; }

/* rows [r0, r1) of the current job against its x row i, into y row i */
static void rows(int64_t i, int64_t r0, int64_t r1) {
    float* y = (float*)((char*)job.y + i * job.N * (y_bf16 ? 2 : 4));
    const int64_t K = job.K;
    if (job.kind == 1) rows_bf16((const uint16_t*)job.W, (const float*)job.x + i * K, y, K, r0, r1);
    else if (job.kind == 2) rows_bf16x((const uint16_t*)job.W, (const uint16_t*)job.x + i * K, y, K, r0, r1);
    else if (job.kind == 5) rows_f16((const uint16_t*)job.W, (const float*)job.x + i * K, y, K, r0, r1);
    else if (job.kind == 3) rows_q8((const int8_t*)job.W, job.wsum, job.scales, xu_buf + i * K, d_buf + i * (K / 64), y, K, r0, r1);
    else rows_f32((const float*)job.W, (const float*)job.x + i * K, y, K, r0, r1);
}

static int64_t weight_bytes(void) { return job.kind == 0 ? 4 : job.kind == 3 ? 1 : 2; }

/* items [a0, a1) of the current job */
static void do_piece(int64_t a0, int64_t a1) {
    if (job.kind == 4) { job.fn(job.ctx, a0, a1); return; }
    if (job.nb == 1) { rows(0, a0, a1); return; }
    /* several x rows: a tile of weight rows (~64 KB) comes from memory once, and from cache
       for the other x rows */
    for (int64_t a = a0; a < a1; a += job.unit) {
        int64_t b = a + job.unit < a1 ? a + job.unit : a1;
        for (int64_t i = 0; i < job.nb; i++) rows(i, a, b);
    }
}

/* units [u0, u1) of the current job */
static void do_units(int64_t u0, int64_t u1) {
    int64_t a0 = u0 * job.unit, a1 = u1 * job.unit < job.N ? u1 * job.unit : job.N;
    do_piece(a0, a1);
    atomic_fetch_add_explicit(&done, a1 - a0, memory_order_release);
}

/* thread t's part of job `gen`: its own range front to back, then pieces from the back of the
   others' (half of what is left, at least job.least units), until nothing is left */
static void work(int t, long gen) {
    const long tag = gen & 0xffff;
    for (;;) {
        uint64_t w = atomic_load_explicit(&ranges[t].w, memory_order_acquire);
        int64_t f = R_FRONT(w), b = R_BACK(w);
        if (R_GEN(w) != tag || f >= b) break;
        int64_t take = b - f < job.own ? b - f : job.own;
        if (atomic_compare_exchange_weak_explicit(&ranges[t].w, &w, RANGE(tag, f + take, b), memory_order_acq_rel, memory_order_acquire))
            do_units(f, f + take);
    }
    for (int k = 1; k < active; k++) {
        int u = (t + k) % active;
        for (;;) {
            uint64_t w = atomic_load_explicit(&ranges[u].w, memory_order_acquire);
            int64_t f = R_FRONT(w), b = R_BACK(w);
            if (R_GEN(w) != tag || f >= b) break;
            int64_t take = (b - f) / 2;
            take = take < job.least ? job.least : take;
            take = take < b - f ? take : b - f;
            if (atomic_compare_exchange_weak_explicit(&ranges[u].w, &w, RANGE(tag, f, b - take), memory_order_acq_rel, memory_order_acquire))
                do_units(b - take, b);
        }
    }
}

#define SPIN_S 2e-4   /* an idle worker spins this long, */
#define YIELD_S 2e-3  /* then yields the core until this long, then sleeps */

static void* worker(void* arg) {
    int t = (int)(intptr_t)arg;
    long seen = start_gen[t];  /* jobs before its creation are not its own: none is run twice */
    for (;;) {
        long g;
        int spins = 0;
        double since = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins < 256) { CPU_RELAX(); continue; }
            spins = 0;
            double now = now_s();
            if (since == 0) { since = now; continue; }
            if (now - since < SPIN_S) continue;
            if (now - since < YIELD_S) { sched_yield(); continue; }
            pthread_mutex_lock(&mu);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&cv, &mu);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&mu);
            since = 0;
        }
        seen = g;
        if (t < active) work(t, g);
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

/* the current job's units (4 rows, a ~64 KB tile of rows with several x rows, or one index of a
   parallel for) and pieces: an owner claims ~64 KB at a time (contiguous: its stream goes on) or
   1/16 of its share of a parallel for, a thief at least ~16 KB or one index */
static void plan_pieces(void) {
    if (job.kind == 4) {  /* a parallel for: its indices may be tiny (8 rows of GGML blocks), so claims take ~1/16 of a share */
        job.unit = (job.N + 0xfffffe) / 0xffffff;  /* 1 below 16M indices */
        int64_t units = (job.N + job.unit - 1) / job.unit;
        job.own = units / (16 * active);
        job.own = job.own < 1 ? 1 : job.own;
        job.least = 1;
        return;
    }
    int64_t row = job.K * weight_bytes();
    job.unit = 4;
    if (job.nb > 1) {
        job.unit = 65536 / row;
        job.unit = job.unit < 4 ? 4 : job.unit;
    }
    if ((job.N + job.unit - 1) / job.unit > 0xffffff) job.unit = ((job.N + 0xfffffe) / 0xffffff + 3) / 4 * 4;  /* ranges count units in 24 bits */
    int64_t ubytes = job.unit * row;
    job.own = (65536 + ubytes - 1) / ubytes;
    job.least = (16384 + ubytes - 1) / ubytes;
}

#define WAIT_SPIN_S 2e-5  /* the caller spins this long for claimed pieces, then yields */

static void run(void) {
    plan_pieces();
    long g = atomic_load(&generation) + 1;
    int64_t units = (job.N + job.unit - 1) / job.unit;
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    for (int t = 0; t < active; t++)  /* contiguous ranges of equal size (within a unit) */
        atomic_store_explicit(&ranges[t].w, RANGE(g, units * t / active, units * (t + 1) / active), memory_order_release);
    atomic_store(&generation, g);
    if (active > 1 && atomic_load(&sleepers)) { pthread_mutex_lock(&mu); pthread_cond_broadcast(&cv); pthread_mutex_unlock(&mu); }
    work(0, g);
    double since = 0;
    int spins = 0;
    while (atomic_load_explicit(&done, memory_order_acquire) < job.N) {
        if (++spins < 64) { CPU_RELAX(); continue; }
        spins = 0;
        double now = now_s();
        if (since == 0) since = now;
        else if (now - since > WAIT_SPIN_S) sched_yield();
    }
    /* closed: a worker that read a range before the job ended cannot claim from it once the
       next job's fields are being written (its compare-and-swap fails) */
    for (int t = 0; t < active; t++) atomic_store(&ranges[t].w, RANGE(g, 0, 0));
}

#define BAD_SIZE (-2)  /* a size the kernels cannot take: nothing computed */

/* y [nb, N] = x [nb, K] W^T. kind: 0 float32 W and x, 1 bfloat16 W and float32 x, 2 bfloat16
   W and x, 5 float16 W and float32 x (4 is tp_pool_for's); y float32, or bfloat16 when ybf16. Returns 0, or BAD_SIZE (nothing computed) for
   K, N or nb below 1 or a kind this build lacks. */
/* A slower machine, emulated for benchmarks (bench/shares.py; kernels/cpu_gemv.py reads
   TP_EMULATE_SLOWER): every GEMV takes `gemv_passes` times as long, the caller spinning out the
   difference after the product. Not by computing it again: on one host the ranks share the
   memory bus, and a rank reading its weights twice would slow its peer as well, which a slower
   machine of a rig does not. 1: off. */
static int gemv_passes = 1;
void tp_gemv_emulate_slower(int passes) { gemv_passes = passes < 1 ? 1 : passes; }
int tp_gemv_passes(void) { return gemv_passes; }
double tp_emulate_start(void) { return gemv_passes > 1 ? now_s() : 0.0; }
void tp_emulate_end(double t0) {
    if (gemv_passes <= 1) return;
    const double until = t0 + (now_s() - t0) * gemv_passes;
    while (now_s() < until) CPU_RELAX();
}

int tp_gemv(const void* W, const void* x, void* y, int64_t K, int64_t N, int kind, int ybf16, int64_t nb) {
    if (K < 1 || N < 1 || nb < 1 || kind < 0 || kind > 5 || kind == 3 || kind == 4 || (kind == 2 && !HAS_BF16_DOT)) return BAD_SIZE;
    pthread_mutex_lock(&call_mu);
    job.W = W; job.x = x; job.y = y; job.K = K; job.N = N; job.nb = nb; job.kind = kind; y_bf16 = ybf16;
    const double t0 = tp_emulate_start();
    run();
    tp_emulate_end(t0);
    pthread_mutex_unlock(&call_mu);
    return 0;
}

/* fn(ctx, i0, i1) over slices of [0, n), shared by the pool threads (the decode step's
   attention heads); fn must not call back into this pool */
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
        const double t0 = tp_emulate_start();
        run();
        tp_emulate_end(t0);
    }
    pthread_mutex_unlock(&call_mu);
    return rc;
}

/* Back [p, p + n) by transparent huge pages (2 MB), where the kernel can: the 2 MB-aligned part
   of the range is collapsed now (MADV_COLLAPSE, Linux >= 6.1; on older kernels it is only
   marked MADV_HUGEPAGE, for khugepaged to collapse over time). Returns the bytes collapsed, 0
   where nothing was (no aligned 2 MB inside, another OS), or -errno.

   Why: decode streams every weight once per token, and with 4 KB pages each new page is a TLB
   miss; under KVM a miss is a two-dimensional page walk (guest and host tables). The same
   GEMVs read 1.4-1.5x faster from huge pages here (22.6 -> 33.3 GB/s, bf16 3072x576), and
   SmolLM2's decode gained 20-50%. llama.cpp maps its GGUF file, whose page cache is held in
   large folios on this host: part of why its f16 decode read faster than ours. */
#if defined(__linux__)
#include <sys/mman.h>
#include <errno.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#endif
int64_t tp_huge_pages(void* p, int64_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t H = (uintptr_t)2 << 20;
    uintptr_t s = ((uintptr_t)p + H - 1) & ~(H - 1), e = ((uintptr_t)p + (uintptr_t)n) & ~(H - 1);
    if (n <= 0 || e <= s) return 0;
    if (madvise((void*)s, e - s, MADV_COLLAPSE) == 0) return (int64_t)(e - s);
    int err = errno;
    if (err == EINVAL) {  /* a kernel without MADV_COLLAPSE: ask khugepaged */
        madvise((void*)s, e - s, MADV_HUGEPAGE);
        return 0;
    }
    return -(int64_t)err;
#else
    (void)p; (void)n;
    return 0;
#endif
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
