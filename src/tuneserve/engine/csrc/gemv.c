/* Matrix-vector products for decoding on an x86-64 CPU with AVX2, FMA and F16C.
 *
 * y[i, r] = sum_k x[i, k] * W[r, k] + bias[r]   for i < m (1 <= m <= 4), r < out
 *
 * W is row-major [out, in], float32, float16 (IEEE half, converted with F16C) or bfloat16 (the
 * top half of a float32: widened by a shift); x, y and bias are float32, rows contiguous. Accumulation is float32. At a few rows a product is bound by how
 * fast W streams from memory: each W row is read once for all m rows of x, with the output
 * rows split evenly among `threads` OpenMP threads (the runtime torch already loaded: libgomp's
 * soname is shared). A row's result does not depend on m or on the thread count.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float f32;
typedef uint16_t f16;
typedef uint16_t bf16;

static inline __m256 load8_f32(const f32 *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_f16(const f16 *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline __m256 load8_bf16(const bf16 *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float load1_f32(const f32 *p) { return *p; }
static inline float load1_f16(const f16 *p) { return _cvtsh_ss(*p); }
static inline float load1_bf16(const bf16 *p) {
    const uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* Output rows [r0, r1) for M rows of x; M is a constant at each call site, so the loops over
 * it unroll and the accumulators stay in registers. */
#define DEFINE_GEMV(T)                                                                        \
    static inline __attribute__((always_inline)) void rows_##T(                              \
        const T *W, const f32 *x, const f32 *bias, f32 *y, int64_t r0, int64_t r1, const int M, \
        int64_t out, int64_t in) {                                                           \
        const int64_t body = in - in % 16;                                                   \
        for (int64_t r = r0; r < r1; r++) {                                                  \
            const T *w = W + r * in;                                                         \
            __m256 acc[4][2];                                                                \
            for (int i = 0; i < M; i++) {                                                    \
                acc[i][0] = _mm256_setzero_ps();                                             \
                acc[i][1] = _mm256_setzero_ps();                                             \
            }                                                                                \
            for (int64_t k = 0; k < body; k += 16) {                                         \
                const __m256 w0 = load8_##T(w + k), w1 = load8_##T(w + k + 8);              \
                for (int i = 0; i < M; i++) {                                                \
                    acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * in + k), acc[i][0]); \
                    acc[i][1] =                                                              \
                        _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * in + k + 8), acc[i][1]); \
                }                                                                            \
            }                                                                                \
            for (int i = 0; i < M; i++) {                                                    \
                float s = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));                         \
                for (int64_t k = body; k < in; k++) s += load1_##T(w + k) * x[i * in + k];  \
                y[i * out + r] = bias ? s + bias[r] : s;                                     \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
                                                                                             \
    void tuneserve_gemv_##T(const T *W, const f32 *x, const f32 *bias, f32 *y, int64_t m,   \
                            int64_t out, int64_t in, int threads) {                          \
        _Pragma("omp parallel num_threads(threads)") {                                       \
            const int t = omp_get_thread_num(), n = omp_get_num_threads();                   \
            const int64_t r0 = out * t / n, r1 = out * (t + 1) / n;                          \
            switch (m) {                                                                     \
            case 1: rows_##T(W, x, bias, y, r0, r1, 1, out, in); break;                      \
            case 2: rows_##T(W, x, bias, y, r0, r1, 2, out, in); break;                      \
            case 3: rows_##T(W, x, bias, y, r0, r1, 3, out, in); break;                      \
            default: rows_##T(W, x, bias, y, r0, r1, 4, out, in); break;                     \
            }                                                                                \
        }                                                                                    \
    }

DEFINE_GEMV(f32)
DEFINE_GEMV(f16)
DEFINE_GEMV(bf16)

/* the build's self-check: the loader refuses a library whose version it does not expect */
int tuneserve_kernels_version(void) { return 2; }
