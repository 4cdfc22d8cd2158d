/* The LoRA delta of a step whose tokens use many adapters, float32, on an x86-64 CPU with AVX2
 * and FMA (engine/lora.py's grouped form, in one call instead of five torch ops):
 *
 *   y[t] += (x[t] A[row[t]]) B[row[t]]      for each token t with row[t] >= 0
 *
 * x [N, in] and y [N, out] rows at strides x_stride and y_stride (y may be one projection's
 * columns of a fused product); A [L, in, r] and B [L, r, out] the module's stacked adapters
 * (scale folded into B, ranks zero-padded to r); row[t] the stack row of token t's adapter,
 * -1 for none. Tokens are taken in `order` (sorted by row) and split over the threads in runs,
 * so an adapter's A and B stream from memory once, to one thread, and its other tokens read
 * them from cache (8 adapters' A and B are ~0.5 MB a module at rank 16). A token's result does
 * not depend on the other tokens, their order or the thread count.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define MAX_RANK 256 /* the largest r this kernel takes (the caller checks) */

static void delta_one(const float *x, float *y, const float *A, const float *B, int64_t in,
                      int64_t r, int64_t out) {
    float h[MAX_RANK];
    const int64_t rv = r - r % 8;
    /* h = x A, up to 32 columns (four vectors) a pass over x: for each input k,
     * h += x[k] * A[k, :] (a row of A is r contiguous floats); even and odd k in separate
     * accumulators, so the fused multiply-adds' latency overlaps */
    for (int64_t j0 = 0; j0 < rv; j0 += 32) {
        const int64_t nv = (rv - j0) / 8 < 4 ? (rv - j0) / 8 : 4;
        __m256 even[4], odd[4];
        for (int64_t v = 0; v < 4; v++) even[v] = odd[v] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 1 < in; k += 2) {
            const __m256 x0 = _mm256_set1_ps(x[k]), x1 = _mm256_set1_ps(x[k + 1]);
            const float *a0 = A + k * r + j0, *a1 = a0 + r;
            for (int64_t v = 0; v < nv; v++) {
                even[v] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(a0 + 8 * v), even[v]);
                odd[v] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(a1 + 8 * v), odd[v]);
            }
        }
        for (; k < in; k++)
            for (int64_t v = 0; v < nv; v++)
                even[v] = _mm256_fmadd_ps(_mm256_set1_ps(x[k]),
                                          _mm256_loadu_ps(A + k * r + j0 + 8 * v), even[v]);
        for (int64_t v = 0; v < nv; v++)
            _mm256_storeu_ps(h + j0 + 8 * v, _mm256_add_ps(even[v], odd[v]));
    }
    for (int64_t j = rv; j < r; j++) {
        float s = 0.0f;
        for (int64_t k = 0; k < in; k++) s += x[k] * A[k * r + j];
        h[j] = s;
    }
    /* y += h B, 64 outputs (eight independent vectors) at a time over every rank */
    int64_t o = 0;
    for (; o + 64 <= out; o += 64) {
        __m256 acc[8];
        for (int v = 0; v < 8; v++) acc[v] = _mm256_loadu_ps(y + o + 8 * v);
        for (int64_t j = 0; j < r; j++) {
            const __m256 hj = _mm256_set1_ps(h[j]);
            const float *bj = B + j * out + o;
            for (int v = 0; v < 8; v++) acc[v] = _mm256_fmadd_ps(hj, _mm256_loadu_ps(bj + 8 * v), acc[v]);
        }
        for (int v = 0; v < 8; v++) _mm256_storeu_ps(y + o + 8 * v, acc[v]);
    }
    for (; o + 8 <= out; o += 8) {
        __m256 acc = _mm256_loadu_ps(y + o);
        for (int64_t j = 0; j < r; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(h[j]), _mm256_loadu_ps(B + j * out + o), acc);
        _mm256_storeu_ps(y + o, acc);
    }
    for (; o < out; o++) {
        float s = y[o];
        for (int64_t j = 0; j < r; j++) s += h[j] * B[j * out + o];
        y[o] = s;
    }
}

void tuneserve_lora_delta_f32(const float *x, int64_t x_stride, float *y, int64_t y_stride,
                              const float *A, const float *B, const int64_t *row,
                              const int64_t *order, int64_t N, int64_t in, int64_t r,
                              int64_t out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N; i++) {
        const int64_t t = order[i];
        if (row[t] < 0) continue;
        delta_one(x + t * x_stride, y + t * y_stride, A + row[t] * in * r, B + row[t] * r * out,
                  in, r, out);
    }
}
