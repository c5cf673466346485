/* The random-feature kernel of kscale's analysis (issue 26): the float32 arguments and the float64 run sums
 * of features._per_sample_rf_fast, in plain loops over raw pointers, called through ctypes
 * (kscale/analysis/rfkernel.py builds this file with the system C compiler and loads it).
 *
 * Rows must stay equal to the numpy path's to 1e-9, so every value is the one numpy computes:
 *   - a base argument is (float)(z * scale): one float64 product rounded once to float32, as numpy's
 *     np.multiply(z, scale, out=float32, casting="same_kind"); for l2 rows z is (raw / norm) in float64,
 *     as np.divide(raw, norm);
 *   - a derived argument is a float32 product src * factor (factor an exact power of two), as numpy's
 *     float32 multiply;
 *   - the run sums add each float32 value, converted exactly to float64, into a float64 accumulator in row
 *     order; one accumulator per frequency d, never reassociated across rows.
 * Built with -O3 -ffp-contract=off and never -ffast-math: each operation is one IEEE-754 operation rounded
 * to nearest, so the bits do not depend on the instructions (SSE2, AVX2, AVX-512) the compiler picks; the
 * loops vectorise across d only. cos and sin are numpy's float32 bits (the reference's): numpy's own loops, or
 * kscale_rf_sincos below (numpy's algorithm, one range reduction for both, checked bit for bit at load).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#define KS_W 32 /* frequencies whose accumulators one pass over a run's rows keeps in registers */
#define KS_CHUNK 512 /* frequencies of one chunk of a row's arguments (L1-resident) */

/* Column sums of rows [t0, t1) of v (row stride `stride`, `width` columns), added to o[0..width). */
static void sum_rows(const float *restrict v, int64_t t0, int64_t t1, int64_t stride, int64_t width,
                     double *restrict o)
{
    int64_t d0 = 0;
    for (; d0 + KS_W <= width; d0 += KS_W) {
        double acc[KS_W];
        for (int j = 0; j < KS_W; j++)
            acc[j] = 0.0;
        for (int64_t t = t0; t < t1; t++) {
            const float *restrict row = v + t * stride + d0;
            for (int j = 0; j < KS_W; j++)
                acc[j] += (double)row[j];
        }
        for (int j = 0; j < KS_W; j++)
            o[d0 + j] += acc[j];
    }
    for (int64_t d = d0; d < width; d++) {
        double acc = 0.0;
        for (int64_t t = t0; t < t1; t++)
            acc += (double)v[t * stride + d];
        o[d] += acc;
    }
}

/* Run sums of one tile of one group of configs.
 * cosv, sinv: (G, T, D) float32 values; bounds: R + 1 row bounds of the tile's runs (one sample each);
 * dest: R pointers to the (C, 2, D) float64 sums of each run's sample; config: G configs of the stack.
 * dest[r][config[g]][0][:] += sum over rows of run r of cosv[g], [1] likewise of sinv[g]; a NULL cosv or
 * sinv skips that part (the caller may sum cos before numpy overwrites the buffer with sin). */
void kscale_rf_sums(const float *cosv, const float *sinv, int64_t G, int64_t T, int64_t D,
                    const int64_t *bounds, int64_t R, double *const *dest, const int64_t *config)
{
    for (int64_t r = 0; r < R; r++) {
        for (int64_t g = 0; g < G; g++) {
            double *o = dest[r] + config[g] * 2 * D;
            if (cosv)
                sum_rows(cosv + g * T * D, bounds[r], bounds[r + 1], D, D, o);
            if (sinv)
                sum_rows(sinv + g * T * D, bounds[r], bounds[r + 1], D, D, o + D);
        }
    }
}

/* The float32 arguments of one row and w frequencies of one group: zr the row's float64 projections
 * (w values; divided by *n first unless n is NULL: the l2 projection, as numpy's raw / norm), scale the B base
 * configs' scales (row stride lds); base b goes to out + base_slot[b] * ldo, derived k to out + dst[k] * ldo
 * (= out + src[k] * ldo times factor[k]). q: w doubles of scratch. */
static void row_args(const double *restrict zr, const double *n, int64_t w, const double *restrict scale, int64_t lds,
                     const int64_t *base_slot, int64_t B, const int64_t *src, const int64_t *dst,
                     const float *factor, int64_t ND, float *out, int64_t ldo, double *restrict q)
{
    if (n) {
        const double nv = *n;
        for (int64_t j = 0; j < w; j++)
            q[j] = zr[j] / nv;
        zr = q;
    }
    for (int64_t b = 0; b < B; b++) {
        const double *restrict s = scale + b * lds;
        float *restrict a = out + base_slot[b] * ldo;
        for (int64_t j = 0; j < w; j++)
            a[j] = (float)(zr[j] * s[j]);
    }
    for (int64_t k = 0; k < ND; k++) {
        const float *restrict sa = out + src[k] * ldo;
        float *restrict da = out + dst[k] * ldo;
        const float f = factor[k];
        for (int64_t j = 0; j < w; j++)
            da[j] = sa[j] * f;
    }
}

/* The float32 arguments of one tile of one group: args (G, T, D).
 * z: (T, D) float64 projections (row stride D); norm: T float64 row norms (l2) or NULL;
 * scale: (B, D) float64 scales of the B base configs, written to stack rows base_slot[b];
 * the ND derived configs: args[dst[k]] = args[src[k]] * factor[k] (src a base slot).
 * Per row, chunks of KS_CHUNK frequencies: a chunk's bases are still in L1 when its multiples read them. */
void kscale_rf_args(const double *restrict z, const double *restrict norm, int64_t T, int64_t D,
                    const double *restrict scale, const int64_t *base_slot, int64_t B,
                    const int64_t *src, const int64_t *dst, const float *factor, int64_t ND,
                    float *restrict args)
{
    double q[KS_CHUNK];
    for (int64_t t = 0; t < T; t++)
        for (int64_t d0 = 0; d0 < D; d0 += KS_CHUNK)
            row_args(z + t * D + d0, norm ? norm + t : NULL, D - d0 < KS_CHUNK ? D - d0 : KS_CHUNK, scale + d0, D,
                     base_slot, B, src, dst, factor, ND, args + t * D + d0, T * D, q);
}

/* ---- The fused pass: numpy's own float32 cos/sin loops called from here ----
 * numpy's ufunc inner loop (PyUFuncGenericFunction; rfkernel.py takes np.cos's and np.sin's 'f->f' entries
 * from the ufunc's public loop table and checks their bits against np.cos/np.sin at load) applied to chunks
 * of KS_F frequencies of one row's stacked arguments, so that arguments, cos, sin and the float64
 * accumulators of a run stay in a core's L1/L2 instead of travelling through memory in numpy-sized tiles. */
typedef void (*ks_loop)(char **args, const intptr_t *dimensions, const intptr_t *steps, void *data);

#define KS_F 64 /* frequencies of one chunk of the fused pass */

static void ks_trig(void *fn, void *data, const float *in, float *out, int64_t n)
{
    char *args[2] = {(char *)in, (char *)out};
    intptr_t dims[1] = {(intptr_t)n};
    intptr_t steps[2] = {sizeof(float), sizeof(float)};
    ((ks_loop)fn)(args, dims, steps, data);
}

/* numpy's loop fn on n values, in chunks of `chunk` (the self-check: the bits do not depend on the cut). */
void kscale_rf_trig(void *fn, void *data, const float *in, float *out, int64_t n, int64_t chunk)
{
    for (int64_t i = 0; i < n; i += chunk)
        ks_trig(fn, data, in + i, out + i, n - i < chunk ? n - i : chunk);
}

/* ---- A fused sincos: numpy 2.4's float32 cos and sin bits, the range reduction done once for both ----
 * numpy's FLOAT_cos / FLOAT_sin (numpy/_core/src/umath/loops_trigonometric.dispatch.cpp, simd_sincos_f32,
 * unchanged from 2.4.x to main; the NPY_SIMD_FMA3 branch, which numpy's dispatch takes on every x86 CPU with
 * FMA3) compute per value, hn::MulAdd being one fused multiply-add:
 *   q = rint(x * 2/pi) as fma(x, 0x1.45f306p-1f, 0x1.8p23f) - 0x1.8p23f: the source writes hn::Mul then
 *       hn::Add, but numpy's compiler contracted them (2.4.6 wheel, X86_V3 and X86_V4: vfmadd213ps, vaddps);
 *       a mul and an add give one-ulp differences where q's rounding picks the other polynomial;
 *   r = x + q * -pi/2 in three fmas (Cody-Waite: -0x1.921fb0p+0, -0x1.5110b4p-22, -0x1.846988p-48); r2 = r * r;
 *   cos poly: four fmas from 0x1.98e616p-16 down to 1; sin poly: three fmas, fma(p, r2, +0), fma(p, r, r);
 *   k = (int)q, plus 1 for cos; the sin poly where k is even, else the cos poly; 0 - value where k & 2.
 * Values with !(|x| <= 71476.0625f) for cos, !(|x| <= 117435.992f) for sin (inf and NaN included) are not
 * computed here: numpy's own loop (fn, data) runs on each of them (libm's cosf/sinf there, NPY_NANF for NaN),
 * so every value is numpy's. rfkernel.py checks the bits against np.cos/np.sin at load and refuses this
 * function (numpy's loops then, KS_TRIG_NUMPY) on any difference, e.g. a numpy whose dispatch has no FMA. */
#define KS_TRIG_NUMPY 0 /* kscale_rf_block's trig: numpy's cos and sin loops, one call each per chunk */
#define KS_TRIG_SINCOS 1 /* kscale_rf_sincos: both in one pass */
#define KS_COS_MAX 71476.0625f
#define KS_SIN_MAX 117435.992f

void kscale_rf_sincos(const float *restrict x, float *restrict c, float *restrict s, int64_t n,
                      void *cos_fn, void *cos_data, void *sin_fn, void *sin_data)
{
    int slow = 0;
    for (int64_t j = 0; j < n; j++) {
        const float xi = x[j];
        const int in = fabsf(xi) <= KS_SIN_MAX;
        slow |= !(fabsf(xi) <= KS_COS_MAX);
        const float xv = in ? xi : 0.0f;
        const float q = fmaf(xv, 0x1.45f306p-1f, 0x1.8p23f) - 0x1.8p23f;
        float r = fmaf(q, -0x1.921fb0p+00f, xv);
        r = fmaf(q, -0x1.5110b4p-22f, r);
        r = fmaf(q, -0x1.846988p-48f, r);
        const float r2 = r * r;
        float pc = fmaf(0x1.98e616p-16f, r2, -0x1.6c06dcp-10f);
        pc = fmaf(pc, r2, 0x1.55553cp-05f);
        pc = fmaf(pc, r2, -0x1.000000p-01f);
        pc = fmaf(pc, r2, 0x1.000000p+00f);
        float ps = fmaf(0x1.7d3bbcp-19f, r2, -0x1.a06bbap-13f);
        ps = fmaf(ps, r2, 0x1.11119ap-07f);
        ps = fmaf(ps, r2, -0x1.555556p-03f);
        ps = fmaf(ps, r2, 0.0f);
        ps = fmaf(ps, r, r);
        const int32_t k = (int32_t)q, kc = k + 1;
        float sv = (k & 1) ? pc : ps, cv = (kc & 1) ? pc : ps;
        sv = (k & 2) ? 0.0f - sv : sv;
        cv = (kc & 2) ? 0.0f - cv : cv;
        c[j] = cv;
        s[j] = sv;
    }
    if (!slow)
        return;
    for (int64_t j = 0; j < n; j++) {
        const float ax = fabsf(x[j]);
        if (!(ax <= KS_COS_MAX))
            ks_trig(cos_fn, cos_data, x + j, c + j, 1);
        if (!(ax <= KS_SIN_MAX))
            ks_trig(sin_fn, sin_data, x + j, s + j, 1);
    }
}

/* 1 when this build has a hardware fused multiply-add (fmaf one instruction, the loop above vectorised),
 * 0 when fmaf is a libm call (a portable build): exact either way, but rfkernel.py uses the sincos only
 * where it is fast. */
int kscale_rf_sincos_native(void)
{
#ifdef FP_FAST_FMAF
    return 1;
#else
    return 0;
#endif
}

/* One block of T rows and one group of G configs, fused, chunk by chunk of KS_F frequencies: the chunk's
 * arguments of every row (as kscale_rf_args; laid out [row][config][frequency]), numpy's cos and sin of
 * them (one loop call each), then each run's column sums (rows [bounds[r], bounds[r+1]), one sample, in
 * row order, KS_W accumulators in registers) added to dest[r][config[g]][part][chunk]. A chunk's arrays
 * (3 x T x G x KS_F float32) stay in a core's L2. Returns 0, or -1 when memory ran out (nothing added). */
int kscale_rf_block(const double *restrict z, const double *restrict norm, int64_t D,
                    const double *restrict scale, const int64_t *base_slot, int64_t B,
                    const int64_t *src, const int64_t *dst, const float *factor, int64_t ND, int64_t G,
                    int64_t T, const int64_t *bounds, int64_t R, double *const *dest, const int64_t *config,
                    void *cos_fn, void *cos_data, void *sin_fn, void *sin_data, int trig)
{
    float *buf = (float *)malloc(sizeof(float) * 3 * T * G * KS_F);
    if (!buf)
        return -1;
    double q[KS_F];
    for (int64_t d0 = 0; d0 < D; d0 += KS_F) {
        const int64_t w = D - d0 < KS_F ? D - d0 : KS_F, row = G * w;
        float *args = buf, *cv = buf + T * row, *sv = buf + 2 * T * row;
        for (int64_t t = 0; t < T; t++)
            row_args(z + t * D + d0, norm ? norm + t : NULL, w, scale + d0, D, base_slot, B, src, dst, factor, ND,
                     args + t * row, w, q);
        if (trig == KS_TRIG_SINCOS) {
            kscale_rf_sincos(args, cv, sv, T * row, cos_fn, cos_data, sin_fn, sin_data);
        } else {
            ks_trig(cos_fn, cos_data, args, cv, T * row);
            ks_trig(sin_fn, sin_data, args, sv, T * row);
        }
        for (int64_t r = 0; r < R; r++) {
            for (int64_t g = 0; g < G; g++) {
                double *o = dest[r] + config[g] * 2 * D + d0;
                sum_rows(cv + g * w, bounds[r], bounds[r + 1], row, w, o);
                sum_rows(sv + g * w, bounds[r], bounds[r + 1], row, w, o + D);
            }
        }
    }
    free(buf);
    return 0;
}
