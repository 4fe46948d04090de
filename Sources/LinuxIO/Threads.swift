import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A named OS thread that can be joined: for loops that block in syscalls
/// (accept, recvmsg, io_uring waits), which must not run on Swift's
/// cooperative pool.
public final class JoinableThread: Sendable {
    private let thread: pthread_t

    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemCallError) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var handle = pthread_t()
        let r = pthread_create(&handle, nil, { context in
            guard let context else { return nil }
            let box = Unmanaged<Box>.fromOpaque(context).takeRetainedValue()
            box.body()
            return nil
        }, box)
        guard r == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemCallError("pthread_create(\(name))", errno: Errno(rawValue: r))
        }
        thread = handle
        _ = shim_set_thread_name(handle, String(name.prefix(15)))
    }

    /// CPU time the thread has used so far (ns), read from outside through
    /// its CPU-time clock (pthread_getcpuclockid), so the thread itself
    /// spends nothing on it; nil once it ended. Not after `join` or `detach`.
    public var cpuTimeNanoseconds: UInt64? {
        var clock = clockid_t()
        var ts = timespec()
        guard pthread_getcpuclockid(thread, &clock) == 0, clock_gettime(clock, &ts) == 0 else { return nil }
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Waits for the thread to finish. Call at most once (and not after `detach`).
    public func join() {
        pthread_join(thread, nil)
    }

    /// Lets the thread clean up after itself when it ends (never join it then).
    public func detach() {
        pthread_detach(thread)
    }
}

/// Process-wide signal handling the thread-safe way: block the signals in
/// every thread (call before starting any), then wait for them on one thread.
public enum Signals {
    /// This process's id.
    public static var processID: Int32 { getpid() }

    /// SIGTERM to this process: a stop asked from inside takes the same path
    /// as one from outside (`wait(for:)` sees it).
    public static func terminateSelf() { _ = kill(getpid(), SIGTERM) }

    public static func block(_ signals: [Int32]) {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// SIGPIPE ignored process-wide: a write to a pipe or socket whose
    /// reader is gone then fails with EPIPE instead of killing the daemon
    /// (and every bridge in it). The daemon calls this before starting any
    /// thread; it is idempotent.
    public static func ignoreBrokenPipe() {
        signal(SIGPIPE, SIG_IGN)
    }

    /// Blocks until one of `signals` (already blocked) arrives; returns it.
    public static func wait(for signals: [Int32]) -> Int32 {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        var received: Int32 = 0
        while sigwait(&set, &received) != 0 {}
        return received
    }
}

/// Where a thread may run.
public enum CPUAffinity {
    /// Pins the calling thread to `cpus` (sched_setaffinity); EINVAL when
    /// none of them is online or allowed.
    public static func pinCallingThread(to cpus: [Int]) throws(SystemCallError) {
        let list = cpus.map { Int32(clamping: $0) }
        guard list.withUnsafeBufferPointer({ shim_pin_thread($0.baseAddress, Int32($0.count)) }) == 0 else {
            throw .current("sched_setaffinity(\(cpus))")
        }
    }
}
