/// The packets the emulated guests exchange: `magic, seq, length, data, fnv1a(data)`,
/// all little endian, so the receiver can verify each one in place.
public enum TestPacket {
    public static let magic: UInt32 = 0x3142_5056 // "VPB1"
    public static let overhead = 16
    public static let minimumSize = overhead

    public static func fnv1a(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var h: UInt32 = 0x811c_9dc5
        for b in bytes { h = (h ^ UInt32(b)) &* 0x0100_0193 }
        return h
    }

    /// A packet of exactly `size` bytes (at least 16).
    public static func make(sequence: UInt32, size: Int) -> [UInt8] {
        let dataCount = max(0, size - overhead)
        var out = [UInt8]()
        out.reserveCapacity(dataCount + overhead)
        func put(_ v: UInt32) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
        put(magic); put(sequence); put(UInt32(dataCount))
        var x = sequence &* 2_654_435_761 | 1
        for _ in 0..<dataCount {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5
            out.append(UInt8(truncatingIfNeeded: x))
        }
        let sum = out.withUnsafeBytes { fnv1a(UnsafeRawBufferPointer(rebasing: $0[12..<(12 + dataCount)])) }
        put(sum)
        return out
    }

    public enum Verdict: Equatable, Sendable { case valid(sequence: UInt32), notATestPacket, corrupt }

    /// Checks a packet in place.
    public static func verify(_ bytes: UnsafeRawBufferPointer) -> Verdict {
        guard bytes.count >= overhead else { return .notATestPacket }
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * $1) } }
        guard u32(0) == magic else { return .notATestPacket }
        let count = Int(u32(8))
        guard count == bytes.count - overhead else { return .corrupt }
        let sum = fnv1a(UnsafeRawBufferPointer(rebasing: bytes[12..<(12 + count)]))
        return sum == u32(12 + count) ? .valid(sequence: u32(4)) : .corrupt
    }

    public static func verify(_ bytes: [UInt8]) -> Verdict {
        bytes.withUnsafeBytes { verify($0) }
    }
}

