import BridgeCore
import Testing
import TestSupport
@testable import LinuxIO
#if canImport(Glibc)
import Glibc
#endif


extension LinuxIOTests {
    @Suite struct BARWindows {
        @Test func oneTebibyteWindowBothEndsRevocationFaults() throws {
            let rssBefore = residentKiB()
            let window = try BARWindow(size: TiB)
            let reserveCost = residentGrowthKiB(since: rssBefore)
            #expect(reserveCost < 16 * 1024, "reserving 1 TiB committed \(reserveCost) KiB")

            let low = try Memfd(name: "low", size: 4 * MiB)
            let high = try Memfd(name: "high", size: 4 * MiB)
            let lowOffset: UInt64 = 0x1000
            let highOffset = TiB - 2 * MiB
            try window.map(bus: BusAddress(lowOffset), length: MiB, permission: .readWrite, fd: low.fd.rawValue, fdOffset: MiB)
            try window.map(bus: BusAddress(highOffset), length: 2 * MiB, permission: .readWrite, fd: high.fd.rawValue, fdOffset: 0)

            // Window → memfd.
            _ = window.withBytes(at: BusAddress(lowOffset + 10), length: 4) { $0.copyBytes(from: [1, 2, 3, 4]) }
            _ = window.withBytes(at: BusAddress(TiB - 4), length: 4) { $0.copyBytes(from: [5, 6, 7, 8]) }
            #expect(try low.read(count: 4, at: MiB + 10) == [1, 2, 3, 4])
            #expect(try high.read(count: 4, at: 2 * MiB - 4) == [5, 6, 7, 8])
            // memfd → window (same pages, no copy).
            try high.write([42], at: 12345)
            #expect(window.withBytes(at: BusAddress(highOffset + 12345), length: 1) { $0[0] } == 42)

            // Out-of-window accessors return nil rather than touching memory.
            #expect(window.withBytes(at: BusAddress(TiB - 2), length: 4) { _ in 0 } == nil)
            #expect(window.withBytes(at: BusAddress(UInt64.max), length: 4) { _ in 0 } == nil)

            try window.revoke(bus: BusAddress(lowOffset), length: MiB)
            guard window.probeInChild(BusAddress(lowOffset + 10)) == .faulted else {
                Issue.record("a revoked range did not fault"); return
            }
            guard window.probeInChild(BusAddress(TiB - 4)) == .accessible else {
                Issue.record("a mapped range faulted"); return
            }
            // The memfd still has the data: revocation hides, it never destroys.
            #expect(try low.read(count: 4, at: MiB + 10) == [1, 2, 3, 4])
            #expect(residentGrowthKiB(since: rssBefore) < 64 * 1024)
        }

        @Test func neverMappedPagesFault() throws {
            let window = try BARWindow(size: 64 * MiB)
            guard window.probeInChild(BusAddress(32 * MiB)) == .faulted else {
                Issue.record("an unmapped hole did not fault"); return
            }
        }

        @Test func readOnlyMappingsRefuseWrites() throws {
            let window = try BARWindow(size: 16 * MiB)
            let m = try Memfd(name: "ro", size: MiB)
            try m.write([0x77], at: 0)
            try window.map(bus: BusAddress(0), length: MiB, permission: .read, fd: m.fd.rawValue, fdOffset: 0)
            guard window.probeInChild(BusAddress(0), write: false) == .accessible else { Issue.record("read faulted"); return }
            guard window.probeInChild(BusAddress(0), write: true) == .faulted else { Issue.record("write to read-only succeeded"); return }
            #expect(try m.read(count: 1, at: 0) == [0x77])
        }

        @Test func checksBoundsAndAlignment() throws {
            let window = try BARWindow(size: 16 * MiB)
            let m = try Memfd(name: "b", size: MiB)
            #expect(throws: BARWindowError.outsideWindow(BusAddress(16 * MiB - 4096), length: 8192, windowSize: 16 * MiB)) {
                try window.map(bus: BusAddress(16 * MiB - 4096), length: 8192, permission: .read, fd: m.fd.rawValue, fdOffset: 0)
            }
            #expect(throws: BARWindowError.outsideWindow(BusAddress(UInt64.max - 4095), length: 8192, windowSize: 16 * MiB)) {
                try window.map(bus: BusAddress(UInt64.max - 4095), length: 8192, permission: .read, fd: m.fd.rawValue, fdOffset: 0)
            }
            #expect(throws: BARWindowError.misaligned(BusAddress(1), length: 4096, hostPageSize: 4096)) {
                try window.map(bus: BusAddress(1), length: 4096, permission: .read, fd: m.fd.rawValue, fdOffset: 0)
            }
            #expect(throws: BARWindowError.invalidSize(0)) { _ = try BARWindow(size: 0) }
            #expect(throws: BARWindowError.invalidSize(100)) { _ = try BARWindow(size: 100) }
        }

        /// A revocation is never refused for its alignment: it widens to
        /// whole host pages (more revoked than asked, never less), and one
        /// running past the window's end revokes to the end.
        @Test func aMisalignedRevocationWidensInsteadOfFailing() throws {
            let window = try BARWindow(size: 16 * MiB)
            let m = try Memfd(name: "w", size: MiB)
            try window.map(bus: BusAddress(0x10_0000), length: 0x4000, permission: .readWrite, fd: m.fd.rawValue, fdOffset: 0)
            try window.revoke(bus: BusAddress(0x10_1800), length: 0x10)
            #expect(window.probeInChild(BusAddress(0x10_0000)) == .accessible)
            #expect(window.probeInChild(BusAddress(0x10_1000)) == .faulted, "the page holding the range is revoked")
            #expect(window.probeInChild(BusAddress(0x10_2000)) == .accessible)
            try window.revoke(bus: BusAddress(0x10_2fff), length: UInt64.max)
            #expect(window.probeInChild(BusAddress(0x10_2000)) == .faulted && window.probeInChild(BusAddress(0x10_3000)) == .faulted)
            #expect(window.probeInChild(BusAddress(0x10_0000)) == .accessible)
            #expect(throws: BARWindowError.self) { try window.revoke(bus: BusAddress(16 * MiB), length: 4096) }
        }

        @Test func executesAddressSpacePlans() throws {
            var table = MemoryRegionTable()
            let ram = try Memfd(name: "ram", size: 16 * MiB)
            let region = try table.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 16 * MiB,
                                                        userAddress: FrontendUserAddress(0x7f00_0000_0000), mmapOffset: 0),
                                       fileSize: try ram.size)
            var space = try AddressSpace(AddressSpaceConfiguration(barSize: 1 << 30, mode: .iommu))
            let window = try BARWindow(size: space.barSize)
            let fdFor: (RegionID) -> Int32? = { $0 == region.id ? ram.fd.rawValue : nil }

            try ram.write(Array("hello".utf8), at: 0x3000)
            try window.apply(try space.update(bus: BusAddress(0x10_0000), length: 0x4000,
                                              source: .user(FrontendUserAddress(0x7f00_0000_0000)),
                                              permission: .readWrite, regions: table), fileFor: fdFor)
            #expect(window.withBytes(at: BusAddress(0x10_3000), length: 5) { Array($0) } == Array("hello".utf8))

            // Permission change → mprotect; writes now fault, reads still work.
            try window.apply(try space.update(bus: BusAddress(0x10_0000), length: 0x4000,
                                              source: .user(FrontendUserAddress(0x7f00_0000_0000)),
                                              permission: .read, regions: table), fileFor: fdFor)
            guard window.probeInChild(BusAddress(0x10_3000), write: true) == .faulted else { Issue.record("write allowed"); return }
            guard window.probeInChild(BusAddress(0x10_3000)) == .accessible else { Issue.record("read faulted"); return }

            // Invalidate the middle: a split, the ends stay.
            try window.apply(try space.invalidate(bus: BusAddress(0x10_1000), length: 0x2000), fileFor: fdFor)
            guard window.probeInChild(BusAddress(0x10_1000)) == .faulted else { Issue.record("invalidated page readable"); return }
            guard window.probeInChild(BusAddress(0x10_2fff)) == .faulted else { Issue.record("invalidated page readable"); return }
            guard window.probeInChild(BusAddress(0x10_0000)) == .accessible else { Issue.record("kept page faulted"); return }
            guard window.probeInChild(BusAddress(0x10_3000)) == .accessible else { Issue.record("kept page faulted"); return }
        }

        @Test func aFailingPlanFailsClosed() throws {
            let window = try BARWindow(size: 16 * MiB)
            let m = try Memfd(name: "f", size: MiB)
            try window.map(bus: BusAddress(0), length: MiB, permission: .readWrite, fd: m.fd.rawValue, fdOffset: 0)
            // Second step names a region with no fd: the whole plan's ranges are revoked.
            let plan = WindowPlan([
                .protect(bus: BusAddress(0), length: MiB, permission: .read, region: RegionID(1), fdOffset: 0),
                .map(bus: BusAddress(2 * MiB), length: MiB, permission: .read, region: RegionID(99), fdOffset: 0),
            ])
            #expect(throws: BARWindowError.noFileForRegion(RegionID(99))) { try window.apply(plan) { _ in nil } }
            guard window.probeInChild(BusAddress(0)) == .faulted else { Issue.record("failed plan left access"); return }
        }
    }
}
