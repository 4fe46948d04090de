import Foundation

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

    /// The entries; none when the file does not exist yet.
    public func load() throws(ConfigError) -> [Entry] {
        guard FileManager.default.fileExists(atPath: path) else { return [] }
        let object: Any
        do { object = try JSONSerialization.jsonObject(with: try Data(contentsOf: URL(fileURLWithPath: path))) } catch {
            throw ConfigError(path, "not readable JSON: \(error.localizedDescription)")
        }
        guard let top = object as? [String: Any], top["version"] as? Int == 1, let list = top["bridges"] as? [Any] else {
            throw ConfigError(path, "must be {\"version\": 1, \"bridges\": [...]}")
        }
        return try list.enumerated().map { i, item throws(ConfigError) in
            guard let e = item as? [String: Any], let name = e["name"] as? String, let bridge = e["bridge"] as? [String: Any],
                  let data = try? JSONSerialization.data(withJSONObject: bridge, options: [.sortedKeys]) else {
                throw ConfigError("\(path): bridges[\(i)]", "must be {\"name\": ..., \"bridge\": {...}}")
            }
            return Entry(name: name, spec: String(decoding: data, as: UTF8.self))
        }
    }

    public func save(_ entries: [Entry]) throws(ConfigError) {
        let list: [[String: Any]] = entries.map { e in
            ["name": e.name, "bridge": (try? JSONSerialization.jsonObject(with: Data(e.spec.utf8))) ?? [:]]
        }
        do {
            let data = try JSONSerialization.data(withJSONObject: ["version": 1, "bridges": list], options: [.sortedKeys, .prettyPrinted])
            let directory = (path as NSString).deletingLastPathComponent
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            try data.write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            throw ConfigError(path, "cannot be written: \(error.localizedDescription)")
        }
    }

    /// The bridge an entry describes, checked as a `create` request is.
    public func bridge(_ entry: Entry, runtimeDirectory: String) throws(ConfigError) -> BridgeConfig {
        guard let spec = try? JSONSerialization.jsonObject(with: Data(entry.spec.utf8)) else {
            throw ConfigError("\(path): \(entry.name)", "the bridge object is not JSON")
        }
        let b = try DaemonConfig.bridge(spec, key: "\(path): \(entry.name)", runtimeDirectory: runtimeDirectory)
        guard b.name == entry.name else { throw ConfigError("\(path): \(entry.name)", "names bridge '\(b.name)'") }
        return b
    }
}
