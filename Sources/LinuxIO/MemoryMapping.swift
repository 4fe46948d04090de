import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// A shared, read/write mapping of a whole fd range into this process (a
/// VMM's view of its own guest RAM). Unmapped exactly once, on deinit.
///
/// Sendable without `@unchecked`: the state is the base address kept as an
/// integer and the size, both immutable. Concurrent access to the bytes is
/// the callers' protocol (as with guest RAM shared between VMs).
public final class MemoryMapping: SharedMemory, Sendable {
    public let size: UInt64
    private let base: UInt

    public init(fd: OwnedFileDescriptor, offset: UInt64 = 0, size: UInt64) throws(SystemCallError) {
        guard size > 0, size <= UInt64(Int.max), offset <= UInt64(Int64.max) else {
            throw SystemCallError("mmap", errno: .invalidArgument)
        }
        let pointer = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, off_t(offset))
        guard let pointer, pointer != shim_map_failed() else { throw .current("mmap(\(size) bytes of fd \(fd.rawValue))") }
        self.size = size
        self.base = UInt(bitPattern: pointer)
    }

    deinit {
        if let p = UnsafeMutableRawPointer(bitPattern: base) { munmap(p, Int(size)) }
    }

    /// The mapping's address in this process (a VMM's "userspace_addr").
    public var address: UInt64 { UInt64(base) }

    /// Bounds-checked access to `[offset, offset + length)`; nil when outside.
    public func withBytes<R, E: Error>(at offset: UInt64, length: Int,
                                       _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R? {
        guard length >= 0, offset <= size, UInt64(length) <= size - offset,
              let p = UnsafeMutableRawPointer(bitPattern: base) else { return nil }
        return try body(UnsafeMutableRawBufferPointer(start: p + Int(offset), count: length))
    }

}
