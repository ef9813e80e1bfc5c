/* int8 products for --quantize int8 on an x86 CPU (int8.py compiles this at first use).

   Weights: int8, one scale a row, stored in blocks of four rows whose 64-column chunks lie side by
   side ([N/4][K/64][4][64]), so a thread reads one sequential stream that the prefetcher follows.
   Activations: quantized per call to int8 in blocks of 32 with a scale each (llama.cpp's Q8_0 for
   activations); a block's products are summed in int32, blocks in float. With AVX-512 VNNI, calls
   of MANY rows or more (a prefill, or that many rows decoding together) take a scale a row instead
   (below). Within either path a row's result does not depend on the others in the call. Every
   parallel loop runs on the caller's thread count (torch's), whichever OpenMP runtime is loaded. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32 /* activations' quantization block */
#define CHUNK 64 /* columns a chunk of the packed weights */
#define ROWS 4   /* rows side by side in the packed weights */
#define AHEAD 2048 /* bytes prefetched ahead of the stream */

/* 2: AVX-512 with VNNI, 1: AVX2 with FMA, 0: neither */
int q8_isa(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

/* a row of float32 or bfloat16 as float32 */
static void widen(const void *w, int bf16, int64_t K, float *row) {
    if (!bf16) {
        memcpy(row, w, (size_t)K * sizeof(float));
        return;
    }
    const uint16_t *h = w;
    uint32_t *bits = (uint32_t *)row;
    for (int64_t k = 0; k < K; k++) bits[k] = (uint32_t)h[k] << 16;
}

/* w: [N][K] float32 (bf16 = 0) or bfloat16 (bf16 = 1) -> packed [ceil(N/4)*4][K] int8 (rows past N
   zero), scale [N] (each row's largest magnitude maps to 127) and sums [N] (each row's int8 sum). K a multiple of 64. Returns 0, or
   -1 when a thread's row buffer cannot be allocated. */
__attribute__((target_clones("avx2", "default")))
int q8_pack(int threads, const void *w, int bf16, int64_t N, int64_t K, int8_t *packed, float *scale, int32_t *sums) {
    int64_t groups = (N + ROWS - 1) / ROWS;
    size_t width = bf16 ? 2 : 4;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|: failed)
    {
        float *row = malloc((size_t)K * sizeof(float));
        failed |= row == NULL;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            int8_t *out = packed + g * ROWS * K;
            for (int r = 0; r < ROWS && row; r++) {
                int64_t n = g * ROWS + r;
                if (n >= N) {
                    for (int64_t c = 0; c < K; c += CHUNK) memset(out + c * ROWS + r * CHUNK, 0, CHUNK);
                    continue;
                }
                widen((const char *)w + (size_t)(n * K) * width, bf16, K, row);
                uint32_t top = 0; /* the largest magnitude's bits: for finite floats their order is the values' */
                const uint32_t *bits = (const uint32_t *)row;
                for (int64_t k = 0; k < K; k++) top = (bits[k] & 0x7fffffffu) > top ? (bits[k] & 0x7fffffffu) : top;
                float amax;
                memcpy(&amax, &top, 4);
                float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
                scale[n] = s;
                int32_t sum = 0;
                for (int64_t c = 0; c < K; c += CHUNK) {
                    int8_t *dst = out + c * ROWS + r * CHUNK;
                    for (int k = 0; k < CHUNK; k++) {
                        float v = row[c + k] * inv;
                        dst[k] = (int8_t)(int32_t)(v + (v >= 0.f ? 0.5f : -0.5f));
                        sum += dst[k];
                    }
                }
                sums[n] = sum;
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}

static void quantize(int threads, const float *x, int64_t count, int8_t *xq, float *xs) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (count >= 2048)
    for (int64_t b = 0; b < count; b++) {
        const float *v = x + b * BLOCK;
        float amax = 0.f;
        for (int k = 0; k < BLOCK; k++) amax = fmaxf(amax, fabsf(v[k]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int k = 0; k < BLOCK; k++) xq[b * BLOCK + k] = (int8_t)lrintf(v[k] * inv);
        xs[b] = amax / 127.f;
    }
}

/* a group's four sums, scaled and biased, into its row of the output (the rows past N skipped) */
static inline void store(const float *d, const float *sw, const float *bias, float *row, int64_t N, int64_t g) {
    for (int r = 0; r < ROWS && g * ROWS + r < N; r++) {
        int64_t n = g * ROWS + r;
        row[n] = d[r] * sw[n] + (bias ? bias[n] : 0.f);
    }
}

/* Both kernels: four weight rows (group g) against every activation row. Signed products through
   an unsigned-by-signed instruction: |x| times w with x's sign moved onto w (|x|, |w| <= 127). */

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni")))
static void group_vnni(const int8_t *W, const float *sw, const float *bias, const int8_t *xq, const float *xs,
                       float *out, int64_t M, int64_t K, int64_t N, int64_t g) {
    const int8_t *w = W + g * ROWS * K;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t m = 0; m < M; m++) {
        const int8_t *x = xq + m * K;
        const float *s = xs + m * (K / BLOCK);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += CHUNK) {
            const int8_t *c = w + k * ROWS;
            _mm_prefetch((const char *)(c + AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + AHEAD + 128), _MM_HINT_T0);
            __m512i xv = _mm512_loadu_si512(x + k);
            __mmask64 neg = _mm512_movepi8_mask(xv);
            __m512i ax = _mm512_abs_epi8(xv);
            __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(s[k / BLOCK]), _mm256_set1_ps(s[k / BLOCK + 1]), 1);
#define ROW(a, r) { __m512i wv = _mm512_loadu_si512(c + (r) * CHUNK); wv = _mm512_mask_sub_epi8(wv, neg, zero, wv); \
                    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, ax, wv)), sc, a); }
            ROW(a0, 0) ROW(a1, 1) ROW(a2, 2) ROW(a3, 3)
#undef ROW
        }
        float d[ROWS] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};
        store(d, sw, bias, out + m * N, N, g);
    }
}

__attribute__((target("avx2,fma")))
static float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

__attribute__((target("avx2,fma")))
static void group_avx2(const int8_t *W, const float *sw, const float *bias, const int8_t *xq, const float *xs,
                       float *out, int64_t M, int64_t K, int64_t N, int64_t g) {
    const int8_t *w = W + g * ROWS * K;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t m = 0; m < M; m++) {
        const int8_t *x = xq + m * K;
        const float *s = xs + m * (K / BLOCK);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += BLOCK) {
            const int8_t *c = w + (k / CHUNK) * CHUNK * ROWS + k % CHUNK;
            if (k % CHUNK == 0) {
                _mm_prefetch((const char *)(c + AHEAD), _MM_HINT_T0);
                _mm_prefetch((const char *)(c + AHEAD + 128), _MM_HINT_T0);
            }
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
            __m256i ax = _mm256_sign_epi8(xv, xv);
            __m256 sc = _mm256_set1_ps(s[k / BLOCK]);
#define ROW(a, r) { __m256i wv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(c + (r) * CHUNK)), xv); \
                    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, wv), ones)), sc, a); }
            ROW(a0, 0) ROW(a1, 1) ROW(a2, 2) ROW(a3, 3)
#undef ROW
        }
        float d[ROWS] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
        store(d, sw, bias, out + m * N, N, g);
    }
}

/* Many rows (a prefill): each row of activations takes one scale, offset by 128 into unsigned
   bytes, so a product is one instruction: sum (x + 128) w = sum x w + 128 sum w, the last from the
   row sums packed with the weights. Four weight rows against TILE activation rows a pass, the
   weights' chunks staying in the cache while every tile of the call goes by. */
#define TILE 6
#define MANY 16 /* calls of this many rows or more take this path */

static void quantize_rows(int threads, const float *x, int64_t M, int64_t K, uint8_t *xu, float *xs) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *v = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(v[k]));
        float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t k = 0; k < K; k++) xu[m * K + k] = (uint8_t)(lrintf(v[k] * inv) + 128);
        xs[m] = amax / 127.f;
    }
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni"), always_inline))
static inline void tile_vnni(const int8_t *w, const int32_t *sums, const float *sw, const float *bias, const uint8_t *xu,
                             const float *xs, float *out, int64_t K, int64_t N, int64_t n, int64_t m0, const int mt) {
    __m512i acc[TILE][ROWS];
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS; r++) acc[i][r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += CHUNK) {
        const int8_t *c = w + k * ROWS;
        __m512i w0 = _mm512_loadu_si512(c), w1 = _mm512_loadu_si512(c + CHUNK), w2 = _mm512_loadu_si512(c + 2 * CHUNK),
                w3 = _mm512_loadu_si512(c + 3 * CHUNK);
        for (int i = 0; i < mt; i++) {
            __m512i xv = _mm512_loadu_si512(xu + (m0 + i) * K + k);
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], xv, w0);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], xv, w1);
            acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], xv, w2);
            acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], xv, w3);
        }
    }
    for (int i = 0; i < mt; i++)
        for (int r = 0; r < ROWS && n + r < N; r++) {
            int32_t d = _mm512_reduce_add_epi32(acc[i][r]) - 128 * sums[n + r];
            out[(m0 + i) * N + n + r] = xs[m0 + i] * sw[n + r] * (float)d + (bias ? bias[n + r] : 0.f);
        }
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni")))
static void group_vnni_many(const int8_t *W, const int32_t *sums, const float *sw, const float *bias, const uint8_t *xu,
                            const float *xs, float *out, int64_t M, int64_t K, int64_t N, int64_t g) {
    const int8_t *w = W + g * ROWS * K;
    int64_t m = 0;
    for (; m + TILE <= M; m += TILE) tile_vnni(w, sums, sw, bias, xu, xs, out, K, N, g * ROWS, m, TILE);
    switch (M - m) {
        case 5: tile_vnni(w, sums, sw, bias, xu, xs, out, K, N, g * ROWS, m, 5); break;
        case 4: tile_vnni(w, sums, sw, bias, xu, xs, out, K, N, g * ROWS, m, 4); break;
        case 3: tile_vnni(w, sums, sw, bias, xu, xs, out, K, N, g * ROWS, m, 3); break;
        case 2: tile_vnni(w, sums, sw, bias, xu, xs, out, K, N, g * ROWS, m, 2); break;
        case 1: tile_vnni(w, sums, sw, bias, xu, xs, out, K, N, g * ROWS, m, 1); break;
        default: break;
    }
}

/* out [M][N] = x [M][K] @ (packed * scale).T + bias (bias may be NULL); K a multiple of 64 and at
   most 65536 (the many-row path's int32 sums). Calls of fewer than MANY rows quantize activations
   a block of 32 at a time; with AVX-512 VNNI, calls of MANY or more a row at a time (above). A
   row's result depends only on that row and which of the two its call took.
   Returns 0, or -1 when the activations' scratch cannot be allocated. */
int q8_linear(int threads, int isa, const float *x, int64_t M, int64_t K, const int8_t *packed, const float *scale, const int32_t *sums,
              const float *bias, float *out, int64_t N) {
    int64_t groups = (N + ROWS - 1) / ROWS;
    if (isa == 2 && M >= MANY) {
        uint8_t *xu = malloc((size_t)(M * K));
        float *xs = malloc((size_t)M * sizeof(float));
        if (!xu || !xs) {
            free(xu);
            free(xs);
            return -1;
        }
        quantize_rows(threads, x, M, K, xu, xs);
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t g = 0; g < groups; g++) group_vnni_many(packed, sums, scale, bias, xu, xs, out, M, K, N, g);
        free(xu);
        free(xs);
        return 0;
    }
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc((size_t)(M * (K / BLOCK)) * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    quantize(threads, x, M * (K / BLOCK), xq, xs);
    if (isa == 2) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t g = 0; g < groups; g++) group_vnni(packed, scale, bias, xq, xs, out, M, K, N, g);
    } else {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t g = 0; g < groups; g++) group_avx2(packed, scale, bias, xq, xs, out, M, K, N, g);
    }
    free(xq);
    free(xs);
    return 0;
}
