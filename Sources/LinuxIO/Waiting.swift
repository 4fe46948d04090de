import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

extension EventFD {
    /// The one way a thread here waits for another: until `done` returns a
    /// value, or `deadline` passes (nil: no deadline), waking whenever this
    /// eventfd is signalled. Returns `done`'s value, nil at the deadline.
    /// `done` is checked before the first sleep and after every wakeup; the
    /// counter is drained on wakeup, so use one eventfd per waiter.
    public func wait<T>(until deadline: ContinuousClock.Instant?, _ done: () -> T?) -> T? {
        while true {
            if let value = done() { return value }
            let now = ContinuousClock.now
            if let deadline, now >= deadline { return nil }
            _ = try? Poll.readable([fd.rawValue], timeoutMilliseconds: Poll.timeout(until: deadline, now: now))
            _ = try? read()
        }
    }

    /// Reads the eventfd counter behind the raw fd `source` without ever
    /// blocking, even on a blocking fd another process can drain first: nil
    /// when it is zero (or the read failed: then `failed` says why).
    public static func take(from source: Int32) -> (value: UInt64?, failed: Errno?) {
        var value: UInt64 = 0
        while true {
            let n = shim_read_nowait(source, &value, 8)
            if n == 8 { return (value, nil) }
            let e = Errno(rawValue: errno)
            if n < 0, e == .interrupted { continue }
            return (nil, n < 0 && e != .resourceTemporarilyUnavailable ? e : nil)
        }
    }

    /// Why `take(from:)` cannot work on this kernel (preadv2 RWF_NOWAIT on
    /// an eventfd needs Linux 5.10); nil when it can: probed on a fresh
    /// eventfd, which must answer EAGAIN when empty and the value when not.
    public static func nonBlockingReadRefusal() -> String? {
        guard let probe = try? EventFD() else { return "no eventfd to probe with" }
        let (empty, failedEmpty) = take(from: probe.fd.rawValue)
        if let failedEmpty { return "preadv2(RWF_NOWAIT) on an eventfd: \(failedEmpty)" }
        guard empty == nil, (try? probe.signal(3)) != nil else { return "preadv2(RWF_NOWAIT) read an empty eventfd" }
        return take(from: probe.fd.rawValue).value == 3 ? nil : "preadv2(RWF_NOWAIT) did not read the eventfd's value"
    }

    public enum AddResult: Equatable, Sendable { case added, full, failed(Errno) }

    /// Adds `value` to the eventfd counter behind the raw fd `target`.
    public static func add(_ value: UInt64, to target: Int32) -> AddResult {
        var v = value
        do {
            _ = try retryingInterrupts("eventfd write(\(target))") { Glibc.write(target, &v, 8) }
            return .added
        } catch {
            return error.errno == .resourceTemporarilyUnavailable ? .full : .failed(error.errno)
        }
    }
}

/// Sleeping without a wakeup source (a watchdog's period): `nanosleep`,
/// resumed after signals.
public enum Sleep {
    public static func `for`(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0 else { return }
        var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
        var remaining = timespec()
        while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
    }
}

/// Requests from any thread to one server thread, each answered: the
/// server polls `signal`, `take`s the requests and `answer`s them; a caller
/// waits for its answer until a deadline. Each request has its own eventfd,
/// so callers never steal each other's wakeups.
///
/// Sendable without `@unchecked`: all state is behind a `Locked` (pthread mutex); requests,
/// responses and eventfds are Sendable.
public final class Mailbox<Request: Sendable, Response: Sendable>: Sendable {
    public struct Ticket: Hashable, Sendable { let id: UInt64 }

    private struct Slot: Sendable {
        var response: Response?
        let wakeup: EventFD
    }
    private struct State: Sendable {
        var next: UInt64 = 1
        var requests: [(Ticket, Request)] = []
        var slots: [Ticket: Slot] = [:]
        /// After `close`: the answer every later call gets at once.
        var closedWith: Response?
    }
    private let state = Locked(State())
    /// Readable while requests wait to be taken (the server polls it).
    public let signal: EventFD

    public init() throws(SystemCallError) {
        signal = try EventFD()
    }

    /// Posts `request` and waits for its answer until `deadline`; nil when
    /// none came (a late answer is then dropped).
    public func call(_ request: Request, deadline: ContinuousClock.Instant) -> Response? {
        guard let wakeup = try? EventFD() else { return nil }
        let posted = state.withLock { s -> Ticket? in
            if s.closedWith != nil { return nil }
            let t = Ticket(id: s.next)
            s.next += 1
            s.requests.append((t, request))
            s.slots[t] = Slot(response: nil, wakeup: wakeup)
            return t
        }
        guard let ticket = posted else { return state.withLock { $0.closedWith } }
        _ = try? signal.signal()
        let response = wakeup.wait(until: deadline) { state.withLock { $0.slots[ticket]?.response } }
        state.withLock { _ = $0.slots.removeValue(forKey: ticket) }
        return response
    }

    /// Posts `request` without waiting for an answer (an event: the server
    /// takes it like a call, and its answer goes nowhere). False once closed.
    @discardableResult
    public func post(_ request: Request) -> Bool {
        let posted = state.withLock { s -> Bool in
            guard s.closedWith == nil else { return false }
            s.requests.append((Ticket(id: s.next), request))
            s.next += 1
            return true
        }
        if posted { _ = try? signal.signal() }
        return posted
    }

    /// Requests posted and not taken yet.
    public var pending: Int { state.withLock { $0.requests.count } }

    /// The server takes the waiting requests, oldest first — at most `limit`
    /// (what is left keeps `signal` raised for the next round).
    public func take(limit: Int = .max) -> [(Ticket, Request)] {
        _ = try? signal.read()
        let (taken, more) = state.withLock { s -> ([(Ticket, Request)], Bool) in
            let taken = Array(s.requests.prefix(limit))
            s.requests.removeFirst(taken.count)
            return (taken, !s.requests.isEmpty)
        }
        if more { _ = try? signal.signal() }
        return taken
    }

    /// The server is gone: every waiting caller, and every later one, gets
    /// `response` at once (no caller waits out its deadline for nobody).
    public func close(answering response: Response) {
        let wakeups = state.withLock { s -> [EventFD] in
            s.closedWith = response
            s.requests = []
            for t in s.slots.keys where s.slots[t]?.response == nil { s.slots[t]?.response = response }
            return s.slots.values.map(\.wakeup)
        }
        for w in wakeups { _ = try? w.signal() }
    }

    /// The server answers; a caller that gave up is not waiting any more.
    public func answer(_ ticket: Ticket, _ response: Response) {
        let wakeup = state.withLock { s -> EventFD? in
            guard s.slots[ticket] != nil else { return nil }
            s.slots[ticket]?.response = response
            return s.slots[ticket]?.wakeup
        }
        _ = try? wakeup?.signal()
    }
}
