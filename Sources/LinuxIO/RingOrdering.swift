import CLinuxShim

/// The memory ordering a virtqueue needs on memory shared with another VM,
/// for code that already holds a checked pointer (a device engine inside one
/// burst). Indices are little-endian u16 at 2-byte aligned addresses; the
/// caller checked both.
public enum RingOrdering {
    /// Acquire-load of a ring index: entries the other side wrote before
    /// publishing it are visible after this load.
    @inline(__always)
    public static func loadAcquire(_ p: UnsafeRawPointer) -> UInt16 {
        UInt16(littleEndian: shim_load_acquire_u16(p))
    }

    /// Release-store of a ring index: every earlier write (used elements,
    /// buffer contents) is visible to the other side before the index.
    @inline(__always)
    public static func storeRelease(_ value: UInt16, _ p: UnsafeMutableRawPointer) {
        shim_store_release_u16(p, value.littleEndian)
    }

    /// A full barrier: between publishing an index and reading the other
    /// side's notification flags (virtio 1.x §2.7.7, §2.7.10).
    @inline(__always)
    public static func fullFence() { shim_full_fence() }
}
