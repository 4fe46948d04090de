/// When a polling device stops polling: after `spin` without work it asks
/// for kicks again and sleeps on them. `spin` zero is a purely
/// notification-driven device (it never polls an empty ring).
public struct PollPolicy: Sendable, Equatable {
    public var spin: Duration
    private var idleSince: ContinuousClock.Instant?

    public init(spin: Duration) { self.spin = spin }

    /// A pass found work: the spin budget starts again.
    public mutating func noteWork() { idleSince = nil }

    /// A pass found nothing: whether to keep polling (true) or sleep.
    public mutating func keepPolling(now: ContinuousClock.Instant) -> Bool {
        guard spin > .zero else { return false }
        guard let since = idleSince else { idleSince = now; return true }
        return since.duration(to: now) < spin
    }
}
