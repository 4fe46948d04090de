import BridgeCore
import LinuxIO
import Logging
import Synchronization
import SystemPackage

/// The relay thread's private state.
///
/// Every write to a target carries the value 1 (one notification), never the
/// value read: a target's counter is the peer's, and only room for 1 is ever
/// known (POLLOUT). And no write may wait on a peer's fd, whatever its
/// `O_NONBLOCK` says now (the file description is shared with the peer, which
/// can clear it at any time): on Linux 6.18 neither `pwritev2(RWF_NOWAIT)`
/// (EOPNOTSUPP) nor an eventfd's own flags help, so a link's write is, in
/// order:
/// 1. linked to the read, with RWF_NOWAIT: done for a non-blocking target
///    with room (QEMU's eventfds, the daemon's own: the hot path); EAGAIN for
///    a full counter or a blocking file.
/// 2. After EAGAIN: a zero-timeout POLLOUT check. No room: the reader has a
///    wakeup pending (coalesced). Room: the target is blocking; the write of 1
///    goes out again without RWF_NOWAIT (io_uring runs it in an io-wq worker)
///    bounded by a linked timeout, so a worker the peer traps by refilling its
///    counter in between is interrupted (EINTR) within
///    `deliveryTimeoutMilliseconds`, and the write is retried while there is
///    room. Removal and stop cancel every operation of a link, whichever
///    state it is in, so they always complete.
final class RelayEngine {
    static let controlData: UInt64 = 0
    enum Op: UInt64 { case read = 1, write = 2, cancel = 3, deliver = 4, timeout = 5 }
    /// How long a write to a blocking target may wait (step 2 above).
    static let deliveryTimeoutMilliseconds: UInt32 = 100

    final class Link: RelayLink {
        let id: NotificationRelay.LinkID
        let source: OwnedFileDescriptor
        var target: OwnedFileDescriptor?
        var life: RelayLinkLife<OwnedFileDescriptor> = .active
        var sourceBroken = false
        var delta = RelayLinkStatistics()
        var dirty = false
        /// The value the last read took from the source.
        let buffer: UnsafeMutablePointer<UInt64>
        /// Operations in flight (a cancel's own completion is not counted).
        var pending = 0
        /// Whether the armed read has a write linked to it.
        var linked = false
        init(id: NotificationRelay.LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?) {
            self.id = id
            self.source = source
            self.target = target
            buffer = .allocate(capacity: 1)
            buffer.initialize(to: 0)
        }
        deinit { buffer.deallocate() }
    }

    let ring: URing
    unowned let relay: NotificationRelay
    var links: [UInt32: Link] = [:]
    var controlBuffer = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    /// What every write carries: one notification.
    let one = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    var running = true
    /// Links whose `delta` changed in the current batch.
    var batch = StatisticsBatch<Link>()

    init(ring: URing, relay: NotificationRelay) {
        self.ring = ring
        self.relay = relay
        one.initialize(to: 1)
    }

    deinit {
        controlBuffer.deallocate()
        one.deallocate()
    }

    static func userData(_ id: UInt32, _ op: Op) -> UInt64 { UInt64(id) << 8 | op.rawValue }

    /// Prepares `count` SQEs as one unit: makes room first when the SQ has
    /// less (submitting what is queued and, with SQPOLL, waiting for the
    /// kernel thread to take it), so a linked read→write pair is never split
    /// across submissions (a lone linked read would lose the value it reads)
    /// and a stop's cancels always go out (a read whose cancel was lost on
    /// an idle eventfd would never complete, and the stop would wait forever).
    func prepare(_ count: UInt32 = 1, _ body: () throws(URingError) -> Void) {
        do {
            try ring.makeSubmissionSpace(count)
            try body()
        } catch {
            relay.fail("\(error)")
            running = false
        }
    }

    func armControl() {
        prepare { () throws(URingError) in
            try ring.prepareRead(fd: relay.controlFD, buffer: UnsafeMutableRawPointer(controlBuffer), length: 8, userData: Self.controlData)
        }
    }

    func arm(_ link: Link) {
        let id = link.id.rawValue
        if let target = link.target {
            prepare(2) { () throws(URingError) in
                try ring.prepareRead(fd: link.source.rawValue, buffer: UnsafeMutableRawPointer(link.buffer), length: 8,
                                     userData: Self.userData(id, .read), linkNext: true)
                try ring.prepareWrite(fd: target.rawValue, buffer: UnsafeRawPointer(one), length: 8,
                                      userData: Self.userData(id, .write), noWait: true)
            }
            link.linked = true
            link.pending += 2
        } else {
            prepare { () throws(URingError) in
                try ring.prepareRead(fd: link.source.rawValue, buffer: UnsafeMutableRawPointer(link.buffer), length: 8,
                                     userData: Self.userData(id, .read))
            }
            link.linked = false
            link.pending += 1
        }
    }

    /// Cancels whatever of `link` is in flight: the read (and the write
    /// linked to it), and a bounded write to a blocking target.
    func cancel(_ link: Link) {
        let id = link.id.rawValue
        for op in [Op.read, .write, .deliver] {
            prepare { () throws(URingError) in try ring.prepareCancel(target: Self.userData(id, op), userData: Self.userData(id, .cancel)) }
        }
    }

    func run() {
        armControl()
        while running {
            do {
                if relay.busyPollMicroseconds > 0 {
                    try ring.submit()
                    if ring.reap({ handle($0) }) == 0 {
                        let clock = ContinuousClock()
                        let until = clock.now.advanced(by: .microseconds(relay.busyPollMicroseconds))
                        var n = 0
                        // Each turn asks the kernel for the completions it
                        // holds back (DEFER_TASKRUN posts them only then):
                        // reaping alone found none, so the spin only
                        // delayed every wakeup by its whole length.
                        while n == 0, clock.now < until {
                            try ring.getEvents()
                            n = ring.reap { handle($0) }
                        }
                        if n > 0 { relay.countBusyPollHit() }
                        if n == 0 {
                            try ring.submitAndWait(1)
                            ring.reap { handle($0) }
                        }
                    }
                } else {
                    try ring.submitAndWait(1)
                    ring.reap { handle($0) }
                }
            } catch {
                relay.fail("\(error)")
                break
            }
            flushStatistics()
        }
        // Cancel everything and wait for the completions so no buffer is freed
        // under an in-flight operation, then close every fd exactly once. No
        // operation can wait on a peer: every one is cancellable (a write
        // blocked in an io-wq worker is interrupted), and the bounded writes
        // end on their own.
        for link in links.values where link.pending > 0 { cancel(link) }
        var guardRounds = 0
        while links.values.contains(where: { $0.pending > 0 }), guardRounds < 1000 {
            guardRounds += 1
            guard let batch = try? ring.waitAndReap() else { break }
            for c in batch where c.userData != Self.controlData {
                if let link = links[UInt32(c.userData >> 8)], c.userData & 0xff != Op.cancel.rawValue { link.pending -= 1 }
            }
        }
        for link in links.values { close(link) }
        links = [:]
    }

    func handle(_ c: URingCompletion) {
        if c.userData == Self.controlData {
            for command in relay.drainControl() { apply(command) }
            if running { armControl() }
            return
        }
        let id = UInt32(c.userData >> 8)
        guard let link = links[id], let op = Op(rawValue: c.userData & 0xff) else { return }
        if op == .cancel { return }
        link.pending -= 1
        batch.touch(link)
        let value = link.buffer.pointee
        switch op {
        case .read:
            if c.result == 8 {
                count(.took(value), on: link)
                // No write was linked: there was no target when it was armed.
                if !link.linked, link.life.isActive { count(.dropped(value), on: link) }
            } else if let e = c.errno, e != .canceled, e != .resourceTemporarilyUnavailable {
                count(.sourceFailed, on: link)
                if e == .badFileDescriptor || e == .invalidArgument { link.sourceBroken = true }
            }
        case .write:
            if c.result == 8 {
                count(.relayed, on: link)
            } else if let e = c.errno {
                if e == .canceled {
                    // The read failed or was cancelled; nothing was read.
                } else if e == .resourceTemporarilyUnavailable || e == .notSupported {
                    deliverWithoutNoWait(link, value)
                } else {
                    count(.writeFailed(dropping: value), on: link)
                }
            }
        case .deliver:
            if c.result == 8 {
                count(.relayed, on: link)
            } else if let e = c.errno {
                if e == .resourceTemporarilyUnavailable {
                    count(.coalesced(value), on: link) // a non-blocking target filled up meanwhile
                } else if e == .canceled || e == .interrupted {
                    // Timed out (the counter filled up between the check and
                    // the write): retried while there is room. Cancelled by a
                    // removal, retarget or stop: dropped.
                    deliverWithoutNoWait(link, value)
                } else {
                    count(.writeFailed(dropping: value), on: link)
                }
            }
        case .timeout, .cancel:
            break
        }
        if link.pending == 0 { settle(link) }
    }

    /// The RWF_NOWAIT write was refused: a full counter (the reader has a
    /// wakeup pending) or a blocking file (the peer cleared `O_NONBLOCK`).
    /// POLLOUT tells them apart; with room, one bounded write of 1.
    func deliverWithoutNoWait(_ link: Link, _ value: UInt64) {
        guard running else {
            count(.dropped(value), on: link)
            return
        }
        guard let target = writableTarget(of: link, for: value) else { return }
        let id = link.id.rawValue
        prepare(2) { () throws(URingError) in
            try ring.prepareWrite(fd: target.rawValue, buffer: UnsafeRawPointer(one), length: 8,
                                  userData: Self.userData(id, .deliver), linkNext: true)
            try ring.prepareLinkTimeout(milliseconds: Self.deliveryTimeoutMilliseconds, userData: Self.userData(id, .timeout))
        }
        link.pending += 2
    }
}

/// The shared link bookkeeping (`RelayLinkEngine`): a link has operations in
/// flight until every completion of it came back; a retarget or removal
/// cancels them, and a settled link is re-armed.
extension RelayEngine: RelayLinkEngine {
    func makeLink(id: NotificationRelay.LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?) -> Link {
        Link(id: id, source: source, target: target)
    }
    func watch(_ link: Link) { arm(link) }
    func hasInFlight(_ link: Link) -> Bool { link.pending > 0 }
    func cancelInFlight(_ link: Link) { cancel(link) }
    func resume(_ link: Link) { arm(link) }
    func unwatch(_ link: Link) {}
}
