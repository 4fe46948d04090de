import CLinuxShim
import SystemPackage

/// One completion: the `userData` given at submission, and the result
/// (bytes, or a negative errno).
public struct URingCompletion: Equatable, Sendable {
    public let userData: UInt64
    public let result: Int32
    public let flags: UInt32

    public var errno: Errno? { result < 0 ? Errno(rawValue: -result) : nil }
}

public enum URingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The submission queue is full; submit and reap first.
    case submissionQueueFull
    case system(SystemCallError)

    public var description: String {
        switch self {
        case .submissionQueueFull: "io_uring submission queue is full"
        case .system(let e): e.description
        }
    }
}

/// A minimal owner of one io_uring (liburing, behind CLinuxShim's opaque
/// `shim_uring`): prepare reads, writes and polls on fds, submit, wait, and
/// reap completions in batches.
///
/// Not Sendable: an io_uring belongs to the one thread that drives it (the
/// notification relay's thread). Buffers handed to `prepareRead` /
/// `prepareWrite` must stay valid until their completion is reaped.
public final class URing {
    private let ring: OpaquePointer
    public let entries: UInt32
    public let sqpoll: Bool
    private var reapUserData: [UInt64]
    private var reapResult: [Int32]
    private var reapFlags: [UInt32]

    /// `singleIssuer`: only the creating thread submits and waits; the kernel
    /// then defers completion work to its waits (DEFER_TASKRUN), which is
    /// cheaper. Ignored with `sqpoll`; falls back where unsupported.
    /// `sqpollCPU`: the CPU the SQPOLL kernel thread is bound to (IORING_SETUP_SQ_AFF).
    public init(entries: UInt32 = 256, sqpoll: Bool = false, sqpollIdleMilliseconds: UInt32 = 50,
                singleIssuer: Bool = false, sqpollCPU: Int? = nil) throws(URingError) {
        var err: Int32 = 0
        guard let ring = shim_uring_create(entries, sqpoll ? 1 : (singleIssuer ? 2 : 0), sqpollIdleMilliseconds,
                                           Int32(sqpollCPU ?? -1), &err) else {
            throw .system(SystemCallError("io_uring_queue_init(\(entries)\(sqpoll ? ", SQPOLL" : ""))", errno: Errno(rawValue: -err)))
        }
        self.ring = ring
        self.entries = entries
        self.sqpoll = sqpoll
        let batch = Int(entries) * 2
        reapUserData = .init(repeating: 0, count: batch)
        reapResult = .init(repeating: 0, count: batch)
        reapFlags = .init(repeating: 0, count: batch)
    }

    deinit {
        shim_uring_destroy(ring)
    }

    /// The ring's own fd.
    public var ringFD: Int32 { shim_uring_fd(ring) }

    public var submissionSpaceLeft: UInt32 { shim_uring_sq_space_left(ring) }

    private static func check(_ r: Int32) throws(URingError) {
        if r == -16 /* EBUSY */ { throw .submissionQueueFull }
    }

    /// Reads up to `length` bytes from `fd` into `buffer`. `linkNext` makes the
    /// next prepared SQE wait for this one (IOSQE_IO_LINK).
    public func prepareRead(fd: Int32, buffer: UnsafeMutableRawPointer, length: UInt32, userData: UInt64, linkNext: Bool = false) throws(URingError) {
        try Self.check(shim_uring_prep_read(ring, fd, buffer, length, userData, linkNext ? 1 : 0))
    }

    /// Writes `length` bytes from `buffer` to `fd`. `noWait` (RWF_NOWAIT):
    /// the write completes with EAGAIN instead of waiting for room or being
    /// handed to an io-wq worker, whatever the file's `O_NONBLOCK`. On an
    /// eventfd (Linux 6.18) that means: EAGAIN when the counter has no room
    /// *or* the file is blocking, so it is only a first attempt.
    public func prepareWrite(fd: Int32, buffer: UnsafeRawPointer, length: UInt32, userData: UInt64, linkNext: Bool = false,
                             noWait: Bool = false) throws(URingError) {
        try Self.check(shim_uring_prep_write(ring, fd, buffer, length, userData, linkNext ? 1 : 0, noWait ? 1 : 0))
    }

    /// Bounds the SQE prepared just before (prepared with `linkNext`): the
    /// kernel cancels it after `milliseconds` — a poll it waits in is
    /// removed (ECANCELED), an io-wq worker blocked in it is interrupted
    /// (EINTR). Its own completion is ETIME when it fired, ECANCELED when
    /// the request finished first.
    public func prepareLinkTimeout(milliseconds: UInt32, userData: UInt64) throws(URingError) {
        try Self.check(shim_uring_prep_link_timeout(ring, milliseconds, userData))
    }

    /// One-shot poll for readability.
    public func preparePollIn(fd: Int32, userData: UInt64) throws(URingError) {
        try Self.check(shim_uring_prep_poll_in(ring, fd, userData))
    }

    /// Cancels the pending request submitted with user data `target`.
    public func prepareCancel(target: UInt64, userData: UInt64) throws(URingError) {
        try Self.check(shim_uring_prep_cancel(ring, target, userData))
    }

    public func prepareNop(userData: UInt64) throws(URingError) {
        try Self.check(shim_uring_prep_nop(ring, userData))
    }

    /// Submits what was prepared; returns how many SQEs were consumed.
    @discardableResult
    public func submit() throws(URingError) -> Int {
        do { return Int(try retryingNegativeErrno("io_uring_submit") { shim_uring_submit(ring) }) } catch { throw .system(error) }
    }

    /// Room for `count` more SQEs: what is queued is submitted first. Without
    /// SQPOLL that empties the queue; with SQPOLL the kernel thread takes the
    /// entries in its own time, so this waits until it has taken enough
    /// (io_uring_sqring_wait). `count` must not exceed `entries`.
    public func makeSubmissionSpace(_ count: UInt32) throws(URingError) {
        guard submissionSpaceLeft < count else { return }
        try submit()
        while sqpoll, submissionSpaceLeft < count {
            do { _ = try retryingNegativeErrno("io_uring_sqring_wait") { shim_uring_sqring_wait(ring) } } catch { throw .system(error) }
        }
    }

    /// Has the kernel post the completions it holds back for this thread,
    /// without waiting: a single-issuer ring (DEFER_TASKRUN) posts them only
    /// when its thread enters the kernel for events, so a loop that only
    /// reaps would never see one.
    public func getEvents() throws(URingError) {
        do { _ = try retryingNegativeErrno("io_uring_get_events") { shim_uring_get_events(ring) } } catch { throw .system(error) }
    }

    /// Submits and blocks until at least `waitFor` completions are ready.
    @discardableResult
    public func submitAndWait(_ waitFor: UInt32 = 1) throws(URingError) -> Int {
        do {
            return Int(try retryingNegativeErrno("io_uring_submit_and_wait") { shim_uring_submit_and_wait(ring, waitFor) })
        } catch { throw .system(error) }
    }

    /// Takes every ready completion (up to a batch of 2 × entries) and marks
    /// them seen, without blocking.
    public func reap() -> [URingCompletion] {
        var out: [URingCompletion] = []
        reap { out.append($0) }
        return out
    }

    /// Calls `body` for every ready completion (up to a batch of 2 × entries)
    /// and marks them seen; returns how many. No allocation per batch.
    @discardableResult
    public func reap(_ body: (URingCompletion) -> Void) -> Int {
        let capacity = UInt32(reapUserData.count)
        let n = reapUserData.withUnsafeMutableBufferPointer { u in
            reapResult.withUnsafeMutableBufferPointer { r in
                reapFlags.withUnsafeMutableBufferPointer { f in
                    shim_uring_reap(ring, u.baseAddress, r.baseAddress, f.baseAddress, capacity)
                }
            }
        }
        for i in 0..<Int(n) { body(URingCompletion(userData: reapUserData[i], result: reapResult[i], flags: reapFlags[i])) }
        return Int(n)
    }

    /// Blocks until at least one completion is ready, then reaps the batch.
    public func waitAndReap() throws(URingError) -> [URingCompletion] {
        try submitAndWait(1)
        return reap()
    }
}
