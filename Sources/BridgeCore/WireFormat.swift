/// The wire format both protocols share (vhost-user toward VM1, the peer
/// protocol toward VM2): a 12-byte header — u32 code, u32 flags, u32 payload
/// size — then the payload, every integer little endian.

/// The 12-byte frame header, undecoded: each codec validates its own codes
/// and flags.
public struct FrameHeader: Equatable, Sendable {
    public static let size = 12
    public var code: UInt32
    public var flags: UInt32
    public var size: UInt32

    public init(code: UInt32, flags: UInt32, size: UInt32) {
        self.code = code; self.flags = flags; self.size = size
    }

    public var encoded: [UInt8] {
        var w = LittleEndianWriter(capacity: Self.size)
        w.write(code); w.write(flags); w.write(size)
        return w.bytes
    }

    /// nil unless exactly 12 bytes.
    public init?(decoding bytes: [UInt8]) {
        guard bytes.count == Self.size else { return nil }
        var r = LittleEndianReader(bytes)
        guard let code = r.read(UInt32.self), let flags = r.read(UInt32.self), let size = r.read(UInt32.self) else { return nil }
        self.init(code: code, flags: flags, size: size)
    }
}

/// Bounds-checked little-endian reading of untrusted bytes (both wire
/// codecs use it). Running past the end returns nil, never traps; each codec
/// turns nil into its own typed error.
public struct LittleEndianReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    public mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) -> T? {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { return nil }
        var v: T = 0
        for i in 0..<size { v |= T(bytes[offset + i]) << (8 * i) }
        offset += size
        return v
    }

    public mutating func take(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }
}

/// Little-endian encoding for the wire codecs.
public struct LittleEndianWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        for i in 0..<MemoryLayout<T>.size { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * i))) }
    }

    public mutating func append(_ more: [UInt8]) { bytes += more }
    public mutating func zeros(_ count: Int) { bytes += repeatElement(0, count: count) }
}
