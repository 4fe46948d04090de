import BridgeCore
import LinuxIO
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The relay thread's private state.
final class RelayEngine {
    static let controlData: UInt64 = 0
    enum Op: UInt64 { case read = 1, write = 2, cancel = 3 }

    final class Link: CountedLink {
        let id: NotificationRelay.LinkID
        var source: OwnedFileDescriptor
        var target: OwnedFileDescriptor?
        var targetNonBlocking = false
        let buffer: UnsafeMutablePointer<UInt64>
        var pending = 0
        var removing = false
        var pendingTarget: OwnedFileDescriptor??
        /// Counters since the last flush to the shared statistics.
        var delta = RelayLinkStatistics()
        var dirty = false
        init(id: NotificationRelay.LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?) {
            self.id = id
            self.source = source
            self.target = target
            buffer = .allocate(capacity: 1)
            buffer.initialize(to: 0)
            targetNonBlocking = (try? target?.isNonBlocking) ?? false
        }
        deinit { buffer.deallocate() }
        var linked: Bool { target != nil && targetNonBlocking }
    }

    let ring: URing
    unowned let relay: NotificationRelay
    var links: [UInt32: Link] = [:]
    var controlBuffer = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    var running = true
    /// Links whose `delta` changed in the current batch.
    var batch = StatisticsBatch<Link>()

    @inline(__always) func touch(_ link: Link) { batch.touch(link) }

    func flushStatistics() { batch.flush(to: relay) }

    init(ring: URing, relay: NotificationRelay) {
        self.ring = ring
        self.relay = relay
    }

    deinit { controlBuffer.deallocate() }

    static func userData(_ id: UInt32, _ op: Op) -> UInt64 { UInt64(id) << 8 | op.rawValue }

    /// Prepares `count` SQEs as one unit: submits what is queued first when
    /// the SQ has less room, so a linked read→write pair is never split
    /// across submissions (a lone linked read would lose the value it reads).
    func prepare(_ count: UInt32 = 1, _ body: () throws(URingError) -> Void) {
        if ring.submissionSpaceLeft < count { _ = try? ring.submit() }
        do {
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
        if let target = link.target, link.targetNonBlocking {
            prepare(2) { () throws(URingError) in
                try ring.prepareRead(fd: link.source.rawValue, buffer: UnsafeMutableRawPointer(link.buffer), length: 8,
                                     userData: Self.userData(id, .read), linkNext: true)
                try ring.prepareWrite(fd: target.rawValue, buffer: UnsafeRawPointer(link.buffer), length: 8,
                                      userData: Self.userData(id, .write))
            }
            link.pending += 2
        } else {
            prepare { () throws(URingError) in
                try ring.prepareRead(fd: link.source.rawValue, buffer: UnsafeMutableRawPointer(link.buffer), length: 8,
                                     userData: Self.userData(id, .read))
            }
            link.pending += 1
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
                        while n == 0, clock.now < until { n = ring.reap { handle($0) } }
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
            relay.cpu.store(ThreadCPUClock.nanoseconds(), ordering: .relaxed)
        }
        // Cancel everything and wait for the completions so no buffer is freed
        // under an in-flight operation, then close every fd exactly once.
        for link in links.values where link.pending > 0 {
            prepare { () throws(URingError) in try ring.prepareCancel(target: Self.userData(link.id.rawValue, .read), userData: Self.userData(link.id.rawValue, .cancel)) }
        }
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

    func close(_ link: Link) {
        flushStatistics()
        try? link.source.close()
        try? link.target?.close()
        if case .some(let t) = link.pendingTarget { try? t?.close() }
        relay.finished(link.id)
    }

    func handle(_ c: URingCompletion) {
        do {
            if c.userData == Self.controlData {
                for command in relay.drainControl() { apply(command) }
                if running { armControl() }
                return
            }
            let id = UInt32(c.userData >> 8)
            guard let link = links[id], let op = Op(rawValue: c.userData & 0xff) else { return }
            if op == .cancel { return }
            link.pending -= 1
            touch(link)
            switch op {
            case .read:
                if c.result == 8 {
                    let value = link.buffer.pointee
                    link.delta.notifications.addSaturating(value)
                    link.delta.wakeups.addSaturating(1)
                    link.delta.coalesced.addSaturating(value > 0 ? value - 1 : 0)
                    if !link.removing, link.pendingTarget == nil, !(link.target != nil && link.targetNonBlocking) {
                        deliverBySyscall(link, value)
                    }
                } else if let e = c.errno, e != .canceled, e != .resourceTemporarilyUnavailable {
                    link.delta.errors.addSaturating(1)
                }
            case .write:
                if c.result == 8 {
                    link.delta.relayed.addSaturating(1)
                } else if let e = c.errno {
                    if e == .canceled {
                        // The read failed or was cancelled; nothing was read.
                    } else if e == .resourceTemporarilyUnavailable {
                        link.delta.coalesced.addSaturating(link.buffer.pointee) // counter full: the reader has a wakeup pending
                    } else {
                        link.delta.dropped.addSaturating(link.buffer.pointee)
                        link.delta.errors.addSaturating(1)
                    }
                }
            case .cancel:
                break
            }
            if link.pending == 0 { settle(link, lastError: c.errno) }
        }
    }

    /// A link with nothing in flight: remove it, apply a retarget, or re-arm.
    func settle(_ link: Link, lastError: Errno?) {
        if link.removing {
            links[link.id.rawValue] = nil
            close(link)
            return
        }
        if case .some(let newTarget) = link.pendingTarget {
            try? link.target?.close()
            link.target = newTarget
            link.targetNonBlocking = (try? newTarget?.isNonBlocking) ?? false
            link.pendingTarget = nil
            relay.retargeted(link.id)
        }
        // A source that broke (EBADF, EINVAL) is not re-armed in a busy loop:
        // the link waits for a retarget or removal; its counters show errors.
        if let e = lastError, e == .badFileDescriptor || e == .invalidArgument { return }
        if running { arm(link) }
    }

    func deliverBySyscall(_ link: Link, _ value: UInt64) {
        touch(link)
        guard let target = link.target else {
            link.delta.dropped.addSaturating(value)
            return
        }
        // A blocking target must never block the relay: write only when the
        // counter has room (POLLOUT); a full counter already has a wakeup pending.
        guard (try? Poll.writable(target.rawValue)) == true else {
            link.delta.coalesced.addSaturating(value)
            return
        }
        switch EventFD.add(value, to: target.rawValue) {
        case .added:
            link.delta.relayed.addSaturating(1)
        case .full:
            link.delta.coalesced.addSaturating(value)
        case .failed:
            link.delta.dropped.addSaturating(value)
            link.delta.errors.addSaturating(1)
        }
    }

    func apply(_ command: NotificationRelay.Command) {
        switch command {
        case .add(let id, let source, let target):
            let link = Link(id: id, source: source, target: target)
            if relay.forceLinkedWrites, target != nil { link.targetNonBlocking = true }
            links[id.rawValue] = link
            arm(link)
        case .retarget(let id, let target):
            guard let link = links[id.rawValue] else { try? target?.close(); relay.retargeted(id); return }
            if case .some(let old) = link.pendingTarget { try? old?.close() }
            link.pendingTarget = .some(target)
            if link.pending > 0 {
                prepare { () throws(URingError) in try ring.prepareCancel(target: Self.userData(id.rawValue, .read), userData: Self.userData(id.rawValue, .cancel)) }
            } else {
                settle(link, lastError: nil)
            }
        case .remove(let id):
            guard let link = links[id.rawValue] else { return }
            link.removing = true
            if link.pending > 0 {
                prepare { () throws(URingError) in try ring.prepareCancel(target: Self.userData(id.rawValue, .read), userData: Self.userData(id.rawValue, .cancel)) }
            } else {
                settle(link, lastError: nil)
            }
        case .stop:
            running = false
        }
    }
}
