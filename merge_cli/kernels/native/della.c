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

/* k[j] = the sort key of |t[j]| (t already rounded to cd): the bits of |t| in cd (31 bits in fp32, 15 in
 * bf16/fp16); non-negative floats order like their bits. One loop per dtype, so each vectorizes. */
static void abs_keys(const float *restrict t, uint32_t *restrict k, int64_t len, int cd) {
    if (cd == BF16) {
        for (int64_t j = 0; j < len; j++) {
            uint32_t b;
            memcpy(&b, &t[j], 4);
            k[j] = (b >> 16) & 0x7FFFu;
        }
#if HAVE_F16
    } else if (cd == F16) {
        for (int64_t j = 0; j < len; j++) {
            half_t h = (half_t)t[j];
            uint16_t hb;
            memcpy(&hb, &h, 2);
            k[j] = hb & 0x7FFFu;
        }
#endif
    } else {
        for (int64_t j = 0; j < len; j++) {
            uint32_t b;
            memcpy(&b, &t[j], 4);
            k[j] = b & 0x7FFFFFFFu;
        }
    }
}

/* The ranks, given as q: qr[index] = qtab[rank], rank = the item's place in the stable ascending order of the
 * keys (equal keys keep index order). order_small: items key << 16 | index (key < 2^16, len <= 2^16), an LSD
 * radix sort on the key's two bytes whose last pass writes q (a pass whose byte is the same in every item is
 * skipped); order_wide: items key << 32 | index, four bytes, returns the sorted items (in a or b);
 * rank_counts: a counting sort of keys < r (one pass to count, one to place). */
static void order_small(uint32_t *restrict a, uint32_t *restrict b, int64_t len, float *restrict qr,
                        const float *restrict qtab) {
    int64_t h[2][256];
    memset(h, 0, sizeof h);
    for (int64_t j = 0; j < len; j++) {
        uint32_t v = a[j];
        h[0][(v >> 16) & 255u]++;
        h[1][v >> 24]++;
    }
    int need[2], last = -1;
    for (int p = 0; p < 2; p++) {
        need[p] = h[p][(a[0] >> (16 + 8 * p)) & 255u] != len; /* one byte everywhere: the order stands */
        if (need[p]) last = p;
    }
    if (last < 0) {
        for (int64_t k = 0; k < len; k++) qr[a[k] & 0xFFFFu] = qtab[k];
        return;
    }
    for (int p = 0; p <= last; p++) {
        if (!need[p]) continue;
        const int sh = 16 + 8 * p;
        int64_t at[256], sum = 0;
        for (int d = 0; d < 256; d++) {
            at[d] = sum;
            sum += h[p][d];
        }
        if (p == last) {
            for (int64_t j = 0; j < len; j++) {
                uint32_t v = a[j];
                qr[v & 0xFFFFu] = qtab[at[(v >> sh) & 255u]++];
            }
            return;
        }
        for (int64_t j = 0; j < len; j++) {
            uint32_t v = a[j];
            b[at[(v >> sh) & 255u]++] = v;
        }
        uint32_t *tmp = a;
        a = b, b = tmp;
    }
}

static void rank_counts(const uint32_t *restrict key, int64_t len, uint32_t r, uint32_t *restrict h,
                        float *restrict qr, const float *restrict qtab) {
    memset(h, 0, sizeof(uint32_t) * r);
    for (int64_t j = 0; j < len; j++) h[key[j]]++;
    uint32_t sum = 0;
    for (uint32_t d = 0; d < r; d++) {
        uint32_t c = h[d];
        h[d] = sum;
        sum += c;
    }
    for (int64_t j = 0; j < len; j++) qr[j] = qtab[h[key[j]]++];
}

static uint64_t *order_wide(uint64_t *restrict a, uint64_t *restrict b, int64_t len) {
    int64_t h[4][256];
    memset(h, 0, sizeof h);
    for (int64_t j = 0; j < len; j++) {
        uint64_t v = a[j];
        h[0][(v >> 32) & 255u]++;
        h[1][(v >> 40) & 255u]++;
        h[2][(v >> 48) & 255u]++;
        h[3][v >> 56]++;
    }
    for (int p = 0; p < 4; p++) {
        const int sh = 32 + 8 * p;
        if (h[p][(a[0] >> sh) & 255u] == len) continue;
        int64_t at[256], sum = 0;
        for (int d = 0; d < 256; d++) {
            at[d] = sum;
            sum += h[p][d];
        }
        for (int64_t j = 0; j < len; j++) {
            uint64_t v = a[j];
            b[at[(v >> sh) & 255u]++] = v;
        }
        uint64_t *tmp = a;
        a = b, b = tmp;
    }
    return a;
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
    size_t L = (size_t)len, words = ranked ? 8 * L + 65536 : 3 * L;
    uint32_t *buf = (uint32_t *)malloc(sizeof(uint32_t) * words);
    if (!buf) return -1;
    float *bb = (float *)buf, *t = (float *)(buf + L), *qrow = (float *)(buf + 2 * L);
    float *qtab = (float *)(buf + 3 * L); /* q by rank: the same for every row */
    uint64_t *wa = (uint64_t *)(buf + 4 * L), *wb = wa + L; /* sort items (8-byte aligned: malloc, 16L bytes in) */
    uint32_t *sa = (uint32_t *)wa, *sb = sa + L, *hist = buf + 8 * L; /* rank_counts' counts */
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
            /* compact keys that order the same: 0 for |tau| = 0, else (k >> lo) - (kmin >> lo) + 1, lo the lowest
             * bit that differs among the nonzero keys (the bits below it are the same in all of them) */
            abs_keys(t, sa, len, cd);
            uint32_t kmin1 = 0xFFFFFFFFu, kmax = 0, kor = 0, kand = 0xFFFFFFFFu; /* over the nonzero keys */
            for (int64_t j = 0; j < len; j++) {
                uint32_t k = sa[j], z = -(uint32_t)(k == 0);
                kmin1 = k - 1u < kmin1 ? k - 1u : kmin1; /* a zero key wraps to the largest */
                kmax = k > kmax ? k : kmax;
                kor |= k;
                kand &= k | z;
            }
            const uint32_t kmin = kmin1 + 1u;
            const uint32_t vary = kor ^ kand;
            const int lo = vary ? __builtin_ctz(vary) : 0;
            const uint32_t k0s = kmax ? kmin >> lo : 0;
            const uint64_t range = kmax ? (uint64_t)((kmax >> lo) - k0s) + 2 : 1;
            for (int64_t j = 0; j < len; j++) sa[j] = sa[j] ? (sa[j] >> lo) - k0s + 1 : 0;
            if (range <= (uint64_t)(4 * len) && range <= 65536) {
                rank_counts(sa, len, (uint32_t)range, hist, qr, qtab);
            } else if (range <= 65536 && len <= 65536) {
                for (int64_t j = 0; j < len; j++) sa[j] = sa[j] << 16 | (uint32_t)j;
                order_small(sa, sb, len, qr, qtab);
            } else {
                for (int64_t j = len - 1; j >= 0; j--) wa[j] = (uint64_t)sa[j] << 32 | (uint64_t)j;
                const uint64_t *o = order_wide(wa, wb, len);
                for (int64_t k = 0; k < len; k++) qr[o[k] & 0xFFFFFFFFu] = qtab[k];
            }
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
