import BridgeCore
import LinuxIO
import Logging
import PeerProtocol

/// Carries window plans to VM2 (MAP, UNMAP) and, when a plan takes access
/// away, waits for VM2's acknowledgement before the caller acknowledges VM1.
/// Used by the bridge thread only; the fds it sends belong to `RegionFiles`.
final class PeerMirror {
    private let peer: PeerLink
    private let files: RegionFiles
    private let unsealedRegions: UnsealedRegionPolicy
    private let logger: Logger

    init(peer: PeerLink, files: RegionFiles, unsealedRegions: UnsealedRegionPolicy = .mark, logger: Logger) {
        self.peer = peer
        self.files = files
        self.unsealedRegions = unsealedRegions
        self.logger = logger
    }

    /// Whether ranges of `region` are kept from VM2: it is not sealed
    /// against shrinking (VM1 could truncate it under VM2, a SIGBUS there),
    /// and the policy is `refuse` or VM2 did not negotiate `unsealedMaps`.
    /// `features`: VM2's negotiated peer features (nil: the ready VM2's).
    func withholds(_ region: RegionID, features: PeerFeatures? = nil) -> Bool {
        guard !files.isSealed(region) else { return false }
        return unsealedRegions == .refuse || !(features ?? peer.features).contains(.unsealedMaps)
    }

    /// Mirrors a window plan to VM2 and, when it takes access away, waits for
    /// VM2's ack (or disconnects VM2 at the deadline) — before VM1 is acked.
    func push(_ plan: WindowPlan) {
        _ = push(plan, thenReply: nil)
    }

    /// `push`, with VM1's reply to the request (when it revokes access and
    /// VM2 must ack) sent by the peer thread as soon as the ack arrives.
    /// `.notSent`: the caller sends the reply.
    func push(_ plan: WindowPlan, thenReply reply: (bytes: [UInt8], socket: UnixSocket)?) -> PeerLink.HeldReplyOutcome {
        finish(send(plan), thenReply: reply)
    }

    /// What `send` sent: the last sequence, and whether VM2 must ack it
    /// before VM1 is answered.
    struct Sent {
        var last: PeerLink.Ticket?
        var revokes: Bool
        static let nothing = Sent(last: nil, revokes: false)
    }

    /// The MAPs and UNMAPs of `plan`, sent (or posted in the channel)
    /// without waiting: a revocation can go to VM2 before the daemon's own
    /// window changes, so the two happen at once (`finish` waits).
    func send(_ plan: WindowPlan) -> Sent {
        guard peer.isReady, !plan.isEmpty else { return .nothing }
        var last: PeerLink.Ticket?
        var revokes = plan.revokesAccess
        func unmap(_ bus: BusAddress, _ length: UInt64) {
            if let ticket = peer.sendUnmap(barOffset: bus.rawValue, length: length) {
                peer.count { $0.unmapsSent += 1 }
                last = ticket
            }
        }
        /// A MAP that cannot be sent (no read-only fd could be made) must not
        /// leave VM2 with what was there before: revoke the range instead.
        /// In a plan that takes access away (a lower permission, a range moved
        /// elsewhere) a MAP is a revocation too: VM2 holds it until it acks.
        func map(_ bus: BusAddress, _ length: UInt64, _ permission: Permission, _ region: RegionID, _ fdOffset: UInt64) {
            if let ticket = sendMap(bus: bus, length: length, permission: permission, region: region, fdOffset: fdOffset,
                                    revoking: plan.revokesAccess) {
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
        return Sent(last: last, revokes: revokes)
    }

    /// Waits for VM2's ack of what `send` sent when it took access away (or
    /// disconnects VM2 at the deadline); with `reply`, VM1's answer may go
    /// out from the peer thread the moment the ack is read.
    func finish(_ sent: Sent, thenReply reply: (bytes: [UInt8], socket: UnixSocket)?) -> PeerLink.HeldReplyOutcome {
        guard sent.revokes, let last = sent.last else { return .notSent }
        guard let reply else {
            peer.waitForAck(last)
            return .notSent
        }
        return peer.waitForAck(last, replying: reply.bytes, on: reply.socket)
    }

    /// After a failed plan: make sure VM2 has none of its ranges either.
    func revoke(_ plan: WindowPlan) {
        guard peer.isReady else { return }
        var last: PeerLink.Ticket?
        for op in plan.operations {
            if let ticket = peer.sendUnmap(barOffset: op.bus.rawValue, length: op.length) { last = ticket }
        }
        if let last { peer.waitForAck(last) }
    }

    /// Region `id`'s files are about to close: a VM2 that holds them as
    /// channel REGIONs closes its copies too.
    func forget(_ region: RegionID) {
        let held = files.held(region)
        if !held.isEmpty { peer.forget(held) }
    }

    /// One MAP; nil when it was not sent (no read-only fd, the send failed,
    /// or the region is withheld: see `withholds`, counted under the rule
    /// `unsealed-region` and logged once per region).
    func sendMap(bus: BusAddress, length: UInt64, permission: Permission, region: RegionID, fdOffset: UInt64,
                         duringReplay: Bool = false, generation: Int? = nil, features: PeerFeatures? = nil,
                         revoking: Bool = false) -> PeerLink.Ticket? {
        let unsealed = !files.isSealed(region)
        if withholds(region, features: features) {
            peer.count { $0.refusals["unsealed-region", default: 0] += 1 }
            if files.firstWithheld(region) {
                let why = unsealedRegions == .refuse ? "unsealed-regions is refuse" : "VM2 did not negotiate the peer feature unsealedMaps"
                logger.warning("\(region) is not sealed against shrinking (VM1 could truncate it under VM2): its ranges are not sent to VM2 (\(why))",
                               metadata: ["rule": "unsealed-region"])
            }
            return nil
        }
        guard let fd = permission.contains(.write) ? files.fd(region) : files.readOnly(region) else { return nil }
        // A VM2 that logs its writes needs the range's guest-physical address.
        let gpa = (features ?? peer.features).contains(.dirtyLog) ? files.guestPhysical(region, fdOffset: fdOffset) : nil
        guard let ticket = peer.sendMap(PeerMap(sequence: 0, barOffset: bus.rawValue, length: length, fdOffset: fdOffset,
                                                permission: permission, unsealed: unsealed, guestPhysical: gpa),
                                        fd: fd, revoking: revoking, duringReplay: duringReplay, generation: generation) else { return nil }
        peer.count { $0.mapsSent += 1 }
        return ticket
    }
}
