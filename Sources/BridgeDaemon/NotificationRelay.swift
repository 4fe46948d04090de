import BridgeCore
import LinuxIO
import Logging
import Synchronization
import SystemPackage

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
    /// Writes delivered to the target (each carries the value 1: one wakeup).
    public var relayed: UInt64 = 0
    /// Notifications folded into an earlier wakeup (eventfd counter semantics).
    public var coalesced: UInt64 = 0
    /// Notifications that found no target (the other side is gone) or whose
    /// write failed.
    public var dropped: UInt64 = 0
    /// CQE errors seen (other than cancellation).
    public var errors: UInt64 = 0

    public init() {}

    /// Saturating: the counts come from eventfd values a peer chooses.
    public mutating func add(_ o: RelayLinkStatistics) {
        notifications.addSaturating(o.notifications); wakeups.addSaturating(o.wakeups); relayed.addSaturating(o.relayed)
        coalesced.addSaturating(o.coalesced); dropped.addSaturating(o.dropped); errors.addSaturating(o.errors)
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
/// write of the value 1 to the target with RWF_NOWAIT. Every write carries 1
/// (one notification), never the value read: the target's counter belongs to
/// a peer and only room for 1 is ever known. No write waits on a peer's fd
/// whatever its `O_NONBLOCK` (the peer shares the file description and can
/// clear it at any time): a refused RWF_NOWAIT write is a full counter (the
/// reader has a wakeup pending: coalesced) or a blocking target, which gets
/// one write of 1 bounded by a linked timeout (see `RelayEngine`). Counted:
/// notifications = the sum of the values read. Completions are reaped in
/// batches and all re-arms go out in one submit.
///
/// Links are added, retargeted and removed while it runs (commands through a
/// control eventfd the ring also reads). A removed link's fds are closed
/// exactly once, after its in-flight operations completed.
///
/// Sendable without `@unchecked`: shared state is behind a `Locked` (pthread mutex); the ring
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
        var engine: Engine = .ioUring
        var failure: String?
    }

    /// What moves the notifications: io_uring, or epoll when io_uring is
    /// not available to this process.
    public enum Engine: String, Sendable {
        case ioUring = "io_uring"
        case ioUringSQPoll = "io_uring-sqpoll"
        case epoll
    }

    /// One warning per process, not one per bridge, when io_uring is missing.
    private static let warnedNoIOURing = Atomic<Bool>(false)

    public let mode: NotificationMode
    public let busyPollMicroseconds: Int
    private let shared = Locked(Shared())
    private let control: EventFD
    private let changed: EventFD
    private let thread = Locked<JoinableThread?>(nil)
    private let logger: Logger

    /// The io_uring size for a relay of `vrings` vrings: the smallest power
    /// of two (32 to 1024) with room for what its links can ask at once.
    /// Two links per vring (kick and call); a link has at most two
    /// operations armed (a read and its linked write, or a bounded write and
    /// its timeout) and, when it is removed or the relay stops, three
    /// cancels. So the submission queue holds a stop's cancels for every
    /// link plus a batch of re-arms (3 × links + 8), and the completion
    /// queue (twice the entries) every completion those can produce
    /// (5 × links + the control read). The ring is memory the kernel pins for
    /// the process (about 100 KiB at 1024 entries, 16 KiB at 128: the
    /// default 8 queue pairs), so it is sized to the bridge rather than to
    /// the largest one. Beyond the cap (from 86 queue pairs) it stays
    /// correct, only slower: `prepare` makes room before every unit (with
    /// SQPOLL, waiting for the kernel thread), and the kernel keeps
    /// overflowing completions until they are reaped.
    public static func ringEntries(vrings: Int) -> UInt32 {
        let links = 2 * max(0, min(vrings, 4096))
        let submissions = 3 * links + 8
        let completions = 5 * links + 1
        var entries: UInt32 = 32
        while (Int(entries) < submissions || 2 * Int(entries) < completions) && entries < 1024 { entries <<= 1 }
        return entries
    }

    /// Starts the relay thread. `busyPollMicroseconds` > 0 spins that long
    /// reaping completions before it blocks (lower latency, more CPU).
    /// `entries`: the io_uring's size (`ringEntries(vrings:)`).
    /// `cpus`: pin the relay thread there (and bind the SQPOLL thread to the
    /// first); a pinning the kernel refuses fails the relay, with the reason.
    public init(mode: NotificationMode = .relay, busyPollMicroseconds: Int = 0,
                entries: UInt32 = ringEntries(vrings: 16), cpus: [Int] = [],
                logger: Logger = Logger(label: "relay")) throws(RelayError) {
        precondition(mode != .passthrough, "passthrough needs no relay")
        self.mode = mode
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
                // io_uring with SQPOLL if asked, else plain; if the kernel or a
                // seccomp policy refuses io_uring, epoll: slower, never a
                // failed bridge.
                // With SQPOLL and two or more CPUs, the SQPOLL thread gets the
                // last and the relay thread the others: sharing one CPU, the
                // SQ thread's idle spin would delay the relay.
                let sqCPU = sqpoll ? cpus.last : nil
                let relayCPUs = sqpoll && cpus.count > 1 ? Array(cpus.dropLast()) : cpus
                if sqpoll && cpus.count == 1 {
                    self.logger.warning("cpu-affinity \(cpus): the relay and SQPOLL threads share one CPU; give two for relay-sqpoll")
                }
                if !relayCPUs.isEmpty {
                    do { try CPUAffinity.pinCallingThread(to: relayCPUs) } catch {
                        self.fail("cpu-affinity \(cpus): \(error)")
                        return
                    }
                }
                var ring: URing?
                var refusal: URingError?
                if sqpoll {
                    do { ring = try URing(entries: entries, sqpoll: true, singleIssuer: false, sqpollCPU: sqCPU) } catch {
                        self.logger.warning("io_uring SQPOLL is not available (\(error)): relaying without it")
                    }
                }
                if ring == nil {
                    do throws(URingError) { ring = try URing(entries: entries, sqpoll: false, singleIssuer: true) } catch { refusal = error }
                }
                if let ring {
                    self.markStarted(ring.sqpoll ? .ioUringSQPoll : .ioUring)
                    RelayEngine(ring: ring, relay: self).run()
                    return
                }
                // Only "io_uring is not for this process" falls back (ENOSYS:
                // not built in; EPERM/EACCES: disabled by sysctl or seccomp).
                // Anything else (out of memory or fds) is a failure to report.
                guard let refusal, case .system(let e) = refusal,
                      [Errno.noFunction, Errno.notPermitted, Errno.permissionDenied].contains(e.errno) else {
                    self.fail("\(refusal.map { "\($0)" } ?? "io_uring setup failed")")
                    return
                }
                // The epoll engine reads shared eventfds with RWF_NOWAIT
                // (Linux 5.10 and later); without it, fail with the reason
                // rather than lose notifications.
                if let unsupported = EventFD.nonBlockingReadRefusal() {
                    self.fail("io_uring is not available (\(e)) and the epoll fallback cannot read eventfds without blocking: \(unsupported)")
                    return
                }
                if !Self.warnedNoIOURing.exchange(true, ordering: .relaxed) {
                    self.logger.warning("io_uring is not available (\(e)): vring notifications are relayed with epoll instead (slower, same counters); this is logged once")
                }
                let epoll: Epoll
                do { epoll = try Epoll() } catch {
                    self.fail("epoll: \(error)")
                    return
                }
                self.markStarted(.epoll)
                EpollRelayEngine(epoll: epoll, relay: self).run()
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

    /// The engine the relay thread runs.
    public var engine: Engine { shared.withLock { $0.engine } }

    func markStarted(_ engine: Engine) {
        shared.withLock { $0.started = true; $0.engine = engine }
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
    /// CPU time the relay thread has used so far (ns), for the benchmark:
    /// read from its clock when asked, never by the relay loop; 0 once stopped.
    public var threadCPUNanoseconds: UInt64 { thread.withLock { $0?.cpuTimeNanoseconds } ?? 0 }
    public var failure: String? { shared.withLock { $0.failure } }

    /// Busy polling: how many times a spin found completions before its
    /// time ran out (the relay did not go to sleep for them).
    public var busyPollHits: Int { busyPollHitCount.load(ordering: .relaxed) }
    private let busyPollHitCount = Atomic<Int>(0)
    func countBusyPollHit() { busyPollHitCount.add(1, ordering: .relaxed) }

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
    var controlFD: Int32 { control.fd.rawValue }
    func drainControl() -> [Command] {
        _ = try? control.read()
        return shared.withLock { s in defer { s.commands = [] }; return s.commands }
    }
    func updateMany(_ changes: [LinkID: RelayLinkStatistics]) {
        shared.withLock { s in
            for (id, delta) in changes {
                s.statistics[id]?.add(delta)
            }
        }
    }
    func finished(_ id: LinkID) {
        shared.withLock { _ = $0.live.remove(id); _ = $0.retargeting.remove(id) }
        _ = try? changed.signal()
    }
    func retargeted(_ id: LinkID) {
        shared.withLock { _ = $0.retargeting.remove(id) }
        _ = try? changed.signal()
    }
    func fail(_ text: String) {
        logger.error("notification relay failed: \(text)")
        shared.withLock { $0.failure = text; $0.stopped = true; $0.live = [] }
        _ = try? changed.signal()
    }
}
