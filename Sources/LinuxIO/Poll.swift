import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// poll(2) for readability over a few fds.
public enum Poll {
    /// Waits until any fd is readable (or hung up / in error), or until the
    /// timeout (milliseconds; -1 waits forever). Returns one flag per fd.
    public static func readable(_ fds: [Int32], timeoutMilliseconds: Int32) throws(SystemCallError) -> [Bool] {
        var entries = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        _ = try retryingInterrupts("poll") {
            entries.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeoutMilliseconds) }
        }
        let mask = Int16(POLLIN | POLLHUP | POLLERR | POLLNVAL)
        return entries.map { $0.revents & mask != 0 }
    }
}

extension Poll {
    /// One loop's wait over typed sources: each registration is a value
    /// (what the fd is to the loop), never a position in a `poll` array.
    /// Returns the sources that are readable, hung up or in error, in
    /// registration order; none once `deadline` passed (nil: no deadline).
    @inlinable
    public static func ready<Source>(_ registrations: [(Source, Int32)], until deadline: ContinuousClock.Instant?,
                                     now: ContinuousClock.Instant = .now) throws(SystemCallError) -> [Source] {
        var fds: [Int32] = []
        fds.reserveCapacity(registrations.count)
        for r in registrations { fds.append(r.1) }
        let flags = try readable(fds, timeoutMilliseconds: timeout(until: deadline, now: now))
        var ready: [Source] = []
        for (i, flag) in flags.enumerated() where flag { ready.append(registrations[i].0) }
        return ready
    }

    /// The timeout that wakes a poll at or after `deadline`: -1 (no
    /// deadline: forever), else the milliseconds left rounded up, at least 1
    /// (never a busy 0) and at most `cap`.
    public static func timeout(until deadline: ContinuousClock.Instant?, now: ContinuousClock.Instant = .now,
                               atMost cap: Int32 = .max) -> Int32 {
        guard let deadline else { return -1 }
        let ms = (now.duration(to: deadline) / .milliseconds(1)).rounded(.up)
        return Int32(max(1, min(Double(cap), ms)))
    }

    public enum Readiness: Sendable { case readable, writable }

    /// Waits until `fd` is readable (or writable), hung up or in error;
    /// throws ETIMEDOUT (naming `operation`) once `deadline` has passed.
    public static func wait(_ fd: Int32, for readiness: Readiness, until deadline: ContinuousClock.Instant,
                            operation: String) throws(SystemCallError) {
        let events = Int16(readiness == .readable ? POLLIN : POLLOUT)
        while true {
            let now = ContinuousClock.now
            guard now < deadline else { throw SystemCallError("\(operation) (deadline)", errno: .timedOut) }
            var entry = pollfd(fd: fd, events: events, revents: 0)
            let ready = try retryingInterrupts("poll") { poll(&entry, 1, timeout(until: deadline, now: now)) }
            if ready > 0 { return }
        }
    }

    /// Whether `fd` is writable right now (POLLOUT, zero timeout).
    public static func writable(_ fd: Int32) throws(SystemCallError) -> Bool {
        var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        _ = try retryingInterrupts("poll") { poll(&entry, 1, 0) }
        return entry.revents & Int16(POLLOUT) != 0
    }
}

extension UnixSocket {
    /// SO_RCVTIMEO: a blocking receive gives up with EAGAIN after this long.
    public func setReceiveTimeout(milliseconds: Int) throws(SystemCallError) {
        var tv = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        let raw = fd.rawValue
        _ = try retryingInterrupts("setsockopt(SO_RCVTIMEO)") {
            setsockopt(raw, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    /// SO_SNDTIMEO: a blocking send gives up with EAGAIN after this long.
    public func setSendTimeout(milliseconds: Int) throws(SystemCallError) {
        var tv = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        let raw = fd.rawValue
        _ = try retryingInterrupts("setsockopt(SO_SNDTIMEO)") {
            setsockopt(raw, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }
}
