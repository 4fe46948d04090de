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


/// The datagrams the Linux guest's `udp-sender` sends (interop/linux-guest):
/// UDP to port 9999, payload `"VPBG"`, u32 sequence, u32 size, then bytes
/// `(sequence × 7 + i) & 0xff`. VM2 checks every byte of each one in place.
public enum GuestDatagram {
    public static let port: UInt16 = 9999
    public static let magic: UInt32 = 0x4742_5056

    /// nil when `frame` (an Ethernet frame) is not one of the sender's
    /// datagrams; otherwise whether it arrived intact.
    public static func verify(_ frame: UnsafeRawBufferPointer) -> Bool? {
        guard frame.count >= 14 + 20 + 8, frame[12] == 0x08, frame[13] == 0x00, frame[14] >> 4 == 4 else { return nil }
        let ihl = Int(frame[14] & 0x0f) * 4
        guard ihl >= 20, frame[14 + 9] == 17, frame.count >= 14 + ihl + 8 else { return nil }
        let udp = 14 + ihl
        guard UInt16(frame[udp + 2]) << 8 | UInt16(frame[udp + 3]) == port else { return nil }
        let udpLength = Int(UInt16(frame[udp + 4]) << 8 | UInt16(frame[udp + 5]))
        let p = udp + 8
        guard udpLength >= 8 + 12, p + 12 <= frame.count,
              frame.loadUnaligned(fromByteOffset: p, as: UInt32.self) == magic.littleEndian else { return false }
        let sequence = UInt32(littleEndian: frame.loadUnaligned(fromByteOffset: p + 4, as: UInt32.self))
        let size = Int(UInt32(littleEndian: frame.loadUnaligned(fromByteOffset: p + 8, as: UInt32.self)))
        guard size == udpLength - 8, p + size <= frame.count else { return false }
        for i in 12..<size where frame[p + i] != UInt8(truncatingIfNeeded: sequence &* 7 &+ UInt32(i)) { return false }
        return true
    }

    /// A datagram of the guest's (virtio-net header first) sent back to it:
    /// Ethernet, IPv4 addresses and UDP ports swapped, the payload as it
    /// was (the IPv4 and UDP checksums hold: their sums do not depend on
    /// the order), the virtio-net header cleared. nil: not one.
    public static func reflected(_ frame: UnsafeRawBufferPointer) -> [UInt8]? {
        let h = 12
        guard frame.count >= h + 14 + 20 + 8 else { return nil }
        var out = [UInt8](frame)
        for i in 0..<h { out[i] = 0 }
        for i in 0..<6 { out.swapAt(h + i, h + 6 + i) }
        let ip = h + 14
        guard out[h + 12] == 0x08, out[h + 13] == 0x00, out[ip] >> 4 == 4 else { return nil }
        let ihl = Int(out[ip] & 0x0f) * 4
        guard ihl >= 20, out[ip + 9] == 17, out.count >= ip + ihl + 8 else { return nil }
        for i in 0..<4 { out.swapAt(ip + 12 + i, ip + 16 + i) }
        let udp = ip + ihl
        for i in 0..<2 { out.swapAt(udp + i, udp + 2 + i) }
        return out
    }
}
