import Testing
import TestSupport
@testable import BridgeCore

private let huge: UInt64 = 2 * MiB
private let hugeUser: UInt64 = 0x7e00_0000_0000

/// A 64 MiB hugepage-backed region at GPA 1 GiB, fd offset 0.
private func hugeTable() throws -> (MemoryRegionTable, MemoryRegion) {
    var t = MemoryRegionTable()
    let r = try t.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(GiB), size: 64 * MiB,
                                       userAddress: FrontendUserAddress(hugeUser), mmapOffset: 0),
                      fileSize: 64 * MiB, hugePageSize: huge)
    return (t, r)
}

@Suite struct HugePageTests {
    @Test func regionsMustBeWholeHugePages() {
        var t = MemoryRegionTable()
        let d = RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 3 * MiB, userAddress: FrontendUserAddress(hugeUser), mmapOffset: 0)
        #expect(regionError { try t.add(d, fileSize: nil, hugePageSize: huge) } == .hugePageMisaligned(field: "size", value: 3 * MiB, hugePageSize: huge))
        var e = d; e.size = 4 * MiB; e.mmapOffset = page
        #expect(regionError { try t.add(e, fileSize: nil, hugePageSize: huge) } == .hugePageMisaligned(field: "mmap_offset", value: page, hugePageSize: huge))
        #expect(MemoryRegionError.hugePageMisaligned(field: "", value: 0, hugePageSize: huge).rule == "huge-page")
    }

    /// By default an update covering part of a huge page is refused with a
    /// reason (QEMU's guest IOMMU maps 4 KiB pages); whole pages are granted.
    @Test func subPageUpdatesAreRefusedWholePagesGranted() throws {
        let (t, _) = try hugeTable()
        var s = iommuSpace()
        #expect(spaceError { try s.update(bus: BusAddress(4 * GiB), length: page, source: user(hugeUser), permission: .read, regions: t) }
                == .hugePage(BusAddress(4 * GiB), length: page, hugePageSize: huge))
        #expect(spaceError { try s.update(bus: BusAddress(4 * GiB + page), length: huge, source: user(hugeUser + page), permission: .read, regions: t) }
                == .hugePage(BusAddress(4 * GiB + page), length: huge, hugePageSize: huge))
        let plan = try s.update(bus: BusAddress(4 * GiB), length: 2 * huge, source: user(hugeUser + huge), permission: .readWrite, regions: t)
        #expect(plan == WindowPlan([.map(bus: BusAddress(4 * GiB), length: 2 * huge, permission: .readWrite, region: RegionID(1), fdOffset: huge)]))
        // A grant that would split a huge mapping inside a page is refused too.
        let (t2, _) = (t, ())
        var small = t2
        _ = try small.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 16 * MiB,
                                           userAddress: FrontendUserAddress(0x7f00_0000_0000), mmapOffset: 0), fileSize: nil)
        #expect(spaceError { try s.update(bus: BusAddress(4 * GiB + page), length: page, source: user(0x7f00_0000_0000), permission: .read, regions: small) }
                == .hugePage(BusAddress(4 * GiB + page), length: page, hugePageSize: huge))
        #expect(s.invariantViolation() == nil)
    }

    /// `round-out-huge-pages`: widened to the huge pages it touches (the
    /// documented exposure), when the IOVA and the memory sit at the same
    /// place in a page.
    @Test func roundOutWidensToWholePages() throws {
        let (t, _) = try hugeTable()
        var config = AddressSpaceConfiguration(barSize: 64 * GiB, mode: .iommu)
        config.roundOutHugePages = true
        var s = try AddressSpace(config)
        let plan = try s.update(bus: BusAddress(4 * GiB + huge + 3 * page), length: huge, source: user(hugeUser + huge + 3 * page),
                                permission: .read, regions: t)
        #expect(plan == WindowPlan([.map(bus: BusAddress(4 * GiB + huge), length: 2 * huge, permission: .read, region: RegionID(1), fdOffset: huge)]))
        #expect(spaceError { try s.update(bus: BusAddress(8 * GiB + page), length: page, source: user(hugeUser + 2 * page),
                                          permission: .read, regions: t) }
                == .hugePage(BusAddress(8 * GiB + page), length: page, hugePageSize: huge), "not congruent: cannot be rounded")
        // Rounding out must stay inside the BAR.
        var tiny = AddressSpaceConfiguration(barSize: 4 * MiB, mode: .iommu)
        tiny.roundOutHugePages = true
        var small = try AddressSpace(tiny)
        #expect(try small.update(bus: BusAddress(huge + page), length: page, source: user(hugeUser + page), permission: .read, regions: t).isEmpty == false)
        #expect(small.mappings.map(\.bus) == [BusAddress(huge)])
    }

    /// Revocation never fails and never leaves part of a huge page visible:
    /// a 4 KiB invalidate revokes the whole huge page around it.
    @Test func invalidatesRevokeWholeHugePages() throws {
        let (t, _) = try hugeTable()
        var s = iommuSpace()
        _ = try s.update(bus: BusAddress(4 * GiB), length: 4 * huge, source: user(hugeUser), permission: .readWrite, regions: t)
        let plan = try s.invalidate(bus: BusAddress(4 * GiB + huge + 5 * page), length: page)
        #expect(plan == WindowPlan([.unmap(bus: BusAddress(4 * GiB + huge), length: huge)]))
        let across = try s.invalidate(bus: BusAddress(4 * GiB + 3 * huge - page), length: 2 * page)
        #expect(across == WindowPlan([.unmap(bus: BusAddress(4 * GiB + 2 * huge), length: 2 * huge)]))
        #expect(s.mappings.map(\.bus) == [BusAddress(4 * GiB)])
        #expect(s.invariantViolation() == nil)
    }

    @Test func identityNeedsHugeAlignedGuestPhysical() throws {
        var t = MemoryRegionTable()
        let r = try t.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(GiB + page), size: 4 * MiB,
                                           userAddress: FrontendUserAddress(hugeUser), mmapOffset: 0), fileSize: nil, hugePageSize: huge)
        var s = try AddressSpace(AddressSpaceConfiguration(barSize: 64 * GiB, mode: .identity))
        #expect(spaceError { try s.mapRegion(r) } == .hugePage(BusAddress(GiB + page), length: 4 * MiB, hugePageSize: huge))
    }
}
