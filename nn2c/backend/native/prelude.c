/* The fixed part of every native loop nn2c generates (nn2c/native/render.py appends the
   loop's functions). Branch-free float32 exp (Cephes' polynomial) and tanh, so that the
   row loops vectorize; NaN propagates through both, so a diverging run is still caught
   by the trainer. */
#include <stdint.h>
#include <string.h>
#include <math.h>

/* Every function runs with denormals flushed to zero (and read as zero), restoring the
   caller's mode on return: a gate saturating towards 0 makes denormal values, and a
   product reading them (torch's BLAS, in the next step or in the backward) runs many
   times slower; below 1.2e-38 a float32 network's values carry no information. */
#if defined(__SSE2__)
#include <xmmintrin.h>
#define NN2_FLUSH_BEGIN unsigned int nn2_csr = _mm_getcsr(); _mm_setcsr(nn2_csr | 0x8040u);
#define NN2_FLUSH_END _mm_setcsr(nn2_csr);
#elif defined(__aarch64__)
#define NN2_FLUSH_BEGIN uint64_t nn2_fpcr; __asm__ volatile("mrs %0, fpcr" : "=r"(nn2_fpcr)); \
    __asm__ volatile("msr fpcr, %0" : : "r"(nn2_fpcr | (1ull << 24)));
#define NN2_FLUSH_END __asm__ volatile("msr fpcr, %0" : : "r"(nn2_fpcr));
#else
#define NN2_FLUSH_BEGIN
#define NN2_FLUSH_END
#endif
static inline float nn2_exp(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365478515625f ? -87.3365478515625f : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    float m = n == n ? n : 0.0f;
    int32_t e = ((int32_t)m + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return p * s;
}
static inline float nn2_sigmoid(float x) { return 1.0f / (1.0f + nn2_exp(-x)); }
static inline float nn2_tanh(float x) {
    float a = x < 0.0f ? -x : x;
    float big = 1.0f - 2.0f / (nn2_exp(2.0f * a) + 1.0f);
    float z = x * x;
    float small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z
                    + 1.33314422036E-1f) * z - 3.33332819422E-1f) * z * x + x;
    return a < 0.625f ? small : (x < 0.0f ? -big : big);
}
/* bf16 <-> float32 for a loop whose products take bf16 operands: rounding to nearest, ties
   to even, as torch's casts round (a NaN stays a NaN); widening is exact. */
static inline uint16_t nn2_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);
}
static inline float nn2_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}
