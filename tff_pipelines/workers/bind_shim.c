/* LD_PRELOAD shim for TFF's worker_binary: its listening socket is bound to one chosen address, never to all
 * interfaces.
 *
 * Why: worker_binary --port=P binds [::]:P (every interface, IPv4 too through the dual-stack socket), has no flag
 * for the address and no authentication, and runs any TensorFlow graph it is sent. tff_pipelines/workers/loopback.py
 * compiles this file with the system C compiler and starts the worker with LD_PRELOAD pointing at the result.
 *
 * What bind() does here, for AF_INET/AF_INET6 sockets (others pass through untouched):
 *   - a wildcard address (0.0.0.0 or ::) is replaced by the target address, keeping the port;
 *   - a loopback address, or the target itself, passes;
 *   - any other address fails with EADDRNOTAVAIL (fail closed, e.g. if gRPC ever expanded the wildcard into
 *     one bind per interface).
 * The target is $PRISM_TF_WORKER_BIND (a numeric IPv4 or IPv6 address) or, unset/empty, loopback. For an
 * AF_INET6 socket and an IPv4 target the IPv4-mapped form ::ffff:a.b.c.d is bound (the dual-stack socket then
 * accepts IPv4 connections to a.b.c.d only). Loopback on AF_INET6 is ::ffff:127.0.0.1 (IPv4 loopback through
 * the dual-stack socket), or ::1 where the socket is IPv6-only. An IPv6 target on an AF_INET socket fails with EADDRNOTAVAIL.
 * A target that does not parse makes every inet bind fail: never silently fall back to a wider address.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind(void) {
    static bind_fn fn = NULL;
    if (fn == NULL) fn = (bind_fn)dlsym(RTLD_NEXT, "bind");
    return fn;
}

/* Parsed target: kind 0 = loopback (default), 4 = IPv4 in v4, 6 = IPv6 in v6, -1 = unparsable. */
struct target {
    int kind;
    struct in_addr v4;
    struct in6_addr v6;
};

static struct target read_target(void) {
    struct target t;
    memset(&t, 0, sizeof t);
    const char *s = getenv("PRISM_TF_WORKER_BIND");
    if (s == NULL || *s == '\0') return t;
    if (inet_pton(AF_INET, s, &t.v4) == 1) {
        t.kind = 4;
    } else if (inet_pton(AF_INET6, s, &t.v6) == 1) {
        t.kind = 6;
    } else {
        t.kind = -1;
    }
    return t;
}

static int is_v4_loopback(struct in_addr a) { return (ntohl(a.s_addr) >> 24) == 127; }

static int is_v6_loopback(const struct in6_addr *a) {
    if (IN6_IS_ADDR_LOOPBACK(a)) return 1;
    if (IN6_IS_ADDR_V4MAPPED(a)) {
        struct in_addr v4;
        memcpy(&v4, &a->s6_addr[12], 4);
        return is_v4_loopback(v4);
    }
    return 0;
}

static void map_v4(struct in6_addr *out, struct in_addr v4) {
    memset(out, 0, sizeof *out);
    out->s6_addr[10] = 0xff;
    out->s6_addr[11] = 0xff;
    memcpy(&out->s6_addr[12], &v4, 4);
}

static int bind_v4(int fd, const struct sockaddr_in *in, socklen_t len, struct target t) {
    struct sockaddr_in a = *in;
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
        if (t.kind == 0) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        } else if (t.kind == 4) {
            a.sin_addr = t.v4;
        } else {
            errno = EADDRNOTAVAIL;
            return -1;
        }
    } else if (!is_v4_loopback(a.sin_addr) && !(t.kind == 4 && a.sin_addr.s_addr == t.v4.s_addr)) {
        errno = EADDRNOTAVAIL;
        return -1;
    }
    return real_bind()(fd, (const struct sockaddr *)&a, len < sizeof a ? len : sizeof a);
}

static int bind_v6(int fd, const struct sockaddr_in6 *in, socklen_t len, struct target t) {
    struct sockaddr_in6 a = *in;
    if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
        if (t.kind == 0) {
            /* 127.0.0.1 through the dual-stack socket: what users type (and what `localhost` resolves to
             * first on most hosts); ::1 where the socket is IPv6-only. */
            struct in_addr lo;
            lo.s_addr = htonl(INADDR_LOOPBACK);
            map_v4(&a.sin6_addr, lo);
            int rc = real_bind()(fd, (const struct sockaddr *)&a, sizeof a);
            if (rc == 0 || (errno != EINVAL && errno != EADDRNOTAVAIL && errno != EAFNOSUPPORT)) return rc;
            a.sin6_addr = in6addr_loopback;
        } else if (t.kind == 4) {
            map_v4(&a.sin6_addr, t.v4);
        } else if (t.kind == 6) {
            a.sin6_addr = t.v6;
        } else {
            errno = EADDRNOTAVAIL;
            return -1;
        }
    } else if (!is_v6_loopback(&a.sin6_addr)) {
        struct in6_addr mapped;
        if (t.kind == 4) map_v4(&mapped, t.v4);
        int is_target = (t.kind == 6 && memcmp(&a.sin6_addr, &t.v6, sizeof t.v6) == 0) ||
                        (t.kind == 4 && memcmp(&a.sin6_addr, &mapped, sizeof mapped) == 0);
        if (!is_target) {
            errno = EADDRNOTAVAIL;
            return -1;
        }
    }
    (void)len;
    return real_bind()(fd, (const struct sockaddr *)&a, sizeof a);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (real_bind() == NULL) {
        errno = ENOSYS;
        return -1;
    }
    if (addr == NULL) return real_bind()(fd, addr, len);
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in))
        return bind_v4(fd, (const struct sockaddr_in *)addr, len, read_target());
    if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6))
        return bind_v6(fd, (const struct sockaddr_in6 *)addr, len, read_target());
    if (addr->sa_family == AF_INET || addr->sa_family == AF_INET6) {
        errno = EINVAL; /* a truncated inet address: refuse rather than pass it through unchecked */
        return -1;
    }
    return real_bind()(fd, addr, len);
}
