/* The cblas_* entry points MLX's Linux CPU backend calls, forwarded to an optimised BLAS.
 *
 * MLX's CPU wheel links the reference BLAS (libmlx.so needs cblas_sgemm, cblas_dgemm,
 * cblas_cgemm). scipy-openblas32 exports OpenBLAS under scipy_-prefixed names, so it
 * cannot stand in for them by itself; this library, built at install time (setup.py)
 * and opened with RTLD_GLOBAL before mlx.core is loaded (mlx_llama3v/cpu.py), exports
 * the plain names and calls the functions Python hands it with
 * mlx_llama3v_blas_connect().
 *
 * One-row products (M == 1 or N == 1: every layer of token-by-token decoding) go to
 * sgemv: OpenBLAS's sgemm packs the whole weight matrix first, about 5x slower.
 * Few-row products (2 <= M <= small_m_limit, row-major, A not transposed: the decode
 * step of several streams at once) get this file's own kernel (small_m below), which
 * streams each weight row once against all M rows of A; OpenBLAS's sgemm packs B there
 * too and costs 2-4x one sgemv (weights read from memory, as in decoding: benchmarks/blas.py
 * --small-m), and M sgemv calls read B M times. Every other product goes to sgemm unchanged.
 * Every call answered is counted, so tests can check MLX's products really arrive.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*dgemm_fn)(int, int, int, int, int, int, double, const double *, int,
                         const double *, int, double, double *, int);
typedef void (*cgemm_fn)(int, int, int, int, int, int, const void *, const void *, int,
                         const void *, int, const void *, void *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv; /* NULL: one-row products stay with sgemm */
static dgemm_fn real_dgemm;
static cgemm_fn real_cgemm;

/* calls answered: [0] by sgemm, [1] by sgemv, [2] by dgemm, [3] by cgemm,
 * [4] by the small-M kernel; [5] of those split over the thread pool */
enum { N_COUNTS = 6 };
static unsigned long long counts[N_COUNTS];

static void count(int i) { __atomic_fetch_add(&counts[i], 1, __ATOMIC_RELAXED); }

static void unconnected(const char *name) {
    /* Python opens this library globally only after connecting it; never reached. */
    fprintf(stderr, "error: mlx_llama3v BLAS forwarder: %s called before it was connected\n", name);
    abort();
}

/* Returns 0 when every required function (sgemm, dgemm, cgemm) is given. */
int mlx_llama3v_blas_connect(void *sgemm, void *sgemv, void *dgemm, void *cgemm) {
    real_sgemm = (sgemm_fn)sgemm;
    real_sgemv = (sgemv_fn)sgemv;
    real_dgemm = (dgemm_fn)dgemm;
    real_cgemm = (cgemm_fn)cgemm;
    return sgemm && dgemm && cgemm ? 0 : -1;
}

/* Copies the call counters (see counts) into out[0..N_COUNTS-1]; returns N_COUNTS. */
int mlx_llama3v_blas_counts(unsigned long long *out) {
    for (int i = 0; i < N_COUNTS; i++) out[i] = __atomic_load_n(&counts[i], __ATOMIC_RELAXED);
    return N_COUNTS;
}

/* The file the connected sgemm lives in (tests check it is the pip-installed one). */
const char *mlx_llama3v_blas_origin(void) {
    Dl_info info;
    if (!real_sgemm || !dladdr((void *)real_sgemm, &info) || !info.dli_fname) return NULL;
    return info.dli_fname;
}

static void zero(float *y, int n, int inc) {
    if (inc == 1) {
        memset(y, 0, (size_t)n * sizeof(float));
    } else {
        for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
    }
}

/* ------------------------------------------------------------------ small-M kernel
 *
 * C (M x N) = alpha A op(B) + beta C for 2 <= M <= small_m_limit, A (M x K) row-major.
 * Decode is memory-bound: each element of B is read from memory once and multiplied
 * against all M rows of A, which stay in L1/L2. Vectors are GCC vector extensions, so
 * the same source compiles for any target; on x86-64 an AVX2+FMA clone is chosen at
 * load time (target_clones) and the default clone runs on any x86-64 (no -march).
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KERNEL
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4), may_alias));

enum { SMALL_M_MAX = 16, MAX_THREADS = 16 };
static int small_m_limit = SMALL_M_MAX; /* 1: the kernel is off */
static int pool_threads = 1;             /* parts a large product is split into */
/* measured on 2 cores: a split over 2 threads costs 5-25 us; a weight read from memory (in
 * decoding every weight is: the model is far larger than the caches) gains from 512 x 2048
 * (4 MB, a Llama-3.2-1B k/v projection) on, so everything from 1M elements is split */
#define SPLIT_MIN_DEFAULT ((size_t)1 << 20)
static size_t split_min = SPLIT_MIN_DEFAULT; /* N*K from which a product is split */

/* How far ahead (floats) each row of B is prefetched in software: with only the hardware
 * prefetcher, 4 rows of A read B at 60% of sgemv's bandwidth (benchmarks/blas.py --small-m);
 * 512 (2 KB) measured best of 0/128/256/512/1024. */
#ifndef NT_PREFETCH
#define NT_PREFETCH 512
#endif

static inline float hsum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline void store(float *c, float sum, float alpha, float beta) {
    *c = beta == 0.0f ? alpha * sum : alpha * sum + beta * *c; /* beta 0: C is never read */
}

/* B is N x K (a Linear weight): MB rows of A against NB rows of B, dot products over all
 * of K, stored to C. Each tile streams its NB rows of B from start to end (a few sequential
 * streams, prefetched NT_PREFETCH floats ahead); the MB rows of A come from L1/L2. (Slicing
 * K across many rows of B, as an earlier version did, interleaved 16 streams in 2 KB pieces
 * and read B at two thirds of sgemv's bandwidth.) */
static inline __attribute__((always_inline)) void nt_tile(int MB, int NB, int K, float alpha,
                                                           const float *A, int lda,
                                                           const float *B, int ldb, float beta,
                                                           float *C, int ldc) {
    v8 acc[4][4];
    float tail[4][4];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MB; i++)
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NB; j++) acc[i][j] = (v8){0}, tail[i][j] = 0.0f;
    int k = 0;
    for (; k + 16 <= K; k += 16) { /* a cache line of each row of B */
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NB; j++) __builtin_prefetch(B + (size_t)j * ldb + k + NT_PREFETCH);
        _Pragma("GCC unroll 2")
        for (int h = k; h < k + 16; h += 8) {
            v8 b[4];
            _Pragma("GCC unroll 16")
            for (int j = 0; j < NB; j++) b[j] = *(const v8 *)(B + (size_t)j * ldb + h);
            _Pragma("GCC unroll 16")
            for (int i = 0; i < MB; i++) {
                v8 a = *(const v8 *)(A + (size_t)i * lda + h);
                _Pragma("GCC unroll 16")
                for (int j = 0; j < NB; j++) acc[i][j] += a * b[j];
            }
        }
    }
    for (; k + 8 <= K; k += 8) {
        v8 b[4];
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NB; j++) b[j] = *(const v8 *)(B + (size_t)j * ldb + k);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < MB; i++) {
            v8 a = *(const v8 *)(A + (size_t)i * lda + k);
            _Pragma("GCC unroll 16")
            for (int j = 0; j < NB; j++) acc[i][j] += a * b[j];
        }
    }
    for (; k < K; k++)
        _Pragma("GCC unroll 16")
        for (int i = 0; i < MB; i++)
            _Pragma("GCC unroll 16")
            for (int j = 0; j < NB; j++) tail[i][j] += A[(size_t)i * lda + k] * B[(size_t)j * ldb + k];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MB; i++)
        _Pragma("GCC unroll 16")
        for (int j = 0; j < NB; j++)
            store(C + (size_t)i * ldc + j, hsum(acc[i][j]) + tail[i][j], alpha, beta);
}

/* MB rows of A against rows n0..n1-1 of B; tiles of 8-12 accumulators (with NB rows of B
 * and one of A: at most the 16 AVX2 registers) keep the FMAs busy. */
static inline __attribute__((always_inline)) void nt_rows(int MB, int n0, int n1, int K,
                                                           float alpha, const float *A, int lda,
                                                           const float *B, int ldb, float beta,
                                                           float *C, int ldc) {
    int n = n0;
#define NT(NB) nt_tile(MB, NB, K, alpha, A, lda, B + (size_t)n * ldb, ldb, beta, C + n, ldc)
    if (MB <= 2)
        for (; n + 4 <= n1; n += 4) NT(4);
    if (MB > 2)
        for (; n + 3 <= n1; n += 3) NT(3);
    for (; n + 2 <= n1; n += 2) NT(2);
    for (; n < n1; n++) NT(1);
#undef NT
}

/* Blocks of up to 4 rows of A, each against columns n0..n1-1 in NT_CHUNK-row chunks of B:
 * the first block streams a chunk from memory, the others find it in L2 (blocks of 2 rows,
 * each nearer sgemv's bandwidth, measured slower in all). */
enum { NT_CHUNK = 16 };

KERNEL static void small_nt(int M, int n0, int n1, int K, float alpha, const float *A, int lda,
                            const float *B, int ldb, float beta, float *C, int ldc) {
    for (int c = n0; c < n1; c += NT_CHUNK) {
        int end = c + NT_CHUNK < n1 ? c + NT_CHUNK : n1, m = 0;
        for (; m + 4 <= M; m += 4)
            nt_rows(4, c, end, K, alpha, A + (size_t)m * lda, lda, B, ldb, beta, C + (size_t)m * ldc, ldc);
        const float *a = A + (size_t)m * lda;
        float *cm = C + (size_t)m * ldc;
        if (M - m == 3) nt_rows(3, c, end, K, alpha, a, lda, B, ldb, beta, cm, ldc);
        if (M - m == 2) nt_rows(2, c, end, K, alpha, a, lda, B, ldb, beta, cm, ldc);
        if (M - m == 1) nt_rows(1, c, end, K, alpha, a, lda, B, ldb, beta, cm, ldc);
    }
}

/* B is K x N: MB rows of A times a strip of 16 columns (NV vectors) of B, over all K. */
static inline __attribute__((always_inline)) void nn_tile(int MB, int K, float alpha,
                                                           const float *A, int lda,
                                                           const float *B, int ldb, float beta,
                                                           float *C, int ldc) {
    v8 acc[4][2];
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MB; i++) acc[i][0] = acc[i][1] = (v8){0};
    for (int k = 0; k < K; k++) {
        v8 b0 = *(const v8 *)(B + (size_t)k * ldb), b1 = *(const v8 *)(B + (size_t)k * ldb + 8);
        _Pragma("GCC unroll 16")
        for (int i = 0; i < MB; i++) {
            float a = A[(size_t)i * lda + k];
            acc[i][0] += a * b0;
            acc[i][1] += a * b1;
        }
    }
    _Pragma("GCC unroll 16")
    for (int i = 0; i < MB; i++)
        _Pragma("GCC unroll 16")
        for (int j = 0; j < 16; j++) store(C + (size_t)i * ldc + j, acc[i][j / 8][j % 8], alpha, beta);
}

KERNEL static void small_nn(int M, int n0, int n1, int K, float alpha, const float *A, int lda,
                            const float *B, int ldb, float beta, float *C, int ldc) {
    int n = n0;
    for (; n + 16 <= n1; n += 16) {
        int m = 0;
        for (; m + 4 <= M; m += 4)
            nn_tile(4, K, alpha, A + (size_t)m * lda, lda, B + n, ldb, beta, C + (size_t)m * ldc + n, ldc);
        for (; m < M; m++)
            nn_tile(1, K, alpha, A + (size_t)m * lda, lda, B + n, ldb, beta, C + (size_t)m * ldc + n, ldc);
    }
    if (n < n1) { /* the last < 16 columns, one at a time */
        for (int m = 0; m < M; m++)
            for (int j = n; j < n1; j++) {
                float sum = 0.0f;
                for (int k = 0; k < K; k++) sum += A[(size_t)m * lda + k] * B[(size_t)k * ldb + j];
                store(C + (size_t)m * ldc + j, sum, alpha, beta);
            }
    }
}

struct small_job {
    int trans_b, M, N, K, lda, ldb, ldc;
    int parts;  /* threads taking chunks, the caller included */
    int chunks; /* pieces of N, taken one at a time */
    float alpha, beta;
    const float *A, *B;
    float *C;
};

static void run_chunk(const struct small_job *j, int chunk) {
    /* columns split in multiples of 16 so every chunk but the last keeps whole strips */
    int strips = (j->N + 15) / 16;
    int n0 = (int)((long long)strips * chunk / j->chunks) * 16;
    int n1 = (int)((long long)strips * (chunk + 1) / j->chunks) * 16;
    if (n1 > j->N) n1 = j->N;
    if (n0 >= n1) return;
    if (j->trans_b)
        small_nt(j->M, n0, n1, j->K, j->alpha, j->A, j->lda, j->B, j->ldb, j->beta, j->C, j->ldc);
    else
        small_nn(j->M, n0, n1, j->K, j->alpha, j->A, j->lda, j->B, j->ldb, j->beta, j->C, j->ldc);
}

/* A persistent pool: workers 1..pool_started-1 sleep on pool_wake until a generation is
 * posted; the caller works too. One product at a time uses it (pool_busy); a product
 * arriving meanwhile (another MLX stream) runs on its own thread.
 *
 * The threads take the product's chunks one at a time (pool_ticket: the generation in the
 * high 32 bits, the next chunk in the low), so a worker that wakes late, or loses its core
 * for a while to another thread (the server's request threads, a client in the same
 * process), leaves its share to the others instead of holding everyone up: with fixed
 * halves, 4 streams decoded in the server ran ~20 ms a step slower than the same batch
 * alone. The caller returns once every chunk is done (pool_finished). */
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t pool_done = PTHREAD_COND_INITIALIZER;
static int pool_started = 1; /* threads in the pool, the caller included */
static unsigned long pool_generation;
static struct small_job pool_job;
static unsigned long long pool_ticket;
static int pool_finished;

static void run_chunks(const struct small_job *j, unsigned long long generation) {
    for (;;) {
        unsigned long long t = __atomic_load_n(&pool_ticket, __ATOMIC_ACQUIRE);
        do {
            if (t >> 32 != generation || (int)(t & 0xffffffffu) >= j->chunks) return;
        } while (!__atomic_compare_exchange_n(&pool_ticket, &t, t + 1, 1, __ATOMIC_ACQ_REL,
                                              __ATOMIC_ACQUIRE));
        run_chunk(j, (int)(t & 0xffffffffu));
        if (__atomic_add_fetch(&pool_finished, 1, __ATOMIC_ACQ_REL) == j->chunks) {
            pthread_mutex_lock(&pool_lock);
            pthread_cond_signal(&pool_done);
            pthread_mutex_unlock(&pool_lock);
        }
    }
}

static void *pool_worker(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool_lock);
    for (;;) {
        while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
        seen = pool_generation;
        struct small_job job = pool_job; /* the caller may post the next one meanwhile */
        pthread_mutex_unlock(&pool_lock);
        if (id < job.parts) run_chunks(&job, seen & 0xffffffffu);
        pthread_mutex_lock(&pool_lock);
    }
    return NULL;
}

static void pool_after_fork(void) {
    /* a forked child has none of the workers: start again, lazily */
    pthread_mutex_init(&pool_busy, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_started = 1;
}

static int pool_grow(int want) { /* called holding pool_busy; returns the threads there are */
    static int atfork_set;
    if (!atfork_set) atfork_set = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool_started < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, pool_worker, (void *)(intptr_t)pool_started);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool_started++;
    }
    return pool_started;
}

enum { CHUNKS_PER_THREAD = 8 };

static void small_m(int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    struct small_job job = {trans_b, M, N, K, lda, ldb, ldc, 1, 1, alpha, beta, A, B, C};
    count(4);
    int strips = (N + 15) / 16;
    int parts = (size_t)N * (size_t)K >= split_min ? pool_threads : 1;
    if (parts > strips) parts = strips;
    if (parts > 1 && pthread_mutex_trylock(&pool_busy) == 0) {
        parts = pool_grow(parts) < parts ? pool_started : parts;
        if (parts > 1) {
            count(5);
            job.parts = parts;
            job.chunks = parts * CHUNKS_PER_THREAD < strips ? parts * CHUNKS_PER_THREAD : strips;
            pthread_mutex_lock(&pool_lock);
            pool_job = job;
            unsigned long long generation = ++pool_generation & 0xffffffffu;
            __atomic_store_n(&pool_finished, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&pool_ticket, generation << 32, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&pool_wake);
            pthread_mutex_unlock(&pool_lock);
            run_chunks(&job, generation);
            pthread_mutex_lock(&pool_lock);
            while (__atomic_load_n(&pool_finished, __ATOMIC_ACQUIRE) < job.chunks)
                pthread_cond_wait(&pool_done, &pool_lock);
            pthread_mutex_unlock(&pool_lock);
            pthread_mutex_unlock(&pool_busy);
            return;
        }
        pthread_mutex_unlock(&pool_busy);
    }
    run_chunk(&job, 0);
}

/* Sets the small-M kernel's row limit (<= 1: off, clamped to SMALL_M_MAX), the threads
 * it may split a product over (clamped to 1..MAX_THREADS) and the N*K from which it
 * splits (0: the default, < 0: keep). Returns the limit in force (0: off). */
int mlx_llama3v_blas_small_m(int limit, int threads, long long min_split) {
    small_m_limit = limit < 1 ? 1 : limit > SMALL_M_MAX ? SMALL_M_MAX : limit;
    pool_threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (min_split >= 0) split_min = min_split ? (size_t)min_split : SPLIT_MIN_DEFAULT;
    return small_m_limit < 2 ? 0 : small_m_limit;
}

void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C,
                 int ldc) {
    if (!real_sgemm) unconnected("cblas_sgemm");
    if (real_sgemv && order == ROW_MAJOR && K > 0 && M == 1 && N > 1) {
        /* c (1 x N) = alpha a op(B) + beta c, i.e. c^T = alpha op(B)^T a^T + beta c^T */
        int inc_a = ta == NO_TRANS ? 1 : lda;
        count(1);
        if (beta == 0.0f) zero(C, N, 1); /* BLAS may read C even when beta is 0 */
        if (tb == NO_TRANS) /* B is K x N */
            real_sgemv(ROW_MAJOR, TRANS, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
        else /* B is N x K */
            real_sgemv(ROW_MAJOR, NO_TRANS, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
        return;
    }
    if (real_sgemv && order == ROW_MAJOR && K > 0 && N == 1 && M > 1) {
        /* c (M x 1, stride ldc) = alpha op(A) b + beta c */
        int inc_b = tb == NO_TRANS ? ldb : 1;
        count(1);
        if (beta == 0.0f) zero(C, M, ldc);
        if (ta == NO_TRANS) /* A is M x K */
            real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
        else /* A is K x M */
            real_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
        return;
    }
    if (order == ROW_MAJOR && ta == NO_TRANS && K > 0 && M >= 2 && M <= small_m_limit && N >= 1) {
        small_m(tb == TRANS, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    count(0);
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_dgemm(int order, int ta, int tb, int M, int N, int K, double alpha,
                 const double *A, int lda, const double *B, int ldb, double beta, double *C,
                 int ldc) {
    if (!real_dgemm) unconnected("cblas_dgemm");
    count(2);
    real_dgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(int order, int ta, int tb, int M, int N, int K, const void *alpha,
                 const void *A, int lda, const void *B, int ldb, const void *beta, void *C,
                 int ldc) {
    if (!real_cgemm) unconnected("cblas_cgemm");
    count(3);
    real_cgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
