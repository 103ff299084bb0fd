/* LD_PRELOAD shim for the bench's load generator (wrk) in the full-handshake scenarios:
 * never resume a TLS session, and do not spin while a handshake waits for the server.
 *
 * Resumption: wrk reuses one SSL object per connection slot and calls SSL_clear()
 * between connections, which keeps the last session, so every reconnect is a TLS 1.3
 * PSK resumption and the server's key is never used. This drops the kept session just
 * before a handshake starts (only while the SSL is still "before" the handshake, so the
 * repeated non-blocking SSL_connect calls of one handshake are left alone).
 *
 * Spinning: wrk watches a connecting socket for "readable or writable" and calls
 * SSL_connect on either; a connected socket is always writable, so while the server
 * works on a handshake wrk calls SSL_connect (and epoll_wait) in a loop. It burns a
 * whole core doing so, more the slower the server answers, and on a 2-core machine
 * that core is the one the backend (and proxy-2w's second worker) share with it. When
 * SSL_connect says it wants to read, the socket is watched for reading only until wrk
 * registers it again itself (as it does once the handshake is done): the next
 * epoll_wait call makes that change on wrk's epoll instance.
 *
 * Built by bench/runner.py with gcc at bench time; declared here without OpenSSL
 * headers so no -dev package is needed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <sys/epoll.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
extern int SSL_in_before(const SSL *s);
extern int SSL_set_session(SSL *s, SSL_SESSION *session);
extern int SSL_get_error(const SSL *s, int ret);
extern int SSL_get_fd(const SSL *s);

#define SSL_ERROR_WANT_READ 2
#define MAX_WAITING 4096

/* Sockets whose handshake waits to read, not yet switched to read-only watching. */
static int waiting[MAX_WAITING];
static int waiting_count = 0;

int SSL_connect(SSL *s) {
    static int (*real_connect)(SSL *) = NULL;
    if (real_connect == NULL) {
        real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    }
    if (SSL_in_before(s)) {
        SSL_set_session(s, NULL);
    }
    int result = real_connect(s);
    if (result != 1 && SSL_get_error(s, result) == SSL_ERROR_WANT_READ &&
        waiting_count < MAX_WAITING) {
        int fd = SSL_get_fd(s);
        if (fd >= 0) {
            waiting[waiting_count++] = fd;
        }
    }
    return result;
}

int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout) {
    static int (*real_wait)(int, struct epoll_event *, int, int) = NULL;
    if (real_wait == NULL) {
        real_wait = (int (*)(int, struct epoll_event *, int, int))dlsym(RTLD_NEXT, "epoll_wait");
    }
    for (int i = 0; i < waiting_count; i++) {
        /* wrk's event loop keys its events by fd (data.fd), as this does. */
        struct epoll_event readable = {.events = EPOLLIN, .data.fd = waiting[i]};
        epoll_ctl(epfd, EPOLL_CTL_MOD, waiting[i], &readable);
    }
    waiting_count = 0;
    return real_wait(epfd, events, maxevents, timeout);
}
