import BridgeCore

/// The address-lookup micro-benchmark's workload (a baseline, not production
/// code: it lives with the benchmarks). Builds an address space
/// with `count` mappings that cannot coalesce (one page each, one-page gaps)
/// and a list of probe addresses (90 % hits).
struct LookupWorkload: Sendable {
    let space: AddressSpace
    let probes: [BusAddress]

    static let pageSize: UInt64 = 4096

    init(mappings count: Int, probes probeCount: Int, seed: UInt64 = 42) throws {
        let page = Self.pageSize
        var barSize: UInt64 = 1 << 20
        while barSize < UInt64(count) * 2 * page { barSize <<= 1 }
        var table = MemoryRegionTable()
        let user: UInt64 = 0x7f00_0000_0000
        try table.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: UInt64(count) * page,
                                       userAddress: FrontendUserAddress(user), mmapOffset: 0), fileSize: nil)
        var space = try AddressSpace(AddressSpaceConfiguration(barSize: barSize, mode: .iommu, maxMappings: count))
        for i in 0..<UInt64(count) {
            _ = try space.update(bus: BusAddress(2 * i * page), length: page, source: .user(FrontendUserAddress(user + i * page)),
                                 permission: .readWrite, regions: table)
        }
        var state = seed
        var probes: [BusAddress] = []
        probes.reserveCapacity(probeCount)
        for _ in 0..<probeCount {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            let r = state >> 11
            let pageIndex = r % (2 * UInt64(count))
            // Even pages are mapped; make 90 % of probes hit.
            let hit = (r >> 40) % 10 != 0
            let index = hit ? pageIndex & ~1 : pageIndex | 1
            probes.append(BusAddress(index * page + (r >> 20) % page))
        }
        self.space = space
        self.probes = probes
    }

    /// The baseline: a linear scan over the same sorted mappings.
    static func linearLookup(_ mappings: [Mapping], _ address: BusAddress) -> Mapping? {
        for m in mappings where m.bus <= address && address.rawValue < m.end { return m }
        return nil
    }
}
