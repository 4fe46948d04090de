import Synchronization

/// A bridge thread's proof of life: a count it moves after every loop pass
/// and after every bounded wait on a peer (a whole message read or sent, an
/// ack or ring-stop wait, a kill), which the watchdog reads.
///
/// Sendable without `@unchecked`: the only state is an `Atomic`.
public final class Heartbeat: Sendable {
    private let count = Atomic<UInt64>(0)
    public init() {}
    public func beat() { count.add(1, ordering: .relaxed) }
    public var value: UInt64 { count.load(ordering: .relaxed) }
}

/// The watchdog's verdict on bridge threads. A bridge thread may be busy for
/// a while on purpose — waiting up to its revocation deadline for VM2's ack —
/// so one missed ping proves nothing: a bridge is stuck only when it has not
/// answered for longer than its allowance (its revocation deadline plus a
/// grace period). Pure: the caller pings and passes the time.
public struct Liveness: Sendable {
    public static let grace: Duration = .seconds(5)

    /// How long a live bridge thread can go without a heartbeat: its longest
    /// single bounded wait — a whole VM1 message or reply, a whole VM2
    /// message, an ack or ring-stop wait (the revocation deadline) — then a
    /// kill's wait for the VMM to be gone, plus `grace`. Every wait on a peer
    /// is bounded and beats when it ends, so a peer that stalls or drips is
    /// cut off by its own deadline long before this: only a thread that is
    /// really stuck (a bug) is reported, and the watchdog stops pinging.
    public static func allowance(revocationDeadlineMilliseconds: Int) -> Duration {
        let vm2Message = Duration.milliseconds(max(1000, revocationDeadlineMilliseconds))
        let longest = max(VhostUserConnectionTuning.messageDeadline, vm2Message, .milliseconds(revocationDeadlineMilliseconds))
        return longest + .milliseconds(Int(killWaitMilliseconds)) + grace
    }

    /// How long a missed deadline waits for a killed VM2 VMM to be gone.
    public static let killWaitMilliseconds: Int32 = 1000
    private var lastAnswer: [String: ContinuousClock.Instant] = [:]

    public init() {}

    /// Records one round of pings (`answered[name]`) at `now`; returns the
    /// bridges silent for longer than `allowance(name)`. A bridge seen for
    /// the first time starts its clock now; one no longer listed is forgotten.
    public mutating func round(_ answered: [String: Bool], now: ContinuousClock.Instant,
                               allowance: (String) -> Duration) -> [String] {
        lastAnswer = lastAnswer.filter { answered[$0.key] != nil }
        var stuck: [String] = []
        for (name, ok) in answered.sorted(by: { $0.key < $1.key }) {
            if ok || lastAnswer[name] == nil { lastAnswer[name] = now }
            if let last = lastAnswer[name], last.duration(to: now) > allowance(name) { stuck.append(name) }
        }
        return stuck
    }
}
