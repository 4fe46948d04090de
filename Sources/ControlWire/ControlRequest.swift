import BridgeCore
import FoundationEssentials

/// One control request, decoded from its JSON line (`decode(line:)`) with
/// the protocol's errors for bad input, and encoded by clients.
public enum ControlRequest: Sendable, Equatable {
    case status
    case list
    case show(name: String)
    /// The bridge object as the request carried it: checked like a config
    /// file's bridge, and kept as it is in the state file.
    case create(bridge: [String: ConfigValue])
    case destroy(name: String)
    case map(name: String, MapArguments)
    case unmap(name: String, UnmapArguments)
    case freeze(name: String)
    /// One bridge's counters, or every bridge's when `name` is nil.
    case stats(name: String?)
    case metrics
    case reload
    /// The level as sent; the daemon checks it against swift-log's levels.
    case logLevel(String)

    /// The request on `line`, or the error to answer with: `too-long`,
    /// `bad-json`, `version`, `bad-request`, `unknown-command`.
    public static func decode(line: String) -> Result<ControlRequest, ControlError> {
        guard line.utf8.count <= ControlProtocol.maximumLine else {
            return .failure(ControlError("too-long", "request of \(line.utf8.count) bytes exceeds \(ControlProtocol.maximumLine)"))
        }
        do {
            return .success(try JSONDecoder().decode(ControlRequest.self, from: Data(line.utf8)))
        } catch let error as ControlError {
            return .failure(error)
        } catch {
            return .failure(ControlError("bad-json", "the request is not a JSON object"))
        }
    }
}

/// `map`'s arguments as the client wrote them. The daemon resolves them
/// (`resolved()`) after it has found the bridge, so a request naming no
/// bridge is answered `unknown-bridge` whatever its arguments.
public struct MapArguments: Sendable, Equatable {
    public var bus: SizeArgument?
    public var gpa: SizeArgument?
    public var length: SizeArgument?
    /// `r`, `w` or `rw`; `rw` when absent (or not a string).
    public var permission: String?

    public init(bus: SizeArgument?, gpa: SizeArgument?, length: SizeArgument?, permission: String? = nil) {
        self.bus = bus
        self.gpa = gpa
        self.length = length
        self.permission = permission
    }

    public func resolved() throws(ControlError) -> (bus: BusAddress, gpa: GuestPhysicalAddress, length: UInt64, permission: Permission) {
        let perm: Permission
        switch permission ?? "rw" {
        case "r": perm = .read
        case "w": perm = .write
        case "rw": perm = .readWrite
        default: throw ControlError("bad-request", "\"perm\" must be r, w or rw")
        }
        return (BusAddress(try bus.bytes("bus")), GuestPhysicalAddress(try gpa.bytes("gpa")), try length.bytes("length"), perm)
    }
}

/// `unmap`'s arguments as the client wrote them (see `MapArguments`).
public struct UnmapArguments: Sendable, Equatable {
    public var bus: SizeArgument?
    public var length: SizeArgument?

    public init(bus: SizeArgument?, length: SizeArgument?) { self.bus = bus; self.length = length }

    public func resolved() throws(ControlError) -> (bus: BusAddress, length: UInt64) {
        (BusAddress(try bus.bytes("bus")), try length.bytes("length"))
    }
}

/// An address or length argument: a JSON number, or a size such as
/// `0x1000` or `4K`.
public enum SizeArgument: Sendable, Equatable, Codable {
    case bytes(UInt64)
    case text(String)
    /// Neither (a negative number, a list, null, ...): refused when used.
    case unusable

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let n = try? c.decode(UInt64.self), n <= UInt64(Int64.max) {
            self = .bytes(n)
        } else if let b = try? c.decode(Bool.self) {
            self = .bytes(b ? 1 : 0) // JSON booleans have always read as 1 and 0 here
        } else if let d = try? c.decode(Double.self), d >= 0, d < 0x1p63 {
            self = .bytes(UInt64(d))
        } else if let s = try? c.decode(String.self) {
            self = .text(s)
        } else {
            self = .unusable
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .bytes(let n): try c.encode(n)
        case .text(let s): try c.encode(s)
        case .unusable: try c.encodeNil()
        }
    }
}

extension Optional where Wrapped == SizeArgument {
    func bytes(_ key: String) throws(ControlError) -> UInt64 {
        switch self {
        case .bytes(let n)?: return n
        case .text(let s)?: if let v = parseByteSize(s) { return v }
        case .unusable?, nil: break
        }
        throw ControlError("bad-request", "\"\(key)\" must be a number or a size such as 0x1000 or 4K")
    }
}

extension ControlRequest: Codable {
    enum Key: String, CodingKey { case command, version, name, bridge, bus, gpa, length, perm, level }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        if let v = Self.integer(c, .version), v != ControlProtocol.version {
            throw ControlError("version", "protocol version \(v) is not supported (this daemon speaks \(ControlProtocol.version))")
        }
        guard let command = try? c.decode(String.self, forKey: .command) else {
            throw ControlError("bad-request", "missing \"command\"")
        }
        func required(_ key: Key) throws(ControlError) -> String {
            guard let v = try? c.decode(String.self, forKey: key), !v.isEmpty else { throw ControlError("bad-request", "missing \"\(key.rawValue)\"") }
            return v
        }
        func size(_ key: Key) -> SizeArgument? { (try? c.decodeIfPresent(SizeArgument.self, forKey: key)) ?? nil }
        switch command {
        case "status": self = .status
        case "list": self = .list
        case "show": self = .show(name: try required(.name))
        case "create":
            guard let bridge = try? c.decode([String: ConfigValue].self, forKey: .bridge) else {
                throw ControlError("bad-request", "missing \"bridge\" object")
            }
            self = .create(bridge: bridge)
        case "destroy": self = .destroy(name: try required(.name))
        case "map":
            self = .map(name: try required(.name), MapArguments(bus: size(.bus), gpa: size(.gpa), length: size(.length),
                                                                permission: try? c.decode(String.self, forKey: .perm)))
        case "unmap": self = .unmap(name: try required(.name), UnmapArguments(bus: size(.bus), length: size(.length)))
        case "freeze": self = .freeze(name: try required(.name))
        case "stats": self = .stats(name: try? c.decode(String.self, forKey: .name))
        case "metrics": self = .metrics
        case "reload": self = .reload
        case "log-level": self = .logLevel(try required(.level))
        default:
            throw ControlError("unknown-command", "'\(command)' is not one of \(ControlProtocol.commands.joined(separator: ", "))")
        }
    }

    /// `version` as an integer, read as leniently as it always was (a
    /// whole JSON number, or a boolean as 1 or 0); anything else is ignored.
    static func integer(_ c: KeyedDecodingContainer<Key>, _ key: Key) -> Int? {
        if let i = try? c.decode(Int.self, forKey: key) { return i }
        if let b = try? c.decode(Bool.self, forKey: key) { return b ? 1 : 0 }
        if let d = try? c.decode(Double.self, forKey: key), let i = Int(exactly: d) { return i }
        return nil
    }

    public var command: String {
        switch self {
        case .status: "status"
        case .list: "list"
        case .show: "show"
        case .create: "create"
        case .destroy: "destroy"
        case .map: "map"
        case .unmap: "unmap"
        case .freeze: "freeze"
        case .stats: "stats"
        case .metrics: "metrics"
        case .reload: "reload"
        case .logLevel: "log-level"
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: Key.self)
        try c.encode(command, forKey: .command)
        switch self {
        case .status, .list, .metrics, .reload: break
        case .show(let name), .destroy(let name), .freeze(let name): try c.encode(name, forKey: .name)
        case .stats(let name): try c.encodeIfPresent(name, forKey: .name)
        case .create(let bridge): try c.encode(bridge, forKey: .bridge)
        case .map(let name, let a):
            try c.encode(name, forKey: .name)
            try c.encodeIfPresent(a.bus, forKey: .bus)
            try c.encodeIfPresent(a.gpa, forKey: .gpa)
            try c.encodeIfPresent(a.length, forKey: .length)
            try c.encodeIfPresent(a.permission, forKey: .perm)
        case .unmap(let name, let a):
            try c.encode(name, forKey: .name)
            try c.encodeIfPresent(a.bus, forKey: .bus)
            try c.encodeIfPresent(a.length, forKey: .length)
        case .logLevel(let level): try c.encode(level, forKey: .level)
        }
    }
}
