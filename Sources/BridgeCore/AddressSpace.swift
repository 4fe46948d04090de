/// The model of one vhost-pci BAR (DESIGN §3). Pure: no syscalls. Every
/// mutating method validates everything first; when it throws, nothing
/// changed. On success it returns the `WindowPlan` that makes a `BARWindow`
/// match the model.
///
/// Invariants (checked by `checkInvariants()` in tests): mappings are sorted
/// by bus address, non-overlapping, non-empty, inside the BAR, page aligned,
/// and no two neighbours could be coalesced.
public struct AddressSpace: Sendable {
    public let configuration: AddressSpaceConfiguration
    /// The live mappings, on the one range map (sorted, joined).
    private var map = RangeMap<Mapping>()
    public var mappings: [Mapping] { map.elements }
    public private(set) var isFrozen = false
    public private(set) var mappedBytes: UInt64 = 0
    /// At most this many mappings after a grant (set from the process-wide
    /// mapping budget before each request); nil: only `maxMappings` applies.
    /// Removals are never refused for it.
    public var mappingCeiling: Int?
    /// Huge page size of the regions behind mappings (hugetlbfs memory).
    private var hugePageSizes: [RegionID: UInt64] = [:]

    public init(_ configuration: AddressSpaceConfiguration) throws(ConfigurationError) {
        try configuration.validate()
        self.configuration = configuration
    }

    public var mode: BridgeMode { configuration.mode }
    public var barSize: UInt64 { configuration.barSize }
    public var pageSize: UInt64 { configuration.pageSize }

    // MARK: lookup (O(log n))

    /// The mapping that contains `address`, if any.
    public func lookup(_ address: BusAddress) -> Mapping? {
        map.element(containing: address.rawValue)
    }

    /// The mappings (clipped) that intersect `[bus, bus+length)`.
    public func mappings(intersecting bus: BusAddress, length: UInt64) -> [Mapping] {
        guard let end = bus.adding(length) else { return [] }
        return map.intersecting(bus.rawValue, end.rawValue)
    }

    // MARK: checks shared by every change

    /// Overflow, zero length, BAR bounds and page alignment. Returns the end.
    private func checkRange(_ bus: BusAddress, length: UInt64) throws(AddressSpaceError) -> UInt64 {
        guard length > 0 else { throw .zeroLength(bus) }
        guard let end = bus.adding(length) else { throw .rangeWraps(start: bus.rawValue, length: length) }
        guard end.rawValue <= barSize else { throw .outsideBAR(bus, length: length, barSize: barSize) }
        guard bus.isAligned(to: pageSize) else {
            throw .misaligned(field: "bus address", value: bus.rawValue, pageSize: pageSize)
        }
        guard length % pageSize == 0 else { throw .misaligned(field: "length", value: length, pageSize: pageSize) }
        return end.rawValue
    }

    private func checkPolicy(_ bus: BusAddress, length: UInt64, end: UInt64, operation: String) throws(AddressSpaceError) {
        if mode == .static {
            guard !isFrozen else { throw .frozen(operation: operation) }
            guard configuration.staticWindows.contains(where: { $0.contains(start: bus.rawValue, end: end) }) else {
                throw .outsideStaticWindows(bus, length: length)
            }
        }
        if let window = configuration.dmaWindow, !window.contains(start: bus.rawValue, end: end) {
            throw .outsideDMAWindow(bus, length: length, window: window)
        }
    }

    // MARK: splice (the one place the mapping list changes)

    private typealias Splice = RangeMap<Mapping>.Change

    /// Plans replacing whatever lies in `[start, end)` by `insert`, joining
    /// with the neighbours (the range map's change).
    private func splice(_ start: UInt64, _ end: UInt64, insert: Mapping?) -> Splice {
        map.change(replacing: start, end, with: insert)
    }

    /// Applies a splice in place, after the mapping limit check.
    private mutating func commit(_ change: Splice, inserted: UInt64, allowGrowthPastLimit: Bool = false) throws(AddressSpaceError) {
        if !allowGrowthPastLimit, change.countAfter > mappings.count {
            if change.countAfter > configuration.maxMappings {
                throw .tooManyMappings(limit: configuration.maxMappings, wouldBe: change.countAfter)
            }
            if let ceiling = mappingCeiling, change.countAfter > ceiling {
                throw .mappingBudget(available: ceiling, wouldBe: change.countAfter)
            }
        }
        map.apply(change)
        mappedBytes = mappedBytes - change.removed.reduce(0) { $0 + $1.length } + inserted
    }

    /// Merges adjacent removed pieces into as few unmap operations as possible.
    private static func unmapPlan(for removed: [Mapping]) -> WindowPlan {
        var ops: [WindowOperation] = []
        var start: UInt64 = 0, end: UInt64 = 0
        for piece in removed {
            if !ops.isEmpty, piece.bus.rawValue == end {
                end = piece.end
                ops[ops.count - 1] = .unmap(bus: BusAddress(start), length: end - start)
            } else {
                start = piece.bus.rawValue
                end = piece.end
                ops.append(.unmap(bus: piece.bus, length: piece.length))
            }
        }
        return WindowPlan(ops)
    }

    // MARK: identity mode

    /// Identity mode: a memory-table region appears at BAR offset = its GPA.
    public mutating func mapRegion(_ region: MemoryRegion) throws(AddressSpaceError) -> WindowPlan {
        guard mode == .identity else { throw .wrongMode(operation: "mapping a memory region at its GPA", mode: mode) }
        let bus = BusAddress(region.guestPhysical.rawValue)
        let end = try checkRange(bus, length: region.size)
        guard region.mmapOffset % pageSize == 0 else {
            throw .misaligned(field: "mmap_offset", value: region.mmapOffset, pageSize: pageSize)
        }
        guard !region.permission.isEmpty else { throw .emptyPermission(bus) }
        if region.hugePageSize > pageSize, bus.rawValue % region.hugePageSize != 0 {
            throw .hugePage(bus, length: region.size, hugePageSize: region.hugePageSize)
        }
        if let existing = mappings(intersecting: bus, length: region.size).first {
            throw .overlapsExisting(bus, length: region.size, existing: existing)
        }
        let mapping = Mapping(bus: bus, length: region.size, permission: region.permission,
                              region: region.id, fdOffset: region.mmapOffset)
        try commit(splice(bus.rawValue, end, insert: mapping), inserted: region.size)
        if region.hugePageSize > pageSize { hugePageSizes[region.id] = region.hugePageSize }
        return WindowPlan([.map(bus: bus, length: region.size, permission: region.permission,
                                region: region.id, fdOffset: region.mmapOffset)])
    }

    /// Revokes every mapping backed by `region` (REM_MEM_REG, a replaced
    /// memory table, a closed session). Allowed in every mode and after
    /// `freeze`: memory VM1 no longer shares must never stay visible.
    public mutating func unmapRegion(_ region: RegionID) -> WindowPlan {
        let removed = map.removeAll { $0.region == region }
        guard !removed.isEmpty else { return .empty }
        hugePageSizes[region] = nil
        mappedBytes = map.elements.reduce(0) { $0 + $1.length }
        return Self.unmapPlan(for: removed)
    }

    /// Revokes everything (session end, device reset, daemon stop).
    public mutating func unmapAll() -> WindowPlan {
        let plan = Self.unmapPlan(for: mappings)
        map = RangeMap()
        mappedBytes = 0
        hugePageSizes = [:]
        return plan
    }

    // MARK: iommu / static mode

    /// IOTLB update (or an operator's static map): `[bus, bus+length)` now
    /// shows the memory at `source` with `permission`, replacing whatever
    /// overlapped (IOTLB semantics).
    public mutating func update(bus: BusAddress, length: UInt64, source: MappingSource, permission: Permission,
                                regions: MemoryRegionTable) throws(AddressSpaceError) -> WindowPlan {
        guard mode != .identity else { throw .wrongMode(operation: "IOTLB update", mode: mode) }
        var end = try checkRange(bus, length: length)
        try checkPolicy(bus, length: length, end: end, operation: "IOTLB update")
        var bus = bus, length = length
        guard !permission.isEmpty else { throw .emptyPermission(bus) }
        let found: (region: MemoryRegion, offset: UInt64)?
        switch source {
        case .user(let u): found = regions.translate(user: u, length: length)
        case .guestPhysical(let g): found = regions.translate(guestPhysical: g, length: length)
        }
        guard let (region, offset) = found else { throw .notBacked(source, length: length) }
        guard region.permission.isSuperset(of: permission) else {
            throw .permissionExceedsRegion(requested: permission, allowed: region.permission, region: region.id)
        }
        // Cannot overflow: MemoryRegionTable checked mmap_offset + size.
        var fdOffset = region.mmapOffset + offset
        guard fdOffset % pageSize == 0 else {
            throw .misaligned(field: "source offset", value: fdOffset, pageSize: pageSize)
        }
        let huge = region.hugePageSize
        if huge > pageSize, bus.rawValue % huge != 0 || length % huge != 0 || fdOffset % huge != 0 {
            // Round out to whole huge pages, when allowed and possible (the
            // bus address and the fd offset sit at the same place in a page).
            guard configuration.roundOutHugePages, bus.rawValue % huge == fdOffset % huge else {
                throw .hugePage(bus, length: length, hugePageSize: huge)
            }
            let lead = bus.rawValue % huge
            let (paddedEnd, overflow) = end.addingReportingOverflow((huge - end % huge) % huge)
            guard !overflow, paddedEnd <= barSize else { throw .outsideBAR(bus, length: length, barSize: barSize) }
            bus = BusAddress(bus.rawValue - lead)
            fdOffset -= lead // region offsets are whole huge pages: still inside the region
            end = paddedEnd
            length = end - bus.rawValue
            try checkPolicy(bus, length: length, end: end, operation: "IOTLB update (rounded out to huge pages)")
        }
        // Never split a hugepage-backed mapping inside a huge page.
        for existing in mappings(intersecting: bus, length: length) {
            if let h = hugePageSizes[existing.region], bus.rawValue % h != 0 || end % h != 0 {
                throw .hugePage(bus, length: length, hugePageSize: h)
            }
        }
        let mapping = Mapping(bus: bus, length: length, permission: permission, region: region.id, fdOffset: fdOffset)
        let change = splice(bus.rawValue, end, insert: mapping)
        try commit(change, inserted: length)
        if huge > pageSize { hugePageSizes[region.id] = huge }
        let removed = change.removed

        // Fewest syscalls: nothing if the same bytes are already there with the
        // same permission, an mprotect if only the permission changes.
        let coveredBytes = removed.reduce(0) { $0 + $1.length }
        let sameSource = coveredBytes == length && removed.allSatisfy { piece in
            piece.region == region.id && piece.fdOffset == fdOffset + (piece.bus.rawValue - bus.rawValue)
        }
        if sameSource {
            if removed.allSatisfy({ $0.permission == permission }) { return .empty }
            return WindowPlan([.protect(bus: bus, length: length, permission: permission, region: region.id, fdOffset: fdOffset)])
        }
        return WindowPlan([.map(bus: bus, length: length, permission: permission, region: region.id, fdOffset: fdOffset)],
                          replacesExisting: !removed.isEmpty)
    }

    /// IOTLB invalidate: whatever lies in the range is revoked, splitting
    /// mappings that straddle its ends. The range is widened outward to whole
    /// pages (a partly revoked page must not stay visible). Invalidating a
    /// range with nothing mapped succeeds with an empty plan.
    ///
    /// Revocation fails closed: it is never refused for its size, its
    /// alignment, the mapping limit or a frozen window (`freeze` blocks grants
    /// only). A range reaching past the BAR, or past 2^64, is clipped (a vIOMMU
    /// invalidates whole domains — QEMU's intel-iommu sends [0, 2^39) on a
    /// global flush). A zero length means "from `bus` to the end of the
    /// address space", as Linux's vhost reads it (`iova + size - 1` wraps).
    public mutating func invalidate(bus: BusAddress, length: UInt64) throws(AddressSpaceError) -> WindowPlan {
        guard mode != .identity else { throw .wrongMode(operation: "IOTLB invalidate", mode: mode) }
        guard bus.rawValue < barSize else { return .empty } // nothing can be mapped there
        let end = length == 0 ? barSize : min(bus.adding(length)?.rawValue ?? UInt64.max, barSize)
        var start = bus.rawValue - bus.rawValue % pageSize
        // barSize is a multiple of pageSize, so rounding up stays <= barSize.
        let rem = end % pageSize
        var alignedEnd = rem == 0 ? end : end + (pageSize - rem)
        // A huge page is revoked whole (it cannot be partly unmapped): widen
        // to the huge pages of the mappings at either end. Mappings of
        // hugepage-backed memory start and end on huge pages, so this stays
        // inside them.
        if let m = lookup(BusAddress(start)), let h = hugePageSizes[m.region] { start -= start % h }
        if alignedEnd > 0, let m = lookup(BusAddress(alignedEnd - 1)), let h = hugePageSizes[m.region], alignedEnd % h != 0 {
            alignedEnd += h - alignedEnd % h
        }
        let change = splice(start, alignedEnd, insert: nil)
        try commit(change, inserted: 0, allowGrowthPastLimit: true)
        return Self.unmapPlan(for: change.removed)
    }

    /// The range checks and policies of a translation request (zero length,
    /// wrap, BAR bounds, static windows, DMA window), without looking at what
    /// is mapped: whether asking VM1 for a mapping of this range makes sense.
    public func checkTranslatable(_ bus: BusAddress, length: UInt64) throws(AddressSpaceError) {
        guard length > 0 else { throw .zeroLength(bus) }
        guard let end = bus.adding(length) else { throw .rangeWraps(start: bus.rawValue, length: length) }
        guard end.rawValue <= barSize else { throw .outsideBAR(bus, length: length, barSize: barSize) }
        if mode == .static, !configuration.staticWindows.contains(where: { $0.contains(start: bus.rawValue, end: end.rawValue) }) {
            throw .outsideStaticWindows(bus, length: length)
        }
        if let window = configuration.dmaWindow, !window.contains(start: bus.rawValue, end: end.rawValue) {
            throw .outsideDMAWindow(bus, length: length, window: window)
        }
    }

    /// Static mode: no grant of any kind after this (until the address space
    /// is recreated). Removals still go through: invalidates, operator unmaps
    /// and region removal revoke as before (revocation fails closed).
    public mutating func freeze() throws(AddressSpaceError) {
        guard mode == .static else { throw .wrongMode(operation: "freeze", mode: mode) }
        isFrozen = true
    }

    // MARK: checked access

    /// Checks that all of `[bus, bus+length)` is mapped with at least `needed`
    /// and returns the clipped mappings that cover it, in order.
    @discardableResult
    public func checkAccess(_ bus: BusAddress, length: UInt64, needed: Permission,
                            purpose: AccessPurpose = .access) throws(AddressSpaceError) -> [Mapping] {
        guard length > 0 else { throw .zeroLength(bus) }
        guard let end = bus.adding(length) else { throw .rangeWraps(start: bus.rawValue, length: length) }
        guard end.rawValue <= barSize else { throw .outsideBAR(bus, length: length, barSize: barSize) }
        var pieces: [Mapping] = []
        let failure = map.cover(bus.rawValue, end.rawValue) { m, at in
            guard m.permission.isSuperset(of: needed) else { return false }
            if let piece = m.clipped(to: at, end.rawValue) { pieces.append(piece) }
            return true
        }
        switch failure {
        case nil: return pieces
        case .gap(let at)?: throw .notMapped(purpose, bus, length: length, firstMissing: BusAddress(at))
        case .rejected(let m, let at)?: throw .accessDenied(purpose, BusAddress(at), needed: needed, granted: m.permission)
        }
    }

    // MARK: invariants

    /// Nil when every invariant holds, else a description of the first broken one.
    public func invariantViolation() -> String? {
        if let broken = map.invariantViolation() { return broken }
        var bytes: UInt64 = 0
        for (i, m) in mappings.enumerated() {
            if m.length == 0 { return "mapping \(i) is empty" }
            if m.end > barSize { return "mapping \(i) ends past the BAR" }
            if m.bus.rawValue % pageSize != 0 || m.length % pageSize != 0 { return "mapping \(i) unaligned" }
            if m.permission.isEmpty { return "mapping \(i) has no permission" }
            if i > 0 {
                let prev = mappings[i - 1]
                if prev.end > m.bus.rawValue { return "mappings \(i - 1) and \(i) overlap or are unsorted" }
                if prev.isContinued(by: m) { return "mappings \(i - 1) and \(i) should be coalesced" }
            }
            bytes += m.length
        }
        return bytes == mappedBytes ? nil : "mappedBytes \(mappedBytes) != \(bytes)"
    }
}
