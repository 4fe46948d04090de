import BridgeCore
import LinuxIO
import PeerProtocol

/// Dirty-page logging at VM2 (peer feature `dirtyLog`): LOG to the ready
/// VM2 and the wait for its LOG_DONE; VM1's logging state, which a VM2
/// connecting meanwhile must be able to follow.
extension PeerLink {
    enum LogOutcome: Equatable {
        /// No VM2 is ready: nobody writes VM1's memory (a VM2 that connects
        /// gets the log in its replay, or is refused if it cannot log).
        case noDevice
        /// VM2 logs (or stopped logging) as told.
        case applied
        /// VM2 cannot log: why.
        case failed(String)
    }

    /// VM1's logging went on or off outside a LOG (its session ended).
    func noteVM1Logging(_ on: Bool) {
        state.withLock { s in
            s.vm1Logging = on
            s.session?.noteVM1Logging(on)
        }
    }

    /// Makes the ready VM2 log into `fd` (`area` of it), or stop (nil), and
    /// waits for its LOG_DONE (at most the revocation deadline: past it VM2
    /// is disconnected). On failure VM1's logging stays as it was.
    func setDeviceLog(_ area: DirtyLogArea?, fd: Int32?) -> LogOutcome {
        let on = area != nil
        let target = state.withLock { s -> (generation: Int, serial: UInt64?, was: Bool)? in
            let was = s.vm1Logging
            s.vm1Logging = on
            s.session?.noteVM1Logging(on)
            guard s.socket != nil, s.session?.isReady == true else { return nil }
            return (s.generation, s.session?.requestLog(now: .now), was)
        }
        guard let target else { return .noDevice }
        func failed(_ reason: String) -> LogOutcome {
            guard on else { return .noDevice } // stopping: a VM2 that is gone logs nothing
            noteVM1Logging(target.was)
            return .failed(reason)
        }
        guard let serial = target.serial else {
            return failed("VM2 did not negotiate the peer feature dirtyLog (with sharedRevocations): it cannot log the pages it writes")
        }
        let message = PeerLog(serial: serial, on: on, size: area?.size ?? 0, offset: area?.offset ?? 0)
        guard send(.log(message), fds: fd.map { [$0] } ?? [], generation: target.generation) else {
            return failed("VM2 was lost while LOG was sent to it")
        }
        switch awaitLog(serial, generation: target.generation) {
        case .done(nil): return .applied
        case .done(let reason?): return failed("VM2 could not log: \(reason)")
        case .gone: return failed("VM2 was lost before it answered LOG")
        case .timedOut: return failed("VM2 did not answer LOG within \(revocationDeadlineMilliseconds) ms (disconnected)")
        }
    }

    /// VM1 logs from now on, its log to follow (`awaitLog`): a ready VM2
    /// that cannot log fails it; otherwise VM2 waits for the log (its rings
    /// are held) and a VM2 that cannot log is refused when it connects.
    func expectDeviceLog() -> LogOutcome {
        state.withLock { s -> LogOutcome in
            if s.socket != nil, let session = s.session, session.isReady, !session.features.contains(.dirtyLog) {
                return .failed("VM2 did not negotiate the peer feature dirtyLog (with sharedRevocations and vringStopAck): it cannot log the pages it writes")
            }
            s.vm1Logging = true
            s.session?.noteVM1Logging(true)
            return s.session?.isReady == true ? .applied : .noDevice
        }
    }

    /// Ends connection `generation` with ERROR (rule `dirty-log`).
    func sendAway(_ generation: Int, _ reason: String) {
        guard let socket = state.withLock({ s in s.generation == generation ? s.socket : nil }) else { return }
        logger.warning("refusing VM2: \(reason)", metadata: ["rule": "dirty-log"])
        count { $0.noteProtocolError(rule: "dirty-log") }
        Self.sendError(socket, .features, reason)
        execute(withSession(generation) { $0.ended(reason) }, generation: generation, replyingOn: nil)
    }

    /// The replay to a VM2 connecting while VM1 migrates: LOG first, and
    /// its answer before any ring. False when that VM2 could not (it is
    /// disconnected: it would write pages nobody logs).
    func replayLog(_ area: DirtyLogArea, fd: Int32, generation: Int) -> Bool {
        guard let serial = state.withLock({ s in s.generation == generation ? s.session?.requestLog(now: .now) : nil }) else {
            sendAway(generation, "VM1 is live-migrating and this VM2 cannot log the pages it writes (peer feature dirtyLog)")
            return false
        }
        guard send(.log(PeerLog(serial: serial, on: true, size: area.size, offset: area.offset)), fds: [fd],
                   duringReplay: true, generation: generation) else { return false }
        switch awaitLog(serial, generation: generation) {
        case .done(nil):
            return true
        case .done(let reason?):
            logger.warning("VM2 could not apply the dirty log while VM1 migrates: \(reason); disconnecting it", metadata: ["rule": "dirty-log"])
            execute(withSession(generation) { $0.ended("it could not log while VM1 migrates: \(reason)") }, generation: generation, replyingOn: nil)
            return false
        case .gone, .timedOut:
            return false
        }
    }

    private func awaitLog(_ serial: UInt64, generation: Int) -> WaitOutcome<String?> {
        let outcome = wait(on: generation, until: { $0.deadline(ofLog: serial) }, { $0.takeLogAnswer(serial) })
        if case .timedOut = outcome { expired(generation: generation, what: "LOG \(serial)") }
        return outcome
    }
}
