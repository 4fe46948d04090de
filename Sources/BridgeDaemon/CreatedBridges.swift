import ControlWire
import FoundationEssentials
import LinuxIO

/// The state file of the bridges made with `create` (`vhost-pci-bridgectl
/// create`): they are the operator's, not the config file's, so a reload
/// keeps them and a restart brings them back. The file is
/// `{"version": 1, "bridges": [{"name": …, "bridge": {…}}]}`, each `bridge`
/// exactly the object the `create` request carried, parsed again on load by
/// the same code (so a restored bridge is checked like a new one). It is
/// rewritten whole (temporary file + rename) on every create and destroy.
public struct CreatedBridges: Sendable {
    public struct Entry: Equatable, Sendable {
        public var name: String
        /// The `create` request's bridge object, as JSON text.
        public var spec: String
        public init(name: String, spec: String) { self.name = name; self.spec = spec }
    }

    public static let fileName = "created-bridges.json"
    public let path: String

    public init(directory: String) { path = "\(directory)/\(Self.fileName)" }

    /// The file as written: `{"version": 1, "bridges": [{"name": …, "bridge": {…}}]}`.
    struct File: Encodable {
        var version = 1
        var bridges: [Item]
        struct Item: Encodable { var name: String; var bridge: ConfigValue }
    }

    /// The entries; none when the file does not exist yet.
    public func load() throws(ConfigError) -> [Entry] {
        let bytes: [UInt8]
        do { bytes = try Files.read(path) } catch {
            if error.errno == .noSuchFileOrDirectory { return [] }
            throw ConfigError(path, "cannot be read: \(error)")
        }
        let top: ConfigValue
        do { top = try JSONDecoder().decode(ConfigValue.self, from: Data(bytes)) } catch {
            throw ConfigError(path, "not readable JSON: \(ControlProtocol.describe(error))")
        }
        guard case .mapping(let file) = top, file["version"] == .int(1), case .list(let list)? = file["bridges"] else {
            throw ConfigError(path, "must be {\"version\": 1, \"bridges\": [...]}")
        }
        return try list.enumerated().map { i, item throws(ConfigError) in
            guard case .mapping(let e) = item, case .string(let name)? = e["name"], case .mapping(let bridge)? = e["bridge"],
                  let spec = ControlProtocol.encode(bridge) else {
                throw ConfigError("\(path): bridges[\(i)]", "must be {\"name\": ..., \"bridge\": {...}}")
            }
            return Entry(name: name, spec: spec)
        }
    }

    public func save(_ entries: [Entry]) throws(ConfigError) {
        let file = File(bridges: entries.map { e in .init(name: e.name, bridge: Self.object(e.spec) ?? .mapping([:])) })
        let data: Data
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            data = try encoder.encode(file)
        } catch {
            throw ConfigError(path, "cannot be written: \(ControlProtocol.describe(error))")
        }
        do {
            try Files.createDirectories(Files.directory(of: path))
            try Files.writeAtomically(path, Array(data), mode: 0o644)
        } catch {
            throw ConfigError(path, "cannot be written: \(error)")
        }
    }

    /// The bridge an entry describes, checked as a `create` request is.
    public func bridge(_ entry: Entry, runtimeDirectory: String) throws(ConfigError) -> BridgeConfig {
        guard let spec = Self.object(entry.spec) else {
            throw ConfigError("\(path): \(entry.name)", "the bridge object is not JSON")
        }
        let b = try DaemonConfig.bridge(spec, key: "\(path): \(entry.name)", runtimeDirectory: runtimeDirectory)
        guard b.name == entry.name else { throw ConfigError("\(path): \(entry.name)", "names bridge '\(b.name)'") }
        return b
    }

    static func object(_ json: String) -> ConfigValue? {
        try? JSONDecoder().decode(ConfigValue.self, from: Data(json.utf8))
    }
}
