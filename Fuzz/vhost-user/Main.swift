import BridgeCore
import FuzzSupport
import VhostUser

@main
enum FuzzVhostUser {
    static func main() {
        writeSeedsIfAsked(seeds)
        runFuzzer { fuzzVhostUser($0, $1) }
    }

    /// One message as the target reads it: control byte, then the encoding.
    static func message(_ r: FrontendRequest, fds: UInt8 = 0, kind: UInt8 = 0, needReply: Bool = true) -> [UInt8] {
        [fds | kind << 4 | 2 << 2 | (needReply ? 0x40 : 0)] + VhostUserCodec.encode(r)
    }

    /// QEMU's and testpmd's openings (as the daemon records them), ring set-up,
    /// IOTLB traffic and teardown.
    static func seeds() -> [String: [UInt8]] {
        let ring: [UInt8] = [
            FrontendRequest.setVringNum(VringState(index: 0, num: 256)), .setVringBase(VringState(index: 0, num: 0)),
            .setVringAddr(VringAddress(index: 0, descriptor: 0x7f00_0010_0000, used: 0x7f00_0010_2000, available: 0x7f00_0010_1000)),
        ].flatMap { message($0) } + message(.setVringKick(VringFileRef(index: 0, noFD: false)), fds: 1, kind: 0)
            + message(.setVringCall(VringFileRef(index: 0, noFD: false)), fds: 1, kind: 0)
            + message(.setVringEnable(VringState(index: 0, num: 1)))
        let iotlb = [
            FrontendRequest.iotlb(IOTLBMessage(iova: 0x1000_0000, size: 0x10000, userAddress: 0x7f00_0000_0000, permission: .readWrite, type: .update)),
            .iotlb(IOTLBMessage(iova: 0x1000_4000, size: 0x1000, userAddress: 0, permission: .none, type: .invalidate)),
            .iotlb(IOTLBMessage(iova: 0, size: 0, userAddress: 0, permission: Permission(rawValue: 3), type: .invalidate)),
        ].flatMap { message($0) }
        let qemuOpening = [FrontendRequest.getFeatures, .getProtocolFeatures, .setProtocolFeatures(0x1_c029), .getQueueNum,
                           .getMaxMemSlots, .setOwner, .setFeatures(0x1_4000_0000)].flatMap { message($0) }
            + message(.setMemTable([RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 256 << 20,
                                                     userAddress: FrontendUserAddress(0x7f00_0000_0000), mmapOffset: 0)]), fds: 1, kind: 1)
        let testpmdOpening = [FrontendRequest.setOwner, .getFeatures, .getProtocolFeatures, .setProtocolFeatures(0x1_c029),
                              .setFeatures(0x1_4000_0000), .setStatus(0xf), .getStatus].flatMap { message($0) }
        return [
            "qemu-identity": [0, 0, 0] + qemuOpening + ring + message(.getVringBase(VringState(index: 0, num: 0))),
            "qemu-iommu": [1, 0, 0] + qemuOpening + iotlb + ring,
            "negotiated-iommu-traffic": [1, 1, 1] + iotlb + ring + iotlb + message(.resetDevice),
            "testpmd": [0, 0, 0] + testpmdOpening + ring + message(.getVringBase(VringState(index: 0, num: 0))),
        ]
    }
}
