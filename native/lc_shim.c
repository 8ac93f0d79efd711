/* lightclient native shim: put a hardware-backed private key into Python's ssl.SSLContext.
 *
 * Kept tiny and boring on purpose: every OpenSSL return value is checked, the error queue is
 * cleared before each operation and left filled on failure for lc_err_next(), and nothing here
 * prints, prompts or aborts. The ENGINE API is deprecated in OpenSSL 3 and gone in OpenSSL 4;
 * its deprecation warnings are silenced in this one file, and all ENGINE code is compiled out
 * when OPENSSL_NO_ENGINE is defined.
 */
#define OPENSSL_SUPPRESS_DEPRECATED 1
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* dladdr, RTLD_NOLOAD */
#endif

#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/opensslv.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/ui.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/store.h>
#ifndef OPENSSL_NO_ENGINE
#include <openssl/engine.h>
#endif
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
#include <openssl/provider.h>
#define LC_HAVE_PROVIDERS 1
#endif

#include "lc_shim.h"

struct lc_key {
    EVP_PKEY *pkey;
};

/* One lock for the process-wide caches (engines, providers, UI method) and for the
 * set-PIN-then-load sequence on a shared engine. */
static pthread_mutex_t lc_lock = PTHREAD_MUTEX_INITIALIZER;

/* ------------------------------------------------------------------ versions and linkage */

unsigned long lc_openssl_version_num(void) { return OpenSSL_version_num(); }

const char *lc_openssl_version_text(void) { return OpenSSL_version(OPENSSL_VERSION); }

int lc_engine_support(void)
{
#ifndef OPENSSL_NO_ENGINE
    return 1;
#else
    return 0;
#endif
}

int lc_provider_support(void)
{
#ifdef LC_HAVE_PROVIDERS
    return 1;
#else
    return 0;
#endif
}

static void lc_copy(char *out, size_t out_len, const char *src)
{
    if (out == NULL || out_len == 0)
        return;
    if (src == NULL)
        src = "";
    strncpy(out, src, out_len - 1);
    out[out_len - 1] = '\0';
}

int lc_symbol_origin(const char *object_path, const char *symbol, char *out, size_t out_len)
{
    void *handle, *sym;
    Dl_info info;
    int rc = 0;

    lc_copy(out, out_len, "");
    if (symbol == NULL)
        return 0;
    /* RTLD_NOLOAD: only look at what this process already has; never load a second copy. */
    handle = object_path ? dlopen(object_path, RTLD_LAZY | RTLD_NOLOAD) : dlopen(NULL, RTLD_LAZY);
    if (handle == NULL)
        return -1;
    /* dlsym on a handle searches that object and its own dependencies, i.e. exactly the
     * definition that object's calls bind to. */
    sym = dlsym(handle, symbol);
    if (sym != NULL && dladdr(sym, &info) != 0 && info.dli_fname != NULL) {
        lc_copy(out, out_len, info.dli_fname);
        rc = 1;
    }
    dlclose(handle);
    return rc;
}

/* ------------------------------------------------------------------ errors */

unsigned long lc_err_next(char *out, size_t out_len)
{
    const char *data = NULL;
    int flags = 0;
    unsigned long e;
    size_t used;

#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);
#else
    e = ERR_get_error_line_data(NULL, NULL, &data, &flags);
#endif
    if (e == 0) {
        lc_copy(out, out_len, "");
        return 0;
    }
    ERR_error_string_n(e, out, out_len);
    used = strlen(out);
    if ((flags & ERR_TXT_STRING) && data != NULL && *data != '\0' && used + 3 < out_len) {
        strncat(out, " (", out_len - used - 1);
        strncat(out, data, out_len - strlen(out) - 1);
        if (strlen(out) + 1 < out_len)
            strcat(out, ")");
    }
    return e;
}

void lc_err_clear(void) { ERR_clear_error(); }

/* ------------------------------------------------------------------ PIN supply */

/* Whoever asks for a PIN (libp11 through its UI, a store loader, a PEM reader) gets it from
 * here, at most once per load: giving a wrong PIN again and again would lock real tokens.
 * Without a PIN we fail instead of prompting: a device client must never block on a tty. */
struct lc_pin_req {
    const char *pin;
    int asked;
};

static int lc_pin_status(const struct lc_pin_req *req)
{
    if (req->asked == 0)
        return LC_PIN_NOT_ASKED;
    return req->pin != NULL ? LC_PIN_SUPPLIED : LC_PIN_MISSING;
}

static int lc_ui_read(UI *ui, UI_STRING *uis)
{
    struct lc_pin_req *req = (struct lc_pin_req *)UI_get0_user_data(ui);

    switch (UI_get_string_type(uis)) {
    case UIT_PROMPT:
    case UIT_VERIFY:
        if (req == NULL)
            return 0;
        req->asked++;
        if (req->pin == NULL || req->asked > 1)
            return 0;
        return UI_set_result(ui, uis, req->pin) == 0 ? 1 : 0;
    default:
        return 1; /* info and error strings: nothing to show, nothing to read */
    }
}

static int lc_ui_write(UI *ui, UI_STRING *uis)
{
    (void)ui;
    (void)uis;
    return 1; /* never print prompts or messages */
}

static UI_METHOD *lc_ui_method(void)
{
    static UI_METHOD *method = NULL; /* created once under lc_lock, never freed */

    if (method == NULL) {
        UI_METHOD *m = UI_create_method("lightclient");
        if (m == NULL)
            return NULL;
        if (UI_method_set_reader(m, lc_ui_read) != 0 || UI_method_set_writer(m, lc_ui_write) != 0) {
            UI_destroy_method(m);
            return NULL;
        }
        method = m;
    }
    return method;
}

static int lc_pem_pin_cb(char *buf, int size, int rwflag, void *u)
{
    struct lc_pin_req *req = (struct lc_pin_req *)u;
    size_t len;

    (void)rwflag;
    req->asked++;
    if (req->pin == NULL || req->asked > 1)
        return -1;
    len = strlen(req->pin);
    if (len > (size_t)size)
        return -1;
    memcpy(buf, req->pin, len);
    return (int)len;
}

static int lc_wrap_key(EVP_PKEY *pkey, lc_key **out)
{
    lc_key *k = (lc_key *)calloc(1, sizeof(*k));

    if (k == NULL) {
        EVP_PKEY_free(pkey);
        return LC_E_NOMEM;
    }
    k->pkey = pkey;
    *out = k;
    return LC_OK;
}

/* ------------------------------------------------------------------ ENGINE backend */

#ifndef OPENSSL_NO_ENGINE
/* Initialised engines are cached per (id, SO_PATH) and never finished: keys loaded through an
 * engine keep using its PKCS#11 session for as long as any SSL_CTX holds them, and finishing the
 * engine would unload the module under their feet.
 *
 * OpenSSL 3 allows one live instance per engine shared object (engine_add_dynamic_id refuses a
 * second), and libp11 binds its instance to the first MODULE_PATH it is initialised with. So one
 * process can use one PKCS#11 module through the libp11 engine; asking for another one is an
 * error (LC_E_ENGINE_MODULE), never a silent fallback to the first module. */
struct lc_engine_slot {
    char *id, *so_path, *module_path;
    ENGINE *e;
    int proven; /* a key was loaded through it: from then on it stays bound to its module */
    struct lc_engine_slot *next;
};
static struct lc_engine_slot *lc_engines = NULL;

static int lc_streq(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return strcmp(a, b) == 0;
}

static char *lc_strdup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* Called with lc_lock held. */
static int lc_engine_get(const char *id, const char *so_path, const char *module_path,
                         struct lc_engine_slot **out, char *bound_module, size_t bound_len)
{
    struct lc_engine_slot *slot;
    ENGINE *e = NULL;

    for (slot = lc_engines; slot != NULL; slot = slot->next) {
        if (lc_streq(slot->id, id) && lc_streq(slot->so_path, so_path)) {
            if (module_path != NULL && !lc_streq(slot->module_path, module_path)) {
                lc_copy(bound_module, bound_len, slot->module_path ? slot->module_path : "(engine default)");
                return LC_E_ENGINE_MODULE;
            }
            *out = slot;
            return LC_OK;
        }
    }
    if (so_path != NULL) {
        e = ENGINE_by_id("dynamic");
        if (e == NULL)
            return LC_E_ENGINE_UNAVAILABLE;
        if (!ENGINE_ctrl_cmd_string(e, "SO_PATH", so_path, 0) ||
            !ENGINE_ctrl_cmd_string(e, "ID", id, 0) ||
            !ENGINE_ctrl_cmd_string(e, "LOAD", NULL, 0)) {
            ENGINE_free(e);
            return LC_E_ENGINE_UNAVAILABLE;
        }
    } else {
        e = ENGINE_by_id(id);
        if (e == NULL)
            return LC_E_ENGINE_UNAVAILABLE;
    }
    /* libp11 prints "object not found" style messages (with the URI, which may carry the PIN) to
     * stderr unless told to be quiet; the error queue tells us what we need. Optional command. */
    if (!ENGINE_ctrl_cmd(e, "QUIET", 0, NULL, NULL, 0))
        ERR_clear_error();
    /* MODULE_PATH must be set before ENGINE_init. Without it libp11 falls back to p11-kit-proxy
     * and every registered module, so callers are expected to pass it. */
    if (module_path != NULL && !ENGINE_ctrl_cmd_string(e, "MODULE_PATH", module_path, 0)) {
        ENGINE_free(e);
        return LC_E_ENGINE_CTRL;
    }
    if (!ENGINE_init(e)) {
        ENGINE_free(e);
        return LC_E_ENGINE_INIT;
    }
    /* No ENGINE_set_default(): it makes libp11 the default RSA/EC implementation for the whole
     * process, which breaks tpm2-pkcs11's own use of OpenSSL during C_Login. */
    slot = (struct lc_engine_slot *)calloc(1, sizeof(*slot));
    if (slot == NULL) {
        ENGINE_finish(e);
        ENGINE_free(e);
        return LC_E_NOMEM;
    }
    slot->id = lc_strdup_or_null(id);
    slot->so_path = lc_strdup_or_null(so_path);
    slot->module_path = lc_strdup_or_null(module_path);
    slot->e = e;
    slot->next = lc_engines;
    lc_engines = slot;
    *out = slot;
    return LC_OK;
}

/* Called with lc_lock held. An engine that never served a key is released after a failed load
 * (a mistyped module path must not pin the process to that module); it is re-initialised on the
 * next load. Nothing can reference it: no key came out of it. */
static void lc_engine_drop_unproven(struct lc_engine_slot *slot)
{
    struct lc_engine_slot **link;

    if (slot == NULL || slot->proven)
        return;
    for (link = &lc_engines; *link != NULL; link = &(*link)->next) {
        if (*link == slot) {
            *link = slot->next;
            break;
        }
    }
    ENGINE_finish(slot->e);
    ENGINE_free(slot->e);
    free(slot->id);
    free(slot->so_path);
    free(slot->module_path);
    free(slot);
}
#endif

int lc_key_from_engine(const char *engine_id, const char *so_path, const char *module_path,
                       const char *pin, const char *key_id, lc_key **out, int *pin_status,
                       char *bound_module, size_t bound_len)
{
#ifdef OPENSSL_NO_ENGINE
    (void)engine_id; (void)so_path; (void)module_path; (void)pin; (void)key_id;
    (void)bound_module; (void)bound_len;
    *out = NULL;
    *pin_status = LC_PIN_NOT_ASKED;
    return LC_E_NO_ENGINE_SUPPORT;
#else
    struct lc_pin_req req = {pin, 0};
    struct lc_engine_slot *slot = NULL;
    ENGINE *e = NULL;
    EVP_PKEY *pkey;
    UI_METHOD *ui;
    int rc;

    *out = NULL;
    *pin_status = LC_PIN_NOT_ASKED;
    lc_copy(bound_module, bound_len, "");
    if (engine_id == NULL || *engine_id == '\0' || key_id == NULL || *key_id == '\0')
        return LC_E_ARG;
    ERR_clear_error();
    pthread_mutex_lock(&lc_lock);
    rc = lc_engine_get(engine_id, so_path, module_path, &slot, bound_module, bound_len);
    if (rc == LC_OK)
        e = slot->e;
    ui = lc_ui_method();
    if (rc == LC_OK && ui == NULL)
        rc = LC_E_NOMEM;
    if (rc == LC_OK) {
        /* The engine is shared, so its PIN is set for this load only: a PIN meant for one token
         * must never be offered to another. A NULL PIN clears it (libp11 then reports an error
         * for the NULL argument, which is expected and dropped; an engine without a PIN
         * command reports one too). */
        if (pin != NULL) {
            if (!ENGINE_ctrl_cmd_string(e, "PIN", pin, 0))
                rc = LC_E_ENGINE_CTRL;
        } else {
            /* ENGINE_ctrl_cmd_string refuses a NULL argument before the engine sees it. */
            (void)ENGINE_ctrl_cmd(e, "PIN", 0, NULL, NULL, 0);
            ERR_clear_error();
        }
    }
    if (rc == LC_OK) {
        pkey = ENGINE_load_private_key(e, key_id, ui, &req);
        if (pkey == NULL)
            rc = LC_E_KEY_LOAD;
        else
            rc = lc_wrap_key(pkey, out);
        /* libp11 takes the PIN from the ctrl without asking; record that it was used. */
        if (pin != NULL && req.asked == 0)
            req.asked = 1;
    }
    if (slot != NULL) {
        if (rc == LC_OK) {
            slot->proven = 1;
        } else {
            /* Keep the load's errors: releasing the engine may add unrelated ones. */
            ERR_set_mark();
            lc_engine_drop_unproven(slot);
            ERR_pop_to_mark();
        }
    }
    pthread_mutex_unlock(&lc_lock);
    *pin_status = lc_pin_status(&req);
    return rc;
#endif
}

/* ------------------------------------------------------------------ OSSL_STORE backend */

#ifdef LC_HAVE_PROVIDERS
struct lc_provider_slot {
    char *name;
    OSSL_PROVIDER *prov;
    struct lc_provider_slot *next;
};
static struct lc_provider_slot *lc_providers = NULL;

/* Called with lc_lock held. Providers stay loaded for the life of the process: keys and
 * contexts made through them keep pointing into them. */
static int lc_provider_load(const char *name)
{
    struct lc_provider_slot *slot;
    OSSL_PROVIDER *prov;

    for (slot = lc_providers; slot != NULL; slot = slot->next)
        if (strcmp(slot->name, name) == 0)
            return LC_OK;
    prov = OSSL_PROVIDER_load(NULL, name);
    if (prov == NULL)
        return LC_E_PROVIDER;
    slot = (struct lc_provider_slot *)calloc(1, sizeof(*slot));
    if (slot == NULL || (slot->name = strdup(name)) == NULL) {
        free(slot);
        return LC_E_NOMEM;
    }
    slot->prov = prov;
    slot->next = lc_providers;
    lc_providers = slot;
    return LC_OK;
}

/* Called with lc_lock held, before the first provider other than "default" is loaded.
 *
 * When two providers offer the same algorithm and the property query does not prefer either,
 * OpenSSL takes the implementation that entered its method store first. A hardware provider
 * (tpm2) also offers digests, a DRBG, AES and EC/RSA key management; if it got there first,
 * every TLS handshake in the process would hash and draw random numbers in the TPM (75+ ms per
 * handshake) and libssl would drop the NIST curves from its TLS 1.2 group list (tpm2's EC key
 * management declares no TLS groups), so EC keys fail TLS 1.2. Making "default" the first
 * provider and fetching, through it, everything a TLS client uses - an SSL_CTX builds its
 * cipher, digest, group and signature-algorithm tables - settles every such tie on "default".
 * Only what a property query explicitly prefers (see lc_providers_apply) goes elsewhere. */
static int lc_provider_load(const char *name);
static int lc_prime_default(void)
{
    static int primed = 0;
    static const char *mds[] = {"SHA1", "SHA2-224", "SHA2-256", "SHA2-384", "SHA2-512", "MD5-SHA1", NULL};
    static const char *kms[] = {"RSA", "RSA-PSS", "EC", "X25519", "X448", "DH", NULL};
    static const char *kxs[] = {"ECDH", "X25519", "X448", "DH", NULL};
    static const char *ciphers[] = {"AES-128-CBC", "AES-192-CBC", "AES-256-CBC", "AES-128-GCM",
                                    "AES-256-GCM", NULL};
    unsigned char buf[16];
    SSL_CTX *ssl_ctx;
    int rc, i;

    if (primed)
        return LC_OK;
    rc = lc_provider_load("default");
    if (rc != LC_OK)
        return rc;
    ERR_set_mark();
    for (i = 0; mds[i] != NULL; i++)
        EVP_MD_free(EVP_MD_fetch(NULL, mds[i], "provider=default"));
    for (i = 0; kms[i] != NULL; i++)
        EVP_KEYMGMT_free(EVP_KEYMGMT_fetch(NULL, kms[i], "provider=default"));
    for (i = 0; kxs[i] != NULL; i++)
        EVP_KEYEXCH_free(EVP_KEYEXCH_fetch(NULL, kxs[i], "provider=default"));
    for (i = 0; ciphers[i] != NULL; i++)
        EVP_CIPHER_free(EVP_CIPHER_fetch(NULL, ciphers[i], "provider=default"));
    EVP_RAND_free(EVP_RAND_fetch(NULL, "CTR-DRBG", "provider=default"));
    (void)RAND_bytes(buf, sizeof(buf)); /* instantiates the process's DRBGs from "default" */
    ssl_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_free(ssl_ctx);
    ERR_pop_to_mark(); /* algorithms this OpenSSL lacks are not an error here */
    primed = 1;
    return LC_OK;
}

/* Load a comma-separated provider list in order, then make sure "default" is still there:
 * explicitly loading any provider switches off OpenSSL's implicit fallback to the default one. */
static int lc_providers_load(const char *list)
{
    char *copy, *name, *save = NULL;
    int rc = LC_OK;

    if (list == NULL || *list == '\0')
        return LC_OK;
    rc = lc_prime_default();
    if (rc != LC_OK)
        return rc;
    copy = strdup(list);
    if (copy == NULL)
        return LC_E_NOMEM;
    for (name = strtok_r(copy, ",", &save); name != NULL && rc == LC_OK; name = strtok_r(NULL, ",", &save))
        if (*name != '\0')
            rc = lc_provider_load(name);
    free(copy);
    if (rc == LC_OK)
        rc = lc_provider_load("default");
    return rc;
}
#endif

#ifdef LC_HAVE_PROVIDERS
static char *lc_propq = NULL; /* the default property query this shim set, under lc_lock */

/* Called with lc_lock held. OpenSSL caches fetch results per (algorithm, property query), and a
 * provider-specific fetch made while using a tpm2 key (key management "EC" from tpm2) can end up
 * as the cached answer for the plain query that libssl's SSL_CTX_new asks when it builds its
 * TLS group list. That context then offers no NIST curves and EC keys fail TLS 1.2 ("wrong
 * curve"). Re-setting the default properties empties the cache; fetching the key managements
 * libssl asks for right away puts the answers the property query really selects ("default",
 * see lc_prime_default) back into it. */
static void lc_reseed_fetch_cache(void)
{
    static const char *kms[] = {"EC", "RSA", "RSA-PSS", "X25519", "X448", "DH", NULL};
    int i;

    /* Only when this shim set the default properties itself: re-setting them must not replace
     * properties that came from OPENSSL_CONF or the application. */
    if (lc_providers == NULL || lc_propq == NULL)
        return;
    ERR_set_mark();
    if (EVP_set_default_properties(NULL, lc_propq))
        for (i = 0; kms[i] != NULL; i++)
            EVP_KEYMGMT_free(EVP_KEYMGMT_fetch(NULL, kms[i], NULL));
    ERR_pop_to_mark();
}
#endif

void lc_tls_prepare(void)
{
#ifdef LC_HAVE_PROVIDERS
    pthread_mutex_lock(&lc_lock);
    lc_reseed_fetch_cache();
    pthread_mutex_unlock(&lc_lock);
#endif
}

int lc_providers_apply(const char *providers, const char *propq)
{
    int rc = LC_OK;

    pthread_mutex_lock(&lc_lock);
#ifdef LC_HAVE_PROVIDERS
    rc = lc_providers_load(providers);
    if (rc == LC_OK && propq != NULL && *propq != '\0') {
        if (!EVP_set_default_properties(NULL, propq)) {
            rc = LC_E_PROPQ;
        } else if (lc_propq == NULL || strcmp(lc_propq, propq) != 0) {
            free(lc_propq);
            lc_propq = strdup(propq);
        }
    }
    if (rc == LC_OK)
        lc_reseed_fetch_cache();
#else
    if ((providers != NULL && *providers != '\0') || (propq != NULL && *propq != '\0'))
        rc = LC_E_NO_PROVIDER_SUPPORT;
#endif
    pthread_mutex_unlock(&lc_lock);
    return rc;
}

int lc_key_from_store(const char *uri, const char *providers, const char *propq,
                      const char *pin, lc_key **out, int *pin_status)
{
    struct lc_pin_req req = {pin, 0};
    OSSL_STORE_CTX *store = NULL;
    EVP_PKEY *found = NULL;
    UI_METHOD *ui;
    int rc = LC_OK, count = 0;

    *out = NULL;
    *pin_status = LC_PIN_NOT_ASKED;
    if (uri == NULL || *uri == '\0')
        return LC_E_ARG;
    ERR_clear_error();
    rc = lc_providers_apply(providers, propq);
    if (rc != LC_OK)
        return rc;
    pthread_mutex_lock(&lc_lock);
    ui = lc_ui_method();
    pthread_mutex_unlock(&lc_lock);
    if (ui == NULL)
        return LC_E_NOMEM;

    store = OSSL_STORE_open(uri, ui, &req, NULL, NULL);
    if (store == NULL) {
        *pin_status = lc_pin_status(&req);
        return LC_E_STORE_OPEN;
    }
    /* Not every loader supports expect(); when it does, it saves decoding certificates. */
    if (!OSSL_STORE_expect(store, OSSL_STORE_INFO_PKEY))
        ERR_clear_error();
    while (!OSSL_STORE_eof(store)) {
        OSSL_STORE_INFO *info = OSSL_STORE_load(store);
        if (info == NULL) {
            if (OSSL_STORE_error(store))
                break;
            continue;
        }
        if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) {
            count++;
            if (found == NULL)
                found = OSSL_STORE_INFO_get1_PKEY(info);
        }
        OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(store);
    *pin_status = lc_pin_status(&req);
    if (count == 0 || found == NULL) {
        EVP_PKEY_free(found);
        return LC_E_STORE_NO_KEY;
    }
    if (count > 1) {
        /* Refuse to guess which key the user meant. */
        EVP_PKEY_free(found);
        return LC_E_STORE_MANY;
    }
    ERR_clear_error(); /* loaders leave harmless "not this format" errors behind */
    lc_tls_prepare();
    return lc_wrap_key(found, out);
}

/* ------------------------------------------------------------------ PEM backend */

int lc_key_from_pem(const char *pem, size_t pem_len, const char *pin, lc_key **out, int *pin_status)
{
    struct lc_pin_req req = {pin, 0};
    EVP_PKEY *pkey;
    BIO *bio;

    *out = NULL;
    *pin_status = LC_PIN_NOT_ASKED;
    if (pem == NULL || pem_len == 0 || pem_len > INT32_MAX)
        return LC_E_ARG;
    ERR_clear_error();
    bio = BIO_new_mem_buf(pem, (int)pem_len);
    if (bio == NULL)
        return LC_E_NOMEM;
    pkey = PEM_read_bio_PrivateKey(bio, NULL, lc_pem_pin_cb, &req);
    BIO_free(bio);
    *pin_status = lc_pin_status(&req);
    if (pkey == NULL)
        return LC_E_KEY_LOAD;
    return lc_wrap_key(pkey, out);
}

void lc_key_free(lc_key *key)
{
    if (key == NULL)
        return;
    EVP_PKEY_free(key->pkey);
    free(key);
}

const char *lc_key_type(const lc_key *key)
{
    if (key == NULL || key->pkey == NULL)
        return "";
    switch (EVP_PKEY_base_id(key->pkey)) {
    case EVP_PKEY_RSA:
    case EVP_PKEY_RSA_PSS:
        return "RSA";
    case EVP_PKEY_EC:
        return "EC";
    case EVP_PKEY_ED25519:
        return "ED25519";
    case EVP_PKEY_ED448:
        return "ED448";
    default:
        break;
    }
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    /* Provider keys (tpm2) have no legacy id; ask the provider for its name. */
    if (EVP_PKEY_is_a(key->pkey, "RSA"))
        return "RSA";
    if (EVP_PKEY_is_a(key->pkey, "EC"))
        return "EC";
#endif
    return "unknown";
}

int lc_key_bits(const lc_key *key) { return (key && key->pkey) ? EVP_PKEY_bits(key->pkey) : 0; }

/* ------------------------------------------------------------------ ssl.SSLContext access */

/* CPython's _ssl.c: typedef struct { PyObject_HEAD SSL_CTX *ctx; ... } PySSLContext; unchanged
 * from 3.6 to 3.13. Compiling the head with this interpreter's own headers keeps the offset
 * right for debug and free-threaded builds too. */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} lc_PySSLContext;

static int lc_ctx_get(void *pyobj, uint64_t expected_options, SSL_CTX **out)
{
    PyGILState_STATE gil;
    PyObject *mod, *type;
    SSL_CTX *ctx = NULL;
    int ok = 0;

    *out = NULL;
    if (pyobj == NULL)
        return LC_E_TYPE;
    /* cffi released the GIL for this call; the type check touches Python objects. */
    gil = PyGILState_Ensure();
    mod = PyImport_ImportModule("_ssl");
    if (mod != NULL) {
        type = PyObject_GetAttrString(mod, "_SSLContext");
        if (type != NULL && PyType_Check(type) &&
            PyObject_TypeCheck((PyObject *)pyobj, (PyTypeObject *)type)) {
            ctx = ((lc_PySSLContext *)pyobj)->ctx;
            ok = 1;
        }
        Py_XDECREF(type);
        Py_DECREF(mod);
    }
    if (PyErr_Occurred())
        PyErr_Clear();
    PyGILState_Release(gil);
    if (!ok)
        return LC_E_TYPE;
    /* The pointer must prove itself before it is used: its options must be the ones Python
     * reports for the same object. */
    if (ctx == NULL || (uint64_t)SSL_CTX_get_options(ctx) != expected_options)
        return LC_E_CTX_CHECK;
    *out = ctx;
    return LC_OK;
}

int lc_ctx_check(void *pyobj, uint64_t expected_options)
{
    SSL_CTX *ctx;
    return lc_ctx_get(pyobj, expected_options, &ctx);
}

/* Reads every certificate in a PEM buffer; the caller owns the stack. */
static STACK_OF(X509) *lc_read_certs(const char *pem, size_t pem_len)
{
    STACK_OF(X509) *certs;
    BIO *bio;
    X509 *x;

    if (pem == NULL || pem_len == 0 || pem_len > INT32_MAX)
        return NULL;
    bio = BIO_new_mem_buf(pem, (int)pem_len);
    certs = sk_X509_new_null();
    if (bio == NULL || certs == NULL) {
        BIO_free(bio);
        sk_X509_free(certs);
        return NULL;
    }
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        if (!sk_X509_push(certs, x)) {
            X509_free(x);
            break;
        }
    }
    BIO_free(bio);
    if (sk_X509_num(certs) == 0) {
        sk_X509_free(certs);
        return NULL;
    }
    ERR_clear_error(); /* the reader ends with "no start line" at the end of the buffer */
    return certs;
}

static void lc_name_cn(const X509_NAME *name, char *out, size_t out_len)
{
    lc_copy(out, out_len, "");
    if (name == NULL || out == NULL || out_len == 0)
        return;
    /* X509_NAME_get_text_by_NID truncates safely and always NUL-terminates a positive length. */
    if (X509_NAME_get_text_by_NID((X509_NAME *)name, NID_commonName, out, (int)(out_len > INT32_MAX ? INT32_MAX : out_len)) < 0)
        lc_copy(out, out_len, "");
}

static int lc_asn1_epoch(const ASN1_TIME *t, int64_t *out)
{
    struct tm tm;

    memset(&tm, 0, sizeof(tm));
    if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1)
        return 0;
    *out = (int64_t)timegm(&tm);
    return 1;
}

int lc_cert_info(const char *pem, size_t pem_len, char *subject_cn, size_t subject_len,
                 char *issuer_cn, size_t issuer_len, int64_t *not_before, int64_t *not_after)
{
    STACK_OF(X509) *certs;
    X509 *x;
    int ok;

    *not_before = *not_after = 0;
    lc_copy(subject_cn, subject_len, "");
    lc_copy(issuer_cn, issuer_len, "");
    ERR_clear_error();
    certs = lc_read_certs(pem, pem_len);
    if (certs == NULL)
        return LC_E_CERT_PARSE;
    x = sk_X509_value(certs, 0);
    lc_name_cn(X509_get_subject_name(x), subject_cn, subject_len);
    lc_name_cn(X509_get_issuer_name(x), issuer_cn, issuer_len);
    ok = lc_asn1_epoch(X509_get0_notBefore(x), not_before) && lc_asn1_epoch(X509_get0_notAfter(x), not_after);
    sk_X509_pop_free(certs, X509_free);
    return ok ? LC_OK : LC_E_CERT_PARSE;
}

int lc_cert_matches_key(const char *pem, size_t pem_len, const lc_key *key)
{
    STACK_OF(X509) *certs;
    int ok;

    if (key == NULL || key->pkey == NULL)
        return -LC_E_ARG;
    ERR_clear_error();
    certs = lc_read_certs(pem, pem_len);
    if (certs == NULL)
        return -LC_E_CERT_PARSE;
    ok = X509_check_private_key(sk_X509_value(certs, 0), key->pkey) == 1;
    sk_X509_pop_free(certs, X509_free);
    return ok;
}

int lc_ctx_install(void *pyobj, uint64_t expected_options, const lc_key *key,
                   const char *chain_pem, size_t chain_len)
{
    STACK_OF(X509) *certs;
    SSL_CTX *ctx;
    X509 *leaf;
    int rc, i;

    if (key == NULL || key->pkey == NULL)
        return LC_E_ARG;
    rc = lc_ctx_get(pyobj, expected_options, &ctx);
    if (rc != LC_OK)
        return rc;
    ERR_clear_error();
    certs = lc_read_certs(chain_pem, chain_len);
    if (certs == NULL)
        return LC_E_CERT_PARSE;
    leaf = sk_X509_value(certs, 0);
    /* Check the pair before touching the context, so a mismatch leaves it as it was. */
    if (X509_check_private_key(leaf, key->pkey) != 1) {
        sk_X509_pop_free(certs, X509_free);
        return LC_E_MISMATCH;
    }
    rc = LC_OK;
    if (SSL_CTX_use_certificate(ctx, leaf) != 1 || SSL_CTX_clear_chain_certs(ctx) != 1)
        rc = LC_E_USE_CERT;
    for (i = 1; rc == LC_OK && i < sk_X509_num(certs); i++)
        if (SSL_CTX_add1_chain_cert(ctx, sk_X509_value(certs, i)) != 1)
            rc = LC_E_USE_CERT;
    sk_X509_pop_free(certs, X509_free);
    if (rc == LC_OK && SSL_CTX_use_PrivateKey(ctx, key->pkey) != 1)
        rc = LC_E_USE_KEY;
    if (rc == LC_OK && SSL_CTX_check_private_key(ctx) != 1)
        rc = LC_E_MISMATCH;
    return rc;
}

/* ------------------------------------------------------------------ CSR */

int lc_csr_sign(const lc_key *key, const char **fields, const char **values, int n,
                const char *san, const char *digest, unsigned char **der, size_t *der_len)
{
    X509_REQ *req = NULL;
    X509_NAME *name;
    const EVP_MD *md;
    unsigned char *buf = NULL, *p;
    int rc = LC_OK, i, len;

    *der = NULL;
    *der_len = 0;
    if (key == NULL || key->pkey == NULL || n < 0 || (n > 0 && (fields == NULL || values == NULL)))
        return LC_E_ARG;
    ERR_clear_error();
    md = EVP_get_digestbyname(digest ? digest : "sha256");
    if (md == NULL)
        return LC_E_CSR_DIGEST;
    req = X509_REQ_new();
    if (req == NULL || !X509_REQ_set_version(req, 0)) {
        X509_REQ_free(req);
        return LC_E_NOMEM;
    }
    name = X509_REQ_get_subject_name(req);
    for (i = 0; rc == LC_OK && i < n; i++) {
        if (fields[i] == NULL || values[i] == NULL ||
            !X509_NAME_add_entry_by_txt(name, fields[i], MBSTRING_UTF8,
                                        (const unsigned char *)values[i], -1, -1, 0))
            rc = LC_E_CSR_SUBJECT;
    }
    if (rc == LC_OK && !X509_REQ_set_pubkey(req, key->pkey))
        rc = LC_E_SIGN;
    if (rc == LC_OK && san != NULL && *san != '\0') {
        STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();
        X509_EXTENSION *ext = NULL;
        X509V3_CTX v3;

        X509V3_set_ctx(&v3, NULL, NULL, req, NULL, 0);
        if (exts != NULL)
            ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, san);
        if (ext == NULL || !sk_X509_EXTENSION_push(exts, ext)) {
            X509_EXTENSION_free(ext);
            rc = LC_E_CSR_SAN;
        } else if (!X509_REQ_add_extensions(req, exts)) {
            rc = LC_E_CSR_SAN;
        }
        sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    }
    if (rc == LC_OK && X509_REQ_sign(req, key->pkey, md) <= 0)
        rc = LC_E_SIGN;
    if (rc == LC_OK) {
        len = i2d_X509_REQ(req, NULL);
        if (len <= 0 || (buf = (unsigned char *)malloc((size_t)len)) == NULL) {
            rc = LC_E_NOMEM;
        } else {
            p = buf;
            if (i2d_X509_REQ(req, &p) != len) {
                free(buf);
                rc = LC_E_SIGN;
            } else {
                *der = buf;
                *der_len = (size_t)len;
            }
        }
    }
    X509_REQ_free(req);
    return rc;
}

void lc_free(void *p) { free(p); }

/* ------------------------------------------------------------------ server side (the emulator) */

/* Every chain error is let through; OpenSSL keeps the first one as the connection's verify result,
 * so authorization can happen later (at MQTT CONNECT) with the full story. */
static int lc_accept_any_cb(int preverify_ok, X509_STORE_CTX *store)
{
    (void)preverify_ok;
    (void)store;
    return 1;
}

int lc_ctx_accept_any_peer(void *pyobj, uint64_t expected_options)
{
    SSL_CTX *ctx;
    int rc = lc_ctx_get(pyobj, expected_options, &ctx);
    if (rc != LC_OK)
        return rc;
    SSL_CTX_set_verify(ctx, SSL_CTX_get_verify_mode(ctx), lc_accept_any_cb);
    return LC_OK;
}

/* CPython's _ssl.c: typedef struct { PyObject_HEAD PyObject *Socket; SSL *ssl; ... } PySSLSocket;
 * unchanged from 3.6 to 3.13. The SSL* proves itself: its SSL_CTX must be the verified context's. */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
} lc_PySSLSocket;

long lc_peer_verify_result(void *pysslobj, void *pyctx, uint64_t expected_options, char *text, size_t text_len)
{
    PyGILState_STATE gil;
    PyObject *mod, *type;
    SSL_CTX *ctx;
    SSL *ssl = NULL;
    long result;
    int rc = lc_ctx_get(pyctx, expected_options, &ctx);

    lc_copy(text, text_len, "");
    if (rc != LC_OK)
        return -rc;
    if (pysslobj == NULL)
        return -LC_E_TYPE;
    gil = PyGILState_Ensure();
    mod = PyImport_ImportModule("_ssl");
    if (mod != NULL) {
        type = PyObject_GetAttrString(mod, "_SSLSocket");
        if (type != NULL && PyType_Check(type) &&
            PyObject_TypeCheck((PyObject *)pysslobj, (PyTypeObject *)type))
            ssl = ((lc_PySSLSocket *)pysslobj)->ssl;
        Py_XDECREF(type);
        Py_DECREF(mod);
    }
    if (PyErr_Occurred())
        PyErr_Clear();
    PyGILState_Release(gil);
    if (ssl == NULL)
        return -LC_E_TYPE;
    if (SSL_get_SSL_CTX(ssl) != ctx)
        return -LC_E_CTX_CHECK;
    result = SSL_get_verify_result(ssl);
    lc_copy(text, text_len, X509_verify_cert_error_string(result));
    return result;
}

/* ------------------------------------------------------------------ PKCS#11 key pairs in this process
 *
 * The few PKCS#11 (v2.40) types used here are declared locally, so the build needs no pkcs11.h. On
 * Unix the structures are not packed and CK_ULONG is unsigned long (the spec's platform notes). */

typedef unsigned long lc_ck_ulong;
typedef unsigned long lc_ck_rv;
typedef struct { lc_ck_ulong type; void *value; lc_ck_ulong len; } lc_ck_attribute;
typedef struct { lc_ck_ulong mechanism; void *param; lc_ck_ulong param_len; } lc_ck_mechanism;
typedef struct {
    void *create_mutex, *destroy_mutex, *lock_mutex, *unlock_mutex;
    lc_ck_ulong flags;
    void *reserved;
} lc_ck_init_args;
typedef struct {
    unsigned char label[32], manufacturer[32], model[16], serial[16];
    lc_ck_ulong flags, max_sessions, sessions, max_rw_sessions, rw_sessions, max_pin, min_pin,
        total_public, free_public, total_private, free_private;
    unsigned char hw_version[2], fw_version[2], utc_time[16];
} lc_ck_token_info;

/* CK_FUNCTION_LIST up to C_GenerateKeyPair, in the order of the standard; `unused` fills the
 * entries this file never calls. */
typedef struct {
    unsigned char version[2];
    lc_ck_rv (*C_Initialize)(void *);
    lc_ck_rv (*C_Finalize)(void *);
    void *C_GetInfo, *C_GetFunctionList;
    lc_ck_rv (*C_GetSlotList)(unsigned char, lc_ck_ulong *, lc_ck_ulong *);
    void *C_GetSlotInfo;
    lc_ck_rv (*C_GetTokenInfo)(lc_ck_ulong, lc_ck_token_info *);
    void *C_GetMechanismList, *C_GetMechanismInfo, *C_InitToken, *C_InitPIN, *C_SetPIN;
    lc_ck_rv (*C_OpenSession)(lc_ck_ulong, lc_ck_ulong, void *, void *, lc_ck_ulong *);
    lc_ck_rv (*C_CloseSession)(lc_ck_ulong);
    void *C_CloseAllSessions, *C_GetSessionInfo, *C_GetOperationState, *C_SetOperationState;
    lc_ck_rv (*C_Login)(lc_ck_ulong, lc_ck_ulong, const unsigned char *, lc_ck_ulong);
    void *C_Logout, *C_CreateObject, *C_CopyObject, *C_DestroyObject, *C_GetObjectSize;
    lc_ck_rv (*C_GetAttributeValue)(lc_ck_ulong, lc_ck_ulong, lc_ck_attribute *, lc_ck_ulong);
    void *C_SetAttributeValue;
    lc_ck_rv (*C_FindObjectsInit)(lc_ck_ulong, lc_ck_attribute *, lc_ck_ulong);
    lc_ck_rv (*C_FindObjects)(lc_ck_ulong, lc_ck_ulong *, lc_ck_ulong, lc_ck_ulong *);
    lc_ck_rv (*C_FindObjectsFinal)(lc_ck_ulong);
    void *unused[30]; /* C_EncryptInit .. C_GenerateKey */
    lc_ck_rv (*C_GenerateKeyPair)(lc_ck_ulong, lc_ck_mechanism *, lc_ck_attribute *, lc_ck_ulong,
                                  lc_ck_attribute *, lc_ck_ulong, lc_ck_ulong *, lc_ck_ulong *);
} lc_ck_function_list;
/* C_GenerateKeyPair is the 60th function pointer of the list (after the padded CK_VERSION). */
_Static_assert(offsetof(lc_ck_function_list, C_GenerateKeyPair) == 60 * sizeof(void *),
               "CK_FUNCTION_LIST layout");

#define LC_CKR_CRYPTOKI_ALREADY_INITIALIZED 0x191UL
#define LC_CKR_USER_ALREADY_LOGGED_IN 0x100UL
#define LC_CKF_OS_LOCKING_OK 0x2UL
#define LC_CKF_RW_SERIAL 0x6UL /* CKF_RW_SESSION | CKF_SERIAL_SESSION */
#define LC_CKU_USER 1UL
#define LC_CKO_PUBLIC_KEY 2UL
#define LC_CKO_PRIVATE_KEY 3UL
#define LC_CKM_RSA_PKCS_KEY_PAIR_GEN 0x0UL
#define LC_CKM_EC_KEY_PAIR_GEN 0x1040UL
#define LC_CKA_CLASS 0x0UL
#define LC_CKA_TOKEN 0x1UL
#define LC_CKA_PRIVATE 0x2UL
#define LC_CKA_LABEL 0x3UL
#define LC_CKA_ID 0x102UL
#define LC_CKA_SENSITIVE 0x103UL
#define LC_CKA_ENCRYPT 0x104UL
#define LC_CKA_DECRYPT 0x105UL
#define LC_CKA_WRAP 0x106UL
#define LC_CKA_UNWRAP 0x107UL
#define LC_CKA_SIGN 0x108UL
#define LC_CKA_VERIFY 0x10AUL
#define LC_CKA_DERIVE 0x10CUL
#define LC_CKA_MODULUS_BITS 0x121UL
#define LC_CKA_PUBLIC_EXPONENT 0x122UL
#define LC_CKA_EXTRACTABLE 0x162UL
#define LC_CKA_EC_PARAMS 0x180UL

/* Modules this process opened for key generation: dlopen()ed once and kept for the life of the process.
 * dlclose() would unmap a module that is still initialised if libp11 had not loaded it (yet). */
struct lc_p11_module {
    char *path;
    lc_ck_function_list *fl;
    struct lc_p11_module *next;
};
static struct lc_p11_module *lc_p11_modules = NULL;

/* Called with lc_lock held. */
static lc_ck_function_list *lc_p11_functions(const char *module_path)
{
    struct lc_p11_module *m;
    lc_ck_rv (*get_list)(lc_ck_function_list **);
    lc_ck_function_list *fl = NULL;
    void *handle;

    for (m = lc_p11_modules; m != NULL; m = m->next)
        if (strcmp(m->path, module_path) == 0)
            return m->fl;
    /* The same file libp11 loaded gives the same handle (the dynamic linker matches loaded objects by
     * name and by file identity), so this is libp11's instance of the module, or the one it will get. */
    handle = dlopen(module_path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (handle == NULL)
        handle = dlopen(module_path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL)
        return NULL;
    *(void **)(&get_list) = dlsym(handle, "C_GetFunctionList");
    if (get_list == NULL || get_list(&fl) != 0 || fl == NULL || fl->version[0] < 2) {
        dlclose(handle);
        return NULL;
    }
    m = (struct lc_p11_module *)calloc(1, sizeof(*m));
    if (m == NULL || (m->path = strdup(module_path)) == NULL) {
        free(m);
        return NULL; /* the handle stays open: the module may be initialised by now */
    }
    m->fl = fl;
    m->next = lc_p11_modules;
    lc_p11_modules = m;
    return fl;
}

static int lc_p11_fail(lc_ck_rv rv, const char *function, unsigned long *ckr, char *where, size_t where_len)
{
    *ckr = rv;
    lc_copy(where, where_len, function);
    return LC_E_P11;
}

/* Called with lc_lock held: a session logged in as the user on the token labelled `token_label`. */
static int lc_p11_session(lc_ck_function_list *fl, const char *token_label, const unsigned char *pin,
                          size_t pin_len, lc_ck_ulong *session, unsigned long *ckr, char *where, size_t where_len)
{
    lc_ck_init_args args;
    lc_ck_ulong count = 0, i, *slots = NULL, slot = 0;
    lc_ck_token_info info;
    unsigned char want[32];
    size_t label_len = strlen(token_label);
    int found = 0;
    lc_ck_rv rv;

    /* CKF_OS_LOCKING_OK, as libp11 passes it: the module must be thread-safe whoever initialises it,
     * since libp11 signs from the connection's thread while a key is made here. */
    memset(&args, 0, sizeof(args));
    args.flags = LC_CKF_OS_LOCKING_OK;
    rv = fl->C_Initialize(&args);
    if (rv != 0 && rv != LC_CKR_CRYPTOKI_ALREADY_INITIALIZED)
        return lc_p11_fail(rv, "C_Initialize", ckr, where, where_len);
    if (label_len > sizeof(want))
        return LC_E_P11_TOKEN;
    memset(want, ' ', sizeof(want));
    memcpy(want, token_label, label_len);
    rv = fl->C_GetSlotList(1, NULL, &count);
    if (rv != 0)
        return lc_p11_fail(rv, "C_GetSlotList", ckr, where, where_len);
    slots = (lc_ck_ulong *)calloc(count ? count : 1, sizeof(*slots));
    if (slots == NULL)
        return LC_E_NOMEM;
    rv = fl->C_GetSlotList(1, slots, &count);
    if (rv != 0) {
        free(slots);
        return lc_p11_fail(rv, "C_GetSlotList", ckr, where, where_len);
    }
    for (i = 0; i < count && !found; i++) {
        if (fl->C_GetTokenInfo(slots[i], &info) == 0 && memcmp(info.label, want, sizeof(want)) == 0) {
            slot = slots[i];
            found = 1;
        }
    }
    free(slots);
    if (!found)
        return LC_E_P11_TOKEN;
    rv = fl->C_OpenSession(slot, LC_CKF_RW_SERIAL, NULL, NULL, session);
    if (rv != 0)
        return lc_p11_fail(rv, "C_OpenSession", ckr, where, where_len);
    /* Login state belongs to the application, not the session: when libp11 logged in already this
     * says so, and that is fine. */
    rv = fl->C_Login(*session, LC_CKU_USER, pin, (lc_ck_ulong)pin_len);
    if (rv != 0 && rv != LC_CKR_USER_ALREADY_LOGGED_IN) {
        /* Closing our session logs nobody out while libp11 keeps one of its own open. */
        fl->C_CloseSession(*session);
        return lc_p11_fail(rv, "C_Login", ckr, where, where_len);
    }
    return LC_OK;
}

int lc_p11_generate_keypair(const char *module_path, const char *token_label,
                            const unsigned char *pin, size_t pin_len,
                            const char *key_label, const unsigned char *key_id, size_t key_id_len,
                            int key_kind, unsigned long bits, unsigned long *ckr, char *where, size_t where_len)
{
    static const unsigned char p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    static const unsigned char p384[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};
    static const unsigned char f65537[] = {0x01, 0x00, 0x01};
    unsigned char yes = 1, no = 0;
    lc_ck_ulong pub_class = LC_CKO_PUBLIC_KEY, priv_class = LC_CKO_PRIVATE_KEY, modulus_bits = bits;
    lc_ck_ulong label_len, session = 0, found = 0, obj, pub = 0, priv = 0;
    lc_ck_mechanism mech = {LC_CKM_EC_KEY_PAIR_GEN, NULL, 0};
    lc_ck_attribute pub_t[9], priv_t[12], search[2], check[2];
    lc_ck_ulong npub = 0, npriv = 0, nsearch = 0, ncheck = 0;
    unsigned char sensitive = 0, extractable = 1;
    lc_ck_function_list *fl;
    lc_ck_rv rv;
    int rc;

    *ckr = 0;
    lc_copy(where, where_len, "");
    if (module_path == NULL || token_label == NULL || key_label == NULL || *key_label == '\0' ||
        pin == NULL || key_id == NULL || key_id_len == 0 || key_kind < LC_P11_EC_P256 || key_kind > LC_P11_RSA ||
        (key_kind == LC_P11_RSA && bits < 2048))
        return LC_E_ARG;
    label_len = (lc_ck_ulong)strlen(key_label);
#define LC_ATTR(arr, n, t, v, l) do { (arr)[n].type = (t); (arr)[n].value = (void *)(v); (arr)[n].len = (l); (n)++; } while (0)
    /* The same templates as lightclient.token.generate_keypair (python-pkcs11's defaults there): the
     * EC public key's usage flags are left to the module (tpm2-pkcs11 refuses a CKA_VERIFY it did not
     * derive itself); RSA keys may decrypt, which tpm2-pkcs11 needs to sign PKCS#1 v1.5. */
    LC_ATTR(pub_t, npub, LC_CKA_CLASS, &pub_class, sizeof(pub_class));
    LC_ATTR(pub_t, npub, LC_CKA_ID, key_id, key_id_len);
    LC_ATTR(pub_t, npub, LC_CKA_LABEL, key_label, label_len);
    LC_ATTR(pub_t, npub, LC_CKA_TOKEN, &yes, 1);
    LC_ATTR(priv_t, npriv, LC_CKA_CLASS, &priv_class, sizeof(priv_class));
    LC_ATTR(priv_t, npriv, LC_CKA_ID, key_id, key_id_len);
    LC_ATTR(priv_t, npriv, LC_CKA_LABEL, key_label, label_len);
    LC_ATTR(priv_t, npriv, LC_CKA_TOKEN, &yes, 1);
    LC_ATTR(priv_t, npriv, LC_CKA_PRIVATE, &yes, 1);
    LC_ATTR(priv_t, npriv, LC_CKA_SENSITIVE, &yes, 1);
    LC_ATTR(priv_t, npriv, LC_CKA_EXTRACTABLE, &no, 1);
    LC_ATTR(priv_t, npriv, LC_CKA_SIGN, &yes, 1);
    LC_ATTR(priv_t, npriv, LC_CKA_DERIVE, &no, 1);
    if (key_kind == LC_P11_RSA) {
        mech.mechanism = LC_CKM_RSA_PKCS_KEY_PAIR_GEN;
        LC_ATTR(pub_t, npub, LC_CKA_MODULUS_BITS, &modulus_bits, sizeof(modulus_bits));
        LC_ATTR(pub_t, npub, LC_CKA_PUBLIC_EXPONENT, f65537, sizeof(f65537));
        LC_ATTR(pub_t, npub, LC_CKA_ENCRYPT, &yes, 1);
        LC_ATTR(pub_t, npub, LC_CKA_WRAP, &yes, 1);
        LC_ATTR(pub_t, npub, LC_CKA_VERIFY, &yes, 1);
        LC_ATTR(priv_t, npriv, LC_CKA_DECRYPT, &yes, 1);
        LC_ATTR(priv_t, npriv, LC_CKA_UNWRAP, &yes, 1);
    } else {
        if (key_kind == LC_P11_EC_P256)
            LC_ATTR(pub_t, npub, LC_CKA_EC_PARAMS, p256, sizeof(p256));
        else
            LC_ATTR(pub_t, npub, LC_CKA_EC_PARAMS, p384, sizeof(p384));
        LC_ATTR(priv_t, npriv, LC_CKA_DECRYPT, &no, 1);
        LC_ATTR(priv_t, npriv, LC_CKA_UNWRAP, &no, 1);
    }
    LC_ATTR(search, nsearch, LC_CKA_CLASS, &priv_class, sizeof(priv_class));
    LC_ATTR(search, nsearch, LC_CKA_LABEL, key_label, label_len);
    LC_ATTR(check, ncheck, LC_CKA_SENSITIVE, &sensitive, 1);
    LC_ATTR(check, ncheck, LC_CKA_EXTRACTABLE, &extractable, 1);

    /* lc_lock: the engine code may release an engine that never served a key, and libp11 then calls
     * C_Finalize; holding the lock keeps that from happening in the middle of this. */
    pthread_mutex_lock(&lc_lock);
    fl = lc_p11_functions(module_path);
    if (fl == NULL) {
        pthread_mutex_unlock(&lc_lock);
        return LC_E_P11_MODULE;
    }
    rc = lc_p11_session(fl, token_label, pin, pin_len, &session, ckr, where, where_len);
    if (rc != LC_OK) {
        pthread_mutex_unlock(&lc_lock);
        return rc;
    }
    rv = fl->C_FindObjectsInit(session, search, nsearch);
    if (rv == 0) {
        rv = fl->C_FindObjects(session, &obj, 1, &found);
        fl->C_FindObjectsFinal(session);
    }
    if (rv != 0) {
        rc = lc_p11_fail(rv, "C_FindObjects", ckr, where, where_len);
    } else if (found) {
        rc = LC_E_P11_EXISTS;
    } else {
        rv = fl->C_GenerateKeyPair(session, &mech, pub_t, npub, priv_t, npriv, &pub, &priv);
        if (rv != 0) {
            rc = lc_p11_fail(rv, "C_GenerateKeyPair", ckr, where, where_len);
        } else {
            rv = fl->C_GetAttributeValue(session, priv, check, ncheck);
            if (rv != 0)
                rc = lc_p11_fail(rv, "C_GetAttributeValue", ckr, where, where_len);
            else if (!sensitive || extractable)
                rc = LC_E_P11_NOT_SENSITIVE;
        }
    }
#undef LC_ATTR
    /* No C_Logout (it would log libp11's sessions out) and no C_Finalize (libp11 owns the module). */
    fl->C_CloseSession(session);
    pthread_mutex_unlock(&lc_lock);
    return rc;
}
