/*
 * Fused CPU kernels of the 3-D local cost correlation (see shared_ops/correlation.py for the maths).
 *
 * Layout (all arrays contiguous, with PyTorch's default strides):
 *   fixed, moving, grad_fixed, grad_moving: (B, C, D, H, W)
 *   out, grad_out:                          (B, K, D, H, W), K = (2r + 1)^3, dz slowest, dx fastest
 *
 *   out[b, k, z, y, x] = (1 / C) * sum_c fixed[b, c, z, y, x] * moving[b, c, z + dz, y + dy, x + dx]
 *
 * and zero where (z + dz, y + dy, x + dx) leaves the volume.
 *
 * Scheme. Work is split over rows (b, z, y) of W voxels, and each OpenMP thread owns whole rows of the
 * array it writes (the output, or one input gradient), so no two threads write the same memory. Inside
 * a row everything is vectorised along x, which is contiguous in every array: a vector holds VL
 * neighbouring voxels, the channel sum is a chain of multiply-adds on such vectors (no horizontal
 * reduction), and the 2r + 1 shifts along x of one (dz, dy) pair are accumulated together in registers,
 * so each vector of `fixed` is loaded once for all of them. The rows that a (dz, dy) pair reads are
 * first copied, for all channels, into a small per-thread buffer with r zeros on either side and zeros
 * up to a whole number of vectors: shifted and tail loads then never leave the buffer and read zeros
 * exactly where the displacement leaves the volume, with no per-voxel bounds checks.
 *
 * Memory. Besides the array written, each thread holds a few rows' worth of buffers (all channels or
 * all displacements of one row); nothing volume-sized is allocated.
 *
 * The file is compiled for float and for double by including itself twice with CORR_T set (the kernel
 * half below); every exported symbol ends in _f32 or _f64. The vectors are GCC/Clang vector extensions,
 * which the compiler maps onto the widest SIMD unit that -march allows (or splits into narrower ones).
 *
 * Every exported kernel returns 0 on success and 1 when a per-thread buffer could not be allocated (the
 * array written is then incomplete).
 */

#ifndef CORR_T

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Bytes per vector: one register of the widest SIMD unit the target is compiled for (AVX-512, AVX, or
 * 16 bytes for SSE, NEON and the like). */
#if defined(__AVX512F__)
#define CORR_VBYTES 64
#elif defined(__AVX__)
#define CORR_VBYTES 32
#else
#define CORR_VBYTES 16
#endif

/* At most this many shifts along x are accumulated in registers at once (8 accumulators, one vector of
 * `fixed` and one of `moving` fit the 16 registers of AVX2). */
#define CORR_MAX_TAPS 8

/* Version of the exported interface; the Python loader checks it. */
int corr_abi_version(void) { return 1; }

/* Whether this build runs its loops on several threads (compiled with OpenMP). */
int corr_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int64_t corr_round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

static inline int64_t corr_min(int64_t a, int64_t b) { return a < b ? a : b; }

#define CORR_T float
#define CORR_NAME(name) name##_f32
#include __FILE__
#undef CORR_T
#undef CORR_NAME

#define CORR_T double
#define CORR_NAME(name) name##_f64
#include __FILE__
#undef CORR_T
#undef CORR_NAME

#else /* CORR_T defined: the kernels, compiled once per scalar type */

typedef CORR_T CORR_NAME(vec) __attribute__((vector_size(CORR_VBYTES)));
#define VEC CORR_NAME(vec)
#define VL ((int64_t)(CORR_VBYTES / sizeof(CORR_T)))

static inline VEC CORR_NAME(load)(const CORR_T *p)
{
    VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void CORR_NAME(store)(CORR_T *p, VEC v) { memcpy(p, &v, sizeof v); }

/* Store the first n (1..VL) lanes of v at p. */
static inline void CORR_NAME(store_n)(CORR_T *p, VEC v, int64_t n)
{
    if (n == VL)
        CORR_NAME(store)(p, v);
    else
        memcpy(p, &v, sizeof(CORR_T) * (size_t)n);
}

/* Per-thread scratch: `count` zeroed values, or NULL (and *failed set) when out of memory. */
static CORR_T *CORR_NAME(scratch)(int64_t count, int *failed)
{
    CORR_T *buffer = calloc((size_t)(count > 0 ? count : 1), sizeof(CORR_T));
    if (buffer == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
    return buffer;
}

/*
 * Copy `rows` rows of `width` values, `src_stride` apart, into `dst` at `offset` within rows of
 * `dst_stride` values; the rest of every destination row is left as it is (zeros from calloc).
 */
static inline void CORR_NAME(copy_rows)(CORR_T *restrict dst, const CORR_T *restrict src, int64_t rows, int64_t width,
                                        int64_t src_stride, int64_t dst_stride, int64_t offset)
{
    for (int64_t i = 0; i < rows; ++i) memcpy(dst + i * dst_stride + offset, src + i * src_stride, sizeof(CORR_T) * width);
}

/* ---------------------------------------------------------------------------------------------- */
/* Forward.                                                                                         */

/*
 * Shifts j0 .. j0 + taps - 1 (taps <= CORR_MAX_TAPS; a literal at each call site, so the loops over j
 * unroll and the accumulators live in registers) of one (dz, dy) pair for a whole row:
 *   out_k0[(j0 + j) * volume + x] = scale * sum_c f[c * f_stride + x] * m[c * m_stride + x + j0 + j]
 * where f is the padded fixed row block and m the padded moving row block (moving[x + dx] sits at
 * m[x + dx + r] = m[x + j]).
 */
static inline __attribute__((always_inline)) void CORR_NAME(forward_taps)(
    const CORR_T *restrict f, const CORR_T *restrict m, CORR_T *restrict out_k0, int64_t channels, int64_t width,
    int64_t f_stride, int64_t m_stride, int64_t volume, int64_t j0, const int64_t taps, CORR_T scale)
{
    for (int64_t xb = 0; xb < width; xb += VL) {
        VEC acc[CORR_MAX_TAPS];
        for (int64_t j = 0; j < taps; ++j) acc[j] = (VEC){0};
        for (int64_t c = 0; c < channels; ++c) {
            const VEC fv = CORR_NAME(load)(f + c * f_stride + xb);
            const CORR_T *mc = m + c * m_stride + xb + j0;
            for (int64_t j = 0; j < taps; ++j) acc[j] += fv * CORR_NAME(load)(mc + j);
        }
        const int64_t n = corr_min(VL, width - xb);
        for (int64_t j = 0; j < taps; ++j) CORR_NAME(store_n)(out_k0 + (j0 + j) * volume + xb, acc[j] * scale, n);
    }
}

/* All 2r + 1 shifts along x of one (dz, dy) pair, in register-sized groups. */
static void CORR_NAME(forward_pair)(const CORR_T *f, const CORR_T *m, CORR_T *out_k0, int64_t channels, int64_t width,
                                    int64_t f_stride, int64_t m_stride, int64_t volume, int64_t span, CORR_T scale)
{
    for (int64_t j0 = 0; j0 < span; j0 += CORR_MAX_TAPS) {
#define CORR_CASE(T)                                                                                              \
    case T:                                                                                                       \
        CORR_NAME(forward_taps)(f, m, out_k0, channels, width, f_stride, m_stride, volume, j0, T, scale);         \
        break;
        switch (corr_min(CORR_MAX_TAPS, span - j0)) {
            CORR_CASE(1) CORR_CASE(2) CORR_CASE(3) CORR_CASE(4) CORR_CASE(5) CORR_CASE(6) CORR_CASE(7) CORR_CASE(8)
        }
#undef CORR_CASE
    }
}

/*
 * out = correlation(fixed, moving). Rows of `out` whose (dz, dy) leaves the volume are written as zeros,
 * so `out` may come uninitialised.
 */
int CORR_NAME(corr_forward)(const CORR_T *fixed, const CORR_T *moving, CORR_T *out, int64_t batch, int64_t channels,
                            int64_t depth, int64_t height, int64_t width, int64_t radius, int num_threads)
{
    const int64_t span = 2 * radius + 1, taps = span * span * span;
    const int64_t plane = height * width, volume = depth * plane, rows = batch * depth * height;
    const int64_t f_stride = corr_round_up(width, VL), m_stride = f_stride + 2 * radius;
    const CORR_T scale = (CORR_T)1 / (CORR_T)channels;
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        CORR_T *f = CORR_NAME(scratch)(channels * f_stride, &failed);
        CORR_T *m = CORR_NAME(scratch)(channels * m_stride, &failed);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            if (f == NULL || m == NULL) continue;
            const int64_t b = row / (depth * height), z = row / height % depth, y = row % height;
            const CORR_T *fixed_b = fixed + b * channels * volume, *moving_b = moving + b * channels * volume;
            CORR_T *out_row = out + b * taps * volume + z * plane + y * width;
            CORR_NAME(copy_rows)(f, fixed_b + z * plane + y * width, channels, width, volume, f_stride, 0);
            for (int64_t iz = 0; iz < span; ++iz) {
                for (int64_t iy = 0; iy < span; ++iy) {
                    const int64_t zz = z + iz - radius, yy = y + iy - radius, k0 = (iz * span + iy) * span;
                    if (zz < 0 || zz >= depth || yy < 0 || yy >= height) {
                        for (int64_t j = 0; j < span; ++j) memset(out_row + (k0 + j) * volume, 0, sizeof(CORR_T) * width);
                        continue;
                    }
                    CORR_NAME(copy_rows)(m, moving_b + zz * plane + yy * width, channels, width, volume, m_stride, radius);
                    CORR_NAME(forward_pair)(f, m, out_row + k0 * volume, channels, width, f_stride, m_stride, volume, span, scale);
                }
            }
        }
        free(f);
        free(m);
    }
    return failed;
}

/* ---------------------------------------------------------------------------------------------- */
/* Backward.                                                                                        */

/*
 * Shared inner step of both input gradients, for shifts j0 .. j0 + taps - 1 of one (dz, dy) pair:
 *   acc[c * acc_stride + x] += sum_j g[(j0 + j) * g_stride + x + g_shift(j)] * v[c * v_stride + x + v_shift(j)]
 * with g_shift(j) = g_base + g_step * (j0 + j) and v_shift(j) = v_base + v_step * (j0 + j). The vectors of
 * g (one per shift) stay in registers across the channel loop.
 */
static inline __attribute__((always_inline)) void CORR_NAME(backward_taps)(
    const CORR_T *restrict g, const CORR_T *restrict v, CORR_T *restrict acc, int64_t channels, int64_t width,
    int64_t g_stride, int64_t v_stride, int64_t acc_stride, int64_t g_base, int64_t g_step, int64_t v_base,
    int64_t v_step, int64_t j0, const int64_t taps)
{
    for (int64_t xb = 0; xb < width; xb += VL) {
        VEC gv[CORR_MAX_TAPS];
        for (int64_t j = 0; j < taps; ++j)
            gv[j] = CORR_NAME(load)(g + (j0 + j) * g_stride + xb + g_base + g_step * (j0 + j));
        for (int64_t c = 0; c < channels; ++c) {
            const CORR_T *vc = v + c * v_stride + xb + v_base + v_step * j0;
            VEC sum = CORR_NAME(load)(acc + c * acc_stride + xb);
            for (int64_t j = 0; j < taps; ++j) sum += gv[j] * CORR_NAME(load)(vc + v_step * j);
            CORR_NAME(store)(acc + c * acc_stride + xb, sum);
        }
    }
}

static void CORR_NAME(backward_pair)(const CORR_T *g, const CORR_T *v, CORR_T *acc, int64_t channels, int64_t width,
                                     int64_t g_stride, int64_t v_stride, int64_t acc_stride, int64_t g_base,
                                     int64_t g_step, int64_t v_base, int64_t v_step, int64_t span)
{
    for (int64_t j0 = 0; j0 < span; j0 += CORR_MAX_TAPS) {
#define CORR_CASE(T)                                                                                              \
    case T:                                                                                                       \
        CORR_NAME(backward_taps)(g, v, acc, channels, width, g_stride, v_stride, acc_stride, g_base, g_step,      \
                                 v_base, v_step, j0, T);                                                          \
        break;
        switch (corr_min(CORR_MAX_TAPS, span - j0)) {
            CORR_CASE(1) CORR_CASE(2) CORR_CASE(3) CORR_CASE(4) CORR_CASE(5) CORR_CASE(6) CORR_CASE(7) CORR_CASE(8)
        }
#undef CORR_CASE
    }
}

/* Write scale * acc (channels rows of acc_stride) to the rows (c, z, y) of a (C, D, H, W) gradient. */
static inline void CORR_NAME(write_rows)(CORR_T *restrict dst, const CORR_T *restrict acc, int64_t channels,
                                         int64_t width, int64_t acc_stride, int64_t volume, CORR_T scale)
{
    for (int64_t c = 0; c < channels; ++c) {
        CORR_T *restrict o = dst + c * volume;
        const CORR_T *restrict a = acc + c * acc_stride;
        for (int64_t x = 0; x < width; ++x) o[x] = a[x] * scale;
    }
}

/*
 * grad_fixed[c, x] = (1 / C) * sum_k grad_out[k, x] * moving[c, x + d_k].
 *
 * Per row (b, z, y): the K rows of grad_out are copied once (zero tail), then for each in-volume (dz, dy)
 * the moving rows are copied as in the forward pass and  acc[c, x] += g[k0 + j, x] * m[c, x + j].
 */
static int CORR_NAME(corr_grad_fixed)(const CORR_T *grad_out, const CORR_T *moving, CORR_T *grad_fixed, int64_t batch,
                                      int64_t channels, int64_t depth, int64_t height, int64_t width, int64_t radius,
                                      int num_threads)
{
    const int64_t span = 2 * radius + 1, taps = span * span * span;
    const int64_t plane = height * width, volume = depth * plane, rows = batch * depth * height;
    const int64_t stride = corr_round_up(width, VL), m_stride = stride + 2 * radius;
    const CORR_T scale = (CORR_T)1 / (CORR_T)channels;
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        CORR_T *g = CORR_NAME(scratch)(taps * stride, &failed);
        CORR_T *m = CORR_NAME(scratch)(channels * m_stride, &failed);
        CORR_T *acc = CORR_NAME(scratch)(channels * stride, &failed);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            if (g == NULL || m == NULL || acc == NULL) continue;
            const int64_t b = row / (depth * height), z = row / height % depth, y = row % height;
            const int64_t offset = z * plane + y * width;
            const CORR_T *moving_b = moving + b * channels * volume;
            CORR_NAME(copy_rows)(g, grad_out + b * taps * volume + offset, taps, width, volume, stride, 0);
            memset(acc, 0, sizeof(CORR_T) * channels * stride);
            for (int64_t iz = 0; iz < span; ++iz) {
                const int64_t zz = z + iz - radius;
                if (zz < 0 || zz >= depth) continue;
                for (int64_t iy = 0; iy < span; ++iy) {
                    const int64_t yy = y + iy - radius, k0 = (iz * span + iy) * span;
                    if (yy < 0 || yy >= height) continue;
                    CORR_NAME(copy_rows)(m, moving_b + zz * plane + yy * width, channels, width, volume, m_stride, radius);
                    CORR_NAME(backward_pair)(g + k0 * stride, m, acc, channels, width, stride, m_stride, stride, 0, 0, 0, 1, span);
                }
            }
            CORR_NAME(write_rows)(grad_fixed + b * channels * volume + offset, acc, channels, width, stride, volume, scale);
        }
        free(g);
        free(m);
        free(acc);
    }
    return failed;
}

/*
 * grad_moving[c, x] = (1 / C) * sum_k grad_out[k, x - d_k] * fixed[c, x - d_k].
 *
 * Per row (b, z, y): for each (dz, dy) whose source row (z - dz, y - dy) is in the volume, that row of
 * fixed (all channels) and its 2r + 1 rows of grad_out are copied with r zeros either side (value at p
 * stored at p + r); the term of shift j = dx + r at x reads both at x - dx, i.e. at x + 2r - j.
 */
static int CORR_NAME(corr_grad_moving)(const CORR_T *grad_out, const CORR_T *fixed, CORR_T *grad_moving,
                                       int64_t batch, int64_t channels, int64_t depth, int64_t height, int64_t width,
                                       int64_t radius, int num_threads)
{
    const int64_t span = 2 * radius + 1, taps = span * span * span;
    const int64_t plane = height * width, volume = depth * plane, rows = batch * depth * height;
    const int64_t stride = corr_round_up(width, VL), p_stride = stride + 2 * radius;
    const CORR_T scale = (CORR_T)1 / (CORR_T)channels;
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        CORR_T *g = CORR_NAME(scratch)(span * p_stride, &failed);
        CORR_T *f = CORR_NAME(scratch)(channels * p_stride, &failed);
        CORR_T *acc = CORR_NAME(scratch)(channels * stride, &failed);
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) {
            if (g == NULL || f == NULL || acc == NULL) continue;
            const int64_t b = row / (depth * height), z = row / height % depth, y = row % height;
            const CORR_T *fixed_b = fixed + b * channels * volume, *grad_b = grad_out + b * taps * volume;
            memset(acc, 0, sizeof(CORR_T) * channels * stride);
            for (int64_t iz = 0; iz < span; ++iz) {
                const int64_t zs = z - (iz - radius);
                if (zs < 0 || zs >= depth) continue;
                for (int64_t iy = 0; iy < span; ++iy) {
                    const int64_t ys = y - (iy - radius), k0 = (iz * span + iy) * span;
                    if (ys < 0 || ys >= height) continue;
                    const int64_t source = zs * plane + ys * width;
                    CORR_NAME(copy_rows)(f, fixed_b + source, channels, width, volume, p_stride, radius);
                    CORR_NAME(copy_rows)(g, grad_b + k0 * volume + source, span, width, volume, p_stride, radius);
                    CORR_NAME(backward_pair)(g, f, acc, channels, width, p_stride, p_stride, stride, 2 * radius, -1,
                                             2 * radius, -1, span);
                }
            }
            CORR_NAME(write_rows)(grad_moving + b * channels * volume + z * plane + y * width, acc, channels, width,
                                  stride, volume, scale);
        }
        free(g);
        free(f);
        free(acc);
    }
    return failed;
}

/* Gradients of both inputs; either output pointer may be NULL to skip that gradient. */
int CORR_NAME(corr_backward)(const CORR_T *grad_out, const CORR_T *fixed, const CORR_T *moving, CORR_T *grad_fixed,
                             CORR_T *grad_moving, int64_t batch, int64_t channels, int64_t depth, int64_t height,
                             int64_t width, int64_t radius, int num_threads)
{
    int failed = 0;
    if (grad_fixed != NULL)
        failed |= CORR_NAME(corr_grad_fixed)(grad_out, moving, grad_fixed, batch, channels, depth, height, width,
                                             radius, num_threads);
    if (grad_moving != NULL)
        failed |= CORR_NAME(corr_grad_moving)(grad_out, fixed, grad_moving, batch, channels, depth, height, width,
                                              radius, num_threads);
    return failed;
}

#undef VEC
#undef VL

#endif /* CORR_T */
