import BridgeCore
import DeviceEngine
import Testing

/// The typed descriptor the engine reads chains through, on values: the
/// 16-byte encoding, the flag bits, the chain links and their bounds, and
/// what a device refuses.
@Suite("Descriptor") struct DescriptorTests {
    static let encoded: [UInt8] = [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // addr
                                   0xdc, 0x05, 0, 0,                               // len 1500
                                   3, 0,                                           // NEXT | WRITE
                                   7, 0]                                           // next

    func decode(_ bytes: [UInt8]) -> Descriptor? { bytes.withUnsafeBytes { Descriptor(decoding: $0) } }

    @Test func decodesTheSixteenLittleEndianBytesAndEncodesThemBack() {
        let d = decode(Self.encoded)
        #expect(d == Descriptor(address: 0x1122_3344_5566_7788, length: 1500, flags: [.next, .write], next: 7))
        #expect(d?.bytes == Self.encoded)
        #expect(decode(Self.encoded + [0xff, 0xff]) == d, "only the first 16 bytes are read")
    }

    @Test func fewerThanSixteenBytesDoNotDecodeOrEncode() {
        #expect(decode(Array(Self.encoded.prefix(15))) == nil)
        #expect(decode([]) == nil)
        var short = [UInt8](repeating: 0, count: 15)
        #expect(!short.withUnsafeMutableBytes { Descriptor(address: 1, length: 2).encode(into: $0) })
        #expect(short == [UInt8](repeating: 0, count: 15), "nothing written")
    }

    @Test func theFlagBitsAreTheSpecs() {
        #expect(VirtqDescriptorFlags.next.rawValue == 1 && VirtqDescriptorFlags.write.rawValue == 2
                && VirtqDescriptorFlags.indirect.rawValue == 4)
        #expect(VirtqAvailFlags.noInterrupt.rawValue == 1 && VirtqUsedFlags.noNotify.rawValue == 1)
        var bytes = Self.encoded
        bytes[12] = 0xff; bytes[13] = 0xff // every bit, unknown ones included
        let d = decode(bytes)
        #expect(d?.flags.contains([.next, .write, .indirect]) == true)
        #expect(d?.flags.rawValue == 0xffff, "unknown bits are kept, not dropped")
        #expect(decode(Array(Self.encoded.prefix(12)) + [0, 0, 7, 0])?.flags == [])
    }

    @Test func aChainEndsWhereNextIsClearWhateverTheNextField() {
        let last = Descriptor(address: 0, length: 1, flags: .write, next: 0xffff)
        #expect(!last.hasNext && last.deviceWritable)
        #expect(last.link(ringSize: 8) == .success(.end))
    }

    @Test func aChainGoesOnOnlyToAnIndexInsideTheTable() {
        for (next, size) in [(UInt16(0), UInt32(1)), (7, 8), (255, 256), (32767, 32768)] {
            #expect(Descriptor(address: 0, length: 1, flags: .next, next: next).link(ringSize: size) == .success(.next(next)))
        }
        for (next, size) in [(UInt16(1), UInt32(1)), (8, 8), (200, 8), (0xffff, 32768)] {
            #expect(Descriptor(address: 0, length: 1, flags: .next, next: next).link(ringSize: size) == .failure(.nextOutOfRange))
        }
    }

    @Test func aDeviceRefusesIndirectTablesAndBuffersTheWrongWayRound() {
        let read = Descriptor(address: 0, length: 1), write = Descriptor(address: 0, length: 1, flags: .write)
        #expect(read.refusal(serving: .deviceReads) == nil)
        #expect(write.refusal(serving: .deviceWrites) == nil)
        #expect(write.refusal(serving: .deviceReads) == .wrongDirection)
        #expect(read.refusal(serving: .deviceWrites) == .wrongDirection)
        for flags: VirtqDescriptorFlags in [.indirect, [.indirect, .write], [.indirect, .next]] {
            let d = Descriptor(address: 0, length: 16, flags: flags)
            #expect(d.refusal(serving: .deviceReads) == .indirect && d.refusal(serving: .deviceWrites) == .indirect,
                    "indirect is refused before the direction is looked at")
        }
    }

    @Test func theRingLayoutIsBuiltFromTheNamedSizes() {
        let r = SplitRing(size: 8, desc: 0, avail: 0x1000, used: 0x2000)
        #expect(Descriptor.size == 16)
        #expect(r.availFlags == 0x1000 && r.usedFlags == 0x2000)
        #expect(r.usedElementLength(3) == r.usedElement(3) + 4)
        #expect(r.usedEvent == 0x1000 + 4 + 2 * 8 && r.availEvent == 0x2000 + 4 + 8 * 8)
        #expect(r.availBytes(eventIndex: true) == VringLayout.availRingSize(8) && r.availBytes(eventIndex: false) == 4 + 2 * 8)
        #expect(r.usedBytes(eventIndex: true) == VringLayout.usedRingSize(8) && r.usedBytes(eventIndex: false) == 4 + 8 * 8)
    }
}
