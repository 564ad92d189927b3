/*
 * relay._ntor._ntorkernel: the relay's side of Tor's circuit handshakes, in batches, with the
 * GIL released.
 *
 * Why this exists
 * ---------------
 * A relay answers every CREATE2 with an ntor server handshake (tor-spec 5.1.4): three X25519
 * scalar multiplications, two HMAC-SHA256 and an HKDF-SHA256. relay.handshakes.ntor_server
 * does it on `cryptography`, whose X25519 holds the GIL, so the work serializes with the event
 * loop wherever it runs. This module does the whole computation for a batch of onionskins in
 * ONE call that releases the GIL for all of it, on OpenSSL's libcrypto (the library
 * `cryptography` and `hashlib` use), so a worker thread can answer a flood of CREATE2 while
 * the loop keeps running. Results are byte-for-byte those of relay.handshakes.
 *
 * API
 * ---
 * NtorKey(secret, identity): a relay's curve25519 onion key (secret b, 32 bytes) and RSA
 *     identity digest (20 bytes). Built once per onion key: importing b computes B = b*G, a
 *     scalar multiplication as costly as a third of a handshake. Immutable, so any number of
 *     threads may use one key at the same time. Attributes: public (B), identity, in_use.
 * ntor_server_batch(jobs) -> list: each job is (keys, hdata) or, as a test hook,
 *     (keys, hdata, y) with y the server's ephemeral secret (32 bytes). keys is an NtorKey or
 *     a tuple of them (the current onion key and the previous ones, for onion key rotation):
 *     the onionskin ID(20) | B(32) | X(32) names B, and the key whose public value and identity
 *     match answers. hdata is bytes-like; longer than 84 bytes, the first 84 are used. Each
 *     result is (reply, material): reply = Y | AUTH (64 bytes), material = the 92 bytes of
 *     HKDF output, Df | Db | Kf | Kb (72, what ntor_server returns) then the nonce KH (20);
 *     or, for a job that fails, the exception instance ntor_server would raise
 *     (relay.handshakes.HandshakeError: short onionskin, another identity, an onion key we do
 *     not have, a low-order X) or TypeError / ValueError for a malformed job. Errors stay with
 *     their job; the other jobs are answered.
 * create_fast_server_batch(jobs) -> list: CREATE_FAST (KDF-TOR over SHA-1). Each job is an
 *     onionskin (bytes-like, X = its first 20 bytes) or, as a test hook, (onionskin, y) with y
 *     the 20-byte server nonce; each result is (reply, material), reply = Y | KH (40 bytes),
 *     material 72 bytes, exactly relay.handshakes.create_fast_server; or the exception.
 *
 * How the work is laid out
 * ------------------------
 * Phase 1 (GIL held): parse every job, copy its 84 onionskin bytes into C memory, find its
 * key, and check ID and B (public values). Phase 2 (GIL released once for the whole batch):
 * for each job, y from RAND_bytes (OpenSSL's per-thread DRBG), Y = y*G, EXP(X,y), EXP(X,b)
 * via EVP_PKEY_derive (which fails on an all-zero result: a low-order X), then the HMACs and
 * the HKDF. Phase 3 (GIL held): build the result objects. Between PyEval_SaveThread and
 * PyEval_RestoreThread only C memory and immutable keys are touched.
 *
 * HMAC-SHA256 is computed by hand on OpenSSL's SHA256_* functions (deprecated in 3.0 but
 * exported; the tor1 kernel uses SHA1_* the same way): the three fixed keys of ntor (t_mac,
 * t_verify, t_key) have their inner and outer SHA-256 states absorbed once at import, so each
 * HMAC costs two compressions plus the message, and a handshake fetches no algorithm and
 * allocates nothing for its MACs. HKDF (RFC 5869) is two lines on that HMAC.
 *
 * Threads
 * -------
 * Any thread may call the batch functions, several at once: nothing is shared but NtorKey
 * objects (read-only after construction; OpenSSL's EVP_PKEY reference count is atomic) and
 * the module state (the precomputed HMAC states and the exception type, read-only after
 * import). The module has no mutable global state. Secrets (b, y, shared secrets, PRK) are
 * wiped with OPENSSL_cleanse when no longer needed.
 */

#define PY_SSIZE_T_CLEAN
/* SHA256_* and SHA1 on plain contexts: deprecated in OpenSSL 3.0 but still exported. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>

#include <stdatomic.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#define ID_LEN 20
#define KEY_LEN 32
#define ONIONSKIN_LEN (ID_LEN + 2 * KEY_LEN) /* ID | B | X = 84 */
#define REPLY_LEN (2 * KEY_LEN)              /* Y | AUTH = 64 */
#define HOP_MATERIAL_LEN 72                  /* Df | Db | Kf | Kb */
#define NTOR_MATERIAL_LEN (HOP_MATERIAL_LEN + 20) /* ... then KH */
#define SHA256_LEN 32
#define HMAC_BLOCK 64

#define FAST_LEN 20             /* X, Y and KH of CREATE_FAST */
#define FAST_REPLY_LEN 40       /* Y | KH */
/* CREATE_FAST costs ~1 us: releasing the GIL for fewer jobs costs more than it gives. */
#define FAST_GIL_RELEASE_MIN_JOBS 16

static const char PROTOID[] = "ntor-curve25519-sha256-1";
#define PROTOID_LEN (sizeof(PROTOID) - 1)
static const char SERVER_STR[] = "Server";
#define SERVER_LEN (sizeof(SERVER_STR) - 1)
static const char SUFFIX_MAC[] = ":mac";
static const char SUFFIX_VERIFY[] = ":verify";
static const char SUFFIX_KEY[] = ":key_extract";
static const char SUFFIX_EXPAND[] = ":key_expand";

/* secret_input = EXP(X,y) | EXP(X,b) | ID | B | X | Y | PROTOID */
#define SECRET_INPUT_LEN (KEY_LEN * 2 + ID_LEN + KEY_LEN * 3 + PROTOID_LEN)
/* auth_input = verify | ID | B | Y | X | PROTOID | "Server" */
#define AUTH_INPUT_LEN (SHA256_LEN + ID_LEN + KEY_LEN * 3 + PROTOID_LEN + SERVER_LEN)

/* ------------------------------------------------------------------ HMAC-SHA256 */

/* A key's absorbed inner (key ^ ipad) and outer (key ^ opad) SHA-256 states. */
typedef struct {
    SHA256_CTX inner;
    SHA256_CTX outer;
} HmacKey;

/* Absorb a key of at most HMAC_BLOCK bytes (every key here is: 28..36-byte labels, a 32-byte
 * PRK). No GIL needed. */
static void
hmac_key_init(HmacKey *hk, const unsigned char *key, size_t len)
{
    unsigned char pad[HMAC_BLOCK];
    memset(pad, 0x36, sizeof pad);
    for (size_t i = 0; i < len; i++)
        pad[i] ^= key[i];
    SHA256_Init(&hk->inner);
    SHA256_Update(&hk->inner, pad, sizeof pad);
    memset(pad, 0x5c, sizeof pad);
    for (size_t i = 0; i < len; i++)
        pad[i] ^= key[i];
    SHA256_Init(&hk->outer);
    SHA256_Update(&hk->outer, pad, sizeof pad);
    OPENSSL_cleanse(pad, sizeof pad);
}

/* out = HMAC-SHA256(key, a | b); b may be NULL. No GIL needed. */
static void
hmac2(const HmacKey *hk, const unsigned char *a, size_t alen, const unsigned char *b,
      size_t blen, unsigned char out[SHA256_LEN])
{
    SHA256_CTX ctx = hk->inner;
    unsigned char inner[SHA256_LEN];
    SHA256_Update(&ctx, a, alen);
    if (b != NULL)
        SHA256_Update(&ctx, b, blen);
    SHA256_Final(inner, &ctx);
    ctx = hk->outer;
    SHA256_Update(&ctx, inner, sizeof inner);
    SHA256_Final(out, &ctx);
    OPENSSL_cleanse(inner, sizeof inner);
    OPENSSL_cleanse(&ctx, sizeof ctx);
}

/* ------------------------------------------------------------------ module state */

typedef struct {
    HmacKey t_mac;                /* the three fixed keys of ntor, absorbed at import */
    HmacKey t_verify;
    HmacKey t_key;
    unsigned char m_expand[64];   /* HKDF info: PROTOID ":key_expand" */
    size_t m_expand_len;
    PyObject *handshake_error;    /* relay.handshakes.HandshakeError */
    PyTypeObject *key_type;
} ModuleState;

/* out = HKDF-SHA256(IKM = secret_input, salt = t_key, info = m_expand), NTOR_MATERIAL_LEN
 * bytes (RFC 5869: PRK = HMAC(salt, IKM); T(i) = HMAC(PRK, T(i-1) | info | i)). No GIL. */
static void
kdf_ntor(const ModuleState *st, const unsigned char *secret_input, size_t len,
         unsigned char out[NTOR_MATERIAL_LEN])
{
    unsigned char prk[SHA256_LEN];
    unsigned char block[SHA256_LEN + 64 + 1]; /* T(i-1) | info | i */
    unsigned char t[SHA256_LEN];
    HmacKey hk;
    hmac2(&st->t_key, secret_input, len, NULL, 0, prk);
    hmac_key_init(&hk, prk, sizeof prk);
    size_t done = 0, prev = 0;
    for (unsigned char i = 1; done < NTOR_MATERIAL_LEN; i++) {
        memcpy(block + prev, st->m_expand, st->m_expand_len);
        block[prev + st->m_expand_len] = i;
        hmac2(&hk, block, prev + st->m_expand_len + 1, NULL, 0, t);
        size_t take = NTOR_MATERIAL_LEN - done < SHA256_LEN ? NTOR_MATERIAL_LEN - done : SHA256_LEN;
        memcpy(out + done, t, take);
        done += take;
        memcpy(block, t, SHA256_LEN);
        prev = SHA256_LEN;
    }
    OPENSSL_cleanse(prk, sizeof prk);
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(t, sizeof t);
    OPENSSL_cleanse(&hk, sizeof hk);
}

/* ------------------------------------------------------------------ NtorKey */

typedef struct {
    PyObject_HEAD
    EVP_PKEY *b;                   /* the onion key; read-only after construction */
    unsigned char pub[KEY_LEN];    /* B */
    unsigned char identity[ID_LEN];
    atomic_int in_use;             /* batch calls answering with this key right now */
} NtorKeyObject;

/* Copy exactly `len` bytes of a bytes-like object into `out`. 0, or -1 with an exception. */
static int
copy_exact(PyObject *obj, unsigned char *out, Py_ssize_t len, const char *what)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view.len != len) {
        PyErr_Format(PyExc_ValueError, "%s must be %zd bytes, got %zd", what, len, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    memcpy(out, view.buf, (size_t)len);
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *
NtorKey_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"secret", "identity", NULL};
    PyObject *secret_obj, *identity_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:NtorKey", kwlist, &secret_obj,
                                     &identity_obj))
        return NULL;
    unsigned char secret[KEY_LEN];
    unsigned char identity[ID_LEN];
    if (copy_exact(secret_obj, secret, KEY_LEN, "onion key secret") < 0)
        return NULL;
    if (copy_exact(identity_obj, identity, ID_LEN, "identity digest") < 0) {
        OPENSSL_cleanse(secret, sizeof secret);
        return NULL;
    }
    EVP_PKEY *b = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, secret, KEY_LEN);
    OPENSSL_cleanse(secret, sizeof secret);
    size_t publen = KEY_LEN;
    unsigned char pub[KEY_LEN];
    if (b == NULL || EVP_PKEY_get_raw_public_key(b, pub, &publen) != 1 || publen != KEY_LEN) {
        EVP_PKEY_free(b);
        ERR_clear_error();
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not import the X25519 onion key");
        return NULL;
    }
    NtorKeyObject *self = (NtorKeyObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        EVP_PKEY_free(b);
        return NULL;
    }
    self->b = b;
    memcpy(self->pub, pub, KEY_LEN);
    memcpy(self->identity, identity, ID_LEN);
    atomic_init(&self->in_use, 0);
    return (PyObject *)self;
}

static void
NtorKey_dealloc(NtorKeyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    EVP_PKEY_free(self->b); /* frees and wipes the key; NULL is fine */
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
NtorKey_get_public(NtorKeyObject *self, void *closure)
{
    return PyBytes_FromStringAndSize((const char *)self->pub, KEY_LEN);
}

static PyObject *
NtorKey_get_identity(NtorKeyObject *self, void *closure)
{
    return PyBytes_FromStringAndSize((const char *)self->identity, ID_LEN);
}

static PyObject *
NtorKey_get_in_use(NtorKeyObject *self, void *closure)
{
    return PyLong_FromLong(atomic_load(&self->in_use));
}

static PyObject *
NtorKey_repr(NtorKeyObject *self)
{
    char hex[2 * 4 + 1];
    for (int i = 0; i < 4; i++)
        snprintf(hex + 2 * i, 3, "%02x", self->pub[i]);
    return PyUnicode_FromFormat("<NtorKey B=%s...>", hex);
}

static PyGetSetDef NtorKey_getset[] = {
    {"public", (getter)NtorKey_get_public, NULL, "B: the 32-byte public onion key.", NULL},
    {"identity", (getter)NtorKey_get_identity, NULL, "The 20-byte RSA identity digest.", NULL},
    {"in_use", (getter)NtorKey_get_in_use, NULL,
     "How many batch calls are answering with this key right now (any thread may read it).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(NtorKey_doc,
"NtorKey(secret, identity)\n\n"
"A relay's ntor onion key: the X25519 secret b (32 bytes) and the RSA identity digest\n"
"(20 bytes). B = b*G is computed once, here. Immutable: any thread, any number at once.\n"
"The secret cannot be read back.");

static PyType_Slot NtorKey_slots[] = {
    {Py_tp_new, NtorKey_new},
    {Py_tp_dealloc, NtorKey_dealloc},
    {Py_tp_getset, NtorKey_getset},
    {Py_tp_repr, NtorKey_repr},
    {Py_tp_doc, (void *)NtorKey_doc},
    {0, NULL},
};

static PyType_Spec NtorKey_spec = {
    .name = "relay._ntor._ntorkernel.NtorKey",
    .basicsize = sizeof(NtorKeyObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = NtorKey_slots,
};

/* ------------------------------------------------------------------ shared helpers */

/* The pending exception as an instance (new reference), the error indicator cleared. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Copy the first `need` bytes of a bytes-like object (longer input: the rest is ignored).
 * Returns the object's length (which may be short: then nothing is copied), or -1 with an
 * exception if it is not bytes-like. */
static Py_ssize_t
copy_prefix(PyObject *obj, unsigned char *out, Py_ssize_t need)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return -1;
    Py_ssize_t len = view.len;
    if (len >= need)
        memcpy(out, view.buf, (size_t)need);
    PyBuffer_Release(&view);
    return len;
}

/* ------------------------------------------------------------------ ntor */

enum {
    NTOR_OK = 0,
    NTOR_LOW_ORDER,   /* EXP(X, y) or EXP(X, b) is all-zero */
    NTOR_INTERNAL,    /* OpenSSL failed (allocation, RNG) */
};

typedef struct {
    NtorKeyObject *key;             /* borrowed from the snapshot of the jobs; NULL: failed */
    unsigned char skin[ONIONSKIN_LEN];
    unsigned char y[KEY_LEN];
    int have_y;                     /* the test hook gave y */
    int status;                     /* NTOR_* after phase 2 */
    unsigned char reply[REPLY_LEN];
    unsigned char material[NTOR_MATERIAL_LEN];
} NtorJob;

/* out = X25519(priv, peer). NTOR_OK, NTOR_LOW_ORDER (all-zero: OpenSSL's derive refuses it,
 * and the result is checked again) or NTOR_INTERNAL. No GIL needed. */
static int
x25519(EVP_PKEY *priv, EVP_PKEY *peer, unsigned char out[KEY_LEN])
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(priv, NULL);
    size_t len = KEY_LEN;
    int status = NTOR_INTERNAL;
    /* validate_peer = 0: the check only looks for a public key, which peer is by
     * construction; it would cost a context per call. */
    if (ctx != NULL && EVP_PKEY_derive_init(ctx) == 1 &&
        EVP_PKEY_derive_set_peer_ex(ctx, peer, 0) == 1) {
        if (EVP_PKEY_derive(ctx, out, &len) == 1 && len == KEY_LEN) {
            unsigned char acc = 0;
            for (int i = 0; i < KEY_LEN; i++)
                acc |= out[i];
            status = acc == 0 ? NTOR_LOW_ORDER : NTOR_OK;
        } else {
            status = NTOR_LOW_ORDER; /* X25519 derivation fails only on an all-zero result */
        }
    }
    EVP_PKEY_CTX_free(ctx);
    if (status != NTOR_OK)
        ERR_clear_error();
    return status;
}

/* The server's side of one handshake (tor-spec 5.1.4). Sets job->status and, on success,
 * job->reply and job->material. No GIL: only the job and the immutable key are touched. */
static void
ntor_run(const ModuleState *st, NtorJob *job)
{
    const unsigned char *id = job->skin;
    const unsigned char *B = job->skin + ID_LEN;
    const unsigned char *X = job->skin + ID_LEN + KEY_LEN;
    unsigned char Y[KEY_LEN];
    unsigned char secret_input[SECRET_INPUT_LEN];
    unsigned char auth_input[AUTH_INPUT_LEN];
    EVP_PKEY *x_pub = NULL, *y_key = NULL;
    size_t ylen = KEY_LEN;

    job->status = NTOR_INTERNAL;
    if (!job->have_y && RAND_bytes(job->y, KEY_LEN) != 1)
        goto done;
    x_pub = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, X, KEY_LEN);
    y_key = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, job->y, KEY_LEN);
    if (x_pub == NULL || y_key == NULL ||
        EVP_PKEY_get_raw_public_key(y_key, Y, &ylen) != 1 || ylen != KEY_LEN)
        goto done;
    /* secret_input = EXP(X,y) | EXP(X,b) | ID | B | X | Y | PROTOID */
    unsigned char *p = secret_input;
    job->status = x25519(y_key, x_pub, p);
    if (job->status != NTOR_OK)
        goto done;
    p += KEY_LEN;
    job->status = x25519(job->key->b, x_pub, p);
    if (job->status != NTOR_OK)
        goto done;
    p += KEY_LEN;
    memcpy(p, id, ID_LEN), p += ID_LEN;
    memcpy(p, B, KEY_LEN), p += KEY_LEN;
    memcpy(p, X, KEY_LEN), p += KEY_LEN;
    memcpy(p, Y, KEY_LEN), p += KEY_LEN;
    memcpy(p, PROTOID, PROTOID_LEN);
    /* auth_input = verify | ID | B | Y | X | PROTOID | "Server"; AUTH = H(auth_input, t_mac) */
    p = auth_input;
    hmac2(&st->t_verify, secret_input, sizeof secret_input, NULL, 0, p), p += SHA256_LEN;
    memcpy(p, id, ID_LEN), p += ID_LEN;
    memcpy(p, B, KEY_LEN), p += KEY_LEN;
    memcpy(p, Y, KEY_LEN), p += KEY_LEN;
    memcpy(p, X, KEY_LEN), p += KEY_LEN;
    memcpy(p, PROTOID, PROTOID_LEN), p += PROTOID_LEN;
    memcpy(p, SERVER_STR, SERVER_LEN);
    memcpy(job->reply, Y, KEY_LEN);
    hmac2(&st->t_mac, auth_input, sizeof auth_input, NULL, 0, job->reply + KEY_LEN);
    kdf_ntor(st, secret_input, sizeof secret_input, job->material);
    job->status = NTOR_OK;
done:
    if (job->status == NTOR_INTERNAL)
        ERR_clear_error();
    EVP_PKEY_free(x_pub);
    EVP_PKEY_free(y_key); /* wipes y's copy inside OpenSSL */
    OPENSSL_cleanse(job->y, KEY_LEN);
    OPENSSL_cleanse(secret_input, sizeof secret_input);
    OPENSSL_cleanse(auth_input, sizeof auth_input);
}

/* Set the HandshakeError of relay.handshakes (with ntor_server's message) and return -1. */
static int
handshake_error(const ModuleState *st, const char *message)
{
    PyErr_SetString(st->handshake_error, message);
    return -1;
}

/* Phase 1 for one job: parse (keys, hdata[, y]), copy the onionskin, find the key that
 * answers it. 0 with job->key set, or -1 with an exception (the job's result). */
static int
ntor_prepare(const ModuleState *st, PyObject *item, NtorJob *job)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2 || PyTuple_GET_SIZE(item) > 3) {
        PyErr_SetString(PyExc_TypeError,
                        "an ntor job is a tuple (keys, hdata) or (keys, hdata, y)");
        return -1;
    }
    PyObject *keys = PyTuple_GET_ITEM(item, 0);
    PyObject **candidates = &keys;
    Py_ssize_t n_candidates = 1;
    if (PyTuple_Check(keys)) {
        candidates = PySequence_Fast_ITEMS(keys);
        n_candidates = PyTuple_GET_SIZE(keys);
    }
    if (n_candidates == 0) {
        PyErr_SetString(PyExc_ValueError, "an ntor job's keys tuple is empty");
        return -1;
    }
    for (Py_ssize_t k = 0; k < n_candidates; k++) {
        if (!PyObject_TypeCheck(candidates[k], st->key_type)) {
            PyErr_Format(PyExc_TypeError,
                         "an ntor job's keys must be an NtorKey or a tuple of them, got %R",
                         Py_TYPE(candidates[k]));
            return -1;
        }
    }
    if (PyTuple_GET_SIZE(item) == 3) {
        if (copy_exact(PyTuple_GET_ITEM(item, 2), job->y, KEY_LEN, "ntor y (test hook)") < 0)
            return -1;
        job->have_y = 1;
    }
    Py_ssize_t len = copy_prefix(PyTuple_GET_ITEM(item, 1), job->skin, ONIONSKIN_LEN);
    if (len < 0)
        return -1;
    if (len < ONIONSKIN_LEN) {
        PyErr_Format(st->handshake_error, "ntor onionskin must be %d bytes, got %zd",
                     ONIONSKIN_LEN, len);
        return -1;
    }
    /* ntor_server's order: the identity first, then the onion key. */
    NtorKeyObject *match = NULL;
    int identity_known = 0;
    for (Py_ssize_t k = 0; k < n_candidates && match == NULL; k++) {
        NtorKeyObject *key = (NtorKeyObject *)candidates[k];
        if (CRYPTO_memcmp(job->skin, key->identity, ID_LEN) != 0)
            continue;
        identity_known = 1;
        if (CRYPTO_memcmp(job->skin + ID_LEN, key->pub, KEY_LEN) == 0)
            match = key;
    }
    if (!identity_known)
        return handshake_error(st, "ntor: onionskin is for another relay identity");
    if (match == NULL)
        return handshake_error(st, "ntor: onionskin names an onion key we do not have");
    job->key = match;
    return 0;
}

/* Phase 3 for one prepared job: its result (new reference), or NULL with an exception. */
static PyObject *
ntor_result(const ModuleState *st, const NtorJob *job)
{
    switch (job->status) {
    case NTOR_OK:
        return Py_BuildValue("(y#y#)", job->reply, (Py_ssize_t)REPLY_LEN, job->material,
                             (Py_ssize_t)NTOR_MATERIAL_LEN);
    case NTOR_LOW_ORDER:
        handshake_error(st, "ntor: the client's X is a low-order point (all-zero EXP)");
        return NULL;
    default:
        PyErr_SetString(PyExc_RuntimeError, "ntor: OpenSSL failed (allocation or RNG)");
        return NULL;
    }
}

/* Run `prepare` / `run` / `result` over a job list: the common frame of both batch functions.
 * A job whose phase 1 or 3 raises gets the exception instance as its result. */
typedef struct {
    size_t job_size;
    int (*prepare)(const ModuleState *, PyObject *, void *);
    void (*run)(const ModuleState *, void *);
    PyObject *(*result)(const ModuleState *, const void *);
    void (*settle)(void *);                 /* GIL held, after phase 2, prepared jobs only */
    int (*prepared)(const void *);          /* did phase 1 succeed for this job? */
    Py_ssize_t gil_release_min_jobs;
} BatchKind;

static PyObject *
run_batch(PyObject *module, PyObject *jobs_obj, const BatchKind *kind, const char *what)
{
    const ModuleState *st = PyModule_GetState(module);
    /* A real snapshot (a new tuple even when given a list, which another thread could change
     * while the GIL is released): its job tuples, and so the keys phase 2 borrows from them,
     * stay alive for the whole call. */
    if (!PyList_Check(jobs_obj) && !PyTuple_Check(jobs_obj)) {
        PyErr_SetString(PyExc_TypeError, what);
        return NULL;
    }
    PyObject *seq = PySequence_Tuple(jobs_obj);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = ((PyTupleObject *)seq)->ob_item;
    PyObject *results = PyList_New(n);
    unsigned char *jobs = PyMem_Calloc(n > 0 ? (size_t)n : 1, kind->job_size);
    if (results == NULL || jobs == NULL) {
        Py_XDECREF(results);
        PyMem_Free(jobs);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    int lost = 0; /* an error could not be taken as an instance: fail the call at the end */
    Py_ssize_t prepared = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        void *job = jobs + (size_t)i * kind->job_size;
        if (kind->prepare(st, items[i], job) == 0) {
            prepared++;
            continue;
        }
        PyObject *error = take_exception();
        lost |= error == NULL;
        PyList_SET_ITEM(results, i, error != NULL ? error : Py_NewRef(Py_None));
    }
    PyThreadState *ts = prepared >= kind->gil_release_min_jobs ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        void *job = jobs + (size_t)i * kind->job_size;
        if (kind->prepared(job))
            kind->run(st, job);
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    for (Py_ssize_t i = 0; i < n; i++) {
        void *job = jobs + (size_t)i * kind->job_size;
        if (!kind->prepared(job))
            continue;
        if (kind->settle != NULL)
            kind->settle(job);
        PyObject *result = kind->result(st, job);
        if (result == NULL) {
            result = take_exception();
            lost |= result == NULL;
        }
        PyList_SET_ITEM(results, i, result != NULL ? result : Py_NewRef(Py_None));
    }
    OPENSSL_cleanse(jobs, (size_t)(n > 0 ? n : 1) * kind->job_size); /* key material */
    PyMem_Free(jobs);
    Py_DECREF(seq);
    if (lost) {
        Py_DECREF(results);
        PyErr_SetString(PyExc_SystemError, "handshake batch: a job failed without an exception");
        return NULL;
    }
    return results;
}

/* Adapters from the generic frame to the ntor job. */
static int
ntor_prepare_any(const ModuleState *st, PyObject *item, void *job)
{
    NtorJob *j = job;
    if (ntor_prepare(st, item, j) < 0) {
        j->key = NULL;
        OPENSSL_cleanse(j->y, KEY_LEN);
        return -1;
    }
    atomic_fetch_add(&j->key->in_use, 1);
    return 0;
}

static void
ntor_run_any(const ModuleState *st, void *job)
{
    ntor_run(st, job);
}

static PyObject *
ntor_result_any(const ModuleState *st, const void *job)
{
    return ntor_result(st, job);
}

static void
ntor_settle(void *job)
{
    atomic_fetch_sub(&((NtorJob *)job)->key->in_use, 1);
}

static int
ntor_prepared(const void *job)
{
    return ((const NtorJob *)job)->key != NULL;
}

static const BatchKind NTOR_BATCH = {
    .job_size = sizeof(NtorJob),
    .prepare = ntor_prepare_any,
    .run = ntor_run_any,
    .result = ntor_result_any,
    .settle = ntor_settle,
    .prepared = ntor_prepared,
    .gil_release_min_jobs = 1, /* one handshake is ~3 scalar multiplications: always worth it */
};

PyDoc_STRVAR(ntor_server_batch_doc,
"ntor_server_batch(jobs) -> list\n\n"
"Answer a batch of ntor onionskins with ONE release of the GIL. jobs is a list (or tuple) of\n"
"(keys, hdata) or, as a test hook, (keys, hdata, y) with y the ephemeral secret (32 bytes).\n"
"keys is an NtorKey or a tuple of them (current and previous onion keys): the one whose\n"
"identity and B the onionskin names answers. hdata: ID | B | X (84 bytes; longer input: the\n"
"first 84). One result per job, in order: (reply, material) with reply = Y | AUTH (64 bytes)\n"
"and material = Df | Db | Kf | Kb | KH (92 bytes; the first 72 are ntor_server's), or the\n"
"exception instance relay.handshakes.ntor_server would raise (HandshakeError), TypeError /\n"
"ValueError for a malformed job. Any thread; several threads may call it at once.");

static PyObject *
ntor_server_batch(PyObject *module, PyObject *jobs)
{
    return run_batch(module, jobs, &NTOR_BATCH,
                     "ntor_server_batch() takes a list or tuple of jobs");
}

/* ------------------------------------------------------------------ CREATE_FAST */

/* out = KDF-TOR(k0) = SHA1(k0 | 00) | SHA1(k0 | 01) | ..., FAST_LEN + HOP_MATERIAL_LEN bytes
 * (tor-spec 5.2.1). No GIL. */
static void
kdf_tor(const unsigned char *k0, size_t len, unsigned char out[FAST_LEN + HOP_MATERIAL_LEN])
{
    unsigned char block[SHA_DIGEST_LENGTH];
    size_t done = 0;
    for (unsigned char i = 0; done < FAST_LEN + HOP_MATERIAL_LEN; i++) {
        SHA_CTX ctx;
        SHA1_Init(&ctx);
        SHA1_Update(&ctx, k0, len);
        SHA1_Update(&ctx, &i, 1);
        SHA1_Final(block, &ctx);
        size_t left = FAST_LEN + HOP_MATERIAL_LEN - done;
        size_t take = left < SHA_DIGEST_LENGTH ? left : SHA_DIGEST_LENGTH;
        memcpy(out + done, block, take);
        done += take;
        OPENSSL_cleanse(&ctx, sizeof ctx);
    }
    OPENSSL_cleanse(block, sizeof block);
}

typedef struct {
    int ok;                         /* phase 1 succeeded */
    int have_y;
    int rng_failed;
    unsigned char x[FAST_LEN];
    unsigned char y[FAST_LEN];
    unsigned char reply[FAST_REPLY_LEN];
    unsigned char material[HOP_MATERIAL_LEN];
} FastJob;

static int
fast_prepare(const ModuleState *st, PyObject *item, void *job)
{
    FastJob *j = job;
    PyObject *skin = item;
    if (PyTuple_Check(item)) {
        if (PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError,
                            "a CREATE_FAST job is an onionskin or a tuple (onionskin, y)");
            return -1;
        }
        skin = PyTuple_GET_ITEM(item, 0);
        if (copy_exact(PyTuple_GET_ITEM(item, 1), j->y, FAST_LEN, "CREATED_FAST Y") < 0)
            return -1;
        j->have_y = 1;
    }
    Py_ssize_t len = copy_prefix(skin, j->x, FAST_LEN);
    if (len < 0)
        return -1;
    if (len < FAST_LEN) {
        PyErr_Format(st->handshake_error, "CREATE_FAST body must be at least %d bytes, got %zd",
                     FAST_LEN, len);
        return -1;
    }
    j->ok = 1;
    return 0;
}

/* reply = Y | K[0:20], material = K[20:92] with K = KDF-TOR(X | Y). No GIL. */
static void
fast_run(const ModuleState *st, void *job)
{
    FastJob *j = job;
    unsigned char k0[2 * FAST_LEN];
    unsigned char k[FAST_LEN + HOP_MATERIAL_LEN];
    if (!j->have_y && RAND_bytes(j->y, FAST_LEN) != 1) {
        j->rng_failed = 1;
        ERR_clear_error();
        return;
    }
    memcpy(k0, j->x, FAST_LEN);
    memcpy(k0 + FAST_LEN, j->y, FAST_LEN);
    kdf_tor(k0, sizeof k0, k);
    memcpy(j->reply, j->y, FAST_LEN);
    memcpy(j->reply + FAST_LEN, k, FAST_LEN);
    memcpy(j->material, k + FAST_LEN, HOP_MATERIAL_LEN);
    OPENSSL_cleanse(k0, sizeof k0);
    OPENSSL_cleanse(k, sizeof k);
}

static PyObject *
fast_result(const ModuleState *st, const void *job)
{
    const FastJob *j = job;
    if (j->rng_failed) {
        PyErr_SetString(PyExc_RuntimeError, "CREATE_FAST: OpenSSL's RAND_bytes failed");
        return NULL;
    }
    return Py_BuildValue("(y#y#)", j->reply, (Py_ssize_t)FAST_REPLY_LEN, j->material,
                         (Py_ssize_t)HOP_MATERIAL_LEN);
}

static int
fast_prepared(const void *job)
{
    return ((const FastJob *)job)->ok;
}

static const BatchKind FAST_BATCH = {
    .job_size = sizeof(FastJob),
    .prepare = fast_prepare,
    .run = fast_run,
    .result = fast_result,
    .settle = NULL,
    .prepared = fast_prepared,
    .gil_release_min_jobs = FAST_GIL_RELEASE_MIN_JOBS,
};

PyDoc_STRVAR(create_fast_server_batch_doc,
"create_fast_server_batch(jobs) -> list\n\n"
"Answer CREATE_FAST onionskins (KDF-TOR over SHA-1). Each job is an onionskin (bytes-like,\n"
"X = its first 20 bytes) or, as a test hook, (onionskin, y) with y the 20-byte nonce. One\n"
"result per job, in order: (reply, material) with reply = Y | KH (40 bytes) and 72 bytes of\n"
"hop material, exactly relay.handshakes.create_fast_server; or the exception instance\n"
"(HandshakeError for a short onionskin). The GIL is released for batches of at least\n"
"FAST_GIL_RELEASE_MIN_JOBS jobs. Any thread.");

static PyObject *
create_fast_server_batch(PyObject *module, PyObject *jobs)
{
    return run_batch(module, jobs, &FAST_BATCH,
                     "create_fast_server_batch() takes a list or tuple of jobs");
}

/* ------------------------------------------------------------------ test hooks */

PyDoc_STRVAR(kdf_ntor_doc,
"_kdf_ntor(ikm) -> bytes\n\n"
"Test hook: the kernel's HKDF-SHA256 with ntor's salt and info, 92 bytes (what a handshake\n"
"derives from its secret_input). Any thread; keeps the GIL.");

static PyObject *
kdf_ntor_hook(PyObject *module, PyObject *arg)
{
    const ModuleState *st = PyModule_GetState(module);
    Py_buffer view;
    unsigned char out[NTOR_MATERIAL_LEN];
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    kdf_ntor(st, view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, sizeof out);
}

PyDoc_STRVAR(kdf_tor_doc,
"_kdf_tor(k0) -> bytes\n\n"
"Test hook: the kernel's KDF-TOR, 92 bytes (KH then a hop's 72). Any thread; keeps the GIL.");

static PyObject *
kdf_tor_hook(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    unsigned char out[FAST_LEN + HOP_MATERIAL_LEN];
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    kdf_tor(view.buf, (size_t)view.len, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, sizeof out);
}

static PyMethodDef ntorkernel_methods[] = {
    {"ntor_server_batch", (PyCFunction)ntor_server_batch, METH_O, ntor_server_batch_doc},
    {"create_fast_server_batch", (PyCFunction)create_fast_server_batch, METH_O,
     create_fast_server_batch_doc},
    {"_kdf_ntor", (PyCFunction)kdf_ntor_hook, METH_O, kdf_ntor_doc},
    {"_kdf_tor", (PyCFunction)kdf_tor_hook, METH_O, kdf_tor_doc},
    {NULL, NULL, 0, NULL},
};

/* ================================================================== module */

/* Absorb PROTOID + suffix as an HMAC key. */
static void
label_key(HmacKey *hk, const char *suffix)
{
    unsigned char label[64];
    size_t slen = strlen(suffix);
    memcpy(label, PROTOID, PROTOID_LEN);
    memcpy(label + PROTOID_LEN, suffix, slen);
    hmac_key_init(hk, label, PROTOID_LEN + slen);
}

static int
ntorkernel_exec(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    label_key(&st->t_mac, SUFFIX_MAC);
    label_key(&st->t_verify, SUFFIX_VERIFY);
    label_key(&st->t_key, SUFFIX_KEY);
    memcpy(st->m_expand, PROTOID, PROTOID_LEN);
    memcpy(st->m_expand + PROTOID_LEN, SUFFIX_EXPAND, strlen(SUFFIX_EXPAND));
    st->m_expand_len = PROTOID_LEN + strlen(SUFFIX_EXPAND);

    PyObject *handshakes = PyImport_ImportModule("relay.handshakes");
    if (handshakes == NULL)
        return -1;
    st->handshake_error = PyObject_GetAttrString(handshakes, "HandshakeError");
    Py_DECREF(handshakes);
    if (st->handshake_error == NULL)
        return -1;
    st->key_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &NtorKey_spec, NULL);
    if (st->key_type == NULL || PyModule_AddType(module, st->key_type) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "NTOR_MATERIAL_LEN", NTOR_MATERIAL_LEN) < 0 ||
        PyModule_AddIntConstant(module, "FAST_GIL_RELEASE_MIN_JOBS",
                                FAST_GIL_RELEASE_MIN_JOBS) < 0 ||
        PyModule_AddStringConstant(module, "OPENSSL_VERSION",
                                   OpenSSL_version(OPENSSL_VERSION)) < 0)
        return -1;
    return 0;
}

static int
ntorkernel_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *st = PyModule_GetState(module);
    Py_VISIT(st->handshake_error);
    Py_VISIT(st->key_type);
    return 0;
}

static int
ntorkernel_clear(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    Py_CLEAR(st->handshake_error);
    Py_CLEAR(st->key_type);
    return 0;
}

static void
ntorkernel_free(void *module)
{
    ntorkernel_clear((PyObject *)module);
}

static PyModuleDef_Slot ntorkernel_slots[] = {
    {Py_mod_exec, ntorkernel_exec},
    {0, NULL},
};

PyDoc_STRVAR(ntorkernel_doc,
"The relay's circuit handshakes (ntor, CREATE_FAST) in batches with the GIL released.\n"
"Byte-for-byte the results of relay.handshakes; see ntorkernel.c for the design.");

static struct PyModuleDef ntorkernel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._ntor._ntorkernel",
    .m_doc = ntorkernel_doc,
    .m_size = sizeof(ModuleState),
    .m_methods = ntorkernel_methods,
    .m_slots = ntorkernel_slots,
    .m_traverse = ntorkernel_traverse,
    .m_clear = ntorkernel_clear,
    .m_free = ntorkernel_free,
};

PyMODINIT_FUNC
PyInit__ntorkernel(void)
{
    return PyModuleDef_Init(&ntorkernel_module);
}
