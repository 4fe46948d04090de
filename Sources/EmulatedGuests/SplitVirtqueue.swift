import BridgeCore
import DeviceEngine
import LinuxIO

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
            var flags: VirtqDescriptorFlags = b.deviceWritable ? .write : []
            if !last { flags.insert(.next) }
            Descriptor(address: b.address, length: b.length, flags: flags, next: last ? 0 : next)
                .store(to: m, at: ring.descriptor(d))
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
