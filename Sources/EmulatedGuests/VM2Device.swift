import BridgeCore
import LinuxIO
import PeerProtocol

/// The device half of the emulated VM2: serves VM1's split rings through the
/// BAR — every access checked against what the daemon granted, translations
/// asked for what is missing, packets verified in place and echoed. The
/// control half (the peer protocol) is in EmulatedVM2.swift.
extension VM2Engine {
    /// Makes `[address, address+length)` accessible with `needed`, asking
    /// the daemon for a translation when it is not granted yet. That may
    /// process control messages — revocations among them — so it is called
    /// before `checked`, never between `checked` and the access it guards.
    func ensure(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> Bool {
        guard window != nil, length <= UInt64(Int.max) else { return false }
        switch table.check(address, length: length, needed: needed, barSize: barSize) {
        case nil:
            return true
        case .notMapped?, .denied?:
            return translateAndWait(address, length: length, access: needed)
                && table.check(address, length: length, needed: needed, barSize: barSize) == nil
        case .wraps?, .outsideBAR?:
            return false
        }
    }

    /// The window, when `[address, address+length)` is granted with `needed`
    /// *now* — checked without any control processing, so nothing can be
    /// revoked between this check and an access made right after it.
    func grantedNow(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> BARWindow? {
        guard let window, length <= UInt64(Int.max),
              table.check(address, length: length, needed: needed, barSize: barSize) == nil else { return nil }
        return window
    }

    /// `ensure`, then `grantedNow`.
    func granted(_ address: UInt64, _ length: UInt64, _ needed: Permission) -> BARWindow? {
        ensure(address, length, needed) ? grantedNow(address, length, needed) : nil
    }

    /// The bytes, checked against what is granted now, inside `body` only:
    /// no pointer outlives it.
    func checked<R>(_ address: UInt64, _ length: UInt64, _ needed: Permission,
                    _ body: (UnsafeMutableRawBufferPointer) -> R) -> R? {
        grantedNow(address, length, needed)?.withBytes(at: address, length: Int(length), body) ?? nil
    }

    /// `ensure`, then `checked`.
    func access<R>(_ address: UInt64, _ length: UInt64, _ needed: Permission,
                   _ body: (UnsafeMutableRawBufferPointer) -> R) -> R? {
        guard ensure(address, length, needed) else { return nil }
        return checked(address, length, needed, body)
    }

    func loadIndex(_ address: UInt64) -> UInt16? {
        granted(address, 2, .read)?.loadAcquire(at: address) ?? nil
    }

    /// Processes up to one ring's worth of entries; returns whether more are
    /// waiting (so control messages — revocations — are never starved).
    @discardableResult
    func process(ring index: Int) -> Bool {
        guard var ring = rings[index], ring.enabled, ring.size > 0 else { return false }
        var progressed = false
        var budget = Int(ring.size)
        var more = false
        while stopReason == nil {
            if budget == 0 { more = true; break }
            budget -= 1
            guard let availIdx = loadIndex(ring.layout.availIndex) else { refuse("avail ring not mapped"); break }
            if availIdx == ring.lastAvail { break }
            guard let head = access(ring.layout.availEntry(ring.lastAvail), 2, .read, { UInt16(littleEndian: $0.loadUnaligned(as: UInt16.self)) }) else {
                refuse("avail ring not mapped"); break
            }
            let written: UInt32
            if index % 2 == 1 {
                written = transmit(ring: ring, head: head)
            } else {
                // RX: fill with a pending echo (or a generated frame), or leave it posted for later.
                if pendingEcho.isEmpty, generated < configuration.generateFrames {
                    pendingEcho.append(Self.frame(number: generated, size: configuration.frameSize))
                    generated += 1
                }
                guard let packet = pendingEcho.first else { break }
                guard let n = receive(ring: ring, head: head, packet: packet) else { break }
                pendingEcho.removeFirst()
                written = n
            }
            // A VRING_STOP (or a DEVICE stop) handled while this chain waited
            // for a translation ended the ring: VM2 already reported where it
            // stopped, so nothing more may be completed or written back.
            guard rings[index] != nil else { flushCounters(); return false }
            // Used ring entry, then the index (release).
            _ = access(ring.layout.usedElement(ring.usedIndex), 8, .write) { entry in
                entry.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
                entry.storeBytes(of: written.littleEndian, toByteOffset: 4, as: UInt32.self)
            }
            ring.lastAvail &+= 1
            ring.usedIndex &+= 1
            granted(ring.layout.usedIndex, 2, .write)?.storeRelease(ring.usedIndex, at: ring.layout.usedIndex)
            rings[index] = ring
            progressed = true
        }
        flushCounters()
        if progressed {
            _ = try? ring.call?.signal()
            owner.update { $0.notificationsSent += 1 }
        }
        // TX produced echoes: give them to RX.
        if index % 2 == 1, !pendingEcho.isEmpty, rings[index - 1] != nil { process(ring: index - 1) }
        return more
    }

    func refuse(_ reason: String) {
        owner.update { $0.descriptorsRefused += 1; $0.refusalReasons[reason, default: 0] += 1 }
    }

    /// One descriptor chain: (address, length, writable) entries, checked.
    func chain(_ ring: Ring, head: UInt16) -> [(UInt64, UInt32, Bool)]? {
        var out: [(UInt64, UInt32, Bool)] = []
        var i = head
        for _ in 0..<ring.size {
            let at = ring.layout.descriptor(i)
            guard UInt32(i) < ring.size, let window = granted(at, Descriptor.size, .read),
                  let d = Descriptor.load(from: window, at: at) else { return nil }
            out.append((d.address, d.length, d.deviceWritable))
            if !d.hasNext { return out }
            i = d.next
        }
        return nil // a loop
    }

    func transmit(ring: Ring, head: UInt16) -> UInt32 {
        guard let parts = chain(ring, head: head) else { refuse("tx: unreadable or looping chain"); return 0 }
        guard parts.allSatisfy({ !$0.2 }) else { refuse("tx: device-writable buffer in a TX chain"); return 0 }
        // Every part made accessible first (translations may process
        // revocations); then read, each checked again right before it is
        // touched. Single-buffer packets (the emulated VM1 and DPDK send one
        // descriptor) are verified in place; chains are gathered.
        for (addr, len, _) in parts where !ensure(addr, UInt64(len), .read) { refuse("tx: buffer not mapped readable"); return 0 }
        let total = parts.reduce(0) { $0 + Int($1.1) }
        guard total >= 12 else { refuse("tx: shorter than the virtio-net header"); return 0 }
        var bytes: [UInt8] = []
        let verdict: TestPacket.Verdict
        let plausible: Bool
        if parts.count == 1 {
            let echo = configuration.echo
            guard let (v, p, copy) = checked(parts[0].0, UInt64(parts[0].1), .read, { view -> (TestPacket.Verdict, Bool, [UInt8]) in
                let payload = UnsafeRawBufferPointer(rebasing: view[12...])
                let v = TestPacket.verify(payload)
                var copy: [UInt8] = []
                if echo, case .valid = v { copy = Array(view) }
                return (v, EthernetCheck.isPlausible(payload), copy)
            }) else { refuse("tx: buffer revoked while in use"); return 0 }
            (verdict, plausible, bytes) = (v, p, copy)
        } else {
            for (addr, len, _) in parts {
                guard let part = checked(addr, UInt64(len), .read, { Array($0) }) else { refuse("tx: buffer revoked while in use"); return 0 }
                bytes += part
            }
            let payload = Array(bytes.dropFirst(12))
            verdict = TestPacket.verify(payload)
            plausible = payload.withUnsafeBytes { EthernetCheck.isPlausible($0) }
        }
        counters.received += 1
        counters.bytesReceived += UInt64(total - 12)
        switch verdict {
        case .valid: counters.verified += 1
        case .corrupt: counters.corrupt += 1
        case .notATestPacket: if plausible { counters.framesValid += 1 } else { counters.framesInvalid += 1 }
        }
        if configuration.echo, case .valid = verdict {
            if pendingEcho.count < 4096 { pendingEcho.append(bytes) } else { owner.update { $0.echoesDropped += 1 } }
        }
        return 0
    }

    /// Writes `packet` into an RX chain; nil when the chain is not usable.
    func receive(ring: Ring, head: UInt16, packet: [UInt8]) -> UInt32? {
        guard let parts = chain(ring, head: head) else { refuse("rx: unreadable or looping chain"); return 0 }
        guard parts.allSatisfy({ $0.2 }) else { refuse("rx: read-only buffer in an RX chain"); return 0 }
        var offset = 0
        for (addr, len, _) in parts where offset < packet.count {
            let n = min(Int(len), packet.count - offset)
            let start = offset
            let copied: Void? = access(addr, UInt64(n), .write) { view in
                packet.withUnsafeBytes { src in view.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[start..<(start + n)])) }
            }
            guard copied != nil else { refuse("rx: buffer not mapped writable"); return 0 }
            offset += n
        }
        guard offset == packet.count else { owner.update { $0.echoesDropped += 1 }; return UInt32(offset) }
        counters.sent += 1
        counters.bytesSent += UInt64(packet.count - 12)
        return UInt32(offset)
    }
}
