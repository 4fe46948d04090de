/// Little-endian reader over a received payload. Every read is bounds
/// checked; running past the end is a typed error, never a trap.
struct ByteReader {
    private let bytes: [UInt8]
    private(set) var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    mutating func u8() throws(VhostUserError) -> UInt8 {
        guard remaining >= 1 else { throw .truncatedPayload(needed: offset + 1, got: bytes.count) }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func u32() throws(VhostUserError) -> UInt32 {
        guard remaining >= 4 else { throw .truncatedPayload(needed: offset + 4, got: bytes.count) }
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[offset + i]) << (8 * i) }
        offset += 4
        return v
    }

    mutating func u64() throws(VhostUserError) -> UInt64 {
        guard remaining >= 8 else { throw .truncatedPayload(needed: offset + 8, got: bytes.count) }
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[offset + i]) << (8 * i) }
        offset += 8
        return v
    }

    mutating func take(_ count: Int) throws(VhostUserError) -> [UInt8] {
        guard count >= 0, remaining >= count else { throw .truncatedPayload(needed: offset + max(0, count), got: bytes.count) }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    mutating func skip(_ count: Int) throws(VhostUserError) {
        _ = try take(count)
    }
}

/// Little-endian writer for encoding messages.
struct ByteWriter {
    private(set) var bytes: [UInt8] = []

    init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    mutating func append(_ v: [UInt8]) { bytes += v }
    mutating func zeros(_ n: Int) { bytes += repeatElement(0, count: n) }
}
