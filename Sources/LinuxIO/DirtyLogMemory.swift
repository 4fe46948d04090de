import BridgeCore
import CLinuxShim
#if canImport(Glibc)
import Glibc
#endif

/// VM1's dirty-page log as the device that writes VM1's memory maps it (the
/// log QEMU hands the back end with SET_LOG_BASE, passed on to VM2 by LOG):
/// `size` bytes at `offset` of a sealed memfd, one bit per 4 KiB
/// guest-physical page (`DirtyLog`). Bits are only ever set, with an atomic
/// OR after the write they record; VM1's VMM clears them as it copies pages.
///
/// Sendable without `@unchecked`: the mapping's base address kept as an
/// integer and the sizes, all immutable; the bytes are shared memory whose
/// protocol (set only, atomically) is the callers'.
public final class DirtyLogMemory: Sendable {
    /// Bytes of log (bits for `size * 8` pages).
    public let size: UInt64
    /// The mapping (from the file's start) and the log's first byte in it.
    private let mapping: UInt
    private let mappedBytes: Int
    private let base: UInt

    /// Maps `size` bytes at `offset` of `fd`. Refused unless the file holds
    /// them and is sealed against shrinking (a truncation would otherwise
    /// be a SIGBUS in the writer). The fd is not kept: the caller closes it.
    public init(adopting fd: OwnedFileDescriptor, size: UInt64, offset: UInt64) throws(SystemCallError) {
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard size > 0, !overflow, end <= UInt64(Int.max), offset % 8 == 0 else {
            throw SystemCallError("mmap(dirty log)", errno: .invalidArgument, detail: "size \(size) at offset \(offset) (8-aligned, not wrapping)")
        }
        let memfd = Memfd(adopting: fd)
        let actual = try memfd.size
        guard actual >= end else {
            throw SystemCallError("mmap(dirty log)", errno: .invalidArgument, detail: "the log file holds \(actual) bytes, not \(end)")
        }
        guard try memfd.seals.contains(.shrink) else {
            throw SystemCallError("mmap(dirty log)", errno: .invalidArgument, detail: "the log file is not sealed against shrinking")
        }
        // From the page holding the log's first byte: mmap's offset must be
        // page-aligned, the log's need not be.
        let start = offset & ~UInt64(4095)
        let length = Int(end - start)
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, off_t(start))
        guard let pointer, pointer != shim_map_failed() else { throw .current("mmap(\(length) bytes of the dirty log)") }
        self.size = size
        self.mappedBytes = length
        self.mapping = UInt(bitPattern: pointer)
        self.base = mapping + UInt(offset - start)
    }

    deinit {
        if let p = UnsafeMutableRawPointer(bitPattern: mapping) { munmap(p, mappedBytes) }
    }

    /// The first byte of the log (for the device's burst).
    public var bytes: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: base).unsafelyUnwrapped }

    /// Sets the bits of every page `[gpa, gpa + length)` touches; false
    /// when some page lies past the log (its write cannot be recorded).
    @discardableResult
    public func mark(_ gpa: GuestPhysicalAddress, length: UInt64) -> Bool {
        DirtyLogMemory.mark(bytes, size: size, gpa, length: length)
    }

    /// `mark` on a log at `bytes` of `size` bytes.
    @inline(__always)
    public static func mark(_ bytes: UnsafeMutableRawPointer, size: UInt64, _ gpa: GuestPhysicalAddress, length: UInt64) -> Bool {
        guard let pages = DirtyLog.pages(gpa, length: length) else { return length == 0 }
        var page = pages.lowerBound
        while true {
            let (byte, mask) = DirtyLog.bit(ofPage: page)
            guard byte < size else { return false }
            shim_fetch_or_u8(bytes + Int(byte), mask)
            if page == pages.upperBound { return true }
            page += 1
        }
    }

    /// ORs `bits` into the log's u64 word `word` (pages `64 * word` on);
    /// a word that runs past the log's end is ORed byte by byte as far as
    /// the log goes.
    @inline(__always)
    public static func or(_ bytes: UnsafeMutableRawPointer, size: UInt64, word: UInt64, bits: UInt64) {
        let byte = word << 3
        guard byte < size else { return }
        if size - byte >= 8 {
            shim_fetch_or_u64(bytes + Int(byte), bits)
            return
        }
        for k in 0..<(size - byte) {
            let b = UInt8(truncatingIfNeeded: bits >> (8 * k))
            if b != 0 { shim_fetch_or_u8(bytes + Int(byte + k), b) }
        }
    }

    /// Whether page `page`'s bit is set (tests, and VM1's side).
    public func isMarked(page: UInt64) -> Bool {
        let (byte, mask) = DirtyLog.bit(ofPage: page)
        guard byte < size else { return false }
        return bytes.load(fromByteOffset: Int(byte), as: UInt8.self) & mask != 0
    }
}
