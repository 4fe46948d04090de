#if canImport(Glibc)
import Glibc
#endif

/// poll(2) over a set of fds that changes rarely and is waited on often (a
/// device's run loop): the `pollfd` array is built once per change and reused,
/// so a wait allocates nothing.
public struct PollSet: ~Copyable {
    private var entries: [pollfd] = []

    public init() {}

    /// Replaces the watched fds (each for readability).
    public mutating func watch(_ fds: [Int32]) {
        entries.removeAll(keepingCapacity: true)
        for fd in fds { entries.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0)) }
    }

    /// Waits up to `timeoutMilliseconds` (0: just look, -1: forever); returns
    /// how many fds are ready. EINTR counts as nothing ready.
    public mutating func wait(timeoutMilliseconds: Int32) throws(SystemCallError) -> Int {
        let n = entries.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeoutMilliseconds) }
        if n < 0 {
            if errno == EINTR { return 0 }
            throw .current("poll")
        }
        return Int(n)
    }

    /// Whether fd number `index` (in `watch` order) was readable, hung up or
    /// in error at the last wait.
    public func isReady(_ index: Int) -> Bool {
        guard index >= 0, index < entries.count else { return false }
        return entries[index].revents & Int16(POLLIN | POLLHUP | POLLERR | POLLNVAL) != 0
    }
}
