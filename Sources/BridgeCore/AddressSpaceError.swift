/// What a checked access is for; named in errors.
public enum AccessPurpose: String, Sendable, Equatable, CustomStringConvertible {
    case descriptorTable = "descriptor table"
    case availRing = "avail ring"
    case usedRing = "used ring"
    case access = "access"
    case translation = "translation"
    public var description: String { rawValue }
}

/// Where the bytes of a new mapping come from.
public enum MappingSource: Equatable, Sendable {
    /// IOTLB update: `uaddr` in the front end's address space.
    case user(FrontendUserAddress)
    /// Operator / static map: a guest-physical address.
    case guestPhysical(GuestPhysicalAddress)
}

/// Why the address space refused a change or an access. Every case names the
/// rule, the address and the limit; `rule` is a stable label for metrics.
public enum AddressSpaceError: Error, Equatable, Sendable, CustomStringConvertible {
    case zeroLength(BusAddress)
    case rangeWraps(start: UInt64, length: UInt64)
    case outsideBAR(BusAddress, length: UInt64, barSize: UInt64)
    case misaligned(field: String, value: UInt64, pageSize: UInt64)
    case notBacked(MappingSource, length: UInt64)
    case permissionExceedsRegion(requested: Permission, allowed: Permission, region: RegionID)
    case emptyPermission(BusAddress)
    case outsideStaticWindows(BusAddress, length: UInt64)
    case frozen(operation: String)
    case outsideDMAWindow(BusAddress, length: UInt64, window: BusWindow)
    case wrongMode(operation: String, mode: BridgeMode)
    case tooManyMappings(limit: Int, wouldBe: Int)
    /// The process-wide budget (derived from vm.max_map_count, shared by every
    /// bridge) leaves this bridge `available` mappings.
    case mappingBudget(available: Int, wouldBe: Int)
    /// Hugepage-backed memory maps and unmaps in whole huge pages only.
    case hugePage(BusAddress, length: UInt64, hugePageSize: UInt64)
    case overlapsExisting(BusAddress, length: UInt64, existing: Mapping)
    case invalidQueueSize(UInt32)
    case ringMisaligned(AccessPurpose, BusAddress, alignment: UInt64)
    case notMapped(AccessPurpose, BusAddress, length: UInt64, firstMissing: BusAddress)
    case accessDenied(AccessPurpose, BusAddress, needed: Permission, granted: Permission)

    public var rule: String {
        switch self {
        case .zeroLength: "zero-length"
        case .rangeWraps: "wrap-around"
        case .outsideBAR: "bar-bounds"
        case .misaligned: "page-alignment"
        case .notBacked: "region-backing"
        case .permissionExceedsRegion: "region-permission"
        case .emptyPermission: "empty-permission"
        case .outsideStaticWindows: "static-window"
        case .frozen: "frozen"
        case .outsideDMAWindow: "dma-window"
        case .wrongMode: "mode"
        case .tooManyMappings: "mapping-limit"
        case .mappingBudget: "mapping-budget"
        case .hugePage: "huge-page"
        case .overlapsExisting: "overlap"
        case .invalidQueueSize: "queue-size"
        case .ringMisaligned: "ring-alignment"
        case .notMapped: "not-mapped"
        case .accessDenied: "permission"
        }
    }

    public var description: String {
        switch self {
        case .zeroLength(let bus):
            "[\(rule)] range at \(bus) has length 0"
        case .rangeWraps(let start, let length):
            "[\(rule)] \(Hex(start)) + \(Hex(length)) wraps past 2^64"
        case .outsideBAR(let bus, let length, let bar):
            "[\(rule)] \(bus)+\(Hex(length)) ends past the BAR (size \(Hex(bar)))"
        case .misaligned(let field, let value, let page):
            "[\(rule)] \(field) \(Hex(value)) is not a multiple of the page size \(Hex(page))"
        case .notBacked(let source, let length):
            switch source {
            case .user(let u): "[\(rule)] \(u)+\(Hex(length)) is not inside one memory region VM1 shared"
            case .guestPhysical(let g): "[\(rule)] \(g)+\(Hex(length)) is not inside one memory region VM1 shared"
            }
        case .permissionExceedsRegion(let requested, let allowed, let region):
            "[\(rule)] permission \(requested) exceeds \(allowed) allowed by \(region)"
        case .emptyPermission(let bus):
            "[\(rule)] mapping at \(bus) asks for no access (perm 0)"
        case .outsideStaticWindows(let bus, let length):
            "[\(rule)] \(bus)+\(Hex(length)) is not inside a configured static window"
        case .frozen(let op):
            "[\(rule)] \(op) refused: the address space is frozen"
        case .outsideDMAWindow(let bus, let length, let window):
            "[\(rule)] \(bus)+\(Hex(length)) is outside the DMA window \(window)"
        case .wrongMode(let op, let mode):
            "[\(rule)] \(op) is not allowed in \(mode) mode"
        case .tooManyMappings(let limit, let wouldBe):
            "[\(rule)] the change would need \(wouldBe) mappings; the limit is \(limit)"
        case .mappingBudget(let available, let wouldBe):
            "[\(rule)] \(wouldBe) mappings would exceed the \(available) this bridge may hold now: the daemon's mapping budget (from vm.max_map_count) is shared by every bridge"
        case .hugePage(let bus, let length, let huge):
            "[\(rule)] \(bus)+\(Hex(length)) covers part of a \(ByteCount(huge)) huge page: hugepage-backed memory is granted in whole pages (option round-out-huge-pages widens such updates)"
        case .overlapsExisting(let bus, let length, let existing):
            "[\(rule)] \(bus)+\(Hex(length)) overlaps the existing mapping \(existing)"
        case .invalidQueueSize(let n):
            "[\(rule)] queue size \(n) is not a power of two in 1...32768"
        case .ringMisaligned(let purpose, let bus, let alignment):
            "[\(rule)] \(purpose) at \(bus) is not \(alignment)-byte aligned"
        case .notMapped(let purpose, let bus, let length, let missing):
            "[\(rule)] \(purpose) \(bus)+\(Hex(length)) is not mapped at \(missing)"
        case .accessDenied(let purpose, let bus, let needed, let granted):
            "[\(rule)] \(purpose) at \(bus) needs \(needed) but the mapping grants \(granted)"
        }
    }
}
