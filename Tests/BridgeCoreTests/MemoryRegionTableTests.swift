import Testing
import TestSupport
@testable import BridgeCore

private func region(_ gpa: UInt64, _ size: UInt64, _ uaddr: UInt64, _ off: UInt64 = 0) -> RegionDescriptor {
    RegionDescriptor(guestPhysical: GuestPhysicalAddress(gpa), size: size, userAddress: FrontendUserAddress(uaddr), mmapOffset: off)
}

@Suite struct MemoryRegionTableTests {
    @Test func refusesZeroSize() {
        var t = MemoryRegionTable()
        #expect(regionError { try t.add(region(0, 0, 0x1000), fileSize: nil) } == .zeroSize(GuestPhysicalAddress(0)))
        #expect(t.count == 0)
    }

    @Test func refusesEachKindOfOverflow() {
        var t = MemoryRegionTable()
        #expect(regionError { try t.add(region(UInt64.max - 0xfff, 0x1000, 0), fileSize: nil) }
                == .overflow(field: "guest_phys_addr", value: UInt64.max - 0xfff, size: 0x1000))
        // Exactly reaching 2^64 - 1 is fine, one more byte wraps.
        #expect(regionError { try t.add(region(UInt64.max - 0x1000, 0x1000, 0), fileSize: nil) } == nil)
        var u = MemoryRegionTable()
        #expect(regionError { try u.add(region(0, 0x2000, UInt64.max - 0x1000), fileSize: nil) }
                == .overflow(field: "userspace_addr", value: UInt64.max - 0x1000, size: 0x2000))
        #expect(regionError { try u.add(region(0, 0x2000, 0, UInt64.max), fileSize: nil) }
                == .overflow(field: "mmap_offset", value: UInt64.max, size: 0x2000))
        #expect(u.count == 0)
    }

    @Test func mmapOffsetMustStayInsideTheFile() {
        var t = MemoryRegionTable()
        // Ends exactly at the file's end: accepted.
        #expect(regionError { try t.add(region(0, 0x1000, 0x10000, 0x1000), fileSize: 0x2000) } == nil)
        // One page further: refused.
        #expect(regionError { try t.add(region(0x1000, 0x1000, 0x20000, 0x2000), fileSize: 0x2000) }
                == .beyondFile(mmapOffset: 0x2000, size: 0x1000, fileSize: 0x2000))
        #expect(t.count == 1)
    }

    @Test func refusesOverlapInEitherSpace() {
        var t = MemoryRegionTable()
        let first = try! t.add(region(0x10000, 0x10000, 0x100000), fileSize: nil)
        // Touching neighbours are fine.
        #expect(regionError { try t.add(region(0x20000, 0x1000, 0x110000), fileSize: nil) } == nil)
        #expect(regionError { try t.add(region(0x1f000, 0x1000, 0x900000), fileSize: nil) }
                == .overlapsGuestPhysical(GuestPhysicalAddress(0x1f000), size: 0x1000, existing: first.id))
        #expect(regionError { try t.add(region(0x800000, 0x1000, 0x10f000), fileSize: nil) }
                == .overlapsUserAddress(FrontendUserAddress(0x10f000), size: 0x1000, existing: first.id))
        #expect(t.count == 2)
    }

    @Test func enforcesTheSlotLimit() {
        var t = MemoryRegionTable(maxRegions: 2)
        _ = try! t.add(region(0, 0x1000, 0x100000), fileSize: nil)
        _ = try! t.add(region(0x1000, 0x1000, 0x200000), fileSize: nil)
        #expect(regionError { try t.add(region(0x2000, 0x1000, 0x300000), fileSize: nil) } == .tooManyRegions(limit: 2))
    }

    /// Region ids have 56 bits (a `Mapping` packs its region and
    /// permission into one word): the last id is handed out, then the table
    /// refuses (ADD_MEM_REG and SET_MEM_TABLE alike) and stays as it was.
    @Test func refusesRegionsOnceEveryIdWasHandedOut() throws {
        var t = MemoryRegionTable(nextID: RegionID.maximum)
        let last = try t.add(region(0, 0x1000, 0x100000), fileSize: nil)
        #expect(last.id == RegionID(RegionID.maximum))
        #expect(regionError { try t.add(region(0x1000, 0x1000, 0x200000), fileSize: nil) } == .regionIDsExhausted)
        var replaced = t
        #expect(throws: MemoryRegionError.regionIDsExhausted) { try replaced.replaceAll(with: [region(0x1000, 0x1000, 0x200000)], fileSizes: [nil]) }
        #expect(t.regions.map(\.id) == [last.id])
        #expect(MemoryRegionError.regionIDsExhausted.rule == "region-ids")
        // The largest id and every permission survive a mapping's packing.
        for permission in [Permission.none, .read, .write, .readWrite] {
            let m = Mapping(bus: BusAddress(0x1000), length: 0x2000, permission: permission, region: last.id, fdOffset: .max)
            #expect(m.region == last.id && m.permission == permission && m.fdOffset == .max && m.length == 0x2000)
        }
        #expect(MemoryLayout<Mapping>.stride == 32)
    }

    @Test func removeMatchesGuestAddressSizeAndUserAddress() {
        var t = MemoryRegionTable()
        let r = try! t.add(region(0x10000, 0x10000, 0x100000, 0x5000), fileSize: nil)
        #expect(regionError { try t.remove(matching: region(0x10000, 0x20000, 0x100000)) }
                == .noMatchingRegion(region(0x10000, 0x20000, 0x100000)))
        // mmap_offset is not part of the identity.
        #expect((try? t.remove(matching: region(0x10000, 0x10000, 0x100000, 0))) == r)
        #expect(t.count == 0)
    }

    @Test func replaceAllIsAtomic() {
        var t = MemoryRegionTable()
        let old = try! t.add(region(0, 0x1000, 0x100000), fileSize: nil)
        let before = t
        let bad = [region(0x10000, 0x1000, 0x200000), region(0x10000, 0x1000, 0x300000)]
        #expect(regionError { try t.replaceAll(with: bad, fileSizes: [nil, nil]) } != nil)
        #expect(t == before)
        let result = try! t.replaceAll(with: [region(0x10000, 0x1000, 0x200000)], fileSizes: [0x1000])
        #expect(result.removed == [old])
        #expect(result.added.count == 1 && result.added[0].id != old.id)
        #expect(t.regions == result.added)
    }

    @Test func replaceAllChecksFileSizes() {
        var t = MemoryRegionTable()
        #expect(regionError { try t.replaceAll(with: [region(0, 0x2000, 0x100000)], fileSizes: [0x1000]) }
                == .beyondFile(mmapOffset: 0, size: 0x2000, fileSize: 0x1000))
    }

    @Test func translateNeedsTheWholeRangeInOneRegion() {
        let f = Fixture()
        let u = Fixture.ramUser
        #expect(f.table.translate(user: FrontendUserAddress(u), length: GiB)?.offset == 0)
        #expect(f.table.translate(user: FrontendUserAddress(u + GiB - 1), length: 1)?.offset == GiB - 1)
        #expect(f.table.translate(user: FrontendUserAddress(u + GiB - 1), length: 2) == nil)
        #expect(f.table.translate(user: FrontendUserAddress(u - 1), length: 1) == nil)
        #expect(f.table.translate(user: FrontendUserAddress(UInt64.max), length: 1) == nil)
        #expect(f.table.translate(user: FrontendUserAddress(u), length: UInt64.max) == nil)
        #expect(f.table.guestPhysical(ofUser: FrontendUserAddress(Fixture.highUser + 0x1000), length: 16)
                == GuestPhysicalAddress(4 * GiB + 0x1000))
        #expect(f.table.translate(guestPhysical: GuestPhysicalAddress(8 * GiB + 16 * MiB - 8), length: 8)?.region == f.readOnly)
        #expect(f.table.translate(guestPhysical: GuestPhysicalAddress(8 * GiB + 16 * MiB - 8), length: 9) == nil)
    }

    @Test func errorsNameTheirRule() {
        #expect(MemoryRegionError.zeroSize(GuestPhysicalAddress(0)).rule == "region-size")
        #expect(MemoryRegionError.beyondFile(mmapOffset: 0, size: 1, fileSize: 0).description.contains("past the end of its fd"))
    }
}
