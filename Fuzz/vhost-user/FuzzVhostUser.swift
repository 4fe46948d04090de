import BridgeCore
import FuzzSupport
import VhostUser

/// A *sequence* of vhost-user messages through the framing checks, the codec
/// and one `BackendSession`, with synthetic fds of chosen kinds and sizes.
/// Invariants after every message: a refused request changes nothing, the
/// address space keeps its invariants, every effect names fds the message
/// carried.
///
/// Input: mode byte, queue-pairs byte, negotiate byte, then per message:
/// control byte (bits 0-1 fd count, 2-3 file size, 4-5 file kind, 6 NEED_REPLY),
/// 12-byte header, payload (as long as the header says, cut at the input's end).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzVhostUser(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let mode: BridgeMode = input.pick([.identity, .iommu])
    let pairs = Int(input.byte() % 4) + 1
    guard var session = try? BackendSession(BackendConfiguration(
        bridgeName: "fuzz", addressSpace: AddressSpaceConfiguration(barSize: 1 << 40, mode: mode), queuePairs: pairs)) else {
        fuzzFailure("a valid configuration was refused")
    }
    if input.byte() & 1 == 1 { negotiateLikeQEMU(&session, iommu: mode == .iommu) }
    var steps = 0
    while !input.isEmpty, steps < 256 {
        steps += 1
        let control = input.byte()
        let head = input.take(12)
        guard head.count == 12, let header = try? MessageHeader.decode(head),
              let code = try? VhostUserCodec.validate(header) else { continue }
        let payload = input.take(Int(min(header.size, UInt32(VhostUserCodec.maximumPayload(code)))))
        let fdCount = Int(control & 3)
        guard let request = try? VhostUserCodec.decode(code, payload: payload, fdCount: fdCount) else { continue }
        let sizes: [UInt64?] = [nil, 0, 4096, 1 << 30]
        let kinds: [FileKind] = [.eventfd, .regularFile, .socket, .pipe]
        let files = (0..<fdCount).map {
            ReceivedFile(index: $0, size: sizes[Int(control >> 2) & 3], kind: kinds[Int(control >> 4) & 3])
        }
        let before = session.snapshot
        let outcome = session.handle(request, needReply: control & 0x40 != 0, files: files)
        if outcome.error != nil, session.snapshot != before { fuzzFailure("refused \(request.code) changed the session") }
        if let violation = session.addressSpace.invariantViolation() { fuzzFailure("after \(request.code): \(violation)") }
        for effect in outcome.effects {
            switch effect {
            case .adoptRegionFile(_, let i) where i >= fdCount, .adoptBackendChannel(let i) where i >= fdCount:
                fuzzFailure("\(request.code) adopts fd \(i) of \(fdCount)")
            case .setVringFile(_, _, let i?) where i >= fdCount:
                fuzzFailure("\(request.code) takes fd \(i) of \(fdCount)")
            default: break
            }
        }
    }
    return 0
}

/// QEMU's opening: negotiate, own, set features, one memory region.
func negotiateLikeQEMU(_ s: inout BackendSession, iommu: Bool) {
    let ram = RegionDescriptor(guestPhysical: GuestPhysicalAddress(0), size: 256 << 20,
                               userAddress: FrontendUserAddress(0x7f00_0000_0000), mmapOffset: 0)
    for (request, files) in [
        (FrontendRequest.getFeatures, [ReceivedFile]()),
        (.getProtocolFeatures, []),
        (.setProtocolFeatures(s.configuration.protocolFeatures.rawValue), []),
        (.setOwner, []),
        (.setFeatures(FeatureBit.version1 | FeatureBit.protocolFeatures | (iommu ? FeatureBit.iommuPlatform : 0)), []),
        (.setMemTable([ram]), [ReceivedFile(index: 0, size: 256 << 20, kind: .regularFile)]),
    ] {
        if let e = s.handle(request, needReply: true, files: files).error { fuzzFailure("QEMU's opening was refused: \(e)") }
    }
}
