import Testing
import TestSupport
@testable import BridgeCore

@Suite struct ConfigurationTests {
    private func config(_ bar: UInt64, mode: BridgeMode = .iommu, pageSize: UInt64 = 4096, dma: BusWindow? = nil,
                        windows: [BusWindow] = [], maxMappings: Int = 10) -> AddressSpaceConfiguration {
        AddressSpaceConfiguration(barSize: bar, pageSize: pageSize, mode: mode, dmaWindow: dma,
                                  staticWindows: windows, maxMappings: maxMappings)
    }

    @Test func acceptsOneTebibyteAndTheMaximum() throws {
        try config(TiB).validate()
        try config(AddressSpaceConfiguration.maximumBARSize).validate()
        try config(4096).validate()
    }

    @Test func refusesBadSizes() {
        #expect(configError { try config(64 * GiB + 4096).validate() } == .barSizeNotPowerOfTwo(64 * GiB + 4096))
        #expect(configError { try config(0).validate() } == .barSizeNotPowerOfTwo(0))
        #expect(configError { try config(2048).validate() } == .barSizeOutOfRange(2048, minimum: 4096, maximum: 1 << 48))
        #expect(configError { try config(1 << 49).validate() } == .barSizeOutOfRange(1 << 49, minimum: 4096, maximum: 1 << 48))
        #expect(configError { try config(GiB, pageSize: 2048).validate() } == .pageSizeInvalid(2048))
        #expect(configError { try config(GiB, pageSize: 12288).validate() } == .pageSizeInvalid(12288))
        #expect(configError { try config(GiB, maxMappings: 0).validate() } == .maxMappingsInvalid(0))
    }

    @Test func checksWindows() {
        let outside = BusWindow(base: BusAddress(0), limit: 2 * GiB)!
        #expect(configError { try config(GiB, dma: outside).validate() } == .windowOutsideBAR(key: "dma-window", outside, barSize: GiB))
        let odd = BusWindow(base: BusAddress(1), limit: MiB)!
        #expect(configError { try config(GiB, dma: odd).validate() } == .windowMisaligned(key: "dma-window", odd, pageSize: 4096))
        let a = BusWindow(base: BusAddress(0), limit: 2 * MiB)!, b = BusWindow(base: BusAddress(MiB), limit: 3 * MiB)!
        #expect(configError { try config(GiB, mode: .static, windows: [b, a]).validate() } == .staticWindowsOverlap(a, b))
        #expect(configError { try config(GiB, mode: .static).validate() } == .staticModeNeedsWindows)
        #expect(configError { try config(GiB, mode: .iommu, windows: [a]).validate() } == .staticWindowsNeedStaticMode(.iommu))
        #expect(BusWindow(base: BusAddress(5), limit: 5) == nil)
        let err = configError { try config(GiB, mode: .static).validate() }
        #expect(err?.key == "static-windows")
    }
}

@Suite struct AddressSpaceRangeRules {
    let f = Fixture()

    private func update(_ space: inout AddressSpace, _ bus: UInt64, _ length: UInt64, _ uaddr: UInt64,
                        _ perm: Permission = .readWrite) -> AddressSpaceError? {
        spaceError { try space.update(bus: BusAddress(bus), length: length, source: user(uaddr), permission: perm, regions: f.table) }
    }

    @Test func exactlyAtTheBAREndIsAcceptedOnePastIsNot() {
        var s = iommuSpace(bar: 64 * GiB)
        #expect(update(&s, 64 * GiB - page, page, Fixture.ramUser) == nil)
        #expect(s.lookup(BusAddress(64 * GiB - 1))?.length == page)
        #expect(update(&s, 64 * GiB, page, Fixture.ramUser) == .outsideBAR(BusAddress(64 * GiB), length: page, barSize: 64 * GiB))
        #expect(update(&s, 64 * GiB - page, page + 1, Fixture.ramUser)
                == .outsideBAR(BusAddress(64 * GiB - page), length: page + 1, barSize: 64 * GiB))
    }

    @Test func wrapAroundIsRefusedBeforeAnythingElse() {
        var s = iommuSpace()
        #expect(update(&s, UInt64.max - page + 1, page, Fixture.ramUser) == .rangeWraps(start: UInt64.max - page + 1, length: page))
        #expect(update(&s, page, UInt64.max, Fixture.ramUser) == .rangeWraps(start: page, length: UInt64.max))
        #expect(s.mappings.isEmpty)
    }

    @Test func zeroLengthIsRefused() {
        var s = iommuSpace()
        #expect(update(&s, 0, 0, Fixture.ramUser) == .zeroLength(BusAddress(0)))
    }

    @Test func alignmentOfBusLengthAndSource() {
        var s = iommuSpace()
        #expect(update(&s, page + 1, page, Fixture.ramUser) == .misaligned(field: "bus address", value: page + 1, pageSize: page))
        #expect(update(&s, page, page + 1, Fixture.ramUser) == .misaligned(field: "length", value: page + 1, pageSize: page))
        #expect(update(&s, page, page, Fixture.ramUser + 1) == .misaligned(field: "source offset", value: 1, pageSize: page))
        #expect(update(&s, page, page, Fixture.ramUser + page) == nil)
    }

    @Test func backingMustLieInsideOneRegion() {
        var s = iommuSpace()
        #expect(update(&s, 0, page, 0x1000) == .notBacked(user(0x1000), length: page))
        // Last page of the region: fine. One page further spills out.
        #expect(update(&s, 0, page, Fixture.ramUser + GiB - page) == nil)
        #expect(update(&s, 0, 2 * page, Fixture.ramUser + GiB - page) == .notBacked(user(Fixture.ramUser + GiB - page), length: 2 * page))
        #expect(s.mappings.count == 1)
    }

    @Test func permissionMustBeWithinTheRegions() {
        var s = iommuSpace()
        #expect(update(&s, 0, page, Fixture.roUser, .readWrite)
                == .permissionExceedsRegion(requested: .readWrite, allowed: .read, region: f.readOnly.id))
        #expect(update(&s, 0, page, Fixture.roUser, .write)
                == .permissionExceedsRegion(requested: .write, allowed: .read, region: f.readOnly.id))
        #expect(update(&s, 0, page, Fixture.roUser, .read) == nil)
        #expect(update(&s, page, page, Fixture.ramUser, .none) == .emptyPermission(BusAddress(page)))
        #expect(s.lookup(BusAddress(0))?.permission == .read)
    }

    @Test func modesGateTheOperations() {
        var identity = try! AddressSpace(AddressSpaceConfiguration(barSize: 64 * GiB, mode: .identity))
        #expect(update(&identity, 0, page, Fixture.ramUser) == .wrongMode(operation: "IOTLB update", mode: .identity))
        #expect(spaceError { try identity.invalidate(bus: BusAddress(0), length: page) }
                == .wrongMode(operation: "IOTLB invalidate", mode: .identity))
        #expect(spaceError { try identity.freeze() } == .wrongMode(operation: "freeze", mode: .identity))
        var iommu = iommuSpace()
        #expect(spaceError { try iommu.mapRegion(f.ram) } == .wrongMode(operation: "mapping a memory region at its GPA", mode: .iommu))
    }

    @Test func dmaWindowIsEnforcedOnUpdates() {
        let window = BusWindow(base: BusAddress(GiB), limit: 2 * GiB)!
        var s = iommuSpace(dma: window)
        #expect(update(&s, GiB, page, Fixture.ramUser) == nil)
        #expect(update(&s, 2 * GiB - page, page, Fixture.ramUser) == nil)
        #expect(update(&s, 2 * GiB - page, 2 * page, Fixture.ramUser)
                == .outsideDMAWindow(BusAddress(2 * GiB - page), length: 2 * page, window: window))
        #expect(update(&s, GiB - page, page, Fixture.ramUser)
                == .outsideDMAWindow(BusAddress(GiB - page), length: page, window: window))
    }

    @Test func mappingLimitRefusesGrowthAndChangesNothing() {
        var s = iommuSpace(maxMappings: 2)
        #expect(update(&s, 0, page, Fixture.ramUser) == nil)
        #expect(update(&s, 4 * page, page, Fixture.ramUser + 4 * page, .read) == nil)
        let before = s.mappings
        #expect(update(&s, 8 * page, page, Fixture.ramUser) == .tooManyMappings(limit: 2, wouldBe: 3))
        #expect(s.mappings == before)
        // A coalescing update does not grow the count, so it passes at the limit.
        #expect(update(&s, page, 2 * page, Fixture.ramUser + page) == nil)
        #expect(s.mappings.count == 2)
        // Revocation always goes through, even when a split passes the limit.
        #expect(spaceError { try s.invalidate(bus: BusAddress(page), length: page) } == nil)
        #expect(s.mappings.count == 3)
    }

    /// The process-wide budget's ceiling refuses growth like the per-bridge
    /// limit, under its own rule; revocation still goes through.
    @Test func mappingCeilingRefusesGrowthOnly() {
        var s = iommuSpace()
        s.mappingCeiling = 1
        #expect(update(&s, 0, page, Fixture.ramUser) == nil)
        #expect(update(&s, 4 * page, page, Fixture.ramUser + 4 * page, .read) == .mappingBudget(available: 1, wouldBe: 2))
        #expect(update(&s, page, page, Fixture.ramUser + page) == nil, "coalesces: no growth")
        #expect(spaceError { try s.invalidate(bus: BusAddress(page), length: 0) } == nil)
        s.mappingCeiling = nil
        #expect(update(&s, 4 * page, page, Fixture.ramUser + 4 * page, .read) == nil)
    }

    @Test func errorsCarryDistinctRules() {
        let errors: [AddressSpaceError] = [
            .zeroLength(BusAddress(0)), .rangeWraps(start: 0, length: 0), .outsideBAR(BusAddress(0), length: 0, barSize: 0),
            .misaligned(field: "", value: 0, pageSize: 0), .notBacked(user(0), length: 0),
            .permissionExceedsRegion(requested: .read, allowed: .read, region: RegionID(1)), .emptyPermission(BusAddress(0)),
            .outsideStaticWindows(BusAddress(0), length: 0), .frozen(operation: ""),
            .outsideDMAWindow(BusAddress(0), length: 0, window: BusWindow(base: BusAddress(0), limit: 1)!),
            .wrongMode(operation: "", mode: .iommu), .tooManyMappings(limit: 0, wouldBe: 0), .mappingBudget(available: 0, wouldBe: 0),
            .overlapsExisting(BusAddress(0), length: 0, existing: Mapping(bus: BusAddress(0), length: 1, permission: .read, region: RegionID(1), fdOffset: 0)),
            .invalidQueueSize(0), .ringMisaligned(.usedRing, BusAddress(0), alignment: 4),
            .notMapped(.access, BusAddress(0), length: 1, firstMissing: BusAddress(0)),
            .accessDenied(.access, BusAddress(0), needed: .write, granted: .read),
        ]
        #expect(Set(errors.map(\.rule)).count == errors.count)
        #expect(AddressSpaceError.outsideBAR(BusAddress(0x1000), length: 0x2000, barSize: 0x2000).description
                == "[bar-bounds] bus 0x1000+0x2000 ends past the BAR (size 0x2000)")
    }
}

@Suite struct IOTLBSemantics {
    let f = Fixture()

    @Test func updateReplacesTheOverlappedPartAndKeepsTheRest() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 8 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        let plan = try s.update(bus: BusAddress(2 * page), length: 2 * page, source: user(Fixture.highUser),
                                permission: .read, regions: f.table)
        #expect(plan == WindowPlan([.map(bus: BusAddress(2 * page), length: 2 * page, permission: .read,
                                         region: f.high.id, fdOffset: GiB)]))
        #expect(s.mappings == [
            Mapping(bus: BusAddress(0), length: 2 * page, permission: .readWrite, region: f.ram.id, fdOffset: 0),
            Mapping(bus: BusAddress(2 * page), length: 2 * page, permission: .read, region: f.high.id, fdOffset: GiB),
            Mapping(bus: BusAddress(4 * page), length: 4 * page, permission: .readWrite, region: f.ram.id, fdOffset: 4 * page),
        ])
        #expect(s.invariantViolation() == nil)
    }

    @Test func invalidateSplitsAMapping() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 8 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        let plan = try s.invalidate(bus: BusAddress(3 * page), length: 2 * page)
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(3 * page), length: 2 * page)]))
        #expect(s.mappings.map(\.bus) == [BusAddress(0), BusAddress(5 * page)])
        #expect(s.mappings.map(\.fdOffset) == [0, 5 * page])
        #expect(s.lookup(BusAddress(3 * page)) == nil)
        #expect(s.lookup(BusAddress(5 * page - 1)) == nil)
        #expect(s.lookup(BusAddress(5 * page))?.fdOffset == 5 * page)
        #expect(s.mappedBytes == 6 * page)
    }

    @Test func invalidateWidensToWholePages() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 4 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        let plan = try s.invalidate(bus: BusAddress(page + 100), length: 10)
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(page), length: page)]))
    }

    @Test func invalidateAcrossSeveralMappingsIsOneUnmapPerContiguousRun() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 2 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        _ = try s.update(bus: BusAddress(2 * page), length: 2 * page, source: user(Fixture.highUser), permission: .read, regions: f.table)
        _ = try s.update(bus: BusAddress(6 * page), length: 2 * page, source: user(Fixture.highUser), permission: .read, regions: f.table)
        let plan = try s.invalidate(bus: BusAddress(page), length: 6 * page)
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(page), length: 3 * page), .unmap(bus: BusAddress(6 * page), length: page)]))
    }

    @Test func invalidatingNothingIsAnEmptyPlan() throws {
        var s = iommuSpace()
        #expect(try s.invalidate(bus: BusAddress(0), length: page).isEmpty)
        #expect(try s.invalidate(bus: BusAddress(0), length: 0).isEmpty)
        #expect(try s.invalidate(bus: BusAddress(UInt64.max), length: 2).isEmpty)
        #expect(try s.invalidate(bus: BusAddress(64 * GiB), length: 1).isEmpty)
    }

    /// A domain-wide invalidate larger than the BAR (QEMU intel-iommu flushes
    /// [0, 2^39)) or wrapping past 2^64 must revoke, not be refused.
    @Test func invalidatesPastTheBARAreClippedNotRefused() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 2 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        _ = try s.update(bus: BusAddress(64 * GiB - page), length: page, source: user(Fixture.highUser), permission: .read, regions: f.table)
        let whole = try s.invalidate(bus: BusAddress(0), length: 1 << 39)
        #expect(whole == WindowPlan([.unmap(bus: BusAddress(0), length: 2 * page), .unmap(bus: BusAddress(64 * GiB - page), length: page)]))
        #expect(s.mappings.isEmpty)
        _ = try s.update(bus: BusAddress(64 * GiB - page), length: page, source: user(Fixture.highUser), permission: .read, regions: f.table)
        #expect(try s.invalidate(bus: BusAddress(64 * GiB - page), length: UInt64.max) == WindowPlan([.unmap(bus: BusAddress(64 * GiB - page), length: page)]))
        #expect(s.mappings.isEmpty)
    }

    @Test func adjacentContiguousUpdatesCoalesce() throws {
        var s = iommuSpace()
        for i in 0..<16 as Range<UInt64> {
            _ = try s.update(bus: BusAddress(i * page), length: page, source: user(Fixture.ramUser + i * page),
                             permission: .readWrite, regions: f.table)
        }
        #expect(s.mappings.count == 1)
        #expect(s.mappings[0].length == 16 * page)
        // Not contiguous in the fd: stays separate.
        _ = try s.update(bus: BusAddress(16 * page), length: page, source: user(Fixture.ramUser + 100 * page),
                         permission: .readWrite, regions: f.table)
        // Different permission: stays separate.
        _ = try s.update(bus: BusAddress(17 * page), length: page, source: user(Fixture.ramUser + 101 * page),
                         permission: .read, regions: f.table)
        #expect(s.mappings.count == 3)
        // Filling a hole re-merges both sides.
        _ = try s.invalidate(bus: BusAddress(4 * page), length: page)
        #expect(s.mappings.count == 4)
        _ = try s.update(bus: BusAddress(4 * page), length: page, source: user(Fixture.ramUser + 4 * page),
                         permission: .readWrite, regions: f.table)
        #expect(s.mappings.count == 3)
        #expect(s.invariantViolation() == nil)
    }

    @Test func repeatingAnUpdateNeedsNoSyscallAndAPermissionChangeIsAProtect() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 4 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        #expect(try s.update(bus: BusAddress(page), length: page, source: user(Fixture.ramUser + page),
                             permission: .readWrite, regions: f.table).isEmpty)
        let plan = try s.update(bus: BusAddress(page), length: page, source: user(Fixture.ramUser + page),
                                permission: .read, regions: f.table)
        #expect(plan == WindowPlan([.protect(bus: BusAddress(page), length: page, permission: .read, region: f.ram.id, fdOffset: page)]))
        #expect(s.mappings.count == 3)
        // Partly new source: a map, not a protect.
        let remap = try s.update(bus: BusAddress(3 * page), length: 2 * page, source: user(Fixture.ramUser + 3 * page),
                                 permission: .readWrite, regions: f.table)
        #expect(remap.operations.count == 1)
        if case .map = remap.operations[0] {} else { Issue.record("expected map, got \(remap)") }
    }

    @Test func unmapRegionRevokesOnlyThatRegion() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        _ = try s.update(bus: BusAddress(page), length: page, source: user(Fixture.highUser), permission: .readWrite, regions: f.table)
        _ = try s.update(bus: BusAddress(4 * page), length: page, source: user(Fixture.highUser + page), permission: .readWrite, regions: f.table)
        let plan = s.unmapRegion(f.high.id)
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(page), length: page), .unmap(bus: BusAddress(4 * page), length: page)]))
        #expect(s.mappings.map(\.region) == [f.ram.id])
        #expect(s.unmapRegion(f.high.id).isEmpty)
        #expect(s.unmapAll() == WindowPlan([.unmap(bus: BusAddress(0), length: page)]))
        #expect(s.mappedBytes == 0)
    }

    @Test func guestPhysicalSourcesWork() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: page, source: .guestPhysical(GuestPhysicalAddress(4 * GiB + page)),
                         permission: .read, regions: f.table)
        #expect(s.lookup(BusAddress(0))?.fdOffset == GiB + page)
        #expect(spaceError { try s.update(bus: BusAddress(0), length: page, source: .guestPhysical(GuestPhysicalAddress(2 * GiB)),
                                       permission: .read, regions: f.table) }
                == .notBacked(.guestPhysical(GuestPhysicalAddress(2 * GiB)), length: page))
    }
}

@Suite struct IdentityAndStaticModes {
    let f = Fixture()

    @Test func identityMapsEachRegionAtItsGPA() throws {
        var s = try AddressSpace(AddressSpaceConfiguration(barSize: 16 * GiB, mode: .identity))
        let plan = try s.mapRegion(f.high)
        #expect(plan == WindowPlan([.map(bus: BusAddress(4 * GiB), length: 256 * MiB, permission: .readWrite,
                                         region: f.high.id, fdOffset: GiB)]))
        _ = try s.mapRegion(f.readOnly)
        #expect(s.lookup(BusAddress(8 * GiB))?.permission == .read)
        #expect(spaceError { try s.mapRegion(f.high) }
                == .overlapsExisting(BusAddress(4 * GiB), length: 256 * MiB, existing: s.mappings[0]))
    }

    @Test func identityRefusesRegionsPastTheBAR() throws {
        var s = try AddressSpace(AddressSpaceConfiguration(barSize: 8 * GiB, mode: .identity))
        #expect(spaceError { try s.mapRegion(f.readOnly) } == .outsideBAR(BusAddress(8 * GiB), length: 16 * MiB, barSize: 8 * GiB))
        var table = MemoryRegionTable()
        let odd = try table.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: page,
                                                 userAddress: FrontendUserAddress(0x1000), mmapOffset: 512), fileSize: nil)
        #expect(spaceError { try s.mapRegion(odd) } == .misaligned(field: "mmap_offset", value: 512, pageSize: page))
        let unalignedGPA = try table.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0x10_0800), size: page,
                                                          userAddress: FrontendUserAddress(0x10_0000), mmapOffset: 0), fileSize: nil)
        #expect(spaceError { try s.mapRegion(unalignedGPA) } == .misaligned(field: "bus address", value: 0x10_0800, pageSize: page))
    }

    private func staticSpace() throws -> AddressSpace {
        let windows = [BusWindow(base: BusAddress(0), limit: 16 * MiB)!, BusWindow(base: BusAddress(GiB), limit: GiB + 16 * MiB)!]
        return try AddressSpace(AddressSpaceConfiguration(barSize: 4 * GiB, mode: .static, staticWindows: windows))
    }

    @Test func staticModeOnlyMapsInsideAWindow() throws {
        var s = try staticSpace()
        _ = try s.update(bus: BusAddress(16 * MiB - page), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        _ = try s.update(bus: BusAddress(GiB), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        #expect(spaceError { try s.update(bus: BusAddress(16 * MiB - page), length: 2 * page, source: user(Fixture.ramUser),
                                       permission: .read, regions: f.table) }
                == .outsideStaticWindows(BusAddress(16 * MiB - page), length: 2 * page))
        #expect(spaceError { try s.update(bus: BusAddress(512 * MiB), length: page, source: user(Fixture.ramUser),
                                       permission: .read, regions: f.table) }
                == .outsideStaticWindows(BusAddress(512 * MiB), length: page))
    }

    @Test func freezeStopsEveryChangeButRegionRevocation() throws {
        var s = try staticSpace()
        _ = try s.update(bus: BusAddress(0), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        try s.freeze()
        let before = s.mappings
        #expect(spaceError { try s.update(bus: BusAddress(page), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table) }
                == .frozen(operation: "IOTLB update"))
        #expect(spaceError { try s.update(bus: BusAddress(0), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table) }
                == .frozen(operation: "IOTLB update"))
        #expect(s.mappings == before)
        #expect(!s.unmapRegion(f.ram.id).isEmpty)
        #expect(s.mappings.isEmpty)
    }

    /// Freeze blocks grants only: an invalidate after freeze still revokes.
    @Test func invalidatesGoThroughAfterFreeze() throws {
        var s = try staticSpace()
        _ = try s.update(bus: BusAddress(0), length: 2 * page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        try s.freeze()
        #expect(try s.invalidate(bus: BusAddress(0), length: page) == WindowPlan([.unmap(bus: BusAddress(0), length: page)]))
        #expect(s.mappings.map(\.bus) == [BusAddress(page)])
        #expect(s.isFrozen)
    }

    /// Size 0 reads as "from iova to the end of the address space" (Linux
    /// vhost: iova + size - 1 wraps), clipped to the BAR; never refused.
    @Test func zeroLengthInvalidateRevokesToTheEndOfTheBAR() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        _ = try s.update(bus: BusAddress(4 * page), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        _ = try s.update(bus: BusAddress(64 * GiB - page), length: page, source: user(Fixture.highUser), permission: .read, regions: f.table)
        let plan = try s.invalidate(bus: BusAddress(4 * page + 1), length: 0)
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(4 * page), length: page),
                                    .unmap(bus: BusAddress(64 * GiB - page), length: page)]))
        #expect(s.mappings.map(\.bus) == [BusAddress(0)])
        #expect(s.invariantViolation() == nil)
    }
}

@Suite struct AccessAndVrings {
    let f = Fixture()

    private func space() throws -> AddressSpace {
        var s = iommuSpace()
        // [0, 4 pages) rw from ram, [4, 6) read from the read-only region, [8, 9) rw from high.
        _ = try s.update(bus: BusAddress(0), length: 4 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        _ = try s.update(bus: BusAddress(4 * page), length: 2 * page, source: user(Fixture.roUser), permission: .read, regions: f.table)
        _ = try s.update(bus: BusAddress(8 * page), length: page, source: user(Fixture.highUser), permission: .readWrite, regions: f.table)
        return s
    }

    @Test func lookupBoundaries() throws {
        let s = try space()
        #expect(s.lookup(BusAddress(0))?.region == f.ram.id)
        #expect(s.lookup(BusAddress(4 * page - 1))?.region == f.ram.id)
        #expect(s.lookup(BusAddress(4 * page))?.region == f.readOnly.id)
        #expect(s.lookup(BusAddress(6 * page)) == nil)
        #expect(s.lookup(BusAddress(9 * page)) == nil)
        #expect(s.lookup(BusAddress(UInt64.max)) == nil)
    }

    @Test func checkedAccessSpansMappingsAndStopsAtHolesAndPermissions() throws {
        let s = try space()
        let pieces = try s.checkAccess(BusAddress(3 * page), length: 2 * page, needed: .read)
        #expect(pieces.map(\.length) == [page, page])
        #expect(spaceError { try s.checkAccess(BusAddress(3 * page), length: 2 * page, needed: .write) }
                == .accessDenied(.access, BusAddress(4 * page), needed: .write, granted: .read))
        #expect(spaceError { try s.checkAccess(BusAddress(5 * page), length: 2 * page, needed: .read) }
                == .notMapped(.access, BusAddress(5 * page), length: 2 * page, firstMissing: BusAddress(6 * page)))
        #expect(spaceError { try s.checkAccess(BusAddress(64 * GiB - 1), length: 2, needed: .read) }
                == .outsideBAR(BusAddress(64 * GiB - 1), length: 2, barSize: 64 * GiB))
        #expect(spaceError { try s.checkAccess(BusAddress(UInt64.max), length: 2, needed: .read) }
                == .rangeWraps(start: UInt64.max, length: 2))
        #expect(spaceError { try s.checkAccess(BusAddress(0), length: 0, needed: .read) } == .zeroLength(BusAddress(0)))
    }

    @Test func vringNeedsMappedRingsWithTheRightAccess() throws {
        let s = try space()
        let good = VringLayout(queueSize: 256, descriptorTable: BusAddress(0), availRing: BusAddress(4096), usedRing: BusAddress(8192))
        try s.validate(good)
        // The used ring in read-only memory.
        var ro = good; ro.usedRing = BusAddress(4 * page)
        #expect(spaceError { try s.validate(ro) } == .accessDenied(.usedRing, BusAddress(4 * page), needed: .readWrite, granted: .read))
        // A descriptor table that runs off the end of the mapped memory.
        var long = good; long.descriptorTable = BusAddress(5 * page); long.queueSize = 512
        #expect(spaceError { try s.validate(long) }
                == .notMapped(.descriptorTable, BusAddress(5 * page), length: 8192, firstMissing: BusAddress(6 * page)))
        var unmapped = good; unmapped.availRing = BusAddress(7 * page)
        #expect(spaceError { try s.validate(unmapped) }
                == .notMapped(.availRing, BusAddress(7 * page), length: 518, firstMissing: BusAddress(7 * page)))
        // Exactly fitting the last byte of a mapping: used ring of 256 entries is 2054 bytes.
        var tight = good; tight.usedRing = BusAddress(9 * page - 2056)
        try s.validate(tight)
        tight.usedRing = BusAddress(9 * page - 2052)
        #expect(spaceError { try s.validate(tight) }
                == .notMapped(.usedRing, BusAddress(9 * page - 2052), length: 2054, firstMissing: BusAddress(9 * page)))
    }

    @Test(arguments: [0, 3, 100, 65536, 32769] as [UInt32])
    func vringQueueSizeMustBeAPowerOfTwoUpTo32768(size: UInt32) throws {
        let s = try space()
        #expect(spaceError { try s.validate(VringLayout(queueSize: size, descriptorTable: BusAddress(0),
                                                      availRing: BusAddress(4096), usedRing: BusAddress(8192))) }
                == .invalidQueueSize(size))
    }

    @Test func vringMaximumQueueSizeIsAccepted() throws {
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(0), length: 2 * MiB, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        try s.validate(VringLayout(queueSize: 32768, descriptorTable: BusAddress(0), availRing: BusAddress(512 * KiB),
                                   usedRing: BusAddress(1 * MiB)))
    }

    @Test func vringAlignment() throws {
        let s = try space()
        let base = VringLayout(queueSize: 8, descriptorTable: BusAddress(0), availRing: BusAddress(4096), usedRing: BusAddress(8192))
        var d = base; d.descriptorTable = BusAddress(8)
        #expect(spaceError { try s.validate(d) } == .ringMisaligned(.descriptorTable, BusAddress(8), alignment: 16))
        var a = base; a.availRing = BusAddress(4097)
        #expect(spaceError { try s.validate(a) } == .ringMisaligned(.availRing, BusAddress(4097), alignment: 2))
        var u = base; u.usedRing = BusAddress(8194)
        #expect(spaceError { try s.validate(u) } == .ringMisaligned(.usedRing, BusAddress(8194), alignment: 4))
        var ok = base; ok.availRing = BusAddress(4098); ok.usedRing = BusAddress(8196); ok.descriptorTable = BusAddress(16)
        try s.validate(ok)
    }
}
