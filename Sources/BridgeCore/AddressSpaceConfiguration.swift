/// How one bridge exposes VM1 memory (DESIGN §2).
public enum BridgeMode: String, Sendable, CaseIterable, CustomStringConvertible {
    /// No vIOMMU on VM1: every memory-table region appears at offset = GPA.
    case identity
    /// vIOMMU: only IOTLB-mapped ranges appear, at offset = IOVA.
    case iommu
    /// vIOMMU limited to fixed windows; `freeze` stops all remapping.
    case `static`

    public var description: String { rawValue }
}

/// A half-open range of bus addresses `[base, limit)`: a static window or the
/// DMA window VM1's IOMMU must allocate from.
public struct BusWindow: Equatable, Hashable, Sendable, CustomStringConvertible {
    public let base: BusAddress
    /// Exclusive end.
    public let limit: UInt64

    /// nil when `limit <= base`.
    public init?(base: BusAddress, limit: UInt64) {
        guard limit > base.rawValue else { return nil }
        self.base = base
        self.limit = limit
    }

    public var length: UInt64 { limit - base.rawValue }

    /// Whether `[start, end)` lies inside. `end` is exclusive and `>= start`.
    public func contains(start: UInt64, end: UInt64) -> Bool {
        start >= base.rawValue && end <= limit
    }

    public var description: String { "[\(Hex(base.rawValue)), \(Hex(limit)))" }
}

/// Why an address-space configuration was refused; each case names the key.
public enum ConfigurationError: Error, Equatable, Sendable, CustomStringConvertible {
    case barSizeNotPowerOfTwo(UInt64)
    case barSizeOutOfRange(UInt64, minimum: UInt64, maximum: UInt64)
    case pageSizeInvalid(UInt64)
    case windowOutsideBAR(key: String, BusWindow, barSize: UInt64)
    case windowMisaligned(key: String, BusWindow, pageSize: UInt64)
    case staticWindowsOverlap(BusWindow, BusWindow)
    case staticWindowsNeedStaticMode(BridgeMode)
    case staticModeNeedsWindows
    case maxMappingsInvalid(Int)

    public var key: String {
        switch self {
        case .barSizeNotPowerOfTwo, .barSizeOutOfRange: "bar-size"
        case .pageSizeInvalid: "page-size"
        case .windowOutsideBAR(let key, _, _), .windowMisaligned(let key, _, _): key
        case .staticWindowsOverlap, .staticWindowsNeedStaticMode, .staticModeNeedsWindows: "static-windows"
        case .maxMappingsInvalid: "max-mappings"
        }
    }

    public var description: String {
        switch self {
        case .barSizeNotPowerOfTwo(let v):
            "bar-size: \(Hex(v)) is not a power of two"
        case .barSizeOutOfRange(let v, let lo, let hi):
            "bar-size: \(ByteCount(v)) is outside [\(ByteCount(lo)), \(ByteCount(hi))]"
        case .pageSizeInvalid(let v):
            "page-size: \(v) must be a power of two of at least 4096"
        case .windowOutsideBAR(let key, let w, let bar):
            "\(key): window \(w) does not fit in a BAR of \(ByteCount(bar))"
        case .windowMisaligned(let key, let w, let page):
            "\(key): window \(w) is not aligned to the page size \(page)"
        case .staticWindowsOverlap(let a, let b):
            "static-windows: \(a) overlaps \(b)"
        case .staticWindowsNeedStaticMode(let mode):
            "static-windows: only allowed in static mode (mode is \(mode))"
        case .staticModeNeedsWindows:
            "static-windows: static mode needs at least one window"
        case .maxMappingsInvalid(let v):
            "max-mappings: \(v) must be at least 1"
        }
    }
}

/// The shape of one BAR and the rules it enforces.
public struct AddressSpaceConfiguration: Equatable, Sendable {
    public static let minimumBARSize: UInt64 = 1 << 12
    /// 256 TiB: far above the 1 TiB the design asks for, and still leaves room
    /// in a 47-bit user address space for the reservation.
    public static let maximumBARSize: UInt64 = 1 << 48
    /// Well below the kernel's default `vm.max_map_count` (65530) for the whole
    /// process, so several bridges fit.
    public static let defaultMaxMappings = 16_384

    public var barSize: UInt64
    public var pageSize: UInt64
    public var mode: BridgeMode
    public var dmaWindow: BusWindow?
    public var staticWindows: [BusWindow]
    public var maxMappings: Int
    /// iommu/static mode: an update that covers part of a huge page is
    /// widened to whole huge pages instead of refused. This exposes to VM2
    /// the rest of each huge page the update touches (up to a huge page minus
    /// one base page on either side) — memory VM1 did not map at that IOVA.
    public var roundOutHugePages = false

    public init(barSize: UInt64, pageSize: UInt64 = 4096, mode: BridgeMode, dmaWindow: BusWindow? = nil,
                staticWindows: [BusWindow] = [], maxMappings: Int = AddressSpaceConfiguration.defaultMaxMappings) {
        self.barSize = barSize
        self.pageSize = pageSize
        self.mode = mode
        self.dmaWindow = dmaWindow
        self.staticWindows = staticWindows
        self.maxMappings = maxMappings
    }

    public func validate() throws(ConfigurationError) {
        guard pageSize >= 4096, pageSize.nonzeroBitCount == 1 else { throw .pageSizeInvalid(pageSize) }
        guard barSize.nonzeroBitCount == 1 else { throw .barSizeNotPowerOfTwo(barSize) }
        guard barSize >= max(Self.minimumBARSize, pageSize), barSize <= Self.maximumBARSize else {
            throw .barSizeOutOfRange(barSize, minimum: max(Self.minimumBARSize, pageSize), maximum: Self.maximumBARSize)
        }
        guard maxMappings >= 1 else { throw .maxMappingsInvalid(maxMappings) }
        if let w = dmaWindow {
            guard w.limit <= barSize else { throw .windowOutsideBAR(key: "dma-window", w, barSize: barSize) }
            guard w.base.rawValue % pageSize == 0, w.limit % pageSize == 0 else {
                throw .windowMisaligned(key: "dma-window", w, pageSize: pageSize)
            }
        }
        if mode == .static {
            guard !staticWindows.isEmpty else { throw .staticModeNeedsWindows }
        } else if !staticWindows.isEmpty {
            throw .staticWindowsNeedStaticMode(mode)
        }
        for w in staticWindows {
            guard w.limit <= barSize else { throw .windowOutsideBAR(key: "static-windows", w, barSize: barSize) }
            guard w.base.rawValue % pageSize == 0, w.limit % pageSize == 0 else {
                throw .windowMisaligned(key: "static-windows", w, pageSize: pageSize)
            }
        }
        let sorted = staticWindows.sorted { $0.base < $1.base }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.base.rawValue < a.limit {
            throw .staticWindowsOverlap(a, b)
        }
    }
}

extension BusWindow {
    /// Parses `BASE:LIMIT` (limit exclusive), each a size such as `4G` or
    /// `0x100000000`. nil when either side is not a size or limit <= base.
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let base = parseByteSize(String(parts[0])), let limit = parseByteSize(String(parts[1])) else {
            return nil
        }
        self.init(base: BusAddress(base), limit: limit)
    }
}
