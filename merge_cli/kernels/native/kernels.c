/* merge-cli's native CPU kernels: the hot merges (linear-free GTA family: TIES, DARE, Breadcrumbs) in one
 * pass over each tile of elements, plus the counting passes of the exact top-k and DARE's draws.
 *
 * Built at first use by merge_cli/kernels/native/__init__.py with the system C compiler (no compiler: the engine
 * keeps its eager torch kernels). Every element gets the same IEEE fp32 operations, in the same order, as
 * the eager kernels of merge_cli/kernels/blocked.py and the plain kernels of merge_cli/methods/ (compiled with
 * -ffp-contract=off, no fast-math), so the outputs are bitwise equal to theirs; tests check it.
 *
 * Inputs and outputs are flat arrays in fp32, bf16 or fp16 (dtype codes below).
 *
 * Compute dtype (`cd`): F32 runs everything in fp32. BF16/F16 reproduce torch's CPU arithmetic in that
 * dtype: each elementwise op is computed in fp32 and rounded to the half dtype (round to nearest even),
 * inputs are rounded to it as they are loaded, and sums over models accumulate in fp32 and are rounded
 * once, as the plain kernels of merge_cli/methods/ do (weighted_sum), so the results are bitwise theirs. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 1024
#define STRIDE (TILE + 80) /* buffers TILE apart would alias in the L1 cache (4 KB strides) */

enum { F32 = 0, BF16 = 1, F16 = 2 };

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
typedef _Float16 half_t;
#else
#define HAVE_F16 0
#endif

/* 1 when fp16 inputs, outputs and compute are built in (the compiler knows _Float16) */
int mk_has_f16(void) { return HAVE_F16; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN -> quiet NaN (torch's rule) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* v rounded to bf16 (nearest even; NaN -> the quiet NaN torch makes), as a float */
static inline float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    if (f != f) u = 0x7FC00000u;
    memcpy(&f, &u, 4);
    return f;
}

/* round n floats in place to the compute dtype cd (F32: nothing) */
static void rnd(float *restrict t, int64_t n, int cd) {
    if (cd == BF16) {
        for (int64_t j = 0; j < n; j++) t[j] = bf16_round(t[j]);
    }
#if HAVE_F16
    else if (cd == F16) {
        for (int64_t j = 0; j < n; j++) t[j] = (float)(half_t)t[j];
    }
#endif
}

static void load(float *restrict dst, const void *src, int dtype, int64_t start, int64_t n) {
    if (dtype == F32) {
        memcpy(dst, (const float *)src + start, (size_t)n * 4);
#if HAVE_F16
    } else if (dtype == F16) {
        const half_t *restrict s = (const half_t *)src + start;
        for (int64_t j = 0; j < n; j++) dst[j] = (float)s[j];
#endif
    } else {
        const uint16_t *restrict s = (const uint16_t *)src + start;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    }
}

/* t = x[start..] - bb, the conversion fused into the subtraction */
static void load_tau(float *restrict t, const void *x, int dtype, int64_t start, int64_t n, const float *restrict bb) {
    if (dtype == F32) {
        const float *restrict s = (const float *)x + start;
        for (int64_t j = 0; j < n; j++) t[j] = s[j] - bb[j];
#if HAVE_F16
    } else if (dtype == F16) {
        const half_t *restrict s = (const half_t *)x + start;
        for (int64_t j = 0; j < n; j++) t[j] = (float)s[j] - bb[j];
#endif
    } else {
        const uint16_t *restrict s = (const uint16_t *)x + start;
        for (int64_t j = 0; j < n; j++) t[j] = bf16_to_f32(s[j]) - bb[j];
    }
}

/* load, then rounded to the compute dtype (torch's .to(cd) of an input in another dtype) */
static void load_c(float *restrict dst, const void *src, int dtype, int64_t start, int64_t n, int cd) {
    load(dst, src, dtype, start, n);
    if (cd != F32 && dtype != cd) rnd(dst, n, cd);
}

/* t = round_cd(round_cd(x) - bb) for a half compute dtype (bb already rounded) */
static void load_tau_c(float *restrict t, const void *x, int dtype, int64_t start, int64_t n, const float *restrict bb,
                       int cd) {
    load_c(t, x, dtype, start, n, cd);
    for (int64_t j = 0; j < n; j++) t[j] = t[j] - bb[j];
    rnd(t, n, cd);
}

static void store(void *dst, int dtype, int64_t start, const float *restrict src, int64_t n) {
    if (dtype == F32) {
        memcpy((float *)dst + start, src, (size_t)n * 4);
#if HAVE_F16
    } else if (dtype == F16) {
        half_t *restrict d = (half_t *)dst + start;
        for (int64_t j = 0; j < n; j++) d[j] = (half_t)src[j];
#endif
    } else {
        uint16_t *restrict d = (uint16_t *)dst + start;
        for (int64_t j = 0; j < n; j++) d[j] = f32_to_bf16(src[j]);
    }
}

/* -- draws ----------------------------------------------------------------------------------------------
 * The uniform of flat position j under key (k0, k1): two rounds of a 32-bit xor-shift-multiply mixer
 * (a bijection) over the counter, then its top 24 bits as a float32 in [0, 1). The same arithmetic runs
 * in numpy (merge_cli/methods/base.py, counter_uniform), so draws are bitwise equal everywhere. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}

static inline uint32_t draw_bits(uint64_t j, uint32_t k0, uint32_t k1) {
    uint32_t x = mix32((uint32_t)j ^ k0);
    return mix32(x + (k1 ^ ((uint32_t)(j >> 32) * 0x9e3779b9u)));
}

/* The top 24 bits of the draws of positions start..start+n-1 (n <= TILE). Within 2^32 positions the high
 * half of the counter is one constant, and the loop runs on 32-bit lanes. */
static void draw_tile(uint32_t *restrict u, int64_t n, int64_t start, uint32_t k0, uint32_t k1) {
    uint32_t lo = (uint32_t)start;
    if ((uint64_t)lo + (uint64_t)n <= 0x100000000ull) {
        uint32_t k1h = k1 ^ ((uint32_t)((uint64_t)start >> 32) * 0x9e3779b9u);
        for (int64_t j = 0; j < n; j++) u[j] = mix32(mix32((lo + (uint32_t)j) ^ k0) + k1h) >> 8;
    } else {
        for (int64_t j = 0; j < n; j++) u[j] = draw_bits((uint64_t)(start + j), k0, k1) >> 8;
    }
}

/* u = (bits >> 8) * 2^-24, so u < d  <=>  (bits >> 8) < ceil(d * 2^24): callers pass that bound. */
void mk_uniform(float *out, int64_t n, int64_t start, uint32_t k0, uint32_t k1) {
    uint32_t u[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        draw_tile(u, k, start + s, k0, k1);
        for (int64_t j = 0; j < k; j++) out[s + j] = (float)u[j] * 0x1p-24f;
    }
}

/* -- sparsify steps of one model ------------------------------------------------------------------------ */
enum { HI = 1, TOP = 2, DARE = 4, NEG = 8, MUL = 16, DIV = 32, DELLA = 64 };

typedef struct {
    int32_t flags;
    float thr_hi, thr_top, scale; /* scale: DARE's L1 factor (MUL) or keep probability (DIV) */
    int64_t cut_hi, cut_top;      /* entries equal to a threshold are kept at flat index < cut */
    uint32_t k0, k1, bound;       /* DARE: keep where (draw_bits >> 8) < bound */
    uint32_t pad;
    const float *q;     /* DELLA: keep probabilities of the entries from flat index q_off (NULL: all qc) */
    int64_t q_off;
    float qc, tiny;     /* DELLA: the constant q; the divisor's floor (torch.finfo(cd).tiny) */
} spec_t;

static void della_keep(float *restrict t, int64_t n, int64_t g0, const spec_t *s, int cd); /* della.c */

static inline float trim1(float t, float thr, int64_t cut, int64_t g) {
    float a = fabsf(t);
    return (a > thr || (a == thr && g < cut)) ? t : 0.0f;
}

static void sparsify(float *restrict t, int64_t n, int64_t g0, const spec_t *s, int cd) {
    int f = s->flags;
    if (f & (HI | TOP)) {
        for (int64_t j = 0; j < n; j++) {
            float v = t[j];
            float hi = (f & HI) ? trim1(v, s->thr_hi, s->cut_hi, g0 + j) : v;
            t[j] = (f & TOP) ? hi - trim1(v, s->thr_top, s->cut_top, g0 + j) : hi;
        }
    }
    if (f & DARE) {
        uint32_t u[TILE];
        draw_tile(u, n, g0, s->k0, s->k1);
        const uint32_t bound = s->bound;
        for (int64_t j = 0; j < n; j++) t[j] = t[j] * (u[j] < bound ? 1.0f : 0.0f);
        if (f & MUL) {
            for (int64_t j = 0; j < n; j++) t[j] = t[j] * s->scale;
            rnd(t, n, cd);
        }
        if (f & DIV) {
            for (int64_t j = 0; j < n; j++) t[j] = t[j] / s->scale;
            rnd(t, n, cd);
        }
    }
    if (f & DELLA) della_keep(t, n, g0, s, cd);
    if (f & NEG)
        for (int64_t j = 0; j < n; j++) t[j] = -t[j];
}

static inline float signf(float v) { return (float)((v > 0.0f) - (v < 0.0f)); }

#define LANES 16

/* Sum of squares of n floats, lane by lane (so it vectorizes), in double per tile. A NaN/Inf input makes
 * it non-finite: that is how the callers detect one, as the eager kernels do. */
static double sumsq(const float *restrict t, int64_t n) {
    float lane[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) lane[l] += t[j + l] * t[j + l];
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += lane[l];
    for (; j < n; j++) s += (double)(t[j] * t[j]);
    return s;
}

static double sumabs(const float *restrict t, int64_t n) {
    double lane[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) lane[l] += fabsf(t[j + l]);
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += lane[l];
    for (; j < n; j++) s += fabsf(t[j]);
    return s;
}

/* TIES' elect and disjoint merge of one tile, shared by mk_merge() and merge_half(): the sign elected from acc
 * (the election's total), then acc = sum_i w_i tau_i and den = sum_i w_i over the entries that agree with it;
 * touched and conflict count the coordinates some model agrees with / opposes. Inlined, so each caller's
 * loops vectorize as before; every float op is in the same order, so the bits are unchanged. */
static inline void disjoint_tile(int64_t k, int32_t m, const float *ts, const float *wts, const float *w,
                                 float *restrict acc, float *restrict den, float *restrict sg, float *restrict smax,
                                 float *restrict smin, int64_t *touched, int64_t *conflict) {
    for (int64_t j = 0; j < k; j++) {
        sg[j] = acc[j] < 0.0f ? -1.0f : 1.0f; /* sign(sign(total) + 0.5): >= 0 (and -0) -> +1 */
        acc[j] = 0.0f;
        den[j] = 0.0f;
        smax[j] = -2.0f;
        smin[j] = 2.0f;
    }
    for (int32_t i = 0; i < m; i++) {
        const float *restrict t = ts + (size_t)i * STRIDE, *restrict wt = wts + (size_t)i * STRIDE;
        const float wi = w[i];
        for (int64_t j = 0; j < k; j++) {
            float a = signf(t[j] * sg[j]); /* 1 agrees with the elected sign, -1 opposes it, 0 */
            smax[j] = a > smax[j] ? a : smax[j];
            smin[j] = a < smin[j] ? a : smin[j];
            a = a > 0.0f ? a : 0.0f;
            acc[j] = acc[j] + wt[j] * a;
            den[j] = den[j] + wi * a;
        }
    }
    int32_t tch = 0, cfl = 0;
    for (int64_t j = 0; j < k; j++) {
        tch += smax[j] == 1.0f;
        cfl += smin[j] == -1.0f;
    }
    *touched += tch;
    *conflict += cfl;
}

/* The plain weighted sum's end in a half compute dtype: the fp32 sum rounded once, then / divisor rounded. */
static inline void sum_divide_half(float *restrict acc, int64_t k, float divisor, int cd) {
    rnd(acc, k, cd);
    if (divisor != 1.0f) {
        for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / divisor;
        rnd(acc, k, cd);
    }
}

/* Every half merge's end: * lambda and + base, each rounded to the compute dtype. */
static inline void lambda_base_half(float *restrict acc, const float *restrict bb, int64_t k, float lam, int cd) {
    if (lam != 1.0f) {
        for (int64_t j = 0; j < k; j++) acc[j] = acc[j] * lam;
        rnd(acc, k, cd);
    }
    for (int64_t j = 0; j < k; j++) acc[j] = acc[j] + bb[j];
    rnd(acc, k, cd);
}

/* TIES election and disjoint merge (consensus = 1) or the plain weighted sum (consensus = 0) of the
 * sparsified task vectors tau_i = x_i - base, for n elements at flat index offset..offset+n.
 * consensus: sign = sign(sum_i w_i tau_i) (or sum_i tau_i unless weighted; 0 -> +), agreeing entries merged
 * as sum_i w_i tau_i, divided by sum_i w_i over them when mean (0 -> 1), times lam, plus base.
 * sum: (sum_i w_i tau_i) / divisor * lam + base.
 * Statistics (added to): kept[i] nonzero sparsified entries, touched/conflict (consensus), sq[i] squared
 * norm of tau_i (non-finite when an input holds a NaN/Inf). Returns 0, or -1 when out of memory. */
static int merge_half(int64_t n, int64_t offset, const void *base, int base_dtype, int32_t m, const void *const *xs,
                      const int32_t *x_dtypes, const spec_t *specs, const float *w, float lam, int32_t consensus,
                      int32_t weighted, int32_t mean, float divisor, void *out, int out_dtype, int64_t *kept,
                      int64_t *touched, int64_t *conflict, double *sq, int cd, int32_t clamp);

/* cd: the compute dtype (F32, or BF16/F16: torch's per-op rounding, see the top). w: the weights already
 * rounded to cd. clamp (half cd, mean): the divisor is max(den, smallest normal of cd), as the plain kernel
 * does when every weight is positive; otherwise den == 0 -> 1. */
int mk_merge(int64_t n, int64_t offset, const void *base, int base_dtype, int32_t m, const void *const *xs,
             const int32_t *x_dtypes, const spec_t *specs, const float *w, float lam, int32_t consensus,
             int32_t weighted, int32_t mean, float divisor, void *out, int out_dtype, int64_t *kept,
             int64_t *touched, int64_t *conflict, double *sq, int32_t cd, int32_t clamp) {
    if (cd != F32)
        return merge_half(n, offset, base, base_dtype, m, xs, x_dtypes, specs, w, lam, consensus, weighted, mean,
                          divisor, out, out_dtype, kept, touched, conflict, sq, cd, clamp);
    float *buf = (float *)malloc(sizeof(float) * STRIDE * (size_t)(2 * m + 6));
    if (!buf) return -1;
    float *restrict bb = buf, *restrict acc = buf + STRIDE, *restrict den = buf + 2 * STRIDE;
    float *restrict sg = buf + 3 * STRIDE, *restrict smax = buf + 4 * STRIDE, *restrict smin = buf + 5 * STRIDE;
    float *ts = buf + 6 * STRIDE, *wts = ts + (size_t)m * STRIDE;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE, g0 = offset + s;
        load(bb, base, base_dtype, s, k);
        for (int32_t i = 0; i < m; i++) {
            float *restrict t = ts + (size_t)i * STRIDE, *restrict wt = wts + (size_t)i * STRIDE;
            load_tau(t, xs[i], x_dtypes[i], s, k, bb);
            sq[i] += sumsq(t, k);
            sparsify(t, k, g0, &specs[i], F32);
            int32_t c = 0;
            const float wi = w[i];
            const int by_w = weighted || !consensus; /* the election (or the sum) adds w_i tau_i, else tau_i */
            if (i == 0) {
                for (int64_t j = 0; j < k; j++) {
                    c += t[j] != 0.0f;
                    wt[j] = t[j] * wi;
                    acc[j] = by_w ? wt[j] : t[j];
                }
            } else {
                for (int64_t j = 0; j < k; j++) {
                    c += t[j] != 0.0f;
                    wt[j] = t[j] * wi;
                    acc[j] = acc[j] + (by_w ? wt[j] : t[j]);
                }
            }
            kept[i] += c;
        }
        if (consensus) {
            disjoint_tile(k, m, ts, wts, w, acc, den, sg, smax, smin, touched, conflict);
            if (mean)
                for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / (den[j] == 0.0f ? 1.0f : den[j]);
        } else if (divisor != 1.0f) {
            for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / divisor;
        }
        if (lam != 1.0f)
            for (int64_t j = 0; j < k; j++) acc[j] = acc[j] * lam;
        for (int64_t j = 0; j < k; j++) acc[j] = acc[j] + bb[j];
        store(out, out_dtype, s, acc, k);
    }
    free(buf);
    return 0;
}

/* mk_merge in a half compute dtype: the plain kernels' operations, each rounded to cd where torch rounds.
 * Per model: tau = cd(cd(x) - cd(base)); sparsify (rescales rounded); product cd(tau * w). The election's
 * sum and the merged sums accumulate in fp32 from +0 (weighted_sum) and are rounded once; then the mean's
 * division, lambda and the base, each rounded. */
static int merge_half(int64_t n, int64_t offset, const void *base, int base_dtype, int32_t m, const void *const *xs,
                      const int32_t *x_dtypes, const spec_t *specs, const float *w, float lam, int32_t consensus,
                      int32_t weighted, int32_t mean, float divisor, void *out, int out_dtype, int64_t *kept,
                      int64_t *touched, int64_t *conflict, double *sq, int cd, int32_t clamp) {
    float *buf = (float *)malloc(sizeof(float) * STRIDE * (size_t)(2 * m + 6));
    if (!buf) return -1;
    float *restrict bb = buf, *restrict acc = buf + STRIDE, *restrict den = buf + 2 * STRIDE;
    float *restrict sg = buf + 3 * STRIDE, *restrict smax = buf + 4 * STRIDE, *restrict smin = buf + 5 * STRIDE;
    float *ts = buf + 6 * STRIDE, *wts = ts + (size_t)m * STRIDE;
    const float tiny = cd == BF16 ? 0x1p-126f : 0x1p-14f; /* torch.finfo(cd).tiny */
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE, g0 = offset + s;
        load_c(bb, base, base_dtype, s, k, cd);
        for (int32_t i = 0; i < m; i++) {
            float *restrict t = ts + (size_t)i * STRIDE, *restrict wt = wts + (size_t)i * STRIDE;
            load_tau_c(t, xs[i], x_dtypes[i], s, k, bb, cd);
            sq[i] += sumsq(t, k);
            sparsify(t, k, g0, &specs[i], cd);
            int32_t c = 0;
            const float wi = w[i];
            for (int64_t j = 0; j < k; j++) {
                c += t[j] != 0.0f;
                wt[j] = t[j] * wi;
            }
            rnd(wt, k, cd);
            const int by_w = weighted || !consensus;
            if (i == 0) {
                for (int64_t j = 0; j < k; j++) acc[j] = 0.0f + (by_w ? wt[j] : t[j]);
            } else {
                for (int64_t j = 0; j < k; j++) acc[j] = acc[j] + (by_w ? wt[j] : t[j]);
            }
            kept[i] += c;
        }
        if (consensus) {
            rnd(acc, k, cd); /* the election's total, rounded to cd, then compared with 0 */
            disjoint_tile(k, m, ts, wts, w, acc, den, sg, smax, smin, touched, conflict);
            rnd(acc, k, cd);
            if (mean) {
                rnd(den, k, cd);
                if (clamp)
                    for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / (den[j] < tiny ? tiny : den[j]);
                else
                    for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / (den[j] == 0.0f ? 1.0f : den[j]);
                rnd(acc, k, cd);
            }
        } else {
            sum_divide_half(acc, k, divisor, cd);
        }
        lambda_base_half(acc, bb, k, lam, cd);
        store(out, out_dtype, s, acc, k);
    }
    free(buf);
    return 0;
}

/* Per model: sums[2i] += ||tau_i||_1 and sums[2i + 1] += ||sparsify(tau_i)||_1, in double (DARE's L1
 * rescale). Returns 0, or -1 when out of memory. */
int mk_l1_sums(int64_t n, int64_t offset, const void *base, int base_dtype, int32_t m, const void *const *xs,
               const int32_t *x_dtypes, const spec_t *specs, double *sums, int32_t cd) {
    float *buf = (float *)malloc(sizeof(float) * STRIDE * 2);
    if (!buf) return -1;
    float *restrict bb = buf, *restrict t = buf + STRIDE;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        load_c(bb, base, base_dtype, s, k, cd);
        for (int32_t i = 0; i < m; i++) {
            if (cd == F32)
                load_tau(t, xs[i], x_dtypes[i], s, k, bb);
            else
                load_tau_c(t, xs[i], x_dtypes[i], s, k, bb, cd);
            sums[2 * i] += sumabs(t, k);
            sparsify(t, k, offset + s, &specs[i], cd);
            sums[2 * i + 1] += sumabs(t, k);
        }
    }
    free(buf);
    return 0;
}

/* One counting pass over |x - base| for the exact top-k: how many entries lie above hi, and how many lie
 * in [lo, hi] in each block of `block` elements (per_block, n / block rounded up entries). */
/* |x - base| of one tile into t, in the compute dtype cd */
static void abs_tau(float *restrict t, float *restrict bb, const void *base, int base_dtype, const void *x,
                    int x_dtype, int64_t s, int64_t k, int cd) {
    load_c(bb, base, base_dtype, s, k, cd);
    load_c(t, x, x_dtype, s, k, cd);
    for (int64_t j = 0; j < k; j++) t[j] = t[j] - bb[j];
    rnd(t, k, cd);
    for (int64_t j = 0; j < k; j++) t[j] = fabsf(t[j]);
}

int mk_band_counts(int64_t n, const void *base, int base_dtype, const void *x, int x_dtype, float lo, float hi,
                   int64_t block, int64_t *above, int64_t *per_block, int32_t cd) {
    float *buf = (float *)malloc(sizeof(float) * STRIDE * 2);
    if (!buf) return -1;
    float *restrict bb = buf, *restrict t = buf + STRIDE;
    int64_t up = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        abs_tau(t, bb, base, base_dtype, x, x_dtype, s, k, cd);
        /* a tile never straddles two blocks when block is a multiple of TILE (the caller's promise) */
        int32_t c_up = 0, c_in = 0;
        for (int64_t j = 0; j < k; j++) {
            float a = t[j];
            c_up += a > hi;
            c_in += a >= lo && a <= hi;
        }
        up += c_up;
        per_block[s / block] += c_in;
    }
    *above += up;
    free(buf);
    return 0;
}

/* A histogram of the entries of |x - base| inside [lo, hi] (0 <= lo <= hi) by their float bits:
 * hist[(bits(a) - bits(lo)) >> shift] (the caller sizes shift so the range fits its histogram; for
 * non-negative floats the bits order like the values), plus how many entries lie above hi. It narrows a
 * top-k bracket without gathering the values. */
/* Count the in-band entries of the tile t[0..k) into one bracket's histogram; returns how many lie above hi.
 * u: scratch of k floats (the in-band values are compacted there, branch-free, then counted). */
static int64_t hist_tile(const float *restrict t, float *restrict u, int64_t k, float lo, float hi,
                         uint32_t lo_bits, int32_t shift, int64_t *hist) {
    int32_t c_up = 0;
    for (int64_t j = 0; j < k; j++) c_up += t[j] > hi;
    int64_t c = 0;
#if defined(__AVX512F__)
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        __m512 v = _mm512_loadu_ps(t + j);
        __mmask16 in = _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vhi, _CMP_LE_OQ);
        _mm512_storeu_ps(u + c, _mm512_maskz_compress_ps(in, v));
        c += __builtin_popcount((unsigned)in);
    }
    for (; j < k; j++) {
        float a = t[j];
        u[c] = a;
        c += (a >= lo) & (a <= hi);
    }
#else
    for (int64_t j = 0; j < k; j++) {
        float a = t[j];
        u[c] = a;
        c += (a >= lo) & (a <= hi);
    }
#endif
    for (int64_t j = 0; j < c; j++) {
        uint32_t v;
        memcpy(&v, &u[j], 4);
        hist[(v - lo_bits) >> shift]++;
    }
    return c_up;
}

/* Histograms of the entries of |x - base| inside each of nb brackets [lo[b], hi[b]] (0 <= lo <= hi) by their
 * float bits: hists[b][(bits(a) - bits(lo[b])) >> shift[b]] (the caller sizes each shift so the range fits;
 * for non-negative floats the bits order like the values), plus how many entries lie above each hi. One
 * pass computes |x - base| once for every bracket of this x (Breadcrumbs' two per model). It narrows top-k
 * brackets without gathering the values. */
int mk_band_hists(int64_t n, const void *base, int base_dtype, const void *x, int x_dtype, int32_t nb,
                  const float *lo, const float *hi, const int32_t *shift, int64_t *above, int64_t *const *hists,
                  int32_t cd) {
    float *buf = (float *)malloc(sizeof(float) * STRIDE * 3);
    if (!buf) return -1;
    float *restrict bb = buf, *restrict t = buf + STRIDE, *restrict u = buf + 2 * STRIDE;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        abs_tau(t, bb, base, base_dtype, x, x_dtype, s, k, cd);
        for (int32_t b = 0; b < nb; b++) {
            uint32_t lo_bits;
            memcpy(&lo_bits, &lo[b], 4);
            above[b] += hist_tile(t, u, k, lo[b], hi[b], lo_bits, shift[b], hists[b]);
        }
    }
    free(buf);
    return 0;
}

/* The flat index of the nth (1-based) entry with |x - base| == v, scanning from the start and stopping
 * there; -1 when there are fewer, with *seen the number met (the caller goes on in the next piece). */
int64_t mk_nth_equal(int64_t n, const void *base, int base_dtype, const void *x, int x_dtype, float v, int64_t nth,
                     int64_t *seen, int32_t cd) {
    float bb[TILE], t[TILE];
    int64_t met = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        abs_tau(t, bb, base, base_dtype, x, x_dtype, s, k, cd);
        int32_t c = 0;
        for (int64_t j = 0; j < k; j++) c += t[j] == v;
        if (met + c >= nth) {
            for (int64_t j = 0; j < k; j++)
                if (t[j] == v && ++met == nth) return s + j;
        }
        met += c;
    }
    *seen = met;
    return -1;
}

/* -- SCE (merge_cli/kernels/sce.py) ----------------------------------------------------------------------
 * The plain kernel (methods/sce.py) stacks tau_i = x_i - base in the compute dtype, takes the population
 * variance over the models per element (torch's var(dim=0, unbiased=False): Welford in double over the
 * models in order, m2 / m converted to the compute dtype: double -> float, then to bf16/fp16), keeps the
 * top-variance positions, and erases sign conflicts with weights w_i: sign of sum_i tau_i (0 -> +),
 * sum_i cd(w_i tau_i) [agree] / max(sum_i w_i [agree], floor), plus base. */

/* the population variance over the m models of k entries (ts[i * STRIDE + j]) as torch's Welford reduction
 * gives it (mean += delta / n; m2 += delta * (x - mean), in double, models in order; m2 / m), into vv in
 * cd: double -> float, then rounded to bf16/fp16 (c10's conversions go through float). The model loop is
 * outside, so each step vectorizes over the entries; every entry gets the same ops in the same order. */
static void welford_var(float *restrict vv, const float *ts, int32_t m, int64_t k, int cd) {
    double mean[TILE], m2[TILE];
    for (int64_t j = 0; j < k; j++) mean[j] = m2[j] = 0.0;
    for (int32_t i = 0; i < m; i++) {
        const float *restrict t = ts + (size_t)i * STRIDE;
        const double cnt = (double)(i + 1);
        if (((i + 1) & i) == 0) { /* a power of two: dividing is multiplying by its exact inverse */
            const double inv = 1.0 / cnt;
            for (int64_t j = 0; j < k; j++) {
                double x = (double)t[j], delta = x - mean[j];
                mean[j] = mean[j] + delta * inv;
                m2[j] = m2[j] + delta * (x - mean[j]);
            }
        } else {
            for (int64_t j = 0; j < k; j++) {
                double x = (double)t[j], delta = x - mean[j];
                mean[j] = mean[j] + delta / cnt;
                m2[j] = m2[j] + delta * (x - mean[j]);
            }
        }
    }
    for (int64_t j = 0; j < k; j++) vv[j] = (float)(m2[j] / (double)m);
    rnd(vv, k, cd);
}

/* Per tile: tau_i in cd (into stk[i], the plain kernel's stacked tensor, when stk is not NULL), the
 * variance over the models into var (cd), and sq[i] += ||tau_i||^2 (non-finite when an input holds a
 * NaN/Inf). stk[i] and var are arrays in the compute dtype cd. hist (65536 counts, when not NULL) counts
 * the variances by their top 16 bits: a bf16/fp16 variance's own bits, an fp32 one's high half (the
 * first radix pass of its top-k). Returns 0, or -1 when out of memory. */
int mk_sce_prep(int64_t n, const void *base, int base_dtype, int32_t m, const void *const *xs,
                const int32_t *x_dtypes, void *const *stk, void *var, double *sq, int64_t *hist, int32_t cd) {
    float *buf = (float *)malloc(sizeof(float) * STRIDE * (size_t)(m + 2));
    if (!buf) return -1;
    float *restrict bb = buf, *restrict vv = buf + STRIDE, *ts = buf + 2 * STRIDE;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        load_c(bb, base, base_dtype, s, k, cd);
        for (int32_t i = 0; i < m; i++) {
            float *restrict t = ts + (size_t)i * STRIDE;
            if (cd == F32)
                load_tau(t, xs[i], x_dtypes[i], s, k, bb);
            else
                load_tau_c(t, xs[i], x_dtypes[i], s, k, bb, cd);
            sq[i] += sumsq(t, k);
            if (stk) store(stk[i], cd, s, t, k);
        }
        welford_var(vv, ts, m, k, cd);
        store(var, cd, s, vv, k);
        if (hist) {
            if (cd == F16) {
                const uint16_t *h = (const uint16_t *)var + s;
                for (int64_t j = 0; j < k; j++) hist[h[j]]++;
            } else {
                for (int64_t j = 0; j < k; j++) {
                    uint32_t u;
                    memcpy(&u, &vv[j], 4);
                    hist[u >> 16]++;
                }
            }
        }
    }
    free(buf);
    return 0;
}

/* The erase of SCE over the selected stack stk (m arrays in cd, tau_i already masked) for n elements:
 * out = base + sum_i cd(w_i tau_i) [agree] / max(sum_i w_i [agree], floor), every op rounded to cd as
 * torch rounds it (sums over models accumulate in fp32 from +0 and are rounded once). w: the weights
 * rounded to cd; kept[i] += nonzero entries of tau_i. Returns 0, or -1 when out of memory. */
int mk_sce_erase(int64_t n, const void *base, int base_dtype, int32_t m, const void *const *stk, const float *w,
                 float floor_, void *out, int out_dtype, int64_t *kept, int32_t cd) {
    float *buf = (float *)malloc(sizeof(float) * STRIDE * (size_t)(2 * m + 6));
    if (!buf) return -1;
    float *restrict bb = buf, *restrict acc = buf + STRIDE, *restrict den = buf + 2 * STRIDE;
    float *restrict sg = buf + 3 * STRIDE, *restrict smax = buf + 4 * STRIDE, *restrict smin = buf + 5 * STRIDE;
    float *ts = buf + 6 * STRIDE, *wts = ts + (size_t)m * STRIDE;
    int64_t touched = 0, conflict = 0;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        load_c(bb, base, base_dtype, s, k, cd);
        for (int64_t j = 0; j < k; j++) acc[j] = 0.0f;
        for (int32_t i = 0; i < m; i++) {
            float *restrict t = ts + (size_t)i * STRIDE, *restrict wt = wts + (size_t)i * STRIDE;
            load(t, stk[i], cd, s, k);
            int32_t c = 0;
            const float wi = w[i];
            for (int64_t j = 0; j < k; j++) {
                c += t[j] != 0.0f;
                wt[j] = t[j] * wi;
                acc[j] = acc[j] + t[j];
            }
            rnd(wt, k, cd);
            kept[i] += c;
        }
        rnd(acc, k, cd); /* the election's total in cd, compared with 0 */
        disjoint_tile(k, m, ts, wts, w, acc, den, sg, smax, smin, &touched, &conflict);
        rnd(acc, k, cd);
        rnd(den, k, cd);
        for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / (den[j] < floor_ ? floor_ : den[j]);
        rnd(acc, k, cd);
        lambda_base_half(acc, bb, k, 1.0f, cd); /* + base, rounded */
        store(out, out_dtype, s, acc, k);
    }
    free(buf);
    return 0;
}

/* -- torch.topk's choice among tied values ----------------------------------------------------------------
 * torch.topk(v, k, largest=True) on the CPU (k * 64 > n) fills (value, index) pairs in index order and
 * runs the C++ library's nth_element with "greater" at position k - 1; its first k pairs are the result.
 * Which of the entries equal to the k-th value it keeps follows from that algorithm (introselect:
 * median-of-three moved to the front, unguarded Hoare partition, insertion sort below 4 entries), so the
 * same steps on the same values reproduce it. mk_topk_set marks keep[i] = 1 for the kept entries; it
 * returns 1 when it cannot reproduce the run (the depth limit reached: the library switches to a heap
 * select) and the caller asks torch. Values must not be NaN. */
typedef struct {
    float v;
    uint32_t i;
} vi_t;

static inline void vi_swap(vi_t *a, vi_t *b) {
    vi_t t = *a;
    *a = *b;
    *b = t;
}

static inline int gt(const vi_t *a, const vi_t *b) { return a->v > b->v; }

static void median_to_first(vi_t *r, vi_t *a, vi_t *b, vi_t *c) {
    if (gt(a, b)) {
        if (gt(b, c))
            vi_swap(r, b);
        else if (gt(a, c))
            vi_swap(r, c);
        else
            vi_swap(r, a);
    } else if (gt(a, c))
        vi_swap(r, a);
    else if (gt(b, c))
        vi_swap(r, c);
    else
        vi_swap(r, b);
}

#define BLK 512

/* The library's unguarded partition of [first + 1, last) around the pivot moved to *first: the left scan
 * stops at entries not greater than the pivot, the right scan at entries not smaller, and the two are
 * swapped while the left one is below the right one. The t-th left stop is swapped with the t-th right
 * stop, so while the scanned blocks cannot meet, the stops are found a block at a time without branches
 * and swapped in order (the same swaps); the last stretch runs the scans as they are. */
static vi_t *partition_at(vi_t *first, vi_t *last) {
    vi_t *mid = first + (last - first) / 2;
    median_to_first(first, first + 1, mid, last - 1);
    const float p = first->v;
    vi_t *lo = first + 1, *hi = last; /* the scans' state after the last swap */
    vi_t *le = lo, *rs = hi;          /* [lo.., le) and [rs, ..hi) scanned */
    vi_t *lb = lo, *rb = hi - 1;
    uint16_t la[BLK], ra[BLK];
    int na = 0, ia = 0, nb = 0, ib = 0;
    for (;;) {
        if (ia == na) {
            if (rs - le < BLK) break;
            lb = le;
            na = ia = 0;
            for (int j = 0; j < BLK; j++) {
                la[na] = (uint16_t)j;
                na += !(lb[j].v > p);
            }
            le += BLK;
            continue;
        }
        if (ib == nb) {
            if (rs - le < BLK) break;
            rb = rs - 1;
            nb = ib = 0;
            for (int j = 0; j < BLK; j++) {
                ra[nb] = (uint16_t)j;
                nb += !(p > rb[-j].v);
            }
            rs -= BLK;
            continue;
        }
        vi_t *a = lb + la[ia++], *b = rb - ra[ib++];
        vi_swap(a, b);
        lo = a + 1;
        hi = b;
    }
    for (;;) {
        while (lo->v > p) lo++;
        hi--;
        while (p > hi->v) hi--;
        if (!(lo < hi)) return lo;
        vi_swap(lo, hi);
        lo++;
    }
}

static void small_sort(vi_t *first, vi_t *last) {
    if (first == last) return;
    for (vi_t *i = first + 1; i != last; i++) {
        vi_t val = *i;
        if (val.v > first->v) {
            memmove(first + 1, first, (size_t)(i - first) * sizeof(vi_t));
            *first = val;
        } else {
            vi_t *p = i, *q = i - 1;
            while (val.v > q->v) {
                *p = *q;
                p = q;
                q--;
            }
            *p = val;
        }
    }
}

int mk_topk_set(int64_t n, const void *vals, int dtype, int64_t k, uint8_t *keep) {
    if (k <= 0 || k > n || n >= 0xFFFFFFFFll) return 1;
    vi_t *q = (vi_t *)malloc(sizeof(vi_t) * (size_t)n);
    if (!q) return -1;
    float tile[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t c = n - s < TILE ? n - s : TILE;
        load(tile, vals, dtype, s, c);
        for (int64_t j = 0; j < c; j++) {
            q[s + j].v = tile[j];
            q[s + j].i = (uint32_t)(s + j);
        }
    }
    vi_t *first = q, *last = q + n, *nth = q + k - 1;
    int depth = 2 * (63 - __builtin_clzll((unsigned long long)n));
    int rc = 0;
    while (last - first > 3) {
        if (depth == 0) {
            rc = 1;
            break;
        }
        depth--;
        vi_t *cut = partition_at(first, last);
        if (cut <= nth)
            first = cut;
        else
            last = cut;
    }
    if (!rc) {
        small_sort(first, last);
        memset(keep, 0, (size_t)n);
        for (int64_t j = 0; j < k; j++) keep[q[j].i] = 1;
    }
    free(q);
    return rc;
}

/* The selection applied to SCE's stack and, for numerics: mergekit's weights, the squares: per model i,
 * stk[i][j] *= keep[j] (exact: the entry or a signed zero; keep NULL keeps all) and, when sqo is not NULL,
 * sqo[i][j] = cd(stk[i][j]^2) (torch's square in cd). stk and sqo are arrays in the compute dtype cd. */
void mk_sce_mask_sq(int64_t n, int32_t m, void *const *stk, const uint8_t *keep, void *const *sqo, int32_t cd) {
    float t[TILE];
    for (int32_t i = 0; i < m; i++) {
        for (int64_t s = 0; s < n; s += TILE) {
            int64_t k = n - s < TILE ? n - s : TILE;
            load(t, stk[i], cd, s, k);
            if (keep) {
                for (int64_t j = 0; j < k; j++) t[j] = t[j] * (keep[s + j] ? 1.0f : 0.0f);
                store(stk[i], cd, s, t, k);
            }
            if (sqo) {
                for (int64_t j = 0; j < k; j++) t[j] = t[j] * t[j];
                rnd(t, k, cd);
                store(sqo[i], cd, s, t, k);
            }
        }
    }
}

/* -- linear and task arithmetic: no sparsify, no election, one pass over each tile ----------------------- */

/* z stays 0 unless some v is NaN/Inf (0 * inf = NaN): a vectorisable "is anything non-finite" */
static inline float nonfinite_probe(const float *restrict v, int64_t n) {
    float lane[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) lane[l] += v[j + l] * 0.0f;
    float z = 0.0f;
    for (int l = 0; l < LANES; l++) z += lane[l];
    for (; j < n; j++) z += v[j] * 0.0f;
    return z;
}

/* linear (kernels/blocked.py linear): acc = x_0 w_0, acc = fma(x_i, w_i, acc) for i >= 1 (torch's add_ with
 * alpha is a fused multiply-add on the CPU), acc / divisor when divisor != 1, then rounded to the compute dtype
 * (half cd; inputs in another dtype are rounded to it as they are loaded) and stored in the output dtype.
 * Returns 1 when some acc was NaN/Inf (the caller then counts the inputs' NaN/Inf, as the eager kernel does). */
int mk_linear(int64_t n, int32_t m, const void *const *xs, const int32_t *x_dtypes, const float *w, float divisor,
              void *out, int out_dtype, int32_t cd) {
    float acc[TILE], t[TILE];
    float z = 0.0f;
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        load_c(acc, xs[0], x_dtypes[0], s, k, cd);
        for (int64_t j = 0; j < k; j++) acc[j] = acc[j] * w[0];
        for (int32_t i = 1; i < m; i++) {
            load_c(t, xs[i], x_dtypes[i], s, k, cd);
            const float wi = w[i];
            for (int64_t j = 0; j < k; j++) acc[j] = fmaf(t[j], wi, acc[j]);
        }
        z += nonfinite_probe(acc, k);
        if (divisor != 1.0f)
            for (int64_t j = 0; j < k; j++) acc[j] = acc[j] / divisor;
        rnd(acc, k, cd);
        store(out, out_dtype, s, acc, k);
    }
    return z == 0.0f ? 0 : 1;
}

/* task arithmetic in fp32 (kernels/blocked.py task_arithmetic): tau_i = x_i - base, acc = sum_i tau_i w_i (in
 * model order, no fma), acc * scale when scale != 1, plus base. sq[i] += the squared norm of tau_i (non-finite
 * when an input holds a NaN/Inf). */
void mk_task_arith(int64_t n, const void *base, int base_dtype, int32_t m, const void *const *xs,
                   const int32_t *x_dtypes, const float *w, float scale, void *out, int out_dtype, double *sq) {
    float bb[TILE], acc[TILE], t[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        load(bb, base, base_dtype, s, k);
        for (int32_t i = 0; i < m; i++) {
            float *ti = i == 0 ? acc : t;
            load_tau(ti, xs[i], x_dtypes[i], s, k, bb);
            sq[i] += sumsq(ti, k);
            const float wi = w[i];
            for (int64_t j = 0; j < k; j++) ti[j] = ti[j] * wi;
            if (i)
                for (int64_t j = 0; j < k; j++) acc[j] = acc[j] + t[j];
        }
        if (scale != 1.0f)
            for (int64_t j = 0; j < k; j++) acc[j] = acc[j] * scale;
        for (int64_t j = 0; j < k; j++) acc[j] = acc[j] + bb[j];
        store(out, out_dtype, s, acc, k);
    }
}

/* task arithmetic in a half compute dtype: mk_merge's plain sum (merge_half with no sparsify steps) in one
 * lean pass per tile: tau_i = cd(cd(x_i) - cd(base)), products cd(tau_i * w_i) (w rounded to cd by the
 * caller) summed in fp32 from +0 and rounded once, then / divisor, * lam and + base, each rounded. */
void mk_task_arith_half(int64_t n, const void *base, int base_dtype, int32_t m, const void *const *xs,
                        const int32_t *x_dtypes, const float *w, float divisor, float lam, void *out,
                        int out_dtype, double *sq, int32_t cd) {
    float bb[TILE], acc[TILE], t[TILE];
    for (int64_t s = 0; s < n; s += TILE) {
        int64_t k = n - s < TILE ? n - s : TILE;
        load_c(bb, base, base_dtype, s, k, cd);
        for (int32_t i = 0; i < m; i++) {
            load_tau_c(t, xs[i], x_dtypes[i], s, k, bb, cd);
            sq[i] += sumsq(t, k);
            const float wi = w[i];
            for (int64_t j = 0; j < k; j++) t[j] = t[j] * wi;
            rnd(t, k, cd);
            if (i == 0)
                for (int64_t j = 0; j < k; j++) acc[j] = 0.0f + t[j];
            else
                for (int64_t j = 0; j < k; j++) acc[j] = acc[j] + t[j];
        }
        sum_divide_half(acc, k, divisor, cd);
        lambda_base_half(acc, bb, k, lam, cd);
        store(out, out_dtype, s, acc, k);
    }
}

#include "della.c" /* DELLA's keep probabilities (uses the helpers above) */
