/* Matrix-vector products for decoding on the CPU: y = x W^T + b for a few rows of x (gptcore/inference/gemv.py).

   Decoding one token reads every weight once, so its speed is the speed at which weights stream from
   memory, and the bytes per weight decide: 16-bit and int8 weights with fp32 arithmetic. These loops
   stream each weight row once for all rows of x (GROUP rows per dot call; int8 takes up to TILE rows of
   x per pass, and panels of PANEL weight rows for prompts), and split the weight rows statically over
   OpenMP threads, so every output is the same sum in the same order whatever the thread count: same
   inputs, same bytes.

   As ggml-cpu's vec_dot functions, each (weight type, instruction set) has one small dot-product
   function, and a dispatcher picks one per type when the library is loaded (gptcore_gemv_select): the
   best one that was compiled in (the compiler targets the machine it runs on: gptcore/inference/kernels.py)
   AND that the CPU reports through cpuid (with the OS saving the wider registers, XGETBV), so a path
   without its instructions is never taken. The scalar functions are the reference the tests compare
   every other path with:

   bf16 weights  avx512-bf16  VDPBF16PS: pairs of bf16 products summed into fp32 lanes (Intel SDM vol. 2)
                 avx2-fma     bf16 widened to fp32 in registers (a shift for the even, a mask for the odd
                              halves of each 32-bit pair), then fp32 FMAs
                 scalar       plain C over 16 fp32 lanes, which compilers vectorize
   int8 weights  avx512-vnni  VPDPBUSD on 64 bytes
                 avx-vnni     VPDPBUSD (VEX) on 32 bytes
                 avx2         VPMADDUBSW + VPMADDWD, as ggml's q8_0 dot product on AVX2
                 scalar       plain C, one exact int32 dot product per block of 32
   fp32 weights  avx2-fma     16 fp32 lanes in two registers, FMAs (batch-invariant fp32 decoding)
                 scalar       plain C over 16 fp32 lanes, which compilers vectorize

   Sums are fp32; outputs are fp32 (logits) or rounded to bf16, to nearest even, as torch rounds. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }  /* built without OpenMP: one thread does all */
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif
/* The paths the compiler may emit (what it targets: -march=native, less what a wrapper takes away). */
#if X86 && defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512BF16 1
#else
#define HAVE_AVX512BF16 0
#endif
#if X86 && defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512VNNI 1
#else
#define HAVE_AVX512VNNI 0
#endif
#if X86 && defined(__AVX2__) && defined(__FMA__)
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif
#if HAVE_AVX2 && defined(__AVXVNNI__)
#define HAVE_AVXVNNI 1
#else
#define HAVE_AVXVNNI 0
#endif

#ifndef GROUP
/* Weight rows per dot call. One: a thread then reads its share of the matrix as one sequential stream
   (rows are contiguous), which the hardware prefetchers follow; four rows side by side were four short
   streams 2.5 KB apart: 774M bf16-true decoding went from 21.3 to 25-32 tokens/s with one (2 threads,
   AMD EPYC Zen 5, benchmarks/results/2026-12-07-kernels-*; docs/performance.md). Independent
   accumulators within the row keep the FMA latency off the critical path instead. */
#define GROUP 1
#endif
#define ACCS 4  /* independent accumulators per row in the vector paths */
#define LANES 16
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096  /* ahead in each weight row: ahead of the hardware prefetcher, which stops at pages */
#endif

/* ---- What the CPU can do (cpuid leaves 1 and 7, Intel SDM vol. 2A; XGETBV for the OS's register state) ---- */

enum { CPU_AVX2 = 1, CPU_FMA = 2, CPU_F16C = 4, CPU_AVXVNNI = 8, CPU_AVX512F = 16, CPU_AVX512BW = 32,
       CPU_AVX512VNNI = 64, CPU_AVX512BF16 = 128 };

#if X86
#include <cpuid.h>
static uint64_t read_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

/* The CPU_* features this CPU has and the OS enables, as a bit mask. */
int gptcore_cpu_features(void) {
    int features = 0;
#if X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)) || !(c & (1u << 28))) return 0;  /* OSXSAVE, AVX */
    uint64_t xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6) return 0;  /* the OS saves neither XMM nor YMM state */
    int avx512_state = (xcr0 & 0xe0) == 0xe0;  /* opmask, ZMM0-15 upper halves, ZMM16-31 */
    if (c & (1u << 12)) features |= CPU_FMA;
    if (c & (1u << 29)) features |= CPU_F16C;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        if (b & (1u << 5)) features |= CPU_AVX2;
        if (avx512_state && (b & (1u << 16))) features |= CPU_AVX512F;
        if (avx512_state && (b & (1u << 30))) features |= CPU_AVX512BW;
        if (avx512_state && (c & (1u << 11))) features |= CPU_AVX512VNNI;
        if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) {
            if (a & (1u << 4)) features |= CPU_AVXVNNI;
            if (avx512_state && (a & (1u << 5))) features |= CPU_AVX512BF16;
        }
    }
#endif
    return features;
}

/* ---- bf16 ---- */

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

static inline float sum_lanes(const float *acc) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* How many weight rows the group starting at row `first` holds (GROUP, fewer at the end). */
static inline int group_rows(int64_t first, int64_t n_len) {
    return (int)(n_len - first < GROUP ? n_len - first : GROUP);
}

/* The scalar reference: sums[r] = sum_k x[k] w[r*k_len + k] for r < rows (rows <= GROUP), k_len = K. */
static void dot_bf16_scalar(const uint16_t *x, const uint16_t *w, int64_t k_len, int rows, float *sums) {
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

/* The vector functions take a full group (GROUP rows); the dispatcher gives shorter groups to the scalar one. */
typedef void (*dot_bf16_fn)(const uint16_t *x, const uint16_t *w, int64_t k_len, float *sums);

#if HAVE_AVX512BF16
/* ACCS lines of 32 weights per step, each into its own accumulator (VDPBF16PS's latency is several
   cycles); the sums are added in a fixed order at the end, so a row's result depends on k_len only. */
static void dot_bf16_avx512bf16(const uint16_t *x, const uint16_t *w, int64_t k_len, float *sums) {
    for (int r = 0; r < GROUP; r++) {
        const uint16_t *row = w + r * k_len;
        __m512 acc[ACCS];
        for (int a = 0; a < ACCS; a++) acc[a] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 32 * ACCS <= k_len; k += 32 * ACCS)
            for (int a = 0; a < ACCS; a++) {
                _mm_prefetch((const char *)(row + k + 32 * a) + PREFETCH_BYTES, _MM_HINT_T0);
                __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k + 32 * a));
                acc[a] = _mm512_dpbf16_ps(acc[a], xv, (__m512bh)_mm512_loadu_si512((const void *)(row + k + 32 * a)));
            }
        for (int a = 0; k < k_len; k += 32, a++) {  /* the rest, the last line zero-filled past the end */
            __mmask32 mask = k + 32 <= k_len ? ~(__mmask32)0 : (__mmask32)((1ull << (k_len - k)) - 1);
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k);
            acc[a] = _mm512_dpbf16_ps(acc[a], xv, (__m512bh)_mm512_maskz_loadu_epi16(mask, row + k));
        }
        for (int a = 1; a < ACCS; a++) acc[0] = _mm512_add_ps(acc[0], acc[a]);
        sums[r] = _mm512_reduce_add_ps(acc[0]);
    }
}
#endif

#if HAVE_AVX2
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 bf16 values in a 256-bit register are 8 pairs; as fp32, the even ones are the pairs shifted left by
   16 bits and the odd ones the pairs with their low half cleared. Two integer operations per 16 weights,
   no shuffle. Each of the four products of a 64-byte line goes into its own accumulator (ACCS = 4), so
   the FMAs of a line do not wait on each other; the accumulators are added in a fixed order at the end. */
static void dot_bf16_avx2(const uint16_t *x, const uint16_t *w, int64_t k_len, float *sums) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int r = 0; r < GROUP; r++) {
        const uint16_t *row = w + r * k_len;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
               acc3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= k_len; k += 32) {  /* one 64-byte line per step */
            _mm_prefetch((const char *)(row + k) + PREFETCH_BYTES, _MM_HINT_T0);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + k)), x1 = _mm256_loadu_si256((const __m256i *)(x + k + 16));
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(row + k)), w1 = _mm256_loadu_si256((const __m256i *)(row + k + 16));
            acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
                                   _mm256_castsi256_ps(_mm256_slli_epi32(x0, 16)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w0, high)),
                                   _mm256_castsi256_ps(_mm256_and_si256(x0, high)), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)),
                                   _mm256_castsi256_ps(_mm256_slli_epi32(x1, 16)), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w1, high)),
                                   _mm256_castsi256_ps(_mm256_and_si256(x1, high)), acc3);
        }
        float s = sum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
        for (; k < k_len; k++) s += bf16_to_float(x[k]) * bf16_to_float(row[k]);  /* the tail */
        sums[r] = s;
    }
}
#endif

/* ---- fp32 (batch-invariant decoding in fp32: torch's GEMM picks other kernels, and other reduction orders,
   by the number of rows, so a row's sums would depend on the rows beside it). Each path sums a weight row
   the same way for every row of x, so a row's outputs never depend on the batch. */

/* The scalar reference: each sum over 16 lanes in k order (lane k % 16), then the lanes in order. The lanes
   are independent, so compilers vectorize it without reordering a sum. */
static void dot_f32_scalar(const float *x, const float *w, int64_t k_len, int rows, float *sums) {
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

typedef void (*dot_f32_fn)(const float *x, const float *w, int64_t k_len, float *sums);

#if HAVE_AVX2
/* The scalar reference's 16 lanes as two 8-float registers per weight row, four rows side by side, with
   FMAs; the tail and the lanes' sum as the reference's. */
static void dot_f32_avx2(const float *x, const float *w, int64_t k_len, float *sums) {
    __m256 lo[GROUP], hi[GROUP];
    for (int r = 0; r < GROUP; r++) lo[r] = _mm256_setzero_ps(), hi[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= k_len; k += LANES) {
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int r = 0; r < GROUP; r++) {
            const float *row = w + r * k_len + k;
            _mm_prefetch((const char *)row + PREFETCH_BYTES, _MM_HINT_T0);
            lo[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row), x0, lo[r]);
            hi[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), x1, hi[r]);
        }
    }
    for (int r = 0; r < GROUP; r++) {
        float acc[LANES];
        _mm256_storeu_ps(acc, lo[r]), _mm256_storeu_ps(acc + 8, hi[r]);
        for (int64_t j = k; j < k_len; j++) acc[j % LANES] += x[j] * w[r * k_len + j];
        sums[r] = sum_lanes(acc);
    }
}
#endif

/* GPT-2's GELU, tanh approximation (Hendrycks & Gimpel 2016, arXiv:1606.08415), in fp32 as torch's. */
static inline float gelu_tanh(float v) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f;  /* sqrt(2 / pi) */
    return 0.5f * v * (1.0f + tanhf(beta * (v + kappa * v * v * v)));
}

/* GELU of every bf16 value, rounded to bf16: a bf16 GELU has 65,536 inputs, so a table (128 KB, filled
   when the library is loaded) gives the same bytes as gelu_tanh at a load each; tanhf per output was 13%
   of an int8 774M decoding step (perf, 2026-12-07). */
static uint16_t gelu_table[1 << 16];

__attribute__((constructor)) static void fill_gelu_table(void) {
    for (uint32_t u = 0; u < (1u << 16); u++) gelu_table[u] = float_to_bf16(gelu_tanh(bf16_to_float((uint16_t)u)));
}

/* Output i: the fp32 sum, or rounded to bf16; with gelu, the bf16 value through GELU and rounded again
   (as a bf16 Linear followed by a bf16 GELU module computes it). */
static inline void store(void *y, int64_t i, float s, int fp32_out, int gelu) {
    if (fp32_out) ((float *)y)[i] = s;
    else if (gelu) ((uint16_t *)y)[i] = gelu_table[float_to_bf16(s)];
    else ((uint16_t *)y)[i] = float_to_bf16(s);
}

/* ---- int8: weights q [n_len, k_len] int8 with one scale per row; x quantized to int8 in blocks of 32
   on the fly, as llama.cpp's q8_0 dot product does (ggml's quantize_row_q8_0: scale = max|x| / 127,
   xq = round(x / scale), so |xq| <= 127), and the products int8 x int8 summed exactly in int32 per block.
   The multiply-add instructions take unsigned by signed bytes: the vector paths feed |q| (exact as an
   unsigned byte even for q = -128) and xq with q's sign, as ggml's AVX2 path does with x and q swapped. */

#ifndef INT8_PREFETCH_BYTES
#define INT8_PREFETCH_BYTES 4096
#endif
#define BLOCK 32
#define CHUNK 64

typedef struct {
    int8_t *xq;          /* [chunks * CHUNK], zero past k_len */
    float *lane_scale;   /* [chunks * LANES]: the scale of the block lane l of chunk c reads (block b: [8 b]) */
    int32_t *lane_start; /* [chunks * LANES]: -128 x the sum of the four xq lane l of chunk c reads */
} QuantizedRow;

static inline float block_scale(const QuantizedRow *x, int64_t block) { return x->lane_scale[block * (LANES / 2)]; }

/* Rows of x per pass over a weight row (a prompt's positions, or a batch's rows): the tile shares each
   weight block's load and |q|. Each row's sum is made by the same instructions in the same order whatever
   else the tile holds, so a row's output never depends on its neighbours (batch-invariant decoding). */
#define TILE 4
/* Weight rows per pass over the rows of x when x has more than a tile of them (prompts): a tile of x is
   then read from the cache once for PANEL weight rows instead of once for each (a 50-token prompt's
   quantized rows are 190 KB, past the L1 cache). */
#define PANEL 16

/* The scalar reference: sums[i] = sum over blocks of the block's scale x the int32 dot product of row i of
   x (i < nx) with the weight row w. */
static void dot_int8_scalar(const QuantizedRow *x, int nx, const int8_t *w, int64_t k_len, float *sums) {
    for (int i = 0; i < nx; i++) {
        float acc = 0.0f;
        for (int64_t start = 0, b = 0; start < k_len; start += BLOCK, b++) {
            int64_t end = start + BLOCK < k_len ? start + BLOCK : k_len;
            int32_t dot = 0;
            for (int64_t k = start; k < end; k++) dot += (int32_t)w[k] * x[i].xq[k];
            acc += (float)dot * block_scale(&x[i], b);
        }
        sums[i] = acc;
    }
}

/* The vector functions: nx (1..TILE) rows of x against one weight row. */
typedef void (*dot_int8_fn)(const QuantizedRow *x, int nx, const int8_t *w, int64_t k_len, float *sums);

/* A vector function from its tile body, called with nx a constant so that the compiler keeps every row's
   accumulators in registers (two per row: even and odd blocks, so consecutive FMAs do not wait on each
   other; they are added in a fixed order at the end). */
#define DOT_INT8_BY_TILE(name, tile)                                                                       \
    static void name(const QuantizedRow *x, int nx, const int8_t *w, int64_t k_len, float *sums) {        \
        switch (nx) {                                                                                       \
        case 1: tile(x, 1, w, k_len, sums); break;                                                          \
        case 2: tile(x, 2, w, k_len, sums); break;                                                          \
        case 3: tile(x, 3, w, k_len, sums); break;                                                          \
        default: tile(x, TILE, w, k_len, sums); break;                                                      \
        }                                                                                                   \
    }

#define ALWAYS_INLINE static inline __attribute__((always_inline))

#if HAVE_AVX512VNNI
/* 64 weights at a time: 16 lanes of 4, lanes 0-7 in x's block 2c, 8-15 in 2c+1. VPDPBUSD multiplies
   unsigned by signed bytes: the weights go in as q + 128 (q XOR 0x80) and each lane starts from
   -128 x (its four xq), which cancels the offset exactly. */
ALWAYS_INLINE void chunk_avx512vnni(const QuantizedRow *x, const int nx, const int8_t *w, int64_t k_len, int64_t c,
                                    __m512 *acc) {
    int64_t k = c * CHUNK;
    __mmask64 mask = k + CHUNK <= k_len ? ~(__mmask64)0 : (__mmask64)((1ull << (k_len - k)) - 1);
    _mm_prefetch((const char *)(w + k) + INT8_PREFETCH_BYTES, _MM_HINT_T0);
    __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + k), _mm512_set1_epi8((char)0x80));
    for (int i = 0; i < nx; i++) {
        __m512i start = _mm512_loadu_si512((const void *)(x[i].lane_start + c * LANES));
        __m512i dot = _mm512_dpbusd_epi32(start, wv, _mm512_loadu_si512((const void *)(x[i].xq + k)));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(x[i].lane_scale + c * LANES), acc[i]);
    }
}

ALWAYS_INLINE void tile_avx512vnni(const QuantizedRow *x, const int nx, const int8_t *w, int64_t k_len, float *sums) {
    __m512 even[TILE], odd[TILE];
    for (int i = 0; i < nx; i++) even[i] = odd[i] = _mm512_setzero_ps();
    int64_t chunks = (k_len + CHUNK - 1) / CHUNK, c = 0;
    for (; c + 1 < chunks; c += 2) {
        chunk_avx512vnni(x, nx, w, k_len, c, even);
        chunk_avx512vnni(x, nx, w, k_len, c + 1, odd);
    }
    if (c < chunks) chunk_avx512vnni(x, nx, w, k_len, c, even);
    for (int i = 0; i < nx; i++) sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(even[i], odd[i]));
}

DOT_INT8_BY_TILE(dot_int8_avx512vnni, tile_avx512vnni)
#endif

#if HAVE_AVX2
/* The last, partial block of a row (k_len not a multiple of 32), exactly as the scalar reference. */
static inline float partial_block(const QuantizedRow *x, const int8_t *row, int64_t start, int64_t k_len) {
    int32_t dot = 0;
    for (int64_t k = start; k < k_len; k++) dot += (int32_t)row[k] * x->xq[k];
    return (float)dot * block_scale(x, start / BLOCK);
}

/* 8 int32 sums of 4 products |q| x (xq with q's sign) each, over 32 bytes (abs_w = |q|, signed_x = xq with
   q's sign). VPMADDUBSW's int16 pair sums stay below 2 x 128 x 127 < 32767: no saturation. */
ALWAYS_INLINE __m256i dot32_avx2(__m256i abs_w, __m256i signed_x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, signed_x), _mm256_set1_epi16(1));
}

#if HAVE_AVXVNNI
ALWAYS_INLINE __m256i dot32_avxvnni(__m256i abs_w, __m256i signed_x) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), abs_w, signed_x);
}
#endif

/* The AVX2 and AVX-VNNI tiles: one block of 32 at a time (|q| taken once for the tile), its int32 sums
   scaled into fp32 lanes. */
#define TILE_INT8_256(name, dot32)                                                                         \
    ALWAYS_INLINE void name##_block(const QuantizedRow *x, const int nx, const int8_t *w, int64_t b, __m256 *acc) { \
        const int8_t *block = w + b * BLOCK;                                                                \
        if (!(b & 1)) _mm_prefetch((const char *)block + INT8_PREFETCH_BYTES, _MM_HINT_T0);                \
        __m256i wv = _mm256_loadu_si256((const __m256i *)block), abs_w = _mm256_abs_epi8(wv);               \
        for (int i = 0; i < nx; i++) {                                                                      \
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x[i].xq + b * BLOCK));                        \
            __m256i dot = dot32(abs_w, _mm256_sign_epi8(xv, wv));                                           \
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(block_scale(&x[i], b)), acc[i]); \
        }                                                                                                   \
    }                                                                                                       \
    ALWAYS_INLINE void name##_tile(const QuantizedRow *x, const int nx, const int8_t *w, int64_t k_len, float *sums) { \
        __m256 even[TILE], odd[TILE];                                                                       \
        for (int i = 0; i < nx; i++) even[i] = odd[i] = _mm256_setzero_ps();                                \
        int64_t full = k_len / BLOCK, b = 0;                                                                \
        for (; b + 1 < full; b += 2) {                                                                      \
            name##_block(x, nx, w, b, even);                                                                \
            name##_block(x, nx, w, b + 1, odd);                                                             \
        }                                                                                                   \
        if (b < full) name##_block(x, nx, w, b, even);                                                      \
        for (int i = 0; i < nx; i++)                                                                        \
            sums[i] = sum8(_mm256_add_ps(even[i], odd[i])) +                                                \
                      (full * BLOCK < k_len ? partial_block(&x[i], w, full * BLOCK, k_len) : 0.0f);        \
    }                                                                                                       \
    DOT_INT8_BY_TILE(name, name##_tile)

TILE_INT8_256(dot_int8_avx2, dot32_avx2)
#if HAVE_AVXVNNI
TILE_INT8_256(dot_int8_avxvnni, dot32_avxvnni)
#endif
#endif

/* ---- The dispatcher ---- */

/* Instruction-set levels, lowest first; gptcore_gemv_select(level) takes the best path at or below it. */
enum { ISA_SCALAR, ISA_AVX2, ISA_AVXVNNI, ISA_AVX512, ISA_BEST = ISA_AVX512 };

static struct {
    dot_bf16_fn bf16;
    dot_int8_fn int8;
    dot_f32_fn f32;
    const char *bf16_name, *int8_name, *f32_name;
} chosen = {NULL, NULL, NULL, "scalar", "scalar", "scalar"};

/* Chooses, for each weight type, the fastest function compiled in whose instructions this CPU has, at
   instruction-set level max_level or below (ISA_BEST: no limit; lower levels let tests and benchmarks
   run the other paths). Not to be called while a product runs. Returns the CPU's features (gptcore_cpu_features). */
int gptcore_gemv_select(int max_level) {
    int cpu = gptcore_cpu_features();
    int avx2 = (cpu & CPU_AVX2) && (cpu & CPU_FMA) && max_level >= ISA_AVX2;
    (void)avx2;
    chosen.bf16 = NULL, chosen.int8 = NULL, chosen.bf16_name = "scalar", chosen.int8_name = "scalar";
    chosen.f32 = NULL, chosen.f32_name = "scalar";
#if HAVE_AVX2
    if (avx2) chosen.f32 = dot_f32_avx2, chosen.f32_name = "avx2-fma";
    if (avx2) chosen.bf16 = dot_bf16_avx2, chosen.bf16_name = "avx2-fma";
    if (avx2) chosen.int8 = dot_int8_avx2, chosen.int8_name = "avx2";
#endif
#if HAVE_AVXVNNI
    if (avx2 && (cpu & CPU_AVXVNNI) && max_level >= ISA_AVXVNNI) chosen.int8 = dot_int8_avxvnni, chosen.int8_name = "avx-vnni";
#endif
#if HAVE_AVX512BF16
    if ((cpu & CPU_AVX512BF16) && (cpu & CPU_AVX512BW) && max_level >= ISA_AVX512)
        chosen.bf16 = dot_bf16_avx512bf16, chosen.bf16_name = "avx512-bf16";
#endif
#if HAVE_AVX512VNNI
    if ((cpu & CPU_AVX512VNNI) && (cpu & CPU_AVX512BW) && max_level >= ISA_AVX512)
        chosen.int8 = dot_int8_avx512vnni, chosen.int8_name = "avx512-vnni";
#endif
    return cpu;
}

/* The name of the chosen path for bf16 (type 0), int8 (type 1) or fp32 (type 2) weights. */
const char *gptcore_gemv_path(int type) { return type == 2 ? chosen.f32_name : type ? chosen.int8_name : chosen.bf16_name; }

/* 1 when built with OpenMP (products split over threads), 0 when one thread does all. */
int gptcore_gemv_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline void dot_bf16(const uint16_t *x, const uint16_t *w, int64_t k_len, int rows, float *sums) {
    if (rows == GROUP && chosen.bf16) chosen.bf16(x, w, k_len, sums);
    else dot_bf16_scalar(x, w, k_len, rows, sums);
}

static inline void dot_int8(const QuantizedRow *x, int nx, const int8_t *w, int64_t k_len, float *sums) {
    if (chosen.int8) chosen.int8(x, nx, w, k_len, sums);
    else dot_int8_scalar(x, nx, w, k_len, sums);
}

static inline void dot_f32(const float *x, const float *w, int64_t k_len, int rows, float *sums) {
    if (rows == GROUP && chosen.f32) chosen.f32(x, w, k_len, sums);
    else dot_f32_scalar(x, w, k_len, rows, sums);
}

/* ---- The products ---- */

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
   k_len], bias [n_len] or NULL). A weight group's rows stay in cache for every row of x, and which dot
   function a group takes depends on the group only, never on the batch. */
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

static inline float x_at(const void *x, int x_fp32, int64_t k) {
    return x_fp32 ? ((const float *)x)[k] : bf16_to_float(((const uint16_t *)x)[k]);
}

/* A block holding NaN or an infinity gets a NaN scale and zero xq: its products are NaN, as the
   unquantized product's would be, instead of the undefined conversion of NaN to int8 (which gave 0). */
static void quantize_row(const void *x, int x_fp32, int64_t k_len, int64_t chunks, QuantizedRow *out) {
    memset(out->xq, 0, (size_t)(chunks * CHUNK));
    memset(out->lane_scale, 0, (size_t)(chunks * LANES) * sizeof(float));  /* blocks past the end: 0 */
    for (int64_t start = 0; start < k_len; start += BLOCK) {
        int64_t end = start + BLOCK < k_len ? start + BLOCK : k_len;
        float amax = 0.0f;
        int finite = 1;
        for (int64_t k = start; k < end; k++) {
            float v = x_at(x, x_fp32, k);
            finite &= isfinite(v) != 0;
            amax = fabsf(v) > amax ? fabsf(v) : amax;
        }
        float scale = finite ? amax / 127.0f : NAN, inverse = finite && amax > 0.0f ? 127.0f / amax : 0.0f;
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
   a worksharing loop as product_bf16's, over panels of weight rows (PANEL for prompts, one for decoding). */
static void product_int8(char *buffer, const int8_t *q, const uint16_t *scale, const uint16_t *bias, void *y,
                         int64_t batch, int64_t n_len, int64_t k_len, int fp32_out, int gelu) {
    int64_t panel = batch > TILE ? PANEL : 1, panels = (n_len + panel - 1) / panel;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t first = p * panel, last = first + panel < n_len ? first + panel : n_len;
        for (int64_t b = 0; b < batch; b += TILE) {
            int nx = (int)(batch - b < TILE ? batch - b : TILE);
            QuantizedRow tile[TILE];
            for (int i = 0; i < nx; i++) tile[i] = quantized_row_at(buffer, k_len, b + i);
            for (int64_t n = first; n < last; n++) {
                float sums[TILE];
                dot_int8(tile, nx, q + n * k_len, k_len, sums);
                float row_scale = bf16_to_float(scale[n]), row_bias = bias ? bf16_to_float(bias[n]) : 0.0f;
                for (int i = 0; i < nx; i++) store(y, (b + i) * n_len + n, sums[i] * row_scale + row_bias, fp32_out, gelu);
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
   values, in fp32, rounded to bf16. q [hd]; keys, values [length, hd] rows of the cache; scratch
   [2 hd + length] floats of the calling thread's own (on the heap: head sizes are the model's, and
   OpenMP workers' stacks are small); out [hd]. (Vaswani et al. 2017, arXiv:1706.03762, eq. 1.) */
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t length, int64_t hd,
                   float *scratch, uint16_t *out) {
    float *query = scratch, *acc = scratch + hd, *scores = scratch + 2 * hd;
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
    size_t scratch_floats = (size_t)(2 * hd + length), score_bytes = (size_t)(threads > 0 ? threads : 1) * scratch_floats * sizeof(float);
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
        float *my_scratch = scores + (size_t)omp_get_thread_num() * scratch_floats;
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
            attend(row + h * hd, k_cache + first * hd, v_cache + first * hd, length - first, hd, my_scratch,
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
