import Testing
import TestSupport
@testable import BridgeCore

let page: UInt64 = 4096

/// Two read/write regions and one read-only region, far apart in every space.
struct Fixture {
    var table = MemoryRegionTable(maxRegions: 8)
    let ram: MemoryRegion        // gpa 0, 1 GiB, uaddr 0x7f00_0000_0000, fd offset 0
    let high: MemoryRegion       // gpa 4 GiB, 256 MiB, uaddr 0x7f80_0000_0000, fd offset 1 GiB
    let readOnly: MemoryRegion   // gpa 8 GiB, 16 MiB, uaddr 0x7fa0_0000_0000, fd offset 0

    static let ramUser: UInt64 = 0x7f00_0000_0000
    static let highUser: UInt64 = 0x7f80_0000_0000
    static let roUser: UInt64 = 0x7fa0_0000_0000

    init() {
        var t = MemoryRegionTable(maxRegions: 8)
        ram = try! t.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: GiB,
                                          userAddress: FrontendUserAddress(Self.ramUser), mmapOffset: 0), fileSize: GiB)
        high = try! t.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(4 * GiB), size: 256 * MiB,
                                           userAddress: FrontendUserAddress(Self.highUser), mmapOffset: GiB), fileSize: 2 * GiB)
        readOnly = try! t.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(8 * GiB), size: 16 * MiB,
                                               userAddress: FrontendUserAddress(Self.roUser), mmapOffset: 0),
                              fileSize: nil, permission: .read)
        table = t
    }
}

func iommuSpace(bar: UInt64 = 64 * GiB, dma: BusWindow? = nil, maxMappings: Int = 1000) -> AddressSpace {
    try! AddressSpace(AddressSpaceConfiguration(barSize: bar, mode: .iommu, dmaWindow: dma, maxMappings: maxMappings))
}

func user(_ v: UInt64) -> MappingSource { .user(FrontendUserAddress(v)) }

/// The error of a throwing call, or nil when it succeeded. An error of any
/// other type is recorded as a test failure. One helper per error type, so
/// `== .case` comparisons get their context.
func typedError<T, E: Error>(_ errorType: E.Type, _ body: () throws -> T, sourceLocation: SourceLocation) -> E? {
    do {
        _ = try body()
        return nil
    } catch let error as E {
        return error
    } catch {
        Issue.record("expected \(E.self), got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
        return nil
    }
}
func spaceError<T>(_ body: () throws -> T, sourceLocation: SourceLocation = #_sourceLocation) -> AddressSpaceError? {
    typedError(AddressSpaceError.self, body, sourceLocation: sourceLocation)
}
func regionError<T>(_ body: () throws -> T, sourceLocation: SourceLocation = #_sourceLocation) -> MemoryRegionError? {
    typedError(MemoryRegionError.self, body, sourceLocation: sourceLocation)
}
func configError<T>(_ body: () throws -> T, sourceLocation: SourceLocation = #_sourceLocation) -> ConfigurationError? {
    typedError(ConfigurationError.self, body, sourceLocation: sourceLocation)
}
