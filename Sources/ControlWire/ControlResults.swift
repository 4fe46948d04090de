/// The results of the control commands, as the wire carries them (keys
/// are the property names, sorted on encoding). The daemon encodes them;
/// clients decode them.

/// `status`.
public struct DaemonStatus: Codable, Sendable, Equatable {
    public var version: Int
    public var uptimeSeconds: Double
    public var bridges: Int
    public var vm1Sessions: Int
    public var vm2Connected: Int
    public var logLevel: String
    public var controlSocket: String
    public var pid: Int
    public var createdBridges: [String]
    /// The state file of created bridges; empty without one.
    public var stateFile: String
    /// Empty when nothing went wrong.
    public var lastError: String
    public var buildVersion: String

    public init(version: Int, uptimeSeconds: Double, bridges: Int, vm1Sessions: Int, vm2Connected: Int, logLevel: String,
                controlSocket: String, pid: Int, createdBridges: [String], stateFile: String, lastError: String, buildVersion: String) {
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.bridges = bridges
        self.vm1Sessions = vm1Sessions
        self.vm2Connected = vm2Connected
        self.logLevel = logLevel
        self.controlSocket = controlSocket
        self.pid = pid
        self.createdBridges = createdBridges
        self.stateFile = stateFile
        self.lastError = lastError
        self.buildVersion = buildVersion
    }
}

/// One row of `list`.
public struct BridgeSummary: Codable, Sendable, Equatable {
    public var name: String
    public var mode: String
    public var barSize: UInt64
    public var vhostUserSocket: String
    /// Empty without a VM2 socket.
    public var peerSocket: String
    public var vm2: String
    public var vm1Connected: Bool
    public var vm2Connected: Bool
    public var mappings: Int
    public var bytesMapped: UInt64

    public init(name: String, mode: String, barSize: UInt64, vhostUserSocket: String, peerSocket: String, vm2: String,
                vm1Connected: Bool, vm2Connected: Bool, mappings: Int, bytesMapped: UInt64) {
        self.name = name
        self.mode = mode
        self.barSize = barSize
        self.vhostUserSocket = vhostUserSocket
        self.peerSocket = peerSocket
        self.vm2 = vm2
        self.vm1Connected = vm1Connected
        self.vm2Connected = vm2Connected
        self.mappings = mappings
        self.bytesMapped = bytesMapped
    }
}

/// One bridge's counters: `stats` (one or every bridge) and the top level of `show`.
public struct BridgeCounters: Codable, Sendable, Equatable {
    public var name: String
    public var sessionsServed = 0
    public var vm1Connected = false
    public var requests = 0
    public var iotlbUpdates = 0
    public var iotlbInvalidates = 0
    public var iotlbMisses = 0
    /// Refused VM1 requests, by rule.
    public var refusals: [String: Int] = [:]
    public var vm2Connected = false
    public var vm2Connections = 0
    public var mapsSent = 0
    public var unmapsSent = 0
    public var revocationTimeouts = 0
    public var vm2ProtocolErrors = 0
    public var acceptFailures = 0
    public var slowestRevocationMicroseconds: UInt64 = 0
    public var translationsGranted = 0
    public var translationsRefused = 0
    /// Refused VM2 requests, by rule.
    public var vm2Refusals: [String: Int] = [:]
    public var notifications = ""
    /// Empty in passthrough mode.
    public var relayEngine = ""
    public var kicksRelayed: UInt64 = 0
    public var callsRelayed: UInt64 = 0
    public var notificationsDropped: UInt64 = 0
    public var notificationsCoalesced: UInt64 = 0
    public var mappings = 0
    public var bytesMapped: UInt64 = 0

    public init(name: String) { self.name = name }
}

/// `show`: the counters, the bridge's settings and its live session.
public struct BridgeDetails: Codable, Sendable, Equatable {
    public var counters: BridgeCounters
    public var config: Settings
    /// Absent between sessions.
    public var session: Session?

    public init(counters: BridgeCounters, config: Settings, session: Session?) {
        self.counters = counters
        self.config = config
        self.session = session
    }

    public struct Settings: Codable, Sendable, Equatable {
        public var barSize: UInt64
        public var mode: String
        /// Empty without one.
        public var dmaWindow: String
        public var staticWindows: [String]
        public var notifications: String
        public var revocationDeadlineMs: Int
        public var maxMappings: Int
        public var vhostUserSocket: String
        public var peerSocket: String
        public var vm2: String
        public var client: Bool
        public var cpuAffinity: [Int]

        public init(barSize: UInt64, mode: String, dmaWindow: String, staticWindows: [String], notifications: String,
                    revocationDeadlineMs: Int, maxMappings: Int, vhostUserSocket: String, peerSocket: String, vm2: String,
                    client: Bool, cpuAffinity: [Int]) {
            self.barSize = barSize
            self.mode = mode
            self.dmaWindow = dmaWindow
            self.staticWindows = staticWindows
            self.notifications = notifications
            self.revocationDeadlineMs = revocationDeadlineMs
            self.maxMappings = maxMappings
            self.vhostUserSocket = vhostUserSocket
            self.peerSocket = peerSocket
            self.vm2 = vm2
            self.client = client
            self.cpuAffinity = cpuAffinity
        }
    }

    public struct Session: Codable, Sendable, Equatable {
        public var regions: Int
        public var mappings: Int
        public var bytesMapped: UInt64
        public var startedRings: [Int]
        public var enabledRings: [Int]
        public var frozen: Bool
        /// `0x…`, or empty before VM1 set them.
        public var features: String
        public var protocolFeatures: String
        /// Present (true) while VM1 live-migrates: dirty-page logging is on.
        public var dirtyLogging: Bool?

        public init(regions: Int, mappings: Int, bytesMapped: UInt64, startedRings: [Int], enabledRings: [Int], frozen: Bool,
                    features: String, protocolFeatures: String, dirtyLogging: Bool? = nil) {
            self.dirtyLogging = dirtyLogging
            self.regions = regions
            self.mappings = mappings
            self.bytesMapped = bytesMapped
            self.startedRings = startedRings
            self.enabledRings = enabledRings
            self.frozen = frozen
            self.features = features
            self.protocolFeatures = protocolFeatures
        }
    }

    enum CodingKeys: String, CodingKey { case config, session }

    /// The counters' keys sit beside `config` and `session`, in one object.
    public init(from decoder: any Decoder) throws {
        counters = try BridgeCounters(from: decoder)
        let c = try decoder.container(keyedBy: CodingKeys.self)
        config = try c.decode(Settings.self, forKey: .config)
        session = try c.decodeIfPresent(Session.self, forKey: .session)
    }

    public func encode(to encoder: any Encoder) throws {
        try counters.encode(to: encoder)
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(config, forKey: .config)
        try c.encodeIfPresent(session, forKey: .session)
    }
}

/// `create`.
public struct CreatedBridge: Codable, Sendable, Equatable {
    public var created: String
    /// Kept in the state file (restored by a restart).
    public var persistent: Bool
    public init(created: String, persistent: Bool) { self.created = created; self.persistent = persistent }
}

/// `destroy`.
public struct DestroyedBridge: Codable, Sendable, Equatable {
    public var destroyed: String
    public init(destroyed: String) { self.destroyed = destroyed }
}

/// `map`, `unmap` and `freeze`: what the bridge did.
public struct BridgeOperation: Codable, Sendable, Equatable {
    public var bridge: String
    public var result: String
    public init(bridge: String, result: String) { self.bridge = bridge; self.result = result }
}

/// `metrics`: the Prometheus text exposition.
public struct MetricsText: Codable, Sendable, Equatable {
    public var text: String
    public init(text: String) { self.text = text }
}

/// `log-level`.
public struct LogLevelSet: Codable, Sendable, Equatable {
    public var logLevel: String
    public init(logLevel: String) { self.logLevel = logLevel }
}

/// What a reload changed (`reload`, SIGHUP).
public struct ReloadReport: Codable, Sendable, Equatable {
    public var added: [String] = []
    public var removed: [String] = []
    /// Bridges whose settings changed: they keep running with the old ones
    /// until the daemon restarts (a live bridge's BAR cannot be resized).
    public var needsRestart: [String] = []
    public var logLevel: String
    public var failed: [String: String] = [:]

    public init(logLevel: String) { self.logLevel = logLevel }
}
