import Logging

/// What the command line says over the config file. The same value is
/// applied at start and on every reload, so a reload never undoes a flag:
/// a bridge given by flags stays, `--log-level` stays, the control socket
/// stays where `--control-socket` put it.
public struct DaemonOverrides: Equatable, Sendable {
    public var runtimeDirectory: String?
    public var controlSocket: String?
    public var logLevel: Logger.Level?
    /// The bridge the flags describe (`--socket-path` or `--fd`).
    public var bridge: BridgeConfig?

    public init(runtimeDirectory: String? = nil, controlSocket: String? = nil, logLevel: Logger.Level? = nil, bridge: BridgeConfig? = nil) {
        self.runtimeDirectory = runtimeDirectory
        self.controlSocket = controlSocket
        self.logLevel = logLevel
        self.bridge = bridge
    }

    /// `file` (the parsed config, or `DaemonConfig()` without one) with the
    /// command line over it, validated as a whole. Sockets the file left to
    /// their defaults follow `--runtime-directory`; sockets it named stay.
    public func applied(to file: DaemonConfig) throws(ConfigError) -> DaemonConfig {
        var config = file
        if let d = runtimeDirectory {
            let old = config.runtimeDirectory
            for i in config.bridges.indices {
                let n = config.bridges[i].name
                if config.bridges[i].vhostUserSocket == "\(old)/\(n)-vm1.sock" { config.bridges[i].vhostUserSocket = "\(d)/\(n)-vm1.sock" }
                if config.bridges[i].peerSocket == "\(old)/\(n)-vm2.sock" { config.bridges[i].peerSocket = "\(d)/\(n)-vm2.sock" }
            }
            if config.controlSocket == "\(old)/control.sock" { config.controlSocket = "\(d)/control.sock" }
            config.runtimeDirectory = d
        }
        if let c = controlSocket { config.controlSocket = c }
        if let l = logLevel { config.logLevel = l }
        if let b = bridge {
            if config.bridges.contains(where: { $0.name == b.name }) {
                throw ConfigError("--name", "'\(b.name)' is also a bridge of the config file: give the flag bridge another --name")
            }
            config.bridges.append(b)
        }
        try config.validate()
        return config
    }

    /// A control socket is served with a config file, or when the command
    /// line names one or a runtime directory to hold it. A daemon started
    /// from bridge flags alone has none, so two of them never collide.
    public func servesControlSocket(withConfigFile: Bool) -> Bool {
        withConfigFile || controlSocket != nil || runtimeDirectory != nil
    }
}
