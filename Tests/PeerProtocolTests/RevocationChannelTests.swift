import BridgeCore
@testable import PeerProtocol
import Testing

/// The revocation channel's codec and layout: records round-trip, a record
/// is where its sequence says, and what a VM2 reads from a daemon that
/// wrote garbage (or from a hole) is refused, never applied.
@Suite struct RevocationChannelTests {
    static let records: [ChannelRecord] = [
        .map(PeerMap(sequence: 1, barOffset: 0x1_0000_0000, length: 0x10000, fdOffset: 0x20_0000, permission: .read), slot: 0),
        .map(PeerMap(sequence: 2, barOffset: 0x4000, length: 0x1000, fdOffset: 0, permission: .readWrite, unsealed: true), slot: 7),
        .unmap(PeerUnmap(sequence: 3, barOffset: 0x4000, length: 0x1000)),
        .forget(sequence: 4, slot: 7),
        .map(PeerMap(sequence: 5, barOffset: 0x1_0000_0000, length: 0x2000, fdOffset: 0x1000, permission: .readWrite,
                     guestPhysical: 0x30_1000), slot: 1),
        .map(PeerMap(sequence: 6, barOffset: 0, length: 0x1000, fdOffset: 0, permission: .readWrite, guestPhysical: 0), slot: 1),
    ]

    @Test(arguments: records)
    func recordsRoundTrip(record: ChannelRecord) throws {
        let bytes = record.encoded
        #expect(bytes.count == RevocationChannel.recordSize)
        #expect(try ChannelRecord.decode(bytes, expecting: record.sequence) == record)
    }

    @Test func theFieldsAreWhereTheDocumentSaysTheyAre() {
        let bytes = ChannelRecord.map(PeerMap(sequence: 0x0102, barOffset: 0x3000, length: 0x2000, fdOffset: 0x5000,
                                              permission: .readWrite, unsealed: true), slot: 9).encoded
        let r = LittleEndianReader(bytes)
        func u64(_ at: Int) -> UInt64 { var c = r; _ = c.take(at); return c.read(UInt64.self) ?? 0 }
        func u32(_ at: Int) -> UInt32 { var c = r; _ = c.take(at); return c.read(UInt32.self) ?? 0 }
        #expect(u64(0) == 0x0102 && u32(8) == ChannelRecord.kindMap && u32(12) == PeerMap.flagUnsealed)
        #expect(u64(16) == 0x3000 && u64(24) == 0x2000 && u64(32) == 0x5000 && u32(40) == 9 && u32(44) == 3)
        #expect(bytes[48...].allSatisfy { $0 == 0 })
        let logged = ChannelRecord.map(PeerMap(sequence: 1, barOffset: 0x3000, length: 0x2000, fdOffset: 0x5000,
                                               permission: .readWrite, guestPhysical: 0xabc_d000), slot: 9).encoded
        let l = LittleEndianReader(logged)
        func lu64(_ at: Int) -> UInt64 { var c = l; _ = c.take(at); return c.read(UInt64.self) ?? 0 }
        #expect(lu64(48) == 0xabc_d000 && logged[12] == UInt8(PeerMap.flagGuestPhysical) && logged[56...].allSatisfy { $0 == 0 })
    }

    @Test func aRecordThatIsNotTheOneExpectedIsRefused() {
        let bytes = ChannelRecord.unmap(PeerUnmap(sequence: 5, barOffset: 0, length: 4096)).encoded
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(bytes, expecting: 6) } // stale: the ring wrapped under it
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode([UInt8](repeating: 0, count: 64), expecting: 1) } // a hole
        var kind = bytes
        kind[8] = 9
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(kind, expecting: 5) }
        var perm = ChannelRecord.map(PeerMap(sequence: 1, barOffset: 0, length: 4096, fdOffset: 0, permission: .read), slot: 0).encoded
        perm[44] = 0
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(perm, expecting: 1) }
        var flags = ChannelRecord.map(PeerMap(sequence: 1, barOffset: 0, length: 4096, fdOffset: 0, permission: .read), slot: 0).encoded
        flags[12] = 4
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(flags, expecting: 1) }
        var gpaWithoutFlag = ChannelRecord.map(PeerMap(sequence: 1, barOffset: 0, length: 4096, fdOffset: 0, permission: .read), slot: 0).encoded
        gpaWithoutFlag[49] = 0x10
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(gpaWithoutFlag, expecting: 1) }
        var gpaWraps = ChannelRecord.map(PeerMap(sequence: 1, barOffset: 0, length: 0x2000, fdOffset: 0, permission: .read,
                                                 guestPhysical: UInt64.max - 0xfff), slot: 0).encoded
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(gpaWraps, expecting: 1) }
        gpaWraps[48] = 0 // 0x…f000 + 0x2000 still wraps
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(gpaWraps, expecting: 1) }
        #expect(throws: PeerProtocolError.self) { try ChannelRecord.decode(Array(bytes.prefix(63)), expecting: 5) }
    }

    @Test func recordsWrapAroundTheRing() {
        let capacity: UInt32 = 4
        let offsets = (1...9).map { RevocationChannel.recordOffset(sequence: UInt64($0), capacity: capacity) }
        #expect(offsets == [4096, 4160, 4224, 4288, 4096, 4160, 4224, 4288, 4096])
        #expect(RevocationChannel.size(capacity: capacity) == 4096 + 4 * 64)
        #expect(offsets.allSatisfy { $0 + RevocationChannel.recordSize <= Int(RevocationChannel.size(capacity: capacity)) })
        // The header's words never overlap each other or the first record.
        let words = [RevocationChannel.postedOffset, RevocationChannel.ackedOffset, RevocationChannel.vm2SleepingOffset,
                     RevocationChannel.daemonWaitingOffset, RevocationChannel.ackEventOffset]
        #expect(Set(words.map { $0 / 64 }).count == words.count, "each word on a cache line of its own")
        #expect(words.allSatisfy { $0 >= 16 && $0 + 8 <= RevocationChannel.headerSize })
    }

    @Test func channelAndRegionMessagesCheckTheirFields() throws {
        func decode(_ m: PeerMessage, patch: (inout [UInt8]) -> Void, fds: Int = 1) throws -> PeerMessage {
            var bytes = PeerCodec.encode(m)
            patch(&bytes)
            let (header, type) = try PeerCodec.validate(header: Array(bytes.prefix(PeerCodec.headerSize)))
            return try PeerCodec.decode(header, type, payload: Array(bytes.dropFirst(PeerCodec.headerSize)), fdCount: fds)
        }
        let channel = PeerMessage.channel(PeerChannel(capacity: 8, size: RevocationChannel.size(capacity: 8)))
        #expect(try decode(channel) { _ in } == channel)
        #expect(throws: PeerProtocolError.self) { try decode(channel) { $0[12] = 0 } } // capacity 0
        #expect(throws: PeerProtocolError.self) { try decode(channel) { $0[16] = 32 } } // record size
        #expect(throws: PeerProtocolError.self) { try decode(channel) { $0[21] = 0 } } // size that does not match
        #expect(throws: PeerProtocolError.self) { try decode(channel, patch: { _ in }, fds: 0) }
        let region = PeerMessage.region(PeerRegion(slot: 1, permission: .read, size: 4096))
        #expect(throws: PeerProtocolError.self) { try decode(region) { $0[16] = 2 } } // write-only
        #expect(throws: PeerProtocolError.self) { try decode(.wake, patch: { _ in }, fds: 1) }
    }
}
