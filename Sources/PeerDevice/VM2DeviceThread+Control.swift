import BridgeCore
import DeviceEngine
import LinuxIO
import PeerProtocol

/// The device thread's control side: the daemon's peer-protocol messages
/// (MAP, UNMAP, VRING, VRING_STOP, DEVICE, TRANSLATE_REPLY) and the
/// translations other threads ask for.
extension VM2DeviceThread {
    func readControl() {
        let message: PeerMessage
        let fds: [OwnedFileDescriptor]
        do {
            var parsed: (PeerCodec.Header, PeerMessageType)?
            guard let framed = try socket.receiveFramed(payloadSize: { bytes in
                let v = try PeerCodec.validate(header: bytes); parsed = v; return Int(v.0.size)
            }), let (header, type) = parsed else { stopReason = "daemon closed the connection"; return }
            fds = framed.fds
            message = try PeerCodec.decode(header, type, payload: framed.payload, fdCount: framed.fds.count)
        } catch {
            stopReason = "protocol error: \(error)"
            owner.update { $0.lastError = "\(error)" }
            return
        }
        handle(message, fds: fds)
    }

    func ack(_ seq: UInt64) {
        guard configuration.acknowledges else { return }
        try? socket.send(PeerCodec.encode(.ack(seq)))
    }

    /// Maps one MAP from `fd` into the BAR (from the socket or the
    /// channel); false, with the error noted, when it could not.
    func apply(_ m: PeerMap, fd: OwnedFileDescriptor) -> Bool {
        do {
            try device.memory.map(bus: m.barOffset, length: m.length, permission: m.permission, fd: fd.rawValue, fdOffset: m.fdOffset,
                                  unsealed: m.unsealed, guestPhysical: m.guestPhysical)
            return true
        } catch {
            owner.update { $0.lastError = "MAP: \(error)" }
            return false
        }
    }

    func handle(_ message: PeerMessage, fds: [OwnedFileDescriptor]) {
        // Channel records posted before this message take effect before it
        // (a TRANSLATE_REPLY after its MAP, a DEVICE stop after an UNMAP).
        if case .region = message {} else { drainChannel() }
        switch message {
        case .helloReply(let info):
            features = info.features
            do {
                let w = try BARWindow(size: info.barSize)
                device.memory.attach(w)
                owner.setWindow(w)
                owner.update { $0.ready = true; $0.barSize = info.barSize; $0.mode = info.mode.rawValue }
                if configuration.forcesDirtyLog, info.features.contains(.dirtyLog) { setLog(try Self.ownLog()) }
            } catch {
                stopReason = "cannot reserve a BAR of \(info.barSize) bytes: \(error)"
            }
        case .map(let m):
            guard device.memory.window != nil, let fd = fds.first else { stopReason = "MAP before HELLO reply"; return }
            if apply(m, fd: fd) {
                let mapped = device.memory.grants.bytesMapped
                owner.update { $0.mapsApplied += 1; $0.bytesMapped = mapped; if m.unsealed { $0.unsealedMapsApplied += 1 } }
            }
            try? fd.close()
            ack(m.sequence)
        case .unmap(let u):
            guard device.memory.window != nil else { return }
            // Forgotten first: from here on the device refuses the range.
            device.memory.unmap(bus: u.barOffset, length: u.length)
            events?.append(.revoked(barOffset: u.barOffset, length: u.length))
            let mapped = device.memory.grants.bytesMapped
            owner.update { $0.unmapsApplied += 1; $0.bytesMapped = mapped }
            ack(u.sequence)
        case .vring(let v):
            let index = Int(v.index)
            var n = notifiers[index] ?? Notifiers()
            var next = 0
            // No kick fd: VM1 does not kick this ring (it polls): neither
            // does VM2 wait for one (`run` looks at kick-less rings often).
            try? n.kick?.fd.close()
            n.kick = nil
            if v.hasKick {
                n.kick = next < fds.count ? EventFD(adopting: OwnedFileDescriptor(adopting: fds[next].release())) : nil
                next += 1
            }
            if v.hasCall {
                try? n.call?.fd.close()
                n.call = next < fds.count ? EventFD(adopting: OwnedFileDescriptor(adopting: fds[next].release())) : nil
            }
            n.enabled = v.enabled
            notifiers[index] = n
            pollSetDirty = true
            // An in-order device resumes where it was (its used index equals
            // its last avail index); a new queue starts where VM1 says.
            let wasRunning = device.queue(index) != nil
            let was = device.queue(index) ?? parked.removeValue(forKey: index)
            device.removeQueue(index)
            if v.enabled {
                let ring = SplitRing(size: v.num, desc: v.desc, avail: v.avail, used: v.used)
                if let defect = device.setQueue(index, ring: ring, start: was?.lastAvail ?? v.lastAvail, usedIndex: was?.usedIndex) {
                    if let q = device.removeQueue(index) { parked[index] = q }
                    refuse(defect)
                    if wasRunning { events?.append(.ringStopped(index)) }
                } else if !wasRunning {
                    events?.append(.ringStarted(index))
                } else if v.hasCall {
                    // A running ring's call fd was replaced (QEMU swaps them
                    // when it masks and unmasks the vector, and looks once at
                    // the old fd for a call it missed): a call made on the old
                    // fd after that look is lost, and with EVENT_IDX nothing
                    // calls again until the driver moves used_event, which it
                    // does only when called. One spurious call on the new fd
                    // closes that window (the relay does the same for VM1).
                    // A VRING sent again with the same fd cannot be told
                    // apart (each carries a fresh duplicate): it gets the
                    // call too, which virtio tolerates.
                    _ = try? notifiers[index]?.call?.signal()
                }
            } else if let was {
                parked[index] = was
                if wasRunning { events?.append(.ringStopped(index)) }
            }
        case .vringStop(let index):
            let stopped = device.removeQueue(Int(index)) ?? parked.removeValue(forKey: Int(index))
            parked[Int(index)] = nil
            if let n = notifiers.removeValue(forKey: Int(index)) { try? n.kick?.fd.close(); try? n.call?.fd.close() }
            pollSetDirty = true
            if stopped != nil { events?.append(.ringStopped(Int(index))) }
            if features.contains(.vringStopAck) {
                try? socket.send(PeerCodec.encode(.vringStopped(index: index, lastAvail: stopped?.lastAvail)))
            }
        case .device(let d):
            if d.event == .reset { setLog(nil) } // the session ended: so did VM1's logging
            if d.event == .start {
                device.start(features: d.features)
                events?.append(.deviceStarted(features: d.features))
            } else {
                for i in notifiers.keys.sorted() where device.queue(i) != nil { events?.append(.ringStopped(i)) }
                events?.append(.deviceStopped)
                for n in notifiers.values { try? n.kick?.fd.close(); try? n.call?.fd.close() }
                notifiers = [:]
                device.removeAllQueues()
                parked = [:]
                pollSetDirty = true
            }
        case .translateReply(let r):
            if awaiting.keys.contains(r.requestID) {
                awaiting[r.requestID] = .some(r)
            } else {
                if let ticket = inFlight.removeValue(forKey: r.requestID) { owner.translations.answer(ticket, r) }
            }
            owner.update { r.status == .granted ? ($0.translationsGranted += 1) : ($0.translationsRefused += 1) }
        case .error(let e):
            stopReason = "daemon error \(e.code): \(e.text)"
        case .channel(let c):
            openChannel(c, fds.first)
        case .region(let r):
            if let fd = fds.first { regionSlots[r.slot] = OwnedFileDescriptor(adopting: fd.release()) }
            drainChannel() // a record that named this slot may be waiting
        case .wake:
            owner.update { $0.wakesReceived += 1 }
            drainChannel()
        case .log(let l):
            var failure: String?
            if l.on {
                if let fd = fds.first {
                    do { setLog(try DirtyLogMemory(adopting: fd, size: l.size, offset: l.offset)) } catch {
                        setLog(nil)
                        failure = "\(error)"
                    }
                } else {
                    failure = "LOG on without a log fd"
                }
            } else {
                setLog(nil)
            }
            owner.update { if failure == nil { $0.logsApplied += 1 } }
            try? socket.send(PeerCodec.encode(.logDone(PeerLogDone(serial: l.serial, failure: failure))))
        case .hello, .ack, .translate, .vringStopped, .logDone:
            stopReason = "unexpected \(message.type) from the daemon"
        }
        for fd in fds { try? fd.close() }
    }

    /// `forcesDirtyLog`'s log: a sealed, sparse memfd for every page of a
    /// 47-bit guest-physical space.
    static func ownLog() throws -> DirtyLogMemory {
        let bytes = DirtyLog.bytesNeeded(toCover: 1 << 47)
        let memfd = try Memfd(name: "vm2-own-log", size: bytes)
        defer { try? memfd.fd.close() } // the mapping stays
        try memfd.addSeals([.shrink, .grow])
        return try DirtyLogMemory(adopting: memfd.fd, size: bytes, offset: 0)
    }

    /// Logs into `log` from the next burst on (nil: stops logging).
    func setLog(_ log: DirtyLogMemory?) {
        device.memory.setDirtyLog(log)
        let on = log != nil
        owner.update { $0.logging = on }
    }

    /// Translations other threads asked for: sent now, answered when the
    /// daemon replies (`inFlight`).
    func runCommands() {
        for (ticket, t) in owner.translations.take() {
            owner.update { $0.translationsRequested += 1 }
            inFlight[t.requestID] = ticket
            try? socket.send(PeerCodec.encode(.translate(t)))
        }
    }

    /// Asks for a translation and handles control traffic until the reply
    /// comes (MAPs arrive before it). Returns whether it was granted.
    func translateAndWait(_ address: UInt64, length: UInt64, access: Permission) -> Bool {
        guard configuration.translates else { return false }
        let id = nextRequest
        nextRequest += 1
        awaiting[id] = .some(nil)
        let asked = ContinuousClock.now
        let spinUntil = asked.advanced(by: configuration.pollFor)
        defer { let waited = asked.duration(to: .now) / .seconds(1); owner.update { $0.translationWaitSeconds += waited } }
        owner.update { $0.translationsRequested += 1 }
        guard (try? socket.send(PeerCodec.encode(.translate(PeerTranslate(requestID: id, barOffset: address, length: length, access: access))))) != nil else {
            return false
        }
        while stopReason == nil {
            if case .some(.some(let reply)) = awaiting[id] {
                awaiting[id] = nil
                return reply.status == .granted
            }
            // A polling engine keeps polling while it waits (the channel
            // too: a revocation posted meanwhile is acked at once); one that
            // sleeps says so, and the daemon sends WAKE with a revocation.
            let spinning = configuration.pollFor > .zero && ContinuousClock.now < spinUntil
            let asleep = !spinning && announceSleep()
            let polled = try? Poll.readable([owner.stopFD, socket.fd.rawValue], timeoutMilliseconds: asleep ? 5000 : 0)
            if asleep { endSleep() }
            drainChannel()
            guard let ready = polled else { return false }
            if !asleep, !ready[0], !ready[1] { continue }
            if ready[0] { stopReason = "stopped"; return false }
            if ready[1] { readControl() } else { awaiting[id] = nil; return false }
        }
        return false
    }
}
