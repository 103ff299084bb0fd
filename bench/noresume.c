/* LD_PRELOAD shim for the bench's load generator (wrk): never resume a TLS session.
 *
 * wrk reuses one SSL object per connection slot and calls SSL_clear() between
 * connections, which keeps the last session, so every reconnect is a TLS 1.3 PSK
 * resumption and the server's key is never used. This drops the kept session just
 * before a handshake starts (only while the SSL is still "before" the handshake, so
 * the repeated non-blocking SSL_connect calls of one handshake are left alone).
 * Built by bench/runner.py with gcc at bench time; declared here without OpenSSL
 * headers so no -dev package is needed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
extern int SSL_in_before(const SSL *s);
extern int SSL_set_session(SSL *s, SSL_SESSION *session);

int SSL_connect(SSL *s) {
    static int (*real_connect)(SSL *) = NULL;
    if (real_connect == NULL) {
        real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    }
    if (SSL_in_before(s)) {
        SSL_set_session(s, NULL);
    }
    return real_connect(s);
}
