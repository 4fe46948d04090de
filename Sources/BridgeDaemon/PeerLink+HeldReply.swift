import LinuxIO

/// VM1's reply held while its revocation waits for VM2's ack: the peer
/// thread sends it the moment the session releases it, the bridge thread
/// when the wait ends any other way; never twice, always in order.
extension PeerLink {
    /// A reply held for VM1 while its revocation waits for VM2's ack. The
    /// peer thread sends it the moment it reads the ack (the session says
    /// so: `releaseHeldReply`) — VM1 then waits for one thread hand-off
    /// fewer — and the bridge thread sends it when the wait ends any other
    /// way. Sent once, in order: the bridge thread sends nothing to VM1 until
    /// the peer thread's send is over.
    enum HeldReply: Sendable {
        case none
        case waiting([UInt8], UnixSocket)
        /// Released by the ack, under the same lock the ack was recorded
        /// with: the peer thread sends it next (the bridge thread waits).
        case released([UInt8], UnixSocket)
        case sending
        case sent
        case failed(String)
    }

    /// How a held reply went.
    enum HeldReplyOutcome: Equatable {
        /// The peer thread sent it when VM2 acknowledged.
        case sent
        /// The peer thread's send failed (the session is over).
        case failed(String)
        /// Nobody sent it: the caller does.
        case notSent
    }

    /// On the peer thread, after the ack VM1's held reply waited for: sends
    /// it. The bridge thread is waiting meanwhile, and waits until this send
    /// is over before it touches VM1's socket again.
    func sendHeldReply() {
        let held = state.withLock { s -> (bytes: [UInt8], socket: UnixSocket)? in
            guard case .released(let bytes, let socket) = s.heldReply else { return nil }
            s.heldReply = .sending
            return (bytes, socket)
        }
        guard let held else { return }
        // The whole reply within VM1's message deadline: a VM1 that does not
        // read holds this thread no longer than it would hold the bridge thread.
        let outcome: HeldReply
        do {
            try held.socket.send(held.bytes, deadline: .now.advanced(by: VhostUserConnectionTuning.messageDeadline))
            outcome = .sent
        } catch { outcome = .failed("reply failed: \(error)") }
        state.withLock { s in
            s.heldReply = outcome
            if case .sent = outcome { s.statistics.repliesSentOnAck += 1 }
        }
    }

    /// `waitForAck`, with VM1's reply to the revoking request handed to the
    /// peer thread, which sends it on `socket` as soon as it reads the ack.
    /// When this returns, nobody is sending: `.notSent` leaves the reply to
    /// the caller (VM2 left, missed its deadline, or had acked already).
    func waitForAck(_ ticket: Ticket, replying bytes: [UInt8], on socket: UnixSocket) -> HeldReplyOutcome {
        // Through the channel the bridge thread reads the ack itself: it
        // sends the reply, no hand-off.
        if let channel = state.withLock({ s in s.generation == ticket.generation ? s.channel : nil }) {
            _ = waitForChannelAck(ticket, channel) // the caller sends the reply either way
            return .notSent
        }
        state.withLock { s in
            guard s.generation == ticket.generation, s.session?.holdReply(for: ticket.sequence) == true else { return }
            s.heldReply = .waiting(bytes, socket)
        }
        waitForAck(ticket)
        // The ack may have been read just now, its reply still going out.
        return ackSignal.wait(until: nil) {
            state.withLock { s -> HeldReplyOutcome? in
                switch s.heldReply {
                case .released, .sending: return nil
                case .sent: s.heldReply = .none; return .sent
                case .failed(let reason): s.heldReply = .none; return .failed(reason)
                case .none, .waiting:
                    s.heldReply = .none
                    if s.generation == ticket.generation { _ = s.session?.dropHeldReply() }
                    return .notSent
                }
            }
        } ?? .notSent
    }
}
