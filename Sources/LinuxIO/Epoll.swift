import CLinuxShim
import SystemPackage

/// A minimal epoll instance (level-triggered readability), owned.
public final class Epoll: Sendable {
    public let fd: OwnedFileDescriptor

    public init() throws(SystemCallError) {
        let raw = try retryingInterrupts("epoll_create1") { shim_epoll_create() }
        fd = OwnedFileDescriptor(adopting: raw)
    }

    /// Watches `target` for readability; `data` comes back from `wait`.
    public func add(_ target: Int32, data: UInt64) throws(SystemCallError) {
        let raw = fd.rawValue
        _ = try retryingInterrupts("epoll_ctl(ADD \(target))") { shim_epoll_add(raw, target, data) }
    }

    /// Stops watching `target` (before it is closed: another fd on the same
    /// open file would otherwise keep it registered).
    public func remove(_ target: Int32) {
        _ = shim_epoll_del(fd.rawValue, target)
    }

    /// Waits for up to `max` (≤ 64) ready fds; returns their `data`.
    public func wait(max: Int = 64, timeoutMilliseconds: Int32 = -1) throws(SystemCallError) -> [UInt64] {
        var out = [UInt64](repeating: 0, count: min(64, Swift.max(1, max)))
        let raw = fd.rawValue
        let n = try retryingInterrupts("epoll_wait") {
            out.withUnsafeMutableBufferPointer { shim_epoll_wait(raw, $0.baseAddress, Int32($0.count), timeoutMilliseconds) }
        }
        return Array(out.prefix(Int(n)))
    }
}
