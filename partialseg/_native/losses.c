/*
 * partialseg native CPU kernels: fused softmax + partial-label loss + gradient.
 *
 * Layout: logits x and targets are contiguous (B, K, N) float32 (N voxels); every pass works on
 * blocks of BLK voxels, with the channel loop outside and the voxel loop inside so that the
 * voxel loop vectorises (glibc's vector expf / logf / log1pf through `omp declare simd`).
 *
 * Gradients are written in the "PH" form: with p = softmax(x) and h_k = dL/dp_k,
 *     dL/dx_k = p_k h_k - p_k sum_j p_j h_j,
 * where the products p_k h_k are formed directly (so -log terms never divide by a tiny p).
 * Voxels where float32 would lose accuracy (a probability of a -log term below 1e-30, or
 * 1 - p below 1e-2 in a -log(1 - p) term) are recomputed in double precision in log space
 * (logsumexp over the relevant set of logits), which is exact at any logit magnitude.
 *
 * The Python side (partialseg/_native/__init__.py) compiles this file once per machine and
 * loads it with ctypes; partialseg/losses/_native.py wraps the entry points in autograd
 * functions. The pure-torch implementation in partialseg/losses/_functional.py is the
 * reference: the tests compare the two.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#pragma omp declare simd notinbranch
extern float expf(float);
#pragma omp declare simd notinbranch
extern float logf(float);
#pragma omp declare simd notinbranch
extern float log1pf(float);

#define BLK 128
/* fmaxf / fminf are library calls without -ffinite-math-only; these vectorise (vmaxps / vminps) */
#define MAXF(a, b) ((a) > (b) ? (a) : (b))
#define MINF(a, b) ((a) < (b) ? (a) : (b))
#define TINY 1e-30f      /* below this a -log(prob) term is recomputed exactly */
#define SATURATED 0.99f  /* above this a -log(1 - prob) term is recomputed exactly */
#define ONE_MINUS_ULP (1.0f - 5.9604645e-08f)

/* compatible loss bases (DCL section 3.4) */
enum {
    POS_CE = 1, POS_DICE = 2, POS_TACE = 4, POS_TADICE = 8,
    NEG_CE = 16, NEG_DICE = 32, NEG_EXCE = 64, NEG_EXDICE = 128
};

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* softmax of one block: x points at x[b, 0, i0] (channel stride N); row k of the output is
   P + k * pstride (BLK for a work buffer, N to write straight into a (B, K, N) tensor).
   lse[v] = log sum_k exp x[k, v] is finite, or NaN when a logit of the voxel is NaN or +inf (or
   all are -inf): the kernels add 0 * lse to each voxel's loss, so that non-finite logits give a
   NaN loss for the price of one multiply-add per voxel (the clamps and masked selects below
   would otherwise turn them into finite numbers while the gradient is NaN) */
static void softmax_block(const float *x, int64_t N, int64_t K, int64_t n, float *P, int64_t pstride, float *lse)
{
    float mx[BLK], s[BLK];
#pragma omp simd
    for (int64_t v = 0; v < n; v++) { mx[v] = x[v]; s[v] = 0.f; }
    for (int64_t k = 1; k < K; k++) {
        const float *xk = x + k * N;
#pragma omp simd
        for (int64_t v = 0; v < n; v++) mx[v] = MAXF(mx[v], xk[v]);
    }
    for (int64_t k = 0; k < K; k++) {
        const float *xk = x + k * N;
        float *pk = P + k * pstride;
#pragma omp simd
        for (int64_t v = 0; v < n; v++) { float e = expf(xk[v] - mx[v]); pk[v] = e; s[v] += e; }
    }
#pragma omp simd
    for (int64_t v = 0; v < n; v++) { lse[v] = mx[v] + logf(s[v]); s[v] = 1.f / s[v]; }
    for (int64_t k = 0; k < K; k++) {
        float *pk = P + k * pstride;
#pragma omp simd
        for (int64_t v = 0; v < n; v++) pk[v] *= s[v];
    }
}

/* the block's target from a channels-last (B, N, C) tensor (a one-hot built with movedim, the
   layout of a (B, *spatial, C) label): t points at t[b, i0, 0]; T[c * BLK + v] = t[v * C + c].
   Read in memory order and transposed in cache, where a copy of the whole tensor to (B, C, N)
   (torch's .contiguous()) costs a pass and an allocation that grow with C */
static void pack_channels_last(const float *t, int64_t C, int64_t n, float *T)
{
    for (int64_t v = 0; v < n; v++) {
        const float *tv = t + v * C;
        for (int64_t c = 0; c < C; c++) T[c * BLK + v] = tv[c];
    }
}

/* ---------------------------------------------------------------------------------------- */
/* exact (double, log-space) helpers for single voxels                                       */
/* ---------------------------------------------------------------------------------------- */

/* -log P(A) = lse - lse_A for the logits in A (in[k] != 0); adds weight * (-r^A_k) to ph */
static double neglog_set(const double *x, const char *in, int64_t K, double lse, double weight, double *ph)
{
    double m = -INFINITY, s = 0.0;
    for (int64_t k = 0; k < K; k++) if (in[k] && x[k] > m) m = x[k];
    if (m == -INFINITY) return 0.0; /* empty set: no term */
    for (int64_t k = 0; k < K; k++) if (in[k]) s += exp(x[k] - m);
    double lse_a = m + log(s);
    for (int64_t k = 0; k < K; k++) if (in[k]) ph[k] -= weight * exp(x[k] - lse_a);
    return weight * (lse - lse_a);
}

typedef struct {
    int64_t K, M, N;          /* logit channels, classes (K == M, or K == 2M for CompNet), voxels */
    int grouped;              /* class c = channels c and c + M (CompNet: intersection + extra) */
    int flags;                /* compatible bases */
    float a_pos, a_neg, eps;
    float prior_ce, prior_exce, prior_dice; /* prior loss weights per f_N kind (0: off) */
} compat_args;

/* the whole compatible (+ prior) loss of one voxel in double precision, exact in log space.
   x, t, yc point at the voxel (channel stride N); writes loss and the gradient (stride N). */
static void compatible_exact_voxel(const compat_args *a, const float *xf, const float *t, int64_t ts, const float *yc,
                                   const uint8_t *unk, float *loss, float *grad)
{
    const int64_t K = a->K, M = a->M, N = a->N;
    double x[K], p[K], ph[K], D[M], y[M], E[K];
    char in[K];
    double mx = -INFINITY, s = 0.0, L = 0.0;
    for (int64_t k = 0; k < K; k++) { x[k] = xf[k * N]; if (x[k] > mx) mx = x[k]; }
    for (int64_t k = 0; k < K; k++) s += exp(x[k] - mx);
    const double lse = mx + log(s);
    for (int64_t k = 0; k < K; k++) { p[k] = exp(x[k] - lse); ph[k] = 0.0; E[k] = 0.0; }
    for (int64_t c = 0; c < M; c++) {
        y[c] = a->grouped ? p[c] + p[c + M] : p[c];
        if (y[c] > 1.0) y[c] = 1.0;
        D[c] = 0.0;
    }
#define GROUP(c, val) do { memset(in, 0, K); in[c] = (val); if (a->grouped) in[(c) + M] = (val); } while (0)
    const double ap = a->a_pos, an = a->a_neg, eps = a->eps;
    int has1 = 0, ncand = 0;
    for (int64_t c = 0; c < M; c++) { has1 |= t[c * ts] == 1.f; ncand += t[c * ts] != 0.f; }
    const int informative = ncand > 0 && ncand < M;
    if (a->flags & POS_CE)
        for (int64_t c = 0; c < M; c++)
            if (t[c * ts] == 1.f) { GROUP(c, 1); L += neglog_set(x, in, K, lse, ap, ph); }
    if (a->flags & POS_DICE)
        for (int64_t c = 0; c < M; c++)
            if (t[c * ts] == 1.f) { double d = 1.0 + y[c]; L += ap * (1.0 - y[c]) / d; D[c] -= 2.0 * ap / (d * d); }
    if ((a->flags & (POS_TACE | POS_TADICE)) && informative) {
        memset(in, 0, K);
        double q = 0.0;
        for (int64_t c = 0; c < M; c++)
            if (t[c * ts] != 0.f) { in[c] = 1; if (a->grouped) in[c + M] = 1; q += y[c]; }
        if (a->flags & POS_TACE) L += neglog_set(x, in, K, lse, ap, ph);
        if (a->flags & POS_TADICE) {
            double d = 1.0 + q;
            L += ap * (1.0 - q) / d;
            for (int64_t c = 0; c < M; c++) if (t[c * ts] != 0.f) D[c] -= 2.0 * ap / (d * d);
        }
    }
    if (a->flags & NEG_CE)
        for (int64_t c = 0; c < M; c++)
            if (t[c * ts] == 0.f) { GROUP(c, 1); for (int64_t k = 0; k < K; k++) in[k] = !in[k]; L += neglog_set(x, in, K, lse, an, ph); }
    if (a->flags & NEG_DICE)
        for (int64_t c = 0; c < M; c++)
            if (t[c * ts] == 0.f) { double d = 1.0 + y[c]; L += an * 2.0 * y[c] / d; D[c] += 2.0 * an / (d * d); }
    if (a->flags & (NEG_EXCE | NEG_EXDICE)) {
        double sx = 0.0;
        for (int64_t c = 0; c < M; c++) if (unk[c] && t[c * ts] == 0.f) sx += y[c];
        for (int64_t c = 0; c < M; c++) {
            int k0 = t[c * ts] == 0.f, ex = has1 && unk[c] && k0;
            if (a->flags & NEG_EXCE) {
                if (k0) { L += an * log(y[c] + eps); D[c] += an / (y[c] + eps); }
                if (ex) D[c] += an / (sx + eps);
            }
            if (a->flags & NEG_EXDICE) {
                double d = y[c] + 1.0;
                if (k0) { L += an * 2.0 * y[c] / d; D[c] += an * 2.0 / (d * d); }
                if (ex) D[c] += an * 2.0 / ((sx + 1.0) * (sx + 1.0));
            }
        }
        if (has1 && (a->flags & NEG_EXCE)) L += an * log(sx + eps);
        if (has1 && (a->flags & NEG_EXDICE)) L += an * 2.0 * sx / (sx + 1.0);
    }
    if (yc) { /* prior loss (Eq. 7): inclusiveness on the intersection maps, exclusiveness on the extra maps */
        for (int64_t c = 0; c < M; c++) {
            float v = yc[c * N];
            int64_t k = v == 0.f ? c : (v == 1.f ? c + M : -1);
            if (k < 0) continue;
            if (a->prior_ce > 0) { memset(in, 1, K); in[k] = 0; L += neglog_set(x, in, K, lse, a->prior_ce, ph); }
            if (a->prior_exce > 0) { L += a->prior_exce * log(p[k] + eps); E[k] += a->prior_exce / (p[k] + eps); }
            if (a->prior_dice > 0) { double d = 1.0 + p[k]; L += a->prior_dice * 2.0 * p[k] / d; E[k] += a->prior_dice * 2.0 / (d * d); }
        }
    }
#undef GROUP
    double S = 0.0;
    for (int64_t k = 0; k < K; k++) {
        int64_t c = (a->grouped && k >= M) ? k - M : k;
        ph[k] += p[k] * (D[c] + E[k]);
        S += ph[k];
    }
    for (int64_t k = 0; k < K; k++) grad[k * N] = (float)(ph[k] - p[k] * S);
    *loss = (float)L;
}

/* ---------------------------------------------------------------------------------------- */
/* compatible loss (DCL Eq. 2-4, 11-18) and conditional compatible loss (Eq. 6-8)             */
/* ---------------------------------------------------------------------------------------- */

static void compatible_block(const compat_args *a, const float *x, const float *t, int64_t ts, const float *yc, const uint8_t *unk,
                             int64_t n, float *loss, float *grad, float *work)
{
    const int64_t K = a->K, M = a->M, N = a->N;
    float *P = work, *Y = a->grouped ? work + K * BLK : P, *D = work + (K + M) * BLK, *E = D + M * BLK;
    float lse[BLK], L[BLK], q[BLK], sx[BLK], S[BLK];
    uint8_t flag[BLK], has1[BLK], inform[BLK];
    const float ap = a->a_pos, an = a->a_neg, eps = a->eps;

    softmax_block(x, N, K, n, P, BLK, lse);
    if (a->grouped)
        for (int64_t c = 0; c < M; c++) {
            const float *p0 = P + c * BLK, *p1 = P + (c + M) * BLK;
            float *yv = Y + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) yv[v] = MINF(p0[v] + p1[v], 1.f);
        }
    memset(D, 0, sizeof(float) * M * BLK);
    if (yc) memset(E, 0, sizeof(float) * K * BLK);
    for (int64_t k = 0; k < K; k++) memset(grad + k * N, 0, sizeof(float) * n);
    for (int64_t v = 0; v < n; v++) { L[v] = 0.f; flag[v] = 0; has1[v] = 0; }

    if (a->flags & (POS_CE | POS_DICE | NEG_EXCE | NEG_EXDICE))
        for (int64_t c = 0; c < M; c++) {
            const float *tc = t + c * ts;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) has1[v] |= tc[v] == 1.f;
        }
    if (a->flags & POS_CE)
        for (int64_t c = 0; c < M; c++) {
            const float *tc = t + c * ts, *xc = x + c * N, *yv = Y + c * BLK;
            float *dc = D + c * BLK, *gc = grad + c * N;
            if (!a->grouped) { /* -log p_c = lse - x_c exactly; p_c h_c = -1 */
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    int k1 = tc[v] == 1.f;
                    L[v] += k1 ? ap * (lse[v] - xc[v]) : 0.f;
                    gc[v] = k1 ? -ap : 0.f;
                }
            } else {
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    int k1 = tc[v] == 1.f;
                    float y = MAXF(yv[v], TINY);
                    L[v] -= k1 ? ap * logf(y) : 0.f;
                    dc[v] -= k1 ? ap / y : 0.f;
                    flag[v] |= k1 & (yv[v] < TINY);
                }
            }
        }
    if (a->flags & POS_DICE)
        for (int64_t c = 0; c < M; c++) {
            const float *tc = t + c * ts, *yv = Y + c * BLK;
            float *dc = D + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                int k1 = tc[v] == 1.f;
                float d = 1.f + yv[v];
                L[v] += k1 ? ap * (1.f - yv[v]) / d : 0.f;
                dc[v] -= k1 ? 2.f * ap / (d * d) : 0.f;
            }
        }
    if (a->flags & (POS_TACE | POS_TADICE)) {
        int nc[BLK];
        for (int64_t v = 0; v < n; v++) { q[v] = 0.f; nc[v] = 0; }
        for (int64_t c = 0; c < M; c++) {
            const float *tc = t + c * ts, *yv = Y + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) { int w = tc[v] != 0.f; q[v] += w ? yv[v] : 0.f; nc[v] += w; }
        }
#pragma omp simd
        for (int64_t v = 0; v < n; v++) { inform[v] = (nc[v] > 0) & (nc[v] < M); q[v] = MINF(q[v], 1.f); }
        if (a->flags & POS_TACE) {
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                L[v] -= inform[v] ? ap * logf(MAXF(q[v], TINY)) : 0.f;
                flag[v] |= inform[v] & (q[v] < TINY);
            }
            for (int64_t c = 0; c < M; c++) {
                const float *tc = t + c * ts;
                float *dc = D + c * BLK;
#pragma omp simd
                for (int64_t v = 0; v < n; v++) dc[v] -= (inform[v] & (tc[v] != 0.f)) ? ap / MAXF(q[v], TINY) : 0.f;
            }
        }
        if (a->flags & POS_TADICE) {
#pragma omp simd
            for (int64_t v = 0; v < n; v++) L[v] += inform[v] ? ap * (1.f - q[v]) / (1.f + q[v]) : 0.f;
            for (int64_t c = 0; c < M; c++) {
                const float *tc = t + c * ts;
                float *dc = D + c * BLK;
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    float d = 1.f + q[v];
                    dc[v] -= (inform[v] & (tc[v] != 0.f)) ? 2.f * ap / (d * d) : 0.f;
                }
            }
        }
    }
    if (a->flags & NEG_CE)
        for (int64_t c = 0; c < M; c++) {
            const float *tc = t + c * ts, *yv = Y + c * BLK;
            float *dc = D + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                int k0 = tc[v] == 0.f;
                float y = MINF(yv[v], ONE_MINUS_ULP);
                L[v] -= k0 ? an * log1pf(-y) : 0.f;
                dc[v] += k0 ? an / (1.f - y) : 0.f;
                flag[v] |= k0 & (yv[v] > SATURATED);
            }
        }
    if (a->flags & NEG_DICE)
        for (int64_t c = 0; c < M; c++) {
            const float *tc = t + c * ts, *yv = Y + c * BLK;
            float *dc = D + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                int k0 = tc[v] == 0.f;
                float d = 1.f + yv[v];
                L[v] += k0 ? 2.f * an * yv[v] / d : 0.f;
                dc[v] += k0 ? 2.f * an / (d * d) : 0.f;
            }
        }
    if (a->flags & (NEG_EXCE | NEG_EXDICE)) {
        /* s = summed probability of the sample's unlabelled classes known absent at the voxel */
        float gs[BLK]; /* d(merged term)/ds on labelled voxels */
        for (int64_t v = 0; v < n; v++) { sx[v] = 0.f; gs[v] = 0.f; }
        for (int64_t c = 0; c < M; c++) {
            if (!unk[c]) continue;
            const float *tc = t + c * ts, *yv = Y + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) sx[v] += tc[v] == 0.f ? yv[v] : 0.f;
        }
        if (a->flags & NEG_EXCE) { /* Eq. 17: [t = 0] log(p + eps) + log(s + eps) */
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                L[v] += has1[v] ? an * logf(sx[v] + eps) : 0.f;
                gs[v] += has1[v] ? an / (sx[v] + eps) : 0.f;
            }
            for (int64_t c = 0; c < M; c++) {
                const float *tc = t + c * ts, *yv = Y + c * BLK;
                float *dc = D + c * BLK;
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    int k0 = tc[v] == 0.f;
                    L[v] += k0 ? an * logf(yv[v] + eps) : 0.f;
                    dc[v] += k0 ? an / (yv[v] + eps) : 0.f;
                }
            }
        }
        if (a->flags & NEG_EXDICE) { /* Eq. 18: [t = 0] 2p / (p + 1) + 2s / (s + 1) */
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                float s1 = sx[v] + 1.f;
                L[v] += has1[v] ? 2.f * an * sx[v] / s1 : 0.f;
                gs[v] += has1[v] ? 2.f * an / (s1 * s1) : 0.f;
            }
            for (int64_t c = 0; c < M; c++) {
                const float *tc = t + c * ts, *yv = Y + c * BLK;
                float *dc = D + c * BLK;
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    int k0 = tc[v] == 0.f;
                    float d = yv[v] + 1.f;
                    L[v] += k0 ? 2.f * an * yv[v] / d : 0.f;
                    dc[v] += k0 ? 2.f * an / (d * d) : 0.f;
                }
            }
        }
        for (int64_t c = 0; c < M; c++) {
            if (!unk[c]) continue;
            const float *tc = t + c * ts;
            float *dc = D + c * BLK;
#pragma omp simd
            for (int64_t v = 0; v < n; v++) dc[v] += tc[v] == 0.f ? gs[v] : 0.f;
        }
    }
    if (yc) /* prior loss (Eq. 7) on the 2m maps: f_N(z_cap) where y^c = 0, f_N(z_delta) where y^c = 1 */
        for (int64_t c = 0; c < M; c++) {
            const float *ycc = yc + c * N;
            for (int side = 0; side < 2; side++) {
                const int64_t k = side ? c + M : c;
                const float want = side ? 1.f : 0.f;
                const float *pk = P + k * BLK;
                float *ek = E + k * BLK;
                const float w = a->prior_ce, wx = a->prior_exce, wd = a->prior_dice;
                if (w > 0) {
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) {
                        int on = ycc[v] == want;
                        float pc = MINF(pk[v], ONE_MINUS_ULP);
                        L[v] -= on ? w * log1pf(-pc) : 0.f;
                        ek[v] += on ? w / (1.f - pc) : 0.f;
                        flag[v] |= on & (pk[v] > SATURATED);
                    }
                }
                if (wx > 0) {
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) {
                        int on = ycc[v] == want;
                        L[v] += on ? wx * logf(pk[v] + eps) : 0.f;
                        ek[v] += on ? wx / (pk[v] + eps) : 0.f;
                    }
                }
                if (wd > 0) {
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) {
                        int on = ycc[v] == want;
                        float d = 1.f + pk[v];
                        L[v] += on ? 2.f * wd * pk[v] / d : 0.f;
                        ek[v] += on ? 2.f * wd / (d * d) : 0.f;
                    }
                }
            }
        }
    /* PH form: G_k = Z_k + p_k (D_c(k) + E_k); grad = G - p sum G */
    for (int64_t v = 0; v < n; v++) S[v] = 0.f;
    for (int64_t k = 0; k < K; k++) {
        const int64_t c = (a->grouped && k >= M) ? k - M : k;
        const float *pk = P + k * BLK, *dc = D + c * BLK, *ek = E + k * BLK;
        float *gk = grad + k * N;
        if (yc) {
#pragma omp simd
            for (int64_t v = 0; v < n; v++) { float g = gk[v] + pk[v] * (dc[v] + ek[v]); gk[v] = g; S[v] += g; }
        } else {
#pragma omp simd
            for (int64_t v = 0; v < n; v++) { float g = gk[v] + pk[v] * dc[v]; gk[v] = g; S[v] += g; }
        }
    }
    for (int64_t k = 0; k < K; k++) {
        const float *pk = P + k * BLK;
        float *gk = grad + k * N;
#pragma omp simd
        for (int64_t v = 0; v < n; v++) gk[v] -= pk[v] * S[v];
    }
#pragma omp simd
    for (int64_t v = 0; v < n; v++) loss[v] = L[v] + 0.f * lse[v]; /* NaN where a logit is NaN / +inf */
    for (int64_t v = 0; v < n; v++)
        if (flag[v]) compatible_exact_voxel(a, x + v, t + v, ts, yc ? yc + v : NULL, unk, loss + v, grad + v);
}

/* Per-voxel compatible loss and its gradient with respect to the logits (for an upstream
   gradient of 1 per voxel).
   x: (B, K, N) logits; t: (B, M, N) <0,p,1> target of the classes; yc: (B, M, N) conditional
   labels or NULL (then no prior term); unknown: (B, M) 1 where the class is unknown somewhere in
   the sample (for the exclusive bases), may be NULL when they are off. t_cl: t is channels-last
   (B, N, M) instead.
   loss: (B, N) out; grad: (B, K, N) out. Returns 0, or -1 when out of memory. */
int ps_compatible(const float *x, const float *t, int t_cl, const float *yc, const uint8_t *unknown,
                  int64_t B, int64_t K, int64_t M, int64_t N, int flags,
                  float a_pos, float a_neg, float eps, float prior_ce, float prior_exce, float prior_dice,
                  float *loss, float *grad, int nthreads)
{
    compat_args a = {K, M, N, K != M, flags, a_pos, a_neg, eps, prior_ce, prior_exce, prior_dice};
    static const uint8_t none[1] = {0};
    const int64_t nblk = (N + BLK - 1) / BLK, total = B * nblk;
    const size_t work_floats = (size_t)(2 * K + 2 * M) * BLK;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && total > 1)
    {
        float *work = malloc(sizeof(float) * (work_floats + (t_cl ? (size_t)M * BLK : 0)));
        if (!work) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < total; j++) {
                const int64_t b = j / nblk, i0 = (j % nblk) * BLK, n = min64(BLK, N - i0);
                const float *tb = t + b * M * N + i0;
                int64_t ts = N;
                if (t_cl) { pack_channels_last(t + b * M * N + i0 * M, M, n, work + work_floats); tb = work + work_floats; ts = BLK; }
                compatible_block(&a, x + b * K * N + i0, tb, ts, yc ? yc + b * M * N + i0 : NULL,
                                 unknown ? unknown + b * M : none, n, loss + b * N + i0, grad + b * K * N + i0, work);
            }
            free(work);
        }
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------- */
/* marginal + exclusion losses (Shi et al., Eq. 4-11)                                         */
/* ---------------------------------------------------------------------------------------- */

enum { M_CE = 1, E_CE = 2, M_DICE = 4, E_DICE = 8 };

/* exact -log q (q = probability of the candidates w = [t != 0]) of one voxel; with r != NULL
   also the candidate softmax r (stride 1) */
static double marginal_exact_voxel(const float *xf, const float *t, int64_t ts, int64_t C, int64_t N, double *r)
{
    double mx = -INFINITY, mc = -INFINITY, s = 0.0, sc = 0.0;
    for (int64_t c = 0; c < C; c++) {
        double xv = xf[c * N];
        if (xv > mx) mx = xv;
        if (t[c * ts] != 0.f && xv > mc) mc = xv;
    }
    for (int64_t c = 0; c < C; c++) {
        double xv = xf[c * N];
        s += exp(xv - mx);
        if (t[c * ts] != 0.f) sc += exp(xv - mc);
    }
    double lse = mx + log(s), lse_c = mc + log(sc);
    if (r) for (int64_t c = 0; c < C; c++) r[c] = t[c * ts] != 0.f ? exp(xf[c * N] - lse_c) : 0.0;
    return lse - lse_c;
}

/* Forward: P (B, C, N) out = softmax(x); mce / ece (B, N) out (or NULL); sums (B, 6, C) double
   out (accumulated, zero it first): marginal Dice (I, sum P, sum T), exclusion Dice
   (sum v p, sum M p, sum v), where v = [t == 0], w = 1 - v, M = [some v at the voxel],
   q = sum_c w p (1 on uninformative voxels), the marginal prediction is q on the candidate
   channels and p elsewhere. A voxel with a NaN / +inf logit makes its mce and ece NaN and every
   Dice sum of its sample NaN (z = 0 * lse), whatever its target. */
int ps_marginal_forward(const float *x, const float *t, int t_cl, int64_t B, int64_t C, int64_t N, int want, float eps,
                        float *P, float *mce, float *ece, double *sums, int nthreads)
{
    const int64_t nblk = (N + BLK - 1) / BLK, total = B * nblk;
    const int need_sums = (want & (M_DICE | E_DICE)) != 0;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && total > 1)
    {
        double *acc = calloc((size_t)6 * C, sizeof(double));
        float *T = t_cl ? malloc(sizeof(float) * C * BLK) : NULL;
        if (!acc || (t_cl && !T)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < total; j++) {
            const int64_t b = j / nblk, i0 = (j % nblk) * BLK, n = min64(BLK, N - i0);
            const float *xb = x + b * C * N + i0, *tb = t + b * C * N + i0;
            int64_t ts = N;
            if (T) { pack_channels_last(t + b * C * N + i0 * C, C, n, T); tb = T; ts = BLK; }
            float *Pb = P + b * C * N + i0;
            float q[BLK], mk[BLK], L[BLK], lse[BLK], z[BLK];
            int nv[BLK];
            softmax_block(xb, N, C, n, Pb, N, lse); /* straight into P */
#pragma omp simd
            for (int64_t v = 0; v < n; v++) { q[v] = 0.f; nv[v] = 0; L[v] = 0.f; }
            for (int64_t c = 0; c < C; c++) {
                float *pc = Pb + c * N;
                const float *tc = tb + c * ts;
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    float p = pc[v];
                    int w = tc[v] != 0.f;
                    q[v] += w ? p : 0.f;
                    nv[v] += !w;
                }
                if (want & E_CE) {
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) L[v] += tc[v] == 0.f ? logf(pc[v] + eps) : 0.f;
                }
            }
#pragma omp simd
            for (int64_t v = 0; v < n; v++) {
                z[v] = 0.f * lse[v]; /* 0, or NaN at a voxel with a non-finite logit */
                mk[v] = nv[v] > 0 ? 1.f : 0.f;
                q[v] = (nv[v] > 0 ? q[v] : 1.f) + z[v];
            }
            if (ece) {
                float *eo = ece + b * N + i0;
#pragma omp simd
                for (int64_t v = 0; v < n; v++) eo[v] = L[v] + z[v];
            }
            if (mce) {
                float *mo = mce + b * N + i0;
                /* q < TINY ? TINY : q keeps a NaN q, where MAXF(q, TINY) would turn it into TINY */
#pragma omp simd
                for (int64_t v = 0; v < n; v++) mo[v] = (nv[v] < C ? -logf(q[v] < TINY ? TINY : q[v]) : 0.f) + z[v];
                for (int64_t v = 0; v < n; v++)
                    if (nv[v] > 0 && nv[v] < C && q[v] < TINY) mo[v] = (float)marginal_exact_voxel(xb + v, tb + v, ts, C, N, NULL);
            }
            if (need_sums && acc) {
                double *ab = acc;
                float sm = 0.f, smq = 0.f, zs = 0.f;
#pragma omp simd reduction(+ : sm, smq, zs)
                for (int64_t v = 0; v < n; v++) { sm += mk[v]; smq += mk[v] * q[v]; zs += z[v]; }
                for (int64_t c = 0; c < C; c++) {
                    const float *tc = tb + c * ts, *pc = Pb + c * N;
                    float svp = 0.f, sv = 0.f, svq = 0.f, smp = 0.f;
#pragma omp simd reduction(+ : svp, sv, svq, smp)
                    for (int64_t v = 0; v < n; v++) {
                        float vv = tc[v] == 0.f ? 1.f : 0.f;
                        svp += vv * pc[v];
                        sv += vv;
                        svq += vv * q[v];
                        smp += mk[v] * pc[v];
                    }
                    /* I = sum M w q = sum M q - sum v q (v = 1 implies M = 1); sum T = sum M - sum v */
                    ab[0 * C + c] += (double)smq - svq + zs; /* zs: NaN when a voxel of the block is */
                    ab[1 * C + c] += (double)smq - svq + svp + zs;
                    ab[2 * C + c] += (double)sm - sv + zs;
                    ab[3 * C + c] += (double)svp + zs;
                    ab[4 * C + c] += (double)smp + zs;
                    ab[5 * C + c] += (double)sv + zs;
                }
                /* flush per sample so that blocks of different samples do not mix */
                double *out = sums + b * 6 * C;
                for (int64_t e = 0; e < 6 * C; e++) {
#pragma omp atomic
                    out[e] += ab[e];
                }
                memset(ab, 0, sizeof(double) * 6 * C);
            }
        }
        free(acc);
        free(T);
    }
    return failed ? -1 : 0;
}

/* Backward: P (B, C, N) holds the softmax and is overwritten with dL/dx. g_mce / g_ece (B, N) or
   NULL; g_sums (B, 6, C) or NULL, the upstream gradients of the six sums above. */
int ps_marginal_backward(const float *x, const float *t, int t_cl, int64_t B, int64_t C, int64_t N, float eps,
                         float *P, const float *g_mce, const float *g_ece, const float *g_sums, int nthreads)
{
    const int64_t nblk = (N + BLK - 1) / BLK, total = B * nblk;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && total > 1)
    {
        float *G = malloc(sizeof(float) * C * BLK);
        double *r = malloc(sizeof(double) * C);
        float *T = t_cl ? malloc(sizeof(float) * C * BLK) : NULL;
        if (!G || !r || (t_cl && !T)) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < total; j++) {
                const int64_t b = j / nblk, i0 = (j % nblk) * BLK, n = min64(BLK, N - i0);
                const float *tb = t + b * C * N + i0;
                int64_t ts = N;
                if (T) { pack_channels_last(t + b * C * N + i0 * C, C, n, T); tb = T; ts = BLK; }
                float *Pb = P + b * C * N + i0;
                const float *gs = g_sums ? g_sums + b * 6 * C : NULL;
                float q[BLK], mk[BLK], iq[BLK], gq[BLK], S[BLK];
                int nv[BLK];
                uint8_t low[BLK];
#pragma omp simd
                for (int64_t v = 0; v < n; v++) { q[v] = 0.f; nv[v] = 0; gq[v] = 0.f; S[v] = 0.f; }
                for (int64_t c = 0; c < C; c++) {
                    const float *tc = tb + c * ts, *pc = Pb + c * N;
                    const float hc = gs ? gs[0 * C + c] + gs[1 * C + c] : 0.f;
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) {
                        int w = tc[v] != 0.f;
                        q[v] += w ? pc[v] : 0.f;
                        nv[v] += !w;
                        gq[v] += w ? hc : 0.f;
                    }
                }
                const float *gm = g_mce ? g_mce + b * N + i0 : NULL, *ge = g_ece ? g_ece + b * N + i0 : NULL;
                float gzero[BLK];
                const float *gmv = gm;
                if (!gm) { memset(gzero, 0, sizeof gzero); gmv = gzero; }
#pragma omp simd
                for (int64_t v = 0; v < n; v++) {
                    mk[v] = nv[v] > 0 ? 1.f : 0.f;
                    int on = (nv[v] > 0) & (nv[v] < C);
                    low[v] = on & (q[v] < TINY);
                    iq[v] = (on & !low[v]) ? gmv[v] / q[v] : 0.f;
                    gq[v] *= mk[v];
                }
                /* G_c = p_c h_c: mce -w p g / q; ece v g p / (p + eps); mdice M (v gSP + w g_q);
                   edice gE1 v + gE2 M */
                for (int64_t c = 0; c < C; c++) {
                    const float *tc = tb + c * ts, *pc = Pb + c * N;
                    float *Gc = G + c * BLK;
                    const float gsp = gs ? gs[1 * C + c] : 0.f, ge1 = gs ? gs[3 * C + c] : 0.f, ge2 = gs ? gs[4 * C + c] : 0.f;
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) {
                        int w = tc[v] != 0.f;
                        float h = w ? -iq[v] + mk[v] * gq[v] : mk[v] * gsp + ge1;
                        h += ge2 * mk[v];
                        Gc[v] = pc[v] * h;
                    }
                    if (ge) {
#pragma omp simd
                        for (int64_t v = 0; v < n; v++) Gc[v] += tc[v] == 0.f ? ge[v] * pc[v] / (pc[v] + eps) : 0.f;
                    }
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) S[v] += Gc[v];
                }
                for (int64_t v = 0; v < n; v++)
                    if (gm && low[v]) { /* exact: the mce part of G is -g r (candidate softmax) */
                        marginal_exact_voxel(x + b * C * N + i0 + v, tb + v, ts, C, N, r);
                        for (int64_t c = 0; c < C; c++) { float d = (float)(-gm[v] * r[c]); G[c * BLK + v] += d; S[v] += d; }
                    }
                for (int64_t c = 0; c < C; c++) {
                    float *pc = Pb + c * N;
                    const float *Gc = G + c * BLK;
#pragma omp simd
                    for (int64_t v = 0; v < n; v++) pc[v] = Gc[v] - pc[v] * S[v];
                }
            }
        }
        free(G);
        free(r);
        free(T);
    }
    return failed ? -1 : 0;
}

/* unknown[b, c] = 1 where 0 < t[b, c, i] < 1 for some voxel i (the sample's unlabelled classes,
   DCL's exclusive bases); scans each row in chunks and stops at the first chunk with a hit */
void ps_unknown_classes(const float *t, int64_t B, int64_t C, int64_t N, uint8_t *unknown)
{
    const int64_t chunk = 4096;
    for (int64_t r = 0; r < B * C; r++) {
        const float *row = t + r * N;
        int hit = 0;
        for (int64_t i0 = 0; i0 < N && !hit; i0 += chunk) {
            const int64_t n = min64(chunk, N - i0);
#pragma omp simd reduction(| : hit)
            for (int64_t v = 0; v < n; v++) hit |= (row[i0 + v] > 0.f) & (row[i0 + v] < 1.f);
        }
        unknown[r] = (uint8_t)hit;
    }
}

/* ps_unknown_classes for a channels-last (B, N, C) target: voxels outside, classes inside (the
   class loop vectorises), stopping once every class of the sample is found unknown */
void ps_unknown_classes_cl(const float *t, int64_t B, int64_t C, int64_t N, uint8_t *unknown)
{
    const int64_t chunk = 1024;
    for (int64_t b = 0; b < B; b++) {
        uint8_t *u = unknown + b * C;
        const float *tb = t + b * N * C;
        memset(u, 0, (size_t)C);
        for (int64_t i0 = 0; i0 < N; i0 += chunk) {
            const int64_t n = min64(chunk, N - i0);
            for (int64_t v = i0; v < i0 + n; v++) {
                const float *tv = tb + v * C;
#pragma omp simd
                for (int64_t c = 0; c < C; c++) u[c] |= (uint8_t)((tv[c] > 0.f) & (tv[c] < 1.f));
            }
            int all = 1;
            for (int64_t c = 0; c < C; c++) all &= u[c];
            if (all) break;
        }
    }
}
