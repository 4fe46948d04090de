import CLinuxShim

/// The one checked, scoped way to touch memory shared with a guest (a VM's
/// RAM, the BAR window): every access is bounds-checked, and bytes are only
/// reachable inside a non-escaping `withBytes` — no pointer outlives the call
/// that checked it (a revocation processed later cannot leave one dangling).
/// Ring indices get acquire-loads and release-stores.
public protocol SharedMemory {
    /// `body` with `[offset, offset + length)`; nil when that is outside.
    func withBytes<R, E: Error>(at offset: UInt64, length: Int,
                                _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R?
}

extension SharedMemory {
    /// Little-endian load of a ring or descriptor field.
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

    public func write(_ bytes: [UInt8], at offset: UInt64) -> Bool {
        withBytes(at: offset, length: bytes.count) { $0.copyBytes(from: bytes) } != nil
    }

    public func read(_ count: Int, at offset: UInt64) -> [UInt8]? {
        withBytes(at: offset, length: count) { Array($0) }
    }
}
