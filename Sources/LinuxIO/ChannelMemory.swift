import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// A small region of memory shared with another process through a memfd —
/// the revocation channel between the daemon and VM2 (peer feature
/// `sharedRevocations`) — with the atomic words and the futex the channel
/// needs. Every access is bounds-checked against the mapping; the other side
/// may write anything anywhere in it, so nothing read here is more than a
/// number to check.
///
/// The creator seals the file against shrinking and growing (and against
/// new seals): the other side cannot truncate it, so no access here can
/// SIGBUS. A hole it punches reads back as zeros.
///
/// Sendable without `@unchecked`: the state is the mapping's base address
/// kept as an integer, its size and the fd's owner, all immutable; the
/// bytes are shared memory whose protocol is the callers'.
public final class ChannelMemory: Sendable {
    public let size: Int
    private let base: UInt
    /// The memfd behind the mapping, to hand to the other side (closed with
    /// this object).
    public let fd: OwnedFileDescriptor

    /// A new zeroed, sealed memfd of `size` bytes, mapped here.
    public init(creating name: String, size: Int) throws(SystemCallError) {
        guard size > 0 else { throw SystemCallError("memfd_create(\(name))", errno: .invalidArgument) }
        let memfd = try Memfd(name: name, size: UInt64(size))
        try memfd.addSeals([.shrink, .grow, .seal])
        self.fd = memfd.fd
        self.size = size
        self.base = try Self.map(memfd.fd, size: size)
    }

    /// Maps a channel memfd received from the other side. Refused unless it
    /// is at least `size` bytes and sealed against shrinking (else a
    /// truncate there would be a SIGBUS here).
    public init(adopting fd: OwnedFileDescriptor, size: Int) throws(SystemCallError) {
        guard size > 0 else { throw SystemCallError("mmap(channel)", errno: .invalidArgument) }
        let memfd = Memfd(adopting: fd)
        let actual = try memfd.size
        guard actual >= UInt64(size) else {
            throw SystemCallError("mmap(channel)", errno: .invalidArgument, detail: "the channel file holds \(actual) bytes, not \(size)")
        }
        guard try memfd.seals.contains(.shrink) else {
            throw SystemCallError("mmap(channel)", errno: .invalidArgument, detail: "the channel file is not sealed against shrinking")
        }
        self.fd = fd
        self.size = size
        self.base = try Self.map(fd, size: size)
    }

    private static func map(_ fd: OwnedFileDescriptor, size: Int) throws(SystemCallError) -> UInt {
        let pointer = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0)
        guard let pointer, pointer != shim_map_failed() else { throw .current("mmap(\(size) bytes of the channel)") }
        return UInt(bitPattern: pointer)
    }

    deinit {
        if let p = UnsafeMutableRawPointer(bitPattern: base) { munmap(p, size) }
    }

    /// The address of an aligned `width`-byte word at `offset`; nil outside.
    @inline(__always)
    private func word(_ offset: Int, _ width: Int) -> UnsafeMutableRawPointer? {
        guard offset >= 0, offset % width == 0, offset <= size - width else { return nil }
        return UnsafeMutableRawPointer(bitPattern: base).map { $0 + offset }
    }

    /// Acquire-load of a little-endian u64 (0 outside the mapping).
    @inline(__always)
    public func loadAcquire64(at offset: Int) -> UInt64 {
        word(offset, 8).map { UInt64(littleEndian: shim_load_acquire_u64($0)) } ?? 0
    }

    /// Release-store of a little-endian u64: everything written before it is
    /// visible to the other side first.
    @inline(__always)
    public func storeRelease64(_ value: UInt64, at offset: Int) {
        if let p = word(offset, 8) { shim_store_release_u64(p, value.littleEndian) }
    }

    @inline(__always)
    public func loadAcquire32(at offset: Int) -> UInt32 {
        word(offset, 4).map { UInt32(littleEndian: shim_load_acquire_u32($0)) } ?? 0
    }

    @inline(__always)
    public func storeRelease32(_ value: UInt32, at offset: Int) {
        if let p = word(offset, 4) { shim_store_release_u32(p, value.littleEndian) }
    }

    /// Atomic add to a u32 (the futex word); returns the old value.
    @discardableResult
    public func fetchAdd32(_ value: UInt32, at offset: Int) -> UInt32 {
        word(offset, 4).map { shim_fetch_add_u32($0, value) } ?? 0
    }

    /// Copies `bytes` in at `offset`; false when they do not fit.
    @discardableResult
    public func write(_ bytes: [UInt8], at offset: Int) -> Bool {
        guard offset >= 0, bytes.count <= size, offset <= size - bytes.count,
              let p = UnsafeMutableRawPointer(bitPattern: base) else { return false }
        bytes.withUnsafeBytes { (p + offset).copyMemory(from: $0.baseAddress.unsafelyUnwrapped, byteCount: $0.count) }
        return true
    }

    /// `count` bytes from `offset`; nil when outside.
    public func read(_ count: Int, at offset: Int) -> [UInt8]? {
        guard count >= 0, offset >= 0, count <= size, offset <= size - count,
              let p = UnsafeRawPointer(bitPattern: base) else { return nil }
        return Array(UnsafeRawBufferPointer(start: p + offset, count: count))
    }

    /// Sleeps while the u32 at `offset` holds `expected`, until woken or
    /// `deadline` (a spurious return is possible: the caller re-checks).
    /// Returns false once the deadline passed.
    public func wait(at offset: Int, whileEqualTo expected: UInt32, until deadline: ContinuousClock.Instant) -> Bool {
        guard let p = word(offset, 4) else { return false }
        let left = ContinuousClock.now.duration(to: deadline)
        guard left > .zero else { return false }
        let (seconds, attoseconds) = left.components
        let ns = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        let total = ns.overflow ? Int64.max : ns.partialValue.addingReportingOverflow(attoseconds / 1_000_000_000).partialValue
        let r = shim_futex_wait(p, expected.littleEndian, total)
        return r != -ETIMEDOUT
    }

    /// Wakes whoever sleeps on the u32 at `offset`.
    public func wake(at offset: Int) {
        if let p = word(offset, 4) { _ = shim_futex_wake(p, Int32.max) }
    }

    /// A spin loop's pause.
    @inline(__always)
    public static func relax() { shim_cpu_relax() }

    /// A full barrier (between publishing a word and reading the other
    /// side's flag).
    @inline(__always)
    public static func fullFence() { shim_full_fence() }
}
