import BridgeDaemon
import Foundation
import LinuxIO
import Synchronization
import Testing
import TestSupport

/// A source/target pair: the relay gets dups, the test keeps the originals.
struct Pair {
    let source: EventFD
    let target: EventFD
    init(nonBlockingTarget: Bool = true) throws {
        source = try EventFD()
        target = try EventFD(nonBlocking: nonBlockingTarget)
    }
    func add(to relay: NotificationRelay) throws -> NotificationRelay.LinkID {
        try relay.add(source: try source.fd.duplicate(), target: try target.fd.duplicate())
    }
}

/// Drains a target (non-blocking read) and returns the total seen so far.
func drain(_ e: EventFD) -> UInt64 {
    if let v = try? e.fd.setNonBlocking(true) { _ = v }
    return (try? e.read()).flatMap { $0 } ?? 0
}

/// Reads (and zeroes) an eventfd's counter without blocking and without
/// touching its file flags (preadv2 RWF_NOWAIT): 0 when it is zero.
func take(_ e: EventFD) -> UInt64 { EventFD.take(from: e.fd.rawValue).value ?? 0 }

/// Adds `value` to a counter whose file a test made blocking, without ever
/// waiting (a test must not hang where the relay would): O_NONBLOCK is set
/// around the write, as a peer can. Returns whether it fitted.
@discardableResult
func add(_ value: UInt64, to e: EventFD) -> Bool {
    let wasNonBlocking = (try? e.fd.isNonBlocking) ?? false
    try? e.fd.setNonBlocking(true)
    defer { if !wasNonBlocking { try? e.fd.setNonBlocking(false) } }
    return (try? e.signal(value)) ?? false
}

/// The counter's value, left in place (`eventfd-count` in fdinfo).
func peek(_ e: EventFD) -> UInt64 {
    let info = (try? String(contentsOfFile: "/proc/self/fdinfo/\(e.fd.rawValue)", encoding: .utf8)) ?? ""
    for line in info.split(separator: "\n") where line.hasPrefix("eventfd-count:") {
        return UInt64(line.dropFirst("eventfd-count:".count).trimmingCharacters(in: .whitespaces), radix: 16) ?? 0
    }
    return 0
}

/// Runs `body` on a thread and waits (bounded, generously) for it to return,
/// so a relay that blocks fails a test instead of hanging the suite. The
/// caller joins `thread` once whatever blocked it was released.
func returnsInTime(_ body: @escaping @Sendable () -> Void) throws -> (returned: Bool, thread: JoinableThread) {
    let done = Atomic<Bool>(false)
    let thread = try JoinableThread(name: "bounded") { body(); done.store(true, ordering: .releasing) }
    let returned = pollUntil(seconds: 60) { done.load(ordering: .acquiring) }
    if returned { thread.join() }
    return (returned, thread)
}

@Suite(.serialized) struct NotificationRelayTests {
    @Test(arguments: [NotificationMode.relay, .relaySQPoll])
    func aKickReachesTheOtherSide(mode: NotificationMode) throws {
        let relay = try NotificationRelay(mode: mode)
        defer { relay.stop() }
        let pair = try Pair()
        let id = try pair.add(to: relay)
        try pair.source.signal(5)
        // Five kicks read at once are one wakeup: the relay writes 1.
        var seen: UInt64 = 0
        #expect(pollUntil { seen += drain(pair.target); return seen >= 1 })
        #expect(pollUntil { relay.statistics(id)?.notifications == 5 })
        #expect(pollUntil { seen += drain(pair.target); return relay.statistics(id)?.relayed == seen })
    }

    /// A peer writes the largest eventfd values it can (2^64 − 2) into its
    /// kick or call fd: the relay's counters saturate instead of trapping
    /// (an overflow trap killed every bridge of the daemon).
    @Test(arguments: [NotificationMode.relay, .relaySQPoll])
    func hugeEventfdValuesSaturateTheCounters(mode: NotificationMode) throws {
        let relay = try NotificationRelay(mode: mode)
        defer { relay.stop() }
        let pair = try Pair()
        let id = try pair.add(to: relay)
        let biggest: UInt64 = 0xffff_ffff_ffff_fffe
        for _ in 0..<3 {
            try pair.source.signal(biggest)
            #expect(pollUntil { drain(pair.target) > 0 })
        }
        #expect(pollUntil { relay.statistics(id)?.notifications == UInt64.max })
        // Still relaying.
        try pair.source.signal(1)
        #expect(pollUntil { drain(pair.target) == 1 })
        var total = RelayLinkStatistics()
        total.notifications = .max - 1
        total.add(relay.statistics(id) ?? RelayLinkStatistics())
        #expect(total.notifications == .max)
    }

    @Test func aBlockingTargetIsDeliveredWithABoundedWrite() throws {
        let relay = try NotificationRelay()
        defer { relay.stop() }
        let pair = try Pair(nonBlockingTarget: false)
        let id = try pair.add(to: relay)
        for _ in 0..<3 { try pair.source.signal() }
        var seen: UInt64 = 0
        #expect(pollUntil { seen += take(pair.target); return seen >= 1 })
        #expect(pollUntil { relay.statistics(id)?.notifications == 3 })
        #expect(pollUntil { seen += take(pair.target); return relay.statistics(id)?.relayed == seen })
        #expect(try !pair.target.fd.isNonBlocking, "the relay never changes a peer's file flags")
    }

    /// The spin finds the completions: a single-issuer ring (DEFER_TASKRUN)
    /// posts them only when its thread asks the kernel, so a spin that only
    /// reaped never found one (0 hits) and every wakeup waited out the
    /// whole spin. Ping-pong kicks, each well inside a 10 ms spin.
    @Test(arguments: [NotificationMode.relay, .relaySQPoll])
    func busyPollingFindsCompletionsWhileItSpins(mode: NotificationMode) throws {
        let relay = try NotificationRelay(mode: mode, busyPollMicroseconds: 10_000)
        defer { relay.stop() }
        let pair = try Pair()
        let id = try pair.add(to: relay)
        var relayed = 0
        for round in 1...200 {
            try pair.source.signal()
            if pollUntil(seconds: 10, { drain(pair.target) > 0 }) { relayed += 1 }
            #expect(pollUntil { relay.statistics(id)?.notifications == UInt64(round) })
        }
        #expect(relayed == 200)
        #expect(relay.busyPollHits >= 20, "\(relay.busyPollHits) of 200 wakeups found while spinning")
    }

    @Test func busyPollingRelays() throws {
        let relay = try NotificationRelay(busyPollMicroseconds: 50)
        defer { relay.stop() }
        let pair = try Pair()
        _ = try pair.add(to: relay)
        try pair.source.signal(2)
        var seen: UInt64 = 0
        #expect(pollUntil { seen += drain(pair.target); return seen >= 1 })
    }

    @Test func sixtyFourVringsAndBurstsOfAHundredThousandKicksLoseNothing() throws {
        let relay = try NotificationRelay()
        defer { relay.stop() }
        let pairs = try (0..<64).map { _ in try Pair() }
        let ids = try pairs.map { try $0.add(to: relay) }
        let perRing = 100_000 / 64 + 1
        let writer = try JoinableThread(name: "kicker") {
            for round in 0..<perRing {
                for (i, p) in pairs.enumerated() where i != 0 || round < perRing { _ = try? p.source.signal() }
            }
            // One ring gets a burst of 10^5 on its own.
            for _ in 0..<100_000 { _ = try? pairs[0].source.signal() }
        }
        var totals = [UInt64](repeating: 0, count: 64)
        let expected = (0..<64).map { UInt64(perRing) + ($0 == 0 ? 100_000 : 0) }
        // Every kick is read (counted where it was taken); each wakeup
        // reaches the target as one write of 1.
        let complete = pollUntil {
            for (i, p) in pairs.enumerated() { totals[i] += drain(p.target) }
            return ids.enumerated().allSatisfy { relay.statistics($1)?.notifications == expected[$0] }
        }
        writer.join()
        #expect(complete, "read \(ids.reduce(0) { $0 + (relay.statistics($1)?.notifications ?? 0) }) of \(expected.reduce(0, +))")
        #expect(pollUntil {
            for (i, p) in pairs.enumerated() { totals[i] += drain(p.target) }
            return ids.enumerated().allSatisfy { relay.statistics($1)?.relayed == totals[$0] && totals[$0] >= 1 }
        }, "every wakeup delivered")
        let s0 = relay.statistics(ids[0])
        // The burst of 10^5 on ring 0 must take strictly fewer wakeups than
        // kicks (the eventfd counter adds them up between reads); before,
        // `<=` held even for a relay that woke once per kick.
        #expect((s0?.wakeups ?? 0) < expected[0], "\(String(describing: s0))")
        #expect((s0?.coalesced ?? 0) > 0)
        #expect((s0?.coalesced ?? 0) + (s0?.wakeups ?? 0) == expected[0])
    }

    /// The ring is sized to the bridge: the default 8 queue pairs get 128
    /// entries (a few pages the kernel pins, not the ~100 KiB of 1024), and
    /// for every vring count the completion queue (2 × entries) holds what
    /// two links per vring can have in flight and the SQ a stop's cancels,
    /// up to the 1024-entry cap.
    @Test func theRingIsSizedToTheBridgesVrings() {
        #expect(NotificationRelay.ringEntries(vrings: 16) == 128)
        #expect(NotificationRelay.ringEntries(vrings: 2) == 32)
        #expect(NotificationRelay.ringEntries(vrings: 0) == 32)
        #expect(NotificationRelay.ringEntries(vrings: 256) == 1024)
        #expect(NotificationRelay.ringEntries(vrings: -1) == 32)
        #expect(NotificationRelay.ringEntries(vrings: .max) == 1024)
        var previous: UInt32 = 0
        for vrings in 0...300 {
            let entries = NotificationRelay.ringEntries(vrings: vrings)
            #expect(entries.nonzeroBitCount == 1 && (32...1024).contains(entries), "\(vrings) vrings: \(entries)")
            let links = 2 * vrings
            #expect((Int(entries) >= 3 * links + 8 && 2 * Int(entries) >= 5 * links + 1) || entries == 1024, "\(vrings) vrings: \(entries)")
            #expect(entries >= previous)
            previous = entries
        }
    }

    /// 64 links on an 8-entry ring: every re-arm batch overflows the
    /// submission queue, which must be flushed and retried, not lose a link;
    /// and the stop's 192 cancels go out too, so the stop returns. With
    /// SQPOLL a submit only hands the entries to the kernel thread: room
    /// comes when it has taken them (before, the next entry failed and the
    /// relay with it, and a stop with more cancels than room could hang).
    @Test(arguments: [NotificationMode.relay, .relaySQPoll])
    func aFullSubmissionQueueLosesNothing(mode: NotificationMode) throws {
        let relay = try NotificationRelay(mode: mode, entries: 8)
        let pairs = try (0..<64).map { _ in try Pair() }
        let ids = try pairs.map { try $0.add(to: relay) }
        for round in 0..<50 {
            for p in pairs { try p.source.signal(UInt64(round % 3 + 1)) }
        }
        let expected = UInt64((0..<50).reduce(0) { $0 + $1 % 3 + 1 })
        var totals = [UInt64](repeating: 0, count: 64)
        #expect(pollUntil {
            for (i, p) in pairs.enumerated() { totals[i] += drain(p.target) }
            return ids.allSatisfy { relay.statistics($0)?.notifications == expected }
        }, "\(ids.filter { relay.statistics($0)?.notifications != expected }.count) links short")
        #expect(pollUntil {
            for (i, p) in pairs.enumerated() { totals[i] += drain(p.target) }
            return ids.enumerated().allSatisfy { relay.statistics($1)?.relayed == totals[$0] && totals[$0] >= 1 }
        })
        #expect(relay.failure == nil, "\(relay.failure ?? "")")
        // Not joined when it hangs: the suite goes on and reports it.
        let (stopped, _) = try returnsInTime { relay.stop() }
        #expect(stopped, "the stop did not return")
    }

    @Test func linksComeAndGoWhileTrafficFlows() throws {
        let relay = try NotificationRelay()
        defer { relay.stop() }
        let steady = try Pair()
        let steadyID = try steady.add(to: relay)
        let running = Atomic<Bool>(true)
        let kicked = Atomic<UInt64>(0)
        let writer = try JoinableThread(name: "steady") {
            while running.load(ordering: .relaxed) {
                _ = try? steady.source.signal()
                kicked.add(1, ordering: .relaxed)
            }
        }
        let before = settledOpenFileDescriptorCount()
        for _ in 0..<100 {
            let p = try Pair()
            let id = try p.add(to: relay)
            try p.source.signal()
            var got: UInt64 = 0
            #expect(pollUntil { got += drain(p.target); return got == 1 })
            let final = relay.remove(id)
            #expect(final?.notifications == 1)
            #expect(relay.statistics(id) == nil, "a removed link's counters are handed back, not kept forever")
        }
        #expect(settledOpenFileDescriptorCount() == before, "removed links closed their fds")
        running.store(false, ordering: .relaxed)
        writer.join()
        var seen: UInt64 = 0
        let total = kicked.load(ordering: .relaxed)
        #expect(pollUntil { relay.statistics(steadyID)?.notifications == total })
        #expect(pollUntil { seen += drain(steady.target); return seen >= 1 && relay.statistics(steadyID)?.relayed == seen })
        #expect(relay.liveLinks == 1)
    }

    @Test func aMissingTargetCountsAndDropsThenRecovers() throws {
        let relay = try NotificationRelay()
        defer { relay.stop() }
        let source = try EventFD()
        let id = try relay.add(source: try source.fd.duplicate(), target: nil)
        try source.signal(7)
        #expect(pollUntil { relay.statistics(id)?.dropped == 7 })
        let target = try EventFD()
        relay.retarget(id, target: try target.fd.duplicate())
        try source.signal(2)
        var seen: UInt64 = 0
        #expect(pollUntil { seen += drain(target); return seen >= 1 })
        // Target gone again (VM2 disconnected): never blocks, just counts.
        relay.retarget(id, target: nil)
        try source.signal(3)
        #expect(pollUntil { relay.statistics(id)?.dropped == 10 })
    }

    @Test func aFullTargetCounterNeverBlocksTheRelay() throws {
        let relay = try NotificationRelay()
        defer { relay.stop() }
        let stuck = try Pair(), stuckBlocking = try Pair(nonBlockingTarget: false), other = try Pair()
        let stuckID = try stuck.add(to: relay)
        let blockingID = try stuckBlocking.add(to: relay)
        _ = try other.add(to: relay)
        try stuck.target.signal(UInt64.max - 1)         // nobody reads VM2's side
        try stuckBlocking.target.signal(UInt64.max - 1)
        try stuck.source.signal(4)
        try stuckBlocking.source.signal(4)
        // The blocking target is checked for room: counted as coalesced, no write.
        #expect(pollUntil { relay.statistics(blockingID)?.coalesced ?? 0 >= 4 })
        // Other links still flow: the relay thread is not blocked.
        try other.source.signal(3)
        var seen: UInt64 = 0
        #expect(pollUntil { seen += drain(other.target); return seen >= 1 })
        // A full counter already holds a wakeup: nothing is added to it, and
        // once VM2 drains it the next kick arrives.
        #expect(pollUntil { relay.statistics(stuckID)?.coalesced ?? 0 >= 4 })
        #expect(drain(stuck.target) == UInt64.max - 1)
        try stuck.source.signal(2)
        #expect(pollUntil { drain(stuck.target) == 1 })
    }

    /// Issue 20, hole 7: the eventfds a link writes to and reads from are
    /// file descriptions shared with a peer, which can clear `O_NONBLOCK` on
    /// them after the link was made and fill its counter. The relay writes 1
    /// (never the value it read, which may not fit), never blocks on such a
    /// target (not the relay thread, not an io-wq worker), keeps relaying
    /// once the peer drains, and removing the link and stopping the relay
    /// return even while a notification waits for the full counter.
    @Test(arguments: [NotificationMode.relay, .relaySQPoll])
    func aPeerThatMakesItsEventfdsBlockingAndFillsThemNeverBlocksTheRelay(mode: NotificationMode) throws {
        let before = settledOpenFileDescriptorCount()
        do {
            let relay = try NotificationRelay(mode: mode)
            let call = try Pair()   // VM2's doorbell → VM1's call eventfd (the target is VM1's)
            let kick = try Pair()   // VM1's kick eventfd (the source is VM1's) → VM2
            let other = try Pair()
            let callID = try call.add(to: relay)
            let kickID = try kick.add(to: relay)
            _ = try other.add(to: relay)
            // VM1 makes both of its eventfds blocking, through the fds it holds.
            try call.target.fd.setNonBlocking(false)
            try kick.source.fd.setNonBlocking(false)
            #expect(try !call.target.fd.isNonBlocking && !kick.source.fd.isNonBlocking)
            // Room for exactly one: 5 doorbells are relayed as one write of 1.
            add(0xffff_ffff_ffff_fffd, to: call.target)
            try call.source.signal(5)
            #expect(pollUntil { relay.statistics(callID)?.relayed == 1 }, "\(String(describing: relay.statistics(callID)))")
            #expect(peek(call.target) == 0xffff_ffff_ffff_fffe, "the relay wrote 1, all the counter could hold")
            // Full: what cannot be delivered is counted, and the relay goes on.
            try call.source.signal(3)
            #expect(pollUntil { relay.statistics(callID)?.notifications == 8 })
            try other.source.signal(2)
            var seen: UInt64 = 0
            #expect(pollUntil { seen += drain(other.target); return seen >= 1 }, "other links still flow")
            // VM1 fills its blocking kick fd: VM2 is notified (with 1).
            add(0xffff_ffff_ffff_fffe, to: kick.source)
            #expect(pollUntil { relay.statistics(kickID)?.notifications == 0xffff_ffff_ffff_fffe })
            #expect(pollUntil { take(kick.target) == 1 })
            add(2, to: kick.source)
            #expect(pollUntil { take(kick.target) == 1 })
            // VM1 drains its call counter: doorbells reach it again.
            #expect(take(call.target) == 0xffff_ffff_ffff_fffe, "nothing was added to a full counter")
            try call.source.signal(4)
            #expect(pollUntil { take(call.target) == 1 })
            // Full again with a doorbell waiting for room: the link's removal
            // returns with its fds closed, and so does stopping the relay.
            add(0xffff_ffff_ffff_fffe, to: call.target)
            try call.source.signal(1)
            #expect(pollUntil { relay.statistics(callID)?.notifications == 13 })
            let removal = try returnsInTime { _ = relay.remove(callID) }
            #expect(removal.returned && relay.liveLinks == 2, "the link was removed (\(relay.liveLinks) live)")
            if !removal.returned { _ = take(call.target); removal.thread.join() } // release a relay that blocked
            // VM2 does the same to its kick eventfd (it holds that file
            // description too), with a kick waiting: stopping returns.
            try kick.target.fd.setNonBlocking(false)
            _ = take(kick.target)
            add(0xffff_ffff_ffff_fffe, to: kick.target)
            let wakeups = relay.statistics(kickID)?.wakeups ?? 0
            add(1, to: kick.source)
            #expect(pollUntil { relay.statistics(kickID)?.wakeups ?? 0 > wakeups })
            #expect(relay.statistics(kickID)?.notifications == UInt64.max, "saturating")
            let stopped = try returnsInTime { relay.stop() }
            #expect(stopped.returned, "the relay stopped")
            if !stopped.returned { _ = take(kick.target); stopped.thread.join() }
            #expect(relay.liveLinks == 0)
        }
        #expect(settledOpenFileDescriptorCount() == before, "every link's fds were closed")
    }

    @Test func stoppingClosesEveryFD() throws {
        let before = settledOpenFileDescriptorCount()
        do {
            let relay = try NotificationRelay()
            let pairs = try (0..<10).map { _ in try Pair() }
            for p in pairs { _ = try p.add(to: relay) }
            try pairs[3].source.signal()
            relay.stop()
            #expect(relay.liveLinks == 0)
            #expect(throws: RelayError.self) { _ = try pairs[0].add(to: relay) }
        }
        #expect(settledOpenFileDescriptorCount() == before)
    }
}
