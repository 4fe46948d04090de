/// The dirty-page log of vhost-user live migration (VHOST_F_LOG_ALL with
/// VHOST_USER_PROTOCOL_F_LOG_SHMFD), as arithmetic: one bit per 4 KiB page of
/// VM1's guest-physical memory, bit `page % 8` of byte `page / 8` (QEMU reads
/// it as little-endian u64 words: the same bits). Pure: the memory itself is
/// `DirtyLogMemory` (LinuxIO), the writer the device engine.
public enum DirtyLog {
    /// The log's page: VHOST_LOG_PAGE, whatever the guest's page size.
    public static let pageSize: UInt64 = 0x1000
    public static let pageShift: UInt64 = 12

    /// The pages `[gpa, gpa + length)` touches (inclusive bounds); nil for
    /// an empty range or one that wraps past the end of the address space.
    public static func pages(_ gpa: GuestPhysicalAddress, length: UInt64) -> ClosedRange<UInt64>? {
        guard length > 0 else { return nil }
        let (last, overflow) = gpa.rawValue.addingReportingOverflow(length - 1)
        guard !overflow else { return nil }
        return (gpa.rawValue >> pageShift)...(last >> pageShift)
    }

    /// Where page `page`'s bit lives: its byte in the log, and the mask.
    public static func bit(ofPage page: UInt64) -> (byte: UInt64, mask: UInt8) {
        (page >> 3, UInt8(1) << UInt8(page & 7))
    }

    /// Bytes a log needs to cover guest-physical memory up to `end`
    /// (exclusive): a region that ends mid-page still needs that page's bit,
    /// and a page's bit needs its whole byte.
    public static func bytesNeeded(toCover end: UInt64) -> UInt64 {
        guard end > 0 else { return 0 }
        let pages = (end - 1) >> pageShift + 1
        return (pages + 7) >> 3
    }

    /// Bytes a log needs for every region of `table` (the highest
    /// guest-physical end decides).
    public static func bytesNeeded(for table: MemoryRegionTable) -> UInt64 {
        let end = table.regions.reduce(UInt64(0)) { highest, r in
            max(highest, r.guestPhysical.adding(r.size)?.rawValue ?? UInt64.max)
        }
        return end == UInt64.max ? UInt64.max : bytesNeeded(toCover: end)
    }
}

/// The log VM1 handed over with SET_LOG_BASE: `size` bytes at `offset` in
/// its fd (a sealed memfd), checked before anyone maps it.
public struct DirtyLogArea: Equatable, Sendable, CustomStringConvertible {
    public let size: UInt64
    public let offset: UInt64

    public enum Problem: Error, Equatable, Sendable, CustomStringConvertible {
        case empty
        case wraps(size: UInt64, offset: UInt64)
        case pastFile(end: UInt64, fileSize: UInt64?)
        case misaligned(offset: UInt64)
        case tooSmall(size: UInt64, needed: UInt64)
        case tooLarge(size: UInt64, maximum: UInt64)

        public var description: String {
            switch self {
            case .empty: "the log is empty (size 0)"
            case .wraps(let s, let o): "the log's offset \(Hex(o)) plus size \(Hex(s)) wraps"
            case .pastFile(let end, let file):
                "the log ends at \(Hex(end)) in its file, which has \(file.map { "\(Hex($0)) bytes" } ?? "no known size")"
            case .misaligned(let o): "the log's offset \(Hex(o)) is not a multiple of 8"
            case .tooSmall(let s, let n): "the log has \(s) bytes; VM1's memory table needs \(n) (one bit per 4 KiB page)"
            case .tooLarge(let s, let m): "the log has \(s) bytes, more than \(m) (twice what VM1's memory table needs, plus 1 MiB): VM2 would map it all"
            }
        }
    }

    /// Checks `size` bytes at `offset` in a file of `fileSize` bytes against
    /// the memory table the log must cover.
    public init(size: UInt64, offset: UInt64, fileSize: UInt64?, covering table: MemoryRegionTable) throws(Problem) {
        guard size > 0 else { throw .empty }
        guard offset % 8 == 0 else { throw .misaligned(offset: offset) }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard !overflow else { throw .wraps(size: size, offset: offset) }
        guard let fileSize, end <= fileSize else { throw .pastFile(end: end, fileSize: fileSize) }
        try Self.check(size: size, covers: table)
        let maximum = Self.maximumSize(covering: table)
        guard size <= maximum else { throw .tooLarge(size: size, maximum: maximum) }
        self.size = size
        self.offset = offset
    }

    /// The largest log taken for `table`: twice what it needs plus 1 MiB
    /// (QEMU's is what it needs plus 4 KiB of slack; VM2 maps all of it).
    public static func maximumSize(covering table: MemoryRegionTable) -> UInt64 {
        let needed = DirtyLog.bytesNeeded(for: table)
        let (twice, o1) = needed.multipliedReportingOverflow(by: 2)
        let (sum, o2) = twice.addingReportingOverflow(1 << 20)
        return o1 || o2 ? UInt64.max : sum
    }

    /// Whether a log of `size` bytes covers `table`.
    public static func check(size: UInt64, covers table: MemoryRegionTable) throws(Problem) {
        let needed = DirtyLog.bytesNeeded(for: table)
        guard size >= needed else { throw .tooSmall(size: size, needed: needed) }
    }

    public var description: String { "\(Hex(size)) bytes at \(Hex(offset))" }
}
