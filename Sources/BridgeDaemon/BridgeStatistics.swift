import VhostUser

/// Per-bridge counters, readable from any thread.
public struct BridgeStatistics: Sendable, Equatable {
    public var sessionsServed = 0
    public var activeSession = false
    public var requests = 0
    public var iotlbUpdates = 0
    public var iotlbInvalidates = 0
    public var iotlbMissesSent = 0
    public var refusals: [String: Int] = [:]
    public var lastEnd: ConnectionSummary.End?
    /// The requests of the last finished session, in order (at most 200).
    public var lastRequestLog: [RequestCode] = []
    /// The live session, nil between sessions.
    public var session: SessionView?
    /// The VM2 side (PeerLink's counters).
    public var peer = PeerStatistics()
    // Notifications (relay modes), summed over every vring since start.
    public var notificationMode: NotificationMode = .relay
    /// What the relay runs on (nil in passthrough mode).
    public var relayEngine: NotificationRelay.Engine?
    public var kicksRelayed: UInt64 = 0
    public var callsRelayed: UInt64 = 0
    public var notificationsDropped: UInt64 = 0
    public var notificationsCoalesced: UInt64 = 0
    /// accept() on the vhost-user or peer socket failed for lack of fds or
    /// memory (each pauses accepting for a moment).
    public var acceptFailures = 0
    /// Connections refused by the sockets' allow-lists.
    public var accessDenied = 0

    /// Adds one session's counters.
    mutating func add(_ session: SessionStatistics) {
        requests += session.requests
        iotlbUpdates += session.iotlbUpdates
        iotlbInvalidates += session.iotlbInvalidates
        iotlbMissesSent += session.iotlbMissesSent
        for (rule, n) in session.refusals { refusals[rule, default: 0] += n }
    }
}
