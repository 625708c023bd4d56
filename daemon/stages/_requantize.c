/* Recompress a JPEG in the DCT domain: its quantized coefficients, requantized to the tables libjpeg's
 * jpeg_set_quality gives (those Pillow's encoder writes), entropy-coded again. No inverse or forward DCT, no
 * colour conversion or resampling: only entropy decoding and encoding.
 *
 * requantize(data, quality, optimize, progressive, max_pixels, icc, score, reduce)
 *     -> (bytes, float | None, bytes | None, bytes | None)
 * With score, the float is the luma's SSIM between the source and its requantized self over 8x8 blocks, computed
 * from the coefficients (see requantize_block_scored), else None.
 * With reduce n (2, 4 or 8; not with score), the two last are the luma of the source and of the output as 8-bit
 * planes of ceil(width / n) x ceil(height / n), made from the coefficients as libjpeg's scaled inverse DCT would (see
 * reduced_block, dc_level), without another entropy decoding of either file.
 * Raises JpegError (a ValueError) with libjpeg's message for anything it cannot or should not take: corrupt or
 * truncated data (libjpeg's warnings count as errors), over max_pixels, not 8-bit YCbCr 4:2:0 or greyscale.
 * Callers fall back to decoding, which then gives the user its own result or error. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define MESSAGE_SIZE 200  /* JMSG_LENGTH_MAX, which jpeglib.h does not export */
/* Baseline Huffman coding holds quantized AC values of at most 10 bits (and DC differences of 11): a coarser
 * source table requantized to a finer one must not leave that range. */
#define MAX_QUANTIZED 1023

struct failure {
    struct jpeg_error_mgr mgr;  /* first: libjpeg hands back a pointer to it */
    jmp_buf jump;
    char message[MESSAGE_SIZE];
};

struct job {
    const unsigned char *data;
    unsigned long size;
    int quality, optimize, progressive, score;
    double ssim_sum;  /* over the luma's blocks, with score */
    unsigned long long ssim_blocks;
    int reduce;  /* 0, or 2, 4, 8: the planes below are wanted */
    unsigned char *before, *after;  /* malloc'd luma planes, plane_width x plane_height (whole blocks) */
    size_t plane_width, plane_height;
    unsigned long width, height;  /* the image's, reduced: the part of the planes that is the picture */
    unsigned long long max_pixels;
    const unsigned char *icc;
    unsigned int icc_size;
    unsigned char *out;  /* malloc'd by jpeg_mem_dest */
    unsigned long out_size;
    char message[MESSAGE_SIZE];
};

static PyObject *JpegError;

static void fail_at_once(j_common_ptr cinfo) {
    struct failure *failure = (struct failure *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, failure->message);
    longjmp(failure->jump, 1);
}

/* A warning means damaged data (a truncated file, a corrupt segment) that libjpeg would paper over with grey:
 * treat it as an error, so the decoding path decides instead. Trace messages (level > 0) are ignored. */
static void warning_is_failure(j_common_ptr cinfo, int level) {
    if (level < 0) fail_at_once(cinfo);
}

static void silent(j_common_ptr cinfo) { (void)cinfo; }

static void refuse(j_common_ptr cinfo, const char *reason) {
    struct failure *failure = (struct failure *)cinfo->err;
    snprintf(failure->message, MESSAGE_SIZE, "%s", reason);
    longjmp(failure->jump, 1);
}

/* Only what Pillow's encoder writes itself: 8-bit, YCbCr with 2x2 luma and 1x1 chroma sampling, or greyscale. */
static void check_eligible(j_decompress_ptr src, unsigned long long max_pixels) {
    j_common_ptr common = (j_common_ptr)src;
    if ((unsigned long long)src->image_width * src->image_height > max_pixels)
        refuse(common, "image over the pixel limit");
    if (src->data_precision != 8) refuse(common, "not an 8-bit JPEG");
    if (src->jpeg_color_space == JCS_GRAYSCALE && src->num_components == 1) {
        if (src->comp_info[0].h_samp_factor != 1 || src->comp_info[0].v_samp_factor != 1)
            refuse(common, "greyscale JPEG with sampling factors");
        return;
    }
    if (src->jpeg_color_space != JCS_YCbCr || src->num_components != 3)
        refuse(common, "not a YCbCr or greyscale JPEG");
    jpeg_component_info *c = src->comp_info;
    if (c[0].h_samp_factor != 2 || c[0].v_samp_factor != 2 || c[1].h_samp_factor != 1 ||
        c[1].v_samp_factor != 1 || c[2].h_samp_factor != 1 || c[2].v_samp_factor != 1)
        refuse(common, "chroma subsampling other than 4:2:0");
}

static inline void requantize_block(JCOEF *coef, const float *factor) {
    for (int k = 0; k < DCTSIZE2; k++) {
        float scaled = (float)coef[k] * factor[k];
        int value = (int)(scaled + (scaled < 0 ? -0.5f : 0.5f));
        if (value > MAX_QUANTIZED) value = MAX_QUANTIZED;
        if (value < -MAX_QUANTIZED) value = -MAX_QUANTIZED;
        coef[k] = (JCOEF)value;
    }
}

/* requantize_block, and the SSIM of the block's pixels with those decoded from its requantized coefficients,
 * from the coefficients alone: JPEG's DCT is orthonormal, so the block's mean is DC / 8 (+128, the level shift)
 * and its variance and covariance are the AC coefficients' sums of products / 64. Clamping to 0..255 and the
 * decoder's rounding are not modelled. Constants as Wang et al. for 8-bit samples. */
static inline double requantize_block_scored(JCOEF *coef, const float *factor, const float *old_step,
                                             const float *new_step) {
    float x[DCTSIZE2];
    for (int k = 0; k < DCTSIZE2; k++) x[k] = (float)coef[k] * old_step[k];
    requantize_block(coef, factor);
    float sxx = 0, syy = 0, sxy = 0;
#pragma omp simd reduction(+ : sxx, syy, sxy)
    for (int k = 1; k < DCTSIZE2; k++) {  /* AC only: the DC is the mean */
        float y = (float)coef[k] * new_step[k];
        sxx += x[k] * x[k];
        syy += y * y;
        sxy += x[k] * y;
    }
    const double c1 = 6.5025, c2 = 58.5225;  /* (0.01 * 255)^2, (0.03 * 255)^2 */
    double mx = x[0] / 8.0 + 128, my = coef[0] * new_step[0] / 8.0 + 128;
    double vx = sxx / 64.0, vy = syy / 64.0, cxy = sxy / 64.0;
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2));
}

/* A sample from the inverse DCT (centred on 0) as an 8-bit level: shifted, rounded and clamped as libjpeg does. */
static inline unsigned char pixel_level(float sample) {
    int level = (int)(sample + 128.5f);
    return (unsigned char)(level < 0 ? 0 : level > 255 ? 255 : level);
}

/* reduced_block at N = 2 (a score of at most 512 a side on a 2000-pixel photo), from the basis's symmetry:
 * basis[1][u] = (-1)^u basis[0][u], and basis[0][u] is 0 for u = 2, 4, 6. So only frequencies 0, 1, 3, 5, 7 count,
 * each pixel is an even part plus or minus an odd part, and a block costs about 35 products instead of 160. */
static void half_block(const JCOEF *coef, const float *step, const float b[DCTSIZE], unsigned char *out,
                       size_t stride) {
    static const int counted[5] = {0, 1, 3, 5, 7};
    float left[5], right[5];  /* per counted row of frequencies v: across reduced to output columns 0 and 1 */
    for (int r = 0; r < 5; r++) {
        const JCOEF *c = coef + counted[r] * DCTSIZE;
        const float *s = step + counted[r] * DCTSIZE;
        float even = (float)c[0] * s[0] * b[0];
        float odd = (float)c[1] * s[1] * b[1] + (float)c[3] * s[3] * b[3] + (float)c[5] * s[5] * b[5] +
                    (float)c[7] * s[7] * b[7];
        left[r] = even + odd;
        right[r] = even - odd;
    }
    float even_left = b[0] * left[0], even_right = b[0] * right[0], odd_left = 0, odd_right = 0;
    for (int r = 1; r < 5; r++) {
        odd_left += b[counted[r]] * left[r];
        odd_right += b[counted[r]] * right[r];
    }
    const float pixel[4] = {even_left + odd_left, even_right + odd_right, even_left - odd_left,
                            even_right - odd_right};
    for (int p = 0; p < 4; p++) out[(size_t)(p / 2) * stride + (size_t)(p % 2)] = pixel_level(pixel[p]);
}

/* The N x N pixels (N = 8 / reduce, at most 4) that stand for an 8x8 block at 1/reduce of its size: each the mean
 * of the reduce x reduce pixels the full inverse DCT would give (before rounding), which is what libjpeg's scaled
 * IDCT computes. The 2-D basis is separable: the block's 8 rows of frequencies are first reduced to N rows (whole
 * rows at a time, which the compiler vectorises), then each of those to N pixels (N = 1: dc_level). Writes row by
 * row at `out`, `stride` bytes apart. */
static void reduced_block(const JCOEF *coef, const float *step, int n, const float basis[4][DCTSIZE],
                          unsigned char *out, size_t stride) {
    if (n == 2) {
        half_block(coef, step, basis[0], out, stride);
        return;
    }
    float value[DCTSIZE2];
#pragma omp simd
    for (int k = 0; k < DCTSIZE2; k++) value[k] = (float)coef[k] * step[k];
    for (int y = 0; y < n; y++) {
        float row[DCTSIZE] = {0};  /* the frequencies across, of output row y */
        for (int v = 0; v < DCTSIZE; v++) {
            float weight = basis[y][v];
#pragma omp simd
            for (int u = 0; u < DCTSIZE; u++) row[u] += weight * value[v * DCTSIZE + u];
        }
        for (int x = 0; x < n; x++) {
            float sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int u = 0; u < DCTSIZE; u++) sum += row[u] * basis[x][u];
            out[(size_t)y * stride + (size_t)x] = pixel_level(sum);
        }
    }
}

/* A block at 1/8 of its size: its mean, DC * step / 8 (+128), what libjpeg's 1/8 scaled IDCT gives. */
static inline unsigned char dc_level(JCOEF dc, float step) { return pixel_level((float)dc * step * 0.125f); }

/* basis[x][u] for reduced_block: the mean over output pixel x's span of C(u) cos((2i + 1) u pi / 16) / 2. */
static void reduced_basis(int n, float basis[4][DCTSIZE]) {
    for (int x = 0; x < n; x++)
        for (int u = 0; u < DCTSIZE; u++) {
            double sum = 0;
            for (int i = x * (DCTSIZE / n); i < (x + 1) * (DCTSIZE / n); i++)
                sum += (u == 0 ? 0.70710678118654752 : 1.0) * cos((2 * i + 1) * u * 3.14159265358979324 / 16) / 2;
            basis[x][u] = (float)(sum / (DCTSIZE / n));
        }
}

/* Requantizes one component's blocks; for the luma (`luma`: its job, else NULL) also the score and planes asked.
 * Compiled for AVX2 too, chosen at load time where the CPU has it (twice the coefficients per instruction, and
 * the clamps in one each), with the block loops inlined into each version. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void requantize_component(j_decompress_ptr src, jvirt_barray_ptr array, jpeg_component_info *component,
                                 const JQUANT_TBL *old_table, const JQUANT_TBL *new_table, struct job *luma) {
    float factor[DCTSIZE2], old_step[DCTSIZE2], new_step[DCTSIZE2];
    for (int k = 0; k < DCTSIZE2; k++) {
        old_step[k] = (float)old_table->quantval[k];
        new_step[k] = (float)new_table->quantval[k];
        factor[k] = old_step[k] / new_step[k];
    }
    int n = luma != NULL && luma->reduce ? DCTSIZE / luma->reduce : 0;
    float basis[4][DCTSIZE];
    if (n > 0) reduced_basis(n, basis);
    for (JDIMENSION row = 0; row < component->height_in_blocks; row += component->v_samp_factor) {
        JBLOCKARRAY rows = (*src->mem->access_virt_barray)((j_common_ptr)src, array, row,
                                                          (JDIMENSION)component->v_samp_factor, TRUE);
        for (int r = 0; r < component->v_samp_factor && row + r < component->height_in_blocks; r++) {
            JBLOCKROW blocks = rows[r];
            if (n > 0) {
                /* Block by block in one pass over the row: a separate pass for the planes first cost about a
                 * millisecond per photo in cache misses. */
                size_t stride = luma->plane_width;
                unsigned char *before = luma->before + (size_t)(row + r) * (size_t)n * stride;
                unsigned char *after = luma->after + (size_t)(row + r) * (size_t)n * stride;
                for (JDIMENSION b = 0; b < component->width_in_blocks; b++) {
                    if (n == 1) {
                        before[b] = dc_level(blocks[b][0], old_step[0]);
                        requantize_block(blocks[b], factor);
                        after[b] = dc_level(blocks[b][0], new_step[0]);
                    } else {
                        reduced_block(blocks[b], old_step, n, basis, before + (size_t)b * n, stride);
                        requantize_block(blocks[b], factor);
                        reduced_block(blocks[b], new_step, n, basis, after + (size_t)b * n, stride);
                    }
                }
            } else if (luma != NULL && luma->score) {
                for (JDIMENSION b = 0; b < component->width_in_blocks; b++)
                    luma->ssim_sum += requantize_block_scored(blocks[b], factor, old_step, new_step);
                luma->ssim_blocks += component->width_in_blocks;
            } else {
                for (JDIMENSION b = 0; b < component->width_in_blocks; b++) requantize_block(blocks[b], factor);
            }
        }
    }
}

/* Pure C, without the GIL. Returns 0 with job->out set, or -1 with job->message set; frees everything else. */
static int transcode(struct job *job) {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct failure failure;
    memset(&src, 0, sizeof src);
    memset(&dst, 0, sizeof dst);
    failure.message[0] = '\0';
    src.err = dst.err = jpeg_std_error(&failure.mgr);
    failure.mgr.error_exit = fail_at_once;
    failure.mgr.emit_message = warning_is_failure;
    failure.mgr.output_message = silent;
    job->out = job->before = job->after = NULL;
    job->out_size = 0;
    if (setjmp(failure.jump)) {
        /* Both structs were zeroed: destroying one never created is a no-op. */
        jpeg_destroy_compress(&dst);
        jpeg_destroy_decompress(&src);
        free(job->out);
        free(job->before);
        free(job->after);
        job->out = job->before = job->after = NULL;
        snprintf(job->message, MESSAGE_SIZE, "%s", failure.message[0] ? failure.message : "libjpeg failed");
        return -1;
    }
    jpeg_create_decompress(&src);
    jpeg_create_compress(&dst);
    jpeg_mem_src(&src, job->data, job->size);
    jpeg_read_header(&src, TRUE);
    check_eligible(&src, job->max_pixels);  /* before any coefficient is read: a bomb costs its header only */
    jvirt_barray_ptr *arrays = jpeg_read_coefficients(&src);
    if (job->reduce) {
        size_t n = (size_t)(DCTSIZE / job->reduce);
        job->plane_width = src.comp_info[0].width_in_blocks * n;
        job->plane_height = src.comp_info[0].height_in_blocks * n;
        job->width = (src.image_width + job->reduce - 1) / job->reduce;
        job->height = (src.image_height + job->reduce - 1) / job->reduce;
        job->before = malloc(job->plane_width * job->plane_height);
        job->after = malloc(job->plane_width * job->plane_height);
        if (job->before == NULL || job->after == NULL) refuse((j_common_ptr)&src, "out of memory for the planes");
    }

    jpeg_copy_critical_parameters(&src, &dst);
    /* Table 0 for luma, 1 for chroma, as the encoder assigns them, whatever slots the source used. */
    for (int c = 0; c < dst.num_components; c++) dst.comp_info[c].quant_tbl_no = c == 0 ? 0 : 1;
    jpeg_set_quality(&dst, job->quality, TRUE);
    for (int c = 0; c < src.num_components; c++) {
        jpeg_component_info *component = &src.comp_info[c];
        if (component->quant_table == NULL) refuse((j_common_ptr)&src, "component without a quantization table");
        struct job *luma = (job->score || job->reduce) && c == 0 ? job : NULL;
        requantize_component(&src, arrays[c], component, component->quant_table,
                             dst.quant_tbl_ptrs[dst.comp_info[c].quant_tbl_no], luma);
    }
    dst.optimize_coding = job->optimize ? TRUE : FALSE;
    if (job->progressive) jpeg_simple_progression(&dst);

    jpeg_mem_dest(&dst, &job->out, &job->out_size);
    jpeg_write_coefficients(&dst, arrays);
    if (job->icc != NULL) jpeg_write_icc_profile(&dst, job->icc, job->icc_size);
    jpeg_finish_compress(&dst);
    jpeg_finish_decompress(&src);
    jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    return 0;
}

/* The picture's part of a plane (whole blocks wide and high) as bytes, width x height. */
static PyObject *cropped(const unsigned char *plane, size_t stride, unsigned long width, unsigned long height) {
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(width * height));
    if (bytes == NULL) return NULL;
    char *out = PyBytes_AS_STRING(bytes);
    for (unsigned long y = 0; y < height; y++) memcpy(out + y * width, plane + y * stride, width);
    return bytes;
}

static PyObject *requantize(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"data", "quality", "optimize", "progressive", "max_pixels", "icc", "score", "reduce",
                               NULL};
    Py_buffer data, icc = {0};
    int quality, optimize = 0, progressive = 0, score = 0, reduce = 0;
    unsigned long long max_pixels = 50000000ULL;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*i|ppKz*pi", keywords, &data, &quality, &optimize,
                                     &progressive, &max_pixels, &icc, &score, &reduce))
        return NULL;
    PyObject *result = NULL;
    if (quality < 1 || quality > 100) {
        PyErr_Format(PyExc_ValueError, "quality must be 1-100, got %d", quality);
        goto done;
    }
    if (reduce != 0 && reduce != 2 && reduce != 4 && reduce != 8) {
        PyErr_Format(PyExc_ValueError, "reduce must be 0 (no planes), 2, 4 or 8, got %d", reduce);
        goto done;
    }
    if (score && reduce) {
        PyErr_SetString(PyExc_ValueError, "score and reduce are two ways to score: ask for one");
        goto done;
    }
    if ((unsigned long long)data.len > (unsigned long long)(unsigned long)-1 || icc.len > 0x7fffffff) {
        PyErr_SetString(JpegError, "input too large");
        goto done;
    }
    struct job job = {
        .data = data.buf, .size = (unsigned long)data.len, .quality = quality, .optimize = optimize,
        .progressive = progressive, .score = score, .reduce = reduce, .max_pixels = max_pixels,
        .icc = icc.buf != NULL && icc.len > 0 ? icc.buf : NULL, .icc_size = (unsigned int)icc.len,
    };
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = transcode(&job);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_SetString(JpegError, job.message);
        goto done;
    }
    PyObject *payload = PyBytes_FromStringAndSize((const char *)job.out, (Py_ssize_t)job.out_size);
    PyObject *before = Py_None, *after = Py_None, *ssim = Py_None;
    Py_INCREF(before);
    Py_INCREF(after);
    Py_INCREF(ssim);
    if (reduce) {
        Py_SETREF(before, cropped(job.before, job.plane_width, job.width, job.height));
        Py_SETREF(after, cropped(job.after, job.plane_width, job.width, job.height));
    }
    if (score && job.ssim_blocks > 0) Py_SETREF(ssim, PyFloat_FromDouble(job.ssim_sum / (double)job.ssim_blocks));
    free(job.out);
    free(job.before);
    free(job.after);
    if (payload != NULL && before != NULL && after != NULL && ssim != NULL)
        result = PyTuple_Pack(4, payload, ssim, before, after);
    Py_XDECREF(payload);
    Py_XDECREF(ssim);
    Py_XDECREF(before);
    Py_XDECREF(after);
done:
    PyBuffer_Release(&data);
    if (icc.obj != NULL) PyBuffer_Release(&icc);
    return result;
}

static PyMethodDef methods[] = {
    {"requantize", (PyCFunction)(void (*)(void))requantize, METH_VARARGS | METH_KEYWORDS,
     "requantize(data, quality, optimize=False, progressive=False, max_pixels=50000000, icc=None, score=False, "
     "reduce=0) -> (bytes, float | None, bytes | None, bytes | None)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_requantize", "JPEG recompression in the DCT domain (libjpeg-turbo).", -1, methods,
};

PyMODINIT_FUNC PyInit__requantize(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    JpegError = PyErr_NewException("daemon.stages._requantize.JpegError", PyExc_ValueError, NULL);
    if (JpegError == NULL || PyModule_AddObjectRef(module, "JpegError", JpegError) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
