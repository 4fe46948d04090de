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
public final class MemoryMapping: Sendable {
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

    public func write(_ bytes: [UInt8], at offset: UInt64) -> Bool {
        withBytes(at: offset, length: bytes.count) { $0.copyBytes(from: bytes) } != nil
    }

    public func read(_ count: Int, at offset: UInt64) -> [UInt8]? {
        withBytes(at: offset, length: count) { Array($0) }
    }

    /// Little-endian loads and stores for ring fields (aligned by the caller).
    public func load<T: FixedWidthInteger>(_: T.Type, at offset: UInt64) -> T? {
        withBytes(at: offset, length: MemoryLayout<T>.size) { T(littleEndian: $0.loadUnaligned(as: T.self)) }
    }

    @discardableResult
    public func store<T: FixedWidthInteger>(_ value: T, at offset: UInt64) -> Bool {
        withBytes(at: offset, length: MemoryLayout<T>.size) { $0.storeBytes(of: value.littleEndian, as: T.self) } != nil
    }

    /// Release-store of a 16-bit ring index: every earlier write (descriptors,
    /// ring entries) is visible to the other side before the new index.
    @discardableResult
    public func storeRelease(_ value: UInt16, at offset: UInt64) -> Bool {
        withBytes(at: offset, length: 2) { buffer -> Bool in
            guard let p = buffer.baseAddress, Int(bitPattern: p) % 2 == 0 else { return false }
            shim_store_release_u16(p, value.littleEndian)
            return true
        } ?? false
    }

    /// Acquire-load of a 16-bit ring index.
    public func loadAcquire(at offset: UInt64) -> UInt16? {
        withBytes(at: offset, length: 2) { buffer -> UInt16? in
            guard let p = buffer.baseAddress, Int(bitPattern: p) % 2 == 0 else { return nil }
            return UInt16(littleEndian: shim_load_acquire_u16(p))
        } ?? nil
    }
}

/// Ordered 16-bit accesses to memory shared with another VM (ring indices).
public enum SharedMemory {
    /// Acquire-load of a little-endian u16 at `p` (2-byte aligned).
    public static func loadAcquire(_ p: UnsafeMutableRawPointer) -> UInt16 {
        UInt16(littleEndian: shim_load_acquire_u16(p))
    }

    /// Release-store of a little-endian u16 at `p` (2-byte aligned).
    public static func storeRelease(_ p: UnsafeMutableRawPointer, _ value: UInt16) {
        shim_store_release_u16(p, value.littleEndian)
    }
}
