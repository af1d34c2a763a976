/* Loaded into tritonserver with LD_PRELOAD by `avatarforge mme serve` (avatarforge.mme.loopback).
 *
 * Triton's SageMaker front end binds every interface and has no option for an address (checked:
 * tritonserver 2.51 --help), and it has no authentication: whoever reaches it can load any
 * folder of the machine as a model. Locally only our loader talks to it, over loopback, so a
 * listening socket asked for on "any address" (0.0.0.0 or ::) with a fixed port is bound to
 * loopback instead. Ephemeral binds (port 0, outgoing sockets) are left alone, and the variable
 * is removed at start so that the processes tritonserver starts (python stubs) do not load it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

__attribute__((constructor)) static void forget_preload(void) { unsetenv("LD_PRELOAD"); }

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
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
