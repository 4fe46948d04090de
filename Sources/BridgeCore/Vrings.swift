/// Where a split virtqueue lives in the BAR.
public struct VringLayout: Equatable, Sendable {
    public static let maximumQueueSize: UInt32 = 32768
    public var queueSize: UInt32
    public var descriptorTable: BusAddress
    public var availRing: BusAddress
    public var usedRing: BusAddress

    public init(queueSize: UInt32, descriptorTable: BusAddress, availRing: BusAddress, usedRing: BusAddress) {
        self.queueSize = queueSize
        self.descriptorTable = descriptorTable
        self.availRing = availRing
        self.usedRing = usedRing
    }

    // Sizes from the virtio 1.x spec §2.7 (split virtqueues), including the
    // trailing used_event / avail_event fields.
    public static func descriptorTableSize(_ n: UInt32) -> UInt64 { 16 * UInt64(n) }
    public static func availRingSize(_ n: UInt32) -> UInt64 { 6 + 2 * UInt64(n) }
    public static func usedRingSize(_ n: UInt32) -> UInt64 { 6 + 8 * UInt64(n) }
}

extension AddressSpace {
    /// Checks a split virtqueue before its ring is started: queue size, the
    /// virtio 1.x alignments, and that each part is mapped with the access the
    /// device needs (descriptor table and avail ring read, used ring read+write).
    public func validate(_ vring: VringLayout) throws(AddressSpaceError) {
        let n = vring.queueSize
        guard n >= 1, n <= VringLayout.maximumQueueSize, n.nonzeroBitCount == 1 else { throw .invalidQueueSize(n) }
        let parts: [(AccessPurpose, BusAddress, UInt64, UInt64, Permission)] = [
            (.descriptorTable, vring.descriptorTable, VringLayout.descriptorTableSize(n), 16, .read),
            (.availRing, vring.availRing, VringLayout.availRingSize(n), 2, .read),
            (.usedRing, vring.usedRing, VringLayout.usedRingSize(n), 4, .readWrite),
        ]
        for (purpose, address, size, alignment, needed) in parts {
            guard address.isAligned(to: alignment) else { throw .ringMisaligned(purpose, address, alignment: alignment) }
            try checkAccess(address, length: size, needed: needed, purpose: purpose)
        }
    }
}
