import BridgeCore
import LinuxIO
import PeerProtocol

/// The revocation channel (peer feature `sharedRevocations`): MAP and UNMAP
/// records in memory shared with VM2, and VM2's cumulative ack read from it
/// — no socket message, no peer thread on the path. The bridge thread posts
/// and waits: it spins on the ack for `policy.revocationSpin`, then sleeps on
/// the channel's futex word until the revocation deadline. What VM2 writes
/// there is checked by the session (`observeChannelAck`): an ack from the
/// future or one that goes back is a protocol error, as on the socket.
extension PeerLink {
    /// One VM2 connection's channel. Sendable without `@unchecked`: its
    /// stored properties are immutable and Sendable.
    final class Channel: Sendable {
        let memory: ChannelMemory
        let capacity: UInt32
        let generation: Int

        init(memory: ChannelMemory, capacity: UInt32, generation: Int) {
            self.memory = memory
            self.capacity = capacity
            self.generation = generation
        }

        var acked: UInt64 { memory.loadAcquire64(at: RevocationChannel.ackedOffset) }
        var vm2Sleeps: Bool { memory.loadAcquire32(at: RevocationChannel.vm2SleepingOffset) != 0 }

        /// Writes record `record` and publishes it (`posted`, release).
        func publish(_ record: ChannelRecord) {
            memory.write(record.encoded, at: RevocationChannel.recordOffset(sequence: record.sequence, capacity: capacity))
            memory.storeRelease64(record.sequence, at: RevocationChannel.postedOffset)
        }

        /// Ends a sleep on the futex word (the connection ended).
        func interrupt() {
            memory.fetchAdd32(1, at: RevocationChannel.ackEventOffset)
            memory.wake(at: RevocationChannel.ackEventOffset)
        }
    }

    /// A REGION fd VM2 holds, by the daemon's fd object (weak: a slot
    /// whose file the daemon closed is never matched again).
    struct Slot: Sendable {
        var number: UInt32
        weak var file: OwnedFileDescriptor?
    }

    /// Where a MAP/UNMAP goes.
    private enum Route {
        case socket
        case channel(Channel)
    }

    /// The channel of the attached connection, when it uses one and may be
    /// sent to (`duringReplay`, `only`: as in `send`). nil with `.socket`:
    /// the connection uses the socket; nil altogether: nothing may go out.
    private func route(duringReplay: Bool, only: Int?) -> Route? {
        state.withLock { s -> Route? in
            guard s.socket != nil, let session = s.session, session.maySend(duringReplay: duringReplay),
                  only == nil || only == s.generation else { return nil }
            guard session.usesChannel, let channel = s.channel, channel.generation == s.generation else { return .socket }
            return .channel(channel)
        }
    }

    // MARK: opening

    /// At the greeting of a VM2 that negotiated `sharedRevocations`:
    /// creates the channel and sends CHANNEL (before any MAP). False when
    /// that failed (the connection is then being closed).
    func openChannel(generation: Int) -> Bool {
        let capacity = policy.channelCapacity
        let size = Int(RevocationChannel.size(capacity: capacity))
        let memory: ChannelMemory
        do {
            memory = try ChannelMemory(creating: "vhost-pci-channel", size: size)
        } catch {
            logger.error("cannot create the revocation channel for VM2: \(error); disconnecting VM2")
            execute(withSession(generation) { $0.ended("no revocation channel: \(error)") }, generation: generation, replyingOn: nil)
            return false
        }
        memory.write(RevocationChannel.identification(capacity: capacity), at: 0)
        let channel = Channel(memory: memory, capacity: capacity, generation: generation)
        let attached = state.withLock { s -> Bool in
            guard s.generation == generation, s.socket != nil else { return false }
            s.channel = channel
            s.slots = [:]
            return true
        }
        guard attached else { return false }
        return send(.channel(PeerChannel(capacity: capacity, size: UInt64(size))), fds: [memory.fd.rawValue],
                    duringReplay: true, generation: generation)
    }

    // MARK: posting

    /// A MAP to the attached VM2 — through the channel (its fd as a REGION,
    /// once) or the socket. nil when it did not go out.
    func sendMap(_ map: PeerMap, fd: OwnedFileDescriptor, revoking: Bool, duringReplay: Bool = false, generation only: Int? = nil) -> Ticket? {
        switch route(duringReplay: duringReplay, only: only) {
        case nil:
            return nil
        case .socket:
            let ticket = takeSequence(revoking: revoking)
            var m = map
            m.sequence = ticket.sequence
            return send(.map(m), fds: [fd.rawValue], duringReplay: duringReplay, generation: only) ? ticket : nil
        case .channel(let channel):
            guard let slot = slot(for: fd, permission: map.permission, channel: channel, duringReplay: duringReplay) else { return nil }
            return post(channel, revoking: revoking) { .map(PeerMap(sequence: $0, barOffset: map.barOffset, length: map.length,
                                                                   fdOffset: map.fdOffset, permission: map.permission,
                                                                   unsealed: map.unsealed, guestPhysical: map.guestPhysical), slot: slot) }
        }
    }

    /// An UNMAP to the attached VM2 — through the channel or the socket.
    func sendUnmap(barOffset: UInt64, length: UInt64) -> Ticket? {
        switch route(duringReplay: false, only: nil) {
        case nil:
            return nil
        case .socket:
            let ticket = takeSequence(revoking: true)
            return send(.unmap(PeerUnmap(sequence: ticket.sequence, barOffset: barOffset, length: length))) ? ticket : nil
        case .channel(let channel):
            return post(channel, revoking: true) { .unmap(PeerUnmap(sequence: $0, barOffset: barOffset, length: length)) }
        }
    }

    /// The daemon closed these region fds: VM2 closes its copies too
    /// (FORGET records; nothing to wait for).
    func forget(_ files: [OwnedFileDescriptor]) {
        guard case .channel(let channel)? = route(duringReplay: true, only: nil) else { return }
        let numbers = state.withLock { s -> [UInt32] in
            files.compactMap { s.slots.removeValue(forKey: ObjectIdentifier($0))?.number }
        }
        for number in numbers { _ = post(channel, revoking: false) { .forget(sequence: $0, slot: number) } }
    }

    /// The slot VM2 knows `fd` by; a new one is sent as REGION first.
    private func slot(for fd: OwnedFileDescriptor, permission: Permission, channel: Channel, duringReplay: Bool) -> UInt32? {
        let key = ObjectIdentifier(fd)
        let (number, isNew) = state.withLock { s -> (UInt32, Bool) in
            if let slot = s.slots[key], slot.file === fd { return (slot.number, false) }
            let number = s.nextSlot
            s.nextSlot &+= 1
            s.slots[key] = Slot(number: number, file: fd)
            return (number, true)
        }
        guard isNew else { return number }
        let size = (try? fd.fileSize()) ?? 0
        let allowed: Permission = permission.contains(.write) ? .readWrite : .read
        guard send(.region(PeerRegion(slot: number, permission: allowed, size: size)), fds: [fd.rawValue],
                   duringReplay: duringReplay, generation: channel.generation) else { return nil }
        return number
    }

    /// Posts one record with the next sequence once the channel has room
    /// (VM2 is woken and waited for, at most the revocation deadline, when
    /// it has none). nil when the connection ended meanwhile.
    private func post(_ channel: Channel, revoking: Bool, _ record: (UInt64) -> ChannelRecord) -> Ticket? {
        if !(state.withLock { $0.session?.channelHasRoom ?? false }) {
            let full = state.withLock { s in (s.session?.nextSequence ?? 1) &- 1 &- UInt64(channel.capacity) &+ 1 }
            // At most the revocation deadline — and never past the deadline
            // of a revocation already in the ring (`awaitChannel` keeps to
            // it): a VM2 that frees one slot just in time for each record
            // cannot stretch a long plan into one deadline per record.
            guard awaitChannel(channel, through: full, deadline: .now.advanced(by: policy.revocationDeadline),
                               what: "room in the revocation channel") else { return nil }
        }
        return state.withLock { s -> Ticket? in
            guard s.generation == channel.generation, s.socket != nil, var session = s.session.take() else { return nil }
            defer { s.session = session }
            guard !session.isClosed, session.channelHasRoom else { return nil }
            let sequence = revoking ? session.takeRevocationSequence(now: .now) : session.takeMapSequence()
            channel.publish(record(sequence))
            return Ticket(sequence: sequence, generation: channel.generation)
        }
    }

    // MARK: waiting

    /// Waits until VM2's ack in the channel covers `ticket`, at most its
    /// deadline; the outcome as for the socket's `waitForAck`.
    func waitForChannelAck(_ ticket: Ticket, _ channel: Channel) -> Bool {
        let start = ContinuousClock.now
        let deadline = state.withLock { s in s.generation == ticket.generation ? s.session?.deadline(ofRevocation: ticket.sequence) : nil }
            ?? start.advanced(by: policy.revocationDeadline)
        let done = awaitChannel(channel, through: ticket.sequence, deadline: deadline, what: "revocation \(ticket.sequence)")
        if done { noteRevocationWait(since: start) }
        return done
    }

    /// `ending`: the session is over but another thread is still carrying
    /// out its effects (a kill waits for the VMM's exit): wait for the
    /// detach before the revocation counts as complete.
    private enum Progress { case done, gone, ending, waiting }

    /// Reads VM2's ack once and lets the session judge it.
    private func observe(_ channel: Channel, through sequence: UInt64) -> Progress {
        let value = channel.acked
        let effects = withSession(channel.generation) { $0.observeChannelAck(value) }
        if !effects.isEmpty {
            // A refusal's ERROR goes out on the connection's socket (best effort, never blocking).
            let socket = state.withLock { s in s.generation == channel.generation ? s.socket : nil }
            execute(effects, generation: channel.generation, replyingOn: socket)
        }
        return state.withLock { s -> Progress in
            guard s.generation == channel.generation, s.socket != nil, let session = s.session else { return .gone }
            if session.isClosed { return .ending }
            return session.isAcknowledged(sequence) ? .done : .waiting
        }
    }

    /// The earliest deadline of a revocation in the ring (nil: none).
    private func earliestDeadline(_ channel: Channel) -> ContinuousClock.Instant? {
        state.withLock { s in s.generation == channel.generation ? s.session?.nextDeadline : nil }
    }

    /// The acks VM2 stored before its connection ended count: an honest VM2
    /// that acked and left is not taken for one that left holding a
    /// revocation (peer thread, from `detach`).
    func noteFinalAck(generation: Int) {
        guard let channel = state.withLock({ s in s.generation == generation ? s.channel : nil }) else { return }
        let value = channel.acked
        // A lie found now is a protocol error like any other (a kill first
        // while VM2 holds a revocation).
        execute(withSession(generation) { $0.observeChannelAck(value) }, generation: generation, replyingOn: nil)
    }

    /// WAKE to a VM2 that said it sleeps: never blocks. A full socket is
    /// readable already (VM2 will look); a 12-byte message is one skb, sent
    /// whole or not at all. False when VM2 is gone.
    private func wake(_ channel: Channel) -> Bool {
        guard let socket = state.withLock({ s in s.generation == channel.generation ? s.socket : nil }) else { return false }
        count { $0.channelWakes += 1 }
        do {
            try socket.send(PeerCodec.encode(.wake), nonBlocking: true)
            return true
        } catch where error.errno == .resourceTemporarilyUnavailable || error.errno == .wouldBlock {
            return true
        } catch {
            execute(withSession(channel.generation) { $0.ended("send failed: \(error)") }, generation: channel.generation, replyingOn: nil)
            return false
        }
    }

    /// Waits until VM2 acknowledged `sequence` through the channel: a WAKE
    /// first when VM2 says it sleeps, a spin of `policy.revocationSpin`,
    /// then sleeps on the futex word until `deadline`. True when done or
    /// the connection is gone (nothing left to wait for); false when the
    /// deadline passed (VM2 is disconnected, or killed, by then).
    private func awaitChannel(_ channel: Channel, through sequence: UInt64, deadline: ContinuousClock.Instant, what: String) -> Bool {
        defer { heartbeat.beat() }
        var spinEnd: ContinuousClock.Instant?
        var spins = 0
        while true {
            switch observe(channel, through: sequence) {
            case .done, .gone: return true
            case .ending:
                // Wait for the detach (a kill first, when the session said
                // so) before the caller's revocation completes.
                awaitDetach(channel.generation)
                return true
            case .waiting: break
            }
            guard let spinEnd else {
                // Not acked at the first look. The record is published: is
                // VM2 asleep? (Its flag is stored before it looks at `posted`
                // one last time, ours after we publish: one of us sees the
                // other.)
                ChannelMemory.fullFence()
                if channel.vm2Sleeps, !wake(channel) {
                    awaitDetach(channel.generation) // gone, or going: with a kill first when it held a revocation
                    return true
                }
                spinEnd = ContinuousClock.now.advanced(by: policy.revocationSpin)
                continue
            }
            spins &+= 1
            if spins & 63 != 0 || ContinuousClock.now < spinEnd {
                ChannelMemory.relax()
                continue
            }
            // No wait outlives a revocation already in the ring.
            let deadline = min(deadline, earliestDeadline(channel) ?? deadline)
            guard ContinuousClock.now < deadline else {
                expired(generation: channel.generation, what: what)
                return false
            }
            // Sleep: the flag, a fence, one more look, then the futex.
            let event = channel.memory.loadAcquire32(at: RevocationChannel.ackEventOffset)
            channel.memory.storeRelease32(1, at: RevocationChannel.daemonWaitingOffset)
            ChannelMemory.fullFence()
            if case .waiting = observe(channel, through: sequence) {
                count { $0.channelSleeps += 1 }
                _ = channel.memory.wait(at: RevocationChannel.ackEventOffset, whileEqualTo: event, until: deadline)
            }
            channel.memory.storeRelease32(0, at: RevocationChannel.daemonWaitingOffset)
        }
    }
}
