import Testing
import TestSupport
@testable import BridgeCore

private let t0 = ContinuousClock.now

private func request(_ id: UInt64, _ bus: UInt64, length: UInt64 = 0x1000, access: Permission = .read) -> TranslationRequest {
    TranslationRequest(id: id, bus: BusAddress(bus), length: length, access: access)
}

@Suite struct PendingTranslationTests {
    @Test func identicalRequestsOfOneConnectionShareAnEntry() {
        var p = PendingTranslations(capacity: 10)
        let r1 = p.admit(request(1, 0x1000), owner: 1, deadline: t0)
        #expect(r1 == .queued)
        let r2 = p.admit(request(2, 0x1000), owner: 1, deadline: t0)
        #expect(r2 == .merged)
        let r3 = p.admit(request(3, 0x1000, access: .readWrite), owner: 1, deadline: t0)
        #expect(r3 == .queued)
        let r4 = p.admit(request(4, 0x1000), owner: 2, deadline: t0)
        #expect(r4 == .queued, "another connection's request is its own")
        let r5 = p.admit(request(5, 0x1000, length: 0x2000), owner: 1, deadline: t0)
        #expect(r5 == .queued)
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
        let r6 = p.removeAll(owner: 2).isEmpty
        #expect(r6)
        let r7 = p.removeAll(owner: 1).map(\.ids)
        #expect(r7 == [[3]])
        #expect(p.isEmpty && p.count == 0 && p.nextDeadline == nil)
        // Room again after settling.
        let r8 = p.admit(request(9, 0x1000), owner: 3, deadline: t0)
        #expect(r8 == .queued)
    }
}

extension PendingTranslationTests {
    /// Issue 20, hole 9: merged requests keep their own deadlines. A later
    /// identical request shares the first one's entry (and miss) but is not
    /// timed out with it.
    @Test func mergedRequestsKeepTheirOwnDeadlines() {
        var p = PendingTranslations(capacity: 8)
        _ = p.admit(request(1, 0x1000), owner: 1, deadline: t0.advanced(by: .seconds(2)))
        let merged = p.admit(request(2, 0x1000), owner: 1, deadline: t0.advanced(by: .seconds(3)))
        #expect(merged == .merged)
        #expect(p.nextDeadline == t0.advanced(by: .seconds(2)))
        let first = p.expire(now: t0.advanced(by: .seconds(2)))
        #expect(first.map(\.ids) == [[1]])
        #expect(p.count == 1 && p.entries.map(\.ids) == [[2]])
        #expect(p.nextDeadline == t0.advanced(by: .seconds(3)))
        #expect(p.expire(now: t0.advanced(by: .milliseconds(2999))).isEmpty)
        let second = p.expire(now: t0.advanced(by: .seconds(3)))
        #expect(second.map(\.ids) == [[2]])
        #expect(p.isEmpty && p.count == 0 && p.nextDeadline == nil)
    }
}

@Suite struct OutstandingMissTests {
    /// One miss per page and access; raised again only once the retry
    /// interval passed — not because something else happened meanwhile.
    @Test func oneMissPerPageUntilTheRetryInterval() {
        var m = OutstandingMisses(pageSize: 0x1000, retryInterval: .seconds(1))
        let r9 = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0)
        #expect(r9)
        let r10 = m.shouldRaise(BusAddress(0x1fff), permission: .read, now: t0.advanced(by: .milliseconds(10)))
        #expect(!r10, "same page")
        let r11 = m.shouldRaise(BusAddress(0x1000), permission: .readWrite, now: t0)
        #expect(r11, "another access is another miss")
        let r12 = m.shouldRaise(BusAddress(0x2000), permission: .read, now: t0)
        #expect(r12)
        let r13 = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0.advanced(by: .milliseconds(999)))
        #expect(!r13)
        #expect(m.nextRetry == t0.advanced(by: .seconds(1)))
        let r14 = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0.advanced(by: .seconds(1)))
        #expect(r14)
        #expect(m.count == 3)
    }

    @Test func answeredMissesAreForgottenAndCanBeRaisedAgainAtOnce() {
        var m = OutstandingMisses(pageSize: 0x1000, retryInterval: .seconds(1))
        _ = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0)
        _ = m.shouldRaise(BusAddress(0x5000), permission: .read, now: t0)
        m.forget { bus, _ in bus == BusAddress(0x1000) }
        #expect(m.count == 1)
        let r15 = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0)
        #expect(r15)
        m.keepOnly([(BusAddress(0x1234), .read)], now: t0)
        #expect(m.count == 2, "still outstanding at VM1: kept until the retry interval passes")
        m.keepOnly([(BusAddress(0x1234), .read)], now: t0.advanced(by: .seconds(1)))
        #expect(m.count == 1)
        let r16 = m.shouldRaise(BusAddress(0x1000), permission: .read, now: t0.advanced(by: .milliseconds(999)))
        #expect(!r16)
        let r17 = m.shouldRaise(BusAddress(0x5000), permission: .read, now: t0.advanced(by: .seconds(1)))
        #expect(r17, "dropped by keepOnly")
        m.removeAll()
        #expect(m.count == 0 && m.nextRetry == nil)
    }
}

@Suite struct LogThrottleTests {
    @Test func oneLinePerKeyPerIntervalAndTheNextSaysHowManyWereHeld() {
        var log = LogThrottle(interval: .seconds(10))
        let r18 = log.admit("a", now: t0)
        #expect(r18 == 0)
        for i in 1...999 { let held = log.admit("a", now: t0.advanced(by: .milliseconds(i))); #expect(held == nil) }
        let r19 = log.admit("b", now: t0)
        #expect(r19 == 0, "keys are independent")
        let r20 = log.admit("a", now: t0.advanced(by: .seconds(10)))
        #expect(r20 == 999)
        let r21 = log.admit("a", now: t0.advanced(by: .seconds(20)))
        #expect(r21 == 0)
    }
}

@Suite struct TranslationBrokerTests {
    let f = Fixture()
    private func broker(capacity: Int = 8) -> TranslationBroker {
        TranslationBroker(capacity: capacity, pageSize: page, deadline: .seconds(2), missRetryInterval: .seconds(1))
    }
    private func ask(_ id: UInt64, _ bus: UInt64, _ length: UInt64 = page, _ access: Permission = .read) -> TranslationRequest {
        TranslationRequest(id: id, bus: BusAddress(bus), length: length, access: access)
    }

    @Test func mappedRangesAreGrantedWithTheirMaps() throws {
        var space = iommuSpace()
        _ = try space.update(bus: BusAddress(4 * GiB), length: 2 * page, source: user(Fixture.ramUser), permission: .readWrite, regions: f.table)
        var b = broker()
        let actions = b.request(ask(1, 4 * GiB + page), owner: 3, space: space, canRaiseMisses: true, now: t0)
        // The whole mapping, not the piece asked for: VM2 maps what it gets.
        let whole = Mapping(bus: BusAddress(4 * GiB), length: 2 * page, permission: .readWrite, region: f.ram.id, fdOffset: 0)
        #expect(actions == [.sendMaps([whole], owner: 3), .answer(ids: [1], request: ask(1, 4 * GiB + page), owner: 3, .granted)])
        // A packet buffer inside a page: still whole, page-aligned MAPs (a
        // 0x5e8-byte MAP, as sent before, cannot be mmapped by VM2).
        let buffer = ask(2, 4 * GiB + page + 0x100, 0x5e8)
        let sub = b.request(buffer, owner: 3, space: space, canRaiseMisses: true, now: t0)
        #expect(sub == [.sendMaps([whole], owner: 3), .answer(ids: [2], request: buffer, owner: 3, .granted)])
        // Across two mappings: each whole, once.
        _ = try space.update(bus: BusAddress(4 * GiB + 2 * page), length: page, source: user(Fixture.highUser), permission: .read, regions: f.table)
        let across = ask(3, 4 * GiB + page + 0x800, page)
        guard case .sendMaps(let maps, _)? = b.request(across, owner: 3, space: space, canRaiseMisses: true, now: t0).first else {
            Issue.record("no maps"); return
        }
        #expect(maps.map(\.bus) == [BusAddress(4 * GiB), BusAddress(4 * GiB + 2 * page)])
        #expect(maps.allSatisfy { $0.bus.rawValue % page == 0 && $0.length % page == 0 })
    }

    @Test func policyRefusalsNameTheirRule() {
        let space = iommuSpace(bar: 64 * GiB, dma: BusWindow(base: BusAddress(4 * GiB), limit: 8 * GiB))
        var b = broker()
        guard case .answer(_, _, _, .refused(_, let rule))? = b.request(ask(1, 64 * GiB), owner: 1, space: space, canRaiseMisses: true, now: t0).first else {
            Issue.record("not refused"); return
        }
        #expect(rule == "bar-bounds")
        guard case .answer(_, _, _, .refused(_, let rule2))? = b.request(ask(2, GiB), owner: 1, space: space, canRaiseMisses: true, now: t0).first else {
            Issue.record("not refused"); return
        }
        #expect(rule2 == "dma-window")
        guard case .answer(_, _, _, .refused(let why, _))? = b.request(ask(3, 4 * GiB), owner: 1, space: space, canRaiseMisses: false, now: t0).first else {
            Issue.record("not refused"); return
        }
        #expect(why.hasSuffix("VM1 has no back-end channel to raise an IOTLB miss on"))
        #expect(b.pending.isEmpty)
    }

    /// Unmapped: one miss for the first request of a page, none for the
    /// rest; the update answers all of them, on their own connections.
    @Test func waitingRequestsShareAMissAndAreAnsweredByTheUpdate() throws {
        var space = iommuSpace()
        var b = broker()
        #expect(b.request(ask(1, 4 * GiB), owner: 1, space: space, canRaiseMisses: true, now: t0) == [.raiseMiss(bus: BusAddress(4 * GiB), permission: .read)])
        #expect(b.request(ask(2, 4 * GiB), owner: 1, space: space, canRaiseMisses: true, now: t0).isEmpty, "merged: no second miss")
        #expect(b.request(ask(3, 4 * GiB), owner: 2, space: space, canRaiseMisses: true, now: t0).isEmpty, "another VM2 connection, same page: no new miss")
        _ = try space.update(bus: BusAddress(4 * GiB), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        let answers = b.settle(space: space, ringNeeds: [], now: t0)
        #expect(answers == [.answer(ids: [1, 2], request: ask(0, 4 * GiB), owner: 1, .granted),
                            .answer(ids: [3], request: ask(0, 4 * GiB), owner: 2, .granted)])
        #expect(b.pending.isEmpty)
    }

    /// A range spanning two pages: the update of the first raises the miss
    /// for the second; an unrelated settle raises nothing.
    @Test func progressRaisesTheNextMissOnly() throws {
        var space = iommuSpace()
        var b = broker()
        _ = b.request(ask(1, 4 * GiB, 2 * page), owner: 1, space: space, canRaiseMisses: true, now: t0)
        #expect(b.settle(space: space, ringNeeds: [], now: t0).isEmpty, "nothing new: no miss again")
        _ = try space.update(bus: BusAddress(4 * GiB), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
        #expect(b.settle(space: space, ringNeeds: [], now: t0) == [.raiseMiss(bus: BusAddress(4 * GiB + page), permission: .read)])
    }

    @Test func deadlinesRetriesDropsAndTheEnd() {
        let space = iommuSpace()
        var b = broker()
        _ = b.request(ask(1, 4 * GiB), owner: 1, space: space, canRaiseMisses: true, now: t0)
        _ = b.request(ask(2, 5 * GiB), owner: 2, space: space, canRaiseMisses: true, now: t0)
        let early = b.expire(space: space, ringNeeds: [], now: t0.advanced(by: .milliseconds(500)))
        #expect(early.actions.isEmpty && early.next == t0.advanced(by: .seconds(1)))
        let retry = b.expire(space: space, ringNeeds: [], now: t0.advanced(by: .seconds(1)))
        #expect(Set(retry.actions.map { "\($0)" }).count == 2 && retry.actions.allSatisfy { if case .raiseMiss = $0 { true } else { false } })
        #expect(b.drop(owner: 2, space: space, ringNeeds: [], now: t0.advanced(by: .seconds(1))).isEmpty)
        let late = b.expire(space: space, ringNeeds: [], now: t0.advanced(by: .seconds(2)))
        #expect(late.actions == [.answer(ids: [1], request: ask(0, 4 * GiB), owner: 1, .timedOut)])
        _ = b.request(ask(9, 6 * GiB), owner: 3, space: space, canRaiseMisses: true, now: t0)
        #expect(b.endSession() == [.answer(ids: [9], request: ask(0, 6 * GiB), owner: 3, .refused(reason: "the VM1 session ended", rule: "session-ended"))])
    }

    private func answers(_ actions: [TranslationBroker.Action]) -> [TranslationBroker.Action] {
        actions.filter { if case .answer = $0 { true } else { false } }
    }

    /// Issue 20, hole 9: a request merged into one that waits already is
    /// timed out at its own deadline (its arrival + the deadline), not the
    /// first one's — and VM1's update in between still grants it.
    @Test(arguments: [false, true])
    func aMergedRequestWaitsItsOwnDeadline(vm1Answers: Bool) throws {
        var space = iommuSpace()
        var b = broker() // deadline 2 s
        let later = t0.advanced(by: .milliseconds(1500))
        _ = b.request(ask(1, 4 * GiB), owner: 1, space: space, canRaiseMisses: true, now: t0)
        #expect(answers(b.request(ask(2, 4 * GiB), owner: 1, space: space, canRaiseMisses: true, now: later)).isEmpty)
        #expect(b.pending.entries.count == 1, "merged")
        let first = b.expire(space: space, ringNeeds: [], now: t0.advanced(by: .seconds(2)))
        #expect(answers(first.actions) == [.answer(ids: [1], request: ask(0, 4 * GiB), owner: 1, .timedOut)])
        #expect(b.pending.entries.map(\.ids) == [[2]] && b.pending.count == 1)
        #expect(first.next.map { $0 <= later.advanced(by: .seconds(2)) } == true)
        if vm1Answers {
            _ = try space.update(bus: BusAddress(4 * GiB), length: page, source: user(Fixture.ramUser), permission: .read, regions: f.table)
            #expect(answers(b.settle(space: space, ringNeeds: [], now: t0.advanced(by: .milliseconds(2500))))
                    == [.answer(ids: [2], request: ask(0, 4 * GiB), owner: 1, .granted)])
        } else {
            #expect(answers(b.expire(space: space, ringNeeds: [], now: later.advanced(by: .milliseconds(1999))).actions).isEmpty)
            #expect(answers(b.expire(space: space, ringNeeds: [], now: later.advanced(by: .seconds(2))).actions)
                    == [.answer(ids: [2], request: ask(0, 4 * GiB), owner: 1, .timedOut)])
        }
        #expect(b.pending.isEmpty)
    }

    @Test func theCapacityRefusesWithItsRule() {
        let space = iommuSpace()
        var b = broker(capacity: 2)
        _ = b.request(ask(1, 4 * GiB), owner: 1, space: space, canRaiseMisses: true, now: t0)
        _ = b.request(ask(2, 4 * GiB + page), owner: 1, space: space, canRaiseMisses: true, now: t0)
        #expect(b.request(ask(3, 4 * GiB + 2 * page), owner: 1, space: space, canRaiseMisses: true, now: t0)
                == [.answer(ids: [3], request: ask(3, 4 * GiB + 2 * page), owner: 1,
                            .refused(reason: "[translation-limit] 2 translations already wait for VM1", rule: "translation-limit"))])
    }
}
