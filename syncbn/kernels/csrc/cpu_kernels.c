/*
 * SyncBN's CPU passes over the batch, as plain C (no torch headers: it compiles in about
 * a second with any C compiler, and loads through ctypes; see ../native.py).
 *
 * A batch is seen as (N, C, S): S is the product of the spatial sizes. Two dense layouts:
 *   SPATIAL_INNER  element (n, c, s) at n*C*S + c*S + s   (contiguous NCHW, NCL, NCDHW)
 *   CHANNELS_INNER element (n, c, s) at (n*S + s)*C + c   (channels_last, and (N, C))
 *
 * Every kernel is one pass over memory:
 *   moments  sum(u - cu) and sum((u - cu) * (v - cv)) per channel, in double
 *            (statistics: u = v = x; gradient sums: u = dy, v = x, cu = 0);
 *   combine  out = u * a + (v - cv) * b + k per channel, in the input's precision
 *            (u may be NULL: the normalization, and the statistics' share of dx).
 *
 * Threads: the caller says how many (SyncBN passes torch.get_num_threads()); the range is
 * cut into that many contiguous chunks, each on its own pthread (the caller runs the first).
 * No OpenMP runtime: torch already carries one, and two runtimes in a process spin
 * against each other. Results do not depend on the thread count for SPATIAL_INNER (each
 * channel is summed by one thread, in order); for CHANNELS_INNER partial sums are added
 * in chunk order, so they are deterministic for a given thread count.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SPATIAL_INNER 0
#define CHANNELS_INNER 1
#define MAX_PARTS 64
#define SUM_ONLY 0
#define SQUARES 1
#define PRODUCTS 2

typedef void (*chunk_fn)(const void *args, int64_t begin, int64_t end, int part);

typedef struct {
    chunk_fn fn;
    const void *args;
    int64_t begin, end;
    int part;
} chunk;

static void *run_chunk(void *arg) {
    const chunk *c = (const chunk *)arg;
    c->fn(c->args, c->begin, c->end, c->part);
    return NULL;
}

static int clamp_parts(int parts, int64_t total) {
    if (parts > MAX_PARTS) parts = MAX_PARTS;
    if ((int64_t)parts > total) parts = (int)total;
    return parts < 1 ? 1 : parts;
}

/* Runs fn over [0, total) cut into `parts` chunks; a thread that cannot start runs inline. */
static void parallel_for(chunk_fn fn, const void *args, int64_t total, int parts) {
    chunk chunks[MAX_PARTS];
    pthread_t threads[MAX_PARTS];
    int started[MAX_PARTS];
    for (int p = 0; p < parts; p++) {
        chunks[p].fn = fn;
        chunks[p].args = args;
        chunks[p].begin = total * p / parts;
        chunks[p].end = total * (p + 1) / parts;
        chunks[p].part = p;
    }
    for (int p = 1; p < parts; p++) started[p] = pthread_create(&threads[p], NULL, run_chunk, &chunks[p]) == 0;
    run_chunk(&chunks[0]);
    for (int p = 1; p < parts; p++) {
        if (started[p]) pthread_join(threads[p], NULL);
        else run_chunk(&chunks[p]);
    }
}

/* Vectors through GCC/Clang vector extensions: SSE2 by default, AVX with -march=native.
 * Four independent accumulators per sum: one running sum is bound by the latency of an
 * add; four keep the adders busy. */
typedef double vd __attribute__((vector_size(32)));
typedef float vf __attribute__((vector_size(32)));

/* Sums of x = u - cu, y = v - cv and x * y over one plane of S contiguous values, added
 * to s[0], s[1], s[2] (float64). float32 planes are summed in float32 lanes over blocks
 * of 512 values (16 per lane), each block then added in float64: error near float32
 * rounding, as in torch's own kernels, at twice the width of float64 lanes. */
#define BLOCK 512

static void plane_sums_f32(const float *restrict u, const float *restrict v, int64_t S, float cu_, float cv_,
                           int kind, double *restrict sums) {
    const vf cu = {cu_, cu_, cu_, cu_, cu_, cu_, cu_, cu_}, cv = {cv_, cv_, cv_, cv_, cv_, cv_, cv_, cv_};
    int64_t s = 0;
    while (S - s >= 32) {
        const int64_t stop = s + (S - s >= BLOCK ? BLOCK : (S - s) / 32 * 32);
        vf x0 = {0}, x1 = {0}, y0 = {0}, y1 = {0}, p0 = {0}, p1 = {0};
        for (; s < stop; s += 16) {
            vf a, b;
            memcpy(&a, u + s, sizeof a), memcpy(&b, u + s + 8, sizeof b);
            a -= cu, b -= cu;
            x0 += a, x1 += b;
            if (kind == SQUARES) {
                p0 += a * a, p1 += b * b;
            } else if (kind == PRODUCTS) {
                vf c, d;
                memcpy(&c, v + s, sizeof c), memcpy(&d, v + s + 8, sizeof d);
                c -= cv, d -= cv;
                y0 += c, y1 += d;
                p0 += a * c, p1 += b * d;
            }
        }
        const vf x = x0 + x1, y = y0 + y1, p = p0 + p1;
        for (int j = 0; j < 8; j++) sums[0] += x[j], sums[1] += y[j], sums[2] += p[j];
    }
    for (; s < S; s++) {
        const double x = (double)u[s] - cu_, y = (double)v[s] - cv_;
        sums[0] += x, sums[1] += y, sums[2] += x * y;
    }
}

static void plane_sums_f64(const double *restrict u, const double *restrict v, int64_t S, double cu_,
                           double cv_, int kind, double *restrict sums) {
    const vd cu = {cu_, cu_, cu_, cu_}, cv = {cv_, cv_, cv_, cv_};
    vd x0 = {0}, x1 = {0}, y0 = {0}, y1 = {0}, p0 = {0}, p1 = {0};
    int64_t s = 0;
    for (; S - s >= 8; s += 8) {
        vd a, b;
        memcpy(&a, u + s, sizeof a), memcpy(&b, u + s + 4, sizeof b);
        a -= cu, b -= cu;
        x0 += a, x1 += b;
        if (kind == SQUARES) {
            p0 += a * a, p1 += b * b;
        } else if (kind == PRODUCTS) {
            vd c, d;
            memcpy(&c, v + s, sizeof c), memcpy(&d, v + s + 4, sizeof d);
            c -= cv, d -= cv;
            y0 += c, y1 += d;
            p0 += a * c, p1 += b * d;
        }
    }
    const vd x = x0 + x1, y = y0 + y1, p = p0 + p1;
    for (int j = 0; j < 4; j++) sums[0] += x[j], sums[1] += y[j], sums[2] += p[j];
    for (; s < S; s++) {
        const double a = u[s] - cu_, c = v[s] - cv_;
        sums[0] += a, sums[1] += c, sums[2] += a * c;
    }
}

/* The sums around the rounded centers (cu_r, cv_r) give those around the exact ones:
 * with r = c - c_r, sum(u - cu) = sx - n ru and
 * sum((u - cu)(v - cv)) = sxy - rv sx - ru sy + n ru rv. SQUARES has y = x. */
static void centered_sums(const double *sums, int kind, double n, double ru, double rv, double *su, double *suv) {
    const double sx = sums[0], sy = kind == SQUARES ? sums[0] : sums[1], sxy = sums[2];
    *su = sx - n * ru;
    *suv = kind == SUM_ONLY ? 0.0 : sxy - rv * sx - ru * sy + n * ru * rv;
}

#define DEFINE_KERNELS(T, SUFFIX)                                                                   \
    typedef struct {                                                                                \
        const T *u, *v;                                                                             \
        int64_t N, C, S;                                                                            \
        const double *cu, *cv; /* centers, never NULL */                                            \
        double *sum_u, *sum_uv; /* SPATIAL_INNER: the outputs; CHANNELS_INNER: parts x C */        \
        int kind;               /* SUM_ONLY, SQUARES (u == v, cu == cv) or PRODUCTS */             \
    } moments_args_##SUFFIX;                                                                        \
                                                                                                    \
    /* SPATIAL_INNER: chunks of channels; each channel is summed whole, by one thread. */          \
    static void moments_spatial_##SUFFIX(const void *p, int64_t begin, int64_t end, int part) {    \
        const moments_args_##SUFFIX *a = p;                                                         \
        (void)part;                                                                                 \
        for (int64_t c = begin; c < end; c++) {                                                     \
            const T cu = (T)a->cu[c], cv = (T)a->cv[c];                                             \
            double sums[3] = {0.0, 0.0, 0.0};                                                       \
            for (int64_t n = 0; n < a->N; n++) {                                                    \
                const int64_t offset = (n * a->C + c) * a->S;                                       \
                plane_sums_##SUFFIX(a->u + offset, a->v + offset, a->S, cu, cv, a->kind, sums);     \
            }                                                                                       \
            centered_sums(sums, a->kind, (double)(a->N * a->S), a->cu[c] - (double)cu,              \
                          a->cv[c] - (double)cv, &a->sum_u[c], &a->sum_uv[c]);                      \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    /* CHANNELS_INNER: chunks of rows (n, s); each chunk adds into its own row of partials       \
     * (channels are independent sums, so the loop over them vectorizes without a chain). */     \
    static void moments_channels_##SUFFIX(const void *p, int64_t begin, int64_t end, int part) {   \
        const moments_args_##SUFFIX *a = p;                                                         \
        const int64_t C = a->C;                                                                     \
        const int kind = a->kind;                                                                   \
        const double *restrict cu = a->cu, *restrict cv = a->cv;                                    \
        double *restrict su = a->sum_u + part * C, *restrict suv = a->sum_uv + part * C;            \
        for (int64_t r = begin; r < end; r++) {                                                     \
            const T *restrict u = a->u + r * C, *restrict v = a->v + r * C;                         \
            if (kind == SUM_ONLY) {                                                                 \
                for (int64_t c = 0; c < C; c++) su[c] += (double)u[c] - cu[c];                      \
            } else if (kind == SQUARES) {                                                           \
                for (int64_t c = 0; c < C; c++) {                                                   \
                    const double du = (double)u[c] - cu[c];                                         \
                    su[c] += du;                                                                    \
                    suv[c] += du * du;                                                              \
                }                                                                                   \
            } else {                                                                                \
                for (int64_t c = 0; c < C; c++) {                                                   \
                    const double du = (double)u[c] - cu[c];                                         \
                    su[c] += du;                                                                    \
                    suv[c] += du * ((double)v[c] - cv[c]);                                          \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    int syncbn_moments_##SUFFIX(const T *u, const T *v, int layout, int64_t N, int64_t C, int64_t S, \
                                const double *cu, const double *cv, double *sum_u, double *sum_uv, \
                                int want_products, int threads) {                                   \
        const int kind = !want_products ? SUM_ONLY : (u == v && cu == cv) ? SQUARES : PRODUCTS;    \
        moments_args_##SUFFIX a = {u, v, N, C, S, cu, cv, sum_u, sum_uv, kind};                     \
        if (layout == SPATIAL_INNER) {                                                              \
            parallel_for(moments_spatial_##SUFFIX, &a, C, clamp_parts(threads, C));                 \
            return 0;                                                                               \
        }                                                                                           \
        const int64_t rows = N * S;                                                                 \
        const int parts = clamp_parts(threads, rows);                                               \
        double *partial = calloc((size_t)(2 * parts * C), sizeof(double));                          \
        if (!partial) return 1;                                                                     \
        a.sum_u = partial;                                                                          \
        a.sum_uv = partial + parts * C;                                                             \
        parallel_for(moments_channels_##SUFFIX, &a, rows, parts);                                   \
        for (int64_t c = 0; c < C; c++) {                                                           \
            double su = 0.0, suv = 0.0;                                                             \
            for (int q = 0; q < parts; q++) {                                                       \
                su += a.sum_u[q * C + c];                                                           \
                suv += a.sum_uv[q * C + c];                                                         \
            }                                                                                       \
            sum_u[c] = su;                                                                          \
            sum_uv[c] = suv;                                                                        \
        }                                                                                           \
        free(partial);                                                                              \
        return 0;                                                                                   \
    }                                                                                               \
                                                                                                    \
    typedef struct {                                                                                \
        const T *u, *v;                                                                             \
        T *out;                                                                                     \
        int64_t N, C, S;                                                                            \
        const T *a, *cv, *b, *k;                                                                    \
    } combine_args_##SUFFIX;                                                                        \
                                                                                                    \
    /* SPATIAL_INNER: chunks of (n, c) planes of S contiguous values, constant per plane. */       \
    static void combine_spatial_##SUFFIX(const void *p, int64_t begin, int64_t end, int part) {    \
        const combine_args_##SUFFIX *g = p;                                                         \
        (void)part;                                                                                 \
        for (int64_t plane = begin; plane < end; plane++) {                                         \
            const int64_t c = plane % g->C, offset = plane * g->S;                                  \
            const T *restrict v = g->v + offset;                                                    \
            T *restrict out = g->out + offset;                                                      \
            const T cv = g->cv[c], b = g->b[c], k = g->k[c];                                        \
            if (g->u) {                                                                             \
                const T *restrict u = g->u + offset;                                                \
                const T a = g->a[c];                                                                \
                for (int64_t s = 0; s < g->S; s++) out[s] = u[s] * a + ((v[s] - cv) * b + k);       \
            } else {                                                                                \
                for (int64_t s = 0; s < g->S; s++) out[s] = (v[s] - cv) * b + k;                    \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    /* CHANNELS_INNER: chunks of rows (n, s) of C contiguous values. */                            \
    static void combine_channels_##SUFFIX(const void *p, int64_t begin, int64_t end, int part) {   \
        const combine_args_##SUFFIX *g = p;                                                         \
        const int64_t C = g->C;                                                                     \
        const T *restrict a = g->a, *restrict cv = g->cv, *restrict b = g->b, *restrict k = g->k;   \
        (void)part;                                                                                 \
        for (int64_t r = begin; r < end; r++) {                                                     \
            const T *restrict v = g->v + r * C;                                                     \
            T *restrict out = g->out + r * C;                                                       \
            if (g->u) {                                                                             \
                const T *restrict u = g->u + r * C;                                                 \
                for (int64_t c = 0; c < C; c++) out[c] = u[c] * a[c] + ((v[c] - cv[c]) * b[c] + k[c]); \
            } else {                                                                                \
                for (int64_t c = 0; c < C; c++) out[c] = (v[c] - cv[c]) * b[c] + k[c];              \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    int syncbn_combine_##SUFFIX(const T *u, const T *v, T *out, int layout, int64_t N, int64_t C,   \
                                int64_t S, const T *a, const T *cv, const T *b, const T *k,         \
                                int threads) {                                                      \
        combine_args_##SUFFIX g = {u, v, out, N, C, S, a, cv, b, k};                                \
        if (layout == SPATIAL_INNER)                                                                \
            parallel_for(combine_spatial_##SUFFIX, &g, N * C, clamp_parts(threads, N * C));         \
        else                                                                                        \
            parallel_for(combine_channels_##SUFFIX, &g, N * S, clamp_parts(threads, N * S));        \
        return 0;                                                                                   \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
