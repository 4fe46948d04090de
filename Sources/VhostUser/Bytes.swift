import BridgeCore

/// `LittleEndianReader` with vhost-user's typed error for a short payload.
struct ByteReader {
    private var inner: LittleEndianReader

    init(_ bytes: [UInt8]) { inner = LittleEndianReader(bytes) }

    var remaining: Int { inner.remaining }

    private mutating func need<T: FixedWidthInteger>(_: T.Type) throws(VhostUserError) -> T {
        guard let v = inner.read(T.self) else {
            throw .truncatedPayload(needed: inner.offset + MemoryLayout<T>.size, got: inner.bytes.count)
        }
        return v
    }

    mutating func u8() throws(VhostUserError) -> UInt8 { try need(UInt8.self) }
    mutating func u32() throws(VhostUserError) -> UInt32 { try need(UInt32.self) }
    mutating func u64() throws(VhostUserError) -> UInt64 { try need(UInt64.self) }

    mutating func take(_ count: Int) throws(VhostUserError) -> [UInt8] {
        guard let b = inner.take(count) else { throw .truncatedPayload(needed: inner.offset + max(0, count), got: inner.bytes.count) }
        return b
    }

    mutating func skip(_ count: Int) throws(VhostUserError) { _ = try take(count) }
}

/// The vhost-user spelling of `LittleEndianWriter`.
struct ByteWriter {
    private(set) var inner: LittleEndianWriter
    init(capacity: Int = 64) { inner = LittleEndianWriter(capacity: capacity) }
    var bytes: [UInt8] { inner.bytes }
    mutating func u8(_ v: UInt8) { inner.write(v) }
    mutating func u32(_ v: UInt32) { inner.write(v) }
    mutating func u64(_ v: UInt64) { inner.write(v) }
    mutating func append(_ v: [UInt8]) { inner.append(v) }
    mutating func zeros(_ n: Int) { inner.zeros(n) }
}
