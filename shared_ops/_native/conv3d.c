/*
 * 3x3x3 convolutions of channels-last float32 volumes on the CPU, for the RRN's inference path
 * (rrn_lung_registration.networks.rrn): the pieces of a Winograd convolution F(4x4x4, 3x3x3), a whole
 * Winograd convolution for few channels, and a direct strided convolution of one input channel.
 *
 * Winograd. The Python side (rrn._winograd_conv3d) owns the scheme: the weights are transformed once, a
 * volume is handled in slabs of tiles, and the products of the transformed tiles with the transformed
 * weights are batched matrix products. wino_input_f32 and wino_output_f32 do the two steps between those
 * products and the activations, one tile per task, the 6x6x6 (input) or 6x6x6 -> 4x4x4 (output) values of
 * a tile held in a small buffer while the three one-dimensional transforms run over it, eight channels at
 * a time (one vector register of floats; channels are contiguous in every operand). wino_conv_f32 does all
 * three steps tile by tile, for layers whose products are too narrow for a matrix-product library.
 *
 * Interpolation points (0, 1, -1, 2, -1/2, inf):
 *   input  B^T (6x6):  p = x1 - x3, q = x4 - x2
 *     v0 = x0 - x2 + q + 1.5 p        v3 = q - 0.5 p
 *     v1 = q - p - 1.5 (x2 + x3)      v4 = q + 2 p
 *     v2 = q + p - 1.5 (x3 - x2)      v5 = x5 + p - x3 - 1.5 q
 *   output A^T (4x6):  s = m1 + m2, e = m1 - m2
 *     y0 = m0 + s + m3 + m4           y2 = s + 4 m3 + 0.25 m4
 *     y1 = e + 2 m3 - 0.5 m4          y3 = e + 8 m3 - 0.125 m4 + m5
 *
 * Tiles. With dilation d a tile's taps and outputs are spaced by d. A call handles the tiles
 * (i, qh, rh, qw, rw), i < rows, qh < tiles_h, rh < d, qw < tiles_w, rw < d, numbered in that order
 * (row-major); tile t's first input element sits at offset i 4d s_d + (qh 4d + rh) s_h + (qw 4d + rw) s_w
 * from the input pointer, its taps at steps of d along each axis, and likewise its first output.
 *
 * Transformed arrays: (216, tiles, channels), element (a, t, c) at a plane + t step + c (step >= channels,
 * plane >= tiles step), where a = 36 a_d + 6 a_h + a_w indexes the transformed tile.
 *
 * Scratch: the caller passes num_threads times the floats per thread that each kernel names; thread i works
 * in part i.
 */

#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX__
#include <immintrin.h>
#endif

#define LANES 8

/* Version of the exported interface; the Python loader checks it. */
int conv3d_abi_version(void) { return 1; }

/* Whether this build runs its loops on several threads (compiled with OpenMP). */
int conv3d_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* LANES floats, one 256-bit register where the CPU has them (GCC/Clang vector extension; split into
 * narrower registers elsewhere). Loads and stores go through memcpy: operands need no alignment. */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t mask __attribute__((vector_size(LANES * sizeof(int32_t)))); /* comparisons of vec */

static inline vec load(const float *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* The first n (<= LANES) lanes of value, through LeakyReLU when `activate`, stored at q. */
static inline void store_output(float *q, vec value, float slope, int activate, int n)
{
    if (activate) { /* slope * value where value < 0 (a comparison gives -1 in those lanes) */
        const vec zero = {0};
        const mask negative = value < zero;
        value = (vec)(((mask)(slope * value) & negative) | ((mask)value & ~negative));
    }
    if (n == LANES) {
        store(q, value);
    } else {
        float lanes[LANES];
        store(lanes, value);
        for (int l = 0; l < n; ++l)
            q[l] = lanes[l];
    }
}

/* B^T along one axis: six rows of LANES values at steps `in` -> six rows at steps `out` (in place allowed:
 * every input is loaded before the first store). */
static inline void input_1d(const float *x, int64_t in, float *v, int64_t out)
{
    const vec x0 = load(x), x1 = load(x + in), x2 = load(x + 2 * in), x3 = load(x + 3 * in), x4 = load(x + 4 * in),
              x5 = load(x + 5 * in);
    const vec p = x1 - x3, q = x4 - x2;
    store(v, x0 - x2 + q + 1.5f * p);
    store(v + out, q - p - 1.5f * (x2 + x3));
    store(v + 2 * out, q + p - 1.5f * (x3 - x2));
    store(v + 3 * out, q - 0.5f * p);
    store(v + 4 * out, q + 2.0f * p);
    store(v + 5 * out, x5 + p - x3 - 1.5f * q);
}

/* A^T along one axis: six rows of LANES values at steps `in` -> four rows at steps `out` (in place allowed). */
static inline void output_1d(const float *m, int64_t in, float *y, int64_t out)
{
    const vec m0 = load(m), m1 = load(m + in), m2 = load(m + 2 * in), m3 = load(m + 3 * in), m4 = load(m + 4 * in),
              m5 = load(m + 5 * in);
    const vec s = m1 + m2, e = m1 - m2;
    store(y, m0 + s + m3 + m4);
    store(y + out, e + 2.0f * m3 - 0.5f * m4);
    store(y + 2 * out, s + 4.0f * m3 + 0.25f * m4);
    store(y + 3 * out, e + 8.0f * m3 - 0.125f * m4 + m5);
}

/* Offset of tile t's first element from the operand's origin (see "Tiles" above). */
static inline int64_t tile_offset(int64_t t, int64_t tiles_h, int64_t tiles_w, int64_t d, int64_t s_d,
                                  int64_t s_h, int64_t s_w)
{
    const int64_t rw = t % d;
    t /= d;
    const int64_t qw = t % tiles_w;
    t /= tiles_w;
    const int64_t rh = t % d;
    t /= d;
    const int64_t qh = t % tiles_h;
    const int64_t i = t / tiles_h;
    return i * 4 * d * s_d + (qh * 4 * d + rh) * s_h + (qw * 4 * d + rw) * s_w;
}

/* Channels of a tile's scratch row: `channels` rounded up to whole vectors. */
static inline int64_t scratch_width(int64_t channels) { return (channels + LANES - 1) / LANES * LANES; }

/* dst[0, n) = src[0, n). With `stream`, dst 32-byte aligned and n a multiple of 8 (AVX builds), the stores
 * bypass the caches: the transformed tiles are written once, far apart, and read back by the matrix
 * product only after the whole slab, so filling cache lines from memory before writing them (what plain
 * stores do) would double the traffic for nothing. */
static inline void copy_row(float *dst, const float *src, int64_t n, int stream)
{
#ifdef __AVX__
    if (stream) {
        for (int64_t i = 0; i < n; i += 8)
            _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
        return;
    }
#else
    (void)stream;
#endif
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static inline void stream_fence(void)
{
#ifdef __AVX__
    _mm_sfence();
#endif
}

/* Offsets, from a tile's first tap, of its 36 tap rows (a_d, a_h) along W. */
static void tap_rows(int64_t d, int64_t s_d, int64_t s_h, int64_t rows_at[36])
{
    for (int k = 0; k < 36; ++k)
        rows_at[k] = (k / 6) * d * s_d + (k % 6) * d * s_h;
}

/* Offsets, from a tile's first output, of its 64 outputs (j_d, j_h, j_w). */
static void tile_outputs(int64_t d, int64_t s_d, int64_t s_h, int64_t s_w, int64_t taps_at[64])
{
    for (int j = 0; j < 64; ++j)
        taps_at[j] = (j / 16) * d * s_d + (j / 4 % 4) * d * s_h + (j % 4) * d * s_w;
}

/* The input transform of one tile: rows a of `dst` (step `row`, at least `channels` rounded up to LANES
 * wide; the rounding is written with zeros) get (B^T x B)[a] of the tile whose first tap is `src`. */
static void input_tile(const float *src, const int64_t rows_at[36], int64_t step_w, int64_t channels, float *dst,
                       int64_t row)
{
    float buf[216 * LANES]; /* (a_d, a_h, a_w, lane) */
    for (int64_t c0 = 0; c0 < channels; c0 += LANES) {
        if (channels - c0 >= LANES) { /* along W, straight from the input's tap rows */
            for (int k = 0; k < 36; ++k)
                input_1d(src + rows_at[k] + c0, step_w, buf + 6 * k * LANES, LANES);
        } else { /* the last channels: gathered with zeros after them, then along W */
            const int n = (int)(channels - c0);
            memset(buf, 0, sizeof buf);
            for (int a = 0; a < 216; ++a)
                for (int l = 0; l < n; ++l)
                    buf[a * LANES + l] = src[rows_at[a / 6] + (a % 6) * step_w + c0 + l];
            for (int k = 0; k < 36; ++k)
                input_1d(buf + 6 * k * LANES, LANES, buf + 6 * k * LANES, LANES);
        }
        for (int k = 0; k < 36; ++k) /* along H: step 6 LANES, for each (a_d, a_w) */
            input_1d(buf + ((k / 6) * 36 + k % 6) * LANES, 6 * LANES, buf + ((k / 6) * 36 + k % 6) * LANES, 6 * LANES);
        for (int k = 0; k < 36; ++k) /* along D: step 36 LANES, into rows 36 a_d + k */
            input_1d(buf + k * LANES, 36 * LANES, dst + k * row + c0, 36 * row);
    }
}

/* The output transform of one tile: the outputs at `dst` + taps_at[j] get (A^T m A)[j] + bias, then
 * LeakyReLU when `activate`, from the 216 rows of m at `src` (step `plane`). */
static void output_tile(const float *src, int64_t plane, int64_t channels, const float *bias, float slope,
                        int activate, float *dst, const int64_t taps_at[64])
{
    for (int64_t c0 = 0; c0 < channels; c0 += LANES) {
        const int n = channels - c0 < LANES ? (int)(channels - c0) : LANES;
        float buf[216 * LANES]; /* (a_d, a_h, j_w, lane), then (a_d, j_h, j_w, lane) in place */
        float out[64 * LANES];  /* (j_d, j_h, j_w, lane) */
        if (n == LANES) { /* along W, straight from the rows of m: (a_d, a_h, 0..5) -> 4 rows */
            for (int k = 0; k < 36; ++k)
                output_1d(src + 6 * k * plane + c0, plane, buf + 6 * k * LANES, LANES);
        } else { /* the last channels: gathered with zeros after them, then along W */
            memset(buf, 0, sizeof buf);
            for (int a = 0; a < 216; ++a)
                for (int l = 0; l < n; ++l)
                    buf[a * LANES + l] = src[a * plane + c0 + l];
            for (int k = 0; k < 36; ++k)
                output_1d(buf + 6 * k * LANES, LANES, buf + 6 * k * LANES, LANES);
        }
        for (int k = 0; k < 24; ++k) /* along H, for each (a_d, j_w): 6 rows at step 6 LANES -> 4 */
            output_1d(buf + ((k / 4) * 36 + k % 4) * LANES, 6 * LANES, buf + ((k / 4) * 36 + k % 4) * LANES, 6 * LANES);
        for (int k = 0; k < 16; ++k) /* along D, for each (j_h, j_w): 6 rows at step 36 LANES -> 4 */
            output_1d(buf + ((k / 4) * 6 + k % 4) * LANES, 36 * LANES, out + k * LANES, 16 * LANES);
        float add[LANES] = {0};
        if (bias != NULL)
            for (int l = 0; l < n; ++l)
                add[l] = bias[c0 + l];
        const vec shift = load(add);
        for (int j = 0; j < 64; ++j)
            store_output(dst + c0 + taps_at[j], load(out + j * LANES) + shift, slope, activate, n);
    }
}

/*
 * v[a, t, c] = (B^T x_t B)[a] for the tiles of one slab: x_t the 6x6x6 taps of tile t, channels [0, channels)
 * of the input (channel stride 1, spatial strides s_d, s_h, s_w in elements). Each thread transforms a
 * whole tile into its scratch (216 rows of `channels` rounded up to LANES) and then writes the 216 rows of v.
 */
void wino_input_f32(const float *x, int64_t s_d, int64_t s_h, int64_t s_w, float *v, int64_t plane, int64_t step, int64_t rows,
                   int64_t tiles_h, int64_t tiles_w, int64_t d, int64_t channels, float *scratch, int num_threads)
{
    const int64_t tiles = rows * tiles_h * d * tiles_w * d;
    const int64_t width = scratch_width(channels);
    const int stream = channels % 8 == 0 && plane % 8 == 0 && step % 8 == 0 && (uintptr_t)v % 32 == 0;
    int64_t rows_at[36];
    tap_rows(d, s_d, s_h, rows_at);
#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        float *own = scratch + (int64_t)omp_get_thread_num() * 216 * width; /* (a, channel) */
#else
        float *own = scratch;
#endif
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            input_tile(x + tile_offset(t, tiles_h, tiles_w, d, s_d, s_h, s_w), rows_at, d * s_w, channels, own, width);
            for (int a = 0; a < 216; ++a)
                copy_row(v + a * plane + t * step, own + a * width, channels, stream);
        }
        stream_fence();
    }
}

/*
 * y_t = A^T m_t A (+ bias, then LeakyReLU when `activate`) for the tiles of one slab: m (216, tiles,
 * channels) as above, y with channel stride 1 and spatial strides s_d, s_h, s_w; bias may be NULL.
 * Each thread transforms a tile straight from the 216 rows of m while the next tile's rows are prefetched.
 */
void wino_output_f32(const float *m, int64_t plane, int64_t step, const float *bias, float slope, int activate, float *y, int64_t s_d,
                    int64_t s_h, int64_t s_w, int64_t rows, int64_t tiles_h, int64_t tiles_w, int64_t d,
                    int64_t channels, int num_threads)
{
    const int64_t tiles = rows * tiles_h * d * tiles_w * d;
    int64_t taps_at[64];
    tile_outputs(d, s_d, s_h, s_w, taps_at);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; ++t) {
        const float *src = m + t * step;
        if (t + 1 < tiles) /* the next tile's rows, one cache line of 16 floats at a time */
            for (int a = 0; a < 216; ++a)
                for (int64_t c = 0; c < channels; c += 16)
                    __builtin_prefetch(src + a * plane + step + c);
        output_tile(src, plane, channels, bias, slope, activate, y + tile_offset(t, tiles_h, tiles_w, d, s_d, s_h, s_w),
                    taps_at);
    }
}

/*
 * The whole convolution, tile by tile, for few channels (where batched matrix products of a few columns
 * run far below the machine's speed): y = leaky_relu(conv(x, w) + bias) over the tiles of a slab, x and y
 * as in the two transforms above, u the transformed weights (216, in_channels, out_width) with out_width
 * = out_channels rounded up to 2 LANES (the extra columns zero). Each thread keeps a tile's transformed
 * input and products in its scratch (216 rows of in_channels rounded up to LANES, then 216 rows of
 * out_width); the weights stay in cache across tiles.
 */
void wino_conv_f32(const float *x, int64_t sx_d, int64_t sx_h, int64_t sx_w, int64_t in_channels, const float *u,
                  const float *bias, float slope, int activate, float *y, int64_t sy_d, int64_t sy_h, int64_t sy_w,
                  int64_t out_channels, int64_t rows, int64_t tiles_h, int64_t tiles_w, int64_t d, float *scratch,
                  int num_threads)
{
    const int64_t tiles = rows * tiles_h * d * tiles_w * d;
    const int64_t in_width = scratch_width(in_channels), out_width = (out_channels + 2 * LANES - 1) / (2 * LANES) * 2 * LANES;
    int64_t rows_at[36], taps_at[64];
    tap_rows(d, sx_d, sx_h, rows_at);
    tile_outputs(d, sy_d, sy_h, sy_w, taps_at);
#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        float *v = scratch + (int64_t)omp_get_thread_num() * 216 * (in_width + out_width); /* (a, in), (a, out) */
#else
        float *v = scratch;
#endif
        float *m = v + 216 * in_width;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; ++t) {
            input_tile(x + tile_offset(t, tiles_h, tiles_w, d, sx_d, sx_h, sx_w), rows_at, d * sx_w, in_channels, v,
                       in_width);
            for (int a = 0; a < 216; a += 4) { /* m[a] = v[a] @ u[a], four a and 16 columns at a time */
                for (int64_t o = 0; o < out_width; o += 2 * LANES) {
                    vec acc[4][2] = {{{0}}};
                    for (int64_t c = 0; c < in_channels; ++c)
                        for (int i = 0; i < 4; ++i) {
                            const float *uc = u + ((a + i) * in_channels + c) * out_width + o;
                            const float vc = v[(a + i) * in_width + c];
                            acc[i][0] += vc * load(uc);
                            acc[i][1] += vc * load(uc + LANES);
                        }
                    for (int i = 0; i < 4; ++i) {
                        store(m + (a + i) * out_width + o, acc[i][0]);
                        store(m + (a + i) * out_width + o + LANES, acc[i][1]);
                    }
                }
            }
            output_tile(m, out_width, out_channels, bias, slope, activate,
                        y + tile_offset(t, tiles_h, tiles_w, d, sy_d, sy_h, sy_w), taps_at);
        }
    }
}

/*
 * Direct 3x3x3 convolution of ONE input channel with stride s (the first layer of a feature pyramid,
 * where a matrix-product formulation has a single row to work with): for every output voxel (z, y, x),
 *   y[z, y, x, o] = leaky_relu(bias[o] + sum_k w[k, o] x[s z + k_d, s y + k_h, s x + k_w])
 * with k = 9 k_d + 3 k_h + k_w; x is read from a buffer whose border is the padding (so indices start at
 * the padded corner), y is (depth, height, width, out_channels) with channel stride 1, w is
 * (27, out_width) with out_width = out_channels rounded up to LANES (the extra columns zero). Four
 * neighbouring voxels along x go together, for independent sums.
 */
void conv_single_f32(const float *x, int64_t sx_d, int64_t sx_h, int64_t sx_w, const float *w, const float *bias,
                     float slope, int activate, float *y, int64_t sy_d, int64_t sy_h, int64_t sy_w, int64_t out_channels,
                     int64_t depth, int64_t height, int64_t width, int64_t stride, int num_threads)
{
    const int64_t out_width = (out_channels + LANES - 1) / LANES * LANES;
    int64_t taps[27];
    for (int k = 0; k < 27; ++k)
        taps[k] = (k / 9) * sx_d + (k / 3 % 3) * sx_h + (k % 3) * sx_w;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (int64_t z = 0; z < depth; ++z)
        for (int64_t r = 0; r < height; ++r) {
            const float *row = x + stride * z * sx_d + stride * r * sx_h;
            float *out_row = y + z * sy_d + r * sy_h;
            for (int64_t o = 0; o < out_width; o += LANES) {
                const int n = out_channels - o < LANES ? (int)(out_channels - o) : LANES;
                float first[LANES] = {0};
                if (bias != NULL)
                    for (int l = 0; l < n; ++l)
                        first[l] = bias[o + l];
                const vec start = load(first);
                for (int64_t c = 0; c < width; c += 4) {
                    const int count = width - c < 4 ? (int)(width - c) : 4;
                    vec acc[4] = {start, start, start, start};
                    const float *base = row + stride * c * sx_w;
                    for (int k = 0; k < 27; ++k) {
                        const vec wk = load(w + k * out_width + o);
                        for (int i = 0; i < 4; ++i)
                            if (i < count)
                                acc[i] += base[taps[k] + stride * i * sx_w] * wk;
                    }
                    for (int i = 0; i < count; ++i)
                        store_output(out_row + (c + i) * sy_w + o, acc[i], slope, activate, n);
                }
            }
        }
}
