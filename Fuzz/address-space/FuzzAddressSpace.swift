import BridgeCore
import FuzzSupport

/// `AddressSpace` operation sequences (IOTLB updates, invalidates, freeze) in
/// iommu or static mode, checked after every step against a page-level
/// reference model and against the plan executed page by page, as the
/// property test does — with the fuzzer choosing the operations.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzAddressSpace(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let page: UInt64 = 4096
    let barPages: UInt64 = 128
    let staticMode = input.byte() & 1 == 1
    let windows = staticMode ? [BusWindow(base: BusAddress(16 * page), limit: 64 * page)!, BusWindow(base: BusAddress(80 * page), limit: 120 * page)!] : []
    let config = AddressSpaceConfiguration(barSize: barPages * page, mode: staticMode ? .static : .iommu,
                                           staticWindows: windows, maxMappings: 100_000)
    var space = try! AddressSpace(config)
    var table = MemoryRegionTable(maxRegions: 8)
    let rw = try! table.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 1 << 20,
                                             userAddress: FrontendUserAddress(0x7f00_0000_0000), mmapOffset: 0), fileSize: 1 << 20)
    let ro = try! table.add(RegionDescriptor(guestPhysical: GuestPhysicalAddress(1 << 30), size: 1 << 20,
                                             userAddress: FrontendUserAddress(0x7fa0_0000_0000), mmapOffset: 0),
                            fileSize: nil, permission: .read)
    struct Entry: Equatable { var permission: Permission; var region: RegionID; var fdOffset: UInt64 }
    // Pages of the BAR, indexed by page number: arrays, not dictionaries —
    // every step compares all of them, and that comparison is the cost of
    // an execution.
    var reference = [Entry?](repeating: nil, count: Int(barPages))
    var window = [Entry?](repeating: nil, count: Int(barPages))
    var frozen = false
    var steps = 0
    while !input.isEmpty, steps < 200 {
        steps += 1
        let op = input.byte()
        var bus = UInt64(input.byte() % UInt8(barPages + 8)) * page
        var length = UInt64(input.byte() % 17) * page
        if op & 0x10 != 0 { bus += UInt64(input.byte()) }
        if op & 0x20 != 0 { length += 1 }
        if op & 0x40 != 0 { bus = UInt64.max - page + 1 }
        let plan: WindowPlan?
        var expected: Bool
        switch op % 8 {
        case 0...4:
            let region = op & 0x80 != 0 ? ro : rw
            let offset = UInt64(input.byte() % 255) * page
            let perm = Permission(rawValue: input.byte() % 4)
            expected = length > 0 && bus <= UInt64.max - length && bus + length <= barPages * page && bus % page == 0
                && length % page == 0 && !perm.isEmpty && offset <= region.size && length <= region.size - offset
                && region.permission.isSuperset(of: perm)
            if staticMode { expected = expected && !frozen && windows.contains { bus >= $0.base.rawValue && bus + length <= $0.limit } }
            let before = space.mappings
            plan = try? space.update(bus: BusAddress(bus), length: length,
                                     source: .user(FrontendUserAddress(region.userAddress.rawValue + offset)), permission: perm, regions: table)
            if plan == nil, space.mappings != before { fuzzFailure("a refused update changed the model") }
            if plan != nil {
                for i in 0..<(length / page) {
                    reference[Int(bus / page + i)] = Entry(permission: perm, region: region.id, fdOffset: region.mmapOffset + offset + i * page)
                }
            }
        case 5, 6:
            expected = true // revocation is never refused
            plan = try? space.invalidate(bus: BusAddress(bus), length: length)
            if plan != nil, bus < barPages * page {
                let end = length == 0 ? barPages * page
                    : min(bus.addingReportingOverflow(length).overflow ? UInt64.max : bus + length, barPages * page)
                for p in (bus / page)...((end - 1) / page) { reference[Int(p)] = nil }
            }
        default:
            expected = staticMode
            plan = (try? space.freeze()).map { WindowPlan.empty }
            if plan != nil { frozen = true }
        }
        if (plan != nil) != expected { fuzzFailure("op \(op % 8) at \(bus)+\(length): model \(plan != nil), reference \(expected)") }
        for o in plan?.operations ?? [] {
            let first = Int(o.bus.rawValue / page)
            for i in 0..<Int(o.length / page) {
                switch o {
                case .map(_, _, let perm, let region, let off): window[first + i] = Entry(permission: perm, region: region, fdOffset: off + UInt64(i) * page)
                case .protect(_, _, let perm, let region, let off):
                    guard let e = window[first + i], e.region == region, e.fdOffset == off + UInt64(i) * page else {
                        fuzzFailure("protect of a page the window does not hold as named")
                    }
                    window[first + i]?.permission = perm
                case .unmap: window[first + i] = nil
                }
            }
        }
        if let v = space.invariantViolation() { fuzzFailure(v) }
        for p in 0..<barPages {
            let model = space.lookup(BusAddress(p * page)).map {
                Entry(permission: $0.permission, region: $0.region, fdOffset: $0.fdOffset + (p * page - $0.bus.rawValue))
            }
            if model != reference[Int(p)] || window[Int(p)] != reference[Int(p)] { fuzzFailure("page \(p): model, window and reference disagree") }
        }
    }
    return 0
}
