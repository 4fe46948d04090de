import BridgeCore
import LinuxIO
import Logging
import PeerProtocol
import VhostUser

/// Serves one vhost-user front end on one connected socket: reads framed
/// messages, feeds them to the pure `BackendSession`, and carries out its
/// effects (replies, window plans, fd ownership, pushes to VM2). Owns every fd
/// the front end sent until the session releases it; after `tearDown` every one
/// is closed and neither the BAR window nor VM2 holds a mapping of this session.
///
/// Used by the bridge thread only.
final class VhostUserConnection {
    let socket: UnixSocket
    var session: BackendSession
    private let window: BARWindow
    let peer: PeerLink
    private let relay: NotificationRelay?
    let logger: Logger
    /// VM1's kick/call/err fds and the relay links of each vring.
    private let rings: RingNotifications
    /// The memory fds VM1 sent, shared with `mirror`.
    private let files: RegionFiles
    /// Carries window plans to VM2 and waits for its acks.
    let mirror: PeerMirror
    private var backendChannel: UnixSocket?
    /// Rings VRING_STOP already went out for while the current message is
    /// handled (GET_VRING_BASE stops the ring at VM2 before the session
    /// sees it), with the VM2 connection it went to: that connection is not
    /// told twice, any other is told. Emptied after every message, so it can
    /// never swallow a later stop.
    private var stoppedAtPeer: [Int: Int] = [:]

    private let budget: MappingBudget
    private let budgetID: MappingBudget.ID
    /// VM2 translations waiting on VM1, and the misses raised for them.
    var translations: TranslationBroker
    var refusalLog = LogThrottle(interval: .seconds(10))
    /// When the oldest IOTLB miss not answered yet went to VM1 (its answer,
    /// the next IOTLB update, is timed into `missAnswerLatency`).
    var missRaisedAt: ContinuousClock.Instant?
    /// Started rings not sent to VM2 while VM1's dirty log is pending.
    private var ringsAwaitingLog: Set<Int> = []

    init(socket: UnixSocket, configuration: BackendConfiguration, window: BARWindow, peer: PeerLink,
         relay: NotificationRelay?, logger: Logger, maxPendingTranslations: Int,
         budget: MappingBudget, budgetID: MappingBudget.ID,
         unsealedRegions: UnsealedRegionPolicy = .mark) throws(ConfigurationError) {
        self.socket = socket
        files = RegionFiles(logger: logger)
        mirror = PeerMirror(peer: peer, files: files, unsealedRegions: unsealedRegions, logger: logger)
        self.budget = budget
        self.budgetID = budgetID
        self.session = try BackendSession(configuration)
        translations = TranslationBroker(capacity: maxPendingTranslations, pageSize: configuration.addressSpace.pageSize,
                                         deadline: VhostUserConnectionTuning.translationDeadline,
                                         missRetryInterval: VhostUserConnectionTuning.missRetryInterval)
        self.window = window
        self.peer = peer
        self.relay = relay
        self.logger = logger
        rings = RingNotifications(relay: relay, logger: logger)
    }

    var view: SessionView {
        var v = SessionView(session)
        v.relayLinks = rings.links
        v.relayRetired = rings.retired
        return v
    }

    /// Reads and handles one message (the socket is readable). Returns how the
    /// connection ended, or nil while it goes on.
    func step() -> ConnectionSummary.End? {
        var parsed: (MessageHeader, RequestCode)?
        defer { peer.heartbeat.beat() }
        do {
            let within = Int(VhostUserConnectionTuning.messageDeadline / .milliseconds(1))
            guard let message = try socket.receiveFramed(within: within, payloadSize: { bytes in
                let header = try MessageHeader.decode(bytes)
                parsed = (header, try VhostUserCodec.validate(header))
                return Int(header.size)
            }), let (header, code) = parsed else { return .frontEndClosed }
            return handle(message, header: header, code: code).map { .closedByBridge($0) }
        } catch {
            if let error = error as? VhostUserError { session.noteUndecodable(parsed?.1, error) }
            if let error = error as? FramingError, case .tooSlow = error { session.noteRefusal(rule: "message-deadline") }
            logger.warning("closing the vhost-user connection: \(error)")
            return .closedByBridge("\(error)")
        }
    }

    /// Handles one message whose header was validated while it was read;
    /// returns a reason when the connection must close.
    private func handle(_ message: FramedMessage, header: MessageHeader, code: RequestCode) -> String? {
        defer {
            for fd in message.fds { try? fd.close() } // whatever no effect claimed
            stoppedAtPeer = [:]
        }
        let replyAck = session.ackedProtocolFeatures.contains(.replyAck)

        let request: FrontendRequest
        do throws(VhostUserError) {
            if message.fdsTruncated { throw VhostUserError.fdsLost(code) }
            request = try VhostUserCodec.decode(code, payload: message.payload, fdCount: message.fds.count)
        } catch {
            session.noteUndecodable(code, error)
            logger.warning("refused \(code): \(error)", metadata: ["rule": "\(error.rule)"])
            if header.needsReply && replyAck {
                return send(VhostUserCodec.encodeReply(to: code, .u64(1)))
            }
            return "\(code): \(error)"
        }
        guard case .iotlb = request else { return handleDecoded(request, code: code, header: header, message: message) }
        let received = ContinuousClock.now
        defer { peer.count { $0.iotlbLatency.record(received.duration(to: .now)) } }
        return handleDecoded(request, code: code, header: header, message: message)
    }

    private func handleDecoded(_ request: FrontendRequest, code: RequestCode, header: MessageHeader, message: FramedMessage) -> String? {
        let files = message.fds.enumerated().map { i, fd in
            ReceivedFile(index: i, size: try? fd.fileSize(), kind: fd.kind(), hugePageSize: fd.hugePageSize(),
                         sealedAgainstShrinking: code == .setLogBase && ((try? Memfd(adopting: fd).seals.contains(.shrink)) ?? false))
        }
        let outcome = withMappingBudget { $0.handle(request, needReply: header.needsReply, files: files) }
        if let error = outcome.error {
            logger.warning("refused \(code): \(error)", metadata: ["rule": "\(error.rule)"])
        } else {
            logger.trace("handled \(code)")
        }
        if let reason = execute(outcome.effects, fds: message.fds) { return reason }
        if case .iotlb(let m) = request, m.type == .update, outcome.error == nil {
            if let raised = missRaisedAt {
                missRaisedAt = nil
                peer.count { $0.missAnswerLatency.record(raised.duration(to: .now)) }
            }
            settleTranslations()
        }
        return outcome.closeConnection ? "\(code): \(outcome.error.map { "\($0)" } ?? "refused")" : nil
    }

    /// Runs a session change under this bridge's share of the process-wide
    /// mapping budget.
    private func withMappingBudget<R>(_ body: (inout BackendSession) -> R) -> R {
        session.limitMappings(to: budget.reserve(budgetID, current: session.addressSpace.mappings.count))
        defer { budget.settle(budgetID, count: session.addressSpace.mappings.count) }
        return body(&session)
    }

    /// GET_VRING_BASE must return how far the device got: read the used
    /// ring's index through the window — only when the access is checked and
    /// the memory cannot shrink under us (a SIGBUS would kill the daemon).
    private func noteDeviceProgress(_ index: Int) {
        guard session.vrings.indices.contains(index), let layout = session.vrings[index].layout else { return }
        noteDeviceProgress(index, layout)
    }

    private func noteDeviceProgress(_ index: Int, _ layout: VringLayout) {
        let at = BusAddress(layout.usedRing.rawValue + 2)
        guard let pieces = try? session.addressSpace.checkAccess(at, length: 2, needed: .read),
              pieces.allSatisfy({ files.isSealed($0.region) }) else { return }
        if let value = window.withBytes(at: at, length: 2, { UInt16(littleEndian: $0.loadUnaligned(as: UInt16.self)) }) {
            session.noteDeviceProgress(ring: index, lastAvail: value)
        }
    }

    /// GET_VRING_BASE on a running ring (the session's `stopRingAtDevice`):
    /// the used index read through the window is how far the device got,
    /// unless a VM2 with `vringStopAck` says so itself — it stops the ring
    /// first and answers within the revocation deadline. Without either, the
    /// session keeps SET_VRING_BASE's value.
    private func stopRingAtDevice(_ index: Int, _ layout: VringLayout?) {
        if let layout { noteDeviceProgress(index, layout) }
        guard layout != nil else { return }
        let sent = peer.sendVringStop(UInt32(index))
        if let generation = sent.generation { stoppedAtPeer[index] = generation }
        if case .awaitingAnswer(let generation) = sent, let reached = peer.waitForRingStop(UInt32(index), generation: generation) {
            session.noteDeviceProgress(ring: index, lastAvail: reached)
        }
    }

    /// Ring `index` stopped: VM2 is told, unless VRING_STOP already went to
    /// the very connection that is attached now (GET_VRING_BASE, above).
    private func ringStoppedAtPeer(_ index: Int) {
        let told = stoppedAtPeer.removeValue(forKey: index)
        if told == nil || told != peer.currentGeneration { peer.sendVringStop(UInt32(index)) }
    }

    /// A whole reply within VM1's message deadline (a VM1 that reads a byte
    /// now and then cannot hold the bridge thread longer).
    private func send(_ bytes: [UInt8]) -> String? {
        defer { peer.heartbeat.beat() }
        do {
            try socket.send(bytes, deadline: .now.advanced(by: VhostUserConnectionTuning.messageDeadline))
            return nil
        } catch { return "reply failed: \(error)" }
    }

    /// Carries out effects in order. Fds named by an effect are moved out of
    /// the message (the caller closes the rest).
    private func execute(_ effects: [SessionEffect], fds: [OwnedFileDescriptor]) -> String? {
        func take(_ index: Int) -> OwnedFileDescriptor? {
            guard index >= 0, index < fds.count, fds[index].isOpen else { return nil }
            return OwnedFileDescriptor(adopting: fds[index].release())
        }
        for effect in effects {
            switch effect {
            case .reply(let bytes):
                if let failure = send(bytes) { return failure }
            case .replyVringBase(let index):
                if case .reply(let bytes) = session.vringBaseReply(index), let failure = send(bytes) { return failure }
            case .stopRingAtDevice(let index, let layout):
                stopRingAtDevice(index, layout)
            case .windowThenReply(let plan, let bytes):
                // A revocation goes to VM2 first: VM2 drops the range while
                // the daemon revokes its own window, and VM1's answer waits
                // for both. A grant changes the window first (a failure
                // there ends the session before VM2 hears of it).
                let early = plan.revokesAccess ? mirror.send(plan) : nil
                if let failure = applyWindow(plan) { return failure }
                // VM1's ack goes out as soon as VM2 acks the revocation
                // (from the peer thread), or from here when nobody sent it.
                switch mirror.finish(early ?? mirror.send(plan), thenReply: (bytes, socket)) {
                case .sent: break
                case .failed(let reason): return reason
                case .notSent: if let failure = send(bytes) { return failure }
                }
            case .adoptRegionFile(let id, let index):
                if let fd = take(index) {
                    files.adopt(id, fd, region: session.regions.region(id))
                }
            case .window(let plan):
                if let failure = applyWindow(plan) { return failure }
                mirror.push(plan)
            case .releaseRegionFile(let id):
                mirror.forget(id)
                files.release(id)
            case .setVringFile(let kind, let index, let fdIndex):
                let hadKick = rings.eventfdsForVM2(index).kick != nil
                rings.set(kind, index: index, fdIndex.flatMap(take))
                if kind != .err, session.vrings.indices.contains(index), session.vrings[index].started {
                    if relay != nil {
                        rings.updateRelay(index, kind) // VM2 keeps its eventfds
                        // VM1 switched the ring's kick to polling (no-fd bit), or
                        // back: VM2 must know whether kicks will come.
                        if kind == .kick, hadKick != (rings.eventfdsForVM2(index).kick != nil) {
                            logger.notice("vring \(index): VM1 \(hadKick ? "stopped kicking (polling)" : "kicks again"); VM2 told")
                            sendVring(index)
                        }
                    } else {
                        sendVring(index) // passthrough: VM2 needs the new fd (QEMU swaps call fds when masking)
                    }
                }
            case .adoptBackendChannel(let index):
                try? backendChannel?.fd.close()
                backendChannel = take(index).map { UnixSocket(adopting: $0, kind: .stream) }
            case .sendBackend(let bytes):
                sendBackend(bytes)
            case .raiseMiss(let bus, let permission):
                carryOut(translations.miss(bus, permission, now: .now), now: .now)
            case .deviceStarted(let features):
                peer.send(.device(PeerDevice(event: .start, features: features)))
            case .deviceStopped(let features):
                peer.send(.device(PeerDevice(event: .stop, features: features)))
            case .deviceReset:
                peer.send(.device(PeerDevice(event: .reset, features: 0)))
            case .ringStarted(let index, let layout):
                logger.info("vring \(index) started: \(layout.queueSize) entries, desc \(layout.descriptorTable), avail \(layout.availRing), used \(layout.usedRing)")
                rings.startRelay(index)
                sendVring(index)
            case .ringStopped(let index):
                logger.info("vring \(index) stopped")
                ringStoppedAtPeer(index)
                rings.stopRelay(index)
            case .ringEnabled(let index, let enabled):
                logger.debug("vring \(index) \(enabled ? "enabled" : "disabled")")
                if session.vrings.indices.contains(index), session.vrings[index].started { sendVring(index) }
            case .adoptLogFile(let index, let area):
                if let fd = take(index) { files.adoptLog(fd, area) }
            case .releaseLogFile:
                files.releaseLog()
            case .deviceLog(let area, let reply, let refusal):
                if let failure = deviceLog(area, reply: reply, refusal: refusal) { return failure }
            case .awaitLog(let reply, let refusal):
                if let failure = finishDeviceLog(nil, peer.expectDeviceLog(), reply: reply, refusal: refusal, pending: true) { return failure }
            }
        }
        return nil
    }

    /// VM2's device logs into the dirty log (`area`) or stops; VM1 is
    /// answered after (`reply`), or refused when VM2 cannot log (`refusal`;
    /// nil: the connection closes, the reason is returned).
    private func deviceLog(_ area: DirtyLogArea?, reply: [UInt8]?, refusal: [UInt8]?) -> String? {
        let outcome: PeerLink.LogOutcome
        if let area {
            guard let log = files.log, log.area == area else {
                outcome = .failed("the log file is not held") // cannot happen: adoptLogFile comes first
                return finishDeviceLog(area, outcome, reply: reply, refusal: refusal)
            }
            outcome = peer.setDeviceLog(area, fd: log.fd.rawValue)
        } else {
            outcome = peer.setDeviceLog(nil, fd: nil)
        }
        return finishDeviceLog(area, outcome, reply: reply, refusal: refusal)
    }

    private func finishDeviceLog(_ area: DirtyLogArea?, _ outcome: PeerLink.LogOutcome, reply: [UInt8]?, refusal: [UInt8]?,
                                 pending: Bool = false) -> String? {
        if case .failed(let reason) = outcome, area != nil || pending {
            session.deviceLogFailed(reason)
            files.releaseLog()
            logger.warning("VM1's dirty-page logging (live migration) refused: \(reason)", metadata: ["rule": "dirty-log"])
            guard let refusal else { return "dirty-page logging: \(reason)" }
            return send(refusal)
        }
        if let area {
            logger.notice("dirty-page logging on: \(area) (\(outcome == .applied ? "VM2 logs" : "no VM2 attached: nothing writes VM1's memory"))")
            // Rings held for the log run now.
            let held = ringsAwaitingLog.sorted()
            ringsAwaitingLog = []
            for i in held where session.vrings.indices.contains(i) && session.vrings[i].started { sendVring(i) }
        } else if pending {
            logger.notice("dirty-page logging on, its log to follow (VM2's rings wait for it)")
        } else {
            logger.notice("dirty-page logging off")
        }
        return reply.flatMap { send($0) }
    }

    /// Carries a plan into the BAR window; on failure VM2 loses the plan's
    /// ranges too and the session must end (the reason is returned).
    private func applyWindow(_ plan: WindowPlan) -> String? {
        do {
            try window.apply(plan) { [files] id in files.fd(id)?.rawValue }
            return nil
        } catch {
            logger.error("BAR window operation failed, closing the session: \(error)")
            mirror.revoke(plan)
            return "window: \(error)"
        }
    }

    func sendBackend(_ bytes: [UInt8]) {
        do {
            try backendChannel?.send(bytes, nonBlocking: true)
        } catch {
            // VM1 not reading its back-end channel must not flood the journal.
            if let held = refusalLog.admit("backend-channel", now: .now) {
                logger.warning("back-end channel send failed: \(error)\(held > 0 ? " (\(held) more failures not logged)" : "")")
            }
        }
    }

    // MARK: VM2

    private func sendVring(_ index: Int, duringReplay: Bool = false, generation: Int? = nil) {
        guard let layout = session.vrings[index].layout else { return }
        // VM1 migrates and its log has not come: VM2 would write unlogged.
        if session.logPending {
            ringsAwaitingLog.insert(index)
            return
        }
        // A (re)connected VM2 resumes where the device got to (used index).
        noteDeviceProgress(index)
        var flags: UInt16 = session.vrings[index].enabled ? PeerVring.flagEnabled : 0
        let (kick, call) = rings.eventfdsForVM2(index)
        var fds: [Int32] = []
        if let kick { flags |= PeerVring.flagKickFD; fds.append(kick) }
        if let call { flags |= PeerVring.flagCallFD; fds.append(call) }
        peer.send(.vring(PeerVring(index: UInt32(index), num: layout.queueSize, desc: layout.descriptorTable.rawValue,
                                   avail: layout.availRing.rawValue, used: layout.usedRing.rawValue,
                                   lastAvail: UInt16(truncatingIfNeeded: session.vrings[index].base), flags: flags)),
                  fds: fds, duringReplay: duringReplay, generation: generation)
    }

    /// A (re)connected VM2 gets the full current state.
    /// Everything goes to connection `generation` only, and the replay stops
    /// as soon as that connection is gone (a newer VM2 gets its own replay).
    /// `features`: what that VM2 negotiated (it is not ready yet). False
    /// when that VM2 is gone (or was sent away: VM1 migrates and it cannot
    /// log) — it must not be taken as ready.
    @discardableResult
    func replayState(to generation: Int, features: PeerFeatures = []) -> Bool {
        if session.logging.on, !features.contains(.dirtyLog) {
            // It connected before VM1's LOG_ALL, HELLO let it in.
            peer.sendAway(generation, "VM1 is live-migrating and this VM2 cannot log the pages it writes (peer feature dirtyLog)")
            return false
        }
        for m in session.addressSpace.mappings {
            guard peer.currentGeneration == generation else { return false }
            _ = mirror.sendMap(bus: m.bus, length: m.length, permission: m.permission, region: m.region, fdOffset: m.fdOffset,
                        duringReplay: true, generation: generation, features: features)
        }
        // VM1 is migrating: the new VM2 logs before it touches a ring.
        if session.logging.on, let log = files.log, !peer.replayLog(log.area, fd: log.fd.rawValue, generation: generation) { return false }
        if session.vrings.contains(where: \.started) {
            guard peer.send(.device(PeerDevice(event: .start, features: session.ackedFeatures ?? 0)), duringReplay: true,
                            generation: generation) else { return false }
            for i in session.vrings.indices where session.vrings[i].started { sendVring(i, duringReplay: true, generation: generation) }
        }
        return peer.currentGeneration == generation
    }

    /// Carries out an operator command on this session (bridge thread).
    func perform(_ command: BridgeCommand) -> Result<String, BridgeCommandError> {
        let outcome: BackendSession.Outcome
        switch command {
        case .map(let bus, let gpa, let length, let permission):
            outcome = withMappingBudget { $0.operatorMap(bus: bus, guestPhysical: gpa, length: length, permission: permission) }
        case .unmap(let bus, let length):
            outcome = withMappingBudget { $0.operatorUnmap(bus: bus, length: length) }
        case .freeze:
            if let error = session.freeze() { return .failure(.refused(error.description, rule: error.rule)) }
            logger.notice("address space frozen by the operator")
            return .success("frozen")
        }
        if let error = outcome.error {
            logger.warning("operator \(command) refused: \(error)")
            return .failure(.refused(error.description, rule: error.rule))
        }
        if let failure = execute(outcome.effects, fds: []) {
            // A window (or reply) failure leaves the model and the window
            // apart: the session cannot go on, as for a VM1 message.
            fatalFailure = failure
            return .failure(.failed(failure))
        }
        if case .map = command { settleTranslations() } // an operator grant can answer waiting translations
        return .success(outcome.effects.isEmpty ? "no change" : "done")
    }

    /// Set when an operator command failed in a way that ends the session;
    /// the bridge thread closes it after the command.
    private(set) var fatalFailure: String?

    /// Ends the session: rings stopped, every mapping revoked from the window
    /// and from VM2 (acked), every fd closed.
    func tearDown() {
        // Each effect on its own: a window failure must not skip the rest
        // (VM2's DEVICE reset, the region fds' release).
        for effect in session.teardown() { _ = execute([effect], fds: []) }
        budget.settle(budgetID, count: 0)
        peer.noteVM1Logging(false)
        carryOut(translations.endSession(), now: .now)
        files.closeAll()
        rings.closeAll()
        try? backendChannel?.fd.close()
        backendChannel = nil
        try? socket.fd.close()
    }
}
