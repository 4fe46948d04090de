import LinuxIO
import Logging
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// How a bridge moves vring notifications between VM1 and VM2.
public enum NotificationMode: String, Sendable, CaseIterable, Codable {
    /// io_uring relay thread (default): the daemon interposes and counts.
    case relay
    /// The same with IORING_SETUP_SQPOLL: a kernel thread polls the SQ.
    case relaySQPoll = "relay-sqpoll"
    /// VM1's eventfds are handed to VM2: zero daemon cost, no counters, and
    /// VM2 can signal VM1 directly (no interposition).
    case passthrough
}

/// Per-link counters.
public struct RelayLinkStatistics: Sendable, Equatable {
    /// Sum of the eventfd values read from the source (every kick counts).
    public var notifications: UInt64 = 0
    /// Reads that returned something (wakeups of the relay for this link).
    public var wakeups: UInt64 = 0
    /// Writes delivered to the target.
    public var relayed: UInt64 = 0
    /// Notifications folded into an earlier wakeup (eventfd counter semantics).
    public var coalesced: UInt64 = 0
    /// Notifications that found no target (the other side is gone) or whose
    /// write failed.
    public var dropped: UInt64 = 0
    /// CQE errors seen (other than cancellation).
    public var errors: UInt64 = 0

    public init() {}

    public mutating func add(_ o: RelayLinkStatistics) {
        notifications += o.notifications; wakeups += o.wakeups; relayed += o.relayed
        coalesced += o.coalesced; dropped += o.dropped; errors += o.errors
    }
}

public enum RelayError: Error, CustomStringConvertible {
    case ring(URingError)
    case system(SystemCallError)
    case stopped
    case setup(String)
    public var description: String {
        switch self {
        case .setup(let s): "notification relay could not start: \(s)"
        case .ring(let e): "notification relay: \(e)"
        case .system(let e): "notification relay: \(e)"
        case .stopped: "notification relay is stopped"
        }
    }
}

/// Relays eventfd notifications on its own thread with io_uring: for each
/// link, an armed read on the source eventfd, linked (IOSQE_IO_LINK) to a
/// write of the same 8 bytes to the target when the target is non-blocking
/// (a write to a blocking eventfd would be punted to io-wq workers: ~7×
/// slower); otherwise the read completes and a plain write(2) delivers, after
/// a zero-timeout POLLOUT check so a full counter can never block the thread.
/// The value read is the value written: kicks in = kicks out. A non-blocking
/// target whose counter is full keeps its write armed until the reader drains
/// it (eventfd semantics: the wakeup is already pending); other links go on.
/// Completions are reaped in batches and all re-arms go out in one submit.
///
/// Links are added, retargeted and removed while it runs (commands through a
/// control eventfd the ring also reads). A removed link's fds are closed
/// exactly once, after its in-flight operations completed.
///
/// Sendable without `@unchecked`: shared state is behind a `Mutex`; the ring
/// and the buffers belong to the relay thread.
public final class NotificationRelay: Sendable {
    public struct LinkID: Hashable, Sendable, Comparable, CustomStringConvertible {
        public let rawValue: UInt32
        public static func < (a: LinkID, b: LinkID) -> Bool { a.rawValue < b.rawValue }
        public var description: String { "link#\(rawValue)" }
    }

    enum Command: Sendable {
        case add(LinkID, source: OwnedFileDescriptor, target: OwnedFileDescriptor?)
        case retarget(LinkID, target: OwnedFileDescriptor?)
        case remove(LinkID)
        case stop
    }

    private struct Shared {
        var commands: [Command] = []
        var statistics: [LinkID: RelayLinkStatistics] = [:]
        var live: Set<LinkID> = []
        var retargeting: Set<LinkID> = []
        var nextID: UInt32 = 1
        var stopped = false
        var started = false
        var failure: String?
    }

    public let mode: NotificationMode
    public let busyPollMicroseconds: Int
    /// Benchmark only: link writes to *blocking* targets too, to show the
    /// io-wq slow path the relay normally avoids.
    public let forceLinkedWrites: Bool
    private let shared = Mutex(Shared())
    private let control: EventFD
    private let changed: EventFD
    private let thread = Mutex<JoinableThread?>(nil)
    private let logger: Logger

    /// Starts the relay thread. `busyPollMicroseconds` > 0 spins that long
    /// reaping completions before it blocks (lower latency, more CPU).
    public init(mode: NotificationMode = .relay, busyPollMicroseconds: Int = 0, entries: UInt32 = 1024,
                logger: Logger = Logger(label: "relay"), forceLinkedWrites: Bool = false) throws(RelayError) {
        precondition(mode != .passthrough, "passthrough needs no relay")
        self.mode = mode
        self.forceLinkedWrites = forceLinkedWrites
        self.busyPollMicroseconds = max(0, min(busyPollMicroseconds, 10_000))
        self.logger = logger
        do {
            control = try EventFD()
            changed = try EventFD()
        } catch { throw .system(error) }
        // The ring is created on the relay thread (it belongs to that thread);
        // wait for it to be up or to fail.
        let sqpoll = mode == .relaySQPoll
        let t: JoinableThread
        do {
            t = try JoinableThread(name: "relay") { [self] in
                let ring: URing
                do { ring = try URing(entries: entries, sqpoll: sqpoll, singleIssuer: !sqpoll) } catch {
                    self.fail("\(error)")
                    return
                }
                self.markStarted()
                RelayEngine(ring: ring, relay: self).run()
            }
        } catch { throw .system(error) }
        thread.withLock { $0 = t }
        awaitChange(until: nil) { $0.started || $0.failure != nil }
        if let failure = shared.withLock({ $0.failure }) {
            t.join()
            thread.withLock { $0 = nil }
            throw .setup(failure)
        }
    }

    /// How long a caller waits for the relay thread to apply a change.
    static let changeDeadline: Duration = .seconds(20)

    /// Waits on the `changed` eventfd until `done` holds for the shared state
    /// or `deadline` passes (nil: no deadline). Returns whether it held.
    @discardableResult
    private func awaitChange(until deadline: ContinuousClock.Instant? = .now.advanced(by: changeDeadline),
                             _ done: (Shared) -> Bool) -> Bool {
        changed.wait(until: deadline) { shared.withLock { done($0) } ? true : nil } ?? false
    }

    fileprivate func markStarted() {
        shared.withLock { $0.started = true }
        _ = try? changed.signal()
    }

    deinit {
        stop()
    }

    /// Adds a link: every notification on `source` is relayed to `target`
    /// (nil: counted and dropped until `retarget`). Takes ownership of both.
    @discardableResult
    public func add(source: OwnedFileDescriptor, target: OwnedFileDescriptor?) throws(RelayError) -> LinkID {
        let id = try shared.withLock { s throws(RelayError) -> LinkID in
            guard !s.stopped else { throw RelayError.stopped }
            let id = LinkID(rawValue: s.nextID)
            s.nextID &+= 1
            s.live.insert(id)
            s.statistics[id] = RelayLinkStatistics()
            s.commands.append(.add(id, source: source, target: target))
            return id
        }
        _ = try? control.signal()
        return id
    }

    /// Replaces a link's target (the old one is closed); nil drops from now
    /// on. Returns once the link uses the new target.
    public func retarget(_ id: LinkID, target: OwnedFileDescriptor?) {
        let queued = shared.withLock { s -> Bool in
            guard !s.stopped, s.live.contains(id) else { return false }
            s.retargeting.insert(id)
            s.commands.append(.retarget(id, target: target))
            return true
        }
        guard queued else { try? target?.close(); return }
        _ = try? control.signal()
        if !awaitChange({ !$0.retargeting.contains(id) }) {
            logger.warning("\(id) retarget did not complete")
        }
    }

    /// Removes a link, waits (bounded) until its fds are closed, and returns
    /// its final counters (which the relay then forgets).
    @discardableResult
    public func remove(_ id: LinkID) -> RelayLinkStatistics? {
        let queued = shared.withLock { s -> Bool in
            guard !s.stopped, s.live.contains(id) else { return false }
            s.commands.append(.remove(id))
            return true
        }
        if queued {
            _ = try? control.signal()
            if !awaitChange({ !$0.live.contains(id) }) {
                logger.warning("\(id) removal did not complete")
            }
        }
        return shared.withLock { $0.statistics.removeValue(forKey: id) }
    }

    public func statistics(_ id: LinkID) -> RelayLinkStatistics? { shared.withLock { $0.statistics[id] } }
    public var liveLinks: Int { shared.withLock { $0.live.count } }
    /// CPU time the relay thread has used so far (ns), for the benchmark.
    public var threadCPUNanoseconds: UInt64 { cpu.load(ordering: .relaxed) }
    fileprivate let cpu = Atomic<UInt64>(0)
    public var failure: String? { shared.withLock { $0.failure } }

    /// Stops the thread; every link's fds are closed.
    public func stop() {
        let first = shared.withLock { s -> Bool in
            guard !s.stopped else { return false }
            s.stopped = true
            s.commands.append(.stop)
            return true
        }
        if first { _ = try? control.signal() }
        let t = thread.withLock { t -> JoinableThread? in defer { t = nil }; return t }
        t?.join()
    }

    // Engine plumbing.
    fileprivate var controlFD: Int32 { control.fd.rawValue }
    fileprivate func drainControl() -> [Command] {
        _ = try? control.read()
        return shared.withLock { s in defer { s.commands = [] }; return s.commands }
    }
    fileprivate func updateMany(_ changes: [LinkID: RelayLinkStatistics]) {
        shared.withLock { s in
            for (id, delta) in changes {
                s.statistics[id]?.add(delta)
            }
        }
    }
    fileprivate func finished(_ id: LinkID) {
        shared.withLock { _ = $0.live.remove(id); _ = $0.retargeting.remove(id) }
        _ = try? changed.signal()
    }
    fileprivate func retargeted(_ id: LinkID) {
        shared.withLock { _ = $0.retargeting.remove(id) }
        _ = try? changed.signal()
    }
    fileprivate func fail(_ text: String) {
        logger.error("notification relay failed: \(text)")
        shared.withLock { $0.failure = text; $0.stopped = true; $0.live = [] }
        _ = try? changed.signal()
    }
}

/// The relay thread's private state.
private final class RelayEngine {
    static let controlData: UInt64 = 0
    enum Op: UInt64 { case read = 1, write = 2, cancel = 3 }

    final class Link {
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
    var dirtyLinks: [Link] = []

    @inline(__always) func touch(_ link: Link) {
        if !link.dirty { link.dirty = true; dirtyLinks.append(link) }
    }

    func flushStatistics() {
        guard !dirtyLinks.isEmpty else { return }
        var changes: [NotificationRelay.LinkID: RelayLinkStatistics] = [:]
        changes.reserveCapacity(dirtyLinks.count)
        for link in dirtyLinks {
            changes[link.id] = link.delta
            link.delta = RelayLinkStatistics()
            link.dirty = false
        }
        dirtyLinks.removeAll(keepingCapacity: true)
        relay.updateMany(changes)
    }

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
                    link.delta.notifications += value
                    link.delta.wakeups += 1
                    link.delta.coalesced += value > 0 ? value - 1 : 0
                    if !link.removing, link.pendingTarget == nil, !(link.target != nil && link.targetNonBlocking) {
                        deliverBySyscall(link, value)
                    }
                } else if let e = c.errno, e != .canceled, e != .resourceTemporarilyUnavailable {
                    link.delta.errors += 1
                }
            case .write:
                if c.result == 8 {
                    link.delta.relayed += 1
                } else if let e = c.errno {
                    if e == .canceled {
                        // The read failed or was cancelled; nothing was read.
                    } else if e == .resourceTemporarilyUnavailable {
                        link.delta.coalesced += link.buffer.pointee // counter full: the reader has a wakeup pending
                    } else {
                        link.delta.dropped += link.buffer.pointee
                        link.delta.errors += 1
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
            link.delta.dropped += value
            return
        }
        // A blocking target must never block the relay: write only when the
        // counter has room (POLLOUT); a full counter already has a wakeup pending.
        guard (try? Poll.writable(target.rawValue)) == true else {
            link.delta.coalesced += value
            return
        }
        switch EventFD.add(value, to: target.rawValue) {
        case .added:
            link.delta.relayed += 1
        case .full:
            link.delta.coalesced += value
        case .failed:
            link.delta.dropped += value
            link.delta.errors += 1
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
