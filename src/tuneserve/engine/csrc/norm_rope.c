/* RMSNorm and rotary embeddings for the lean forward (lean_forward.py), float32.
 *
 * tuneserve_rms_norm_f32: y[n] = w * (x[n] / sqrt(mean(x[n]^2) + eps)), HF's LlamaRMSNorm in
 * float32 (the sum of squares in another order: within an ulp or two of torch's).
 * tuneserve_rope_f32: out[n, h, d] = x[n, h, d] * cos[n, d] + x[n, h, (d + D/2) % D] * sin[n, d],
 * with rotate_half's sign folded into sin by the caller: HF's `x * cos + rotate_half(x) * sin`,
 * the same products and sum in the same order (built with -ffp-contract=off: no fused
 * multiply-add here), so bit for bit.
 * Both replace ~7 small torch ops a call, whose fixed cost dominated at one token.
 */
#include <math.h>
#include <stdint.h>

void tuneserve_rms_norm_f32(const float *x, int64_t x_stride, const float *w, float *y,
                            int64_t N, int64_t H, float eps) {
    for (int64_t n = 0; n < N; n++) {
        const float *row = x + n * x_stride;
        float squares = 0.0f;
        for (int64_t i = 0; i < H; i++) squares += row[i] * row[i];
        const float inverse = 1.0f / sqrtf(squares / (float)H + eps);
        for (int64_t i = 0; i < H; i++) y[n * H + i] = w[i] * (row[i] * inverse);
    }
}

void tuneserve_rope_f32(const float *x, int64_t x_stride, const float *cos, const float *sin,
                        float *out, int64_t N, int64_t heads, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos + n * D, *s = sin + n * D;
        for (int64_t h = 0; h < heads; h++) {
            const float *v = x + n * x_stride + h * D;
            float *o = out + (n * heads + h) * D;
            for (int64_t d = 0; d < half; d++) o[d] = v[d] * c[d] + v[d + half] * s[d];
            for (int64_t d = half; d < D; d++) o[d] = v[d] * c[d] + v[d - half] * s[d];
        }
    }
}
