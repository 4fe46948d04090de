import BridgeCore
import LinuxIO
import Logging
import Synchronization
import PeerProtocol
import VhostUser

/// One bridge: a BAR window reserved once for the bridge's lifetime, a
/// vhost-user socket with one front-end session at a time, and a peer socket
/// with one VM2 at a time.
///
/// Threads: the *bridge thread* (`serve`) owns the session and does all the
/// work, waking on the vhost-user socket, on VM2 events, and on stop; the
/// *peer thread* reads VM2's socket and posts events, and sends VM1's ack to
/// a revocation the moment it reads VM2's ACK (`PeerLink`). When a session
/// ends, everything it mapped (in the window and in VM2) and every fd it held
/// are released, and the next front end may connect.
public final class Bridge: Sendable {
    public let settings: BridgeSettings
    public let window: BARWindow
    private let logger: Logger
    private let listener: UnixSocket?
    private let peerServer: PeerServer?
    /// The socket files this bridge bound (removed only while still those files).
    private let socketFiles: [BoundSocketFile]
    private let admission: ConnectionAdmission
    private let peer: PeerLink
    private let relay: NotificationRelay?
    private let stopSignal: EventFD
    private let mappingBudget: MappingBudget
    private let budgetID: MappingBudget.ID
    private struct State {
        var stopping = false
        /// `serve` ran (it gives back the relay and socket files when it ends).
        var served = false
        var statistics = BridgeStatistics()
    }
    /// The bridge thread's one mailbox: operator commands (answered) and
    /// VM2's events from the peer thread (posted).
    private let inbox: BridgeInbox
    /// How long `perform` waits for the bridge thread.
    public static let commandDeadline: Duration = .seconds(10)
    private let state = Locked(State())

    /// Validates the settings, reserves the BAR, and starts listening on the
    /// vhost-user and peer sockets.
    /// `mappingBudget`: shared by every bridge of the process (tests give a
    /// group of bridges a small one of their own).
    public init(_ settings: BridgeSettings, logger: Logger, mappingBudget: MappingBudget = .process) throws(BridgeError) {
        do { try settings.backend.addressSpace.validate() } catch { throw .configuration(settings.name, error) }
        self.settings = settings
        self.mappingBudget = mappingBudget
        var logger = logger
        logger[metadataKey: "bridge"] = "\(settings.name)"
        self.logger = logger
        admission = ConnectionAdmission(logger: logger)
        // The model's pages must be whole host pages, or a revocation of one
        // model page could not be carried out exactly (e.g. 4 KiB pages on a
        // 64 KiB-page host).
        guard settings.backend.addressSpace.pageSize >= BARWindow.hostPageSize,
              settings.backend.addressSpace.pageSize % BARWindow.hostPageSize == 0 else {
            throw .window(settings.name, .misaligned(BusAddress(0), length: settings.backend.addressSpace.pageSize, hostPageSize: BARWindow.hostPageSize))
        }
        do { window = try BARWindow(size: settings.backend.addressSpace.barSize) } catch { throw .window(settings.name, error) }
        do {
            let policy = PeerSession.Policy(
                offeredDeviceFeatures: VirtioNetFeatures(rawValue: settings.backend.offeredFeatures).intersection(.allDevice),
                killOnMissedDeadline: settings.vm2DeadlineAction == .kill,
                revocationDeadline: .milliseconds(settings.revocationDeadlineMilliseconds),
                revocationSpin: .microseconds(max(0, settings.revocationSpinMicroseconds)))
            let inbox = try BridgeInbox()
            self.inbox = inbox
            peer = try PeerLink(logger: logger, policy: policy, inbox: inbox)
            stopSignal = try EventFD()
        } catch { throw .socket(settings.name, "eventfd", error) }
        let relay: NotificationRelay?
        if settings.notifications == .passthrough {
            relay = nil
        } else {
            do {
                relay = try NotificationRelay(mode: settings.notifications, busyPollMicroseconds: settings.busyPollMicroseconds,
                                              entries: NotificationRelay.ringEntries(vrings: settings.backend.vringCount),
                                              cpus: settings.cpuAffinity, logger: logger)
            } catch { throw .relay(settings.name, error) }
        }
        // From here a failure gives back what was started: the relay's
        // thread holds the relay, so dropping it would not stop it (each
        // failed start left a thread, an io_uring ring and its eventfds),
        // and a socket file made here is removed.
        do {
            (listener, peerServer, socketFiles) = try Self.listen(settings, peer: peer, admission: admission, logger: logger)
        } catch {
            relay?.stop()
            throw error
        }
        self.relay = relay
        budgetID = mappingBudget.register() // last: a failed init registers nothing
    }

    /// The vhost-user listener (none for a client or `--fd` bridge) and the
    /// peer server. On failure no socket file made here is left.
    private static func listen(_ settings: BridgeSettings, peer: PeerLink, admission: ConnectionAdmission,
                               logger: Logger) throws(BridgeError) -> (UnixSocket?, PeerServer?, [BoundSocketFile]) {
        var listener: UnixSocket?
        if let path = settings.socketPath, !settings.client {
            listener = try listening(at: path, settings.vm1Access, bridge: settings.name, role: "vhost-user")
        }
        guard let path = settings.peerSocketPath else { return (listener, nil, [listener?.boundFile].compactMap { $0 }) }
        do throws(BridgeError) {
            let peerListener = try listening(at: path, settings.vm2Access, bridge: settings.name, role: "peer")
            return (listener, PeerServer(listener: peerListener, peer: peer, settings: settings, admission: admission, logger: logger),
                    [listener?.boundFile, peerListener.boundFile].compactMap { $0 })
        } catch {
            listener?.boundFile?.remove()
            throw error
        }
    }

    /// A listening socket at `path` with `access` applied; when the
    /// permissions cannot be set, the socket file made here is removed.
    private static func listening(at path: String, _ access: PeerAccess, bridge: String, role: String) throws(BridgeError) -> UnixSocket {
        let socket: UnixSocket
        do { socket = try UnixSocket.listen(path: path, requireSafeDirectory: true) } catch { throw .socket(bridge, role, error) }
        guard let file = socket.boundFile else { return socket }
        do { try ConnectionAdmission.applyPermissions(access, to: file) } catch {
            file.remove()
            throw .socket(bridge, role, error)
        }
        return socket
    }

    /// A bridge that was never served (its thread could not be started)
    /// still holds a running relay and its socket files: given back here.
    /// After `serve`, both are already gone.
    deinit {
        if !state.withLock({ $0.served }) {
            relay?.stop()
            removeSocketFiles()
        }
        mappingBudget.unregister(budgetID)
    }

    /// Removes the socket files this bridge bound (a client's path is not its own).
    private func removeSocketFiles() {
        for file in socketFiles { file.remove() }
    }

    public var statistics: BridgeStatistics {
        var s = state.withLock { $0.statistics }
        s.peer = peer.statistics
        s.acceptFailures = admission.acceptFailures
        s.accessDenied = admission.accessDenied
        s.notificationMode = settings.notifications
        s.relayEngine = relay?.engine
        if let view = s.session {
            add(relayStatistics(view), to: &s)
            s.add(view.statistics) // the live session's counters, on top of the finished sessions'
        }
        return s
    }

    private var stopping: Bool { state.withLock { $0.stopping } }

    /// Runs the bridge until `stop()`: accepts front ends one after another
    /// (or serves `connection` only, for `--fd`), and VM2s on a second thread.
    public func serve(connection inherited: UnixSocket? = nil) {
        logger.info("serving \(settings.socketPath ?? "an inherited socket") (\(settings.backend.addressSpace.mode) mode, BAR \(ByteCount(settings.backend.addressSpace.barSize)))\(settings.peerSocketPath.map { ", VM2 on \($0)" } ?? "")")
        state.withLock { $0.served = true }
        if settings.vm2DeadlineAction == .kill, settings.peerSocketPath != nil {
            if ProcessHandle.peerPidfdSupported {
                logger.info("vm2-deadline-action kill: a VM2 that misses a deadline is killed through the pidfd the kernel took when it connected (SO_PEERPIDFD); a process it handed its socket to is not")
            } else {
                logger.warning("vm2-deadline-action kill: this kernel has no SO_PEERPIDFD (Linux 6.5+): the VMM is found by the pid recorded at connect, which another process may hold by then if the VMM exited before it was accepted; a process it handed its socket to is never killed")
            }
        }
        let peerThread = peerServer.flatMap { server in try? JoinableThread(name: "peer-\(settings.name)") { server.run() } }
        var connection: VhostUserConnection?
        var accepting = AcceptGate("vhost-user")
        var timers = DeadlineHeap<LoopTimer>()
        var pendingConnection = inherited
        var servedInherited = false
        loop: while !stopping {
            peer.heartbeat.beat()
            peer.beginPass() // this pass's TRANSLATE replies: one message deadline in all
            if connection == nil, let c = pendingConnection {
                pendingConnection = nil
                servedInherited = true
                connection = open(c)
            }
            if connection == nil, inherited != nil, servedInherited { break } // --fd: one connection only
            let now = ContinuousClock.now
            if connection == nil, inherited == nil, settings.client, let path = settings.socketPath, timers.due(.frontEndRetry) == nil {
                if let c = try? UnixSocket.connect(path: path) {
                    connection = open(c)
                } else {
                    timers.schedule(.frontEndRetry, at: now.advanced(by: .milliseconds(200))) // the front end is not there (yet)
                }
            }
            // Translations past their deadline are answered, misses raised again.
            if let connection {
                let expired = connection.expireTranslations(now: now)
                if expired.changed { publish(connection) }
                if let next = expired.next { timers.schedule(.translations, at: next) } else { timers.cancel(.translations) }
            }
            var sources: [(LoopSource, Int32)] = [(.stop, stopSignal.fd.rawValue), (.mailbox, inbox.signal.fd.rawValue)]
            if let connection {
                sources.append((.vhostUser, connection.socket.fd.rawValue))
            } else if let listener {
                if accepting.isOpen(now: now) { sources.append((.listener, listener.fd.rawValue)) }
                if let until = accepting.pausedUntil { timers.schedule(.acceptResumes, at: until) }
            }
            guard let ready = try? Poll.ready(sources, until: timers.next, now: now) else { continue }
            _ = timers.expired(now: .now) // each timer's work is done at the top of the next pass
            for source in ready {
                switch source {
                case .stop:
                    break loop
                case .mailbox:
                    runMailbox(connection)
                    if let current = connection, let failure = current.fatalFailure {
                        // An operator command ended the session: its socket's
                        // readiness below is not the listener's.
                        close(current, end: .closedByBridge(failure))
                        connection = nil
                        continue loop
                    }
                case .vhostUser:
                    guard let current = connection else { continue }
                    if let end = current.step() {
                        close(current, end: end)
                        connection = nil
                    } else {
                        publish(current)
                    }
                case .listener:
                    guard connection == nil, let listener, let accepted = accepting.accept(listener, admission: admission) else { continue }
                    connection = open(accepted)
                }
            }
        }
        if let connection { close(connection, end: .stopped) }
        peerServer?.stop()
        peer.shutdownActive()
        peerThread?.join()
        relay?.stop()
        removeSocketFiles()
    }

    /// Counts the bridge thread's loop iterations and bounded peer waits:
    /// the watchdog's proof of life. `poke()` wakes an idle loop (through the
    /// command eventfd it already polls: nothing allocated, so it works when
    /// fds run out), and a live thread then moves the count.
    public var heartbeatCount: UInt64 { peer.heartbeat.value }
    public func poke() { _ = try? inbox.signal.signal() }

    /// True once `stop()` was called (the thread then ends on its own).
    public var wasStopped: Bool { stopping }

    /// Runs an operator command on the bridge thread and waits for its result.
    public func perform(_ command: BridgeCommand) -> Result<String, BridgeCommandError> {
        inbox.call(.command(command), deadline: .now.advanced(by: Self.commandDeadline)) ?? .failure(.timedOut)
    }

    /// What the bridge thread waits on: values, not positions in a poll array.
    private enum LoopSource { case stop, mailbox, vhostUser, listener }
    /// What the bridge thread's wait ends for besides its sources.
    private enum LoopTimer: Hashable, Sendable { case translations, acceptResumes, frontEndRetry }

    /// Operator commands (answered) and VM2's events, oldest first, at most
    /// `PeerLink.eventsPerPass` a pass (the rest wait for the next).
    private func runMailbox(_ connection: VhostUserConnection?) {
        for (ticket, message) in inbox.take(limit: PeerLink.eventsPerPass) {
            switch message {
            case .command(let command):
                if let failure = connection?.fatalFailure {
                    inbox.answer(ticket, .failure(.failed("the session ended: \(failure)")))
                    continue
                }
                let result = connection.map { $0.perform(command) } ?? .failure(.noSession)
                if let connection { publish(connection) }
                inbox.answer(ticket, result)
            case .peer(let event):
                handle(event, connection)
                if let connection { publish(connection) } // translations raise misses and count
            }
        }
    }

    private func open(_ socket: UnixSocket) -> VhostUserConnection? {
        let (admitted, creds) = admission.admits(socket, settings.vm1Access, "vhost-user")
        guard admitted else { try? socket.fd.close(); return nil }
        let who = creds.map { "pid \($0.pid) uid \($0.uid)" } ?? "unknown peer"
        var logger = logger
        logger[metadataKey: "peer"] = "vm1 \(who)" // journald PEER=
        logger.info("front end connected (\(who))")
        // Messages are read once the socket is readable, and each one (and
        // each reply) must be whole within `VhostUserConnectionTuning.
        // messageDeadline`: a front end that stalls or drips in the middle of
        // one is dropped instead of holding the bridge.
        do {
            let opened = try VhostUserConnection(socket: socket, configuration: settings.backend, window: window,
                                                  peer: peer, relay: relay, logger: logger,
                                                  maxPendingTranslations: settings.maxPendingTranslations,
                                                  budget: mappingBudget, budgetID: budgetID, unsealedRegions: settings.unsealedRegions)
            state.withLock { $0.statistics.activeSession = true }
            publish(opened)
            return opened
        } catch {
            logger.error("cannot start a session: \(error)")
            try? socket.fd.close()
            return nil
        }
    }

    private func publish(_ connection: VhostUserConnection) {
        let view = connection.view
        state.withLock { $0.statistics.session = view }
    }

    /// Live relay counters of a session's links: (kick, call) per vring.
    /// (Live links, plus the ones the session already retired under key -1.)
    public func relayStatistics(_ view: SessionView) -> [Int: (kick: RelayLinkStatistics, call: RelayLinkStatistics)] {
        guard let relay else { return [:] }
        var out: [Int: (kick: RelayLinkStatistics, call: RelayLinkStatistics)] = [-1: view.relayRetired]
        for (i, links) in view.relayLinks {
            out[i] = (relay.statistics(links.kick) ?? RelayLinkStatistics(), relay.statistics(links.call) ?? RelayLinkStatistics())
        }
        return out
    }

    private func add(_ relayed: [Int: (kick: RelayLinkStatistics, call: RelayLinkStatistics)], to s: inout BridgeStatistics) {
        // Saturating: eventfd values come from the peers.
        for (kick, call) in relayed.values {
            s.kicksRelayed.addSaturating(kick.notifications)
            s.callsRelayed.addSaturating(call.notifications)
            s.notificationsDropped.addSaturating(kick.dropped.addingSaturating(call.dropped))
            s.notificationsCoalesced.addSaturating(kick.coalesced.addingSaturating(call.coalesced))
        }
    }

    private func close(_ connection: VhostUserConnection, end: ConnectionSummary.End) {
        connection.tearDown() // retires every relay link into the connection's totals
        let relayed = relayStatistics(connection.view)
        let summary = connection.session.statistics
        state.withLock { s in
            self.add(relayed, to: &s.statistics)
            s.statistics.session = nil
            s.statistics.activeSession = false
            s.statistics.sessionsServed += 1
            s.statistics.add(summary)
            s.statistics.lastEnd = end
            s.statistics.lastRequestLog = summary.requestLog
        }
        logger.info("front end session ended: \(end); \(summary.requests) requests, \(summary.refusals.values.reduce(0, +)) refused")
    }

    private func handle(_ event: PeerLink.Event, _ connection: VhostUserConnection?) {
        switch event {
        case .greet(_, let features, let generation):
            guard peer.currentGeneration == generation else { return }
            let space = settings.backend.addressSpace
            let info = PeerBARInfo(mode: space.mode, features: features, barSize: space.barSize,
                                   pageSize: UInt32(space.pageSize), vringCount: UInt32(settings.backend.vringCount))
            guard peer.send(.helloReply(info), duringReplay: true, generation: generation) else { return }
            if features.contains(.sharedRevocations), !peer.openChannel(generation: generation) { return }
            if let connection, !connection.replayState(to: generation, features: features) { return }
            peer.replayed(generation: generation)
            logger.info("VM2 ready (generation \(generation))")
        case .translate(let request, let generation):
            guard peer.currentGeneration == generation, peer.isReady else { return }
            if let connection {
                connection.translate(request, generation: generation)
            } else {
                peer.count { $0.translationsRefused += 1; $0.refusals["no-session", default: 0] += 1 }
                peer.send(.translateReply(PeerTranslateReply(requestID: request.requestID, status: .refused,
                                                             reason: "no VM1 session is connected")))
            }
        case .gone(let generation, let reason):
            logger.info("VM2 disconnected (generation \(generation)): \(reason)")
            connection?.dropTranslations(of: generation)
        }
    }

    /// Stops accepting, ends the active session (revoking everything from the
    /// window and VM2) and VM2's connection. Safe from any thread.
    ///
    /// VM2's connection is left to the bridge thread: it ends the session
    /// first — every mapping revoked from VM2 with UNMAPs, whose ACKs the peer
    /// thread must still read — and stops the peer server after. (Stopping
    /// it here disconnected VM2 before the revocations were sent; found by
    /// the SIGTERM fault test.)
    public func stop() {
        state.withLock { $0.stopping = true }
        _ = try? stopSignal.signal()
        listener?.shutdown()
    }
}
