/* The SSIM of two 8-bit luma planes (daemon.stages.similarity.ssim, compiled): the same windows, constants and
 * float32 arithmetic as that module's numpy version, in one pass over the rows.
 *
 * ssim(reference, distorted, width, height) -> float
 * Each plane is width x height bytes, row by row. The mean over every 11x11 Gaussian window (sigma 1.5) that lies
 * wholly inside the image, K1 0.01, K2 0.03, data range 255.
 *
 * Each row's four quantities (x, y, x*x + y*y, x*y) are blurred along the row once, into a ring of the last 11
 * such rows; each output row is then one blur down that ring. Memory is 11 rows of four floats a pixel, whatever the
 * image's height, and every pass runs over memory that stays in the cache. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdlib.h>

#define RADIUS 5 /* int(3.5 * sigma + 0.5): scipy's truncation, which scikit-image uses */
#define WINDOW (2 * RADIUS + 1)
#define SIGMA 1.5
#define QUANTITIES 4

static float kernel[WINDOW];

static void make_kernel(void) {
    double weights[WINDOW], total = 0;
    for (int i = 0; i < WINDOW; i++) {
        double offset = i - RADIUS;
        weights[i] = exp(-(offset * offset) / (2 * SIGMA * SIGMA));
        total += weights[i];
    }
    for (int i = 0; i < WINDOW; i++) kernel[i] = (float)(weights[i] / total);
}

/* out[c] = sum over the window of kernel * in[c + k], for the `columns` places where it fits; the kernel is
 * symmetric, so mirrored taps are added before they are weighted (as the numpy version does). */
static inline void blur_row(const float *restrict in, float *restrict out, size_t columns) {
#pragma omp simd
    for (size_t c = 0; c < columns; c++) {
        float sum = in[c + RADIUS] * kernel[RADIUS];
        for (int i = 0; i < RADIUS; i++) sum += (in[c + i] + in[c + 2 * RADIUS - i]) * kernel[i];
        out[c] = sum;
    }
}

/* The same down a column of rows: out[c] = sum over i of kernel[i] * tap[i][offset + c]. */
static inline void blur_down(const float *const tap[WINDOW], size_t offset, float *restrict out, size_t columns) {
    const float *restrict t0 = tap[0] + offset, *restrict t1 = tap[1] + offset, *restrict t2 = tap[2] + offset,
                          *restrict t3 = tap[3] + offset, *restrict t4 = tap[4] + offset,
                          *restrict t5 = tap[5] + offset, *restrict t6 = tap[6] + offset,
                          *restrict t7 = tap[7] + offset, *restrict t8 = tap[8] + offset,
                          *restrict t9 = tap[9] + offset, *restrict t10 = tap[10] + offset;
    const float k0 = kernel[0], k1 = kernel[1], k2 = kernel[2], k3 = kernel[3], k4 = kernel[4], k5 = kernel[5];
#pragma omp simd
    for (size_t c = 0; c < columns; c++) {
        float sum = t5[c] * k5;
        sum += (t0[c] + t10[c]) * k0;
        sum += (t1[c] + t9[c]) * k1;
        sum += (t2[c] + t8[c]) * k2;
        sum += (t3[c] + t7[c]) * k3;
        sum += (t4[c] + t6[c]) * k4;
        out[c] = sum;
    }
}

/* Pure C, without the GIL. Sets *total to the sum of the SSIM map and returns 0, or -1 when memory ran out. */
/* Compiled twice, for AVX2 (chosen at load time where the CPU has it: twice the floats per instruction) and for
 * any x86-64; elsewhere once. The blurs are inlined into each. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static int ssim_sum(const unsigned char *reference, const unsigned char *distorted, size_t width, size_t height,
                    double *total) {
    const float c1 = (float)((0.01 * 255) * (0.01 * 255)), c2 = (float)((0.03 * 255) * (0.03 * 255));
    size_t columns = width - 2 * RADIUS;
    /* ring[slot][q]: row (slot mod WINDOW) of the ring, quantity q, `columns` floats; line: one input row. */
    float *ring = malloc(sizeof(float) * columns * QUANTITIES * WINDOW);
    float *line = malloc(sizeof(float) * width * QUANTITIES);
    float *mean = malloc(sizeof(float) * columns * QUANTITIES);
    if (ring == NULL || line == NULL || mean == NULL) {
        free(ring);
        free(line);
        free(mean);
        return -1;
    }
    *total = 0;
    for (size_t y = 0; y < height; y++) {
        const unsigned char *a = reference + y * width, *b = distorted + y * width;
        float *x = line, *d = line + width, *squares = line + 2 * width, *products = line + 3 * width;
#pragma omp simd
        for (size_t c = 0; c < width; c++) {
            x[c] = (float)a[c];
            d[c] = (float)b[c];
            squares[c] = x[c] * x[c] + d[c] * d[c];
            products[c] = x[c] * d[c];
        }
        float *slot = ring + (y % WINDOW) * columns * QUANTITIES;
        for (int q = 0; q < QUANTITIES; q++) blur_row(line + q * width, slot + q * columns, columns);
        if (y + 1 < WINDOW) continue;
        /* Rows y - 10 .. y are in the ring: blur down it, tap i being row y - 10 + i. */
        const float *tap[WINDOW];
        for (int i = 0; i < WINDOW; i++) tap[i] = ring + ((y + 1 + i) % WINDOW) * columns * QUANTITIES;
        for (int q = 0; q < QUANTITIES; q++) blur_down(tap, (size_t)q * columns, mean + q * columns, columns);
        const float *mean_x = mean, *mean_y = mean + columns, *mean_squares = mean + 2 * columns,
                    *mean_products = mean + 3 * columns;
        float row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
        for (size_t c = 0; c < columns; c++) {
            float means = mean_x[c] * mean_y[c];
            float squared_means = mean_x[c] * mean_x[c] + mean_y[c] * mean_y[c];
            float numerator = (2 * means + c1) * (2 * (mean_products[c] - means) + c2);
            float denominator = (squared_means + c1) * (mean_squares[c] - squared_means + c2);
            row_sum += numerator / denominator;
        }
        *total += row_sum;
    }
    free(ring);
    free(line);
    free(mean);
    return 0;
}

static PyObject *ssim(PyObject *module, PyObject *args) {
    Py_buffer reference, distorted;
    Py_ssize_t width, height;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*y*nn", &reference, &distorted, &width, &height)) return NULL;
    PyObject *result = NULL;
    if (width < WINDOW || height < WINDOW) {
        PyErr_Format(PyExc_ValueError, "a plane of %zdx%zd is smaller than one %dx%d window", width, height, WINDOW,
                     WINDOW);
    } else if (reference.len != width * height || distorted.len != width * height) {
        PyErr_Format(PyExc_ValueError, "planes of %zd and %zd bytes, not %zdx%zd", reference.len, distorted.len,
                     width, height);
    } else {
        double sum = 0;
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = ssim_sum(reference.buf, distorted.buf, (size_t)width, (size_t)height, &sum);
        Py_END_ALLOW_THREADS
        if (status != 0)
            PyErr_NoMemory();
        else
            result = PyFloat_FromDouble(sum / ((double)(width - 2 * RADIUS) * (double)(height - 2 * RADIUS)));
    }
    PyBuffer_Release(&reference);
    PyBuffer_Release(&distorted);
    return result;
}

static PyMethodDef methods[] = {
    {"ssim", ssim, METH_VARARGS, "ssim(reference, distorted, width, height) -> float"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_similarity", "SSIM of two 8-bit luma planes.", -1, methods,
};

PyMODINIT_FUNC PyInit__similarity(void) {
    make_kernel();
    return PyModule_Create(&module_def);
}
