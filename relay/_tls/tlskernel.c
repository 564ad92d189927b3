/*
 * relay._tls._tlskernel: TLS sessions for Tor links on the system's libssl, whose record work
 * -- decrypting what a link reads, encrypting what it writes -- runs with the GIL released,
 * one session at a time or several links' jobs in one call.
 *
 * Why this exists
 * ---------------
 * Every cell a relay moves is TLS-decrypted on the way in and TLS-encrypted on the way out.
 * pyOpenSSL (cffi) drops and retakes the GIL around every OpenSSL call, and SSL_read hands out
 * one 16 KiB record per call, so record work through it pays a GIL hand-over per record and two
 * threads doing it ran no faster than one. This module drives libssl from C: one call decrypts
 * everything a read brought (all its records) or encrypts everything a write holds, with ONE
 * release of the GIL, and tls_group() does that for several links' jobs at once, so a worker
 * of the pool can own a link's record crypto the way it owns a circuit's relay crypto.
 * It links the system's libssl (OpenSSL 3, the library tor, Python's ssl and the C kernels
 * use); only standard TLS passes between it and other implementations
 * (tests/test_tls_kernel_interop.py).
 *
 * API
 * ---
 * TlsContext(server, cert_der, key_der, *, max_version=0): the settings every session of one
 *     side starts from (below), with the server's certificate and key (DER; the key PKCS#8 or
 *     traditional). Immutable after creation, so any number of threads may make sessions from
 *     it at once. Attributes: server, certificate_der.
 * TlsSession(ctx, server_hostname=None): one TLS connection over in-memory transport. The
 *     transport is a BIO of this module (a "pipe", below): bytes read from the socket go in,
 *     bytes to write come out; nothing here does I/O. The type may be subclassed (relay.tls's
 *     TlsClientSession / TlsServerSession are, with their own constructors).
 *     start() -> bytes                    the ClientHello (a server returns b"": the client
 *                                         speaks first)
 *     feed(data) -> (plaintext, to_write) handshake driving and reading in one: take bytes read
 *                                         from the socket; return the application data that
 *                                         became available and the TLS bytes to send back
 *     decrypt(data) -> plaintext          after the handshake: every byte of application data
 *                                         the input completes (close_notify sets peer_closed)
 *     encrypt(data) -> records            after the handshake: the records carrying data
 *     close() -> bytes                    close_notify to send (b"" if none); idempotent
 *     export_keying_material(label, length, context=None)   RFC 5705
 *     peer_certificate_der(), own_certificate_der(), version(), cipher(), server_name()
 *     properties handshake_done, peer_closed, closed, wants_write, in_use, server
 *     `data` is a bytes-like object or a list/tuple of them read as their concatenation.
 *     TLS bytes OpenSSL produces while reading (the alert refusing a TLS 1.2 renegotiation,
 *     say; OpenSSL itself holds a TLS 1.3 KeyUpdate answer until the next write) are kept and
 *     leave, in order, at the head of the next encrypt()/feed()/close() result; wants_write
 *     says some are waiting (encrypt(b"") hands them out).
 * tls_group(jobs) -> list: several sessions' (session, OP_DECRYPT | OP_ENCRYPT, data) jobs with
 *     ONE release of the GIL; one result per job, in order: what decrypt/encrypt returns, or the
 *     exception instance it raises (errors stay with their job; the other jobs run). Jobs run
 *     in list order on the calling thread, so one session may appear several times (both
 *     directions of a link, say) and sees its jobs in that order.
 * Errors: anything TLS refuses raises relay.tlscontext.TlsError with OpenSSL's reasons, e.g.
 * "TLS record error: bad record mac"; the session is then closed (later calls raise "TLS session
 * is closed"). A session in use by another thread raises RuntimeError.
 *
 * Settings (tor 0.4.9's, as relay/tlscontext.py explains): TLS 1.2 minimum, the library's
 * maximum (TLS 1.3) unless max_version lowers it; no certificate verification on either side and
 * no CertificateRequest from the server (tor authenticates in-protocol: CERTS, AUTHENTICATE);
 * no session tickets (the server sends none in TLS 1.2 or 1.3), no session cache, no
 * compression, no renegotiation in either direction; the server prefers its own order, forward-
 * secret ECDHE suites for TLS 1.2 and OpenSSL's TLS 1.3 suites; SSL_MODE_RELEASE_BUFFERS, as
 * tor sets it, so an idle session holds no 16 KiB record buffers.
 *
 * The pipe: a BIO without copies
 * ------------------------------
 * A memory BIO would copy every byte twice more than needed (into its buffer, then out of it).
 * The pipe BIO instead reads straight from the caller's pinned input and writes records straight
 * into the result bytes object. Input OpenSSL has not read when a call ends (none in practice:
 * a read runs until OpenSSL wants more) is kept in the session's carry buffer and read first
 * next time, so no byte can be lost; after close_notify or an error it is dropped, so a peer
 * cannot grow it. The result is allocated beforehand with a bound: for encrypt, the waiting
 * output plus the input plus the most a record can add (RECORD_OVERHEAD_MAX) per 16 KiB record;
 * for decrypt, the input plus one record's plaintext when OpenSSL holds part of a record from an
 * earlier call (SSL_has_pending). Output beyond the bound goes, in order, to a growable spill
 * buffer joined at the end (not needed with OpenSSL's overheads; the tests pass, under valgrind
 * too, in a build without the slack, where every result takes that path), and the result is
 * shrunk to its length. Output made while no result is being built (while decrypting) goes to
 * the session's pending buffer and leaves with the next result.
 *
 * Threads
 * -------
 * Any thread may call any method, but one session must be used by one thread at a time:
 * OpenSSL's SSL object is not thread-safe, not even one thread reading while another writes, so
 * decrypt and encrypt of one link must not run at once either (relay.tlslanes makes a link's
 * session one pool circuit, whose two lanes one worker at a time runs). A violation is made loud: every method claims the session with an
 * atomic flag and raises RuntimeError if it is already claimed; the lock-free properties
 * (handshake_done, peer_closed, closed, wants_write, in_use) and the values fixed by the
 * handshake (version, cipher, certificates, server name: cached as Python objects when it
 * completes; renegotiation is off, so they cannot change) may be read from any thread at any
 * time. A call prepares with the GIL (claim, pin the input with the buffer protocol, allocate
 * the result), runs without it (only the claimed session, the pinned input, the result's bytes
 * and C memory: OpenSSL's error queue is per thread and is emptied before and read after each
 * step), and settles with it. Record calls below GIL_RELEASE_MIN_BYTES keep the GIL: releasing
 * it for a microsecond of work costs more than it gives and invites the convoy effect
 * (docs/tuning.md). Handshake steps (start, feed before the handshake is done) always release
 * it: a server's step signs with the link key (~1 ms of RSA). Contexts are read-only after
 * creation (OpenSSL shares an SSL_CTX between threads that do not change it), and the module
 * has no mutable global state: the pipe's BIO_METHOD and the TlsError type live in the module
 * state, read-only after import.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

/* Plaintext per record: OpenSSL's default max_send_fragment (and TLS's limit). */
#define RECORD_PLAIN_MAX 16384
/* The most one record adds to its plaintext: the 5-byte header and OpenSSL's bound on what
 * encryption adds (explicit IV, MAC, padding; an AEAD adds far less). */
#define RECORD_OVERHEAD_MAX (SSL3_RT_HEADER_LENGTH + SSL3_RT_MAX_ENCRYPTED_OVERHEAD)
/* Record calls of fewer input bytes keep the GIL (four cells' worth). */
#define GIL_RELEASE_MIN_BYTES 2048
#define REASON_LEN 320
#define MAX_EXPORT_LEN (1 << 16)

static const char SERVER_TLS12_CIPHERS[] = "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL";

/* ------------------------------------------------------------------ module state */

typedef struct {
    PyTypeObject *context_type;
    PyTypeObject *session_type;
    PyObject *tls_error;      /* relay.tlscontext.TlsError */
    BIO_METHOD *pipe_method;  /* read-only after import */
} ModuleState;

static struct PyModuleDef tls_module;

/* The module state for an instance of one of this module's types or of a subclass. */
static ModuleState *
state_of_type(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &tls_module);
    return module != NULL ? (ModuleState *)PyModule_GetState(module) : NULL;
}

/* ------------------------------------------------------------------ growable buffers */

/* C memory that grows without the GIL (PyMem_Raw*). */
typedef struct {
    unsigned char *data;
    size_t len;
    size_t cap;
} Buf;

/* Make room for `extra` more bytes. 0, or -1 when out of memory (nothing changed). */
static int
buf_reserve(Buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    if (extra > (size_t)PY_SSIZE_T_MAX - b->len)
        return -1;
    size_t need = b->len + extra;
    size_t cap = b->cap > 0 ? b->cap : 1024;
    while (cap < need)
        cap = cap > (size_t)PY_SSIZE_T_MAX / 2 ? need : cap * 2;
    unsigned char *grown = PyMem_RawRealloc(b->data, cap);
    if (grown == NULL)
        return -1;
    b->data = grown;
    b->cap = cap;
    return 0;
}

static int
buf_append(Buf *b, const void *data, size_t len)
{
    if (len == 0)
        return 0;
    if (buf_reserve(b, len) < 0)
        return -1;
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static void
buf_free(Buf *b)
{
    PyMem_RawFree(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Exchange two buffers' memory (moving pending output into a job without a copy). */
static void
buf_swap(Buf *a, Buf *b)
{
    Buf t = *a;
    *a = *b;
    *b = t;
}

/* ------------------------------------------------------------------ pinned input */

/* One bytes-like object, or a list/tuple of them read as their concatenation, pinned with the
 * buffer protocol (no copy; a bytearray cannot be resized while pinned) until input_release.
 * The struct points into itself: it is never copied once pinned. */
typedef struct {
    Py_buffer one;
    Py_buffer *pieces; /* &one, or a PyMem array of `count` views */
    Py_ssize_t count;
    size_t len;        /* total bytes */
} Input;

static void
input_release(Input *in)
{
    for (Py_ssize_t i = 0; i < in->count; i++)
        PyBuffer_Release(&in->pieces[i]);
    if (in->pieces != &in->one)
        PyMem_Free(in->pieces);
    in->pieces = &in->one;
    in->count = 0;
    in->len = 0;
}

/* Pin `obj` (NULL: no input). 0, or -1 with an exception and nothing pinned. */
static int
input_pin(PyObject *obj, Input *in)
{
    in->pieces = &in->one;
    in->count = 0;
    in->len = 0;
    if (obj == NULL)
        return 0;
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
            in->len += (size_t)in->pieces[i].len;
        }
        Py_DECREF(items);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &in->one, PyBUF_SIMPLE) < 0)
        return -1;
    in->count = 1;
    in->len = (size_t)in->one.len;
    return 0;
}

/* ------------------------------------------------------------------ the pipe BIO */

/* A session's transport. Between calls only `carry` and `pending` hold bytes; during a call the
 * running job points `in` at its input and `dst`/`spill` at its output. Touched only by the
 * thread that holds the session's claim. */
typedef struct {
    Buf carry;            /* received bytes OpenSSL has not read yet, from carry_off */
    size_t carry_off;
    const Input *in;      /* the running call's input, read from (piece, piece_off) */
    Py_ssize_t piece;
    size_t piece_off;
    unsigned char *dst;   /* the running call's result memory, if any */
    size_t dst_cap;
    size_t dst_len;
    Buf *spill;           /* where output goes once dst is full (or absent): never NULL */
    Buf pending;          /* output made while no result was being built */
    int nomem;            /* an allocation failed inside the BIO during this call */
} Pipe;

static size_t
pipe_input_left(const Pipe *p)
{
    size_t left = p->carry.len - p->carry_off;
    if (p->in != NULL) {
        for (Py_ssize_t i = p->piece; i < p->in->count; i++)
            left += (size_t)p->in->pieces[i].len - (i == p->piece ? p->piece_off : 0);
    }
    return left;
}

static int
pipe_read(BIO *bio, char *out, size_t len, size_t *readbytes)
{
    Pipe *p = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    size_t got = 0;
    if (p->carry_off < p->carry.len && len > 0) {
        size_t n = p->carry.len - p->carry_off;
        n = n < len ? n : len;
        memcpy(out, p->carry.data + p->carry_off, n);
        p->carry_off += n;
        got += n;
    }
    while (got < len && p->in != NULL && p->piece < p->in->count) {
        const Py_buffer *view = &p->in->pieces[p->piece];
        size_t avail = (size_t)view->len - p->piece_off;
        size_t n = avail < len - got ? avail : len - got;
        if (n > 0)
            memcpy(out + got, (const unsigned char *)view->buf + p->piece_off, n);
        got += n;
        p->piece_off += n;
        if (p->piece_off == (size_t)view->len) {
            p->piece++;
            p->piece_off = 0;
        }
    }
    *readbytes = got;
    if (got == 0) {
        BIO_set_retry_read(bio); /* nothing yet: OpenSSL reports SSL_ERROR_WANT_READ */
        return 0;
    }
    return 1;
}

static int
pipe_write(BIO *bio, const char *data, size_t len, size_t *written)
{
    Pipe *p = BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    size_t done = 0;
    /* dst first, but only while nothing was spilled: spilled bytes come after dst's. */
    if (p->dst != NULL && p->spill->len == 0 && p->dst_len < p->dst_cap) {
        size_t n = p->dst_cap - p->dst_len;
        n = n < len ? n : len;
        memcpy(p->dst + p->dst_len, data, n);
        p->dst_len += n;
        done = n;
    }
    if (done < len && buf_append(p->spill, data + done, len - done) < 0) {
        p->nomem = 1;
        *written = 0;
        return 0; /* no retry flag: OpenSSL fails the call */
    }
    *written = len;
    return 1;
}

static long
pipe_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_PENDING:
        return (long)pipe_input_left(BIO_get_data(bio));
    case BIO_CTRL_WPENDING:
        return 0; /* every write is taken at once */
    default:
        return 0;
    }
}

static int
pipe_create(BIO *bio)
{
    BIO_set_init(bio, 1);
    return 1;
}

static int
pipe_destroy(BIO *bio)
{
    BIO_set_data(bio, NULL); /* the Pipe belongs to the session object */
    return 1;
}

static BIO_METHOD *
pipe_method_new(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "relaycrypt pipe");
    if (m == NULL)
        return NULL;
    if (!BIO_meth_set_read_ex(m, pipe_read) || !BIO_meth_set_write_ex(m, pipe_write) ||
        !BIO_meth_set_ctrl(m, pipe_ctrl) || !BIO_meth_set_create(m, pipe_create) ||
        !BIO_meth_set_destroy(m, pipe_destroy)) {
        BIO_meth_free(m);
        return NULL;
    }
    return m;
}

/* End of a call: keep what OpenSSL did not read (in order, after the carry's unread rest) and
 * detach the call's input and output. No GIL. */
static void
pipe_end(Pipe *p)
{
    if (p->carry_off == p->carry.len) {
        p->carry.len = p->carry_off = 0;
    }
    else if (p->carry_off > 0) {
        memmove(p->carry.data, p->carry.data + p->carry_off, p->carry.len - p->carry_off);
        p->carry.len -= p->carry_off;
        p->carry_off = 0;
    }
    if (p->in != NULL) {
        for (Py_ssize_t i = p->piece; i < p->in->count; i++) {
            const Py_buffer *view = &p->in->pieces[i];
            size_t skip = i == p->piece ? p->piece_off : 0;
            if (buf_append(&p->carry, (const unsigned char *)view->buf + skip,
                           (size_t)view->len - skip) < 0)
                p->nomem = 1;
        }
    }
    p->in = NULL;
    p->piece = 0;
    p->piece_off = 0;
    p->dst = NULL;
    p->dst_cap = p->dst_len = 0;
    p->spill = &p->pending;
}

/* ------------------------------------------------------------------ exclusive use */

static int
claim(atomic_int *flag)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(flag, &expected, 1)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "TlsSession is already in use by another call; a TLS session must be "
                        "used by one thread at a time (its reads and writes too)");
        return -1;
    }
    return 0;
}

static void
unclaim(atomic_int *flag)
{
    atomic_store(flag, 0);
}

/* ================================================================== TlsContext */

typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
    int server;
    PyObject *certificate_der; /* bytes (server) or None */
} ContextObject;

/* OpenSSL's reasons from this thread's error queue, "; "-joined into `out` (emptied). */
static void
collect_reasons(char *out, size_t size)
{
    size_t used = 0;
    out[0] = '\0';
    unsigned long e;
    while ((e = ERR_get_error()) != 0) {
        char one[256];
        const char *reason = ERR_reason_error_string(e);
        if (reason == NULL) {
            ERR_error_string_n(e, one, sizeof one);
            reason = one;
        }
        if (used > 0 && strstr(out, reason) != NULL)
            continue; /* OpenSSL often queues one reason several times */
        int n = PyOS_snprintf(out + used, size - used, "%s%s", used > 0 ? "; " : "", reason);
        if (n < 0 || (size_t)n >= size - used) {
            used = size - 1;
            break;
        }
        used += (size_t)n;
    }
    ERR_clear_error();
}

/* Raise TlsError("<what>: <OpenSSL's reasons>") and return NULL. */
static PyObject *
raise_openssl(ModuleState *st, const char *what)
{
    char reasons[REASON_LEN];
    collect_reasons(reasons, sizeof reasons);
    PyErr_Format(st->tls_error, "%s: %s", what, reasons[0] ? reasons : "unknown OpenSSL error");
    return NULL;
}

static int
pin_der(PyObject *obj, Py_buffer *view, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len <= 0 || view->len > INT_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "%s must be non-empty DER", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Load the server's certificate and key into `ctx`. 0, or -1 with an exception. */
static int
context_load_credentials(ModuleState *st, ContextObject *self, PyObject *cert_obj,
                         PyObject *key_obj)
{
    Py_buffer cert_view, key_view;
    X509 *cert = NULL;
    EVP_PKEY *key = NULL;
    int rc = -1;
    if (pin_der(cert_obj, &cert_view, "cert_der") < 0)
        return -1;
    if (pin_der(key_obj, &key_view, "key_der") < 0) {
        PyBuffer_Release(&cert_view);
        return -1;
    }
    const unsigned char *p = cert_view.buf;
    cert = d2i_X509(NULL, &p, (long)cert_view.len);
    if (cert == NULL || p != (const unsigned char *)cert_view.buf + cert_view.len) {
        raise_openssl(st, "cannot load the TLS certificate");
        goto done;
    }
    p = key_view.buf;
    key = d2i_AutoPrivateKey(NULL, &p, (long)key_view.len);
    if (key == NULL) {
        raise_openssl(st, "cannot load the TLS private key");
        goto done;
    }
    if (SSL_CTX_use_certificate(self->ctx, cert) != 1) {
        raise_openssl(st, "the TLS certificate is not usable");
        goto done;
    }
    if (SSL_CTX_use_PrivateKey(self->ctx, key) != 1 || SSL_CTX_check_private_key(self->ctx) != 1) {
        raise_openssl(st, "the TLS certificate and key are not usable together");
        goto done;
    }
    int der_len = i2d_X509(cert, NULL);
    if (der_len <= 0) {
        raise_openssl(st, "cannot encode the TLS certificate");
        goto done;
    }
    self->certificate_der = PyBytes_FromStringAndSize(NULL, der_len);
    if (self->certificate_der == NULL)
        goto done;
    unsigned char *q = (unsigned char *)PyBytes_AS_STRING(self->certificate_der);
    i2d_X509(cert, &q);
    rc = 0;
done:
    X509_free(cert);
    EVP_PKEY_free(key);
    PyBuffer_Release(&key_view);
    PyBuffer_Release(&cert_view);
    return rc;
}

static PyObject *
Context_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"server", "cert_der", "key_der", "max_version", NULL};
    int server;
    PyObject *cert_obj = Py_None, *key_obj = Py_None;
    int max_version = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "p|OO$i:TlsContext", kwlist, &server,
                                     &cert_obj, &key_obj, &max_version))
        return NULL;
    ModuleState *st = state_of_type(type);
    if (st == NULL)
        return NULL;
    if (server && (cert_obj == Py_None || key_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a server context needs cert_der and key_der");
        return NULL;
    }
    if (!server && (cert_obj != Py_None || key_obj != Py_None)) {
        PyErr_SetString(PyExc_ValueError,
                        "a client context takes no certificate (a Tor client presents none)");
        return NULL;
    }
    if (max_version != 0 && max_version != TLS1_2_VERSION && max_version != TLS1_3_VERSION) {
        PyErr_Format(PyExc_ValueError, "max_version must be 0, TLS1_2_VERSION or TLS1_3_VERSION, "
                     "not %d", max_version);
        return NULL;
    }
    ContextObject *self = (ContextObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->server = server;
    ERR_clear_error();
    self->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (self->ctx == NULL) {
        raise_openssl(st, "cannot create a TLS context");
        goto fail;
    }
    SSL_CTX *ctx = self->ctx;
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(ctx, max_version) != 1) {
        raise_openssl(st, "cannot set the TLS versions");
        goto fail;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL); /* authentication is in-protocol */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (server) {
        /* No tickets: NO_TICKET covers TLS 1.2, num_tickets 0 TLS 1.3 (where NO_TICKET alone
         * still sends stateful ones). A client offers tickets, as tor's does. */
        SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_TICKET);
        if (SSL_CTX_set_num_tickets(ctx, 0) != 1 ||
            SSL_CTX_set_cipher_list(ctx, SERVER_TLS12_CIPHERS) != 1) {
            raise_openssl(st, "cannot configure the TLS server context");
            goto fail;
        }
        if (context_load_credentials(st, self, cert_obj, key_obj) < 0)
            goto fail;
    }
    else {
        self->certificate_der = Py_NewRef(Py_None);
    }
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static void
Context_dealloc(ContextObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    SSL_CTX_free(self->ctx); /* NULL is fine; sessions hold their own reference */
    Py_XDECREF(self->certificate_der);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
Context_get_server(ContextObject *self, void *closure)
{
    return PyBool_FromLong(self->server);
}

static PyObject *
Context_get_certificate_der(ContextObject *self, void *closure)
{
    return Py_NewRef(self->certificate_der);
}

static PyGetSetDef Context_getset[] = {
    {"server", (getter)Context_get_server, NULL, "True for a server context.", NULL},
    {"certificate_der", (getter)Context_get_certificate_der, NULL,
     "The DER certificate a server presents (None for a client).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Context_doc,
"TlsContext(server, cert_der=None, key_der=None, *, max_version=0)\n\n"
"The TLS settings for one side of Tor links (see tlskernel.c): TLS 1.2 minimum, TLS 1.3\n"
"preferred (max_version=TLS1_2_VERSION stops at 1.2), no verification, no tickets, no\n"
"session cache, no compression, no renegotiation. A server context needs the DER\n"
"certificate and private key it presents; a client context takes none. Immutable: any\n"
"thread may create sessions from it, several at once.");

static PyType_Slot Context_slots[] = {
    {Py_tp_new, Context_new},
    {Py_tp_dealloc, Context_dealloc},
    {Py_tp_getset, Context_getset},
    {Py_tp_doc, (void *)Context_doc},
    {0, NULL},
};

static PyType_Spec Context_spec = {
    .name = "relay._tls._tlskernel.TlsContext",
    .basicsize = sizeof(ContextObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Context_slots,
};

/* ================================================================== TlsSession */

typedef struct {
    PyObject_HEAD
    ModuleState *st;     /* valid while the session lives: its type keeps the module */
    ContextObject *context;
    SSL *ssl;
    Pipe pipe;
    int server;
    atomic_int in_use;
    atomic_int handshake_done;
    atomic_int peer_closed;
    atomic_int closed;   /* close() was called, or a TLS error ended the session */
    atomic_int wants_write;
    /* Fixed by the handshake; set (GIL held) when it completes, read-only afterwards. */
    PyObject *version;
    PyObject *cipher;
    PyObject *peer_der;
    PyObject *own_der;
    PyObject *sni;
} SessionObject;

static PyObject *
Session_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"context", "server_hostname", NULL};
    PyObject *ctx_obj, *name_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|O:TlsSession", kwlist, &ctx_obj,
                                     &name_obj))
        return NULL;
    ModuleState *st = state_of_type(type);
    if (st == NULL)
        return NULL;
    if (!Py_IS_TYPE(ctx_obj, st->context_type)) {
        PyErr_Format(PyExc_TypeError, "context must be a TlsContext, not %.100s",
                     Py_TYPE(ctx_obj)->tp_name);
        return NULL;
    }
    ContextObject *context = (ContextObject *)ctx_obj;
    const char *hostname = NULL;
    if (name_obj != Py_None) {
        if (context->server) {
            PyErr_SetString(PyExc_ValueError, "server_hostname is for client sessions");
            return NULL;
        }
        if (!PyUnicode_Check(name_obj) ||
            (hostname = PyUnicode_AsUTF8(name_obj)) == NULL || !PyUnicode_IS_ASCII(name_obj)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "server_hostname must be an ASCII str");
            return NULL;
        }
    }
    SessionObject *self = (SessionObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    /* tp_alloc zeroed everything: buffers empty, flags 0, cached values NULL */
    self->st = st;
    self->context = (ContextObject *)Py_NewRef(ctx_obj);
    self->server = context->server;
    self->pipe.spill = &self->pipe.pending;
    atomic_init(&self->in_use, 0);
    atomic_init(&self->handshake_done, 0);
    atomic_init(&self->peer_closed, 0);
    atomic_init(&self->closed, 0);
    atomic_init(&self->wants_write, 0);
    ERR_clear_error();
    self->ssl = SSL_new(context->ctx);
    if (self->ssl == NULL) {
        raise_openssl(st, "cannot create a TLS session");
        goto fail;
    }
    BIO *bio = BIO_new(st->pipe_method);
    if (bio == NULL) {
        raise_openssl(st, "cannot create the TLS session's transport");
        goto fail;
    }
    BIO_set_data(bio, &self->pipe);
    SSL_set_bio(self->ssl, bio, bio); /* the SSL takes the one reference */
    if (self->server) {
        SSL_set_accept_state(self->ssl);
        self->own_der = Py_NewRef(context->certificate_der); /* what SSL_get_certificate has */
    }
    else {
        SSL_set_connect_state(self->ssl);
        self->own_der = Py_NewRef(Py_None);
        if (hostname != NULL && SSL_set_tlsext_host_name(self->ssl, hostname) != 1) {
            raise_openssl(st, "cannot set the TLS server name");
            goto fail;
        }
    }
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static void
Session_dealloc(SessionObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    SSL_free(self->ssl); /* frees the pipe BIO; NULL is fine */
    buf_free(&self->pipe.carry);
    buf_free(&self->pipe.pending);
    Py_XDECREF(self->context);
    Py_XDECREF(self->version);
    Py_XDECREF(self->cipher);
    Py_XDECREF(self->peer_der);
    Py_XDECREF(self->own_der);
    Py_XDECREF(self->sni);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* ================================================================== jobs
 *
 * Every TLS call on a session, a method or one entry of tls_group(), is a Job in three phases,
 * as in the tor1 kernel:
 *
 *   job_prepare   GIL held. Check the session's type, claim it, refuse a closed session or
 *                 record work before the handshake, pin the input, allocate the result with
 *                 its bound. On failure nothing is held and an exception is set.
 *   job_run       NO GIL. Touches only the claimed session (its SSL and pipe), the pinned
 *                 input, the result's bytes and C memory. A TLS failure is recorded in the job
 *                 (OpenSSL's reasons copied out of this thread's error queue) and closes the
 *                 session right there, so a later job of the same group on it does not run.
 *   job_settle    GIL held, session still claimed: unpin the input, move the pending output
 *                 into the job, note what the handshake fixed.
 *   job_result    GIL held, session let go: build the return value or raise; cache the
 *                 handshake's values in the session.
 */

enum { OP_DECRYPT = 0, OP_ENCRYPT = 1, N_GROUP_OPS = 2, OP_FEED = 2, OP_START = 3,
       OP_CLOSE = 4 };

typedef struct {
    SessionObject *session; /* borrowed: the caller keeps it alive for the whole call */
    int op;
    int owns_claim;         /* 0: an earlier job of the same group holds the claim */
    int skip;               /* prepared, but nothing to run (close of a session not open) */
    int release_gil;
    Input in;
    PyObject *out;          /* decrypt/feed: plaintext; encrypt: records; start/close: NULL */
    size_t out_cap;
    size_t out_len;
    Buf extra;              /* result bytes beyond out's bound, in order after them */
    Buf to_write;           /* feed/start/close: TLS bytes to send */
    int ran;                /* job_run was reached */
    int failed;             /* a TLS failure: `what` and `reason` say which */
    const char *what;
    char reason[REASON_LEN];
    int finished_handshake; /* this job completed the handshake */
    const char *version;    /* OpenSSL's static strings, read while claimed */
    const char *cipher;
    unsigned char *peer_der; /* PyMem_Raw, while claimed */
    size_t peer_der_len;
    char *sni;              /* PyMem_Raw copy */
} Job;

/* Record a TLS failure: OpenSSL's reasons for `ssl_error` (SSL_get_error), and close the
 * session. No GIL. */
static void
job_fail(Job *job, const char *what, int ssl_error)
{
    job->failed = 1;
    job->what = what;
    collect_reasons(job->reason, sizeof job->reason);
    if (job->session->pipe.nomem)
        PyOS_snprintf(job->reason, sizeof job->reason, "out of memory");
    else if (job->reason[0] == '\0' && ssl_error == SSL_ERROR_ZERO_RETURN)
        PyOS_snprintf(job->reason, sizeof job->reason,
                      "the peer closed the TLS session (close_notify)");
    else if (job->reason[0] == '\0')
        PyOS_snprintf(job->reason, sizeof job->reason, "OpenSSL error %d without a reason",
                      ssl_error);
    atomic_store(&job->session->closed, 1);
}

static int
job_prepare(Job *job, ModuleState *st, PyObject *obj, int op, PyObject *data, int share)
{
    memset(job, 0, sizeof(*job));
    job->in.pieces = &job->in.one;
    job->op = op;
    if (!PyObject_TypeCheck(obj, st->session_type)) {
        PyErr_Format(PyExc_TypeError, "a TLS job needs a TlsSession, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    SessionObject *s = (SessionObject *)obj;
    job->session = s;
    if (!share) {
        if (claim(&s->in_use) < 0)
            return -1;
        job->owns_claim = 1;
    }
    if (atomic_load(&s->closed)) {
        if (op == OP_CLOSE) {
            job->skip = 1;
            return 0;
        }
        PyErr_SetString(st->tls_error, "TLS session is closed");
        goto fail;
    }
    int done = atomic_load(&s->handshake_done);
    if (op == OP_DECRYPT && !done) {
        PyErr_SetString(st->tls_error,
                        "cannot decrypt application data before the TLS handshake completes");
        goto fail;
    }
    if (op == OP_ENCRYPT && !done) {
        PyErr_SetString(st->tls_error,
                        "cannot send application data before the TLS handshake completes");
        goto fail;
    }
    if (op == OP_CLOSE && !done) { /* nothing was agreed: nothing to close */
        atomic_store(&s->closed, 1);
        job->skip = 1;
        return 0;
    }
    if (op == OP_START && s->server) {
        job->skip = 1; /* the client speaks first */
        return 0;
    }
    if (input_pin(op == OP_DECRYPT || op == OP_ENCRYPT || op == OP_FEED ? data : NULL,
                  &job->in) < 0)
        goto fail;
    size_t bound = 0;
    if (op == OP_DECRYPT || op == OP_FEED) {
        /* Plaintext comes from the input, the carried bytes, and a record OpenSSL holds part
         * of (it kept its header and some body from an earlier call). */
        bound = job->in.len + (s->pipe.carry.len - s->pipe.carry_off) +
                (size_t)SSL_pending(s->ssl) + (SSL_has_pending(s->ssl) ? RECORD_PLAIN_MAX : 0);
    }
    else if (op == OP_ENCRYPT) {
        size_t records = (job->in.len + RECORD_PLAIN_MAX - 1) / RECORD_PLAIN_MAX;
        bound = s->pipe.pending.len + job->in.len + records * RECORD_OVERHEAD_MAX;
    }
    if (op == OP_DECRYPT || op == OP_FEED || op == OP_ENCRYPT) {
        if (bound > (size_t)PY_SSIZE_T_MAX) {
            PyErr_NoMemory();
            goto fail_input;
        }
        job->out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
        if (job->out == NULL)
            goto fail_input;
        job->out_cap = bound;
    }
    job->release_gil = op == OP_START || (op == OP_FEED && !done) ||
                       job->in.len >= GIL_RELEASE_MIN_BYTES;
    return 0;
fail_input:
    input_release(&job->in);
fail:
    if (job->owns_claim) {
        unclaim(&s->in_use);
        job->owns_claim = 0;
    }
    return -1;
}

/* One handshake step. No GIL. */
static void
run_handshake(Job *job)
{
    SessionObject *s = job->session;
    int rc = SSL_do_handshake(s->ssl);
    if (rc == 1) {
        atomic_store(&s->handshake_done, 1);
        job->finished_handshake = 1;
        return;
    }
    int err = SSL_get_error(s->ssl, rc);
    if (err != SSL_ERROR_WANT_READ)
        job_fail(job, "TLS handshake failed", err);
}

/* Read every byte of application data available: into out, then into extra. No GIL. */
static void
run_read(Job *job)
{
    SessionObject *s = job->session;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(job->out);
    for (;;) {
        unsigned char *dst;
        size_t room;
        if (job->out_len < job->out_cap) {
            dst = out + job->out_len;
            room = job->out_cap - job->out_len;
        }
        else {
            if (buf_reserve(&job->extra, RECORD_PLAIN_MAX) < 0) {
                s->pipe.nomem = 1;
                job_fail(job, "TLS record error", SSL_ERROR_NONE);
                return;
            }
            dst = job->extra.data + job->extra.len;
            room = job->extra.cap - job->extra.len;
        }
        size_t n = 0;
        int rc = SSL_read_ex(s->ssl, dst, room, &n);
        if (rc == 1) {
            if (job->out_len < job->out_cap)
                job->out_len += n;
            else
                job->extra.len += n;
            continue;
        }
        int err = SSL_get_error(s->ssl, rc);
        if (err == SSL_ERROR_WANT_READ)
            return;
        if (err == SSL_ERROR_ZERO_RETURN) {
            atomic_store(&s->peer_closed, 1);
            ERR_clear_error();
            return;
        }
        job_fail(job, "TLS record error", err);
        return;
    }
}

/* Encrypt the whole input: one SSL_write_ex for one piece; several pieces are gathered into
 * full records first, so they leave in as few records as one joined buffer would. No GIL. */
static void
run_write(Job *job)
{
    SessionObject *s = job->session;
    const Input *in = &job->in;
    size_t written;
    if (in->count == 1 && in->len > 0) {
        if (SSL_write_ex(s->ssl, in->pieces[0].buf, in->len, &written) != 1)
            job_fail(job, "TLS write failed", SSL_get_error(s->ssl, 0));
        return;
    }
    unsigned char chunk[RECORD_PLAIN_MAX];
    size_t used = 0;
    for (Py_ssize_t i = 0; i < in->count; i++) {
        const unsigned char *src = in->pieces[i].buf;
        size_t left = (size_t)in->pieces[i].len;
        while (left > 0) {
            if (used == 0 && left >= RECORD_PLAIN_MAX) {
                /* whole records straight from the piece */
                size_t whole = left - left % RECORD_PLAIN_MAX;
                if (SSL_write_ex(s->ssl, src, whole, &written) != 1) {
                    job_fail(job, "TLS write failed", SSL_get_error(s->ssl, 0));
                    return;
                }
                src += whole;
                left -= whole;
                continue;
            }
            size_t n = RECORD_PLAIN_MAX - used < left ? RECORD_PLAIN_MAX - used : left;
            memcpy(chunk + used, src, n);
            used += n;
            src += n;
            left -= n;
            if (used == RECORD_PLAIN_MAX) {
                if (SSL_write_ex(s->ssl, chunk, used, &written) != 1) {
                    job_fail(job, "TLS write failed", SSL_get_error(s->ssl, 0));
                    return;
                }
                used = 0;
            }
        }
    }
    if (used > 0 && SSL_write_ex(s->ssl, chunk, used, &written) != 1)
        job_fail(job, "TLS write failed", SSL_get_error(s->ssl, 0));
}

/* Note what the handshake fixed, while the session is claimed. No GIL. */
static void
run_note_handshake(Job *job)
{
    SSL *ssl = job->session->ssl;
    job->version = SSL_get_version(ssl);
    job->cipher = SSL_get_cipher_name(ssl);
    X509 *peer = SSL_get0_peer_certificate(ssl);
    if (peer != NULL) {
        int len = i2d_X509(peer, NULL);
        if (len > 0 && (job->peer_der = PyMem_RawMalloc((size_t)len)) != NULL) {
            unsigned char *q = job->peer_der;
            job->peer_der_len = (size_t)i2d_X509(peer, &q);
        }
    }
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name != NULL) {
        size_t len = strlen(name);
        if ((job->sni = PyMem_RawMalloc(len + 1)) != NULL)
            memcpy(job->sni, name, len + 1);
    }
}

/* Run a prepared job. NO GIL: only the claimed session, the pinned input, the result's bytes
 * and C memory. */
static void
job_run(Job *job)
{
    SessionObject *s = job->session;
    if (job->skip)
        return;
    job->ran = 1;
    if (atomic_load(&s->closed)) {
        /* An earlier job of this group failed on this session. */
        job->failed = 1;
        job->what = "TLS session is closed";
        return;
    }
    Pipe *p = &s->pipe;
    ERR_clear_error(); /* SSL_get_error needs this thread's queue empty before each call */
    p->nomem = 0;
    /* Only reads take input from the pipe: encrypt's input is plaintext for SSL_write. */
    p->in = (job->op == OP_DECRYPT || job->op == OP_FEED) && job->in.count > 0 ? &job->in : NULL;
    p->piece = 0;
    p->piece_off = 0;
    if (job->op == OP_ENCRYPT) {
        /* Output made earlier goes first: into the result when it fits, else everything
         * spills after it. */
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(job->out);
        if (p->pending.len <= job->out_cap) {
            memcpy(out, p->pending.data, p->pending.len);
            p->dst_len = p->pending.len;
            p->pending.len = 0;
        }
        else {
            buf_swap(&p->pending, &job->extra);
        }
        p->dst = out;
        p->dst_cap = job->out_cap;
        p->spill = &job->extra;
    }
    else if (job->op != OP_DECRYPT) {
        buf_swap(&p->pending, &job->to_write); /* to_write was empty */
        p->spill = &job->to_write;
    }
    switch (job->op) {
    case OP_START:
        run_handshake(job);
        break;
    case OP_FEED:
        if (!atomic_load(&s->handshake_done))
            run_handshake(job);
        if (!job->failed && atomic_load(&s->handshake_done))
            run_read(job);
        break;
    case OP_DECRYPT:
        run_read(job);
        break;
    case OP_ENCRYPT:
        run_write(job);
        break;
    case OP_CLOSE:
        if (SSL_shutdown(s->ssl) < 0) /* 0: sent, the peer's not seen: all we need */
            job->to_write.len = 0;    /* as pyOpenSSL's sessions did: nothing to send */
        ERR_clear_error();
        atomic_store(&s->closed, 1);
        break;
    }
    if (job->op == OP_ENCRYPT)
        job->out_len = p->dst_len;
    if (job->finished_handshake && !job->failed)
        run_note_handshake(job);
    int nomem = p->nomem;
    if (atomic_load(&s->peer_closed) || atomic_load(&s->closed)) {
        /* Nothing after close_notify (or a fatal error) will ever be read: drop it rather than
         * keep it, so a peer cannot grow the carry buffer by sending on. */
        p->in = NULL;
        p->carry.len = p->carry_off = 0;
    }
    pipe_end(p);
    if (p->nomem && !nomem && !job->failed) {
        /* keeping unread input failed: the byte stream has a hole */
        job_fail(job, "TLS record error", SSL_ERROR_NONE);
    }
    atomic_store(&s->wants_write, p->pending.len > 0);
}

/* Unpin the input. GIL held; the session stays claimed. */
static void
job_settle(Job *job)
{
    input_release(&job->in);
}

static void
job_unclaim(Job *job)
{
    if (job->owns_claim) {
        unclaim(&job->session->in_use);
        job->owns_claim = 0;
    }
}

/* out[:out_len] + extra as one bytes object (new reference; `out` is consumed). */
static PyObject *
finish_bytes(PyObject **out, size_t out_len, const Buf *extra)
{
    size_t total = out_len + extra->len;
    if ((size_t)PyBytes_GET_SIZE(*out) != total &&
        _PyBytes_Resize(out, (Py_ssize_t)total) < 0)
        return NULL; /* *out is NULL and an exception set */
    if (extra->len > 0)
        memcpy(PyBytes_AS_STRING(*out) + out_len, extra->data, extra->len);
    PyObject *result = *out;
    *out = NULL;
    return result;
}

/* Cache the handshake's values in the session (GIL held; the session may be let go: these
 * fields are only written here, once, and read under the GIL). */
static int
cache_handshake(Job *job)
{
    SessionObject *s = job->session;
    if (s->version != NULL)
        return 0;
    PyObject *version = PyUnicode_FromString(job->version ? job->version : "unknown");
    PyObject *cipher = PyUnicode_FromString(job->cipher ? job->cipher : "unknown");
    PyObject *peer = job->peer_der != NULL
                         ? PyBytes_FromStringAndSize((const char *)job->peer_der,
                                                     (Py_ssize_t)job->peer_der_len)
                         : Py_NewRef(Py_None);
    PyObject *sni = job->sni != NULL ? PyUnicode_DecodeASCII(job->sni, strlen(job->sni),
                                                             "replace")
                                     : Py_NewRef(Py_None);
    if (version == NULL || cipher == NULL || peer == NULL || sni == NULL) {
        Py_XDECREF(version);
        Py_XDECREF(cipher);
        Py_XDECREF(peer);
        Py_XDECREF(sni);
        return -1;
    }
    s->cipher = cipher;
    s->peer_der = peer;
    s->sni = sni;
    s->version = version; /* last: version != NULL means all are set */
    return 0;
}

/* The job's return value (new reference), or NULL with an exception. Frees what the job
 * holds. GIL held. */
static PyObject *
job_result(Job *job)
{
    ModuleState *st = job->session->st;
    PyObject *result = NULL;
    if (job->finished_handshake && !job->failed && cache_handshake(job) < 0)
        goto done;
    if (job->failed) {
        if (job->reason[0] != '\0')
            PyErr_Format(st->tls_error, "%s: %s", job->what, job->reason);
        else
            PyErr_SetString(st->tls_error, job->what);
        goto done;
    }
    switch (job->op) {
    case OP_DECRYPT:
    case OP_ENCRYPT:
        result = finish_bytes(&job->out, job->out_len, &job->extra);
        break;
    case OP_FEED: {
        PyObject *plain = finish_bytes(&job->out, job->out_len, &job->extra);
        if (plain == NULL)
            break;
        PyObject *to_write = PyBytes_FromStringAndSize((const char *)job->to_write.data,
                                                       (Py_ssize_t)job->to_write.len);
        if (to_write != NULL)
            result = PyTuple_Pack(2, plain, to_write);
        Py_DECREF(plain);
        Py_XDECREF(to_write);
        break;
    }
    case OP_START:
    case OP_CLOSE:
        result = PyBytes_FromStringAndSize((const char *)job->to_write.data,
                                           (Py_ssize_t)job->to_write.len);
        break;
    }
done:
    Py_CLEAR(job->out);
    buf_free(&job->extra);
    buf_free(&job->to_write);
    PyMem_RawFree(job->peer_der);
    job->peer_der = NULL;
    PyMem_RawFree(job->sni);
    job->sni = NULL;
    return result;
}

/* One method call: prepare, run (GIL released when worth it), settle, let go, result. */
static PyObject *
job_call(SessionObject *self, int op, PyObject *data)
{
    Job job;
    if (job_prepare(&job, self->st, (PyObject *)self, op, data, 0) < 0)
        return NULL;
    PyThreadState *ts = job.release_gil && !job.skip ? PyEval_SaveThread() : NULL;
    job_run(&job);
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    job_settle(&job);
    job_unclaim(&job);
    return job_result(&job);
}

PyDoc_STRVAR(Session_start_doc,
"start() -> bytes\n\n"
"Begin the handshake: a client returns its ClientHello, a server b\"\" (the client speaks\n"
"first). Releases the GIL. One thread at a time per session.");

static PyObject *
Session_start(SessionObject *self, PyObject *unused)
{
    return job_call(self, OP_START, NULL);
}

PyDoc_STRVAR(Session_feed_doc,
"feed(data) -> (plaintext: bytes, to_write: bytes)\n\n"
"Take bytes read from the transport: drive the handshake while it runs, then decrypt.\n"
"plaintext is the application data that became available (with the handshake's\n"
"completion too: a client may send data right after its Finished); to_write the TLS bytes\n"
"to send back (handshake messages, waiting output). Raises TlsError when the peer's bytes\n"
"are not acceptable TLS. Releases the GIL for handshake steps and large inputs.\n"
"One thread at a time per session.");

static PyObject *
Session_feed(SessionObject *self, PyObject *data)
{
    return job_call(self, OP_FEED, data);
}

PyDoc_STRVAR(Session_decrypt_doc,
"decrypt(data) -> bytes\n\n"
"After the handshake: take TLS bytes read from the transport (any split: a record cut\n"
"short waits for the rest) and return all the application data they complete. A\n"
"close_notify sets peer_closed and ends the data; TLS bytes OpenSSL produces while reading\n"
"wait for the next encrypt (wants_write). Raises TlsError on a corrupt record.\n"
"Releases the GIL for GIL_RELEASE_MIN_BYTES or more. One thread at a time per session.");

static PyObject *
Session_decrypt(SessionObject *self, PyObject *data)
{
    return job_call(self, OP_DECRYPT, data);
}

PyDoc_STRVAR(Session_encrypt_doc,
"encrypt(data) -> bytes\n\n"
"After the handshake: the TLS records carrying data (bytes-like, or a list/tuple of\n"
"pieces sent as their concatenation, in full 16 KiB records), preceded by any TLS bytes\n"
"waiting to be sent. encrypt(b\"\") returns only those. Releases the GIL for\n"
"GIL_RELEASE_MIN_BYTES or more. One thread at a time per session.");

static PyObject *
Session_encrypt(SessionObject *self, PyObject *data)
{
    return job_call(self, OP_ENCRYPT, data);
}

PyDoc_STRVAR(Session_close_doc,
"close() -> bytes\n\n"
"End the session: the close_notify alert to send (with any waiting output), or b\"\" when\n"
"the handshake never completed or the session was already closed. Idempotent.\n"
"One thread at a time per session.");

static PyObject *
Session_close(SessionObject *self, PyObject *unused)
{
    return job_call(self, OP_CLOSE, NULL);
}

PyDoc_STRVAR(Session_export_doc,
"export_keying_material(label, length, context=None) -> bytes\n\n"
"RFC 5705 keying material: length bytes only the two ends of this session can compute,\n"
"equal on both for the same label and context (None is \"no context\", which TLS 1.2\n"
"tells from an empty one; TLS 1.3 does not). Raises TlsError before the handshake.\n"
"One thread at a time per session.");

static PyObject *
Session_export_keying_material(SessionObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"label", "length", "context", NULL};
    Py_buffer label, context = {0};
    Py_ssize_t length;
    PyObject *context_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*n|O:export_keying_material", kwlist,
                                     &label, &length, &context_obj))
        return NULL;
    PyObject *result = NULL;
    int have_context = context_obj != Py_None;
    if (have_context && PyObject_GetBuffer(context_obj, &context, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&label);
        return NULL;
    }
    if (length <= 0 || length > MAX_EXPORT_LEN) {
        PyErr_Format(PyExc_ValueError, "keying material length must be 1..%d, not %zd",
                     MAX_EXPORT_LEN, length);
        goto done;
    }
    if (!atomic_load(&self->handshake_done)) {
        PyErr_SetString(self->st->tls_error,
                        "cannot export keying material before the TLS handshake completes");
        goto done;
    }
    if (claim(&self->in_use) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(NULL, length);
    if (result != NULL) {
        ERR_clear_error();
        int ok = SSL_export_keying_material(
            self->ssl, (unsigned char *)PyBytes_AS_STRING(result), (size_t)length, label.buf,
            (size_t)label.len, have_context ? context.buf : NULL,
            have_context ? (size_t)context.len : 0, have_context);
        if (ok != 1) {
            Py_CLEAR(result);
            raise_openssl(self->st, "TLS keying-material export failed");
        }
    }
    unclaim(&self->in_use);
done:
    if (have_context)
        PyBuffer_Release(&context);
    PyBuffer_Release(&label);
    return result;
}

/* The cached handshake value `field`, or None before the handshake. */
static PyObject *
cached(SessionObject *self, PyObject *field)
{
    return Py_NewRef(self->version != NULL && field != NULL ? field : Py_None);
}

static PyObject *
Session_version(SessionObject *self, PyObject *unused)
{
    return cached(self, self->version);
}

static PyObject *
Session_cipher(SessionObject *self, PyObject *unused)
{
    return cached(self, self->cipher);
}

static PyObject *
Session_peer_certificate_der(SessionObject *self, PyObject *unused)
{
    return cached(self, self->peer_der);
}

static PyObject *
Session_own_certificate_der(SessionObject *self, PyObject *unused)
{
    return Py_NewRef(self->own_der);
}

static PyObject *
Session_server_name(SessionObject *self, PyObject *unused)
{
    return cached(self, self->sni);
}

static PyObject *
Session_get_flag(SessionObject *self, void *closure)
{
    return PyBool_FromLong(atomic_load((atomic_int *)((char *)self + (size_t)closure)));
}

static PyObject *
Session_get_server(SessionObject *self, void *closure)
{
    return PyBool_FromLong(self->server);
}

static PyMethodDef Session_methods[] = {
    {"start", (PyCFunction)Session_start, METH_NOARGS, Session_start_doc},
    {"feed", (PyCFunction)Session_feed, METH_O, Session_feed_doc},
    {"decrypt", (PyCFunction)Session_decrypt, METH_O, Session_decrypt_doc},
    {"encrypt", (PyCFunction)Session_encrypt, METH_O, Session_encrypt_doc},
    {"close", (PyCFunction)Session_close, METH_NOARGS, Session_close_doc},
    {"export_keying_material", (PyCFunction)(void (*)(void))Session_export_keying_material,
     METH_VARARGS | METH_KEYWORDS, Session_export_doc},
    {"version", (PyCFunction)Session_version, METH_NOARGS,
     "The negotiated protocol (\"TLSv1.3\" or \"TLSv1.2\"), None before the handshake. "
     "Any thread."},
    {"cipher", (PyCFunction)Session_cipher, METH_NOARGS,
     "The negotiated cipher suite's OpenSSL name, None before the handshake. Any thread."},
    {"peer_certificate_der", (PyCFunction)Session_peer_certificate_der, METH_NOARGS,
     "The DER certificate the peer presented (unverified); None before the handshake or when "
     "it sent none (a Tor client never does). Any thread."},
    {"own_certificate_der", (PyCFunction)Session_own_certificate_der, METH_NOARGS,
     "The DER certificate this end presents: the server's; None on a client. Any thread."},
    {"server_name", (PyCFunction)Session_server_name, METH_NOARGS,
     "The SNI host name the client sent (a server's view; a client's own if it set one), "
     "None before the handshake or without one. Any thread."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Session_getset[] = {
    {"handshake_done", (getter)Session_get_flag, NULL,
     "True once the handshake completed. Any thread.",
     (void *)offsetof(SessionObject, handshake_done)},
    {"peer_closed", (getter)Session_get_flag, NULL,
     "True once the peer's close_notify was read. Any thread.",
     (void *)offsetof(SessionObject, peer_closed)},
    {"closed", (getter)Session_get_flag, NULL,
     "True once close() ran or a TLS error ended the session. Any thread.",
     (void *)offsetof(SessionObject, closed)},
    {"wants_write", (getter)Session_get_flag, NULL,
     "True when TLS bytes made while reading wait for the next encrypt. Any thread.",
     (void *)offsetof(SessionObject, wants_write)},
    {"in_use", (getter)Session_get_flag, NULL,
     "True while a call on this session runs. Any thread.",
     (void *)offsetof(SessionObject, in_use)},
    {"server", (getter)Session_get_server, NULL, "True for a server session.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Session_doc,
"TlsSession(context, server_hostname=None)\n\n"
"One TLS connection over in-memory transport, client or server as its TlsContext is;\n"
"server_hostname (clients only) sets SNI. Any thread may create it; one thread at a time\n"
"may call its methods (RuntimeError otherwise), decrypt and encrypt included.");

static PyType_Slot Session_slots[] = {
    {Py_tp_new, Session_new},
    {Py_tp_dealloc, Session_dealloc},
    {Py_tp_methods, Session_methods},
    {Py_tp_getset, Session_getset},
    {Py_tp_doc, (void *)Session_doc},
    {0, NULL},
};

static PyType_Spec Session_spec = {
    .name = "relay._tls._tlskernel.TlsSession",
    .basicsize = sizeof(SessionObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Session_slots,
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
    return value;
}

/* Read one job tuple (session, op, data). 0, or -1 with an exception. */
static int
parse_job(PyObject *item, PyObject **session, int *op, PyObject **data)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
        PyErr_SetString(PyExc_TypeError, "a TLS job is a tuple (session, op, data)");
        return -1;
    }
    long value = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < 0 || value >= N_GROUP_OPS) {
        PyErr_Format(PyExc_ValueError, "unknown TLS op %ld (OP_DECRYPT or OP_ENCRYPT)", value);
        return -1;
    }
    *session = PyTuple_GET_ITEM(item, 0);
    *op = (int)value;
    *data = PyTuple_GET_ITEM(item, 2);
    return 0;
}

PyDoc_STRVAR(tls_group_doc,
"tls_group(jobs) -> list\n\n"
"Run several sessions' record jobs with ONE release of the GIL. jobs is a list (or tuple)\n"
"of tuples (session, OP_DECRYPT, data) or (session, OP_ENCRYPT, data), data as decrypt /\n"
"encrypt take it. The result has one entry per job, in order: what that method would have\n"
"returned, or the exception instance it would have raised (errors stay with their job; the\n"
"other jobs run). Jobs run one after another in list order on the calling thread, so a\n"
"session may appear in several jobs and sees them in that order. A session in use by\n"
"another thread fails its jobs with RuntimeError. The GIL is released when the jobs hold\n"
"GIL_RELEASE_MIN_BYTES or more in total.");

static PyObject *
tls_group(PyObject *module, PyObject *jobs_obj)
{
    ModuleState *st = PyModule_GetState(module);
    if (!PyList_Check(jobs_obj) && !PyTuple_Check(jobs_obj)) {
        PyErr_SetString(PyExc_TypeError, "tls_group() takes a list or tuple of jobs");
        return NULL;
    }
    /* A snapshot: the items (every session and input) stay alive for the whole call. */
    PyObject *seq = PySequence_Tuple(jobs_obj);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject *results = PyList_New(n);
    Job *jobs = PyMem_Calloc(n > 0 ? (size_t)n : 1, sizeof(Job));
    if (results == NULL || jobs == NULL) {
        Py_XDECREF(results);
        PyMem_Free(jobs);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    char *prepared = PyMem_Calloc(n > 0 ? (size_t)n : 1, 1);
    if (prepared == NULL) {
        Py_DECREF(results);
        PyMem_Free(jobs);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    /* Phase 1, GIL held: prepare every job; one that cannot start gets its exception. A
     * session met again shares the claim of its first prepared job (backward scan: groups
     * are small). */
    size_t total = 0;
    int lost = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *session, *data;
        int op;
        if (parse_job(PyTuple_GET_ITEM(seq, i), &session, &op, &data) == 0) {
            int share = 0;
            for (Py_ssize_t j = i - 1; j >= 0 && !share; j--)
                share = prepared[j] && (PyObject *)jobs[j].session == session;
            if (job_prepare(&jobs[i], st, session, op, data, share) == 0) {
                prepared[i] = 1;
                total += jobs[i].in.len;
                continue;
            }
        }
        PyObject *error = take_exception();
        lost |= error == NULL;
        PyList_SET_ITEM(results, i, error != NULL ? error : Py_NewRef(Py_None));
    }
    /* Phase 2, no GIL: run the prepared jobs in order. */
    PyThreadState *ts = total >= GIL_RELEASE_MIN_BYTES ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (prepared[i])
            job_run(&jobs[i]);
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
    /* Phase 3, GIL held: settle every job and let go of every session, then build the
     * results (which may allocate and run other code: no session is held any more). */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (prepared[i])
            job_settle(&jobs[i]);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (prepared[i])
            job_unclaim(&jobs[i]);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!prepared[i])
            continue;
        PyObject *result = job_result(&jobs[i]);
        if (result == NULL) {
            result = take_exception();
            lost |= result == NULL;
        }
        PyList_SET_ITEM(results, i, result != NULL ? result : Py_NewRef(Py_None));
    }
    PyMem_Free(prepared);
    PyMem_Free(jobs);
    Py_DECREF(seq);
    if (lost) {
        Py_DECREF(results);
        PyErr_SetString(PyExc_SystemError, "tls_group: a job failed without an exception");
        return NULL;
    }
    return results;
}

static PyMethodDef tls_methods[] = {
    {"tls_group", (PyCFunction)tls_group, METH_O, tls_group_doc},
    {NULL, NULL, 0, NULL},
};

/* ================================================================== module */

static int
tls_exec(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    PyObject *tlscontext = PyImport_ImportModule("relay.tlscontext");
    if (tlscontext == NULL)
        return -1;
    st->tls_error = PyObject_GetAttrString(tlscontext, "TlsError");
    Py_DECREF(tlscontext);
    if (st->tls_error == NULL)
        return -1;
    st->pipe_method = pipe_method_new();
    if (st->pipe_method == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL refused the pipe BIO method");
        return -1;
    }
    st->context_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Context_spec, NULL);
    if (st->context_type == NULL || PyModule_AddType(module, st->context_type) < 0)
        return -1;
    st->session_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Session_spec, NULL);
    if (st->session_type == NULL || PyModule_AddType(module, st->session_type) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "OP_DECRYPT", OP_DECRYPT) < 0 ||
        PyModule_AddIntConstant(module, "OP_ENCRYPT", OP_ENCRYPT) < 0 ||
        PyModule_AddIntConstant(module, "GIL_RELEASE_MIN_BYTES", GIL_RELEASE_MIN_BYTES) < 0 ||
        PyModule_AddIntConstant(module, "RECORD_PLAIN_MAX", RECORD_PLAIN_MAX) < 0 ||
        PyModule_AddIntConstant(module, "TLS1_2_VERSION", TLS1_2_VERSION) < 0 ||
        PyModule_AddIntConstant(module, "TLS1_3_VERSION", TLS1_3_VERSION) < 0 ||
        PyModule_AddStringConstant(module, "SERVER_TLS12_CIPHERS", SERVER_TLS12_CIPHERS) < 0 ||
        PyModule_AddStringConstant(module, "OPENSSL_VERSION",
                                   OpenSSL_version(OPENSSL_VERSION)) < 0)
        return -1;
    return 0;
}

static int
tls_traverse(PyObject *module, visitproc visit, void *arg)
{
    ModuleState *st = PyModule_GetState(module);
    Py_VISIT(st->context_type);
    Py_VISIT(st->session_type);
    Py_VISIT(st->tls_error);
    return 0;
}

static int
tls_clear(PyObject *module)
{
    ModuleState *st = PyModule_GetState(module);
    Py_CLEAR(st->context_type);
    Py_CLEAR(st->session_type);
    Py_CLEAR(st->tls_error);
    return 0;
}

static void
tls_free(void *module)
{
    ModuleState *st = PyModule_GetState((PyObject *)module);
    tls_clear((PyObject *)module);
    BIO_meth_free(st->pipe_method); /* NULL is fine */
    st->pipe_method = NULL;
}

static PyModuleDef_Slot tls_slots[] = {
    {Py_mod_exec, tls_exec},
    {0, NULL},
};

PyDoc_STRVAR(tls_doc,
"TLS sessions for Tor links on the system's libssl, record work with the GIL released\n"
"(TlsContext, TlsSession, tls_group); see tlskernel.c for the design.");

static struct PyModuleDef tls_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._tls._tlskernel",
    .m_doc = tls_doc,
    .m_size = sizeof(ModuleState),
    .m_methods = tls_methods,
    .m_slots = tls_slots,
    .m_traverse = tls_traverse,
    .m_clear = tls_clear,
    .m_free = tls_free,
};

PyMODINIT_FUNC
PyInit__tlskernel(void)
{
    return PyModuleDef_Init(&tls_module);
}
