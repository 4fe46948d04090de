import BridgeCore

/// What a bridge's VM2 side did (one VM2 connection at a time; summed over
/// connections since the bridge started).
public struct PeerStatistics: Sendable, Equatable {
    public var connections = 0
    public var connected = false
    public var ready = false
    public var mapsSent = 0
    public var unmapsSent = 0
    public var acks = 0
    public var revocationTimeouts = 0
    /// Connections ended for a protocol error (bad framing, a message in
    /// the wrong state, an ACK the daemon never asked for, ...).
    public var protocolErrors = 0
    /// VM2 VMMs killed (SIGKILL through their pidfd) for missing a deadline.
    public var killed = 0
    public var translationsGranted = 0
    public var translationsRefused = 0
    public var refusals: [String: Int] = [:]
    /// Longest wait for a revocation ack, in microseconds.
    public var slowestRevocationMicroseconds: UInt64 = 0
    /// Every acknowledged revocation's wait for VM2's ack.
    public var revocationLatency = LatencyHistogram()
    /// Every IOTLB message from VM1, received to answered: the window change
    /// and, for an invalidate, VM2's ack; kept here because it is mostly the
    /// round trip to VM2, and with the peer counters it outlives sessions.
    public var iotlbLatency = LatencyHistogram()
    /// VM1's answers to IOTLB misses: from the miss sent on the back-end
    /// channel to the next IOTLB update (what VM2's translations wait on
    /// VM1 for).
    public var missAnswerLatency = LatencyHistogram()
    /// Replies to VM1 that the peer thread sent the moment VM2 acknowledged
    /// the revocation they waited for (the rest the bridge thread sends).
    public var repliesSentOnAck = 0
    /// Revocation channel: WAKEs sent to a VM2 that said it sleeps, and
    /// waits for its ack that outlasted the spin and slept on the futex.
    public var channelWakes = 0
    public var channelSleeps = 0
    public init() {}

    /// A connection ended for a protocol error, counted under its rule.
    mutating func noteProtocolError(rule: String) {
        protocolErrors += 1
        refusals[rule, default: 0] += 1
    }
}
