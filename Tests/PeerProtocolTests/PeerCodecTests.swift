import BridgeCore
import Foundation
import Testing
import TestSupport
@testable import PeerProtocol

let samples: [PeerMessage] = [
    .hello(PeerHello(features: .translate)),
    .helloReply(PeerBARInfo(mode: .iommu, features: .translate, barSize: 1 << 36, pageSize: 4096, vringCount: 2)),
    .helloReply(PeerBARInfo(mode: .static, features: [], barSize: 1 << 40, pageSize: 4096, vringCount: 4)),
    .map(PeerMap(sequence: 9, barOffset: 0x1_0000_0000, length: 0x10000, fdOffset: 0x20_0000, permission: .read)),
    .unmap(PeerUnmap(sequence: 10, barOffset: 0x1_0000_0000, length: 0x1000)),
    .ack(10),
    .vring(PeerVring(index: 1, num: 256, desc: 0x1000, avail: 0x2000, used: 0x3000, lastAvail: 5, flags: 7)),
    .vring(PeerVring(index: 0, num: 256, desc: 0x1000, avail: 0x2000, used: 0x3000, lastAvail: 0, flags: 1)),
    .vringStop(1),
    .device(PeerDevice(event: .start, features: 1 << 32)),
    .translate(PeerTranslate(requestID: 77, barOffset: 0x5000, length: 100, access: .write)),
    .translateReply(PeerTranslateReply(requestID: 77, status: .refused, reason: "[bar-bounds] nope")),
    .translateReply(PeerTranslateReply(requestID: 78, status: .granted)),
    .error(PeerError(code: .busy, text: "another VM2 is connected")),
    .vringStopped(index: 1, lastAvail: 0xfffe),
    .vringStopped(index: 3, lastAvail: nil),
    .map(PeerMap(sequence: 11, barOffset: 0x4000_0000, length: 0x20_0000, fdOffset: 0, permission: .readWrite, unsealed: true)),
    .channel(PeerChannel(capacity: 256, size: RevocationChannel.size(capacity: 256))),
    .region(PeerRegion(slot: 3, permission: .read, size: 1 << 30)),
    .region(PeerRegion(slot: 0, permission: .readWrite, size: 4096)),
    .wake,
    .log(PeerLog(serial: 1, on: true, size: 8192, offset: 0)),
    .log(PeerLog(serial: 2, on: false)),
    .logDone(PeerLogDone(serial: 1)),
    .logDone(PeerLogDone(serial: 2, failure: "the log file holds 4096 bytes, not 8192")),
]


@Suite struct VringStoppedTests {
    /// Golden bytes: index 1, lastAvail 0x1234, flags bit 0 (known).
    @Test func goldenVringStopped() throws {
        #expect(PeerCodec.encode(.vringStopped(index: 1, lastAvail: 0x1234))
                == [11, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0x34, 0x12, 1, 0])
        var bytes = PeerCodec.encode(.vringStopped(index: 1, lastAvail: 0x1234))
        bytes[18] = 2 // an undefined flag
        #expect(peerError { try roundTrip(bytes, fds: 0) } == .badValue(.vringStopped, field: "flags", value: 2))
    }
}

func roundTrip(_ bytes: [UInt8], fds: Int) throws -> PeerMessage {
    let (header, type) = try PeerCodec.validate(header: Array(bytes.prefix(12)))
    #expect(Int(header.size) == bytes.count - 12)
    return try PeerCodec.decode(header, type, payload: Array(bytes.dropFirst(12)), fdCount: fds)
}

func peerError(_ body: () throws -> Any) -> PeerProtocolError? {
    do { _ = try body(); return nil } catch let e as PeerProtocolError { return e } catch { Issue.record("\(error)"); return nil }
}

/// The hex blocks of docs/peer-protocol.md tagged `example-NAME`.
func docExample(_ name: String) throws -> [UInt8] {
    let doc = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("docs/peer-protocol.md")
    let text = try String(contentsOf: doc, encoding: .utf8)
    guard let start = text.range(of: "```hex example-\(name)\n"),
          let end = text.range(of: "```", range: start.upperBound..<text.endIndex) else {
        throw PeerProtocolError.truncated(needed: 1, got: 0)
    }
    return text[start.upperBound..<end.lowerBound].split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { UInt8($0, radix: 16) }
}

@Suite struct PeerCodecTests {
    @Test(arguments: samples.indices)
    func roundTrips(index: Int) throws {
        let m = samples[index]
        #expect(try roundTrip(PeerCodec.encode(m), fds: m.fdCount) == m)
    }

    @Test func logChecksItsFieldsAndFds() throws {
        // Golden: serial 7, on, 8192 bytes at 0.
        let on = PeerCodec.encode(.log(PeerLog(serial: 7, on: true, size: 8192, offset: 0)))
        #expect(on == [15, 0, 0, 0, 1, 0, 0, 0, 32, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
                       0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        #expect(peerError { try roundTrip(on, fds: 0) } == .fdCount(.log, got: 0, expected: 1))
        var badFlag = on
        badFlag[20] = 3
        #expect(peerError { try roundTrip(badFlag, fds: 1) } == .badValue(.log, field: "flags", value: 3))
        var offWithSize = on
        offWithSize[20] = 0
        #expect(peerError { try roundTrip(offWithSize, fds: 0) } == .badValue(.log, field: "size (logging off)", value: 8192))
        var wraps = on
        for i in 36..<44 { wraps[i] = 0xff }
        #expect(peerError { try roundTrip(wraps, fds: 1) } == .badValue(.log, field: "offset", value: UInt64.max))
        var empty = on
        empty[29] = 0
        #expect(peerError { try roundTrip(empty, fds: 1) } == .badValue(.log, field: "size", value: 0))
        var done = PeerCodec.encode(.logDone(PeerLogDone(serial: 7)))
        done[20] = 2
        #expect(peerError { try roundTrip(done, fds: 0) } == .badValue(.logDone, field: "status", value: 2))
    }

    @Test func everyTypeHasASample() {
        #expect(Set(samples.map(\.type)) == Set(PeerMessageType.allCases))
    }

    @Test func theDocumentsExamplesDecode() throws {
        #expect(try roundTrip(docExample("hello"), fds: 0) == .hello(PeerHello(version: 1, features: .translate)))
        #expect(try roundTrip(docExample("map"), fds: 1)
                == .map(PeerMap(sequence: 7, barOffset: 1 << 32, length: 64 << 10, fdOffset: 1 << 20, permission: .readWrite)))
        #expect(PeerCodec.encode(.hello(PeerHello(features: .translate))) == (try docExample("hello")))
        #expect(try roundTrip(docExample("vring-stopped"), fds: 0) == .vringStopped(index: 1, lastAvail: 0x1234))
        #expect(PeerCodec.encode(.vringStopped(index: 1, lastAvail: 0x1234)) == (try docExample("vring-stopped")))
    }

    /// MAP's flags word (once reserved): bit 0 marks unsealed memory (peer
    /// feature `unsealedMaps`); any other bit is a protocol error, so a
    /// future flag is never silently ignored.
    @Test func mapCarriesTheUnsealedFlagAndRefusesOtherBits() throws {
        let marked = PeerMap(sequence: 7, barOffset: 1 << 32, length: 64 << 10, fdOffset: 1 << 20, permission: .read, unsealed: true)
        var bytes = PeerCodec.encode(.map(marked))
        #expect(Array(bytes[(12 + 36)..<(12 + 40)]) == [1, 0, 0, 0])
        #expect(try roundTrip(bytes, fds: 1) == .map(marked))
        #expect(try roundTrip(docExample("map-unsealed"), fds: 1) == .map(marked))
        #expect(bytes == (try docExample("map-unsealed")))
        var plain = marked
        plain.unsealed = false
        #expect(Array(PeerCodec.encode(.map(plain))[(12 + 36)..<(12 + 40)]) == [0, 0, 0, 0])
        bytes[12 + 36] = 2
        #expect(peerError { try roundTrip(bytes, fds: 1) } == .badValue(.map, field: "flags", value: 2))
        bytes[12 + 36] = 1; bytes[12 + 39] = 0x80
        #expect(peerError { try roundTrip(bytes, fds: 1) } == .badValue(.map, field: "flags", value: 0x8000_0001))
        #expect(PeerFeatures.all.contains(.unsealedMaps) && PeerFeatures.unsealedMaps.rawValue == 8)
    }

    @Test func helloCarriesDeviceFeaturesOnlyWithItsPeerFeature() throws {
        let hello = PeerHello(features: [.translate], deviceFeatures: [.version1, .eventIdx, .mrgRxbuf])
        #expect(hello.features.contains(.deviceFeatures))
        let bytes = PeerCodec.encode(.hello(hello))
        #expect(bytes.count == 12 + 24)
        #expect(try roundTrip(bytes, fds: 0) == .hello(hello))
        // The bit without the field, and the field without the bit.
        var withoutField = Array(bytes.prefix(12 + 16))
        withoutField[8] = 16
        #expect(throws: PeerProtocolError.self) { try roundTrip(withoutField, fds: 0) }
        var withoutBit = bytes
        withoutBit[12 + 8] &= ~4
        #expect(throws: PeerProtocolError.self) { try roundTrip(withoutBit, fds: 0) }
        #expect(PeerHello(features: .all).features == [.translate, .vringStopAck, .unsealedMaps, .sharedRevocations, .dirtyLog], "no declaration, no bit")
    }

    @Test func whatVM2MustServeIsEveryOfferedBitButTheControlQueue() {
        let offered: VirtioNetFeatures = [.version1, .eventIdx, .mrgRxbuf, .mq, .ctrlVq]
        #expect(PeerHello(features: [], deviceFeatures: [.version1, .eventIdx, .mrgRxbuf, .mq]).missing(offered: offered).isEmpty)
        #expect(PeerHello(features: []).missing(offered: offered) == [.eventIdx, .mrgRxbuf, .mq])
        #expect(PeerHello(features: []).missing(offered: .version1).isEmpty, "a version-1 peer serves a VERSION_1-only bridge")
    }

    @Test func headerChecks() {
        #expect(peerError { try PeerCodec.validate(header: [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]) } == .badVersion(flags: 2))
        #expect(peerError { try PeerCodec.validate(header: [1, 0, 0, 0, 0x11, 0, 0, 0, 0, 0, 0, 0]) } == .unknownFlags(flags: 0x11))
        #expect(peerError { try PeerCodec.validate(header: [99, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]) } == .unknownType(99))
        #expect(peerError { try PeerCodec.validate(header: [2, 0, 0, 0, 1, 0, 0, 0, 0x09, 0x01, 0, 0]) }
                == .payloadSize(.map, size: 265, expected: "at most 264"))
        #expect(peerError { try PeerCodec.validate(header: [2, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]) }
                == .payloadSize(.map, size: Int(UInt32.max), expected: "at most 264"))
        #expect(peerError { try PeerCodec.validate(header: [1, 0, 0]) } == .truncated(needed: 12, got: 3))
    }

    @Test func payloadAndFdChecks() {
        var map = PeerCodec.encode(samples[3])
        #expect(peerError { try roundTrip(map, fds: 0) } == .fdCount(.map, got: 0, expected: 1))
        #expect(peerError { try roundTrip(map, fds: 2) } == .fdCount(.map, got: 2, expected: 1))
        map[12 + 32] = 0 // prot 0
        #expect(peerError { try roundTrip(map, fds: 1) } == .badValue(.map, field: "prot", value: 0))
        map[12 + 32] = 4
        #expect(peerError { try roundTrip(map, fds: 1) } == .badValue(.map, field: "prot", value: 4))
        let (ackHeader, ackType) = try! PeerCodec.validate(header: Array(PeerCodec.encode(.ack(1)).prefix(12)))
        #expect(peerError { try PeerCodec.decode(ackHeader, ackType, payload: [1, 0, 0, 0, 0, 0, 0], fdCount: 0) }
                == .payloadSize(.ack, size: 7, expected: "8"))
        var vring = PeerCodec.encode(samples[6])
        #expect(peerError { try roundTrip(vring, fds: 1) } == .fdCount(.vring, got: 1, expected: 2))
        vring[12 + 34] = 8
        #expect(peerError { try roundTrip(vring, fds: 2) } == .badValue(.vring, field: "flags", value: 8))
        var reply = PeerCodec.encode(samples[11])
        reply[12 + 12] = 0xff // reason length 255 > 200
        #expect(peerError { try roundTrip(reply, fds: 0) } == .textTooLong(.translateReply, length: 255, maximum: 200))
        var device = PeerCodec.encode(.device(PeerDevice(event: .stop, features: 0)))
        device[12] = 9
        #expect(peerError { try roundTrip(device, fds: 0) } == .badValue(.device, field: "event", value: 9))
        var bar = PeerCodec.encode(samples[1])
        bar[12 + 16] = 3 // barSize not a power of two
        #expect(peerError { try roundTrip(bar, fds: 0) } == .badValue(.hello, field: "barSize", value: (1 << 36) | 3))
    }

    @Test func longTextIsCutWhenEncoding() throws {
        let long = String(repeating: "x", count: 1000)
        guard case .error(let e) = try roundTrip(PeerCodec.encode(.error(PeerError(code: .protocolError, text: long))), fds: 0) else {
            Issue.record("not an error"); return
        }
        #expect(e.text.count == PeerError.maximumText)
    }
}

/// Random and mutated peer messages: the codec never traps, and whatever it
/// accepts re-encodes to a message that decodes to the same value.
@Suite struct PeerFuzzTests {
    @Test func mutatedMessagesNeverTrap() {
        var rng = SplitMix64(seed: 7)
        let seeds = samples.map { PeerCodec.encode($0) }
        var accepted = 0
        for _ in 0..<20_000 {
            var b = seeds.randomElement(using: &rng) ?? []
            for _ in 0..<Int.random(in: 1...3, using: &rng) {
                switch Int.random(in: 0..<4, using: &rng) {
                case 0 where !b.isEmpty: b[Int.random(in: 0..<b.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                case 1 where b.count > 1: b.removeLast(Int.random(in: 1..<b.count, using: &rng))
                case 2: b += [UInt8.random(in: 0...255, using: &rng)]
                default: break
                }
            }
            guard b.count >= 12, let (header, type) = try? PeerCodec.validate(header: Array(b.prefix(12))) else { continue }
            let payload = Array(b.dropFirst(12))
            guard let m = try? PeerCodec.decode(header, type, payload: payload, fdCount: Int.random(in: 0...2, using: &rng)) else { continue }
            accepted += 1
            let again = PeerCodec.encode(m)
            guard let (h2, t2) = try? PeerCodec.validate(header: Array(again.prefix(12))),
                  let m2 = try? PeerCodec.decode(h2, t2, payload: Array(again.dropFirst(12)), fdCount: m.fdCount) else {
                Issue.record("re-encoding \(m) does not decode"); return
            }
            #expect(m2 == m)
        }
        // A floor, not "> 0": a decoder that refused almost everything would
        // leave the round-trip check above untested.
        #expect(accepted >= 1000, "only \(accepted) of 20 000 mutated messages decoded")
    }
}
