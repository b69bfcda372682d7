/* poolport.codec._cetf: optional C accelerator for the ETF codec in poolport/codec/etf.py.
 *
 * The pure-Python codec stays the reference. This module only handles the common,
 * well-formed cases itself and hands everything else to the Python functions it was
 * built with, so errors, odd types and edge cases come out exactly as Python's:
 *
 * Decoder(fallback, special, atom_type, improper_list, wrap_map).decode(data, pos, depth, budget)
 *     -> (term, end)
 *     fallback is etf's Python ``dec(data, pos, depth, budget)``; budget is a one-item list
 *     holding how many more elements the term may hold, lowered by every container's
 *     element count as it is opened (a container over it goes to Python, which raises). special maps atom names to
 *     True/False/None; atom_type is terms.Atom, improper_list terms.ImproperList and
 *     wrap_map etf's ``_map_with_wrapped_keys(keys, values, pos)``. Integers (97, 98,
 *     bignums up to 8 digit bytes), finite NEW_FLOATs, atoms up to 255 bytes, binaries,
 *     tuples, NIL, STRING_EXT, lists (improper ones too) and maps are decoded here (a map
 *     with clashing or unhashable keys is finished by wrap_map); any other tag, or
 *     anything short, odd or out of depth, goes to fallback for that sub-term. A
 *     container found malformed half-way is restarted in Python from its first byte,
 *     which then raises: every sub-term is decoded at most once on the way to a result,
 *     so decoding stays linear in the input, however deeply the rare cases nest.
 *
 * Encoder(fallback, none_bytes, atom_type, latin1).encode(term, put)
 *     fallback is etf's Python ``enc(x, put)``; none_bytes the encoding of none_atom.
 *     Exact int/bytes/Atom/str/dict/list/tuple/float/None/True/False are written into
 *     one buffer, anything else by fallback (into a list that is then copied in);
 *     put is called once with the whole bytes. latin1 is etf's atom_encoding: true
 *     writes an atom whose characters are all Latin-1 as ATOM_EXT (100, what OTP 25's
 *     term_to_binary writes, straight from the str's one-byte-per-character data), any
 *     other atom as SMALL_ATOM_UTF8_EXT (119) or ATOM_UTF8_EXT (118); false writes
 *     every atom as 119/118 (OTP 26+). The fallback must have been built for the same
 *     setting.
 *
 * C recursion is capped at MAX_NEST containers; deeper terms continue in Python.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_NEST 200     /* containers nested in C before the rest is left to Python */
#define ATOM_SLOTS 1024  /* direct-mapped atom memo per decoder (a power of two) */

/* ------------------------------------------------------------------ decoder */

typedef struct {
    PyObject *name;  /* bytes: the raw atom text, or NULL */
    PyObject *value; /* Atom, True, False or None */
    int utf8;
} AtomSlot;

typedef struct {
    PyObject_HEAD
    PyObject *fallback;
    PyObject *special;
    PyObject *atom_type;
    PyObject *improper_list;
    PyObject *wrap_map;
    AtomSlot atoms[ATOM_SLOTS];
} DecoderObject;

typedef struct {
    DecoderObject *self;
    PyObject *data;
    const unsigned char *s;
    Py_ssize_t len;
    PyObject *budget; /* the caller's one-item list; st->left is its value while in C */
    Py_ssize_t left;
} DecState;

static uint32_t
get_u32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t
get_u64(const unsigned char *p)
{
    return ((uint64_t)get_u32(p) << 32) | get_u32(p + 4);
}

/* Write st->left to the budget list, keeping any exception already raised; -1 on error. */
static int
budget_store(DecState *st)
{
    PyObject *type, *value, *tb, *left;
    int rc = -1;

    PyErr_Fetch(&type, &value, &tb);
    left = PyLong_FromSsize_t(st->left);
    if (left != NULL)
        rc = PyList_SetItem(st->budget, 0, left); /* steals left */
    if (type != NULL)
        PyErr_Restore(type, value, tb);
    return rc;
}

/* Read st->left back from the budget list after Python used it; -1 on error. */
static int
budget_load(DecState *st)
{
    PyObject *type, *value, *tb, *left;
    Py_ssize_t n = -1;

    PyErr_Fetch(&type, &value, &tb);
    left = PyList_GetItem(st->budget, 0);
    if (left != NULL)
        n = PyLong_AsSsize_t(left);
    if (type != NULL)
        PyErr_Restore(type, value, tb);
    if (n == -1 && PyErr_Occurred())
        return -1;
    st->left = n;
    return 0;
}

/* Decode the sub-term at *pos in Python; returns a new reference and moves *pos. */
static PyObject *
dec_fallback(DecState *st, Py_ssize_t *pos, Py_ssize_t depth)
{
    PyObject *args[4], *res, *term, *end;
    Py_ssize_t newpos;

    if (budget_store(st) < 0)
        return NULL;
    args[0] = st->data;
    args[1] = PyLong_FromSsize_t(*pos);
    if (args[1] == NULL)
        return NULL;
    args[2] = PyLong_FromSsize_t(depth);
    if (args[2] == NULL) {
        Py_DECREF(args[1]);
        return NULL;
    }
    args[3] = st->budget;
    res = PyObject_Vectorcall(st->self->fallback, args, 4, NULL);
    Py_DECREF(args[1]);
    Py_DECREF(args[2]);
    if (budget_load(st) < 0 || res == NULL) {
        Py_XDECREF(res);
        return NULL;
    }
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "the fallback decoder must return (term, end)");
        return NULL;
    }
    term = PyTuple_GET_ITEM(res, 0);
    end = PyTuple_GET_ITEM(res, 1);
    newpos = PyLong_AsSsize_t(end);
    if (newpos == -1 && PyErr_Occurred()) {
        Py_DECREF(res);
        return NULL;
    }
    *pos = newpos; /* may lie past the end on truncated input; every read checks */
    Py_INCREF(term);
    Py_DECREF(res);
    return term;
}

static PyObject *
dec_atom(DecState *st, const unsigned char *name, Py_ssize_t n, int utf8)
{
    DecoderObject *self = st->self;
    uint32_t h = 2166136261u ^ (uint32_t)utf8;
    Py_ssize_t i;
    AtomSlot *slot;
    PyObject *text, *value, *key, *old_name, *old_value;

    for (i = 0; i < n; i++)
        h = (h ^ name[i]) * 16777619u;
    h ^= (uint32_t)n;
    slot = &self->atoms[(h ^ (h >> 13)) & (ATOM_SLOTS - 1)];
    if (slot->name != NULL && slot->utf8 == utf8 && PyBytes_GET_SIZE(slot->name) == n
        && memcmp(PyBytes_AS_STRING(slot->name), name, (size_t)n) == 0) {
        Py_INCREF(slot->value);
        return slot->value;
    }
    if (utf8)
        text = PyUnicode_DecodeUTF8((const char *)name, n, "strict");
    else
        text = PyUnicode_DecodeLatin1((const char *)name, n, "strict");
    if (text == NULL)
        return NULL; /* the caller falls back to Python for the proper DecodeError */
    value = PyDict_GetItemWithError(self->special, text);
    if (value != NULL) {
        Py_INCREF(value);
    }
    else if (PyErr_Occurred()) {
        Py_DECREF(text);
        return NULL;
    }
    else {
        value = PyObject_CallOneArg(self->atom_type, text);
        if (value == NULL) {
            Py_DECREF(text);
            return NULL;
        }
    }
    Py_DECREF(text);
    key = PyBytes_FromStringAndSize((const char *)name, n);
    if (key == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    /* Swap the slot's contents before releasing the old ones. */
    old_name = slot->name;
    old_value = slot->value;
    Py_INCREF(value);
    slot->name = key;
    slot->value = value;
    slot->utf8 = utf8;
    Py_XDECREF(old_name);
    Py_XDECREF(old_value);
    return value;
}

static PyObject *dec_term(DecState *st, Py_ssize_t *pos, Py_ssize_t depth, int level);

/* A container found malformed half-way: Python decodes it again from its first byte and
 * raises the proper error. Only for errors: a restart that succeeded would decode the
 * sub-terms twice, once per nesting level of such containers. left0 is the budget as it
 * was before the container was opened: Python charges it again. */
static PyObject *
dec_restart(DecState *st, PyObject *partial, Py_ssize_t start, Py_ssize_t *pos, Py_ssize_t depth,
            Py_ssize_t left0)
{
    Py_XDECREF(partial);
    *pos = start;
    st->left = left0;
    return dec_fallback(st, pos, depth);
}

/* Decode a term and append it to list; -1 on error. */
static int
dec_append(DecState *st, PyObject *list, Py_ssize_t *pos, Py_ssize_t depth, int level)
{
    PyObject *item = dec_term(st, pos, depth, level);
    int rc;

    if (item == NULL)
        return -1;
    rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* The rest of the MAP_EXT at start whose pair i has a key that the dict done cannot take
 * as it is (see etf's map_slow): decode the remaining pairs here and let wrap_map build
 * the dict. Steals done and key. */
static PyObject *
dec_map_wrapped(DecState *st, PyObject *done, PyObject *key, Py_ssize_t i, Py_ssize_t n,
                Py_ssize_t start, Py_ssize_t q, Py_ssize_t *pos, Py_ssize_t depth, int level,
                Py_ssize_t left0)
{
    PyObject *keys = NULL, *values = NULL, *args[3], *result = NULL;

    if (PyDict_GET_SIZE(done) != i) { /* two equal atom keys merged: Python raises */
        Py_DECREF(key);
        return dec_restart(st, done, start, pos, depth, left0);
    }
    keys = PyDict_Keys(done);
    values = PyDict_Values(done);
    Py_DECREF(done);
    if (keys == NULL || values == NULL || PyList_Append(keys, key) < 0)
        goto done;
    if (dec_append(st, values, &q, depth - 1, level + 1) < 0)
        goto done;
    for (i++; i < n; i++) {
        if (dec_append(st, keys, &q, depth - 1, level + 1) < 0
            || dec_append(st, values, &q, depth - 1, level + 1) < 0)
            goto done;
    }
    args[0] = keys;
    args[1] = values;
    args[2] = PyLong_FromSsize_t(start);
    if (args[2] == NULL)
        goto done;
    result = PyObject_Vectorcall(st->self->wrap_map, args, 3, NULL);
    Py_DECREF(args[2]);
    *pos = q;
done:
    Py_DECREF(key);
    Py_XDECREF(keys);
    Py_XDECREF(values);
    return result;
}

static PyObject *
dec_term(DecState *st, Py_ssize_t *pos, Py_ssize_t depth, int level)
{
    const unsigned char *s = st->s;
    Py_ssize_t len = st->len;
    Py_ssize_t p = *pos, n, i, start;
    PyObject *result, *item, *value;
    int utf8;

    if (p < 0 || p >= len)
        return dec_fallback(st, pos, depth);
    switch (s[p]) {
    case 97: /* SMALL_INTEGER_EXT */
        if (len - p < 2)
            break;
        *pos = p + 2;
        return PyLong_FromLong(s[p + 1]);
    case 98: /* INTEGER_EXT */
        if (len - p < 5)
            break;
        *pos = p + 5;
        return PyLong_FromLong((long)(int32_t)get_u32(s + p + 1));
    case 70: { /* NEW_FLOAT_EXT */
        uint64_t bits;
        double d;
        if (len - p < 9)
            break;
        bits = get_u64(s + p + 1);
        memcpy(&d, &bits, sizeof d);
        if (!isfinite(d))
            break; /* Python raises the DecodeError */
        *pos = p + 9;
        return PyFloat_FromDouble(d);
    }
    case 109: /* BINARY_EXT */
        if (len - p < 5)
            break;
        n = (Py_ssize_t)get_u32(s + p + 1);
        if (n < 0 || len - p - 5 < n)
            break;
        *pos = p + 5 + n;
        return PyBytes_FromStringAndSize((const char *)s + p + 5, n);
    case 119: /* SMALL_ATOM_UTF8_EXT */
    case 115: /* SMALL_ATOM_EXT */
        if (len - p < 2)
            break;
        n = s[p + 1];
        start = p + 2;
        utf8 = s[p] == 119;
        goto atom;
    case 118: /* ATOM_UTF8_EXT */
    case 100: /* ATOM_EXT */
        if (len - p < 3)
            break;
        n = ((Py_ssize_t)s[p + 1] << 8) | s[p + 2];
        if (n > 255)
            break; /* maybe too many characters: Python decides */
        start = p + 3;
        utf8 = s[p] == 118;
    atom:
        if (len - start < n)
            break;
        value = dec_atom(st, s + start, n, utf8);
        if (value == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
                return NULL;
            PyErr_Clear();
            break;
        }
        *pos = start + n;
        return value;
    case 106: /* NIL_EXT */
        *pos = p + 1;
        return PyList_New(0);
    case 107: /* STRING_EXT */
        if (len - p < 3)
            break;
        n = ((Py_ssize_t)s[p + 1] << 8) | s[p + 2];
        if (len - p - 3 < n || n > st->left)
            break;
        st->left -= n;
        result = PyList_New(n);
        if (result == NULL)
            return NULL;
        for (i = 0; i < n; i++)
            PyList_SET_ITEM(result, i, PyLong_FromLong(s[p + 3 + i])); /* cached small ints */
        *pos = p + 3 + n;
        return result;
    case 110:   /* SMALL_BIG_EXT */
    case 111: { /* LARGE_BIG_EXT */
        Py_ssize_t first;
        uint64_t mag = 0;
        if (s[p] == 110) {
            if (len - p < 3)
                break;
            n = s[p + 1];
            first = p + 3;
        }
        else {
            if (len - p < 6)
                break;
            n = (Py_ssize_t)get_u32(s + p + 1);
            first = p + 6;
        }
        if (n < 0 || n > 8 || len - first < n)
            break; /* more than 64 bits: Python's int.from_bytes */
        for (i = n - 1; i >= 0; i--)
            mag = (mag << 8) | s[first + i];
        *pos = first + n;
        if (!s[first - 1] || mag == 0)
            return PyLong_FromUnsignedLongLong(mag);
        if (mag <= (uint64_t)LLONG_MAX)
            return PyLong_FromLongLong(-(long long)mag);
        item = PyLong_FromUnsignedLongLong(mag);
        if (item == NULL)
            return NULL;
        value = PyNumber_Negative(item);
        Py_DECREF(item);
        return value;
    }
    case 104:   /* SMALL_TUPLE_EXT */
    case 105: { /* LARGE_TUPLE_EXT */
        Py_ssize_t q;
        if (s[p] == 104) {
            if (len - p < 2)
                break;
            n = s[p + 1];
            q = p + 2;
        }
        else {
            if (len - p < 5)
                break;
            n = (Py_ssize_t)get_u32(s + p + 1);
            q = p + 5;
        }
        if (n < 0 || n > len - q || depth <= 0 || level >= MAX_NEST || n > st->left)
            break;
        st->left -= n;
        result = PyTuple_New(n);
        if (result == NULL)
            return NULL;
        for (i = 0; i < n; i++) {
            item = dec_term(st, &q, depth - 1, level + 1);
            if (item == NULL) {
                Py_DECREF(result);
                return NULL;
            }
            PyTuple_SET_ITEM(result, i, item);
        }
        *pos = q;
        return result;
    }
    case 108: { /* LIST_EXT */
        Py_ssize_t q, left0 = st->left;
        if (depth <= 0 || level >= MAX_NEST || len - p < 5)
            break;
        n = (Py_ssize_t)get_u32(s + p + 1);
        q = p + 5;
        if (n < 0 || n >= len - q || n > st->left) /* n elements and a tail */
            break;
        st->left -= n;
        result = PyList_New(n);
        if (result == NULL)
            return NULL;
        for (i = 0; i < n; i++) {
            item = dec_term(st, &q, depth - 1, level + 1);
            if (item == NULL) {
                Py_DECREF(result);
                return NULL;
            }
            PyList_SET_ITEM(result, i, item);
        }
        /* A LIST_EXT tail continues the same list, in a loop as in Python. */
        while (q >= 0 && q < len && s[q] == 108) {
            if (len - q < 5)
                return dec_restart(st, result, p, pos, depth, left0);
            n = (Py_ssize_t)get_u32(s + q + 1);
            q += 5;
            if (n < 0 || n >= len - q || n > st->left)
                return dec_restart(st, result, p, pos, depth, left0);
            st->left -= n;
            for (i = 0; i < n; i++) {
                if (dec_append(st, result, &q, depth - 1, level + 1) < 0) {
                    Py_DECREF(result);
                    return NULL;
                }
            }
        }
        if (q < 0 || q >= len) /* truncated */
            return dec_restart(st, result, p, pos, depth, left0);
        if (s[q] == 106) {
            *pos = q + 1;
            return result;
        }
        value = dec_term(st, &q, depth - 1, level + 1); /* an improper list's tail */
        if (value == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        *pos = q;
        if (PyList_CheckExact(value)) { /* a STRING_EXT tail: more elements */
            i = PyList_GET_SIZE(result);
            if (PyList_SetSlice(result, i, i, value) < 0)
                Py_CLEAR(result);
            Py_DECREF(value);
            return result;
        }
        if (PyList_GET_SIZE(result) == 0) { /* [] ++ Tail is Tail */
            Py_DECREF(result);
            return value;
        }
        item = PyObject_CallFunctionObjArgs(st->self->improper_list, result, value, NULL);
        Py_DECREF(result);
        Py_DECREF(value);
        return item;
    }
    case 116: { /* MAP_EXT */
        Py_ssize_t q, left0 = st->left;
        int clash;
        if (len - p < 5)
            break;
        n = (Py_ssize_t)get_u32(s + p + 1);
        q = p + 5;
        if (n < 0 || n > (len - q) / 2 || depth <= 0 || level >= MAX_NEST || 2 * n > st->left)
            break;
        st->left -= 2 * n;
        result = PyDict_New();
        if (result == NULL)
            return NULL;
        for (i = 0; i < n; i++) {
            item = dec_term(st, &q, depth - 1, level + 1);
            if (item == NULL) {
                Py_DECREF(result);
                return NULL;
            }
            /* As in Python: an Atom key can only equal another Atom (a duplicate, caught
             * below); any other key is checked for a clash first. */
            clash = Py_TYPE(item) == (PyTypeObject *)st->self->atom_type
                        ? 0 : PyDict_Contains(result, item);
            if (clash < 0 && !PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear(); /* not unhashable: Python raises it again */
                Py_DECREF(item);
                return dec_restart(st, result, p, pos, depth, left0);
            }
            if (clash != 0) { /* a duplicate, a key Python's == merges, or unhashable */
                PyErr_Clear();
                return dec_map_wrapped(st, result, item, i, n, p, q, pos, depth, level, left0);
            }
            value = dec_term(st, &q, depth - 1, level + 1);
            if (value == NULL || PyDict_SetItem(result, item, value) < 0) {
                Py_DECREF(item);
                Py_XDECREF(value);
                Py_DECREF(result);
                return NULL;
            }
            Py_DECREF(item);
            Py_DECREF(value);
        }
        if (PyDict_GET_SIZE(result) != n) /* two equal atom keys merged: Python raises */
            return dec_restart(st, result, p, pos, depth, left0);
        *pos = q;
        return result;
    }
    default:
        break;
    }
    return dec_fallback(st, pos, depth);
}

static PyObject *
Decoder_decode(DecoderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    DecState st;
    Py_ssize_t pos, depth;
    PyObject *term, *end, *res;

    if (nargs != 4 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1])
        || !PyLong_CheckExact(args[2]) || !PyList_CheckExact(args[3])
        || PyList_GET_SIZE(args[3]) != 1 || !PyLong_CheckExact(PyList_GET_ITEM(args[3], 0)))
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, NULL);
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, NULL);
    }
    depth = PyLong_AsSsize_t(args[2]);
    if (depth == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, NULL);
    }
    if (pos < 0)
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, NULL);
    st.self = self;
    st.data = args[0];
    st.s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    st.len = PyBytes_GET_SIZE(args[0]);
    st.budget = args[3];
    st.left = PyLong_AsSsize_t(PyList_GET_ITEM(args[3], 0));
    if (st.left == -1 && PyErr_Occurred()) { /* beyond Py_ssize_t: Python copes */
        PyErr_Clear();
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, NULL);
    }
    term = dec_term(&st, &pos, depth, 0);
    if (budget_store(&st) < 0 || term == NULL) {
        Py_XDECREF(term);
        return NULL;
    }
    end = PyLong_FromSsize_t(pos);
    if (end == NULL) {
        Py_DECREF(term);
        return NULL;
    }
    res = PyTuple_New(2);
    if (res == NULL) {
        Py_DECREF(term);
        Py_DECREF(end);
        return NULL;
    }
    PyTuple_SET_ITEM(res, 0, term);
    PyTuple_SET_ITEM(res, 1, end);
    return res;
}

static PyObject *
Decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fallback, *special, *atom_type, *improper_list, *wrap_map;
    DecoderObject *self;

    if (kwds != NULL && PyDict_Size(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Decoder takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!OOO:Decoder", &fallback, &PyDict_Type, &special, &atom_type,
                          &improper_list, &wrap_map))
        return NULL;
    if (!PyCallable_Check(fallback) || !PyCallable_Check(atom_type)
        || !PyCallable_Check(improper_list) || !PyCallable_Check(wrap_map)) {
        PyErr_SetString(PyExc_TypeError, "Decoder needs callable arguments after special");
        return NULL;
    }
    self = (DecoderObject *)type->tp_alloc(type, 0); /* zeroed, atom slots included */
    if (self == NULL)
        return NULL;
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(special);
    self->special = special;
    Py_INCREF(atom_type);
    self->atom_type = atom_type;
    Py_INCREF(improper_list);
    self->improper_list = improper_list;
    Py_INCREF(wrap_map);
    self->wrap_map = wrap_map;
    return (PyObject *)self;
}

static int
Decoder_traverse(DecoderObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->fallback);
    Py_VISIT(self->special);
    Py_VISIT(self->atom_type);
    Py_VISIT(self->improper_list);
    Py_VISIT(self->wrap_map);
    return 0;
}

static int
Decoder_clear(DecoderObject *self)
{
    int i;
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->special);
    Py_CLEAR(self->atom_type);
    Py_CLEAR(self->improper_list);
    Py_CLEAR(self->wrap_map);
    for (i = 0; i < ATOM_SLOTS; i++) {
        Py_CLEAR(self->atoms[i].name);
        Py_CLEAR(self->atoms[i].value);
    }
    return 0;
}

static void
Decoder_dealloc(DecoderObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Decoder_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)(void (*)(void))Decoder_decode, METH_FASTCALL,
     "decode(data, pos, depth, budget) -> (term, end): like etf's Python dec."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Decoder_slots[] = {
    {Py_tp_new, Decoder_new},
    {Py_tp_dealloc, Decoder_dealloc},
    {Py_tp_traverse, Decoder_traverse},
    {Py_tp_clear, Decoder_clear},
    {Py_tp_methods, Decoder_methods},
    {Py_tp_doc, "Decoder(fallback, special, atom_type, improper_list, wrap_map): ETF decoder, see the "
                   "module docs."},
    {0, NULL},
};

static PyType_Spec Decoder_spec = {
    "poolport.codec._cetf.Decoder",
    sizeof(DecoderObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    Decoder_slots,
};

/* ------------------------------------------------------------------ encoder */

typedef struct {
    PyObject_HEAD
    PyObject *fallback;
    PyObject *none_bytes;
    PyObject *atom_type;
    int latin1; /* atom_encoding "latin1": ATOM_EXT for atoms that fit Latin-1 */
} EncoderObject;

/* Bytes from an object that are copied only once, into the result (long binaries). */
typedef struct {
    Py_ssize_t at;   /* where in the buffer's bytes they go */
    PyObject *owner; /* a reference that keeps p alive */
    const char *p;
    Py_ssize_t n;
} Seg;

#define SEG_MIN 4096 /* shorter runs are copied into the buffer */

/* The output: the buffer's bytes with the segments spliced in at their offsets. */
typedef struct {
    char *p;
    Py_ssize_t len;
    Py_ssize_t cap;
    Seg *segs;
    Py_ssize_t nsegs;
    Py_ssize_t capsegs;
    Py_ssize_t extra; /* bytes in segments */
    char small[512];
} Buf;

static int
buf_grow(Buf *b, Py_ssize_t need)
{
    Py_ssize_t cap = b->cap;
    char *p;
    if (need > PY_SSIZE_T_MAX - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    need += b->len;
    while (cap < need)
        cap = cap > PY_SSIZE_T_MAX / 2 ? need : cap * 2;
    if (b->p == b->small) {
        p = PyMem_Malloc((size_t)cap);
        if (p != NULL)
            memcpy(p, b->small, (size_t)b->len);
    }
    else {
        p = PyMem_Realloc(b->p, (size_t)cap);
    }
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

#define RESERVE(b, n) ((b)->cap - (b)->len >= (Py_ssize_t)(n) ? 0 : buf_grow((b), (n)))

static void
put_u32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}


static int put_raw(Buf *b, const char *data, Py_ssize_t n);

/* n bytes at p, kept alive by owner: referenced if long, else copied. */
static int
put_ref(Buf *b, PyObject *owner, const char *p, Py_ssize_t n)
{
    Seg *seg;
    if (n < SEG_MIN)
        return put_raw(b, p, n);
    if (n > PY_SSIZE_T_MAX - b->len - b->extra) {
        PyErr_NoMemory();
        return -1;
    }
    if (b->nsegs == b->capsegs) {
        Py_ssize_t cap = b->capsegs ? b->capsegs * 2 : 8;
        seg = PyMem_Realloc(b->segs, (size_t)cap * sizeof(Seg));
        if (seg == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->segs = seg;
        b->capsegs = cap;
    }
    seg = &b->segs[b->nsegs++];
    seg->at = b->len;
    Py_INCREF(owner);
    seg->owner = owner;
    seg->p = p;
    seg->n = n;
    b->extra += n;
    return 0;
}

/* A tag byte and a 32-bit big-endian count (a container's header). */
static int
put_header(Buf *b, int tag, Py_ssize_t n)
{
    if (RESERVE(b, 5) < 0)
        return -1;
    b->p[b->len] = (char)tag;
    put_u32(b->p + b->len + 1, (uint32_t)n);
    b->len += 5;
    return 0;
}

/* A BINARY_EXT of n bytes at p, which owner keeps alive. */
static int
put_binary(Buf *b, PyObject *owner, const char *p, Py_ssize_t n)
{
    if (put_header(b, 109, n) < 0)
        return -1;
    return put_ref(b, owner, p, n);
}

static int
put_raw(Buf *b, const char *data, Py_ssize_t n)
{
    if (RESERVE(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, data, (size_t)n);
    b->len += n;
    return 0;
}

/* Encode x with the Python encoder into a list, then copy the parts in. */
static int
enc_fallback(EncoderObject *self, Buf *b, PyObject *x)
{
    PyObject *parts, *append, *args[2], *res;
    Py_ssize_t i;
    int rc = -1;

    parts = PyList_New(0);
    if (parts == NULL)
        return -1;
    append = PyObject_GetAttrString(parts, "append");
    if (append == NULL)
        goto done;
    args[0] = x;
    args[1] = append;
    res = PyObject_Vectorcall(self->fallback, args, 2, NULL);
    Py_DECREF(append);
    if (res == NULL)
        goto done;
    Py_DECREF(res);
    for (i = 0; i < PyList_GET_SIZE(parts); i++) {
        PyObject *part = PyList_GET_ITEM(parts, i);
        if (PyBytes_CheckExact(part)) {
            if (put_ref(b, part, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part)) < 0)
                goto done;
        }
        else {
            Py_buffer view;
            int failed;
            Py_INCREF(part);
            if (PyObject_GetBuffer(part, &view, PyBUF_SIMPLE) < 0) {
                Py_DECREF(part);
                goto done;
            }
            failed = put_raw(b, (const char *)view.buf, view.len) < 0;
            PyBuffer_Release(&view);
            Py_DECREF(part);
            if (failed)
                goto done;
        }
    }
    rc = 0;
done:
    Py_DECREF(parts);
    return rc;
}

/* Small atom bytes, or 1 if Python must do it (too long, not encodable). */
static int
enc_atom(EncoderObject *self, Buf *b, PyObject *x)
{
    const char *utf8;
    Py_ssize_t n;

#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(x) < 0)
        return -1;
#endif
    n = PyUnicode_GET_LENGTH(x);
    if (n > 255)
        return 1;
    if (self->latin1 && PyUnicode_KIND(x) == PyUnicode_1BYTE_KIND) { /* all chars < 256 */
        if (RESERVE(b, 3 + n) < 0)
            return -1;
        b->p[b->len++] = (char)100;
        b->p[b->len++] = 0;
        b->p[b->len++] = (char)n;
        memcpy(b->p + b->len, PyUnicode_DATA(x), (size_t)n);
        b->len += n;
        return 0;
    }
    utf8 = PyUnicode_AsUTF8AndSize(x, &n);
    if (utf8 == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return -1;
        PyErr_Clear();
        return 1;
    }
    if (RESERVE(b, 3 + n) < 0)
        return -1;
    if (n < 256) {
        b->p[b->len++] = (char)119;
        b->p[b->len++] = (char)n;
    }
    else {
        b->p[b->len++] = (char)118;
        b->p[b->len++] = (char)(n >> 8);
        b->p[b->len++] = (char)n;
    }
    memcpy(b->p + b->len, utf8, (size_t)n);
    b->len += n;
    return 0;
}

static int
enc_int(Buf *b, PyObject *x)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
    unsigned long long mag;
    int n, sign;
    char *p;

    if (overflow)
        return 1; /* beyond 64 bits: Python's bignum path */
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (RESERVE(b, 11) < 0)
        return -1;
    p = b->p + b->len;
    if (v >= 0 && v <= 255) {
        p[0] = (char)97;
        p[1] = (char)v;
        b->len += 2;
        return 0;
    }
    if (v >= -2147483648LL && v <= 2147483647LL) {
        p[0] = (char)98;
        put_u32(p + 1, (uint32_t)(int32_t)v);
        b->len += 5;
        return 0;
    }
    sign = v < 0;
    mag = sign ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    p[0] = (char)110;
    p[2] = (char)sign;
    for (n = 0; mag; n++, mag >>= 8)
        p[3 + n] = (char)(mag & 0xFF);
    p[1] = (char)n;
    b->len += 3 + n;
    return 0;
}

static int enc_term(EncoderObject *self, Buf *b, PyObject *x, int level);

static int
enc_term(EncoderObject *self, Buf *b, PyObject *x, int level)
{
    PyTypeObject *t = Py_TYPE(x);
    Py_ssize_t n, i;
    int rc;

    if (t == &PyLong_Type) {
        rc = enc_int(b, x);
        if (rc <= 0)
            return rc;
    }
    else if (t == &PyBytes_Type) {
        n = PyBytes_GET_SIZE(x);
        if ((uint64_t)n <= 0xFFFFFFFFu)
            return put_binary(b, x, PyBytes_AS_STRING(x), n);
    }
    else if (t == (PyTypeObject *)self->atom_type) {
        rc = enc_atom(self, b, x);
        if (rc <= 0)
            return rc;
    }
    else if (t == &PyUnicode_Type) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(x) < 0)
            return -1;
#endif
        if (PyUnicode_MAX_CHAR_VALUE(x) < 0x80) { /* ASCII: its UTF-8 is its data */
            const char *utf8 = PyUnicode_AsUTF8AndSize(x, &n);
            if (utf8 == NULL)
                return -1;
            if ((uint64_t)n <= 0xFFFFFFFFu)
                return put_binary(b, x, utf8, n);
        }
        else {
            PyObject *raw = PyUnicode_AsUTF8String(x);
            if (raw == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                    return -1;
                PyErr_Clear(); /* Python raises it again, with its own message */
            }
            else {
                n = PyBytes_GET_SIZE(raw);
                rc = 1;
                if ((uint64_t)n <= 0xFFFFFFFFu)
                    rc = put_binary(b, raw, PyBytes_AS_STRING(raw), n);
                Py_DECREF(raw);
                if (rc <= 0)
                    return rc;
            }
        }
    }
    else if (t == &PyDict_Type) {
        PyObject *key, *value;
        Py_ssize_t it = 0;
        n = PyDict_Size(x);
        if ((uint64_t)n <= 0xFFFFFFFFu && level < MAX_NEST) {
            if (put_header(b, 116, n) < 0)
                return -1;
            while (PyDict_Next(x, &it, &key, &value)) {
                Py_INCREF(key);
                Py_INCREF(value);
                rc = enc_term(self, b, key, level + 1);
                if (rc == 0)
                    rc = enc_term(self, b, value, level + 1);
                Py_DECREF(key);
                Py_DECREF(value);
                if (rc < 0)
                    return -1;
                if (PyDict_Size(x) != n) { /* a fallback changed it, as Python's loop says */
                    PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
                    return -1;
                }
            }
            return 0;
        }
    }
    else if (t == &PyList_Type) {
        n = PyList_GET_SIZE(x);
        if (n == 0)
            return put_raw(b, "j", 1);
        if (n < 0x10000) { /* STRING_EXT if every item is an exact int in 0..255 */
            for (i = 0; i < n; i++) {
                PyObject *v = PyList_GET_ITEM(x, i);
                long c;
                int overflow;
                if (Py_TYPE(v) != &PyLong_Type)
                    break;
                c = PyLong_AsLongAndOverflow(v, &overflow);
                if (overflow || c < 0 || c > 255)
                    break;
            }
            if (i == n) {
                if (RESERVE(b, 3 + n) < 0)
                    return -1;
                b->p[b->len++] = (char)107;
                b->p[b->len++] = (char)(n >> 8);
                b->p[b->len++] = (char)n;
                for (i = 0; i < n; i++)
                    b->p[b->len++] = (char)PyLong_AsLong(PyList_GET_ITEM(x, i));
                return 0;
            }
        }
        if ((uint64_t)n <= 0xFFFFFFFFu && level < MAX_NEST) {
            if (put_header(b, 108, n) < 0)
                return -1;
            for (i = 0; i < PyList_GET_SIZE(x); i++) { /* like Python's list iterator */
                PyObject *v = PyList_GET_ITEM(x, i);
                Py_INCREF(v);
                rc = enc_term(self, b, v, level + 1);
                Py_DECREF(v);
                if (rc < 0)
                    return -1;
            }
            return put_raw(b, "j", 1);
        }
    }
    else if (t == &PyTuple_Type) {
        n = PyTuple_GET_SIZE(x);
        if ((uint64_t)n <= 0xFFFFFFFFu && level < MAX_NEST) {
            if (n < 256) {
                if (RESERVE(b, 2) < 0)
                    return -1;
                b->p[b->len++] = (char)104;
                b->p[b->len++] = (char)n;
            }
            else if (put_header(b, 105, n) < 0) {
                return -1;
            }
            for (i = 0; i < n; i++) {
                if (enc_term(self, b, PyTuple_GET_ITEM(x, i), level + 1) < 0)
                    return -1;
            }
            return 0;
        }
    }
    else if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(x);
        if (isfinite(d)) {
            uint64_t bits;
            char *p;
            if (RESERVE(b, 9) < 0)
                return -1;
            memcpy(&bits, &d, sizeof bits);
            p = b->p + b->len;
            p[0] = (char)70;
            put_u32(p + 1, (uint32_t)(bits >> 32));
            put_u32(p + 5, (uint32_t)bits);
            b->len += 9;
            return 0;
        }
    }
    else if (x == Py_None) {
        return put_raw(b, PyBytes_AS_STRING(self->none_bytes), PyBytes_GET_SIZE(self->none_bytes));
    }
    else if (x == Py_True) {
        return self->latin1 ? put_raw(b, "d\x00\x04" "true", 7) : put_raw(b, "w\x04" "true", 6);
    }
    else if (x == Py_False) {
        return self->latin1 ? put_raw(b, "d\x00\x05" "false", 8) : put_raw(b, "w\x05" "false", 7);
    }
    return enc_fallback(self, b, x);
}

/* The whole output as one bytes object. */
static PyObject *
buf_finish(Buf *b)
{
    PyObject *out;
    char *dst;
    Py_ssize_t i, done = 0;

    if (b->nsegs == 0)
        return PyBytes_FromStringAndSize(b->p, b->len);
    out = PyBytes_FromStringAndSize(NULL, b->len + b->extra);
    if (out == NULL)
        return NULL;
    dst = PyBytes_AS_STRING(out);
    for (i = 0; i < b->nsegs; i++) {
        Seg *seg = &b->segs[i];
        memcpy(dst, b->p + done, (size_t)(seg->at - done));
        dst += seg->at - done;
        done = seg->at;
        memcpy(dst, seg->p, (size_t)seg->n);
        dst += seg->n;
    }
    memcpy(dst, b->p + done, (size_t)(b->len - done));
    return out;
}

static void
buf_release(Buf *b)
{
    Py_ssize_t i;
    for (i = 0; i < b->nsegs; i++)
        Py_DECREF(b->segs[i].owner);
    PyMem_Free(b->segs);
    if (b->p != b->small)
        PyMem_Free(b->p);
}

static PyObject *
Encoder_encode(EncoderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Buf b;
    PyObject *out, *res;

    if (nargs == 3 && !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode: the prefix must be bytes");
        return NULL;
    }
    if (nargs != 2 && nargs != 3)
        return PyObject_Vectorcall(self->fallback, args, (size_t)nargs, NULL);
    b.p = b.small;
    b.len = 0;
    b.cap = (Py_ssize_t)sizeof b.small;
    b.segs = NULL;
    b.nsegs = b.capsegs = b.extra = 0;
    /* an optional prefix goes in the same buffer: no second copy of a big result to prepend it */
    if (nargs == 3 && put_raw(&b, PyBytes_AS_STRING(args[2]), PyBytes_GET_SIZE(args[2])) < 0)
        out = NULL;
    else
        out = enc_term(self, &b, args[0], 0) < 0 ? NULL : buf_finish(&b);
    buf_release(&b);
    if (out == NULL)
        return NULL;
    res = PyObject_CallOneArg(args[1], out);
    Py_DECREF(out);
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

static PyObject *
Encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fallback, *none_bytes, *atom_type;
    int latin1;
    EncoderObject *self;

    if (kwds != NULL && PyDict_Size(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Encoder takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!O!p:Encoder", &fallback, &PyBytes_Type, &none_bytes,
                          &PyType_Type, &atom_type, &latin1))
        return NULL;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "Encoder needs a callable fallback");
        return NULL;
    }
    self = (EncoderObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(fallback);
    self->fallback = fallback;
    Py_INCREF(none_bytes);
    self->none_bytes = none_bytes;
    Py_INCREF(atom_type);
    self->atom_type = atom_type;
    self->latin1 = latin1;
    return (PyObject *)self;
}

static int
Encoder_traverse(EncoderObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->fallback);
    Py_VISIT(self->none_bytes);
    Py_VISIT(self->atom_type);
    return 0;
}

static int
Encoder_clear(EncoderObject *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->none_bytes);
    Py_CLEAR(self->atom_type);
    return 0;
}

static void
Encoder_dealloc(EncoderObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Encoder_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL,
     "encode(term, put[, prefix]): like etf's Python enc, but calls put once with all the "
     "bytes (prefix first)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Encoder_slots[] = {
    {Py_tp_new, Encoder_new},
    {Py_tp_dealloc, Encoder_dealloc},
    {Py_tp_traverse, Encoder_traverse},
    {Py_tp_clear, Encoder_clear},
    {Py_tp_methods, Encoder_methods},
    {Py_tp_doc, "Encoder(fallback, none_bytes, atom_type, latin1): ETF encoder, see the module docs."},
    {0, NULL},
};

static PyType_Spec Encoder_spec = {
    "poolport.codec._cetf.Encoder",
    sizeof(EncoderObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    Encoder_slots,
};

/* ------------------------------------------------------------------ module */

static int
cetf_exec(PyObject *module)
{
    PyObject *type;

    type = PyType_FromSpec(&Decoder_spec);
    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "Decoder", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    type = PyType_FromSpec(&Encoder_spec);
    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "Encoder", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot cetf_slots[] = {
    {Py_mod_exec, cetf_exec},
    {0, NULL},
};

static struct PyModuleDef cetf_module = {
    PyModuleDef_HEAD_INIT,
    "poolport.codec._cetf",
    "Optional C accelerator for poolport.codec.etf (the Python codec is the reference).",
    0,
    NULL,
    cetf_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__cetf(void)
{
    return PyModuleDef_Init(&cetf_module);
}
