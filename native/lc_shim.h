/* lightclient native shim: the cffi cdef.
 *
 * Plain C types only (no OpenSSL or Python types), so the same declarations work for any OpenSSL
 * build and cffi can parse this file as is. Every function returns LC_OK or an LC_E_* code; on
 * failure the OpenSSL error queue is left for lc_err_next() to drain into the Python exception.
 */

typedef struct lc_key lc_key;

#define LC_OK 0
#define LC_E_NOMEM 1
#define LC_E_TYPE 2              /* the object is not an ssl.SSLContext */
#define LC_E_CTX_CHECK 3         /* the SSL_CTX* read from the object failed verification */
#define LC_E_NO_ENGINE_SUPPORT 4 /* shim built without ENGINE support (OPENSSL_NO_ENGINE) */
#define LC_E_ENGINE_UNAVAILABLE 5 /* ENGINE_by_id / dynamic load failed */
#define LC_E_ENGINE_CTRL 6       /* a ctrl command (SO_PATH, MODULE_PATH, PIN) was refused */
#define LC_E_ENGINE_INIT 7       /* ENGINE_init failed */
#define LC_E_KEY_LOAD 8          /* the engine / store / PEM reader returned no key */
#define LC_E_NO_PROVIDER_SUPPORT 9 /* OpenSSL older than 3.0: no providers */
#define LC_E_PROVIDER 10         /* OSSL_PROVIDER_load failed */
#define LC_E_PROPQ 11            /* EVP_set_default_properties failed */
#define LC_E_STORE_OPEN 12       /* OSSL_STORE_open failed */
#define LC_E_STORE_NO_KEY 13     /* the store yielded no private key */
#define LC_E_STORE_MANY 14       /* the store yielded more than one private key */
#define LC_E_CERT_PARSE 15       /* no PEM certificate could be read */
#define LC_E_MISMATCH 16         /* certificate and private key do not belong together */
#define LC_E_USE_CERT 17         /* SSL_CTX refused the certificate or chain */
#define LC_E_USE_KEY 18          /* SSL_CTX refused the private key */
#define LC_E_CSR_SUBJECT 19      /* a subject field name or value was refused */
#define LC_E_CSR_SAN 20          /* the subjectAltName value was refused */
#define LC_E_CSR_DIGEST 21       /* unknown digest name */
#define LC_E_SIGN 22             /* signing failed */
#define LC_E_ARG 23              /* a required argument was NULL or empty */
#define LC_E_ENGINE_MODULE 24    /* the engine already serves another PKCS#11 module */

/* PIN status reported by the loaders: whether a PIN was asked for, and whether one was available. */
#define LC_PIN_NOT_ASKED 0
#define LC_PIN_SUPPLIED 1
#define LC_PIN_MISSING 2

/* Version and linkage facts, for the same-OpenSSL-copy check. */
unsigned long lc_openssl_version_num(void);
const char *lc_openssl_version_text(void);
int lc_engine_support(void);
int lc_provider_support(void);
/* Which file provides `symbol` as seen from the already-loaded object at `object_path`
 * (NULL = the main program). Returns 1 and writes the path, 0 when the symbol is not
 * visible from there, -1 when the object is not loaded. */
int lc_symbol_origin(const char *object_path, const char *symbol, char *out, size_t out_len);

/* Error queue: pops the oldest error, writes its text; returns 0 when the queue is empty. */
unsigned long lc_err_next(char *out, size_t out_len);
void lc_err_clear(void);

/* Key loaders. `pin` may be NULL. `pin_status` receives an LC_PIN_* value. */
/* `bound_module` receives the module the engine already serves when LC_E_ENGINE_MODULE is returned. */
int lc_key_from_engine(const char *engine_id, const char *so_path, const char *module_path,
                       const char *pin, const char *key_id, lc_key **out, int *pin_status,
                       char *bound_module, size_t bound_len);
/* Load `providers` (comma-separated, in order; "default" is always loaded too, and first) and set
 * the process's default property query to `propq` when given. lc_key_from_store does this itself;
 * this is for a key that is already loaded and reused. */
int lc_providers_apply(const char *providers, const char *propq);
/* Call right before creating an SSL context in a process that loaded providers through this shim:
 * makes sure the context's TLS group list comes from the "default" provider (no-op otherwise). */
void lc_tls_prepare(void);
int lc_key_from_store(const char *uri, const char *providers, const char *propq,
                      const char *pin, lc_key **out, int *pin_status);
int lc_key_from_pem(const char *pem, size_t pem_len, const char *pin, lc_key **out, int *pin_status);
void lc_key_free(lc_key *key);
/* "RSA", "EC", "ED25519", ... (static storage) and the key size in bits. */
const char *lc_key_type(const lc_key *key);
int lc_key_bits(const lc_key *key);

/* Install a PEM certificate chain (leaf first) and the key into the SSL_CTX inside an
 * ssl.SSLContext. `pyobj` is the object's address; `expected_options` is ctx.options, checked
 * against SSL_CTX_get_options() before anything else is touched. */
int lc_ctx_install(void *pyobj, uint64_t expected_options, const lc_key *key,
                   const char *chain_pem, size_t chain_len);
/* Only the lookup + verification, for tests and diagnostics. */
int lc_ctx_check(void *pyobj, uint64_t expected_options);

/* Facts about the first certificate in `pem`: subject and issuer CN (empty when absent) and the
 * validity period in seconds since the epoch (UTC). LC_OK or LC_E_CERT_PARSE. */
int lc_cert_info(const char *pem, size_t pem_len, char *subject_cn, size_t subject_len,
                 char *issuer_cn, size_t issuer_len, int64_t *not_before, int64_t *not_after);

/* Does the first certificate in `pem` belong to `key`? 1 yes, 0 no, <0 LC_E_* error. */
int lc_cert_matches_key(const char *pem, size_t pem_len, const lc_key *key);

/* A PKCS#10 CSR signed by `key`: subject from n (field, value) pairs, optional subjectAltName in
 * OpenSSL's syntax ("DNS:a,IP:127.0.0.1"), digest name ("sha256"). DER out, free with lc_free. */
int lc_csr_sign(const lc_key *key, const char **fields, const char **values, int n,
                const char *san, const char *digest, unsigned char **der, size_t *der_len);
void lc_free(void *p);

/* Server side, for the emulator (which loads the shim only when it is built): make the SSL_CTX inside an
 * ssl.SSLContext finish every handshake whatever the client certificate's chain says, as IoT Hub does
 * (it authorizes at CONNECT). OpenSSL still verifies and records the result per connection. */
int lc_ctx_accept_any_peer(void *pyobj, uint64_t expected_options);
/* That recorded result (X509_V_OK = 0, else an X509_V_ERR_* code) for the connection of an
 * ssl.SSLObject's _sslobj, proven to belong to the context `pyctx`; <0 is -LC_E_*. The text of the
 * code goes to `text`. */
long lc_peer_verify_result(void *pysslobj, void *pyctx, uint64_t expected_options, char *text, size_t text_len);

/* PKCS#11 key pairs made through THIS process's instance of a module, the one OpenSSL's libp11 engine
 * uses (dlopen of the same path returns the same handle). A module such as tpm2-pkcs11 reads its
 * objects when it is initialised, so a key made by another process stays invisible to libp11 here.
 * The module is initialised if needed (CKR_CRYPTOKI_ALREADY_INITIALIZED is fine) and never finalised:
 * libp11 owns it. The user is logged in on a session of our own (CKR_USER_ALREADY_LOGGED_IN is fine)
 * and never logged out, which would log libp11's sessions out too. On LC_E_P11 `ckr` holds the CK_RV
 * and `where` the function that returned it. */
#define LC_E_P11_MODULE 25       /* the module could not be loaded, or has no C_GetFunctionList */
#define LC_E_P11_TOKEN 26        /* no token with that label */
#define LC_E_P11 27              /* a PKCS#11 call failed: see ckr / where */
#define LC_E_P11_EXISTS 28       /* a private key with that label exists already */
#define LC_E_P11_NOT_SENSITIVE 29 /* the token made the key but not sensitive and non-extractable */
#define LC_P11_EC_P256 1
#define LC_P11_EC_P384 2
#define LC_P11_RSA 3
/* A token key pair: private key private, sensitive, non-extractable, for signing; `bits` for RSA only.
 * `pin` is not kept or copied. */
int lc_p11_generate_keypair(const char *module_path, const char *token_label,
                            const unsigned char *pin, size_t pin_len,
                            const char *key_label, const unsigned char *key_id, size_t key_id_len,
                            int key_kind, unsigned long bits, unsigned long *ckr, char *where, size_t where_len);
