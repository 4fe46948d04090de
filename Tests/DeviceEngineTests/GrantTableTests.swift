import BridgeCore
import DeviceEngine
import Testing

@Suite("GrantTable") struct GrantTableTests {
    /// The shortcut never answers differently from the table: random grants,
    /// revocations and checks, compared against a fresh search each time.
    @Test func theLastHitShortcutAgreesWithTheTable() {
        var rng = SystemRandomNumberGenerator()
        var g = GrantTable(barSize: 1 << 20)
        let perms: [Permission] = [.read, .write, .readWrite]
        var disagreements = 0, shortcutHits = 0
        for _ in 0..<20_000 {
            let start = UInt64.random(in: 0..<(1 << 20), using: &rng) & ~0xfff
            let length = UInt64.random(in: 1...0x8000, using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: g.grant(start, start + length, perms.randomElement(using: &rng)!)
            case 1: g.revoke(start, start + length)
            default:
                let needed = perms.randomElement(using: &rng)!
                let fresh = g.checkOnce(start, length, needed)
                let before = g.generation
                if g.check(start, length, needed) != fresh { disagreements += 1 }
                if fresh == nil { shortcutHits += g.check(start, length, needed) == nil ? 1 : 0 }
                #expect(g.generation == before, "checks do not change the generation")
            }
        }
        #expect(disagreements == 0)
        #expect(shortcutHits > 100, "the test exercised granted checks (\(shortcutHits))")
    }

    @Test func aRevocationEndsTheShortcutAndBumpsTheGeneration() {
        var g = GrantTable(barSize: 1 << 20)
        g.grant(0, 0x10000, .readWrite)
        #expect(g.check(0x100, 16, .read) == nil) // now the shortcut
        let gen = g.generation
        g.revoke(0x0, 0x1000)
        #expect(g.generation != gen)
        #expect(g.check(0x100, 16, .read) == .notMapped(at: 0x100))
        #expect(g.check(0x1000, 16, .write) == nil)
    }

    @Test func grantsAreClippedToTheBAR() {
        var g = GrantTable(barSize: 0x10000)
        g.grant(0x8000, 0x20000, .read)
        #expect(g.check(0x8000, 0x100, .read) == nil)
        #expect(g.check(0xff00, 0x200, .read) == .outsideBAR)
        #expect(g.bytesMapped == 0x8000)
    }

    @Test func pollPolicySpinsThenSleeps() {
        let t0 = ContinuousClock.now
        var p = PollPolicy(spin: .milliseconds(1))
        let answers = [
            p.keepPolling(now: t0),
            p.keepPolling(now: t0.advanced(by: .microseconds(500))),
            p.keepPolling(now: t0.advanced(by: .milliseconds(2))),
        ]
        #expect(answers == [true, true, false])
        p.noteWork()
        let afterWork = p.keepPolling(now: t0.advanced(by: .milliseconds(3)))
        #expect(afterWork, "work restarts the budget")
        var never = PollPolicy(spin: .zero)
        let polls = never.keepPolling(now: t0)
        #expect(!polls)
    }
}
