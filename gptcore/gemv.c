/* Matrix-vector products for decoding on the CPU: y = x W^T + b for a few rows of x (gptcore/gemv.py).

   Decoding one token reads every weight once, so its speed is the speed at which weights stream from
   memory. These loops stream each weight row once for all rows of x, four weight rows at a time (four
   independent loads in flight), and split the weight rows statically over OpenMP threads, so every
   output is the same sum in the same order whatever the thread count: same inputs, same bytes.

   Built by gptcore/gemv.py with -O3 -march=native -fopenmp for the machine it runs on. bf16 uses
   AVX512-BF16's VDPBF16PS where the CPU has it (pairs of bf16 products summed into fp32 lanes, Intel
   SDM vol. 2); elsewhere plain C with 16 fp32 lanes, which the compiler vectorizes. Sums are fp32;
   outputs are fp32 (logits) or rounded to bf16, to nearest even, as torch rounds. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define NATIVE_BF16 1
#else
#define NATIVE_BF16 0
#endif

#ifndef GROUP
#define GROUP 4  /* weight rows streamed together */
#endif
#define LANES 16
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096  /* ahead in each weight row: ahead of the hardware prefetcher, which stops at pages */
#endif

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int gptcore_gemv_native_bf16(void) { return NATIVE_BF16; }

static inline float sum_lanes(const float *acc) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* How many weight rows the group starting at row `first` holds (GROUP, fewer at the end). */
static inline int group_rows(int64_t first, int64_t n_len) {
    return (int)(n_len - first < GROUP ? n_len - first : GROUP);
}

/* sums[r] = sum_k x[k] w[r*k_len + k] for r < rows (rows <= GROUP), k_len = K. */
static void dot_bf16(const uint16_t *x, const uint16_t *w, int64_t k_len, int rows, float *sums) {
#if NATIVE_BF16
    if (rows == GROUP) {
        __m512 acc[GROUP];
        for (int r = 0; r < GROUP; r++) acc[r] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= k_len; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
            for (int r = 0; r < GROUP; r++) {
                _mm_prefetch((const char *)(w + r * k_len + k) + PREFETCH_BYTES, _MM_HINT_T0);
                acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512((const void *)(w + r * k_len + k)));
            }
        }
        if (k < k_len) {  /* the tail, zero-filled past the end */
            __mmask32 mask = (__mmask32)((1ull << (k_len - k)) - 1);
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k);
            for (int r = 0; r < GROUP; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * k_len + k));
        }
        for (int r = 0; r < GROUP; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
        return;
    }
#endif
    for (int r = 0; r < rows; r++) {
        const uint16_t *row = w + r * k_len;
        float acc[LANES] = {0};
        int64_t k = 0;
        for (; k + LANES <= k_len; k += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += bf16_to_float(x[k + j]) * bf16_to_float(row[k + j]);
        for (; k < k_len; k++) acc[k % LANES] += bf16_to_float(x[k]) * bf16_to_float(row[k]);
        sums[r] = sum_lanes(acc);
    }
}

static inline void store(void *y, int64_t i, float s, int fp32_out) {
    if (fp32_out) ((float *)y)[i] = s;
    else ((uint16_t *)y)[i] = float_to_bf16(s);
}

/* y[b, n] = sum_k x[b, k] w[n, k] + bias[n]: x bf16 [batch, k_len], w bf16 [n_len, k_len], bias bf16
   [n_len] or NULL, y [batch, n_len] fp32 if fp32_out else bf16; all contiguous. */
void gptcore_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, void *y,
                       int64_t batch, int64_t n_len, int64_t k_len, int threads, int fp32_out) {
    int64_t groups = (n_len + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = g * GROUP;
        int rows = group_rows(first, n_len);
        for (int64_t b = 0; b < batch; b++) {
            float sums[GROUP];
            dot_bf16(x + b * k_len, w + first * k_len, k_len, rows, sums);
            for (int r = 0; r < rows; r++) {
                float s = sums[r] + (bias ? bf16_to_float(bias[first + r]) : 0.0f);
                store(y, b * n_len + first + r, s, fp32_out);
            }
        }
    }
}

/* int8: weights q [n_len, k_len] int8 with one scale per row; x quantized to int8 in blocks of 32 on
   the fly, as llama.cpp's q8_0 dot product does (ggml's quantize_row_q8_0: scale = max|x| / 127,
   xq = round(x / scale)), so that the products are int8 x int8 summed exactly in int32, four at a time
   by AVX512-VNNI's VPDPBUSD where the CPU has it. VPDPBUSD multiplies unsigned by signed bytes: the
   weights go in as q + 128 (q XOR 0x80) and each lane starts from -128 x (its four xq), which cancels
   the offset exactly. A chunk is 64 weights: 16 lanes of 4, lanes 0-7 in x's block 2c, 8-15 in 2c+1. */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define NATIVE_VNNI 1
#else
#define NATIVE_VNNI 0
#endif

#ifndef INT8_PREFETCH_BYTES
#define INT8_PREFETCH_BYTES 4096
#endif
#define BLOCK 32
#define CHUNK 64

int gptcore_gemv_native_vnni(void) { return NATIVE_VNNI; }

typedef struct {
    int8_t *xq;          /* [chunks * CHUNK], zero past k_len */
    float *lane_scale;   /* [chunks * LANES]: the scale of the block lane l of chunk c reads */
    int32_t *lane_start; /* [chunks * LANES]: -128 x the sum of the four xq lane l of chunk c reads */
} QuantizedRow;

static inline float x_at(const void *x, int x_fp32, int64_t k) {
    return x_fp32 ? ((const float *)x)[k] : bf16_to_float(((const uint16_t *)x)[k]);
}

static void quantize_row(const void *x, int x_fp32, int64_t k_len, int64_t chunks, QuantizedRow *out) {
    memset(out->xq, 0, (size_t)(chunks * CHUNK));
    memset(out->lane_scale, 0, (size_t)(chunks * LANES) * sizeof(float));  /* blocks past the end: 0 */
    for (int64_t start = 0; start < k_len; start += BLOCK) {
        int64_t end = start + BLOCK < k_len ? start + BLOCK : k_len;
        float amax = 0.0f;
        for (int64_t k = start; k < end; k++) amax = fabsf(x_at(x, x_fp32, k)) > amax ? fabsf(x_at(x, x_fp32, k)) : amax;
        float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int64_t k = start; k < end; k++) out->xq[k] = (int8_t)roundf(x_at(x, x_fp32, k) * inverse);
        int64_t c = start / CHUNK, half = (start % CHUNK) / BLOCK;
        for (int l = 0; l < LANES / 2; l++) out->lane_scale[c * LANES + half * (LANES / 2) + l] = scale;
    }
    for (int64_t c = 0; c < chunks; c++) {
        for (int l = 0; l < LANES; l++) {
            const int8_t *four = out->xq + c * CHUNK + 4 * l;
            out->lane_start[c * LANES + l] = -128 * (four[0] + four[1] + four[2] + four[3]);
        }
    }
}

/* sums[r] = sum over chunks and lanes of lane_scale x (the lane's int32 dot product), for rows r. */
static void dot_int8(const QuantizedRow *x, const int8_t *q, int64_t k_len, int64_t chunks, int rows, float *sums) {
#if NATIVE_VNNI
    if (rows == GROUP) {
        __m512 acc[GROUP];
        for (int r = 0; r < GROUP; r++) acc[r] = _mm512_setzero_ps();
        const __m512i offset = _mm512_set1_epi8((char)0x80);
        for (int64_t c = 0; c < chunks; c++) {
            int64_t k = c * CHUNK;
            __mmask64 mask = k + CHUNK <= k_len ? ~(__mmask64)0 : (__mmask64)((1ull << (k_len - k)) - 1);
            __m512i xv = _mm512_loadu_si512((const void *)(x->xq + k));
            __m512i start = _mm512_loadu_si512((const void *)(x->lane_start + c * LANES));
            __m512 scale = _mm512_loadu_ps(x->lane_scale + c * LANES);
            for (int r = 0; r < GROUP; r++) {
                _mm_prefetch((const char *)(q + r * k_len + k) + INT8_PREFETCH_BYTES, _MM_HINT_T0);
                __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + r * k_len + k), offset);
                __m512i dot = _mm512_dpbusd_epi32(start, w, xv);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
            }
        }
        for (int r = 0; r < GROUP; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
        return;
    }
#endif
    for (int r = 0; r < rows; r++) {
        const int8_t *row = q + r * k_len;
        float acc[LANES] = {0};
        for (int64_t c = 0; c < chunks; c++)
            for (int l = 0; l < LANES; l++) {
                int32_t dot = 0;
                for (int j = 0; j < 4; j++) {
                    int64_t k = c * CHUNK + 4 * l + j;
                    if (k < k_len) dot += (int32_t)row[k] * x->xq[k];
                }
                acc[l] += (float)dot * x->lane_scale[c * LANES + l];
            }
        sums[r] = sum_lanes(acc);
    }
}

/* y[b, n] = scale[n] sum_k x[b, k] q[n, k] + bias[n], x int8-quantized per block of 32 as above:
   x [batch, k_len] fp32 if x_fp32 else bf16, q int8 [n_len, k_len], scale and bias bf16 [n_len] (bias
   may be NULL), y [batch, n_len] fp32 if fp32_out else bf16; all contiguous. Returns 0, or -1 when out
   of memory. */
int gptcore_gemv_int8(const void *x, int x_fp32, const int8_t *q, const uint16_t *scale, const uint16_t *bias,
                      void *y, int64_t batch, int64_t n_len, int64_t k_len, int threads, int fp32_out) {
    int64_t chunks = (k_len + CHUNK - 1) / CHUNK;
    size_t per_row = (size_t)(chunks * CHUNK + chunks * LANES * (sizeof(float) + sizeof(int32_t)));
    char *buffer = malloc((size_t)(batch > 0 ? batch : 1) * per_row);
    if (!buffer) return -1;
    QuantizedRow rows_of_x[batch > 0 ? batch : 1];
    for (int64_t b = 0; b < batch; b++) {
        char *base = buffer + b * per_row;
        rows_of_x[b].lane_scale = (float *)base;
        rows_of_x[b].lane_start = (int32_t *)(base + chunks * LANES * sizeof(float));
        rows_of_x[b].xq = (int8_t *)(base + chunks * LANES * (sizeof(float) + sizeof(int32_t)));
        const char *row = (const char *)x + b * k_len * (x_fp32 ? sizeof(float) : sizeof(uint16_t));
        quantize_row(row, x_fp32, k_len, chunks, &rows_of_x[b]);
    }
    int64_t groups = (n_len + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = g * GROUP;
        int rows = group_rows(first, n_len);
        for (int64_t b = 0; b < batch; b++) {
            float sums[GROUP];
            dot_int8(&rows_of_x[b], q + first * k_len, k_len, chunks, rows, sums);
            for (int r = 0; r < rows; r++) {
                float s = sums[r] * bf16_to_float(scale[first + r]) + (bias ? bf16_to_float(bias[first + r]) : 0.0f);
                store(y, b * n_len + first + r, s, fp32_out);
            }
        }
    }
    free(buffer);
    return 0;
}
