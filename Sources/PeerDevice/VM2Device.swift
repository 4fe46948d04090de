import BridgeCore
import DeviceEngine
import LinuxIO
import PeerProtocol

/// The device half of the emulated VM2: serves VM1's queues from the BAR
/// with the `DeviceEngine` (bursts, notification suppression, optional
/// polling), asks the daemon for translations of what is not granted yet,
/// and verifies, counts, echoes or forwards frames. The control half (the
/// peer protocol) is in EmulatedVM2.swift.
extension VM2DeviceThread {
    /// One pass over every queue, then the frames waiting for RX buffers;
    /// faults are translated (outside the burst: a translation processes
    /// control messages, revocations among them). Returns whether anything
    /// moved and whether a queue still has chains waiting.
    func serve() -> (worked: Bool, more: Bool) {
        var worked = false, more = false
        // A few rounds at most: each fault gets one translation per pass.
        for _ in 0..<4 where stopReason == nil {
            guard let pass = runPass() else { return (worked, more) }
            worked = worked || pass.chains > 0
            more = more || pass.more
            signal(pass.calls)
            foldCounters()
            guard !pass.stops.isEmpty else { break }
            for stop in pass.stops { resolve(stop.queue, stop.reason) }
        }
        if deliverPending() { worked = true }
        return (worked, more)
    }

    private func runPass() -> NetDevice.Pass? {
        if let inspector { return device.pass(.inspect) { queue, _, frame in inspector(queue, frame) } }
        switch configuration.dataPath {
        case .count: return device.pass(.count)
        case .forward: return device.pass(.forward)
        case .verify:
            let echo = configuration.echo
            return device.pass(.inspect) { queue, _, frame in
                self.verify(frame, echoTo: echo ? queue - 1 : nil)
            }
        }
    }

    /// A queue stopped: translate what it needs, or give up on the chain or ring.
    func resolve(_ queue: Int, _ reason: QueueStop) {
        switch reason {
        case .fault(.missing(let address, let length, let access)):
            // A MAP may be waiting in the channel: the next round sees it.
            if drainChannel() > 0 { return }
            if !translateAndWait(address, length: length, access: access) {
                device.refuseNextFault(on: queue)
                parkIfRingFault(queue, address)
            }
        case .fault(.outside):
            disable(queue, "a ring area is outside the BAR")
        case .fault(.truncated):
            disable(queue, "a ring area is in unsealed memory VM1 truncated")
        case .defect(let why):
            disable(queue, why)
        }
    }

    /// A ring area (not a buffer) that cannot be translated: the queue waits
    /// for VM1 to set it up again.
    private func parkIfRingFault(_ queue: Int, _ address: UInt64) {
        guard let q = device.queue(queue) else { return }
        let r = q.ring
        let inRing = (address >= r.desc && address < r.desc + r.descriptorTableBytes)
            || (address >= r.avail && address < r.avail + r.availBytes(eventIndex: q.eventIndex))
            || (address >= r.used && address < r.used + r.usedBytes(eventIndex: q.eventIndex))
        if inRing { disable(queue, "ring memory is not granted") }
    }

    private func disable(_ queue: Int, _ why: String) {
        guard let q = device.removeQueue(queue) else { return }
        parked[queue] = q
        refuse(why)
        events?.append(.ringStopped(queue))
    }

    func signal(_ queues: [Int]) {
        guard !queues.isEmpty else { return }
        for i in queues { _ = try? notifiers[i]?.call?.signal() }
        owner.update { $0.notificationsSent += queues.count }
    }

    /// A frame VM1 transmitted, read in place: verified, and copied for the
    /// echo (the test mode's one copy; the other modes copy nothing).
    private func verify(_ frame: borrowing ChainBytes, echoTo rx: Int?) {
        frame.withContiguousBytes { whole in
            let payload = UnsafeRawBufferPointer(rebasing: whole[VirtioNetHeader.size...])
            switch TestPacket.verify(payload) {
            case .valid:
                counters.verified += 1
                if let rx { queueEcho(Array(whole), to: rx) }
            case .corrupt:
                counters.corrupt += 1
            case .notATestPacket:
                if EthernetCheck.isPlausible(payload) { counters.framesValid += 1 } else { counters.framesInvalid += 1 }
                // The Linux guest's datagrams are checked byte by byte.
                switch GuestDatagram.verify(payload) {
                case true?:
                    counters.verified += 1
                    if let rx, configuration.reflectsGuestDatagrams, let back = GuestDatagram.reflected(whole) { queueEcho(back, to: rx) }
                case false?: counters.corrupt += 1
                case nil: break
                }
            }
        }
    }

    private func queueEcho(_ bytes: [UInt8], to rx: Int) {
        if pendingFrames.count < 4096 { pendingFrames.append((rx, bytes)) } else { owner.update { $0.echoesDropped += 1 } }
    }

    /// Echoes (and generated frames) into VM1's RX buffers, in order, until
    /// a queue has no room. Returns whether any was delivered.
    func deliverPending() -> Bool {
        if pendingFrames.isEmpty, generated < configuration.generateFrames, let burst = deliverGenerated() { return burst }
        var delivered = false
        var calls: Set<Int> = []
        while let (rx, bytes) = pendingFrames.first, stopReason == nil {
            guard device.queue(rx) != nil else { pendingFrames.removeFirst(); owner.update { $0.echoesDropped += 1 }; continue }
            guard let (outcome, call) = bytes.withUnsafeBytes({ device.deliver($0, to: rx) }) else { break }
            if call { calls.insert(rx) }
            switch outcome {
            case .delivered:
                pendingFrames.removeFirst()
                counters.sent += 1
                counters.bytesSent += UInt64(bytes.count - VirtioNetHeader.size)
                delivered = true
                continue
            case .noRoom:
                break
            case .tooLarge:
                pendingFrames.removeFirst()
                owner.update { $0.echoesDropped += 1 }
                continue
            case .stopped(let reason):
                resolve(rx, reason)
                if device.queue(rx) == nil { continue }
                if case .fault = reason { continue }
            }
            break
        }
        signal(calls.sorted())
        foldCounters()
        return delivered
    }

    /// Generated frames (`generateFrames`): up to four bursts (256 frames)
    /// per receive queue per call, each queue published once (measured with
    /// testpmd rxonly, 64 B, one queue pair: 10.8 Mpps with one burst per
    /// call, 17.7–21.5 with four). Returns whether any was delivered (nil:
    /// no receive queue runs yet).
    private func deliverGenerated() -> Bool? {
        var pairs = 0
        while device.queue(pairs * 2) != nil { pairs += 1 }
        guard pairs > 0 else { return nil }
        if let custom = configuration.generatedFrame {
            if generatorTemplate.isEmpty { generatorTemplate = custom }
        } else if generatorTemplate.count != configuration.frameSize + VirtioNetHeader.size {
            generatorTemplate = Self.frame(number: 0, size: configuration.frameSize)
        }
        var delivered = false
        var calls: [Int] = []
        for pair in 0..<pairs where stopReason == nil {
            let rx = pair * 2
            let want = min(4 * device.burst, configuration.generateFrames - generated)
            guard want > 0 else { break }
            guard let (n, stop, call) = generatorTemplate.withUnsafeBytes({ device.deliver($0, times: want, to: rx) }) else { break }
            if call { calls.append(rx) }
            generated += n
            counters.sent += n
            counters.bytesSent += UInt64(n * (generatorTemplate.count - VirtioNetHeader.size))
            if n > 0 { delivered = true }
            if case .stopped(let reason)? = stop { resolve(rx, reason) }
        }
        signal(calls)
        foldCounters()
        return delivered
    }

    func refuse(_ reason: String) {
        owner.update { $0.descriptorsRefused += 1; $0.refusalReasons[reason, default: 0] += 1 }
    }

    /// The engine's per-queue counters and this thread's verdicts, folded
    /// into the shared statistics (once per pass, never per packet).
    func foldCounters() {
        var rx = QueueCounters(), tx = QueueCounters()
        for (i, c) in device.counters.enumerated() {
            if i % 2 == 1 { tx.add(c) } else { rx.add(c) }
        }
        let implausible = device.implausibleFrames
        let c = counters
        let absorbed = device.memory.faultsAbsorbed
        if absorbed != foldedFaults {
            foldedFaults = absorbed
            owner.update { $0.faultsAbsorbed = absorbed }
        }
        let logged = (device.memory.loggedWrites, device.memory.unloggedWrites)
        if logged != foldedLog {
            foldedLog = logged
            owner.update { $0.writesLogged = logged.0; $0.writesUnlogged = logged.1 }
        }
        guard tx != folded.tx || rx != folded.rx || implausible != folded.implausible || c.verified + c.corrupt + c.framesValid + c.framesInvalid + c.sent > 0 else { return }
        let old = folded
        folded = (tx, rx, implausible)
        counters = Counters()
        let counting = configuration.dataPath != .verify
        let perPair = stride(from: 1, to: device.counters.count, by: 2).map { device.counters[$0].chains }
        owner.update { s in
            s.receivedPerQueuePair = perPair
            s.packetsReceived += tx.chains - old.tx.chains
            s.bytesReceived += tx.bytes - old.tx.bytes
            s.packetsVerified += c.verified
            s.packetsCorrupt += c.corrupt
            if counting {
                s.framesInvalid += implausible - old.implausible
                s.framesValid += (tx.chains - old.tx.chains) - (implausible - old.implausible)
            } else {
                s.framesValid += c.framesValid
                s.framesInvalid += c.framesInvalid
            }
            if configuration.dataPath == .forward {
                s.packetsSent += rx.chains - old.rx.chains
                s.bytesSent += rx.bytes - old.rx.bytes
                s.echoesDropped += rx.dropped - old.rx.dropped
            } else {
                s.packetsSent += c.sent
                s.bytesSent += c.bytesSent
            }
            for r in ChainRefusal.allCases {
                let n = tx.refused[r.rawValue] + rx.refused[r.rawValue] - old.tx.refused[r.rawValue] - old.rx.refused[r.rawValue]
                if n > 0 {
                    s.descriptorsRefused += n
                    s.refusalReasons[r.description, default: 0] += n
                }
            }
        }
    }
}
