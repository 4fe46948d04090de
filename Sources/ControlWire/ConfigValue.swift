/// A plain value as a config file or a `create` request holds it: a
/// mapping with string keys, a list, or a scalar. The YAML config is
/// composed into this (with its limits checked) and a JSON bridge object
/// decodes into it, so both go through the same typed checks
/// (`DaemonConfig.bridge`). It encodes back to the same JSON, which is how
/// the state file keeps a `create`d bridge.
public enum ConfigValue: Sendable, Equatable {
    case string(String)
    case int(Int)
    case double(Double)
    case bool(Bool)
    case list([ConfigValue])
    case mapping([String: ConfigValue])
    /// JSON `null` (YAML's empty value is the empty string).
    case null

    /// The value as the text a scalar key reads: strings as they are,
    /// numbers and booleans written out; nil for a list, a mapping or null.
    public var scalarText: String? {
        switch self {
        case .string(let s): s
        case .int(let i): String(i)
        case .bool(let b): b ? "true" : "false"
        case .double(let d): String(d)
        case .list, .mapping, .null: nil
        }
    }
}

extension ConfigValue: Codable {
    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? c.decode(Int.self) {
            self = .int(i)
        } else if let d = try? c.decode(Double.self) {
            self = .double(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let l = try? c.decode([ConfigValue].self) {
            self = .list(l)
        } else {
            self = .mapping(try c.decode([String: ConfigValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .string(let s): try c.encode(s)
        case .int(let i): try c.encode(i)
        case .double(let d): try c.encode(d)
        case .bool(let b): try c.encode(b)
        case .list(let l): try c.encode(l)
        case .mapping(let m): try c.encode(m)
        case .null: try c.encodeNil()
        }
    }
}

extension ConfigValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: ConfigValue...) { self = .list(elements) }
    public init(dictionaryLiteral elements: (String, ConfigValue)...) {
        self = .mapping(Dictionary(elements) { _, last in last })
    }
}
