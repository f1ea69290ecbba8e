/* cblas_sgemm that sends matrix-vector products to cblas_sgemv (see _blas.py).
 *
 * MLX's CPU backend computes every float32 matmul with cblas_sgemm, including the
 * one-row products of token-by-token decoding. OpenBLAS's sgemm packs the whole
 * weight matrix first, which makes a 1 x K by K x N product about 5x slower than its
 * sgemv. Loaded ahead of OpenBLAS, this cblas_sgemm answers row-major calls with
 * M == 1 or N == 1 through sgemv and forwards everything else to OpenBLAS (or, if
 * it was never connected, to the next cblas_sgemm in the process: it never crashes).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

/* Called once from Python with OpenBLAS's own functions (either may be NULL). */
void mlx_llama3v_sgemm_init(void *sgemm, void *sgemv) {
    real_sgemm = (sgemm_fn)sgemm;
    real_sgemv = (sgemv_fn)sgemv;
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
    if (!real_sgemm) real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    if (real_sgemv && order == ROW_MAJOR && K > 0 && M == 1 && N > 1) {
        /* c (1 x N) = alpha a op(B) + beta c, i.e. c^T = alpha op(B)^T a^T + beta c^T */
        int inc_a = ta == NO_TRANS ? 1 : lda;
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
        if (beta == 0.0f) zero(C, M, ldc);
        if (ta == NO_TRANS) /* A is M x K */
            real_sgemv(ROW_MAJOR, NO_TRANS, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
        else /* A is K x M */
            real_sgemv(ROW_MAJOR, TRANS, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
        return;
    }
    real_sgemm(order, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
