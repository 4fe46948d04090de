import CLinuxShim
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET. Does
/// nothing when the daemon does not run under systemd (no NOTIFY_SOCKET).
public final class SystemdNotifier: Sendable {
    public let socketPath: String?
    private let sender: DatagramSender?

    /// `environment` is a seam for tests (defaults to the process environment).
    public init(environment: [String: String]? = nil) {
        let env = environment ?? SystemdNotifier.processEnvironment()
        socketPath = env["NOTIFY_SOCKET"].flatMap { $0.isEmpty ? nil : $0 }
        sender = socketPath.flatMap(DatagramSender.init(path:))
    }

    public var isActive: Bool { sender != nil }

    /// Sends state lines such as "READY=1", "STATUS=…", "STOPPING=1".
    @discardableResult
    public func notify(_ lines: String...) -> Bool {
        sender?.send(Array(lines.joined(separator: "\n").utf8)) ?? false
    }

    /// The watchdog interval from $WATCHDOG_USEC (when $WATCHDOG_PID is unset
    /// or names this process), in microseconds.
    public static func watchdogMicroseconds(environment: [String: String]? = nil) -> UInt64? {
        let env = environment ?? processEnvironment()
        guard let text = env["WATCHDOG_USEC"], let usec = UInt64(text), usec > 0 else { return nil }
        if let pid = env["WATCHDOG_PID"], let p = Int32(pid), p != getpid() { return nil }
        return usec
    }

    public static func processEnvironment() -> [String: String] {
        var out: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { out[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return out
    }
}
