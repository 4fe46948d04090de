import Testing
@testable import BridgeCore

private let t0 = ContinuousClock.now

private func request(_ id: UInt64, _ bus: UInt64, length: UInt64 = 0x1000, access: Permission = .read) -> TranslationRequest {
    TranslationRequest(id: id, bus: BusAddress(bus), length: length, access: access)
}

@Suite struct PendingTranslationTests {
    @Test func identicalRequestsOfOneConnectionShareAnEntry() {
        var p = PendingTranslations(capacity: 10)
        #expect(p.admit(request(1, 0x1000), owner: 1, deadline: t0) == .queued)
        #expect(p.admit(request(2, 0x1000), owner: 1, deadline: t0) == .merged)
        #expect(p.admit(request(3, 0x1000, access: .readWrite), owner: 1, deadline: t0) == .queued)
        #expect(p.admit(request(4, 0x1000), owner: 2, deadline: t0) == .queued, "another connection's request is its own")
        #expect(p.admit(request(5, 0x1000, length: 0x2000), owner: 1, deadline: t0) == .queued)
        #expect(p.entries.count == 4 && p.count == 5)
        #expect(p.entries[0].ids == [1, 2])
    }

    /// A flood is bounded: past `capacity` waiting requests, each is refused
    /// (merged ones count too: ids are what the daemon must remember).
    @Test func aFloodIsRefusedPastTheCapacity() {
        var p = PendingTranslations(capacity: 64)
        var full = 0
        for id in 0..<10_000 as Range<UInt64> {
            if case .full(let c) = p.admit(request(id, (id % 100) * 0x1000), owner: 1, deadline: t0) { #expect(c == 64); full += 1 }
        }
        #expect(full == 10_000 - 64)
        #expect(p.count == 64 && p.entries.count == 64)
    }

    @Test func settleExpireAndRemoveKeepTheCountRight() {
        var p = PendingTranslations(capacity: 8)
        _ = p.admit(request(1, 0x1000), owner: 1, deadline: t0.advanced(by: .seconds(1)))
        _ = p.admit(request(2, 0x1000), owner: 1, deadline: t0.advanced(by: .seconds(1)))
        _ = p.admit(request(3, 0x2000), owner: 1, deadline: t0.advanced(by: .seconds(3)))
        _ = p.admit(request(4, 0x3000), owner: 2, deadline: t0.advanced(by: .seconds(5)))
        #expect(p.nextDeadline == t0.advanced(by: .seconds(1)))
        let expired = p.expire(now: t0.advanced(by: .seconds(2)))
        #expect(expired.map(\.ids) == [[1, 2]] && p.count == 2)
        let settled = p.settle { $0.bus == BusAddress(0x3000) }
        #expect(settled.map(\.owner) == [2] && p.count == 1)
        #expect(p.removeAll(owner: 2).isEmpty)
        #expect(p.removeAll(owner: 1).map(\.ids) == [[3]])
        #expect(p.isEmpty && p.count == 0 && p.nextDeadline == nil)
        // Room again after settling.
        #expect(p.admit(request(9, 0x1000), owner: 3, deadline: t0) == .queued)
    }
}

@Suite struct OutstandingMissTests {
    /// One miss per page and access; raised again only once the retry
    /// interval passed — not because something else happened meanwhile.
    @Test func oneMissPerPageUntilTheRetryInterval() {
        var m = OutstandingMisses(pageSize: 0x1000, retryInterval: .seconds(1))
        #expect(m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0))
        #expect(!m.shouldRaise(BusAddress(0x1fff), permission: .read, now: t0.advanced(by: .milliseconds(10))), "same page")
        #expect(m.shouldRaise(BusAddress(0x1000), permission: .readWrite, now: t0), "another access is another miss")
        #expect(m.shouldRaise(BusAddress(0x2000), permission: .read, now: t0))
        #expect(!m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0.advanced(by: .milliseconds(999))))
        #expect(m.nextRetry == t0.advanced(by: .seconds(1)))
        #expect(m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0.advanced(by: .seconds(1))))
        #expect(m.count == 3)
    }

    @Test func answeredMissesAreForgottenAndCanBeRaisedAgainAtOnce() {
        var m = OutstandingMisses(pageSize: 0x1000, retryInterval: .seconds(1))
        _ = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0)
        _ = m.shouldRaise(BusAddress(0x5000), permission: .read, now: t0)
        m.forget { bus, _ in bus == BusAddress(0x1000) }
        #expect(m.count == 1)
        #expect(m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0))
        m.keepOnly([(BusAddress(0x1234), .read)])
        #expect(m.count == 1)
        #expect(!m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0))
        #expect(m.shouldRaise(BusAddress(0x5000), permission: .read, now: t0), "dropped by keepOnly")
        m.removeAll()
        #expect(m.count == 0 && m.nextRetry == nil)
    }
}

@Suite struct LogThrottleTests {
    @Test func oneLinePerKeyPerIntervalAndTheNextSaysHowManyWereHeld() {
        var log = LogThrottle(interval: .seconds(10))
        #expect(log.admit("a", now: t0) == 0)
        for i in 1...999 { #expect(log.admit("a", now: t0.advanced(by: .milliseconds(i))) == nil) }
        #expect(log.admit("b", now: t0) == 0, "keys are independent")
        #expect(log.admit("a", now: t0.advanced(by: .seconds(10))) == 999)
        #expect(log.admit("a", now: t0.advanced(by: .seconds(20))) == 0)
    }
}
