/* Diagnostic (bench/file-transfer/diag, not shipped): logs libssh2_sftp_read/_write failures inside guacd with libssh2's own
 * error (session last error, SFTP status), and sets TCP_NODELAY on guacd's TCP sockets when
 * SPY_NODELAY=1. Built on bookworm, loaded into bullseye's guacd: dlsym pinned to the old version. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
typedef struct S S; typedef struct F F; typedef struct H H;
#define MAXH 256
static H* hs[MAXH]; static F* hf[MAXH];
static F* fsv[MAXH]; static S* fss[MAXH];
static unsigned long long total[MAXH], wtotal[MAXH];
static void* lib(void) { static void* h; if (!h) h = dlopen("libssh2.so.1", RTLD_NOW | RTLD_NOLOAD); if (!h) h = dlopen("libssh2.so.1", RTLD_NOW); return h; }
static void say(const char* m) { syscall(SYS_write, 2, m, strlen(m)); }
/* A failed call: libssh2's own last error for the handle's session, and the SFTP status. */
static void report(const char* what, H* h, int i, size_t n, ssize_t r, unsigned long long done) {
    static int (*last)(S*, char**, int*, int); if (!last) last = dlsym(lib(), "libssh2_session_last_error");
    static unsigned long (*flast)(F*); if (!flast) flast = dlsym(lib(), "libssh2_sftp_last_error");
    F* f = i < MAXH ? hf[i] : 0; S* s = 0;
    for (int j = 0; f && j < MAXH; j++) if (fsv[j] == f) s = fss[j];
    char* msg = "(no session)"; int code = 0, ml = 0;
    if (s) code = last(s, &msg, &ml, 0);
    char line[600];
    snprintf(line, sizeof line, "readspy: libssh2_sftp_%s(%zu) -> %zd after %llu B; session last error %d: %s; sftp status %lu\n",
             what, n, r, done, code, msg, f ? flast(f) : 0UL);
    say(line);
    (void) h;
}
F* libssh2_sftp_init(S* s) {
    static F* (*real)(S*); if (!real) real = dlsym(lib(), "libssh2_sftp_init");
    F* f = real(s);
    for (int i = 0; i < MAXH; i++) if (!fsv[i]) { fsv[i] = f; fss[i] = s; break; }
    return f;
}
H* libssh2_sftp_open_ex(F* f, const char* p, unsigned int l, unsigned long fl, long mode, int t) {
    static H* (*real)(F*, const char*, unsigned int, unsigned long, long, int);
    if (!real) real = dlsym(lib(), "libssh2_sftp_open_ex");
    H* h = real(f, p, l, fl, mode, t);
    for (int i = 0; i < MAXH; i++) if (!hs[i] || hs[i] == h) { hs[i] = h; hf[i] = f; total[i] = 0; break; }
    return h;
}
ssize_t libssh2_sftp_read(H* h, char* b, size_t n) {
    static ssize_t (*real)(H*, char*, size_t); if (!real) real = dlsym(lib(), "libssh2_sftp_read");
    ssize_t r = real(h, b, n);
    int i; for (i = 0; i < MAXH && hs[i] != h; i++);
    if (i < MAXH && r > 0) total[i] += r;
    if (r < 0) report("read", h, i, n, r, i < MAXH ? total[i] : 0ULL);
    return r;
}
static int nodelay_on(void) { const char* v = getenv("SPY_NODELAY"); return v && v[0] == '1'; }
static void nodelay(int fd) { int one = 1; syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }
int connect(int fd, const struct sockaddr* a, socklen_t l) {
    long r = syscall(SYS_connect, fd, a, l);
    if (r == 0 && nodelay_on() && a && (a->sa_family == AF_INET || a->sa_family == AF_INET6)) nodelay(fd);
    return (int) r;
}
ssize_t libssh2_sftp_write(H* h, const char* b, size_t n) {
    static ssize_t (*real)(H*, const char*, size_t); if (!real) real = dlsym(lib(), "libssh2_sftp_write");
    ssize_t r = real(h, b, n);
    int i; for (i = 0; i < MAXH && hs[i] != h; i++);
    if (i < MAXH && r > 0) wtotal[i] += r;
    if (r != (ssize_t) n) report("write", h, i, n, r, i < MAXH ? wtotal[i] : 0ULL);
    return r;
}
