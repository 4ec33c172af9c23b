/* DELLA's MagPrune on the native kernels (included at the end of kernels.c, whose helpers it uses: the dtype
 * loads, the bf16/fp16 rounding, the counter-hash draws, sumabs).
 *
 * mk_della_q gives each entry its keep probability q from the stable ascending rank of |tau| within its row
 * (an LSD radix sort on the bits of |tau|: ties keep index order, as torch's stable argsort), with the
 * rounding torch applies in the compute dtype (merge_cli/methods/della.py keep_probability):
 *     q = cd(de + cd(cd(cd(rank) / (len - 1)) * e2)),   de = cd(density - epsilon), e2 = fp32(2 epsilon).
 * della_keep (a sparsify step of mk_merge / mk_l1_sums) then keeps an entry where u < q (u: the same draws as
 * ctx.uniform) and rescales: `inv_p` cd(tau / max(q, tiny)) where kept, +0 where dropped (torch.where);
 * `l1` / none: tau * keep (then * the L1 factor, rounded), as the plain kernel does. */

static inline float rnd1(float v, int cd) {
    if (cd == BF16) return bf16_round(v);
#if HAVE_F16
    if (cd == F16) return (float)(half_t)v;
#endif
    return v;
}

static void della_keep(float *restrict t, int64_t n, int64_t g0, const spec_t *s, int cd) {
    uint32_t u[TILE];
    float qb[TILE];
    draw_tile(u, n, g0, s->k0, s->k1);
    const float *restrict q = s->q ? s->q + (g0 - s->q_off) : qb;
    if (!s->q)
        for (int64_t j = 0; j < n; j++) qb[j] = s->qc;
    if (s->flags & DIV) { /* torch.where(keep, tau / q.clamp_min(tiny), 0) */
        const float tiny = s->tiny;
        for (int64_t j = 0; j < n; j++) {
            float v = t[j] / (q[j] < tiny ? tiny : q[j]);
            t[j] = (float)u[j] * 0x1p-24f < q[j] ? v : 0.0f;
        }
        rnd(t, n, cd);
        return;
    }
    for (int64_t j = 0; j < n; j++) t[j] = t[j] * ((float)u[j] * 0x1p-24f < q[j] ? 1.0f : 0.0f);
    if (s->flags & MUL) {
        for (int64_t j = 0; j < n; j++) t[j] = t[j] * s->scale;
        rnd(t, n, cd);
    }
}

/* The sort key of |v| (v already rounded to cd): the bits of |v| in cd (31 bits in fp32, 15 in bf16/fp16);
 * non-negative floats order like their bits. */
static inline uint32_t abs_key(float v, int cd) {
    uint32_t b;
    memcpy(&b, &v, 4);
    b &= 0x7FFFFFFFu;
    if (cd == BF16) return b >> 16;
#if HAVE_F16
    if (cd == F16) {
        half_t h = (half_t)v;
        uint16_t hb;
        memcpy(&hb, &h, 2);
        return hb & 0x7FFFu;
    }
#endif
    return b;
}

/* ia[0..len) = the indices of keys ka sorted ascending, stable (LSD radix sort, 8-bit digits, passes whose
 * digit is the same for every key skipped); kb, ib are scratch. Returns the array holding the order. */
static uint32_t *radix_order(uint32_t *ka, uint32_t *ia, uint32_t *kb, uint32_t *ib, int64_t len, int passes) {
    int64_t hist[4][256];
    memset(hist, 0, sizeof hist);
    for (int64_t j = 0; j < len; j++) {
        uint32_t k = ka[j];
        ia[j] = (uint32_t)j;
        for (int p = 0; p < passes; p++) hist[p][(k >> (8 * p)) & 255u]++;
    }
    for (int p = 0; p < passes; p++) {
        const int sh = 8 * p;
        if (hist[p][(ka[0] >> sh) & 255u] == len) continue; /* one digit everywhere: the order stands */
        int64_t at[256], sum = 0;
        for (int d = 0; d < 256; d++) {
            at[d] = sum;
            sum += hist[p][d];
        }
        for (int64_t j = 0; j < len; j++) {
            int64_t pos = at[(ka[j] >> sh) & 255u]++;
            kb[pos] = ka[j];
            ib[pos] = ia[j];
        }
        uint32_t *tk = ka, *ti = ia;
        ka = kb, ia = ib, kb = tk, ib = ti;
    }
    return ia;
}

/* For n = rows * len elements (tau = x - base, in cd, rows of len entries, the first at flat index offset):
 * q[j] = each entry's keep probability (ranked: from the rank of |tau| in its row; else qc everywhere);
 * q may be NULL. sums (not NULL): sums[0] += ||tau||_1, sums[1] += ||tau * (u < q)||_1 in double, u the
 * draws of key (k0, k1). Returns 0, or -1 when out of memory. */
int mk_della_q(int64_t n, int64_t len, int64_t offset, const void *base, int base_dtype, const void *x, int x_dtype,
               float de, float e2, float qc, int32_t ranked, float *q, uint32_t k0, uint32_t k1, double *sums,
               int32_t cd) {
    if (len <= 0 || n <= 0) return 0;
    ranked = ranked && len > 1;
    size_t L = (size_t)len, words = ranked ? 8 * L : 3 * L;
    uint32_t *buf = (uint32_t *)malloc(sizeof(uint32_t) * words);
    if (!buf) return -1;
    float *bb = (float *)buf, *t = (float *)(buf + L), *qrow = (float *)(buf + 2 * L);
    uint32_t *ka = buf + 3 * L, *ia = buf + 4 * L, *kb = buf + 5 * L, *ib = buf + 6 * L;
    float *qtab = (float *)(buf + 7 * L); /* q by rank: the same for every row */
    if (ranked) {
        const float den = (float)(len - 1);
        for (int64_t k = 0; k < len; k++) {
            float rho = rnd1(rnd1((float)k, cd) / den, cd);
            qtab[k] = rnd1(de + rnd1(rho * e2, cd), cd);
        }
    }
    for (int64_t r0 = 0; r0 < n; r0 += len) {
        load_c(bb, base, base_dtype, r0, len, cd);
        if (cd == F32)
            load_tau(t, x, x_dtype, r0, len, bb);
        else
            load_tau_c(t, x, x_dtype, r0, len, bb, cd);
        float *restrict qr = q ? q + r0 : qrow;
        if (ranked) {
            for (int64_t j = 0; j < len; j++) ka[j] = abs_key(t[j], cd);
            const uint32_t *order = radix_order(ka, ia, kb, ib, len, cd == F32 ? 4 : 2);
            for (int64_t k = 0; k < len; k++) qr[order[k]] = qtab[k];
        } else {
            for (int64_t j = 0; j < len; j++) qr[j] = qc;
        }
        if (sums) {
            uint32_t u[TILE];
            for (int64_t s = 0; s < len; s += TILE) {
                int64_t k = len - s < TILE ? len - s : TILE;
                draw_tile(u, k, offset + r0 + s, k0, k1);
                float *restrict ts = t + s;
                sums[0] += sumabs(ts, k);
                for (int64_t j = 0; j < k; j++) ts[j] = ts[j] * ((float)u[j] * 0x1p-24f < qr[s + j] ? 1.0f : 0.0f);
                sums[1] += sumabs(ts, k);
            }
        }
    }
    free(buf);
    return 0;
}
