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

    // The split-virtqueue layout (virtio 1.x §2.7), named once: every ring
    // offset and size in the codebase is built from these.
    /// One descriptor, `{le64 addr, le32 len, le16 flags, le16 next}`.
    public static let descriptorSize: UInt64 = 16
    /// `le16 flags` then `le16 idx`: the head of the avail and used rings.
    public static let ringHeaderSize: UInt64 = 4
    /// Where `idx` is in that head.
    public static let ringIndexOffset: UInt64 = 2
    /// One avail ring entry, `le16` (a chain's head).
    public static let availEntrySize: UInt64 = 2
    /// One used ring element, `{le32 id, le32 len}`.
    public static let usedElementSize: UInt64 = 8
    /// Where `len` is in a used element.
    public static let usedElementLengthOffset: UInt64 = 4
    /// `used_event` after the avail ring, `avail_event` after the used ring (VIRTIO_F_EVENT_IDX).
    public static let eventFieldSize: UInt64 = 2
    /// The alignments each part needs (virtio 1.x §2.7, table "Virtqueue Part Alignment").
    public static let descriptorTableAlignment: UInt64 = 16
    public static let availRingAlignment: UInt64 = 2
    public static let usedRingAlignment: UInt64 = 4

    // Sizes including the trailing used_event / avail_event fields.
    public static func descriptorTableSize(_ n: UInt32) -> UInt64 { descriptorSize * UInt64(n) }
    public static func availRingSize(_ n: UInt32) -> UInt64 { ringHeaderSize + availEntrySize * UInt64(n) + eventFieldSize }
    public static func usedRingSize(_ n: UInt32) -> UInt64 { ringHeaderSize + usedElementSize * UInt64(n) + eventFieldSize }
}

extension AddressSpace {
    /// Checks a split virtqueue before its ring is started: queue size, the
    /// virtio 1.x alignments, and that each part is mapped with the access the
    /// device needs (descriptor table and avail ring read, used ring read+write).
    public func validate(_ vring: VringLayout) throws(AddressSpaceError) {
        let n = vring.queueSize
        guard n >= 1, n <= VringLayout.maximumQueueSize, n.nonzeroBitCount == 1 else { throw .invalidQueueSize(n) }
        let parts: [(AccessPurpose, BusAddress, UInt64, UInt64, Permission)] = [
            (.descriptorTable, vring.descriptorTable, VringLayout.descriptorTableSize(n), VringLayout.descriptorTableAlignment, .read),
            (.availRing, vring.availRing, VringLayout.availRingSize(n), VringLayout.availRingAlignment, .read),
            (.usedRing, vring.usedRing, VringLayout.usedRingSize(n), VringLayout.usedRingAlignment, .readWrite),
        ]
        for (purpose, address, size, alignment, needed) in parts {
            guard address.isAligned(to: alignment) else { throw .ringMisaligned(purpose, address, alignment: alignment) }
            try checkAccess(address, length: size, needed: needed, purpose: purpose)
        }
    }
}
