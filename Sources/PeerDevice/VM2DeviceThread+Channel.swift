import BridgeCore
import DeviceEngine
import LinuxIO
import PeerProtocol

/// VM2's side of the revocation channel (peer feature `sharedRevocations`):
/// records are applied in sequence order between bursts, then the cumulative
/// ack is stored (release) and, when the daemon sleeps on it, its futex word
/// bumped and woken. Before sleeping in poll the device thread raises
/// `vm2Sleeping`, so the daemon sends WAKE after posting.
extension VM2DeviceThread {
    func openChannel(_ c: PeerChannel, _ fd: OwnedFileDescriptor?) {
        guard channel == nil, let fd else { stopReason = "CHANNEL twice, or without its fd"; return }
        do {
            let memory = try ChannelMemory(adopting: OwnedFileDescriptor(adopting: fd.release()), size: Int(c.size))
            guard memory.read(16, at: 0) == RevocationChannel.identification(capacity: c.capacity) else {
                stopReason = "the revocation channel's header does not match CHANNEL"
                return
            }
            channel = (memory, c.capacity)
            channelApplied = memory.loadAcquire64(at: RevocationChannel.ackedOffset)
        } catch {
            stopReason = "cannot map the revocation channel: \(error)"
        }
    }

    /// Applies every record posted since the last drain (up to one that
    /// names a REGION not read yet: it is on the socket, read next) and
    /// acks them. Returns how many were applied.
    @discardableResult
    func drainChannel() -> Int {
        guard let (memory, capacity) = channel, stopReason == nil else { return 0 }
        let posted = memory.loadAcquire64(at: RevocationChannel.postedOffset)
        guard posted > channelApplied else { return 0 }
        guard posted - channelApplied <= UInt64(capacity) else {
            stopReason = "the channel's posted index \(posted) is more than a ring ahead of \(channelApplied)"
            return 0
        }
        var applied = 0, maps = 0, unsealedMaps = 0, unmaps = 0
        records: while channelApplied < posted {
            let sequence = channelApplied + 1
            let record: ChannelRecord
            do {
                guard let bytes = memory.read(RevocationChannel.recordSize,
                                              at: RevocationChannel.recordOffset(sequence: sequence, capacity: capacity)) else { break }
                record = try ChannelRecord.decode(bytes, expecting: sequence)
            } catch {
                stopReason = "protocol error in the revocation channel: \(error)"
                return applied
            }
            switch record {
            case .map(let m, let slot):
                guard let fd = regionSlots[slot] else { break records } // its REGION is still on the socket
                if apply(m, fd: fd) {
                    maps += 1
                    if m.unsealed { unsealedMaps += 1 }
                }
            case .unmap(let u):
                // Forgotten first: from here on the device refuses the range.
                device.memory.unmap(bus: u.barOffset, length: u.length)
                events?.append(.revoked(barOffset: u.barOffset, length: u.length))
                unmaps += 1
            case .forget(_, let slot):
                try? regionSlots.removeValue(forKey: slot)?.close()
            }
            channelApplied = sequence
            applied += 1
        }
        guard applied > 0 else { return 0 }
        let mapped = device.memory.grants.bytesMapped
        owner.update {
            $0.mapsApplied += maps; $0.unsealedMapsApplied += unsealedMaps; $0.unmapsApplied += unmaps; $0.channelRecords += applied; $0.bytesMapped = mapped
        }
        if configuration.acknowledges { publishAck(memory) }
        return applied
    }

    /// The cumulative ack (release), then the daemon woken if it sleeps.
    private func publishAck(_ memory: ChannelMemory) {
        memory.storeRelease64(channelApplied, at: RevocationChannel.ackedOffset)
        ChannelMemory.fullFence()
        if memory.loadAcquire32(at: RevocationChannel.daemonWaitingOffset) != 0 {
            memory.fetchAdd32(1, at: RevocationChannel.ackEventOffset)
            memory.wake(at: RevocationChannel.ackEventOffset)
        }
    }

    /// About to sleep: raise `vm2Sleeping`, then look at `posted` once
    /// more. False when records wait (do not sleep).
    func announceSleep() -> Bool {
        guard let (memory, _) = channel else { return true }
        memory.storeRelease32(1, at: RevocationChannel.vm2SleepingOffset)
        ChannelMemory.fullFence()
        guard memory.loadAcquire64(at: RevocationChannel.postedOffset) == channelApplied else {
            memory.storeRelease32(0, at: RevocationChannel.vm2SleepingOffset)
            return false
        }
        return true
    }

    func endSleep() {
        channel?.memory.storeRelease32(0, at: RevocationChannel.vm2SleepingOffset)
    }
}
