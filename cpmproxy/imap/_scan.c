/* Optional C speedups of cpmproxy.imap.framing: numbered_run_end, lower_case_name and renumber_fetch_lines
 * (the pure-Python versions there are the reference; hypothesis tests check that both agree).
 *
 * A bulk FETCH answer is thousands of short lines. The relay must know where the run of numbered
 * untagged lines ("* 17 FETCH ...") ends: any other line (a tagged completion, "* FLAGS", "* BYE",
 * "* VANISHED"), or one whose name is not in upper case ("* 3 expunge"), needs a closer look. A regular
 * expression takes ~1.5 ns per byte for that (a lookahead at every line end); memchr from line end to
 * line end ~0.2; where SSE2 is (every x86-64), comparing 16 bytes at once ~0.06 (lines are ~30 bytes: a
 * memchr call per line mostly paid its set-up), and the name's case ~1 ns more per line.
 * No allocation, no state. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#if defined(__SSE2__) && defined(__GNUC__)
#include <emmintrin.h>
#define SCAN_SSE2 1
#endif

/* Does the line at ``line`` (before ``end``), if untagged ("* ", "* <digits> "), have a response name
 * with a lower-case letter in it (up to its first byte that is no letter)? */
static int
lower_case_name_scalar(const char *line, const char *end)
{
    const char *at = line + 2;
    if ((unsigned char)(*at - '0') <= 9) {
        while (at < end && (unsigned char)(*at - '0') <= 9)
            at++;
        if (at >= end || *at != ' ')
            return 0;
        at++;
    }
    for (; at < end; at++) {
        unsigned char c = (unsigned char)*at;
        if ((unsigned char)(c - 'a') <= 'z' - 'a')
            return 1;
        if ((unsigned char)(c - 'A') > 'Z' - 'A')
            return 0;
    }
    return 0;
}

#ifdef SCAN_SSE2
/* Bit i set where byte i of ``v`` is in lo..hi (signed compares: no byte from 0x80 up is in an ASCII range). */
static inline unsigned
in_range(__m128i v, char lo, char hi)
{
    return (unsigned)_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi8(v, _mm_set1_epi8((char)(lo - 1))),
                                                      _mm_cmplt_epi8(v, _mm_set1_epi8((char)(hi + 1)))));
}
#endif

static inline int
lower_case_name_at(const char *line, const char *end)
{
    if (end - line < 3 || line[0] != '*' || line[1] != ' ')
        return 0;
#ifdef SCAN_SSE2
    /* The 16 bytes after "* " at once (a byte loop over number and name took 4x the time of the line-end
     * scan): where the number ends, where the name does, whether a lower-case letter is in it. A number
     * or name that goes on past them is left to the byte loop. */
    if (end - line >= 18) {
        __m128i v = _mm_loadu_si128((const __m128i *)(line + 2));
        /* First the common case, in a third of the time: no lower-case letter in these bytes (nor
         * "{|}~" and DEL, which one compare takes in), and two spaces (the one after a number, one after
         * the name; or one after the name), so the name ends in them. */
        unsigned spaces = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')));
        if (!_mm_movemask_epi8(_mm_cmpgt_epi8(v, _mm_set1_epi8('a' - 1))) && (spaces & (spaces - 1)))
            return 0;
        unsigned letters = in_range(_mm_or_si128(v, _mm_set1_epi8(0x20)), 'a', 'z');  /* (either case) */
        unsigned lower = letters & (unsigned)_mm_movemask_epi8(_mm_slli_epi16(v, 2));  /* (bit 5: 0x20) */
        unsigned name = 0;
        if ((unsigned char)(line[2] - '0') <= 9) {
            unsigned digits = in_range(v, '0', '9');
            name = (unsigned)__builtin_ctz(~digits);  /* (bits 16 up set: never past 16) */
            if (name >= 15)
                return lower_case_name_scalar(line, end);
            if (line[2 + name] != ' ')
                return 0;
            name++;
        }
        unsigned name_end = name + (unsigned)__builtin_ctz(~letters >> name);
        if (name_end >= 16)
            return lower_case_name_scalar(line, end);
        return (lower & ((1u << name_end) - 1)) != 0;  /* (before the name: digits, a space, no letter) */
    }
#endif
    return lower_case_name_scalar(line, end);
}

static inline int
numbered(const char *line, const char *end)
{
    return end - line >= 3 && line[0] == '*' && line[1] == ' ' && (unsigned char)(line[2] - '0') <= 9;
}

/* Does the line at ``line`` (before ``end``) break the run? (Its name is looked at only when numbered.) */
static inline int
breaks_run(const char *line, const char *end)
{
    return !numbered(line, end) || lower_case_name_at(line, end);
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
 * with "* " and a digit, or of the first numbered line whose name has a lower-case letter (the first line
 * too: 0), or len(data) if there is none. */
static PyObject *
numbered_run_end(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t cut = numbered(view.buf, (const char *)view.buf + view.len)
        && lower_case_name_at(view.buf, (const char *)view.buf + view.len) ? 0 : run_end(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(cut);
}

/* lower_case_name(data) -> bool: see cpmproxy.imap.framing. Every line start, found as run_end finds
 * them; a line's name is a few bytes after it. */
static PyObject *
lower_case_name(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *start = view.buf, *end = start + view.len, *at = start;
    int found = lower_case_name_at(start, end);
#ifdef SCAN_SSE2
    const __m128i lf = _mm_set1_epi8('\n');
    for (; !found && end - at >= 16; at += 16) {
        unsigned mask = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)at), lf));
        while (mask) {
            const char *line = at + __builtin_ctz(mask) + 1;
            mask &= mask - 1;
            if (lower_case_name_at(line, end)) {
                found = 1;
                break;
            }
        }
    }
#endif
    while (!found && at < end) {
        const char *nl = memchr(at, '\n', (size_t)(end - at));
        if (nl == NULL)
            break;
        at = nl + 1;
        found = lower_case_name_at(at, end);
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static const char FETCH_WORD[] = " FETCH ";
#define FETCH_WORD_LEN (sizeof FETCH_WORD - 1)

/* Parse "* <digits> FETCH " at ``line``; returns the offset just after it, or 0 if the line does not start
 * so. ``*number`` gets the message number, or -1 when it has more digits than any mailbox can reach. */
static Py_ssize_t
fetch_prefix(const char *line, const char *end, Py_ssize_t *number)
{
    const char *at = line + 2;
    Py_ssize_t n = 0;
    int digits = 0;
    if (end - line < 4 || line[0] != '*' || line[1] != ' ')
        return 0;
    for (; at < end && (unsigned char)(*at - '0') <= 9; at++) {
        if (n || *at != '0')
            digits++;
        if (digits <= 18)
            n = n * 10 + (*at - '0');
    }
    if (at == line + 2 || end - at < (Py_ssize_t)FETCH_WORD_LEN || memcmp(at, FETCH_WORD, FETCH_WORD_LEN))
        return 0;
    *number = digits > 18 ? -1 : n;
    return at + FETCH_WORD_LEN - line;
}

/* renumber_fetch_lines(block, numbers) -> bytes | None: see cpmproxy.imap.framing. */
static PyObject *
renumber_fetch_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *numbers, *out = NULL;
    if (nargs != 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "renumber_fetch_lines(block, numbers: list)");
        return NULL;
    }
    numbers = args[1];
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const char *start = view.buf, *end = start + view.len, *line = start;
    if (view.len && end[-1] != '\n')
        goto none;
    /* The new numbers are never longer than 20 digits: room for every line's prefix to grow by that. */
    Py_ssize_t lines = 0;
    for (const char *nl = start; (nl = memchr(nl, '\n', (size_t)(end - nl))) != NULL; nl++)
        lines++;
    out = PyBytes_FromStringAndSize(NULL, view.len + 20 * lines);
    if (out == NULL)
        goto done;
    char *w = PyBytes_AS_STRING(out);
    Py_ssize_t top = PyList_GET_SIZE(numbers);
    while (line < end) {
        Py_ssize_t number, client = 0;
        Py_ssize_t skip = fetch_prefix(line, end, &number);
        if (!skip) {
            Py_CLEAR(out);
            goto none;
        }
        const char *nl = memchr(line + skip, '\n', (size_t)(end - line - skip));
        if (nl == NULL) {  /* (cannot happen: the block ends with a line end, the prefix has none) */
            Py_CLEAR(out);
            goto none;
        }
        const char *next = nl + 1;
        if (number >= 0 && number < top) {
            client = PyLong_AsSsize_t(PyList_GET_ITEM(numbers, number));
            if (client == -1 && PyErr_Occurred()) {
                Py_CLEAR(out);
                goto done;
            }
        }
        if (client > 0) {
            char digits[24];
            int k = 0;
            for (; client; client /= 10)
                digits[k++] = (char)('0' + client % 10);
            *w++ = '*';
            *w++ = ' ';
            while (k)
                *w++ = digits[--k];
            memcpy(w, FETCH_WORD, FETCH_WORD_LEN);
            w += FETCH_WORD_LEN;
            memcpy(w, line + skip, (size_t)(next - line - skip));
            w += next - line - skip;
        }
        line = next;
    }
    if (_PyBytes_Resize(&out, w - PyBytes_AS_STRING(out)) < 0)
        out = NULL;
    goto done;
none:
    out = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef scan_methods[] = {
    {"numbered_run_end", numbered_run_end, METH_O,
     "Offset of the first line (after the first) not starting with '* <digit>', or of a numbered one whose\n"
     "name has a lower-case letter (the first too), or len(data)."},
    {"lower_case_name", lower_case_name, METH_O,
     "Whether an untagged line's response name has a lower-case letter."},
    {"renumber_fetch_lines", (PyCFunction)(void (*)(void))renumber_fetch_lines, METH_FASTCALL,
     "FETCH lines with their numbers mapped through a list (0: line dropped), or None."},
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
