import Testing
import TestSupport
@testable import BridgeCore

/// The dirty log's arithmetic: one bit per 4 KiB guest-physical page.
@Suite struct DirtyLogTests {
    @Test func pageOfAnAddress() {
        #expect(DirtyLog.pages(GuestPhysicalAddress(0), length: 1) == 0...0)
        #expect(DirtyLog.pages(GuestPhysicalAddress(0xfff), length: 1) == 0...0)
        #expect(DirtyLog.pages(GuestPhysicalAddress(0x1000), length: 1) == 1...1)
        #expect(DirtyLog.pages(GuestPhysicalAddress(0x1234_5678), length: 4) == 0x12345...0x12345)
    }

    @Test func rangesThatSpanPages() {
        #expect(DirtyLog.pages(GuestPhysicalAddress(0xffe), length: 4) == 0...1)
        #expect(DirtyLog.pages(GuestPhysicalAddress(0x1000), length: 0x1000) == 1...1, "a whole page is one page")
        #expect(DirtyLog.pages(GuestPhysicalAddress(0x1000), length: 0x1001) == 1...2)
        #expect(DirtyLog.pages(GuestPhysicalAddress(0x800), length: 0x3000) == 0...3)
    }

    @Test func emptyAndWrappingRangesTouchNothing() {
        #expect(DirtyLog.pages(GuestPhysicalAddress(0x1000), length: 0) == nil)
        #expect(DirtyLog.pages(GuestPhysicalAddress(UInt64.max - 1), length: 3) == nil)
        #expect(DirtyLog.pages(GuestPhysicalAddress(UInt64.max), length: 1) == (UInt64.max >> 12)...(UInt64.max >> 12))
    }

    @Test func bitOfAPage() {
        #expect(DirtyLog.bit(ofPage: 0) == (0, 1))
        #expect(DirtyLog.bit(ofPage: 7) == (0, 0x80))
        #expect(DirtyLog.bit(ofPage: 8) == (1, 1))
        #expect(DirtyLog.bit(ofPage: 0x12345) == (0x2468, 0x20))
    }

    @Test func bytesNeeded() {
        #expect(DirtyLog.bytesNeeded(toCover: 0) == 0)
        #expect(DirtyLog.bytesNeeded(toCover: 1) == 1)
        #expect(DirtyLog.bytesNeeded(toCover: 8 * 4096) == 1)
        #expect(DirtyLog.bytesNeeded(toCover: 8 * 4096 + 1) == 2, "a region that ends mid-page needs that page's bit")
        #expect(DirtyLog.bytesNeeded(toCover: 256 << 20) == 8192)
    }

    private func table(_ regions: [(gpa: UInt64, size: UInt64)]) -> MemoryRegionTable {
        var t = MemoryRegionTable(maxRegions: 8)
        for (i, r) in regions.enumerated() {
            let d = RegionDescriptor(guestPhysical: GuestPhysicalAddress(r.gpa), size: r.size,
                                     userAddress: FrontendUserAddress(0x7f00_0000_0000 + UInt64(i) << 36), mmapOffset: 0)
            _ = try! t.add(d, fileSize: r.size)
        }
        return t
    }

    @Test func theHighestRegionDecides() {
        // Below 4 GiB and a region above it that ends mid-page.
        let t = table([(0, 2 << 30), (4 << 30, 0x1800)])
        #expect(DirtyLog.bytesNeeded(for: t) == DirtyLog.bytesNeeded(toCover: (4 << 30) + 0x1800))
        #expect(DirtyLog.bytesNeeded(for: t) == ((4 << 30) / 4096 + 2 + 7) / 8)
    }

    @Test func logAreasAreChecked() throws {
        let t = table([(0, 256 << 20)])
        let ok = try DirtyLogArea(size: 8192, offset: 0, fileSize: 8192, covering: t)
        #expect(ok.size == 8192 && ok.offset == 0)
        #expect(throws: DirtyLogArea.Problem.tooSmall(size: 8191, needed: 8192)) {
            try DirtyLogArea(size: 8191, offset: 0, fileSize: 8192, covering: t)
        }
        #expect(throws: DirtyLogArea.Problem.pastFile(end: 8192 + 4096, fileSize: 8192)) {
            try DirtyLogArea(size: 8192, offset: 4096, fileSize: 8192, covering: t)
        }
        #expect(throws: DirtyLogArea.Problem.wraps(size: 8192, offset: UInt64.max - 7)) {
            try DirtyLogArea(size: 8192, offset: UInt64.max - 7, fileSize: UInt64.max, covering: t)
        }
        #expect(throws: DirtyLogArea.Problem.misaligned(offset: 4)) {
            try DirtyLogArea(size: 8192, offset: 4, fileSize: 1 << 20, covering: t)
        }
        #expect(throws: DirtyLogArea.Problem.empty) { try DirtyLogArea(size: 0, offset: 0, fileSize: 8192, covering: t) }
        #expect(throws: DirtyLogArea.Problem.pastFile(end: 8192, fileSize: nil)) {
            try DirtyLogArea(size: 8192, offset: 0, fileSize: nil, covering: t)
        }
        #expect(throws: DirtyLogArea.Problem.tooLarge(size: 2 * 8192 + (1 << 20) + 8, maximum: 2 * 8192 + (1 << 20))) {
            try DirtyLogArea(size: 2 * 8192 + (1 << 20) + 8, offset: 0, fileSize: 1 << 30, covering: t)
        }
        #expect(DirtyLogArea.maximumSize(covering: t) == 2 * 8192 + (1 << 20))
        // An offset inside a larger file is fine.
        #expect(try DirtyLogArea(size: 8192, offset: 4096, fileSize: 3 * 4096, covering: t).offset == 4096)
    }
}
