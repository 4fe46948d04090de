import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// An eventfd: a 64-bit counter the kernel adds to on write and hands back
/// (and zeroes) on read. Bursts of signals coalesce into one wakeup for free.
public struct EventFD: Sendable {
    public let fd: OwnedFileDescriptor

    public init(initialValue: UInt32 = 0, nonBlocking: Bool = true, semaphore: Bool = false) throws(SystemCallError) {
        var flags = shim_efd_cloexec()
        if nonBlocking { flags |= shim_efd_nonblock() }
        if semaphore { flags |= shim_efd_semaphore() }
        let raw = try retryingInterrupts("eventfd") { shim_eventfd(initialValue, flags) }
        fd = OwnedFileDescriptor(adopting: raw)
    }

    /// Adopts an eventfd received from a peer.
    public init(adopting fd: OwnedFileDescriptor) {
        self.fd = fd
    }

    /// Adds `count` to the counter. Returns false when the counter is full and
    /// the fd is non-blocking (EAGAIN): the reader has a wakeup pending anyway.
    @discardableResult
    public func signal(_ count: UInt64 = 1) throws(SystemCallError) -> Bool {
        var value = count
        let raw = fd.rawValue
        do {
            _ = try retryingInterrupts("eventfd write(\(raw))") { Glibc.write(raw, &value, 8) }
            return true
        } catch {
            if error.errno == .resourceTemporarilyUnavailable { return false }
            throw error
        }
    }

    /// Reads and resets the counter. nil when it is zero and the fd is non-blocking.
    public func read() throws(SystemCallError) -> UInt64? {
        var value: UInt64 = 0
        let raw = fd.rawValue
        do {
            _ = try retryingInterrupts("eventfd read(\(raw))") { Glibc.read(raw, &value, 8) }
            return value
        } catch {
            if error.errno == .resourceTemporarilyUnavailable { return nil }
            throw error
        }
    }
}
