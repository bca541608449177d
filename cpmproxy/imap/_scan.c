/* Optional C speedup of cpmproxy.imap.framing.numbered_run_end (the pure-Python version there is the
 * reference; a hypothesis test checks that both agree).
 *
 * A bulk FETCH answer is thousands of short lines. The relay must know where the run of numbered
 * untagged lines ("* 17 FETCH ...") ends: any other line (a tagged completion, "* FLAGS", "* BYE",
 * "* VANISHED") needs a closer look. A regular expression takes ~1.5 ns per byte for that (a lookahead
 * at every line end); memchr from line end to line end takes ~0.2. No allocation, no state. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* numbered_run_end(data) -> int: the offset of the first line after the first one that does not start
 * with "* " and a digit, or len(data) if there is none (the first line itself is not looked at). */
static PyObject *
numbered_run_end(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *start = view.buf, *end = start + view.len, *at = start;
    Py_ssize_t cut = view.len;
    while (at < end) {
        const char *nl = memchr(at, '\n', (size_t)(end - at));
        if (nl == NULL || nl + 1 >= end)
            break;
        at = nl + 1;
        if (end - at < 3 || at[0] != '*' || at[1] != ' ' || (unsigned char)(at[2] - '0') > 9) {
            cut = at - start;
            break;
        }
    }
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
