import BridgeCore
import LinuxIO
import PeerProtocol

/// Carries window plans to VM2 (MAP, UNMAP) and, when a plan takes access
/// away, waits for VM2's acknowledgement before the caller acknowledges VM1.
/// Used by the bridge thread only; the fds it sends belong to `RegionFiles`.
final class PeerMirror {
    private let peer: PeerLink
    private let files: RegionFiles

    init(peer: PeerLink, files: RegionFiles) {
        self.peer = peer
        self.files = files
    }

    /// Mirrors a window plan to VM2 and, when it takes access away, waits for
    /// VM2's ack (or disconnects VM2 at the deadline) — before VM1 is acked.
    func push(_ plan: WindowPlan) {
        guard peer.isReady, !plan.isEmpty else { return }
        var last: PeerLink.Ticket?
        var revokes = plan.revokesAccess
        func unmap(_ bus: BusAddress, _ length: UInt64) {
            let ticket = peer.takeSequence()
            if peer.send(.unmap(PeerUnmap(sequence: ticket.sequence, barOffset: bus.rawValue, length: length))) {
                peer.count { $0.unmapsSent += 1 }
                last = ticket
            }
        }
        /// A MAP that cannot be sent (no read-only fd could be made) must not
        /// leave VM2 with what was there before: revoke the range instead.
        func map(_ bus: BusAddress, _ length: UInt64, _ permission: Permission, _ region: RegionID, _ fdOffset: UInt64) {
            if let ticket = sendMap(bus: bus, length: length, permission: permission, region: region, fdOffset: fdOffset) {
                last = ticket
            } else if peer.isReady {
                unmap(bus, length)
                revokes = true
            }
        }
        for op in plan.operations {
            switch op {
            case .map(let bus, let length, let permission, let region, let fdOffset):
                map(bus, length, permission, region, fdOffset)
            case .protect(let bus, let length, let permission, let region, let fdOffset):
                map(bus, length, permission, region, fdOffset)
            case .unmap(let bus, let length):
                unmap(bus, length)
            }
        }
        if revokes, let last { peer.waitForAck(last) }
    }

    /// After a failed plan: make sure VM2 has none of its ranges either.
    func revoke(_ plan: WindowPlan) {
        guard peer.isReady else { return }
        var last: PeerLink.Ticket?
        for op in plan.operations {
            let ticket = peer.takeSequence()
            if peer.send(.unmap(PeerUnmap(sequence: ticket.sequence, barOffset: op.bus.rawValue, length: op.length))) { last = ticket }
        }
        if let last { peer.waitForAck(last) }
    }

    func sendMap(bus: BusAddress, length: UInt64, permission: Permission, region: RegionID, fdOffset: UInt64,
                         onlyIfReady: Bool = true, generation: Int? = nil) -> PeerLink.Ticket? {
        guard let fd = permission.contains(.write) ? files.fd(region) : files.readOnly(region) else { return nil }
        let ticket = peer.takeSequence()
        guard peer.send(.map(PeerMap(sequence: ticket.sequence, barOffset: bus.rawValue, length: length, fdOffset: fdOffset,
                                     permission: permission)), fds: [fd.rawValue], onlyIfReady: onlyIfReady,
                        generation: generation) else { return nil }
        peer.count { $0.mapsSent += 1 }
        return ticket
    }
}
