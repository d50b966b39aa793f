/*
 * A window's compiled paths: its features, and its score through dense layers, each one call.
 *
 * Why: after a busy neighbour's time slice every distinct numpy function a window calls comes
 * back from memory (4-8 us each, BENCHMARKS.md "what a cold window touches"), and a window
 * called about twenty.  Each path here is a small loop over the window's own arrays.  Both are
 * optional (setup.py builds them where a C compiler is present); the numpy paths serve otherwise
 * with the same results.  Built with -ffp-contract=off: no compiler fuses a product into a sum
 * (an FMA rounds once), so every operation is the numpy path's IEEE double operation.
 *
 * features(ts, vs) -> list[dict] | None: gateway.pipeline.features._streams_pass.
 * dense_row(x, layers) -> (1,) array | None: the numpy backend's window-at-a-time score;
 * dense_occlusion(z, clip, layers): the scores of an anomaly's occlusion probes.
 * vector(values), zrow(x, mean, std), follow(x, level, scaled, lo, hi): a window's input row,
 * its z-scores and its baseline's step (gateway.inference.runner).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

/*
 * features(ts, vs): identical to the bit to the numpy pass.  Every sum is taken in the order
 * np.add.reduceat takes it (the segment's first element, plus numpy's pairwise sum of the rest:
 * 8 accumulators up to 128 terms, halves above); every other operation is the same IEEE double
 * operation.  None where the numpy pass must decide (not lists of 1-D float64 arrays, unequal
 * lengths, an empty stream, values at or beyond +-1e100, not a number).
 */
#define HUGE_VALUE 1e100
#define PW_BLOCK 128

/* A column of doubles: its first element and its stride in doubles. */
typedef struct {
    const double *p;
    npy_intp s;
} Col;

#define AT(c, k) ((c).p[(k) * (c).s])

/*
 * Pairwise sum of TERM over k in [off, off + n), in numpy's order (loops_utils.h.src): below 8
 * terms one after the other, up to 128 in 8 accumulators, above that two halves (a multiple of 8
 * first).  a, b: columns; m1, m2: the means the terms are centred on.
 */
#define DEF(NAME, TERM)                                                                    \
    static double NAME(Col a, Col b, npy_intp n, npy_intp off, double m1, double m2)      \
    {                                                                                     \
        (void)b;                                                                          \
        (void)m1;                                                                         \
        (void)m2;                                                                         \
        if (n < 8) {                                                                      \
            double res = -0.0;                                                            \
            for (npy_intp i = 0; i < n; i++) {                                            \
                npy_intp k = off + i;                                                     \
                res += (TERM);                                                            \
            }                                                                             \
            return res;                                                                   \
        }                                                                                 \
        if (n <= PW_BLOCK) {                                                              \
            double r[8];                                                                  \
            npy_intp i, k;                                                                \
            for (i = 0; i < 8; i++) {                                                     \
                k = off + i;                                                              \
                r[i] = (TERM);                                                            \
            }                                                                             \
            for (i = 8; i < n - (n % 8); i += 8) {                                        \
                for (npy_intp j = 0; j < 8; j++) {                                        \
                    k = off + i + j;                                                      \
                    r[j] += (TERM);                                                       \
                }                                                                         \
            }                                                                             \
            double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])); \
            for (; i < n; i++) {                                                          \
                k = off + i;                                                              \
                res += (TERM);                                                            \
            }                                                                             \
            return res;                                                                   \
        }                                                                                 \
        npy_intp n2 = n / 2;                                                              \
        n2 -= n2 % 8;                                                                     \
        return NAME(a, b, n2, off, m1, m2) + NAME(a, b, n - n2, off + n2, m1, m2);        \
    }

DEF(sum_at, AT(a, k))
DEF(sq_at, (AT(a, k) - m1) * (AT(a, k) - m1))
DEF(cross_at, (AT(a, k) - m1) * (AT(b, k) - m2))

/*
 * np.add.reduceat of one segment: its first term, plus the pairwise sum of the others.  The sum
 * of one term is that term exactly (-0.0 + x == x for every x, signed zeros included).
 */
#define SEGMENT(FN, A, B, N, M1, M2) \
    ((N) > 1 ? FN(A, B, 1, 0, M1, M2) + FN(A, B, (N) - 1, 1, M1, M2) : FN(A, B, 1, 0, M1, M2))

static PyObject *key_mean, *key_std, *key_min, *key_max, *key_slope;

/* A 1-D float64 array in native order and aligned, as a column; 0 when it is not one. */
static int column(PyObject *o, Col *c, npy_intp *n)
{
    if (!PyArray_Check(o)) {
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != 1 || PyArray_TYPE(a) != NPY_DOUBLE || !PyArray_ISNOTSWAPPED(a) ||
        !PyArray_ISALIGNED(a) || PyArray_STRIDE(a, 0) % (npy_intp)sizeof(double) != 0) {
        return 0;
    }
    c->p = (const double *)PyArray_DATA(a);
    c->s = PyArray_STRIDE(a, 0) / (npy_intp)sizeof(double);
    *n = PyArray_DIM(a, 0);
    return 1;
}

static int put(PyObject *d, PyObject *key, double value)
{
    PyObject *f = PyFloat_FromDouble(value);
    if (f == NULL) {
        return -1;
    }
    int rc = PyDict_SetItem(d, key, f);
    Py_DECREF(f);
    return rc;
}

static PyObject *features(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *ts, *vs;
    if (!PyArg_ParseTuple(args, "OO", &ts, &vs)) {
        return NULL;
    }
    if (!PyList_Check(ts) || !PyList_Check(vs) || PyList_GET_SIZE(ts) != PyList_GET_SIZE(vs)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t s = PyList_GET_SIZE(vs);
    /* First every check, so a window the numpy pass must take costs no dictionaries. */
    for (Py_ssize_t i = 0; i < s; i++) {
        Col t, v;
        npy_intp nt, nv;
        if (!column(PyList_GET_ITEM(ts, i), &t, &nt) || !column(PyList_GET_ITEM(vs, i), &v, &nv) ||
            nt != nv || nv == 0) {
            Py_RETURN_NONE;
        }
        for (npy_intp k = 0; k < nv; k++) {
            double x = AT(v, k);
            if (!(x > -HUGE_VALUE && x < HUGE_VALUE)) {
                Py_RETURN_NONE;
            }
        }
    }
    PyObject *out = PyList_New(s);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < s; i++) {
        Col t, v;
        npy_intp n, nt;
        column(PyList_GET_ITEM(ts, i), &t, &nt);
        column(PyList_GET_ITEM(vs, i), &v, &n);
        double lo = AT(v, 0), hi = lo;
        for (npy_intp k = 1; k < n; k++) {
            double x = AT(v, k);
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        double dn = (double)n;
        double mean = SEGMENT(sum_at, v, v, n, 0.0, 0.0) / dn;
        /* Rounding can put a sum/n mean a hair outside [min, max]: clamp so constants stay exact. */
        mean = mean < lo ? lo : mean;
        mean = mean > hi ? hi : mean;
        double tmean = SEGMENT(sum_at, t, t, n, 0.0, 0.0) / dn;
        double ss = SEGMENT(sq_at, v, v, n, mean, 0.0);
        double den = SEGMENT(sq_at, t, t, n, tmean, 0.0);
        double num = SEGMENT(cross_at, v, t, n, mean, tmean);
        double sd, slope;
        if (lo == hi) {
            sd = 0.0;
            slope = 0.0;
        } else {
            sd = sqrt(ss / dn);
            slope = den > 0.0 ? num / den : NAN;
        }
        PyObject *d = PyDict_New();
        if (d == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, d);
        if (put(d, key_mean, mean) < 0 || put(d, key_std, sd) < 0 || put(d, key_min, lo) < 0 ||
            put(d, key_max, hi) < 0 ||
            (n >= 2 && den > 0.0 && isfinite(slope) && put(d, key_slope, slope) < 0)) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/*
 * dense_row(x, layers) -> (1,) float64 array | None: gateway.inference.backends.DenseBackend at batch 1.
 * Every layer is a loop of float64 products summed in input order from 0.0, then the bias, then
 * the activation, as the numpy backend sums its last layer in Python: that layer is the same to
 * the bit, hidden layers differ from BLAS's order by a few roundings (DENSE_BATCH1_TOLERANCE).
 * x: a (1, n) or (n,) float32 or float64 array; layers: a tuple of (w (n_in, n_out) float64
 * C-contiguous, b (n_out,) float64, activation code: 0 identity, 1 relu, 2 sigmoid).  None where
 * the numpy path must run (another layout, widths that do not chain, a layer wider than MAX_WIDTH).
 */
#define MAX_WIDTH 1024

static int as_matrix(PyObject *o, int ndim, npy_intp *rows, npy_intp *cols, const double **p)
{
    if (!PyArray_Check(o)) {
        return 0;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != ndim || PyArray_TYPE(a) != NPY_DOUBLE || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISNOTSWAPPED(a) || !PyArray_ISALIGNED(a)) {
        return 0;
    }
    *rows = PyArray_DIM(a, 0);
    *cols = ndim == 2 ? PyArray_DIM(a, 1) : 1;
    *p = (const double *)PyArray_DATA(a);
    return 1;
}

static double activate(double y, long act)
{
    if (act == 1) {
        return isnan(y) ? y : (y > 0.0 ? y : 0.0); /* NaN stays NaN, as with np.maximum */
    }
    if (act == 2) {
        return (tanh(y * 0.5) + 1.0) * 0.5; /* the tanh form: no overflow for large |y| */
    }
    return y;
}

/*
 * The score of the row h (width inputs; h is overwritten) through layers, into *score: 1, or 0
 * where the layers are not of the expected layout (widths that do not chain, one output at the
 * end), or -1 with an exception set.
 */
static int forward(double *h, npy_intp width, PyObject *layers, double *score)
{
    double spare[MAX_WIDTH];
    double *y = spare;
    Py_ssize_t n_layers = PyTuple_GET_SIZE(layers);
    for (Py_ssize_t l = 0; l < n_layers; l++) {
        PyObject *layer = PyTuple_GET_ITEM(layers, l);
        if (!PyTuple_Check(layer) || PyTuple_GET_SIZE(layer) != 3) {
            return 0;
        }
        npy_intp n_in, n_out, nb, one;
        const double *w, *bias;
        if (!as_matrix(PyTuple_GET_ITEM(layer, 0), 2, &n_in, &n_out, &w) ||
            !as_matrix(PyTuple_GET_ITEM(layer, 1), 1, &nb, &one, &bias) || n_in != width ||
            nb != n_out || n_out > MAX_WIDTH) {
            return 0;
        }
        long act = PyLong_AsLong(PyTuple_GET_ITEM(layer, 2));
        if (act == -1 && PyErr_Occurred()) {
            return -1;
        }
        for (npy_intp j = 0; j < n_out; j++) {
            double acc = 0.0;
            for (npy_intp i = 0; i < n_in; i++) {
                acc += h[i] * w[i * n_out + j];
            }
            y[j] = activate(acc + bias[j], act);
        }
        double *swap = h;
        h = y;
        y = swap;
        width = n_out;
    }
    if (width != 1) {
        return 0;
    }
    *score = h[0];
    return 1;
}

/* A C-contiguous float32 or float64 array of ndim dimensions in native order; else NULL. */
static PyArrayObject *rows_of(PyObject *o)
{
    if (!PyArray_Check(o)) {
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)o;
    int type = PyArray_TYPE(x);
    if ((type != NPY_FLOAT && type != NPY_DOUBLE) || !PyArray_IS_C_CONTIGUOUS(x) ||
        !PyArray_ISNOTSWAPPED(x) || !PyArray_ISALIGNED(x)) {
        return NULL;
    }
    return x;
}

static double item(PyArrayObject *x, npy_intp k)
{
    return PyArray_TYPE(x) == NPY_FLOAT ? (double)((const float *)PyArray_DATA(x))[k]
                                        : ((const double *)PyArray_DATA(x))[k];
}

static PyObject *dense_row(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *layers;
    if (!PyArg_ParseTuple(args, "OO!", &xo, &PyTuple_Type, &layers)) {
        return NULL;
    }
    PyArrayObject *x = rows_of(xo);
    int nd = x ? PyArray_NDIM(x) : 0;
    if (!(nd == 1 || (nd == 2 && PyArray_DIM(x, 0) == 1)) || PyArray_DIM(x, nd - 1) > MAX_WIDTH) {
        Py_RETURN_NONE;
    }
    npy_intp width = PyArray_DIM(x, nd - 1);
    double h[MAX_WIDTH], score;
    for (npy_intp i = 0; i < width; i++) {
        h[i] = item(x, i);
    }
    int rc = forward(h, width, layers, &score);
    if (rc <= 0) {
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    npy_intp one = 1;
    PyObject *out = PyArray_SimpleNew(1, &one, NPY_DOUBLE);
    if (out != NULL) {
        *(double *)PyArray_DATA((PyArrayObject *)out) = score;
    }
    return out;
}

/*
 * dense_occlusion(z, clip, layers) -> (k, n + 1) float64 array | None: for each row of z (k, n)
 * the scores of its n occluded copies (input i at 0) and, last, of the row itself, each row
 * clipped to +-clip and rounded to float32 first: the numpy backend's scores of the runner's
 * occlusion probes, computed without building them (gateway.inference.runner, _explain).
 */
static PyObject *dense_occlusion(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *zo, *layers;
    double clip;
    if (!PyArg_ParseTuple(args, "OdO!", &zo, &clip, &PyTuple_Type, &layers)) {
        return NULL;
    }
    PyArrayObject *z = rows_of(zo);
    if (z == NULL || PyArray_NDIM(z) != 2 || PyArray_DIM(z, 1) > MAX_WIDTH) {
        Py_RETURN_NONE;
    }
    npy_intp k = PyArray_DIM(z, 0), n = PyArray_DIM(z, 1);
    npy_intp dims[2] = {k, n + 1};
    PyObject *out = PyArray_SimpleNew(2, dims, NPY_DOUBLE);
    if (out == NULL) {
        return NULL;
    }
    double *scores = (double *)PyArray_DATA((PyArrayObject *)out);
    double row[MAX_WIDTH], h[MAX_WIDTH];
    for (npy_intp r = 0; r < k; r++) {
        for (npy_intp i = 0; i < n; i++) {
            double v = item(z, r * n + i);
            v = v < -clip ? -clip : (v > clip ? clip : v); /* np.clip of finite values */
            row[i] = (double)(float)v;                     /* astype(np.float32) */
        }
        for (npy_intp p = 0; p <= n; p++) {
            memcpy(h, row, (size_t)n * sizeof(double));
            if (p < n) {
                h[p] = 0.0;
            }
            int rc = forward(h, n, layers, &scores[r * (n + 1) + p]);
            if (rc <= 0) {
                Py_DECREF(out);
                if (rc < 0) {
                    return NULL;
                }
                Py_RETURN_NONE;
            }
        }
    }
    return out;
}

/*
 * A window's input row and baseline (gateway.inference.runner), each the numpy operations it
 * replaces to the bit: np.array of Python floats; (x - mean) / std; level += (x - level) * scaled
 * clamped to [lo, hi].
 */

/* A 1-D float64 C-contiguous array of n elements (any n when n < 0), writable when asked; else NULL. */
static double *vec(PyObject *o, npy_intp *n, int writable)
{
    if (!PyArray_Check(o)) {
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (PyArray_NDIM(a) != 1 || PyArray_TYPE(a) != NPY_DOUBLE || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISNOTSWAPPED(a) || !PyArray_ISALIGNED(a) || (writable && !PyArray_ISWRITEABLE(a)) ||
        (*n >= 0 && PyArray_DIM(a, 0) != *n)) {
        return NULL;
    }
    *n = PyArray_DIM(a, 0);
    return (double *)PyArray_DATA(a);
}

/* vector(values) -> float64 array | None: None unless every value is a Python float. */
static PyObject *vector(PyObject *self, PyObject *values)
{
    (void)self;
    if (!PyList_Check(values)) {
        Py_RETURN_NONE;
    }
    npy_intp n = PyList_GET_SIZE(values);
    for (npy_intp i = 0; i < n; i++) {
        if (!PyFloat_CheckExact(PyList_GET_ITEM(values, i))) {
            Py_RETURN_NONE;
        }
    }
    PyObject *out = PyArray_SimpleNew(1, &n, NPY_DOUBLE);
    if (out == NULL) {
        return NULL;
    }
    double *p = (double *)PyArray_DATA((PyArrayObject *)out);
    for (npy_intp i = 0; i < n; i++) {
        p[i] = PyFloat_AS_DOUBLE(PyList_GET_ITEM(values, i));
    }
    return out;
}

/*
 * zrow(x, mean, std) -> (z (1, n), max |z| with non-finite z as 0, every z finite) | None.
 * None for arrays of other layouts or lengths.
 */
static PyObject *zrow(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *mo, *so;
    if (!PyArg_ParseTuple(args, "OOO", &xo, &mo, &so)) {
        return NULL;
    }
    npy_intp n = -1;
    const double *x = vec(xo, &n, 0), *m = x ? vec(mo, &n, 0) : NULL, *sd = m ? vec(so, &n, 0) : NULL;
    if (sd == NULL) {
        Py_RETURN_NONE;
    }
    npy_intp dims[2] = {1, n};
    PyObject *out = PyArray_SimpleNew(2, dims, NPY_DOUBLE);
    if (out == NULL) {
        return NULL;
    }
    double *z = (double *)PyArray_DATA((PyArrayObject *)out);
    double zmax = 0.0;
    int finite = 1;
    for (npy_intp i = 0; i < n; i++) {
        double v = x[i] - m[i];
        v /= sd[i];
        z[i] = v;
        if (isfinite(v)) {
            double a = fabs(v);
            zmax = a > zmax ? a : zmax;
        } else {
            finite = 0;
        }
    }
    return Py_BuildValue("NdO", out, zmax, finite ? Py_True : Py_False);
}

/*
 * follow(x, level, scaled, lo, hi) -> bool: level += (x - level) * scaled in place, then each
 * level below lo (above hi) set to it (lo, hi: arrays, or None for no bounds).  False, with the
 * level untouched, when a step is not finite (an absent input, an overflow): the caller's numpy
 * path decides those.  None for arrays of other layouts or lengths.
 */
static PyObject *follow(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *lo_o, *so, *lo_b, *hi_b;
    if (!PyArg_ParseTuple(args, "OOOOO", &xo, &lo_o, &so, &lo_b, &hi_b)) {
        return NULL;
    }
    npy_intp n = -1;
    const double *x = vec(xo, &n, 0), *sc = x ? vec(so, &n, 0) : NULL;
    double *level = sc ? vec(lo_o, &n, 1) : NULL;
    const double *lo = NULL, *hi = NULL;
    if (level == NULL || n > MAX_WIDTH) {
        Py_RETURN_NONE;
    }
    if (lo_b != Py_None || hi_b != Py_None) {
        lo = vec(lo_b, &n, 0);
        hi = lo ? vec(hi_b, &n, 0) : NULL;
        if (hi == NULL) {
            Py_RETURN_NONE;
        }
    }
    double step[MAX_WIDTH];
    for (npy_intp i = 0; i < n; i++) {
        double d = x[i] - level[i];
        d *= sc[i];
        if (!isfinite(d)) {
            Py_RETURN_FALSE;
        }
        step[i] = d;
    }
    for (npy_intp i = 0; i < n; i++) {
        double v = level[i] + step[i];
        if (lo != NULL) {
            v = v < lo[i] ? lo[i] : (v > hi[i] ? hi[i] : v);
        }
        level[i] = v;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"features", features, METH_VARARGS,
     "Features of two or more non-empty streams' windows in one pass, or None where the numpy pass decides."},
    {"dense_row", dense_row, METH_VARARGS,
     "One row's score through dense layers, or None where the numpy path must run."},
    {"dense_occlusion", dense_occlusion, METH_VARARGS,
     "The scores of a window's occlusion probes and of the window itself, or None."},
    {"vector", vector, METH_O, "A list of Python floats as a float64 array, or None."},
    {"zrow", zrow, METH_VARARGS, "(x - mean) / std as a (1, n) array, its largest finite |z|, all finite."},
    {"follow", follow, METH_VARARGS, "A baseline's step in place; False where the numpy path must take it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway._window",
    "A window's compiled paths: features and a dense-layer score (see gateway.pipeline.features).", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* What gateway/compiled.py checks: a build of other sources (an older install) is not used. */
#define WINDOW_VERSION 2

PyMODINIT_FUNC PyInit__window(void)
{
    import_array();
    key_mean = PyUnicode_InternFromString("mean");
    key_std = PyUnicode_InternFromString("std");
    key_min = PyUnicode_InternFromString("min");
    key_max = PyUnicode_InternFromString("max");
    key_slope = PyUnicode_InternFromString("slope");
    if (!key_mean || !key_std || !key_min || !key_max || !key_slope) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", WINDOW_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
