/* Optional C speedup of cpmproxy.imap.framing.numbered_run_end (the pure-Python version there is the
 * reference; a hypothesis test checks that both agree).
 *
 * A bulk FETCH answer is thousands of short lines. The relay must know where the run of numbered
 * untagged lines ("* 17 FETCH ...") ends: any other line (a tagged completion, "* FLAGS", "* BYE",
 * "* VANISHED") needs a closer look. A regular expression takes ~1.5 ns per byte for that (a lookahead
 * at every line end); memchr from line end to line end ~0.2; where SSE2 is (every x86-64), comparing 16
 * bytes at once ~0.06 (lines are ~30 bytes: a memchr call per line mostly paid its set-up).
 * No allocation, no state. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#if defined(__SSE2__) && defined(__GNUC__)
#include <emmintrin.h>
#define SCAN_SSE2 1
#endif

/* Does the line at ``line`` (before ``end``) break the run? */
static inline int
breaks_run(const char *line, const char *end)
{
    return end - line < 3 || line[0] != '*' || line[1] != ' ' || (unsigned char)(line[2] - '0') > 9;
}

static Py_ssize_t
run_end(const char *start, Py_ssize_t len)
{
    const char *end = start + len, *at = start;
#ifdef SCAN_SSE2
    const __m128i lf = _mm_set1_epi8('\n');
    for (; end - at >= 16; at += 16) {
        unsigned mask = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)at), lf));
        while (mask) {
            const char *line = at + __builtin_ctz(mask) + 1;
            mask &= mask - 1;
            if (line >= end)
                return len;
            if (breaks_run(line, end))
                return line - start;
        }
    }
#endif
    while (at < end) {
        const char *nl = memchr(at, '\n', (size_t)(end - at));
        if (nl == NULL || nl + 1 >= end)
            break;
        at = nl + 1;
        if (breaks_run(at, end))
            return at - start;
    }
    return len;
}

/* numbered_run_end(data) -> int: the offset of the first line after the first one that does not start
 * with "* " and a digit, or len(data) if there is none (the first line itself is not looked at). */
static PyObject *
numbered_run_end(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t cut = run_end(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(cut);
}

static PyMethodDef scan_methods[] = {
    {"numbered_run_end", numbered_run_end, METH_O,
     "Offset of the first line (after the first) not starting with '* <digit>', or len(data)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "cpmproxy.imap._scan", "C speedups of cpmproxy.imap.framing.", 0, scan_methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&scan_module);
}
