import BridgeCore

/// VM2's own record of what the daemon mapped into its BAR, so that every
/// access the device makes is checked before it touches memory: a descriptor
/// pointing outside a mapped range is a device error, never a fault. Kept on
/// the same `RangeMap` as the daemon's `AddressSpace`.
public struct PeerMappingTable: Sendable {
    public struct Range: RangeMapElement {
        public var start: UInt64
        public var end: UInt64
        public var permission: Permission

        public func clipped(to start: UInt64, _ end: UInt64) -> Range? {
            let s = max(start, self.start), e = min(end, self.end)
            return s < e ? Range(start: s, end: e, permission: permission) : nil
        }

        public func joined(with next: Range) -> Range? {
            end == next.start && permission == next.permission ? Range(start: start, end: next.end, permission: permission) : nil
        }
    }

    private var map = RangeMap<Range>()

    public init() {}

    /// Removes `[start, end)` from every range (splitting).
    public mutating func remove(_ start: UInt64, _ end: UInt64) {
        guard start < end else { return }
        map.apply(map.change(replacing: start, end, with: nil))
    }

    /// `[start, end)` now has `permission`, whatever was there before.
    public mutating func add(_ start: UInt64, _ end: UInt64, _ permission: Permission) {
        guard start < end else { return }
        map.apply(map.change(replacing: start, end, with: Range(start: start, end: end, permission: permission)))
    }

    public var bytesMapped: UInt64 { map.elements.reduce(0) { $0 + $1.end - $1.start } }

    public enum Failure: Equatable, Sendable { case wraps, outsideBAR, notMapped(at: UInt64), denied(at: UInt64, granted: Permission) }

    /// nil when all of `[address, address+length)` is mapped with `needed`.
    public func check(_ address: UInt64, length: UInt64, needed: Permission, barSize: UInt64) -> Failure? {
        guard length > 0 else { return nil }
        let (end, overflow) = address.addingReportingOverflow(length)
        if overflow { return .wraps }
        if end > barSize { return .outsideBAR }
        switch map.cover(address, end, { range, _ in range.permission.isSuperset(of: needed) }) {
        case nil: return nil
        case .gap(let at)?: return .notMapped(at: at)
        case .rejected(let range, let at)?: return .denied(at: at, granted: range.permission)
        }
    }
}
