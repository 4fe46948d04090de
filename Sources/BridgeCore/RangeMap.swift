/// An element of a `RangeMap`: a non-empty range `[start, end)` with a value
/// that can be cut (`clipped`) and joined with a neighbour that continues it.
public protocol RangeMapElement: Equatable, Sendable {
    var start: UInt64 { get }
    /// Exclusive.
    var end: UInt64 { get }
    /// The part inside `[start, end)`; nil when disjoint.
    func clipped(to start: UInt64, _ end: UInt64) -> Self?
    /// `self` followed by `next` as one element, when `next` continues it
    /// (adjacent, and the same in every other respect); else nil.
    func joined(with next: Self) -> Self?
}

/// Sorted, non-overlapping ranges, kept as few as possible (neighbours that
/// continue each other are joined): the one range map behind the daemon's
/// `AddressSpace` and VM2's record of its BAR (as rust-vmm's vm-memory puts
/// its IOTLB on one range map). Lookups search a B-tree of the ends (`SearchIndex`); a change touches
/// only the elements around its range. Pure.
public struct RangeMap<Element: RangeMapElement>: Sendable {
    public private(set) var elements: [Element] = []
    /// The elements' ends as a B-tree of fan-out 8: a search reads one
    /// 64-byte block per level instead of a whole element per probe.
    private var index = SearchIndex()

    public init() {}

    public var count: Int { elements.count }
    public var isEmpty: Bool { elements.isEmpty }

    /// Index of the first element whose end is above `address`.
    public func firstIndex(endingAbove address: UInt64) -> Int {
        index.firstIndex(above: address)
    }

    /// The element containing `address`.
    public func element(containing address: UInt64) -> Element? {
        let i = firstIndex(endingAbove: address)
        guard i < elements.count, elements[i].start <= address else { return nil }
        return elements[i]
    }

    /// The elements (clipped) that intersect `[start, end)`.
    public func intersecting(_ start: UInt64, _ end: UInt64) -> [Element] {
        var result: [Element] = []
        var i = firstIndex(endingAbove: start)
        while i < elements.count, elements[i].start < end {
            if let piece = elements[i].clipped(to: start, end) { result.append(piece) }
            i += 1
        }
        return result
    }

    /// Why `[start, end)` is not covered: a hole, or an element `accept` rejected.
    public enum CoverageFailure {
        case gap(at: UInt64)
        case rejected(Element, at: UInt64)
    }

    /// Walks the elements covering `[start, end)` in order, handing `accept`
    /// each one with the address it is first needed at; stops at the first
    /// hole or rejected element. nil when all of the range is covered and
    /// accepted. (The one checked walk behind `AddressSpace.checkAccess` and
    /// VM2's `PeerMappingTable.check`.)
    public func cover(_ start: UInt64, _ end: UInt64, _ accept: (Element, UInt64) -> Bool) -> CoverageFailure? {
        var cursor = start
        var i = firstIndex(endingAbove: cursor)
        while cursor < end {
            guard i < elements.count, elements[i].start <= cursor else { return .gap(at: cursor) }
            guard accept(elements[i], cursor) else { return .rejected(elements[i], at: cursor) }
            cursor = elements[i].end
            i += 1
        }
        return nil
    }

    /// A computed change, not applied yet: `elements[lower..<upper]` becomes
    /// `replacement`; `removed` is what lay inside the changed range.
    public struct Change: Sendable {
        public var lower: Int
        public var upper: Int
        public var replacement: [Element]
        public var removed: [Element]
        public var countAfter: Int
    }

    /// Plans replacing whatever lies in `[start, end)` by `insert` (which must
    /// lie inside it), joining with the neighbours. O(log n + k).
    public func change(replacing start: UInt64, _ end: UInt64, with insert: Element?) -> Change {
        let i0 = firstIndex(endingAbove: start)
        var i1 = i0
        while i1 < elements.count, elements[i1].start < end { i1 += 1 }
        var removed: [Element] = []
        var middle: [Element] = []
        if i0 < i1 {
            let first = elements[i0], last = elements[i1 - 1]
            if first.start < start, let left = first.clipped(to: first.start, start) { middle.append(left) }
            for e in elements[i0..<i1] {
                if let piece = e.clipped(to: start, end) { removed.append(piece) }
            }
            if let insert { middle.append(insert) }
            if last.end > end, let right = last.clipped(to: end, last.end) { middle.append(right) }
        } else if let insert {
            middle.append(insert)
        }
        var lo = i0, hi = i1
        if lo > 0 { middle.insert(elements[lo - 1], at: 0); lo -= 1 }
        if hi < elements.count { middle.append(elements[hi]); hi += 1 }
        var merged: [Element] = []
        merged.reserveCapacity(middle.count)
        for e in middle {
            if let prev = merged.last, let joined = prev.joined(with: e) {
                merged[merged.count - 1] = joined
            } else {
                merged.append(e)
            }
        }
        return Change(lower: lo, upper: hi, replacement: merged, removed: removed,
                      countAfter: elements.count - (hi - lo) + merged.count)
    }

    public mutating func apply(_ change: Change) {
        elements.replaceSubrange(change.lower..<change.upper, with: change.replacement)
        index.replace(change.lower..<change.upper, with: change.replacement.lazy.map(\.end))
    }

    /// Removes the elements `shouldRemove` picks; returns them.
    @discardableResult
    public mutating func removeAll(where shouldRemove: (Element) -> Bool) -> [Element] {
        let removed = elements.filter(shouldRemove)
        if !removed.isEmpty {
            elements.removeAll(where: shouldRemove)
            index.rebuild(elements.map(\.end))
        }
        return removed
    }

    /// Nil when sorted, non-overlapping, non-empty and fully joined; else the
    /// first broken invariant.
    public func invariantViolation() -> String? {
        if let broken = index.violation(expected: elements.map(\.end)) { return "the search index: \(broken)" }
        for (i, e) in elements.enumerated() {
            if e.start >= e.end { return "element \(i) is empty" }
            if i > 0 {
                let prev = elements[i - 1]
                if prev.end > e.start { return "elements \(i - 1) and \(i) overlap or are unsorted" }
                if prev.joined(with: e) != nil { return "elements \(i - 1) and \(i) should be joined" }
            }
        }
        return nil
    }
}
