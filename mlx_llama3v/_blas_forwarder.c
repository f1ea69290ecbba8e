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
 * Every call answered is counted, so tests can check MLX's products really arrive.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
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

/* calls answered: [0] by sgemm, [1] by sgemv, [2] by dgemm, [3] by cgemm */
static unsigned long long counts[4];

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

/* Copies the call counters (see counts) into out[0..3]. */
void mlx_llama3v_blas_counts(unsigned long long *out) {
    for (int i = 0; i < 4; i++) out[i] = __atomic_load_n(&counts[i], __ATOMIC_RELAXED);
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
