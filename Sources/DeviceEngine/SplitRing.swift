import BridgeCore
import LinuxIO

/// Where every field of one split virtqueue is (virtio 1.x §2.7): the same
/// addresses for the driver (VM1, in guest RAM) and the device (VM2, in its
/// BAR), named instead of spelled as offsets.
public struct SplitRing: Equatable, Sendable {
    public var size: UInt32
    public var desc: UInt64
    public var avail: UInt64
    public var used: UInt64

    public init(size: UInt32, desc: UInt64, avail: UInt64, used: UInt64) {
        self.size = size; self.desc = desc; self.avail = avail; self.used = used
    }

    private typealias L = VringLayout

    /// Descriptor `index` in the table.
    public func descriptor(_ index: UInt16) -> UInt64 { desc + L.descriptorSize * UInt64(index) }
    /// `avail->flags` (`VirtqAvailFlags`).
    public var availFlags: UInt64 { avail }
    /// `avail->idx`: where the driver publishes how many entries it added.
    public var availIndex: UInt64 { avail + L.ringIndexOffset }
    /// `avail->ring[counter % size]`.
    public func availEntry(_ counter: UInt16) -> UInt64 {
        avail + L.ringHeaderSize + L.availEntrySize * UInt64(UInt32(counter) % size)
    }
    /// `used->flags` (`VirtqUsedFlags`).
    public var usedFlags: UInt64 { used }
    /// `used->idx`.
    public var usedIndex: UInt64 { used + L.ringIndexOffset }
    /// `used->ring[counter % size]`: `{u32 id, u32 len}`, `id` first.
    public func usedElement(_ counter: UInt16) -> UInt64 {
        used + L.ringHeaderSize + L.usedElementSize * UInt64(UInt32(counter) % size)
    }
    /// `used->ring[counter % size].len`.
    public func usedElementLength(_ counter: UInt16) -> UInt64 { usedElement(counter) + L.usedElementLengthOffset }
    /// `avail->used_event` (VIRTIO_F_EVENT_IDX): the driver wants a call
    /// when the used index passes it.
    public var usedEvent: UInt64 { avail + L.ringHeaderSize + L.availEntrySize * UInt64(size) }
    /// `used->avail_event` (VIRTIO_F_EVENT_IDX): the device wants a kick
    /// when the avail index passes it.
    public var availEvent: UInt64 { used + L.ringHeaderSize + L.usedElementSize * UInt64(size) }

    /// Bytes of the descriptor table, the avail ring and the used ring (each
    /// with its trailing event field only when `eventIndex`): `VringLayout`'s
    /// sizes, which always count the event fields.
    public var descriptorTableBytes: UInt64 { L.descriptorTableSize(size) }
    public func availBytes(eventIndex: Bool) -> UInt64 { L.availRingSize(size) - (eventIndex ? 0 : L.eventFieldSize) }
    public func usedBytes(eventIndex: Bool) -> UInt64 { L.usedRingSize(size) - (eventIndex ? 0 : L.eventFieldSize) }

    /// Why this ring cannot be served at all (virtio 1.x §2.7: a power-of-two
    /// size up to 32768, descriptors 16-byte, avail 2-byte and used 4-byte
    /// aligned, nothing wrapping); nil when it can.
    public func defect(eventIndex: Bool) -> String? {
        let maximum = L.maximumQueueSize
        guard size >= 1, size <= maximum, size.nonzeroBitCount == 1 else { return "queue size \(size) is not a power of two in 1...\(maximum)" }
        guard desc % L.descriptorTableAlignment == 0, avail % L.availRingAlignment == 0,
              used % L.usedRingAlignment == 0 else { return "ring addresses are misaligned" }
        guard desc <= UInt64.max - descriptorTableBytes, avail <= UInt64.max - availBytes(eventIndex: eventIndex),
              used <= UInt64.max - usedBytes(eventIndex: eventIndex) else { return "ring addresses wrap" }
        return nil
    }
}
