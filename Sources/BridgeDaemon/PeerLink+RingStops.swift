import LinuxIO
import PeerProtocol

/// Ring stops: VRING_STOP to every ready VM2, and the wait for the answer of
/// one that negotiated `vringStopAck` (the session registers and times it).
extension PeerLink {
    /// Where a VRING_STOP went.
    enum RingStopSent: Equatable {
        /// No ready VM2 (or the send failed: it is being disconnected).
        case notSent
        /// Sent to connection `generation`, which answers with VRING_STOPPED
        /// (it negotiated `vringStopAck`).
        case awaitingAnswer(generation: Int)
        /// Sent to connection `generation`, a version-1 peer: no answer.
        case sent(generation: Int)

        var generation: Int? {
            switch self {
            case .notSent: nil
            case .awaitingAnswer(let g), .sent(let g): g
            }
        }
    }

    /// Sends VRING_STOP for ring `index` to the ready VM2, whatever it
    /// negotiated: every VM2 must stop a ring VM1 stopped. One that
    /// negotiated `vringStopAck` answers each VRING_STOP, so the stop is
    /// registered before it goes out (the answer may come at once).
    @discardableResult
    func sendVringStop(_ index: UInt32) -> RingStopSent {
        guard let (generation, answers) = state.withLock({ s -> (Int, Bool)? in
            guard s.socket != nil, s.session?.isReady == true else { return nil }
            return (s.generation, s.session?.requestRingStop(index, now: .now) == true)
        }) else { return .notSent }
        guard send(.vringStop(index), generation: generation) else { return .notSent }
        return answers ? .awaitingAnswer(generation: generation) : .sent(generation: generation)
    }

    /// The avail index VM2 reached on ring `index` (nil: VM2 did not run it,
    /// is gone, or missed the deadline — then it is disconnected).
    func waitForRingStop(_ index: UInt32, generation: Int) -> UInt16? {
        switch wait(on: generation, until: { $0.deadline(ofRingStop: index) }, { $0.takeRingStopAnswer(index) }) {
        case .done(let lastAvail): return lastAvail
        case .gone: return nil
        case .timedOut:
            expired(generation: generation, what: "the stop of vring \(index)")
            return nil
        }
    }
}
