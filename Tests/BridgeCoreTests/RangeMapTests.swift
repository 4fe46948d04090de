import Testing
import TestSupport
@testable import BridgeCore

/// A plain range with a tag: joined when adjacent with the same tag.
private struct Tagged: RangeMapElement {
    var start: UInt64
    var end: UInt64
    var tag: Int
    func clipped(to s: UInt64, _ e: UInt64) -> Tagged? {
        let a = max(s, start), b = min(e, end)
        return a < b ? Tagged(start: a, end: b, tag: tag) : nil
    }
    func joined(with next: Tagged) -> Tagged? {
        end == next.start && tag == next.tag ? Tagged(start: start, end: next.end, tag: tag) : nil
    }
}

@Suite struct RangeMapTests {
    private func put(_ m: inout RangeMap<Tagged>, _ s: UInt64, _ e: UInt64, _ tag: Int?) -> [Tagged] {
        let change = m.change(replacing: s, e, with: tag.map { Tagged(start: s, end: e, tag: $0) })
        m.apply(change)
        return change.removed
    }

    @Test func replaceSplitsJoinsAndReportsWhatWasThere() {
        var m = RangeMap<Tagged>()
        _ = put(&m, 10, 20, 1)
        _ = put(&m, 20, 30, 1)
        #expect(m.elements == [Tagged(start: 10, end: 30, tag: 1)], "adjacent, same tag: one element")
        let removed = put(&m, 15, 25, 2)
        #expect(removed == [Tagged(start: 15, end: 25, tag: 1)])
        #expect(m.elements == [Tagged(start: 10, end: 15, tag: 1), Tagged(start: 15, end: 25, tag: 2), Tagged(start: 25, end: 30, tag: 1)])
        _ = put(&m, 12, 28, nil)
        #expect(m.elements == [Tagged(start: 10, end: 12, tag: 1), Tagged(start: 28, end: 30, tag: 1)])
        #expect(m.invariantViolation() == nil)
    }

    @Test func lookupsAreBoundaryExact() {
        var m = RangeMap<Tagged>()
        _ = put(&m, 100, 200, 1)
        _ = put(&m, 300, 400, 2)
        #expect(m.element(containing: 99) == nil && m.element(containing: 100)?.tag == 1 && m.element(containing: 199)?.tag == 1)
        #expect(m.element(containing: 200) == nil && m.element(containing: 399)?.tag == 2 && m.element(containing: 400) == nil)
        #expect(m.intersecting(150, 350) == [Tagged(start: 150, end: 200, tag: 1), Tagged(start: 300, end: 350, tag: 2)])
        #expect(m.intersecting(200, 300).isEmpty)
        #expect(m.removeAll { $0.tag == 1 } == [Tagged(start: 100, end: 200, tag: 1)] && m.count == 1)
    }

    @Test func coverStopsAtTheFirstHoleOrRejectedElement() {
        var m = RangeMap<Tagged>()
        _ = put(&m, 100, 200, 1)
        _ = put(&m, 200, 300, 2)
        _ = put(&m, 400, 500, 1)
        var seen: [UInt64] = []
        #expect(m.cover(150, 250) { _, at in seen.append(at); return true } == nil)
        #expect(seen == [150, 200], "each element with the address it is first needed at")
        guard case .gap(let at)? = m.cover(150, 450, { _, _ in true }) else { Issue.record("no gap"); return }
        #expect(at == 300)
        guard case .rejected(let e, let at2)? = m.cover(100, 300, { e, _ in e.tag == 1 }) else { Issue.record("not rejected"); return }
        #expect(e.tag == 2 && at2 == 200)
        guard case .gap(let at3)? = m.cover(50, 60, { _, _ in true }) else { Issue.record("no gap"); return }
        #expect(at3 == 50)
    }

    /// A seeded run against a per-unit reference: the map always agrees with
    /// it and keeps its invariants (sorted, disjoint, fully joined).
    @Test func agreesWithAReferenceUnderRandomChanges() {
        var rng = SplitMix64(seed: 7)
        var m = RangeMap<Tagged>()
        var reference = [Int?](repeating: nil, count: 256)
        for _ in 0..<3000 {
            let s = UInt64(rng.next() % 250), e = s + 1 + UInt64(rng.next() % 6)
            let tag: Int? = rng.next() % 4 == 0 ? nil : Int(rng.next() % 3)
            _ = put(&m, s, min(e, 256), tag)
            for i in Int(s)..<Int(min(e, 256)) { reference[i] = tag }
            if let broken = m.invariantViolation() { Issue.record("\(broken)"); return }
        }
        for i in 0..<256 { #expect(m.element(containing: UInt64(i))?.tag == reference[i], "unit \(i)") }
    }

    /// The search index at sizes where it has one to four levels above the
    /// ends and lays itself out again (growing past its capacity, shrinking
    /// under a quarter of it): after every batch of changes it matches the
    /// elements key for key, and every search agrees with a linear scan.
    @Test(arguments: [9, 70, 600, 5000])
    func theSearchIndexAgreesWithALinearScan(elements target: Int) {
        var rng = SplitMix64(seed: UInt64(target))
        var m = RangeMap<Tagged>()
        func checkSearches() -> Bool {
            if let broken = m.invariantViolation() { Issue.record("\(broken) at \(m.count) elements"); return false }
            let last = m.elements.last?.end ?? 0
            for probe in [0, 1, last &- 1, last, last + 1] + (0..<200).map({ _ in rng.next() % (last + 10) }) {
                let expected = m.elements.firstIndex { $0.end > probe } ?? m.count
                guard m.firstIndex(endingAbove: probe) == expected else {
                    Issue.record("first end above \(probe): \(m.firstIndex(endingAbove: probe)), linear scan \(expected), \(m.count) elements")
                    return false
                }
            }
            return true
        }
        // Grow: units of two (one mapped, one gap), in random order, so
        // changes land in the middle as well as at the end.
        for unit in (0..<UInt64(target)).shuffled(using: &rng) {
            _ = put(&m, unit * 2, unit * 2 + 1, Int(unit % 2))
            if unit % 97 == 0, !checkSearches() { return }
        }
        #expect(m.count == target)
        guard checkSearches() else { return }
        // Replace runs (splits and joins), then shrink to a few elements.
        for _ in 0..<(target / 4) {
            let s = rng.next() % UInt64(2 * target), e = s + 1 + rng.next() % 5
            _ = put(&m, s, e, rng.next() % 3 == 0 ? nil : Int(rng.next() % 2))
        }
        guard checkSearches() else { return }
        _ = m.removeAll { $0.start > 10 }
        guard checkSearches() else { return }
        _ = put(&m, 0, UInt64(2 * target), nil)
        #expect(m.count == 0)
        _ = checkSearches()
    }
}
