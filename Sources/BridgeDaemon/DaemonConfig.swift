import BridgeCore
import LinuxIO
import Logging
import VhostUser
import ControlWire

/// A refused configuration: the key (e.g. `bridges[1].bar-size`) and why.
public struct ConfigError: Error, Equatable, Sendable, CustomStringConvertible {
    public var key: String
    public var reason: String
    public init(_ key: String, _ reason: String) { self.key = key; self.reason = reason }
    public var description: String { "\(key): \(reason)" }
}

/// One bridge as the config file (or `create`) describes it.
public struct BridgeConfig: Equatable, Sendable {
    public var name: String
    public var vhostUserSocket: String
    public var peerSocket: String?
    public var vm2: String
    public var addressSpace: AddressSpaceConfiguration
    public var notifications: NotificationMode = .relay
    public var busyPollMicroseconds = 0
    public var revocationDeadlineMilliseconds = 100
    /// How long the bridge thread spins on VM2's ack in the revocation
    /// channel before it sleeps (`revocation-spin-us`).
    public var revocationSpinMicroseconds = 50
    public var queuePairs = BackendConfiguration.defaultQueuePairs
    /// Device features offered to VM1 (VERSION_1 always; MQ and CTRL_VQ
    /// added when `queuePairs` > 1). VM2 must serve them all.
    public var deviceFeatures: VirtioNetFeatures = .defaultOffer
    public var client = false
    public var maxPendingTranslations = BridgeSettings.defaultMaxPendingTranslations
    public var vm1Access = PeerAccess()
    public var vm2Access = PeerAccess()
    public var vm2DeadlineAction: DeadlineAction = .disconnect
    /// `unsealed-regions`: what VM2 gets of VM1 memory that can shrink.
    public var unsealedRegions: UnsealedRegionPolicy = .mark
    /// `--fd N`: serve this already connected vhost-user socket (one session,
    /// then the daemon exits, the back-end convention) instead of listening
    /// on `vhostUserSocket`, which then only names it in logs and `list`.
    public var inheritedConnection: Int32?
    /// `cpu-affinity`: CPUs of the relay (and SQPOLL) threads.
    public var cpuAffinity: [Int] = []

    public init(name: String, vhostUserSocket: String, peerSocket: String?, vm2: String, addressSpace: AddressSpaceConfiguration) {
        self.name = name
        self.vhostUserSocket = vhostUserSocket
        self.peerSocket = peerSocket
        self.vm2 = vm2
        self.addressSpace = addressSpace
    }

    public var settings: BridgeSettings {
        var s = BridgeSettings(name: name, socketPath: inheritedConnection == nil ? vhostUserSocket : nil, peerSocketPath: peerSocket,
                               backend: BackendConfiguration(bridgeName: name, addressSpace: addressSpace,
                                                             deviceFeatures: deviceFeatures.rawValue, queuePairs: queuePairs),
                               revocationDeadlineMilliseconds: revocationDeadlineMilliseconds,
                               notifications: notifications, busyPollMicroseconds: busyPollMicroseconds)
        s.client = client
        s.maxPendingTranslations = maxPendingTranslations
        s.vm1Access = vm1Access
        s.vm2Access = vm2Access
        s.vm2DeadlineAction = vm2DeadlineAction
        s.revocationSpinMicroseconds = revocationSpinMicroseconds
        s.unsealedRegions = unsealedRegions
        s.cpuAffinity = cpuAffinity
        return s
    }
}

/// The daemon's configuration (`config/vhost-pci-bridged.yaml`).
public struct DaemonConfig: Equatable, Sendable {
    public var runtimeDirectory = "/run/vhost-pci-bridged"
    public var controlSocket = "/run/vhost-pci-bridged/control.sock"
    /// Members of this group (by name or number) may use the control socket; root always may.
    public var controlGroup: String?
    public var controlMode: UInt32 = 0o660
    public var logLevel: Logger.Level = .info
    public var vm2Budgets: [String: UInt64] = [:]
    /// Where bridges made with `create` may put their sockets, besides the
    /// runtime directory (the file's own bridges may use any path: root wrote it).
    public var socketDirectories: [String] = []
    /// Where the state file of `create`d bridges lives (`CreatedBridges`);
    /// under systemd `$STATE_DIRECTORY` is used when this is not set.
    public var stateDirectory: String?
    public var bridges: [BridgeConfig] = []

    public init() {}

    static let topKeys: Set<String> = ["runtime-directory", "control-socket", "control-group", "control-mode", "log-level", "vm2-budgets",
                                       "socket-directories", "state-directory", "bridges"]
    static let bridgeKeys: Set<String> = ["name", "vhost-user-socket", "peer-socket", "vm2", "bar-size", "mode", "static-windows",
                                          "dma-window", "notifications", "busy-poll-us", "revocation-deadline-ms", "revocation-spin-us", "max-mappings",
                                          "queue-pairs", "device-features", "client", "page-size", "max-pending-translations",
                                          "vm1-access", "vm2-access", "vm2-deadline-action", "round-out-huge-pages",
                                          "cpu-affinity", "unsealed-regions"]

    /// Most YAML nodes a config may hold (an alias counts what it names each
    /// time it is used, so an alias bomb is refused, not expanded), and how deep.
    static let maximumNodes = 100_000
    static let maximumDepth = 32

    /// Parses and validates YAML text. Every error names its key.
    public static func parse(_ text: String) throws(ConfigError) -> DaemonConfig {
        try parse(utf8: Array(text.utf8))
    }

    /// Parses and validates a file's bytes, which must be UTF-8 (libyaml
    /// refuses anything else, naming the line, column and byte).
    public static func parse(utf8 bytes: [UInt8]) throws(ConfigError) -> DaemonConfig {
        let root = try bytes.withUnsafeBufferPointer { bytes throws(ConfigError) in try compose(bytes) }
        guard case .mapping(let top)? = root else { throw ConfigError("(file)", "the top level must be a mapping of keys") }
        var config = DaemonConfig()
        for key in top.keys.sorted() where !topKeys.contains(key) { throw ConfigError(key, "unknown key") }
        if let v = top["runtime-directory"] {
            config.runtimeDirectory = try path(v, "runtime-directory")
            config.controlSocket = "\(config.runtimeDirectory)/control.sock" // unless named below
        }
        if let v = top["control-socket"] { config.controlSocket = try path(v, "control-socket") }
        if let v = top["control-group"] {
            guard let g = scalar(v), !g.isEmpty else { throw ConfigError("control-group", "must be a group name or number") }
            config.controlGroup = g
        }
        if let v = top["control-mode"] { config.controlMode = try mode(v, "control-mode") }
        if let v = top["log-level"] {
            config.logLevel = try choice(v, "log-level", Logger.Level.self, "one of trace, debug, info, notice, warning, error, critical")
        }
        if let v = top["vm2-budgets"] {
            guard case .mapping(let map) = v else { throw ConfigError("vm2-budgets", "must map VM2 names to sizes") }
            for (name, raw) in map {
                guard let size = scalar(raw).flatMap(parseByteSize), size > 0 else {
                    throw ConfigError("vm2-budgets.\(name)", "'\(scalar(raw) ?? "?")' is not a size such as 2T")
                }
                config.vm2Budgets[name] = size
            }
        }
        if let v = top["state-directory"] { config.stateDirectory = try path(v, "state-directory") }
        if let v = top["socket-directories"] {
            guard case .list(let list) = v else { throw ConfigError("socket-directories", "must be a list of absolute directories") }
            config.socketDirectories = try list.enumerated().map { i, d throws(ConfigError) in
                let dir = try path(d, "socket-directories[\(i)]")
                guard SocketPathPolicy.isPlain(dir) else { throw ConfigError("socket-directories[\(i)]", "'\(dir)' must not contain '.', '..' or '//'") }
                return dir
            }
        }
        if let v = top["bridges"] {
            guard case .list(let list) = v else { throw ConfigError("bridges", "must be a list of bridges") }
            for (i, item) in list.enumerated() {
                config.bridges.append(try bridge(item, key: "bridges[\(i)]", runtimeDirectory: config.runtimeDirectory))
            }
        }
        try config.validate()
        return config
    }

    /// Checks across bridges: unique names and sockets, VM2 budgets.
    public func validate() throws(ConfigError) {
        var names: Set<String> = [], sockets: [String: String] = [:]
        for (i, b) in bridges.enumerated() {
            guard names.insert(b.name).inserted else { throw ConfigError("bridges[\(i)].name", "'\(b.name)' is used by another bridge") }
            for (key, path) in [("vhost-user-socket", b.vhostUserSocket), ("peer-socket", b.peerSocket ?? "")] where !path.isEmpty {
                if let other = sockets[path] { throw ConfigError("bridges[\(i)].\(key)", "'\(path)' is already used by \(other)") }
                sockets[path] = "bridge \(b.name)"
            }
            if controlSocket == b.vhostUserSocket {
                throw ConfigError("bridges[\(i)].vhost-user-socket", "'\(b.vhostUserSocket)' is the control socket")
            }
        }
        do {
            try BARBudget.check(bridges.map { .init(bridge: $0.name, vm2: $0.vm2, barSize: $0.addressSpace.barSize) }, budgets: vm2Budgets)
        } catch { throw ConfigError("vm2-budgets", "\(error)") }
    }

    static func scalar(_ v: ConfigValue) -> String? { v.scalarText }

    static func path(_ v: ConfigValue, _ key: String) throws(ConfigError) -> String {
        guard let s = scalar(v), s.hasPrefix("/"), s.utf8.count <= 107 else {
            throw ConfigError(key, "must be an absolute path of at most 107 bytes (a Unix socket limit)")
        }
        return s
    }

    static let accessKeys: Set<String> = ["owner", "group", "mode", "allow-users", "allow-groups"]

    /// `{owner, group, mode, allow-users, allow-groups}`: names or numbers.
    static func access(_ v: ConfigValue, _ key: String) throws(ConfigError) -> PeerAccess {
        guard case .mapping(let map) = v else { throw ConfigError(key, "must be a mapping of owner, group, mode, allow-users, allow-groups") }
        for k in map.keys.sorted() where !accessKeys.contains(k) { throw ConfigError("\(key).\(k)", "unknown key") }
        func user(_ raw: ConfigValue, _ at: String) throws(ConfigError) -> UInt32 {
            guard let name = scalar(raw), let id = SocketPermissions.userID(named: name) else {
                throw ConfigError(at, "'\(scalar(raw) ?? "?")' is not a user name or number")
            }
            return id
        }
        func group(_ raw: ConfigValue, _ at: String) throws(ConfigError) -> UInt32 {
            guard let name = scalar(raw), let id = SocketPermissions.groupID(named: name) else {
                throw ConfigError(at, "'\(scalar(raw) ?? "?")' is not a group name or number")
            }
            return id
        }
        func list(_ k: String) throws(ConfigError) -> [ConfigValue] {
            guard let raw = map[k] else { return [] }
            guard case .list(let items) = raw else { throw ConfigError("\(key).\(k)", "must be a list") }
            return items
        }
        var a = PeerAccess()
        if let raw = map["owner"] { a.owner = try user(raw, "\(key).owner") }
        if let raw = map["group"] { a.group = try group(raw, "\(key).group") }
        if let raw = map["mode"] { a.mode = try mode(raw, "\(key).mode") }
        a.allowedUsers = try list("allow-users").enumerated().map { i, u throws(ConfigError) in try user(u, "\(key).allow-users[\(i)]") }
        a.allowedGroups = try list("allow-groups").enumerated().map { i, g throws(ConfigError) in try group(g, "\(key).allow-groups[\(i)]") }
        return a
    }

    /// `[event-idx, mrg-rxbuf]` or `"event-idx,mrg-rxbuf"` (or `[]`):
    /// VERSION_1 is always added; MQ and CTRL_VQ come from `queue-pairs`.
    static func deviceFeatures(_ v: ConfigValue, _ key: String) throws(ConfigError) -> VirtioNetFeatures {
        let names: [String]
        if case .list(let items) = v {
            names = items.map { scalar($0) ?? "?" }
        } else if let text = scalar(v) {
            return try deviceFeatures(commaSeparated: text, key)
        } else {
            throw ConfigError(key, "must be a list of feature names")
        }
        return try parseDeviceFeatures(names, key)
    }

    /// `--device-features event-idx,mrg-rxbuf`.
    public static func deviceFeatures(commaSeparated text: String, _ key: String) throws(ConfigError) -> VirtioNetFeatures {
        try parseDeviceFeatures(text.split(separator: ",").map(\.trimmingSpaces).filter { !$0.isEmpty }, key)
    }

    static func parseDeviceFeatures(_ names: [String], _ key: String) throws(ConfigError) -> VirtioNetFeatures {
        let configurable: Set<String> = ["event-idx", "mrg-rxbuf", "version-1"]
        for name in names where !configurable.contains(name) {
            throw ConfigError(key, "'\(name)' is not one of event-idx, mrg-rxbuf, version-1 (mq and ctrl-vq follow queue-pairs)")
        }
        switch VirtioNetFeatures.parse(names) {
        case .success(let f): return f.union(.version1)
        case .failure(let e): throw ConfigError(key, "'\(e.name)' is not a device feature")
        }
    }

    /// `[0, 2]` or `"0-3,6"`: CPU numbers below 1024, at most 1024 of them.
    static func cpuList(_ v: ConfigValue, _ key: String) throws(ConfigError) -> [Int] {
        let items: [String]
        if case .list(let list) = v { items = list.map { scalar($0) ?? "?" } } else if let text = scalar(v) {
            items = text.split(separator: ",").map(\.trimmingSpaces)
        } else { throw ConfigError(key, "must be a list of CPU numbers or a string such as 0-3,6") }
        var cpus: Set<Int> = []
        for item in items {
            let bounds = item.split(separator: "-", omittingEmptySubsequences: false)
            guard bounds.count <= 2, let first = Int(bounds[0]), let last = bounds.count == 2 ? Int(bounds[1]) : first,
                  first >= 0, last >= first, last < 1024 else {
                throw ConfigError(key, "'\(item)' is not a CPU number or range below 1024 (e.g. 0-3,6)")
            }
            cpus.formUnion(first...last)
        }
        guard !cpus.isEmpty else { throw ConfigError(key, "names no CPU") }
        return cpus.sorted()
    }

    static func mode(_ v: ConfigValue, _ key: String) throws(ConfigError) -> UInt32 {
        guard let text = scalar(v), let mode = UInt32(text.hasPrefix("0o") ? String(text.dropFirst(2)) : text, radix: 8), mode <= 0o777 else {
            throw ConfigError(key, "'\(scalar(v) ?? "?")' is not an octal mode such as 0660")
        }
        return mode
    }

    static func int(_ v: ConfigValue, _ key: String, _ range: ClosedRange<Int>) throws(ConfigError) -> Int {
        guard let s = scalar(v), let n = Int(s), range.contains(n) else {
            throw ConfigError(key, "'\(scalar(v) ?? "?")' is not a whole number in \(range.lowerBound)...\(range.upperBound)")
        }
        return n
    }

    /// A key whose value is one of an enum's names (`mode`, `notifications`,
    /// `vm2-deadline-action`, ...); `expected` lists them for the error.
    static func choice<Choice: RawRepresentable<String>>(_ v: ConfigValue, _ key: String, _: Choice.Type,
                                                          _ expected: String) throws(ConfigError) -> Choice {
        guard let text = scalar(v), let value = Choice(rawValue: text) else {
            throw ConfigError(key, "'\(scalar(v) ?? "?")' is not \(expected)")
        }
        return value
    }

    static func window(_ v: ConfigValue, _ key: String) throws(ConfigError) -> BusWindow {
        guard let s = scalar(v), let w = BusWindow(parsing: s) else {
            throw ConfigError(key, "'\(scalar(v) ?? "?")' is not BASE:LIMIT with LIMIT above BASE (e.g. 4G:16G)")
        }
        return w
    }

    /// One bridge from a mapping (the config file's `bridges[i]`, or `create`).
    public static func bridge(_ item: ConfigValue, key: String, runtimeDirectory: String) throws(ConfigError) -> BridgeConfig {
        guard case .mapping(let b) = item else { throw ConfigError(key, "each bridge must be a mapping") }
        for k in b.keys.sorted() where !bridgeKeys.contains(k) { throw ConfigError("\(key).\(k)", "unknown key") }
        guard let rawName = b["name"], let name = scalar(rawName), !name.isEmpty else { throw ConfigError("\(key).name", "is required") }
        guard name.count <= 32, name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw ConfigError("\(key).name", "'\(name)' must be 1-32 letters, digits, '-' or '_'")
        }
        let vhost = try b["vhost-user-socket"].map { v throws(ConfigError) in try path(v, "\(key).vhost-user-socket") }
            ?? "\(runtimeDirectory)/\(name)-vm1.sock"
        let peer = try b["peer-socket"].map { v throws(ConfigError) in try path(v, "\(key).peer-socket") }
            ?? "\(runtimeDirectory)/\(name)-vm2.sock"
        guard let barText = b["bar-size"].flatMap(scalar) else { throw ConfigError("\(key).bar-size", "is required (e.g. 64G)") }
        guard let bar = parseByteSize(barText) else { throw ConfigError("\(key).bar-size", "'\(barText)' is not a size such as 64G") }
        let mode = try b["mode"].map { v throws(ConfigError) in try choice(v, "\(key).mode", BridgeMode.self, "identity, iommu or static") }
            ?? .identity
        var windows: [BusWindow] = []
        if let raw = b["static-windows"] {
            guard case .list(let list) = raw else { throw ConfigError("\(key).static-windows", "must be a list of BASE:LIMIT") }
            for (j, w) in list.enumerated() { windows.append(try window(w, "\(key).static-windows[\(j)]")) }
        }
        let dma = try b["dma-window"].map { v throws(ConfigError) in try window(v, "\(key).dma-window") }
        let maxMappings = try b["max-mappings"].map { v throws(ConfigError) in try int(v, "\(key).max-mappings", 1...1_000_000) }
            ?? AddressSpaceConfiguration.defaultMaxMappings
        let pageSize = try b["page-size"].map { v throws(ConfigError) in UInt64(try int(v, "\(key).page-size", 4096...(1 << 30))) } ?? 4096
        var space = AddressSpaceConfiguration(barSize: bar, pageSize: pageSize, mode: mode, dmaWindow: dma,
                                              staticWindows: windows, maxMappings: maxMappings)
        if let raw = b["round-out-huge-pages"] {
            guard case .bool(let v) = raw else { throw ConfigError("\(key).round-out-huge-pages", "must be true or false") }
            space.roundOutHugePages = v
        }
        do { try space.validate() } catch { throw ConfigError("\(key).\(error.key)", "\(error)".replacingPrefix("\(error.key): ")) }
        var config = BridgeConfig(name: name, vhostUserSocket: vhost, peerSocket: peer, vm2: b["vm2"].flatMap(scalar) ?? name,
                                  addressSpace: space)
        if let raw = b["notifications"] {
            config.notifications = try choice(raw, "\(key).notifications", NotificationMode.self, "relay, relay-sqpoll or passthrough")
        }
        if let raw = b["busy-poll-us"] { config.busyPollMicroseconds = try int(raw, "\(key).busy-poll-us", 0...10_000) }
        if let raw = b["revocation-deadline-ms"] { config.revocationDeadlineMilliseconds = try int(raw, "\(key).revocation-deadline-ms", 1...60_000) }
        if let raw = b["revocation-spin-us"] { config.revocationSpinMicroseconds = try int(raw, "\(key).revocation-spin-us", 0...10_000) }
        if let raw = b["queue-pairs"] { config.queuePairs = try int(raw, "\(key).queue-pairs", 1...BackendConfiguration.maximumQueuePairs) }
        if let raw = b["device-features"] { config.deviceFeatures = try deviceFeatures(raw, "\(key).device-features") }
        if let raw = b["vm1-access"] { config.vm1Access = try access(raw, "\(key).vm1-access") }
        if let raw = b["vm2-access"] { config.vm2Access = try access(raw, "\(key).vm2-access") }
        if let raw = b["vm2-deadline-action"] {
            config.vm2DeadlineAction = try choice(raw, "\(key).vm2-deadline-action", DeadlineAction.self, "disconnect or kill")
        }
        if let raw = b["unsealed-regions"] {
            config.unsealedRegions = try choice(raw, "\(key).unsealed-regions", UnsealedRegionPolicy.self, "refuse or mark")
        }
        if let raw = b["max-pending-translations"] {
            config.maxPendingTranslations = try int(raw, "\(key).max-pending-translations", 1...65_536)
        }
        if let raw = b["cpu-affinity"] { config.cpuAffinity = try cpuList(raw, "\(key).cpu-affinity") }
        if let raw = b["client"] {
            guard case .bool(let v) = raw else { throw ConfigError("\(key).client", "must be true or false") }
            config.client = v
        }
        return config
    }
}

extension String {
    fileprivate func replacingPrefix(_ prefix: String) -> String {
        hasPrefix(prefix) ? String(dropFirst(prefix.count)) : self
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces and tabs (what Foundation's
    /// `trimmingCharacters(in: .whitespaces)` removes: tab and Unicode's
    /// space separators).
    var trimmingSpaces: String {
        func isSpace(_ c: Character) -> Bool {
            c.unicodeScalars.allSatisfy { $0 == "\t" || $0.properties.generalCategory == .spaceSeparator }
        }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}
