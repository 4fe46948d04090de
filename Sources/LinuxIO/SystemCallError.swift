import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which operation, and the errno it returned.
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    public let operation: String
    public let errno: Errno
    /// Why, when the call was refused by a check of the daemon's own (e.g.
    /// a socket directory others can write) rather than by the kernel.
    public let detail: String?

    public init(_ operation: String, errno: Errno, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    /// Captures the calling thread's current errno.
    static func current(_ operation: String) -> SystemCallError {
        SystemCallError(operation, errno: Errno(rawValue: Glibc.errno))
    }

    public var description: String {
        if let detail { return "\(operation): \(detail)" }
        return "\(operation) failed: \(errno) (errno \(errno.rawValue))"
    }

    /// Out of fds or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): an
    /// accept loop must back off instead of retrying at once — the listener
    /// stays readable, so retrying at once spins a core.
    public var isResourceExhaustion: Bool {
        [.tooManyOpenFiles, .tooManyOpenFilesInSystem, .noBufferSpace, .noMemory].contains(errno)
    }

    /// How long an accept loop waits after a resource-exhaustion failure.
    public static let acceptBackoffMilliseconds: Int32 = 100
}

/// Runs `body` until it does not fail with EINTR; -1 becomes a typed error.
@inline(__always)
func retryingInterrupts<T: BinaryInteger>(_ operation: String, _ body: () -> T) throws(SystemCallError) -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let error = SystemCallError.current(operation)
        if error.errno != .interrupted { throw error }
    }

}

/// The same for calls that return -errno instead of setting errno (liburing).
@inline(__always)
func retryingNegativeErrno(_ operation: String, _ body: () -> Int32) throws(SystemCallError) -> Int32 {
    while true {
        let result = body()
        if result >= 0 { return result }
        let errno = Errno(rawValue: -result)
        if errno != .interrupted { throw SystemCallError(operation, errno: errno) }
    }
}
