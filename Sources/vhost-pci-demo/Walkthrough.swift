import ArgumentParser
import BridgeCore
import LinuxIO

/// A walkthrough of the BAR model (AddressSpace) carried into real memory
/// (BARWindow), with VM1's RAM as a memfd. Every step prints what the model
/// decided and proves it in memory.
struct Walkthrough: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "walkthrough",
        abstract: "Walk through the vhost-pci BAR model: map VM1 memory by IOVA, read it in place, revoke it, refuse bad input."
    )

    @Option(help: "VM1 RAM size (e.g. 256M, 4G).")
    var ram: String = "256M"

    @Option(help: "BAR size, a power of two (e.g. 64G, 1T).")
    var barSize: String = "64G"

    func run() throws {
        guard let ramSize = parseByteSize(ram), ramSize >= 1 << 20 else { throw ValidationError("--ram: '\(ram)' is not a size of at least 1M") }
        guard let bar = parseByteSize(barSize) else { throw ValidationError("--bar-size: '\(barSize)' is not a size") }
        let userBase: UInt64 = 0x7f00_0000_0000

        print("== VM1: \(ByteCount(ramSize)) of guest RAM in a memfd, shared as one region (like QEMU's memory-backend-memfd)")
        let guestRAM = try Memfd(name: "vm1-ram", size: ramSize)
        var regions = MemoryRegionTable()
        let region = try regions.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: ramSize,
                                                      userAddress: FrontendUserAddress(userBase), mmapOffset: 0),
                                     fileSize: try guestRAM.size)
        print("   \(region.id): gpa 0x0 size \(ByteCount(ramSize)) at \(region.userAddress) in VM1's VMM")

        let dma = BusWindow(base: BusAddress(1 << 32), limit: 1 << 34)
        var space = try AddressSpace(AddressSpaceConfiguration(barSize: bar, mode: .iommu, dmaWindow: dma))
        let window = try BARWindow(size: bar)
        print("== Bridge: iommu mode, BAR \(ByteCount(bar)) reserved PROT_NONE (no memory committed), DMA window \(dma.map(\.description) ?? "none")")

        func apply(_ what: String, _ change: () throws(AddressSpaceError) -> WindowPlan) throws {
            do {
                let plan = try change()
                try window.apply(plan) { $0 == region.id ? guestRAM.fd.rawValue : nil }
                print("   \(what): " + (plan.isEmpty ? "no window change needed" : plan.operations.map(\.description).joined(separator: "; ")))
            } catch {
                print("   \(what): REFUSED \(error)")
            }
        }

        print("== VM1's IOMMU driver maps a TX buffer: IOVA 0x1_0000_0000 → gpa 0x20000, read-only for the device")
        try guestRAM.write(Array("hello from VM1".utf8), at: 0x20000)
        try apply("IOTLB update") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(0x1_0000_0000), length: 0x4000, source: .user(FrontendUserAddress(userBase + 0x20000)),
                             permission: .read, regions: regions)
        }
        let seen = window.withBytes(at: BusAddress(0x1_0000_0000), length: 14) { String(decoding: $0, as: UTF8.self) } ?? ""
        print("   VM2 reads BAR offset 0x1_0000_0000 in place: \"\(seen)\"")
        try guestRAM.write(Array("HELLO".utf8), at: 0x20000)
        let again = window.withBytes(at: BusAddress(0x1_0000_0000), length: 14) { String(decoding: $0, as: UTF8.self) } ?? ""
        print("   VM1 writes after posting; VM2 sees it with no copy: \"\(again)\"")
        print("   VM2 writes to that read-only range: \(window.probeInChild(BusAddress(0x1_0000_0000), write: true) == .faulted ? "SIGSEGV (as it must)" : "NOT REFUSED")")

        print("== An RX buffer, read/write, next to it (coalesces with nothing: different permission)")
        try apply("IOTLB update") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(0x1_0000_4000), length: 0x4000, source: .user(FrontendUserAddress(userBase + 0x40000)),
                             permission: .readWrite, regions: regions)
        }
        _ = window.withBytes(at: BusAddress(0x1_0000_4000), length: 5) { $0.copyBytes(from: Array("reply".utf8)) }
        print("   VM2 writes \"reply\" into the RX buffer; VM1 reads gpa 0x40000: \"\(String(decoding: try guestRAM.read(count: 5, at: 0x40000), as: UTF8.self))\"")
        print("   live mappings: \(space.mappings.count), bytes mapped: \(ByteCount(space.mappedBytes))")

        print("== Hostile or mistaken updates are refused, naming the rule; nothing changes")
        try apply("past the BAR end") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(bar - 0x1000), length: 0x2000, source: .user(FrontendUserAddress(userBase)), permission: .read, regions: regions)
        }
        try apply("wrapping 2^64") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(UInt64.max - 0xfff), length: 0x2000, source: .user(FrontendUserAddress(userBase)), permission: .read, regions: regions)
        }
        try apply("outside VM1's memory") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(0x1_0001_0000), length: 0x1000, source: .user(FrontendUserAddress(0x1000)), permission: .read, regions: regions)
        }
        try apply("outside the DMA window") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(0x1000), length: 0x1000, source: .user(FrontendUserAddress(userBase)), permission: .read, regions: regions)
        }
        try apply("unaligned IOVA") { () throws(AddressSpaceError) in
            try space.update(bus: BusAddress(0x1_0000_0001), length: 0x1000, source: .user(FrontendUserAddress(userBase)), permission: .read, regions: regions)
        }
        print("   live mappings still: \(space.mappings.count)")

        print("== VM1 unmaps the TX buffer: the window is revoked before anyone is told")
        try apply("IOTLB invalidate") { () throws(AddressSpaceError) in
            try space.invalidate(bus: BusAddress(0x1_0000_0000), length: 0x4000)
        }
        print("   VM2 touches the revoked range: \(window.probeInChild(BusAddress(0x1_0000_0000)) == .faulted ? "SIGSEGV (revoked)" : "STILL READABLE")")
        print("   VM2 touches the RX buffer: \(window.probeInChild(BusAddress(0x1_0000_4000)) == .accessible ? "still mapped" : "FAULTED")")
        print("   the bytes are still in VM1's RAM: \"\(String(decoding: try guestRAM.read(count: 5, at: 0x20000), as: UTF8.self))\"")

        let ringLayout = VringLayout(queueSize: 256, descriptorTable: BusAddress(0x1_0000_4000),
                                     availRing: BusAddress(0x1_0000_5000), usedRing: BusAddress(0x1_0000_6000))
        do {
            try space.validate(ringLayout)
            print("== A 256-entry vring inside the RX mapping passes validation")
        } catch {
            print("== vring validation: \(error)")
        }
        print("== Summary: \(space.mappings.count) mapping(s), \(ByteCount(space.mappedBytes)) visible to VM2, \(window.operationCount) window syscalls")
    }
}
