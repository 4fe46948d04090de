import BridgeCore

/// VM2's own record of what the daemon mapped into its BAR, so that every
/// access the device makes is checked before it touches memory: a descriptor
/// pointing outside a mapped range is a device error, never a fault.
public struct PeerMappingTable: Sendable {
    public struct Range: Equatable, Sendable {
        public var start: UInt64
        public var end: UInt64
        public var permission: Permission
    }
    public private(set) var ranges: [Range] = []

    public init() {}

    /// Removes `[start, end)` from every range (splitting).
    public mutating func remove(_ start: UInt64, _ end: UInt64) {
        var out: [Range] = []
        for r in ranges {
            if r.end <= start || r.start >= end { out.append(r); continue }
            if r.start < start { out.append(Range(start: r.start, end: start, permission: r.permission)) }
            if r.end > end { out.append(Range(start: end, end: r.end, permission: r.permission)) }
        }
        ranges = out
    }

    public mutating func add(_ start: UInt64, _ end: UInt64, _ permission: Permission) {
        remove(start, end)
        let i = ranges.firstIndex { $0.start > start } ?? ranges.endIndex
        ranges.insert(Range(start: start, end: end, permission: permission), at: i)
    }

    public enum Failure: Equatable, Sendable { case wraps, outsideBAR, notMapped(at: UInt64), denied(at: UInt64, granted: Permission) }

    /// nil when all of `[address, address+length)` is mapped with `needed`.
    public func check(_ address: UInt64, length: UInt64, needed: Permission, barSize: UInt64) -> Failure? {
        guard length > 0 else { return nil }
        let (end, overflow) = address.addingReportingOverflow(length)
        if overflow { return .wraps }
        if end > barSize { return .outsideBAR }
        var cursor = address
        var lo = 0, hi = ranges.count
        while lo < hi { let mid = (lo + hi) / 2; if ranges[mid].end <= cursor { lo = mid + 1 } else { hi = mid } }
        var i = lo
        while cursor < end {
            guard i < ranges.count, ranges[i].start <= cursor else { return .notMapped(at: cursor) }
            guard ranges[i].permission.isSuperset(of: needed) else { return .denied(at: cursor, granted: ranges[i].permission) }
            cursor = ranges[i].end
            i += 1
        }
        return nil
    }
}
