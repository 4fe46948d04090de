import Foundation
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

    /// Sends `request` (a JSON object) and returns the parsed response object.
    public func call(_ request: [String: Any]) throws(Failure) -> [String: Any] {
        guard let data = try? JSONSerialization.data(withJSONObject: request, options: [.sortedKeys]) else {
            throw .io("cannot encode the request")
        }
        let line = try callRaw(String(decoding: data, as: UTF8.self))
        guard let object = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { throw .badResponse(line) }
        return object
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
            cells.enumerated().map { i, c in i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                .joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n") + "\n"
    }

    /// `key: value` lines, keys aligned, sorted.
    public static func keyValues(_ object: [String: Any]) -> String {
        let keys = object.keys.sorted()
        let width = keys.map(\.count).max() ?? 0
        return keys.map { k in "\(k.padding(toLength: width, withPad: " ", startingAt: 0))  \(scalar(object[k] as Any))" }
            .joined(separator: "\n") + "\n"
    }

    public static func scalar(_ v: Any) -> String {
        switch v {
        case let n as NSNumber:
            // JSONSerialization's booleans are NSNumbers of type char.
            if String(cString: n.objCType) == "c" { return n.boolValue ? "yes" : "no" }
            return n.stringValue
        case let b as Bool: return b ? "yes" : "no"
        case let s as String: return s.isEmpty ? "-" : s
        case let a as [Any]: return a.isEmpty ? "-" : a.map(scalar).joined(separator: ",")
        case let d as [String: Any]:
            return d.isEmpty ? "-" : d.keys.sorted().map { "\($0)=\(scalar(d[$0] as Any))" }.joined(separator: " ")
        default: return "-"
        }
    }

    /// Bytes as people read them (exact binary units, or plain bytes).
    public static func bytes(_ v: Any?) -> String {
        guard let n = (v as? NSNumber)?.uint64Value else { return "-" }
        for (size, unit) in [(UInt64(1) << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")] where n >= size && n % size == 0 {
            return "\(n / size)\(unit)"
        }
        return "\(n)"
    }

    /// The `list` table.
    public static func list(_ bridges: [[String: Any]]) -> String {
        table(["NAME", "MODE", "BAR", "VM1", "VM2", "MAPPINGS", "MAPPED", "VHOST-USER SOCKET"], bridges.map { b in
            [scalar(b["name"] as Any), scalar(b["mode"] as Any), bytes(b["barSize"]),
             scalar(b["vm1Connected"] as Any) == "yes" ? "up" : "down", scalar(b["vm2Connected"] as Any) == "yes" ? "up" : "down",
             scalar(b["mappings"] as Any), bytes(b["bytesMapped"]), scalar(b["vhostUserSocket"] as Any)]
        })
    }

    /// The `stats` table (one row per bridge).
    public static func stats(_ bridges: [[String: Any]]) -> String {
        table(["NAME", "SESSIONS", "REQUESTS", "IOTLB UPD", "IOTLB INV", "MISSES", "REFUSED", "KICKS", "CALLS", "REVOKE TIMEOUTS"], bridges.map { b in
            let refused = (b["refusals"] as? [String: Any])?.values.compactMap { ($0 as? NSNumber)?.intValue }.reduce(0, +) ?? 0
            return [scalar(b["name"] as Any), scalar(b["sessionsServed"] as Any), scalar(b["requests"] as Any),
                    scalar(b["iotlbUpdates"] as Any), scalar(b["iotlbInvalidates"] as Any), scalar(b["iotlbMisses"] as Any),
                    "\(refused)", scalar(b["kicksRelayed"] as Any), scalar(b["callsRelayed"] as Any), scalar(b["revocationTimeouts"] as Any)]
        })
    }
}
