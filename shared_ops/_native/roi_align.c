/*
 * RoIAlign on the CPU, forward pass and its adjoint (the gradient with respect to the feature map), with
 * the semantics of torchvision.ops.roi_align (see shared_ops/roi_align.py for the conventions).
 *
 * Layout (all arrays contiguous, with PyTorch's default strides):
 *   input, grad_input: (N, C, H, W)
 *   rois:              (K, 5) doubles, rows (batch index, x1, y1, x2, y2) in input-image coordinates
 *   out, grad_out:     (K, C, PH, PW)
 *
 * Maths. Each bin of a box averages grid_h x grid_w bilinear samples, and bilinear sampling is
 * separable, so for box k and channel c
 *
 *   out[k, c] = A_y(k) @ input[b_k, c] @ A_x(k)^T
 *
 * where row ph of A_y (PH, H) holds the summed bilinear weights of the grid_h sample rows of bin ph,
 * divided by grid_h (and likewise A_x (PW, W) along x). Each row of A_y and A_x is non-zero only on a
 * short band of consecutive pixels (about bin size + 2), which is all that is stored and visited.
 *
 * Scheme. Work is split into tasks (image b, block of channels), handed out dynamically to the OpenMP
 * threads. A task takes the boxes of b in input order, in groups whose weights fit a per-thread buffer,
 * and runs every box of the group over ROI_LANES channels at a time, so the planes it reads stay in cache
 * across the boxes, and the channels, which share every weight and loop bound, give independent sums.
 *
 * Forward, per box and channel: every feature row y that some bin reads is reduced along x once,
 * R[y, pw] = sum_x input[y, x] A_x[pw, x], and each output value is then sum_y A_y[ph, y] R[y, pw].
 * Each task writes out[k, c] for its boxes k and channels c only.
 *
 * Adjoint: grad_input[b, c] = sum over the boxes k of image b of A_y(k)^T @ grad_out[k, c] @ A_x(k),
 * in the reverse order (spread grad_out along y into rows, then each row along x). Each task owns whole
 * planes of grad_input (it zeroes them first), so no two threads write the same memory, and the boxes
 * are added in input order, so the result does not depend on the thread count.
 *
 * Sums are taken in double for both dtypes.
 *
 * Geometry. Box corners, box sizes and the automatic sample count (ceil(size / bins)) are computed in the
 * scalar type of the input, as torchvision does; sample positions and weights in double. A sample outside
 * [-1, size] along an axis contributes zero; one inside is clamped to [0, size - 1] first.
 *
 * The file is compiled for float and for double by including itself twice with ROI_T set (the kernel
 * half below); every exported symbol ends in _f32 or _f64. Every exported kernel returns 0 on success,
 * 1 when a per-thread buffer could not be allocated and 2 when a batch index is out of range (the array
 * written is then incomplete).
 */

#ifndef ROI_T

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Version of the exported interface; the Python loader checks it. */
int roi_abi_version(void) { return 1; }

/* Whether this build runs its loops on several threads (compiled with OpenMP). */
int roi_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Tasks per thread, so that images of uneven cost still share out evenly. */
#define ROI_TASKS_PER_THREAD 4

/* Channels pooled together: they share every weight and give independent sums. */
#define ROI_LANES 4

/* Bytes of box weights a thread keeps at once: the boxes of an image are handled in groups that fit. */
#define ROI_GROUP_BYTES (256 << 10)

/*
 * Separable interpolation weights of one axis of one box: bin p reads the pixels first[p] .. last[p]
 * (an empty band has last < first) with weights weight[p * length + i]; the rest of the row of `weight`
 * is unused and left as it is.
 */
typedef struct {
    int64_t bins, length;
    int64_t *first, *last;
    double *weight;
} roi_axis;

/* Weights of one box, and the feature rows its bins read (each once, in no particular order). */
typedef struct {
    roi_axis y, x;
    int64_t *rows;
    int64_t num_rows;
} roi_box;

/* Per-thread buffers of one kernel call. */
typedef struct {
    int64_t group;    /* boxes whose weights are held at once */
    roi_box *boxes;   /* (group,) views into the buffers below */
    int64_t *bands;   /* (group, 2 * (PH + PW)): first and last of every bin */
    double *weights;  /* (group, PH * H + PW * W) */
    int64_t *rows;    /* (group, H) */
    double *reduced;  /* (H, PW, ROI_LANES): rows reduced along x (forward) or grad_out spread along y (adjoint) */
    double *acc;      /* (PW, ROI_LANES): one output row being summed */
    int64_t *stamp;   /* (H,): id of the box whose row list last took row y */
    int64_t stamp_id;
} roi_scratch;

static void roi_scratch_free(roi_scratch *s)
{
    free(s->boxes);
    free(s->bands);
    free(s->weights);
    free(s->rows);
    free(s->reduced);
    free(s->acc);
    free(s->stamp);
}

/*
 * Allocate the buffers for up to `max_boxes` boxes of one image with bins (PH, PW) on a (H, W) map;
 * returns 0, or 1 when out of memory.
 */
static int roi_scratch_init(roi_scratch *s, int64_t max_boxes, int64_t pooled_h, int64_t pooled_w, int64_t height,
                            int64_t width)
{
    memset(s, 0, sizeof *s);
    const int64_t per_box_weights = pooled_h * height + pooled_w * width, per_box_bands = 2 * (pooled_h + pooled_w);
    const int64_t per_box_bytes = (int64_t)sizeof(double) * per_box_weights + (int64_t)sizeof(int64_t) * (per_box_bands + height);
    int64_t group = ROI_GROUP_BYTES / per_box_bytes;
    group = group < max_boxes ? group : max_boxes;
    s->group = group > 1 ? group : 1;
    s->boxes = malloc(sizeof(roi_box) * (size_t)s->group);
    s->bands = malloc(sizeof(int64_t) * (size_t)(s->group * per_box_bands));
    s->weights = malloc(sizeof(double) * (size_t)(s->group * per_box_weights));
    s->rows = malloc(sizeof(int64_t) * (size_t)(s->group * height));
    s->reduced = malloc(sizeof(double) * (size_t)(height * pooled_w * ROI_LANES));
    s->acc = malloc(sizeof(double) * (size_t)(pooled_w * ROI_LANES));
    s->stamp = calloc((size_t)height, sizeof(int64_t));
    if (!s->boxes || !s->bands || !s->weights || !s->rows || !s->reduced || !s->acc || !s->stamp) {
        roi_scratch_free(s);
        return 1;
    }
    for (int64_t j = 0; j < s->group; ++j) {
        roi_box *box = &s->boxes[j];
        int64_t *bands = s->bands + j * per_box_bands;
        double *weights = s->weights + j * per_box_weights;
        box->y = (roi_axis){pooled_h, height, bands, bands + pooled_h, weights};
        box->x = (roi_axis){pooled_w, width, bands + 2 * pooled_h, bands + 2 * pooled_h + pooled_w,
                            weights + pooled_h * height};
        box->rows = s->rows + j * height;
        box->num_rows = 0;
    }
    return 0;
}

/*
 * Sample i (of `grid`) of bin p along an axis of `length` pixels starting at `start`: whether it counts
 * (inside [-1, length]) and, if so, its two neighbours lo <= hi and the weight `frac` of hi.
 */
static inline int roi_sample(double start, double bin_size, int64_t p, int64_t i, int64_t grid, int64_t length,
                             int64_t *lo, int64_t *hi, double *frac)
{
    double pos = start + p * bin_size + (i + 0.5) * bin_size / grid;
    if (pos < -1.0 || pos > (double)length) return 0;
    if (pos < 0.0) pos = 0.0;
    int64_t low = (int64_t)pos;
    if (low >= length - 1) {
        *lo = *hi = length - 1;
        *frac = 0.0;
    } else {
        *lo = low;
        *hi = low + 1;
        *frac = pos - (double)low;
    }
    return 1;
}

/* Fill `axis` for a box side from `start` with bins of `bin_size` and `grid` samples each (grid <= 0: empty). */
static void roi_axis_fill(roi_axis *axis, double start, double bin_size, int64_t grid)
{
    const int64_t length = axis->length;
    for (int64_t p = 0; p < axis->bins; ++p) {
        int64_t first = length, last = -1, lo, hi;
        double frac;
        for (int64_t i = 0; i < grid; ++i) {
            if (!roi_sample(start, bin_size, p, i, grid, length, &lo, &hi, &frac)) continue;
            first = lo < first ? lo : first;
            last = hi > last ? hi : last;
        }
        axis->first[p] = first;
        axis->last[p] = last;
        if (last < first) continue;
        double *w = axis->weight + p * length;
        memset(w + first, 0, sizeof(double) * (size_t)(last - first + 1));
        for (int64_t i = 0; i < grid; ++i) {
            if (!roi_sample(start, bin_size, p, i, grid, length, &lo, &hi, &frac)) continue;
            w[lo] += (1.0 - frac) / grid;
            w[hi] += frac / grid;
        }
    }
}

/* List the rows that the bins of `box` read, each once, into box->rows. */
static void roi_box_rows(roi_scratch *s, roi_box *box)
{
    const int64_t id = ++s->stamp_id;
    box->num_rows = 0;
    for (int64_t p = 0; p < box->y.bins; ++p)
        for (int64_t y = box->y.first[p]; y <= box->y.last[p]; ++y)
            if (s->stamp[y] != id) {
                s->stamp[y] = id;
                box->rows[box->num_rows++] = y;
            }
}

/* Samples per bin along an axis: sampling_ratio, or ceil(bin size) for sampling_ratio <= 0. */
static inline int64_t roi_grid(double rounded_bin_size, int64_t sampling_ratio)
{
    if (sampling_ratio > 0) return sampling_ratio;
    double grid = ceil(rounded_bin_size);
    if (!(grid > 0.0)) return 0;
    return grid < (double)INT32_MAX ? (int64_t)grid : INT32_MAX;
}

/* Static partition of `blocks` blocks over `channels`: [*c0, *c1) of block `block`. */
static inline void roi_channel_block(int64_t block, int64_t blocks, int64_t channels, int64_t *c0, int64_t *c1)
{
    *c0 = block * channels / blocks;
    *c1 = (block + 1) * channels / blocks;
}

/*
 * The boxes of each image in input order, order[start[b] .. start[b + 1]), both allocated here (free
 * them). Returns 0, 1 (out of memory) or 2 (a batch index outside [0, N)); *most is the largest count.
 */
static int roi_group_by_image(const double *rois, int64_t num_rois, int64_t batch, int64_t **start_out,
                              int64_t **order_out, int64_t *most)
{
    int64_t *start = calloc((size_t)(batch + 1), sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)(num_rois > 0 ? num_rois : 1));
    int64_t *next = malloc(sizeof(int64_t) * (size_t)(batch > 0 ? batch : 1));
    int status = (start && order && next) ? 0 : 1;
    for (int64_t k = 0; k < num_rois && status == 0; ++k) {
        const double b = rois[5 * k];
        if (!(b >= 0.0 && b < (double)batch)) status = 2;
        else ++start[(int64_t)b + 1];
    }
    if (status == 0) {
        *most = 0;
        for (int64_t b = 0; b < batch; ++b) {
            *most = start[b + 1] > *most ? start[b + 1] : *most;
            start[b + 1] += start[b];
        }
        memcpy(next, start, sizeof(int64_t) * (size_t)batch);
        for (int64_t k = 0; k < num_rois; ++k) order[next[(int64_t)rois[5 * k]]++] = k;
    }
    free(next);
    if (status != 0) {
        free(start);
        free(order);
        start = order = NULL;
    }
    *start_out = start;
    *order_out = order;
    return status;
}

#define ROI_T float
#define ROI_NAME(name) name##_f32
#include __FILE__
#undef ROI_T
#undef ROI_NAME

#define ROI_T double
#define ROI_NAME(name) name##_f64
#include __FILE__
#undef ROI_T
#undef ROI_NAME

#else /* ROI_T defined: the kernels, compiled once per scalar type */

/*
 * Weights of box `roi` into `box`, and the rows it reads. Corners and sizes are rounded to ROI_T, as is
 * the bin size from which the automatic sample count is taken.
 */
static void ROI_NAME(box_weights)(roi_scratch *s, roi_box *box, const double *roi, double spatial_scale,
                                  int64_t sampling_ratio, int aligned)
{
    const double offset = aligned ? 0.5 : 0.0;
    const ROI_T start_x = (ROI_T)(roi[1] * spatial_scale - offset);
    const ROI_T start_y = (ROI_T)(roi[2] * spatial_scale - offset);
    ROI_T size_x = (ROI_T)((ROI_T)(roi[3] * spatial_scale - offset) - start_x);
    ROI_T size_y = (ROI_T)((ROI_T)(roi[4] * spatial_scale - offset) - start_y);
    if (!aligned) {
        size_x = size_x > (ROI_T)1 ? size_x : (ROI_T)1;
        size_y = size_y > (ROI_T)1 ? size_y : (ROI_T)1;
    }
    int64_t grid_x = roi_grid((ROI_T)(size_x / (ROI_T)box->x.bins), sampling_ratio);
    int64_t grid_y = roi_grid((ROI_T)(size_y / (ROI_T)box->y.bins), sampling_ratio);
    if (grid_x <= 0 || grid_y <= 0) grid_x = grid_y = 0; /* no samples: every band is empty */
    roi_axis_fill(&box->x, start_x, (double)size_x / box->x.bins, grid_x);
    roi_axis_fill(&box->y, start_y, (double)size_y / box->y.bins, grid_y);
    roi_box_rows(s, box);
}

/*
 * outs[q] (PH, PW) = A_y @ planes[q] (H, W) @ A_x^T for `box` and `lanes` planes at once (a literal at
 * each call site, so the loops over q unroll): the planes share every weight and loop bound and give
 * `lanes` independent sums, which keeps the multiply-add units busy on short bands.
 */
static inline __attribute__((always_inline)) void ROI_NAME(pool_planes)(roi_scratch *s, const roi_box *box,
                                                                        const ROI_T *const *planes,
                                                                        ROI_T *const *outs, const int lanes)
{
    const roi_axis *ax = &box->x, *ay = &box->y;
    const int64_t width = ax->length, pooled_w = ax->bins, stride = pooled_w * ROI_LANES;
    double *restrict reduced = s->reduced, *restrict acc = s->acc;
    for (int64_t i = 0; i < box->num_rows; ++i) {
        const int64_t y = box->rows[i];
        const ROI_T *row[ROI_LANES];
        for (int q = 0; q < lanes; ++q) row[q] = planes[q] + y * width;
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
            const double *restrict w = ax->weight + pw * width;
            double sum[ROI_LANES] = {0.0};
            for (int64_t x = ax->first[pw]; x <= ax->last[pw]; ++x) {
                const double wx = w[x];
                for (int q = 0; q < lanes; ++q) sum[q] += wx * (double)row[q][x];
            }
            for (int q = 0; q < lanes; ++q) reduced[y * stride + pw * ROI_LANES + q] = sum[q];
        }
    }
    for (int64_t ph = 0; ph < ay->bins; ++ph) {
        const double *restrict wy = ay->weight + ph * ay->length;
        for (int64_t j = 0; j < stride; ++j) acc[j] = 0.0;
        for (int64_t y = ay->first[ph]; y <= ay->last[ph]; ++y) {
            const double *restrict r = reduced + y * stride;
            for (int64_t pw = 0; pw < pooled_w; ++pw)
                for (int q = 0; q < lanes; ++q) acc[pw * ROI_LANES + q] += wy[y] * r[pw * ROI_LANES + q];
        }
        for (int q = 0; q < lanes; ++q)
            for (int64_t pw = 0; pw < pooled_w; ++pw) outs[q][ph * pooled_w + pw] = (ROI_T)acc[pw * ROI_LANES + q];
    }
}

/* planes[q] (H, W) += A_y^T @ grads[q] (PH, PW) @ A_x for `box` and `lanes` planes at once. */
static inline __attribute__((always_inline)) void ROI_NAME(spread_planes)(roi_scratch *s, const roi_box *box,
                                                                          const ROI_T *const *grads,
                                                                          ROI_T *const *planes, const int lanes)
{
    const roi_axis *ax = &box->x, *ay = &box->y;
    const int64_t width = ax->length, pooled_w = ax->bins, stride = pooled_w * ROI_LANES;
    double *restrict spread = s->reduced, *restrict g = s->acc; /* g: one row of grad, (PW, ROI_LANES) */
    for (int64_t i = 0; i < box->num_rows; ++i)
        for (int64_t j = 0; j < stride; ++j) spread[box->rows[i] * stride + j] = 0.0;
    for (int64_t ph = 0; ph < ay->bins; ++ph) {
        const double *restrict wy = ay->weight + ph * ay->length;
        for (int64_t pw = 0; pw < pooled_w; ++pw)
            for (int q = 0; q < lanes; ++q) g[pw * ROI_LANES + q] = (double)grads[q][ph * pooled_w + pw];
        for (int64_t y = ay->first[ph]; y <= ay->last[ph]; ++y) {
            double *restrict r = spread + y * stride;
            for (int64_t pw = 0; pw < pooled_w; ++pw)
                for (int q = 0; q < lanes; ++q) r[pw * ROI_LANES + q] += wy[y] * g[pw * ROI_LANES + q];
        }
    }
    for (int64_t i = 0; i < box->num_rows; ++i) {
        const int64_t y = box->rows[i];
        ROI_T *row[ROI_LANES];
        for (int q = 0; q < lanes; ++q) row[q] = planes[q] + y * width;
        for (int64_t pw = 0; pw < pooled_w; ++pw) {
            const double *restrict w = ax->weight + pw * width;
            const double *restrict d = spread + y * stride + pw * ROI_LANES;
            for (int64_t x = ax->first[pw]; x <= ax->last[pw]; ++x) {
                const double wx = w[x];
                for (int q = 0; q < lanes; ++q) row[q][x] += (ROI_T)(d[q] * wx);
            }
        }
    }
}

/*
 * Box `box` (index k, image b) over the channels c .. c + lanes - 1: the forward pass reads the planes
 * src[b, c + q] and writes dst[k, c + q]; the adjoint reads src[k, c + q] and adds into dst[b, c + q].
 */
static inline __attribute__((always_inline)) void ROI_NAME(box_channels)(roi_scratch *s, const roi_box *box,
                                                                         int adjoint, const ROI_T *src, ROI_T *dst,
                                                                         int64_t k, int64_t b, int64_t c,
                                                                         int64_t channels, int64_t plane,
                                                                         int64_t bins, const int lanes)
{
    const ROI_T *from[ROI_LANES];
    ROI_T *to[ROI_LANES];
    for (int q = 0; q < lanes; ++q) {
        from[q] = src + ((adjoint ? k : b) * channels + c + q) * (adjoint ? bins : plane);
        to[q] = dst + ((adjoint ? b : k) * channels + c + q) * (adjoint ? plane : bins);
    }
    if (adjoint)
        ROI_NAME(spread_planes)(s, box, from, to, lanes);
    else
        ROI_NAME(pool_planes)(s, box, from, to, lanes);
}

/*
 * The shared loop of both kernels. Tasks are (image b, block of channels), handed out dynamically; a task
 * takes the boxes of b in groups whose weights fit its scratch and, for each channel of its block, runs
 * every box of the group over that channel's plane (which so stays in cache). The forward pass writes
 * out[k, c] for the boxes k of b; the adjoint zeroes the planes grad_input[b, c0:c1] and accumulates
 * into them, the boxes in input order.
 */
static int ROI_NAME(run)(int adjoint, const ROI_T *src, const double *rois, ROI_T *dst, int64_t batch,
                         int64_t channels, int64_t height, int64_t width, int64_t num_rois, int64_t pooled_h,
                         int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, int aligned,
                         int num_threads)
{
    if (batch <= 0 || channels <= 0 || height <= 0 || width <= 0) return 0;
    int64_t *start, *order, most = 0;
    int failed = roi_group_by_image(rois, num_rois, batch, &start, &order, &most);
    if (failed) return failed;
    int64_t blocks = ROI_TASKS_PER_THREAD * (int64_t)num_threads;
    blocks = blocks < channels ? blocks : channels;
    const int64_t tasks = batch * blocks, plane = height * width, bins = pooled_h * pooled_w;
#pragma omp parallel num_threads(num_threads)
    {
        roi_scratch s;
        const int ok = roi_scratch_init(&s, most > 0 ? most : 1, pooled_h, pooled_w, height, width) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; ++task) {
            if (!ok) continue;
            const int64_t b = task / blocks;
            int64_t c0, c1;
            roi_channel_block(task % blocks, blocks, channels, &c0, &c1);
            if (adjoint) memset(dst + (b * channels + c0) * plane, 0, sizeof(ROI_T) * (size_t)((c1 - c0) * plane));
            for (int64_t g0 = start[b]; g0 < start[b + 1]; g0 += s.group) {
                const int64_t n = start[b + 1] - g0 < s.group ? start[b + 1] - g0 : s.group;
                for (int64_t j = 0; j < n; ++j)
                    ROI_NAME(box_weights)(&s, &s.boxes[j], rois + 5 * order[g0 + j], spatial_scale, sampling_ratio,
                                          aligned);
                int64_t c = c0;
                for (; c + ROI_LANES <= c1; c += ROI_LANES)
                    for (int64_t j = 0; j < n; ++j)
                        ROI_NAME(box_channels)(&s, &s.boxes[j], adjoint, src, dst, order[g0 + j], b, c, channels,
                                               plane, bins, ROI_LANES);
                for (; c < c1; ++c)
                    for (int64_t j = 0; j < n; ++j)
                        ROI_NAME(box_channels)(&s, &s.boxes[j], adjoint, src, dst, order[g0 + j], b, c, channels,
                                               plane, bins, 1);
            }
        }
        if (ok) roi_scratch_free(&s);
    }
    free(start);
    free(order);
    return failed;
}

/*
 * out[k, c] = RoIAlign of box k over input[b_k, c], for every box k and channel c; every value of out
 * is written. Returns 0, 1 (out of memory) or 2 (a batch index outside [0, N)).
 */
int ROI_NAME(roi_forward)(const ROI_T *input, const double *rois, ROI_T *out, int64_t batch, int64_t channels,
                          int64_t height, int64_t width, int64_t num_rois, int64_t pooled_h, int64_t pooled_w,
                          double spatial_scale, int64_t sampling_ratio, int aligned, int num_threads)
{
    return ROI_NAME(run)(0, input, rois, out, batch, channels, height, width, num_rois, pooled_h, pooled_w,
                         spatial_scale, sampling_ratio, aligned, num_threads);
}

/*
 * grad_input = the adjoint of roi_forward applied to grad_out; every value of grad_input is written.
 * Returns 0, 1 (out of memory) or 2 (a batch index outside [0, N)).
 */
int ROI_NAME(roi_backward)(const ROI_T *grad_out, const double *rois, ROI_T *grad_input, int64_t batch,
                           int64_t channels, int64_t height, int64_t width, int64_t num_rois, int64_t pooled_h,
                           int64_t pooled_w, double spatial_scale, int64_t sampling_ratio, int aligned,
                           int num_threads)
{
    return ROI_NAME(run)(1, grad_out, rois, grad_input, batch, channels, height, width, num_rois, pooled_h,
                         pooled_w, spatial_scale, sampling_ratio, aligned, num_threads);
}

#endif /* ROI_T */
