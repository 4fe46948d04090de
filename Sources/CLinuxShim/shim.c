#define _GNU_SOURCE
#include <malloc.h>
#include "CLinuxShim.h"
#include <liburing.h>
#include <linux/futex.h>
#include <linux/falloc.h>
#include <sys/vfs.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <pwd.h>
#include <stdlib.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <linux/memfd.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <grp.h>

int shim_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
int shim_memfd_flag_cloexec(void) { return MFD_CLOEXEC; }
int shim_memfd_flag_allow_sealing(void) { return MFD_ALLOW_SEALING; }
int shim_memfd_flag_hugetlb(void) { return MFD_HUGETLB; }

long shim_hugepage_size(int fd) {
    struct statfs fs;
    if (fstatfs(fd, &fs) != 0) return -1;
    return fs.f_type == 0x958458f6 /* HUGETLBFS_MAGIC */ ? (long)fs.f_bsize : 0;
}
int shim_add_seals(int fd, unsigned int seals) { return fcntl(fd, F_ADD_SEALS, seals); }
int shim_get_seals(int fd) { return fcntl(fd, F_GET_SEALS); }
unsigned int shim_seal_shrink(void) { return F_SEAL_SHRINK; }
unsigned int shim_seal_grow(void) { return F_SEAL_GROW; }
unsigned int shim_seal_write(void) { return F_SEAL_WRITE; }
unsigned int shim_seal_seal(void) { return F_SEAL_SEAL; }

int shim_eventfd(unsigned int initval, int flags) { return eventfd(initval, flags); }
int shim_efd_cloexec(void) { return EFD_CLOEXEC; }
int shim_efd_nonblock(void) { return EFD_NONBLOCK; }
int shim_efd_semaphore(void) { return EFD_SEMAPHORE; }

int shim_get_fl(int fd) { return fcntl(fd, F_GETFL); }
int shim_set_fl(int fd, int flags) { return fcntl(fd, F_SETFL, flags); }
int shim_o_nonblock(void) { return O_NONBLOCK; }
int shim_get_cloexec(int fd) {
    int r = fcntl(fd, F_GETFD);
    return r < 0 ? r : ((r & FD_CLOEXEC) != 0);
}

#define SHIM_MAX_FDS 253 /* SCM_MAX_FD */

ssize_t shim_send_with_fds(int sock, const void *buf, size_t len,
                           const int *fds, size_t nfds, int flags) {
    if (nfds > SHIM_MAX_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union { char buf[CMSG_SPACE(sizeof(int) * SHIM_MAX_FDS)]; struct cmsghdr align; } ctl;
    if (nfds > 0) {
        memset(ctl.buf, 0, sizeof ctl.buf);
        msg.msg_control = ctl.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t r;
    do { r = sendmsg(sock, &msg, MSG_NOSIGNAL | flags); } while (r < 0 && errno == EINTR);
    return r;
}

ssize_t shim_recv_with_fds(int sock, void *buf, size_t len, int flags,
                           int *fds_out, size_t max_fds, size_t *nfds_out,
                           int *truncated_out) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    union { char buf[CMSG_SPACE(sizeof(int) * SHIM_MAX_FDS)]; struct cmsghdr align; } ctl;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof ctl.buf;
    *nfds_out = 0;
    *truncated_out = 0;
    ssize_t r;
    do { r = recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
    if (r < 0) return r;
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) *truncated_out = 1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int tmp[SHIM_MAX_FDS];
        if (n > SHIM_MAX_FDS) n = SHIM_MAX_FDS;
        memcpy(tmp, CMSG_DATA(c), n * sizeof(int));
        for (size_t i = 0; i < n; i++) {
            if (*nfds_out < max_fds) {
                fds_out[(*nfds_out)++] = tmp[i];
            } else {
                close(tmp[i]);          /* surplus: never leak */
                *truncated_out = 1;
            }
        }
    }
    return r;
}

int shim_peercred(int sock, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct ucred cred;
    socklen_t l = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &l) < 0) return -1;
    *pid = cred.pid; *uid = cred.uid; *gid = cred.gid;
    return 0;
}

int shim_socket_unix(int type) { return socket(AF_UNIX, type | SOCK_CLOEXEC, 0); }
int shim_socketpair_unix(int type, int sv[2]) { return socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv); }

static int fill_sun(struct sockaddr_un *a, const char *path) {
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof a->sun_path) { errno = ENAMETOOLONG; return -1; }
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    memcpy(a->sun_path, path, n + 1);
    return 0;
}
int shim_bind_unix(int sock, const char *path) {
    struct sockaddr_un a;
    if (fill_sun(&a, path) < 0) return -1;
    return bind(sock, (struct sockaddr *)&a, sizeof a);
}
int shim_connect_unix(int sock, const char *path) {
    struct sockaddr_un a;
    if (fill_sun(&a, path) < 0) return -1;
    int r;
    do { r = connect(sock, (struct sockaddr *)&a, sizeof a); } while (r < 0 && errno == EINTR);
    return r;
}
int shim_accept(int sock) {
    int r;
    do { r = accept4(sock, NULL, NULL, SOCK_CLOEXEC); } while (r < 0 && errno == EINTR);
    return r;
}
ssize_t shim_sendto_unix(int sock, const char *path, const void *buf, size_t len) {
    struct sockaddr_un a;
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof a.sun_path) { errno = ENAMETOOLONG; return -1; }
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    memcpy(a.sun_path, path, n);
    socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    if (path[0] == '@') a.sun_path[0] = 0; else alen += 1;
    ssize_t r;
    do { r = sendto(sock, buf, len, MSG_NOSIGNAL, (struct sockaddr *)&a, alen); } while (r < 0 && errno == EINTR);
    return r;
}
int shim_peergroups(int sock, uint32_t *groups, int max) {
#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif
    socklen_t l = (socklen_t)(max * sizeof(gid_t));
    if (getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS, groups, &l) < 0) return -1;
    return (int)(l / sizeof(gid_t));
}

long shim_user_id(const char *name) {
    struct passwd *p = getpwnam(name);
    return p ? (long)p->pw_uid : -1;
}

int shim_open_directory_nofollow(const char *path) {
    return open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
}
int shim_open_path_nofollow(const char *path) {
    return open(path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
}
int shim_open_directory_readonly_nofollow(const char *path) {
    return open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
}
int shim_stat_at_nofollow(int dirfd, const char *name, uint32_t *mode, uint32_t *uid,
                          uint64_t *dev, uint64_t *ino) {
    struct stat st;
    int flags = AT_SYMLINK_NOFOLLOW | (name[0] == 0 ? AT_EMPTY_PATH : 0);
    if (fstatat(dirfd, name, &st, flags) != 0) return -1;
    *mode = (uint32_t)st.st_mode;
    *uid = (uint32_t)st.st_uid;
    *dev = (uint64_t)st.st_dev;
    *ino = (uint64_t)st.st_ino;
    return 0;
}
uint32_t shim_s_ifsock(void) { return (uint32_t)S_IFSOCK; }
int shim_chown_at_nofollow(int dirfd, const char *name, long uid, long gid) {
    return fchownat(dirfd, name, uid < 0 ? (uid_t)-1 : (uid_t)uid, gid < 0 ? (gid_t)-1 : (gid_t)gid,
                    AT_SYMLINK_NOFOLLOW);
}
int shim_chmod_at_nofollow(int dirfd, const char *name, unsigned int mode) {
    return fchmodat(dirfd, name, (mode_t)mode, AT_SYMLINK_NOFOLLOW);
}
int shim_fchown_fchmod(int fd, long gid, unsigned int mode) {
    if (gid >= 0 && fchown(fd, (uid_t)-1, (gid_t)gid) != 0) return -1;
    return fchmod(fd, (mode_t)mode);
}

int shim_pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    return (int)syscall(434, pid, 0);
#endif
}

int shim_pidfd_send_signal(int pidfd, int sig) {
#ifdef SYS_pidfd_send_signal
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
#else
    return (int)syscall(424, pidfd, sig, NULL, 0);
#endif
}

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

int shim_peer_pidfd(int sock) {
    int pidfd = -1;
    socklen_t len = sizeof pidfd;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) < 0) return -1;
    return pidfd;
}

int shim_pidfd_pid(int pidfd) {
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
    FILE *f = fopen(path, "re");
    if (!f) return -2;
    int pid = -2;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "Pid: %d", &pid) == 1) break;
    }
    fclose(f);
    return pid;
}

int shim_open_readonly_via_proc(int fd) {
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    return open(path, O_RDONLY | O_CLOEXEC);
}

int shim_access_mode(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : (fl & O_ACCMODE);
}

long shim_group_id(const char *name) {
    struct group *g = getgrnam(name);
    return g ? (long)g->gr_gid : -1;
}

size_t shim_sun_path_max(void) { struct sockaddr_un a; return sizeof a.sun_path - 1; }
int shim_msg_peek(void) { return MSG_PEEK; }
int shim_msg_dontwait(void) { return MSG_DONTWAIT; }
int shim_sock_stream(void) { return SOCK_STREAM; }
int shim_sock_seqpacket(void) { return SOCK_SEQPACKET; }
int shim_sock_dgram(void) { return SOCK_DGRAM; }

void shim_store_release_u16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
uint16_t shim_load_acquire_u16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
void shim_full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void shim_store_release_u64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE); }
uint64_t shim_load_acquire_u64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE); }
void shim_store_release_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
uint32_t shim_load_acquire_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
uint32_t shim_fetch_add_u32(void *p, uint32_t v) { return __atomic_fetch_add((uint32_t *)p, v, __ATOMIC_SEQ_CST); }
/* Dirty log: the device's writes before the bit (release); QEMU clears bits with an atomic exchange. */
void shim_fetch_or_u8(void *p, uint8_t v) { __atomic_fetch_or((uint8_t *)p, v, __ATOMIC_RELEASE); }
void shim_fetch_or_u64(void *p, uint64_t v) { __atomic_fetch_or((uint64_t *)p, v, __ATOMIC_RELEASE); }
int shim_futex_wait(void *p, uint32_t expected, int64_t timeout_ns) {
    if (timeout_ns < 0) timeout_ns = 0;
    struct timespec ts = { .tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000 };
    long r = syscall(SYS_futex, (uint32_t *)p, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (r == 0) return 0;
    return errno == EAGAIN ? 0 : -errno;
}
int shim_futex_wake(void *p, int n) {
    long r = syscall(SYS_futex, (uint32_t *)p, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? -errno : (int)r;
}
int shim_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}
void shim_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

int shim_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
int shim_epoll_add(int ep, int fd, uint64_t data) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = data;
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}
int shim_epoll_wait(int ep, uint64_t *data_out, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n = epoll_wait(ep, evs, max, timeout_ms);
    for (int i = 0; i < n; i++) data_out[i] = evs[i].data.u64;
    return n;
}

int shim_set_thread_name(pthread_t thread, const char *name) { return pthread_setname_np(thread, name); }

void *shim_reserve(size_t len, size_t align) {
    // Over-reserve by `align` and trim, so the window starts on an `align`
    // boundary (1 GiB: a hugetlbfs region can then be mapped at BAR offsets
    // that are multiples of its page size).
    if (align == 0 || (align & (align - 1)) != 0 || len > SIZE_MAX - align) return MAP_FAILED;
    char *raw = mmap(NULL, len + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return MAP_FAILED;
    uintptr_t start = ((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1);
    size_t head = start - (uintptr_t)raw, tail = align - head;
    if (head) munmap(raw, head);
    if (tail) munmap((char *)start + len, tail);
    madvise((void *)start, len, MADV_DONTDUMP);
    return (void *)start;
}
void *shim_map_fixed_shared(void *addr, size_t len, int prot, int fd, off_t offset) {
    void *p = mmap(addr, len, prot, MAP_FIXED | MAP_SHARED, fd, offset);
    if (p == MAP_FAILED) return p;
    // Guest memory never goes into a core dump. A mapping that cannot be
    // kept out of one is not granted: put PROT_NONE back and fail.
    if (madvise(p, len, MADV_DONTDUMP) != 0) {
        int saved = errno;
        mmap(addr, len, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        madvise(addr, len, MADV_DONTDUMP);
        errno = saved;
        return MAP_FAILED;
    }
    return p;
}
void *shim_revoke(void *addr, size_t len) {
    void *p = mmap(addr, len, PROT_NONE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p != MAP_FAILED) madvise(p, len, MADV_DONTDUMP);
    return p;
}
int shim_prot_none(void) { return PROT_NONE; }
int shim_prot_read(void) { return PROT_READ; }
int shim_prot_write(void) { return PROT_WRITE; }
void *shim_map_failed(void) { return MAP_FAILED; }
long shim_page_size(void) { return sysconf(_SC_PAGESIZE); }
int shim_malloc_fixed_mmap_threshold(int bytes) { return mallopt(M_MMAP_THRESHOLD, bytes); }
int shim_malloc_arena_max(int arenas) { return mallopt(M_ARENA_MAX, arenas); }

int shim_fork_touch(volatile void *addr, int write) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        /* No core dumps from the deliberate fault. */
        signal(SIGSEGV, SIG_DFL);
        signal(SIGBUS, SIG_DFL);
        volatile unsigned char *p = (volatile unsigned char *)addr;
        if (write) *p = 0x5a; else (void)*p;
        _exit(0);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) return -1;
    }
    return status;
}
static int read_full(int s, void *buf, size_t n, int *fds, int *nfds) {
    size_t done = 0;
    while (done < n) {
        struct iovec iov = { (char *)buf + done, n - done };
        union { char buf[CMSG_SPACE(sizeof(int) * 4)]; struct cmsghdr align; } control;
        struct msghdr m;
        memset(&m, 0, sizeof m);
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        if (fds) { m.msg_control = control.buf; m.msg_controllen = sizeof control.buf; }
        ssize_t r = recvmsg(s, &m, 0);
        if (r == 0) return 0;
        if (r < 0) { if (errno == EINTR) continue; return -1; }
        if (fds) {
            for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
                if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < k && *nfds < 4; i++) memcpy(&fds[(*nfds)++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            }
        }
        done += (size_t)r;
    }
    return 1;
}

/// In a forked test child: drop to `uid`/`gid` (and `groups`), unblock
/// signals, arm the lifetime alarm, connect to `path` and write `hello`.
/// Returns the socket; exits the child (2 connect, 3 credentials, 4 write)
/// on failure. Async-signal-safe only.
static int child_connect(const char *path, long uid, long gid, const uint32_t *groups, int ngroups,
                         const void *hello, size_t hello_len, unsigned int lifetime_s) {
    if (gid >= 0) {
        gid_t g[64];
        int n = ngroups < 64 ? ngroups : 64;
        for (int i = 0; i < n; i++) g[i] = (gid_t)groups[i];
        if (setgroups((size_t)n, g) != 0 || setgid((gid_t)gid) != 0) _exit(3);
    }
    if (uid >= 0 && setuid((uid_t)uid) != 0) _exit(3);
    // The forking thread's mask is inherited: unblock, so the alarm below
    // ends the child whatever that thread blocked.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    alarm(lifetime_s);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a;
    if (s < 0 || fill_sun(&a, path) < 0) _exit(2);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) _exit(2);
    if (hello_len && write(s, hello, hello_len) != (ssize_t)hello_len) _exit(4);
    return s;
}

pid_t shim_fork_peer(const char *path, long uid, long gid, const uint32_t *groups, int ngroups,
                     const void *hello, size_t hello_len, unsigned int lifetime_s, int reads) {
    pid_t pid = fork();
    if (pid != 0) return pid; // parent (or -1)
    // Child: only async-signal-safe calls from here on.
    int s = child_connect(path, uid, gid, groups, ngroups, hello, hello_len, lifetime_s);
    if (!reads) for (;;) pause(); // a VMM that stopped reading its socket
    if (reads == 5) {
        // A VMM with the revocation channel: maps CHANNEL (type 12), and at
        // the first UNMAP record (kind 2) posted there hangs up and lives on.
        unsigned char *ring = NULL;
        uint32_t capacity = 0;
        uint64_t seen = 0;
        for (;;) {
            struct pollfd pfd = { .fd = s, .events = POLLIN };
            int ready = poll(&pfd, 1, 1);
            if (ready > 0) {
                unsigned char h[12], p[4096];
                int fds[4], nfds = 0;
                if (read_full(s, h, 12, fds, &nfds) != 1) _exit(0);
                uint32_t type, size;
                memcpy(&type, h, 4);
                memcpy(&size, h + 8, 4);
                if (size > sizeof p || (size && read_full(s, p, size, NULL, NULL) != 1)) _exit(0);
                if (type == 12 && size == 16 && nfds == 1 && ring == NULL) {
                    uint64_t bytes;
                    memcpy(&capacity, p, 4);
                    memcpy(&bytes, p + 8, 8);
                    void *m = mmap(NULL, (size_t)bytes, PROT_READ, MAP_SHARED, fds[0], 0);
                    if (m == MAP_FAILED) _exit(7);
                    ring = m;
                }
                for (int i = 0; i < nfds; i++) close(fds[i]);
            }
            if (ring == NULL || capacity == 0) continue;
            uint64_t posted = __atomic_load_n((uint64_t *)(ring + 64), __ATOMIC_ACQUIRE);
            for (; seen < posted; seen++) {
                uint32_t kind;
                memcpy(&kind, ring + 4096 + ((seen) % capacity) * 64 + 8, 4);
                if (kind == 2) { close(s); for (;;) pause(); }
            }
        }
    }
    if (reads >= 2) {
        // A VMM that reads peer-protocol frames and, at its first UNMAP (type
        // 3), leaves the protocol while its process lives on: 2 hangs up,
        // 3 acknowledges a sequence far beyond the UNMAP's (from the future);
        // 4 hangs up at a MAP (type 2) that takes away a permission an
        // earlier MAP of the same offset gave (a revoking MAP).
        unsigned char h[12], p[4096];
        int maps = 0;
        uint64_t map_offsets[256];
        uint32_t map_prots[256];
        for (;;) {
            if (read_full(s, h, 12, NULL, NULL) != 1) _exit(0);
            uint32_t type, size;
            memcpy(&type, h, 4);
            memcpy(&size, h + 8, 4);
            if (size > sizeof p || (size && read_full(s, p, size, NULL, NULL) != 1)) _exit(0);
            if (reads == 4 && type == 2 && size >= 36) {
                // MAP: u64 sequence, barOffset, length, fdOffset; u32 prot.
                uint64_t offset;
                uint32_t prot;
                memcpy(&offset, p + 8, 8);
                memcpy(&prot, p + 32, 4);
                int known = -1;
                for (int i = 0; i < maps; i++) if (map_offsets[i] == offset) known = i;
                if (known >= 0 && (map_prots[known] & ~prot) != 0) { close(s); for (;;) pause(); }
                if (known < 0 && maps < 256) { map_offsets[maps] = offset; map_prots[maps] = prot; maps++; }
                else if (known >= 0) map_prots[known] = prot;
            }
            if (type != 3 || size < 8) continue;
            if (reads == 2) { close(s); for (;;) pause(); }
            uint64_t seq;
            memcpy(&seq, p, 8);
            seq += 1000;
            unsigned char ack[20] = {4, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0}; // ACK, version 1, 8 bytes
            memcpy(ack + 12, &seq, 8);
            if (write(s, ack, sizeof ack) != (ssize_t)sizeof ack) _exit(6);
            for (;;) if (read(s, p, sizeof p) <= 0) for (;;) pause(); // lives on after the daemon drops it
        }
    }
    char buf[4096];
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n == 0) _exit(0);   // the daemon closed the connection
        if (n < 0) _exit(5);
    }
}

pid_t shim_fork_read_only_prober(const char *path, long uid, long gid, const void *hello, size_t hello_len,
                                 unsigned char marker, unsigned int lifetime_s) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    int s = child_connect(path, uid, gid, NULL, 0, hello, hello_len, lifetime_s);
    for (;;) {
        uint32_t header[3];
        int fds[4], nfds = 0;
        int r = read_full(s, header, sizeof header, fds, &nfds);
        if (r == 0) _exit(0);
        if (r < 0 || header[2] > 4096) _exit(5);
        unsigned char payload[4096];
        if (header[2] && read_full(s, payload, header[2], NULL, NULL) != 1) _exit(5);
        uint32_t prot = 0;
        uint64_t fd_offset = 0;
        if (header[0] == 2 && header[2] == 40 && nfds == 1) {
            memcpy(&fd_offset, payload + 24, 8);
            memcpy(&prot, payload + 32, 4);
        }
        if (!(header[0] == 2 && prot == 1 && nfds == 1)) {
            for (int i = 0; i < nfds; i++) close(fds[i]);
            continue;
        }
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fds[0]);
        int code = 20;
        int rw = open(link, O_RDWR);
        if (rw < 0) {
            code = 21;
            if (fchmod(fds[0], 0666) != 0 || (rw = open(link, O_RDWR)) < 0) _exit(22);
        }
        if (pwrite(rw, &marker, 1, (off_t)fd_offset) != 1) _exit(23);
        _exit(code);
    }
}

int shim_wait(pid_t pid) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) { if (errno != EINTR) return -1; }
    return status;
}

int shim_wait_nohang(pid_t pid) {
    int status = 0;
    pid_t r;
    while ((r = waitpid(pid, &status, WNOHANG)) < 0) { if (errno != EINTR) return -1; }
    return r == 0 ? -2 : status;
}

int shim_wifsignaled(int status) { return WIFSIGNALED(status); }
int shim_wtermsig(int status) { return WTERMSIG(status); }
int shim_wifexited(int status) { return WIFEXITED(status); }
int shim_wexitstatus(int status) { return WEXITSTATUS(status); }

struct shim_uring {
    struct io_uring ring;
    /* The kernel reads a link timeout's timespec when the SQE is submitted,
       not when it is prepared: it lives here, one per ring. */
    struct __kernel_timespec link_timeout;
};

shim_uring *shim_uring_create(unsigned int entries, int sqpoll, unsigned int sq_idle_ms, int sq_cpu, int *err) {
    shim_uring *r = calloc(1, sizeof *r);
    if (!r) { *err = -ENOMEM; return NULL; }
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    if (sqpoll == 1) {
        p.flags |= IORING_SETUP_SQPOLL;
        p.sq_thread_idle = sq_idle_ms;
        if (sq_cpu >= 0) { p.flags |= IORING_SETUP_SQ_AFF; p.sq_thread_cpu = (unsigned)sq_cpu; }
    }
    if (sqpoll == 2) {
        /* One submitter thread; task work runs when it waits (kernel >= 6.1):
           COOP_TASKRUN (1<<8) | SINGLE_ISSUER (1<<12) | DEFER_TASKRUN (1<<13). */
        p.flags |= (1U << 8) | (1U << 12) | (1U << 13);
    }
    int e = io_uring_queue_init_params(entries, &r->ring, &p);
    if (e == -EINVAL && sqpoll == 2) {
        memset(&p, 0, sizeof p);
        e = io_uring_queue_init_params(entries, &r->ring, &p);   /* older kernel: plain ring */
    }
    if (e < 0) { free(r); *err = e; return NULL; }
    *err = 0;
    return r;
}
void shim_uring_destroy(shim_uring *r) { if (r) { io_uring_queue_exit(&r->ring); free(r); } }
int shim_uring_fd(shim_uring *r) { return r->ring.ring_fd; }
unsigned int shim_uring_sq_space_left(shim_uring *r) { return io_uring_sq_space_left(&r->ring); }

int shim_uring_prep_read(shim_uring *r, int fd, void *buf, unsigned int len, uint64_t ud, int link) {
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) return -EBUSY;
    io_uring_prep_read(s, fd, buf, len, 0);
    io_uring_sqe_set_data64(s, ud);
    if (link) io_uring_sqe_set_flags(s, IOSQE_IO_LINK);
    return 0;
}
int shim_uring_prep_write(shim_uring *r, int fd, const void *buf, unsigned int len, uint64_t ud, int link, int nowait) {
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) return -EBUSY;
    io_uring_prep_write(s, fd, buf, len, 0);
    if (nowait) s->rw_flags = RWF_NOWAIT;
    io_uring_sqe_set_data64(s, ud);
    if (link) io_uring_sqe_set_flags(s, IOSQE_IO_LINK);
    return 0;
}
int shim_uring_prep_link_timeout(shim_uring *r, unsigned int ms, uint64_t ud) {
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) return -EBUSY;
    r->link_timeout.tv_sec = ms / 1000;
    r->link_timeout.tv_nsec = (long long)(ms % 1000) * 1000000;
    io_uring_prep_link_timeout(s, &r->link_timeout, 0);
    io_uring_sqe_set_data64(s, ud);
    return 0;
}
int shim_uring_prep_poll_in(shim_uring *r, int fd, uint64_t ud) {
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) return -EBUSY;
    io_uring_prep_poll_add(s, fd, POLLIN);
    io_uring_sqe_set_data64(s, ud);
    return 0;
}
int shim_uring_prep_cancel(shim_uring *r, uint64_t target, uint64_t ud) {
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) return -EBUSY;
    io_uring_prep_cancel64(s, target, 0);
    io_uring_sqe_set_data64(s, ud);
    return 0;
}
int shim_uring_prep_nop(shim_uring *r, uint64_t ud) {
    struct io_uring_sqe *s = io_uring_get_sqe(&r->ring);
    if (!s) return -EBUSY;
    io_uring_prep_nop(s);
    io_uring_sqe_set_data64(s, ud);
    return 0;
}
int shim_uring_submit(shim_uring *r) { return io_uring_submit(&r->ring); }
int shim_uring_sqring_wait(shim_uring *r) { return io_uring_sqring_wait(&r->ring); }
int shim_uring_get_events(shim_uring *r) { return io_uring_get_events(&r->ring); }
int shim_uring_submit_and_wait(shim_uring *r, unsigned int n) { return io_uring_submit_and_wait(&r->ring, n); }

unsigned int shim_uring_reap(shim_uring *r, uint64_t *user_data,
                             int32_t *res, uint32_t *flags, unsigned int max) {
    unsigned int head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(&r->ring, head, cqe) {
        if (n == max) break;
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        flags[n] = cqe->flags;
        n++;
    }
    io_uring_cq_advance(&r->ring, n);
    return n;
}

// prlimit(2) needs _GNU_SOURCE, so it does not import: RLIMIT_NOFILE of
// another process, soft and hard read and written as plain integers.
#include <sys/resource.h>
int shim_prlimit_nofile(int pid, unsigned long long *soft, unsigned long long *hard, int set) {
    struct rlimit old, new_;
    if (prlimit(pid, RLIMIT_NOFILE, NULL, &old) != 0) return -1;
    if (set) {
        new_.rlim_cur = *soft;
        new_.rlim_max = old.rlim_max;
        if (prlimit(pid, RLIMIT_NOFILE, &new_, NULL) != 0) return -1;
    }
    *soft = old.rlim_cur;
    *hard = old.rlim_max;
    return 0;
}

// A read that never blocks, whatever the fd's O_NONBLOCK (an eventfd VM1
// passed is shared with VM1, so its flags are not ours to change):
// preadv2(RWF_NOWAIT) at the current position; EAGAIN when nothing is there.
#include <sys/uio.h>
ssize_t shim_read_nowait(int fd, void *buf, size_t len) {
    struct iovec io = { buf, len };
    return preadv2(fd, &io, 1, -1, RWF_NOWAIT);
}
int shim_epoll_del(int ep, int fd) { return epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL); }

// Fault injection for tests: a seccomp filter making io_uring_setup fail with
// EPERM in this process and what it executes, as a container's policy does.
#include <linux/seccomp.h>
#include <linux/filter.h>
#include <linux/audit.h>
#include <sys/prctl.h>
#include <stddef.h>
int shim_deny_io_uring_setup(void) {
#if defined(__x86_64__)
    const unsigned arch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
    const unsigned arch = AUDIT_ARCH_AARCH64;
#else
    errno = ENOTSUP;
    return -1;
#endif
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, arch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { (unsigned short)(sizeof filter / sizeof filter[0]), filter };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -1;
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
}

// Pins the calling thread to `cpus` (sched_setaffinity). 0 or -1 (errno).
#include <sched.h>
int shim_pin_thread(const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++) {
        if (cpus[i] < 0 || cpus[i] >= CPU_SETSIZE) { errno = EINVAL; return -1; }
        CPU_SET(cpus[i], &set);
    }
    return sched_setaffinity(0, sizeof set, &set);
}

#include <stdatomic.h>

static _Atomic uintptr_t guard_low[SHIM_GUARD_SLOTS];
static _Atomic uintptr_t guard_high[SHIM_GUARD_SLOTS];
static _Atomic int guard_used[SHIM_GUARD_SLOTS];
static _Atomic uint64_t guard_trip_count[SHIM_GUARD_SLOTS];
static _Atomic uintptr_t guard_last[SHIM_GUARD_SLOTS];
static struct sigaction guard_previous;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static int guard_install_errno;

static void guard_handler(int sig, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    for (int i = 0; i < SHIM_GUARD_SLOTS; i++) {
        uintptr_t low = atomic_load(&guard_low[i]), high = atomic_load(&guard_high[i]);
        if (!(low < high && address >= low && address < high)) continue;
        int saved = errno;
        static const uintptr_t sizes[] = { 4096, (uintptr_t)2 << 20, (uintptr_t)1 << 30 };
        for (int k = 0; k < 3; k++) {
            uintptr_t page = address & ~(sizes[k] - 1);
            if (page < low || page + sizes[k] > high) continue;
            void *p = mmap((void *)page, sizes[k], PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) continue;
            atomic_store(&guard_last[i], address);
            atomic_fetch_add(&guard_trip_count[i], 1);
            errno = saved;
            return;
        }
        errno = saved;
        break; // could not replace it: the fault is fatal after all
    }
    if ((guard_previous.sa_flags & SA_SIGINFO) && guard_previous.sa_sigaction) {
        guard_previous.sa_sigaction(sig, info, context);
        return;
    }
    if (!(guard_previous.sa_flags & SA_SIGINFO) && guard_previous.sa_handler != SIG_DFL && guard_previous.sa_handler != SIG_IGN) {
        guard_previous.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL); // the access is retried and kills the process, as without a guard
}

static void guard_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &guard_previous) != 0) guard_install_errno = errno ? errno : EINVAL;
}

int shim_guard_add(void *start, size_t length) {
    pthread_once(&guard_once, guard_install);
    if (guard_install_errno) { errno = guard_install_errno; return -1; }
    for (int i = 0; i < SHIM_GUARD_SLOTS; i++) {
        int expected = 0;
        if (!atomic_compare_exchange_strong(&guard_used[i], &expected, 1)) continue;
        atomic_store(&guard_trip_count[i], 0);
        atomic_store(&guard_last[i], 0);
        atomic_store(&guard_low[i], (uintptr_t)start);
        atomic_store(&guard_high[i], (uintptr_t)start + length);
        return i;
    }
    errno = ENOSPC;
    return -1;
}

void shim_guard_remove(int slot) {
    if (slot < 0 || slot >= SHIM_GUARD_SLOTS) return;
    atomic_store(&guard_high[slot], 0);
    atomic_store(&guard_low[slot], 0);
    atomic_store(&guard_used[slot], 0);
}

uint64_t shim_guard_trips(int slot) {
    return slot < 0 || slot >= SHIM_GUARD_SLOTS ? 0 : atomic_load(&guard_trip_count[slot]);
}

uintptr_t shim_guard_last_address(int slot) {
    return slot < 0 || slot >= SHIM_GUARD_SLOTS ? 0 : atomic_load(&guard_last[slot]);
}
