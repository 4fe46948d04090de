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
}

/// One 16-byte split-ring descriptor: `{u64 addr, u32 len, u16 flags, u16 next}`.
public struct Descriptor: Equatable, Sendable {
    public static let size: UInt64 = 16
    public static let flagNext: UInt16 = 1
    public static let flagWrite: UInt16 = 2

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

/// Split-virtqueue layout helpers (virtio 1.x §2.7).
public enum Virtq {
    public static let descriptorSize = Descriptor.size

    /// Offsets of the three parts inside one ring area: descriptors, then the
    /// avail ring, then the used ring on the next 4 KiB boundary.
    public static func layout(queueSize n: UInt32) -> (desc: UInt64, avail: UInt64, used: UInt64, total: UInt64) {
        let avail = descriptorSize * UInt64(n)
        let used = (avail + VringLayout.availRingSize(n) + 4095) / 4096 * 4096
        let total = (used + VringLayout.usedRingSize(n) + 4095) / 4096 * 4096
        return (0, avail, used, total)
    }
}

/// The driver side (VM1) of one split virtqueue in guest RAM: publishes
/// buffer chains in the avail ring and collects them from the used ring.
public final class SplitVirtqueueDriver {
    public struct Buffer: Equatable, Sendable {
        /// The address the device uses: a GPA, or an IOVA with a vIOMMU.
        public var address: UInt64
        public var length: UInt32
        public var deviceWritable: Bool
        public init(address: UInt64, length: UInt32, deviceWritable: Bool) {
            self.address = address; self.length = length; self.deviceWritable = deviceWritable
        }
    }

    public let index: Int
    public let size: UInt16
    let ram: GuestRAM
    /// Where the ring lives in guest RAM.
    public let ringGPA: GuestPhysicalAddress
    public let kick: EventFD
    public let call: EventFD
    private var freeHead: UInt16 = 0
    public private(set) var freeCount: Int
    private var nextFree: [UInt16]
    private var availIndex: UInt16 = 0
    private var lastUsed: UInt16 = 0
    private var chainLength: [UInt16: Int] = [:]

    public init(index: Int, size: UInt16, ram: GuestRAM, ringGPA: GuestPhysicalAddress) throws(SystemCallError) {
        self.index = index
        self.size = size
        self.ram = ram
        self.ringGPA = ringGPA
        kick = try EventFD()
        call = try EventFD()
        freeCount = Int(size)
        nextFree = (0..<size).map { $0 &+ 1 }
        let total = Virtq.layout(queueSize: UInt32(size)).total
        _ = ram.write(Array(repeating: 0, count: Int(total)), at: ringGPA)
    }

    var layout: (desc: UInt64, avail: UInt64, used: UInt64, total: UInt64) { Virtq.layout(queueSize: UInt32(size)) }
    /// The ring's fields at their guest-physical addresses (the driver writes through its RAM).
    var ring: SplitRing { SplitRing(size: UInt32(size), desc: descGPA.rawValue, avail: availGPA.rawValue, used: usedGPA.rawValue) }
    public var descGPA: GuestPhysicalAddress { GuestPhysicalAddress(ringGPA.rawValue + layout.desc) }
    public var availGPA: GuestPhysicalAddress { GuestPhysicalAddress(ringGPA.rawValue + layout.avail) }
    public var usedGPA: GuestPhysicalAddress { GuestPhysicalAddress(ringGPA.rawValue + layout.used) }
    public var ringBytes: UInt64 { layout.total }

    /// Publishes a chain; returns its head, or nil when the ring is full.
    @discardableResult
    public func add(_ buffers: [Buffer]) -> UInt16? {
        guard !buffers.isEmpty, buffers.count <= freeCount else { return nil }
        let m = ram.mapping, ring = ring
        let head = freeHead
        var d = head
        for (i, b) in buffers.enumerated() {
            let last = i == buffers.count - 1
            let next = nextFree[Int(d)]
            Descriptor(address: b.address, length: b.length,
                       flags: (b.deviceWritable ? Descriptor.flagWrite : 0) | (last ? 0 : Descriptor.flagNext),
                       next: last ? 0 : next).store(to: m, at: ring.descriptor(d))
            if !last { d = next } else { freeHead = next }
        }
        freeCount -= buffers.count
        chainLength[head] = buffers.count
        m.store(head, at: ring.availEntry(availIndex))
        availIndex &+= 1
        m.storeRelease(availIndex, at: ring.availIndex)
        return head
    }

    /// Returns every chain the device has used since the last call:
    /// (head, bytes written by the device).
    public func collectUsed() -> [(head: UInt16, length: UInt32)] {
        let m = ram.mapping, ring = ring
        guard let usedIndex = m.loadAcquire(at: ring.usedIndex) else { return [] }
        var result: [(UInt16, UInt32)] = []
        while lastUsed != usedIndex {
            let at = ring.usedElement(lastUsed)
            let id = m.load(UInt32.self, at: at) ?? UInt32(size)
            let length = m.load(UInt32.self, at: at + 4) ?? 0
            lastUsed &+= 1
            guard id < UInt32(size), let count = chainLength.removeValue(forKey: UInt16(id)) else { continue }
            // Return the chain to the free list; the links come from our own
            // bookkeeping, never from shared memory the device could change.
            var tail = UInt16(id)
            for _ in 1..<count { tail = nextFree[Int(tail)] }
            nextFree[Int(tail)] = freeHead
            freeHead = UInt16(id)
            freeCount += count
            result.append((UInt16(id), length))
        }
        return result
    }

    public var publishedCount: UInt16 { availIndex }
}
