import LinuxIO

/// A listener's accept with its back-off, written once for every accept
/// loop: out of fds or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the
/// listener stays readable, so the loop stops watching it for a moment
/// instead of spinning — counted and logged by `ConnectionAdmission`.
struct AcceptGate {
    let which: String
    /// While set, the listener is not watched.
    private(set) var pausedUntil: ContinuousClock.Instant?

    init(_ which: String) { self.which = which }

    /// Whether the listener is watched at `now` (the pause ends by itself).
    mutating func isOpen(now: ContinuousClock.Instant) -> Bool {
        if let until = pausedUntil, now >= until { pausedUntil = nil }
        return pausedUntil == nil
    }

    /// Accepts one connection; nil when there was none to take or accept
    /// failed (a resource failure closes the gate for a moment).
    mutating func accept(_ listener: UnixSocket, admission: ConnectionAdmission) -> UnixSocket? {
        do {
            return try listener.accept()
        } catch {
            if error.isResourceExhaustion { pausedUntil = admission.pauseAccepting(which, error) }
            return nil
        }
    }
}

/// What reaches a bridge thread from other threads, through its one
/// mailbox: operator commands (answered) and VM2's events from the peer
/// thread (posted).
enum BridgeMessage: Sendable {
    case command(BridgeCommand)
    case peer(PeerLink.Event)
}

typealias BridgeInbox = Mailbox<BridgeMessage, Result<String, BridgeCommandError>>
