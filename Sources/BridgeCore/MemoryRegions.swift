/// Identifies one memory region VM1 shared. The region's fd lives outside
/// BridgeCore (LinuxIO owns it); this id is how a mapping names its source.
public struct RegionID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (lhs: RegionID, rhs: RegionID) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { "region#\(rawValue)" }
    /// The largest id a region gets (56 bits: a `Mapping` keeps the id and
    /// its permission in one word). A table that has handed out every id
    /// refuses new regions; at a million regions a second that is 2 000
    /// years away.
    public static let maximum: UInt64 = (1 << 56) - 1
}

/// One region as a vhost-user memory-table message describes it
/// (`VhostUserMemoryRegion`): unvalidated, straight from the wire.
public struct RegionDescriptor: Equatable, Sendable {
    public var guestPhysical: GuestPhysicalAddress
    public var size: UInt64
    public var userAddress: FrontendUserAddress
    public var mmapOffset: UInt64

    public init(guestPhysical: GuestPhysicalAddress, size: UInt64, userAddress: FrontendUserAddress, mmapOffset: UInt64) {
        self.guestPhysical = guestPhysical
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }
}

/// A validated region: every `x + size` below is known not to overflow.
public struct MemoryRegion: Equatable, Sendable {
    public let id: RegionID
    public let guestPhysical: GuestPhysicalAddress
    public let size: UInt64
    public let userAddress: FrontendUserAddress
    /// Offset of the region's first byte inside its fd.
    public let mmapOffset: UInt64
    /// What VM1 lets the device do with this memory. vhost-user regions are
    /// read/write; the type allows narrower regions (static windows, tests).
    public let permission: Permission
    /// The page size of the memory behind the fd: the huge page size for
    /// hugetlbfs (and MFD_HUGETLB memfds), else 0 (ordinary pages). A huge
    /// page can only be mapped, and unmapped, whole.
    public let hugePageSize: UInt64

    public init(id: RegionID, guestPhysical: GuestPhysicalAddress, size: UInt64, userAddress: FrontendUserAddress,
                mmapOffset: UInt64, permission: Permission, hugePageSize: UInt64 = 0) {
        self.id = id; self.guestPhysical = guestPhysical; self.size = size; self.userAddress = userAddress
        self.mmapOffset = mmapOffset; self.permission = permission; self.hugePageSize = hugePageSize
    }

    public var descriptor: RegionDescriptor {
        RegionDescriptor(guestPhysical: guestPhysical, size: size, userAddress: userAddress, mmapOffset: mmapOffset)
    }

    /// Where `[address, address + length)` of the front end's address space
    /// lives in this region, as an offset from the region start; nil unless the
    /// whole range is inside.
    public func offset(ofUser address: FrontendUserAddress, length: UInt64) -> UInt64? {
        guard let offset = address.offset(from: userAddress), offset < size,
              length <= size - offset else { return nil }
        return offset
    }

    /// Same as `offset(ofUser:length:)` for a guest-physical range.
    public func offset(ofGuestPhysical address: GuestPhysicalAddress, length: UInt64) -> UInt64? {
        guard let offset = address.offset(from: guestPhysical), offset < size,
              length <= size - offset else { return nil }
        return offset
    }
}

/// Why a memory-table change was refused. Every case names the rule.
public enum MemoryRegionError: Error, Equatable, Sendable, CustomStringConvertible {
    case zeroSize(GuestPhysicalAddress)
    /// `field + size` wraps past 2^64 (`field` is the wire name).
    case overflow(field: String, value: UInt64, size: UInt64)
    case overlapsGuestPhysical(GuestPhysicalAddress, size: UInt64, existing: RegionID)
    case overlapsUserAddress(FrontendUserAddress, size: UInt64, existing: RegionID)
    /// `mmap_offset + size` lies past the end of the file the fd refers to.
    case beyondFile(mmapOffset: UInt64, size: UInt64, fileSize: UInt64)
    case tooManyRegions(limit: Int)
    case noMatchingRegion(RegionDescriptor)
    /// A hugepage-backed region whose offset or size is not a whole number of its pages.
    case hugePageMisaligned(field: String, value: UInt64, hugePageSize: UInt64)
    /// The table handed out every region id (`RegionID.maximum`).
    case regionIDsExhausted

    public var rule: String {
        switch self {
        case .zeroSize: "region-size"
        case .overflow: "region-overflow"
        case .overlapsGuestPhysical, .overlapsUserAddress: "region-overlap"
        case .beyondFile: "region-file-bounds"
        case .tooManyRegions: "region-slots"
        case .noMatchingRegion: "region-unknown"
        case .hugePageMisaligned: "huge-page"
        case .regionIDsExhausted: "region-ids"
        }
    }

    public var description: String {
        switch self {
        case .zeroSize(let gpa):
            "memory region at \(gpa) has size 0"
        case .overflow(let field, let value, let size):
            "memory region \(field) \(Hex(value)) + size \(Hex(size)) wraps past 2^64"
        case .overlapsGuestPhysical(let gpa, let size, let existing):
            "memory region \(gpa) size \(Hex(size)) overlaps \(existing) in guest-physical space"
        case .overlapsUserAddress(let uaddr, let size, let existing):
            "memory region \(uaddr) size \(Hex(size)) overlaps \(existing) in the front end's address space"
        case .beyondFile(let off, let size, let fileSize):
            "memory region mmap_offset \(Hex(off)) + size \(Hex(size)) is past the end of its fd (\(Hex(fileSize)) bytes)"
        case .tooManyRegions(let limit):
            "memory table would exceed \(limit) regions"
        case .hugePageMisaligned(let field, let value, let huge):
            "memory region \(field) \(Hex(value)) is not a multiple of its huge page size \(ByteCount(huge))"
        case .noMatchingRegion(let d):
            "no memory region matches \(d.guestPhysical) size \(Hex(d.size)) \(d.userAddress)"
        case .regionIDsExhausted:
            "every region id up to \(Hex(RegionID.maximum)) was handed out in this session"
        }
    }
}

/// The memory VM1 shared with the back end: SET_MEM_TABLE replaces it,
/// ADD_MEM_REG / REM_MEM_REG edit it. Regions never overlap, in guest-physical
/// space or in the front end's address space. Pure value type: a refused change
/// leaves the table exactly as it was.
public struct MemoryRegionTable: Equatable, Sendable {
    public let maxRegions: Int
    /// Sorted by user address.
    public private(set) var regions: [MemoryRegion] = []
    private var nextID: UInt64 = 1

    public init(maxRegions: Int = 32) {
        self.maxRegions = max(1, maxRegions)
    }

    /// A table whose next region gets `nextID` (tests: the end of the ids).
    init(maxRegions: Int = 32, nextID: UInt64) {
        self.init(maxRegions: maxRegions)
        self.nextID = nextID
    }

    public var count: Int { regions.count }

    public func region(_ id: RegionID) -> MemoryRegion? {
        regions.first { $0.id == id }
    }

    /// Validates one descriptor in isolation (sizes and overflow, and the fd's
    /// size when known).
    public static func validate(_ d: RegionDescriptor, fileSize: UInt64?) throws(MemoryRegionError) {
        guard d.size > 0 else { throw .zeroSize(d.guestPhysical) }
        guard d.guestPhysical.adding(d.size) != nil else {
            throw .overflow(field: "guest_phys_addr", value: d.guestPhysical.rawValue, size: d.size)
        }
        guard d.userAddress.adding(d.size) != nil else {
            throw .overflow(field: "userspace_addr", value: d.userAddress.rawValue, size: d.size)
        }
        let (end, overflow) = d.mmapOffset.addingReportingOverflow(d.size)
        guard !overflow else { throw .overflow(field: "mmap_offset", value: d.mmapOffset, size: d.size) }
        if let fileSize, end > fileSize {
            throw .beyondFile(mmapOffset: d.mmapOffset, size: d.size, fileSize: fileSize)
        }
    }

    private func checkOverlap(_ d: RegionDescriptor, against others: [MemoryRegion]) throws(MemoryRegionError) {
        // Ends cannot overflow: validate() ran first for every region here.
        let gStart = d.guestPhysical.rawValue, gEnd = gStart + d.size
        let uStart = d.userAddress.rawValue, uEnd = uStart + d.size
        for r in others {
            if gStart < r.guestPhysical.rawValue + r.size && r.guestPhysical.rawValue < gEnd {
                throw .overlapsGuestPhysical(d.guestPhysical, size: d.size, existing: r.id)
            }
            if uStart < r.userAddress.rawValue + r.size && r.userAddress.rawValue < uEnd {
                throw .overlapsUserAddress(d.userAddress, size: d.size, existing: r.id)
            }
        }
    }

    private mutating func insert(_ d: RegionDescriptor, permission: Permission, hugePageSize: UInt64) throws(MemoryRegionError) -> MemoryRegion {
        guard nextID <= RegionID.maximum else { throw .regionIDsExhausted }
        let region = MemoryRegion(id: RegionID(nextID), guestPhysical: d.guestPhysical, size: d.size,
                                  userAddress: d.userAddress, mmapOffset: d.mmapOffset, permission: permission,
                                  hugePageSize: hugePageSize)
        nextID += 1
        let index = regions.firstIndex { $0.userAddress > region.userAddress } ?? regions.endIndex
        regions.insert(region, at: index)
        return region
    }

    /// ADD_MEM_REG. `fileSize` is the size of the fd that came with it (nil
    /// when unknown, e.g. in pure tests).
    @discardableResult
    public mutating func add(_ d: RegionDescriptor, fileSize: UInt64?, hugePageSize: UInt64 = 0,
                             permission: Permission = .readWrite) throws(MemoryRegionError) -> MemoryRegion {
        try Self.validate(d, fileSize: fileSize)
        if hugePageSize > 0 {
            // Only whole huge pages can be mapped (a power of two: fstatfs's block size).
            guard hugePageSize.nonzeroBitCount == 1 else { throw .hugePageMisaligned(field: "page size", value: hugePageSize, hugePageSize: hugePageSize) }
            guard d.mmapOffset % hugePageSize == 0 else { throw .hugePageMisaligned(field: "mmap_offset", value: d.mmapOffset, hugePageSize: hugePageSize) }
            guard d.size % hugePageSize == 0 else { throw .hugePageMisaligned(field: "size", value: d.size, hugePageSize: hugePageSize) }
        }
        guard regions.count < maxRegions else { throw .tooManyRegions(limit: maxRegions) }
        try checkOverlap(d, against: regions)
        return try insert(d, permission: permission, hugePageSize: hugePageSize)
    }

    /// REM_MEM_REG: the region whose guest address, size and user address all
    /// match (the spec identifies regions that way; mmap_offset is ignored).
    public mutating func remove(matching d: RegionDescriptor) throws(MemoryRegionError) -> MemoryRegion {
        guard let index = regions.firstIndex(where: {
            $0.guestPhysical == d.guestPhysical && $0.size == d.size && $0.userAddress == d.userAddress
        }) else { throw .noMatchingRegion(d) }
        return regions.remove(at: index)
    }

    /// SET_MEM_TABLE: validates the whole new table first; on success the old
    /// regions are replaced (their ids are returned so their mappings can be
    /// revoked) and the new ones are returned in descriptor order.
    public mutating func replaceAll(with descriptors: [RegionDescriptor], fileSizes: [UInt64?],
                                    hugePageSizes: [UInt64] = []) throws(MemoryRegionError) -> (removed: [MemoryRegion], added: [MemoryRegion]) {
        guard descriptors.count <= maxRegions else { throw .tooManyRegions(limit: maxRegions) }
        var next = MemoryRegionTable(maxRegions: maxRegions)
        next.nextID = nextID
        var added: [MemoryRegion] = []
        for (i, d) in descriptors.enumerated() {
            let size = i < fileSizes.count ? fileSizes[i] : nil
            let huge = i < hugePageSizes.count ? hugePageSizes[i] : 0
            added.append(try next.add(d, fileSize: size, hugePageSize: huge))
        }
        let removed = regions
        self = next
        return (removed, added)
    }

    /// Front-end user range → (region, offset in region). The range must lie
    /// inside one region.
    public func translate(user address: FrontendUserAddress, length: UInt64) -> (region: MemoryRegion, offset: UInt64)? {
        // Last region starting at or below `address` (regions sorted by uaddr).
        var lo = 0, hi = regions.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if regions[mid].userAddress <= address { lo = mid + 1 } else { hi = mid }
        }
        guard lo > 0 else { return nil }
        let region = regions[lo - 1]
        guard let offset = region.offset(ofUser: address, length: length) else { return nil }
        return (region, offset)
    }

    /// Guest-physical range → (region, offset in region), inside one region.
    public func translate(guestPhysical address: GuestPhysicalAddress, length: UInt64) -> (region: MemoryRegion, offset: UInt64)? {
        for region in regions {
            if let offset = region.offset(ofGuestPhysical: address, length: length) { return (region, offset) }
        }
        return nil
    }

    /// Front-end user address → guest-physical address (vring addresses without
    /// VIRTIO_F_IOMMU_PLATFORM are user addresses; in identity mode the BAR
    /// offset is the GPA).
    public func guestPhysical(ofUser address: FrontendUserAddress, length: UInt64) -> GuestPhysicalAddress? {
        guard let (region, offset) = translate(user: address, length: length) else { return nil }
        return GuestPhysicalAddress(region.guestPhysical.rawValue + offset)
    }
}
