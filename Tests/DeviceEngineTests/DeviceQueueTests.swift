import BridgeCore
import DeviceEngine
import LinuxIO
import Testing

@Suite("DeviceQueue") struct DeviceQueueTests {
    /// Serves a TX burst; returns what the frames looked like, how it ended and whether a call is due.
    func drain(_ f: inout RingFixture, _ q: inout DeviceQueue, budget: Int = 64)
        -> (frames: [[UInt8]], end: BurstEnd?, call: Bool, counters: QueueCounters) {
        var frames: [[UInt8]] = []
        var counters = QueueCounters()
        var call = false
        var scratch = Segments()
        let end = f.memory.burst { a in
            q.transmitBurst(&a, budget: budget, scratch: &scratch, counters: &counters, call: &call) { _, frame in
                frames.append(frame.bytes)
            }
        }
        return (frames, end, call, counters)
    }

    @Test func aBurstReadsFramesInPlaceAndPublishesOnce() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        for i in 0..<5 { f.transmit(UInt16(i), RingFixture.frame(payload: 10 + i)) }
        let r = drain(&f, &q)
        #expect(r.frames.count == 5)
        #expect(r.frames[3] == RingFixture.frame(payload: 13))
        #expect(r.end == .drained)
        #expect(f.usedIndex == 5)
        #expect((0..<5).map { f.usedElement(UInt16($0)).id } == [0, 1, 2, 3, 4])
        #expect(r.counters.chains == 5 && r.counters.bytes == UInt64((10...14).reduce(0, +) + 5 * 14))
        #expect(r.call, "NO_INTERRUPT is clear: the driver wants a call")
    }

    @Test func theBudgetBoundsABurstAndTheRestWaits() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        for i in 0..<6 { f.transmit(UInt16(i), RingFixture.frame(payload: 1)) }
        let first = drain(&f, &q, budget: 4)
        #expect(first.frames.count == 4 && first.end == .budgetSpent && f.usedIndex == 4)
        let second = drain(&f, &q, budget: 4)
        #expect(second.frames.count == 2 && second.end == .drained && f.usedIndex == 6)
    }

    @Test func noInterruptSuppressesTheCall() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        f.poke16(1, at: f.ring.avail) // VRING_AVAIL_F_NO_INTERRUPT
        f.transmit(0, RingFixture.frame(payload: 1))
        let r = drain(&f, &q)
        #expect(r.frames.count == 1 && !r.call)
    }

    @Test func eventIndexCallsOnlyWhenUsedEventIsPassed() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: true)
        f.poke16(3, at: f.ring.usedEvent) // call when the used index passes 3
        for i in 0..<2 { f.transmit(UInt16(i), RingFixture.frame(payload: 1)) }
        #expect(!drain(&f, &q).call, "used 0 → 2 does not pass 3")
        for i in 2..<4 { f.transmit(UInt16(i), RingFixture.frame(payload: 1)) }
        #expect(drain(&f, &q).call, "used 2 → 4 passes 3")
        f.transmit(4, RingFixture.frame(payload: 1))
        #expect(!drain(&f, &q).call, "used 4 → 5 passed 3 already")
    }

    @Test func needEventIsVirtiosFormula() {
        #expect(DeviceQueue.needEvent(3, new: 4, old: 2))
        #expect(!DeviceQueue.needEvent(3, new: 3, old: 2))
        #expect(DeviceQueue.needEvent(0xffff, new: 1, old: 0xfffe), "across the wrap")
        #expect(!DeviceQueue.needEvent(10, new: 5, old: 4))
    }

    @Test func kicksAreSuppressedWhilePollingAndRequestedBeforeSleeping() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        _ = f.memory.burst { a in q.suppressKicks(&a) }
        #expect(f.peek16(f.ring.used) == 1, "VRING_USED_F_NO_NOTIFY while polling")
        let askedfalse = f.memory.burst { a in q.requestKicks(&a) }
        #expect(askedfalse == false)
        #expect(f.peek16(f.ring.used) == 0)
        // A chain that arrived while kicks were off is seen: do not sleep.
        _ = f.memory.burst { a in q.suppressKicks(&a) }
        f.transmit(0, RingFixture.frame(payload: 1))
        let askedtrue = f.memory.burst { a in q.requestKicks(&a) }
        #expect(askedtrue == true)
    }

    @Test func withEventIndexTheDeviceAsksForTheNextKickByAvailEvent() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: true)
        for i in 0..<3 { f.transmit(UInt16(i), RingFixture.frame(payload: 1)) }
        _ = drain(&f, &q)
        f.poke16(0x7777, at: f.ring.availEvent)
        _ = f.memory.burst { a in q.suppressKicks(&a) }
        #expect(f.peek16(f.ring.availEvent) == 0x7777 && f.peek16(f.ring.used) == 0, "flags are not used with EVENT_IDX")
        let askedfalse = f.memory.burst { a in q.requestKicks(&a) }
        #expect(askedfalse == false)
        #expect(f.peek16(f.ring.availEvent) == 3)
    }

    // MARK: hostile drivers

    @Test func malformedChainsAreRefusedAndCompletedEmpty() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        let buf = RingFixture.buffers
        f.setDescriptor(0, address: buf, length: 64, flags: .next, next: 1) // loop 0 → 1 → 0
        f.setDescriptor(1, address: buf, length: 64, flags: .next, next: 0)
        f.makeAvailable(0)
        f.setDescriptor(2, address: buf, length: 64, flags: .indirect)
        f.makeAvailable(2)
        f.setDescriptor(3, address: buf, length: 64, flags: .write) // device-writable in TX
        f.makeAvailable(3)
        f.setDescriptor(4, address: buf, length: 64, flags: .next, next: 200) // next past the ring
        f.makeAvailable(4)
        f.setDescriptor(5, address: RingFixture.barSize - 8, length: 64) // past the BAR
        f.makeAvailable(5)
        f.setDescriptor(6, address: UInt64.max - 8, length: 64) // wraps
        f.makeAvailable(6)
        f.setDescriptor(7, address: buf, length: 4) // shorter than the header
        f.makeAvailable(7)
        let r = drain(&f, &q)
        #expect(r.frames.isEmpty)
        #expect(r.end == .drained)
        #expect(f.usedIndex == 7, "seven chains, each completed")
        #expect((0..<7).map { f.usedElement(UInt16($0)).id } == [0, 2, 3, 4, 5, 6, 7])
        #expect((0..<7).allSatisfy { f.usedElement(UInt16($0)).length == 0 })
        let c = r.counters
        #expect(c.refused[ChainRefusal.loop.rawValue] == 1)
        #expect(c.refused[ChainRefusal.indirect.rawValue] == 1)
        #expect(c.refused[ChainRefusal.wrongDirection.rawValue] == 1)
        #expect(c.refused[ChainRefusal.nextOutOfRange.rawValue] == 1)
        #expect(c.refused[ChainRefusal.outsideBAR.rawValue] == 2)
        #expect(c.refused[ChainRefusal.tooShort.rawValue] == 1)
    }

    @Test func aHeadPastTheRingOrAnIndexTooFarAheadBreaksTheQueue() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        f.makeAvailable(9) // the ring has 8 descriptors
        guard case .stopped(.defect(let why))? = drain(&f, &q).end else { Issue.record("not a defect"); return }
        #expect(why.contains("past the ring"))
        #expect(f.usedIndex == 0)
        var g = try RingFixture()
        var p = DeviceQueue(index: 1, ring: g.ring, start: 0, eventIndex: false)
        g.poke16(9, at: g.ring.availIndex) // 9 chains in a ring of 8
        guard case .stopped(.defect(let w))? = drain(&g, &p).end else { Issue.record("not a defect"); return }
        #expect(w.contains("more than the ring holds"))
    }

    @Test func unservableRingsAreDefectsFromTheStart() {
        #expect(DeviceQueue(index: 0, ring: SplitRing(size: 6, desc: 0, avail: 0x1000, used: 0x2000), start: 0, eventIndex: false).defect != nil)
        #expect(DeviceQueue(index: 0, ring: SplitRing(size: 8, desc: 8, avail: 0x1000, used: 0x2000), start: 0, eventIndex: false).defect != nil)
        #expect(DeviceQueue(index: 0, ring: SplitRing(size: 8, desc: 0, avail: 0x1000, used: 0x2002), start: 0, eventIndex: false).defect != nil)
        #expect(DeviceQueue(index: 0, ring: SplitRing(size: 8, desc: 0, avail: UInt64.max - 1, used: 0x2000), start: 0, eventIndex: false).defect != nil)
        #expect(DeviceQueue(index: 0, ring: SplitRing(size: 8, desc: 0, avail: 0x1000, used: 0x2000), start: 0, eventIndex: true).defect == nil)
    }

    @Test func anUngrantedBufferStopsTheBurstWithoutTakingTheChain() throws {
        var f = try RingFixture(grantAll: false)
        try f.grant(0, RingFixture.buffers, .readWrite) // the ring, not the buffers
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        f.transmit(0, RingFixture.frame(payload: 20))
        let r = drain(&f, &q)
        #expect(r.end == .stopped(.fault(.missing(address: RingFixture.buffers, length: 46, access: .read))))
        #expect(q.lastAvail == 0 && f.usedIndex == 0)
        // Granted now (a translation came): the same chain is served.
        try f.grant(RingFixture.buffers, 0x1000, .read)
        #expect(drain(&f, &q).frames.count == 1)
        #expect(f.usedIndex == 1)
    }

    @Test func aRefusedTranslationRefusesThatChainOnly() throws {
        var f = try RingFixture(grantAll: false)
        try f.grant(0, RingFixture.buffers, .readWrite)
        var q = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        f.transmit(0, RingFixture.frame(payload: 20))
        _ = drain(&f, &q)
        q.refuseNextFault = true
        let r = drain(&f, &q)
        #expect(r.counters.refused[ChainRefusal.notGranted.rawValue] == 1)
        #expect(f.usedIndex == 1 && f.usedElement(0).length == 0)
        f.transmit(1, RingFixture.frame(payload: 20))
        #expect(drain(&f, &q).end == .stopped(.fault(.missing(address: RingFixture.buffers + 2048, length: 46, access: .read))),
                "the next chain faults again: the refusal was for one chain")
    }

    @Test func aReadOnlyGrantIsNotWritableAndARevocationIsSeenByTheNextBurst() throws {
        var f = try RingFixture(grantAll: false)
        try f.grant(0, RingFixture.buffers, .readWrite)
        try f.grant(RingFixture.buffers, 0x1_0000, .read)
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.postReceive(0)
        var counters = QueueCounters(), scratch = Segments()
        let frame = RingFixture.frame(payload: 30)
        let d = frame.withUnsafeBytes { bytes in
            f.memory.burst { a in q.deliver(&a, frame: bytes, mergeable: false, scratch: &scratch, counters: &counters) }
        }
        #expect(d == .stopped(.fault(.missing(address: RingFixture.buffers, length: 2048, access: .write))))
        // Revoke the ring itself: the next burst faults on the ring area.
        var t = DeviceQueue(index: 1, ring: f.ring, start: 0, eventIndex: false)
        f.memory.unmap(bus: 0, length: 0x1000)
        guard case .stopped(.fault(.missing(let at, _, _)))? = drain(&f, &t).end else { Issue.record("no fault"); return }
        #expect(at == 0)
    }

    // MARK: receive

    func deliver(_ f: inout RingFixture, _ q: inout DeviceQueue, _ frame: [UInt8], mergeable: Bool) -> (DeviceQueue.Delivery?, QueueCounters) {
        var counters = QueueCounters(), scratch = Segments()
        let d = frame.withUnsafeBytes { bytes in
            f.memory.burst { a -> DeviceQueue.Delivery in
                let d = q.deliver(&a, frame: bytes, mergeable: mergeable, scratch: &scratch, counters: &counters)
                _ = q.publish(&a)
                return d
            }
        }
        return (d, counters)
    }

    @Test func mergeableFramesSpanChainsAndSayHowMany() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        for i in 0..<4 { f.postReceive(UInt16(i), length: 100) }
        let frame = RingFixture.frame(payload: 250) // 276 bytes: 100 + 100 + 76
        let (d, _) = deliver(&f, &q, frame, mergeable: true)
        #expect(d == .delivered(chains: 3))
        #expect(f.usedIndex == 3)
        #expect([f.usedElement(0).length, f.usedElement(1).length, f.usedElement(2).length] == [100, 100, 76])
        let written = f.peek(100, at: RingFixture.buffers) + f.peek(100, at: RingFixture.buffers + 2048) + f.peek(76, at: RingFixture.buffers + 4096)
        #expect(written[10] == 3 && written[11] == 0, "num_buffers")
        #expect(Array(written[12...]) == Array(frame[12...]))
    }

    @Test func withoutRoomNothingIsTakenAndWithoutMergeableABigFrameIsRefusedWhole() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.postReceive(0, length: 100)
        let big = RingFixture.frame(payload: 250)
        #expect(deliver(&f, &q, big, mergeable: true).0 == .noRoom)
        #expect(q.lastAvail == 0 && f.usedIndex == 0)
        #expect(deliver(&f, &q, big, mergeable: false).0 == .tooLarge)
        #expect(q.lastAvail == 0 && f.usedIndex == 0)
        let small = RingFixture.frame(payload: 50)
        #expect(deliver(&f, &q, small, mergeable: false).0 == .delivered(chains: 1))
        #expect(f.usedIndex == 1 && f.usedElement(0).length == 76 && f.peek(1, at: RingFixture.buffers + 10) == [1])
    }

    @Test func anRXChainTooSmallForTheHeaderIsRefused() throws {
        var f = try RingFixture()
        var q = DeviceQueue(index: 0, ring: f.ring, start: 0, eventIndex: false)
        f.postReceive(0, length: 8)
        f.postReceive(1, length: 200)
        let (d, c) = deliver(&f, &q, RingFixture.frame(payload: 20), mergeable: false)
        #expect(d == .delivered(chains: 1))
        #expect(c.refused[ChainRefusal.tooShort.rawValue] == 1)
        #expect(f.usedElement(0).length == 0 && f.usedElement(1).length == 46)
    }
}
