/// The watchdog's verdict on bridge threads. A bridge thread may be busy for
/// a while on purpose — waiting up to its revocation deadline for VM2's ack —
/// so one missed ping proves nothing: a bridge is stuck only when it has not
/// answered for longer than its allowance (its revocation deadline plus a
/// grace period). Pure: the caller pings and passes the time.
public struct Liveness: Sendable {
    public static let grace: Duration = .seconds(5)
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
