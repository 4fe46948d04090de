@_exported import ControlWire
import FoundationEssentials
import LinuxIO

/// Talks to a daemon's control socket: one JSON line out, one back.
public final class ControlClient {
    public enum Failure: Error, CustomStringConvertible {
        case connect(String, SystemCallError)
        case io(String)
        case badResponse(String)
        public var description: String {
            switch self {
            case .connect(let path, let e): "cannot reach the daemon at \(path): \(e)"
            case .io(let s): "control socket: \(s)"
            case .badResponse(let s): "the daemon's answer is not a control response: \(s)"
            }
        }
    }

    let socket: UnixSocket
    var buffer: [UInt8] = []

    public init(path: String) throws(Failure) {
        do { socket = try UnixSocket.connect(path: path) } catch { throw .connect(path, error) }
    }

    /// Sends `request` and returns the daemon's reply, its result decoded as
    /// `Result`, with the response line as it came (what `--json` prints).
    public func call<Result: Decodable>(_ request: ControlRequest, expecting _: Result.Type = Result.self)
        throws(Failure) -> (reply: ControlReply<Result>, line: String) {
        guard let text = ControlProtocol.encode(request) else { throw .io("cannot encode the request") }
        let line = try callRaw(text)
        guard let reply = ControlReply<Result>(line: line) else { throw .badResponse(line) }
        return (reply, line)
    }

    /// Sends one raw line and returns the raw response line.
    public func callRaw(_ line: String) throws(Failure) -> String {
        do { try socket.send(Array((line + "\n").utf8)) } catch { throw .io("\(error)") }
        while true {
            if let nl = buffer.firstIndex(of: 10) {
                let out = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                return out
            }
            let chunk: ReceivedMessage
            do { chunk = try socket.receive(maxBytes: 65536, maxFDs: 0) } catch { throw .io("\(error)") }
            if chunk.bytes.isEmpty { throw .io("the daemon closed the connection") }
            buffer += chunk.bytes
        }
    }
}

/// Formats control responses for people (pure, snapshot-tested).
public enum Render {
    /// Left-aligned columns, two spaces apart, with a header row.
    public static func table(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in i == cells.count - 1 ? c : padded(c, widths[i]) }
                .joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n") + "\n"
    }

    /// `text` with spaces after it up to `width` characters.
    static func padded(_ text: String, _ width: Int) -> String {
        text + String(repeating: " ", count: max(0, width - text.count))
    }

    /// `key: value` lines, keys aligned, sorted: every key of a result
    /// object (`status`, `show`, one bridge's `stats`, `reload`).
    public static func keyValues(_ result: some Encodable) -> String {
        guard case .mapping(let object)? = tree(result) else { return "" }
        return keyValues(object)
    }

    public static func keyValues(_ object: [String: ConfigValue]) -> String {
        let keys = object.keys.sorted()
        let width = keys.map(\.count).max() ?? 0
        return keys.map { k in "\(padded(k, width))  \(scalar(object[k] ?? .null))" }
            .joined(separator: "\n") + "\n"
    }

    /// A typed result as the JSON value it is on the wire.
    static func tree(_ value: some Encodable) -> ConfigValue? {
        guard let data = try? JSONEncoder().encode(value) else { return nil }
        return try? JSONDecoder().decode(ConfigValue.self, from: data)
    }

    public static func scalar(_ v: ConfigValue) -> String {
        switch v {
        case .bool(let b): b ? "yes" : "no"
        case .int(let i): String(i)
        case .double(let d): String(d)
        case .string(let s): s.isEmpty ? "-" : s
        case .list(let a): a.isEmpty ? "-" : a.map(scalar).joined(separator: ",")
        case .mapping(let d): d.isEmpty ? "-" : d.keys.sorted().map { "\($0)=\(scalar(d[$0] ?? .null))" }.joined(separator: " ")
        case .null: "-"
        }
    }

    /// Bytes as people read them (exact binary units, or plain bytes).
    public static func bytes(_ n: UInt64) -> String {
        for (size, unit) in [(UInt64(1) << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")] where n >= size && n % size == 0 {
            return "\(n / size)\(unit)"
        }
        return "\(n)"
    }

    static func upDown(_ connected: Bool) -> String { connected ? "up" : "down" }

    /// The `list` table.
    public static func list(_ bridges: [BridgeSummary]) -> String {
        table(["NAME", "MODE", "BAR", "VM1", "VM2", "MAPPINGS", "MAPPED", "VHOST-USER SOCKET"], bridges.map { b in
            [scalar(.string(b.name)), scalar(.string(b.mode)), bytes(b.barSize), upDown(b.vm1Connected), upDown(b.vm2Connected),
             String(b.mappings), bytes(b.bytesMapped), scalar(.string(b.vhostUserSocket))]
        })
    }

    /// The `stats` table (one row per bridge).
    public static func stats(_ bridges: [BridgeCounters]) -> String {
        table(["NAME", "SESSIONS", "REQUESTS", "IOTLB UPD", "IOTLB INV", "MISSES", "REFUSED", "KICKS", "CALLS", "REVOKE TIMEOUTS"], bridges.map { b in
            [scalar(.string(b.name)), String(b.sessionsServed), String(b.requests), String(b.iotlbUpdates), String(b.iotlbInvalidates),
             String(b.iotlbMisses), String(b.refusals.values.reduce(0, +)), String(b.kicksRelayed), String(b.callsRelayed),
             String(b.revocationTimeouts)]
        })
    }
}
