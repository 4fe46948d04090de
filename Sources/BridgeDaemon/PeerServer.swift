import BridgeCore
import LinuxIO
import Logging
import PeerProtocol
import Synchronization

/// The VM2 side of a bridge, on its own thread (the *peer thread*): accepts
/// VM2 connections on the peer socket, one at a time, checks who they are,
/// and reads their messages. Requests go to the bridge thread through
/// `PeerLink` (events, acks, ring stops; an ack may send VM1's held reply);
/// this type never touches bridge state, and it owns the listener and the
/// active VM2's socket.
///
/// Sendable without `@unchecked`: immutable references to Sendable types and
/// an `Atomic` stop flag.
final class PeerServer: Sendable {
    private let listener: UnixSocket
    private let peer: PeerLink
    private let settings: BridgeSettings
    private let admission: ConnectionAdmission
    private let logger: Logger
    private let stopFlag = Atomic<Bool>(false)

    init(listener: UnixSocket, peer: PeerLink, settings: BridgeSettings, admission: ConnectionAdmission, logger: Logger) {
        self.listener = listener
        self.peer = peer
        self.settings = settings
        self.admission = admission
        var logger = logger
        logger[metadataKey: "peer"] = "vm2" // journald PEER=vm2
        self.logger = logger
    }

    private var stopping: Bool { stopFlag.load(ordering: .acquiring) }

    /// Stops accepting and ends `run` (the active VM2 is detached). Safe from any thread.
    func stop() {
        stopFlag.store(true, ordering: .releasing)
        listener.shutdown()
    }

    /// What the peer thread waits on.
    private enum LoopSource { case listener, vm2 }

    /// Runs until `stop()`.
    func run() {
        var active: (socket: UnixSocket, generation: Int)?
        var accepting = AcceptGate("peer")
        while !stopping {
            let now = ContinuousClock.now
            var sources: [(LoopSource, Int32)] = []
            if accepting.isOpen(now: now) { sources.append((.listener, listener.fd.rawValue)) }
            // A VM2 that sends faster than the bridge thread takes its
            // requests is not read until the queue drains: its messages wait
            // in its socket, not in the daemon's memory.
            let throttled = peer.queuedEvents >= settings.maxPendingTranslations
            if let active, !throttled { sources.append((.vm2, active.socket.fd.rawValue)) }
            let polled = active?.generation // a VM2 attached below was not polled
            // Woken by `stop()` (the listener's shutdown); a pause or the
            // throttle is looked at again when it may have ended.
            let wake = throttled ? now.advanced(by: .milliseconds(5)) : accepting.pausedUntil ?? now.advanced(by: .seconds(1))
            guard let ready = try? Poll.ready(sources, until: wake, now: now) else { continue }
            if stopping { break }
            for source in ready {
                switch source {
                case .listener:
                    guard let socket = accepting.accept(listener, admission: admission) else { continue }
                    admit(socket, replacing: &active)
                case .vm2:
                    guard let current = active, current.generation == polled,
                          let reason = read(current.socket, generation: current.generation) else { continue }
                    peer.detach(generation: current.generation, reason: reason)
                    active = nil
                }
            }
        }
        if let active { peer.detach(generation: active.generation, reason: "bridge stopping") }
    }

    /// A new VM2 connection: checked against the allow-lists, attached (it
    /// becomes `active`), or refused as busy while another one is attached.
    private func admit(_ socket: UnixSocket, replacing active: inout (socket: UnixSocket, generation: Int)?) {
        let (admitted, creds) = admission.admits(socket, settings.vm2Access, "peer")
        guard admitted else {
            PeerLink.sendError(socket, .protocolError, "bridge \(settings.name): this user may not connect as VM2")
            try? socket.fd.close()
            return
        }
        // Every message to and from VM2 has a deadline (PeerLink's
        // `messageDeadline`): one that stops reading, or drips a message,
        // is disconnected at its next message.
        let process = settings.vm2DeadlineAction == .kill ? processToKill(socket, creds) : nil
        var attached = peer.attach(socket, process: process)
        // A VM2 that reconnects the instant it closed: its old connection's
        // end may not have been read yet.
        if attached == nil, finishIfEnded(&active) {
            attached = peer.attach(socket, process: process)
        }
        if let generation = attached {
            active = (socket, generation)
            logger.info("VM2 connected (\(creds.map { "pid \($0.pid) uid \($0.uid)" } ?? "unknown peer"))")
        } else {
            PeerLink.sendError(socket, .busy, "bridge \(settings.name) already has a VM2")
            try? socket.fd.close()
            logger.warning("refused a second VM2 connection")
        }
    }

    /// The VMM a `kill` would hit: the process that connected (SO_PEERPIDFD,
    /// taken by the kernel at connect). Without it (Linux < 6.5) the pid
    /// SO_PEERCRED recorded at connect is opened now, which can name another
    /// process if the VMM exited meanwhile — said at start-up and in
    /// docs/security.md. Either way it is the process that connected, not
    /// one it handed the socket to.
    private func processToKill(_ socket: UnixSocket, _ creds: PeerCredentials?) -> ProcessHandle? {
        do {
            return try ProcessHandle(peerOf: socket)
        } catch where error.errno == .protocolNotAvailable {
            guard let pid = creds?.pid, pid > 0 else { return nil }
            do { return try ProcessHandle(pid: pid) } catch {
                logger.warning("no pidfd for VM2 pid \(pid): \(error); it can only be disconnected")
                return nil
            }
        } catch {
            logger.warning("no pidfd for the VM2 that connected: \(error); it can only be disconnected")
            return nil
        }
    }

    /// Reads what the active VM2 left before it closed; true when its
    /// connection is over (detached). Bounded: a VM2 still talking is left
    /// to the loop.
    private func finishIfEnded(_ active: inout (socket: UnixSocket, generation: Int)?) -> Bool {
        for _ in 0..<64 {
            guard let current = active,
                  let ready = try? Poll.readable([current.socket.fd.rawValue], timeoutMilliseconds: 0), ready[0] else { return false }
            if let reason = read(current.socket, generation: current.generation) {
                peer.detach(generation: current.generation, reason: reason)
                active = nil
                return true
            }
        }
        return false
    }

    /// Reads one message from VM2 and hands it to the connection's session
    /// (through `PeerLink`, which carries out what follows); returns a reason
    /// when the connection is over.
    private func read(_ socket: UnixSocket, generation: Int) -> String? {
        do {
            var parsed: (PeerCodec.Header, PeerMessageType)?
            let within = Int(peer.messageDeadline / .milliseconds(1))
            guard let framed = try socket.receiveFramed(within: within, payloadSize: { bytes in
                let v = try PeerCodec.validate(header: bytes)
                parsed = v
                return Int(v.0.size)
            }), let (header, type) = parsed else { return "closed" }
            let message = try PeerCodec.decode(header, type, payload: framed.payload, fdCount: framed.fds.count)
            return peer.received(message, replyFlag: header.isReply, generation: generation, on: socket)
        } catch let e as SystemCallError where e.errno == .connectionReset {
            // VM2 closed its end with data unread (it finished, or died):
            // it hung up, an ordinary end, not a protocol error.
            return "closed (connection reset)"
        } catch {
            if stopping { return "bridge stopping" }
            let rule = if let e = error as? FramingError, case .tooSlow = e { "message-deadline" } else { "peer-protocol" }
            return peer.unreadable("\(error)", rule: rule, generation: generation, on: socket)
        }
    }
}
