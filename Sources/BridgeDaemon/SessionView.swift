import BridgeCore
import VhostUser

/// How a front-end connection ended, and what it did.
public struct ConnectionSummary: Sendable, Equatable {
    public enum End: Sendable, Equatable {
        /// The front end closed the connection.
        case frontEndClosed
        /// The daemon closed it: a refused request without an ack, a broken
        /// message, a window failure.
        case closedByBridge(String)
        /// The bridge is stopping.
        case stopped
    }
    public var end: End
    public var statistics: SessionStatistics
}

/// The timings of VM2 translation requests (docs/peer-protocol.md).
public enum VhostUserConnectionTuning {
    /// How long a translation waits for VM1's IOTLB update before it is
    /// answered "timed out".
    public static let translationDeadline: Duration = .seconds(2)
    /// How long a miss stays unanswered before it is raised again.
    public static let missRetryInterval: Duration = .seconds(1)
    /// How long one whole vhost-user message from VM1 (header and payload),
    /// and one whole reply to it, may take once its first byte is there: a
    /// front end that drips a message is disconnected after this, instead
    /// of holding the bridge thread (and its watchdog heartbeat) for minutes.
    public static let messageDeadline: Duration = .seconds(2)
}

/// What a live session looks like from outside (status output, tests).
public struct SessionView: Sendable, Equatable {
    public var ackedFeatures: UInt64?
    public var protocolFeatures: ProtocolFeatures
    public var regions: Int
    public var mappings: Int
    public var mappedBytes: UInt64
    public var startedRings: [Int]
    public var enabledRings: [Int]
    public var ringLayouts: [Int: VringLayout]
    public var frozen: Bool
    /// VM1 is live-migrating: dirty-page logging is on (VM2 marks every
    /// page it writes in VM1's log).
    public var dirtyLogging: Bool
    /// The live session's counters (without its request log).
    public var statistics: SessionStatistics
    /// Relay links per started vring (relay modes): kick (VM1 → VM2) and call (VM2 → VM1).
    public var relayLinks: [Int: (kick: NotificationRelay.LinkID, call: NotificationRelay.LinkID)] = [:]
    /// Final counters of links this session already removed (stopped rings).
    public var relayRetired = (kick: RelayLinkStatistics(), call: RelayLinkStatistics())

    public static func == (a: SessionView, b: SessionView) -> Bool {
        a.ackedFeatures == b.ackedFeatures && a.protocolFeatures == b.protocolFeatures && a.regions == b.regions
            && a.mappings == b.mappings && a.mappedBytes == b.mappedBytes && a.startedRings == b.startedRings
            && a.enabledRings == b.enabledRings && a.ringLayouts == b.ringLayouts && a.dirtyLogging == b.dirtyLogging
    }

    init(_ s: BackendSession) {
        ackedFeatures = s.ackedFeatures
        protocolFeatures = s.ackedProtocolFeatures
        regions = s.regions.count
        mappings = s.addressSpace.mappings.count
        mappedBytes = s.addressSpace.mappedBytes
        startedRings = s.vrings.indices.filter { s.vrings[$0].started }
        enabledRings = s.vrings.indices.filter { s.vrings[$0].enabled }
        var layouts: [Int: VringLayout] = [:]
        for (i, v) in s.vrings.enumerated() { if let l = v.layout { layouts[i] = l } }
        ringLayouts = layouts
        frozen = s.isFrozen
        dirtyLogging = s.logging.on
        var stats = s.statistics
        stats.requestLog = []
        statistics = stats
    }
}
