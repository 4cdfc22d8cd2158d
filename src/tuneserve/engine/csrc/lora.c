/* The LoRA delta of a step whose tokens use many adapters, float32, on an x86-64 CPU with AVX2
 * and FMA (engine/lora.py's grouped form, in one call instead of five torch ops):
 *
 *   y[t] += (x[t] A[row[t]]) B[row[t]]      for each token t with row[t] >= 0
 *
 * x [N, in] and y [N, out] rows at strides x_stride and y_stride (y may be one projection's
 * columns of a fused product); A [L, in, r] and B [L, r, out] the module's stacked adapters
 * (scale folded into B, ranks zero-padded to r); row[t] the stack row of token t's adapter,
 * -1 for none. Tokens are taken in `order` (sorted by row), in blocks of up to TB tokens on
 * one adapter: a block reads each element of its A and B once for all its tokens (a small
 * matrix product, where token by token it would be matrix-vector products at half the rate),
 * and the blocks are split over the threads in runs, so an adapter's weights stream from
 * memory once, to one thread (8 adapters' A and B are ~0.5 MB a module at rank 16). A token's
 * result does not depend on the other tokens, the blocks or the thread count: each sums its
 * products in the same order.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <stdlib.h>

#define MAX_RANK 256 /* the largest r this kernel takes (the caller checks) */
#define TB 4         /* tokens a block */

/* ys[t] += (xs[t] A) B for NT (1 to TB, a constant at each call site) tokens on one adapter */
static inline __attribute__((always_inline)) void delta_block(
    const float *const *xs, float *const *ys, const float *A, const float *B, int64_t in,
    int64_t r, int64_t out, const int NT) {
    float h[TB][MAX_RANK];
    const int64_t rv = r - r % 8;
    /* h = x A, 16 columns a pass over x: each A[k, j0:j0+16] loaded once for the NT tokens */
    for (int64_t j0 = 0; j0 < rv; j0 += 16) {
        const int wide = rv - j0 >= 16;
        __m256 acc[TB][2];
        for (int t = 0; t < NT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < in; k++) {
            const float *a = A + k * r + j0;
            const __m256 a0 = _mm256_loadu_ps(a);
            const __m256 a1 = wide ? _mm256_loadu_ps(a + 8) : _mm256_setzero_ps();
            for (int t = 0; t < NT; t++) {
                const __m256 xk = _mm256_set1_ps(xs[t][k]);
                acc[t][0] = _mm256_fmadd_ps(xk, a0, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(xk, a1, acc[t][1]);
            }
        }
        for (int t = 0; t < NT; t++) {
            _mm256_storeu_ps(h[t] + j0, acc[t][0]);
            if (wide) _mm256_storeu_ps(h[t] + j0 + 8, acc[t][1]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int64_t j = rv; j < r; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < in; k++) s += xs[t][k] * A[k * r + j];
            h[t][j] = s;
        }
    /* y += h B, 16 outputs at a time: each B[j, o:o+16] loaded once for the NT tokens */
    int64_t o = 0;
    for (; o + 16 <= out; o += 16) {
        __m256 acc[TB][2];
        for (int t = 0; t < NT; t++) {
            acc[t][0] = _mm256_loadu_ps(ys[t] + o);
            acc[t][1] = _mm256_loadu_ps(ys[t] + o + 8);
        }
        for (int64_t j = 0; j < r; j++) {
            const __m256 b0 = _mm256_loadu_ps(B + j * out + o);
            const __m256 b1 = _mm256_loadu_ps(B + j * out + o + 8);
            for (int t = 0; t < NT; t++) {
                const __m256 hj = _mm256_set1_ps(h[t][j]);
                acc[t][0] = _mm256_fmadd_ps(hj, b0, acc[t][0]);
                acc[t][1] = _mm256_fmadd_ps(hj, b1, acc[t][1]);
            }
        }
        for (int t = 0; t < NT; t++) {
            _mm256_storeu_ps(ys[t] + o, acc[t][0]);
            _mm256_storeu_ps(ys[t] + o + 8, acc[t][1]);
        }
    }
    for (; o + 8 <= out; o += 8)
        for (int t = 0; t < NT; t++) {
            __m256 acc = _mm256_loadu_ps(ys[t] + o);
            for (int64_t j = 0; j < r; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(h[t][j]), _mm256_loadu_ps(B + j * out + o),
                                      acc);
            _mm256_storeu_ps(ys[t] + o, acc);
        }
    for (; o < out; o++)
        for (int t = 0; t < NT; t++) {
            float s = ys[t][o];
            for (int64_t j = 0; j < r; j++) s += h[t][j] * B[j * out + o];
            ys[t][o] = s;
        }
}

/* Returns 0, or -1 when the block list could not be allocated (nothing is added then). */
int tuneserve_lora_delta_f32(const float *x, int64_t x_stride, float *y, int64_t y_stride,
                             const float *A, const float *B, const int64_t *row,
                             const int64_t *order, int64_t N, int64_t in, int64_t r, int64_t out,
                             int threads) {
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(N + 1)), blocks = 0;
    if (!first) return -1;
    /* blocks: runs of up to TB tokens of `order` on the same row (-1 rows skipped) */
    for (int64_t i = 0; i < N;) {
        const int64_t adapter = row[order[i]];
        if (adapter < 0) {
            i++;
            continue;
        }
        first[blocks++] = i;
        int64_t j = i + 1;
        while (j < N && j - i < TB && row[order[j]] == adapter) j++;
        i = j;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t i = first[b], adapter = row[order[i]];
        const float *xs[TB];
        float *ys[TB];
        int nt = 0;
        while (nt < TB && i + nt < N && row[order[i + nt]] == adapter) {
            xs[nt] = x + order[i + nt] * x_stride;
            ys[nt] = y + order[i + nt] * y_stride;
            nt++;
        }
        const float *a = A + adapter * in * r, *bb = B + adapter * r * out;
        switch (nt) {
        case 1: delta_block(xs, ys, a, bb, in, r, out, 1); break;
        case 2: delta_block(xs, ys, a, bb, in, r, out, 2); break;
        case 3: delta_block(xs, ys, a, bb, in, r, out, 3); break;
        default: delta_block(xs, ys, a, bb, in, r, out, 4); break;
        }
    }
    free(first);
    return 0;
}
