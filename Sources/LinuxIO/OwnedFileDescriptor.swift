import BridgeCore
import CLinuxShim
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Sole owner of one file descriptor: it is closed exactly once, by `close()`
/// or, failing that, when the last reference goes away. After `close()` or
/// `release()` the object holds -1 and every operation on it fails with EBADF
/// instead of touching a number the kernel may have reused.
///
/// Sendable without `@unchecked`: the only state is an `Atomic<Int32>`.
public final class OwnedFileDescriptor: Sendable, CustomStringConvertible {
    private let storage: Atomic<Int32>

    /// Takes ownership of `raw` (which must be open and owned by nobody else).
    public init(adopting raw: Int32) {
        storage = Atomic(raw)
    }

    deinit {
        let raw = storage.exchange(-1, ordering: .acquiringAndReleasing)
        if raw >= 0 { _ = Glibc.close(raw) }
    }

    /// The descriptor number, or -1 once closed or released.
    public var rawValue: Int32 { storage.load(ordering: .acquiring) }
    public var isOpen: Bool { rawValue >= 0 }

    /// swift-system's view of the same fd (borrowed, not owned).
    public var systemDescriptor: FileDescriptor { FileDescriptor(rawValue: rawValue) }

    /// Closes now. A second call does nothing: the fd is closed exactly once.
    /// Per POSIX the fd is gone even when close reports an error (no retry on EINTR).
    public func close() throws(SystemCallError) {
        let raw = storage.exchange(-1, ordering: .acquiringAndReleasing)
        guard raw >= 0 else { return }
        if Glibc.close(raw) < 0 {
            let error = SystemCallError.current("close(\(raw))")
            if error.errno != .interrupted { throw error }
        }
    }

    /// Gives up ownership and returns the number; the caller now owns it.
    public func release() -> Int32 {
        storage.exchange(-1, ordering: .acquiringAndReleasing)
    }

    /// A new owned descriptor for the same open file (F_DUPFD_CLOEXEC).
    public func duplicate() throws(SystemCallError) -> OwnedFileDescriptor {
        let raw = rawValue
        let new = try retryingInterrupts("dup(\(raw))") { Glibc.fcntl(raw, F_DUPFD_CLOEXEC, 0) }
        return OwnedFileDescriptor(adopting: new)
    }

    /// Size of the file (fstat st_size).
    public func fileSize() throws(SystemCallError) -> UInt64 {
        var st = stat()
        let raw = rawValue
        _ = try retryingInterrupts("fstat(\(raw))") { fstat(raw, &st) }
        return UInt64(st.st_size)
    }

    /// What the kernel says this fd is (fstat's file type, and for anonymous
    /// inodes the name in /proc/self/fd: "anon_inode:[eventfd]").
    public func kind() -> FileKind { Self.borrowingKind(rawValue) }

    /// `kind()` of a raw fd owned elsewhere.
    public static func borrowingKind(_ raw: Int32) -> FileKind {
        var st = stat()
        guard (try? retryingInterrupts("fstat(\(raw))", { fstat(raw, &st) })) != nil else { return .unknown }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return .regularFile
        case S_IFSOCK: return .socket
        case S_IFIFO: return .pipe
        case S_IFDIR: return .other("a directory")
        case S_IFCHR, S_IFBLK: return .other("a device")
        default: break
        }
        var buffer = [CChar](repeating: 0, count: 128)
        let n = readlink("/proc/self/fd/\(raw)", &buffer, buffer.count - 1)
        guard n > 0 else { return .unknown }
        let target = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return target == "anon_inode:[eventfd]" ? .eventfd : .other(target)
    }

    /// The huge page size of hugetlbfs memory (MFD_HUGETLB memfds too):
    /// fstatfs's block size when the file system is hugetlbfs, else 0.
    public func hugePageSize() -> UInt64 {
        let raw = rawValue
        return UInt64((try? retryingInterrupts("fstatfs(\(raw))", { shim_hugepage_size(raw) })) ?? 0)
    }

    /// O_NONBLOCK lives on the open file description, so it is shared with
    /// every process holding a duplicate of this fd (e.g. the VMM that sent it).
    public var isNonBlocking: Bool {
        get throws(SystemCallError) {
            let raw = rawValue
            let flags = try retryingInterrupts("fcntl(\(raw), F_GETFL)") { shim_get_fl(raw) }
            return flags & shim_o_nonblock() != 0
        }
    }

    public func setNonBlocking(_ on: Bool) throws(SystemCallError) {
        let raw = rawValue
        let flags = try retryingInterrupts("fcntl(\(raw), F_GETFL)") { shim_get_fl(raw) }
        let new = on ? flags | shim_o_nonblock() : flags & ~shim_o_nonblock()
        if new != flags { _ = try retryingInterrupts("fcntl(\(raw), F_SETFL)") { shim_set_fl(raw, new) } }
    }

    public var description: String { "fd \(rawValue)" }
}

/// Counts this process's open descriptors (entries of /proc/self/fd, minus
/// the one the listing itself uses). Tests use it to prove nothing leaked.
public func openFileDescriptorCount() -> Int {
    guard let dir = opendir("/proc/self/fd") else { return -1 }
    defer { closedir(dir) }
    var count = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if name != "." && name != ".." { count += 1 }
    }
    return count - 1 // the directory stream's own fd
}

/// `openFileDescriptorCount()` once it has not changed for `quiet`: threads
/// of an earlier session (or test) may still be closing their fds when a
/// test takes its baseline, and this one's may be closing when it checks.
/// Gives up after `limit` and returns the last count.
public func settledOpenFileDescriptorCount(quiet: Duration = .milliseconds(100), limit: Duration = .seconds(10)) -> Int {
    let clock = ContinuousClock()
    let deadline = clock.now.advanced(by: limit)
    var last = openFileDescriptorCount()
    var since = clock.now
    while clock.now < deadline {
        usleep(5_000)
        let now = openFileDescriptorCount()
        if now != last { last = now; since = clock.now } else if since.duration(to: clock.now) >= quiet { break }
    }
    return last
}
