import Testing
import TestSupport
@testable import BridgeCore

/// What one BAR page shows: the naive reference model is a page → Entry dictionary.
struct Entry: Equatable, CustomStringConvertible {
    var permission: Permission
    var region: RegionID
    var fdOffset: UInt64
    var description: String { "\(permission) \(region)@\(Hex(fdOffset))" }
}

/// Executes plans page by page, the way BARWindow's syscalls would.
struct FakeWindow {
    var pages: [UInt64: Entry] = [:]
    var protectOfUnmappedPage = false

    mutating func apply(_ plan: WindowPlan) {
        for op in plan.operations {
            let first = op.bus.rawValue / page, count = op.length / page
            for i in 0..<count {
                switch op {
                case .map(_, _, let perm, let region, let off):
                    pages[first + i] = Entry(permission: perm, region: region, fdOffset: off + i * page)
                case .protect(_, _, let perm, let region, let off):
                    if pages[first + i] == nil { protectOfUnmappedPage = true }
                    // The backing a protect names is the one already there.
                    if let e = pages[first + i], e.region != region || e.fdOffset != off + i * page { protectOfUnmappedPage = true }
                    pages[first + i]?.permission = perm
                case .unmap:
                    pages[first + i] = nil
                }
            }
        }
    }
}

@Suite struct AddressSpacePropertyTests {
    static let barPages: UInt64 = 256

    enum Op: CustomStringConvertible {
        case update(bus: UInt64, length: UInt64, region: MemoryRegion, offset: UInt64, perm: Permission)
        case invalidate(bus: UInt64, length: UInt64)
        case freeze
        var description: String {
            switch self {
            case .update(let b, let l, let r, let o, let p): "update(\(Hex(b)), \(Hex(l)), \(r.id)+\(Hex(o)), \(p))"
            case .invalidate(let b, let l): "invalidate(\(Hex(b)), \(Hex(l)))"
            case .freeze: "freeze"
            }
        }
    }

    static func randomOp(_ rng: inout SplitMix64, fixture f: Fixture, staticMode: Bool) -> Op {
        let roll = UInt64.random(in: 0..<100, using: &rng)
        if staticMode && roll < 2 { return .freeze }
        var bus = UInt64.random(in: 0..<(barPages + 8), using: &rng) * page
        var length = UInt64.random(in: 0...16, using: &rng) * page
        if UInt64.random(in: 0..<50, using: &rng) == 0 { bus += 1 }
        if UInt64.random(in: 0..<50, using: &rng) == 0 { length += 1 }
        if UInt64.random(in: 0..<100, using: &rng) == 0 { bus = UInt64.max - page + 1 }
        if roll < 65 {
            let region = [f.ram, f.high, f.readOnly][Int.random(in: 0..<3, using: &rng)]
            // Mostly inside the region, sometimes straddling its end.
            let offset = UInt64.random(in: 0..<6, using: &rng) == 0
                ? region.size - UInt64.random(in: 0...4, using: &rng) * page
                : UInt64.random(in: 0..<64, using: &rng) * page
            let perm = Permission(rawValue: UInt8.random(in: 0...3, using: &rng))
            return .update(bus: bus, length: length, region: region, offset: offset, perm: perm)
        }
        if UInt64.random(in: 0..<4, using: &rng) == 0 { bus += UInt64.random(in: 1..<page, using: &rng) }
        return .invalidate(bus: bus, length: length)
    }

    /// Independent statement of the rules, for the success/failure verdict.
    static func referenceAccepts(_ op: Op, config: AddressSpaceConfiguration, frozen: Bool) -> Bool {
        let bar = config.barSize
        switch op {
        case .freeze:
            return config.mode == .static
        case .update(let bus, let length, let region, let offset, let perm):
            guard length > 0, bus <= UInt64.max - length, bus + length <= bar,
                  bus % page == 0, length % page == 0, !perm.isEmpty,
                  offset <= region.size, length <= region.size - offset,
                  region.permission.isSuperset(of: perm) else { return false }
            if config.mode == .static {
                guard !frozen, config.staticWindows.contains(where: { bus >= $0.base.rawValue && bus + length <= $0.limit }) else { return false }
            }
            return true
        case .invalidate:
            // Revocation fails closed: never refused (size 0 = to the end).
            return true
        }
    }

    static func run(seed: UInt64, staticMode: Bool, steps: Int) {
        var rng = SplitMix64(seed: seed)
        let f = Fixture()
        let windows = staticMode
            ? [BusWindow(base: BusAddress(16 * page), limit: 96 * page)!, BusWindow(base: BusAddress(128 * page), limit: 200 * page)!]
            : []
        let config = AddressSpaceConfiguration(barSize: barPages * page, mode: staticMode ? .static : .iommu,
                                               staticWindows: windows, maxMappings: 100_000)
        var space = try! AddressSpace(config)
        var reference: [UInt64: Entry] = [:]
        var window = FakeWindow()
        var frozen = false

        for step in 0..<steps {
            let op = randomOp(&rng, fixture: f, staticMode: staticMode)
            let expected = referenceAccepts(op, config: config, frozen: frozen)
            let before = space.mappings
            var plan: WindowPlan?
            do {
                switch op {
                case .freeze:
                    try space.freeze()
                    plan = .empty
                case .update(let bus, let length, let region, let offset, let perm):
                    plan = try space.update(bus: BusAddress(bus), length: length,
                                            source: .user(FrontendUserAddress(region.userAddress.rawValue + offset)),
                                            permission: perm, regions: f.table)
                case .invalidate(let bus, let length):
                    plan = try space.invalidate(bus: BusAddress(bus), length: length)
                }
            } catch {
                plan = nil
            }
            let context = "seed \(seed) step \(step): \(op)"
            #expect((plan != nil) == expected, "\(context): model accepted \(plan != nil), reference \(expected)")
            guard let plan else {
                #expect(space.mappings == before, "\(context): a refused change altered the model")
                continue
            }
            // Update the reference.
            switch op {
            case .freeze:
                frozen = true
            case .update(let bus, let length, let region, let offset, let perm):
                for i in 0..<(length / page) {
                    reference[bus / page + i] = Entry(permission: perm, region: region.id,
                                                      fdOffset: region.mmapOffset + offset + i * page)
                }
            case .invalidate(let bus, let length):
                guard bus < barPages * page else { break }
                let end = length == 0 ? barPages * page
                    : min(bus.addingReportingOverflow(length).overflow ? UInt64.max : bus + length, barPages * page)
                let first = bus / page, last = (end - 1) / page
                for p in first...last { reference[p] = nil }
            }
            window.apply(plan)
            #expect(!window.protectOfUnmappedPage, "\(context): protect of an unmapped page")
            if let violation = space.invariantViolation() { Issue.record("\(context): \(violation)"); return }
            // Every page agrees three ways: model lookup, reference, executed plan.
            var runs = 0
            var previous: (UInt64, Entry)?
            for p in 0..<barPages {
                let probe = p * page + UInt64.random(in: 0..<page, using: &rng)
                let fromModel = space.lookup(BusAddress(probe)).map {
                    Entry(permission: $0.permission, region: $0.region, fdOffset: $0.fdOffset + (p * page - $0.bus.rawValue))
                }
                if fromModel != reference[p] || window.pages[p] != reference[p] {
                    Issue.record("\(context): page \(p) model \(String(describing: fromModel)) window \(String(describing: window.pages[p])) reference \(String(describing: reference[p]))")
                    return
                }
                if let e = reference[p] {
                    if let (pp, pe) = previous, pp + 1 == p, pe.permission == e.permission, pe.region == e.region,
                       pe.fdOffset + page == e.fdOffset {
                        // continues the run
                    } else {
                        runs += 1
                    }
                    previous = (p, e)
                }
            }
            // Coalescing is maximal: one mapping per run of continuable pages.
            #expect(space.mappings.count == runs, "\(context): \(space.mappings.count) mappings for \(runs) runs")
            #expect(space.mappedBytes == UInt64(reference.count) * page)
        }
    }

    @Test(arguments: 1...24 as ClosedRange<UInt64>)
    func iommuModelMatchesThePageReference(seed: UInt64) {
        Self.run(seed: seed, staticMode: false, steps: 300)
    }

    @Test(arguments: 100...111 as ClosedRange<UInt64>)
    func staticModelMatchesThePageReference(seed: UInt64) {
        Self.run(seed: seed, staticMode: true, steps: 300)
    }
}
