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

    public func descriptor(_ index: UInt16) -> UInt64 { desc + Descriptor.size * UInt64(index) }
    /// `avail->idx`: where the driver publishes how many entries it added.
    public var availIndex: UInt64 { avail + 2 }
    /// `avail->ring[counter % size]`.
    public func availEntry(_ counter: UInt16) -> UInt64 { avail + 4 + 2 * UInt64(UInt32(counter) % size) }
    /// `used->idx`.
    public var usedIndex: UInt64 { used + 2 }
    /// `used->ring[counter % size]`: `{u32 id, u32 len}`.
    public func usedElement(_ counter: UInt16) -> UInt64 { used + 4 + 8 * UInt64(UInt32(counter) % size) }
    /// `avail->used_event` (VIRTIO_F_EVENT_IDX): the driver wants a call
    /// when the used index passes it.
    public var usedEvent: UInt64 { avail + 4 + 2 * UInt64(size) }
    /// `used->avail_event` (VIRTIO_F_EVENT_IDX): the device wants a kick
    /// when the avail index passes it.
    public var availEvent: UInt64 { used + 4 + 8 * UInt64(size) }

    /// Bytes of the descriptor table, the avail ring and the used ring (each
    /// with its trailing event field only when `eventIndex`): `VringLayout`'s
    /// sizes, which always count the event fields.
    public var descriptorTableBytes: UInt64 { VringLayout.descriptorTableSize(size) }
    public func availBytes(eventIndex: Bool) -> UInt64 { VringLayout.availRingSize(size) - (eventIndex ? 0 : 2) }
    public func usedBytes(eventIndex: Bool) -> UInt64 { VringLayout.usedRingSize(size) - (eventIndex ? 0 : 2) }

    /// Why this ring cannot be served at all (virtio 1.x §2.7: a power-of-two
    /// size up to 32768, descriptors 16-byte, avail 2-byte and used 4-byte
    /// aligned, nothing wrapping); nil when it can.
    public func defect(eventIndex: Bool) -> String? {
        let maximum = VringLayout.maximumQueueSize
        guard size >= 1, size <= maximum, size.nonzeroBitCount == 1 else { return "queue size \(size) is not a power of two in 1...\(maximum)" }
        guard desc % 16 == 0, avail % 2 == 0, used % 4 == 0 else { return "ring addresses are misaligned" }
        guard desc <= UInt64.max - descriptorTableBytes, avail <= UInt64.max - availBytes(eventIndex: eventIndex),
              used <= UInt64.max - usedBytes(eventIndex: eventIndex) else { return "ring addresses wrap" }
        return nil
    }
}

/// One 16-byte split-ring descriptor: `{u64 addr, u32 len, u16 flags, u16 next}`.
public struct Descriptor: Equatable, Sendable {
    public static let size: UInt64 = 16
    public static let flagNext: UInt16 = 1
    public static let flagWrite: UInt16 = 2
    public static let flagIndirect: UInt16 = 4

    public var address: UInt64
    public var length: UInt32
    public var flags: UInt16
    public var next: UInt16

    public init(address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        self.address = address; self.length = length; self.flags = flags; self.next = next
    }

    public var hasNext: Bool { flags & Self.flagNext != 0 }
    public var deviceWritable: Bool { flags & Self.flagWrite != 0 }

    /// Decodes the 16 bytes at `offset`; nil when outside `memory`.
    public static func load(from memory: some SharedMemory, at offset: UInt64) -> Descriptor? {
        memory.withBytes(at: offset, length: Int(size)) { b in
            Descriptor(address: UInt64(littleEndian: b.loadUnaligned(as: UInt64.self)),
                       length: UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 8, as: UInt32.self)),
                       flags: UInt16(littleEndian: b.loadUnaligned(fromByteOffset: 12, as: UInt16.self)),
                       next: UInt16(littleEndian: b.loadUnaligned(fromByteOffset: 14, as: UInt16.self)))
        }
    }

    @discardableResult
    public func store(to memory: some SharedMemory, at offset: UInt64) -> Bool {
        memory.withBytes(at: offset, length: Int(Self.size)) { (b: UnsafeMutableRawBufferPointer) -> Void in
            b.storeBytes(of: address.littleEndian, as: UInt64.self)
            b.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
            b.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
            b.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
        } != nil
    }
}

