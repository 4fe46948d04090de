import BridgeCore

/// The revocation channel's layout (peer feature `sharedRevocations`;
/// docs/peer-protocol.md, "The revocation channel"). Pure: offsets, sizes
/// and the record codec. The memory itself is `ChannelMemory` (LinuxIO).
///
/// One memfd the daemon creates and seals (no shrinking, no growing): a
/// header page, then a ring of `capacity` records of 64 bytes. Record
/// `sequence` (the MAP/UNMAP sequence, from 1) lives in slot
/// `(sequence - 1) % capacity`. The daemon writes records and `posted`;
/// VM2 writes `acked`, `vm2Sleeping` and bumps `ackEvent`. Each side treats
/// what the other writes as hostile.
///
/// | offset | u32/u64 | written by | meaning |
/// |---:|---|---|---|
/// | 0 | u32 magic, u32 version, u32 capacity, u32 record size | daemon | identification |
/// | 64 | u64 `posted` | daemon | the last sequence published (release) |
/// | 128 | u64 `acked` | VM2 | cumulative: every record through it is applied (release) |
/// | 192 | u32 `vm2Sleeping` | VM2 | 1 while VM2 sleeps: the daemon sends WAKE after posting |
/// | 256 | u32 `daemonWaiting` | daemon | 1 while the daemon sleeps on `ackEvent` |
/// | 320 | u32 `ackEvent` | VM2 | futex word: +1 and FUTEX_WAKE after an ack while `daemonWaiting` |
public enum RevocationChannel {
    public static let magic: UInt32 = 0x5250_4256 // "VBPR" in memory
    public static let layoutVersion: UInt32 = 1
    public static let headerSize = 4096
    public static let recordSize = 64
    public static let defaultCapacity: UInt32 = 256
    public static let maximumCapacity: UInt32 = 1 << 16

    public static let magicOffset = 0
    public static let versionOffset = 4
    public static let capacityOffset = 8
    public static let recordSizeOffset = 12
    public static let postedOffset = 64
    public static let ackedOffset = 128
    public static let vm2SleepingOffset = 192
    public static let daemonWaitingOffset = 256
    public static let ackEventOffset = 320

    /// Bytes of a channel with `capacity` records.
    public static func size(capacity: UInt32) -> UInt64 {
        UInt64(headerSize) + UInt64(capacity) * UInt64(recordSize)
    }

    /// Where record `sequence` (≥ 1) lives.
    public static func recordOffset(sequence: UInt64, capacity: UInt32) -> Int {
        headerSize + Int((sequence &- 1) % UInt64(max(1, capacity))) * recordSize
    }

    /// The header's identification words (the first 16 bytes).
    public static func identification(capacity: UInt32) -> [UInt8] {
        var w = LittleEndianWriter(capacity: 16)
        w.write(magic); w.write(layoutVersion); w.write(capacity); w.write(UInt32(recordSize))
        return w.bytes
    }
}

/// One record in the revocation channel. `slot` names a REGION fd.
public enum ChannelRecord: Equatable, Sendable {
    /// A MAP, its fd the REGION in `slot`.
    case map(PeerMap, slot: UInt32)
    case unmap(PeerUnmap)
    /// The REGION in `slot` is not named by any later record: VM2 closes it.
    case forget(sequence: UInt64, slot: UInt32)

    public static let kindMap: UInt32 = 1, kindUnmap: UInt32 = 2, kindForget: UInt32 = 3

    public var sequence: UInt64 {
        switch self {
        case .map(let m, _): m.sequence
        case .unmap(let u): u.sequence
        case .forget(let s, _): s
        }
    }

    /// The 64 bytes: u64 sequence, u32 kind, u32 flags, u64 BAR offset, u64
    /// length, u64 fd offset, u32 slot, u32 permission, u64 guest-physical
    /// address (MAP with flags bit 1, `dirtyLog`; else 0), 8 bytes zero.
    public var encoded: [UInt8] {
        var w = LittleEndianWriter(capacity: RevocationChannel.recordSize)
        switch self {
        case .map(let m, let slot):
            let flags = (m.unsealed ? PeerMap.flagUnsealed : 0) | (m.guestPhysical != nil ? PeerMap.flagGuestPhysical : 0)
            w.write(m.sequence); w.write(Self.kindMap); w.write(flags)
            w.write(m.barOffset); w.write(m.length); w.write(m.fdOffset); w.write(slot); w.write(UInt32(m.permission.rawValue))
            w.write(m.guestPhysical ?? 0)
        case .unmap(let u):
            w.write(u.sequence); w.write(Self.kindUnmap); w.write(UInt32(0))
            w.write(u.barOffset); w.write(u.length); w.write(UInt64(0)); w.write(UInt32(0)); w.write(UInt32(0))
        case .forget(let sequence, let slot):
            w.write(sequence); w.write(Self.kindForget); w.write(UInt32(0))
            w.write(UInt64(0)); w.write(UInt64(0)); w.write(UInt64(0)); w.write(slot); w.write(UInt32(0))
        }
        w.append([UInt8](repeating: 0, count: RevocationChannel.recordSize - w.bytes.count))
        return w.bytes
    }

    /// Decodes the record that must hold `sequence` (VM2's side: a record
    /// that does not is a protocol error of the daemon's).
    public static func decode(_ bytes: [UInt8], expecting sequence: UInt64) throws(PeerProtocolError) -> ChannelRecord {
        guard bytes.count == RevocationChannel.recordSize else {
            throw .payloadSize(.channel, size: bytes.count, expected: "\(RevocationChannel.recordSize)")
        }
        var r = Reader(bytes)
        let seq = try r.u64(), kind = try r.u32(), flags = try r.u32()
        let bar = try r.u64(), length = try r.u64(), fdOffset = try r.u64(), slot = try r.u32(), rawPermission = try r.u32()
        let gpa = try r.u64()
        guard seq == sequence else { throw .badValue(.channel, field: "record sequence (expected \(sequence))", value: seq) }
        switch kind {
        case kindMap:
            guard flags & ~(PeerMap.flagUnsealed | PeerMap.flagGuestPhysical) == 0 else {
                throw .badValue(.channel, field: "flags", value: UInt64(flags))
            }
            let permission = try PeerCodec.permission(.map, "prot", rawPermission)
            let hasGPA = flags & PeerMap.flagGuestPhysical != 0
            guard hasGPA || gpa == 0 else { throw .badValue(.channel, field: "guest-physical address without flag bit 1", value: gpa) }
            guard !hasGPA || length == 0 || gpa <= UInt64.max - (length - 1) else {
                throw .badValue(.channel, field: "guest-physical address (the range wraps)", value: gpa)
            }
            return .map(PeerMap(sequence: seq, barOffset: bar, length: length, fdOffset: fdOffset, permission: permission,
                                unsealed: flags & PeerMap.flagUnsealed != 0, guestPhysical: hasGPA ? gpa : nil), slot: slot)
        case kindUnmap:
            return .unmap(PeerUnmap(sequence: seq, barOffset: bar, length: length))
        case kindForget:
            return .forget(sequence: seq, slot: slot)
        default:
            throw .badValue(.channel, field: "record kind", value: UInt64(kind))
        }
    }
}
