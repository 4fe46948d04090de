import BridgeCore
import LinuxIO
import Logging

/// The control socket: a Unix stream socket, one JSON request per line, one
/// JSON response per line. Peers are checked with SO_PEERCRED: root, or a
/// member of the configured group (primary or supplementary); anyone else gets a
/// `denied` error, is logged and disconnected.
public final class ControlServer: Sendable {
    public typealias Authorizer = @Sendable (PeerCredentials) -> Bool

    private let listener: UnixSocket
    private let controller: DaemonController
    private let logger: Logger
    private let authorize: Authorizer
    private let reloadConfig: @Sendable () -> Result<DaemonConfig, ControlError>
    /// Connection threads are detached (one per CLI call adds up); `stop`
    /// waits for `connections` to drain instead of joining them.
    private let state = Locked<(stopping: Bool, connections: [UnixSocket])>((false, []))
    private let acceptThread = Locked<JoinableThread?>(nil)
    /// Signalled whenever a connection thread ends (`stop` waits for none to be left).
    private let connectionEnded: EventFD
    public let path: String

    /// The default policy: uid 0, or a member of the given group — as its
    /// primary group or a supplementary one (SO_PEERGROUPS).
    public static func policy(group: UInt32?) -> Authorizer {
        { creds in
            guard let group else { return creds.uid == 0 }
            return PeerAccess(allowedGroups: [group]).admits(uid: creds.uid, gid: creds.gid, groups: creds.groups)
        }
    }

    public init(path: String, mode: UInt32, group: UInt32?, controller: DaemonController, logger: Logger,
                authorize: Authorizer? = nil,
                reloadConfig: @escaping @Sendable () -> Result<DaemonConfig, ControlError> = { .failure(ControlError("no-config", "the daemon was not started with --config")) }) throws(SystemCallError) {
        self.path = path
        connectionEnded = try EventFD()
        listener = try UnixSocket.listen(path: path, requireSafeDirectory: true)
        if let file = listener.boundFile {
            do { try SocketPermissions.apply(to: file, mode: mode, group: group) } catch { file.remove(); throw error }
        }
        self.controller = controller
        self.logger = logger
        self.authorize = authorize ?? ControlServer.policy(group: group)
        self.reloadConfig = reloadConfig
        let t = try JoinableThread(name: "control") { [self] in self.acceptLoop() }
        acceptThread.withLock { $0 = t }
    }

    private func acceptLoop() {
        while !state.withLock({ $0.stopping }) {
            let connection: UnixSocket
            do { connection = try listener.accept() } catch {
                if error.isResourceExhaustion {
                    logger.warning("control socket: accept failed: \(error); retrying in \(SystemCallError.acceptBackoffMilliseconds) ms")
                    Sleep.for(.milliseconds(Int(SystemCallError.acceptBackoffMilliseconds)))
                }
                continue
            }
            let accepted = state.withLock { s -> Bool in
                guard !s.stopping else { return false }
                s.connections.append(connection)
                return true
            }
            guard accepted else { try? connection.fd.close(); break }
            if let t = try? JoinableThread(name: "control-conn", { [self] in self.serve(connection) }) {
                t.detach()
            } else {
                state.withLock { s in s.connections.removeAll { $0.fd === connection.fd } }
                try? connection.fd.close()
            }
        }
    }

    private func serve(_ connection: UnixSocket) {
        defer {
            state.withLock { s in s.connections.removeAll { $0.fd === connection.fd } }
            try? connection.fd.close()
            _ = try? connectionEnded.signal()
        }
        guard let creds = try? connection.peerCredentials() else { return }
        guard authorize(creds) else {
            logger.warning("control socket: refused pid \(creds.pid) uid \(creds.uid) gid \(creds.gid) (not root or the control group)")
            try? connection.send(Array((ControlProtocol.response(error: ControlError("denied", "uid \(creds.uid) gid \(creds.gid) may not use this control socket")) + "\n").utf8))
            return
        }
        var buffer: [UInt8] = []
        var discarding = false
        while true {
            guard let chunk = try? connection.receive(maxBytes: 16384, maxFDs: 0), !chunk.bytes.isEmpty else { return }
            buffer += chunk.bytes
            while let newline = buffer.firstIndex(of: 10) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                if discarding { discarding = false; continue }
                let text = String(decoding: line, as: UTF8.self)
                guard !text.trimmingSpaces.isEmpty else { continue }
                let reply = controller.handle(line: text, reloadConfig: reloadConfig)
                guard (try? connection.send(Array((reply + "\n").utf8))) != nil else { return }
            }
            if buffer.count > ControlProtocol.maximumLine {
                // Too long: answer once, drop the rest of that line, keep the connection.
                let reply = ControlProtocol.response(error: ControlError("too-long", "request line exceeds \(ControlProtocol.maximumLine) bytes"))
                guard (try? connection.send(Array((reply + "\n").utf8))) != nil else { return }
                buffer = []
                discarding = true
            }
        }
    }

    public func stop() {
        let (connections, _) = state.withLock { s -> ([UnixSocket], Bool) in
            s.stopping = true
            return (s.connections, true)
        }
        listener.shutdown()
        for c in connections { c.shutdown() }
        let t = acceptThread.withLock { t -> JoinableThread? in defer { t = nil }; return t }
        t?.join()
        _ = connectionEnded.wait(until: .now.advanced(by: .seconds(2))) { state.withLock { $0.connections.isEmpty } ? true : nil }
        listener.boundFile?.remove()
    }
}
