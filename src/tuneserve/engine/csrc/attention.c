/* Decode attention over the paged KV cache on an x86-64 CPU with AVX2 and FMA: queries, scores
 * and outputs float32; keys and values float32 (`_f32`) or bfloat16 (`_bf16`, widened by a
 * shift as they are read: half the bytes from memory, the same float32 arithmetic).
 *
 * For each decode row b (one query token) and query head h, over the positions p in
 * [first, length[b]) of its sequence (first = length[b] - window when window > 0, else 0):
 *
 *   s_p = scale * q[b, h] . K[row(b, p), h / G]          G = H / KVH query heads per KV head
 *   out[b, h] = sum_p softmax(s)_p V[row(b, p), h / G]
 *
 * where row(b, p) = blocks[b, p / block_size] * block_size + p % block_size is the cache row
 * holding position p: keys and values are read where they lie, block by block, never gathered
 * into a copy. keys/values are one layer's [rows, KVH, D] pools; q and out are [B, H, D];
 * D % 8 == 0. Work is split over (row, KV head) pairs; each computes its G heads' scores in one
 * pass over the keys (four keys at a time, each key element widened once for up to three heads,
 * a head's four sums reduced together), then the softmax (exp by the Cephes polynomial, within
 * 2 ulp of expf), then the weighted sum of the values (each value element widened once for up to
 * three heads, 32 of a head's outputs in registers at a time). Returns 0, or -1 when a buffer
 * could not be allocated.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define NEAR 8 /* positions ahead, into L1 */
#define FAR 32 /* positions ahead, into L2 */

/* The cache's element type is a constant (BF: 0 float32, 1 bfloat16) at every call site below,
 * so each entry point gets its own copy of the inlined code, with no branch left in it. */
static inline __attribute__((always_inline)) __m256 kv_load8(const void *base, int64_t i,
                                                             const int BF) {
    if (!BF) return _mm256_loadu_ps((const float *)base + i);
    const __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

static inline __attribute__((always_inline)) const char *kv_at(const void *base, int64_t i,
                                                                const int BF) {
    return BF ? (const char *)((const uint16_t *)base + i) : (const char *)((const float *)base + i);
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* exp(x) for x <= 0 (scores minus their maximum), Cephes' expf on 8 lanes */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3365448f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                               _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* s[g] = q[g] . k for NG (1-4, a constant at each call site) heads at once: independent
 * accumulator chains, two per head, so the adds' latency overlaps */
static inline __attribute__((always_inline)) void dots(const float *q, const void *k, float *s,
                                                       int64_t stride, const int NG, int64_t D,
                                                       float scale, const int BF) {
    __m256 a[4][2];
    for (int g = 0; g < NG; g++) a[g][0] = a[g][1] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        const __m256 k0 = kv_load8(k, d, BF), k1 = kv_load8(k, d + 8, BF);
        for (int g = 0; g < NG; g++) {
            a[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), k0, a[g][0]);
            a[g][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d + 8), k1, a[g][1]);
        }
    }
    if (d < D) { /* D % 16 == 8 */
        const __m256 k0 = kv_load8(k, d, BF);
        for (int g = 0; g < NG; g++)
            a[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), k0, a[g][0]);
    }
    for (int g = 0; g < NG; g++) s[g * stride] = hsum8(_mm256_add_ps(a[g][0], a[g][1])) * scale;
}

/* s[g * stride + i] = scale * q[g] . K_i for four keys K_0..K_3 (at where[0..3]) and NG heads
 * (1-3, a constant at each call site): 4 NG accumulators, each key element widened once for the
 * NG heads, then a head's four sums reduced by one tree of horizontal adds (a key at a time took
 * three shuffles per head and key) */
static inline __attribute__((always_inline)) void dots4(const float *q, const void *keys,
                                                        const int64_t *where, float *s,
                                                        int64_t stride, const int NG, int64_t D,
                                                        float scale, const int BF) {
    __m256 a[3][4];
    for (int g = 0; g < NG; g++)
        for (int i = 0; i < 4; i++) a[g][i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        for (int i = 0; i < 4; i++) {
            const __m256 k = kv_load8(keys, where[i] + d, BF);
            for (int g = 0; g < NG; g++)
                a[g][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), k, a[g][i]);
        }
    }
    for (int g = 0; g < NG; g++) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[g][0], a[g][1]),
                                        _mm256_hadd_ps(a[g][2], a[g][3]));
        const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(s + g * stride, _mm_mul_ps(r, _mm_set1_ps(scale)));
    }
}

/* out[g * D + c : ... + 32] = sum_j s[g * stride + j] V[j][c : c + 32] for NG heads (1-3, a
 * constant at each call site): each value element is widened once for the NG heads (a head at a
 * time widened every value G times), 4 NG accumulators + NG weights + 1 value = 16 registers */
static inline __attribute__((always_inline)) void weighted_sum32(const void *values,
                                                                 const int64_t *where,
                                                                 const float *s, int64_t stride,
                                                                 int64_t L, float *out, int64_t D,
                                                                 int64_t c, const int NG,
                                                                 const int BF) {
    __m256 acc[3][4];
    for (int g = 0; g < NG; g++)
        for (int i = 0; i < 4; i++) acc[g][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; j++) {
        if (c == 0 && j + 2 * NEAR < L) /* the first pass over the values brings them to L1 */
            for (int64_t byte = 0; byte < D * (BF ? 2 : 4); byte += 64)
                _mm_prefetch(kv_at(values, where[j + 2 * NEAR], BF) + byte, _MM_HINT_T0);
        __m256 w[3];
        for (int g = 0; g < NG; g++) w[g] = _mm256_broadcast_ss(s + g * stride + j);
        for (int i = 0; i < 4; i++) {
            const __m256 v = kv_load8(values, where[j] + c + 8 * i, BF);
            for (int g = 0; g < NG; g++) acc[g][i] = _mm256_fmadd_ps(w[g], v, acc[g][i]);
        }
    }
    for (int g = 0; g < NG; g++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + g * D + c + 8 * i, acc[g][i]);
}

static inline __attribute__((always_inline)) int attend_one(
    const float *q, const void *keys, const void *values, const int64_t *table, int64_t first,
    int64_t last, float *out, int64_t kv_head, int64_t G, int64_t KVH, int64_t D, int64_t bs,
    float scale, const int BF) {
    const int64_t L = last - first, padded = (L + 7) / 8 * 8;
    float *scores = malloc(sizeof(float) * (size_t)(G * padded + D));
    int64_t *where = malloc(sizeof(int64_t) * (size_t)L);
    if (!scores || !where) {
        free(scores);
        free(where);
        return -1;
    }
    float *acc = scores + G * padded; /* [D]: a weighted sum, for head sizes not a multiple of 32 */
    /* 0. where each position's key and value lie (offsets into the pools), block by block */
    for (int64_t p = first, j = 0; p < last;) {
        const int64_t offset = p % bs, run = bs - offset < last - p ? bs - offset : last - p;
        const int64_t row = table[p / bs] * bs + offset;
        for (int64_t i = 0; i < run; i++) where[j++] = ((row + i) * KVH + kv_head) * D;
        p += run;
    }
    /* 1. scores, each key read once for the G query heads. A row's key and value heads are
     * 128-256 bytes scattered over blocks: left to the hardware, the cold reads wait on latency,
     * so they are asked for early: keys and values FAR positions ahead, keys NEAR ahead into L1
     * (the values into L1 in step 3); 1.4x on 32 rows of 200 keys against NEAR alone. */
    const int64_t row_bytes = D * (BF ? 2 : 4);
    for (int64_t j = 0; j < L; j++) {
        if (j + FAR < L)
            for (int64_t byte = 0; byte < row_bytes; byte += 64) {
                _mm_prefetch(kv_at(keys, where[j + FAR], BF) + byte, _MM_HINT_T1);
                _mm_prefetch(kv_at(values, where[j + FAR], BF) + byte, _MM_HINT_T2);
            }
        if (j + NEAR < L)
            for (int64_t byte = 0; byte < row_bytes; byte += 64) {
                _mm_prefetch(kv_at(keys, where[j + NEAR], BF) + byte, _MM_HINT_T0);
                _mm_prefetch(kv_at(values, where[j + NEAR], BF) + byte, _MM_HINT_T1);
            }
        if (j % 4 == 0 && j + 4 <= L) { /* four keys at a time, up to three heads at a time */
            for (int64_t g = 0; g < G; g += 3) {
                const float *qg = q + g * D;
                float *s = scores + g * padded + j;
                switch (G - g < 3 ? G - g : 3) {
                case 1: dots4(qg, keys, where + j, s, padded, 1, D, scale, BF); break;
                case 2: dots4(qg, keys, where + j, s, padded, 2, D, scale, BF); break;
                default: dots4(qg, keys, where + j, s, padded, 3, D, scale, BF); break;
                }
            }
        } else if (j >= L / 4 * 4) { /* the last L % 4 keys, one at a time */
            const char *k = kv_at(keys, where[j], BF);
            for (int64_t g = 0; g < G; g += 4) {
                const float *qg = q + g * D;
                float *s = scores + g * padded + j;
                switch (G - g < 4 ? G - g : 4) {
                case 1: dots(qg, k, s, padded, 1, D, scale, BF); break;
                case 2: dots(qg, k, s, padded, 2, D, scale, BF); break;
                case 3: dots(qg, k, s, padded, 3, D, scale, BF); break;
                default: dots(qg, k, s, padded, 4, D, scale, BF); break;
                }
            }
        }
    }
    /* 2. softmax weights per head (unnormalised; the sum divides at the end) */
    for (int64_t g = 0; g < G; g++) {
        float *s = scores + g * padded;
        float top = -INFINITY;
        for (int64_t j = 0; j < L; j++) top = s[j] > top ? s[j] : top;
        for (int64_t j = L; j < padded; j++) s[j] = top - 1000.0f; /* exp -> 0, never summed */
        __m256 total = _mm256_setzero_ps();
        const __m256 shift = _mm256_set1_ps(top);
        for (int64_t j = 0; j < padded; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
            _mm256_storeu_ps(s + j, e);
            total = _mm256_add_ps(total, e);
        }
        const float inverse = 1.0f / hsum8(total);
        for (int64_t j = 0; j < L; j++) s[j] *= inverse;
    }
    /* 3. the weighted sum of the values: head sizes of a multiple of 32 three heads at a time */
    if (D % 32 == 0) {
        for (int64_t g = 0; g < G; g += 3)
            for (int64_t c = 0; c < D; c += 32) {
                const float *s = scores + g * padded;
                float *o = out + g * D;
                switch (G - g < 3 ? G - g : 3) {
                case 1: weighted_sum32(values, where, s, padded, L, o, D, c, 1, BF); break;
                case 2: weighted_sum32(values, where, s, padded, L, o, D, c, 2, BF); break;
                default: weighted_sum32(values, where, s, padded, L, o, D, c, 3, BF); break;
                }
            }
    } else {
        for (int64_t g = 0; g < G; g++) { /* other head sizes a head at a time, the sum in memory */
            const float *s = scores + g * padded;
            for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
            for (int64_t j = 0; j < L; j++) {
                const __m256 w = _mm256_set1_ps(s[j]);
                for (int64_t d = 0; d < D; d += 8)
                    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(w, kv_load8(values, where[j] + d, BF),
                                                              _mm256_loadu_ps(acc + d)));
            }
            for (int64_t i = 0; i < D; i++) out[g * D + i] = acc[i];
        }
    }
    free(scores);
    free(where);
    return 0;
}

#define DEFINE_DECODE_ATTENTION(NAME, KV, BF)                                                  \
    int NAME(const float *q, const KV *keys, const KV *values, const int64_t *blocks, int64_t nb, \
             const int64_t *lengths, int64_t window, float *out, int64_t B, int64_t H,            \
             int64_t KVH, int64_t D, int64_t bs, float scale, int threads) {                      \
        const int64_t G = H / KVH;                                                                \
        int failed = 0;                                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(| : failed)")   \
        for (int64_t task = 0; task < B * KVH; task++) {                                          \
            const int64_t b = task / KVH, kv_head = task % KVH, last = lengths[b];                \
            const int64_t first = window > 0 && last > window ? last - window : 0;                \
            const int64_t head = kv_head * G;                                                     \
            failed |= attend_one(q + (b * H + head) * D, keys, values, blocks + b * nb, first,    \
                                 last, out + (b * H + head) * D, kv_head, G, KVH, D, bs, scale,   \
                                 BF);                                                             \
        }                                                                                         \
        return failed ? -1 : 0;                                                                   \
    }

DEFINE_DECODE_ATTENTION(tuneserve_decode_attention_f32, float, 0)
DEFINE_DECODE_ATTENTION(tuneserve_decode_attention_bf16, uint16_t, 1)
