/*
 * tor1._kernel._tor1: the GIL-free batch kernel for Tor's "tor1" relay-cell crypto.
 *
 * Why this exists
 * ---------------
 * Under CPython's GIL, per-cell Python work in worker threads serializes with the event loop
 * (docs/tuning.md). This module runs a whole circuit batch -- every AES-128-CTR layer of
 * every cell and every cell's SHA-1 digest set or check -- in ONE call that releases the GIL for
 * all of it, on OpenSSL's libcrypto (the library `cryptography` and `hashlib` already use).
 * It must give byte-for-byte the results of the pure-Python reference tor1.reference.
 *
 * Objects
 * -------
 * Every `buf` below is n joined 509-byte payloads: one bytes-like object, or a list/tuple of
 * bytes-like pieces read as their concatenation (only the total must be whole cells), so a
 * caller holding several chunks of a circuit need not join them while holding the GIL.
 *
 * RelayState(df, db, kf, kb): one relay's side of one circuit.
 *     forward(buf) -> (out, recognized)   Kf decrypt of n joined 509-byte payloads; recognized[i]
 *                                         is 1 when cell i had recognized == 0 and its digest
 *                                         matched (the forward digest then advances), else 0.
 *     backward(buf) -> out                Kb encrypt, no digest.
 *     originate(buf) -> out               per cell: set digest with Db's running SHA-1; Kb encrypt.
 * OriginState(hops): the client's side of one circuit; hops is a sequence of (df, db, kf, kb).
 *     encrypt(buf, hop) -> out            per cell: set digest with hop's forward SHA-1; then
 *                                         Kf of hop, hop-1, ..., 0.
 *     decrypt(buf) -> (out, hops)         per cell: peel Kb from hop 0 outward until a hop
 *                                         recognizes it; hops[i] is that hop. Processing stops
 *                                         at the first cell no hop recognizes: then len(hops)
 *                                         is that cell's index, out holds only the cells before
 *                                         it, and the state is exactly as after them (the
 *                                         reference's UnrecognizedCell contract).
 *     add_hop(df, db, kf, kb)             append a hop (after EXTENDED2).
 * crypt_group(jobs) -> list               several circuits' batches with ONE release of the GIL:
 *                                         jobs are (state, OP_*, buf[, hop]) standing for the
 *                                         methods above; one result per job, in order: what
 *                                         the method returns, or the exception instance it
 *                                         raises (errors stay with their job). Under the GIL,
 *                                         taking it back after each call is what a worker pays
 *                                         per call; a group pays it once. Methods and groups
 *                                         run the same Job code (prepare / run / settle).
 * "Set a digest": feed the 509 bytes to the running SHA-1 with the digest field payload[5:9]
 * taken as zero, then write the first 4 bytes of a finalized copy there. "Check": only when
 * recognized (payload[1:3]) is zero; the same feeding on a copy of the running state, compared
 * in constant time; a match keeps the advanced copy. Exactly tor1.reference's rules.
 *
 * State layout, and why the cipher context is not kept
 * ----------------------------------------------------
 * A keystream is stored as (key, counter block, offset into that block): 36 bytes. Each call
 * creates an EVP_CIPHER_CTX positioned there (~0.15 us: key schedule plus allocation), runs the
 * batch, frees it, and advances the stored position by the bytes actually consumed. A
 * persistent OpenSSL 3 context would cost ~650 bytes of heap per cipher (measured), i.e. 1.3 KB
 * per relay circuit and 4 KB for a 3-hop origin, against a 2 KB per idle circuit budget; the
 * per-call cost is under 5 ns per cell for batches of 32 cells. It also makes "as after the last
 * good cell" trivial: only committed bytes move the position.
 * A running digest is a plain SHA_CTX (96 bytes) used with OpenSSL's low-level SHA1_* functions
 * (deprecated in 3.0 but exported): a checkpoint is a struct copy, far cheaper than
 * EVP_MD_CTX_copy_ex.
 *
 * Whole-batch speed
 * -----------------
 * A direction's keystream is continuous across cells, so relay forward/backward/originate and
 * each origin-encrypt layer run ONE EVP_EncryptUpdate over the joined buffer (CTR keeps the
 * position inside a partial block across calls; 509 is not a multiple of 16). Digests are per
 * cell and in order. Origin decrypt is defined per cell (a cell recognized at hop 1 must not
 * see hop 2's Kb) but runs layer by layer: hop h's Kb covers, in one EVP call per run, the
 * cells still unrecognized after hops 0..h-1 (see decrypt_layer for why this is exact).
 *
 * Threads
 * -------
 * Any thread may call any method, but one state object must be used by one thread at a time
 * (the worker pool gives a circuit to one worker at a time). A violation is made loud: each
 * call claims the object with an atomic flag and raises RuntimeError if it is already claimed.
 * The input is pinned with the buffer protocol (no copy; a bytearray cannot be resized while
 * pinned) and the output objects are allocated before the GIL is released; between
 * PyEval_SaveThread and PyEval_RestoreThread only C memory is touched. Calls of fewer than
 * GIL_RELEASE_MIN_CELLS cells keep the GIL: releasing it for ~0.1-1 us of work costs more than
 * it gives and invites the convoy effect (the caller waiting a whole switch interval to get the
 * GIL back). The module has no mutable global state; the fetched AES-128-CTR cipher lives in
 * the module state and is read-only after import.
 */

#define PY_SSIZE_T_CLEAN
/* SHA1_Init/Update/Final on a plain SHA_CTX: deprecated in OpenSSL 3.0 but still exported. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>

#include <limits.h>
#include <stdatomic.h>
#include <string.h>
#ifdef __GLIBC__
#endif

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#define CELL_LEN 509
#define AES_KEY_LEN 16
#define DIGEST_SEED_LEN 20
#define AES_BLOCK 16
#define DIGEST_OFFSET 5 /* the relay header's 4-byte digest field is payload[5:9] */
#define DIGEST_FIELD_LEN 4
#define MAX_HOPS 255 /* hop indices must fit in one byte of decrypt()'s result */
#define GIL_RELEASE_MIN_CELLS 4
/* EVP_EncryptUpdate takes an int length: longer buffers are fed in chunks of this size. */
#define EVP_CHUNK (1 << 30)

/* ------------------------------------------------------------------ module state */

typedef struct {
    EVP_CIPHER *aes128ctr; /* fetched once at import; read-only afterwards */
    PyTypeObject *relay_type;
    PyTypeObject *origin_type;
} ModuleState;

static ModuleState *
module_state_of(PyObject *self)
{
    return (ModuleState *)PyType_GetModuleState(Py_TYPE(self));
}

/* ------------------------------------------------------------------ keystreams */

/* One AES-128-CTR keystream: the block counter of the next keystream byte and how many bytes
 * of that block are already used. Touched only by the thread that owns the state object. */
typedef struct {
    unsigned char key[AES_KEY_LEN];
    unsigned char counter[AES_BLOCK]; /* full 128-bit big-endian counter; wraps */
    unsigned int offset;              /* 0..15 */
} KeyStream;

static void
keystream_init(KeyStream *ks, const unsigned char *key, const unsigned char *iv)
{
    memcpy(ks->key, key, AES_KEY_LEN);
    memcpy(ks->counter, iv, AES_BLOCK);
    ks->offset = 0;
}

/* Move the stored position `nbytes` forward (mod 2**132 bytes, as the counter wraps). */
static void
keystream_advance(KeyStream *ks, size_t nbytes)
{
    size_t total = ks->offset + nbytes; /* no overflow: nbytes <= PY_SSIZE_T_MAX */
    size_t blocks = total / AES_BLOCK;
    ks->offset = (unsigned int)(total % AES_BLOCK);
    unsigned int carry = 0;
    for (int i = AES_BLOCK - 1; i >= 0; i--) {
        unsigned int sum = ks->counter[i] + (unsigned int)(blocks & 0xff) + carry;
        ks->counter[i] = (unsigned char)sum;
        carry = sum >> 8;
        blocks >>= 8;
    }
}

/* A fresh cipher context positioned at the stream's stored position, or NULL on failure.
 * Needs no GIL. The caller frees it with EVP_CIPHER_CTX_free. */
static EVP_CIPHER_CTX *
keystream_open(const EVP_CIPHER *aes, const KeyStream *ks)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (EVP_EncryptInit_ex2(ctx, aes, ks->key, ks->counter, NULL) != 1)
        goto fail;
    if (ks->offset != 0) { /* burn the used part of the current block */
        unsigned char skip[AES_BLOCK] = {0};
        int outl;
        if (EVP_EncryptUpdate(ctx, skip, &outl, skip, (int)ks->offset) != 1)
            goto fail;
    }
    return ctx;
fail:
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* XOR `len` keystream bytes into in -> out (in == out allowed). 1 on success. No GIL. */
static int
keystream_xor(EVP_CIPHER_CTX *ctx, unsigned char *out, const unsigned char *in, size_t len)
{
    while (len > 0) {
        int chunk = len > EVP_CHUNK ? EVP_CHUNK : (int)len;
        int outl;
        if (EVP_EncryptUpdate(ctx, out, &outl, in, chunk) != 1 || outl != chunk)
            return 0;
        out += chunk;
        in += chunk;
        len -= (size_t)chunk;
    }
    return 1;
}

/* Open, XOR the whole buffer, close, and commit the position. 1 on success. No GIL. */
static int
keystream_apply(const EVP_CIPHER *aes, KeyStream *ks, unsigned char *out,
                const unsigned char *in, size_t len)
{
    if (len == 0)
        return 1;
    EVP_CIPHER_CTX *ctx = keystream_open(aes, ks);
    if (ctx == NULL)
        return 0;
    int ok = keystream_xor(ctx, out, in, len);
    EVP_CIPHER_CTX_free(ctx);
    if (ok)
        keystream_advance(ks, len);
    return ok;
}

/* ------------------------------------------------------------------ running digests */

static void
digest_seed(SHA_CTX *running, const unsigned char *seed)
{
    SHA1_Init(running);
    SHA1_Update(running, seed, DIGEST_SEED_LEN);
}

/* Feed one payload with its digest field taken as zero (the payload itself is not written). */
static void
digest_feed_cell(SHA_CTX *running, const unsigned char *cell)
{
    static const unsigned char zero_field[DIGEST_FIELD_LEN] = {0};
    SHA1_Update(running, cell, DIGEST_OFFSET);
    SHA1_Update(running, zero_field, DIGEST_FIELD_LEN);
    SHA1_Update(running, cell + DIGEST_OFFSET + DIGEST_FIELD_LEN,
                CELL_LEN - DIGEST_OFFSET - DIGEST_FIELD_LEN);
}

/* First 4 bytes of the digest of a finalized copy of `running`. */
static void
digest_peek(const SHA_CTX *running, unsigned char field[DIGEST_FIELD_LEN])
{
    SHA_CTX copy = *running; /* SHA_CTX is plain data: a struct copy is a checkpoint */
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1_Final(md, &copy);
    memcpy(field, md, DIGEST_FIELD_LEN);
}

/* Originate: feed the cell (digest field as zero) and write the digest at payload[5:9]. */
static void
digest_set(SHA_CTX *running, unsigned char *cell)
{
    digest_feed_cell(running, cell);
    digest_peek(running, cell + DIGEST_OFFSET);
}

/* Check: recognized == 0 and the digest matches -> 1, running advanced; else 0, untouched. */
static int
digest_check(SHA_CTX *running, const unsigned char *cell)
{
    if (cell[1] != 0 || cell[2] != 0)
        return 0;
    SHA_CTX trial = *running;
    unsigned char expect[DIGEST_FIELD_LEN];
    digest_feed_cell(&trial, cell);
    digest_peek(&trial, expect);
    if (CRYPTO_memcmp(expect, cell + DIGEST_OFFSET, DIGEST_FIELD_LEN) != 0)
        return 0;
    *running = trial;
    return 1;
}

/* ------------------------------------------------------------------ one hop's state */

typedef struct {
    KeyStream fwd_stream; /* Kf */
    KeyStream bwd_stream; /* Kb */
    SHA_CTX fwd_digest;   /* seeded with Df */
    SHA_CTX bwd_digest;   /* seeded with Db */
} HopState;

/* Parse (df, db, kf, kb) bytes-like arguments into `hop`. 0 on success, -1 with ValueError. */
static int
hop_init(HopState *hop, PyObject *df, PyObject *db, PyObject *kf, PyObject *kb,
         const unsigned char *iv)
{
    static const char *const names[4] = {"df", "db", "kf", "kb"};
    static const Py_ssize_t sizes[4] = {DIGEST_SEED_LEN, DIGEST_SEED_LEN, AES_KEY_LEN,
                                        AES_KEY_LEN};
    PyObject *args[4] = {df, db, kf, kb};
    Py_buffer views[4];
    int got = 0, rc = -1;
    for (; got < 4; got++) {
        if (PyObject_GetBuffer(args[got], &views[got], PyBUF_SIMPLE) < 0)
            goto done;
        if (views[got].len != sizes[got]) {
            PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, got %zd", names[got],
                         sizes[got], views[got].len);
            got++; /* release this view too */
            goto done;
        }
    }
    digest_seed(&hop->fwd_digest, views[0].buf);
    digest_seed(&hop->bwd_digest, views[1].buf);
    keystream_init(&hop->fwd_stream, views[2].buf, iv);
    keystream_init(&hop->bwd_stream, views[3].buf, iv);
    rc = 0;
done:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    return rc;
}

/* Optional test hook: the initial 16-byte counter block of every keystream (default zero). */
static int
parse_iv(PyObject *iv_obj, unsigned char iv[AES_BLOCK])
{
    memset(iv, 0, AES_BLOCK);
    if (iv_obj == NULL || iv_obj == Py_None)
        return 0;
    Py_buffer view;
    if (PyObject_GetBuffer(iv_obj, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len != AES_BLOCK) {
        PyErr_Format(PyExc_ValueError, "_iv must be %d bytes, got %zd", AES_BLOCK, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    memcpy(iv, view.buf, AES_BLOCK);
    PyBuffer_Release(&view);
    return 0;
}

/* ------------------------------------------------------------------ exclusive use */

/* Claim `flag` for this call; RuntimeError if another thread holds it. */
static int
claim(atomic_int *flag, const char *type_name)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(flag, &expected, 1)) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s is already in use by another call; a circuit's crypto state must be "
                     "used by one thread at a time",
                     type_name);
        return -1;
    }
    return 0;
}

static void
unclaim(atomic_int *flag)
{
    atomic_store(flag, 0);
}

/* The input of a call: one bytes-like object, or a list/tuple of them read as one joined
 * buffer, so that a caller holding several chunks of a circuit need not join them under the
 * GIL. Only the total must be whole cells. Every piece stays pinned (buffer protocol, no
 * copy) until input_release; the struct points into itself, so it is never copied. */
typedef struct {
    Py_buffer one;     /* the storage when the input is a single object */
    Py_buffer *pieces; /* &one, or a PyMem array of `count` views */
    Py_ssize_t count;
    Py_ssize_t len; /* total bytes */
} CellInput;

static void
input_release(CellInput *in)
{
    for (Py_ssize_t i = 0; i < in->count; i++)
        PyBuffer_Release(&in->pieces[i]);
    if (in->pieces != &in->one)
        PyMem_Free(in->pieces);
    in->pieces = &in->one;
    in->count = 0;
}

/* Pin `obj` as whole cells. 0 on success (fills *in and *ncells), -1 with an exception. */
static int
input_pin(PyObject *obj, CellInput *in, Py_ssize_t *ncells)
{
    in->pieces = &in->one;
    in->count = 0;
    in->len = 0;
    if (PyList_Check(obj) || PyTuple_Check(obj)) {
        PyObject *items = PySequence_Tuple(obj); /* a snapshot the caller cannot change */
        if (items == NULL)
            return -1;
        Py_ssize_t n = PyTuple_GET_SIZE(items);
        if (n > 0 && (in->pieces = PyMem_Calloc((size_t)n, sizeof(Py_buffer))) == NULL) {
            in->pieces = &in->one;
            Py_DECREF(items);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(items, i), &in->pieces[i],
                                   PyBUF_SIMPLE) < 0) {
                Py_DECREF(items);
                input_release(in);
                return -1;
            }
            in->count++;
            in->len += in->pieces[i].len;
        }
        Py_DECREF(items);
    }
    else {
        if (PyObject_GetBuffer(obj, &in->one, PyBUF_SIMPLE) < 0)
            return -1;
        in->count = 1;
        in->len = in->one.len;
    }
    if (in->len % CELL_LEN != 0) {
        PyErr_Format(PyExc_ValueError,
                     "buffer length must be a multiple of %d (joined relay payloads), got %zd",
                     CELL_LEN, in->len);
        input_release(in);
        return -1;
    }
    *ncells = in->len / CELL_LEN;
    return 0;
}

/* Copy the joined input to `out` (in->len bytes). No GIL needed. */
static void
input_copy(const CellInput *in, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < in->count; i++) {
        if (in->pieces[i].len > 0)
            memcpy(out, in->pieces[i].buf, (size_t)in->pieces[i].len);
        out += in->pieces[i].len;
    }
}

/* Open the keystream, XOR the joined input into `out`, close, commit. 1 on success. No GIL. */
static int
keystream_apply_input(const EVP_CIPHER *aes, KeyStream *ks, unsigned char *out,
                      const CellInput *in)
{
    if (in->len == 0)
        return 1;
    EVP_CIPHER_CTX *ctx = keystream_open(aes, ks);
    if (ctx == NULL)
        return 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < in->count && ok; i++) {
        ok = keystream_xor(ctx, out, in->pieces[i].buf, (size_t)in->pieces[i].len);
        out += in->pieces[i].len;
    }
    EVP_CIPHER_CTX_free(ctx);
    if (ok)
        keystream_advance(ks, (size_t)in->len);
    return ok;
}

static PyObject *
raise_crypto_failure(void)
{
    PyErr_SetString(PyExc_RuntimeError,
                    "OpenSSL failed during a batch (out of memory?); this circuit's crypto "
                    "state is no longer usable: close the circuit");
    return NULL;
}

/* ================================================================== state objects */

typedef struct {
    PyObject_HEAD
    HopState hop;
    atomic_int in_use; /* claimed for the duration of a call; see claim() */
    int broken;        /* an OpenSSL failure left the streams inconsistent */
} RelayStateObject;

typedef struct {
    PyObject_HEAD
    HopState *hops; /* PyMem_Malloc'd array of n_hops */
    Py_ssize_t n_hops;
    unsigned char iv[AES_BLOCK]; /* initial counter for hops added later (test hook) */
    atomic_int in_use;
    int broken;
} OriginStateObject;

/* ================================================================== jobs
 *
 * Every crypto call, a method call or one entry of crypt_group(), is a Job in three phases:
 *
 *   job_prepare   GIL held. Check the state's type, claim it, refuse a broken state, pin the
 *                 input, check the hop, allocate the outputs. On failure nothing is held and
 *                 an exception is set.
 *   job_run       NO GIL. Touches only the claimed state, the pinned input and the outputs'
 *                 bytes. Records success in `ok` (and `done` for decrypt); an OpenSSL failure
 *                 marks the state broken right there (the state is ours), so a later job of
 *                 the same group on that state does not run.
 *   job_settle    GIL held. Unpin the input; job_unclaim then lets go of the state, and
 *   job_result    builds the method's return value or sets the exception. Neither touches the
 *                 state, so a group unclaims all its states before building any result.
 *
 * The methods and crypt_group share these functions, so the two give the same bytes by
 * construction (and the tests check it). */

enum { OP_FORWARD = 0, OP_BACKWARD = 1, OP_ORIGINATE = 2, OP_ENCRYPT = 3, OP_DECRYPT = 4 };
#define N_OPS 5

typedef struct {
    PyObject *state;    /* borrowed: the caller keeps it alive for the whole call */
    atomic_int *in_use; /* the state's claim flag */
    int *broken;        /* the state's broken flag: written only while claimed */
    HopState *hops;     /* relay: its one hop; origin: the hop array (stable while claimed) */
    Py_ssize_t n_hops;
    int op;
    int owns_claim;     /* 0: an earlier job of the same group holds the claim */
    Py_ssize_t hop;     /* encrypt: the target hop */
    CellInput in;       /* points into itself: a Job is never copied once prepared */
    Py_ssize_t ncells;
    PyObject *out;      /* output bytes (all ops) */
    PyObject *aux;      /* forward: recognized flags; decrypt: hop indices; else NULL */
    HopState *snapshot; /* decrypt: the hops on entry */
    size_t snapshot_slots;
    Py_ssize_t done;    /* decrypt: cells processed (-1: OpenSSL failure) */
    int ok;             /* run: 1 success, 0 OpenSSL failure or skipped (state broken) */
} Job;

/* Prepare `job` for `op` on `state`. 0 on success; -1 with an exception and nothing held.
 * `share_with`, when not NULL, is an earlier prepared job of the same group on the same
 * state: that job holds the claim and this one runs after it, on the same thread. */
static int
job_prepare(Job *job, ModuleState *st, PyObject *state, int op, PyObject *buf, Py_ssize_t hop,
            const Job *share_with)
{
    memset(job, 0, sizeof(*job));
    job->in.pieces = &job->in.one;
    job->state = state;
    job->op = op;
    job->hop = hop;
    const char *type_name;
    if (op == OP_FORWARD || op == OP_BACKWARD || op == OP_ORIGINATE) {
        if (!Py_IS_TYPE(state, st->relay_type)) {
            PyErr_Format(PyExc_TypeError, "op %d needs a RelayState, got %.100s", op,
                         Py_TYPE(state)->tp_name);
            return -1;
        }
        RelayStateObject *relay = (RelayStateObject *)state;
        job->in_use = &relay->in_use;
        job->broken = &relay->broken;
        job->hops = &relay->hop;
        job->n_hops = 1;
        type_name = "RelayState";
    }
    else if (op == OP_ENCRYPT || op == OP_DECRYPT) {
        if (!Py_IS_TYPE(state, st->origin_type)) {
            PyErr_Format(PyExc_TypeError, "op %d needs an OriginState, got %.100s", op,
                         Py_TYPE(state)->tp_name);
            return -1;
        }
        OriginStateObject *origin = (OriginStateObject *)state;
        job->in_use = &origin->in_use;
        job->broken = &origin->broken;
        job->hops = origin->hops;
        job->n_hops = origin->n_hops;
        type_name = "OriginState";
    }
    else {
        PyErr_Format(PyExc_ValueError, "unknown op %d", op);
        return -1;
    }
    if (share_with == NULL) {
        if (claim(job->in_use, type_name) < 0)
            return -1;
        job->owns_claim = 1;
    }
    if (*job->broken) {
        raise_crypto_failure();
        goto fail;
    }
    if (input_pin(buf, &job->in, &job->ncells) < 0)
        goto fail;
    if (op == OP_ENCRYPT && (hop < 0 || hop >= job->n_hops)) {
        PyErr_Format(PyExc_ValueError, "hop index %zd out of range for a %zd-hop circuit", hop,
                     job->n_hops);
        goto fail_input;
    }
    if (op == OP_DECRYPT) {
        /* at least one slot: a 0-hop circuit is valid (every cell is then unrecognized) */
        job->snapshot_slots = job->n_hops > 0 ? (size_t)job->n_hops : 1;
        job->snapshot = PyMem_Malloc(job->snapshot_slots * sizeof(HopState));
        if (job->snapshot == NULL) {
            PyErr_NoMemory();
            goto fail_input;
        }
    }
    job->out = PyBytes_FromStringAndSize(NULL, job->in.len);
    if (job->out == NULL)
        goto fail_outputs;
    if (op == OP_FORWARD || op == OP_DECRYPT) {
        job->aux = PyBytes_FromStringAndSize(NULL, job->ncells);
        if (job->aux == NULL)
            goto fail_outputs;
    }
    return 0;
fail_outputs:
    Py_CLEAR(job->out);
    if (job->snapshot != NULL) {
        PyMem_Free(job->snapshot);
        job->snapshot = NULL;
    }
fail_input:
    input_release(&job->in);
fail:
    if (job->owns_claim) {
        unclaim(job->in_use);
        job->owns_claim = 0;
    }
    return -1;
}

#define HOP_PENDING 0xFF /* decrypt(): not recognized by any hop peeled so far */

/* One layer of decrypt: XOR hop h's Kb keystream into every cell still pending, in order,
 * one EVP call per run of consecutive pending cells (usually the whole batch), and check
 * each such cell against hop h's backward digest. 1 on success, 0 on an OpenSSL failure.
 *
 * Layer by layer gives the bytes of the cell-by-cell definition: hop h's keystream and
 * digest see exactly the cells that reach hop h, in order, whichever order the passes run
 * in, and no hop's state depends on another's. No GIL. */
static int
decrypt_layer(const EVP_CIPHER *aes, HopState *hop, unsigned char h, unsigned char *out,
              unsigned char *which, Py_ssize_t ncells)
{
    EVP_CIPHER_CTX *ctx = NULL;
    size_t used = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < ncells && ok;) {
        if (which[i] != HOP_PENDING) {
            i++;
            continue;
        }
        Py_ssize_t end = i;
        while (end < ncells && which[end] == HOP_PENDING)
            end++;
        if (ctx == NULL && (ctx = keystream_open(aes, &hop->bwd_stream)) == NULL) {
            ok = 0;
            break;
        }
        size_t run = (size_t)(end - i) * CELL_LEN;
        ok = keystream_xor(ctx, out + i * CELL_LEN, out + i * CELL_LEN, run);
        used += run;
        for (; ok && i < end; i++) {
            if (digest_check(&hop->bwd_digest, out + i * CELL_LEN))
                which[i] = h;
        }
    }
    EVP_CIPHER_CTX_free(ctx); /* NULL is fine */
    if (ok)
        keystream_advance(&hop->bwd_stream, used);
    return ok;
}

/* The body of decrypt, without the GIL: copy the input to `out`, peel layer by layer, and
 * return how many cells were processed -- all of them, or the index of the first cell no hop
 * recognized -- or -1 on an OpenSSL failure. In the unrecognized case the layers also
 * consumed the cells after it, so the state is restored from `snapshot` (taken on entry) and
 * only the cells before it are processed again: a rare path (the circuit is then closed),
 * and a simple way to leave the state exactly as after the good cells. */
static Py_ssize_t
origin_decrypt_cells(const EVP_CIPHER *aes, HopState *hops, HopState *snapshot,
                     Py_ssize_t n_hops, const CellInput *in, unsigned char *out,
                     unsigned char *which, Py_ssize_t ncells)
{
    Py_ssize_t todo = ncells;
    if (n_hops > 0)
        memcpy(snapshot, hops, (size_t)n_hops * sizeof(HopState));
    for (int attempt = 0; attempt < 2; attempt++) {
        input_copy(in, out);
        if (todo > 0)
            memset(which, HOP_PENDING, (size_t)todo);
        for (Py_ssize_t h = 0; h < n_hops; h++) {
            if (!decrypt_layer(aes, &hops[h], (unsigned char)h, out, which, todo))
                return -1;
        }
        Py_ssize_t first_bad = 0;
        while (first_bad < todo && which[first_bad] != HOP_PENDING)
            first_bad++;
        if (first_bad == todo)
            return todo; /* every cell recognized */
        if (n_hops > 0)
            memcpy(hops, snapshot, (size_t)n_hops * sizeof(HopState));
        todo = first_bad; /* second pass over the good prefix only: all of it is recognized */
    }
    return todo;
}


/* Run a prepared job. NO GIL: only the claimed state, the pinned input and the outputs. */
static void
job_run(const EVP_CIPHER *aes, Job *job)
{
    if (*job->broken) {
        /* An earlier job of this group failed on the same state: leave it as it is. */
        job->ok = 0;
        job->done = -1;
        return;
    }
    unsigned char *o = (unsigned char *)PyBytes_AS_STRING(job->out);
    size_t len = (size_t)job->in.len;
    Py_ssize_t ncells = job->ncells;
    HopState *hops = job->hops;
    int ok = 1;
    switch (job->op) {
    case OP_FORWARD: {
        unsigned char *r = (unsigned char *)PyBytes_AS_STRING(job->aux);
        ok = keystream_apply_input(aes, &hops[0].fwd_stream, o, &job->in);
        if (ok) {
            for (Py_ssize_t i = 0; i < ncells; i++)
                r[i] = (unsigned char)digest_check(&hops[0].fwd_digest, o + i * CELL_LEN);
        }
        break;
    }
    case OP_BACKWARD:
        ok = keystream_apply_input(aes, &hops[0].bwd_stream, o, &job->in);
        break;
    case OP_ORIGINATE:
        /* The digest of cell i depends only on plaintexts 0..i, so set all digests first and
         * then encrypt the whole buffer in one AES call. If that call fails, the digest has
         * advanced without the cipher: the state is marked broken below. */
        input_copy(&job->in, o);
        for (Py_ssize_t i = 0; i < ncells; i++)
            digest_set(&hops[0].bwd_digest, o + i * CELL_LEN);
        ok = keystream_apply(aes, &hops[0].bwd_stream, o, o, len);
        break;
    case OP_ENCRYPT:
        input_copy(&job->in, o);
        for (Py_ssize_t i = 0; i < ncells; i++)
            digest_set(&hops[job->hop].fwd_digest, o + i * CELL_LEN);
        /* CTR layers are XORs, so each layer can cover the whole batch; each hop's keystream
         * still sees the cells in order. */
        for (Py_ssize_t h = job->hop; h >= 0 && ok; h--)
            ok = keystream_apply(aes, &hops[h].fwd_stream, o, o, len);
        break;
    case OP_DECRYPT:
        job->done = origin_decrypt_cells(aes, hops, job->snapshot, job->n_hops, &job->in, o,
                                         (unsigned char *)PyBytes_AS_STRING(job->aux), ncells);
        ok = job->done >= 0; /* on failure some layers advanced and others did not */
        break;
    }
    job->ok = ok;
    if (!ok)
        *job->broken = 1; /* written while the state is claimed by this thread */
}

/* Unpin the input. GIL held. The state stays claimed. */
static void
job_settle(Job *job)
{
    input_release(&job->in);
}

/* Let go of the state (if this job holds the claim). GIL held. Nothing touches it after. */
static void
job_unclaim(Job *job)
{
    if (job->owns_claim) {
        unclaim(job->in_use);
        job->owns_claim = 0;
    }
}

/* The job's return value (new reference), or NULL with an exception. Frees what the job
 * holds; touches no state. GIL held. */
static PyObject *
job_result(Job *job)
{
    PyObject *result = NULL;
    if (!job->ok) {
        raise_crypto_failure();
    }
    else if (job->op == OP_FORWARD) {
        result = PyTuple_Pack(2, job->out, job->aux);
    }
    else if (job->op == OP_DECRYPT) {
        if (job->done < job->ncells &&
            (_PyBytes_Resize(&job->out, job->done * CELL_LEN) < 0 ||
             _PyBytes_Resize(&job->aux, job->done) < 0)) {
            /* _PyBytes_Resize set the pointer to NULL and raised */
        }
        else {
            result = PyTuple_Pack(2, job->out, job->aux);
        }
    }
    else {
        result = Py_NewRef(job->out);
    }
    Py_CLEAR(job->out);
    Py_CLEAR(job->aux);
    if (job->snapshot != NULL) {
        OPENSSL_cleanse(job->snapshot, job->snapshot_slots * sizeof(HopState));
        PyMem_Free(job->snapshot);
        job->snapshot = NULL;
    }
    return result;
}

/* One method call: prepare, run (GIL released for GIL_RELEASE_MIN_CELLS cells or more),
 * settle, unclaim, result. */
static PyObject *
job_call(PyObject *state, int op, PyObject *buf, Py_ssize_t hop)
{
    ModuleState *st = module_state_of(state);
    Job job;
    if (job_prepare(&job, st, state, op, buf, hop, NULL) < 0)
        return NULL;
    PyThreadState *ts = job.ncells >= GIL_RELEASE_MIN_CELLS ? PyEval_SaveThread() : NULL;
    job_run(st->aes128ctr, &job);
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    job_settle(&job);
    job_unclaim(&job);
    return job_result(&job);
}

/* ================================================================== RelayState */

static PyObject *
RelayState_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"df", "db", "kf", "kb", "_iv", NULL};
    PyObject *df, *db, *kf, *kb, *iv_obj = NULL;
    unsigned char iv[AES_BLOCK];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$O:RelayState", kwlist, &df, &db, &kf,
                                     &kb, &iv_obj))
        return NULL;
    if (parse_iv(iv_obj, iv) < 0)
        return NULL;
    RelayStateObject *self = (RelayStateObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    atomic_init(&self->in_use, 0);
    self->broken = 0;
    if (hop_init(&self->hop, df, db, kf, kb, iv) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
RelayState_dealloc(RelayStateObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    OPENSSL_cleanse(&self->hop, sizeof(self->hop));
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(RelayState_forward_doc,
"forward(buf) -> (out: bytes, recognized: bytes)\n\n"
"Decrypt n joined 509-byte payloads moving away from the client with Kf (one AES call).\n"
"buf is one bytes-like object or a list/tuple of them (read as their concatenation).\n"
"recognized[i] is 1 when cell i has recognized == 0 and its digest matches the running\n"
"forward digest (which then advances), else 0 (digest state untouched). Releases the GIL.\n"
"One thread at a time per object.");

static PyObject *
RelayState_forward(PyObject *self, PyObject *buf)
{
    return job_call(self, OP_FORWARD, buf, 0);
}

PyDoc_STRVAR(RelayState_backward_doc,
"backward(buf) -> bytes\n\n"
"Encrypt n joined payloads moving toward the client with Kb (relaying; no digest).\n"
"Releases the GIL. One thread at a time per object.");

static PyObject *
RelayState_backward(PyObject *self, PyObject *buf)
{
    return job_call(self, OP_BACKWARD, buf, 0);
}

PyDoc_STRVAR(RelayState_originate_doc,
"originate(buf) -> bytes\n\n"
"Per cell in order: set the digest field (payload[5:9]) from Db's running SHA-1, fed with\n"
"the payload with that field as zero; then encrypt everything with Kb.\n"
"Releases the GIL. One thread at a time per object.");

static PyObject *
RelayState_originate(PyObject *self, PyObject *buf)
{
    return job_call(self, OP_ORIGINATE, buf, 0);
}

static PyObject *
RelayState_get_in_use(RelayStateObject *self, void *closure)
{
    return PyBool_FromLong(atomic_load(&self->in_use));
}

static PyObject *
RelayState_sizeof(RelayStateObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(Py_TYPE(self)->tp_basicsize);
}

static PyMethodDef RelayState_methods[] = {
    {"__sizeof__", (PyCFunction)RelayState_sizeof, METH_NOARGS,
     "Bytes used by this state (no other allocation)."},
    {"forward", (PyCFunction)RelayState_forward, METH_O, RelayState_forward_doc},
    {"backward", (PyCFunction)RelayState_backward, METH_O, RelayState_backward_doc},
    {"originate", (PyCFunction)RelayState_originate, METH_O, RelayState_originate_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RelayState_getset[] = {
    {"in_use", (getter)RelayState_get_in_use, NULL,
     "True while a call on this object is running (any thread may read it).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(RelayState_doc,
"RelayState(df, db, kf, kb, *, _iv=None)\n\n"
"One relay's tor1 state for one circuit: Kf/Kb AES-128-CTR keystreams and Df/Db running\n"
"SHA-1 digests. df/db are 20 bytes, kf/kb 16. _iv (test hook) sets the initial 16-byte\n"
"counter block of both keystreams (default zero, as Tor). Any thread may create it; one\n"
"thread at a time may call its methods (RuntimeError otherwise).");

static PyType_Slot RelayState_slots[] = {
    {Py_tp_new, RelayState_new},
    {Py_tp_dealloc, RelayState_dealloc},
    {Py_tp_methods, RelayState_methods},
    {Py_tp_getset, RelayState_getset},
    {Py_tp_doc, (void *)RelayState_doc},
    {0, NULL},
};

static PyType_Spec RelayState_spec = {
    .name = "tor1._kernel._tor1.RelayState",
    .basicsize = sizeof(RelayStateObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = RelayState_slots,
};

/* ================================================================== OriginState */

/* Append one hop from a (df, db, kf, kb) sequence. Caller holds the claim or is constructing. */
static int
origin_append(OriginStateObject *self, PyObject *df, PyObject *db, PyObject *kf, PyObject *kb)
{
    if (self->n_hops >= MAX_HOPS) {
        PyErr_Format(PyExc_ValueError, "a circuit has at most %d hops", MAX_HOPS);
        return -1;
    }
    HopState hop;
    if (hop_init(&hop, df, db, kf, kb, self->iv) < 0)
        return -1;
    HopState *grown = PyMem_Realloc(self->hops, (size_t)(self->n_hops + 1) * sizeof(HopState));
    if (grown == NULL) {
        OPENSSL_cleanse(&hop, sizeof(hop));
        PyErr_NoMemory();
        return -1;
    }
    self->hops = grown;
    self->hops[self->n_hops++] = hop;
    OPENSSL_cleanse(&hop, sizeof(hop));
    return 0;
}

static int
origin_append_tuple(OriginStateObject *self, PyObject *item)
{
    PyObject *seq = PySequence_Fast(item, "each hop must be a (df, db, kf, kb) sequence");
    if (seq == NULL)
        return -1;
    int rc = -1;
    if (PySequence_Fast_GET_SIZE(seq) != 4) {
        PyErr_Format(PyExc_ValueError, "each hop must be (df, db, kf, kb), got %zd items",
                     PySequence_Fast_GET_SIZE(seq));
    }
    else {
        PyObject **it = PySequence_Fast_ITEMS(seq);
        rc = origin_append(self, it[0], it[1], it[2], it[3]);
    }
    Py_DECREF(seq);
    return rc;
}

static PyObject *
OriginState_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"hops", "_iv", NULL};
    PyObject *hops_obj, *iv_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$O:OriginState", kwlist, &hops_obj,
                                     &iv_obj))
        return NULL;
    OriginStateObject *self = (OriginStateObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->hops = NULL;
    self->n_hops = 0;
    atomic_init(&self->in_use, 0);
    self->broken = 0;
    if (parse_iv(iv_obj, self->iv) < 0)
        goto fail;
    PyObject *iter = PyObject_GetIter(hops_obj);
    if (iter == NULL)
        goto fail;
    PyObject *item;
    while ((item = PyIter_Next(iter)) != NULL) {
        int rc = origin_append_tuple(self, item);
        Py_DECREF(item);
        if (rc < 0) {
            Py_DECREF(iter);
            goto fail;
        }
    }
    Py_DECREF(iter);
    if (PyErr_Occurred())
        goto fail;
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static void
OriginState_dealloc(OriginStateObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->hops != NULL) {
        OPENSSL_cleanse(self->hops, (size_t)self->n_hops * sizeof(HopState));
        PyMem_Free(self->hops);
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(OriginState_add_hop_doc,
"add_hop(df, db, kf, kb) -> None\n\n"
"Append a hop (after EXTENDED2); its keystreams and digests start fresh.\n"
"One thread at a time per object.");

static PyObject *
OriginState_add_hop(OriginStateObject *self, PyObject *args)
{
    PyObject *df, *db, *kf, *kb;
    if (!PyArg_ParseTuple(args, "OOOO:add_hop", &df, &db, &kf, &kb))
        return NULL;
    if (claim(&self->in_use, "OriginState") < 0)
        return NULL;
    int rc = origin_append(self, df, db, kf, kb);
    unclaim(&self->in_use);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(OriginState_encrypt_doc,
"encrypt(buf, hop) -> bytes\n\n"
"For n joined plaintext payloads for hop index `hop` (0-based): per cell in order, set the\n"
"digest field from that hop's forward running SHA-1; then apply Kf of hop, hop-1, ..., 0\n"
"(one AES call per layer over the whole buffer). Releases the GIL.\n"
"One thread at a time per object.");

static PyObject *
OriginState_encrypt(PyObject *self, PyObject *args)
{
    PyObject *buf;
    Py_ssize_t hop;
    if (!PyArg_ParseTuple(args, "On:encrypt", &buf, &hop))
        return NULL;
    return job_call(self, OP_ENCRYPT, buf, hop);
}

PyDoc_STRVAR(OriginState_decrypt_doc,
"decrypt(buf) -> (out: bytes, hops: bytes)\n\n"
"For n joined payloads arriving at the client: per cell in order, peel Kb layers from hop 0\n"
"outward until a hop has recognized == 0 and a matching backward digest (which advances);\n"
"hops[i] is that hop's index and out holds the plaintexts. Processing stops at the first\n"
"cell no hop recognizes: len(hops) is then that cell's index (< n), out holds only the\n"
"cells before it, and the state is exactly as after them. Releases the GIL.\n"
"One thread at a time per object.");

static PyObject *
OriginState_decrypt(PyObject *self, PyObject *buf)
{
    return job_call(self, OP_DECRYPT, buf, 0);
}

static PyObject *
OriginState_get_n_hops(OriginStateObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->n_hops);
}

static PyObject *
OriginState_get_in_use(OriginStateObject *self, void *closure)
{
    return PyBool_FromLong(atomic_load(&self->in_use));
}

static PyObject *
OriginState_sizeof(OriginStateObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t(Py_TYPE(self)->tp_basicsize +
                              self->n_hops * (Py_ssize_t)sizeof(HopState));
}

static PyMethodDef OriginState_methods[] = {
    {"__sizeof__", (PyCFunction)OriginState_sizeof, METH_NOARGS,
     "Bytes used by this state, its per-hop array included."},
    {"encrypt", (PyCFunction)OriginState_encrypt, METH_VARARGS, OriginState_encrypt_doc},
    {"decrypt", (PyCFunction)OriginState_decrypt, METH_O, OriginState_decrypt_doc},
    {"add_hop", (PyCFunction)OriginState_add_hop, METH_VARARGS, OriginState_add_hop_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef OriginState_getset[] = {
    {"n_hops", (getter)OriginState_get_n_hops, NULL, "Number of hops with keys.", NULL},
    {"in_use", (getter)OriginState_get_in_use, NULL,
     "True while a call on this object is running (any thread may read it).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(OriginState_doc,
"OriginState(hops, *, _iv=None)\n\n"
"The client's tor1 state for one circuit; hops is an iterable of (df, db, kf, kb) (hop 0\n"
"is the guard; at most 255 hops). _iv (test hook) sets the initial 16-byte counter block of\n"
"every keystream. Any thread may create it; one thread at a time may call its methods\n"
"(RuntimeError otherwise).");

static PyType_Slot OriginState_slots[] = {
    {Py_tp_new, OriginState_new},
    {Py_tp_dealloc, OriginState_dealloc},
    {Py_tp_methods, OriginState_methods},
    {Py_tp_getset, OriginState_getset},
    {Py_tp_doc, (void *)OriginState_doc},
    {0, NULL},
};

static PyType_Spec OriginState_spec = {
    .name = "tor1._kernel._tor1.OriginState",
    .basicsize = sizeof(OriginStateObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = OriginState_slots,
};

/* ================================================================== groups */

/* The pending exception as an instance (new reference), the error indicator cleared. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *value = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    return value; /* NULL only if no exception was set, which no caller allows */
}

/* Read one job tuple (state, op, buf) or (state, op, buf, hop). 0, or -1 with an exception. */
static int
parse_job(PyObject *item, PyObject **state, int *op, PyObject **buf, Py_ssize_t *hop)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 3 || PyTuple_GET_SIZE(item) > 4) {
        PyErr_SetString(PyExc_TypeError,
                        "a job is a tuple (state, op, buf) or (state, op, buf, hop)");
        return -1;
    }
    Py_ssize_t size = PyTuple_GET_SIZE(item);
    long value = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < 0 || value >= N_OPS) {
        PyErr_Format(PyExc_ValueError, "unknown op %ld", value);
        return -1;
    }
    *state = PyTuple_GET_ITEM(item, 0);
    *op = (int)value;
    *buf = PyTuple_GET_ITEM(item, 2);
    *hop = 0;
    if ((*op == OP_ENCRYPT) != (size == 4)) {
        PyErr_SetString(PyExc_TypeError, "an OP_ENCRYPT job, and only that, takes a hop");
        return -1;
    }
    if (size == 4) {
        *hop = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 3));
        if (*hop == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(crypt_group_doc,
"crypt_group(jobs) -> list\n\n"
"Run several circuits' batches with ONE release of the GIL. jobs is a list (or tuple) of\n"
"tuples (state, op, buf) or, for OP_ENCRYPT, (state, OP_ENCRYPT, buf, hop):\n"
"  OP_FORWARD / OP_BACKWARD / OP_ORIGINATE on a RelayState (its forward / backward /\n"
"  originate), OP_ENCRYPT / OP_DECRYPT on an OriginState (its encrypt / decrypt).\n"
"buf is what the method takes (a bytes-like object or a list/tuple of pieces). The result\n"
"has one entry per job, in order: what that method would have returned, or, if the job\n"
"failed, the exception instance it would have raised (errors stay with their job; the\n"
"other jobs run). Jobs run one after another, in list order, on the calling thread, so\n"
"one state may appear in several jobs and sees them in that order. A state in use by\n"
"another thread fails its job with RuntimeError. The GIL is released once for all jobs\n"
"when they hold GIL_RELEASE_MIN_CELLS cells or more in total.");

static PyObject *
tor1_crypt_group(PyObject *module, PyObject *jobs_obj)
{
    ModuleState *st = PyModule_GetState(module);
    /* A snapshot: the items (and so every state and buffer) stay alive for the whole call.
     * PySequence_Fast would return a list itself, which another thread could clear while the
     * GIL is released; a tuple copy cannot change. */
    if (!PyList_Check(jobs_obj) && !PyTuple_Check(jobs_obj)) {
        PyErr_SetString(PyExc_TypeError, "crypt_group() takes a list or tuple of jobs");
        return NULL;
    }
    PyObject *seq = PySequence_Tuple(jobs_obj);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *results = PyList_New(n);
    Job *jobs = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(Job));
    if (results == NULL || jobs == NULL) {
        Py_XDECREF(results);
        PyMem_Free(jobs);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    /* Phase 1, GIL held: prepare every job; a job that cannot start gets its exception. A
     * state met again shares the claim of its first prepared job (found by a backward scan:
     * groups are small). */
    Py_ssize_t total_cells = 0;
    int lost = 0; /* an error could not be taken as an instance: fail the call at the end */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *state, *buf;
        int op;
        Py_ssize_t hop;
        if (parse_job(items[i], &state, &op, &buf, &hop) == 0) {
            const Job *share = NULL;
            for (Py_ssize_t j = i - 1; j >= 0 && share == NULL; j--) {
                if (jobs[j].out != NULL && jobs[j].state == state)
                    share = &jobs[j];
            }
            if (job_prepare(&jobs[i], st, state, op, buf, hop, share) == 0) {
                total_cells += jobs[i].ncells;
                continue;
            }
        }
        PyObject *error = take_exception();
        lost |= error == NULL;
        PyList_SET_ITEM(results, i, error != NULL ? error : Py_NewRef(Py_None));
    }
    /* Phase 2, no GIL: run the prepared jobs in order (out != NULL marks them). */
    PyThreadState *ts = total_cells >= GIL_RELEASE_MIN_CELLS ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (jobs[i].out != NULL)
            job_run(st->aes128ctr, &jobs[i]);
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    /* Phase 3, GIL held: unpin and let go of every state, then build the results (which
     * may allocate, run the GC and so other threads' code: no state is held any more). */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (jobs[i].out != NULL)
            job_settle(&jobs[i]);
    }
    for (Py_ssize_t i = 0; i < n; i++)
        job_unclaim(&jobs[i]);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (jobs[i].out == NULL)
            continue;
        PyObject *result = job_result(&jobs[i]);
        if (result == NULL) {
            result = take_exception();
            lost |= result == NULL;
        }
        PyList_SET_ITEM(results, i, result != NULL ? result : Py_NewRef(Py_None));
    }
    PyMem_Free(jobs);
    Py_DECREF(seq);
    if (lost) { /* every job was still settled and its state let go */
        Py_DECREF(results);
        PyErr_SetString(PyExc_SystemError, "crypt_group: a job failed without an exception");
        return NULL;
    }
    return results;
}

static PyMethodDef tor1_methods[] = {
    {"crypt_group", (PyCFunction)tor1_crypt_group, METH_O, crypt_group_doc},
    {NULL, NULL, 0, NULL},
};

/* ================================================================== module */

static int
tor1_exec(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    st->aes128ctr = EVP_CIPHER_fetch(NULL, "AES-128-CTR", NULL);
    if (st->aes128ctr == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no AES-128-CTR");
        return -1;
    }
    st->relay_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &RelayState_spec, NULL);
    if (st->relay_type == NULL || PyModule_AddType(module, st->relay_type) < 0)
        return -1;
    st->origin_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &OriginState_spec, NULL);
    if (st->origin_type == NULL || PyModule_AddType(module, st->origin_type) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "CELL_LEN", CELL_LEN) < 0 ||
        PyModule_AddIntConstant(module, "MAX_HOPS", MAX_HOPS) < 0 ||
        PyModule_AddIntConstant(module, "GIL_RELEASE_MIN_CELLS", GIL_RELEASE_MIN_CELLS) < 0 ||
        PyModule_AddIntConstant(module, "OP_FORWARD", OP_FORWARD) < 0 ||
        PyModule_AddIntConstant(module, "OP_BACKWARD", OP_BACKWARD) < 0 ||
        PyModule_AddIntConstant(module, "OP_ORIGINATE", OP_ORIGINATE) < 0 ||
        PyModule_AddIntConstant(module, "OP_ENCRYPT", OP_ENCRYPT) < 0 ||
        PyModule_AddIntConstant(module, "OP_DECRYPT", OP_DECRYPT) < 0 ||
        PyModule_AddStringConstant(module, "OPENSSL_VERSION",
                                   OpenSSL_version(OPENSSL_VERSION)) < 0)
        return -1;
    return 0;
}

static int
tor1_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *st = PyModule_GetState(module);
    Py_VISIT(st->relay_type);
    Py_VISIT(st->origin_type);
    return 0;
}

static int
tor1_clear(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    Py_CLEAR(st->relay_type);
    Py_CLEAR(st->origin_type);
    return 0;
}

static void
tor1_free(void *module)
{
    ModuleState *st = PyModule_GetState((PyObject *)module);
    tor1_clear((PyObject *)module);
    EVP_CIPHER_free(st->aes128ctr); /* NULL is fine */
    st->aes128ctr = NULL;
}

static PyModuleDef_Slot tor1_slots[] = {
    {Py_mod_exec, tor1_exec},
    {0, NULL},
};

PyDoc_STRVAR(tor1_doc,
"GIL-free batch kernel for Tor's tor1 relay-cell crypto (RelayState, OriginState).\n"
"Byte-for-byte the results of tor1.reference; see tor1kernel.c for the design.");

static struct PyModuleDef tor1_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tor1._kernel._tor1",
    .m_doc = tor1_doc,
    .m_size = sizeof(ModuleState),
    .m_methods = tor1_methods,
    .m_slots = tor1_slots,
    .m_traverse = tor1_traverse,
    .m_clear = tor1_clear,
    .m_free = tor1_free,
};

PyMODINIT_FUNC
PyInit__tor1(void)
{
    return PyModuleDef_Init(&tor1_module);
}
