/// One live range of the BAR: `[bus, bus + length)` shows
/// `[fdOffset, fdOffset + length)` of `region`'s fd with `permission`.
///
/// 32 bytes: the region and the permission share one word (a region id has
/// at most 56 bits: `RegionID.maximum`), so a bridge's 100 000 live IOTLB
/// mappings take 3.2 MB in its table instead of 4 MB.
public struct Mapping: Equatable, Sendable, CustomStringConvertible {
    public let bus: BusAddress
    public let length: UInt64
    /// Offset inside the region's fd (not inside the region).
    public let fdOffset: UInt64
    /// The region's id in the low 56 bits, the permission in the top 8.
    private let regionAndPermission: UInt64

    public var region: RegionID { RegionID(regionAndPermission & RegionID.maximum) }
    public var permission: Permission { Permission(rawValue: UInt8(truncatingIfNeeded: regionAndPermission >> 56)) }

    /// `region` must be at most `RegionID.maximum` (`MemoryRegionTable`
    /// never hands out a larger one).
    public init(bus: BusAddress, length: UInt64, permission: Permission, region: RegionID, fdOffset: UInt64) {
        precondition(region.rawValue <= RegionID.maximum, "\(region) is beyond RegionID.maximum")
        self.bus = bus
        self.length = length
        self.fdOffset = fdOffset
        self.regionAndPermission = region.rawValue | UInt64(permission.rawValue) << 56
    }

    /// Exclusive end. Never overflows: every stored mapping ends inside the BAR.
    public var end: UInt64 { bus.rawValue + length }

    /// The part of this mapping inside `[start, end)`; nil when disjoint.
    public func clipped(to start: UInt64, _ end: UInt64) -> Mapping? {
        let s = max(start, bus.rawValue), e = min(end, self.end)
        guard s < e else { return nil }
        return Mapping(bus: BusAddress(s), length: e - s, permission: permission, region: region,
                       fdOffset: fdOffset + (s - bus.rawValue))
    }

    /// Whether `next` continues this mapping: adjacent in the BAR, same
    /// permission, same fd, contiguous in the fd. Such neighbours are kept as
    /// one mapping (one kernel VMA), which keeps the process far below
    /// `vm.max_map_count`.
    public func isContinued(by next: Mapping) -> Bool {
        guard end == next.bus.rawValue, permission == next.permission, region == next.region else { return false }
        let (fdEnd, overflow) = fdOffset.addingReportingOverflow(length)
        return !overflow && fdEnd == next.fdOffset
    }

    public var description: String {
        "\(bus)+\(Hex(length)) \(permission) \(region)@\(Hex(fdOffset))"
    }
}

extension Mapping: RangeMapElement {
    public var start: UInt64 { bus.rawValue }

    public func joined(with next: Mapping) -> Mapping? {
        guard isContinued(by: next) else { return nil }
        return Mapping(bus: bus, length: length + next.length, permission: permission, region: region, fdOffset: fdOffset)
    }
}

/// One step for `BARWindow` to carry out.
public enum WindowOperation: Equatable, Sendable, CustomStringConvertible {
    /// mmap `[fdOffset, fdOffset+length)` of the region's fd at BAR offset
    /// `bus` with MAP_FIXED | MAP_SHARED (atomically replacing whatever was there).
    case map(bus: BusAddress, length: UInt64, permission: Permission, region: RegionID, fdOffset: UInt64)
    /// Change only the protection; the backing stays (`region` at `fdOffset`,
    /// carried so the change can be mirrored to VM2 without reading the model back).
    case protect(bus: BusAddress, length: UInt64, permission: Permission, region: RegionID, fdOffset: UInt64)
    /// Put PROT_NONE anonymous memory back: a hole never exposes anything.
    case unmap(bus: BusAddress, length: UInt64)

    public var bus: BusAddress {
        switch self {
        case .map(let bus, _, _, _, _), .protect(let bus, _, _, _, _), .unmap(let bus, _): bus
        }
    }

    public var length: UInt64 {
        switch self {
        case .map(_, let length, _, _, _), .protect(_, let length, _, _, _), .unmap(_, let length): length
        }
    }

    public var description: String {
        switch self {
        case .map(let bus, let length, let perm, let region, let off):
            "map \(bus)+\(Hex(length)) \(perm) from \(region)@\(Hex(off))"
        case .protect(let bus, let length, let perm, let region, let off):
            "protect \(bus)+\(Hex(length)) \(perm) (\(region)@\(Hex(off)))"
        case .unmap(let bus, let length):
            "unmap \(bus)+\(Hex(length))"
        }
    }
}

/// What a change to the model requires of the window, in order.
public struct WindowPlan: Equatable, Sendable {
    public var operations: [WindowOperation]
    /// The plan takes access away from somebody who may hold it: an unmap, a
    /// protect, or a map that replaces an existing mapping. Such plans must be
    /// acknowledged by VM2 before VM1 is (synchronous revocation).
    public var revokesAccess: Bool

    public init(_ operations: [WindowOperation] = [], replacesExisting: Bool = false) {
        self.operations = operations
        self.revokesAccess = replacesExisting || operations.contains {
            switch $0 {
            case .unmap, .protect: true
            case .map: false
            }
        }
    }
    public var isEmpty: Bool { operations.isEmpty }
    public static let empty = WindowPlan()

    /// Plans are equal when they do the same operations.
    public static func == (a: WindowPlan, b: WindowPlan) -> Bool { a.operations == b.operations }
}
