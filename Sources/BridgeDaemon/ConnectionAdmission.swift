import BridgeCore
import LinuxIO
import Logging

/// Who gets in on a bridge's sockets, and what happens when the process is
/// out of fds: shared by the vhost-user side (bridge thread) and the VM2 side
/// (peer thread), with their counters.
///
/// Sendable without `@unchecked`: the counters are behind a `Locked` (pthread mutex).
final class ConnectionAdmission: Sendable {
    private let logger: Logger
    private let counters = Locked((acceptFailures: 0, accessDenied: 0))

    init(logger: Logger) { self.logger = logger }

    var acceptFailures: Int { counters.withLock { $0.acceptFailures } }
    var accessDenied: Int { counters.withLock { $0.accessDenied } }

    /// Owner, group and mode of a socket file the bridge bound (when the
    /// access sets any): on that very file, never through a symlink.
    static func applyPermissions(_ access: PeerAccess, to file: BoundSocketFile) throws(SystemCallError) {
        guard access.setsPermissions else { return }
        try SocketPermissions.apply(to: file, mode: access.mode ?? (access.group != nil ? 0o660 : 0o600),
                                    group: access.group, owner: access.owner)
    }

    /// SO_PEERCRED against the socket's allow-lists; a refused peer is
    /// logged, counted and closed by the caller.
    func admits(_ connection: UnixSocket, _ access: PeerAccess, _ which: String) -> (Bool, PeerCredentials?) {
        let creds = try? connection.peerCredentials()
        guard let creds else {
            if access.allowedUsers.isEmpty && access.allowedGroups.isEmpty { return (true, nil) }
            counters.withLock { $0.accessDenied += 1 }
            logger.warning("refused a \(which) connection: its credentials cannot be read")
            return (false, nil)
        }
        guard access.admits(uid: creds.uid, gid: creds.gid, groups: creds.groups) else {
            counters.withLock { $0.accessDenied += 1 }
            logger.warning("refused a \(which) connection from pid \(creds.pid) uid \(creds.uid) gid \(creds.gid): not in the allow-lists",
                           metadata: ["rule": "peer-credentials"])
            return (false, creds)
        }
        return (true, creds)
    }

    /// Out of fds (or kernel memory): the listener stays readable, so stop
    /// polling it for a moment instead of spinning; counted and logged.
    /// Returns when to poll it again.
    func pauseAccepting(_ which: String, _ error: SystemCallError) -> ContinuousClock.Instant {
        counters.withLock { $0.acceptFailures += 1 }
        logger.warning("\(which) socket: accept failed: \(error); retrying in \(SystemCallError.acceptBackoffMilliseconds) ms")
        return ContinuousClock.now.advanced(by: .milliseconds(Int(SystemCallError.acceptBackoffMilliseconds)))
    }
}
