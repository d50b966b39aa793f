/*
 * A window's compiled paths: its features, and its score through dense layers, each one call.
 *
 * Why: after a busy neighbour's time slice every distinct numpy function a window calls comes
 * back from memory (4-8 us each, BENCHMARKS.md "what a cold window touches"), and a window
 * called about twenty.  Each path here is a small loop over the window's own arrays.  Both are
 * optional (pyproject.toml's ext-modules builds them where a C compiler is present); the numpy
 * paths serve otherwise with the same results.  Built with -ffp-contract=off: no compiler fuses a
 * product into a sum (an FMA rounds once), so every operation is the numpy path's IEEE double
 * operation.
 *
 * Arrays are read through the buffer protocol (format 'd' or 'f', native order, aligned) and made
 * with numpy.empty, so the build needs no numpy headers and the module no numpy ABI: one build
 * serves every numpy the gateway installs with.
 *
 * features(ts, vs) -> list[dict] | None: gateway.pipeline.features._streams_pass.
 * dense_row(x, layers) -> (1,) array | None: the numpy backend's window-at-a-time score;
 * dense_occlusion(z, clip, layers): the scores of an anomaly's occlusion probes; dense_net(layers):
 * the layers exported once, for either in their place.
 * vector(values), zrow(x, mean, std), follow(x, level, scaled, lo, hi): a window's input row,
 * its z-scores and its baseline's step (gateway.inference.runner).
 * pca_row(z, center, load, eig): the novelty detector's T² and SPE of one window's row.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#include <stdint.h>

/* numpy.ndarray (what is read: the same arrays as the numpy paths take) and numpy.empty. */
static PyObject *np_ndarray, *np_empty;

/*
 * A view of o, an ndarray, with its strides and format (and writable when asked): 1, or 0 where
 * o is not an ndarray or refuses the view (the numpy path then decides).  Release with
 * PyBuffer_Release.
 */
static int view_of(PyObject *o, Py_buffer *v, int writable)
{
    if (!PyObject_TypeCheck(o, (PyTypeObject *)np_ndarray)) {
        return 0;
    }
    if (PyObject_GetBuffer(o, v, writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* The element type of a view: 'd' (native float64) or 'f' (native float32), aligned; else 0. */
static char kind_of(const Py_buffer *v)
{
    const char *f = v->format;
    if (f == NULL || f[0] == '\0' || f[1] != '\0' || v->suboffsets != NULL) {
        return 0;
    }
    Py_ssize_t size = f[0] == 'd' ? (Py_ssize_t)sizeof(double) : f[0] == 'f' ? (Py_ssize_t)sizeof(float) : 0;
    if (size == 0 || v->itemsize != size || (uintptr_t)v->buf % (uintptr_t)size != 0) {
        return 0;
    }
    return f[0];
}

/* A new float64 ndarray of shape (n,) (rows < 0) or (rows, n), and its data; NULL with an exception. */
static PyObject *new_doubles(Py_ssize_t rows, Py_ssize_t n, double **data)
{
    PyObject *shape = rows < 0 ? PyLong_FromSsize_t(n) : Py_BuildValue("(nn)", rows, n);
    if (shape == NULL) {
        return NULL;
    }
    PyObject *out = PyObject_CallOneArg(np_empty, shape); /* float64, C order */
    Py_DECREF(shape);
    if (out == NULL) {
        return NULL;
    }
    Py_buffer v;
    if (PyObject_GetBuffer(out, &v, PyBUF_WRITABLE) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    /* The data lives as long as the array, which nothing else holds yet (so nothing resizes it). */
    *data = (double *)v.buf;
    PyBuffer_Release(&v);
    return out;
}

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
    Py_ssize_t s;
} Col;

#define AT(c, k) ((c).p[(k) * (c).s])

/*
 * Pairwise sum of TERM over k in [off, off + n), in numpy's order (loops_utils.h.src): below 8
 * terms one after the other, up to 128 in 8 accumulators, above that two halves (a multiple of 8
 * first).  a, b: columns; m1, m2: the means the terms are centred on.
 */
#define DEF(NAME, TERM)                                                                    \
    static double NAME(Col a, Col b, Py_ssize_t n, Py_ssize_t off, double m1, double m2)      \
    {                                                                                     \
        (void)b;                                                                          \
        (void)m1;                                                                         \
        (void)m2;                                                                         \
        if (n < 8) {                                                                      \
            double res = -0.0;                                                            \
            for (Py_ssize_t i = 0; i < n; i++) {                                            \
                Py_ssize_t k = off + i;                                                     \
                res += (TERM);                                                            \
            }                                                                             \
            return res;                                                                   \
        }                                                                                 \
        if (n <= PW_BLOCK) {                                                              \
            double r[8];                                                                  \
            Py_ssize_t i, k;                                                                \
            for (i = 0; i < 8; i++) {                                                     \
                k = off + i;                                                              \
                r[i] = (TERM);                                                            \
            }                                                                             \
            for (i = 8; i < n - (n % 8); i += 8) {                                        \
                for (Py_ssize_t j = 0; j < 8; j++) {                                        \
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
        Py_ssize_t n2 = n / 2;                                                              \
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

/* A 1-D float64 array in native order and aligned, as a column (v held); 0 when it is not one. */
static int column(PyObject *o, Py_buffer *v, Col *c, Py_ssize_t *n)
{
    if (!view_of(o, v, 0)) {
        return 0;
    }
    if (v->ndim != 1 || kind_of(v) != 'd' || v->strides[0] % (Py_ssize_t)sizeof(double) != 0) {
        PyBuffer_Release(v);
        return 0;
    }
    c->p = (const double *)v->buf;
    c->s = v->strides[0] / (Py_ssize_t)sizeof(double);
    *n = v->shape[0];
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

/* Views of a window's arrays: on the stack for up to this many streams. */
#define FEW_STREAMS 16

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
    Py_buffer few_views[2 * FEW_STREAMS];
    Col few_cols[2 * FEW_STREAMS];
    Py_ssize_t few_lens[FEW_STREAMS];
    int few = s <= FEW_STREAMS;
    Py_buffer *views = few ? few_views : PyMem_New(Py_buffer, (size_t)(2 * s));
    Col *cols = few ? few_cols : PyMem_New(Col, (size_t)(2 * s));
    Py_ssize_t *lens = few ? few_lens : PyMem_New(Py_ssize_t, (size_t)s);
    PyObject *out = NULL;
    Py_ssize_t held = 0; /* views[0, held) are held */
    if (views == NULL || cols == NULL || lens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* First every check, so a window the numpy pass must take costs no dictionaries. */
    for (Py_ssize_t i = 0; i < s; i++) {
        Py_ssize_t nt, nv;
        if (!column(PyList_GET_ITEM(ts, i), &views[held], &cols[2 * i], &nt)) {
            goto decline;
        }
        held++;
        if (!column(PyList_GET_ITEM(vs, i), &views[held], &cols[2 * i + 1], &nv)) {
            goto decline;
        }
        held++;
        if (nt != nv || nv == 0) {
            goto decline;
        }
        Col v = cols[2 * i + 1];
        for (Py_ssize_t k = 0; k < nv; k++) {
            double x = AT(v, k);
            if (!(x > -HUGE_VALUE && x < HUGE_VALUE)) {
                goto decline;
            }
        }
        lens[i] = nv;
    }
    out = PyList_New(s);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < s; i++) {
        Col t = cols[2 * i], v = cols[2 * i + 1];
        Py_ssize_t n = lens[i];
        double lo = AT(v, 0), hi = lo;
        for (Py_ssize_t k = 1; k < n; k++) {
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
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, d);
        if (put(d, key_mean, mean) < 0 || put(d, key_std, sd) < 0 || put(d, key_min, lo) < 0 ||
            put(d, key_max, hi) < 0 ||
            (n >= 2 && den > 0.0 && isfinite(slope) && put(d, key_slope, slope) < 0)) {
            Py_CLEAR(out);
            goto done;
        }
    }
    goto done;
decline:
    out = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < held; i++) {
        PyBuffer_Release(&views[i]);
    }
    if (!few) {
        PyMem_Free(views);
        PyMem_Free(cols);
        PyMem_Free(lens);
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
#define MAX_LAYERS 16

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
 * A C-contiguous ndarray of ndim dimensions (any when ndim < 0) and element kind 'd' (or 'f' too
 * when floats), writable when asked, v held; else 0.
 */
static int dense_view(PyObject *o, Py_buffer *v, int ndim, int floats, int writable)
{
    if (!view_of(o, v, writable)) {
        return 0;
    }
    char kind = kind_of(v);
    if ((ndim >= 0 && v->ndim != ndim) || !(kind == 'd' || (floats && kind == 'f')) || !PyBuffer_IsContiguous(v, 'C')) {
        PyBuffer_Release(v);
        return 0;
    }
    return 1;
}

/* The element k of a C-contiguous float32 or float64 view, as a double. */
static double item(const Py_buffer *v, Py_ssize_t k)
{
    return v->format[0] == 'f' ? (double)((const float *)v->buf)[k] : ((const double *)v->buf)[k];
}

/* Dense layers read once per call: each layer's weights (n_in, n_out), bias and activation. */
typedef struct {
    const double *w, *b;
    Py_ssize_t n_in, n_out;
    long act;
} Layer;

typedef struct {
    Layer layer[MAX_LAYERS];
    Py_buffer views[2 * MAX_LAYERS];
    Py_ssize_t n_layers, held;
} Net;

/*
 * The layers (a tuple of (w (n_in, n_out) float64 C-contiguous, b (n_out,) float64, activation
 * code)) for rows of width inputs (the first layer's when width < 0): 1, or 0 where they are not
 * of that layout (widths that do not chain, one output at the end, more than MAX_LAYERS), or -1
 * with an exception set.  Close with net_close either way.
 */
static int net_open(Net *net, PyObject *layers, Py_ssize_t width)
{
    net->held = 0;
    net->n_layers = PyTuple_GET_SIZE(layers);
    if (net->n_layers > MAX_LAYERS) {
        return 0;
    }
    for (Py_ssize_t l = 0; l < net->n_layers; l++) {
        PyObject *layer = PyTuple_GET_ITEM(layers, l);
        if (!PyTuple_Check(layer) || PyTuple_GET_SIZE(layer) != 3) {
            return 0;
        }
        Py_buffer *w = &net->views[net->held];
        if (!dense_view(PyTuple_GET_ITEM(layer, 0), w, 2, 0, 0)) {
            return 0;
        }
        net->held++;
        Py_buffer *b = &net->views[net->held];
        if (!dense_view(PyTuple_GET_ITEM(layer, 1), b, 1, 0, 0)) {
            return 0;
        }
        net->held++;
        Layer *L = &net->layer[l];
        L->n_in = w->shape[0];
        L->n_out = w->shape[1];
        width = l == 0 && width < 0 ? L->n_in : width;
        if (L->n_in != width || b->shape[0] != L->n_out || L->n_out > MAX_WIDTH) {
            return 0;
        }
        L->w = (const double *)w->buf;
        L->b = (const double *)b->buf;
        L->act = PyLong_AsLong(PyTuple_GET_ITEM(layer, 2));
        if (L->act == -1 && PyErr_Occurred()) {
            return -1;
        }
        width = L->n_out;
    }
    return width == 1;
}

static void net_close(Net *net)
{
    for (Py_ssize_t i = 0; i < net->held; i++) {
        PyBuffer_Release(&net->views[i]);
    }
    net->held = 0;
}

/*
 * A model's layers exported once (dense_net) and held until the capsule goes: a cold window then
 * touches no export of the model's constant arrays (numpy describes an array anew at each export).
 */
#define NET_NAME "gateway._window.net"

/* Close and free a net of dense_net. */
static void net_free(Net *net)
{
    net_close(net);
    PyMem_Free(net);
}

static void net_release(PyObject *capsule)
{
    Net *net = (Net *)PyCapsule_GetPointer(capsule, NET_NAME);
    if (net == NULL) {
        PyErr_Clear();
        return;
    }
    net_free(net);
}

/* dense_net(layers) -> capsule | None: the layers (see net_open) held open for dense_row and dense_occlusion. */
static PyObject *dense_net(PyObject *self, PyObject *layers)
{
    (void)self;
    if (!PyTuple_Check(layers)) {
        Py_RETURN_NONE;
    }
    Net *net = (Net *)PyMem_Malloc(sizeof(Net));
    if (net == NULL) {
        return PyErr_NoMemory();
    }
    int rc = net_open(net, layers, -1);
    if (rc <= 0) {
        net_free(net);
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *capsule = PyCapsule_New(net, NET_NAME, net_release);
    if (capsule == NULL) {
        net_free(net);
    }
    return capsule;
}

/*
 * The net for rows of width inputs: a capsule of dense_net (*net points into it, nothing to close)
 * or a tuple of layers opened into *own (close it): 1, 0 where the numpy path must run, -1 with
 * an exception set.
 */
static int net_for(PyObject *layers, Py_ssize_t width, Net *own, const Net **net)
{
    own->held = 0;
    if (PyCapsule_CheckExact(layers)) {
        const Net *held = (const Net *)PyCapsule_GetPointer(layers, NET_NAME);
        if (held == NULL) {
            PyErr_Clear();
            return 0;
        }
        *net = held;
        return held->layer[0].n_in == width;
    }
    *net = own;
    return PyTuple_Check(layers) ? net_open(own, layers, width) : 0;
}

/* The score of the row h (the first layer's inputs; h is overwritten) through an open net. */
static double forward(const Net *net, double *h)
{
    double spare[MAX_WIDTH];
    double *y = spare;
    for (Py_ssize_t l = 0; l < net->n_layers; l++) {
        const Layer *L = &net->layer[l];
        for (Py_ssize_t j = 0; j < L->n_out; j++) {
            double acc = 0.0;
            for (Py_ssize_t i = 0; i < L->n_in; i++) {
                acc += h[i] * L->w[i * L->n_out + j];
            }
            y[j] = activate(acc + L->b[j], L->act);
        }
        double *swap = h;
        h = y;
        y = swap;
    }
    return h[0];
}

/*
 * dense_row(x, layers) -> (1,) float64 array | None: gateway.inference.backends.DenseBackend at batch 1.
 * Every layer is a loop of float64 products summed in input order from 0.0, then the bias, then
 * the activation, as the numpy backend sums its last layer in Python: that layer is the same to
 * the bit, hidden layers differ from BLAS's order by a few roundings (DENSE_BATCH1_TOLERANCE).
 * x: a (1, n) or (n,) float32 or float64 array; layers: see net_open, or their dense_net.  None
 * where the numpy path must run (another layout, widths that do not chain, a layer wider than
 * MAX_WIDTH).
 */
static PyObject *dense_row(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *xo, *layers;
    if (!PyArg_ParseTuple(args, "OO", &xo, &layers)) {
        return NULL;
    }
    Py_buffer xv;
    if (!dense_view(xo, &xv, -1, 1, 0)) {
        Py_RETURN_NONE;
    }
    int nd = xv.ndim;
    if (!(nd == 1 || (nd == 2 && xv.shape[0] == 1)) || xv.shape[nd - 1] > MAX_WIDTH) {
        PyBuffer_Release(&xv);
        Py_RETURN_NONE;
    }
    Py_ssize_t width = xv.shape[nd - 1];
    double h[MAX_WIDTH];
    for (Py_ssize_t i = 0; i < width; i++) {
        h[i] = item(&xv, i);
    }
    PyBuffer_Release(&xv);
    Net own;
    const Net *net;
    int rc = net_for(layers, width, &own, &net);
    PyObject *out = NULL;
    if (rc > 0) {
        double *y;
        double score = forward(net, h);
        out = new_doubles(-1, 1, &y);
        if (out != NULL) {
            *y = score;
        }
    } else if (rc == 0) {
        out = Py_NewRef(Py_None);
    }
    net_close(&own);
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
    if (!PyArg_ParseTuple(args, "OdO", &zo, &clip, &layers)) {
        return NULL;
    }
    Py_buffer zv;
    if (!dense_view(zo, &zv, 2, 1, 0)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t k = zv.shape[0], n = zv.shape[1];
    Net own;
    const Net *net = &own;
    own.held = 0;
    int rc = n > MAX_WIDTH ? 0 : k == 0 ? 1 : net_for(layers, n, &own, &net);
    PyObject *out = NULL;
    double *scores;
    if (rc > 0 && (out = new_doubles(k, n + 1, &scores)) != NULL) {
        double row[MAX_WIDTH], h[MAX_WIDTH];
        for (Py_ssize_t r = 0; r < k; r++) {
            for (Py_ssize_t i = 0; i < n; i++) {
                double v = item(&zv, r * n + i);
                v = v < -clip ? -clip : (v > clip ? clip : v); /* np.clip of finite values */
                row[i] = (double)(float)v;                     /* astype(np.float32) */
            }
            for (Py_ssize_t p = 0; p <= n; p++) {
                memcpy(h, row, (size_t)n * sizeof(double));
                if (p < n) {
                    h[p] = 0.0;
                }
                scores[r * (n + 1) + p] = forward(net, h);
            }
        }
    } else if (rc == 0) {
        out = Py_NewRef(Py_None);
    }
    net_close(&own);
    PyBuffer_Release(&zv);
    return out;
}

/*
 * A window's input row and baseline (gateway.inference.runner), each the numpy operations it
 * replaces to the bit: np.array of Python floats; (x - mean) / std; level += (x - level) * scaled
 * clamped to [lo, hi].
 */

/*
 * A 1-D float64 C-contiguous array of n elements (any n when n < 0), writable when asked, as a
 * pointer, v held; else NULL.
 */
static double *vec(PyObject *o, Py_buffer *v, Py_ssize_t *n, int writable)
{
    if (!dense_view(o, v, 1, 0, writable)) {
        return NULL;
    }
    if (*n >= 0 && v->shape[0] != *n) {
        PyBuffer_Release(v);
        return NULL;
    }
    *n = v->shape[0];
    return (double *)v->buf;
}

/* vector(values) -> float64 array | None: None unless every value is a Python float. */
static PyObject *vector(PyObject *self, PyObject *values)
{
    (void)self;
    if (!PyList_Check(values)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyList_GET_SIZE(values);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyFloat_CheckExact(PyList_GET_ITEM(values, i))) {
            Py_RETURN_NONE;
        }
    }
    double *p;
    PyObject *out = new_doubles(-1, n, &p);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
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
    Py_buffer xv, mv, sv;
    Py_ssize_t n = -1;
    const double *x = vec(xo, &xv, &n, 0), *m = x ? vec(mo, &mv, &n, 0) : NULL;
    const double *sd = m ? vec(so, &sv, &n, 0) : NULL;
    PyObject *result = NULL;
    double *z;
    PyObject *out = sd ? new_doubles(1, n, &z) : NULL;
    if (out != NULL) {
        double zmax = 0.0;
        int finite = 1;
        for (Py_ssize_t i = 0; i < n; i++) {
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
        result = Py_BuildValue("NdO", out, zmax, finite ? Py_True : Py_False);
    } else if (sd == NULL) {
        result = Py_NewRef(Py_None);
    }
    if (sd != NULL) {
        PyBuffer_Release(&sv);
    }
    if (m != NULL) {
        PyBuffer_Release(&mv);
    }
    if (x != NULL) {
        PyBuffer_Release(&xv);
    }
    return result;
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
    Py_buffer views[5]; /* x, scaled, level, lo, hi */
    int held = 0;
    PyObject *result = Py_None;
    Py_ssize_t n = -1;
    const double *x = vec(xo, &views[held], &n, 0);
    held += x != NULL;
    const double *sc = x ? vec(so, &views[held], &n, 0) : NULL;
    held += sc != NULL;
    double *level = sc ? vec(lo_o, &views[held], &n, 1) : NULL;
    held += level != NULL;
    const double *lo = NULL, *hi = NULL;
    if (level == NULL || n > MAX_WIDTH) {
        goto done;
    }
    if (lo_b != Py_None || hi_b != Py_None) {
        lo = vec(lo_b, &views[held], &n, 0);
        held += lo != NULL;
        hi = lo ? vec(hi_b, &views[held], &n, 0) : NULL;
        held += hi != NULL;
        if (hi == NULL) {
            goto done;
        }
    }
    double step[MAX_WIDTH];
    for (Py_ssize_t i = 0; i < n; i++) {
        double d = x[i] - level[i];
        d *= sc[i];
        if (!isfinite(d)) {
            result = Py_False;
            goto done;
        }
        step[i] = d;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = level[i] + step[i];
        if (lo != NULL) {
            v = v < lo[i] ? lo[i] : (v > hi[i] ? hi[i] : v);
        }
        level[i] = v;
    }
    result = Py_True;
done:
    while (held > 0) {
        PyBuffer_Release(&views[--held]);
    }
    return Py_NewRef(result);
}

/*
 * pca_row(z, center, load, eig) -> (T², SPE) | None: gateway.inference.novelty._stats of one
 * prepared row.  zc = z - center; t = zc @ load and the residual zc - t @ load.T, each product
 * summed in input order (not BLAS's: within NOVELTY_TOLERANCE of it); T² = sum(t * t / eig) and
 * SPE = sum(resid²) in numpy's order (the first term, then the pairwise sum of the rest).
 * z: (1, m) or (m,) float64 C-contiguous; center (m,) and eig (r,) likewise; load (m, r) float64
 * of any strides.  None for other layouts, sizes, or r or m above MAX_WIDTH.
 */
static PyObject *pca_row(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *zo, *co, *lo, *eo;
    if (!PyArg_ParseTuple(args, "OOOO", &zo, &co, &lo, &eo)) {
        return NULL;
    }
    Py_buffer zv, cv, lv, ev;
    int held = 0;
    PyObject *out = NULL;
    if (!dense_view(zo, &zv, -1, 0, 0)) {
        Py_RETURN_NONE;
    }
    held = 1;
    Py_ssize_t m = zv.ndim >= 1 ? zv.shape[zv.ndim - 1] : -1, r = -1, s0 = 0, s1 = 0;
    const double *center = NULL;
    if (!(zv.ndim == 1 || (zv.ndim == 2 && zv.shape[0] == 1)) || m < 1 || m > MAX_WIDTH ||
        (center = vec(co, &cv, &m, 0)) == NULL) {
        goto decline;
    }
    held = 2;
    if (!view_of(lo, &lv, 0)) {
        goto decline;
    }
    held = 3;
    if (lv.ndim != 2 || kind_of(&lv) != 'd' || lv.shape[0] != m || lv.shape[1] < 1 || lv.shape[1] > MAX_WIDTH ||
        lv.strides[0] % (Py_ssize_t)sizeof(double) != 0 || lv.strides[1] % (Py_ssize_t)sizeof(double) != 0) {
        goto decline;
    }
    r = lv.shape[1];
    s0 = lv.strides[0] / (Py_ssize_t)sizeof(double);
    s1 = lv.strides[1] / (Py_ssize_t)sizeof(double);
    const double *eig = vec(eo, &ev, &r, 0);
    if (eig == NULL) {
        goto decline;
    }
    held = 4;
    const double *z = (const double *)zv.buf, *load = (const double *)lv.buf;
    double zc[MAX_WIDTH], t[MAX_WIDTH], part[MAX_WIDTH];
    for (Py_ssize_t i = 0; i < m; i++) {
        zc[i] = z[i] - center[i];
    }
    for (Py_ssize_t j = 0; j < r; j++) {
        double acc = 0.0;
        for (Py_ssize_t i = 0; i < m; i++) {
            acc += zc[i] * load[i * s0 + j * s1];
        }
        t[j] = acc;
        part[j] = t[j] * t[j];
        part[j] /= eig[j];
    }
    Col pc = {part, 1};
    double t2 = SEGMENT(sum_at, pc, pc, r, 0.0, 0.0);
    for (Py_ssize_t i = 0; i < m; i++) {
        double acc = 0.0;
        for (Py_ssize_t j = 0; j < r; j++) {
            acc += t[j] * load[i * s0 + j * s1];
        }
        double e = zc[i] - acc;
        part[i] = e * e;
    }
    double spe = SEGMENT(sum_at, pc, pc, m, 0.0, 0.0);
    out = Py_BuildValue("dd", t2, spe);
    goto done;
decline:
    out = Py_NewRef(Py_None);
done:
    if (held >= 4) {
        PyBuffer_Release(&ev);
    }
    if (held >= 3) {
        PyBuffer_Release(&lv);
    }
    if (held >= 2) {
        PyBuffer_Release(&cv);
    }
    PyBuffer_Release(&zv);
    return out;
}

static PyMethodDef methods[] = {
    {"features", features, METH_VARARGS,
     "Features of two or more non-empty streams' windows in one pass, or None where the numpy pass decides."},
    {"dense_row", dense_row, METH_VARARGS,
     "One row's score through dense layers, or None where the numpy path must run."},
    {"dense_net", dense_net, METH_O, "Dense layers held open for dense_row and dense_occlusion, or None."},
    {"dense_occlusion", dense_occlusion, METH_VARARGS,
     "The scores of a window's occlusion probes and of the window itself, or None."},
    {"vector", vector, METH_O, "A list of Python floats as a float64 array, or None."},
    {"zrow", zrow, METH_VARARGS, "(x - mean) / std as a (1, n) array, its largest finite |z|, all finite."},
    {"follow", follow, METH_VARARGS, "A baseline's step in place; False where the numpy path must take it."},
    {"pca_row", pca_row, METH_VARARGS, "T² and SPE of one prepared row under a PCA subspace, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway._window",
    "A window's compiled paths: features and a dense-layer score (see gateway.pipeline.features).", -1,
    methods, NULL, NULL, NULL, NULL,
};

/* What gateway/compiled.py checks: a build of other sources (an older install) is not used. */
#define WINDOW_VERSION 5

PyMODINIT_FUNC PyInit__window(void)
{
    /* numpy through its Python API only: no headers at build time, no ABI to match at import. */
    PyObject *numpy = PyImport_ImportModule("numpy");
    if (numpy == NULL) {
        return NULL;
    }
    np_ndarray = PyObject_GetAttrString(numpy, "ndarray");
    np_empty = np_ndarray != NULL ? PyObject_GetAttrString(numpy, "empty") : NULL;
    Py_DECREF(numpy);
    if (np_ndarray == NULL || np_empty == NULL || !PyType_Check(np_ndarray)) {
        PyErr_SetString(PyExc_ImportError, "gateway._window: numpy.ndarray or numpy.empty not found");
        goto error;
    }
    key_mean = PyUnicode_InternFromString("mean");
    key_std = PyUnicode_InternFromString("std");
    key_min = PyUnicode_InternFromString("min");
    key_max = PyUnicode_InternFromString("max");
    key_slope = PyUnicode_InternFromString("slope");
    if (!key_mean || !key_std || !key_min || !key_max || !key_slope) {
        goto error;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        goto error;
    }
    if (PyModule_AddIntConstant(m, "VERSION", WINDOW_VERSION) < 0) {
        Py_DECREF(m);
        goto error;
    }
    return m;
error:
    /* A failed import is tried again on the next one: what this one took is given back (and the
       pointers cleared, so a later successful init starts from nothing). */
    Py_CLEAR(np_ndarray);
    Py_CLEAR(np_empty);
    Py_CLEAR(key_mean);
    Py_CLEAR(key_std);
    Py_CLEAR(key_min);
    Py_CLEAR(key_max);
    Py_CLEAR(key_slope);
    return NULL;
}
