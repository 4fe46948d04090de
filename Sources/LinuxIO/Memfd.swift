import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Anonymous shared memory (memfd_create). Sparse: `resize` reserves no pages,
/// so an emulated guest can have several GiB of RAM at no cost until touched.
public struct Memfd: Sendable {
    public let fd: OwnedFileDescriptor

    public struct Seals: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let shrink = Seals(rawValue: shim_seal_shrink())
        public static let grow = Seals(rawValue: shim_seal_grow())
        public static let write = Seals(rawValue: shim_seal_write())
        public static let seal = Seals(rawValue: shim_seal_seal())
    }

    /// Creates a memfd of `size` bytes (CLOEXEC, sealing allowed). With
    /// `hugePages`, MFD_HUGETLB: backed by the default huge page size from the
    /// reserved pool (`size` must be a multiple of it).
    public init(name: String, size: UInt64, hugePages: Bool = false) throws(SystemCallError) {
        var flags = UInt32(shim_memfd_flag_cloexec() | shim_memfd_flag_allow_sealing())
        if hugePages { flags |= UInt32(shim_memfd_flag_hugetlb()) }
        let raw = try retryingInterrupts("memfd_create(\(name))") { shim_memfd_create(name, flags) }
        fd = OwnedFileDescriptor(adopting: raw)
        try resize(to: size)
    }

    /// Adopts an existing memory fd (e.g. one received by SCM_RIGHTS).
    public init(adopting fd: OwnedFileDescriptor) {
        self.fd = fd
    }

    public var size: UInt64 {
        get throws(SystemCallError) { try fd.fileSize() }
    }

    public func resize(to size: UInt64) throws(SystemCallError) {
        guard size <= UInt64(Int64.max) else { throw SystemCallError("ftruncate", errno: .invalidArgument) }
        let raw = fd.rawValue
        _ = try retryingInterrupts("ftruncate(\(raw), \(size))") { ftruncate(raw, off_t(size)) }
    }

    /// Adds seals (F_ADD_SEALS): e.g. `[.shrink]` so a peer cannot pull pages
    /// out from under a mapping (a SIGBUS in the daemon otherwise).
    public func addSeals(_ seals: Seals) throws(SystemCallError) {
        let raw = fd.rawValue
        _ = try retryingInterrupts("fcntl(\(raw), F_ADD_SEALS)") { shim_add_seals(raw, seals.rawValue) }
    }

    /// Frees `[offset, offset+length)` (it reads back as zeros; the size
    /// stays): what another holder of the file can do to it at any time.
    public func punchHole(offset: UInt64, length: UInt64) throws(SystemCallError) {
        let raw = fd.rawValue
        _ = try retryingInterrupts("fallocate(\(raw), PUNCH_HOLE)") { shim_punch_hole(raw, offset, length) }
    }

    public var seals: Seals {
        get throws(SystemCallError) {
            let raw = fd.rawValue
            let value = try retryingInterrupts("fcntl(\(raw), F_GET_SEALS)") { shim_get_seals(raw) }
            return Seals(rawValue: UInt32(value))
        }
    }

    /// pwrite all of `bytes` at `offset`.
    public func write(_ bytes: [UInt8], at offset: UInt64) throws(SystemCallError) {
        var done = 0
        while done < bytes.count {
            let raw = fd.rawValue
            let n = try retryingInterrupts("pwrite(\(raw))") {
                bytes.withUnsafeBytes { pwrite(raw, $0.baseAddress! + done, $0.count - done, off_t(offset) + off_t(done)) }
            }
            done += n
        }
    }

    /// pread exactly `count` bytes at `offset` (fewer only at end of file).
    public func read(count: Int, at offset: UInt64) throws(SystemCallError) -> [UInt8] {
        var result = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let raw = fd.rawValue
            let n = try retryingInterrupts("pread(\(raw))") {
                result.withUnsafeMutableBytes { pread(raw, $0.baseAddress! + done, count - done, off_t(offset) + off_t(done)) }
            }
            if n == 0 { break }
            done += n
        }
        return Array(result.prefix(done))
    }
}
