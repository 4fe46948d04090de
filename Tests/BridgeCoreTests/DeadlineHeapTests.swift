import BridgeCore
import Testing

@Suite struct DeadlineHeapTests {
    enum T: Hashable, Sendable { case a, b, c, n(Int) }
    let t0 = ContinuousClock.now

    @Test func timersFireInDueOrderOnlyWhenDue() {
        var h = DeadlineHeap<T>()
        #expect(h.next == nil)
        h.schedule(.b, at: t0.advanced(by: .seconds(2)))
        h.schedule(.a, at: t0.advanced(by: .seconds(1)))
        h.schedule(.c, at: t0.advanced(by: .seconds(3)))
        #expect(h.next == t0.advanced(by: .seconds(1)) && h.count == 3)
        #expect(h.expired(now: t0).isEmpty)
        #expect(h.expired(now: t0.advanced(by: .seconds(2))) == [.a, .b])
        #expect(h.next == t0.advanced(by: .seconds(3)) && h.count == 1)
        #expect(h.expired(now: t0.advanced(by: .seconds(9))) == [.c])
        #expect(h.next == nil && h.count == 0)
    }

    @Test func rescheduleMovesAndCancelRemoves() {
        var h = DeadlineHeap<T>()
        h.schedule(.a, at: t0.advanced(by: .seconds(1)))
        h.schedule(.b, at: t0.advanced(by: .seconds(2)))
        h.schedule(.a, at: t0.advanced(by: .seconds(5))) // moved later
        #expect(h.next == t0.advanced(by: .seconds(2)) && h.due(.a) == t0.advanced(by: .seconds(5)))
        h.cancel(.b)
        #expect(h.next == t0.advanced(by: .seconds(5)))
        #expect(h.expired(now: t0.advanced(by: .seconds(4))).isEmpty)
        #expect(h.expired(now: t0.advanced(by: .seconds(5))) == [.a])
        h.cancel(.a) // not scheduled: nothing
        #expect(h.count == 0 && h.next == nil)
    }

    @Test func reArmingAtTheSameTimeAddsNothing() {
        var h = DeadlineHeap<T>()
        for _ in 0..<1000 { h.schedule(.a, at: t0.advanced(by: .seconds(1))) }
        #expect(h.storage == 1 && h.count == 1)
    }

    /// Against a sorted list, for many interleaved schedules and cancels.
    @Test func matchesASortedModel() {
        var h = DeadlineHeap<T>()
        var model: [T: Int] = [:]
        var rng = SystemRandomNumberGenerator()
        for step in 0..<2000 {
            let k = T.n(Int.random(in: 0..<50, using: &rng))
            switch Int.random(in: 0..<3, using: &rng) {
            case 0, 1:
                let ms = Int.random(in: 0..<1000, using: &rng)
                h.schedule(k, at: t0.advanced(by: .milliseconds(ms)))
                model[k] = ms
            default:
                h.cancel(k)
                model[k] = nil
            }
            if step % 100 == 99 {
                let cut = Int.random(in: 0..<1000, using: &rng)
                let fired = h.expired(now: t0.advanced(by: .milliseconds(cut)))
                let expected = model.filter { $0.value <= cut }
                #expect(Set(fired) == Set(expected.keys) && fired.count == expected.count)
                let dues = fired.compactMap { expected[$0] }
                #expect(dues == dues.sorted(), "fired in due order")
                for key in expected.keys { model[key] = nil }
                #expect(h.count == model.count)
                #expect(h.next == model.values.min().map { t0.advanced(by: .milliseconds($0)) })
            }
        }
    }
}
