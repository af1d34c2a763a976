/* Loaded into tritonserver with LD_PRELOAD by our launcher (avatarforge.tritonserver.loopback).
 *
 * 1. Loopback. Triton's SageMaker front end binds every interface and has no option for an
 *    address (checked: tritonserver 2.51 --help), and it has no authentication: whoever reaches
 *    it can load any folder of the machine as a model. Locally only our loader talks to it,
 *    over loopback, so a listening socket asked for on "any address" (0.0.0.0 or ::) with a
 *    fixed port is bound to loopback instead. Ephemeral binds (port 0, outgoing sockets) are
 *    left alone.
 * 2. The control key. --http-restricted-api and --grpc-restricted-protocol take the key's value
 *    on the command line, which every local user can read (/proc/PID/cmdline). The launcher
 *    passes a placeholder there and the value in AVATARFORGE_TRITON_CONTROL_KEY (the
 *    environment is readable by our own user only); before main() parses its arguments the
 *    placeholder is replaced by the value (glibc hands constructors argc, argv and envp).
 *
 * Both variables are removed at start, so that the processes tritonserver starts (python
 * stubs) neither load this library nor see the key.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define KEY_ENV "AVATARFORGE_TRITON_CONTROL_KEY"
#define PLACEHOLDER "@" KEY_ENV "@"

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

__attribute__((constructor)) static void start(int argc, char **argv, char **envp) {
    (void)envp;
    const char *key = getenv(KEY_ENV);
    for (int i = 1; key && argv && i < argc; i++) {
        char *at = strstr(argv[i], PLACEHOLDER);
        if (!at) continue;
        size_t head = (size_t)(at - argv[i]), len = strlen(key);
        const char *tail = at + strlen(PLACEHOLDER);
        char *arg = malloc(head + len + strlen(tail) + 1);
        if (!arg) abort(); /* never run with the placeholder as the key */
        memcpy(arg, argv[i], head);
        memcpy(arg + head, key, len);
        strcpy(arg + head + len, tail);
        argv[i] = arg;
    }
    unsetenv(KEY_ENV);
    unsetenv("LD_PRELOAD");
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in;
        memcpy(&in, addr, sizeof in);
        if (in.sin_addr.s_addr == htonl(INADDR_ANY) && in.sin_port != 0) {
            in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in, sizeof in);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0 && in6.sin6_port != 0) {
            /* A dual-stack socket (gRPC's) served IPv4 too: keep IPv4's loopback, the address
             * our URLs name (::ffff:127.0.0.1); an IPv6-only one gets ::1. */
            int v6only = 1;
            socklen_t size = sizeof v6only;
            if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &size) == 0 && !v6only) {
                memset(&in6.sin6_addr, 0, sizeof in6.sin6_addr);
                in6.sin6_addr.s6_addr[10] = in6.sin6_addr.s6_addr[11] = 0xff;
                in6.sin6_addr.s6_addr[12] = 127;
                in6.sin6_addr.s6_addr[15] = 1;
            } else {
                in6.sin6_addr = in6addr_loopback;
            }
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
