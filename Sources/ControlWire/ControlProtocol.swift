import FoundationEssentials

/// The control socket's protocol (docs/operating.md): one JSON object per
/// line each way. Request `{"command": "...", ...}` (`ControlRequest`);
/// response `{"version": 1, "ok": true, "result": ...}` or
/// `{"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}`
/// (`ControlReply`), keys sorted.
public enum ControlProtocol {
    public static let version = 1
    /// Longest request line accepted; longer ones get an error and are discarded.
    public static let maximumLine = 65_536
    public static let commands = ["status", "list", "show", "create", "destroy", "map", "unmap", "freeze", "stats", "metrics", "reload", "log-level"]

    public static func response(ok result: some Encodable) -> String {
        encode(Success(result: result)) ?? unencodable
    }

    public static func response(error: ControlError) -> String {
        encode(Failure(error: error)) ?? unencodable
    }

    /// Compact JSON with sorted keys: what goes on the wire and into files.
    public static func encode(_ value: some Encodable, pretty: Bool = false) -> String? {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.sortedKeys, .prettyPrinted] : [.sortedKeys]
        return (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) }
    }

    /// A JSON coding error as one line for people: what is wrong and at
    /// which key, without the Swift type dump `DecodingError` prints.
    public static func describe(_ error: any Error) -> String {
        func at(_ path: [any CodingKey]) -> String {
            path.isEmpty ? "" : " (at " + path.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined() + ")"
        }
        switch error {
        case DecodingError.dataCorrupted(let c), DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
            return c.debugDescription + at(c.codingPath)
        case DecodingError.keyNotFound(let key, let c):
            return "no key '\(key.stringValue)'" + at(c.codingPath)
        case EncodingError.invalidValue(_, let c):
            return c.debugDescription + at(c.codingPath)
        default:
            return "\(error)"
        }
    }

    static let unencodable = #"{"error":{"code":"internal","message":"unencodable response"},"ok":false,"version":1}"#

    struct Success<Result: Encodable>: Encodable {
        var version = ControlProtocol.version
        var ok = true
        var result: Result
    }

    struct Failure: Encodable {
        var version = ControlProtocol.version
        var ok = false
        var error: ControlError
    }
}

/// A refused control request: the wire's `error` object.
public struct ControlError: Error, Equatable, Sendable, Codable, CustomStringConvertible {
    public var code: String
    public var message: String
    public init(_ code: String, _ message: String) { self.code = code; self.message = message }
    public var description: String { "\(code): \(message)" }
}

/// A response as a client reads it: the result, typed, or the daemon's error.
public enum ControlReply<Result: Decodable>: Decodable {
    case ok(Result)
    case refused(ControlError)

    enum CodingKeys: String, CodingKey { case ok, result, error }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        if try c.decode(Bool.self, forKey: .ok) {
            self = .ok(try c.decode(Result.self, forKey: .result))
        } else {
            self = .refused(try c.decode(ControlError.self, forKey: .error))
        }
    }

    /// Parses one response line; nil when it is not a control response.
    public init?(line: String) {
        guard let reply = try? JSONDecoder().decode(Self.self, from: Data(line.utf8)) else { return nil }
        self = reply
    }
}
