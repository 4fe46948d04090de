import BridgeCore
import LinuxIO
import Logging
import VhostUser

/// A session's vring notifications: VM1's kick/call/err fds (owned here until
/// replaced or the session ends) and, in relay modes, the relay links and
/// the eventfds VM2 gets instead of VM1's. Used by the bridge thread only.
final class RingNotifications {
    private let relay: NotificationRelay?
    private let logger: Logger
    private var files: [Int: [VringFileKind: OwnedFileDescriptor]] = [:]
    /// Relay modes: per vring, the eventfds VM2 gets and the two relay links.
    private struct RelayedRing {
        var vm2Kick: EventFD        // the daemon writes (VM1 kicked), VM2 reads
        var vm2Call: EventFD        // VM2 writes (doorbell), the daemon reads
        /// nil while VM1 polls the ring (SET_VRING_KICK with the no-fd bit):
        /// no kicks come, and VM2 gets no kick fd (it polls too).
        var kickLink: NotificationRelay.LinkID?
        var callLink: NotificationRelay.LinkID
    }
    private var relayed: [Int: RelayedRing] = [:]
    /// Final counters of links already removed (stopped rings).
    private(set) var retired = (kick: RelayLinkStatistics(), call: RelayLinkStatistics())

    init(relay: NotificationRelay?, logger: Logger) {
        self.relay = relay
        self.logger = logger
    }

    /// Live links per vring: (kick, call).
    var links: [Int: (kick: NotificationRelay.LinkID, call: NotificationRelay.LinkID)] {
        relayed.compactMapValues { r in r.kickLink.map { ($0, r.callLink) } }
    }

    /// Replaces vring `index`'s `kind` fd (nil: none); the old one is closed.
    func set(_ kind: VringFileKind, index: Int, _ fd: OwnedFileDescriptor?) {
        try? files[index]?.removeValue(forKey: kind)?.close()
        if let fd { files[index, default: [:]][kind] = fd }
    }

    /// The kick and call eventfds VM2 gets for ring `index`: the relay's in
    /// relay modes, VM1's own in passthrough.
    func eventfdsForVM2(_ index: Int) -> (kick: Int32?, call: Int32?) {
        if let r = relayed[index] { return (r.kickLink == nil ? nil : r.vm2Kick.fd.rawValue, r.vm2Call.fd.rawValue) }
        return (files[index]?[.kick]?.rawValue, files[index]?[.call]?.rawValue)
    }

    /// Relay modes: VM2 gets the daemon's eventfds and the relay moves
    /// VM1 kick → VM2 and VM2 doorbell → VM1 call.
    func startRelay(_ index: Int) {
        guard let relay, relayed[index] == nil, let kick = files[index]?[.kick] else { return }
        var kickLink: NotificationRelay.LinkID?
        do {
            let vm2Kick = try EventFD(), vm2Call = try EventFD()
            kickLink = try relay.add(source: try kick.duplicate(), target: try vm2Kick.fd.duplicate())
            let callTarget = try files[index]?[.call]?.duplicate()
            let callLink = try relay.add(source: try vm2Call.fd.duplicate(), target: callTarget)
            if let kickLink { relayed[index] = RelayedRing(vm2Kick: vm2Kick, vm2Call: vm2Call, kickLink: kickLink, callLink: callLink) }
        } catch {
            // The half that was made must not outlive the failure.
            if let kickLink, let stats = relay.remove(kickLink) { retired.kick.add(stats) }
            logger.error("vring \(index): cannot relay notifications: \(error)")
        }
    }

    func stopRelay(_ index: Int) {
        guard let relay, let r = relayed.removeValue(forKey: index) else { return }
        if let link = r.kickLink, let k = relay.remove(link) { retired.kick.add(k) }
        if let c = relay.remove(r.callLink) { retired.call.add(c) }
        try? r.vm2Kick.fd.close()
        try? r.vm2Call.fd.close()
    }

    /// VM1 replaced a kick or call fd of a relayed ring.
    func updateRelay(_ index: Int, _ kind: VringFileKind) {
        guard let relay, let r = relayed[index] else { return }
        switch kind {
        case .call:
            relay.retarget(r.callLink, target: try? files[index]?[.call]?.duplicate())
            // QEMU swaps a ring's call fd when it masks or unmasks the
            // vector (at every device start, e.g. on a migration's
            // destination) and then looks once at the old fd for a call it
            // missed. A doorbell the relay moved to the old fd after that
            // look is lost, and with EVENT_IDX nothing calls again until
            // the guest moves used_event, which it does on a call: the
            // ring stalls. One spurious call on the new fd, after the
            // relay uses it, covers the instant of the swap (virtio
            // tolerates spurious notifications).
            if let call = files[index]?[.call] { _ = try? EventFD(adopting: call).signal() }
        case .kick:
            // VM2 keeps its eventfds: only the link's source changes. A kick
            // VM1 wrote to the new fd before the link reads it is still
            // counted in that eventfd; one spurious kick to VM2 covers the
            // instant of the swap (virtio tolerates spurious notifications).
            if let link = r.kickLink, let old = relay.remove(link) { retired.kick.add(old) }
            relayed[index]?.kickLink = nil
            // Polling now (no fd): the call link stays, VM2 is told it gets
            // no kicks (the caller re-sends the ring).
            guard files[index]?[.kick] != nil else { return }
            guard let newKick = try? files[index]?[.kick]?.duplicate(), let target = try? r.vm2Kick.fd.duplicate() else {
                stopRelay(index)
                return
            }
            do {
                relayed[index]?.kickLink = try relay.add(source: newKick, target: target)
                _ = try? r.vm2Kick.signal()
            } catch {
                logger.error("vring \(index): cannot relay the new kick fd: \(error)")
                stopRelay(index)
            }
        case .err:
            break
        }
    }

    /// Every link removed and every fd closed (the session ended).
    func closeAll() {
        for index in Array(relayed.keys) { stopRelay(index) }
        for ring in files.values { for fd in ring.values { try? fd.close() } }
        files = [:]
    }
}
