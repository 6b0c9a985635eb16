/* Matrix-vector products for decoding on the CPU: y = x W^T + b for a few rows of x (gptcore/inference/gemv.py).

   Decoding one token reads every weight once, so its speed is the speed at which weights stream from
   memory. These loops stream each weight row once for all rows of x, four weight rows at a time (four
   independent loads in flight), and split the weight rows statically over OpenMP threads, so every
   output is the same sum in the same order whatever the thread count: same inputs, same bytes.

   Built by gptcore/inference/gemv.py with -O3 -march=native -fopenmp for the machine it runs on. bf16 uses
   AVX512-BF16's VDPBF16PS where the CPU has it (pairs of bf16 products summed into fp32 lanes, Intel
   SDM vol. 2); elsewhere plain C with 16 fp32 lanes, which the compiler vectorizes. Sums are fp32;
   outputs are fp32 (logits) or rounded to bf16, to nearest even, as torch rounds. */

#include <math.h>
#include <omp.h>
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

/* GPT-2's GELU, tanh approximation (Hendrycks & Gimpel 2016, arXiv:1606.08415), in fp32 as torch's. */
static inline float gelu_tanh(float v) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;  /* sqrt(2 / pi) */
    return 0.5f * v * (1.0f + tanhf(beta * (v + kappa * v * v * v)));
}

/* Output i: the fp32 sum, or rounded to bf16; with gelu, the bf16 value through GELU and rounded again
   (as a bf16 Linear followed by a bf16 GELU module computes it). */
static inline void store(void *y, int64_t i, float s, int fp32_out, int gelu) {
    if (fp32_out) ((float *)y)[i] = s;
    else if (gelu) ((uint16_t *)y)[i] = float_to_bf16(gelu_tanh(bf16_to_float(float_to_bf16(s))));
    else ((uint16_t *)y)[i] = float_to_bf16(s);
}

/* y[b, n] = sum_k x[b, k] w[n, k] + bias[n]: x bf16 [batch, k_len], w bf16 [n_len, k_len], bias bf16
   [n_len] or NULL, y [batch, n_len] fp32 if fp32_out else bf16; all contiguous. A worksharing loop:
   inside a parallel region the weight rows are split over its threads (static: the same split for
   the same thread count), outside one thread does all. */
static void product_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, void *y, int64_t batch,
                         int64_t n_len, int64_t k_len, int fp32_out, int gelu) {
    int64_t groups = (n_len + GROUP - 1) / GROUP;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = g * GROUP;
        int rows = group_rows(first, n_len);
        for (int64_t b = 0; b < batch; b++) {
            float sums[GROUP];
            dot_bf16(x + b * k_len, w + first * k_len, k_len, rows, sums);
            for (int r = 0; r < rows; r++) {
                float s = sums[r] + (bias ? bf16_to_float(bias[first + r]) : 0.0f);
                store(y, b * n_len + first + r, s, fp32_out, gelu);
            }
        }
    }
}

void gptcore_gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, void *y,
                       int64_t batch, int64_t n_len, int64_t k_len, int threads, int fp32_out) {
#pragma omp parallel num_threads(threads)
    product_bf16(x, w, bias, y, batch, n_len, k_len, fp32_out, 0);
}

/* fp32: y[b, n] = sum_k x[b, k] w[n, k] + bias[n], all fp32 and contiguous (x [batch, k_len], w [n_len,
   k_len], bias [n_len] or NULL). Each output is one sum over 16 lanes in k order, then the lanes in order,
   computed by the same code whatever the batch: a row's outputs never depend on the rows beside it (torch's
   GEMM picks other kernels, and other reduction orders, by the number of rows). The four weight rows of a
   group are summed side by side (four independent accumulators) and stay in cache for every row of x. */
static void dot_f32(const float *x, const float *w, int64_t k_len, int rows, float *sums) {
    if (rows == GROUP) {
        float acc[GROUP][LANES] = {{0}};
        int64_t k = 0;
        for (; k + LANES <= k_len; k += LANES)
            for (int r = 0; r < GROUP; r++)
                for (int j = 0; j < LANES; j++) acc[r][j] += x[k + j] * w[r * k_len + k + j];
        for (; k < k_len; k++)
            for (int r = 0; r < GROUP; r++) acc[r][k % LANES] += x[k] * w[r * k_len + k];
        for (int r = 0; r < GROUP; r++) sums[r] = sum_lanes(acc[r]);
        return;
    }
    for (int r = 0; r < rows; r++) {
        const float *row = w + r * k_len;
        float acc[LANES] = {0};
        int64_t k = 0;
        for (; k + LANES <= k_len; k += LANES)
            for (int j = 0; j < LANES; j++) acc[j] += x[k + j] * row[k + j];
        for (; k < k_len; k++) acc[k % LANES] += x[k] * row[k];
        sums[r] = sum_lanes(acc);
    }
}

void gptcore_gemv_f32(const float *x, const float *w, const float *bias, float *y, int64_t batch, int64_t n_len,
                      int64_t k_len, int threads) {
    int64_t groups = (n_len + GROUP - 1) / GROUP;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = g * GROUP;
        int rows = group_rows(first, n_len);
        for (int64_t b = 0; b < batch; b++) {
            float sums[GROUP];
            dot_f32(x + b * k_len, w + first * k_len, k_len, rows, sums);
            for (int r = 0; r < rows; r++) y[b * n_len + first + r] = sums[r] + (bias ? bias[first + r] : 0.0f);
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

/* Chunks of CHUNK weights in a row of k_len. */
static inline int64_t chunk_count(int64_t k_len) { return (k_len + CHUNK - 1) / CHUNK; }

/* The bytes one row of k_len quantized activations takes in a buffer of rows (quantized_row_at: its
   layout there). */
static size_t quantized_bytes(int64_t k_len) {
    int64_t chunks = chunk_count(k_len);
    return (size_t)(chunks * CHUNK + chunks * LANES * (sizeof(float) + sizeof(int32_t)));
}

static QuantizedRow quantized_row_at(char *buffer, int64_t k_len, int64_t b) {
    int64_t chunks = chunk_count(k_len);
    char *base = buffer + (size_t)b * quantized_bytes(k_len);
    QuantizedRow row = {(int8_t *)(base + chunks * LANES * (sizeof(float) + sizeof(int32_t))), (float *)base,
                        (int32_t *)(base + chunks * LANES * sizeof(float))};
    return row;
}

/* Quantize rows 0..batch-1 of x (fp32 if x_fp32 else bf16) into buffer (quantized_bytes(k_len) each). */
static void quantize_rows(const void *x, int x_fp32, int64_t batch, int64_t k_len, char *buffer) {
    int64_t chunks = chunk_count(k_len);
    for (int64_t b = 0; b < batch; b++) {
        QuantizedRow row = quantized_row_at(buffer, k_len, b);
        quantize_row((const char *)x + b * k_len * (x_fp32 ? sizeof(float) : sizeof(uint16_t)), x_fp32, k_len, chunks, &row);
    }
}

/* y[b, n] = scale[n] sum_k xq[b, k] q[n, k] + bias[n] for rows quantized by quantize_rows into buffer;
   a worksharing loop as product_bf16's. */
static void product_int8(char *buffer, const int8_t *q, const uint16_t *scale, const uint16_t *bias, void *y,
                         int64_t batch, int64_t n_len, int64_t k_len, int fp32_out, int gelu) {
    int64_t chunks = chunk_count(k_len);
    int64_t groups = (n_len + GROUP - 1) / GROUP;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = g * GROUP;
        int rows = group_rows(first, n_len);
        for (int64_t b = 0; b < batch; b++) {
            QuantizedRow row = quantized_row_at(buffer, k_len, b);
            float sums[GROUP];
            dot_int8(&row, q + first * k_len, k_len, chunks, rows, sums);
            for (int r = 0; r < rows; r++) {
                float s = sums[r] * bf16_to_float(scale[first + r]) + (bias ? bf16_to_float(bias[first + r]) : 0.0f);
                store(y, b * n_len + first + r, s, fp32_out, gelu);
            }
        }
    }
}

/* y[b, n] = scale[n] sum_k x[b, k] q[n, k] + bias[n], x int8-quantized per block of 32 as above:
   x [batch, k_len] fp32 if x_fp32 else bf16, q int8 [n_len, k_len], scale and bias bf16 [n_len] (bias
   may be NULL), y [batch, n_len] fp32 if fp32_out else bf16; all contiguous. Returns 0, or -1 when out
   of memory. */
int gptcore_gemv_int8(const void *x, int x_fp32, const int8_t *q, const uint16_t *scale, const uint16_t *bias,
                      void *y, int64_t batch, int64_t n_len, int64_t k_len, int threads, int fp32_out) {
    char *buffer = malloc((size_t)(batch > 0 ? batch : 1) * quantized_bytes(k_len));
    if (!buffer) return -1;
    quantize_rows(x, x_fp32, batch, k_len, buffer);
#pragma omp parallel num_threads(threads)
    product_int8(buffer, q, scale, bias, y, batch, n_len, k_len, fp32_out, 0);
    free(buffer);
    return 0;
}

/* ---- One transformer block's decoding step in one call (gptcore/inference/decode_block.py) ----

   GPT-2's pre-LayerNorm block for `batch` rows of one new position each, all bf16 as a bf16-true
   model's modules compute it (LayerNorm, the four Linears, attention, GELU and the two residual adds,
   each rounded to bf16 where the module path rounds): x -> x + proj(attention(ln1(x))) -> the same +
   mlp(ln2(.)). The keys and values of the new position are written into the KV cache. One OpenMP
   region runs the whole step: the Linears split their weight rows over the threads, attention splits
   its heads; the small serial parts (LayerNorms, residual adds, int8 activations) run on one thread.
   Every output is computed by one thread in a fixed order: the same bytes whatever the thread count. */

/* The parameters, in this order (Linear weights bf16, or int8 with bf16 scales; biases may be NULL). */
enum { NORM1_W, NORM1_B, QKV_W, QKV_S, QKV_B, OUT_W, OUT_S, OUT_B, NORM2_W, NORM2_B, FC_W, FC_S, FC_B,
       PROJ_W, PROJ_S, PROJ_B, BLOCK_PARAMS };

/* y = (x - mean) / sqrt(var + eps) * weight + bias over one row of n, rounded to bf16 (Ba et al. 2016,
   arXiv:1607.06450; the biased variance, as torch.nn.LayerNorm). */
static void layer_norm_row(const uint16_t *x, const uint16_t *weight, const uint16_t *bias, int64_t n, float eps,
                           uint16_t *y) {
    float lanes[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) lanes[l] += bf16_to_float(x[k + l]);
    for (; k < n; k++) lanes[k % LANES] += bf16_to_float(x[k]);
    float mean = sum_lanes(lanes) / (float)n;
    memset(lanes, 0, sizeof lanes);
    for (k = 0; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++) {
            float d = bf16_to_float(x[k + l]) - mean;
            lanes[l] += d * d;
        }
    for (; k < n; k++) {
        float d = bf16_to_float(x[k]) - mean;
        lanes[k % LANES] += d * d;
    }
    float rstd = 1.0f / sqrtf(sum_lanes(lanes) / (float)n + eps);
    for (k = 0; k < n; k++)
        y[k] = float_to_bf16((bf16_to_float(x[k]) - mean) * rstd * bf16_to_float(weight[k]) + bf16_to_float(bias[k]));
}

/* One head's attention for one query: softmax(q k_j / sqrt(hd)) over keys j < length, times the
   values, in fp32, rounded to bf16. q [hd]; keys, values [length, hd] rows of the cache; scores
   [length] scratch; out [hd]. (Vaswani et al. 2017, arXiv:1706.03762, eq. 1.) */
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t length, int64_t hd,
                   float *scores, uint16_t *out) {
    float query[hd], acc[hd];
    float scale = 1.0f / sqrtf((float)hd), top = -INFINITY;
    for (int64_t d = 0; d < hd; d++) query[d] = bf16_to_float(q[d]) * scale;
    for (int64_t j = 0; j < length; j++) {
        const uint16_t *key = keys + j * hd;
        float lanes[LANES] = {0};
        int64_t d = 0;
        for (; d + LANES <= hd; d += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] += query[d + l] * bf16_to_float(key[d + l]);
        for (; d < hd; d++) lanes[d % LANES] += query[d] * bf16_to_float(key[d]);
        scores[j] = sum_lanes(lanes);
        top = scores[j] > top ? scores[j] : top;
    }
    float total = 0.0f;
    for (int64_t j = 0; j < length; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    for (int64_t d = 0; d < hd; d++) acc[d] = 0.0f;
    for (int64_t j = 0; j < length; j++) {
        const uint16_t *value = values + j * hd;
        float p = scores[j];
        for (int64_t d = 0; d < hd; d++) acc[d] += p * bf16_to_float(value[d]);
    }
    for (int64_t d = 0; d < hd; d++) out[d] = float_to_bf16(acc[d] / total);
}

static size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

/* y = bf16(a + b) elementwise over n. */
static void add_rows(const uint16_t *a, const uint16_t *b, uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

/* The product of one of the block's Linears, bf16 or int8; x_q: the int8 activations of x (int8 only). */
static void block_product(const void *const *p, int which, int int8, const uint16_t *x, char *x_q, void *y,
                          int64_t batch, int64_t n_len, int64_t k_len, int gelu) {
    const uint16_t *bias = (const uint16_t *)p[which + 2];
    if (int8) product_int8(x_q, (const int8_t *)p[which], (const uint16_t *)p[which + 1], bias, y, batch, n_len, k_len, 0, gelu);
    else product_bf16(x, (const uint16_t *)p[which], bias, y, batch, n_len, k_len, 0, gelu);
}

/* out [batch, emb] = the block applied to x [batch, emb] (both bf16) at position `position` of every
   row; keys and values: this layer's cache, bf16 [batch, heads, max_len, emb / heads], whose position
   `position` is written; pad: NULL, or [batch] left-padding lengths (those positions are masked out as
   keys, as KVCache.attention_mask does). params: BLOCK_PARAMS pointers as the enum above; int8: the Linears are int8
   (activations quantized per 32 as gptcore_gemv_int8's). Returns 0, or -1 when out of memory. */
int gptcore_block_decode(const void *const *params, int int8, const uint16_t *x, uint16_t *out, uint16_t *keys,
                         uint16_t *values, int64_t batch, int64_t emb, int64_t heads, int64_t max_len,
                         int64_t position, const int64_t *pad, float eps, int threads) {
    const void *const *p = params;
    int64_t hd = emb / heads, length = position + 1, hidden = 4 * emb;
    size_t row_bytes = aligned((size_t)batch * (size_t)emb * sizeof(uint16_t));
    size_t quantized = int8 ? (size_t)batch * quantized_bytes(hidden) : 0;
    size_t score_bytes = (size_t)(threads > 0 ? threads : 1) * (size_t)length * sizeof(float);
    /* normed, attended, residual, scratch: [batch, emb]; qkv [batch, 3 emb]; fc [batch, 4 emb]; each
       start 64-byte aligned. */
    char *buffer = malloc(11 * row_bytes + aligned(quantized) + score_bytes);
    if (!buffer) return -1;
    uint16_t *normed = (uint16_t *)buffer, *attended = (uint16_t *)(buffer + row_bytes);
    uint16_t *residual = (uint16_t *)(buffer + 2 * row_bytes), *scratch = (uint16_t *)(buffer + 3 * row_bytes);
    uint16_t *qkv = (uint16_t *)(buffer + 4 * row_bytes), *fc = (uint16_t *)(buffer + 7 * row_bytes);
    char *x_q = buffer + 11 * row_bytes;
    float *scores = (float *)(x_q + aligned(quantized));
#pragma omp parallel num_threads(threads)
    {
        float *my_scores = scores + (size_t)omp_get_thread_num() * (size_t)length;
#pragma omp single
        {
            for (int64_t b = 0; b < batch; b++)
                layer_norm_row(x + b * emb, p[NORM1_W], p[NORM1_B], emb, eps, normed + b * emb);
            if (int8) quantize_rows(normed, 0, batch, emb, x_q);
        }
        block_product(p, QKV_W, int8, normed, x_q, qkv, batch, 3 * emb, emb, 0);
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < batch * heads; unit++) {
            int64_t b = unit / heads, h = unit % heads;
            const uint16_t *row = qkv + b * 3 * emb;
            uint16_t *k_cache = keys + unit * max_len * hd, *v_cache = values + unit * max_len * hd;
            memcpy(k_cache + position * hd, row + emb + h * hd, (size_t)hd * sizeof(uint16_t));
            memcpy(v_cache + position * hd, row + 2 * emb + h * hd, (size_t)hd * sizeof(uint16_t));
            /* Left padding: the row's first pad[b] positions are no keys (the query itself always is). */
            int64_t first = pad ? (pad[b] < 0 ? 0 : pad[b] > position ? position : pad[b]) : 0;
            attend(row + h * hd, k_cache + first * hd, v_cache + first * hd, length - first, hd, my_scores,
                   attended + b * emb + h * hd);
        }
        if (int8) {  /* every thread takes the same branch; bf16 skips the barrier */
#pragma omp single
            quantize_rows(attended, 0, batch, emb, x_q);
        }
        block_product(p, OUT_W, int8, attended, x_q, scratch, batch, emb, emb, 0);
#pragma omp single
        {
            add_rows(x, scratch, residual, batch * emb);
            for (int64_t b = 0; b < batch; b++)
                layer_norm_row(residual + b * emb, p[NORM2_W], p[NORM2_B], emb, eps, normed + b * emb);
            if (int8) quantize_rows(normed, 0, batch, emb, x_q);
        }
        block_product(p, FC_W, int8, normed, x_q, fc, batch, hidden, emb, 1);
        if (int8) {
#pragma omp single
            quantize_rows(fc, 0, batch, hidden, x_q);
        }
        block_product(p, PROJ_W, int8, fc, x_q, scratch, batch, emb, hidden, 0);
    }
    add_rows(residual, scratch, out, batch * emb);
    free(buffer);
    return 0;
}
