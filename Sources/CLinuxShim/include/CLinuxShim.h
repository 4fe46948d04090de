// CLinuxShim: the only C in the project. It exists because Swift cannot import
// function-like macros, variadic syscall(), or some glibc/liburing inlines.
// Every function here is a thin, allocation-free wrapper; policy lives in Swift.
#ifndef CLINUXSHIM_H
#define CLINUXSHIM_H

// liburing.h is deliberately NOT included here: its private copy of
// <linux/io_uring.h> clashes with the kernel header that swift-system's CSystem
// module imports. Swift sees only the opaque `shim_uring` below; liburing is
// included by shim.c alone.
#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <signal.h>
#include <pthread.h>
#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- memfd / eventfd / fcntl (variadic or macro-only in glibc) ----
int shim_memfd_create(const char *name, unsigned int flags);
int shim_memfd_flag_cloexec(void);
int shim_memfd_flag_allow_sealing(void);
int shim_memfd_flag_hugetlb(void);
/// fstatfs: the huge page size when `fd` is on hugetlbfs (MFD_HUGETLB memfds
/// too), 0 for anything else, -1 on error.
long shim_hugepage_size(int fd);
int shim_add_seals(int fd, unsigned int seals);
int shim_get_seals(int fd);
unsigned int shim_seal_shrink(void);
unsigned int shim_seal_grow(void);
unsigned int shim_seal_write(void);
unsigned int shim_seal_seal(void);

int shim_eventfd(unsigned int initval, int flags);
int shim_efd_cloexec(void);
int shim_efd_nonblock(void);
int shim_efd_semaphore(void);

int shim_get_fl(int fd);
int shim_set_fl(int fd, int flags);
int shim_o_nonblock(void);
int shim_get_cloexec(int fd);

// ---- sockets: SCM_RIGHTS and SO_PEERCRED ----
/// sendmsg with `nfds` fds attached as one SCM_RIGHTS control message.
/// Returns bytes sent or -1 (errno set). MSG_NOSIGNAL is always set.
ssize_t shim_send_with_fds(int sock, const void *buf, size_t len,
                           const int *fds, size_t nfds, int flags);
/// recvmsg that collects up to `max_fds` fds (received fds are CLOEXEC).
/// `*nfds_out` receives the number of fds written to `fds_out`. Fds beyond
/// `max_fds` that the kernel delivered are closed here, and `*truncated_out`
/// is set to 1 when control data (fds) or payload was cut.
ssize_t shim_recv_with_fds(int sock, void *buf, size_t len, int flags,
                           int *fds_out, size_t max_fds, size_t *nfds_out,
                           int *truncated_out);
int shim_peercred(int sock, pid_t *pid, uid_t *uid, gid_t *gid);
int shim_socket_unix(int type);            // CLOEXEC always
int shim_socketpair_unix(int type, int sv[2]);
int shim_bind_unix(int sock, const char *path);
int shim_connect_unix(int sock, const char *path);
int shim_accept(int sock);                  // accept4 CLOEXEC
size_t shim_sun_path_max(void);
/// sendto a Unix datagram socket by path; a leading '@' names an abstract socket.
ssize_t shim_sendto_unix(int sock, const char *path, const void *buf, size_t len);
/// Group id of a name, or -1.
long shim_group_id(const char *name);
/// User id of a name, or -1.
long shim_user_id(const char *name);
/// open(path, O_PATH|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC): a directory to work
/// in by fd (fails with ENOTDIR when `path` is a symlink).
int shim_open_directory_nofollow(const char *path);
/// open(path, O_PATH|O_NOFOLLOW|O_CLOEXEC): holds a file (a socket file
/// too) without opening it for I/O; a symlink is held as itself.
int shim_open_path_nofollow(const char *path);
/// open(path, O_RDONLY|O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC): a directory whose
/// own owner and mode are then set with fchown/fchmod.
int shim_open_directory_readonly_nofollow(const char *path);
/// fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW), or of `dirfd` itself when
/// `name` is "" (AT_EMPTY_PATH): st_mode (type and permission bits), owner,
/// device and inode.
int shim_stat_at_nofollow(int dirfd, const char *name, uint32_t *mode, uint32_t *uid,
                          uint64_t *dev, uint64_t *ino);
/// The S_IFMT type bits of a socket (S_IFSOCK).
uint32_t shim_s_ifsock(void);
/// fchownat(dirfd, name, uid, gid, AT_SYMLINK_NOFOLLOW); -1 leaves that id unchanged.
int shim_chown_at_nofollow(int dirfd, const char *name, long uid, long gid);
/// fchmodat(dirfd, name, mode, AT_SYMLINK_NOFOLLOW) (glibc: EOPNOTSUPP on a symlink).
int shim_chmod_at_nofollow(int dirfd, const char *name, unsigned int mode);
/// fchown(fd, -1, gid) when gid >= 0, then fchmod(fd, mode).
int shim_fchown_fchmod(int fd, long gid, unsigned int mode);
/// SO_PEERGROUPS: the peer's supplementary groups (up to `max`); returns
/// the count or -1 (ERANGE when `max` is too small).
int shim_peergroups(int sock, uint32_t *groups, int max);
/// pidfd_open(pid, 0) and pidfd_send_signal(pidfd, sig, NULL, 0).
int shim_pidfd_open(pid_t pid);
int shim_pidfd_send_signal(int pidfd, int sig);
/// SO_PEERPIDFD (Linux 6.5+): a pidfd of the process that called connect(),
/// taken by the kernel at connect time (never a recycled pid); -1 with
/// errno ENOPROTOOPT on older kernels. Close-on-exec.
int shim_peer_pidfd(int sock);
/// The pid a pidfd names (the "Pid:" line of /proc/self/fdinfo/N): -1 once
/// the process was reaped, -2 when it cannot be read.
int shim_pidfd_pid(int pidfd);
/// A new read-only open file description of the file behind `fd`
/// (open("/proc/self/fd/N", O_RDONLY)): a MAP_SHARED PROT_WRITE mapping of
/// it fails, whoever holds it.
int shim_open_readonly_via_proc(int fd);
/// fcntl(F_GETFL) & O_ACCMODE, or -1.
int shim_access_mode(int fd);
int shim_msg_peek(void);
int shim_msg_dontwait(void);
int shim_sock_stream(void);
int shim_sock_seqpacket(void);
int shim_sock_dgram(void);

// ---- ordered loads/stores on shared guest memory (ring indices) ----
void shim_store_release_u16(void *p, uint16_t v);
uint16_t shim_load_acquire_u16(const void *p);
void shim_full_fence(void);
/* The revocation channel's words (shared with another process). */
void shim_store_release_u64(void *p, uint64_t v);
uint64_t shim_load_acquire_u64(const void *p);
void shim_store_release_u32(void *p, uint32_t v);
uint32_t shim_load_acquire_u32(const void *p);
uint32_t shim_fetch_add_u32(void *p, uint32_t v);
void shim_fetch_or_u8(void *p, uint8_t v);
void shim_fetch_or_u64(void *p, uint64_t v);
/* FUTEX_WAIT (shared) on *p while it holds `expected`, at most timeout_ns:
   0 when woken (or the value differed), -errno otherwise (-ETIMEDOUT). */
int shim_futex_wait(void *p, uint32_t expected, int64_t timeout_ns);
/* FUTEX_WAKE (shared): wakes up to n waiters; -errno on failure. */
int shim_futex_wake(void *p, int n);
/* fallocate(PUNCH_HOLE|KEEP_SIZE): 0 or -1 with errno. */
int shim_punch_hole(int fd, uint64_t offset, uint64_t length);
/* A CPU relax hint for a spin loop. */
void shim_cpu_relax(void);

// ---- epoll (struct epoll_event is packed on x86-64: kept on the C side) ----
int shim_epoll_create(void);                                 // CLOEXEC
int shim_epoll_add(int ep, int fd, uint64_t data);           // EPOLLIN
int shim_epoll_wait(int ep, uint64_t *data_out, int max, int timeout_ms);

// ---- threads (glibc declares this only under _GNU_SOURCE) ----
int shim_set_thread_name(pthread_t thread, const char *name);

// ---- mmap ----
/// Reserves `len` bytes PROT_NONE | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
/// starting on an `align` boundary (a power of two), MADV_DONTDUMP.
void *shim_reserve(size_t len, size_t align);
/// Maps fd at offset over [addr, addr+len) with MAP_FIXED | MAP_SHARED, then
/// MADV_DONTDUMP (when that fails the range is PROT_NONE again and MAP_FAILED
/// is returned).
void *shim_map_fixed_shared(void *addr, size_t len, int prot, int fd, off_t offset);
/// Replaces [addr, addr+len) with a fresh PROT_NONE anonymous NORESERVE
/// mapping (MADV_DONTDUMP).
void *shim_revoke(void *addr, size_t len);
/// RLIMIT_NOFILE of process `pid` (prlimit): reads soft/hard; with `set`, first sets the soft limit to *soft. 0 or -1 (errno).
/// read(2) that never blocks (preadv2 RWF_NOWAIT): -1/EAGAIN when nothing is ready.
ssize_t shim_read_nowait(int fd, void *buf, size_t len);
int shim_epoll_del(int ep, int fd);
/// Installs a seccomp filter: io_uring_setup fails with EPERM from now on (tests). 0 or -1.
int shim_deny_io_uring_setup(void);
/// Pins the calling thread to the CPUs listed (sched_setaffinity). 0 or -1 (errno).
int shim_pin_thread(const int *cpus, int count);
int shim_prlimit_nofile(int pid, unsigned long long *soft, unsigned long long *hard, int set);
int shim_prot_none(void);
int shim_prot_read(void);
int shim_prot_write(void);
void *shim_map_failed(void);
long shim_page_size(void);
/// glibc malloc: a fixed mmap threshold of `bytes` (mallopt M_MMAP_THRESHOLD),
/// which also turns off glibc's raising of it after each large free. Returns
/// 1 on success. (Wrapped here: <malloc.h> is not part of the Glibc module.)
int shim_malloc_fixed_mmap_threshold(int bytes);
/// glibc malloc: at most `arenas` arenas, the main one included (mallopt
/// M_ARENA_MAX). Returns 1 on success.
int shim_malloc_arena_max(int arenas);

/// Forks; the child touches one byte at `addr` (read, or write when `write`
/// is non-zero) and `_exit(0)`s. Returns the raw wait status of the child,
/// or -1. Done in C so the child never runs Swift runtime code after fork.
int shim_fork_touch(volatile void *addr, int write);
/// Forks a child that (when `uid`/`gid` >= 0) drops to those ids and
/// `groups`, connects to the Unix socket `path`, writes `hello`, and reads
/// until the other end closes (exit 0) — or, when `reads` is 0, never reads
/// again; 2, 3 and 4 read peer-protocol frames and leave the protocol at an
/// UNMAP (hang up; ACK from the future) or at a MAP that takes a permission
/// away (hang up), living on (`ChildPeer.Reading`); connect failure exits 2, and the child dies of SIGALRM after
/// `lifetime_s`. A test peer with other credentials, run without Swift code
/// after fork. Returns the pid or -1.
pid_t shim_fork_peer(const char *path, long uid, long gid, const uint32_t *groups, int ngroups,
                     const void *hello, size_t hello_len, unsigned int lifetime_s, int reads);
/// Forks a VM2 VMM that ignores the protocol's read-only promise: like
/// `shim_fork_peer` (ids dropped, connects, writes `hello`), then reads peer
/// messages; on the first MAP whose prot is read-only (1) it tries to reopen
/// the fd read-write through /proc/self/fd, and, refused, makes itself the
/// file's mode 0666 with fchmod through the read-only fd and tries again
/// (what the file's owner can do). When a reopen works it writes `marker`
/// at the MAP's fd offset. Exit codes: 20 reopened at once (and wrote), 21
/// reopened after the fchmod (and wrote), 22 refused both ways, 23 reopened
/// but the write failed, 0 the daemon closed before a read-only MAP came,
/// 2 connect failed, 3 could not drop privileges, 5 read error.
pid_t shim_fork_read_only_prober(const char *path, long uid, long gid, const void *hello, size_t hello_len,
                                 unsigned char marker, unsigned int lifetime_s);
/// waitpid, retried on EINTR: the raw status, or -1.
int shim_wait(pid_t pid);
/// waitpid(pid, WNOHANG): the status once the child ended (it is reaped),
/// -2 while it runs, -1 on error.
int shim_wait_nohang(pid_t pid);
int shim_wifsignaled(int status);
int shim_wtermsig(int status);
int shim_wifexited(int status);
int shim_wexitstatus(int status);

/// Fault guards: a SIGBUS inside a guarded range (a shared file mapping
/// whose file another process truncated) does not kill the process. The
/// handler (installed on the first guard, process-wide, chaining to the
/// previous one for every other fault) maps private anonymous memory over
/// the faulting page (4 KiB, else the 2 MiB or 1 GiB page holding it, for
/// hugetlbfs), counts the trip and records the address, and returns: the
/// access is retried and reads zeros. At most SHIM_GUARD_SLOTS ranges.
#define SHIM_GUARD_SLOTS 64
/// Guards `[start, start+length)`; returns the slot, or -1 (none free, or
/// the handler could not be installed: errno).
int shim_guard_add(void *start, size_t length);
void shim_guard_remove(int slot);
/// Faults absorbed in `slot` since it was added, and the last one's address.
uint64_t shim_guard_trips(int slot);
uintptr_t shim_guard_last_address(int slot);

// ---- io_uring: an opaque ring; liburing's types never reach Swift ----
typedef struct shim_uring shim_uring;
/// Creates a ring. `sqpoll`: 0 plain, 1 SQPOLL, 2 single-issuer with deferred
/// task work (falls back to plain where the kernel lacks it). On failure
/// returns NULL and stores -errno in *err.
shim_uring *shim_uring_create(unsigned int entries, int sqpoll, unsigned int sq_idle_ms, int sq_cpu, int *err);
void shim_uring_destroy(shim_uring *ring);
int shim_uring_fd(shim_uring *ring);
unsigned int shim_uring_sq_space_left(shim_uring *ring);
/// The prep functions return 0, or -EBUSY when the submission queue is full.
/// `link` non-zero sets IOSQE_IO_LINK (the next SQE runs only after this one).
int shim_uring_prep_read(shim_uring *ring, int fd, void *buf, unsigned int len, uint64_t user_data, int link);
/// `nowait` non-zero sets RWF_NOWAIT: the write completes with -EAGAIN rather
/// than wait (poll or io-wq). Linux 6.18 answers -EAGAIN for any eventfd
/// whose file lacks O_NONBLOCK (eventfd has no ->write_iter), so it never
/// blocks, but it never writes to a blocking eventfd either.
int shim_uring_prep_write(shim_uring *ring, int fd, const void *buf, unsigned int len, uint64_t user_data, int link, int nowait);
/// IORING_OP_LINK_TIMEOUT for the SQE prepared just before (which must have
/// `link` set): cancels it after `ms` milliseconds. Every link timeout of a
/// ring shares one duration (the last one given before a submit).
int shim_uring_prep_link_timeout(shim_uring *ring, unsigned int ms, uint64_t user_data);
int shim_uring_prep_poll_in(shim_uring *ring, int fd, uint64_t user_data);
int shim_uring_prep_cancel(shim_uring *ring, uint64_t target, uint64_t user_data);
int shim_uring_prep_nop(shim_uring *ring, uint64_t user_data);
/// Returns SQEs submitted or -errno.
int shim_uring_submit(shim_uring *ring);
/// SQPOLL: blocks until the kernel thread has taken at least one queued SQE
/// (io_uring_sqring_wait); 0 at once without SQPOLL. 0 or -errno.
int shim_uring_sqring_wait(shim_uring *ring);
/// Posts the completions the kernel holds back for this thread (a
/// DEFER_TASKRUN ring posts them only when its thread enters the kernel to
/// get events) without waiting (io_uring_get_events). 0 or -errno.
int shim_uring_get_events(shim_uring *ring);
int shim_uring_submit_and_wait(shim_uring *ring, unsigned int wait_nr);
/// Copies up to `max` ready CQEs (user_data, res, flags) and advances the CQ
/// (io_uring_for_each_cqe is a macro Swift cannot import).
unsigned int shim_uring_reap(shim_uring *ring, uint64_t *user_data,
                             int32_t *res, uint32_t *flags, unsigned int max);

#ifdef __cplusplus
}
#endif
#endif
