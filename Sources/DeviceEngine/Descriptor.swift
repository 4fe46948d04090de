import BridgeCore
import LinuxIO

/// `VIRTQ_DESC_F_*` (virtio 1.x §2.7.5): a descriptor's `flags`.
public struct VirtqDescriptorFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }

    /// VIRTQ_DESC_F_NEXT: the chain goes on at `next`.
    public static let next = VirtqDescriptorFlags(rawValue: 1)
    /// VIRTQ_DESC_F_WRITE: the device writes the buffer (reads it otherwise).
    public static let write = VirtqDescriptorFlags(rawValue: 2)
    /// VIRTQ_DESC_F_INDIRECT: the buffer is a table of descriptors (not offered).
    public static let indirect = VirtqDescriptorFlags(rawValue: 4)
}

/// `VIRTQ_AVAIL_F_*` (virtio 1.x §2.7.6): `avail->flags`, written by the driver.
public struct VirtqAvailFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// VIRTQ_AVAIL_F_NO_INTERRUPT: the driver does not want calls.
    public static let noInterrupt = VirtqAvailFlags(rawValue: 1)
}

/// `VIRTQ_USED_F_*` (virtio 1.x §2.7.8): `used->flags`, written by the device.
public struct VirtqUsedFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// VIRTQ_USED_F_NO_NOTIFY: the device does not want kicks.
    public static let noNotify = VirtqUsedFlags(rawValue: 1)
}

/// One split-ring descriptor, `{le64 addr, le32 len, le16 flags, le16 next}`
/// (virtio 1.x §2.7.5), decoded once from shared memory into a value: the
/// engine checks and follows that value, never the bytes VM1 can still
/// change under it.
public struct Descriptor: Equatable, Sendable {
    public static let size: UInt64 = VringLayout.descriptorSize
    /// Where each field is in the 16 bytes.
    enum Offset {
        static let address = 0, length = 8, flags = 12, next = 14
    }

    public var address: UInt64
    public var length: UInt32
    public var flags: VirtqDescriptorFlags
    public var next: UInt16

    public init(address: UInt64, length: UInt32, flags: VirtqDescriptorFlags = [], next: UInt16 = 0) {
        self.address = address; self.length = length; self.flags = flags; self.next = next
    }

    public var hasNext: Bool { flags.contains(.next) }
    public var deviceWritable: Bool { flags.contains(.write) }

    /// Decodes the first 16 bytes of `bytes`; nil when there are fewer.
    public init?(decoding bytes: UnsafeRawBufferPointer) {
        guard bytes.count >= Int(Self.size), let b = bytes.baseAddress else { return nil }
        self.init(unchecked: b)
    }

    /// Decodes 16 bytes the caller checked are there.
    @inline(__always)
    init(unchecked b: UnsafeRawPointer) {
        address = UInt64(littleEndian: b.loadUnaligned(fromByteOffset: Offset.address, as: UInt64.self))
        length = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: Offset.length, as: UInt32.self))
        flags = VirtqDescriptorFlags(rawValue: UInt16(littleEndian: b.loadUnaligned(fromByteOffset: Offset.flags, as: UInt16.self)))
        next = UInt16(littleEndian: b.loadUnaligned(fromByteOffset: Offset.next, as: UInt16.self))
    }

    /// Encodes into the first 16 bytes of `bytes`; false when there are fewer.
    @discardableResult
    public func encode(into b: UnsafeMutableRawBufferPointer) -> Bool {
        guard b.count >= Int(Self.size) else { return false }
        b.storeBytes(of: address.littleEndian, toByteOffset: Offset.address, as: UInt64.self)
        b.storeBytes(of: length.littleEndian, toByteOffset: Offset.length, as: UInt32.self)
        b.storeBytes(of: flags.rawValue.littleEndian, toByteOffset: Offset.flags, as: UInt16.self)
        b.storeBytes(of: next.littleEndian, toByteOffset: Offset.next, as: UInt16.self)
        return true
    }

    /// The 16 encoded bytes.
    public var bytes: [UInt8] {
        [UInt8](unsafeUninitializedCapacity: Int(Self.size)) { b, n in
            encode(into: UnsafeMutableRawBufferPointer(b))
            n = Int(Self.size)
        }
    }

    /// Decodes the 16 bytes at `offset`; nil when outside `memory`.
    public static func load(from memory: some SharedMemory, at offset: UInt64) -> Descriptor? {
        memory.withBytes(at: offset, length: Int(size)) { (b: UnsafeMutableRawBufferPointer) in
            Descriptor(decoding: UnsafeRawBufferPointer(b))
        } ?? nil
    }

    @discardableResult
    public func store(to memory: some SharedMemory, at offset: UInt64) -> Bool {
        memory.withBytes(at: offset, length: Int(Self.size)) { (b: UnsafeMutableRawBufferPointer) -> Void in
            encode(into: b)
        } != nil
    }

    /// Why a device serving a queue in `direction` refuses a chain holding
    /// this descriptor (an indirect table, or a buffer the wrong way round);
    /// nil when it may go on to the buffer.
    @inline(__always)
    public func refusal(serving direction: DeviceQueue.Direction) -> ChainRefusal? {
        if flags.contains(.indirect) { return .indirect }
        if flags.contains(.write) != (direction == .deviceWrites) { return .wrongDirection }
        return nil
    }

    /// Where a chain goes after this descriptor, in a table of `ringSize`.
    public enum Link: Equatable, Sendable {
        /// The last descriptor of its chain (NEXT clear; `next` is ignored).
        case end
        case next(UInt16)
    }

    /// The next descriptor, checked against the table; `.nextOutOfRange`
    /// when NEXT names an index past it.
    @inline(__always)
    public func link(ringSize: UInt32) -> Result<Link, ChainRefusal> {
        guard hasNext else { return .success(.end) }
        guard UInt32(next) < ringSize else { return .failure(.nextOutOfRange) }
        return .success(.next(next))
    }
}
