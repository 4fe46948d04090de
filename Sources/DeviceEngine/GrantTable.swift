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
        /// VM1's guest-physical address of a byte is its BAR offset plus
        /// this (wrapping); nil when the daemon did not say (no `dirtyLog`).
        public var guestPhysicalDelta: UInt64?

        public init(start: UInt64, end: UInt64, permission: Permission, guestPhysicalDelta: UInt64? = nil) {
            self.start = start; self.end = end; self.permission = permission; self.guestPhysicalDelta = guestPhysicalDelta
        }

        public func clipped(to start: UInt64, _ end: UInt64) -> Range? {
            let s = max(start, self.start), e = min(end, self.end)
            return s < e ? Range(start: s, end: e, permission: permission, guestPhysicalDelta: guestPhysicalDelta) : nil
        }

        public func joined(with next: Range) -> Range? {
            end == next.start && permission == next.permission && guestPhysicalDelta == next.guestPhysicalDelta
                ? Range(start: start, end: next.end, permission: permission, guestPhysicalDelta: guestPhysicalDelta) : nil
        }

        /// The guest-physical address of BAR offset `address` in this range.
        public func guestPhysical(of address: UInt64) -> UInt64? { guestPhysicalDelta.map { address &+ $0 } }
    }

    private var map = RangeMap<Range>()

    public init() {}

    /// Removes `[start, end)` from every range (splitting).
    public mutating func remove(_ start: UInt64, _ end: UInt64) {
        guard start < end, !map.elements.isEmpty else { return } // the common case of the unsealed and lost tables: nothing to do
        map.apply(map.change(replacing: start, end, with: nil))
    }

    /// `[start, end)` now has `permission` (and, when known, the
    /// guest-physical address `guestPhysical` at `start`), whatever was there before.
    public mutating func add(_ start: UInt64, _ end: UInt64, _ permission: Permission, guestPhysical: UInt64? = nil) {
        guard start < end else { return }
        let range = Range(start: start, end: end, permission: permission, guestPhysicalDelta: guestPhysical.map { $0 &- start })
        map.apply(map.change(replacing: start, end, with: range))
    }

    /// The one range holding `address`, if any.
    public func range(containing address: UInt64) -> Range? { map.element(containing: address) }

    public var bytesMapped: UInt64 { map.elements.reduce(0) { $0 + $1.end - $1.start } }

    /// Every range, in order.
    public var ranges: [Range] { Array(map.elements) }

    /// Whether any range overlaps `[address, address+length)` (a scan: for
    /// small tables off the fast path).
    public func touches(_ address: UInt64, _ length: UInt64) -> Bool {
        let (end, overflow) = address.addingReportingOverflow(max(length, 1))
        let last = overflow ? UInt64.max : end
        return map.elements.contains { $0.start < last && address < $0.end }
    }

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

/// What VM2 was granted, with a last-hit shortcut for the data path: a
/// device checks every descriptor, and consecutive packets almost always sit
/// in the range the previous one did. A miss falls back to the table's
/// search; any grant or revocation forgets the shortcut (and bumps
/// `generation`, so callers that cached "ring areas granted" re-check).
public struct GrantTable: Sendable {
    public private(set) var table = PeerMappingTable()
    public private(set) var generation: UInt64 = 0
    public let barSize: UInt64
    private var hit: PeerMappingTable.Range?

    /// `generation` continues a previous table's count, so a queue's cached
    /// "ring areas granted" never matches a new table by accident.
    public init(barSize: UInt64, generation: UInt64 = 0) {
        self.barSize = barSize
        self.generation = generation
    }

    /// Records a grant, clipped to the BAR (the shortcut must never cover
    /// bytes past it).
    public mutating func grant(_ start: UInt64, _ end: UInt64, _ permission: Permission, guestPhysical: UInt64? = nil) {
        table.add(start, min(end, barSize), permission, guestPhysical: guestPhysical)
        hit = nil
        generation &+= 1
    }

    public mutating func revoke(_ start: UInt64, _ end: UInt64) {
        table.remove(start, end)
        hit = nil
        generation &+= 1
    }

    public var bytesMapped: UInt64 { table.bytesMapped }

    /// nil when all of `[address, address+length)` is granted with `needed`.
    @inline(__always)
    public mutating func check(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> PeerMappingTable.Failure? {
        if let h = hit, address >= h.start, address < h.end, length <= h.end - address, h.permission.isSuperset(of: needed) {
            return nil
        }
        return checkSlow(address, length, needed)
    }

    private mutating func checkSlow(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> PeerMappingTable.Failure? {
        if let failure = table.check(address, length: length, needed: needed, barSize: barSize) { return failure }
        if let r = table.range(containing: address), length <= r.end - address { hit = r }
        return nil
    }

    /// The granted range holding `address` (the last hit first).
    @inline(__always)
    public func range(containing address: UInt64) -> PeerMappingTable.Range? {
        if let h = hit, address >= h.start, address < h.end { return h }
        return table.range(containing: address)
    }

    /// `check` without touching the shortcut (ring areas, checked once per
    /// grant generation, would otherwise evict the buffers' range).
    public func checkOnce(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> PeerMappingTable.Failure? {
        table.check(address, length: length, needed: needed, barSize: barSize)
    }
}
