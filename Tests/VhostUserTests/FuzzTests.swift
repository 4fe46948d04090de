import BridgeCore
import Testing
import TestSupport
@testable import VhostUser

/// Random and mutated messages through the codec and the session: nothing may
/// trap, a refused request changes nothing, and the address space keeps its
/// invariants whatever gets accepted.
@Suite struct FuzzTests {
    static func mutate(_ bytes: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
        var b = bytes
        switch UInt8.random(in: 0..<6, using: &rng) {
        case 0 where !b.isEmpty: b[Int.random(in: 0..<b.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
        case 1 where b.count > 12: b.removeLast(Int.random(in: 1...(b.count - 12), using: &rng))
        case 2: b += (0..<Int.random(in: 1...16, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        case 3 where b.count >= 20:
            // A random 64-bit field somewhere in the payload: addresses, sizes, counts.
            let at = Int.random(in: 12...(b.count - 8), using: &rng)
            let v = [0, 1, UInt64.max, UInt64.max - 4095, 1 << 36, 4096, UInt64.random(in: 0...UInt64.max, using: &rng)].randomElement(using: &rng) ?? 0
            for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
        case 4: b = (0..<Int.random(in: 0...80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        default: break
        }
        return b
    }

    @Test(arguments: [1, 2, 3, 4] as [UInt64])
    func hostileMessagesNeverBreakTheSession(seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        for mode in [BridgeMode.identity, .iommu] {
            var s = makeSession(mode, bar: 1 << 40)
            s.negotiateLikeQEMU(iommu: mode == .iommu)
            let seeds = everyRequest.map { (VhostUserCodec.encode($0.0), $0.1) }
            var reached = 0, accepted = 0
            defer {
                // Inputs the codec refuses never reach the session: without a
                // floor, a codec that refused everything would pass this test.
                #expect(reached >= 2000, "only \(reached) of 6000 mutated messages reached the session (\(mode))")
                #expect(accepted >= 500, "only \(accepted) were accepted by the session (\(mode))")
            }
            for _ in 0..<6000 {
                let (seed, seedFDs) = seeds.randomElement(using: &rng) ?? ([], 0)
                let bytes = Self.mutate(seed, &rng)
                guard bytes.count >= 12, let header = try? MessageHeader.decode(Array(bytes.prefix(12))),
                      let code = try? VhostUserCodec.validate(header) else { continue }
                let payload = Array(bytes.dropFirst(12))
                // Mostly the fd count the request takes (else nearly every
                // input stops at the codec's fd rule), sometimes any.
                let fds = Int.random(in: 0..<5, using: &rng) == 0 ? Int.random(in: 0...2, using: &rng) : seedFDs
                guard let request = try? VhostUserCodec.decode(code, payload: payload, fdCount: fds) else { continue }
                let files = (0..<fds).map { ReceivedFile(index: $0, size: [nil, 0, 4096, 1 << 30, UInt64.max].randomElement(using: &rng) ?? nil,
                                                                kind: [FileKind.eventfd, .regularFile, .socket, .pipe].randomElement(using: &rng) ?? .unknown) }
                let before = s.snapshot
                let outcome = s.handle(request, needReply: Bool.random(using: &rng), files: files)
                reached += 1
                if outcome.error == nil { accepted += 1 }
                if outcome.error != nil {
                    #expect(s.snapshot == before, "refused \(request) changed state")
                }
                if let violation = s.addressSpace.invariantViolation() {
                    Issue.record("after \(request): \(violation)")
                    return
                }
            }
        }
    }
}
