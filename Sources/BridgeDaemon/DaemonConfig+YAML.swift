import ControlWire
import Yams

/// The YAML file as `ConfigValue`s: composed by Yams, converted here with
/// every limit checked, then read by `DaemonConfig.parse`'s typed checks.
extension DaemonConfig {
    /// A composed YAML node as plain values (mappings with string keys,
    /// arrays, scalars), with every limit checked. Yams' own `load` traps on
    /// a mapping whose key is not a string (`{{}: 1}`, found by fuzzing), so
    /// the config never goes through it.
    static func plain(_ node: Node, path: String, depth: Int, budget: inout Int) throws(ConfigError) -> ConfigValue {
        let at = path.isEmpty ? "(file)" : path
        budget -= 1
        guard budget >= 0 else { throw ConfigError(at, "the file has more than \(maximumNodes) YAML nodes") }
        guard depth < maximumDepth else { throw ConfigError(at, "nested deeper than \(maximumDepth) levels") }
        switch node {
        case .scalar(let scalar):
            return plainScalar(scalar)
        case .alias:
            throw ConfigError(at, "YAML aliases are not supported")
        case .sequence(let items):
            var out: [ConfigValue] = []
            for (i, item) in items.enumerated() { out.append(try plain(item, path: "\(path)[\(i)]", depth: depth + 1, budget: &budget)) }
            return .list(out)
        case .mapping(let pairs):
            var out: [String: ConfigValue] = [:]
            for (key, value) in pairs {
                guard case .scalar(let k) = key else { throw ConfigError(at, "a mapping key is not a plain name") }
                let child = path.isEmpty ? k.string : "\(path).\(k.string)"
                guard out[k.string] == nil else { throw ConfigError(child, "is given twice") }
                out[k.string] = try plain(value, path: child, depth: depth + 1, budget: &budget)
            }
            return .mapping(out)
        }
    }

    /// A scalar as the config reads it: Int, Bool, Double or String, parsed
    /// here — Yams' own constructors trap on some YAML 1.1 forms (a
    /// sexagesimal integer such as `3333333333333333333:3` overflows; found by
    /// fuzz-config). What does not parse stays a string, and the key's own
    /// check then says what it expected.
    static func plainScalar(_ scalar: Node.Scalar) -> ConfigValue {
        let text = scalar.string
        switch Tag.Name(rawValue: scalar.tag.rawValue) {
        case .int:
            let digits = text.replacingOccurrences(of: "_", with: "")
            if let v = Int(digits) { return .int(v) }
            if digits.hasPrefix("0x"), let v = Int(digits.dropFirst(2), radix: 16) { return .int(v) }
            if digits.hasPrefix("0o"), let v = Int(digits.dropFirst(2), radix: 8) { return .int(v) }
            return .string(text)
        case .bool:
            switch text.lowercased() {
            case "true", "yes", "on", "y": return .bool(true)
            case "false", "no", "off", "n": return .bool(false)
            default: return .string(text)
            }
        case .float:
            return Double(text).map(ConfigValue.double) ?? .string(text)
        default:
            return .string(text)
        }
    }
}
