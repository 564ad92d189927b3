/*
 * relay._cells._cellkernel: an open link's per-cell work, in C, once per read.
 *
 * Why this exists
 * ---------------
 * A relay relays cells; on the loop thread each cell used to cost a struct unpack, a slice, a
 * dict lookup, a Python call and a list append on the way in, and a slice and a join on the
 * way out: some hundreds of nanoseconds per cell, several times the AES the worker pool takes
 * off the loop. These functions do that work per read and per batch instead:
 *
 * route(buf, offset, batch) -> (end, groups, other)
 *     Cut the complete cells of buf (link protocol 4+: 4-byte circuit ids, 514-byte fixed
 *     cells, VERSIONS and commands >= 128 variable-length) from offset. RELAY (3) and
 *     RELAY_EARLY (9) cells whose circuit id is a key of the dict `batch` are grouped per
 *     circuit, in arrival order: `groups` is a list of (handler, payloads, count, early),
 *     `payloads` the circuit's 509-byte payloads joined in one bytes object, `early` None or
 *     a tuple of the positions (in that group) of its RELAY_EARLY cells. The first cell that is
 *     anything else (another command, an unknown circuit, a variable-length cell) ends the
 *     call: it is returned as `other` = (circ_id, command, payload) and `end` is the offset
 *     after it, so the caller handles the groups, then `other`, then calls again: cells keep
 *     their order relative to control cells (a DESTROY, then a CREATE reusing the id, then
 *     RELAY cells for the new circuit). Without such a cell, `other` is None and `end` is the
 *     offset of the first incomplete cell, the end of buf, or the first cell of a circuit that
 *     would be the call's 65th (a call groups at most MAX_GROUPS circuits: call again).
 *
 * frame(circ_id, command, payloads, early=None) -> bytes
 *     The wire bytes of n joined 509-byte payloads, each behind the 5-byte header
 *     (circ_id, command); the cells whose positions are in `early` get RELAY_EARLY (9).
 *
 * crypt_frame(crypt, payloads, circ_id) -> bytes or crypt's tuple
 *     A small batch crypted on the loop thread and passed on in one call: result =
 *     crypt(payloads); when it is bytes (Kb toward the client), or a tuple (out, recognized,
 *     tags) whose recognized flags are all 0 (Kf, nothing for this relay), the RELAY wire
 *     cells of the output behind circ_id headers; a tuple with a recognized cell is returned
 *     as it is, for the caller's cell handling. `crypt` is the circuit's kernel method; an
 *     exception it raises propagates.
 *
 * data_runs(plain, offset) -> (end, cells, runs)
 *     In decrypted relay payloads (joined, 509 bytes each; a client's or an exit's cells after
 *     its relay crypto), the DATA cells (relay command 2 with a length of at most 498) from
 *     offset up to the first cell that is not one: `cells` of them, their bodies joined per
 *     stream as `runs` = [(stream_id, data, cells)] in order of each stream's first cell. `end`
 *     is the offset of the first cell not taken (another command, a longer length, or the
 *     first cell of a stream that would be the call's 65th: call again) or len(plain).
 *
 * They all run with the GIL held (they touch Python objects; the work is a memcpy per cell and a
 * dict lookup per change of circuit). Any thread; they keep no state. Refusals: a payload
 * length that is not a whole number of cells raises ValueError; a circuit id key that is not
 * an int is never matched.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define PAYLOAD_LEN 509
#define HEADER_LEN 5
#define CELL_LEN (HEADER_LEN + PAYLOAD_LEN)
#define CMD_VERSIONS 7
#define CMD_RELAY 3
#define CMD_RELAY_EARLY 9
/* A relay payload: command, recognized, stream id, digest, length, then the body. */
#define RELAY_HEADER_LEN 11
#define RELAY_DATA 2
#define RELAY_DATA_MAX (PAYLOAD_LEN - RELAY_HEADER_LEN)
/* Circuits per call: the lookup of a cell's group is a scan of the groups so far, so a read
 * that touches many circuits is cut into calls of at most this many (the caller calls again). */
#define MAX_GROUPS 64
/* Streams per data_runs call, for the same reason. */
#define MAX_RUNS 64

typedef struct {
    PyObject *handler;    /* a new reference: a finalizer run by the GC may change the dict */
    uint32_t circ_id;
    Py_ssize_t count;
    Py_ssize_t earlies;
} Group;

typedef struct {
    Py_ssize_t offset;    /* of the cell in buf */
    Py_ssize_t group;
    int early;
} Slot;

static inline uint32_t
load_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static PyObject *
build_groups(const unsigned char *data, Group *groups, Py_ssize_t ngroups, Slot *slots,
             Py_ssize_t nslots)
{
    PyObject *list = PyList_New(ngroups);
    if (list == NULL)
        return NULL;
    PyObject **payloads = PyMem_Calloc((size_t)(ngroups ? ngroups : 1), sizeof(PyObject *));
    PyObject **earlies = PyMem_Calloc((size_t)(ngroups ? ngroups : 1), sizeof(PyObject *));
    Py_ssize_t *filled = PyMem_Calloc((size_t)(ngroups ? ngroups : 1), sizeof(Py_ssize_t));
    Py_ssize_t *nearly = PyMem_Calloc((size_t)(ngroups ? ngroups : 1), sizeof(Py_ssize_t));
    if (payloads == NULL || earlies == NULL || filled == NULL || nearly == NULL)
        goto nomem;
    for (Py_ssize_t g = 0; g < ngroups; g++) {
        payloads[g] = PyBytes_FromStringAndSize(NULL, groups[g].count * PAYLOAD_LEN);
        if (payloads[g] == NULL)
            goto fail;
        if (groups[g].earlies) {
            earlies[g] = PyTuple_New(groups[g].earlies);
            if (earlies[g] == NULL)
                goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < nslots; i++) {
        Py_ssize_t g = slots[i].group;
        char *out = PyBytes_AS_STRING(payloads[g]) + filled[g] * PAYLOAD_LEN;
        memcpy(out, data + slots[i].offset + HEADER_LEN, PAYLOAD_LEN);
        if (slots[i].early) {
            PyObject *position = PyLong_FromSsize_t(filled[g]);
            if (position == NULL)
                goto fail;
            PyTuple_SET_ITEM(earlies[g], nearly[g]++, position);
        }
        filled[g]++;
    }
    for (Py_ssize_t g = 0; g < ngroups; g++) {
        PyObject *early = earlies[g] != NULL ? earlies[g] : Py_NewRef(Py_None);
        PyObject *item = Py_BuildValue("(ONnN)", groups[g].handler, payloads[g], groups[g].count,
                                       early);
        payloads[g] = NULL;
        earlies[g] = NULL;
        if (item == NULL)
            goto fail;
        PyList_SET_ITEM(list, g, item);
    }
    PyMem_Free(payloads);
    PyMem_Free(earlies);
    PyMem_Free(filled);
    PyMem_Free(nearly);
    return list;
nomem:
    PyErr_NoMemory();
fail:
    if (payloads != NULL && earlies != NULL) {
        for (Py_ssize_t g = 0; g < ngroups; g++) {
            Py_XDECREF(payloads[g]);
            Py_XDECREF(earlies[g]);
        }
    }
    PyMem_Free(payloads);
    PyMem_Free(earlies);
    PyMem_Free(filled);
    PyMem_Free(nearly);
    Py_DECREF(list);
    return NULL;
}

PyDoc_STRVAR(route_doc,
"route(buf, offset, batch) -> (end, groups, other)\n\n"
"Group the RELAY/RELAY_EARLY cells of buf[offset:] by circuit (circuit ids that are keys of\n"
"`batch`) up to the first other cell, returned as `other`; see the module comment.");

static PyObject *
route(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    PyObject *batch;
    if (!PyArg_ParseTuple(args, "y*nO!:route", &view, &offset, &PyDict_Type, &batch))
        return NULL;
    const unsigned char *data = view.buf;
    Py_ssize_t size = view.len;
    PyObject *result = NULL, *other = NULL, *list = NULL;
    Py_ssize_t cap_groups = 8, ngroups = 0, cap_slots = 64, nslots = 0;
    Group *groups = PyMem_Malloc(sizeof(Group) * (size_t)cap_groups);
    Slot *slots = PyMem_Malloc(sizeof(Slot) * (size_t)cap_slots);
    if (groups == NULL || slots == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (offset < 0 || offset > size) {
        PyErr_SetString(PyExc_ValueError, "offset outside the buffer");
        goto done;
    }
    Py_ssize_t last_group = -1;
    uint32_t last_id = 0;
    while (offset + HEADER_LEN <= size) {
        const unsigned char *cell = data + offset;
        uint32_t circ_id = load_be32(cell);
        int command = cell[4];
        if (command == CMD_VERSIONS || command >= 128) {
            if (offset + HEADER_LEN + 2 > size)
                break;
            Py_ssize_t length = ((Py_ssize_t)cell[5] << 8) | cell[6];
            if (offset + HEADER_LEN + 2 + length > size)
                break;
            other = Py_BuildValue("(kiy#)", (unsigned long)circ_id, command,
                                  (const char *)cell + HEADER_LEN + 2, length);
            if (other == NULL)
                goto done;
            offset += HEADER_LEN + 2 + length;
            break;
        }
        if (offset + CELL_LEN > size)
            break;
        Py_ssize_t g = -1;
        if (command == CMD_RELAY || command == CMD_RELAY_EARLY) {
            if (last_group >= 0 && circ_id == last_id) {
                g = last_group;
            } else {
                for (Py_ssize_t k = 0; k < ngroups; k++) {
                    if (groups[k].circ_id == circ_id) {
                        g = k;
                        break;
                    }
                }
                if (g < 0) {
                    PyObject *key = PyLong_FromUnsignedLong(circ_id);
                    if (key == NULL)
                        goto done;
                    PyObject *handler = PyDict_GetItemWithError(batch, key);
                    Py_DECREF(key);
                    if (handler == NULL && PyErr_Occurred())
                        goto done;
                    if (handler != NULL) {
                        if (ngroups == MAX_GROUPS)
                            break;  /* the caller calls again from this cell */
                        if (ngroups == cap_groups) {
                            cap_groups *= 2;
                            Group *bigger = PyMem_Realloc(groups, sizeof(Group) * (size_t)cap_groups);
                            if (bigger == NULL) {
                                PyErr_NoMemory();
                                goto done;
                            }
                            groups = bigger;
                        }
                        groups[ngroups] = (Group){Py_NewRef(handler), circ_id, 0, 0};
                        g = ngroups++;
                    }
                }
            }
        }
        if (g < 0) {
            other = Py_BuildValue("(kiy#)", (unsigned long)circ_id, command,
                                  (const char *)cell + HEADER_LEN, (Py_ssize_t)PAYLOAD_LEN);
            if (other == NULL)
                goto done;
            offset += CELL_LEN;
            break;
        }
        if (nslots == cap_slots) {
            cap_slots *= 2;
            Slot *bigger = PyMem_Realloc(slots, sizeof(Slot) * (size_t)cap_slots);
            if (bigger == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            slots = bigger;
        }
        int early = command == CMD_RELAY_EARLY;
        slots[nslots++] = (Slot){offset, g, early};
        groups[g].count++;
        groups[g].earlies += early;
        last_group = g;
        last_id = circ_id;
        offset += CELL_LEN;
    }
    list = build_groups(data, groups, ngroups, slots, nslots);
    if (list == NULL)
        goto done;
    result = Py_BuildValue("(nNO)", offset, list, other != NULL ? other : Py_None);
    list = NULL;
done:
    Py_XDECREF(list);
    Py_XDECREF(other);
    if (groups != NULL) {
        for (Py_ssize_t k = 0; k < ngroups; k++)
            Py_DECREF(groups[k].handler);
    }
    PyMem_Free(groups);
    PyMem_Free(slots);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(frame_doc,
"frame(circ_id, command, payloads, early=None) -> bytes\n\n"
"The wire bytes of n joined 509-byte payloads behind (circ_id, command) headers; positions in\n"
"`early` (a sequence of ints) get RELAY_EARLY.");

/* New bytes: n cells of payloads from src, each behind (circ_id, command). */
static PyObject *
frame_payloads(unsigned long circ_id, int command, const unsigned char *src, Py_ssize_t n)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * CELL_LEN);
    if (out == NULL)
        return NULL;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char header[HEADER_LEN] = {
        (unsigned char)(circ_id >> 24), (unsigned char)(circ_id >> 16),
        (unsigned char)(circ_id >> 8), (unsigned char)circ_id, (unsigned char)command};
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(dst + i * CELL_LEN, header, HEADER_LEN);
        memcpy(dst + i * CELL_LEN + HEADER_LEN, src + i * PAYLOAD_LEN, PAYLOAD_LEN);
    }
    return out;
}

static PyObject *
frame(PyObject *module, PyObject *args)
{
    unsigned long circ_id;
    int command;
    Py_buffer view;
    PyObject *early = Py_None;
    if (!PyArg_ParseTuple(args, "kiy*|O:frame", &circ_id, &command, &view, &early))
        return NULL;
    PyObject *out = NULL;
    if (circ_id > 0xFFFFFFFFUL || command < 0 || command > 255) {
        PyErr_SetString(PyExc_ValueError, "circuit id or command out of range");
        goto done;
    }
    if (view.len % PAYLOAD_LEN) {
        PyErr_Format(PyExc_ValueError, "payloads of %zd bytes are not whole 509-byte cells",
                     view.len);
        goto done;
    }
    Py_ssize_t n = view.len / PAYLOAD_LEN;
    out = frame_payloads(circ_id, command, view.buf, n);
    if (out == NULL)
        goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    if (early != Py_None) {
        PyObject *seq = PySequence_Fast(early, "early must be a sequence of positions");
        if (seq == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) {
            Py_ssize_t position = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
            if (position == -1 && PyErr_Occurred()) {
                Py_DECREF(seq);
                Py_CLEAR(out);
                goto done;
            }
            if (position < 0 || position >= n) {
                Py_DECREF(seq);
                Py_CLEAR(out);
                PyErr_Format(PyExc_ValueError, "early position %zd outside %zd cells", position,
                             n);
                goto done;
            }
            dst[position * CELL_LEN + 4] = CMD_RELAY_EARLY;
        }
        Py_DECREF(seq);
    }
done:
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(crypt_frame_doc,
"crypt_frame(crypt, payloads, circ_id) -> bytes or crypt's tuple\n\n"
"crypt(payloads), then its output as RELAY wire cells behind circ_id headers, unless it is a\n"
"tuple (out, recognized, tags) with a recognized cell: then the tuple; see the module comment.");

static PyObject *
crypt_frame(PyObject *module, PyObject *args)
{
    PyObject *crypt, *payloads;
    unsigned long circ_id;
    if (!PyArg_ParseTuple(args, "OOk:crypt_frame", &crypt, &payloads, &circ_id))
        return NULL;
    if (circ_id > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "circuit id out of range");
        return NULL;
    }
    PyObject *result = PyObject_CallOneArg(crypt, payloads);
    if (result == NULL)
        return NULL;
    PyObject *out = result;
    if (PyTuple_Check(result)) {
        if (PyTuple_GET_SIZE(result) != 3) {
            PyErr_SetString(PyExc_TypeError, "crypt returned a tuple that is not (out, "
                            "recognized, tags)");
            Py_DECREF(result);
            return NULL;
        }
        Py_buffer flags;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(result, 1), &flags, PyBUF_SIMPLE) < 0) {
            Py_DECREF(result);
            return NULL;
        }
        int recognized = 0;
        for (Py_ssize_t i = 0; i < flags.len && !recognized; i++)
            recognized = ((const unsigned char *)flags.buf)[i] != 0;
        PyBuffer_Release(&flags);
        if (recognized)
            return result;  /* cells for this relay: the caller's slow path */
        out = PyTuple_GET_ITEM(result, 0);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(out, &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    PyObject *framed = NULL;
    if (view.len % PAYLOAD_LEN)
        PyErr_Format(PyExc_ValueError, "crypt returned %zd bytes: not whole 509-byte cells",
                     view.len);
    else
        framed = frame_payloads(circ_id, CMD_RELAY, view.buf, view.len / PAYLOAD_LEN);
    PyBuffer_Release(&view);
    Py_DECREF(result);
    return framed;
}

PyDoc_STRVAR(data_runs_doc,
"data_runs(plain, offset) -> (end, cells, runs)\n\n"
"The DATA cells of decrypted relay payloads from offset up to the first other cell: their\n"
"bodies joined per stream as [(stream_id, data, cells)]; see the module comment.");

typedef struct {
    unsigned int stream_id;
    Py_ssize_t bytes;
    Py_ssize_t cells;
    char *dst;
} Run;

/* The index of stream_id among runs[0..n), or n. */
static int
find_run(const Run *runs, int n, unsigned int stream_id)
{
    int k = 0;
    while (k < n && runs[k].stream_id != stream_id)
        k++;
    return k;
}

static PyObject *
data_runs(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "y*n:data_runs", &view, &offset))
        return NULL;
    PyObject *out = NULL, *list = NULL;
    if (view.len % PAYLOAD_LEN || offset < 0 || offset > view.len || offset % PAYLOAD_LEN) {
        PyErr_SetString(PyExc_ValueError, "data_runs needs whole 509-byte payloads and an "
                        "offset at a payload's start");
        goto done;
    }
    const unsigned char *buf = view.buf;
    Run runs[MAX_RUNS];
    int n = 0;
    Py_ssize_t end = offset;
    /* First pass: how far the DATA cells go and how many bytes each stream gets. */
    for (; end < view.len; end += PAYLOAD_LEN) {
        const unsigned char *cell = buf + end;
        unsigned int length = (unsigned int)cell[9] << 8 | cell[10];
        if (cell[0] != RELAY_DATA || length > RELAY_DATA_MAX)
            break;
        unsigned int stream_id = (unsigned int)cell[3] << 8 | cell[4];
        int k = find_run(runs, n, stream_id);
        if (k == n) {
            if (n == MAX_RUNS)
                break;
            runs[n++] = (Run){stream_id, 0, 0, NULL};
        }
        runs[k].bytes += length;
        runs[k].cells++;
    }
    if ((list = PyList_New(n)) == NULL)
        goto done;
    for (int k = 0; k < n; k++) {
        PyObject *data = PyBytes_FromStringAndSize(NULL, runs[k].bytes);
        if (data == NULL)
            goto done;
        runs[k].dst = PyBytes_AS_STRING(data);
        PyObject *item = Py_BuildValue("(INn)", runs[k].stream_id, data, runs[k].cells);
        if (item == NULL)
            goto done;
        PyList_SET_ITEM(list, k, item);
    }
    /* Second pass: copy the bodies (the bytes objects are not shared yet). */
    for (Py_ssize_t at = offset; at < end; at += PAYLOAD_LEN) {
        const unsigned char *cell = buf + at;
        unsigned int length = (unsigned int)cell[9] << 8 | cell[10];
        Run *run = &runs[find_run(runs, n, (unsigned int)cell[3] << 8 | cell[4])];
        memcpy(run->dst, cell + RELAY_HEADER_LEN, length);
        run->dst += length;
    }
    out = Py_BuildValue("(nnO)", end, (end - offset) / PAYLOAD_LEN, list);
done:
    Py_XDECREF(list);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"route", route, METH_VARARGS, route_doc},
    {"frame", frame, METH_VARARGS, frame_doc},
    {"crypt_frame", crypt_frame, METH_VARARGS, crypt_frame_doc},
    {"data_runs", data_runs, METH_VARARGS, data_runs_doc},
    {NULL, NULL, 0, NULL},
};

static int
cells_exec(PyObject *module)
{
    if (PyModule_AddIntConstant(module, "CELL_LEN", CELL_LEN) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "PAYLOAD_LEN", PAYLOAD_LEN);
}

static PyModuleDef_Slot slots_def[] = {
    {Py_mod_exec, cells_exec},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    "relay._cells._cellkernel",
    "The link data path's per-cell work in C (see the source's top comment).",
    0,
    methods,
    slots_def,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__cellkernel(void)
{
    return PyModuleDef_Init(&moduledef);
}
